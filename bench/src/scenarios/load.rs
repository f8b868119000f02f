//! Publishers and subscribers: the engine of the throughput, fanout, latency and durable
//! scenarios. Every payload carries (publisher, sequence, send time); subscribers measure
//! latency from it and count losses per publisher by sequence gaps.

use crate::client::{self, write_flush, ConnectOpts};
use crate::payload::{self, Stamp};
use crate::stats::{now_ns, Latencies, SeqTracker, Summary};
use anyhow::Context;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Barrier, Semaphore};
use tokio_rustls::TlsConnector;

/// A load to offer.
#[derive(Debug, Clone)]
pub struct Load {
    pub publishers: usize,
    pub subscribers: usize,
    pub qos: QoS,
    /// Total offered rate (messages/s over all publishers); `None`: as fast as possible.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Messages per publisher; `None`: until `duration` ends (which bounds both).
    pub count: Option<u64>,
    pub payload: usize,
    /// Unacknowledged QoS 1 publishes per publisher.
    pub inflight: usize,
    pub retain: bool,
    /// Publisher i's topics (cycled): `topic(i, k)` for its k-th message.
    pub topics: TopicPlan,
    /// Subscription filter.
    pub filter: String,
    /// How long subscribers wait for the last messages after the publishers stop.
    pub drain: Duration,
    /// Subscribers connect with clean session 0 (persistent sessions).
    pub persistent: bool,
}

/// Which topic a publisher's k-th message goes to.
#[derive(Debug, Clone)]
pub enum TopicPlan {
    /// `articulos/p<i>/futbol`.
    PerPublisher,
    /// `articulos/d<(k * publishers + i) % n>/futbol`: n topics overwritten in turn.
    Rotating(usize),
}

impl TopicPlan {
    fn topic(&self, publisher: usize, publishers: usize, k: u64) -> String {
        match self {
            TopicPlan::PerPublisher => format!("articulos/p{publisher}/futbol"),
            TopicPlan::Rotating(n) => {
                let n = (*n).max(1) as u64;
                let slot = (k * publishers as u64 + publisher as u64) % n;
                format!("articulos/d{slot}/futbol")
            }
        }
    }
}

/// What a load produced.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub sent: u64,
    pub acked: u64,
    /// Distinct messages received, over all subscribers.
    pub received: u64,
    pub expected: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Runs of consecutive lost sequence numbers.
    pub gaps: u64,
    /// The first few lost messages: "subscriber s: publisher p seq n".
    pub lost_samples: Vec<String>,
    /// Publish start to the publishers' last write.
    pub publish_secs: f64,
    /// Publish start to the last message received (or acknowledged, without subscribers).
    pub total_secs: f64,
    pub latency: Option<Summary>,
    /// Send to PUBACK, at the publishers.
    pub ack_latency: Option<Summary>,
    /// How late messages were sent against the offered rate's schedule.
    pub send_lag: Option<Summary>,
    pub errors: Vec<String>,
    /// Messages encoded and decoded by the benchmark (for the codec's CPU share).
    pub encoded: u64,
    pub decoded: u64,
}

impl LoadResult {
    pub fn publish_rate(&self) -> f64 {
        per_sec(self.sent, self.publish_secs)
    }

    pub fn delivery_rate(&self) -> f64 {
        per_sec(self.received, self.total_secs)
    }

    pub fn ack_rate(&self) -> f64 {
        per_sec(self.acked, self.total_secs)
    }
}

fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

struct PubResult {
    sent: u64,
    acked: u64,
    last_write: Instant,
    last_ack: Option<Instant>,
    ack_latency: Latencies,
    lag: Latencies,
    error: Option<String>,
}

struct SubResult {
    trackers: Vec<SeqTracker>,
    latency: Latencies,
    last_rx: Option<Instant>,
    error: Option<String>,
    decoded: u64,
}

/// Runs `load` against the broker at `addr`: subscribers first (all SUBACKed), then
/// publishers, all starting together.
pub async fn run(
    addr: SocketAddr,
    pub_tls: &TlsConnector,
    sub_tls: &TlsConnector,
    load: &Load,
    tag: &str,
) -> anyhow::Result<LoadResult> {
    let load = Arc::new(load.clone());
    let (expect_tx, expect_rx) = watch::channel::<Option<Vec<u64>>>(None);
    let start_gate = Arc::new(Barrier::new(load.publishers + 1));

    let mut subs = Vec::new();
    for s in 0..load.subscribers {
        let opts = ConnectOpts {
            clean_session: !load.persistent,
            ..ConnectOpts::default()
        };
        let mut conn = client::connect(addr, sub_tls, &format!("{tag}-sub-{s}"), opts)
            .await
            .with_context(|| format!("subscriber {s}"))?;
        conn.subscribe(&load.filter, load.qos)
            .await
            .with_context(|| format!("subscriber {s}"))?;
        subs.push(tokio::spawn(subscriber(
            conn,
            load.clone(),
            expect_rx.clone(),
        )));
    }

    let mut pubs = Vec::new();
    for p in 0..load.publishers {
        let conn = client::connect(
            addr,
            pub_tls,
            &format!("{tag}-pub-{p}"),
            ConnectOpts::default(),
        )
        .await
        .with_context(|| format!("publisher {p}"))?;
        pubs.push(tokio::spawn(publisher(
            conn,
            p,
            load.clone(),
            start_gate.clone(),
        )));
    }
    start_gate.wait().await;
    let started = Instant::now();

    let mut result = LoadResult::default();
    let mut sent_per_pub = Vec::new();
    let mut ack_latency = Latencies::default();
    let mut lag = Latencies::default();
    let mut last_write = started;
    let mut last_ack = started;
    for (p, handle) in pubs.into_iter().enumerate() {
        match handle.await {
            Ok(r) => {
                sent_per_pub.push(r.sent);
                result.sent += r.sent;
                result.acked += r.acked;
                last_write = last_write.max(r.last_write);
                if let Some(t) = r.last_ack {
                    last_ack = last_ack.max(t);
                }
                ack_latency.merge(r.ack_latency);
                lag.merge(r.lag);
                if let Some(e) = r.error {
                    result.errors.push(format!("publisher {p}: {e}"));
                }
            }
            Err(e) => {
                sent_per_pub.push(0);
                result.errors.push(format!("publisher {p} panicked: {e}"));
            }
        }
    }
    result.encoded = result.sent;
    result.publish_secs = (last_write - started).as_secs_f64();
    let _ = expect_tx.send(Some(sent_per_pub.clone()));

    let mut latency = Latencies::default();
    let mut last_rx = last_ack;
    for (s, handle) in subs.into_iter().enumerate() {
        match handle.await {
            Ok(r) => {
                for (p, sent) in sent_per_pub.iter().enumerate() {
                    let t = r.trackers.get(p).cloned().unwrap_or_default();
                    result.received += t.distinct();
                    result.duplicates += t.duplicates();
                    result.reordered += t.reordered();
                    result.lost += t.lost(*sent);
                    result.gaps += t.gaps(*sent);
                    if result.lost_samples.len() < 8 {
                        for seq in t.missing(*sent, 8 - result.lost_samples.len()) {
                            result
                                .lost_samples
                                .push(format!("subscriber {s}: publisher {p} seq {seq}"));
                        }
                    }
                    result.expected += sent;
                }
                result.decoded += r.decoded;
                latency.merge(r.latency);
                if let Some(t) = r.last_rx {
                    last_rx = last_rx.max(t);
                }
                if let Some(e) = r.error {
                    result.errors.push(format!("subscriber {s}: {e}"));
                }
            }
            Err(e) => result.errors.push(format!("subscriber {s} panicked: {e}")),
        }
    }
    result.total_secs = (last_rx.max(last_write) - started).as_secs_f64();
    result.latency = latency.summary();
    result.ack_latency = ack_latency.summary();
    result.send_lag = lag.summary();
    Ok(result)
}

/// One publisher: paced (stamped with the scheduled time, so a publisher that falls behind
/// shows it as latency) or as fast as the window and the socket allow.
async fn publisher(
    conn: client::Conn,
    index: usize,
    load: Arc<Load>,
    start: Arc<Barrier>,
) -> PubResult {
    let client::Conn { mut reader, writer } = conn;
    let window = Arc::new(Semaphore::new(load.inflight.max(1)));
    let acked = Arc::new(AtomicU64::new(0));
    let last_ack_ns = Arc::new(AtomicU64::new(0));
    let send_times: Arc<Vec<AtomicU64>> =
        Arc::new((0..=u16::MAX).map(|_| AtomicU64::new(0)).collect());
    let qos1 = load.qos != QoS::AtMostOnce;

    // The acknowledgement reader: releases the window and measures send-to-PUBACK.
    let ack_task = {
        let (window, acked, last_ack_ns, send_times) = (
            window.clone(),
            acked.clone(),
            last_ack_ns.clone(),
            send_times.clone(),
        );
        tokio::spawn(async move {
            let mut lat = Latencies::default();
            loop {
                match reader.next().await {
                    Ok(Some(Packet::PubAck(ack))) => {
                        let now = now_ns();
                        let sent = send_times[usize::from(ack.pkid)].load(Ordering::Relaxed);
                        lat.record_us(now.saturating_sub(sent) / 1000);
                        last_ack_ns.store(now, Ordering::Relaxed);
                        acked.fetch_add(1, Ordering::Relaxed);
                        window.add_permits(1);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return (lat, None),
                    Err(e) => return (lat, Some(format!("{e:#}"))),
                }
            }
        })
    };

    start.wait().await;
    let mut w = writer;
    let started = Instant::now();
    let started_ns = now_ns();
    let deadline = started + load.duration;
    let per_pub_rate = load.rate.map(|r| r / load.publishers.max(1) as f64);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut pbuf = BytesMut::with_capacity(64 * 1024);
    let mut seq: u64 = 0;
    let mut pkid: u16 = 0;
    let mut error = None;
    let mut lag = Latencies::default();
    const BATCH: u64 = 64;

    'outer: loop {
        let now = Instant::now();
        if now >= deadline || load.count.is_some_and(|c| seq >= c) {
            break;
        }
        // How many messages are due now, and their scheduled send times.
        let (due, scheduled) = match per_pub_rate {
            Some(rate) => {
                let elapsed = (now - started).as_secs_f64();
                let due_total = (elapsed * rate).floor() as u64 + 1;
                if due_total <= seq {
                    let next = started + Duration::from_secs_f64(seq as f64 / rate);
                    tokio::time::sleep_until(next.into()).await;
                    continue;
                }
                ((due_total - seq).min(BATCH * 4), Some(rate))
            }
            None => (BATCH, None),
        };
        let due = match load.count {
            Some(c) => due.min(c - seq),
            None => due,
        };
        for _ in 0..due {
            if qos1 {
                match window.clone().acquire_owned().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => break 'outer,
                }
            }
            // Stamped when sent; how late that is against the schedule is the send lag
            // (a publisher held back by the window or the socket shows it there).
            let sent_ns = now_ns();
            if let Some(rate) = scheduled {
                let due_ns = started_ns + (seq as f64 / rate * 1e9) as u64;
                lag.record_us(sent_ns.saturating_sub(due_ns) / 1000);
            }
            let stamp = Stamp {
                publisher: index as u32,
                seq,
                sent_ns,
            };
            let topic = load.topics.topic(index, load.publishers, seq);
            let mut publish = Publish::from_bytes(
                topic,
                load.qos,
                payload::encode(stamp, load.payload, &mut pbuf),
            );
            publish.retain = load.retain;
            if qos1 {
                pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                publish.pkid = pkid;
                send_times[usize::from(pkid)].store(sent_ns, Ordering::Relaxed);
            }
            if let Err(e) = publish.write(&mut buf) {
                error = Some(format!("encoding PUBLISH: {e}"));
                break 'outer;
            }
            seq += 1;
            // With a window, write as soon as it fills so the broker sees the batch.
            if qos1 && window.available_permits() == 0 {
                break;
            }
        }
        if let Err(e) = write_flush(&mut w, &buf).await {
            error = Some(format!("{e:#}"));
            break;
        }
        buf.clear();
    }
    let last_write = Instant::now();

    // Wait for the outstanding acknowledgements, bounded.
    if qos1 && error.is_none() {
        let all = u32::try_from(load.inflight.max(1)).unwrap_or(u32::MAX);
        let wait = tokio::time::timeout(Duration::from_secs(15), window.acquire_many(all)).await;
        if wait.is_err() {
            error = Some(format!(
                "{} publishes never acknowledged within 15 s",
                seq.saturating_sub(acked.load(Ordering::Relaxed))
            ));
        }
    }
    let mut dbuf = BytesMut::new();
    if Packet::Disconnect
        .write(&mut dbuf, client::MAX_PACKET)
        .is_ok()
    {
        let _ = write_flush(&mut w, &dbuf).await;
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
    let (ack_latency, ack_error) =
        match tokio::time::timeout(Duration::from_secs(5), ack_task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => (
                Latencies::default(),
                Some(format!("ack reader panicked: {e}")),
            ),
            Err(_) => (Latencies::default(), None),
        };
    if error.is_none() && qos1 {
        error = ack_error;
    }
    let last_ack = match last_ack_ns.load(Ordering::Relaxed) {
        0 => None,
        ns => Some(started + Duration::from_nanos(ns.saturating_sub(started_ns))),
    };
    PubResult {
        sent: seq,
        acked: acked.load(Ordering::Relaxed),
        last_write,
        last_ack,
        ack_latency: if qos1 {
            ack_latency
        } else {
            Latencies::default()
        },
        lag,
        error,
    }
}

/// One subscriber: acknowledges QoS 1, records latency and sequence numbers; stops once
/// every message the publishers sent has arrived, after `drain` of silence, or at a hard limit.
async fn subscriber(
    conn: client::Conn,
    load: Arc<Load>,
    mut expect: watch::Receiver<Option<Vec<u64>>>,
) -> SubResult {
    let client::Conn {
        mut reader,
        mut writer,
    } = conn;
    let mut r = SubResult {
        trackers: vec![SeqTracker::default(); load.publishers],
        latency: Latencies::default(),
        last_rx: None,
        error: None,
        decoded: 0,
    };
    let mut acks = BytesMut::with_capacity(4096);
    let hard_limit = Instant::now() + load.duration + load.drain + Duration::from_secs(60);
    let mut expected: Option<Vec<u64>> = None;
    let mut silent_since = Instant::now();
    loop {
        // Everything already buffered, then acknowledge in one write.
        loop {
            match reader.buffered() {
                Ok(Some(Packet::Publish(p))) => {
                    r.decoded += 1;
                    let now = now_ns();
                    if let Some(stamp) = payload::decode(&p.payload) {
                        r.latency
                            .record_us(now.saturating_sub(stamp.sent_ns) / 1000);
                        if let Some(t) = r.trackers.get_mut(stamp.publisher as usize) {
                            t.record(stamp.seq);
                        }
                    }
                    if p.qos == QoS::AtLeastOnce {
                        if let Err(e) = PubAck::new(p.pkid).write(&mut acks) {
                            r.error = Some(format!("encoding PUBACK: {e}"));
                        }
                    }
                    r.last_rx = Some(Instant::now());
                    silent_since = Instant::now();
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    r.error = Some(format!("{e:#}"));
                    return r;
                }
            }
        }
        if !acks.is_empty() {
            if let Err(e) = write_flush(&mut writer, &acks).await {
                r.error = Some(format!("{e:#}"));
                return r;
            }
            acks.clear();
        }
        if expected.is_none() && expect.has_changed().unwrap_or(false) {
            expected = expect.borrow_and_update().clone();
            silent_since = Instant::now().max(silent_since);
        }
        if let Some(exp) = &expected {
            let complete = exp
                .iter()
                .zip(&r.trackers)
                .all(|(sent, t)| t.lost(*sent) == 0);
            if complete || silent_since.elapsed() > load.drain {
                break;
            }
        }
        if Instant::now() > hard_limit {
            r.error = Some("hard time limit reached".into());
            break;
        }
        match tokio::time::timeout(Duration::from_millis(100), reader.fill()).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                if expected.is_none() {
                    r.error = Some("the broker closed the connection".into());
                }
                break;
            }
            Ok(Err(e)) => {
                r.error = Some(format!("{e:#}"));
                break;
            }
            Err(_) => {}
        }
    }
    client::Conn { reader, writer }.disconnect().await;
    r
}
