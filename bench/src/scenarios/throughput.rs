//! `throughput` (N publishers, M subscribers; unbounded, at a rate, or a sweep for the
//! highest loss-free rate), `fanout` (1 to many) and `latency` (a steady low rate).

use super::load::{self, Load, LoadResult, TopicPlan};
use super::{round, Common, Outcome, Setup};
use crate::codec;
use crate::target;
use rumqttc::mqttbytes::QoS;
use serde_json::json;
use std::time::Duration;

/// Options of the message-flow scenarios.
#[derive(Debug, Clone, clap::Args)]
pub struct FlowArgs {
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    #[arg(long, default_value_t = 4)]
    pub subscribers: usize,
    /// 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Total offered rate in messages/s over all publishers; omitted: unbounded.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Payload bytes.
    #[arg(long, default_value_t = 300)]
    pub payload: usize,
    /// Unacknowledged QoS 1 publishes per publisher.
    #[arg(long, default_value_t = 100)]
    pub inflight: usize,
    /// Find the highest offered rate with zero loss and p99 under --max-p99-ms.
    #[arg(long)]
    pub sweep: bool,
    /// Sweep: seconds per step.
    #[arg(long, default_value_t = 3.0)]
    pub step_secs: f64,
    /// Sweep: first rate tried (doubled until a step fails, then bisected).
    #[arg(long, default_value_t = 2000.0)]
    pub start_rate: f64,
    /// Sweep: p99 latency limit in ms.
    #[arg(long, default_value_t = 50.0)]
    pub max_p99_ms: f64,
    /// Subscribers with persistent sessions (clean session 0).
    #[arg(long)]
    pub persistent: bool,
}

impl FlowArgs {
    fn load(&self, rate: Option<f64>, duration: f64) -> Load {
        Load {
            publishers: self.publishers.max(1),
            subscribers: self.subscribers,
            qos: if self.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            rate,
            duration: Duration::from_secs_f64(duration.max(0.1)),
            count: None,
            payload: self.payload,
            inflight: self.inflight,
            retain: false,
            topics: TopicPlan::PerPublisher,
            filter: "articulos/+/futbol".into(),
            drain: Duration::from_secs(2),
            persistent: self.persistent,
        }
    }

    fn variant(&self) -> String {
        let rate = match (self.sweep, self.rate) {
            (true, _) => "sweep".to_string(),
            (false, Some(r)) => format!("{r:.0}/s"),
            (false, None) => "unbounded".to_string(),
        };
        format!(
            "qos{} {}x{} {}{}",
            self.qos,
            self.publishers,
            self.subscribers,
            rate,
            if self.persistent { " persistent" } else { "" }
        )
    }
}

/// `throughput`, `fanout` and `latency` share this: one run, or a sweep.
pub async fn run(scenario: &str, common: &Common, args: &FlowArgs) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(scenario, common.target, &args.variant());
    let mut setup = Setup::start(common, false).await?;
    let addr = setup.broker.addr();
    let cpu_before = target::process_cpu_secs("/proc/self/stat").unwrap_or(0.0);
    if args.sweep {
        sweep(&mut setup, args, &mut out).await;
    } else {
        let load = args.load(args.rate, args.duration);
        match load::run(addr, &setup.publisher, &setup.subscriber, &load, "t").await {
            Ok(r) => {
                report(&mut out, &r);
                codec_share(&mut out, &r, cpu_before, args.payload);
            }
            Err(e) => out.error(format!("{e:#}")),
        }
    }
    setup.finish(&mut out);
    Ok(out)
}

fn report(out: &mut Outcome, r: &LoadResult) {
    out.set("msgs_per_s", round(r.delivery_rate(), 0));
    out.set("published_per_s", round(r.publish_rate(), 0));
    out.set("sent", r.sent);
    out.set("acked", r.acked);
    out.set("expected", r.expected);
    out.set("received", r.received);
    out.set("lost", r.lost);
    out.set("loss_gaps", r.gaps);
    out.set("lost_samples", r.lost_samples.clone());
    out.set("duplicates", r.duplicates);
    out.set("reordered", r.reordered);
    if let Some(l) = r.latency {
        out.set("p50_ms", round(l.p50_ms, 3));
        out.set("p99_ms", round(l.p99_ms, 3));
        out.set("p999_ms", round(l.p999_ms, 3));
        out.set("max_ms", round(l.max_ms, 3));
    }
    if let Some(l) = r.ack_latency {
        out.set("puback_p50_ms", round(l.p50_ms, 3));
        out.set("puback_p99_ms", round(l.p99_ms, 3));
    }
    if let Some(l) = r.send_lag {
        out.set("send_lag_p99_ms", round(l.p99_ms, 3));
    }
    out.set("seconds", round(r.total_secs, 2));
    out.errors(r.errors.clone());
}

/// The benchmark's own CPU and the share of it spent in the MQTT codec, from a timed
/// encode/decode loop of the same packets.
fn codec_share(out: &mut Outcome, r: &LoadResult, cpu_before: f64, payload: usize) {
    let Ok(cpu_after) = target::process_cpu_secs("/proc/self/stat") else {
        return;
    };
    let bench_cpu = cpu_after - cpu_before;
    let cost = codec::measure(payload, 50_000);
    let codec_secs = (r.encoded as f64 * cost.encode_ns + r.decoded as f64 * cost.decode_ns) / 1e9;
    out.set("bench_cpu_s", round(bench_cpu, 2));
    out.set("codec_cpu_s", round(codec_secs, 3));
    if r.total_secs > 0.0 {
        out.set(
            "codec_share_of_one_core",
            round(codec_secs / r.total_secs, 4),
        );
    }
    if bench_cpu > 0.0 {
        out.set("codec_share_of_bench_cpu", round(codec_secs / bench_cpu, 4));
    }
}

/// Doubles the offered rate until a step fails (loss, p99 latency or p99 send lag over the
/// limit, errors, or the publishers 5% short of the offer), then bisects to within 7%.
async fn sweep(setup: &mut Setup, args: &FlowArgs, out: &mut Outcome) {
    let addr = setup.broker.addr();
    let mut best: Option<(f64, LoadResult)> = None;
    let mut failed: Option<f64> = None;
    let mut rate = args.start_rate.max(1.0);
    let mut steps = Vec::new();
    for step in 0..14 {
        let load = args.load(Some(rate), args.step_secs);
        let tag = format!("s{step}");
        let pass = match load::run(addr, &setup.publisher, &setup.subscriber, &load, &tag).await {
            Ok(r) => {
                let p99 = r.latency.map(|l| l.p99_ms).unwrap_or(f64::INFINITY);
                let lag = r.send_lag.map(|l| l.p99_ms).unwrap_or(0.0);
                let pass = r.lost == 0
                    && r.errors.is_empty()
                    && p99 < args.max_p99_ms
                    && lag < args.max_p99_ms
                    && r.publish_rate() >= 0.95 * rate;
                steps.push(json!({
                    "rate": round(rate, 0),
                    "published_per_s": round(r.publish_rate(), 0),
                    "lost": r.lost,
                    "p99_ms": round(p99.min(1e9), 2),
                    "send_lag_p99_ms": round(lag, 2),
                    "errors": r.errors.len(),
                    "pass": pass,
                }));
                if pass {
                    best = Some((rate, r));
                }
                pass
            }
            Err(e) => {
                steps.push(
                    json!({"rate": round(rate, 0), "error": format!("{e:#}"), "pass": false}),
                );
                false
            }
        };
        if !pass {
            failed = Some(rate);
        }
        if setup.broker.exited().is_some() {
            out.error("the broker exited during the sweep");
            break;
        }
        let lo = best.as_ref().map(|(r, _)| *r).unwrap_or(0.0);
        rate = match failed {
            None => rate * 2.0,
            Some(hi) => {
                if hi - lo <= hi * 0.07 || hi < 50.0 {
                    break;
                }
                (lo + hi) / 2.0
            }
        };
        // A little quiet between steps for the broker to drain.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    out.set("steps", steps);
    match best {
        Some((rate, r)) => {
            report(out, &r);
            out.set("max_rate_zero_loss", round(rate, 0));
        }
        None => {
            out.set("max_rate_zero_loss", 0);
        }
    }
    if let Some(hi) = failed {
        out.set("first_failing_rate", round(hi, 0));
    }
}
