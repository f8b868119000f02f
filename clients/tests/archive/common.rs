//! Harness: the broker in-process on 127.0.0.1:0 with a temporary PKI and the shipped
//! ACL, a publisher, the real `subscriber` binary as a child process (so it can be
//! SIGKILLed), and waits on the archive's rows.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker::pki::{self, Layout};
use clients::{run_publisher, ArchiveUrl, ClientEvent, ConnectionOptions, PublisherOptions, Store};
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(30);

pub struct TestBroker {
    /// Certificates and the broker's data; removed with the broker.
    _dir: tempfile::TempDir,
    pub layout: Layout,
    pub addr: SocketAddr,
    pub handle: Option<broker::Handle>,
}

impl TestBroker {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::in_dir(&dir.path().join("certs"));
        pki::ensure(&layout, &pki::Request::default()).unwrap();
        let mut c = broker::Config::default();
        c.listener.bind = "127.0.0.1:0".parse().unwrap();
        c.tls.ca_file = layout.ca_cert.clone();
        c.tls.cert_file = layout.server_cert.clone();
        c.tls.key_file = layout.server_key.clone();
        c.tls.auto_generate = false;
        c.storage.data_dir = dir.path().join("data");
        c.log.dir = PathBuf::new();
        c.metrics.bind = "127.0.0.1:0".into();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker.toml");
        c.acl = broker::Config::load(&shipped).unwrap().acl;
        let handle = broker::start(c).await.unwrap();
        Self {
            addr: handle.local_addr(),
            handle: Some(handle),
            layout,
            _dir: dir,
        }
    }

    pub fn connection(&self, identity: &str, client_id: &str) -> ConnectionOptions {
        let mut c = ConnectionOptions::new(
            "localhost",
            self.addr.port(),
            &self.layout.ca_cert,
            self.layout.client_cert(identity),
            self.layout.client_key(identity),
            client_id,
        );
        c.backoff.initial = Duration::from_millis(20);
        c.backoff.max = Duration::from_millis(200);
        c
    }

    /// The subscriber binary's connection flags for `client_id`.
    pub fn subscriber_args(&self, client_id: &str) -> Vec<String> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        vec![
            "--host".into(),
            "localhost".into(),
            "--port".into(),
            self.addr.port().to_string(),
            "--ca".into(),
            path(&self.layout.ca_cert),
            "--cert".into(),
            path(&self.layout.client_cert("subscriber")),
            "--key".into(),
            path(&self.layout.client_key("subscriber")),
            "--client-id".into(),
            client_id.into(),
            "--topic".into(),
            "articulos/#".into(),
            "--retry".into(),
        ]
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        // The in-process broker ends with the test's runtime.
        self.handle.take();
    }
}

/// A publisher of `count` articles at `interval`, in a task; resolves to the ids the
/// broker acknowledged.
pub fn publish(
    broker: &TestBroker,
    client_id: &str,
    count: u64,
    interval: Duration,
) -> tokio::task::JoinHandle<HashSet<String>> {
    let mut opts = PublisherOptions::new(broker.connection("publisher", client_id));
    opts.count = Some(count);
    opts.interval = interval;
    let (events, mut rx) = mpsc::unbounded_channel();
    opts.events = Some(events);
    tokio::spawn(async move {
        let report = run_publisher(opts, std::future::pending()).await.unwrap();
        assert_eq!(report.acknowledged, count);
        let mut ids = HashSet::new();
        while let Ok(e) = rx.try_recv() {
            if let ClientEvent::Published { article, .. } = e {
                ids.insert(article.id);
            }
        }
        assert_eq!(ids.len() as u64, count);
        ids
    })
}

/// The `subscriber` binary, its stdout (articles and logs) collected line by line.
pub struct SubscriberProcess {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    seen: mpsc::UnboundedReceiver<String>,
}

impl SubscriberProcess {
    pub fn spawn(args: &[String]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_subscriber"))
            .args(args)
            .env("RUST_LOG", "info,rumqttc=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, seen) = mpsc::unbounded_channel();
        let keep = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Self { child, lines, seen }
    }

    /// Waits for a line containing every one of `parts`.
    pub async fn wait_for_line(&mut self, parts: &[&str]) -> String {
        let wanted = async {
            while let Some(line) = self.seen.recv().await {
                if parts.iter().all(|p| line.contains(p)) {
                    return line;
                }
            }
            panic!("the subscriber ended before printing {parts:?}");
        };
        tokio::time::timeout(WAIT, wanted)
            .await
            .unwrap_or_else(|_| panic!("no line with {parts:?} within {WAIT:?}"))
    }

    /// Lines so far containing `part`.
    pub fn count_lines(&self, part: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(part))
            .count()
    }

    pub fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "subscriber exited with {status:?}");
    }
}

impl Drop for SubscriberProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Opens the archive (waiting for the subscriber to create it).
pub async fn open(url: &ArchiveUrl) -> Store {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match Store::open(url, false).await {
            Ok(s) => return s,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Waits until the archive holds at least `n` rows; returns the count.
pub async fn wait_rows(store: &mut Store, n: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let count = store.count().await.unwrap();
        if count >= n {
            return count;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} rows of {n} after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every id in the archive.
pub async fn all_ids(store: &mut Store) -> Vec<String> {
    let query = clients::archive::ListQuery {
        limit: u64::MAX,
        ..Default::default()
    };
    store
        .list(&query)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect()
}

/// The shared SIGKILL scenario: 1,000 articles published; the subscriber killed once a
/// few hundred are stored, started again; exactly the 1,000 published, once each.
pub async fn kill_mid_stream_loses_nothing(url: &str, client_id: &str) -> Store {
    let broker = TestBroker::start().await;
    let mut args = broker.subscriber_args(client_id);
    args.extend(["--archive".into(), url.into()]);
    let url: ArchiveUrl = url.parse().unwrap();
    let url = &url;
    let mut sub = SubscriberProcess::spawn(&args);
    sub.wait_for_line(&["subscribed"]).await;
    let mut store = open(url).await;

    let publisher = publish(
        &broker,
        &format!("{client_id}-pub"),
        1_000,
        Duration::from_millis(1),
    );
    let at_kill = wait_rows(&mut store, 200).await;
    sub.sigkill();
    let stored_at_kill = store.count().await.unwrap();
    assert!(
        stored_at_kill < 1_000,
        "the kill came too late to test anything ({at_kill} rows)"
    );
    eprintln!("subscriber killed with {stored_at_kill} of 1000 rows stored");

    let mut sub = SubscriberProcess::spawn(&args);
    sub.wait_for_line(&["connected", "session_present=true"])
        .await;
    let published = publisher.await.unwrap();
    assert_eq!(wait_rows(&mut store, 1_000).await, 1_000);
    // Anything redelivered late would show up as a 1,001st row: give it the time to.
    sub.stop();
    let ids = all_ids(&mut store).await;
    assert_eq!(ids.len(), 1_000, "exactly one row per article");
    let stored: HashSet<String> = ids.into_iter().collect();
    assert_eq!(stored, published, "the rows are the articles published");
    store
}
