//! `publisher`: sends news articles to `articulos/<newspaper>/<section>` over mutual TLS.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use clients::cli::{init_logging, parse_seconds, shutdown_signal, ConnectionArgs};
use clients::{default_publisher_id, run_publisher, ArticleSource, PublisherOptions};

const EXAMPLES: &str = "\
Examples:
  publisher                                  one article every 5 s until Ctrl-C
  publisher --once                           publish one article and exit after its PUBACK
  publisher --interval 0.5 --count 20        20 articles, two per second
  publisher --articles noticias.jsonl        cycle through your own articles (one JSON per line:
                                             {\"newspaper\":\"marca\",\"section\":\"futbol\",\"title\":\"...\",\"content\":\"...\"})
  publisher --host broker.local --retry      keep trying until the broker is reachable

Ctrl-C waits briefly (2 s at most) for outstanding acknowledgements, then disconnects.
Logging: RUST_LOG=debug publisher";

#[derive(Debug, Parser)]
#[command(
    name = "publisher",
    version,
    about = "Publish news articles over MQTT with mutual TLS (QoS 1, nothing lost across reconnections)",
    after_help = EXAMPLES
)]
struct Args {
    #[command(flatten)]
    connection: ConnectionArgs,
    /// Seconds between articles (fractions allowed)
    #[arg(long, default_value = "5", value_parser = parse_seconds, value_name = "SECS")]
    interval: Duration,
    /// Stop after N articles have been acknowledged
    #[arg(long, value_name = "N", conflicts_with = "once")]
    count: Option<u64>,
    /// Publish a single article and exit after its PUBACK
    #[arg(long)]
    once: bool,
    /// Publish with the MQTT retain flag
    #[arg(long)]
    retain: bool,
    /// JSON Lines file of articles instead of the built-in catalogue
    #[arg(long, value_name = "FILE")]
    articles: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(false);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let connection = args.connection.options("publisher", default_publisher_id);
    let mut opts = PublisherOptions::new(connection);
    opts.interval = args.interval;
    opts.count = args.count;
    opts.once = args.once;
    opts.retain = args.retain;
    if let Some(file) = args.articles {
        opts.articles = ArticleSource::File(file);
    }
    let report = run_publisher(opts, shutdown_signal()).await?;
    tracing::info!(
        acknowledged = report.acknowledged,
        unacknowledged = report.unacknowledged,
        connections = report.connections,
        "publisher stopped"
    );
    Ok(())
}
