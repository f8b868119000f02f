//! The stack end to end: broker, publisher and subscriber in one process, through the
//! library APIs, with real TLS on 127.0.0.1.

use broker::pki::{self, Layout};
use clients::{
    run_publisher, run_subscriber, Article, ClientError, ClientEvent, ConnectionOptions, Payload,
    PublisherOptions, Received, SubscriberOptions,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

const WAIT: Duration = Duration::from_secs(15);

struct Stack {
    dir: tempfile::TempDir,
    layout: Layout,
    broker: Option<broker::Handle>,
    addr: SocketAddr,
}

fn config(dir: &Path, bind: SocketAddr) -> broker::Config {
    let mut c = broker::Config::default();
    c.listener.bind = bind;
    c.tls.ca_file = dir.join("certs/ca.crt");
    c.tls.cert_file = dir.join("certs/broker.crt");
    c.tls.key_file = dir.join("certs/broker.key");
    c.storage.data_dir = dir.join("data");
    c.log.dir = Default::default();
    c.metrics.bind = "127.0.0.1:0".into();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("broker.toml");
    c.acl = broker::Config::load(&shipped).unwrap().acl;
    c
}

impl Stack {
    /// Certificates created by the broker itself on first start, as `cargo run` does.
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker::start(config(dir.path(), "127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        Self {
            layout: Layout::in_dir(&dir.path().join("certs")),
            addr: broker.local_addr(),
            broker: Some(broker),
            dir,
        }
    }

    async fn stop_broker(&mut self) {
        if let Some(b) = self.broker.take() {
            b.shutdown().await;
        }
    }

    /// Starts the broker again on the same port and data.
    async fn restart_broker(&mut self) {
        self.stop_broker().await;
        self.broker = Some(
            broker::start(config(self.dir.path(), self.addr))
                .await
                .unwrap(),
        );
    }

    fn connection(&self, name: &str, client_id: &str) -> ConnectionOptions {
        let mut c = ConnectionOptions::new(
            "localhost",
            self.addr.port(),
            &self.layout.ca_cert,
            self.layout.client_cert(name),
            self.layout.client_key(name),
            client_id,
        );
        c.backoff.initial = Duration::from_millis(20);
        c.backoff.max = Duration::from_millis(200);
        c
    }
}

/// A subscriber running in a task, its messages and events in channels.
struct Sub {
    received: mpsc::UnboundedReceiver<Received>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<clients::SubscriberReport, ClientError>>,
}

async fn subscriber(stack: &Stack, client_id: &str, topics: &[&str]) -> Sub {
    let mut opts = SubscriberOptions::new(stack.connection("subscriber", client_id));
    opts.topics = topics.iter().map(|t| t.to_string()).collect();
    let (events, mut event_rx) = mpsc::unbounded_channel();
    opts.events = Some(events);
    let (tx, received) = mpsc::unbounded_channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run_subscriber(
        opts,
        move |r| {
            let _ = tx.send(r);
        },
        async {
            let _ = stopped.await;
        },
    ));
    // Subscribed, or resumed a session that already has the subscription.
    let ready = async {
        while let Some(e) = event_rx.recv().await {
            match e {
                ClientEvent::Subscribed { .. } => return,
                ClientEvent::Connected {
                    session_present: true,
                } => return,
                _ => {}
            }
        }
    };
    tokio::time::timeout(WAIT, ready)
        .await
        .expect("subscriber never subscribed");
    Sub {
        received,
        stop: Some(stop),
        task,
    }
}

impl Sub {
    async fn next_article(&mut self) -> (String, Article) {
        loop {
            let r = tokio::time::timeout(WAIT, self.received.recv())
                .await
                .expect("no article within the wait")
                .expect("subscriber ended");
            if r.duplicate {
                continue;
            }
            match r.payload {
                Payload::Article(a) => return (r.topic, a),
                other => panic!("not an article: {other:?}"),
            }
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

/// Publishes `count` articles at a 1 ms interval; returns what was acknowledged.
async fn publish(stack: &Stack, client_id: &str, count: u64) -> Vec<(String, Article)> {
    let mut opts = PublisherOptions::new(stack.connection("publisher", client_id));
    opts.count = Some(count);
    opts.interval = Duration::from_millis(1);
    let (events, mut rx) = mpsc::unbounded_channel();
    opts.events = Some(events);
    let report = run_publisher(opts, std::future::pending()).await.unwrap();
    assert_eq!(report.acknowledged, count);
    let mut published = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if let ClientEvent::Published { article, topic } = e {
            published.push((topic, article));
        }
    }
    published
}

#[tokio::test]
async fn subscriber_receives_exactly_the_published_articles_in_order_per_topic() {
    let stack = Stack::start().await;
    let mut sub = subscriber(&stack, "exact-sub", &["articulos/#"]).await;
    let published = publish(&stack, "exact-pub", 30).await;
    assert_eq!(published.len(), 30);

    let mut got = Vec::new();
    while got.len() < published.len() {
        got.push(sub.next_article().await);
    }
    let by_id: HashMap<_, _> = got.iter().map(|(t, a)| (a.id.clone(), (t, a))).collect();
    assert_eq!(by_id.len(), 30, "duplicates delivered as new");
    for (topic, article) in published.iter() {
        let (t, a) = by_id[&article.id];
        assert_eq!(t.as_str(), topic.as_str());
        assert_eq!(a, article);
    }
    // Per topic, the order of publication.
    let order = |list: &[(String, Article)]| {
        let mut per: HashMap<String, Vec<String>> = HashMap::new();
        for (t, a) in list {
            per.entry(t.clone()).or_default().push(a.id.clone());
        }
        per
    };
    assert_eq!(order(&got), order(&published));
    sub.stop().await;
}

#[tokio::test]
async fn football_filter_gets_only_football() {
    let stack = Stack::start().await;
    let mut sub = subscriber(&stack, "futbol-sub", &["articulos/+/futbol"]).await;
    let published = publish(&stack, "futbol-pub", 15).await;
    let football: Vec<_> = published
        .iter()
        .filter(|(t, _)| t.ends_with("/futbol"))
        .collect();
    assert!(!football.is_empty() && football.len() < published.len());
    for (topic, article) in football {
        let (t, a) = sub.next_article().await;
        assert_eq!((&t, &a.id), (topic, &article.id));
    }
    sub.stop().await;
}

#[tokio::test]
async fn client_with_a_certificate_from_another_ca_is_refused() {
    let stack = Stack::start().await;
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue = Layout::in_dir(rogue_dir.path());
    pki::ensure(&rogue, &pki::Request::default()).unwrap();
    let mut conn = stack.connection("publisher", "rogue");
    conn.cert = rogue.client_cert("publisher");
    conn.key = rogue.client_key("publisher");
    let mut opts = PublisherOptions::new(conn);
    opts.once = true;
    let err = tokio::time::timeout(WAIT, run_publisher(opts, std::future::pending()))
        .await
        .expect("refusal took too long")
        .expect_err("a foreign certificate was accepted");
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
}

#[tokio::test]
async fn articles_published_while_the_subscriber_is_offline_arrive_once() {
    let stack = Stack::start().await;
    let sub = subscriber(&stack, "offline-sub", &["articulos/#"]).await;
    sub.stop().await;
    let published = publish(&stack, "offline-pub", 5).await;

    let mut sub = subscriber(&stack, "offline-sub", &["articulos/#"]).await;
    let mut ids = HashSet::new();
    for _ in 0..5 {
        ids.insert(sub.next_article().await.1.id);
    }
    let expected: HashSet<_> = published.into_iter().map(|(_, a)| a.id).collect();
    assert_eq!(ids, expected);
    sub.stop().await;
}

#[tokio::test]
async fn every_article_survives_a_broker_restart() {
    let mut stack = Stack::start().await;
    let mut sub = subscriber(&stack, "restart-sub", &["articulos/#"]).await;

    let mut opts = PublisherOptions::new(stack.connection("publisher", "restart-pub"));
    opts.interval = Duration::from_millis(10);
    let (events, mut pub_events) = mpsc::unbounded_channel();
    opts.events = Some(events);
    let (stop_pub, pub_stopped) = oneshot::channel::<()>();
    let publisher = tokio::spawn(run_publisher(opts, async {
        let _ = pub_stopped.await;
    }));

    let mut acked = Vec::new();
    let mut next_published = async |acked: &mut Vec<String>| loop {
        match tokio::time::timeout(WAIT, pub_events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            ClientEvent::Published { article, .. } => {
                acked.push(article.id);
                return;
            }
            ClientEvent::ConnectionLost { .. } => {}
            _ => {}
        }
    };
    for _ in 0..10 {
        next_published(&mut acked).await;
    }
    stack.restart_broker().await;
    // Articles produced during the restart are acknowledged after it.
    let before = acked.len();
    while acked.len() < before + 10 {
        next_published(&mut acked).await;
    }
    let _ = stop_pub.send(());
    let report = publisher.await.unwrap().unwrap();
    assert_eq!(report.unacknowledged, 0);
    assert!(report.connections >= 2, "the publisher never reconnected");
    while let Ok(e) = pub_events.try_recv() {
        if let ClientEvent::Published { article, .. } = e {
            acked.push(article.id);
        }
    }

    let mut seen = HashSet::new();
    let wanted: HashSet<String> = acked.iter().cloned().collect();
    while !wanted.is_subset(&seen) {
        seen.insert(sub.next_article().await.1.id);
    }
    sub.stop().await;
    stack.stop_broker().await;
}

/// The stack binary, as `cargo run` starts it: certificates on first run, every line
/// prefixed by its component, articles archived in data/articles.db, SIGTERM stops all
/// three (the subscriber's archive committed first).
#[test]
fn stack_binary_runs_all_three_and_stops_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("broker.toml")).unwrap();
    std::fs::write(
        dir.path().join("broker.toml"),
        shipped
            .replace("0.0.0.0:8883", "127.0.0.1:0")
            .replace("127.0.0.1:9883", "127.0.0.1:0"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqtt-stack"))
        .arg("--config")
        .arg(dir.path().join("broker.toml"))
        .args(["--interval", "0.05"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // A stack that never prints an article is killed, and the test fails below.
    let pid = child.id().to_string();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    });
    let mut seen = Vec::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let done = line.starts_with("subscriber | [") && line.contains("/futbol]");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status:?}; output: {seen:#?}");
    for prefix in ["broker     |", "publisher  |", "subscriber |"] {
        assert!(
            seen.iter().any(|l| l.starts_with(prefix)),
            "no {prefix} line in {seen:#?}"
        );
    }
    assert!(dir.path().join("certs/publisher.crt").is_file());

    // The subscriber archived what it printed, in data/articles.db beside broker.toml.
    let printed = seen.last().unwrap().clone();
    let rows = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let url = clients::ArchiveUrl::Sqlite(dir.path().join("data/articles.db"));
        let mut store = clients::Store::open(&url, false).await.unwrap();
        let query = clients::archive::ListQuery {
            limit: 1_000,
            ..Default::default()
        };
        store.list(&query).await.unwrap()
    });
    assert!(
        rows.iter()
            .any(|r| printed.contains(&format!("] {} — ", r.title))),
        "{printed:?} not among the archived {rows:#?}"
    );
}
