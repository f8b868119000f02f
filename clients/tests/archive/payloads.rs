//! What is archived and what is not: JSON articles and the plain-text form are stored
//! (a redelivered one changes nothing); anything else is refused, acknowledged, and
//! never stops the subscriber.

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use clients::archive::content_id;
use clients::{
    run_subscriber, ArchiveOptions, ArchiveUrl, ClientEvent, SubscriberOptions, SubscriberReport,
};
use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot};

use crate::common::*;

const TOPIC: &str = "articulos/eldiario/futbol";

/// The subscriber in-process with an SQLite archive; its `Archived` ids in a channel.
struct Archiving {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<SubscriberReport, clients::ClientError>>,
    archived: mpsc::UnboundedReceiver<String>,
}

async fn archiving(broker: &TestBroker, url: &ArchiveUrl) -> Archiving {
    let mut opts = SubscriberOptions::new(broker.connection("subscriber", "archive-payloads"));
    opts.topics = vec!["articulos/#".into()];
    opts.archive = Some(ArchiveOptions::new(url.clone()));
    let (events, mut rx) = mpsc::unbounded_channel();
    opts.events = Some(events);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run_subscriber(opts, |_| {}, async {
        let _ = stopped.await;
    }));
    let (ids, archived) = mpsc::unbounded_channel();
    let (ready_tx, ready) = oneshot::channel();
    tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        while let Some(e) = rx.recv().await {
            match e {
                ClientEvent::Subscribed { .. }
                | ClientEvent::Connected {
                    session_present: true,
                } => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                ClientEvent::Archived { ids: batch } => {
                    for id in batch {
                        let _ = ids.send(id);
                    }
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, ready).await.unwrap().unwrap();
    Archiving {
        stop,
        task,
        archived,
    }
}

impl Archiving {
    async fn wait_archived(&mut self, id: &str) {
        let found = async {
            while let Some(got) = self.archived.recv().await {
                if got == id {
                    return;
                }
            }
        };
        tokio::time::timeout(WAIT, found)
            .await
            .unwrap_or_else(|_| panic!("{id} never archived"));
    }

    async fn stop(self) -> SubscriberReport {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap()
    }
}

/// A raw MQTT client with the publisher's certificate: publishes exactly these payloads
/// (QoS 1) and returns once the broker acknowledged them all.
async fn publish_raw(broker: &TestBroker, payloads: &[&[u8]]) {
    let tls = clients::tls::client_config(
        &broker.layout.ca_cert,
        &broker.layout.client_cert("publisher"),
        &broker.layout.client_key("publisher"),
    )
    .unwrap();
    let mut opts = MqttOptions::new("archive-raw-pub", "localhost", broker.addr.port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    for p in payloads {
        client
            .publish(TOPIC, QoS::AtLeastOnce, false, p.to_vec())
            .await
            .unwrap();
    }
    let mut acked = 0;
    tokio::time::timeout(WAIT, async {
        while acked < payloads.len() {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                acked += 1;
            }
        }
        client.disconnect().await.unwrap();
        while !matches!(
            eventloop.poll().await,
            Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)
        ) {}
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_articles_are_refused_and_acknowledged_and_the_stream_goes_on() {
    let broker = TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = ArchiveUrl::Sqlite(dir.path().join("articles.db"));
    let mut sub = archiving(&broker, &url).await;

    let plain = "Título: El Alavés en descenso | Contenido: El Alavés pelea por no descender.";
    let article =
        br#"{"id":"art-1","title":"Gol","content":"Golazo","published_at":"2024-11-24T21:15:00Z"}"#;
    publish_raw(
        &broker,
        &[
            b"\xff\xfe\x00binario",
            br#"{"foo":1}"#,
            plain.as_bytes(),
            article,
            plain.as_bytes(),
        ],
    )
    .await;
    let plain_id = content_id(TOPIC, plain.as_bytes());
    // In the order received; the second copy finds its row already there.
    sub.wait_archived(&plain_id).await;
    sub.wait_archived("art-1").await;
    sub.wait_archived(&plain_id).await;
    let report = sub.stop().await;
    assert_eq!(report.received, 5);
    assert_eq!(report.not_archived, 2, "binary and non-article JSON");
    assert_eq!(report.archived, 2, "the plain text twice is one row");

    let mut store = open(&url).await;
    let ids: HashSet<String> = all_ids(&mut store).await.into_iter().collect();
    assert_eq!(ids, HashSet::from(["art-1".to_owned(), plain_id.clone()]));
    let rows = store.list(&Default::default()).await.unwrap();
    assert!(rows.is_empty(), "limit 0 lists nothing");
    let plain_row = store
        .list(&clients::archive::ListQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == plain_id)
        .unwrap();
    assert_eq!(
        (
            plain_row.newspaper.as_str(),
            plain_row.section.as_str(),
            plain_row.title.as_str()
        ),
        ("eldiario", "futbol", "El Alavés en descenso")
    );
    assert_eq!(plain_row.content, "El Alavés pelea por no descender.");
    assert_eq!(plain_row.topic, TOPIC);

    // The refused messages were acknowledged: the resumed session brings none of them
    // back, and the next article is archived as usual.
    let mut sub = archiving(&broker, &url).await;
    publish_raw(
        &broker,
        &[br#"{"id":"art-2","title":"Otro","content":"Mas"}"#],
    )
    .await;
    sub.wait_archived("art-2").await;
    let report = sub.stop().await;
    assert_eq!(
        (report.received, report.not_archived, report.archived),
        (1, 0, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_from_mosquitto_pub_is_archived_once_under_a_stable_id() {
    let available = Command::new("mosquitto_pub").arg("--help").output().is_ok();
    if !available {
        assert!(
            std::env::var_os("CI").is_none(),
            "mosquitto_pub is required in CI: apt-get install mosquitto-clients"
        );
        eprintln!("SKIPPED: mosquitto_pub not installed (apt-get install mosquitto-clients)");
        return;
    }
    let broker = TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = ArchiveUrl::Sqlite(dir.path().join("articles.db"));
    let mut sub = archiving(&broker, &url).await;
    let text = "Título: Gol en el 90 | Contenido: Golazo de chilena.";
    for _ in 0..2 {
        let out = Command::new("mosquitto_pub")
            .args([
                "-h",
                "localhost",
                "-p",
                &broker.addr.port().to_string(),
                "-q",
                "1",
            ])
            .arg("--cafile")
            .arg(&broker.layout.ca_cert)
            .arg("--cert")
            .arg(broker.layout.client_cert("publisher"))
            .arg("--key")
            .arg(broker.layout.client_key("publisher"))
            .args(["-t", "articulos/as/futbol", "-m", text])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let id = content_id("articulos/as/futbol", text.as_bytes());
    sub.wait_archived(&id).await;
    sub.wait_archived(&id).await;
    let report = sub.stop().await;
    assert_eq!((report.received, report.archived), (2, 1));
    let mut store = open(&url).await;
    assert_eq!(all_ids(&mut store).await, [id]);
    tokio::time::sleep(Duration::ZERO).await;
}
