//! `durable-retained`: retained QoS 1 publishes acknowledged only once durable (ours:
//! flushed to sled before PUBACK; Mosquitto: no such guarantee, it saves its database on
//! exit), with one pipelining publisher or several synchronous ones; and the broker's
//! start time with many retained messages already in its store.

use super::load::{self, Load, TopicPlan};
use super::retained::{publish_retained, receive_retained};
use super::{finish_broker, mb, round, Common, Outcome, Setup};
use crate::target::{self, Broker, Kind};
use rumqttc::mqttbytes::QoS;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// One publisher with --inflight unacknowledged publishes.
    One,
    /// --publishers publishers, each waiting for every PUBACK (1 in flight).
    Many,
    /// Store --messages retained messages, stop the broker, time its restart.
    Restart,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DurableArgs {
    #[arg(long, value_enum, default_value = "one")]
    pub mode: Mode,
    /// Seconds of publishing (one, many).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// In flight for mode one.
    #[arg(long, default_value_t = 100)]
    pub inflight: usize,
    /// Publishers for mode many.
    #[arg(long, default_value_t = 8)]
    pub publishers: usize,
    /// Retained messages stored before the restart.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    #[arg(long, default_value_t = 300)]
    pub payload: usize,
}

pub async fn run(common: &Common, args: &DurableArgs) -> anyhow::Result<Outcome> {
    match args.mode {
        Mode::One | Mode::Many => publish_rate(common, args).await,
        Mode::Restart => restart(common, args).await,
    }
}

async fn publish_rate(common: &Common, args: &DurableArgs) -> anyhow::Result<Outcome> {
    let (publishers, inflight) = match args.mode {
        Mode::One => (1, args.inflight.max(1)),
        _ => (args.publishers.max(1), 1),
    };
    let variant = format!("{publishers} pub x {inflight} in flight");
    let mut out = Outcome::new("durable-retained", common.target, &variant);
    let setup = Setup::start(common, true).await?;
    let load = Load {
        publishers,
        subscribers: 0,
        qos: QoS::AtLeastOnce,
        rate: None,
        duration: Duration::from_secs_f64(args.duration.max(0.1)),
        count: None,
        payload: args.payload,
        inflight,
        retain: true,
        topics: TopicPlan::Rotating(1000),
        filter: String::new(),
        drain: Duration::ZERO,
        persistent: false,
    };
    let addr = setup.broker.addr();
    match load::run(addr, &setup.publisher, &setup.subscriber, &load, "d").await {
        Ok(r) => {
            out.set("msgs_per_s", round(r.ack_rate(), 0));
            out.set("sent", r.sent);
            out.set("acked", r.acked);
            if let Some(l) = r.ack_latency {
                out.set("p50_ms", round(l.p50_ms, 3));
                out.set("p99_ms", round(l.p99_ms, 3));
                out.set("p999_ms", round(l.p999_ms, 3));
            }
            out.errors(r.errors);
        }
        Err(e) => out.error(format!("{e:#}")),
    }
    setup.finish(&mut out);
    Ok(out)
}

async fn restart(common: &Common, args: &DurableArgs) -> anyhow::Result<Outcome> {
    let variant = format!("{} retained", args.messages);
    let mut out = Outcome::new("durable-retained", common.target, &variant);
    let mut setup = Setup::start(common, true).await?;
    let addr = setup.broker.addr();
    match publish_retained(addr, &setup.publisher, args.messages, args.payload).await {
        Ok((secs, errors)) => {
            out.set("populate_secs", round(secs, 2));
            out.errors(errors);
        }
        Err(e) => out.error(format!("populating: {e:#}")),
    }
    if let Ok((rss, _)) = setup.broker.memory_kib() {
        out.set("rss_before_restart_mb", mb(rss));
    }
    let stop = setup.broker.stop(Duration::from_secs(60));
    out.set("stop_secs", round(stop.as_secs_f64(), 2));

    // The same configuration, data and port again.
    let spec = setup.broker.spec.clone();
    let mut broker = Broker::spawn(spec)?;
    match broker
        .wait_ready(&setup.subscriber, Duration::from_secs(120))
        .await
    {
        Ok(ready) => {
            out.set("start_ms", round(ready.as_secs_f64() * 1000.0, 1));
            if common.target == Kind::Ours {
                if let Some((messages, took_ms)) = target::restored_line(&broker.log_text()) {
                    out.set("restored_logged", messages);
                    out.set("restore_took_ms", took_ms);
                }
            }
            if let Ok((rss, _)) = broker.memory_kib() {
                out.set("rss_after_restart_mb", mb(rss));
            }
            match receive_retained(
                addr,
                &setup.subscriber,
                args.messages,
                Duration::from_secs(120),
            )
            .await
            {
                Ok(r) => {
                    out.set("restored_delivered", r.distinct);
                    out.set("lost", args.messages.saturating_sub(r.distinct));
                    if let Some(e) = r.error {
                        out.error(e);
                    }
                }
                Err(e) => out.error(format!("reading back: {e:#}")),
            }
        }
        Err(e) => out.error(format!("restart: {e:#}")),
    }
    finish_broker(&mut broker, &mut out);
    setup.finish(&mut Outcome::default());
    Ok(out)
}
