//! Test support, compiled into the `broker` integration test binary only: real upstream
//! MQTT servers for the bridge tests (issue 15), started by the tests themselves, and the
//! smoke tests that prove them.
//!
//! - [`MosquittoUpstream`]: Debian's `/usr/sbin/mosquitto` (package `mosquitto`) with one
//!   mutual-TLS listener on a free 127.0.0.1 port (`require_certificate`,
//!   `use_identity_as_username`: the username is the certificate's CN), persistence in a
//!   temporary folder, its log in a file the test reads.
//! - [`NatsCluster`]: three `nats-server` nodes (package `nats-server`, 2.9.x) clustered
//!   on loopback, JetStream on each, each with an MQTT listener over mutual TLS.
//!
//! Both take their certificates from the test's [`TestPki`]: the server certificate is
//! issued by its CA for `localhost` and `127.0.0.1`; clients use the PKI's client
//! certificates. Every process is killed (SIGKILL) when its owner is dropped. Without the
//! programs the tests print SKIPPED and pass (`start` returns `None`), except with `CI`
//! set, where they panic naming the apt-get command.
//!
//! What nats-server 2.9.10 (Debian 12's package) does with MQTT, read in its
//! `server/mqtt.go` at tag v2.9.10 and checked here where a test says so:
//! - MQTT 3.1.1 only (protocol level 4). An MQTT 5 CONNECT gets CONNACK return code 1,
//!   "unacceptable protocol version" (tested below: mosquitto_pub -V mqttv5 fails).
//!   3.1 (`MQIsdp`) is refused too.
//! - QoS 0 and 1 only. A QoS 2 SUBSCRIBE is granted QoS 1; a QoS 2 PUBLISH is a protocol
//!   error: the server logs `publish QoS=2 not supported` and closes the connection
//!   (tested below). (NATS's current docs list QoS 2: a later release; not verified.)
//! - Retained messages: yes, kept in the JetStream stream `$MQTT_rmsgs`.
//! - Persistent sessions (clean session 0): yes, in `$MQTT_sess`; each QoS 1 subscription
//!   is a durable JetStream consumer on `$MQTT_msgs` (interest retention), so messages for
//!   an offline persistent session are kept by JetStream, replicated (`stream_replicas`,
//!   by default one per configured route, at most 3; set to 3 here). A filter ending in
//!   `#` becomes two subscriptions (`a` and `a.>`), so two consumers.
//! - In-flight: `max_ack_pending` (also `max_inflight`) per subscription, default 1024,
//!   and at most 65535 summed over one session's subscriptions (a SUBSCRIBE that would
//!   pass it fails). Unacknowledged QoS 1 messages are redelivered every `ack_wait`
//!   (default 30 s) even while connected, not only on reconnect.
//! - A QoS 1 PUBLISH is acknowledged only once JetStream stored it: the connection's read
//!   loop waits for the store (a JetStream API request, 4 s timeout). If the store fails
//!   or times out (no quorum), no PUBACK is sent and the server closes the connection;
//!   live QoS 0 subscribers may have received it already. So a publisher (a bridge) must
//!   reconnect and resend. Checked by hand with two of three nodes killed: the log says
//!   `timeout for request type "MS"`, and while there is no quorum every CONNECT fails
//!   after 4 s too (`unable to persist session`), QoS 0 clients included. With one of
//!   three killed (tested below), a publication waits at most for the elections: ~8 s
//!   (two 4 s timeouts) when the killed node led the stream or consumer, else none.
//!   The first MQTT CONNECT of an account creates the three streams.
//! - Topics: `/` becomes `.`; topics with ' ' or '.' are refused
//!   ("characters ' ' and '.' not supported for MQTT topics" in 2.9).
//! - Configuration: `server_name` is required with `mqtt {}`; JetStream is required
//!   (standalone), and the account must have JetStream (with no accounts configured the
//!   global account has it). Client certificates: `tls { verify: true }` is all that is
//!   needed when no users are configured: the handshake requires a certificate signed by
//!   `ca_file` and no further authentication is asked. `verify_and_map` would instead
//!   require a configured user named after the certificate's subject (e.g.
//!   `CN=publisher,O=...`), with JetStream enabled for that user's account.
//! - Cluster formation (measured on a 2-core machine): three nodes on loopback have their
//!   routes and agree on a JetStream meta leader 0.2-0.5 s after starting; every MQTT
//!   listener accepts a CONNECT 2.7-3.7 s after starting (the first CONNECT creates the
//!   streams). `start` waits for both; a killed node rejoins (`restart`) in 1-2 s.

use crate::common::*;
use broker::pki::LeafSpec;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a server may take to become ready.
const READY: Duration = Duration::from_secs(60);
/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(25);

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const NATS: &str = "nats-server";

/// Whether `program` can be run; if not, panics under CI with the install command, or
/// says SKIPPED.
pub fn require(program: &str, package: &str) -> bool {
    let ok = Command::new(program)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is required in CI: apt-get install {package}"
        );
        eprintln!("SKIPPED: {program} not installed (apt-get install {package})");
    }
    ok
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server certificate for localhost and 127.0.0.1 from `pki`'s CA, and the CA, written
/// into `dir`: (ca, cert, key).
fn server_files(pki: &TestPki, dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let issued = pki.issue(&LeafSpec::server(
        name,
        vec!["localhost".into(), "127.0.0.1".into()],
        30,
    ));
    let (ca, cert, key) = (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    );
    std::fs::copy(&pki.layout.ca_cert, &ca).unwrap();
    std::fs::write(&cert, issued.cert_pem).unwrap();
    std::fs::write(&key, issued.key_pem).unwrap();
    (ca, cert, key)
}

/// One server process, killed when dropped.
struct Proc {
    child: Option<Child>,
    /// Where stdout and stderr go (errors before the server opens its own log).
    output: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, output: PathBuf) -> Self {
        let out = std::fs::File::create(&output).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self {
            child: Some(child),
            output,
        }
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    /// SIGKILL, and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits (polling) for it to exit; SIGKILL after `READY`.
    async fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + READY;
        while self.running() {
            if Instant::now() > deadline {
                self.kill();
                panic!("server did not exit within {READY:?} of SIGTERM");
            }
            tokio::time::sleep(POLL).await;
        }
        self.child = None;
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `ready` every `POLL` until it returns true; panics with `what` and `context()`
/// at the deadline, or as soon as `alive()` says the server died.
async fn await_ready<F, Fut>(
    what: &str,
    mut alive: impl FnMut() -> bool,
    context: impl Fn() -> String,
    mut ready: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + READY;
    loop {
        if ready().await {
            return;
        }
        if !alive() {
            panic!("{what}: the server exited; its output:\n{}", context());
        }
        if Instant::now() > deadline {
            panic!("{what}: not ready within {READY:?}; output:\n{}", context());
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn accepts(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

// ---------------------------------------------------------------------------
// Mosquitto

/// Eclipse Mosquitto as an upstream broker: mutual TLS on a free 127.0.0.1 port,
/// identity = certificate CN as username, persistence on.
pub struct MosquittoUpstream {
    dir: tempfile::TempDir,
    port: u16,
    ca: PathBuf,
    config: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl MosquittoUpstream {
    /// Starts mosquitto with certificates from `pki`; `None` (SKIPPED) when it is not
    /// installed outside CI.
    pub async fn start(pki: &TestPki) -> Option<Self> {
        Self::start_with(pki, "").await
    }

    /// As `start`, with `extra` lines appended to mosquitto.conf (global options such as
    /// `max_queued_messages 10` or `max_inflight_messages 1`).
    pub async fn start_with(pki: &TestPki, extra: &str) -> Option<Self> {
        if !require(MOSQUITTO, "mosquitto") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = server_files(pki, dir.path(), "mosquitto-upstream");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let log = dir.path().join("mosquitto.log");
        let port = free_port();
        // `user root`: as root, mosquitto would otherwise switch to the `mosquitto` user,
        // which cannot read the temporary folder (no effect when not run as root).
        // autosave_interval 1: the in-memory state reaches disk within a second, so even
        // a SIGKILL loses at most the last second (SIGTERM always saves).
        let text = format!(
            "user root\n\
             persistence true\n\
             persistence_location {data}/\n\
             autosave_interval 1\n\
             log_dest file {log}\n\
             log_type all\n\
             log_timestamp_format %H:%M:%S\n\
             connection_messages true\n\
             {extra}\n\
             listener {port} 127.0.0.1\n\
             cafile {ca}\n\
             certfile {cert}\n\
             keyfile {key}\n\
             require_certificate true\n\
             use_identity_as_username true\n",
            data = data.display(),
            log = log.display(),
            ca = ca.display(),
            cert = cert.display(),
            key = key.display(),
        );
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(&config, text).unwrap();
        let mut upstream = Self {
            dir,
            port,
            ca,
            config,
            log,
            proc: None,
        };
        upstream.spawn().await;
        Some(upstream)
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new(MOSQUITTO);
        cmd.arg("-c").arg(&self.config);
        let proc = Proc::spawn(cmd, self.dir.path().join("mosquitto.out"));
        self.proc = Some(proc);
        let addr = self.addr();
        let proc = self.proc.as_mut().unwrap();
        let output = proc.output.clone();
        let log = self.log.clone();
        let context = || {
            format!(
                "{}{}",
                std::fs::read_to_string(&output).unwrap_or_default(),
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        };
        await_ready("mosquitto", || proc.running(), context, || accepts(addr)).await;
    }

    /// 127.0.0.1 and its port (the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The CA certificate that signed its server certificate (the test PKI's CA).
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }

    pub fn log_file(&self) -> &Path {
        &self.log
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (polling the log file) for a line containing every one of `parts`.
    pub async fn wait_for_log(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + READY;
        loop {
            if let Some(line) = self
                .log()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no mosquitto log line with {parts:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::running)
    }

    /// SIGTERM; returns once it has exited (having saved its persistence file).
    pub async fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.terminate().await;
        }
    }

    /// SIGKILL: nothing saved since the last autosave (at most a second ago).
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Stops it (SIGTERM) if running, and starts it again on the same port with the same
    /// configuration and data; returns once the port accepts connections.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }
}

// ---------------------------------------------------------------------------
// NATS

/// How many nodes a [`NatsCluster`] has.
pub const NATS_NODES: usize = 3;

struct NatsNode {
    name: String,
    config: PathBuf,
    log: PathBuf,
    mqtt_port: u16,
    http_port: u16,
    proc: Option<Proc>,
}

/// Three nats-server nodes clustered on loopback, JetStream on each, each with an MQTT
/// listener over mutual TLS. Nodes are numbered 0, 1, 2 (server names n0, n1, n2).
pub struct NatsCluster {
    dir: tempfile::TempDir,
    ca: PathBuf,
    nodes: Vec<NatsNode>,
    /// A client certificate (the PKI's `publisher`), for the readiness CONNECTs.
    probe_cert: broker::pki::Issued,
}

impl NatsCluster {
    /// Starts the three nodes and waits until the routes are up, JetStream has a meta
    /// leader that every node knows, and each MQTT listener accepts a TLS CONNECT with a
    /// client certificate from `pki`. `None` (SKIPPED) without nats-server outside CI.
    pub async fn start(pki: &TestPki) -> Option<Self> {
        if !require(NATS, "nats-server") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = server_files(pki, dir.path(), "nats-upstream");
        let ports: Vec<[u16; 4]> = (0..NATS_NODES)
            .map(|_| [free_port(), free_port(), free_port(), free_port()])
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|[_, cluster, _, _]| format!("\"nats-route://127.0.0.1:{cluster}\""))
            .collect();
        let mut nodes = Vec::new();
        for (i, [client, cluster, http, mqtt]) in ports.into_iter().enumerate() {
            let name = format!("n{i}");
            let store = dir.path().join(&name).join("jetstream");
            std::fs::create_dir_all(&store).unwrap();
            let log = dir.path().join(format!("{name}.log"));
            let text = format!(
                r#"server_name: "{name}"
listen: "127.0.0.1:{client}"
http: "127.0.0.1:{http}"
log_file: "{log}"
jetstream {{
  store_dir: "{store}"
  max_memory_store: 64MB
  max_file_store: 512MB
}}
cluster {{
  name: "upstream"
  listen: "127.0.0.1:{cluster}"
  routes: [{routes}]
}}
mqtt {{
  listen: "127.0.0.1:{mqtt}"
  stream_replicas: 3
  consumer_replicas: 3
  tls {{
    cert_file: "{cert}"
    key_file: "{key}"
    ca_file: "{ca}"
    verify: true
    timeout: 2
  }}
}}
"#,
                log = log.display(),
                store = store.display(),
                routes = routes.join(", "),
                cert = cert.display(),
                key = key.display(),
                ca = ca.display(),
            );
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text).unwrap();
            nodes.push(NatsNode {
                name,
                config,
                log,
                mqtt_port: mqtt,
                http_port: http,
                proc: None,
            });
        }
        let mut cluster = Self {
            dir,
            ca,
            nodes,
            probe_cert: pki.client("publisher"),
        };
        let started = Instant::now();
        for node in 0..NATS_NODES {
            cluster.spawn(node);
        }
        cluster.wait_cluster().await;
        let formed = started.elapsed();
        cluster.wait_mqtt().await;
        eprintln!(
            "NATS cluster of {NATS_NODES}: routes and meta leader ({}) in {formed:?}, \
             MQTT accepted on every node in {:?}",
            cluster.meta_leader().await.unwrap_or_default(),
            started.elapsed()
        );
        Some(cluster)
    }

    fn spawn(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let mut cmd = Command::new(NATS);
        cmd.arg("-c").arg(&n.config);
        let output = self.dir.path().join(format!("{}.out", n.name));
        n.proc = Some(Proc::spawn(cmd, output));
    }

    /// Where node `node`'s MQTT listener (mutual TLS, 3.1.1) is.
    pub fn mqtt_addr(&self, node: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[node].mqtt_port))
    }

    /// Node `node`'s HTTP monitoring endpoint (/varz, /routez, /jsz, /healthz).
    pub fn http_addr(&self, node: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[node].http_port))
    }

    /// The CA certificate that signed the nodes' server certificate (the test PKI's CA).
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }

    /// Node `node`'s log so far.
    pub fn log(&self, node: usize) -> String {
        let n = &self.nodes[node];
        let out = n.proc.as_ref().map(Proc::output).unwrap_or_default();
        format!(
            "{out}{}",
            std::fs::read_to_string(&n.log).unwrap_or_default()
        )
    }

    pub fn is_running(&mut self, node: usize) -> bool {
        self.nodes[node].proc.as_mut().is_some_and(Proc::running)
    }

    /// SIGKILL to node `node`; the others keep running.
    pub fn kill(&mut self, node: usize) {
        if let Some(mut proc) = self.nodes[node].proc.take() {
            proc.kill();
        }
    }

    /// Starts a killed node again (same ports, same JetStream store) and waits until the
    /// cluster is whole again.
    pub async fn restart(&mut self, node: usize) {
        self.kill(node);
        self.spawn(node);
        self.wait_ready().await;
    }

    /// The JetStream meta leader's server name, as the first running node reports it.
    pub async fn meta_leader(&mut self) -> Option<String> {
        for node in 0..NATS_NODES {
            if !self.is_running(node) {
                continue;
            }
            let jsz = monitor(self.http_addr(node), "/jsz").await?;
            return jsz["meta_cluster"]["leader"]
                .as_str()
                .filter(|l| !l.is_empty())
                .map(str::to_string);
        }
        None
    }

    /// Waits until every running node has a route to each other running node, all of
    /// them name the same running JetStream meta leader, and each running node's MQTT
    /// listener answers a TLS CONNECT (clean session) with CONNACK 0. After a `kill`, this
    /// waits for a new meta leader among the survivors.
    pub async fn wait_ready(&mut self) {
        self.wait_cluster().await;
        self.wait_mqtt().await;
    }

    /// The first half of `wait_ready`: routes and an agreed, running meta leader.
    pub async fn wait_cluster(&mut self) {
        let running: Vec<usize> = (0..NATS_NODES).filter(|&n| self.is_running(n)).collect();
        let names: Vec<String> = running
            .iter()
            .map(|&n| self.nodes[n].name.clone())
            .collect();
        for &node in &running {
            let http = self.http_addr(node);
            let names = names.clone();
            let logs = || (0..NATS_NODES).map(|n| self.log(n)).collect::<Vec<_>>();
            let context = || logs().join("\n----\n");
            let what = format!("nats node {node}: routes and JetStream meta leader");
            let ready = || {
                let names = names.clone();
                async move { cluster_view_ok(http, &names).await }
            };
            await_ready(&what, || true, context, ready).await;
        }
    }

    /// The second half of `wait_ready`: each running node's MQTT listener answers a TLS
    /// CONNECT with a client certificate with CONNACK 0.
    pub async fn wait_mqtt(&mut self) {
        let running: Vec<usize> = (0..NATS_NODES).filter(|&n| self.is_running(n)).collect();
        for &node in &running {
            let addr = self.mqtt_addr(node);
            let ca = std::fs::read_to_string(&self.ca).unwrap();
            let cert = self.probe_cert.clone();
            let what = format!("nats node {node}: MQTT over TLS");
            let context = || self.log(node);
            let ready = || {
                let (ca, cert) = (ca.clone(), cert.clone());
                async move { mqtt_connects(addr, &ca, &cert, &format!("harness-probe-{node}")).await }
            };
            await_ready(&what, || true, context, ready).await;
        }
    }
}

/// Whether the node at `http` routes to all of `names` but itself and knows a meta
/// leader among `names`.
async fn cluster_view_ok(http: SocketAddr, names: &[String]) -> bool {
    let (Some(routez), Some(jsz)) = (monitor(http, "/routez").await, monitor(http, "/jsz").await)
    else {
        return false;
    };
    let routed = routez["num_routes"].as_u64().unwrap_or(0) as usize;
    let leader = jsz["meta_cluster"]["leader"].as_str().unwrap_or("");
    routed + 1 >= names.len() && names.iter().any(|n| n == leader)
}

/// GET `path` on a monitoring endpoint; the JSON body, or None while it cannot answer.
async fn monitor(http: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(http).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        s.write_all(request.as_bytes()).await.ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        let (_, body) = text.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()
        .flatten()
}

/// Whether an MQTT 3.1.1 CONNECT (clean session) over TLS with `cert` gets CONNACK 0.
async fn mqtt_connects(
    addr: SocketAddr,
    ca: &str,
    cert: &broker::pki::Issued,
    client_id: &str,
) -> bool {
    use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
    let attempt = async {
        let mut c = TestClient::tls(addr, ca, Some(cert)).await.ok()?;
        let mut connect = rumqttc::mqttbytes::v4::Connect::new(client_id);
        connect.clean_session = true;
        connect.keep_alive = 30;
        c.send(Packet::Connect(connect)).await;
        match c.try_recv().await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {
                c.send(Packet::Disconnect).await;
                Some(())
            }
            _ => None,
        }
    };
    // The first CONNECT of an account creates the MQTT streams (JetStream API requests
    // of up to 4 s each).
    tokio::time::timeout(Duration::from_secs(8), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

// ---------------------------------------------------------------------------
// Smoke tests: the harness against the real mosquitto clients.

/// A mosquitto_pub / mosquitto_sub command against `addr`, with `name`'s certificate
/// from `pki` (or none).
fn client(
    program: &str,
    addr: SocketAddr,
    ca: &Path,
    pki: &TestPki,
    name: Option<&str>,
) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .arg("--cafile")
        .arg(ca);
    if let Some(name) = name {
        cmd.arg("--cert")
            .arg(pki.layout.client_cert(name))
            .arg("--key")
            .arg(pki.layout.client_key(name));
    }
    cmd
}

async fn output(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "status {}, stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn have_clients() -> bool {
    require("mosquitto_pub", "mosquitto-clients") && require("mosquitto_sub", "mosquitto-clients")
}

#[tokio::test]
async fn mosquitto_upstream_serves_certificates_refuses_none_and_keeps_sessions_across_restart() {
    if !have_clients() {
        return;
    }
    let pki = TestPki::new();
    let Some(mut up) = MosquittoUpstream::start(&pki).await else {
        return;
    };
    let (addr, ca) = (up.addr(), up.ca_file().to_path_buf());

    let mut sub = client("mosquitto_sub", addr, &ca, &pki, Some("subscriber"));
    sub.args([
        "-t",
        "sites/#",
        "-C",
        "1",
        "-W",
        "20",
        "-q",
        "1",
        "-v",
        "-i",
        "smoke-live",
    ]);
    let sub = tokio::spawn(output(sub));
    // use_identity_as_username: the certificate's CN is the username.
    up.wait_for_log(&["as smoke-live", "u'subscriber'"]).await;
    up.wait_for_log(&["Sending SUBACK to smoke-live"]).await;
    let mut publ = client("mosquitto_pub", addr, &ca, &pki, Some("publisher"));
    publ.args(["-t", "sites/edge-1/a", "-m", "hola", "-q", "1"]);
    let out = output(publ).await;
    assert!(out.status.success(), "mosquitto_pub: {}", text(&out));
    let out = sub.await.unwrap();
    assert!(out.status.success(), "mosquitto_sub: {}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sites/edge-1/a hola"
    );

    for program in ["mosquitto_pub", "mosquitto_sub"] {
        let mut cmd = client(program, addr, &ca, &pki, None);
        cmd.args(["-t", "sites/x"]);
        if program == "mosquitto_sub" {
            cmd.args(["-C", "1", "-W", "5"]);
        } else {
            cmd.args(["-m", "sin certificado"]);
        }
        let out = output(cmd).await;
        assert!(
            !out.status.success(),
            "{program} without a certificate: {}",
            text(&out)
        );
    }
    up.wait_for_log(&["peer did not return a certificate"])
        .await;
    assert!(up.log_file().is_file());

    // A persistent session: subscribed, offline, a message queued, restart, delivered.
    let session = |extra: &[&str]| {
        let mut cmd = client("mosquitto_sub", addr, &ca, &pki, Some("subscriber"));
        cmd.args([
            "-t",
            "sites/#",
            "-q",
            "1",
            "-c",
            "-i",
            "smoke-persistent",
            "-v",
        ])
        .args(extra);
        cmd
    };
    let out = output(session(&["-E"])).await;
    assert!(out.status.success(), "subscribe: {}", text(&out));
    let mut publ = client("mosquitto_pub", addr, &ca, &pki, Some("publisher"));
    publ.args(["-t", "sites/edge-1/b", "-m", "guardado", "-q", "1"]);
    let out = output(publ).await;
    assert!(out.status.success(), "mosquitto_pub: {}", text(&out));
    up.restart().await;
    assert_eq!(up.addr(), addr);
    let out = output(session(&["-C", "1", "-W", "20"])).await;
    assert!(out.status.success(), "after restart: {}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sites/edge-1/b guardado"
    );
    up.kill();
    assert!(!up.is_running());
}

#[tokio::test]
async fn nats_cluster_delivers_qos1_across_nodes_and_survives_losing_a_third_node() {
    if !have_clients() {
        return;
    }
    let pki = TestPki::new();
    let Some(mut nats) = NatsCluster::start(&pki).await else {
        return;
    };
    let (a, b, c) = (0, 1, 2);
    let ca = nats.ca_file().to_path_buf();
    let (addr_a, addr_b) = (nats.mqtt_addr(a), nats.mqtt_addr(b));
    let topic = "sites/edge-1/articulos/futbol";
    // MQTT 3.1.1 is mosquitto's default; persistent session, QoS 1.
    let session = |extra: &[&str]| {
        let mut cmd = client("mosquitto_sub", addr_b, &ca, &pki, Some("subscriber"));
        cmd.args([
            "-t",
            "sites/+/articulos/#",
            "-q",
            "1",
            "-c",
            "-i",
            "smoke-nats-sub",
        ])
        .args(extra);
        cmd
    };
    let out = output(session(&["-E"])).await;
    assert!(out.status.success(), "subscribe on B: {}", text(&out));

    // Publishes `payload` at QoS 1 on A until it is acknowledged; the number of tries.
    let publish = |payload: String| {
        let mut cmd = client("mosquitto_pub", addr_a, &ca, &pki, Some("publisher"));
        cmd.args(["-t", topic, "-q", "1", "-m", &payload]);
        cmd
    };
    async fn until_acked(make: impl Fn() -> Command) -> u32 {
        let deadline = Instant::now() + READY;
        let mut tries = 0;
        loop {
            tries += 1;
            let out = output(make()).await;
            if out.status.success() {
                return tries;
            }
            assert!(
                Instant::now() < deadline,
                "never acknowledged: {}",
                text(&out)
            );
            tokio::time::sleep(POLL).await;
        }
    }
    // MQTT 3.1.1 only, QoS 0 and 1 only.
    for extra in [&["-V", "mqttv5", "-q", "1"][..], &["-q", "2"][..]] {
        let mut cmd = client("mosquitto_pub", addr_a, &ca, &pki, Some("publisher"));
        cmd.args(["-t", "sites/edge-1/refused", "-m", "x"])
            .args(extra);
        let out = output(cmd).await;
        assert!(!out.status.success(), "{extra:?} accepted: {}", text(&out));
    }
    assert!(nats.log(a).contains("publish QoS=2 not supported"));

    const EACH: usize = 5;
    for i in 0..EACH {
        until_acked(|| publish(format!("before-{i}"))).await;
    }
    let out = output(session(&["-C", &EACH.to_string(), "-W", "20"])).await;
    assert!(out.status.success(), "on B: {}", text(&out));
    let got = String::from_utf8_lossy(&out.stdout).to_string();
    let expected: Vec<String> = (0..EACH).map(|i| format!("before-{i}")).collect();
    assert_eq!(
        got.lines().collect::<Vec<_>>(),
        expected,
        "in order, once each"
    );

    let leader = nats.meta_leader().await.unwrap_or_default();
    let killed_at = Instant::now();
    nats.kill(c);
    let mut tries = Vec::new();
    for i in 0..EACH {
        tries.push(until_acked(|| publish(format!("after-{i}"))).await);
    }
    eprintln!(
        "node C (n2) killed (meta leader was {leader}); {EACH} publishes on A acknowledged \
         {:?} after the kill, tries {tries:?}",
        killed_at.elapsed()
    );
    let out = output(session(&["-C", &EACH.to_string(), "-W", "30"])).await;
    assert!(out.status.success(), "on B after C died: {}", text(&out));
    let got = String::from_utf8_lossy(&out.stdout).to_string();
    for i in 0..EACH {
        assert!(
            got.lines().any(|l| l == format!("after-{i}")),
            "after-{i} missing: {got}"
        );
    }
    nats.wait_ready().await;
    let restarted_at = Instant::now();
    nats.restart(c).await;
    eprintln!("node C back in the cluster in {:?}", restarted_at.elapsed());
}
