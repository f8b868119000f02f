//! Bridges to other brokers, started by the tests: Debian's Mosquitto with
//! `require_certificate`, and a three-node NATS cluster through its MQTT listeners
//! (JetStream on), with one node killed while articles flow from edge A to edge B.

use crate::bridges::{bridge, text};
use crate::common::*;
use crate::upstream::{MosquittoUpstream, NatsCluster};
use broker::{BridgeProtocol, Direction};
use rumqttc::mqttbytes::QoS;
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test]
async fn mosquitto_as_the_upstream_out_and_in_with_prefixes() {
    for (name, protocol) in [
        ("mosq311", BridgeProtocol::V311),
        ("mosq5", BridgeProtocol::V5),
    ] {
        let pki = TestPki::new();
        let Some(mosquitto) = MosquittoUpstream::start(&pki).await else {
            return;
        };
        let at_mosquitto = |who: &'static str, id: &'static str| {
            let (pki, addr) = (&pki, mosquitto.addr());
            async move {
                let mut c = TestClient::tls(addr, &pki.ca_pem(), Some(&pki.client(who)))
                    .await
                    .unwrap();
                c.connect(id, true, 30).await;
                c
            }
        };
        let mut up_sub = at_mosquitto("subscriber", "up-sub").await;
        up_sub.subscribe("sites/edge-1/#", QoS::AtLeastOnce).await;
        let b = bridge(
            name,
            protocol,
            mosquitto.addr(),
            mosquitto.ca_file(),
            &pki,
            &[
                ("articulos/#", Direction::Out, "", "sites/edge-1/"),
                ("ordenes/#", Direction::In, "cloud/", "central/"),
            ],
        );
        let edge = TestBroker::start_with(|c| c.bridge.push(b)).await;
        wait_for_log(&["bridge connected", name]).await;
        mosquitto.wait_for_log(&["edge-", "observer"]).await;

        let mut edge_pub = edge.client("publisher", "edge-pub").await;
        edge_pub
            .publish("articulos/elpais/futbol", b"gol", QoS::AtLeastOnce, false)
            .await;
        let got = up_sub.next_publish().await;
        assert_eq!(
            text(&got),
            ("sites/edge-1/articulos/elpais/futbol".into(), "gol".into()),
            "{name}"
        );
        assert_eq!(got.qos, QoS::AtLeastOnce);

        let mut edge_sub = edge.client("subscriber", "edge-sub").await;
        edge_sub
            .subscribe("cloud/ordenes/#", QoS::AtLeastOnce)
            .await;
        let mut up_pub = at_mosquitto("publisher", "up-pub").await;
        up_pub
            .publish("central/ordenes/parar", b"ya", QoS::AtLeastOnce, false)
            .await;
        let got = edge_sub.next_publish().await;
        assert_eq!(
            text(&got),
            ("cloud/ordenes/parar".into(), "ya".into()),
            "{name}"
        );
        assert_eq!(got.qos, QoS::AtLeastOnce);
    }
}

/// Edge A bridges `articulos/#` out to NATS node 0, edge B bridges it in from node 1;
/// node 2 is killed once half the articles have crossed. Every article A acknowledged
/// reaches B's subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn articles_cross_a_nats_cluster_between_two_edges_while_a_node_dies() {
    const N: usize = 200;
    let pki = TestPki::new();
    let Some(mut nats) = NatsCluster::start(&pki).await else {
        return;
    };
    let topics = [("articulos/#", Direction::Out, "", "")];
    let out = bridge(
        "nats-a",
        BridgeProtocol::V311,
        nats.mqtt_addr(0),
        nats.ca_file(),
        &pki,
        &topics,
    );
    let topics = [("articulos/#", Direction::In, "", "")];
    let inward = bridge(
        "nats-b",
        BridgeProtocol::V311,
        nats.mqtt_addr(1),
        nats.ca_file(),
        &pki,
        &topics,
    );
    let edge_a = TestBroker::start_with(|c| c.bridge.push(out)).await;
    let edge_b = TestBroker::start_with(|c| c.bridge.push(inward)).await;
    wait_for_log(&["bridge connected", "nats-a"]).await;
    wait_for_log(&["bridge connected", "nats-b"]).await;

    let mut sub = edge_b.client("subscriber", "sub-b").await;
    sub.subscribe("articulos/+/futbol", QoS::AtLeastOnce).await;
    let mut publisher = edge_a.client("publisher", "pub-a").await;
    let (progress, mut arrived) = tokio::sync::watch::channel(0usize);
    let receive = tokio::spawn(async move {
        let mut got = BTreeSet::new();
        while got.len() < N {
            // The cluster may pause for its elections longer than the client's own
            // timeout: wait in short rounds (reads are cancel-safe).
            match tokio::time::timeout(Duration::from_secs(5), sub.next_publish()).await {
                Ok(p) => {
                    got.insert(
                        String::from_utf8(p.payload.to_vec())
                            .unwrap()
                            .parse::<usize>()
                            .unwrap(),
                    );
                    progress.send_replace(got.len());
                }
                Err(_) => sub.send(rumqttc::mqttbytes::v4::Packet::PingReq).await,
            }
        }
        got
    });
    // Half while the cluster is whole and the articles flow...
    publish_range(0..N / 2, &mut publisher).await;
    let flowing = tokio::time::timeout(Duration::from_secs(60), arrived.wait_for(|n| *n >= N / 2))
        .await
        .is_ok();
    assert!(flowing, "the first {} articles did not reach edge B", N / 2);
    // ...the rest after a node other than the two edges' is killed.
    nats.kill(2);
    publish_range(N / 2..N, &mut publisher).await;
    let Ok(got) = tokio::time::timeout(Duration::from_secs(90), receive).await else {
        let logs = captured()
            .text
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        let bridges: Vec<&str> = logs.lines().filter(|l| l.contains("nats-")).collect();
        let tail = |n: usize| {
            let log = nats.log(n);
            let lines: Vec<String> = log
                .lines()
                .filter(|l| !l.contains("connect to route"))
                .rev()
                .take(25)
                .map(str::to_string)
                .collect();
            lines
        };
        let metrics = |edge: &TestBroker| {
            let addr = edge.handle.as_ref().and_then(|h| h.metrics_addr());
            async move {
                let text = scrape(addr.unwrap()).await;
                text.lines()
                    .filter(|l| l.starts_with("broker_bridge"))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            }
        };
        panic!(
            "{} of {N} articles at edge B 90 s after the kill; the bridges said: {bridges:#?}\nnode 0: {:#?}\nnode 1: {:#?}\nA: {:#?}\nB: {:#?}",
            *arrived.borrow(),
            tail(0),
            tail(1),
            metrics(&edge_a).await,
            metrics(&edge_b).await,
        );
    };
    let got = got.unwrap();
    assert_eq!(got, (0..N).collect::<BTreeSet<_>>());
}

/// Publishes the numbers in `range` as QoS 1 articles, each acknowledged.
async fn publish_range(range: std::ops::Range<usize>, publisher: &mut TestClient) {
    for i in range {
        let payload = format!("{i}");
        publisher
            .publish(
                "articulos/elpais/futbol",
                payload.as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
}
