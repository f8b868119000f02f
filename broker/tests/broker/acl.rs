//! Authorization by certificate identity, attempted for real over TLS.

use crate::common::*;
use rumqttc::mqttbytes::v4::{self, Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;

const RULES: &str = r##"
[[acl]]
identity = "publisher"
publish = ["articulos/#"]
[[acl]]
identity = "subscriber"
subscribe = ["articulos/#", "$SYS/#"]
[[acl]]
identity = "observer"
subscribe = ["#"]
publish = ["devices/%u/%c/#"]
"##;

#[tokio::test]
async fn publisher_cannot_subscribe_and_subscriber_cannot_publish() {
    let (broker, _) = TestBroker::start_from_file(RULES).await;
    let mut observer = broker.client("observer", "obs").await;
    observer.subscribe("#", QoS::AtLeastOnce).await;

    let mut publ = broker.client("publisher", "pub-acl").await;
    let codes = publ.subscribe("articulos/#", QoS::AtLeastOnce).await;
    assert_eq!(codes, vec![SubscribeReasonCode::Failure]);
    wait_for_log(&[
        "WARN",
        "denied: not authorized",
        "identity=publisher",
        "client_id=pub-acl",
        "action=subscribe",
        "topic=articulos/#",
        &publ.local.to_string(),
    ])
    .await;

    let mut sub = broker.client("subscriber", "sub-acl").await;
    // 3.1.1 has no code for it: acknowledged and dropped, as Mosquitto does.
    sub.publish("articulos/falso/futbol", b"forged", QoS::AtLeastOnce, true)
        .await;
    wait_for_log(&[
        "WARN",
        "denied: not authorized",
        "identity=subscriber",
        "client_id=sub-acl",
        "action=publish",
        "topic=articulos/falso/futbol",
    ])
    .await;
    observer.expect_no_publish().await;
    // Not retained either.
    let mut late = broker.client("observer", "late").await;
    late.subscribe("articulos/#", QoS::AtLeastOnce).await;
    late.expect_no_publish().await;

    // The allowed direction works.
    publ.publish("articulos/bien/futbol", b"ok", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(observer.next_publish().await.topic, "articulos/bien/futbol");
    broker.shutdown().await;
}

#[tokio::test]
async fn mixed_subscribe_gets_a_code_per_filter() {
    let (broker, _) = TestBroker::start_from_file(RULES).await;
    let mut sub = broker.client("subscriber", "mixed").await;
    let mut s = v4::Subscribe::new("articulos/+/futbol", QoS::AtLeastOnce);
    s.pkid = 9;
    s.add("#".into(), QoS::AtLeastOnce);
    s.add("$SYS/#".into(), QoS::AtMostOnce);
    sub.send(Packet::Subscribe(s)).await;
    match sub.recv().await {
        Packet::SubAck(ack) => assert_eq!(
            ack.return_codes,
            vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtMostOnce)
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let mut publ = broker.client("publisher", "p").await;
    publ.publish("articulos/x/futbol", b"si", QoS::AtLeastOnce, false)
        .await;
    // The retained $SYS values come first.
    let mut got = sub.next_publish().await;
    while got.topic.starts_with("$SYS/") {
        got = sub.next_publish().await;
    }
    assert_eq!(&got.payload[..], b"si");
    broker.shutdown().await;
}

#[tokio::test]
async fn identity_and_client_id_substitution() {
    let (broker, _) = TestBroker::start_from_file(RULES).await;
    let mut watcher = broker.client("observer", "watcher").await;
    watcher.subscribe("devices/#", QoS::AtLeastOnce).await;
    let mut dev = broker.client("observer", "dev-7").await;
    dev.publish(
        "devices/observer/dev-7/temp",
        b"21",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    dev.publish(
        "devices/observer/dev-8/temp",
        b"spoof",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    assert_eq!(&watcher.next_publish().await.payload[..], b"21");
    watcher.expect_no_publish().await;
    wait_for_log(&[
        "denied: not authorized",
        "client_id=dev-7",
        "topic=devices/observer/dev-8/temp",
    ])
    .await;
    broker.shutdown().await;
}

/// Connects as `identity` with a will on `topic` (retained or not) and asserts the
/// CONNACK refuses it as not authorized, with one WARN line naming the will topic.
async fn assert_will_refused(broker: &TestBroker, identity: &str, topic: &str, retain: bool) {
    let mut c = broker
        .tls(Some(&broker.pki.client(identity)))
        .await
        .unwrap();
    let mut connect = v4::Connect::new("will-refused");
    connect.last_will = Some(v4::LastWill::new(topic, "x", QoS::AtMostOnce, retain));
    c.send(Packet::Connect(connect)).await;
    match c.recv().await {
        Packet::ConnAck(ack) => assert_eq!(ack.code, v4::ConnectReturnCode::NotAuthorized),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c.expect_closed().await;
    wait_for_log(&[
        "connection refused",
        &format!("not authorized: will topic {topic}"),
        &c.local.to_string(),
    ])
    .await;
}

#[tokio::test]
async fn will_to_a_forbidden_topic_is_refused_with_not_authorized() {
    let (broker, _) = TestBroker::start_from_file(RULES).await;
    assert_will_refused(&broker, "subscriber", "articulos/will", false).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn another_certificate_cannot_hijack_a_persistent_session() {
    let (broker, _) = TestBroker::start_from_file(RULES).await;
    let mut a = broker
        .tls(Some(&broker.pki.client("subscriber")))
        .await
        .unwrap();
    a.connect("victim", false, 30).await;
    a.subscribe("articulos/#", QoS::AtLeastOnce).await;
    drop(a);
    let mut publ = broker.client("publisher", "p").await;
    publ.publish(
        "articulos/x/futbol",
        b"for the victim",
        QoS::AtLeastOnce,
        false,
    )
    .await;

    // Same client id, other certificate: a separate session with nothing queued.
    let mut b = broker
        .tls(Some(&broker.pki.client("observer")))
        .await
        .unwrap();
    assert!(!b.connect("victim", false, 30).await.session_present);
    b.expect_no_publish().await;

    let mut a = broker
        .tls(Some(&broker.pki.client("subscriber")))
        .await
        .unwrap();
    assert!(a.connect("victim", false, 30).await.session_present);
    assert_eq!(&a.next_publish().await.payload[..], b"for the victim");
    // B connecting again under the same id does not disconnect A.
    let mut b2 = broker
        .tls(Some(&broker.pki.client("observer")))
        .await
        .unwrap();
    b2.connect("victim", true, 30).await;
    a.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn rules_reload_from_disk_on_live_connections() {
    let (broker, path) = TestBroker::start_from_file(RULES).await;
    let mut observer = broker.client("observer", "obs-reload").await;
    observer.subscribe("articulos/#", QoS::AtLeastOnce).await;
    let mut publ = broker.client("publisher", "pub-reload").await;
    publ.publish("articulos/a/futbol", b"antes", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&observer.next_publish().await.payload[..], b"antes");

    // An invalid file keeps the old rules.
    std::fs::write(
        &path,
        config_text(
            &broker.pki,
            "[[acl]]\nidentity = \"publisher\"\npublish = [\"bad/#/x\"]\n",
        ),
    )
    .unwrap();
    wait_for_log(&["configuration reload failed", "acl[0].publish[0]"]).await;
    publ.publish("articulos/b/futbol", b"sigue", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&observer.next_publish().await.payload[..], b"sigue");

    // The publisher's rule removed: its next publish is denied, on the same connection.
    let without_publisher = RULES.replace(
        "identity = \"publisher\"\npublish = [\"articulos/#\"]",
        "identity = \"publisher\"",
    );
    std::fs::write(&path, config_text(&broker.pki, &without_publisher)).unwrap();
    wait_for_log(&["ACL and bridges reloaded", "rules=3"]).await;
    publ.publish("articulos/c/futbol", b"prohibido", QoS::AtLeastOnce, false)
        .await;
    wait_for_log(&[
        "denied: not authorized",
        "client_id=pub-reload",
        "topic=articulos/c/futbol",
    ])
    .await;
    observer.expect_no_publish().await;
    broker.shutdown().await;
}

/// A retained will on a `$SYS` topic would let a client forge the broker's own values.
#[tokio::test]
async fn will_to_a_dollar_topic_is_refused_even_without_rules() {
    let broker = TestBroker::start().await;
    assert_will_refused(&broker, "publisher", "$SYS/broker/version", true).await;
    broker.shutdown().await;
}

/// Everything under `articulos/#` except `articulos/privado/#`.
const DENY_RULES: &str = r##"
[[acl]]
identity = "*"
deny_publish = ["articulos/privado/#"]
deny_subscribe = ["articulos/privado/#"]
[[acl]]
identity = "publisher"
publish = ["articulos/#"]
[[acl]]
identity = "subscriber"
subscribe = ["articulos/#"]
"##;

#[tokio::test]
async fn deny_rules_win_over_grants_for_publish_and_subscribe() {
    let (broker, _) = TestBroker::start_from_file(DENY_RULES).await;
    let mut wide = broker.client("subscriber", "todo").await;
    assert_eq!(
        wide.subscribe("articulos/#", QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        "a wider filter is granted, without the denied topics"
    );
    // A filter inside the denied topics is refused (3.1.1: 0x80).
    let mut nosy = broker.client("subscriber", "fisgon").await;
    assert_eq!(
        nosy.subscribe("articulos/privado/+", QoS::AtLeastOnce)
            .await,
        vec![SubscribeReasonCode::Failure]
    );
    wait_for_log(&[
        "WARN",
        "denied: not authorized",
        "identity=subscriber",
        "client_id=fisgon",
        "action=subscribe",
        "topic=articulos/privado/+",
    ])
    .await;

    // Publishing there is denied although `articulos/#` is granted: dropped, logged.
    let mut publ = broker.client("publisher", "redactor").await;
    publ.publish(
        "articulos/privado/nomina",
        b"secreto",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    wait_for_log(&[
        "WARN",
        "denied: not authorized",
        "identity=publisher",
        "client_id=redactor",
        "action=publish",
        "topic=articulos/privado/nomina",
    ])
    .await;
    // Everything else flows, to the wide subscriber too.
    publ.publish("articulos/publico/futbol", b"gol", QoS::AtLeastOnce, false)
        .await;
    let p = wide.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("articulos/publico/futbol", &b"gol"[..])
    );
    wide.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_granted_wide_subscription_never_delivers_denied_topics() {
    // The publisher may publish under privado (only subscribers are kept out).
    let rules = r##"
[[acl]]
identity = "subscriber"
subscribe = ["articulos/#"]
deny_subscribe = ["articulos/privado/#", "articulos/%c/borradores"]
[[acl]]
identity = "publisher"
publish = ["articulos/#"]
"##;
    let (broker, _) = TestBroker::start_from_file(rules).await;
    let mut wide = broker.client("subscriber", "lector").await;
    wide.subscribe("articulos/#", QoS::AtLeastOnce).await;
    let mut publ = broker.client("publisher", "redactor").await;
    // Retained: not sent on a later subscribe either.
    publ.publish(
        "articulos/privado/nomina",
        b"secreto",
        QoS::AtLeastOnce,
        true,
    )
    .await;
    publ.publish(
        "articulos/lector/borradores",
        b"suyo",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    publ.publish(
        "articulos/otro/borradores",
        b"ajeno",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    let p = wide.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("articulos/otro/borradores", &b"ajeno"[..])
    );
    wide.expect_no_publish().await;
    let mut late = broker.client("subscriber", "tarde").await;
    late.subscribe("articulos/+/nomina", QoS::AtLeastOnce).await;
    late.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn mqtt5_denied_subscribe_gets_not_authorized() {
    use rumqttc::v5::mqttbytes::v5 as m5;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let (broker, _) = TestBroker::start_from_file(DENY_RULES).await;
    let (mut c, _) = V5Client::connect(&broker, "subscriber", "v5-fisgon", |_, _| {}).await;
    let mut sub = m5::Subscribe::new_many(
        [
            m5::Filter::new("articulos/+/futbol", Q5::AtLeastOnce),
            m5::Filter::new("articulos/privado/#", Q5::AtLeastOnce),
        ],
        None,
    );
    sub.pkid = 5;
    c.send(m5::Packet::Subscribe(sub)).await;
    match c.recv().await {
        m5::Packet::SubAck(a) => assert_eq!(
            a.return_codes,
            vec![
                m5::SubscribeReasonCode::Success(Q5::AtLeastOnce),
                m5::SubscribeReasonCode::NotAuthorized
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    broker.shutdown().await;
}

#[test]
fn acl_check_names_the_rule_that_decided() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, DENY_RULES).unwrap();
    let check = |args: &[&str]| {
        let head = [
            "--config".as_ref(),
            config.as_os_str(),
            "acl".as_ref(),
            "check".as_ref(),
        ];
        crate::process::run_ok(head.into_iter().chain(args.iter().map(|a| a.as_ref())))
    };
    let out = check(&["publisher", "publish", "articulos/privado/nomina"]);
    assert!(
        out.starts_with("deny: rule #1") && out.contains("\"articulos/privado/#\""),
        "{out}"
    );
    let out = check(&["subscriber", "subscribe", "articulos/+/futbol"]);
    assert!(out.starts_with("allow: rule #3"), "{out}");
    let out = check(&["publisher", "subscribe", "articulos/#"]);
    assert!(out.starts_with("deny: no rule grants"), "{out}");
}
