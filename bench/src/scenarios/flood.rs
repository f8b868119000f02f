//! The noisy neighbour of `noisy`: one publisher as fast as its window allows, QoS 0 or 1,
//! to `flood/p0`, and a subscriber of its own on `flood/#`, so the broker does the whole
//! work of every message (decode, match, encode, and at QoS 1 the acknowledgements both
//! ways and the in-flight bookkeeping) rather than dropping it for want of a subscriber.
//!
//! It runs on a thread and a runtime of its own, at a lower CPU priority (nice 10 by
//! default). On this 2-core machine the load generator shares the cores with the broker:
//! without that, the latency pair's tasks would wait behind the flood's in the
//! generator's own runtime and on its CPU, and the measurement would be the generator's
//! contention, not the broker's. The broker is left at normal priority, so the work the
//! flood gives it competes with the latency pair's, which is what is measured.

use crate::client::{self, write_flush, ConnectOpts};
use anyhow::{anyhow, Context};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio_rustls::TlsConnector;

const TOPIC: &str = "flood/p0";
const FILTER: &str = "flood/#";

#[derive(Debug, Clone, Copy)]
pub struct FloodOpts {
    pub qos: QoS,
    /// Unacknowledged publishes at QoS 1.
    pub inflight: usize,
    pub payload: usize,
    /// Nice value of the flood's thread.
    pub nice: i32,
}

/// What the flood did.
#[derive(Debug, Default, Clone)]
pub struct FloodResult {
    pub published: u64,
    pub acked: u64,
    /// Messages its own subscriber received.
    pub received: u64,
    /// From its first publish to the stop.
    pub secs: f64,
    pub error: Option<String>,
}

impl FloodResult {
    pub fn received_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.received as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// A running flood, stopped by [`Flood::stop`].
pub struct Flood {
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<FloodResult>,
}

impl Flood {
    /// Starts the flood; returns once its subscriber has received a first message.
    pub async fn start(
        addr: SocketAddr,
        publisher: TlsConnector,
        subscriber: TlsConnector,
        opts: FloodOpts,
    ) -> anyhow::Result<Self> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (flowing_tx, flowing_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("flood".into())
            .spawn(move || {
                lower_priority(opts.nice);
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(async move {
                        flood(addr, publisher, subscriber, opts, flowing_tx, stop_rx)
                            .await
                            .unwrap_or_else(|e| FloodResult {
                                error: Some(format!("{e:#}")),
                                ..FloodResult::default()
                            })
                    }),
                    Err(e) => FloodResult {
                        error: Some(format!("cannot start the flood's runtime: {e}")),
                        ..FloodResult::default()
                    },
                }
            })
            .context("starting the flood's thread")?;
        let flood = Self {
            stop: stop_tx,
            thread,
        };
        match tokio::time::timeout(Duration::from_secs(10), flowing_rx).await {
            Ok(Ok(())) => Ok(flood),
            _ => {
                let r = flood.stop().await;
                Err(anyhow!(
                    "the flood did not reach its subscriber within 10 s: {}",
                    r.error.unwrap_or_else(|| "no error".into())
                ))
            }
        }
    }

    /// Stops the flood and returns what it did.
    pub async fn stop(self) -> FloodResult {
        let _ = self.stop.send(true);
        let thread = self.thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(r)) => r,
            _ => FloodResult {
                error: Some("the flood's thread panicked".into()),
                ..FloodResult::default()
            },
        }
    }
}

/// Nice value of the calling thread (Linux schedules threads apart); best effort.
pub fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid has no preconditions; setpriority on our own thread id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid);
        if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) != 0 {
            eprintln!("bench: could not lower the flood's priority");
        }
    }
}

async fn flood(
    addr: SocketAddr,
    pub_tls: TlsConnector,
    sub_tls: TlsConnector,
    opts: FloodOpts,
    flowing: oneshot::Sender<()>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<FloodResult> {
    let mut sub = client::connect(addr, &sub_tls, "flood-sub", ConnectOpts::default())
        .await
        .context("flood subscriber")?;
    sub.subscribe(FILTER, opts.qos)
        .await
        .context("flood subscriber")?;
    let publisher = client::connect(addr, &pub_tls, "flood-pub", ConnectOpts::default())
        .await
        .context("flood publisher")?;
    let received = Arc::new(AtomicU64::new(0));
    let sub_task = tokio::spawn(receive(sub, received.clone(), flowing, stop.clone()));
    let started = Instant::now();
    let (published, acked, error) = publish(publisher, opts, stop).await;
    let secs = started.elapsed().as_secs_f64();
    let sub_error = sub_task.await.unwrap_or_else(|e| Some(format!("{e}")));
    Ok(FloodResult {
        published,
        acked,
        received: received.load(Ordering::Relaxed),
        secs,
        error: error.or(sub_error),
    })
}

/// Writes batches of up to 64 publishes as long as the window (QoS 1) and the socket let
/// it, until the stop; returns (published, acknowledged, error).
async fn publish(
    conn: client::Conn,
    opts: FloodOpts,
    mut stop: watch::Receiver<bool>,
) -> (u64, u64, Option<String>) {
    let client::Conn { mut reader, writer } = conn;
    let qos1 = opts.qos != QoS::AtMostOnce;
    let window = Arc::new(Semaphore::new(opts.inflight.max(1)));
    let acked = Arc::new(AtomicU64::new(0));
    let ack_task = {
        let (window, acked) = (window.clone(), acked.clone());
        tokio::spawn(async move {
            while let Ok(Some(p)) = reader.next().await {
                if let Packet::PubAck(_) = p {
                    acked.fetch_add(1, Ordering::Relaxed);
                    window.add_permits(1);
                }
            }
        })
    };
    let payload = Bytes::from(vec![b'x'; opts.payload]);
    let mut w = writer;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let (mut published, mut pkid, mut error) = (0u64, 0u16, None);
    while !*stop.borrow() {
        let mut batch = 64;
        if qos1 {
            tokio::select! {
                permit = window.acquire() => match permit {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                },
                _ = stop.changed() => break,
            }
            batch = 1;
            while batch < 64 {
                match window.try_acquire() {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                }
                batch += 1;
            }
        }
        for _ in 0..batch {
            let mut p = Publish::from_bytes(TOPIC, opts.qos, payload.clone());
            if qos1 {
                pkid = pkid.checked_add(1).unwrap_or(1);
                p.pkid = pkid;
            }
            if let Err(e) = p.write(&mut buf) {
                error = Some(format!("encoding PUBLISH: {e}"));
                break;
            }
            published += 1;
        }
        let written = tokio::select! {
            r = write_flush(&mut w, &buf) => r,
            _ = stop.changed() => break,
        };
        if let Err(e) = written {
            error = Some(format!("{e:#}"));
            break;
        }
        buf.clear();
    }
    let mut dbuf = BytesMut::new();
    if Packet::Disconnect
        .write(&mut dbuf, client::MAX_PACKET)
        .is_ok()
    {
        let _ = write_flush(&mut w, &dbuf).await;
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ack_task).await;
    (published, acked.load(Ordering::Relaxed), error)
}

/// The flood's subscriber: counts, acknowledges QoS 1 in one write per read, and says
/// when the first message arrived.
async fn receive(
    conn: client::Conn,
    received: Arc<AtomicU64>,
    flowing: oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> Option<String> {
    let client::Conn {
        mut reader,
        mut writer,
    } = conn;
    let mut flowing = Some(flowing);
    let mut acks = BytesMut::with_capacity(4096);
    let mut error = None;
    'read: loop {
        loop {
            match reader.buffered() {
                Ok(Some(Packet::Publish(p))) => {
                    received.fetch_add(1, Ordering::Relaxed);
                    if let Some(f) = flowing.take() {
                        let _ = f.send(());
                    }
                    if p.qos == QoS::AtLeastOnce && PubAck::new(p.pkid).write(&mut acks).is_err() {
                        error = Some("encoding PUBACK".to_string());
                        break 'read;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    error = Some(format!("{e:#}"));
                    break 'read;
                }
            }
        }
        if !acks.is_empty() {
            if let Err(e) = write_flush(&mut writer, &acks).await {
                error = Some(format!("{e:#}"));
                break;
            }
            acks.clear();
        }
        tokio::select! {
            r = reader.fill() => match r {
                Ok(true) => {}
                Ok(false) => {
                    error = Some("the broker closed the flood subscriber".into());
                    break;
                }
                Err(e) => {
                    error = Some(format!("{e:#}"));
                    break;
                }
            },
            _ = stop.changed() => break,
        }
    }
    // Gone without waiting for the rest: a clean session's queue is discarded.
    client::Conn { reader, writer }.disconnect().await;
    error
}
