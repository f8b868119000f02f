//! `retained`: many retained topics published, then a new `articulos/#` subscriber: how many
//! arrive and how long until the last.

use super::load::{self, Load, TopicPlan};
use super::{round, Common, Outcome, Setup};
use crate::client::{self, write_flush, ConnectOpts};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Packet, PubAck};
use rumqttc::mqttbytes::QoS;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_rustls::TlsConnector;

#[derive(Debug, Clone, clap::Args)]
pub struct RetainedArgs {
    /// Retained topics to publish.
    #[arg(long, default_value_t = 10_000)]
    pub topics: usize,
    #[arg(long, default_value_t = 300)]
    pub payload: usize,
}

pub async fn run(common: &Common, args: &RetainedArgs) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new(
        "retained",
        common.target,
        &format!("{} topics", args.topics),
    );
    // Mosquitto with persistence, as a deployment keeping retained messages would run it.
    let setup = Setup::start(common, true).await?;
    let addr = setup.broker.addr();
    let published = publish_retained(addr, &setup.publisher, args.topics, args.payload).await;
    match published {
        Ok((secs, errors)) => {
            out.set("publish_secs", round(secs, 2));
            out.errors(errors);
        }
        Err(e) => out.error(format!("publishing: {e:#}")),
    }
    match receive_retained(
        addr,
        &setup.subscriber,
        args.topics,
        Duration::from_secs(60),
    )
    .await
    {
        Ok(r) => {
            out.set("received", r.distinct);
            out.set("expected", args.topics);
            out.set("lost", args.topics.saturating_sub(r.distinct));
            out.set("without_retain_flag", r.not_retained);
            out.set(
                "time_to_all_ms",
                r.all_after.map(|d| round(d.as_secs_f64() * 1000.0, 1)),
            );
            out.set(
                "time_to_last_ms",
                round(r.last_after.as_secs_f64() * 1000.0, 1),
            );
            if let Some(e) = r.error {
                out.error(e);
            }
        }
        Err(e) => out.error(format!("subscribing: {e:#}")),
    }
    setup.finish(&mut out);
    Ok(out)
}

/// `n` retained QoS 1 messages, one per topic `articulos/d<i>/futbol`, 100 in flight;
/// returns the seconds taken and any errors.
pub async fn publish_retained(
    addr: SocketAddr,
    tls: &TlsConnector,
    n: usize,
    payload: usize,
) -> anyhow::Result<(f64, Vec<String>)> {
    // Four publishers sharing the topics; each topic written exactly once.
    let publishers = 4;
    let load = Load {
        publishers,
        subscribers: 0,
        qos: QoS::AtLeastOnce,
        rate: None,
        duration: Duration::from_secs(300),
        count: Some(n.div_ceil(publishers) as u64),
        payload,
        inflight: 100,
        retain: true,
        topics: TopicPlan::Rotating(n),
        filter: String::new(),
        drain: Duration::ZERO,
        persistent: false,
    };
    let r = load::run(addr, tls, tls, &load, "r").await?;
    Ok((r.publish_secs, r.errors))
}

pub struct Received {
    pub distinct: usize,
    pub not_retained: usize,
    pub all_after: Option<Duration>,
    pub last_after: Duration,
    pub error: Option<String>,
}

/// Subscribes to `articulos/#` at QoS 1 and counts distinct retained topics until
/// `expected` have arrived, 2 s of silence, or `limit`.
pub async fn receive_retained(
    addr: SocketAddr,
    tls: &TlsConnector,
    expected: usize,
    limit: Duration,
) -> anyhow::Result<Received> {
    let conn = client::connect(addr, tls, "retained-reader", ConnectOpts::default()).await?;
    let client::Conn {
        mut reader,
        mut writer,
    } = conn;
    let mut buf = BytesMut::new();
    let mut sub = rumqttc::mqttbytes::v4::Subscribe::new("articulos/#", QoS::AtLeastOnce);
    sub.pkid = 1;
    sub.write(&mut buf)?;
    let started = Instant::now();
    write_flush(&mut writer, &buf).await?;
    buf.clear();
    let mut topics = HashSet::with_capacity(expected);
    let mut r = Received {
        distinct: 0,
        not_retained: 0,
        all_after: None,
        last_after: Duration::ZERO,
        error: None,
    };
    let mut silent_since = Instant::now();
    loop {
        while let Some(p) = reader.buffered()? {
            if let Packet::Publish(p) = p {
                if !p.retain {
                    r.not_retained += 1;
                }
                if p.qos == QoS::AtLeastOnce {
                    PubAck::new(p.pkid).write(&mut buf)?;
                }
                if topics.insert(p.topic) {
                    r.last_after = started.elapsed();
                    if topics.len() == expected {
                        r.all_after = Some(r.last_after);
                    }
                }
                silent_since = Instant::now();
            }
        }
        if !buf.is_empty() {
            write_flush(&mut writer, &buf).await?;
            buf.clear();
        }
        if topics.len() >= expected || silent_since.elapsed() > Duration::from_secs(2) {
            break;
        }
        if started.elapsed() > limit {
            r.error = Some(format!("retained messages still arriving after {limit:?}"));
            break;
        }
        if let Err(e) = reader.fill_within(Duration::from_millis(100)).await {
            r.error = Some(e);
            break;
        }
    }
    r.distinct = topics.len();
    client::Conn { reader, writer }.disconnect().await;
    Ok(r)
}
