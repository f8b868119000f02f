//! `archive`: the subscriber's archive under load. Our broker (its release binary), one
//! publisher of JSON articles (QoS 1, 100 in flight) and the subscriber of the clients
//! crate archiving into SQLite or into a PostgreSQL server this scenario starts itself
//! (the archive tests' `PgServer`). Flood (at most 5,000 published ahead of the archive,
//! so the broker's queue never overflows): articles archived per second. Rate: the time
//! from PUBLISH to the row's commit (the subscriber's `Archived` event), p50/p99.

use super::{round, Common, Outcome, Setup};
use crate::stats::Latencies;
use anyhow::Context;
use clients::{
    run_subscriber, ArchiveOptions, ArchiveUrl, Article, ClientEvent, ConnectionOptions, Store,
    SubscriberOptions,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Articles published and not yet archived, at most (flood mode's closed loop).
const MAX_LEAD: usize = 5_000;

#[path = "../../../clients/tests/archive/pg.rs"]
#[allow(dead_code)]
mod pg;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Database {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ArchiveArgs {
    #[arg(long, value_enum, default_value = "sqlite")]
    pub database: Database,
    /// Articles per second; 0: as fast as the archive takes them (flood).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Articles published.
    #[arg(long, default_value_t = 20_000)]
    pub count: u64,
    /// Most rows per commit.
    #[arg(long, default_value_t = clients::archive::DEFAULT_BATCH_MAX)]
    pub batch: usize,
    /// Milliseconds a row may wait for others to share its commit.
    #[arg(long, default_value_t = 0)]
    pub linger_ms: u64,
    /// Bytes of each article's content.
    #[arg(long, default_value_t = 300)]
    pub payload: usize,
}

pub async fn run(common: &Common, args: &ArchiveArgs) -> anyhow::Result<Outcome> {
    let mode = match args.rate {
        0 => "flood".to_owned(),
        r => format!("{r}/s"),
    };
    let variant = format!(
        "{:?}, {mode}, batch {}, linger {} ms",
        args.database, args.batch, args.linger_ms
    )
    .to_lowercase();
    let mut out = Outcome::new("archive", common.target, &variant);
    let setup = Setup::start(common, false).await?;
    let dir = tempfile::tempdir().context("temporary folder for the archive")?;
    let pg_server = match args.database {
        Database::Sqlite => None,
        Database::Postgres => Some(pg::PgServer::start().context("PostgreSQL is not installed")?),
    };
    let url: ArchiveUrl = match &pg_server {
        Some(s) => s.url().parse().map_err(anyhow::Error::msg)?,
        None => ArchiveUrl::Sqlite(dir.path().join("articles.db")),
    };
    match measure(&setup, &url, args).await {
        Ok(m) => {
            out.set("articles", m.archived);
            out.set("archived_per_s", round(m.archived as f64 / m.seconds, 0));
            out.set("seconds", round(m.seconds, 2));
            out.set("commits", m.commits);
            out.set(
                "rows_per_commit",
                round(m.archived as f64 / m.commits.max(1) as f64, 1),
            );
            if let Some(l) = m.latency {
                out.set("p50_ms", round(l.p50_ms, 2));
                out.set("p99_ms", round(l.p99_ms, 2));
                out.set("max_ms", round(l.max_ms, 2));
            }
            out.set("rows_in_table", m.rows);
        }
        Err(e) => out.error(format!("{e:#}")),
    }
    setup.finish(&mut out);
    drop(pg_server);
    Ok(out)
}

struct Measured {
    archived: u64,
    commits: u64,
    seconds: f64,
    latency: Option<crate::stats::Summary>,
    rows: u64,
}

async fn measure(setup: &Setup, url: &ArchiveUrl, args: &ArchiveArgs) -> anyhow::Result<Measured> {
    let pki = &setup.broker.spec.pki;
    let port = setup.broker.addr().port();
    let connection = |who: &str, id: &str| {
        ConnectionOptions::new(
            "localhost",
            port,
            &pki.ca,
            pki.client_cert(who),
            pki.client_key(who),
            id,
        )
    };

    // The subscriber, archiving; each commit's ids with the time it was seen.
    let mut opts = SubscriberOptions::new(connection("subscriber", "bench-archive-sub"));
    opts.topics = vec!["articulos/#".into()];
    opts.clean_session = true;
    opts.archive = Some(ArchiveOptions {
        batch_max: args.batch.max(1),
        linger: Duration::from_millis(args.linger_ms),
        ..ArchiveOptions::new(url.clone())
    });
    let (events, mut event_rx) = mpsc::unbounded_channel();
    opts.events = Some(events);
    let (stop, stopped) = oneshot::channel::<()>();
    let subscriber = tokio::spawn(run_subscriber(opts, |_| {}, async {
        let _ = stopped.await;
    }));
    loop {
        match tokio::time::timeout(Duration::from_secs(30), event_rx.recv()).await {
            Ok(Some(ClientEvent::Subscribed { .. })) => break,
            Ok(Some(_)) => {}
            _ => anyhow::bail!("the subscriber never subscribed"),
        }
    }

    // The publisher: rumqttc with 100 in flight, each article's send time kept by id.
    let tls = clients::tls::client_config(
        &pki.ca,
        &pki.client_cert("publisher"),
        &pki.client_key("publisher"),
    )?;
    let mut mqtt = MqttOptions::new("bench-archive-pub", "localhost", port);
    mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )))
    .set_inflight(100)
    .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(mqtt, 200);
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    // At most this many published and not yet archived: the broker's queue for the
    // subscriber (max_queued 10,000) must never overflow, or the flood measures drops.
    let lead = Arc::new(Semaphore::new(MAX_LEAD));
    let publisher = {
        let sent = sent.clone();
        let lead = lead.clone();
        let (count, rate, size) = (args.count, args.rate, args.payload);
        tokio::spawn(async move {
            let mut tick = (rate > 0)
                .then(|| tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64)));
            for i in 0..count {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                lead.acquire().await?.forget();
                let article = Article {
                    id: format!("bench-{i}"),
                    newspaper: format!("diario{}", i % 5),
                    section: ["futbol", "baloncesto", "tecnologia"][(i % 3) as usize].into(),
                    title: format!("Artículo {i}"),
                    content: "x".repeat(size),
                    published_at: clients::article::now_rfc3339(),
                };
                let topic = format!("articulos/{}/{}", article.newspaper, article.section);
                let payload = serde_json::to_vec(&article)?;
                sent.lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .insert(article.id, Instant::now());
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await?;
            }
            anyhow::Ok(client)
        })
    };

    let start = Instant::now();
    let mut latency = Latencies::default();
    let (mut archived, mut commits) = (0u64, 0u64);
    let mut last = start;
    let deadline = Duration::from_secs(60 + args.count / 100);
    while archived < args.count {
        let event = tokio::time::timeout(deadline, event_rx.recv()).await;
        let Ok(Some(event)) = event else {
            anyhow::bail!("only {archived} of {} articles archived", args.count);
        };
        if let ClientEvent::Archived { ids } = event {
            let now = Instant::now();
            commits += 1;
            let mut sent = sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            for id in ids {
                // Removed: a redelivered copy is not counted twice.
                if let Some(t) = sent.remove(&id) {
                    latency.record_us(now.duration_since(t).as_micros() as u64);
                    archived += 1;
                    lead.add_permits(1);
                }
            }
            last = now;
        }
    }
    let seconds = last.duration_since(start).as_secs_f64();
    let client = publisher.await??;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
    let _ = stop.send(());
    let _ = subscriber.await;
    let rows = Store::open(url, false).await?.count().await?;
    Ok(Measured {
        archived,
        commits,
        seconds,
        latency: latency.summary(),
        rows,
    })
}
