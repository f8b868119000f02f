//! What the figures of `bench all` are judged by: the table's rows (case, JSON key,
//! label, which direction is better) and the bars of the issues.

use crate::orchestrate::Results;
use crate::report::{self, Bar, Better, Row};
use crate::target::Kind;
use serde_json::Value;

/// (case, JSON key, label, better)
const ROWS: &[(&str, &str, &str, Better)] = &[
    (
        "tp-qos0",
        "msgs_per_s",
        "throughput QoS 0, 4 pub × 4 sub, unbounded: delivered msgs/s",
        Better::Higher,
    ),
    (
        "tp-qos0",
        "lost",
        "throughput QoS 0 unbounded: messages lost",
        Better::Lower,
    ),
    (
        "tp-qos0",
        "p99_ms",
        "throughput QoS 0 unbounded: p99 latency ms",
        Better::Lower,
    ),
    (
        "tp-qos1",
        "msgs_per_s",
        "throughput QoS 1, 4×4, unbounded: delivered msgs/s",
        Better::Higher,
    ),
    (
        "tp-qos1",
        "lost",
        "throughput QoS 1 unbounded: messages lost",
        Better::Lower,
    ),
    (
        "tp-qos1",
        "p99_ms",
        "throughput QoS 1 unbounded: p99 latency ms",
        Better::Lower,
    ),
    (
        "tp-qos1",
        "broker_peak_rss_mb",
        "throughput QoS 1 unbounded: broker peak RSS MB",
        Better::Lower,
    ),
    (
        "tp-qos1-rate",
        "p50_ms",
        "throughput QoS 1, 4×4 at 5,000 msgs/s: p50 ms",
        Better::Lower,
    ),
    (
        "tp-qos1-rate",
        "p99_ms",
        "throughput QoS 1 at 5,000/s: p99 ms",
        Better::Lower,
    ),
    (
        "tp-qos1-rate",
        "p999_ms",
        "throughput QoS 1 at 5,000/s: p99.9 ms",
        Better::Lower,
    ),
    (
        "tp-qos1-rate",
        "lost",
        "throughput QoS 1 at 5,000/s: lost",
        Better::Lower,
    ),
    (
        "tp-sweep",
        "max_rate_zero_loss",
        "sweep QoS 4×4: highest offered msgs/s, zero loss, p99 < 50 ms",
        Better::Higher,
    ),
    (
        "fanout",
        "msgs_per_s",
        "fanout QoS 1, 1 pub × 20 sub, unbounded: delivered msgs/s",
        Better::Higher,
    ),
    (
        "fanout",
        "lost",
        "fanout QoS 1: messages lost",
        Better::Lower,
    ),
    ("fanout", "p99_ms", "fanout QoS 1: p99 ms", Better::Lower),
    (
        "fanout",
        "broker_peak_rss_mb",
        "fanout QoS 1: broker peak RSS MB",
        Better::Lower,
    ),
    (
        "fanout-durable",
        "msgs_per_s",
        "durable fanout QoS 1, 1 pub × 20 persistent sub: delivered msgs/s",
        Better::Higher,
    ),
    (
        "fanout-durable",
        "puback_p99_ms",
        "durable fanout: PUBACK p99 ms",
        Better::Lower,
    ),
    (
        "fanout-durable",
        "lost",
        "durable fanout: messages lost",
        Better::Lower,
    ),
    (
        "latency",
        "p50_ms",
        "latency QoS 1 at 1,000 msgs/s: p50 ms",
        Better::Lower,
    ),
    (
        "latency",
        "p99_ms",
        "latency at 1,000/s: p99 ms",
        Better::Lower,
    ),
    (
        "latency",
        "p999_ms",
        "latency at 1,000/s: p99.9 ms",
        Better::Lower,
    ),
    ("latency", "lost", "latency at 1,000/s: lost", Better::Lower),
    (
        "noisy",
        "quiet_p99_ms",
        "noisy neighbour: 1,000/s QoS 1 pair alone, p99 ms",
        Better::Lower,
    ),
    (
        "noisy",
        "noisy_p99_ms",
        "noisy neighbour: the pair beside a QoS 1 flood, p99 ms",
        Better::Lower,
    ),
    (
        "noisy",
        "p99_ratio",
        "noisy neighbour: noisy p99 / quiet p99",
        Better::Lower,
    ),
    (
        "noisy",
        "flood_msgs_per_s",
        "noisy neighbour: the flood's msgs/s delivered to its subscriber",
        Better::Higher,
    ),
    (
        "noisy-budget",
        "quiet_p99_ms",
        "noisy neighbour, read budget (ours): pair alone, p99 ms",
        Better::Lower,
    ),
    (
        "noisy-budget",
        "noisy_p99_ms",
        "noisy neighbour, read budget (ours): beside the flood, p99 ms",
        Better::Lower,
    ),
    (
        "noisy-budget",
        "p99_ratio",
        "noisy neighbour, read budget (ours): noisy p99 / quiet p99",
        Better::Lower,
    ),
    (
        "noisy-budget",
        "flood_msgs_per_s",
        "noisy neighbour, read budget (ours): the flood's msgs/s",
        Better::Higher,
    ),
    (
        "connections",
        "established",
        "connections: established",
        Better::Higher,
    ),
    (
        "connections",
        "handshakes_per_s",
        "connections: handshakes/s (offered 1,000/s)",
        Better::Higher,
    ),
    (
        "handshakes",
        "handshakes_per_s",
        "handshake capacity: handshakes/s, 32 in flight (closed loop)",
        Better::Higher,
    ),
    (
        "handshakes",
        "broker_cpu_ms_per_connection",
        "handshake capacity: broker CPU ms per handshake",
        Better::Lower,
    ),
    (
        "connections",
        "connect_p99_ms",
        "connections: connect p99 ms",
        Better::Lower,
    ),
    (
        "connections",
        "kib_per_connection",
        "connections: broker KiB per connection",
        Better::Lower,
    ),
    (
        "retained",
        "received",
        "retained 10,000: received by a new subscriber",
        Better::Higher,
    ),
    (
        "retained",
        "time_to_all_ms",
        "retained 10,000: ms until the last",
        Better::Lower,
    ),
    (
        "slowloris",
        "baseline_connect_ms",
        "slowloris: connect+CONNACK ms, no silent sockets",
        Better::Lower,
    ),
    (
        "slowloris",
        "loaded_connect_ms",
        "slowloris: connect+CONNACK ms, 1,000 silent sockets",
        Better::Lower,
    ),
    (
        "slowloris",
        "connect_ratio",
        "slowloris: loaded / baseline",
        Better::Lower,
    ),
    (
        "durable-one",
        "msgs_per_s",
        "durable retained QoS 1, 1 pub × 100 in flight: acks/s",
        Better::Higher,
    ),
    (
        "durable-one",
        "p99_ms",
        "durable retained, 1 × 100: PUBACK p99 ms",
        Better::Lower,
    ),
    (
        "durable-many",
        "msgs_per_s",
        "durable retained QoS 1, 8 pub × 1 in flight: acks/s",
        Better::Higher,
    ),
    (
        "durable-many",
        "p99_ms",
        "durable retained, 8 × 1: PUBACK p99 ms",
        Better::Lower,
    ),
    (
        "durable-restart",
        "start_ms",
        "restart with the retained store: spawn → CONNACK ms",
        Better::Lower,
    ),
    (
        "durable-restart",
        "restored_delivered",
        "restart: retained messages delivered afterwards",
        Better::Higher,
    ),
    (
        "durable-restart",
        "rss_after_restart_mb",
        "restart: broker RSS MB with the store loaded",
        Better::Lower,
    ),
    (
        "offline-queue",
        "lost",
        "offline queue, SIGKILL: acknowledged messages lost",
        Better::Lower,
    ),
    (
        "offline-queue",
        "rss_queued_mb",
        "offline queue: broker RSS MB holding it",
        Better::Lower,
    ),
    (
        "offline-queue",
        "start_ms",
        "offline queue: restart, spawn → CONNACK ms",
        Better::Lower,
    ),
    (
        "offline-queue",
        "rss_after_restart_mb",
        "offline queue: broker RSS MB after restart",
        Better::Lower,
    ),
    (
        "offline-queue",
        "drain_msgs_per_s",
        "offline queue: drain msgs/s after restart",
        Better::Higher,
    ),
];

pub fn rows(results: &Results) -> Vec<Row> {
    ROWS.iter()
        .filter(|(case, key, ..)| {
            results
                .0
                .iter()
                .any(|v| v["case"] == *case && v.get(*key).is_some())
        })
        .map(|(case, key, label, better)| Row {
            scenario: (*case).to_string(),
            metric: (*label).to_string(),
            better: *better,
            ours: results.median(case, Kind::Ours, key),
            mosquitto: results.median(case, Kind::Mosquitto, key),
        })
        .collect()
}

fn x(v: Option<f64>) -> String {
    v.map(report::fmt_num).unwrap_or_else(|| "–".into())
}

/// The bars of the issue, judged on medians (losses: on every run).
pub fn bars(r: &Results) -> Vec<Bar> {
    let o = |c: &str, k: &str| r.median(c, Kind::Ours, k);
    let m = |c: &str, k: &str| r.median(c, Kind::Mosquitto, k);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let mut bars = Vec::new();

    let sweep = ratio(
        o("tp-sweep", "max_rate_zero_loss"),
        m("tp-sweep", "max_rate_zero_loss"),
    );
    bars.push(Bar {
        name:
            "throughput QoS 1 4×4, zero loss, p99 < 50 ms: ≥ 5× Mosquitto's highest loss-free rate"
                .into(),
        met: sweep.map(|s| s >= 5.0),
        detail: format!(
            "ours {} msgs/s, Mosquitto {} msgs/s: {}",
            x(o("tp-sweep", "max_rate_zero_loss")),
            x(m("tp-sweep", "max_rate_zero_loss")),
            sweep
                .map(|s| format!("{s:.2}× (bar 5×)"))
                .unwrap_or_else(|| "no ratio".into())
        ),
    });

    let fan = ratio(o("fanout", "msgs_per_s"), m("fanout", "msgs_per_s"));
    let fan_lost = r.max("fanout", Kind::Ours, "lost");
    bars.push(Bar {
        name: "fanout QoS 1 (1 × 20): ≥ 5× Mosquitto, zero loss".into(),
        met: fan.zip(fan_lost).map(|(f, l)| f >= 5.0 && l == 0.0),
        detail: format!(
            "ours {} msgs/s, Mosquitto {}: {}; ours lost (worst run) {}",
            x(o("fanout", "msgs_per_s")),
            x(m("fanout", "msgs_per_s")),
            fan.map(|s| format!("{s:.2}×"))
                .unwrap_or_else(|| "no ratio".into()),
            x(fan_lost)
        ),
    });

    let p99 = ratio(o("latency", "p99_ms"), m("latency", "p99_ms"));
    let p999 = o("latency", "p999_ms");
    bars.push(Bar {
        name: "latency at 1,000 msgs/s QoS 1: p99 ≤ 0.8× Mosquitto's and p99.9 ≤ 1 ms".into(),
        met: p99.zip(p999).map(|(a, b)| a <= 0.8 && b <= 1.0),
        detail: format!(
            "p99 ours {} ms vs {} ms ({}); p99.9 ours {} ms",
            x(o("latency", "p99_ms")),
            x(m("latency", "p99_ms")),
            p99.map(|s| format!("{s:.2}×"))
                .unwrap_or_else(|| "–".into()),
            x(p999)
        ),
    });

    noisy_bar(r, &mut bars);

    let offered =
        r.0.iter()
            .find(|v| v["case"] == "connections")
            .and_then(|v| v.get("offered").and_then(Value::as_f64));
    let est = r
        .values("connections", Kind::Ours, "established")
        .into_iter()
        .reduce(f64::min);
    // Capacity, from the closed-loop case: at the fixed offer both can only keep up.
    let hs_case = if o("handshakes", "handshakes_per_s").is_some() {
        "handshakes"
    } else {
        "connections"
    };
    let hs = ratio(
        o(hs_case, "handshakes_per_s"),
        m(hs_case, "handshakes_per_s"),
    );
    let mem = (
        o("connections", "kib_per_connection"),
        m("connections", "kib_per_connection"),
    );
    bars.push(Bar {
        name:
            "connections: all established, ≥ 2× handshakes/s, memory per connection ≤ Mosquitto's"
                .into(),
        met: match (est, offered, hs, mem) {
            (Some(e), Some(n), Some(h), (Some(a), Some(b))) => Some(e >= n && h >= 2.0 && a <= b),
            _ => None,
        },
        detail: format!(
            "established (worst run) {}/{}; handshakes/s {}× ({} vs {}); KiB/connection {} vs {}",
            x(est),
            x(offered),
            hs.map(|s| format!("{s:.2}")).unwrap_or_else(|| "–".into()),
            x(o(hs_case, "handshakes_per_s")),
            x(m(hs_case, "handshakes_per_s")),
            x(mem.0),
            x(mem.1)
        ),
    });

    let ret_min = r
        .values("retained", Kind::Ours, "received")
        .into_iter()
        .reduce(f64::min);
    let ret_t = o("retained", "time_to_all_ms");
    bars.push(Bar {
        name: "retained: 10,000 of 10,000 delivered to a new subscriber in < 0.5 s".into(),
        met: ret_min.map(|n| n >= 10_000.0 && ret_t.is_some_and(|t| t < 500.0)),
        detail: format!(
            "ours {} received (worst run) in {} ms; Mosquitto {} in {} ms",
            x(ret_min),
            x(ret_t),
            x(m("retained", "received")),
            x(m("retained", "time_to_all_ms"))
        ),
    });

    let slow = o("slowloris", "connect_ratio");
    bars.push(Bar {
        name: "slowloris: connect time with 1,000 silent sockets within 2× baseline".into(),
        met: slow.map(|s| s <= 2.0),
        detail: format!(
            "ours {} ms vs {} ms baseline ({}×); Mosquitto {}×",
            x(o("slowloris", "loaded_connect_ms")),
            x(o("slowloris", "baseline_connect_ms")),
            x(slow),
            x(m("slowloris", "connect_ratio"))
        ),
    });

    // QoS 1 loss by what the broker's log says about it: a session's "message dropped"
    // lines, rumqttd's cursor jumps (logged without a client), or nothing at all.
    let (mut qos1_lost, mut dropped, mut skipped, mut silent) = (0.0, 0.0, 0.0, 0.0);
    let mut peak: f64 = 0.0;
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    for v in r.runs(Kind::Ours) {
        let qos1 = v["variant"].as_str().is_some_and(|s| s.starts_with("qos1"))
            || v["case"] == "retained"
            || v["case"] == "durable-restart";
        let lost = num(v, "lost");
        if qos1 {
            qos1_lost += lost;
            let d = num(v, "broker_reported_drops");
            let k = num(v, "router_skipped");
            dropped += d.min(lost);
            skipped += k.min((lost - d).max(0.0));
            silent += (lost - d - k).max(0.0);
        }
        if ["tp-qos0", "tp-qos1", "tp-sweep", "fanout"].contains(&v["case"].as_str().unwrap_or(""))
        {
            peak = peak.max(num(v, "broker_peak_rss_mb"));
        }
    }
    let conn_peak = r.max("connections", Kind::Ours, "broker_peak_rss_mb");
    bars.push(Bar {
        name: "any overload: zero QoS 1 messages lost silently, broker memory < 200 MB".into(),
        met: Some(silent == 0.0 && skipped == 0.0 && peak < 200.0),
        detail: format!(
            "QoS 1 lost over all runs {}: {} with a `message dropped` line (session queue full), \
             {} only as rumqttd `Read cursor start jumped` warnings (no client named), {} with \
             no log line at all (approximate: drop lines come every 1,000 drops); peak RSS under \
             overload {} MB (10,000 idle connections: {} MB)",
            x(Some(qos1_lost)),
            x(Some(dropped)),
            x(Some(skipped)),
            x(Some(silent)),
            x(Some(peak)),
            x(conn_peak)
        ),
    });

    let start = o("durable-restart", "start_ms");
    bars.push(Bar {
        name: "start with the retained store (goal): spawn → CONNACK < 1 s".into(),
        met: start.map(|s| s < 1000.0),
        detail: format!(
            "ours {} ms (store restore logged: {} ms for {} messages); Mosquitto {} ms",
            x(start),
            x(o("durable-restart", "restore_took_ms")),
            x(o("durable-restart", "restored_logged")),
            x(m("durable-restart", "start_ms"))
        ),
    });
    let offline_lost = r.max("offline-queue", Kind::Ours, "lost");
    let offline_acked = o("offline-queue", "acked");
    bars.push(Bar {
        name: "offline persistent subscriber, SIGKILL and restart: every acknowledged QoS 1 message delivered".into(),
        met: offline_lost.map(|l| l == 0.0),
        detail: format!(
            "ours lost (worst run) {} of {} acknowledged; Mosquitto lost {}",
            x(offline_lost),
            x(offline_acked),
            x(m("offline-queue", "lost"))
        ),
    });
    // Holding the queue: before the crash, and after the restart with it loaded. The
    // peak while draining it is reported beside.
    let rss = match (
        r.max("offline-queue", Kind::Ours, "rss_queued_mb"),
        r.max("offline-queue", Kind::Ours, "rss_after_restart_mb"),
    ) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let peak = r.max("offline-queue", Kind::Ours, "broker_peak_rss_mb");
    let start = o("offline-queue", "start_ms");
    bars.push(Bar {
        name: "1,000,000 queued offline (goal): broker RSS < 100 MB, restart → CONNACK < 2 s"
            .into(),
        met: match (offline_acked, rss, start) {
            (Some(n), Some(rss), Some(s)) => Some(n >= 1e6 && rss < 100.0 && s < 2000.0),
            _ => None,
        },
        detail: format!(
            "ours {} queued: RSS {} MB holding them, {} MB after restart, peak {} MB while \
             draining, restart {} ms; Mosquitto RSS {} MB, restart {} ms",
            x(offline_acked),
            x(o("offline-queue", "rss_queued_mb")),
            x(o("offline-queue", "rss_after_restart_mb")),
            x(peak),
            x(start),
            x(m("offline-queue", "rss_queued_mb")),
            x(m("offline-queue", "start_ms"))
        ),
    });
    bars
}

/// One client flooding must not hurt the others: the pair's p99 beside the flood within 2×
/// of its p99 alone, on our broker with the default settings; with the read budget (when
/// that case ran) as well.
fn noisy_bar(r: &Results, bars: &mut Vec<Bar>) {
    let o = |c: &str, k: &str| r.median(c, Kind::Ours, k);
    let defaults = o("noisy", "p99_ratio");
    let budget = o("noisy-budget", "p99_ratio");
    let met = match (defaults, budget) {
        (Some(d), _) if d <= 2.0 => Some(true),
        (Some(_), Some(b)) => Some(b <= 2.0),
        (d, _) => d.map(|d| d <= 2.0),
    };
    let mut detail = format!(
        "defaults: ours {} ms alone, {} ms beside the flood ({}×), flood {} msgs/s; \
         Mosquitto {} / {} ms ({}×)",
        x(o("noisy", "quiet_p99_ms")),
        x(o("noisy", "noisy_p99_ms")),
        x(defaults),
        x(o("noisy", "flood_msgs_per_s")),
        x(r.median("noisy", Kind::Mosquitto, "quiet_p99_ms")),
        x(r.median("noisy", Kind::Mosquitto, "noisy_p99_ms")),
        x(r.median("noisy", Kind::Mosquitto, "p99_ratio")),
    );
    if budget.is_some() {
        detail.push_str(&format!(
            "; with the read budget: {} / {} ms ({}×), flood {} msgs/s",
            x(o("noisy-budget", "quiet_p99_ms")),
            x(o("noisy-budget", "noisy_p99_ms")),
            x(budget),
            x(o("noisy-budget", "flood_msgs_per_s")),
        ));
    }
    bars.push(Bar {
        name: "noisy neighbour: a 1,000 msgs/s QoS 1 pair's p99 beside a flood within 2× of its p99 alone (ours; with the read budget if the defaults miss)".into(),
        met,
        detail,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(case: &str, target: &str, ratio: f64) -> Value {
        json!({"case": case, "target": target, "p99_ratio": ratio, "quiet_p99_ms": 0.2})
    }

    fn noisy(results: Vec<Value>) -> Bar {
        let mut bars = Vec::new();
        noisy_bar(&Results(results), &mut bars);
        bars.remove(0)
    }

    #[test]
    fn noisy_bar_takes_the_budget_only_when_the_defaults_miss() {
        assert_eq!(noisy(vec![run("noisy", "ours", 1.5)]).met, Some(true));
        assert_eq!(noisy(vec![run("noisy", "ours", 3.0)]).met, Some(false));
        let with_budget = noisy(vec![
            run("noisy", "ours", 3.0),
            run("noisy-budget", "ours", 1.2),
            run("noisy", "mosquitto", 5.0),
        ]);
        assert_eq!(with_budget.met, Some(true));
        assert!(with_budget.detail.contains("with the read budget"));
        assert_eq!(noisy(vec![]).met, None);
    }
}
