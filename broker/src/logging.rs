//! Operator logs: readable lines on stdout and a daily-rotated `broker.log`.

use crate::config::LogConfig;
use std::io::IsTerminal;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log.dir {dir}: {cause}")]
    Dir {
        dir: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("log.level: {0}")]
    Level(String),
    #[error("a logger is already installed")]
    AlreadySet,
}

/// Keeps the file writer alive; drop it last so buffered lines reach the file.
pub struct LogGuard {
    _file: Option<WorkerGuard>,
}

/// Installs the global subscriber. rumqttd's own logs are kept to warnings unless the
/// level names it.
pub fn init(config: &LogConfig) -> Result<LogGuard, LogError> {
    let filter_text = if config.level.contains("rumqttd") {
        config.level.clone()
    } else {
        format!("{},rumqttd=warn", config.level)
    };
    let filter = EnvFilter::try_new(&filter_text).map_err(|e| LogError::Level(e.to_string()))?;
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let stdout = fmt::layer().with_target(false).with_ansi(ansi);
    let (file_layer, guard) = if config.dir.as_os_str().is_empty() {
        (None, None)
    } else {
        std::fs::create_dir_all(&config.dir).map_err(|cause| LogError::Dir {
            dir: config.dir.clone(),
            cause,
        })?;
        let appender = tracing_appender::rolling::daily(&config.dir, "broker.log");
        let (writer, guard) = tracing_appender::non_blocking(appender);
        let layer = fmt::layer()
            .with_ansi(false)
            .with_target(false)
            .with_writer(writer)
            .boxed();
        (Some(layer), Some(guard))
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(stdout)
        .with(file_layer)
        .try_init()
        .map_err(|_| LogError::AlreadySet)?;
    Ok(LogGuard { _file: guard })
}
