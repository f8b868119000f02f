//! What a client with a valid certificate can do.

use crate::common::*;
use rumqttc::mqttbytes::v4::{self, Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;

#[tokio::test]
async fn subscribe_publish_qos0_qos1_qos2_and_receive() {
    let broker = TestBroker::start().await;
    let mut sub = broker.client("subscriber", "sub-1").await;
    let codes = sub.subscribe("articulos/+/futbol", QoS::ExactlyOnce).await;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::ExactlyOnce)]);

    let mut publ = broker.client("publisher", "pub-1").await;
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        let payload = format!("articulo {i}");
        publ.publish("articulos/eldiario/futbol", payload.as_bytes(), qos, false)
            .await;
        let got = sub.next_publish().await;
        assert_eq!(got.topic, "articulos/eldiario/futbol");
        assert_eq!(&got.payload[..], payload.as_bytes());
        assert_eq!(got.qos, qos, "delivered at the publish QoS");
        assert!(!got.retain, "live messages carry no retain flag");
    }
    publ.publish(
        "articulos/eldiario/politica",
        b"no",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn delivery_qos_is_the_minimum_of_publish_and_subscription() {
    let broker = TestBroker::start().await;
    let mut low = broker.client("subscriber", "low").await;
    low.subscribe("t/qos", QoS::AtMostOnce).await;
    let mut high = broker.client("subscriber", "high").await;
    high.subscribe("t/qos", QoS::AtLeastOnce).await;
    let mut publ = broker.client("publisher", "p").await;

    publ.publish("t/qos", b"q1", QoS::AtLeastOnce, false).await;
    assert_eq!(low.next_publish().await.qos, QoS::AtMostOnce);
    assert_eq!(high.next_publish().await.qos, QoS::AtLeastOnce);
    publ.publish("t/qos", b"q0", QoS::AtMostOnce, false).await;
    assert_eq!(high.next_publish().await.qos, QoS::AtMostOnce);
    assert_eq!(low.next_publish().await.qos, QoS::AtMostOnce);
    broker.shutdown().await;
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
    let broker = TestBroker::start().await;
    let mut sub = broker.client("subscriber", "overlap").await;
    sub.subscribe("articulos/#", QoS::AtMostOnce).await;
    sub.subscribe("articulos/+/futbol", QoS::AtLeastOnce).await;
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("articulos/marca/futbol", b"uno", QoS::AtLeastOnce, false)
        .await;
    let got = sub.next_publish().await;
    assert_eq!(got.qos, QoS::AtLeastOnce);
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn retained_message_reaches_a_later_subscriber_with_retain_set() {
    let broker = TestBroker::start().await;
    let mut publ = broker.client("publisher", "p").await;
    publ.publish(
        "articulos/elpais/futbol",
        b"retenido",
        QoS::AtLeastOnce,
        true,
    )
    .await;
    // An empty payload without retain is an ordinary message: it deletes nothing.
    publ.publish("articulos/elpais/futbol", b"", QoS::AtLeastOnce, false)
        .await;

    let mut sub = broker.client("subscriber", "late").await;
    sub.subscribe("articulos/+/futbol", QoS::AtLeastOnce).await;
    let got = sub.next_publish().await;
    assert!(got.retain);
    assert_eq!(&got.payload[..], b"retenido");
    assert_eq!(got.qos, QoS::AtLeastOnce);
    // Re-subscribing sends it again.
    sub.subscribe("articulos/+/futbol", QoS::AtLeastOnce).await;
    assert!(sub.next_publish().await.retain);

    // An empty retained payload deletes it.
    publ.publish("articulos/elpais/futbol", b"", QoS::AtLeastOnce, true)
        .await;
    let mut later = broker.client("subscriber", "later").await;
    later
        .subscribe("articulos/+/futbol", QoS::AtLeastOnce)
        .await;
    later.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn ten_thousand_retained_topics_all_reach_a_new_subscriber() {
    const N: usize = 10_000;
    let broker = TestBroker::start().await;
    let mut publ = broker.client("publisher", "bulk").await;
    for i in 0..N {
        let mut p = v4::Publish::new(
            format!("articulos/p{i}/futbol"),
            QoS::AtMostOnce,
            format!("{i}"),
        );
        p.retain = true;
        publ.send(Packet::Publish(p)).await;
    }
    // A QoS 1 publish after them is acknowledged only after they were all handled.
    publ.publish("articulos/last/futbol", b"last", QoS::AtLeastOnce, true)
        .await;

    let mut sub = broker.client("subscriber", "all").await;
    sub.subscribe("articulos/#", QoS::AtLeastOnce).await;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < N + 1 {
        let p = sub.next_publish().await;
        assert!(p.retain, "{} without retain flag", p.topic);
        seen.insert(p.topic);
    }
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn unsubscribe_is_always_acknowledged_and_stops_delivery() {
    let broker = TestBroker::start().await;
    let mut sub = broker.client("subscriber", "unsub").await;
    sub.send(Packet::Unsubscribe(v4::Unsubscribe {
        pkid: 7,
        topics: vec!["never/subscribed".into()],
    }))
    .await;
    assert!(matches!(sub.recv().await, Packet::UnsubAck(a) if a.pkid == 7));

    sub.subscribe("a/b", QoS::AtLeastOnce).await;
    sub.send(Packet::Unsubscribe(v4::Unsubscribe {
        pkid: 8,
        topics: vec!["a/b".into()],
    }))
    .await;
    assert!(matches!(sub.recv().await, Packet::UnsubAck(a) if a.pkid == 8));
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("a/b", b"x", QoS::AtLeastOnce, false).await;
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn invalid_filters_are_refused_in_suback_and_others_proceed() {
    let broker = TestBroker::start().await;
    let mut sub = broker.client("subscriber", "filters").await;
    let mut s = v4::Subscribe::new("a/#/b", QoS::AtLeastOnce);
    s.pkid = 3;
    s.add("ok/+".into(), QoS::AtLeastOnce);
    s.add("bad+/x".into(), QoS::AtMostOnce);
    sub.send(Packet::Subscribe(s)).await;
    match sub.recv().await {
        Packet::SubAck(ack) => assert_eq!(
            ack.return_codes,
            vec![
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    wait_for_log(&[
        "subscribe refused: invalid topic filter",
        "a/#/b",
        &sub.local.to_string(),
    ])
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn publish_to_an_invalid_topic_closes_only_that_connection() {
    let broker = TestBroker::start().await;
    let mut bad = broker.client("publisher", "bad").await;
    let mut good = broker.client("subscriber", "good").await;
    good.subscribe("x/#", QoS::AtMostOnce).await;
    bad.send(Packet::Publish(v4::Publish::new(
        "x/+/y",
        QoS::AtMostOnce,
        "w",
    )))
    .await;
    bad.expect_closed().await;
    wait_for_log(&["invalid topic name", &bad.local.to_string()]).await;
    good.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn keep_alive_zero_is_accepted() {
    let broker = TestBroker::start().await;
    let mut c = broker
        .tls(Some(&broker.pki.client("publisher")))
        .await
        .unwrap();
    let ack = c.connect("ka0", true, 0).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    c.publish("t", b"x", QoS::AtLeastOnce, false).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn persistent_session_keeps_qos1_messages_while_offline_and_redelivers() {
    let broker = TestBroker::start().await;
    let mut sub = broker
        .tls(Some(&broker.pki.client("subscriber")))
        .await
        .unwrap();
    assert!(!sub.connect("keeper", false, 30).await.session_present);
    sub.subscribe("news/#", QoS::AtLeastOnce).await;
    drop(sub);

    let mut publ = broker.client("publisher", "p").await;
    for i in 0..5 {
        publ.publish(
            "news/x",
            format!("m{i}").as_bytes(),
            QoS::AtLeastOnce,
            false,
        )
        .await;
    }
    let mut sub = broker
        .tls(Some(&broker.pki.client("subscriber")))
        .await
        .unwrap();
    assert!(sub.connect("keeper", false, 30).await.session_present);
    for i in 0..5 {
        assert_eq!(sub.next_publish().await.payload, format!("m{i}").as_bytes());
    }
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn unacknowledged_message_is_resent_with_dup_on_reconnect() {
    let broker = TestBroker::start().await;
    let mut sub = broker
        .tls(Some(&broker.pki.client("subscriber")))
        .await
        .unwrap();
    sub.connect("dup", false, 30).await;
    sub.subscribe("d", QoS::AtLeastOnce).await;
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("d", b"once", QoS::AtLeastOnce, false).await;
    match sub.recv().await {
        Packet::Publish(p) => assert!(!p.dup),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    drop(sub); // no PUBACK
    let mut sub = broker
        .tls(Some(&broker.pki.client("subscriber")))
        .await
        .unwrap();
    assert!(sub.connect("dup", false, 30).await.session_present);
    let again = sub.next_publish().await;
    assert!(again.dup);
    assert_eq!(&again.payload[..], b"once");
    broker.shutdown().await;
}

#[tokio::test]
async fn same_client_id_under_another_certificate_is_a_separate_session() {
    let broker = TestBroker::start().await;
    let mut a = broker.client("subscriber", "shared-id").await;
    a.subscribe("s", QoS::AtLeastOnce).await;
    let _b = broker.client("observer", "shared-id").await;
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("s", b"still here", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&a.next_publish().await.payload[..], b"still here");
    broker.shutdown().await;
}

#[tokio::test]
async fn will_is_published_on_abnormal_close_not_on_disconnect() {
    let broker = TestBroker::start().await;
    let mut watcher = broker.client("subscriber", "watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;

    for (id, graceful) in [("clean", true), ("crash", false)] {
        let mut c = broker
            .tls(Some(&broker.pki.client("publisher")))
            .await
            .unwrap();
        let mut connect = v4::Connect::new(id);
        connect.last_will = Some(v4::LastWill::new(
            format!("wills/{id}"),
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
        c.send(Packet::Connect(connect)).await;
        assert!(matches!(c.recv().await, Packet::ConnAck(_)));
        if graceful {
            c.send(Packet::Disconnect).await;
            c.expect_closed().await;
        } else {
            drop(c);
        }
    }
    let will = watcher.next_publish().await;
    assert_eq!(will.topic, "wills/crash");
    watcher.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn takeover_closes_the_old_connection() {
    let broker = TestBroker::start().await;
    let mut first = broker.client("subscriber", "twice").await;
    let mut second = broker.client("subscriber", "twice").await;
    first.expect_closed().await;
    second.publish("t", b"x", QoS::AtLeastOnce, false).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_clients_promptly() {
    let broker = TestBroker::start().await;
    let mut c = broker.client("subscriber", "bye").await;
    let started = std::time::Instant::now();
    broker.shutdown().await;
    c.expect_closed().await;
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn persistent_session_and_its_queue_survive_a_broker_restart() {
    let broker = TestBroker::start().await;
    let mut sub = broker
        .tls(Some(&broker.pki.client("subscriber")))
        .await
        .unwrap();
    sub.connect("restart-keeper", false, 30).await;
    sub.subscribe("news/#", QoS::AtLeastOnce).await;
    drop(sub);
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("news/a", b"before restart", QoS::AtLeastOnce, false)
        .await;
    drop(publ);

    let broker = broker.restart().await;
    // Published while the subscriber is away, after the restart: the restored session queues it.
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("news/b", b"after restart", QoS::AtLeastOnce, false)
        .await;
    let mut sub = broker
        .tls(Some(&broker.pki.client("subscriber")))
        .await
        .unwrap();
    assert!(
        sub.connect("restart-keeper", false, 30)
            .await
            .session_present
    );
    assert_eq!(&sub.next_publish().await.payload[..], b"before restart");
    assert_eq!(&sub.next_publish().await.payload[..], b"after restart");
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_stalls_nobody_and_its_qos0_drops_are_counted() {
    let broker = TestBroker::start().await;
    let mut slow = broker.client("subscriber", "never-reads").await;
    slow.subscribe("slow/#", QoS::AtMostOnce).await;
    let mut fast = broker.client("observer", "reads").await;
    fast.subscribe("fast/#", QoS::AtLeastOnce).await;
    let mut publ = broker.client("publisher", "flood").await;
    // 24 MB for a client that reads nothing: more than the socket buffers hold.
    let payload = vec![b'x'; 1024];
    for _ in 0..24_000 {
        publ.send(Packet::Publish(v4::Publish::new(
            "slow/x",
            QoS::AtMostOnce,
            payload.clone(),
        )))
        .await;
    }
    publ.publish("fast/x", b"not stalled", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&fast.next_publish().await.payload[..], b"not stalled");
    wait_for_log(&[
        "client reads too slowly: QoS 0 message dropped",
        "client_id=never-reads",
    ])
    .await;
    drop(slow);
    broker.shutdown().await;
}

#[tokio::test]
async fn pipelined_packets_beyond_one_batch_are_all_handled() {
    let broker = TestBroker::start().await;
    let mut sub = broker.client("subscriber", "counts").await;
    sub.subscribe("b/t", QoS::AtMostOnce).await;
    let mut publ = broker.client("publisher", "pipeline").await;
    // Thousands of tiny packets in one write: many more than one batch per read.
    const N: usize = 3000;
    let mut bytes = bytes::BytesMut::new();
    for i in 0..N {
        let p = v4::Publish::new("b/t", QoS::AtMostOnce, vec![(i % 251) as u8]);
        Packet::Publish(p).write(&mut bytes, usize::MAX).unwrap();
    }
    publ.send_raw(&bytes).await;
    publ.publish("b/t", b"fence", QoS::AtLeastOnce, false).await;
    let mut received = 0;
    loop {
        let p = sub.next_publish().await;
        if &p.payload[..] == b"fence" {
            break;
        }
        received += 1;
    }
    assert_eq!(received, N, "packets lost between batches");
    broker.shutdown().await;
}

/// Reads until `n` PUBACKs and `n` PUBLISHes (acknowledged) have arrived, in any order;
/// the payloads received.
async fn exchange(client: &mut TestClient, n: usize) -> Vec<String> {
    let (mut acks, mut payloads) = (0, Vec::new());
    while acks < n || payloads.len() < n {
        match client.recv().await {
            Packet::PubAck(_) => acks += 1,
            Packet::Publish(p) => {
                client.send(Packet::PubAck(v4::PubAck::new(p.pkid))).await;
                payloads.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
            other => panic!("expected PUBACK or PUBLISH, got {other:?}"),
        }
    }
    payloads
}

/// A session whose inbox is full makes its publishers wait (flow control) rather than
/// drop anything; two sessions publishing to each other never wait on each other for
/// ever, because a waiting session keeps draining its own inbox.
#[tokio::test]
async fn full_inboxes_slow_publishers_and_lose_nothing() {
    let broker = TestBroker::start_with(|c| c.session.inbox = 1).await;
    let mut a = broker.client("publisher", "ping").await;
    let mut b = broker.client("subscriber", "pong").await;
    a.subscribe("flow/to-a", QoS::AtLeastOnce).await;
    b.subscribe("flow/to-b", QoS::AtLeastOnce).await;
    const N: usize = 600;
    let pipelined = |topic: &str| {
        let mut bytes = bytes::BytesMut::new();
        for i in 0..N {
            let mut p = v4::Publish::new(topic, QoS::AtLeastOnce, i.to_string());
            p.pkid = 100 + i as u16;
            Packet::Publish(p).write(&mut bytes, usize::MAX).unwrap();
        }
        bytes
    };
    a.send_raw(&pipelined("flow/to-b")).await;
    b.send_raw(&pipelined("flow/to-a")).await;
    let (to_a, to_b) = tokio::join!(exchange(&mut a, N), exchange(&mut b, N));
    let expected: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(to_a, expected, "lost or reordered on the way to a");
    assert_eq!(to_b, expected, "lost or reordered on the way to b");
    let metrics = broker.handle.as_ref().unwrap().metrics_addr().unwrap();
    let body = scrape(metrics).await;
    assert!(
        value(&body, "broker_publisher_waits_total") > 0.0,
        "no publisher waited with one-message inboxes:\n{body}"
    );
    assert_eq!(value(&body, "broker_dropped_messages_total"), 0.0);
    broker.shutdown().await;
}

/// A PUBLISH followed, in the same read, by a packet that closes the connection: if the
/// broker acknowledged the PUBLISH, the message was delivered.
#[tokio::test]
async fn a_publish_acknowledged_before_a_violation_is_delivered() {
    let broker = TestBroker::start().await;
    let mut sub = broker.client("subscriber", "watcher").await;
    sub.subscribe("batch/t", QoS::AtLeastOnce).await;
    let mut publ = broker.client("publisher", "then-breaks").await;
    let mut bytes = bytes::BytesMut::new();
    let mut p = v4::Publish::new("batch/t", QoS::AtLeastOnce, "kept");
    p.pkid = 7;
    Packet::Publish(p).write(&mut bytes, usize::MAX).unwrap();
    // A second CONNECT is a protocol violation: the broker closes the connection.
    // (Encoded on its own: rumqttc writes a CONNECT's flags at an absolute offset.)
    let mut connect = bytes::BytesMut::new();
    Packet::Connect(v4::Connect::new("again"))
        .write(&mut connect, usize::MAX)
        .unwrap();
    bytes.extend_from_slice(&connect);
    publ.send_raw(&bytes).await;
    let mut acked = false;
    while let Some(packet) = publ.try_recv().await {
        acked |= matches!(packet, Packet::PubAck(a) if a.pkid == 7);
    }
    assert!(
        acked,
        "the PUBLISH before the violation was not acknowledged"
    );
    assert_eq!(&sub.next_publish().await.payload[..], b"kept");
    broker.shutdown().await;
}

/// Packets of one read take effect in order: a PUBLISH before a SUBSCRIBE in the same
/// write is not delivered to the new subscription.
#[tokio::test]
async fn a_subscribe_applies_only_to_what_is_published_after_it() {
    let broker = TestBroker::start().await;
    let mut client = broker.client("subscriber", "in-order").await;
    let mut bytes = bytes::BytesMut::new();
    Packet::Publish(v4::Publish::new("order/t", QoS::AtMostOnce, "before"))
        .write(&mut bytes, usize::MAX)
        .unwrap();
    let mut subscribe = bytes::BytesMut::new();
    let mut sub = v4::Subscribe::new("order/t", QoS::AtMostOnce);
    sub.pkid = 1;
    Packet::Subscribe(sub)
        .write(&mut subscribe, usize::MAX)
        .unwrap();
    bytes.extend_from_slice(&subscribe);
    client.send_raw(&bytes).await;
    match client.recv().await {
        Packet::SubAck(_) => {}
        other => panic!("expected SUBACK, got {other:?}"),
    }
    client.expect_no_publish().await;
    client
        .publish("order/t", b"after", QoS::AtMostOnce, false)
        .await;
    assert_eq!(&client.next_publish().await.payload[..], b"after");
    broker.shutdown().await;
}
