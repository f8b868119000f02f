//! Nothing acknowledged is lost: persistent sessions' queues, in-flight messages and
//! QoS 2 state survive SIGKILL of the real broker process; a full queue drops by its
//! policy and says so; a client that stops reading is disconnected rather than holding
//! its publishers back for ever; a store that cannot be written acknowledges nothing.

use crate::common::*;
use crate::persistence::{start, Proc};
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use std::path::Path;

pub(crate) const TOPIC: &str = "articulos/+/futbol";

/// A 3.1.1 persistent session (clean session 0) with `name`'s certificate.
pub(crate) async fn persistent(
    broker: &Proc,
    dir: &Path,
    name: &str,
    id: &str,
) -> (TestClient, v4::ConnAck) {
    let mut c = broker.tls(dir, name).await;
    let ack = c.connect(id, false, 30).await;
    (c, ack)
}

/// A persistent subscriber `id` on `TOPIC` at `qos` that then leaves: what is
/// published meanwhile is queued for it.
pub(crate) async fn subscribe_and_leave(broker: &Proc, dir: &Path, id: &str, qos: QoS) {
    let (mut sub, _) = persistent(broker, dir, "subscriber", id).await;
    sub.subscribe(TOPIC, qos).await;
    sub.send(Packet::Disconnect).await;
    sub.expect_closed().await;
}

/// Sends `n` QoS 1 publishes at once (packet ids 1..=n), then waits for every PUBACK.
pub(crate) async fn publish_all(c: &mut TestClient, n: usize) {
    for i in 0..n {
        let mut p = v4::Publish::new(
            format!("articulos/d{}/futbol", i % 7),
            QoS::AtLeastOnce,
            format!("articulo {i}"),
        );
        p.pkid = (i + 1) as u16;
        c.send(Packet::Publish(p)).await;
    }
    for _ in 0..n {
        match c.recv().await {
            Packet::PubAck(_) => {}
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

/// Receives `n` publishes, acknowledging each; their payloads, and whether any came
/// marked DUP.
pub(crate) async fn receive_all(c: &mut TestClient, n: usize) -> (Vec<String>, bool) {
    let mut got = Vec::with_capacity(n);
    let mut dup = false;
    while got.len() < n {
        let p = c.next_publish().await;
        dup |= p.dup;
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    (got, dup)
}

pub(crate) fn articles(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("articulo {i}")).collect()
}

#[tokio::test]
async fn an_offline_persistent_subscriber_gets_every_acknowledged_message_after_sigkill() {
    const N: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    subscribe_and_leave(&broker, dir.path(), "keeper", QoS::AtLeastOnce).await;
    let mut publ = broker.tls(dir.path(), "publisher").await;
    publ.connect("writer", true, 30).await;
    publish_all(&mut publ, N).await;
    broker.kill9();

    let broker = start(dir.path());
    let restored = broker
        .before
        .iter()
        .find(|l| l.contains("retained messages restored"))
        .unwrap();
    assert!(restored.contains(&format!("queued={N}")), "{restored}");
    let (mut sub, ack) = persistent(&broker, dir.path(), "subscriber", "keeper").await;
    assert!(ack.session_present);
    let (got, dup) = receive_all(&mut sub, N).await;
    assert_eq!(got, articles(0..N), "every message, once, in order");
    assert!(!dup, "nothing was in flight: nothing is a resend");
    sub.expect_no_publish().await;
    broker.stop();
}

#[tokio::test]
async fn mqtt5_session_expiry_keeps_the_queue_across_sigkill() {
    const N: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let connect = |clean_start: bool| m5::Connect {
        keep_alive: 30,
        client_id: "keeper5".into(),
        clean_start,
        properties: Some(m5::ConnectProperties {
            session_expiry_interval: Some(3600),
            ..Default::default()
        }),
    };
    let mut sub = V5Client::over(broker.tls(dir.path(), "subscriber").await);
    sub.send(m5::Packet::Connect(connect(true), None, None))
        .await;
    assert!(matches!(sub.recv().await, m5::Packet::ConnAck(_)));
    sub.subscribe(m5::Filter::new(TOPIC, Q5::AtLeastOnce), None)
        .await;
    sub.disconnect(m5::DisconnectReasonCode::NormalDisconnection)
        .await;
    let mut publ = broker.tls(dir.path(), "publisher").await;
    publ.connect("writer5", true, 30).await;
    publish_all(&mut publ, N).await;
    broker.kill9();

    let broker = start(dir.path());
    let mut sub = V5Client::over(broker.tls(dir.path(), "subscriber").await);
    sub.send(m5::Packet::Connect(connect(false), None, None))
        .await;
    match sub.recv().await {
        m5::Packet::ConnAck(ack) => assert!(ack.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let mut got = Vec::new();
    while got.len() < N {
        let p = sub.next_publish().await;
        assert!(!p.dup);
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    assert_eq!(got, articles(0..N));
    sub.expect_no_publish().await;
    broker.stop();
}

#[tokio::test]
async fn unacknowledged_deliveries_are_resent_with_dup_in_order_after_sigkill() {
    const N: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let (mut sub, _) = persistent(&broker, dir.path(), "subscriber", "forgetful").await;
    sub.subscribe(TOPIC, QoS::AtLeastOnce).await;
    let mut publ = broker.tls(dir.path(), "publisher").await;
    publ.connect("writer", true, 30).await;
    publish_all(&mut publ, N).await;
    // Received, never acknowledged.
    let mut first = Vec::new();
    while first.len() < N {
        match sub.recv().await {
            Packet::Publish(p) => first.push(p.payload.to_vec()),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    broker.kill9();

    let broker = start(dir.path());
    let (mut sub, ack) = persistent(&broker, dir.path(), "subscriber", "forgetful").await;
    assert!(ack.session_present);
    let mut again = Vec::new();
    while again.len() < N {
        match sub.recv().await {
            Packet::Publish(p) => {
                assert!(p.dup, "a resend is marked DUP");
                sub.send(Packet::PubAck(v4::PubAck::new(p.pkid))).await;
                again.push(p.payload.to_vec());
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    // QoS 1 resends after a crash may carry new packet ids (only QoS 2's are stored).
    assert_eq!(again, first, "the same messages, in the same order");
    sub.expect_no_publish().await;
    broker.stop();
}

/// One QoS 2 step of a raw 3.1.1 client, answered by the broker.
pub(crate) async fn expect(c: &mut TestClient, what: &str, pkid: u16) {
    let got = c.recv().await;
    let ok = match (&got, what) {
        (Packet::PubRec(a), "PUBREC") => a.pkid == pkid,
        (Packet::PubComp(a), "PUBCOMP") => a.pkid == pkid,
        (Packet::PubRel(a), "PUBREL") => a.pkid == pkid,
        _ => false,
    };
    assert!(ok, "expected {what} {pkid}, got {got:?}");
}

pub(crate) fn qos2(payload: &str, pkid: u16, dup: bool) -> Packet {
    let mut p = v4::Publish::new("articulos/q2/futbol", QoS::ExactlyOnce, payload.to_string());
    p.pkid = pkid;
    p.dup = dup;
    Packet::Publish(p)
}

#[tokio::test]
async fn qos2_is_exactly_once_inbound_across_sigkill_at_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    subscribe_and_leave(&broker, dir.path(), "q2-reader", QoS::ExactlyOnce).await;

    // Killed after PUBREC: the resent PUBLISH is recognised, not routed again.
    let (mut publ, _) = persistent(&broker, dir.path(), "publisher", "q2-writer").await;
    publ.send(qos2("uno", 7, false)).await;
    expect(&mut publ, "PUBREC", 7).await;
    broker.kill9();
    let broker = start(dir.path());
    let (mut publ, ack) = persistent(&broker, dir.path(), "publisher", "q2-writer").await;
    assert!(ack.session_present);
    publ.send(qos2("uno", 7, true)).await;
    expect(&mut publ, "PUBREC", 7).await;
    publ.send(Packet::PubRel(v4::PubRel::new(7))).await;
    expect(&mut publ, "PUBCOMP", 7).await;

    // Killed after PUBCOMP: the packet id is free again, for a new message.
    publ.send(qos2("dos", 8, false)).await;
    expect(&mut publ, "PUBREC", 8).await;
    publ.send(Packet::PubRel(v4::PubRel::new(8))).await;
    expect(&mut publ, "PUBCOMP", 8).await;
    broker.kill9();
    let broker = start(dir.path());
    let (mut publ, _) = persistent(&broker, dir.path(), "publisher", "q2-writer").await;
    publ.send(qos2("tres", 7, false)).await;
    expect(&mut publ, "PUBREC", 7).await;
    publ.send(Packet::PubRel(v4::PubRel::new(7))).await;
    expect(&mut publ, "PUBCOMP", 7).await;

    let (mut sub, _) = persistent(&broker, dir.path(), "subscriber", "q2-reader").await;
    // All three come at once (the window allows it); then each handshake.
    let mut got = Vec::new();
    while got.len() < 3 {
        match sub.recv().await {
            Packet::Publish(p) => {
                got.push((p.pkid, String::from_utf8(p.payload.to_vec()).unwrap()))
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    for (pkid, _) in &got {
        sub.send(Packet::PubRec(v4::PubRec::new(*pkid))).await;
        expect(&mut sub, "PUBREL", *pkid).await;
        sub.send(Packet::PubComp(v4::PubComp::new(*pkid))).await;
    }
    let payloads: Vec<&str> = got.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(payloads, ["uno", "dos", "tres"]);
    sub.expect_no_publish().await;
    broker.stop();
}

#[tokio::test]
async fn qos2_is_exactly_once_outbound_across_sigkill_at_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let (mut sub, _) = persistent(&broker, dir.path(), "subscriber", "q2-out").await;
    sub.subscribe(TOPIC, QoS::ExactlyOnce).await;
    let mut publ = broker.tls(dir.path(), "publisher").await;
    publ.connect("q2-source", true, 30).await;
    publ.publish("articulos/q2/futbol", b"una vez", QoS::ExactlyOnce, false)
        .await;
    let pkid = match sub.recv().await {
        Packet::Publish(p) => {
            assert_eq!(p.qos, QoS::ExactlyOnce);
            p.pkid
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    // Killed before our PUBREC: the same PUBLISH again, same packet id, DUP.
    broker.kill9();
    let broker = start(dir.path());
    let (mut sub, _) = persistent(&broker, dir.path(), "subscriber", "q2-out").await;
    match sub.recv().await {
        Packet::Publish(p) => assert_eq!(
            (p.pkid, p.dup, &p.payload[..]),
            (pkid, true, &b"una vez"[..])
        ),
        other => panic!("expected the PUBLISH again, got {other:?}"),
    }
    sub.send(Packet::PubRec(v4::PubRec::new(pkid))).await;
    expect(&mut sub, "PUBREL", pkid).await;
    // Killed after PUBREL: the PUBREL resumes, not the PUBLISH.
    broker.kill9();
    let broker = start(dir.path());
    let (mut sub, _) = persistent(&broker, dir.path(), "subscriber", "q2-out").await;
    expect(&mut sub, "PUBREL", pkid).await;
    sub.send(Packet::PubComp(v4::PubComp::new(pkid))).await;
    sub.expect_no_publish().await;
    // Killed after PUBCOMP: never the PUBLISH again. A PUBREL may come once more if
    // the completion was not yet on disk (MQTT: answered with PUBCOMP, harmless).
    broker.kill9();
    let broker = start(dir.path());
    let (mut sub, _) = persistent(&broker, dir.path(), "subscriber", "q2-out").await;
    sub.send(Packet::PingReq).await;
    match sub.recv().await {
        Packet::PingResp => {}
        Packet::PubRel(r) if r.pkid == pkid => {
            sub.send(Packet::PubComp(v4::PubComp::new(pkid))).await;
            assert!(matches!(sub.recv().await, Packet::PingResp));
        }
        other => panic!("expected nothing but PINGRESP, got {other:?}"),
    }
    sub.expect_no_publish().await;
    broker.stop();
}

#[tokio::test]
async fn a_full_queue_drops_by_its_policy_and_counts_it() {
    for (policy, kept) in [
        (broker::QueueFull::DropNew, 0..5),
        (broker::QueueFull::DropOldest, 5..10),
    ] {
        let broker = TestBroker::start_with(|c| {
            c.session.max_queued = 5;
            c.session.queue_full = policy;
        })
        .await;
        let metrics = broker.handle.as_ref().unwrap().metrics_addr().unwrap();
        let id = format!("full-{policy:?}");
        let mut sub = broker
            .tls(Some(&broker.pki.client("subscriber")))
            .await
            .unwrap();
        sub.connect(&id, false, 30).await;
        sub.subscribe(TOPIC, QoS::AtLeastOnce).await;
        sub.send(Packet::Disconnect).await;
        sub.expect_closed().await;
        let mut publ = broker.client("publisher", &format!("{id}-pub")).await;
        for i in 0..10 {
            let payload = format!("articulo {i}");
            publ.publish(
                "articulos/x/futbol",
                payload.as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
        }
        wait_for_log(&["session queue full", &format!("client_id={id}")]).await;
        let mut sub = broker
            .tls(Some(&broker.pki.client("subscriber")))
            .await
            .unwrap();
        assert!(sub.connect(&id, false, 30).await.session_present);
        let (got, _) = receive_all(&mut sub, 5).await;
        assert_eq!(got, articles(kept), "{policy:?}");
        sub.expect_no_publish().await;
        let body = scrape(metrics).await;
        assert_eq!(value(&body, "broker_dropped_messages_total"), 5.0, "{body}");
        broker.shutdown().await;
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_while_the_others_carry_on() {
    const N: usize = 200;
    let broker = TestBroker::start_with(|c| {
        c.session.max_queued = 20;
        c.session.max_inflight = 5;
        c.session.slow_consumer_secs = 1;
    })
    .await;
    let metrics = broker.handle.as_ref().unwrap().metrics_addr().unwrap();
    // Never acknowledges anything.
    let mut slow = broker.client("subscriber", "slow").await;
    slow.subscribe(TOPIC, QoS::AtLeastOnce).await;
    let mut fast = broker.client("subscriber", "fast").await;
    fast.subscribe(TOPIC, QoS::AtLeastOnce).await;
    let mut publ = broker.client("publisher", "steady").await;
    let reader = tokio::spawn(async move {
        let (got, _) = receive_all(&mut fast, N).await;
        got
    });
    for i in 0..N {
        let payload = format!("articulo {i}");
        publ.publish(
            "articulos/x/futbol",
            payload.as_bytes(),
            QoS::AtLeastOnce,
            false,
        )
        .await;
    }
    assert_eq!(
        reader.await.unwrap(),
        articles(0..N),
        "the fast one got all"
    );
    let line = wait_for_log(&["slow consumer", "client_id=slow"]).await;
    assert!(
        line.contains("WARN") && line.contains("identity=subscriber"),
        "{line}"
    );
    slow.expect_closed().await;
    let body = scrape(metrics).await;
    assert_eq!(
        value(
            &body,
            r#"broker_disconnections_total{reason="slow_consumer"}"#
        ),
        1.0,
        "{body}"
    );
    assert!(
        value(&body, "broker_dropped_messages_total") > 0.0,
        "{body}"
    );
    broker.shutdown().await;
}

/// A tmpfs of `size` mounted on `path` for the test's life (needs root, as in CI).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test fills a small disk, and needs root"
        );
        Self(path.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_acknowledges_nothing_and_names_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let disk = SmallDisk::mount(&data, "4m");
    crate::process::write_config(dir.path());
    let broker = start(dir.path());
    subscribe_and_leave(&broker, dir.path(), "hoarder", QoS::AtLeastOnce).await;
    let mut publ = broker.tls(dir.path(), "publisher").await;
    publ.connect("filler", true, 30).await;
    let payload = vec![b'x'; 100_000];
    let mut acked = 0;
    let refused = loop {
        assert!(acked < 200, "200 x 100 kB acknowledged on a 4 MB disk");
        let mut p = v4::Publish::new("articulos/lleno/futbol", QoS::AtLeastOnce, payload.clone());
        p.pkid = (acked % 60_000 + 1) as u16;
        publ.send(Packet::Publish(p)).await;
        match publ.try_recv().await {
            Some(Packet::PubAck(_)) => acked += 1,
            None => break acked,
            Some(other) => panic!("expected PUBACK or a close, got {other:?}"),
        }
    };
    assert!(refused > 0, "nothing was stored at all");
    let line = broker.wait_for_line(&["ERROR", &data.display().to_string()]);
    assert!(line.contains("client_id=filler"), "{line}");
    // Everyone else is still served.
    let mut other = broker.tls(dir.path(), "subscriber").await;
    other.connect("bystander", true, 30).await;
    other.expect_no_publish().await;
    broker.kill9();
    drop(disk);
}

#[tokio::test]
async fn a_delayed_will_survives_sigkill_and_goes_out_when_due() {
    const WILL: &str = "articulos/testamento/futbol";
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    // A persistent watcher, away: the will is queued for it whenever it goes out.
    let (mut watcher, _) = persistent(&broker, dir.path(), "subscriber", "will-watcher").await;
    watcher.subscribe(WILL, QoS::AtLeastOnce).await;
    watcher.send(Packet::Disconnect).await;
    let mut gone = V5Client::over(broker.tls(dir.path(), "publisher").await);
    let connect = m5::Connect {
        keep_alive: 30,
        client_id: "testador".into(),
        clean_start: true,
        properties: Some(m5::ConnectProperties {
            session_expiry_interval: Some(600),
            ..Default::default()
        }),
    };
    let will = delayed_will(WILL, "adiós", 3);
    gone.send(m5::Packet::Connect(connect, Some(will), None))
        .await;
    assert!(matches!(gone.recv().await, m5::Packet::ConnAck(_)));
    // The connection drops without DISCONNECT: the will is scheduled, and durable.
    drop(gone);
    broker.wait_for_line(&["will delayed", "client_id=testador"]);
    let killed_at = std::time::Instant::now();
    broker.kill9();

    let broker = start(dir.path());
    broker.wait_for_line(&["will published", "client_id=testador"]);
    let (mut watcher, _) = persistent(&broker, dir.path(), "subscriber", "will-watcher").await;
    let p = watcher.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        (WILL, "adiós".as_bytes())
    );
    assert!(
        killed_at.elapsed() >= std::time::Duration::from_secs(2),
        "the will waited for its delay"
    );
    broker.stop();
}
