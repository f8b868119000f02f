//! The scenarios. Each starts its own broker, runs for a bounded time and returns one
//! JSON object (printed as one line by `main`).

pub mod archive;
pub mod connections;
pub mod durable;
pub mod flood;
pub mod flow_args;
pub mod load;
pub mod noisy;
pub mod offline;
pub mod retained;
pub mod slowloris;
pub mod soak;
pub mod throughput;

use crate::client;
use crate::pki::Pki;
use crate::target::{self, Broker, Kind, ReadBudget, Spec};
use anyhow::Context;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Duration;
use tokio_rustls::TlsConnector;

/// Options every scenario takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Broker under test.
    #[arg(long, value_enum, default_value = "ours")]
    pub target: Kind,
    /// Folder of the PKI (created if missing); default: a temporary one.
    #[arg(long)]
    pub pki_dir: Option<PathBuf>,
    /// Our broker's binary; default: `broker` beside this executable.
    #[arg(long)]
    pub broker_bin: Option<PathBuf>,
    /// Mosquitto's binary; default: `mosquitto` on PATH, else /usr/sbin/mosquitto.
    #[arg(long)]
    pub mosquitto_bin: Option<PathBuf>,
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Keep the temporary folder (configuration, broker log, data) and print its path.
    #[arg(long)]
    pub keep: bool,
}

/// A started broker and the client identities to talk to it.
pub struct Setup {
    pub broker: Broker,
    pub publisher: TlsConnector,
    pub subscriber: TlsConnector,
    /// Time from spawn to the first CONNACK.
    pub ready_after: Duration,
    _pki_dir: Option<tempfile::TempDir>,
    dir: Option<tempfile::TempDir>,
}

impl Setup {
    /// Creates the PKI (if needed), starts the broker and waits until it accepts a CONNECT.
    pub async fn start(common: &Common, persistence: bool) -> anyhow::Result<Self> {
        Self::start_queued(common, persistence, 10_000).await
    }

    /// [`Setup::start`] with room for `max_queued` messages per session.
    pub async fn start_queued(
        common: &Common,
        persistence: bool,
        max_queued: usize,
    ) -> anyhow::Result<Self> {
        Self::start_budget(common, persistence, max_queued, ReadBudget::default()).await
    }

    /// [`Setup::start_queued`] with our broker's per-connection read budget.
    pub async fn start_budget(
        common: &Common,
        persistence: bool,
        max_queued: usize,
        budget: ReadBudget,
    ) -> anyhow::Result<Self> {
        let (pki_dir, pki) = match &common.pki_dir {
            Some(dir) => (None, Pki::ensure(dir)?),
            None => {
                let tmp = tempfile::tempdir().context("temporary folder for the PKI")?;
                let pki = Pki::ensure(tmp.path())?;
                (Some(tmp), pki)
            }
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("bench-{}-", common.target.name()))
            .tempdir()
            .context("temporary folder for the broker")?;
        let bin = match common.target {
            Kind::Ours => common
                .broker_bin
                .clone()
                .unwrap_or_else(target::default_ours_bin),
            Kind::Mosquitto => match &common.mosquitto_bin {
                Some(bin) => bin.clone(),
                None => target::find_mosquitto()
                    .context("mosquitto is neither on PATH nor at /usr/sbin/mosquitto")?,
            },
        };
        let port = match common.port {
            0 => target::free_port()?,
            p => p,
        };
        let spec = Spec {
            kind: common.target,
            bin,
            pki: pki.clone(),
            port,
            dir: dir.path().to_path_buf(),
            persistence,
            max_queued,
            budget,
        };
        let publisher = client::connector(&pki, "publisher")?;
        let subscriber = client::connector(&pki, "subscriber")?;
        let mut broker = Broker::spawn(spec)?;
        let ready_after = broker
            .wait_ready(&subscriber, Duration::from_secs(60))
            .await?;
        let dir = if common.keep {
            eprintln!("bench: keeping {}", dir.path().display());
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        Ok(Self {
            broker,
            publisher,
            subscriber,
            ready_after,
            _pki_dir: pki_dir,
            dir,
        })
    }

    /// Adds the broker's memory, CPU, liveness and log counts to `out`, then stops it.
    pub fn finish(mut self, out: &mut Outcome) {
        out.set(
            "broker_ready_ms",
            round(self.ready_after.as_secs_f64() * 1000.0, 1),
        );
        finish_broker(&mut self.broker, out);
        drop(self.dir.take());
    }
}

/// Memory, CPU, liveness and log counts of `broker` into `out`; then stops it.
pub fn finish_broker(broker: &mut Broker, out: &mut Outcome) {
    match broker.exited() {
        Some(status) => {
            out.set("broker_exited", status);
            out.error("the broker exited during the scenario");
        }
        None => {
            if let Ok((rss, hwm)) = broker.memory_kib() {
                out.set("broker_rss_mb", mb(rss));
                out.set("broker_peak_rss_mb", mb(hwm));
            }
            if let Ok(cpu) = broker.cpu_secs() {
                out.set("broker_cpu_s", round(cpu, 2));
            }
            broker.stop(Duration::from_secs(10));
        }
    }
    let log = target::log_counts(&broker.log_text());
    out.set("broker_reported_drops", log.dropped);
    out.set("router_cursor_jumps", log.cursor_jumps);
    out.set("router_skipped", log.cursor_skipped);
    out.set("broker_log_warnings", log.warnings);
}

/// The JSON object a scenario prints.
#[derive(Debug, Default)]
pub struct Outcome {
    pub fields: Map<String, Value>,
    errors: Vec<String>,
}

impl Outcome {
    pub fn new(scenario: &str, target: Kind, variant: &str) -> Self {
        let mut o = Self::default();
        o.set("scenario", scenario);
        o.set("target", target.name());
        o.set("variant", variant);
        o
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.fields.insert(key.to_string(), value.into());
    }

    /// Records an error (counted, first few kept as samples).
    pub fn error(&mut self, message: impl Into<String>) {
        self.errors.push(message.into());
    }

    pub fn errors(&mut self, messages: Vec<String>) {
        self.errors.extend(messages);
    }

    pub fn into_json(mut self) -> Value {
        let count = self.errors.len();
        self.set("errors", count);
        self.errors.truncate(3);
        let samples: Vec<Value> = self.errors.drain(..).map(Value::from).collect();
        self.set("error_samples", samples);
        Value::Object(self.fields)
    }
}

pub fn mb(kib: u64) -> f64 {
    round(kib as f64 / 1024.0, 1)
}

pub fn round(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}
