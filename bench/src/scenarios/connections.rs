//! `connections`: many idle mutual-TLS MQTT connections offered at a fixed rate; how many
//! are established, handshakes per second, and the broker's memory per connection.

use super::{mb, round, Common, Outcome, Setup};
use crate::client::{self, ConnectOpts};
use crate::stats::Latencies;
use std::time::{Duration, Instant};

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
}

pub async fn run(common: &Common, args: &ConnArgs) -> anyhow::Result<Outcome> {
    let variant = format!("{} at {:.0}/s", args.count, args.rate);
    let mut out = Outcome::new("connections", common.target, &variant);
    let mut setup = Setup::start(common, false).await?;
    // Settle after the readiness probe, then the baseline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_before, _) = setup.broker.memory_kib()?;
    let addr = setup.broker.addr();
    let opts = ConnectOpts {
        keep_alive: 600,
        clean_session: true,
        timeout: Duration::from_secs(30),
    };

    let started = Instant::now();
    let rate = args.rate.max(1.0);
    let mut tasks = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let at = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        let tls = setup.subscriber.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = client::connect(addr, &tls, &format!("idle-{i}"), opts).await;
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
