//! Helpers shared by the two binaries: logging, signals, argument parsing.

use std::io::IsTerminal;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::ConnectionOptions;
use std::path::PathBuf;

/// The connection flags both binaries take.
#[derive(Debug, clap::Args)]
pub struct ConnectionArgs {
    /// Broker host name (must match the broker certificate)
    #[arg(long, default_value = "localhost")]
    pub host: String,
    /// Broker TLS port
    #[arg(long, default_value_t = 8883)]
    pub port: u16,
    /// CA certificate that signed the broker's certificate (PEM)
    #[arg(long, default_value = "certs/ca.crt")]
    pub ca: PathBuf,
    /// Client certificate (PEM), re-read on every reconnection [default: certs/<identity>.crt]
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) [default: certs/<identity>.key]
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// MQTT client id [default: <identity>-<hostname>, plus the process id for the publisher]
    #[arg(long)]
    pub client_id: Option<String>,
    /// Keep retrying if the first connection fails (later disconnections are always retried)
    #[arg(long)]
    pub retry: bool,
}

impl ConnectionArgs {
    /// Options for `identity` (`publisher` or `subscriber`), whose files are the defaults.
    pub fn options(self, identity: &str, default_id: fn() -> String) -> ConnectionOptions {
        let mut options = ConnectionOptions::new(
            self.host,
            self.port,
            self.ca,
            self.cert
                .unwrap_or_else(|| PathBuf::from(format!("certs/{identity}.crt"))),
            self.key
                .unwrap_or_else(|| PathBuf::from(format!("certs/{identity}.key"))),
            self.client_id.unwrap_or_else(default_id),
        );
        options.retry = self.retry;
        options
    }
}

/// fmt logging honouring `RUST_LOG` (default `info`, rumqttc quieter), to stdout, or to
/// stderr when stdout must stay machine-readable (`--json`).
pub fn init_logging(to_stderr: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rumqttc=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A second initialisation (only possible in tests) is harmless: ignore it.
    let _ = if to_stderr {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init()
    } else {
        builder
            .with_ansi(std::io::stdout().is_terminal())
            .with_writer(std::io::stdout)
            .try_init()
    };
}

/// Completes on Ctrl-C (or SIGTERM), listened for from this call on (inside the
/// runtime). Shutdown is bounded (the publisher waits at most its drain timeout for
/// acknowledgements), so no second signal is needed.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let signal = mqtt_common::signal::shutdown_signal();
    async move {
        signal.await;
        tracing::info!("stopping");
    }
}

/// Parses a positive number of seconds, fractions allowed (`5`, `0.5`, `2.25`).
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("{s:?} must be greater than 0"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_accept_fractions_and_reject_nonsense() {
        assert_eq!(parse_seconds("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        for bad in ["0", "-1", "abc", "", "NaN", "inf", "1e300"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }
}
