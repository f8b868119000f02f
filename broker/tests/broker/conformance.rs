//! MQTT 3.1.1 and 5.0 normative statements, each tested against the real broker over
//! TLS. Names follow the statement (`mqtt_<section>_...` for 3.1.1, `mqtt5_...` for 5.0);
//! docs/CONFORMANCE.md lists them.

use crate::common::*;
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use std::time::{Duration, Instant};

fn filter(path: &str, qos: Q5) -> m5::Filter {
    m5::Filter::new(path, qos)
}

fn props(f: impl FnOnce(&mut m5::ConnectProperties)) -> Option<m5::ConnectProperties> {
    let mut p = m5::ConnectProperties::new();
    f(&mut p);
    Some(p)
}

// ---------------------------------------------------------------- 3.1.1 and 5.0

#[tokio::test]
async fn mqtt_3_1_2_10_keep_alive_zero_is_accepted() {
    let broker = TestBroker::start().await;
    let mut c = broker
        .tls(Some(&broker.pki.client("publisher")))
        .await
        .unwrap();
    assert_eq!(
        c.connect("ka0-v4", true, 0).await.code,
        v4::ConnectReturnCode::Success
    );
    let (_, ack) = V5Client::connect(&broker, "publisher", "ka0-v5", |c, _| c.keep_alive = 0).await;
    assert_eq!(ack.code, m5::ConnectReturnCode::Success);
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt_3_1_2_24_keep_alive_expiry_closes_the_connection_and_publishes_the_will() {
    let broker = TestBroker::start().await;
    let mut watcher = broker.client("subscriber", "ka-watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let mut silent = broker
        .tls(Some(&broker.pki.client("publisher")))
        .await
        .unwrap();
    let mut connect = v4::Connect::new("ka-silent");
    connect.keep_alive = 1;
    connect.last_will = Some(v4::LastWill::new(
        "wills/ka",
        "timed out",
        QoS::AtLeastOnce,
        false,
    ));
    silent.send(Packet::Connect(connect)).await;
    assert!(matches!(silent.recv().await, Packet::ConnAck(_)));
    let started = Instant::now();
    silent.expect_closed().await;
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(1400),
        "closed after {after:?}, before 1.5 x keep alive"
    );
    assert_eq!(watcher.next_publish().await.topic, "wills/ka");
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt_3_3_5_1_overlapping_subscriptions_one_copy_at_the_maximum_qos() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(&broker, "subscriber", "overlap5", |_, _| {}).await;
    sub.subscribe(filter("o/#", Q5::AtMostOnce), Some(1)).await;
    sub.subscribe(filter("o/+", Q5::AtLeastOnce), Some(2)).await;
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("o/x", b"one", QoS::AtLeastOnce, false).await;
    let got = sub.next_publish().await;
    assert_eq!(got.qos, Q5::AtLeastOnce);
    let mut ids = got.properties.unwrap().subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec![1, 2],
        "both matching subscriptions identified on the one copy"
    );
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt_3_8_4_3_every_subscribe_sends_matching_retained_messages_with_retain_set() {
    let broker = TestBroker::start().await;
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("r/a", b"kept", QoS::AtLeastOnce, true).await;
    let mut sub = broker.client("subscriber", "s").await;
    for _ in 0..2 {
        sub.subscribe("r/+", QoS::AtLeastOnce).await;
        let got = sub.next_publish().await;
        assert!(got.retain);
        assert_eq!(&got.payload[..], b"kept");
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt_3_3_1_9_live_forwards_have_retain_clear() {
    let broker = TestBroker::start().await;
    let mut sub = broker.client("subscriber", "s").await;
    sub.subscribe("live/#", QoS::AtLeastOnce).await;
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("live/x", b"now", QoS::AtLeastOnce, true).await;
    assert!(!sub.next_publish().await.retain);
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt_3_1_3_8_zero_length_client_id() {
    let broker = TestBroker::start().await;
    let mut c = broker
        .tls(Some(&broker.pki.client("publisher")))
        .await
        .unwrap();
    assert_eq!(
        c.connect("", true, 30).await.code,
        v4::ConnectReturnCode::Success
    );
    let mut c = broker
        .tls(Some(&broker.pki.client("publisher")))
        .await
        .unwrap();
    assert_eq!(
        c.connect("", false, 30).await.code,
        v4::ConnectReturnCode::BadClientId
    );
    c.expect_closed().await;
    wait_for_log(&["connection refused", "bad CONNECT", &c.local.to_string()]).await;

    let (_, ack) = V5Client::connect(&broker, "publisher", "", |_, _| {}).await;
    assert_eq!(ack.code, m5::ConnectReturnCode::Success);
    let assigned = ack.properties.and_then(|p| p.assigned_client_identifier);
    assert!(
        assigned.is_some_and(|id| !id.is_empty()),
        "no Assigned Client Identifier"
    );
    let (_, ack) = V5Client::connect(&broker, "publisher", "", |c, _| c.clean_start = false).await;
    assert_eq!(ack.code, m5::ConnectReturnCode::ClientIdentifierNotValid);
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt_4_4_0_1_unacknowledged_messages_are_redelivered_with_dup_in_order() {
    let broker = TestBroker::start().await;
    let mut sub = broker
        .tls(Some(&broker.pki.client("subscriber")))
        .await
        .unwrap();
    sub.connect("redeliver", false, 30).await;
    sub.subscribe("d/#", QoS::AtLeastOnce).await;
    let mut publ = broker.client("publisher", "p").await;
    for i in 0..3 {
        publ.publish("d/x", format!("m{i}").as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    for _ in 0..3 {
        assert!(matches!(sub.recv().await, Packet::Publish(p) if !p.dup));
    }
    drop(sub);
    let mut sub = broker
        .tls(Some(&broker.pki.client("subscriber")))
        .await
        .unwrap();
    assert!(sub.connect("redeliver", false, 30).await.session_present);
    for i in 0..3 {
        let p = sub.next_publish().await;
        assert!(p.dup, "redelivery without DUP");
        assert_eq!(p.payload, format!("m{i}").as_bytes());
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt_4_7_2_1_wildcards_at_the_first_level_do_not_match_dollar_topics() {
    let broker = TestBroker::start_with(|c| c.metrics.sys_interval_secs = 1).await;
    let mut all = broker.client("subscriber", "all").await;
    all.subscribe("#", QoS::AtMostOnce).await;
    all.subscribe("+/broker/#", QoS::AtMostOnce).await;
    let mut sys = broker.client("observer", "sys").await;
    sys.subscribe("$SYS/#", QoS::AtMostOnce).await;
    // $SYS values arrive (retained now, live every second) only to the explicit filter.
    assert!(sys.next_publish().await.topic.starts_with("$SYS/"));
    assert!(sys.next_publish().await.topic.starts_with("$SYS/"));
    all.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt_3_10_4_5_unsubscribe_is_always_acknowledged_also_for_restored_filters() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(&broker, "subscriber", "unsub5", |c, _| {
        c.clean_start = false;
        c.properties = props(|p| p.session_expiry_interval = Some(600));
    })
    .await;
    sub.subscribe(filter("keep/#", Q5::AtLeastOnce), None).await;
    sub.disconnect(m5::DisconnectReasonCode::NormalDisconnection)
        .await;
    let broker = broker.restart().await;
    let (mut sub, ack) = V5Client::connect(&broker, "subscriber", "unsub5", |c, _| {
        c.clean_start = false;
        c.properties = props(|p| p.session_expiry_interval = Some(600));
    })
    .await;
    assert!(ack.session_present);
    let mut unsub = m5::Unsubscribe::new("keep/#", None);
    unsub.filters.push("never/subscribed".into());
    unsub.pkid = 5;
    sub.send(m5::Packet::Unsubscribe(unsub)).await;
    match sub.recv().await {
        m5::Packet::UnsubAck(ack) => assert_eq!(
            ack.reasons,
            vec![
                m5::UnsubAckReason::Success,
                m5::UnsubAckReason::NoSubscriptionExisted
            ]
        ),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    broker.shutdown().await;
}

// ---------------------------------------------------------------- 5.0

#[tokio::test]
async fn mqtt5_3_1_2_11_clean_start_with_session_expiry_survives_disconnection() {
    let broker = TestBroker::start().await;
    let with_expiry = |c: &mut m5::Connect, _: &mut Option<m5::LastWill>| {
        c.properties = props(|p| p.session_expiry_interval = Some(300));
    };
    let (mut sub, _) = V5Client::connect(&broker, "subscriber", "expiring", with_expiry).await;
    sub.subscribe(filter("e/#", Q5::AtLeastOnce), None).await;
    sub.disconnect(m5::DisconnectReasonCode::NormalDisconnection)
        .await;
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("e/1", b"kept for you", QoS::AtLeastOnce, false)
        .await;
    let (mut sub, ack) = V5Client::connect(&broker, "subscriber", "expiring", |c, _| {
        c.clean_start = false;
        c.properties = props(|p| p.session_expiry_interval = Some(300));
    })
    .await;
    assert!(ack.session_present);
    assert_eq!(&sub.next_publish().await.payload[..], b"kept for you");
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_1_2_11_an_expired_session_is_discarded() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(&broker, "subscriber", "short", |c, _| {
        c.properties = props(|p| p.session_expiry_interval = Some(1));
    })
    .await;
    sub.subscribe(filter("s/#", Q5::AtLeastOnce), None).await;
    sub.disconnect(m5::DisconnectReasonCode::NormalDisconnection)
        .await;
    wait_for_log(&["session expired", "client_id=short"]).await;
    let (_, ack) =
        V5Client::connect(&broker, "subscriber", "short", |c, _| c.clean_start = false).await;
    assert!(!ack.session_present);
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_3_2_3_3_message_expiry_is_lowered_and_expired_messages_are_not_delivered() {
    let broker = TestBroker::start().await;
    let persistent = |c: &mut m5::Connect, _: &mut Option<m5::LastWill>| {
        c.clean_start = false;
        c.properties = props(|p| p.session_expiry_interval = Some(600));
    };
    let (mut sub, _) = V5Client::connect(&broker, "subscriber", "expiry-reader", persistent).await;
    sub.subscribe(filter("x/#", Q5::AtLeastOnce), None).await;
    sub.disconnect(m5::DisconnectReasonCode::NormalDisconnection)
        .await;
    let (mut publ, _) = V5Client::connect(&broker, "publisher", "expiry-writer", |_, _| {}).await;
    for (topic, expiry) in [("x/long", 60), ("x/short", 1)] {
        let mut p = publish5(topic, topic, Q5::AtLeastOnce);
        p.properties = Some(m5::PublishProperties {
            message_expiry_interval: Some(expiry),
            ..Default::default()
        });
        publ.publish(p).await;
    }
    // The passage of time is what is under test.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (mut sub, _) = V5Client::connect(&broker, "subscriber", "expiry-reader", persistent).await;
    let got = sub.next_publish().await;
    assert_eq!(&got.topic[..], b"x/long");
    let left = got
        .properties
        .and_then(|p| p.message_expiry_interval)
        .unwrap();
    assert!((55..60).contains(&left), "expiry not lowered: {left}");
    sub.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_8_3_1_no_local() {
    let broker = TestBroker::start().await;
    let (mut me, _) = V5Client::connect(&broker, "observer", "no-local", |_, _| {}).await;
    let mut f = filter("nl/t", Q5::AtLeastOnce);
    f.nolocal = true;
    me.subscribe(f, None).await;
    me.publish(publish5("nl/t", "mine", Q5::AtLeastOnce)).await;
    me.expect_no_publish().await;
    let mut other = broker.client("publisher", "p").await;
    other
        .publish("nl/t", b"theirs", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&me.next_publish().await.payload[..], b"theirs");
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_8_3_1_retain_as_published() {
    let broker = TestBroker::start().await;
    let (mut keep, _) = V5Client::connect(&broker, "subscriber", "rap", |_, _| {}).await;
    let mut f = filter("rap/#", Q5::AtLeastOnce);
    f.preserve_retain = true;
    keep.subscribe(f, None).await;
    let (mut plain, _) = V5Client::connect(&broker, "subscriber", "no-rap", |_, _| {}).await;
    plain
        .subscribe(filter("rap/#", Q5::AtLeastOnce), None)
        .await;
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("rap/x", b"r", QoS::AtLeastOnce, true).await;
    assert!(keep.next_publish().await.retain);
    assert!(!plain.next_publish().await.retain);
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_8_3_1_retain_handling() {
    let broker = TestBroker::start().await;
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("rh/a", b"stored", QoS::AtLeastOnce, true)
        .await;
    let (mut sub, _) = V5Client::connect(&broker, "subscriber", "rh", |_, _| {}).await;
    let with = |rule| {
        let mut f = filter("rh/#", Q5::AtLeastOnce);
        f.retain_forward_rule = rule;
        f
    };
    // 1: only on a new subscription.
    sub.subscribe(with(m5::RetainForwardRule::OnNewSubscribe), None)
        .await;
    assert!(sub.next_publish().await.retain);
    sub.subscribe(with(m5::RetainForwardRule::OnNewSubscribe), None)
        .await;
    sub.expect_no_publish().await;
    // 0: on every subscribe.
    sub.subscribe(with(m5::RetainForwardRule::OnEverySubscribe), None)
        .await;
    assert!(sub.next_publish().await.retain);
    // 2: never.
    let (mut never, _) = V5Client::connect(&broker, "subscriber", "rh-never", |_, _| {}).await;
    never
        .subscribe(with(m5::RetainForwardRule::Never), None)
        .await;
    never.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_3_4_receive_maximum_limits_unacknowledged_messages() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(&broker, "subscriber", "recv-max", |c, _| {
        c.properties = props(|p| p.receive_maximum = Some(2));
    })
    .await;
    sub.subscribe(filter("rm/#", Q5::AtLeastOnce), None).await;
    let mut publ = broker.client("publisher", "p").await;
    for i in 0..4 {
        publ.publish("rm/x", format!("{i}").as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    let mut held = Vec::new();
    for _ in 0..2 {
        match sub.recv().await {
            m5::Packet::Publish(p) => held.push(p.pkid),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    sub.expect_no_publish().await;
    sub.send(m5::Packet::PubAck(m5::PubAck::new(held[0], None)))
        .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"2");
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_1_2_24_a_message_larger_than_the_client_maximum_is_not_sent() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(&broker, "subscriber", "small-max", |c, _| {
        c.properties = props(|p| p.max_packet_size = Some(128));
    })
    .await;
    sub.subscribe(filter("mp/#", Q5::AtMostOnce), None).await;
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("mp/big", &[b'x'; 500], QoS::AtMostOnce, false)
        .await;
    publ.publish("mp/small", b"fits", QoS::AtMostOnce, false)
        .await;
    let got = sub.next_publish().await;
    assert_eq!(&got.topic[..], b"mp/small");
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_3_2_3_4_topic_aliases_in_both_directions() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(&broker, "subscriber", "alias-in", |c, _| {
        c.properties = props(|p| p.topic_alias_max = Some(5));
    })
    .await;
    sub.subscribe(filter("ta/#", Q5::AtMostOnce), None).await;
    let (mut publ, ack) = V5Client::connect(&broker, "publisher", "alias-out", |_, _| {}).await;
    assert!(ack.properties.and_then(|p| p.topic_alias_max).unwrap_or(0) > 0);
    let aliased = |topic: &str, payload: &str| {
        let mut p = publish5(topic, payload, Q5::AtMostOnce);
        p.properties = Some(m5::PublishProperties {
            topic_alias: Some(3),
            ..Default::default()
        });
        p
    };
    publ.publish(aliased("ta/long/topic", "first")).await;
    publ.publish(aliased("", "second")).await;
    let first = sub.next_publish().await;
    assert_eq!(&first.topic[..], b"ta/long/topic");
    let alias = first
        .properties
        .and_then(|p| p.topic_alias)
        .expect("broker set no alias");
    let second = sub.next_publish().await;
    assert!(second.topic.is_empty(), "the alias replaces the topic");
    assert_eq!(second.properties.and_then(|p| p.topic_alias), Some(alias));
    assert_eq!(&second.payload[..], b"second");
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_2_2_3_14_server_keep_alive_lowers_a_long_keep_alive() {
    let broker = TestBroker::start_with(|c| c.session.max_keepalive_secs = 60).await;
    let (_, ack) =
        V5Client::connect(&broker, "publisher", "long-ka", |c, _| c.keep_alive = 600).await;
    assert_eq!(ack.properties.and_then(|p| p.server_keep_alive), Some(60));
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_1_3_2_2_will_delay_is_ended_early_by_session_end_and_cancelled_by_reconnection() {
    let broker = TestBroker::start().await;
    let mut watcher = broker.client("subscriber", "will-watcher").await;
    watcher.subscribe("wd/#", QoS::AtLeastOnce).await;
    let with_will = |topic: &'static str, expiry: u32| {
        move |c: &mut m5::Connect, w: &mut Option<m5::LastWill>| {
            c.properties = props(|p| p.session_expiry_interval = Some(expiry));
            let will = delayed_will(topic, "bye", 60);
            *w = Some(will);
        }
    };
    // Session expiry 1 s < will delay 60 s: the will goes when the session ends.
    let (gone, _) =
        V5Client::connect(&broker, "publisher", "wd-ends", with_will("wd/ends", 1)).await;
    drop(gone);
    let started = Instant::now();
    assert_eq!(watcher.next_publish().await.topic, "wd/ends");
    assert!(started.elapsed() < Duration::from_secs(30));

    // Reconnected before the delay: no will.
    let (back, _) =
        V5Client::connect(&broker, "publisher", "wd-back", with_will("wd/back", 600)).await;
    drop(back);
    wait_for_log(&["client disconnected", "client_id=wd-back"]).await;
    let (_again, ack) = V5Client::connect(&broker, "publisher", "wd-back", |c, _| {
        c.clean_start = false;
        c.properties = props(|p| p.session_expiry_interval = Some(600));
    })
    .await;
    assert!(ack.session_present);
    watcher.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_14_reason_code_session_taken_over() {
    let broker = TestBroker::start().await;
    let (mut first, _) = V5Client::connect(&broker, "subscriber", "twice5", |_, _| {}).await;
    let (_second, _) = V5Client::connect(&broker, "subscriber", "twice5", |_, _| {}).await;
    match first.recv().await {
        m5::Packet::Disconnect(d) => {
            assert_eq!(d.reason_code, m5::DisconnectReasonCode::SessionTakenOver)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_reason_codes_on_puback_suback_unsuback() {
    let rules = "[[acl]]\nidentity = \"publisher\"\npublish = [\"ok/#\"]\nsubscribe = [\"ok/#\"]\n";
    let (broker, _) = TestBroker::start_from_file(rules).await;
    let (mut c, _) = V5Client::connect(&broker, "publisher", "codes", |_, _| {}).await;
    match c.publish(publish5("denied/x", "no", Q5::AtLeastOnce)).await {
        Some(m5::Packet::PubAck(a)) => assert_eq!(a.reason, m5::PubAckReason::NotAuthorized),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let mut sub = m5::Subscribe::new_many(
        [
            filter("ok/a", Q5::AtLeastOnce),
            filter("denied/#", Q5::AtMostOnce),
            filter("bad/#/x", Q5::AtMostOnce),
        ],
        None,
    );
    sub.pkid = 77;
    c.send(m5::Packet::Subscribe(sub)).await;
    match c.recv().await {
        m5::Packet::SubAck(a) => assert_eq!(
            a.return_codes,
            vec![
                m5::SubscribeReasonCode::Success(Q5::AtLeastOnce),
                m5::SubscribeReasonCode::NotAuthorized,
                m5::SubscribeReasonCode::TopicFilterInvalid
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let mut unsub = m5::Unsubscribe::new("nothing/here", None);
    unsub.pkid = 78;
    c.send(m5::Packet::Unsubscribe(unsub)).await;
    match c.recv().await {
        m5::Packet::UnsubAck(a) => {
            assert_eq!(a.reasons, vec![m5::UnsubAckReason::NoSubscriptionExisted])
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_3_2_3_properties_are_passed_through_unchanged() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5Client::connect(&broker, "subscriber", "props-in", |_, _| {}).await;
    sub.subscribe(filter("pp/#", Q5::AtLeastOnce), None).await;
    let (mut publ, _) = V5Client::connect(&broker, "publisher", "props-out", |_, _| {}).await;
    let sent = m5::PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("pp/reply".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"corr-42")),
        user_properties: vec![("fuente".into(), "test".into()), ("k".into(), "v".into())],
        ..Default::default()
    };
    let mut p = publish5("pp/x", "{}", Q5::AtLeastOnce);
    p.properties = Some(sent.clone());
    publ.publish(p).await;
    let got = sub
        .next_publish()
        .await
        .properties
        .expect("properties lost");
    assert_eq!(got.payload_format_indicator, sent.payload_format_indicator);
    assert_eq!(got.content_type, sent.content_type);
    assert_eq!(got.response_topic, sent.response_topic);
    assert_eq!(got.correlation_data, sent.correlation_data);
    assert_eq!(got.user_properties, sent.user_properties);
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_3_1_2_28_request_response_information() {
    let broker = TestBroker::start().await;
    let (_, ack) = V5Client::connect(&broker, "publisher", "rr", |c, _| {
        c.properties = props(|p| p.request_response_info = Some(1));
    })
    .await;
    let info = ack.properties.and_then(|p| p.response_information);
    assert!(info.is_some_and(|i| !i.is_empty()));
    let (_, ack) = V5Client::connect(&broker, "publisher", "no-rr", |_, _| {}).await;
    assert!(ack
        .properties
        .and_then(|p| p.response_information)
        .is_none());
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_4_8_2_shared_subscription_delivers_each_message_to_one_member() {
    let broker = TestBroker::start().await;
    let (mut a, _) = V5Client::connect(&broker, "subscriber", "member-a", |_, _| {}).await;
    let (mut b, _) = V5Client::connect(&broker, "subscriber", "member-b", |_, _| {}).await;
    for m in [&mut a, &mut b] {
        m.subscribe(filter("$share/grupo/sh/#", Q5::AtLeastOnce), None)
            .await;
    }
    let mut publ = broker.client("publisher", "p").await;
    const N: usize = 10;
    for i in 0..N {
        publ.publish("sh/x", format!("{i}").as_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    // Collect until all N arrived, across both members.
    let mut seen = std::collections::HashMap::new();
    let (mut from_a, mut from_b) = (0, 0);
    while seen.len() < N {
        tokio::select! {
            p = a.next_publish() => { from_a += 1; *seen.entry(p.payload.to_vec()).or_insert(0) += 1; }
            p = b.next_publish() => { from_b += 1; *seen.entry(p.payload.to_vec()).or_insert(0) += 1; }
        }
    }
    a.expect_no_publish().await;
    b.expect_no_publish().await;
    assert!(
        seen.values().all(|&n| n == 1),
        "a message reached two members: {seen:?}"
    );
    assert!(
        from_a > 0 && from_b > 0,
        "not shared: a={from_a} b={from_b}"
    );
    broker.shutdown().await;
}

/// Plain subscriptions are served by the edge's index and shared ones by the router:
/// a message matching both reaches the plain subscriber and one member of the group,
/// once each, and plain delivery goes on after the group is gone.
#[tokio::test]
async fn mqtt5_4_8_2_shared_and_plain_subscribers_both_receive() {
    let broker = TestBroker::start().await;
    let (mut member, _) = V5Client::connect(&broker, "subscriber", "member", |_, _| {}).await;
    member
        .subscribe(filter("$share/grupo/mix/#", Q5::AtLeastOnce), None)
        .await;
    let mut plain = broker.client("subscriber", "plain").await;
    plain.subscribe("mix/#", QoS::AtLeastOnce).await;
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("mix/a", b"both", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&member.next_publish().await.payload[..], b"both");
    assert_eq!(&plain.next_publish().await.payload[..], b"both");
    member.expect_no_publish().await;
    plain.expect_no_publish().await;
    member
        .disconnect(m5::DisconnectReasonCode::NormalDisconnection)
        .await;
    publ.publish("mix/b", b"plain only", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&plain.next_publish().await.payload[..], b"plain only");
    plain.expect_no_publish().await;
    broker.shutdown().await;
}
