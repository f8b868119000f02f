//! `connections`: many idle mutual-TLS MQTT connections offered at a fixed rate; how many
//! are established, handshakes per second, and the broker's memory per connection. With
//! `--concurrency`, offered closed-loop instead (a fixed number of handshakes in flight,
//! each followed at once by the next): the handshake capacity, which a fixed offer
//! cannot show once the broker keeps up with it.

use super::{mb, round, Common, Outcome, Setup};
use crate::client::{self, ConnectOpts};
use crate::stats::Latencies;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, clap::Args)]
pub struct ConnArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    /// Offered connection attempts per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds to hold them all open before measuring memory again and closing.
    #[arg(long, default_value_t = 2.0)]
    pub hold: f64,
    /// Closed loop: keep this many connection attempts in flight instead of a fixed rate.
    #[arg(long)]
    pub concurrency: Option<usize>,
}

pub async fn run(common: &Common, args: &ConnArgs) -> anyhow::Result<Outcome> {
    let variant = match args.concurrency {
        Some(n) => format!("{} closed-loop, {n} in flight", args.count),
        None => format!("{} at {:.0}/s", args.count, args.rate),
    };
    let mut out = Outcome::new("connections", common.target, &variant);
    let mut setup = Setup::start(common, false).await?;
    // Settle after the readiness probe, then the baseline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_before, _) = setup.broker.memory_kib()?;
    let cpu_before = setup.broker.cpu_secs();
    let addr = setup.broker.addr();
    let opts = ConnectOpts {
        keep_alive: 600,
        clean_session: true,
        timeout: Duration::from_secs(30),
    };

    let started = Instant::now();
    let rate = args.rate.max(1.0);
    let in_flight = Arc::new(Semaphore::new(args.concurrency.unwrap_or(0).max(1)));
    let mut tasks = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let permit = match args.concurrency {
            Some(_) => Some(in_flight.clone().acquire_owned().await?),
            None => {
                let at = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
                None
            }
        };
        let tls = setup.subscriber.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = client::connect(addr, &tls, &format!("idle-{i}"), opts).await;
            drop(permit);
            r.map(|c| (c, t.elapsed(), Instant::now()))
        }));
    }
    let offered_secs = started.elapsed().as_secs_f64();

    let mut held = Vec::with_capacity(args.count);
    let mut latency = Latencies::default();
    let mut last_ok = started;
    let mut failures = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok((conn, took, at))) => {
                latency.record_us(took.as_micros() as u64);
                last_ok = last_ok.max(at);
                held.push(conn);
            }
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(e) => failures.push(format!("connect task panicked: {e}")),
        }
    }
    let established = held.len();
    let cpu_loaded = setup.broker.cpu_secs().ok();
    let secs = (last_ok - started).as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(args.hold.max(0.0))).await;
    let alive = setup.broker.exited().is_none();
    let rss_after = if alive {
        setup.broker.memory_kib().map(|(r, _)| r).unwrap_or(0)
    } else {
        0
    };

    out.set("offered", args.count);
    out.set("established", established);
    out.set("failed", failures.len());
    out.set("offered_secs", round(offered_secs, 2));
    if secs > 0.0 {
        out.set("handshakes_per_s", round(established as f64 / secs, 0));
    }
    if let Some(l) = latency.summary() {
        out.set("connect_p50_ms", round(l.p50_ms, 2));
        out.set("connect_p99_ms", round(l.p99_ms, 2));
    }
    out.set("broker_rss_before_mb", mb(rss_before));
    out.set("broker_rss_loaded_mb", mb(rss_after));
    if established > 0 && rss_after > 0 {
        let per_conn = rss_after.saturating_sub(rss_before) as f64 / established as f64;
        out.set("kib_per_connection", round(per_conn, 1));
    }
    if let (Ok(before), Some(after), true) = (cpu_before, cpu_loaded, established > 0) {
        out.set(
            "broker_cpu_ms_per_connection",
            round((after - before) * 1000.0 / established as f64, 3),
        );
    }
    let mut grouped = std::collections::BTreeMap::<String, usize>::new();
    for f in &failures {
        *grouped.entry(f.clone()).or_default() += 1;
    }
    out.errors(
        grouped
            .into_iter()
            .map(|(e, n)| format!("{n}x {e}"))
            .collect(),
    );
    // Close quickly: dropping the streams closes the sockets.
    drop(held);
    setup.finish(&mut out);
    Ok(out)
}
