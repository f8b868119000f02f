//! Operator logs: readable lines on stdout and a daily-rotated `broker.log`.

use crate::config::{LogConfig, LogFormat};
use std::io::IsTerminal;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
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

/// How stdout lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdout {
    /// Time, level, message, fields.
    Plain,
    /// `broker     | INFO message fields`, naming the component of each line, for the
    /// one-process stack (like `docker compose up`).
    Component,
}

/// Installs the global subscriber. rumqttd's own logs are kept to warnings unless the
/// level names it.
pub fn init(config: &LogConfig) -> Result<LogGuard, LogError> {
    init_with(config, Stdout::Plain)
}

pub fn init_with(config: &LogConfig, style: Stdout) -> Result<LogGuard, LogError> {
    let filter_text = if config.level.contains("rumqttd") {
        config.level.clone()
    } else {
        format!("{},rumqttd=warn", config.level)
    };
    let filter = EnvFilter::try_new(&filter_text).map_err(|e| LogError::Level(e.to_string()))?;
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let json = config.format == LogFormat::Json;
    let stdout = match (json, style) {
        (true, _) => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
        (false, Stdout::Plain) => fmt::layer().with_target(false).with_ansi(ansi).boxed(),
        (false, Stdout::Component) => fmt::layer()
            .with_ansi(ansi)
            .event_format(ComponentFormat)
            .boxed(),
    };
    let (file_layer, guard) = if config.dir.as_os_str().is_empty() {
        (None, None)
    } else {
        std::fs::create_dir_all(&config.dir).map_err(|cause| LogError::Dir {
            dir: config.dir.clone(),
            cause,
        })?;
        let appender = tracing_appender::rolling::daily(&config.dir, "broker.log");
        let (writer, guard) = tracing_appender::non_blocking(appender);
        let layer = if json {
            fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_writer(writer)
                .boxed()
        } else {
            fmt::layer()
                .with_ansi(false)
                .with_target(false)
                .with_writer(writer)
                .boxed()
        };
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

/// The component a log line comes from, by its target.
pub fn component_of(target: &str) -> &'static str {
    if target.starts_with("broker") || target.starts_with("rumqttd") {
        "broker"
    } else if target.starts_with("clients::publisher") {
        "publisher"
    } else if target.starts_with("clients::subscriber") {
        "subscriber"
    } else if target.starts_with("clients") {
        "clients"
    } else {
        "stack"
    }
}

struct ComponentFormat;

impl<S, N> FormatEvent<S, N> for ComponentFormat
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        write!(
            writer,
            "{:<10} | {:<5} ",
            component_of(meta.target()),
            meta.level()
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
