//! The soak's clients, each a loop of connections until the soak stops: paced publishers
//! (QoS 0, 1 or 2), persistent subscribers that leave and come back, clients with wills
//! that die without DISCONNECT, short-lived subscribers, and pairs of connections sharing
//! a client id (takeovers).

use super::ctx::{connect_packet, receive_for, until_closed, Counters, Ctx, Inbox, Link, Rng};
use crate::client::write_flush;
use crate::payload::{self, Stamp};
use crate::stats::now_ns;
use anyhow::{bail, Context};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{LastWill, Packet, PubRel, Publish};
use rumqttc::mqttbytes::QoS;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// Stamps of wills carry `WILL_BASE + client index` as their publisher id.
pub const WILL_BASE: u32 = 1000;
/// Topic of data publisher `i`; persistent subscribers take `soak/data/+`.
pub fn data_topic(i: u32) -> String {
    format!("soak/data/p{i}")
}
pub const DATA_FILTER: &str = "soak/data/+";
pub const WILL_FILTER: &str = "soak/will/+";

/// Unacknowledged publishes a publisher allows itself.
const WINDOW: usize = 100;

/// What the receivers must have once the soak is over: acknowledged (publisher, seqs).
pub type Expected = Arc<Vec<(u32, Vec<u64>)>>;

pub struct PubSpec {
    pub index: u32,
    pub qos: QoS,
    pub rate: f64,
    pub payload: usize,
}

#[derive(Debug)]
pub struct PubOutcome {
    pub index: u32,
    pub qos: QoS,
    pub sent: u64,
    /// Sequence numbers acknowledged: PUBACK (QoS 1) or PUBCOMP (QoS 2).
    pub acked: Vec<u64>,
}

/// Publishes to its own topic at `rate`, over connections of 20–60 s that end with a
/// DISCONNECT or without one; a message counts as acknowledged only once its PUBACK
/// (QoS 1) or PUBCOMP (QoS 2) has arrived. Nothing is resent on a new connection (clean
/// session), so an unacknowledged message is simply not counted.
pub async fn publisher(ctx: Arc<Ctx>, spec: PubSpec, seed: u64) -> PubOutcome {
    let mut rng = Rng::new(seed);
    let mut out = PubOutcome {
        index: spec.index,
        qos: spec.qos,
        sent: 0,
        acked: Vec::new(),
    };
    let id = format!("soak-pub-{}", spec.index);
    while let Some(mut link) = ctx.connect(&connect_packet(&id, true), true).await {
        let session = rng.secs(20.0, 60.0);
        match publish_session(&ctx, &mut link, &spec, session, &mut out).await {
            Ok(()) if rng.chance(0.3) => {
                Counters::add(&ctx.counters.abrupt_closes);
                drop(link);
            }
            Ok(()) => link.disconnect().await,
            Err(e) => {
                Counters::add(&ctx.counters.unexpected_closes);
                if ctx.epoch_up() {
                    ctx.note(format!("{id}: {e:#}"));
                }
            }
        }
        if !ctx.pause(rng.secs(0.1, 1.0)).await {
            break;
        }
    }
    out
}

async fn publish_session(
    ctx: &Ctx,
    link: &mut Link,
    spec: &PubSpec,
    session: Duration,
    out: &mut PubOutcome,
) -> anyhow::Result<()> {
    let topic = data_topic(spec.index);
    let end = Instant::now() + session;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / spec.rate.max(0.1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // pkid -> sequence number, while unacknowledged.
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut pkid: u16 = 0;
    let mut last_progress = Instant::now();
    let (mut wbuf, mut pbuf) = (BytesMut::new(), BytesMut::new());
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if ctx.stopping() || Instant::now() >= end {
                    break;
                }
                if inflight.len() >= WINDOW {
                    if last_progress.elapsed() > Duration::from_secs(10) {
                        bail!("{} publishes unacknowledged for 10 s", inflight.len());
                    }
                    continue;
                }
                let stamp = Stamp { publisher: spec.index, seq: out.sent, sent_ns: now_ns() };
                let mut p = Publish::from_bytes(
                    topic.clone(),
                    spec.qos,
                    payload::encode(stamp, spec.payload, &mut pbuf),
                );
                if spec.qos != QoS::AtMostOnce {
                    loop {
                        pkid = pkid.checked_add(1).unwrap_or(1);
                        if !inflight.contains_key(&pkid) {
                            break;
                        }
                    }
                    p.pkid = pkid;
                    if inflight.is_empty() {
                        last_progress = Instant::now();
                    }
                    inflight.insert(pkid, out.sent);
                }
                out.sent += 1;
                p.write(&mut wbuf).context("encoding PUBLISH")?;
                write_flush(&mut link.conn.writer, &wbuf).await?;
                wbuf.clear();
            }
            r = link.conn.reader.fill() => {
                if !r? {
                    bail!("the broker closed the connection");
                }
                acknowledgements(link, &mut inflight, out, &mut wbuf, &mut last_progress).await?;
            }
        }
    }
    // What is still in flight gets 5 s to be acknowledged before the connection goes.
    let until = Instant::now() + Duration::from_secs(5);
    while !inflight.is_empty() && Instant::now() < until {
        match tokio::time::timeout_at(until.into(), link.conn.reader.fill()).await {
            Ok(Ok(true)) => {
                acknowledgements(link, &mut inflight, out, &mut wbuf, &mut last_progress).await?
            }
            Ok(Ok(false)) => bail!("the broker closed the connection"),
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
    }
    Ok(())
}

/// PUBACK and PUBCOMP complete a message; PUBREC is answered with PUBREL.
async fn acknowledgements(
    link: &mut Link,
    inflight: &mut HashMap<u16, u64>,
    out: &mut PubOutcome,
    wbuf: &mut BytesMut,
    last_progress: &mut Instant,
) -> anyhow::Result<()> {
    while let Some(packet) = link.conn.reader.buffered()? {
        match packet {
            Packet::PubAck(a) if out.qos == QoS::AtLeastOnce => {
                if let Some(seq) = inflight.remove(&a.pkid) {
                    out.acked.push(seq);
                    *last_progress = Instant::now();
                }
            }
            Packet::PubRec(r) if out.qos == QoS::ExactlyOnce => {
                PubRel::new(r.pkid).write(wbuf).context("encoding PUBREL")?;
            }
            Packet::PubComp(c) if out.qos == QoS::ExactlyOnce => {
                if let Some(seq) = inflight.remove(&c.pkid) {
                    out.acked.push(seq);
                    *last_progress = Instant::now();
                }
            }
            _ => {}
        }
    }
    if !wbuf.is_empty() {
        write_flush(&mut link.conn.writer, wbuf).await?;
        wbuf.clear();
    }
    Ok(())
}

pub struct SubSpec {
    pub id: String,
    pub filter: &'static str,
    /// Leaves and comes back (DISCONNECT, a dropped connection, or a takeover by itself)
    /// every 5–20 s; otherwise it stays until the broker is killed.
    pub churn: bool,
}

#[derive(Debug)]
pub struct SubOutcome {
    pub id: String,
    pub inbox: Inbox,
    /// The final drain found every expected message.
    pub complete: bool,
    pub drain_secs: f64,
}

/// A persistent session (clean session 0) subscribed once at QoS 2 to `spec.filter`, and
/// never again: after its own departures, takeovers and the broker's restart, what it
/// receives comes from the session the broker kept. After the stop it drains until every
/// expected message arrived, 15 s pass without one, or 3 minutes.
pub async fn persistent_subscriber(
    ctx: Arc<Ctx>,
    spec: SubSpec,
    seed: u64,
    ready: oneshot::Sender<()>,
    mut expected: watch::Receiver<Option<Expected>>,
) -> SubOutcome {
    let mut rng = Rng::new(seed);
    let mut out = SubOutcome {
        id: spec.id.clone(),
        inbox: Inbox::default(),
        complete: false,
        drain_secs: 0.0,
    };
    let packet = connect_packet(&spec.id, false);
    let mut link = loop {
        let Some(mut link) = ctx.connect(&packet, false).await else {
            return out;
        };
        match link.conn.subscribe(spec.filter, QoS::ExactlyOnce).await {
            Ok(()) => break Some(link),
            Err(e) => ctx.note(format!("{}: subscribe: {e:#}", spec.id)),
        }
    };
    let _ = ready.send(());
    while !ctx.stopping() {
        let Some(mut l) = link.take() else {
            link = ctx.connect(&packet, false).await;
            continue;
        };
        let online = if spec.churn {
            rng.secs(5.0, 20.0)
        } else {
            Duration::from_secs(24 * 3600)
        };
        if let Err(e) = receive_for(Some(&ctx), &mut l, &mut out.inbox, online).await {
            // The broker's SIGKILL ends every connection; anything else is worth a note.
            Counters::add(&ctx.counters.unexpected_closes);
            if ctx.epoch_up() {
                ctx.note(format!("{}: {e:#}", spec.id));
            }
            continue;
        }
        if ctx.stopping() {
            link = Some(l);
            break;
        }
        let dice = (rng.next_u64() % 10) as u8;
        if dice < 4 {
            l.disconnect().await;
            ctx.away(&mut rng, true).await;
        } else if dice < 7 {
            drop(l);
            ctx.away(&mut rng, false).await;
        } else {
            link = takeover(&ctx, l, &packet, &mut out.inbox).await;
        }
    }

    let Ok(exp) = expected.wait_for(|e| e.is_some()).await.map(|e| e.clone()) else {
        return out;
    };
    let exp = exp.unwrap_or_default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    let mut last_count = out.inbox.messages;
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        if out.inbox.has_all(&exp) {
            out.complete = true;
            break;
        }
        if quiet_since.elapsed() > Duration::from_secs(15) {
            break;
        }
        let Some(mut l) = link.take() else {
            link = ctx.connect_final(&packet, deadline).await;
            continue;
        };
        match receive_for(None, &mut l, &mut out.inbox, Duration::from_millis(500)).await {
            Ok(()) => link = Some(l),
            Err(e) => ctx.note(format!("{} draining: {e:#}", spec.id)),
        }
        if out.inbox.messages != last_count {
            last_count = out.inbox.messages;
            quiet_since = Instant::now();
        }
    }
    out.drain_secs = started.elapsed().as_secs_f64();
    if let Some(l) = link {
        l.disconnect().await;
    }
    out
}

/// A second connection with `old`'s client id while `old` is live; the broker must close
/// `old` (what it still delivers there counts as received). Returns the new connection.
async fn takeover(
    ctx: &Ctx,
    mut old: Link,
    packet: &rumqttc::mqttbytes::v4::Connect,
    inbox: &mut Inbox,
) -> Option<Link> {
    let epoch = ctx.epoch();
    let new = ctx.connect(packet, false).await?;
    Counters::add(&ctx.counters.takeovers);
    if !until_closed(&mut old, inbox, Duration::from_secs(5)).await && ctx.epoch() == epoch {
        Counters::add(&ctx.counters.takeover_old_not_closed);
        ctx.note(format!(
            "{}: the first connection still open 5 s after the takeover",
            packet.client_id
        ));
    }
    Some(new)
}

#[derive(Debug, Default)]
pub struct WillOutcome {
    pub index: u32,
    /// Cycles that ended without DISCONNECT while the broker was up: their wills must arrive.
    pub expected: Vec<u64>,
    /// Cycles that ended with DISCONNECT: their wills must not arrive.
    pub forbidden: Vec<u64>,
    /// Cycles near the SIGKILL: either way is allowed.
    pub uncertain: u64,
}

/// Connects with a QoS 1 will on `soak/will/<index>` whose payload names the cycle, stays
/// 1–4 s, then leaves: 70% without DISCONNECT (the will must fire), 30% with it (it must not).
pub async fn will_client(ctx: Arc<Ctx>, index: u32, seed: u64) -> WillOutcome {
    let mut rng = Rng::new(seed);
    let mut out = WillOutcome {
        index,
        ..WillOutcome::default()
    };
    let id = format!("soak-will-{index}");
    let mut pbuf = BytesMut::new();
    let mut cycle = 0u64;
    loop {
        let epoch = ctx.epoch();
        let stamp = Stamp {
            publisher: WILL_BASE + index,
            seq: cycle,
            sent_ns: now_ns(),
        };
        let mut packet = connect_packet(&id, true);
        packet.last_will = Some(LastWill {
            topic: format!("soak/will/{index}"),
            message: payload::encode(stamp, 64, &mut pbuf),
            qos: QoS::AtLeastOnce,
            retain: false,
        });
        let Some(mut link) = ctx.connect(&packet, true).await else {
            break;
        };
        let mut ignored = Inbox::default();
        let hold = rng.secs(1.0, 4.0);
        if receive_for(Some(&ctx), &mut link, &mut ignored, hold)
            .await
            .is_err()
        {
            out.uncertain += 1;
        } else if !ctx.stopping() && rng.chance(0.7) {
            drop(link);
            Counters::add(&ctx.counters.abrupt_closes);
            if ctx.will_certain(epoch) {
                out.expected.push(cycle);
            } else {
                out.uncertain += 1;
            }
        } else {
            link.disconnect().await;
            if ctx.will_certain(epoch) {
                out.forbidden.push(cycle);
            } else {
                out.uncertain += 1;
            }
        }
        cycle += 1;
        if !ctx.pause(rng.secs(0.2, 1.0)).await {
            break;
        }
    }
    out
}

/// A short-lived subscriber (clean session) to one publisher's topic at a random QoS,
/// connected 1–6 s, leaving with or without DISCONNECT; counts what it received.
pub async fn churner(ctx: Arc<Ctx>, index: u32, publishers: u32, seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let id = format!("soak-churn-{index}");
    let mut inbox = Inbox::default();
    while let Some(mut link) = ctx.connect(&connect_packet(&id, true), false).await {
        let topic = data_topic(index % publishers.max(1));
        let qos = match rng.next_u64() % 3 {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let r = match link.conn.subscribe(&topic, qos).await {
            Ok(()) => receive_for(Some(&ctx), &mut link, &mut inbox, rng.secs(1.0, 6.0)).await,
            Err(e) => Err(e),
        };
        match r {
            Err(e) => {
                Counters::add(&ctx.counters.unexpected_closes);
                if ctx.epoch_up() {
                    ctx.note(format!("{id}: {e:#}"));
                }
            }
            Ok(()) if rng.chance(0.5) => {
                drop(link);
                Counters::add(&ctx.counters.abrupt_closes);
            }
            Ok(()) => link.disconnect().await,
        }
        if !ctx.pause(rng.secs(0.2, 2.0)).await {
            break;
        }
    }
    inbox.messages
}

/// Two connections with one client id (clean session or not, in turn): the second takes
/// over the first, which the broker must close within 5 s.
pub async fn takeover_pair(ctx: Arc<Ctx>, index: u32, seed: u64) {
    let mut rng = Rng::new(seed);
    let id = format!("soak-dup-{index}");
    loop {
        let packet = connect_packet(&id, rng.chance(0.5));
        // Both connections as one identity: sessions belong to (identity, client id).
        let Some(first) = ctx.connect(&packet, false).await else {
            break;
        };
        if !ctx.pause(rng.secs(0.5, 3.0)).await {
            first.disconnect().await;
            break;
        }
        let Some(second) = takeover(&ctx, first, &packet, &mut Inbox::default()).await else {
            break;
        };
        let stay = ctx.pause(rng.secs(0.5, 3.0)).await;
        if rng.chance(0.3) {
            drop(second);
            Counters::add(&ctx.counters.abrupt_closes);
        } else {
            second.disconnect().await;
        }
        if !stay || !ctx.pause(rng.secs(0.0, 1.0)).await {
            break;
        }
    }
}
