//! `subscriber`: follows news topics over mutual TLS and prints the articles.

use std::process::ExitCode;

use clap::Parser;
use clients::cli::{init_logging, shutdown_signal, ConnectionArgs};
use clients::topic::DEFAULT_FILTER;
use clients::{default_subscriber_id, run_subscriber, stdout_sink, SubscriberOptions};

const EXAMPLES: &str = "\
Examples:
  subscriber                                     football from every newspaper (articulos/+/futbol)
  subscriber --topic 'articulos/marca/#'         everything from one newspaper
  subscriber --topic 'articulos/+/futbol' --topic 'articulos/+/baloncesto'
  subscriber --group lectores                    share the load with other members of 'lectores'
                                                 (give each member its own --client-id)
  subscriber --json | jq .payload.title          one JSON object per line (logs go to stderr)

Also understands plain text sent with mosquitto_pub:
  mosquitto_pub ... -t articulos/as/futbol -m 'Título: Gol | Contenido: Golazo en el 90'

The session is persistent (stable client id, clean_session=false): messages published
while the subscriber is offline are delivered when it comes back. Redelivered articles
are dropped by id.";

#[derive(Debug, Parser)]
#[command(
    name = "subscriber",
    version,
    about = "Receive news articles over MQTT with mutual TLS (QoS 1, persistent session)",
    after_help = EXAMPLES
)]
struct Args {
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
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.json);
    match run(args).await {
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
    let sink = stdout_sink(opts.json);
    let report = run_subscriber(opts, sink, shutdown_signal()).await?;
    tracing::info!(
        received = report.received,
        duplicates = report.duplicates,
        connections = report.connections,
        "subscriber stopped"
    );
    Ok(())
}
