//! Per-bridge metrics, labelled `bridge="<name>"`: connected, queued, forwarded each
//! way, dropped, reconnects and failed attempts by reason.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[derive(Default)]
pub(crate) struct BridgeFamilies {
    connected: Family<Labels, Gauge>,
    queued_messages: Family<Labels, Gauge>,
    queued_bytes: Family<Labels, Gauge>,
    forwarded: Family<Labels, Counter>,
    dropped: Family<Labels, Counter>,
    reconnects: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
}

/// One bridge's series.
#[derive(Clone)]
pub(crate) struct BridgeMetrics {
    name: String,
    pub(crate) connected: Gauge,
    pub(crate) queued_messages: Gauge,
    pub(crate) queued_bytes: Gauge,
    pub(crate) forwarded_out: Counter,
    pub(crate) forwarded_in: Counter,
    pub(crate) dropped: Counter,
    pub(crate) reconnects: Counter,
    failures: Family<Labels, Counter>,
}

impl BridgeMetrics {
    /// Counts a failed attempt to reach the upstream.
    pub(crate) fn failed(&self, reason: &str) {
        self.failures
            .get_or_create(&labels(&[("bridge", &self.name), ("reason", reason)]))
            .inc();
    }
}

impl BridgeFamilies {
    pub(crate) fn register(&self, r: &mut Registry) {
        r.register(
            "bridge_connected",
            "1 while the bridge is connected to its upstream",
            self.connected.clone(),
        );
        r.register(
            "bridge_queued_messages",
            "Messages waiting for the upstream (in flight included)",
            self.queued_messages.clone(),
        );
        r.register(
            "bridge_queued_bytes",
            "Bytes (topics and payloads) waiting for the upstream",
            self.queued_bytes.clone(),
        );
        r.register(
            "bridge_forwarded",
            "Messages forwarded, by direction (out: to the upstream, in: from it)",
            self.forwarded.clone(),
        );
        r.register(
            "bridge_dropped",
            "Messages the bridge dropped: its queue full, or refused by the upstream",
            self.dropped.clone(),
        );
        r.register(
            "bridge_reconnects",
            "Attempts to reach the upstream after the first",
            self.reconnects.clone(),
        );
        r.register(
            "bridge_connect_failures",
            "Failed attempts to reach the upstream, by reason",
            self.failures.clone(),
        );
    }

    /// The series of bridge `name`.
    pub(crate) fn of(&self, name: &str) -> BridgeMetrics {
        let one = labels(&[("bridge", name)]);
        let way = |d: &str| labels(&[("bridge", name), ("direction", d)]);
        // One statement each: `get_or_create` returns a guard on the family, and a
        // second series of the same family created while it lives would deadlock.
        let forwarded_out = self.forwarded.get_or_create(&way("out")).clone();
        let forwarded_in = self.forwarded.get_or_create(&way("in")).clone();
        BridgeMetrics {
            name: name.to_string(),
            connected: self.connected.get_or_create(&one).clone(),
            queued_messages: self.queued_messages.get_or_create(&one).clone(),
            queued_bytes: self.queued_bytes.get_or_create(&one).clone(),
            forwarded_out,
            forwarded_in,
            dropped: self.dropped.get_or_create(&one).clone(),
            reconnects: self.reconnects.get_or_create(&one).clone(),
            failures: self.failures.clone(),
        }
    }

    /// Removes the series of a bridge that is no longer configured.
    pub(crate) fn forget(&self, name: &str) {
        let one = labels(&[("bridge", name)]);
        for family in [&self.connected, &self.queued_messages, &self.queued_bytes] {
            family.remove(&one);
        }
        for family in [&self.dropped, &self.reconnects] {
            family.remove(&one);
        }
        for d in ["out", "in"] {
            self.forwarded
                .remove(&labels(&[("bridge", name), ("direction", d)]));
        }
    }
}
