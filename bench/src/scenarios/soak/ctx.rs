//! What the soak's clients share: the broker's address and incarnation, the stop signal,
//! the counters of the JSON line, a connect that retries across the broker's restart, and
//! the receiving side of every client (acknowledging QoS 1 and 2, recording stamps).

use crate::client::{self, write_flush, Conn};
use crate::payload;
use crate::stats::SeqTracker;
use anyhow::Context;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, PubComp, PubRec};
use rumqttc::mqttbytes::QoS;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

/// Counters reported in the JSON line.
#[derive(Debug, Default)]
pub struct Counters {
    /// CONNACKs received by every client, the first connection of each included.
    pub connects: AtomicU64,
    /// Connection attempts that failed (mostly while the broker is down).
    pub connect_failures: AtomicU64,
    /// Second connections with a live client id.
    pub takeovers: AtomicU64,
    /// Takeovers after which the broker did not close the first connection within 5 s.
    pub takeover_old_not_closed: AtomicU64,
    /// Connections that ended without DISCONNECT on purpose.
    pub abrupt_closes: AtomicU64,
    /// Persistent subscribers' periods offline.
    pub offline_periods: AtomicU64,
    /// Connections the broker closed or that failed when the client did not mean it to.
    pub unexpected_closes: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Shared by every client of the soak.
pub struct Ctx {
    pub addr: SocketAddr,
    pub publisher_tls: TlsConnector,
    pub subscriber_tls: TlsConnector,
    pub counters: Counters,
    /// Connections the clients hold right now (compared with the broker's descriptors).
    pub live: Arc<AtomicI64>,
    /// The broker's incarnation: 0, then 1 once the restarted broker accepts a CONNECT.
    pub epoch: AtomicU64,
    /// When the broker will be killed: wills of clients that die close to it are uncertain.
    pub kill_at: Option<Instant>,
    /// False from the SIGKILL until the restarted broker accepts a CONNECT.
    pub up: std::sync::atomic::AtomicBool,
    stop: watch::Receiver<bool>,
    notes: std::sync::Mutex<Vec<String>>,
}

/// A connection and its place in the live count.
pub struct Link {
    pub conn: Conn,
    _live: LiveGuard,
}

/// Counts a connection as live until dropped.
pub struct LiveGuard(Arc<AtomicI64>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Link {
    /// DISCONNECT, then close.
    pub async fn disconnect(self) {
        self.conn.disconnect().await;
    }
}

impl Ctx {
    pub fn new(
        addr: SocketAddr,
        publisher_tls: TlsConnector,
        subscriber_tls: TlsConnector,
        kill_at: Option<Instant>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            addr,
            publisher_tls,
            subscriber_tls,
            counters: Counters::default(),
            live: Arc::new(AtomicI64::new(0)),
            epoch: AtomicU64::new(0),
            kill_at,
            up: std::sync::atomic::AtomicBool::new(true),
            stop,
            notes: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The stop signal, to wait on.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }

    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Whether the broker is meant to be up (failures then are worth a note).
    pub fn epoch_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Sleeps `d` (a client's paced pause), or less if the soak stops; false once stopping.
    pub async fn pause(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        if *stop.borrow_and_update() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.changed() => {}
        }
        !self.stopping()
    }

    /// A persistent subscriber's time away: with a DISCONNECT (`clean`, offline 2–8 s) or
    /// its connection dropped (offline 1–5 s), counted.
    pub async fn away(&self, rng: &mut Rng, clean: bool) {
        Counters::add(&self.counters.offline_periods);
        if !clean {
            Counters::add(&self.counters.abrupt_closes);
        }
        let (low, high) = if clean { (2.0, 8.0) } else { (1.0, 5.0) };
        self.pause(rng.secs(low, high)).await;
    }

    /// Whether the broker was up, and not about to be killed, for the whole of a
    /// connection that started in `epoch` and ended now: only then must its will arrive
    /// (or, after a DISCONNECT, not arrive). A will fired in the 3 s before the SIGKILL
    /// may not be queued yet; a connection cut by the kill fires none.
    pub fn will_certain(&self, epoch: u64) -> bool {
        if self.epoch() != epoch {
            return false;
        }
        match (epoch, self.kill_at) {
            (0, Some(kill)) => Instant::now() + Duration::from_secs(3) < kill,
            _ => true,
        }
    }

    /// A connection established: counted, and live until the guard is dropped.
    pub fn track(&self) -> LiveGuard {
        Counters::add(&self.counters.connects);
        self.live.fetch_add(1, Ordering::Relaxed);
        LiveGuard(self.live.clone())
    }

    /// Keeps the first few notes of what went wrong, for the JSON line's samples.
    pub fn note(&self, what: String) {
        if let Ok(mut notes) = self.notes.lock() {
            if notes.len() < 20 {
                notes.push(what);
            }
        }
    }

    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// CONNECT as `publisher` or `subscriber` identity until a CONNACK, retrying every
    /// 100 ms–1 s (the broker may be restarting); `None` once the soak stops.
    pub async fn connect(&self, connect: &Connect, as_publisher: bool) -> Option<Link> {
        self.connect_retrying(connect, as_publisher, None).await
    }

    /// [`Ctx::connect`] after the stop, for the final drain: gives up at `deadline` only.
    pub async fn connect_final(&self, connect: &Connect, deadline: Instant) -> Option<Link> {
        self.connect_retrying(connect, false, Some(deadline)).await
    }

    async fn connect_retrying(
        &self,
        connect: &Connect,
        as_publisher: bool,
        deadline: Option<Instant>,
    ) -> Option<Link> {
        let tls = if as_publisher {
            &self.publisher_tls
        } else {
            &self.subscriber_tls
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let give_up = match deadline {
                Some(d) => Instant::now() > d,
                None => self.stopping(),
            };
            if give_up {
                return None;
            }
            match client::connect_packet(self.addr, tls, connect.clone(), Duration::from_secs(10))
                .await
            {
                Ok(conn) => {
                    return Some(Link {
                        conn,
                        _live: self.track(),
                    });
                }
                Err(e) => {
                    Counters::add(&self.counters.connect_failures);
                    if self.epoch_up() {
                        self.note(format!("connect {}: {e:#}", connect.client_id));
                    }
                    if deadline.is_some() {
                        tokio::time::sleep(backoff).await;
                    } else if !self.pause(backoff).await {
                        return None;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// A CONNECT packet with keep alive 600 s (nobody here idles that long).
pub fn connect_packet(client_id: &str, clean_session: bool) -> Connect {
    let mut c = Connect::new(client_id);
    c.keep_alive = 600;
    c.clean_session = clean_session;
    c
}

/// What a receiving client has seen: distinct stamps per publisher id.
#[derive(Debug, Default)]
pub struct Inbox {
    pub per_publisher: HashMap<u32, SeqTracker>,
    /// Messages received, duplicates included.
    pub messages: u64,
    /// Payloads without a benchmark stamp.
    pub unstamped: u64,
}

impl Inbox {
    /// Records a PUBLISH and answers every packet that needs it (PUBACK, PUBREC, PUBCOMP)
    /// into `acks`.
    pub fn handle(&mut self, packet: Packet, acks: &mut BytesMut) -> anyhow::Result<()> {
        match packet {
            Packet::Publish(p) => {
                self.messages += 1;
                match payload::decode(&p.payload) {
                    Some(s) => {
                        self.per_publisher
                            .entry(s.publisher)
                            .or_default()
                            .record(s.seq);
                    }
                    None => self.unstamped += 1,
                }
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => {
                        PubAck::new(p.pkid).write(acks).context("encoding PUBACK")?;
                    }
                    QoS::ExactlyOnce => {
                        PubRec::new(p.pkid).write(acks).context("encoding PUBREC")?;
                    }
                }
            }
            // Answered whether or not this connection saw the PUBLISH: after a takeover
            // or a reconnection the broker resends only the PUBREL.
            Packet::PubRel(r) => {
                PubComp::new(r.pkid)
                    .write(acks)
                    .context("encoding PUBCOMP")?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether every `(publisher, seq)` of `expected` has arrived.
    pub fn has_all(&self, expected: &[(u32, Vec<u64>)]) -> bool {
        expected.iter().all(|(p, seqs)| {
            let t = self.per_publisher.get(p);
            seqs.iter().all(|s| t.is_some_and(|t| t.seen(*s)))
        })
    }
}

/// Reads and answers what `link` receives for `d`, or until the soak stops if
/// `ctx` is given; `Err` when the connection ends.
pub async fn receive_for(
    ctx: Option<&Ctx>,
    link: &mut Link,
    inbox: &mut Inbox,
    d: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + d;
    let mut acks = BytesMut::new();
    let mut stop = ctx.map(|c| c.stop.clone());
    loop {
        if stop.as_ref().is_some_and(|s| *s.borrow()) {
            return Ok(());
        }
        while let Some(p) = link.conn.reader.buffered()? {
            inbox.handle(p, &mut acks)?;
        }
        if !acks.is_empty() {
            write_flush(&mut link.conn.writer, &acks).await?;
            acks.clear();
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        let stopped = stop_signal(&mut stop);
        tokio::select! {
            r = tokio::time::timeout(left, link.conn.reader.fill()) => match r {
                Ok(Ok(true)) | Err(_) => {}
                Ok(Ok(false)) => anyhow::bail!("the broker closed the connection"),
                Ok(Err(e)) => return Err(e),
            },
            _ = stopped => {}
        }
    }
}

/// Reads what `link` still receives until the broker closes it, up to `limit`; true if it
/// did (what arrived meanwhile counts as received).
pub async fn until_closed(link: &mut Link, inbox: &mut Inbox, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    let mut acks = BytesMut::new();
    loop {
        loop {
            match link.conn.reader.buffered() {
                Ok(Some(p)) => {
                    let _ = inbox.handle(p, &mut acks);
                }
                Ok(None) => break,
                Err(_) => return true,
            }
        }
        // The acknowledgements may not get through any more; the broker resends.
        if !acks.is_empty() {
            let _ = write_flush(&mut link.conn.writer, &acks).await;
            acks.clear();
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match tokio::time::timeout(left, link.conn.reader.fill()).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) | Ok(Err(_)) => return true,
            Err(_) => return false,
        }
    }
}

/// A small xorshift generator: the soak's choices need to vary, not to be secure.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A duration uniformly in `lo..hi` seconds.
    pub fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        let f = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(lo + (hi - lo) * f)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Completes when `stop` changes; never, without one.
pub async fn stop_signal(stop: &mut Option<watch::Receiver<bool>>) {
    match stop.as_mut() {
        Some(s) => {
            let _ = s.changed().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::Stamp;
    use rumqttc::mqttbytes::v4::{PubRel, Publish};

    fn publish(publisher: u32, seq: u64, qos: QoS, pkid: u16) -> Packet {
        let mut buf = BytesMut::new();
        let stamp = Stamp {
            publisher,
            seq,
            sent_ns: 0,
        };
        let mut p = Publish::from_bytes("t", qos, payload::encode(stamp, 32, &mut buf));
        p.pkid = pkid;
        Packet::Publish(p)
    }

    #[test]
    fn inbox_answers_each_qos_and_counts_stamps() {
        let mut inbox = Inbox::default();
        let mut acks = BytesMut::new();
        inbox
            .handle(publish(1, 0, QoS::AtMostOnce, 0), &mut acks)
            .unwrap();
        assert!(acks.is_empty());
        inbox
            .handle(publish(1, 1, QoS::AtLeastOnce, 7), &mut acks)
            .unwrap();
        inbox
            .handle(publish(2, 5, QoS::ExactlyOnce, 8), &mut acks)
            .unwrap();
        inbox
            .handle(Packet::PubRel(PubRel::new(8)), &mut acks)
            .unwrap();
        // PUBACK, PUBREC and PUBCOMP: four bytes each.
        assert_eq!(acks.len(), 12);
        assert_eq!(acks[0] >> 4, 4);
        assert_eq!(acks[4] >> 4, 5);
        assert_eq!(acks[8] >> 4, 7);
        assert!(inbox.has_all(&[(1, vec![0, 1]), (2, vec![5])]));
        assert!(!inbox.has_all(&[(2, vec![4])]));
        assert!(!inbox.has_all(&[(3, vec![0])]));
        assert!(inbox.has_all(&[(3, vec![])]));
    }

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng::new(7);
        for _ in 0..1000 {
            let d = r.secs(1.0, 2.0);
            assert!(d >= Duration::from_secs(1) && d < Duration::from_secs(2));
        }
        let heads = (0..10_000).filter(|_| r.chance(0.3)).count();
        assert!((2_500..3_500).contains(&heads), "{heads}");
    }
}
