//! Bridges (`[[bridge]]`) against real upstreams started here: a second instance of
//! our broker, in-process or as the binary killed with SIGKILL. Messages cross both
//! ways with their prefixes, never come back, wait on disk while the upstream is away,
//! and a refused certificate is retried without end and without growing.

use crate::common::*;
use crate::persistence::{start, Proc};
use broker::{BridgeConfig, BridgeProtocol, BridgeTopic, Direction};
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use std::path::Path;
use std::time::{Duration, Instant};

/// A bridge `name` to `upstream`, with the upstream's `observer` certificate.
fn bridge_to(
    upstream: &TestBroker,
    name: &str,
    protocol: BridgeProtocol,
    topics: &[(&str, Direction, &str, &str)],
) -> BridgeConfig {
    bridge(
        name,
        protocol,
        upstream.addr,
        &upstream.pki.layout.ca_cert,
        &upstream.pki,
        topics,
    )
}

/// A bridge `name` to the server at `addr` (whose CA is `ca`), with `pki`'s `observer`
/// certificate; topics as (pattern, direction, local prefix, remote prefix), QoS 1.
pub fn bridge(
    name: &str,
    protocol: BridgeProtocol,
    addr: std::net::SocketAddr,
    ca: &Path,
    pki: &TestPki,
    topics: &[(&str, Direction, &str, &str)],
) -> BridgeConfig {
    BridgeConfig {
        name: name.into(),
        address: addr.to_string(),
        ca_file: ca.to_path_buf(),
        cert_file: pki.layout.client_cert("observer"),
        key_file: pki.layout.client_key("observer"),
        client_id: Some(format!("edge-{name}")),
        protocol,
        keep_alive_secs: 30,
        local_identity: None,
        max_queued: 100_000,
        max_queued_bytes: 1 << 30,
        max_inflight: 100,
        topic: topics
            .iter()
            .map(|(pattern, direction, local, remote)| BridgeTopic {
                pattern: pattern.to_string(),
                direction: *direction,
                qos: 1,
                local_prefix: local.to_string(),
                remote_prefix: remote.to_string(),
            })
            .collect(),
    }
}

pub fn text(p: &v4::Publish) -> (String, String) {
    (
        p.topic.clone(),
        String::from_utf8_lossy(&p.payload).to_string(),
    )
}

#[tokio::test]
async fn messages_cross_to_our_own_broker_both_ways_with_their_prefixes() {
    let upstream = TestBroker::start().await;
    let mut up_sub = upstream.client("subscriber", "up-sub").await;
    up_sub.subscribe("sites/edge-1/#", QoS::AtLeastOnce).await;
    let bridge = bridge_to(
        &upstream,
        "prefixes",
        BridgeProtocol::V5,
        &[
            ("articulos/#", Direction::Out, "", "sites/edge-1/"),
            ("ordenes/#", Direction::In, "cloud/", ""),
        ],
    );
    let edge = TestBroker::start_with(|c| c.bridge.push(bridge)).await;
    wait_for_log(&["bridge connected", "prefixes"]).await;

    let mut edge_pub = edge.client("publisher", "edge-pub").await;
    edge_pub
        .publish("articulos/elpais/futbol", b"gol", QoS::AtLeastOnce, false)
        .await;
    let got = up_sub.next_publish().await;
    assert_eq!(
        text(&got),
        ("sites/edge-1/articulos/elpais/futbol".into(), "gol".into())
    );
    assert_eq!(got.qos, QoS::AtLeastOnce);

    let mut edge_sub = edge.client("subscriber", "edge-sub").await;
    edge_sub
        .subscribe("cloud/ordenes/#", QoS::AtLeastOnce)
        .await;
    let mut up_pub = upstream.client("publisher", "up-pub").await;
    up_pub
        .publish("ordenes/parar", b"ya", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(
        text(&edge_sub.next_publish().await),
        ("cloud/ordenes/parar".into(), "ya".into())
    );
    // Outside every route: not forwarded.
    up_pub
        .publish("otros/x", b"no", QoS::AtLeastOnce, false)
        .await;
    edge_pub
        .publish("otros/y", b"no", QoS::AtLeastOnce, false)
        .await;
    up_sub.expect_no_publish().await;

    let metrics = scrape(edge.handle.as_ref().unwrap().metrics_addr().unwrap()).await;
    for line in [
        "broker_bridge_connected{bridge=\"prefixes\"} 1",
        "broker_bridge_forwarded_total{bridge=\"prefixes\",direction=\"out\"} 1",
        "broker_bridge_forwarded_total{bridge=\"prefixes\",direction=\"in\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
}

/// A topic bridged both ways: what goes up never comes back down, and what comes
/// down never goes back up, with an MQTT 5 upstream (No Local) and a 3.1.1 one
/// (which echoes: the bridge recognises its own messages).
#[tokio::test]
async fn a_topic_bridged_both_ways_never_comes_back() {
    for (name, protocol) in [
        ("loop5", BridgeProtocol::V5),
        ("loop311", BridgeProtocol::V311),
    ] {
        let upstream = TestBroker::start().await;
        let bridge = bridge_to(
            &upstream,
            name,
            protocol,
            &[("chat/#", Direction::Both, "", "")],
        );
        let edge = TestBroker::start_with(|c| c.bridge.push(bridge)).await;
        wait_for_log(&["bridge connected", name]).await;
        let mut up = upstream.client("subscriber", "up").await;
        up.subscribe("chat/#", QoS::AtLeastOnce).await;
        let mut down = edge.client("subscriber", "down").await;
        down.subscribe("chat/#", QoS::AtLeastOnce).await;
        let mut up_pub = upstream.client("publisher", "up-pub").await;
        let mut down_pub = edge.client("publisher", "down-pub").await;

        // Up: the edge's subscriber has it once, from its own broker; the upstream once.
        down_pub
            .publish("chat/a", b"1", QoS::AtLeastOnce, false)
            .await;
        assert_eq!(text(&down.next_publish().await).1, "1");
        assert_eq!(text(&up.next_publish().await).1, "1");
        // An echo would reach the edge ahead of this marker (same bridge subscription,
        // in order): the next thing the edge's subscriber gets is the marker.
        up_pub
            .publish("chat/m", b"marker-1", QoS::AtLeastOnce, false)
            .await;
        assert_eq!(text(&up.next_publish().await).1, "marker-1");
        assert_eq!(
            text(&down.next_publish().await).1,
            "marker-1",
            "{name}: echo came back down"
        );

        // Down, the other way round.
        up_pub
            .publish("chat/b", b"2", QoS::AtLeastOnce, false)
            .await;
        assert_eq!(text(&up.next_publish().await).1, "2");
        assert_eq!(text(&down.next_publish().await).1, "2");
        down_pub
            .publish("chat/m", b"marker-2", QoS::AtLeastOnce, false)
            .await;
        assert_eq!(text(&down.next_publish().await).1, "marker-2");
        assert_eq!(
            text(&up.next_publish().await).1,
            "marker-2",
            "{name}: went back up"
        );
        up.expect_no_publish().await;
        down.expect_no_publish().await;
    }
}

/// The edge as the real binary on `dir`, bridged to `upstream` at `addr` for
/// `articulos/#` out, under `sites/e/`.
fn edge_with_bridge(dir: &Path, upstream: &TestBroker, name: &str) -> Proc {
    let config = crate::process::write_config(dir);
    let layout = &upstream.pki.layout;
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[bridge]]\nname = \"{name}\"\naddress = \"{}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nprotocol = \"5\"\n\n[[bridge.topic]]\npattern = \"articulos/#\"\ndirection = \"out\"\nqos = 1\nremote_prefix = \"sites/e/\"\n",
        upstream.addr,
        layout.ca_cert.display(),
        layout.client_cert("observer").display(),
        layout.client_key("observer").display(),
    ));
    std::fs::write(&config, text).unwrap();
    start(dir)
}

/// Starts our broker again on `pki` and `addr` (same port, same data).
async fn upstream_again(pki: TestPki, addr: std::net::SocketAddr) -> TestBroker {
    let mut config = pki.config();
    config.listener.bind = addr;
    let handle = broker::start(config).await.unwrap();
    TestBroker {
        addr: handle.local_addr(),
        pki,
        handle: Some(handle),
    }
}

// The in-process upstream runs on other workers while this thread waits for the
// edge's lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_acknowledged_while_the_upstream_is_down_survive_sigkill_and_arrive_in_order() {
    const N: usize = 500;
    let mut upstream = TestBroker::start().await;
    let addr = upstream.addr;
    // A persistent subscriber upstream, away for now.
    let mut sub = upstream
        .tls(Some(&upstream.pki.client("subscriber")))
        .await
        .unwrap();
    sub.connect("up-sub", false, 30).await;
    sub.subscribe("sites/e/#", QoS::AtLeastOnce).await;
    sub.send(Packet::Disconnect).await;

    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_bridge(dir.path(), &upstream, "saf");
    edge.wait_for_line(&["bridge connected", "saf"]);
    if let Some(h) = upstream.handle.take() {
        h.shutdown().await;
    }
    edge.wait_for_line(&["connection lost", "saf"]);

    let mut publisher = edge.tls(dir.path(), "publisher").await;
    publisher.connect("pub", true, 30).await;
    for i in 0..N {
        publisher
            .publish(
                "articulos/e/futbol",
                format!("{i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
    edge.kill9();

    let upstream = upstream_again(upstream.pki, addr).await;
    let edge = start(dir.path());
    edge.wait_for_line(&["bridge connected", "saf"]);
    let mut sub = upstream
        .tls(Some(&upstream.pki.client("subscriber")))
        .await
        .unwrap();
    sub.connect("up-sub", false, 30).await;
    let mut got = Vec::with_capacity(N);
    while got.len() < N {
        let p = sub.next_publish().await;
        assert_eq!(p.topic, "sites/e/articulos/e/futbol");
        got.push(
            String::from_utf8(p.payload.to_vec())
                .unwrap()
                .parse::<usize>()
                .unwrap(),
        );
    }
    // QoS 1 may repeat what was in flight at the kill; nothing may be missing, and the
    // first copies come in order.
    let mut firsts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for n in got {
        if seen.insert(n) {
            firsts.push(n);
        }
    }
    assert_eq!(firsts, (0..N).collect::<Vec<_>>());
    edge.stop();
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The upstream refuses our certificate (its CA does not know it): a WARN with that
/// reason, attempts for a minute with backoff, and memory that does not grow.
// The in-process upstream runs on other workers while this thread waits for the
// edge's lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_is_logged_and_retried_without_growing() {
    let upstream = TestBroker::start().await;
    let stranger = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = crate::process::write_config(dir.path());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[bridge]]\nname = \"refused\"\naddress = \"{}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n[[bridge.topic]]\npattern = \"articulos/#\"\n",
        upstream.addr,
        upstream.pki.layout.ca_cert.display(),
        stranger.layout.client_cert("observer").display(),
        stranger.layout.client_key("observer").display(),
    ));
    std::fs::write(&config, text).unwrap();
    let edge = start(dir.path());
    let line = edge.wait_for_line(&["cannot reach the upstream", "refused"]);
    assert!(
        line.contains("certificate refused by the upstream"),
        "{line}"
    );
    let first = rss_kib(edge.pid());
    let started = Instant::now();
    let (mut lines, mut attempts) = (1, 1);
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(line) = edge.lines.recv_timeout(Duration::from_secs(1)) {
            if line.contains("cannot reach the upstream") {
                assert!(
                    line.contains("certificate refused by the upstream"),
                    "{line}"
                );
                let unlogged: u64 = line
                    .split("failed_attempts_not_logged=")
                    .nth(1)
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_default();
                lines += 1;
                attempts += 1 + unlogged;
            }
        }
    }
    let last = rss_kib(edge.pid());
    // Attempts 1, 2, 4, 8, 16 s apart (jittered); repeats of one reason logged once
    // per 30 s with the count of those not logged.
    assert!(attempts >= 5, "{attempts} attempts in a minute");
    assert!(
        lines >= 2 && lines < attempts,
        "{lines} lines for {attempts} attempts"
    );
    assert!(
        last <= first + 2048,
        "RSS grew from {first} KiB to {last} KiB over a minute of refusals"
    );
    edge.stop();
}

#[tokio::test]
async fn no_network_client_may_use_a_bridge_client_id() {
    let broker = TestBroker::start().await;
    let mut c = broker
        .tls(Some(&broker.pki.client("publisher")))
        .await
        .unwrap();
    let ack = c.connect("$bridge/cloud", true, 30).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::BadClientId);
}

#[tokio::test]
async fn qos2_crosses_exactly_once_each_way() {
    let upstream = TestBroker::start().await;
    let mut b = bridge_to(
        &upstream,
        "qos2",
        BridgeProtocol::V5,
        &[
            ("q2/out/#", Direction::Out, "", ""),
            ("q2/in/#", Direction::In, "", ""),
        ],
    );
    for t in &mut b.topic {
        t.qos = 2;
    }
    let edge = TestBroker::start_with(|c| c.bridge.push(b)).await;
    wait_for_log(&["bridge connected", "qos2"]).await;
    let mut up = upstream.client("subscriber", "up").await;
    up.subscribe("q2/#", QoS::ExactlyOnce).await;
    let mut down = edge.client("subscriber", "down").await;
    down.subscribe("q2/in/#", QoS::ExactlyOnce).await;
    let mut down_pub = edge.client("publisher", "down-pub").await;
    let mut up_pub = upstream.client("publisher", "up-pub").await;
    for i in 0..20 {
        down_pub
            .publish(
                "q2/out/a",
                format!("o{i}").as_bytes(),
                QoS::ExactlyOnce,
                false,
            )
            .await;
        up_pub
            .publish(
                "q2/in/b",
                format!("i{i}").as_bytes(),
                QoS::ExactlyOnce,
                false,
            )
            .await;
    }
    let ups = receive_qos2(&mut up, 40).await;
    let outs: Vec<String> = ups.iter().filter(|p| p.starts_with('o')).cloned().collect();
    assert_eq!(outs, (0..20).map(|i| format!("o{i}")).collect::<Vec<_>>());
    let downs = receive_qos2(&mut down, 20).await;
    assert_eq!(downs, (0..20).map(|i| format!("i{i}")).collect::<Vec<_>>());
    up.expect_no_publish().await;
    down.expect_no_publish().await;
}

/// Receives `n` QoS 2 messages, completing each exchange as the broker interleaves
/// them; their payloads in order of arrival.
async fn receive_qos2(c: &mut TestClient, n: usize) -> Vec<String> {
    let (mut got, mut open) = (Vec::new(), 0);
    while got.len() < n || open > 0 {
        match c.recv().await {
            Packet::Publish(p) => {
                assert_eq!(p.qos, QoS::ExactlyOnce, "{}", p.topic);
                got.push(text(&p).1);
                open += 1;
                c.send(Packet::PubRec(v4::PubRec::new(p.pkid))).await;
            }
            Packet::PubRel(r) => {
                open -= 1;
                c.send(Packet::PubComp(v4::PubComp::new(r.pkid))).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

/// `[[bridge]]` sections follow the file: added, refused when invalid (the running
/// ones stay), removed (its session and queue go).
#[tokio::test]
async fn bridges_follow_the_configuration_file_on_reload() {
    let upstream = TestBroker::start().await;
    let (edge, path) = TestBroker::start_from_file("").await;
    let reloader = edge.handle.as_ref().unwrap().reloader();
    let section = |direction: &str| {
        format!(
            "[[bridge]]\nname = \"reloaded\"\naddress = \"{}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n[[bridge.topic]]\npattern = \"articulos/#\"\ndirection = \"{direction}\"\n",
            upstream.addr,
            upstream.pki.layout.ca_cert.display(),
            upstream.pki.layout.client_cert("observer").display(),
            upstream.pki.layout.client_key("observer").display(),
        )
    };
    std::fs::write(&path, config_text(&edge.pki, &section("out"))).unwrap();
    reloader.reload_acl();
    wait_for_log(&["bridge connected", "reloaded"]).await;

    std::fs::write(&path, config_text(&edge.pki, &section("sideways"))).unwrap();
    reloader.reload_acl();
    let line = wait_for_log(&["configuration reload failed", "sideways"]).await;
    assert!(
        line.contains("[[bridge]] \"reloaded\": topic[0].direction"),
        "{line}"
    );
    // Still bridged.
    let mut up = upstream.client("subscriber", "up").await;
    up.subscribe("articulos/#", QoS::AtLeastOnce).await;
    let mut publisher = edge.client("publisher", "pub").await;
    publisher
        .publish("articulos/a", b"still", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(text(&up.next_publish().await).1, "still");

    std::fs::write(&path, config_text(&edge.pki, "")).unwrap();
    reloader.reload_acl();
    wait_for_log(&["bridge removed from the configuration", "reloaded"]).await;
    wait_for_log(&["no longer configured ended", "$bridge/reloaded"]).await;
    publisher
        .publish("articulos/a", b"gone", QoS::AtLeastOnce, false)
        .await;
    up.expect_no_publish().await;
}

/// While the upstream is away, what goes out queues up to the bridge's limit; beyond,
/// messages are dropped and counted (the publisher is still acknowledged, as for any
/// full queue), never held in memory without bound.
#[tokio::test]
async fn an_unreachable_upstream_queues_up_to_the_limit_and_counts_the_rest() {
    let upstream = TestBroker::start().await;
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = nobody.local_addr().unwrap();
    drop(nobody);
    let mut b = bridge_to(
        &upstream,
        "full",
        BridgeProtocol::V5,
        &[("articulos/#", Direction::Out, "", "")],
    );
    b.address = closed.to_string();
    b.max_queued = 5;
    let edge = TestBroker::start_with(|c| c.bridge.push(b)).await;
    let line = wait_for_log(&["cannot reach the upstream", "full"]).await;
    assert!(line.contains("connection refused"), "{line}");
    let mut publisher = edge.client("publisher", "pub").await;
    for i in 0..12 {
        publisher
            .publish(
                "articulos/a",
                format!("{i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
    let metrics = scrape(edge.handle.as_ref().unwrap().metrics_addr().unwrap()).await;
    for line in [
        "broker_bridge_connected{bridge=\"full\"} 0",
        "broker_bridge_queued_messages{bridge=\"full\"} 5",
        "broker_bridge_dropped_total{bridge=\"full\"} 7",
        "broker_bridge_connect_failures_total{bridge=\"full\",reason=\"connection_refused\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
}

/// A bridge carries many clients' messages: the per-connection read budget does not
/// slow it (a client over the same budget is slowed, as `limits` tests).
#[tokio::test]
async fn the_read_budget_does_not_slow_a_bridge() {
    let upstream = TestBroker::start().await;
    let b = bridge_to(
        &upstream,
        "budget",
        BridgeProtocol::V5,
        &[("flujo/#", Direction::In, "", "")],
    );
    let edge = TestBroker::start_with(|c| {
        c.session.max_packets_per_sec = 20;
        c.bridge.push(b);
    })
    .await;
    wait_for_log(&["bridge connected", "budget"]).await;
    let mut down = edge.client("subscriber", "down").await;
    down.subscribe("flujo/#", QoS::AtLeastOnce).await;
    let mut up_pub = upstream.client("publisher", "up-pub").await;
    for i in 0..100 {
        up_pub
            .publish(
                "flujo/a",
                format!("{i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
    for i in 0..100 {
        assert_eq!(text(&down.next_publish().await).1, format!("{i}"));
    }
    let logs = captured()
        .text
        .lock()
        .map(|t| t.clone())
        .unwrap_or_default();
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("over its read budget") && l.contains("$bridge/budget")),
        "the bridge was throttled"
    );
}
