//! What a session reports: its share of the gauges, denied actions (logged once,
//! repeats summarised) and dropped messages (counted, logged with the client).

use super::Session;
use crate::security::acl::Action;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use tokio::time::{Duration, Instant};
use tracing::warn;

/// Repeated denials of one action on one topic are logged once per this period.
const DENIAL_SUMMARY: Duration = Duration::from_secs(60);
/// Distinct denials remembered per session for that summary.
const DENIAL_KEYS: usize = 1024;

/// This session's share of the gauges, so they can be corrected by difference.
#[derive(Default)]
pub(super) struct Reported {
    queued: i64,
    subscriptions: i64,
    /// The `broker_sessions{state}` gauge this session counts in.
    state: Option<Gauge>,
    state_name: Option<&'static str>,
}

/// Denials logged recently: (action, topic) -> (last logged, repeats since).
#[derive(Default)]
pub(super) struct Denials(HashMap<(Action, String), (Option<Instant>, u64)>);

impl Denials {
    /// Some(repeats since the last line) when this denial is to be logged now; None
    /// when it is counted towards the next summary.
    fn note(&mut self, action: Action, topic: &str, now: Instant) -> Option<u64> {
        if self.0.len() > DENIAL_KEYS {
            self.0.clear();
        }
        let entry = self
            .0
            .entry((action, topic.to_string()))
            .or_insert((None, 0));
        if entry
            .0
            .is_some_and(|last| now.duration_since(last) < DENIAL_SUMMARY)
        {
            entry.1 += 1;
            return None;
        }
        entry.0 = Some(now);
        Some(std::mem::take(&mut entry.1))
    }
}

impl Session {
    /// Brings the shared gauges up to date with this session; `gone` withdraws it.
    pub(super) fn report_gauges(&mut self, gone: bool) {
        let metrics = &self.shared.metrics;
        let (queued, subscriptions) = if gone {
            (0, 0)
        } else {
            (self.outgoing.queued() as i64, self.subs.len() as i64)
        };
        metrics.queued.inc_by(queued - self.reported.queued);
        metrics
            .subscriptions
            .inc_by(subscriptions - self.reported.subscriptions);
        self.reported.queued = queued;
        self.reported.subscriptions = subscriptions;
        if let Some(bridge) = &self.bridge {
            let (messages, bytes) = if gone {
                (0, 0)
            } else {
                (self.outgoing.waiting(), self.outgoing.waiting_bytes())
            };
            bridge.queued_messages.set(messages as i64);
            bridge.queued_bytes.set(bytes as i64);
        }
        let state = match (gone, self.conn.is_some()) {
            (true, _) => None,
            (false, true) => Some("online"),
            (false, false) => Some("offline"),
        };
        if state != self.reported.state_name {
            if let Some(old) = self.reported.state.take() {
                old.dec();
            }
            if let Some(name) = state {
                let gauge = metrics.session_state(name);
                gauge.inc();
                self.reported.state = Some(gauge);
            }
            self.reported.state_name = state;
        }
    }

    /// Logs a denial at WARN; repeats of the same action and topic are summarised at
    /// most once a minute, with their count.
    pub(super) fn log_denial(&mut self, action: Action, topic: &str) {
        self.shared.metrics.denied(action);
        let Some(repeated) = self.denials.note(action, topic, Instant::now()) else {
            return;
        };
        let addr = self
            .conn
            .as_ref()
            .map(|c| c.addr.to_string())
            .unwrap_or_default();
        warn!(identity = %self.key.identity, client_id = %self.key.client_id, addr = %addr,
            action = %action, topic = %topic, repeated, "denied: not authorized");
    }

    /// Counts a dropped message; logs the first and every thousandth.
    pub(super) fn drop_message(&mut self, topic: &str, why: &str) {
        self.dropped += 1;
        self.shared.metrics.dropped.inc();
        if let Some(bridge) = &self.bridge {
            bridge.dropped.inc();
        }
        if self.dropped == 1 || self.dropped.is_multiple_of(1000) {
            warn!(identity = %self.key.identity, client_id = %self.key.client_id,
                topic = %topic, dropped = self.dropped, "{why}");
        }
    }

    /// A subscriber session ended between matching and taking the message (at
    /// shutdown): counted and logged, never silent.
    pub(super) fn lost_to_ended_session(&mut self, topic: &str) {
        self.shared.metrics.dropped.inc();
        warn!(identity = %self.key.identity, client_id = %self.key.client_id, topic = %topic,
            "message dropped: a subscriber's session ended before taking it");
    }

    /// The final count, once the session ends: the per-event lines are rate-limited.
    pub(super) fn report_drops(&self) {
        if self.dropped > 0 {
            warn!(identity = %self.key.identity, client_id = %self.key.client_id,
                dropped = self.dropped, "session ended: messages dropped in all");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_denials_are_summarised_once_a_period() {
        let mut denials = Denials::default();
        let start = Instant::now();
        let later = |secs| start + Duration::from_secs(secs);
        assert_eq!(denials.note(Action::Publish, "a", start), Some(0));
        assert_eq!(denials.note(Action::Publish, "a", later(1)), None);
        assert_eq!(denials.note(Action::Publish, "a", later(2)), None);
        // Another topic or action is logged on its own.
        assert_eq!(denials.note(Action::Subscribe, "a", later(2)), Some(0));
        assert_eq!(denials.note(Action::Publish, "b", later(2)), Some(0));
        assert_eq!(denials.note(Action::Publish, "a", later(61)), Some(2));
        assert_eq!(denials.note(Action::Publish, "a", later(62)), None);
    }
}
