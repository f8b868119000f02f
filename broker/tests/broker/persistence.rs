//! Retained messages in sled: durable before acknowledged, restored on start, and a
//! damaged store never keeps the broker down. The real binary, killed for real.

use crate::common::*;
use crate::process::{spawn_broker, write_config, Running, BIN};
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

pub struct Proc {
    child: Running,
    pub addr: SocketAddr,
    pub before: Vec<String>,
    /// Lines the broker logs after it started listening.
    pub lines: std::sync::mpsc::Receiver<String>,
    ca: String,
}

/// The broker binary on `dir` (its broker.toml, certs/ and data/).
pub fn start(dir: &Path) -> Proc {
    let config = dir.join("broker.toml");
    if !config.exists() {
        write_config(dir);
    }
    let (child, port, before, lines) = spawn_broker(&config);
    Proc {
        child,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        before,
        lines,
        ca: std::fs::read_to_string(dir.join("certs/ca.crt")).unwrap(),
    }
}

impl Proc {
    async fn client(&self, dir: &Path, name: &str, id: &str) -> TestClient {
        let mut c = self.tls(dir, name).await;
        c.connect(id, true, 30).await;
        c
    }

    /// A TLS connection with `name`'s certificate, nothing sent yet.
    pub async fn tls(&self, dir: &Path, name: &str) -> TestClient {
        let layout = broker::pki::Layout::in_dir(&dir.join("certs"));
        let cert = broker::pki::Issued {
            cert_pem: std::fs::read_to_string(layout.client_cert(name)).unwrap(),
            key_pem: std::fs::read_to_string(layout.client_key(name)).unwrap(),
        };
        TestClient::tls(self.addr, &self.ca, Some(&cert))
            .await
            .unwrap()
    }

    /// Waits for a line logged after start that contains every one of `parts`.
    pub fn wait_for_line(&self, parts: &[&str]) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if parts.iter().all(|p| line.contains(p)) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!("no line with {parts:?}; saw {seen:#?}"),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    pub fn kill9(mut self) {
        self.child.0.kill().unwrap();
        self.child.0.wait().unwrap();
    }

    pub fn stop(mut self) {
        let pid = self.child.0.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        assert!(self.child.0.wait().unwrap().success());
    }
}

/// Subscribes to `articulos/#` and collects the retained messages sent on subscribe.
/// Each PINGREQ round ends when its PINGRESP arrives; messages held back by the
/// inflight window follow our PUBACKs, so a round that brings none means all came.
pub(crate) async fn retained_after_restart(c: &mut TestClient) -> HashMap<String, Vec<u8>> {
    c.subscribe("articulos/#", QoS::AtLeastOnce).await;
    let mut got = HashMap::new();
    loop {
        c.send(Packet::PingReq).await;
        let mut this_round = 0;
        loop {
            match c.recv().await {
                Packet::Publish(p) => {
                    assert!(p.retain, "{} arrived without the retain flag", p.topic);
                    if p.qos != QoS::AtMostOnce {
                        c.send(Packet::PubAck(v4::PubAck::new(p.pkid))).await;
                    }
                    got.insert(p.topic, p.payload.to_vec());
                    this_round += 1;
                }
                Packet::PingResp => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        if this_round == 0 {
            return got;
        }
    }
}

#[tokio::test]
async fn acknowledged_retained_messages_survive_sigkill() {
    const N: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let mut publ = broker.client(dir.path(), "publisher", "durable").await;
    publ.publish(
        "articulos/borrado/futbol",
        b"temporal",
        QoS::AtLeastOnce,
        true,
    )
    .await;
    publ.publish("articulos/borrado/futbol", b"", QoS::AtLeastOnce, true)
        .await;
    // All in flight at once, then every PUBACK.
    for i in 0..N {
        let mut p = v4::Publish::new(
            format!("articulos/d{i}/futbol"),
            QoS::AtLeastOnce,
            format!("articulo {i}"),
        );
        p.retain = true;
        p.pkid = (i + 1) as u16;
        publ.send(Packet::Publish(p)).await;
    }
    let mut acked = 0;
    while acked < N {
        match publ.recv().await {
            Packet::PubAck(_) => acked += 1,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    broker.kill9();

    let broker = start(dir.path());
    assert!(
        broker
            .before
            .iter()
            .any(|l| l.contains("retained messages restored")
                && l.contains(&format!("messages={N}"))),
        "{:?}",
        broker.before
    );
    let mut sub = broker.client(dir.path(), "subscriber", "after").await;
    let got = retained_after_restart(&mut sub).await;
    assert_eq!(got.len(), N, "retained messages after SIGKILL");
    for i in 0..N {
        assert_eq!(
            got[&format!("articulos/d{i}/futbol")],
            format!("articulo {i}").as_bytes()
        );
    }
    assert!(
        !got.contains_key("articulos/borrado/futbol"),
        "deleted message came back"
    );
    broker.stop();
}

#[tokio::test]
async fn expired_retained_message_is_not_restored() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let mut c = broker.client(dir.path(), "publisher", "unused").await;
    c.publish(
        "articulos/siempre/futbol",
        b"sin caducidad",
        QoS::AtLeastOnce,
        true,
    )
    .await;
    drop(c);
    let layout = broker::pki::Layout::in_dir(&dir.path().join("certs"));
    let cert = broker::pki::Issued {
        cert_pem: std::fs::read_to_string(layout.client_cert("publisher")).unwrap(),
        key_pem: std::fs::read_to_string(layout.client_key("publisher")).unwrap(),
    };
    let mut v5 = TestClient::tls(broker.addr, &broker.ca, Some(&cert))
        .await
        .unwrap();
    v5.connect_v5("v5-publisher").await;
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        message_expiry_interval: Some(2),
        ..Default::default()
    };
    v5.publish_v5("articulos/caduca/futbol", b"dos segundos", true, props)
        .await;
    broker.stop();
    // The passage of time is what is under test here.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    let broker = start(dir.path());
    let mut sub = broker.client(dir.path(), "subscriber", "s").await;
    let got = retained_after_restart(&mut sub).await;
    assert!(
        got.contains_key("articulos/siempre/futbol"),
        "the store was not restored"
    );
    assert!(
        !got.contains_key("articulos/caduca/futbol"),
        "expired message delivered"
    );
    broker.stop();
}

fn fill_store_with_garbage(dir: &Path) {
    let store = dir.join("data/retained");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join("conf"), b"\xde\xad garbage").unwrap();
    std::fs::write(store.join("db"), vec![0xA5u8; 8192]).unwrap();
}

#[tokio::test]
async fn damaged_store_is_quarantined_and_the_broker_serves() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    fill_store_with_garbage(dir.path());
    let broker = start(dir.path());
    let line = broker
        .before
        .iter()
        .find(|l| l.contains("ERROR") && l.contains("retained.corrupt-"))
        .unwrap_or_else(|| panic!("no quarantine line in {:?}", broker.before));
    assert!(line.contains("moved_to"), "{line}");
    let moved: Vec<_> = std::fs::read_dir(dir.path().join("data"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("retained.corrupt-")
        })
        .collect();
    assert_eq!(moved.len(), 1);
    let mut c = broker
        .client(dir.path(), "publisher", "after-quarantine")
        .await;
    c.publish("articulos/x/futbol", b"ok", QoS::AtLeastOnce, true)
        .await;
    broker.stop();
}

#[test]
fn damaged_store_with_fail_policy_stops_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    fill_store_with_garbage(dir.path());
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env("BROKER__STORAGE__ON_CORRUPTION", "fail")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&dir.path().join("data/retained").display().to_string()),
        "{stderr}"
    );
}
