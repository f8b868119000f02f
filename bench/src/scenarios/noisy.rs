//! `noisy`: the `latency` pair (one publisher at 1,000 msgs/s QoS 1 to one subscriber,
//! publish → receive latency from the payload's timestamp) measured alone, then while a
//! neighbour floods the broker on a topic of its own with a subscriber of its own
//! (`flood.rs`). Reports quiet and noisy p50/p99/p99.9 and the ratio of the p99s; the
//! issue's bar is noisy p99 within 2× of quiet. `--max-packets-per-sec` and
//! `--max-bytes-per-sec` give our broker a per-connection read budget; `--warm` keeps the
//! vCPUs awake in both phases (see its help).

use super::flood::{lower_priority, Flood, FloodOpts, FloodResult};
use super::load::{self, Load, LoadResult, TopicPlan};
use super::{round, Common, Outcome, Setup};
use crate::stats::median;
use crate::target::{Kind, ReadBudget};
use rumqttc::mqttbytes::QoS;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct NoisyArgs {
    /// Rate of the latency pair, messages/s (QoS 1).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of each measured phase (quiet, then noisy).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 300)]
    pub payload: usize,
    /// Quiet/noisy pairs, one after the other; the figures are medians over them.
    #[arg(long, default_value_t = 1)]
    pub reps: usize,
    /// QoS of the flood (0 or 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub flood_qos: u8,
    /// Unacknowledged publishes of the flood (QoS 1).
    #[arg(long, default_value_t = 1000)]
    pub flood_inflight: usize,
    /// Nice value of the flood's thread (why: scenarios/flood.rs); 0 competes on equal
    /// terms. Above the spinners' 19, so that they take little from the flood.
    #[arg(long, default_value_t = 10)]
    pub flood_nice: i32,
    /// Threads spinning at nice 19 through both phases, so that neither is measured on
    /// idle vCPUs: on this VM a halted vCPU takes ~0.1–0.3 ms to wake, which made the pair
    /// alone slower than beside a flood that keeps them awake, and beside a throttled flood
    /// as slow as alone. 0: the idle machine.
    #[arg(long, default_value_t = 1)]
    pub warm: usize,
    /// Ours: `[session] max_packets_per_sec` of every connection (0: off, the default).
    #[arg(long, default_value_t = 0)]
    pub max_packets_per_sec: u64,
    /// Ours: `[session] max_bytes_per_sec` of every connection (0: off, the default).
    #[arg(long, default_value_t = 0)]
    pub max_bytes_per_sec: u64,
}

impl NoisyArgs {
    fn budget(&self) -> ReadBudget {
        ReadBudget {
            packets: self.max_packets_per_sec,
            bytes: self.max_bytes_per_sec,
        }
    }

    fn variant(&self, target: Kind) -> String {
        let b = self.budget();
        let budget = match (target, b.packets, b.bytes) {
            (Kind::Ours, 0, 0) => String::new(),
            (Kind::Ours, p, by) => format!(", read budget {p} packets/s {by} B/s"),
            (Kind::Mosquitto, _, _) => String::new(),
        };
        let warm = match self.warm {
            0 => ", idle vCPUs".to_string(),
            _ => String::new(),
        };
        format!(
            "{:.0}/s QoS 1 pair, flood QoS {} × {} in flight{budget}{warm}",
            self.rate, self.flood_qos, self.flood_inflight
        )
    }

    /// The latency pair: `latency`'s load, on `articulos/p0/futbol` (the flood has its own topic).
    fn pair(&self) -> Load {
        Load {
            publishers: 1,
            subscribers: 1,
            qos: QoS::AtLeastOnce,
            rate: Some(self.rate),
            duration: Duration::from_secs_f64(self.duration.max(0.5)),
            count: None,
            payload: self.payload,
            inflight: 100,
            retain: false,
            topics: TopicPlan::PerPublisher,
            filter: "articulos/+/futbol".into(),
            drain: Duration::from_secs(2),
            persistent: false,
        }
    }
}

pub async fn run(common: &Common, args: &NoisyArgs) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new("noisy", common.target, &args.variant(common.target));
    let setup = Setup::start_budget(common, false, 10_000, args.budget()).await?;
    let addr = setup.broker.addr();
    let opts = FloodOpts {
        qos: if args.flood_qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        inflight: args.flood_inflight,
        payload: args.payload,
        nice: args.flood_nice,
    };
    let (mut quiet, mut noisy, mut floods) = (Vec::new(), Vec::new(), Vec::new());
    let spinners = Spinners::start(args.warm);
    for rep in 0..args.reps.max(1) {
        let q = load::run(
            addr,
            &setup.publisher,
            &setup.subscriber,
            &args.pair(),
            &format!("quiet{rep}"),
        )
        .await;
        quiet.push(q?);
        let flood = Flood::start(
            addr,
            setup.publisher.clone(),
            setup.subscriber.clone(),
            opts,
        )
        .await?;
        let n = load::run(
            addr,
            &setup.publisher,
            &setup.subscriber,
            &args.pair(),
            &format!("noisy{rep}"),
        )
        .await;
        // Stopped before anything else, error or not.
        floods.push(flood.stop().await);
        noisy.push(n?);
    }
    drop(spinners);
    report(&mut out, &quiet, &noisy, &floods);
    out.set("warm_spinners", args.warm);
    if common.target == Kind::Mosquitto && args.budget() != ReadBudget::default() {
        out.set("note", "Mosquitto has no read budget: ignored");
    }
    setup.finish(&mut out);
    Ok(out)
}

fn report(out: &mut Outcome, quiet: &[LoadResult], noisy: &[LoadResult], floods: &[FloodResult]) {
    let med = |runs: &[LoadResult], f: fn(&LoadResult) -> Option<f64>| {
        median(&runs.iter().filter_map(f).collect::<Vec<_>>())
    };
    for (name, runs) in [("quiet", quiet), ("noisy", noisy)] {
        let p50 = med(runs, |r| r.latency.map(|l| l.p50_ms));
        let p99 = med(runs, |r| r.latency.map(|l| l.p99_ms));
        let p999 = med(runs, |r| r.latency.map(|l| l.p999_ms));
        let lag = med(runs, |r| r.send_lag.map(|l| l.p99_ms));
        if let (Some(p50), Some(p99), Some(p999)) = (p50, p99, p999) {
            out.set(&format!("{name}_p50_ms"), round(p50, 3));
            out.set(&format!("{name}_p99_ms"), round(p99, 3));
            out.set(&format!("{name}_p999_ms"), round(p999, 3));
        }
        if let Some(lag) = lag {
            out.set(&format!("{name}_send_lag_p99_ms"), round(lag, 3));
        }
        out.set(
            &format!("{name}_lost"),
            runs.iter().map(|r| r.lost).sum::<u64>(),
        );
        out.set(
            &format!("{name}_received"),
            runs.iter().map(|r| r.received).sum::<u64>(),
        );
        for r in runs {
            out.errors(r.errors.iter().map(|e| format!("{name}: {e}")).collect());
        }
    }
    let per_rep: Vec<_> = quiet
        .iter()
        .zip(noisy)
        .zip(floods)
        .map(|((q, n), f)| {
            json!({
                "quiet_p99_ms": q.latency.map(|l| round(l.p99_ms, 3)),
                "noisy_p99_ms": n.latency.map(|l| round(l.p99_ms, 3)),
                "flood_msgs_per_s": round(f.received_per_s(), 0),
            })
        })
        .collect();
    out.set("reps", per_rep);
    let p99 = |k: &str| out.fields.get(k).and_then(serde_json::Value::as_f64);
    if let (Some(q), Some(n)) = (p99("quiet_p99_ms"), p99("noisy_p99_ms")) {
        if q > 0.0 {
            out.set("p99_ratio", round(n / q, 2));
        }
    }
    // The flood, as its own subscriber saw it: what the broker carried for the neighbour.
    let rate = median(
        &floods
            .iter()
            .map(FloodResult::received_per_s)
            .collect::<Vec<_>>(),
    );
    out.set("flood_msgs_per_s", round(rate.unwrap_or(0.0), 0));
    out.set(
        "flood_published",
        floods.iter().map(|f| f.published).sum::<u64>(),
    );
    out.set("flood_acked", floods.iter().map(|f| f.acked).sum::<u64>());
    out.set(
        "flood_received",
        floods.iter().map(|f| f.received).sum::<u64>(),
    );
    for f in floods {
        if let Some(e) = &f.error {
            out.error(format!("flood: {e}"));
        }
    }
}

/// Busy loops at the lowest priority: they take only CPU time nobody else wants, and keep
/// the vCPUs from halting between the pair's messages in both phases, so that the two
/// differ by the flood's work only. Joined when dropped.
struct Spinners {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Spinners {
    fn start(n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .filter_map(|i| {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name(format!("warm-{i}"))
                    .spawn(move || {
                        lower_priority(19);
                        while !stop.load(Ordering::Relaxed) {
                            std::hint::spin_loop();
                        }
                    })
                    .ok()
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
