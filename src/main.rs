//! `mqtt-stack`: the broker, a publisher and a subscriber in one process, each log line
//! prefixed by its component: the original project's `docker compose up`, with no
//! Docker. Certificates are created on first run; Ctrl-C stops all three cleanly.

use anyhow::Context;
use broker::logging::{self, Stdout};
use broker::pki::Layout;
use broker::Config;
use clap::Parser;
use clients::cli::{parse_seconds, shutdown_signal};
use clients::{
    run_publisher, run_subscriber, ArchiveOptions, ArchiveUrl, ClientEvent, ConnectionOptions,
    PublisherOptions, SubscriberOptions,
};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::watch;
use tracing::error;

#[derive(Parser)]
#[command(
    version,
    about = "Run the broker, a publisher and a subscriber in one process (Ctrl-C stops all three)",
    after_help = "Examples:\n  cargo run --release                     the whole stack with ./broker.toml, archiving into data/articles.db\n  cargo run --release -- --interval 0.5   an article every half second\n  cargo run --release -- --archive postgres://news:secret@localhost:5432/news"
)]
struct Args {
    /// Broker configuration file.
    #[arg(long, default_value = "broker.toml")]
    config: PathBuf,
    /// Seconds between two articles.
    #[arg(long, default_value = "5", value_parser = parse_seconds)]
    interval: Duration,
    /// Topic filter the subscriber follows (repeatable).
    #[arg(
        long = "topic",
        value_name = "FILTER",
        default_value = "articulos/+/futbol"
    )]
    topics: Vec<String>,
    /// Where the subscriber archives the articles: sqlite:PATH or
    /// postgres://user:password@host:port/db [default: sqlite:<storage.data_dir>/articles.db]
    #[arg(long, value_name = "URL", conflicts_with = "no_archive")]
    archive: Option<String>,
    /// Do not archive the articles, only print them.
    #[arg(long)]
    no_archive: bool,
}

fn main() -> ExitCode {
    broker::tune_allocator();
    let args = Args::parse();
    match start(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let _guard = logging::init_with(&config.log, Stdout::Component)?;
    tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")?
        .block_on(run(config, args))
}

async fn run(config: Config, args: Args) -> anyhow::Result<()> {
    let tls = &config.tls;
    let layout = Layout::for_broker(&tls.ca_file, &tls.cert_file, &tls.key_file);
    let ca = tls.ca_file.clone();
    let archive = match (&args.archive, args.no_archive) {
        (_, true) => None,
        (Some(url), false) => Some(
            url.parse::<ArchiveUrl>()
                .map_err(|e| anyhow::anyhow!("--archive: {e}"))?,
        ),
        (None, false) => Some(ArchiveUrl::Sqlite(
            config.storage.data_dir.join("articles.db"),
        )),
    };
    let broker = broker::start(config).await?;
    let port = broker.local_addr().port();

    let connection = |name: &str| {
        let mut c = ConnectionOptions::new(
            "localhost",
            port,
            &ca,
            layout.client_cert(name),
            layout.client_key(name),
            format!("stack-{name}"),
        );
        c.retry = true;
        c
    };
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let mut sub_opts = SubscriberOptions::new(connection("subscriber"));
    sub_opts.topics = args.topics;
    sub_opts.archive = archive.map(ArchiveOptions::new);
    let (events, mut subscriber_events) = tokio::sync::mpsc::unbounded_channel();
    sub_opts.events = Some(events);
    let subscriber = tokio::spawn(run_subscriber(
        sub_opts,
        |received| println!("{:<10} | {}", "subscriber", received.to_text()),
        until_stopped(stopped.clone()),
    ));
    // The first article is not published before anyone listens.
    let subscribed = async {
        while let Some(event) = subscriber_events.recv().await {
            if matches!(event, ClientEvent::Subscribed { .. }) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), subscribed).await;
    let mut pub_opts = PublisherOptions::new(connection("publisher"));
    pub_opts.interval = args.interval;
    let publisher = tokio::spawn(run_publisher(pub_opts, until_stopped(stopped)));

    shutdown_signal().await;
    let _ = stop.send(true);
    for (name, result) in [
        ("publisher", publisher.await.map(|r| r.map(|_| ()))),
        ("subscriber", subscriber.await.map(|r| r.map(|_| ()))),
    ] {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(component = name, error = %e, "stopped with an error"),
            Err(e) => error!(component = name, error = %e, "task failed"),
        }
    }
    broker.shutdown().await;
    Ok(())
}
