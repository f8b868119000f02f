//! `$SYS` topics, named as Mosquitto names them where the meaning is the same,
//! published every `sys_interval_secs` as retained messages (in memory only).

use super::gauges::refresh_gauges;
use crate::message::Message;
use crate::shared::Shared;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Samples kept for the one-minute load averages.
const LOAD_WINDOW: Duration = Duration::from_secs(60);

/// Publishes `$SYS` values until `stopped` changes.
pub(crate) async fn publish_loop(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    // Started with the broker, before its listener opens.
    let started = Instant::now();
    let interval = Duration::from_secs(shared.config.metrics.sys_interval_secs);
    let mut samples: VecDeque<(Instant, u64, u64)> = VecDeque::new();
    loop {
        let now = Instant::now();
        let received = shared.metrics.messages_received_total();
        let sent = shared.metrics.messages_sent_total();
        samples.push_back((now, received, sent));
        while samples
            .front()
            .is_some_and(|(t, ..)| now.duration_since(*t) > LOAD_WINDOW)
        {
            samples.pop_front();
        }
        let per_minute = |pick: fn(&(Instant, u64, u64)) -> u64| {
            let (Some(first), Some(last)) = (samples.front(), samples.back()) else {
                return 0.0;
            };
            let secs = last.0.duration_since(first.0).as_secs_f64();
            if secs <= 0.0 {
                return 0.0;
            }
            (pick(last) - pick(first)) as f64 * 60.0 / secs
        };
        let load_received = per_minute(|s| s.1);
        let load_sent = per_minute(|s| s.2);
        let messages = snapshot(&shared, started, load_received, load_sent);
        for m in &messages {
            shared.retained.set_volatile(m);
        }
        shared.sys.send_replace(Arc::new(messages));
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopped.changed() => return,
        }
    }
}

fn snapshot(shared: &Shared, started: Instant, load_received: f64, load_sent: f64) -> Vec<Message> {
    refresh_gauges(shared);
    let m = &shared.metrics;
    let online = m.session_state("online").get();
    let offline = m.session_state("offline").get();
    let values: Vec<(&str, String)> = vec![
        (
            "version",
            format!("mqtt-stack broker {}", env!("CARGO_PKG_VERSION")),
        ),
        ("uptime", format!("{} seconds", started.elapsed().as_secs())),
        ("clients/connected", online.to_string()),
        ("clients/disconnected", offline.to_string()),
        ("clients/total", (online + offline).to_string()),
        ("messages/received", m.messages_received_total().to_string()),
        ("messages/sent", m.messages_sent_total().to_string()),
        ("bytes/received", m.bytes_received.get().to_string()),
        ("bytes/sent", m.bytes_sent.get().to_string()),
        ("retained messages/count", shared.retained.len().to_string()),
        ("subscriptions/count", m.subscriptions.get().to_string()),
        ("store messages/count", m.queued.get().to_string()),
        ("load/messages/received/1min", format!("{load_received:.2}")),
        ("load/messages/sent/1min", format!("{load_sent:.2}")),
    ];
    values
        .into_iter()
        .map(|(name, value)| Message {
            topic: format!("$SYS/broker/{name}"),
            payload: Bytes::from(value),
            qos: 0,
            retain: true,
            properties: None,
        })
        .collect()
}
