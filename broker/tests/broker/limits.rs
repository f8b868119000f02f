//! One client cannot hurt the others: each per-client limit attempted for real, with
//! its MQTT 5 reason code (3.1.1: the nearest behaviour), its WARN line naming the
//! client, and another client served meanwhile.

use crate::common::*;
use rumqttc::mqttbytes::v4::{self, Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::v5::mqttbytes::QoS as Q5;

/// A bystander that keeps being served: subscribed before, receives after.
async fn bystander(broker: &TestBroker, id: &str) -> TestClient {
    let mut c = broker.client("subscriber", id).await;
    c.subscribe("articulos/+/futbol", QoS::AtLeastOnce).await;
    c
}

async fn still_served(broker: &TestBroker, watcher: &mut TestClient) {
    let mut publ = broker.client("publisher", "sigue").await;
    publ.publish("articulos/a/futbol", b"sigue", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&watcher.next_publish().await.payload[..], b"sigue");
}

#[tokio::test]
async fn subscriptions_beyond_the_limit_are_refused_with_quota_exceeded() {
    let broker = TestBroker::start_with(|c| c.session.max_subscriptions = 3).await;
    let mut watcher = bystander(&broker, "vigia").await;
    let mut greedy = broker.client("subscriber", "codicioso").await;
    for i in 0..3 {
        let codes = greedy
            .subscribe(&format!("articulos/{i}/#"), QoS::AtLeastOnce)
            .await;
        assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    }
    assert_eq!(
        greedy.subscribe("articulos/3/#", QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Failure]
    );
    wait_for_log(&[
        "WARN",
        "subscribe refused",
        "session.max_subscriptions",
        "client_id=codicioso",
        "filter=articulos/3/#",
    ])
    .await;
    // Subscribing again to one it holds replaces it, within the limit.
    assert_eq!(
        greedy.subscribe("articulos/0/#", QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    // MQTT 5 says why: 0x97.
    let (mut v5, _) = V5Client::connect(&broker, "subscriber", "codicioso5", |_, _| {}).await;
    for i in 0..3 {
        v5.subscribe(
            m5::Filter::new(format!("articulos/{i}/#"), Q5::AtMostOnce),
            None,
        )
        .await;
    }
    assert_eq!(
        v5.subscribe(m5::Filter::new("articulos/x/#", Q5::AtMostOnce), None)
            .await,
        vec![m5::SubscribeReasonCode::QuotaExceeded]
    );
    still_served(&broker, &mut watcher).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn topics_over_the_length_or_level_limits_are_refused() {
    let broker = TestBroker::start_with(|c| {
        c.session.max_topic_levels = 4;
        c.session.max_topic_length = 40;
    })
    .await;
    let mut watcher = bystander(&broker, "vigia").await;
    // A filter over the limits: 0x80 (5.0: 0x8F, Topic Filter invalid).
    let mut sub = broker.client("subscriber", "profundo").await;
    assert_eq!(
        sub.subscribe("articulos/a/b/c/d", QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Failure]
    );
    wait_for_log(&[
        "WARN",
        "subscribe refused: topic of 5 levels; the limit is 4",
        "client_id=profundo",
    ])
    .await;
    let (mut v5, _) = V5Client::connect(&broker, "subscriber", "largo5", |_, _| {}).await;
    let long = format!("articulos/{}", "x".repeat(40));
    assert_eq!(
        v5.subscribe(m5::Filter::new(long.clone(), Q5::AtMostOnce), None)
            .await,
        vec![m5::SubscribeReasonCode::TopicFilterInvalid]
    );
    // A PUBLISH over them closes its connection (5.0: DISCONNECT 0x90).
    let (mut publ, _) = V5Client::connect(&broker, "publisher", "largo", |_, _| {}).await;
    match publ.publish(publish5(&long, "x", Q5::AtLeastOnce)).await {
        Some(m5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, m5::DisconnectReasonCode::TopicNameInvalid)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    wait_for_log(&[
        "WARN",
        "client_id=largo",
        "topic of 50 bytes; the limit is 40 (session.max_topic_length)",
    ])
    .await;
    // 3.1.1 has no code for it: the connection is closed.
    let mut deep = broker.client("publisher", "hondo").await;
    let mut p = v4::Publish::new("articulos/a/b/c/d", QoS::AtLeastOnce, "x");
    p.pkid = 1;
    deep.send(Packet::Publish(p)).await;
    deep.expect_closed().await;
    watcher.expect_no_publish().await;
    still_served(&broker, &mut watcher).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn more_qos2_messages_than_the_receive_maximum_get_0x93() {
    let broker = TestBroker::start_with(|c| c.session.receive_maximum = 2).await;
    let mut watcher = bystander(&broker, "vigia").await;
    let (mut c, ack) = V5Client::connect(&broker, "publisher", "impaciente", |_, _| {}).await;
    let told = ack.properties.and_then(|p| p.receive_max);
    assert_eq!(told, Some(2), "Receive Maximum in CONNACK");
    // Two QoS 2 messages whose PUBREL never comes: within the limit.
    for _ in 0..2 {
        match c
            .publish(publish5("articulos/q2/futbol", "uno", Q5::ExactlyOnce))
            .await
        {
            Some(m5::Packet::PubRec(_)) => {}
            other => panic!("expected PUBREC, got {other:?}"),
        }
    }
    for _ in 0..2 {
        assert_eq!(&watcher.next_publish().await.payload[..], b"uno");
    }
    // The third is one too many (MQTT-3.3.4-9).
    match c
        .publish(publish5("articulos/q2/futbol", "tres", Q5::ExactlyOnce))
        .await
    {
        Some(m5::Packet::Disconnect(d)) => assert_eq!(
            d.reason_code,
            m5::DisconnectReasonCode::ReceiveMaximumExceeded
        ),
        other => panic!("expected DISCONNECT 0x93, got {other:?}"),
    }
    wait_for_log(&[
        "WARN",
        "client_id=impaciente",
        "more than 2 QoS 2 messages awaiting PUBREL",
    ])
    .await;
    watcher.expect_no_publish().await;
    still_served(&broker, &mut watcher).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_client_over_its_read_budget_is_slowed_and_loses_nothing() {
    const RATE: usize = 100;
    const SENT: usize = 4 * RATE;
    let broker = TestBroker::start_with(|c| c.session.max_packets_per_sec = RATE as u64).await;
    let mut watcher = bystander(&broker, "vigia").await;
    let mut noisy = broker.client("publisher", "ruidoso").await;
    let started = std::time::Instant::now();
    for i in 0..SENT {
        let p = v4::Publish::new("articulos/ruido/futbol", QoS::AtMostOnce, format!("{i}"));
        noisy.send(Packet::Publish(p)).await;
    }
    // A quiet publisher meanwhile: through at once, ahead of most of the noise.
    let mut quiet = broker.client("publisher", "tranquilo").await;
    quiet
        .publish("articulos/calma/futbol", b"calma", QoS::AtLeastOnce, false)
        .await;
    let mut noise = Vec::new();
    let mut quiet_after = None;
    while noise.len() < SENT {
        let p = watcher.next_publish().await;
        if p.topic == "articulos/calma/futbol" {
            quiet_after = Some(noise.len());
        } else {
            noise.push(String::from_utf8(p.payload.to_vec()).unwrap());
        }
    }
    let took = started.elapsed();
    // A second's worth at once, the rest at the rate: about 3 s; all of it, in order.
    assert!(took >= std::time::Duration::from_millis(2500), "{took:?}");
    let expected: Vec<String> = (0..SENT).map(|i| i.to_string()).collect();
    assert_eq!(noise, expected);
    let quiet_after = quiet_after.expect("the quiet publisher's message");
    assert!(quiet_after < SENT / 2, "behind {quiet_after} of the noise");
    wait_for_log(&["WARN", "client slowed down", "client_id=ruidoso"]).await;
    broker.shutdown().await;
}
