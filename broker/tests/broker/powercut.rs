//! Acknowledged means it survives a power cut: the broker's store on `PowerFs`, a FUSE
//! file system that keeps whatever was not fsynced in a volatile cache and drops it on
//! a simulated power cut. 1,000 retained and 1,000 queued QoS 1 messages are
//! acknowledged, the broker is killed and the power cut at once, and the broker
//! started again on what the "disk" kept. With `sync = "disk"` all 2,000 are there;
//! with `"os"` they are not (so the test can fail); a store whose fsync fails
//! acknowledges nothing, then or later.

use crate::common::*;
use crate::durability::{persistent, publish_all, subscribe_and_leave};
use crate::persistence::{retained_after_restart, start, Proc};
use crate::powerfs::{self, PowerFs};
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use std::collections::HashSet;
use std::path::Path;

const N: usize = 1000;

/// A broker folder whose `data/` is a fresh `PowerFs`, and `[storage] sync = sync`.
fn on_power_fs(dir: &Path, sync: &str) -> PowerFs {
    if let Err(why) = powerfs::available() {
        panic!("the power-cut tests need FUSE as root: {why}");
    }
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let fs = PowerFs::mount(&data).expect("mount PowerFs");
    let config = crate::process::write_config(dir);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("[storage]\nsync = \"{sync}\"\n"));
    std::fs::write(&config, text).unwrap();
    fs
}

/// `n` retained QoS 1 messages on topics no subscription matches, all in flight at
/// once, then every PUBACK.
async fn publish_retained(c: &mut TestClient, n: usize) {
    for i in 0..n {
        let mut p = v4::Publish::new(
            format!("articulos/r{i}/portada"),
            QoS::AtLeastOnce,
            format!("retenido {i}"),
        );
        p.retain = true;
        p.pkid = (i + 1) as u16;
        c.send(Packet::Publish(p)).await;
    }
    for _ in 0..n {
        match c.recv().await {
            Packet::PubAck(_) => {}
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

/// What a persistent subscriber is sent once back: distinct payloads. Each PINGREQ
/// round ends at its PINGRESP; a round that brings nothing means all came.
async fn queued_after_restart(c: &mut TestClient) -> HashSet<String> {
    let mut got = HashSet::new();
    loop {
        c.send(Packet::PingReq).await;
        let mut this_round = 0;
        loop {
            match c.recv().await {
                Packet::Publish(p) => {
                    c.send(Packet::PubAck(v4::PubAck::new(p.pkid))).await;
                    got.insert(String::from_utf8(p.payload.to_vec()).unwrap());
                    this_round += 1;
                }
                Packet::PingResp => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        if this_round == 0 {
            return got;
        }
    }
}

/// Queues `N` messages for an offline persistent subscriber and stores `N` retained
/// ones, every one acknowledged; kills the broker and cuts the power at once; starts
/// it again. Returns how many retained and queued messages came back.
async fn acknowledge_then_cut(sync: &str) -> (usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let fs = on_power_fs(dir.path(), sync);
    let broker = start(dir.path());
    subscribe_and_leave(&broker, dir.path(), "lector", QoS::AtLeastOnce).await;
    let mut publ = broker.tls(dir.path(), "publisher").await;
    publ.connect("redaccion", true, 30).await;
    publish_retained(&mut publ, N).await;
    publish_all(&mut publ, N).await;
    // Over sled's blob threshold: a file of its own, created in `blobs/`.
    publ.publish(BIG_TOPIC, &big(), QoS::AtLeastOnce, true)
        .await;
    broker.kill9();
    fs.power_cut();

    let broker = start(dir.path());
    let mut reader = broker.tls(dir.path(), "subscriber").await;
    reader.connect("curioso", true, 30).await;
    let retained = retained_after_restart_on(&mut reader).await;
    let (mut sub, _) = persistent(&broker, dir.path(), "subscriber", "lector").await;
    let queued = queued_after_restart(&mut sub).await;
    broker.kill9();
    let (fsyncs, dir_fsyncs) = fs.syncs();
    eprintln!("sync = {sync}: {fsyncs} fsyncs of files, {dir_fsyncs} of folders");
    drop(fs);
    (retained, queued.len())
}

/// Retained `…/portada` messages a new subscriber is sent, the big one counted only
/// when it is whole.
async fn retained_after_restart_on(c: &mut TestClient) -> usize {
    let got = retained_after_restart(c).await;
    let whole_big = got.get(BIG_TOPIC).is_some_and(|p| *p == big());
    got.keys()
        .filter(|t| t.ends_with("/portada") && *t != BIG_TOPIC)
        .count()
        + usize::from(whole_big)
}

const BIG_TOPIC: &str = "articulos/grande/portada";

fn big() -> Vec<u8> {
    (0..600_000u32).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn with_sync_disk_every_acknowledged_message_survives_a_power_cut() {
    let (retained, queued) = acknowledge_then_cut("disk").await;
    assert_eq!(
        (retained, queued),
        (N + 1, N),
        "retained (with one of 600 kB) and queued messages after the power cut"
    );
}

#[tokio::test]
async fn with_sync_os_a_power_cut_loses_acknowledged_messages() {
    let (retained, queued) = acknowledge_then_cut("os").await;
    eprintln!("sync = os: {retained} retained and {queued} queued of {N} each after the cut");
    assert!(
        retained + queued < 2 * N + 1,
        "sync = \"os\" kept all {} messages through a power cut: the test cannot tell the modes apart",
        2 * N + 1
    );
}

#[tokio::test]
async fn a_store_that_cannot_fsync_acknowledges_nothing_then_or_later() {
    let dir = tempfile::tempdir().unwrap();
    let fs = on_power_fs(dir.path(), "disk");
    let broker = start(dir.path());
    let mut publ = broker.tls(dir.path(), "publisher").await;
    publ.connect("antes", true, 30).await;
    publ.publish("articulos/a/portada", b"guardado", QoS::AtLeastOnce, true)
        .await;

    fs.fail_fsync(true);
    let refused = publish_unacknowledged(&broker, dir.path(), "durante").await;
    assert!(refused, "a PUBACK went out although fsync failed");
    let line = broker.wait_for_line(&["ERROR", "fsync failed"]);
    assert!(line.contains("data/retained"), "{line}");
    // The disk recovers, but what it dropped cannot be known: still nothing.
    fs.fail_fsync(false);
    assert!(
        publish_unacknowledged(&broker, dir.path(), "despues").await,
        "acknowledged after an fsync failure, before a restart"
    );
    // Everyone else is still served.
    let mut other = broker.tls(dir.path(), "subscriber").await;
    other.connect("mirando", true, 30).await;
    other.expect_no_publish().await;
    broker.kill9();

    // A restart reads back what the store really holds, and acknowledges again.
    let broker = start(dir.path());
    let mut publ = broker.tls(dir.path(), "publisher").await;
    publ.connect("vuelta", true, 30).await;
    publ.publish("articulos/b/portada", b"otra vez", QoS::AtLeastOnce, true)
        .await;
    broker.kill9();
    drop(fs);
}

/// Publishes one retained QoS 1 message from a new connection; true when the broker
/// closed the connection instead of acknowledging it.
async fn publish_unacknowledged(broker: &Proc, dir: &Path, id: &str) -> bool {
    let mut c = broker.tls(dir, "publisher").await;
    c.connect(id, true, 30).await;
    let mut p = v4::Publish::new("articulos/c/portada", QoS::AtLeastOnce, "perdido");
    p.retain = true;
    p.pkid = 1;
    c.send(Packet::Publish(p)).await;
    match c.try_recv().await {
        None => true,
        Some(Packet::PubAck(_)) => false,
        Some(other) => panic!("expected PUBACK or a close, got {other:?}"),
    }
}
