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
/// node 2 is killed halfway. Every article A acknowledged reaches B's subscriber.
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
                }
                Err(_) => sub.send(rumqttc::mqttbytes::v4::Packet::PingReq).await,
            }
        }
        got
    });
    for i in 0..N {
        if i == N / 2 {
            nats.kill(2);
        }
        publisher
            .publish(
                "articulos/elpais/futbol",
                format!("{i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
    let got = tokio::time::timeout(Duration::from_secs(90), receive)
        .await
        .expect("articles missing at edge B after 90 s")
        .unwrap();
    assert_eq!(got, (0..N).collect::<BTreeSet<_>>());
}
