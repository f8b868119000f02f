//! A restart takes a session's queue up at its edges: a QoS 2 message that expired in
//! flight, one completed while an older one was still in flight, a packet id freed by
//! PUBCOMP just before the crash, a session begun again with Clean Start, and the queue
//! of a session that stopped being persistent. The real binary, killed with SIGKILL.

use crate::common::*;
use crate::durability::{
    articles, expect, persistent, publish_all, qos2, receive_all, subscribe_and_leave, TOPIC,
};
use crate::persistence::{start, Proc};
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use std::path::Path;

/// An MQTT 5 connection with `name`'s certificate: CONNECT with `clean_start`,
/// session expiry `expiry` and Receive Maximum `receive_max`; its CONNACK.
async fn connect5(
    broker: &Proc,
    dir: &Path,
    name: &str,
    id: &str,
    clean_start: bool,
    expiry: u32,
    receive_max: Option<u16>,
) -> (V5Client, m5::ConnAck) {
    let mut c = V5Client::over(broker.tls(dir, name).await);
    let connect = m5::Connect {
        keep_alive: 30,
        client_id: id.into(),
        clean_start,
        properties: Some(m5::ConnectProperties {
            session_expiry_interval: Some(expiry),
            receive_maximum: receive_max,
            ..Default::default()
        }),
    };
    c.send(m5::Packet::Connect(connect, None, None)).await;
    match c.recv().await {
        m5::Packet::ConnAck(ack) => (c, ack),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// The PUBLISH packets that arrive before the PINGRESP to a PINGREQ sent now, without
/// acknowledging them: (payload, QoS, DUP).
async fn pending_publishes(c: &mut TestClient) -> Vec<(String, QoS, bool)> {
    c.send(Packet::PingReq).await;
    let mut got = Vec::new();
    loop {
        match c.recv().await {
            Packet::PingResp => return got,
            Packet::Publish(p) => {
                got.push((String::from_utf8(p.payload.to_vec()).unwrap(), p.qos, p.dup))
            }
            other => panic!("expected PUBLISH or PINGRESP, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_qos2_message_that_expired_in_flight_does_not_hold_up_the_queue_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let (mut sub, _) = persistent(&broker, dir.path(), "subscriber", "expiring").await;
    sub.subscribe(TOPIC, QoS::ExactlyOnce).await;
    let (mut publ, _) = connect5(&broker, dir.path(), "publisher", "expirer", true, 0, None).await;
    let mut short = publish5("articulos/e/futbol", "caduca", Q5::ExactlyOnce);
    short.properties = Some(m5::PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    });
    assert!(matches!(
        publ.publish(short).await,
        Some(m5::Packet::PubRec(_))
    ));
    // In flight to the subscriber (QoS 2, its packet id on disk), never answered.
    match sub.recv().await {
        Packet::Publish(p) => assert_eq!(&p.payload[..], b"caduca"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    let mut plain = broker.tls(dir.path(), "publisher").await;
    plain.connect("after", true, 30).await;
    plain
        .publish("articulos/e/futbol", b"despues", QoS::AtLeastOnce, false)
        .await;
    broker.kill9();
    // The message's one second of life runs out while the broker is down.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    let broker = start(dir.path());
    let (mut sub, ack) = persistent(&broker, dir.path(), "subscriber", "expiring").await;
    assert!(ack.session_present);
    let got: Vec<String> = pending_publishes(&mut sub)
        .await
        .into_iter()
        .map(|(payload, _, _)| payload)
        .collect();
    assert_eq!(
        got,
        ["despues"],
        "the expired message is dropped, the next one comes"
    );
    broker.kill9();
    // Nor does it come back after another crash.
    let broker = start(dir.path());
    let (mut sub, _) = persistent(&broker, dir.path(), "subscriber", "expiring").await;
    let again: Vec<String> = pending_publishes(&mut sub)
        .await
        .into_iter()
        .map(|(payload, _, _)| payload)
        .collect();
    assert_eq!(again, ["despues"], "only the unacknowledged one, resent");
    broker.stop();
}

#[tokio::test]
async fn a_qos2_message_completed_behind_an_older_one_in_flight_is_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    // A second persistent subscriber keeps every message in the store.
    let (mut other, _) = persistent(&broker, dir.path(), "subscriber", "q2-other").await;
    other.subscribe(TOPIC, QoS::ExactlyOnce).await;
    other.send(Packet::Disconnect).await;
    other.expect_closed().await;
    let (mut sub, _) = persistent(&broker, dir.path(), "subscriber", "q2-reader").await;
    sub.subscribe(TOPIC, QoS::ExactlyOnce).await;
    let mut publ = broker.tls(dir.path(), "publisher").await;
    publ.connect("q2-source", true, 30).await;
    let mut pkids = Vec::new();
    for payload in ["uno", "dos"] {
        publ.publish(
            "articulos/q2/futbol",
            payload.as_bytes(),
            QoS::ExactlyOnce,
            false,
        )
        .await;
        match sub.recv().await {
            Packet::Publish(p) => {
                assert_eq!(p.payload, payload.as_bytes());
                pkids.push(p.pkid);
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    // "dos" completes while "uno" is still in flight: the mark cannot move past it.
    sub.send(Packet::PubRec(v4::PubRec::new(pkids[1]))).await;
    expect(&mut sub, "PUBREL", pkids[1]).await;
    sub.send(Packet::PubComp(v4::PubComp::new(pkids[1]))).await;
    assert!(pending_publishes(&mut sub).await.is_empty());
    // Acknowledged after a flush of the store, which carries the completion too.
    publ.publish("articulos/q2/futbol", b"tres", QoS::AtLeastOnce, false)
        .await;
    assert!(matches!(sub.recv().await, Packet::Publish(_)));
    broker.kill9();

    let broker = start(dir.path());
    let (mut sub, _) = persistent(&broker, dir.path(), "subscriber", "q2-reader").await;
    let got = pending_publishes(&mut sub).await;
    let payloads: Vec<&str> = got.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(payloads, ["uno", "tres"], "never \"dos\" a second time");
    assert!(
        got.iter().all(|(_, _, dup)| *dup),
        "both may have arrived before"
    );
    // The other subscriber still gets all three.
    let (mut other, _) = persistent(&broker, dir.path(), "subscriber", "q2-other").await;
    let theirs: Vec<String> = pending_publishes(&mut other)
        .await
        .into_iter()
        .map(|(payload, _, _)| payload)
        .collect();
    assert_eq!(theirs, ["uno", "dos", "tres"]);
    broker.stop();
}

#[tokio::test]
async fn a_packet_id_freed_by_pubcomp_just_before_sigkill_carries_a_new_message() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    subscribe_and_leave(&broker, dir.path(), "q2-late", QoS::AtLeastOnce).await;
    let (mut publ, _) = persistent(&broker, dir.path(), "publisher", "q2-quick").await;
    publ.send(qos2("uno", 9, false)).await;
    expect(&mut publ, "PUBREC", 9).await;
    publ.send(Packet::PubRel(v4::PubRel::new(9))).await;
    expect(&mut publ, "PUBCOMP", 9).await;
    broker.kill9();

    let broker = start(dir.path());
    let (mut publ, _) = persistent(&broker, dir.path(), "publisher", "q2-quick").await;
    // A new message under the freed packet id: routed, not taken for a repeat.
    publ.send(qos2("dos", 9, false)).await;
    expect(&mut publ, "PUBREC", 9).await;
    publ.send(Packet::PubRel(v4::PubRel::new(9))).await;
    expect(&mut publ, "PUBCOMP", 9).await;
    let (mut sub, _) = persistent(&broker, dir.path(), "subscriber", "q2-late").await;
    let (got, _) = receive_all(&mut sub, 2).await;
    assert_eq!(got, ["uno", "dos"]);
    sub.expect_no_publish().await;
    broker.stop();
}

#[tokio::test]
async fn a_session_begun_again_with_clean_start_keeps_what_it_queues_after_sigkill() {
    const N: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let (mut sub, _) = connect5(&broker, dir.path(), "subscriber", "again", true, 3600, None).await;
    sub.subscribe(m5::Filter::new(TOPIC, Q5::AtLeastOnce), None)
        .await;
    let mut publ = broker.tls(dir.path(), "publisher").await;
    publ.connect("feeder", true, 30).await;
    // The first session's queue moves on: five delivered and acknowledged.
    publish_all(&mut publ, 5).await;
    for _ in 0..5 {
        sub.next_publish().await;
    }
    sub.expect_no_publish().await;
    sub.disconnect(m5::DisconnectReasonCode::NormalDisconnection)
        .await;
    // Begun again, persistent again, and offline while N are acknowledged for it.
    let (mut sub, ack) =
        connect5(&broker, dir.path(), "subscriber", "again", true, 3600, None).await;
    assert!(!ack.session_present);
    sub.subscribe(m5::Filter::new(TOPIC, Q5::AtLeastOnce), None)
        .await;
    sub.disconnect(m5::DisconnectReasonCode::NormalDisconnection)
        .await;
    publish_all(&mut publ, N).await;
    broker.kill9();

    let broker = start(dir.path());
    let (mut sub, ack) = connect5(
        &broker,
        dir.path(),
        "subscriber",
        "again",
        false,
        3600,
        None,
    )
    .await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    while got.len() < N {
        got.push(String::from_utf8(sub.next_publish().await.payload.to_vec()).unwrap());
    }
    assert_eq!(got, articles(0..N));
    sub.expect_no_publish().await;
    broker.stop();
}

#[tokio::test]
async fn the_queue_of_a_session_that_stopped_being_persistent_is_deleted_at_restart() {
    const N: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let (mut sub, _) = connect5(
        &broker,
        dir.path(),
        "subscriber",
        "leaver",
        true,
        3600,
        None,
    )
    .await;
    sub.subscribe(m5::Filter::new(TOPIC, Q5::AtLeastOnce), None)
        .await;
    sub.disconnect(m5::DisconnectReasonCode::NormalDisconnection)
        .await;
    let mut publ = broker.tls(dir.path(), "publisher").await;
    publ.connect("filler", true, 30).await;
    publish_all(&mut publ, N).await;
    // Back with session expiry 0: the session is no longer saved, its queue still
    // on disk while the client reads it, one at a time, and acknowledges none.
    let (mut sub, ack) = connect5(
        &broker,
        dir.path(),
        "subscriber",
        "leaver",
        false,
        0,
        Some(1),
    )
    .await;
    assert!(ack.session_present);
    assert!(matches!(sub.recv().await, m5::Packet::Publish(_)));
    // A flush of the store (a retained QoS 1 message) after the record's removal.
    publ.publish("articulos/otro/tema", b"flush", QoS::AtLeastOnce, true)
        .await;
    broker.kill9();

    let broker = start(dir.path());
    let deleted = broker
        .before
        .iter()
        .find(|l| l.contains("queues of sessions no longer saved deleted"))
        .unwrap_or_else(|| panic!("no deletion logged: {:#?}", broker.before));
    assert!(deleted.contains("WARN"), "{deleted}");
    assert!(deleted.contains(&format!("messages={N}")), "{deleted}");
    broker.stop();
    // Nothing of it is left to delete (a crash before the deletion reached the disk
    // would only have it done again).
    let broker = start(dir.path());
    assert!(!broker
        .before
        .iter()
        .any(|l| l.contains("queues of sessions no longer saved deleted")));
    broker.stop();
}
