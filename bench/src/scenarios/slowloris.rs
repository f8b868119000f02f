//! `slowloris`: silent TCP sockets that never start TLS, then a normal client's
//! connect + CONNACK time, against the same without them.

use super::{round, Common, Outcome, Setup};
use crate::client::{self, ConnectOpts};
use crate::stats::{median, Latencies};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, Clone, clap::Args)]
pub struct SlowlorisArgs {
    /// Silent sockets to open.
    #[arg(long, default_value_t = 1000)]
    pub silent: usize,
    /// Connects measured with and without them.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
}

pub async fn run(common: &Common, args: &SlowlorisArgs) -> anyhow::Result<Outcome> {
    let variant = format!("{} silent sockets", args.silent);
    let mut out = Outcome::new("slowloris", common.target, &variant);
    let setup = Setup::start(common, false).await?;
    let addr = setup.broker.addr();
    let tls = setup.subscriber.clone();

    let baseline = measure(addr, &tls, args.samples, "base").await;
    let opened_at = Instant::now();
    let mut silent = Vec::with_capacity(args.silent);
    let mut refused = 0usize;
    for _ in 0..args.silent {
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => silent.push(s),
            _ => refused += 1,
        }
    }
    let open_secs = opened_at.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let loaded = measure(addr, &tls, args.samples, "loaded").await;
    let still_open = count_open(&silent);

    out.set("silent_opened", silent.len());
    out.set("silent_refused", refused);
    out.set("silent_open_secs", round(open_secs, 2));
    out.set("silent_still_open", still_open);
    let mut errors = Vec::new();
    for (name, m) in [("baseline", baseline), ("loaded", loaded)] {
        let mut m = m;
        if let Some(med) = median(&m.ms) {
            out.set(&format!("{name}_connect_ms"), round(med, 2));
        }
        if let Some(s) = m.latency.summary() {
            out.set(&format!("{name}_connect_max_ms"), round(s.max_ms, 2));
        }
        out.set(&format!("{name}_failures"), m.errors.len());
        errors.extend(m.errors.into_iter().map(|e| format!("{name}: {e}")));
    }
    let ratio = match (
        out.fields.get("loaded_connect_ms").and_then(|v| v.as_f64()),
        out.fields
            .get("baseline_connect_ms")
            .and_then(|v| v.as_f64()),
    ) {
        (Some(l), Some(b)) if b > 0.0 => Some(round(l / b, 2)),
        _ => None,
    };
    out.set("connect_ratio", ratio);
    out.errors(errors);
    drop(silent);
    setup.finish(&mut out);
    Ok(out)
}

struct Measured {
    ms: Vec<f64>,
    latency: Latencies,
    errors: Vec<String>,
}

/// `samples` sequential connects (TCP + TLS + CONNECT + CONNACK), each then closed.
async fn measure(addr: SocketAddr, tls: &TlsConnector, samples: usize, tag: &str) -> Measured {
    let mut m = Measured {
        ms: Vec::new(),
        latency: Latencies::default(),
        errors: Vec::new(),
    };
    let opts = ConnectOpts {
        timeout: Duration::from_secs(10),
        ..ConnectOpts::default()
    };
    for i in 0..samples {
        let t = Instant::now();
        match client::connect(addr, tls, &format!("{tag}-{i}"), opts).await {
            Ok(conn) => {
                let took = t.elapsed();
                m.ms.push(took.as_secs_f64() * 1000.0);
                m.latency.record_us(took.as_micros() as u64);
                conn.disconnect().await;
            }
            Err(e) => m.errors.push(format!("{e:#}")),
        }
    }
    m
}

/// Sockets the broker has not closed (a zero-length read means closed).
fn count_open(sockets: &[TcpStream]) -> usize {
    let mut buf = [0u8; 1];
    sockets
        .iter()
        .filter(|s| match s.try_read(&mut buf) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        })
        .count()
}
