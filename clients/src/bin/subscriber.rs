//! `subscriber`: follows news topics over mutual TLS, prints the articles and, with
//! `--archive`, keeps them in SQLite or PostgreSQL; `subscriber archive list|stats` reads
//! them back.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args as ClapArgs, Parser, Subcommand};
use clients::archive::{parse_since, render_list, render_stats, ListQuery, DEFAULT_BATCH_MAX};
use clients::cli::{init_logging, shutdown_signal, ConnectionArgs};
use clients::topic::DEFAULT_FILTER;
use clients::{
    default_subscriber_id, run_subscriber, stdout_sink, ArchiveOptions, ArchiveUrl, Store,
    SubscriberOptions,
};

/// The archive `archive list` and `archive stats` read unless told otherwise: the one
/// `cargo run --release` (the whole stack) writes.
const DEFAULT_ARCHIVE: &str = "sqlite:data/articles.db";

const EXAMPLES: &str = "\
Examples:
  subscriber                                     football from every newspaper (articulos/+/futbol)
  subscriber --topic 'articulos/marca/#'         everything from one newspaper
  subscriber --topic 'articulos/+/futbol' --topic 'articulos/+/baloncesto'
  subscriber --group lectores                    share the load with other members of 'lectores'
                                                 (give each member its own --client-id)
  subscriber --json | jq .payload.title          one JSON object per line (logs go to stderr)
  subscriber --archive sqlite:data/articles.db   also keep every article (SQLite, created on first use)
  subscriber --archive postgres://news:secret@localhost:5432/news
  subscriber archive list --section futbol --since 2024-11-24
  subscriber archive stats --archive postgres://news:secret@localhost:5432/news

Also understands plain text sent with mosquitto_pub:
  mosquitto_pub ... -t articulos/as/futbol -m 'Título: Gol | Contenido: Golazo en el 90'

The session is persistent (stable client id, clean_session=false): messages published
while the subscriber is offline are delivered when it comes back. Redelivered articles
are dropped by id. With --archive, an article is acknowledged to the broker only once its
row is committed: killing the subscriber or the database loses nothing.";

#[derive(Debug, Parser)]
#[command(
    name = "subscriber",
    version,
    about = "Receive news articles over MQTT with mutual TLS (QoS 1, persistent session), optionally archiving them",
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    connection: ConnectionArgs,
    /// Topic filter to follow (repeatable)
    #[arg(long = "topic", value_name = "FILTER", default_value = DEFAULT_FILTER)]
    topics: Vec<String>,
    /// Shared-subscription group: subscribe to $share/<NAME>/<topic>
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
    /// Print one JSON object per line instead of text
    #[arg(long)]
    json: bool,
    /// Keep every article in this database: sqlite:PATH or postgres://user:password@host:port/db
    #[arg(long, value_name = "URL")]
    archive: Option<String>,
    /// Most articles committed in one transaction
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH_MAX, value_parser = parse_batch)]
    archive_batch: usize,
    /// How long an article may wait for others to share its commit (0: commit as soon as the previous commit ends)
    #[arg(long, value_name = "MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    archive_linger_ms: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read the archive: `archive list`, `archive stats`
    Archive {
        #[command(subcommand)]
        action: ArchiveAction,
    },
}

#[derive(Debug, ClapArgs)]
struct ArchiveArg {
    /// The archive to read: sqlite:PATH or postgres://user:password@host:port/db
    #[arg(long, value_name = "URL", default_value = DEFAULT_ARCHIVE)]
    archive: String,
    /// One JSON object per article (list) or one JSON document (stats)
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum ArchiveAction {
    /// Archived articles, newest first
    List {
        #[command(flatten)]
        source: ArchiveArg,
        /// Only this section (articulos/<newspaper>/<section>)
        #[arg(long, value_name = "S")]
        section: Option<String>,
        /// Only this newspaper
        #[arg(long, value_name = "N")]
        newspaper: Option<String>,
        /// Only articles published on or after this date (2024-11-24 or RFC 3339)
        #[arg(long, value_name = "DATE", value_parser = parse_since)]
        since: Option<time::OffsetDateTime>,
        /// At most this many articles
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: u64,
    },
    /// Articles per newspaper and section, with the first and last publication times
    Stats {
        #[command(flatten)]
        source: ArchiveArg,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Some(Command::Archive { action }) => {
            init_logging(true);
            read_archive(action).await
        }
        None => {
            init_logging(args.json);
            run(args).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let connection = args.connection.options("subscriber", default_subscriber_id);
    let mut opts = SubscriberOptions::new(connection);
    opts.topics = args.topics;
    opts.group = args.group;
    opts.json = args.json;
    if let Some(url) = &args.archive {
        opts.archive = Some(ArchiveOptions {
            batch_max: args.archive_batch,
            linger: Duration::from_millis(args.archive_linger_ms),
            ..ArchiveOptions::new(archive_url(url)?)
        });
    }
    let sink = stdout_sink(opts.json);
    let report = run_subscriber(opts, sink, shutdown_signal()).await?;
    tracing::info!(
        received = report.received,
        duplicates = report.duplicates,
        connections = report.connections,
        archived = report.archived,
        not_archived = report.not_archived,
        "subscriber stopped"
    );
    Ok(())
}

/// Parsed here rather than by clap, whose errors would echo a password.
fn archive_url(s: &str) -> anyhow::Result<ArchiveUrl> {
    s.parse()
        .map_err(|e: String| anyhow::anyhow!("--archive: {e}"))
}

fn parse_batch(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=10_000) => Ok(n),
        _ => Err(format!("{s:?}: a number of articles from 1 to 10000")),
    }
}

async fn read_archive(action: ArchiveAction) -> anyhow::Result<()> {
    let (url, output) = match &action {
        ArchiveAction::List { source, .. } | ArchiveAction::Stats { source } => {
            let url = archive_url(&source.archive)?;
            let mut store = Store::open(&url, false).await?;
            let text = match &action {
                ArchiveAction::List {
                    section,
                    newspaper,
                    since,
                    limit,
                    ..
                } => {
                    let query = ListQuery {
                        section: section.clone(),
                        newspaper: newspaper.clone(),
                        since: *since,
                        limit: *limit,
                    };
                    render_list(&store.list(&query).await?, source.json)
                }
                ArchiveAction::Stats { .. } => render_stats(&store.stats().await?, source.json),
            };
            (url, text)
        }
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(output.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.with_context(|| format!("cannot print what {url} holds")),
    }
}
