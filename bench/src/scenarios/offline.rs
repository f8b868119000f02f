//! `offline-queue`: a persistent subscriber is away while publishers send `--messages`
//! QoS 1 messages, every one acknowledged; the broker is killed with SIGKILL (or stopped,
//! with `--graceful`) and started again; the subscriber returns and drains its queue.
//! Measures the broker's memory holding the queue, its restart time with it, how many
//! acknowledged messages survive, and the drain rate.

use super::load::{self, Load, TopicPlan};
use super::{finish_broker, mb, round, Common, Outcome, Setup};
use crate::client::{self, write_flush, ConnectOpts};
use crate::payload;
use crate::target::{self, Broker, Kind};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Packet, PubAck};
use rumqttc::mqttbytes::QoS;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_rustls::TlsConnector;

const READER: &str = "offline-reader";
const FILTER: &str = "articulos/+/futbol";

#[derive(Debug, Clone, clap::Args)]
pub struct OfflineArgs {
    /// Messages published while the subscriber is away.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: usize,
    #[arg(long, default_value_t = 300)]
    pub payload: usize,
    /// SIGTERM instead of SIGKILL (the broker may save what it holds on the way out).
    #[arg(long)]
    pub graceful: bool,
}

pub async fn run(common: &Common, args: &OfflineArgs) -> anyhow::Result<Outcome> {
    let stop = if args.graceful { "SIGTERM" } else { "SIGKILL" };
    let variant = format!("{} queued, {stop}", args.messages);
    let mut out = Outcome::new("offline-queue", common.target, &variant);
    // Room for every message, so what is measured is the queue, not its limit.
    let mut setup = Setup::start_queued(common, true, args.messages + 1000).await?;
    let addr = setup.broker.addr();
    let opts = ConnectOpts {
        clean_session: false,
        ..ConnectOpts::default()
    };
    let mut reader = client::connect(addr, &setup.subscriber, READER, opts).await?;
    reader.subscribe(FILTER, QoS::AtLeastOnce).await?;
    reader.disconnect().await;

    let publishers = 4;
    let load = Load {
        publishers,
        subscribers: 0,
        qos: QoS::AtLeastOnce,
        rate: None,
        duration: Duration::from_secs(600),
        count: Some(args.messages.div_ceil(publishers) as u64),
        payload: args.payload,
        inflight: 100,
        retain: false,
        topics: TopicPlan::PerPublisher,
        filter: String::new(),
        drain: Duration::ZERO,
        persistent: false,
    };
    let acked = match load::run(addr, &setup.publisher, &setup.subscriber, &load, "q").await {
        Ok(r) => {
            out.set("populate_secs", round(r.publish_secs, 2));
            out.set("populate_acks_per_s", round(r.ack_rate(), 0));
            out.set("acked", r.acked);
            out.errors(r.errors);
            r.acked
        }
        Err(e) => {
            out.error(format!("publishing: {e:#}"));
            0
        }
    };
    if let Ok((rss, hwm)) = setup.broker.memory_kib() {
        out.set("rss_queued_mb", mb(rss));
        out.set("peak_rss_before_restart_mb", mb(hwm));
    }
    if args.graceful {
        let took = setup.broker.stop(Duration::from_secs(120));
        out.set("stop_secs", round(took.as_secs_f64(), 2));
    } else {
        setup.broker.kill();
    }

    // The same configuration, data and port again.
    let mut broker = Broker::spawn(setup.broker.spec.clone())?;
    match broker
        .wait_ready(&setup.subscriber, Duration::from_secs(120))
        .await
    {
        Ok(ready) => {
            out.set("start_ms", round(ready.as_secs_f64() * 1000.0, 1));
            if common.target == Kind::Ours {
                if let Some(queued) = target::restored_queued(&broker.log_text()) {
                    out.set("restored_queued_logged", queued);
                }
            }
            if let Ok((rss, _)) = broker.memory_kib() {
                out.set("rss_after_restart_mb", mb(rss));
            }
            match drain(addr, &setup.subscriber, acked, Duration::from_secs(300)).await {
                Ok(d) => {
                    out.set("delivered", d.distinct);
                    out.set("lost", acked.saturating_sub(d.distinct));
                    out.set("duplicates", d.duplicates);
                    out.set("drain_secs", round(d.secs, 2));
                    out.set("drain_msgs_per_s", round(d.distinct as f64 / d.secs, 0));
                    if let Some(e) = d.error {
                        out.error(e);
                    }
                }
                Err(e) => out.error(format!("draining: {e:#}")),
            }
        }
        Err(e) => out.error(format!("restart: {e:#}")),
    }
    finish_broker(&mut broker, &mut out);
    setup.finish(&mut Outcome::default());
    Ok(out)
}

struct Drained {
    distinct: u64,
    duplicates: u64,
    /// CONNACK to the last message (or to giving up).
    secs: f64,
    error: Option<String>,
}

/// The subscriber's session again: reads and acknowledges until `expected` distinct
/// messages, 3 s of silence, or `limit`.
async fn drain(
    addr: SocketAddr,
    tls: &TlsConnector,
    expected: u64,
    limit: Duration,
) -> anyhow::Result<Drained> {
    let opts = ConnectOpts {
        clean_session: false,
        ..ConnectOpts::default()
    };
    let client::Conn {
        mut reader,
        mut writer,
    } = client::connect(addr, tls, READER, opts).await?;
    let started = Instant::now();
    let mut seen = HashSet::with_capacity(expected as usize);
    let mut d = Drained {
        distinct: 0,
        duplicates: 0,
        secs: 0.0,
        error: None,
    };
    let mut buf = BytesMut::new();
    let mut last = Instant::now();
    loop {
        while let Some(p) = reader.buffered()? {
            if let Packet::Publish(p) = p {
                PubAck::new(p.pkid).write(&mut buf)?;
                last = Instant::now();
                match payload::decode(&p.payload) {
                    Some(s) if seen.insert((s.publisher, s.seq)) => {}
                    Some(_) => d.duplicates += 1,
                    None => d.error = Some("a payload without a benchmark stamp".into()),
                }
            }
        }
        if !buf.is_empty() {
            write_flush(&mut writer, &buf).await?;
            buf.clear();
        }
        if seen.len() as u64 >= expected || last.elapsed() > Duration::from_secs(3) {
            break;
        }
        if started.elapsed() > limit {
            d.error = Some(format!("still draining after {limit:?}"));
            break;
        }
        if let Err(e) = reader.fill_within(Duration::from_millis(100)).await {
            d.error = Some(e);
            break;
        }
    }
    d.distinct = seen.len() as u64;
    d.secs = last.duration_since(started).as_secs_f64().max(0.001);
    client::Conn { reader, writer }.disconnect().await;
    Ok(d)
}
