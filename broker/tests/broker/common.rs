//! Test harness: a temporary PKI, the broker in-process on 127.0.0.1:0, captured logs,
//! and a raw MQTT 3.1.1 client over real TLS.

use broker::pki::{self, Authority, Issued, LeafSpec};
use broker::Config;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub const WAIT: Duration = Duration::from_secs(10);

/// A PKI in a temporary folder, created the way `broker certs` creates it.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub layout: pki::Layout,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let layout = pki::Layout::in_dir(dir.path());
        let request = pki::Request {
            extra_clients: vec!["observer".into()],
            ..Default::default()
        };
        pki::ensure(&layout, &request).unwrap();
        Self { dir, layout }
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.layout.ca_cert).unwrap()
    }

    pub fn client(&self, name: &str) -> Issued {
        Issued {
            cert_pem: std::fs::read_to_string(self.layout.client_cert(name)).unwrap(),
            key_pem: std::fs::read_to_string(self.layout.client_key(name)).unwrap(),
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A certificate for `name` signed by this PKI's CA with the given validity.
    pub fn issue(&self, spec: &LeafSpec) -> Issued {
        Authority::load(&self.layout.ca_cert, &self.layout.ca_key)
            .unwrap()
            .issue(spec)
            .unwrap()
    }

    pub fn config(&self) -> Config {
        let mut config = Config::default();
        config.listener.bind = "127.0.0.1:0".parse().unwrap();
        config.tls.ca_file = self.layout.ca_cert.clone();
        config.tls.cert_file = self.layout.server_cert.clone();
        config.tls.key_file = self.layout.server_key.clone();
        config.tls.auto_generate = false;
        config.storage.data_dir = self.dir.path().join("data");
        config.log.dir = PathBuf::new();
        config.metrics.bind = "127.0.0.1:0".into();
        config.tls.crl_file = Some(self.dir.path().join("crl.pem"));
        config
    }
}

/// A running broker and the PKI it trusts.
pub struct TestBroker {
    pub pki: TestPki,
    pub addr: SocketAddr,
    pub handle: Option<broker::Handle>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        capture_logs();
        let pki = TestPki::new();
        let mut config = pki.config();
        tweak(&mut config);
        let handle = broker::start(config).await.unwrap();
        Self {
            addr: handle.local_addr(),
            pki,
            handle: Some(handle),
        }
    }

    /// A broker configured from a `broker.toml` written in the PKI folder, with `extra`
    /// TOML appended (ACL rules); returns the file's path too, for reload tests.
    pub async fn start_from_file(extra: &str) -> (Self, PathBuf) {
        capture_logs();
        let pki = TestPki::new();
        let path = pki.path("broker.toml");
        std::fs::write(&path, config_text(&pki, extra)).unwrap();
        let config = Config::load(&path).unwrap();
        let handle = broker::start(config).await.unwrap();
        let broker = Self {
            addr: handle.local_addr(),
            pki,
            handle: Some(handle),
        };
        (broker, path)
    }

    /// Connects with `name`'s certificate and an accepted CONNECT.
    pub async fn client(&self, name: &str, client_id: &str) -> TestClient {
        let mut c = self.tls(Some(&self.pki.client(name))).await.unwrap();
        c.connect(client_id, true, 30).await;
        c
    }

    /// A TLS connection (handshake done, nothing sent) with an optional certificate.
    pub async fn tls(&self, cert: Option<&Issued>) -> std::io::Result<TestClient> {
        TestClient::tls(self.addr, &self.pki.ca_pem(), cert).await
    }

    /// Stops the broker and starts a new one on the same PKI and data folder.
    pub async fn restart(mut self) -> Self {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
        let handle = broker::start(self.pki.config()).await.unwrap();
        Self {
            addr: handle.local_addr(),
            pki: self.pki,
            handle: Some(handle),
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

/// A configuration file for `pki` with `extra` appended.
pub fn config_text(pki: &TestPki, extra: &str) -> String {
    format!(
        "[listener]\nbind = \"127.0.0.1:0\"\n[tls]\nca_file = \"ca.crt\"\ncert_file = \"broker.crt\"\nkey_file = \"broker.key\"\nauto_generate = false\n[storage]\ndata_dir = \"{}\"\n[log]\ndir = \"\"\n{extra}\n{}",
        pki.path("data").display(),
        if extra.contains("[metrics]") {
            ""
        } else {
            "[metrics]\nbind = \"127.0.0.1:0\"\n"
        }
    )
}

/// The `[[acl]]` rules of the shipped broker.toml.
pub fn shipped_acl() -> Vec<broker::AclRule> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker.toml");
    Config::load(&path).unwrap().acl
}

/// A minimal MQTT 3.1.1 client that shows exactly what the broker sends.
pub struct TestClient {
    pub stream: TlsStream<TcpStream>,
    buf: BytesMut,
    pub local: SocketAddr,
    next_pkid: u16,
}

pub fn client_tls_config(ca_pem: &str, cert: Option<&Issued>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match cert {
        Some(issued) => {
            let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

impl TestClient {
    pub async fn tls(
        addr: SocketAddr,
        ca_pem: &str,
        cert: Option<&Issued>,
    ) -> std::io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        let local = tcp.local_addr()?;
        let connector = TlsConnector::from(client_tls_config(ca_pem, cert));
        let name = ServerName::try_from("localhost").unwrap();
        let stream = connector.connect(name, tcp).await?;
        Ok(Self {
            stream,
            buf: BytesMut::new(),
            local,
            next_pkid: 0,
        })
    }

    pub async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).unwrap();
        self.send_raw(&out).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next packet, or None when the broker closed the connection.
    pub async fn try_recv(&mut self) -> Option<Packet> {
        loop {
            match Packet::read(&mut self.buf, usize::MAX) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("broker sent a malformed packet: {e}"),
            }
            match tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => panic!("nothing from the broker within {WAIT:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    pub async fn recv(&mut self) -> Packet {
        self.try_recv()
            .await
            .expect("connection closed by the broker")
    }

    /// Asserts the broker closes the connection (anything sent before is skipped).
    pub async fn expect_closed(&mut self) {
        while self.try_recv().await.is_some() {}
    }

    /// An MQTT 5 CONNECT; the CONNACK's first two bytes read the same as 3.1.1's.
    pub async fn connect_v5(&mut self, client_id: &str) -> v4::ConnAck {
        use rumqttc::v5::mqttbytes::v5 as m5;
        let connect = m5::Connect {
            keep_alive: 30,
            client_id: client_id.into(),
            clean_start: true,
            properties: None,
        };
        let mut out = BytesMut::new();
        m5::Packet::Connect(connect, None, None)
            .write(&mut out, None)
            .unwrap();
        self.send_raw(&out).await;
        match self.recv().await {
            Packet::ConnAck(ack) => ack,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// An MQTT 5 PUBLISH at QoS 1 with `properties`, waiting for its PUBACK.
    pub async fn publish_v5(
        &mut self,
        topic: &str,
        payload: &[u8],
        retain: bool,
        properties: rumqttc::v5::mqttbytes::v5::PublishProperties,
    ) {
        use rumqttc::v5::mqttbytes::v5 as m5;
        let pkid = self.pkid();
        let mut publish = m5::Publish::new(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            payload.to_vec(),
            Some(properties),
        );
        publish.retain = retain;
        publish.pkid = pkid;
        let mut out = BytesMut::new();
        m5::Packet::Publish(publish).write(&mut out, None).unwrap();
        self.send_raw(&out).await;
        match self.recv().await {
            Packet::PubAck(a) if a.pkid == pkid => {}
            other => panic!("expected PUBACK {pkid}, got {other:?}"),
        }
    }

    /// The serial of the certificate the broker presented.
    pub fn server_serial(&self) -> Vec<u8> {
        let certs = self.stream.get_ref().1.peer_certificates().unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&certs[0]).unwrap();
        cert.raw_serial().to_vec()
    }

    pub async fn connect(&mut self, client_id: &str, clean: bool, keep_alive: u16) -> v4::ConnAck {
        let mut connect = v4::Connect::new(client_id);
        connect.clean_session = clean;
        connect.keep_alive = keep_alive;
        self.send(Packet::Connect(connect)).await;
        match self.recv().await {
            Packet::ConnAck(ack) => ack,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid % 60000 + 1;
        self.next_pkid
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<v4::SubscribeReasonCode> {
        let mut sub = v4::Subscribe::new(filter, qos);
        sub.pkid = self.pkid();
        self.send(Packet::Subscribe(sub)).await;
        match self.recv().await {
            Packet::SubAck(ack) => ack.return_codes,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes; at QoS 1 waits for the PUBACK, at QoS 2 completes the exchange.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool) {
        let mut p = v4::Publish::new(topic, qos, payload.to_vec());
        p.retain = retain;
        if qos != QoS::AtMostOnce {
            p.pkid = self.pkid();
        }
        let pkid = p.pkid;
        self.send(Packet::Publish(p)).await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => match self.recv().await {
                Packet::PubAck(a) if a.pkid == pkid => {}
                other => panic!("expected PUBACK {pkid}, got {other:?}"),
            },
            QoS::ExactlyOnce => {
                match self.recv().await {
                    Packet::PubRec(a) if a.pkid == pkid => {}
                    other => panic!("expected PUBREC {pkid}, got {other:?}"),
                }
                self.send(Packet::PubRel(v4::PubRel::new(pkid))).await;
                match self.recv().await {
                    Packet::PubComp(a) if a.pkid == pkid => {}
                    other => panic!("expected PUBCOMP {pkid}, got {other:?}"),
                }
            }
        }
    }

    /// The next PUBLISH, acknowledging it as the QoS requires.
    pub async fn next_publish(&mut self) -> v4::Publish {
        loop {
            match self.recv().await {
                Packet::Publish(p) => {
                    match p.qos {
                        QoS::AtLeastOnce => {
                            self.send(Packet::PubAck(v4::PubAck::new(p.pkid))).await
                        }
                        QoS::ExactlyOnce => {
                            self.send(Packet::PubRec(v4::PubRec::new(p.pkid))).await;
                            match self.recv().await {
                                Packet::PubRel(_) => {}
                                other => panic!("expected PUBREL, got {other:?}"),
                            }
                            self.send(Packet::PubComp(v4::PubComp::new(p.pkid))).await;
                        }
                        QoS::AtMostOnce => {}
                    }
                    return p;
                }
                Packet::PingResp => continue,
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    /// Proves nothing else is pending: a PINGREQ is answered before any PUBLISH.
    pub async fn expect_no_publish(&mut self) {
        self.send(Packet::PingReq).await;
        match self.recv().await {
            Packet::PingResp => {}
            other => panic!("expected nothing but PINGRESP, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// An MQTT 5 client, as raw as the 3.1.1 one.

pub use rumqttc::v5::mqttbytes::v5 as m5;
pub use rumqttc::v5::mqttbytes::QoS as Q5;

/// An MQTT 5 QoS 1 will on `topic` published `delay_secs` after the connection is lost.
pub fn delayed_will(topic: &str, payload: &str, delay_secs: u32) -> m5::LastWill {
    let mut will = m5::LastWill::new(topic, payload.to_string(), Q5::AtLeastOnce, false, None);
    will.properties = Some(m5::LastWillProperties {
        delay_interval: Some(delay_secs),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    });
    will
}

pub struct V5Client {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
    next_pkid: u16,
}

impl V5Client {
    pub async fn tls(broker: &TestBroker, name: &str) -> Self {
        let c = broker.tls(Some(&broker.pki.client(name))).await.unwrap();
        Self::over(c)
    }

    /// MQTT 5 over a TLS connection made with `TestClient::tls` (nothing sent yet).
    pub fn over(c: TestClient) -> Self {
        Self {
            stream: c.stream,
            buf: BytesMut::new(),
            next_pkid: 0,
        }
    }

    /// Connects with `name`'s certificate; `tweak` adjusts the CONNECT.
    pub async fn connect(
        broker: &TestBroker,
        name: &str,
        client_id: &str,
        tweak: impl FnOnce(&mut m5::Connect, &mut Option<m5::LastWill>),
    ) -> (Self, m5::ConnAck) {
        let mut c = Self::tls(broker, name).await;
        let mut connect = m5::Connect {
            keep_alive: 30,
            client_id: client_id.into(),
            clean_start: true,
            properties: None,
        };
        let mut will = None;
        tweak(&mut connect, &mut will);
        c.send(m5::Packet::Connect(connect, will, None)).await;
        match c.recv().await {
            m5::Packet::ConnAck(ack) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn send(&mut self, packet: m5::Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, None).unwrap();
        self.stream.write_all(&out).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    pub async fn try_recv(&mut self) -> Option<m5::Packet> {
        loop {
            // rumqttc refuses a DISCONNECT without a body, which MQTT 5 allows.
            if self.buf.len() >= 2 && self.buf[0] == 0xE0 && self.buf[1] == 0 {
                let _ = self.buf.split_to(2);
                return Some(m5::Packet::Disconnect(m5::Disconnect::new(
                    m5::DisconnectReasonCode::NormalDisconnection,
                )));
            }
            match m5::Packet::read(&mut self.buf, None) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("broker sent a malformed packet: {e}"),
            }
            match tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => panic!("nothing from the broker within {WAIT:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    pub async fn recv(&mut self) -> m5::Packet {
        self.try_recv()
            .await
            .expect("connection closed by the broker")
    }

    pub fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid % 60000 + 1;
        self.next_pkid
    }

    pub async fn subscribe(
        &mut self,
        filter: m5::Filter,
        id: Option<usize>,
    ) -> Vec<m5::SubscribeReasonCode> {
        let properties = id.map(|id| m5::SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        });
        let mut sub = m5::Subscribe::new(filter, properties);
        sub.pkid = self.pkid();
        self.send(m5::Packet::Subscribe(sub)).await;
        match self.recv().await {
            m5::Packet::SubAck(ack) => ack.return_codes,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes at `qos` and returns the PUBACK/PUBREC (None at QoS 0).
    pub async fn publish(&mut self, mut publish: m5::Publish) -> Option<m5::Packet> {
        if publish.qos != Q5::AtMostOnce {
            publish.pkid = self.pkid();
        }
        let qos = publish.qos;
        self.send(m5::Packet::Publish(publish)).await;
        match qos {
            Q5::AtMostOnce => None,
            _ => Some(self.recv().await),
        }
    }

    /// The next PUBLISH, acknowledged at QoS 1.
    pub async fn next_publish(&mut self) -> m5::Publish {
        loop {
            match self.recv().await {
                m5::Packet::Publish(p) => {
                    if p.qos == Q5::AtLeastOnce {
                        self.send(m5::Packet::PubAck(m5::PubAck::new(p.pkid, None)))
                            .await;
                    }
                    return p;
                }
                m5::Packet::PingResp(_) => continue,
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    /// Proves nothing else is pending: a PINGREQ is answered before any PUBLISH.
    pub async fn expect_no_publish(&mut self) {
        self.send(m5::Packet::PingReq(m5::PingReq)).await;
        match self.recv().await {
            m5::Packet::PingResp(_) => {}
            other => panic!("expected nothing but PINGRESP, got {other:?}"),
        }
    }

    pub async fn disconnect(mut self, reason: m5::DisconnectReasonCode) {
        self.send(m5::Packet::Disconnect(m5::Disconnect::new(reason)))
            .await;
        while self.try_recv().await.is_some() {}
    }
}

pub fn publish5(topic: &str, payload: &str, qos: Q5) -> m5::Publish {
    m5::Publish::new(topic, qos, payload.to_string(), None)
}

// ---------------------------------------------------------------------------
// Captured logs: one subscriber for the whole test binary; tests look for lines
// that carry their own client's address.

pub struct Captured {
    pub text: Mutex<String>,
    changed: Notify,
}

pub fn captured() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| Captured {
        text: Mutex::new(String::new()),
        changed: Notify::new(),
    })
}

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let logs = captured();
        logs.text
            .lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(data));
        logs.changed.notify_waiters();
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info,broker::session=debug,rumqttd=warn")
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

/// Waits for a log line containing every one of `parts`, and returns it.
pub async fn wait_for_log(parts: &[&str]) -> String {
    let logs = captured();
    let find = || {
        logs.text
            .lock()
            .unwrap()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
    };
    let result = tokio::time::timeout(WAIT, async {
        loop {
            let changed = logs.changed.notified();
            if let Some(line) = find() {
                return line;
            }
            changed.await;
        }
    })
    .await;
    result.unwrap_or_else(|_| {
        let text = logs.text.lock().unwrap();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        panic!("no log line containing {parts:?}; last lines: {tail:#?}")
    })
}

/// GET /metrics over a plain socket; the body.
pub async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of the sample line starting with `name` (labels included), or 0.
pub fn value(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
