//! The soak's MQTT 5 persistent subscriber: its session outlives each connection by its
//! Session Expiry Interval (1 hour) instead of by clean session 0, a separate path in the
//! broker (the expiry is stored with the session and must survive the SIGKILL too). It
//! behaves as the 3.1.1 ones in workers.rs: subscribed once at QoS 2, it leaves (with a
//! DISCONNECT or without), takes over its own session, and drains at the end.

use super::ctx::{stop_signal, Counters, Ctx, Inbox, LiveGuard, Rng};
use super::workers::{Expected, SubOutcome};
use crate::client::{self, write_flush, TlsStream, MAX_PACKET};
use crate::payload;
use anyhow::{anyhow, bail, Context};
use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{
    Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter,
    Packet, PubAck, PubComp, PubRec, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::{Error as CodecError, QoS};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{oneshot, watch};

/// Seconds the broker keeps the session after a connection ends.
const SESSION_EXPIRY: u32 = 3600;

/// A connection speaking MQTT 5.
struct Link5 {
    reader: ReadHalf<TlsStream>,
    buf: BytesMut,
    writer: WriteHalf<TlsStream>,
    _live: LiveGuard,
}

impl Link5 {
    async fn open(ctx: &Ctx, id: &str) -> anyhow::Result<Self> {
        let stream = client::tls_connect(ctx.addr, &ctx.subscriber_tls).await?;
        let (reader, mut writer) = tokio::io::split(stream);
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(SESSION_EXPIRY);
        let connect = Connect {
            keep_alive: 600,
            client_id: id.to_string(),
            clean_start: false,
            properties: Some(props),
        };
        let mut out = BytesMut::new();
        Packet::Connect(connect, None, None)
            .write(&mut out, None)
            .map_err(|e| anyhow!("encoding CONNECT: {e:?}"))?;
        write_flush(&mut writer, &out).await?;
        let mut link = Self {
            reader,
            buf: BytesMut::with_capacity(4096),
            writer,
            _live: ctx.track(),
        };
        match link.next().await? {
            Some(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => Ok(link),
            other => bail!("expected a successful CONNACK, got {other:?}"),
        }
    }

    /// [`Link5::open`] until it works (the broker may be restarting), every 100 ms–1 s;
    /// `None` once the soak stops, or at `deadline` if given (the final drain).
    async fn connect(ctx: &Ctx, id: &str, deadline: Option<Instant>) -> Option<Self> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match deadline {
                Some(d) if Instant::now() > d => return None,
                None if ctx.stopping() => return None,
                _ => {}
            }
            match tokio::time::timeout(Duration::from_secs(10), Self::open(ctx, id)).await {
                Ok(Ok(link)) => return Some(link),
                Ok(Err(e)) => {
                    Counters::add(&ctx.counters.connect_failures);
                    if ctx.epoch_up() {
                        ctx.note(format!("connect {id}: {e:#}"));
                    }
                }
                Err(_) => Counters::add(&ctx.counters.connect_failures),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn buffered(&mut self) -> anyhow::Result<Option<Packet>> {
        match Packet::read(&mut self.buf, Some(MAX_PACKET as u32)) {
            Ok(p) => Ok(Some(p)),
            Err(CodecError::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(anyhow!("malformed MQTT 5 packet from the broker: {e:?}")),
        }
    }

    async fn fill(&mut self) -> anyhow::Result<bool> {
        self.buf.reserve(64 * 1024);
        let n = self
            .reader
            .read_buf(&mut self.buf)
            .await
            .context("reading")?;
        Ok(n > 0)
    }

    async fn next(&mut self) -> anyhow::Result<Option<Packet>> {
        loop {
            if let Some(p) = self.buffered()? {
                return Ok(Some(p));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        let mut sub = Subscribe::new(Filter::new(filter, QoS::ExactlyOnce), None);
        sub.pkid = 1;
        let mut out = BytesMut::new();
        Packet::Subscribe(sub)
            .write(&mut out, None)
            .map_err(|e| anyhow!("encoding SUBSCRIBE: {e:?}"))?;
        write_flush(&mut self.writer, &out).await?;
        loop {
            match self.next().await? {
                Some(Packet::SubAck(a)) => {
                    return match a.return_codes.first() {
                        Some(SubscribeReasonCode::Success(_)) => Ok(()),
                        other => bail!("SUBSCRIBE {filter} refused: {other:?}"),
                    }
                }
                Some(_) => continue,
                None => bail!("the broker closed the connection before SUBACK"),
            }
        }
    }

    /// DISCONNECT (normal: the session stays for its expiry), then close.
    async fn disconnect(mut self) {
        let mut out = BytesMut::new();
        let d = Disconnect::new(DisconnectReasonCode::NormalDisconnection);
        if Packet::Disconnect(d).write(&mut out, None).is_ok() {
            let _ = write_flush(&mut self.writer, &out).await;
        }
        let _ = self.writer.shutdown().await;
    }

    /// Reads and answers for `d`, or until the soak stops if `ctx` is given; `Err` when
    /// the connection ends.
    async fn receive_for(
        &mut self,
        ctx: Option<&Ctx>,
        inbox: &mut Inbox,
        d: Duration,
    ) -> anyhow::Result<()> {
        let until = Instant::now() + d;
        let mut stop = ctx.map(|c| c.stop_signal());
        let mut acks = BytesMut::new();
        loop {
            if stop.as_ref().is_some_and(|s| *s.borrow()) {
                return Ok(());
            }
            while let Some(p) = self.buffered()? {
                handle(p, inbox, &mut acks)?;
            }
            if !acks.is_empty() {
                write_flush(&mut self.writer, &acks).await?;
                acks.clear();
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            let stopped = stop_signal(&mut stop);
            tokio::select! {
                r = tokio::time::timeout(left, self.fill()) => match r {
                    Ok(Ok(true)) | Err(_) => {}
                    Ok(Ok(false)) => bail!("the broker closed the connection"),
                    Ok(Err(e)) => return Err(e),
                },
                _ = stopped => {}
            }
        }
    }

    /// Reads until the broker closes the connection (after its DISCONNECT 0x8E, Session
    /// taken over), up to `limit`; true if it did.
    async fn until_closed(&mut self, inbox: &mut Inbox, limit: Duration) -> bool {
        match self.receive_for(None, inbox, limit).await {
            Err(_) => true,
            Ok(()) => false,
        }
    }
}

/// Records a PUBLISH and answers it (PUBACK, PUBREC), and a PUBREL with PUBCOMP.
fn handle(packet: Packet, inbox: &mut Inbox, acks: &mut BytesMut) -> anyhow::Result<()> {
    let ack = match packet {
        Packet::Publish(p) => {
            inbox.messages += 1;
            match payload::decode(&p.payload) {
                Some(s) => {
                    inbox
                        .per_publisher
                        .entry(s.publisher)
                        .or_default()
                        .record(s.seq);
                }
                None => inbox.unstamped += 1,
            }
            match p.qos {
                QoS::AtMostOnce => None,
                QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(p.pkid, None))),
                QoS::ExactlyOnce => Some(Packet::PubRec(PubRec::new(p.pkid, None))),
            }
        }
        Packet::PubRel(r) => Some(Packet::PubComp(PubComp::new(r.pkid, None))),
        _ => None,
    };
    if let Some(a) = ack {
        a.write(acks, None)
            .map_err(|e| anyhow!("encoding an acknowledgement: {e:?}"))?;
    }
    Ok(())
}

/// The MQTT 5 twin of `workers::persistent_subscriber`.
pub async fn persistent_subscriber(
    ctx: Arc<Ctx>,
    id: String,
    filter: &'static str,
    seed: u64,
    ready: oneshot::Sender<()>,
    mut expected: watch::Receiver<Option<Expected>>,
) -> SubOutcome {
    let mut rng = Rng::new(seed);
    let mut out = SubOutcome {
        id: id.clone(),
        inbox: Inbox::default(),
        complete: false,
        drain_secs: 0.0,
    };
    let mut link = loop {
        let Some(mut l) = Link5::connect(&ctx, &id, None).await else {
            return out;
        };
        match l.subscribe(filter).await {
            Ok(()) => break Some(l),
            Err(e) => ctx.note(format!("{id}: subscribe: {e:#}")),
        }
    };
    let _ = ready.send(());
    while !ctx.stopping() {
        let Some(mut l) = link.take() else {
            link = Link5::connect(&ctx, &id, None).await;
            continue;
        };
        let online = rng.secs(5.0, 20.0);
        if let Err(e) = l.receive_for(Some(&ctx), &mut out.inbox, online).await {
            Counters::add(&ctx.counters.unexpected_closes);
            if ctx.epoch_up() {
                ctx.note(format!("{id}: {e:#}"));
            }
            continue;
        }
        if ctx.stopping() {
            link = Some(l);
            break;
        }
        let dice = rng.next_u64() % 10;
        if dice < 4 {
            l.disconnect().await;
            ctx.away(&mut rng, true).await;
        } else if dice < 7 {
            drop(l);
            ctx.away(&mut rng, false).await;
        } else {
            let epoch = ctx.epoch();
            link = Link5::connect(&ctx, &id, None).await;
            if link.is_some() {
                Counters::add(&ctx.counters.takeovers);
                let closed = l.until_closed(&mut out.inbox, Duration::from_secs(5)).await;
                if !closed && ctx.epoch() == epoch {
                    Counters::add(&ctx.counters.takeover_old_not_closed);
                    ctx.note(format!(
                        "{id}: first connection open 5 s after the takeover"
                    ));
                }
            }
        }
    }

    let Ok(exp) = expected.wait_for(|e| e.is_some()).await.map(|e| e.clone()) else {
        return out;
    };
    let exp = exp.unwrap_or_default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    let (mut last_count, mut quiet_since) = (out.inbox.messages, Instant::now());
    while Instant::now() < deadline && quiet_since.elapsed() < Duration::from_secs(15) {
        if out.inbox.has_all(&exp) {
            out.complete = true;
            break;
        }
        let Some(mut l) = link.take() else {
            link = Link5::connect(&ctx, &id, Some(deadline)).await;
            continue;
        };
        match l
            .receive_for(None, &mut out.inbox, Duration::from_millis(500))
            .await
        {
            Ok(()) => link = Some(l),
            Err(e) => ctx.note(format!("{id} draining: {e:#}")),
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
