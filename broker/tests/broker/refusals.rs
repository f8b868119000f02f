//! Every refusal really attempted, its outcome and its WARN line asserted.

use crate::common::*;
use broker::pki::{Authority, Issued, LeafSpec};
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Tries a TLS connection and a CONNECT with `cert`; asserts the broker ends it
/// without a CONNACK, and returns the client's local address.
async fn attempt(broker: &TestBroker, cert: Option<&Issued>) -> SocketAddr {
    let tcp = TcpStream::connect(broker.addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let connector = TlsConnector::from(client_tls_config(&broker.pki.ca_pem(), cert));
    let name = ServerName::try_from("localhost").unwrap();
    // TLS 1.3 clients finish their side before the broker checks their certificate,
    // so the refusal may arrive on the first read instead.
    if let Ok(mut tls) = connector.connect(name, tcp).await {
        let mut out = bytes::BytesMut::new();
        Packet::Connect(v4::Connect::new("intruder"))
            .write(&mut out, usize::MAX)
            .unwrap();
        let _ = tls.write_all(&out).await;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(WAIT, tls.read(&mut buf))
            .await
            .expect("broker kept the connection open");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "broker answered a refused client: {read:?}"
        );
    }
    local
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let broker = TestBroker::start().await;
    let local = attempt(&broker, None).await;
    wait_for_log(&[
        "WARN",
        "connection refused",
        "no client certificate",
        &local.to_string(),
    ])
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let broker = TestBroker::start().await;
    let rogue = Authority::generate("rogue CA").unwrap();
    let cert = rogue.issue(&LeafSpec::client("publisher", 30)).unwrap();
    let local = attempt(&broker, Some(&cert)).await;
    wait_for_log(&[
        "WARN",
        "connection refused",
        "unknown CA",
        &local.to_string(),
    ])
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let broker = TestBroker::start().await;
    let mut spec = LeafSpec::client("publisher", 1);
    spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let cert = broker.pki.issue(&spec);
    let local = attempt(&broker, Some(&cert)).await;
    wait_for_log(&[
        "WARN",
        "connection refused",
        "expired certificate",
        &local.to_string(),
    ])
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn plain_mqtt_on_the_tls_port_is_refused() {
    let broker = TestBroker::start().await;
    let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let mut out = bytes::BytesMut::new();
    Packet::Connect(v4::Connect::new("plain"))
        .write(&mut out, usize::MAX)
        .unwrap();
    tcp.write_all(&out).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "no answer to plain MQTT");
    wait_for_log(&[
        "connection refused",
        "not TLS: plain MQTT",
        &local.to_string(),
    ])
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn garbage_after_the_handshake_is_refused() {
    let broker = TestBroker::start().await;
    let mut c = broker
        .tls(Some(&broker.pki.client("publisher")))
        .await
        .unwrap();
    c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    c.expect_closed().await;
    wait_for_log(&[
        "connection refused",
        "not MQTT",
        &c.local.to_string(),
        "identity=publisher",
    ])
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn unsupported_protocol_gets_connack_return_code_1() {
    let broker = TestBroker::start().await;
    let mut c = broker
        .tls(Some(&broker.pki.client("publisher")))
        .await
        .unwrap();
    // MQTT 3.1: protocol name "MQIsdp", level 3.
    let mut connect = vec![0x10, 0x14, 0x00, 0x06];
    connect.extend_from_slice(b"MQIsdp");
    connect.extend_from_slice(&[0x03, 0x02, 0x00, 0x3c, 0x00, 0x06]);
    connect.extend_from_slice(b"old311");
    c.send_raw(&connect).await;
    match c.recv().await {
        Packet::ConnAck(ack) => assert_eq!(ack.code, v4::ConnectReturnCode::RefusedProtocolVersion),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c.expect_closed().await;
    wait_for_log(&[
        "connection refused",
        "unsupported MQTT protocol level 3",
        &c.local.to_string(),
    ])
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn connection_over_max_connections_is_refused_and_others_keep_working() {
    let broker = TestBroker::start_with(|c| c.listener.max_connections = 2).await;
    let mut one = broker.client("publisher", "one").await;
    let mut two = broker.client("subscriber", "two").await;
    two.subscribe("m", QoS::AtLeastOnce).await;
    let local = attempt(&broker, Some(&broker.pki.client("observer"))).await;
    wait_for_log(&[
        "connection refused",
        "too many connections",
        &local.to_string(),
    ])
    .await;
    one.publish("m", b"fine", QoS::AtLeastOnce, false).await;
    assert_eq!(&two.next_publish().await.payload[..], b"fine");
    drop(one);
    // A freed slot is usable again.
    let mut three = broker.client("observer", "three").await;
    three.publish("m", b"again", QoS::AtLeastOnce, false).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn packet_over_max_packet_size_disconnects_only_its_sender() {
    let broker = TestBroker::start_with(|c| c.listener.max_packet_size = 1024).await;
    let mut big = broker.client("publisher", "big").await;
    let mut sub = broker.client("subscriber", "small").await;
    sub.subscribe("size/#", QoS::AtLeastOnce).await;
    big.send(Packet::Publish(v4::Publish::new(
        "size/big",
        QoS::AtMostOnce,
        vec![0u8; 2048],
    )))
    .await;
    big.expect_closed().await;
    wait_for_log(&["packet too large", "2", &big.local.to_string()]).await;
    let mut other = broker.client("publisher", "other").await;
    other
        .publish("size/ok", b"small", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"small");
    broker.shutdown().await;
}

#[tokio::test]
async fn silent_tcp_clients_do_not_delay_others_and_are_closed_after_the_timeout() {
    let broker = TestBroker::start_with(|c| c.listener.handshake_timeout_secs = 1).await;
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(broker.addr).await.unwrap());
    }
    // One stalls half-way: a TLS record header promising more than it sends.
    let mut stalled = TcpStream::connect(broker.addr).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    let stalled_local = stalled.local_addr().unwrap();

    let started = Instant::now();
    let mut c = broker
        .tls(Some(&broker.pki.client("publisher")))
        .await
        .unwrap();
    let ack = c.connect("normal", true, 30).await;
    let took = started.elapsed();
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    assert!(
        took < Duration::from_secs(1),
        "CONNACK took {took:?} behind silent clients"
    );

    silent.push(stalled);
    for mut s in silent {
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("silent socket never closed");
        assert!(matches!(read, Ok(0) | Err(_)));
    }
    wait_for_log(&[
        "connection refused",
        "handshake timeout",
        &stalled_local.to_string(),
    ])
    .await;
    broker.shutdown().await;
}
