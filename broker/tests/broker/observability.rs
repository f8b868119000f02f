//! Metrics, $SYS topics and JSON logs, as an operator sees them.

use crate::common::*;
use rumqttc::mqttbytes::v4::SubscribeReasonCode;
use rumqttc::mqttbytes::QoS;
use std::net::SocketAddr;

const RULES: &str = r#"
[[acl]]
identity = "publisher"
publish = ["articulos/#"]
[[acl]]
identity = "subscriber"
subscribe = ["articulos/#", "$SYS/#"]
"#;

#[tokio::test]
async fn metrics_count_a_known_sequence() {
    let (broker, _) = TestBroker::start_from_file(RULES).await;
    let metrics = broker.handle.as_ref().unwrap().metrics_addr().unwrap();
    let mut publ = broker.client("publisher", "m-pub").await;
    let mut sub = broker
        .tls(Some(&broker.pki.client("subscriber")))
        .await
        .unwrap();
    sub.connect("m-sub", true, 30).await;
    sub.subscribe("articulos/+/futbol", QoS::AtLeastOnce).await;
    let refused = broker.tls(None).await;
    if let Ok(mut c) = refused {
        let _ = c.try_recv().await;
    }
    wait_for_log(&["connection refused", "no client certificate"]).await;
    for i in 0..10 {
        publ.publish(
            "articulos/m/futbol",
            format!("{i}").as_bytes(),
            QoS::AtLeastOnce,
            false,
        )
        .await;
    }
    for _ in 0..10 {
        sub.next_publish().await;
    }
    assert_eq!(
        publ.subscribe("articulos/#", QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Failure]
    );

    let body = scrape(metrics).await;
    assert_eq!(value(&body, "broker_connections_total"), 2.0, "{body}");
    assert_eq!(value(&body, "broker_connections_open"), 2.0, "{body}");
    assert_eq!(
        value(&body, r#"broker_refusals_total{reason="no_certificate"}"#),
        1.0,
        "{body}"
    );
    assert_eq!(
        value(&body, r#"broker_messages_received_total{qos="1"}"#),
        10.0,
        "{body}"
    );
    assert_eq!(
        value(&body, r#"broker_messages_sent_total{qos="1"}"#),
        10.0,
        "{body}"
    );
    assert_eq!(
        value(&body, r#"broker_acl_denials_total{action="subscribe"}"#),
        1.0,
        "{body}"
    );
    assert_eq!(
        value(&body, r#"broker_sessions{state="online"}"#),
        2.0,
        "{body}"
    );
    assert!(value(&body, "broker_received_bytes_total") > 0.0, "{body}");
    assert!(
        value(&body, "broker_handshake_seconds_count") >= 2.0,
        "{body}"
    );
    assert!(
        body.contains("broker_certificate_expiry_days{file="),
        "{body}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn sys_topics_only_where_the_acl_grants_them() {
    let extra = format!("{RULES}\n[metrics]\nbind = \"127.0.0.1:0\"\nsys_interval_secs = 1\n");
    let (broker, _) = TestBroker::start_from_file(&extra).await;
    let mut observer = broker.client("subscriber", "sys-reader").await;
    let mut other = broker.client("publisher", "sys-intruder").await;
    assert_eq!(
        other.subscribe("$SYS/#", QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Failure]
    );
    observer
        .subscribe("$SYS/broker/clients/connected", QoS::AtMostOnce)
        .await;
    // Values come every second; wait for one that counts both clients.
    loop {
        let p = observer.next_publish().await;
        assert_eq!(p.topic, "$SYS/broker/clients/connected");
        if &p.payload[..] == b"2" {
            break;
        }
    }
    other.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn clients_cannot_publish_into_sys_even_without_acl_rules() {
    let broker = TestBroker::start().await;
    let mut observer = broker.client("observer", "sys-watch").await;
    observer
        .subscribe("$SYS/broker/fake", QoS::AtMostOnce)
        .await;
    let mut forger = broker.client("publisher", "sys-forger").await;
    forger
        .publish("$SYS/broker/fake", b"1", QoS::AtLeastOnce, false)
        .await;
    wait_for_log(&[
        "denied: not authorized",
        "client_id=sys-forger",
        "topic=$SYS/broker/fake",
    ])
    .await;
    observer.expect_no_publish().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn json_logs_are_parseable_with_client_fields() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let config = crate::process::write_config(dir.path());
    let mut child = crate::process::Running(
        Command::new(crate::process::BIN)
            .arg("--config")
            .arg(&config)
            .env("BROKER__LOG__FORMAT", "json")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut next_json = move || -> serde_json::Value {
        let line = lines.next().expect("broker stdout ended").unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let addr: SocketAddr = loop {
        let v = next_json();
        if v["message"] == "listening for MQTT over mutual TLS" {
            break v["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    let layout = broker::pki::Layout::in_dir(&dir.path().join("certs"));
    let cert = broker::pki::Issued {
        cert_pem: std::fs::read_to_string(layout.client_cert("publisher")).unwrap(),
        key_pem: std::fs::read_to_string(layout.client_key("publisher")).unwrap(),
    };
    let ca = std::fs::read_to_string(&layout.ca_cert).unwrap();
    let mut c = TestClient::tls(addr, &ca, Some(&cert)).await.unwrap();
    c.connect("json-client", true, 30).await;
    let connected = tokio::task::spawn_blocking(move || loop {
        let v = next_json();
        if v["message"] == "client connected" {
            return v;
        }
    })
    .await
    .unwrap();
    assert_eq!(connected["identity"], "publisher");
    assert_eq!(connected["client_id"], "json-client");
    assert_eq!(connected["addr"], c.local.to_string());
    assert_eq!(connected["level"], "INFO");
}

/// Every connection that ends after its CONNECT is counted by its reason.
#[tokio::test]
async fn disconnections_are_counted_by_reason() {
    let broker = TestBroker::start().await;
    let metrics = broker.handle.as_ref().unwrap().metrics_addr().unwrap();
    let mut polite = broker.client("publisher", "d-polite").await;
    polite
        .send(rumqttc::mqttbytes::v4::Packet::Disconnect)
        .await;
    polite.expect_closed().await;
    let mut rude = broker.client("publisher", "d-rude").await;
    // A CONNACK is a packet only a server sends: a protocol violation.
    rude.send_raw(&[0x20, 0x02, 0x00, 0x00]).await;
    rude.expect_closed().await;
    wait_for_log(&[
        "connection closed for a protocol violation",
        "client_id=d-rude",
    ])
    .await;
    let body = scrape(metrics).await;
    assert_eq!(
        value(
            &body,
            r#"broker_disconnections_total{reason="client_disconnect"}"#
        ),
        1.0,
        "{body}"
    );
    assert_eq!(
        value(
            &body,
            r#"broker_disconnections_total{reason="protocol_violation"}"#
        ),
        1.0,
        "{body}"
    );
    broker.shutdown().await;
}
