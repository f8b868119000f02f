//! Prometheus metrics: one registry per broker, rendered as text for `/metrics`
//! (served by `operations::endpoint`).

use super::bridges::BridgeFamilies;
use crate::security::acl::Action;
use crate::security::refusal::Refusal;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(String, String)>;

fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_string(), value.to_string())]
}

/// Everything the broker counts. Cloning a metric shares it.
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) connections: Gauge,
    pub(crate) connections_total: Counter,
    refusals: Family<Labels, Counter>,
    closes: Family<Labels, Counter>,
    messages_received: Family<Labels, Counter>,
    messages_sent: Family<Labels, Counter>,
    /// The families' counters per QoS, looked up once: they are counted per message.
    received_by_qos: [Counter; 3],
    sent_by_qos: [Counter; 3],
    pub(crate) bytes_received: Counter,
    pub(crate) bytes_sent: Counter,
    pub(crate) retained: Gauge,
    sessions: Family<Labels, Gauge>,
    pub(crate) queued: Gauge,
    pub(crate) dropped: Counter,
    pub(crate) publisher_waits: Counter,
    pub(crate) subscriptions: Gauge,
    acl_denials: Family<Labels, Counter>,
    pub(crate) handshake_seconds: Histogram,
    pub(crate) delivery_seconds: Histogram,
    cert_expiry_days: Family<Labels, Gauge<f64, AtomicU64>>,
    pub(crate) storage_bytes: Gauge,
    pub(crate) flush_seconds: Histogram,
    pub(crate) bridges: BridgeFamilies,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("broker");
        let messages_received = Family::<Labels, Counter>::default();
        let messages_sent = Family::<Labels, Counter>::default();
        let by_qos = |family: &Family<Labels, Counter>| {
            [0, 1, 2].map(|q| family.get_or_create(&label("qos", qos_name(q))).clone())
        };
        let m = Self {
            connections: Gauge::default(),
            connections_total: Counter::default(),
            refusals: Family::default(),
            closes: Family::default(),
            received_by_qos: by_qos(&messages_received),
            sent_by_qos: by_qos(&messages_sent),
            messages_received,
            messages_sent,
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            retained: Gauge::default(),
            sessions: Family::default(),
            queued: Gauge::default(),
            dropped: Counter::default(),
            publisher_waits: Counter::default(),
            subscriptions: Gauge::default(),
            acl_denials: Family::default(),
            // 100 µs .. ~1.6 s
            handshake_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            // 10 µs .. ~1.3 s: a hand-over between sessions takes a few µs.
            delivery_seconds: Histogram::new(exponential_buckets(0.00001, 2.0, 18)),
            cert_expiry_days: Family::default(),
            storage_bytes: Gauge::default(),
            flush_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            bridges: BridgeFamilies::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections_open",
            "Open connections (sockets accepted and not yet closed)",
            m.connections.clone(),
        );
        r.register(
            "connections",
            "MQTT connections accepted (CONNACK 0)",
            m.connections_total.clone(),
        );
        r.register(
            "refusals",
            "Connections refused, by reason",
            m.refusals.clone(),
        );
        r.register(
            "disconnections",
            "Connections closed after their CONNECT was accepted, by reason",
            m.closes.clone(),
        );
        r.register(
            "messages_received",
            "PUBLISH packets received from clients, by QoS",
            m.messages_received.clone(),
        );
        r.register(
            "messages_sent",
            "PUBLISH packets sent to clients, by QoS",
            m.messages_sent.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes read from client sockets (MQTT)",
            m.bytes_received.clone(),
        );
        r.register(
            "sent_bytes",
            "Bytes written to client sockets (MQTT)",
            m.bytes_sent.clone(),
        );
        r.register(
            "retained_messages",
            "Retained messages stored",
            m.retained.clone(),
        );
        r.register(
            "sessions",
            "Sessions, by state (online, offline)",
            m.sessions.clone(),
        );
        r.register(
            "queued_messages",
            "QoS 1/2 messages queued in sessions, waiting for a slot or for their client",
            m.queued.clone(),
        );
        r.register(
            "dropped_messages",
            "Messages dropped because a session queue was full",
            m.dropped.clone(),
        );
        r.register(
            "publisher_waits",
            "Times a publishing session waited for room in a subscriber session's inbox (flow control)",
            m.publisher_waits.clone(),
        );
        r.register(
            "subscriptions",
            "Subscriptions held by sessions",
            m.subscriptions.clone(),
        );
        r.register(
            "acl_denials",
            "Actions denied by the ACL, by action",
            m.acl_denials.clone(),
        );
        r.register(
            "handshake_seconds",
            "TLS handshake duration",
            m.handshake_seconds.clone(),
        );
        r.register(
            "delivery_seconds",
            "Time from a PUBLISH received to its copy written to a subscriber",
            m.delivery_seconds.clone(),
        );
        r.register(
            "certificate_expiry_days",
            "Days until each loaded certificate expires",
            m.cert_expiry_days.clone(),
        );
        r.register(
            "storage_bytes",
            "Size of the sled store on disk",
            m.storage_bytes.clone(),
        );
        r.register(
            "storage_flush_seconds",
            "Duration of one group-commit flush of the store",
            m.flush_seconds.clone(),
        );
        m.bridges.register(r);
        Self { registry, ..m }
    }

    pub(crate) fn refused(&self, why: &Refusal) {
        self.refusals
            .get_or_create(&label("reason", why.metric_label()))
            .inc();
    }

    /// A connection of an accepted client closed, for `reason` (see `session::close`).
    pub(crate) fn closed(&self, reason: &'static str) {
        self.closes.get_or_create(&label("reason", reason)).inc();
    }

    pub(crate) fn received(&self, qos: u8) {
        self.received_by_qos[usize::from(qos.min(2))].inc();
    }

    pub(crate) fn sent(&self, qos: u8) {
        self.sent_by_qos[usize::from(qos.min(2))].inc();
    }

    pub(crate) fn denied(&self, action: Action) {
        self.acl_denials
            .get_or_create(&label("action", &action.to_string()))
            .inc();
    }

    pub(crate) fn session_state(&self, state: &str) -> Gauge {
        self.sessions.get_or_create(&label("state", state)).clone()
    }

    pub(crate) fn set_certificate_expiry(&self, file: &str, days: f64) {
        self.cert_expiry_days
            .get_or_create(&label("file", file))
            .set(days);
    }

    /// Totals for `$SYS`.
    pub(crate) fn messages_received_total(&self) -> u64 {
        self.received_by_qos.iter().map(Counter::get).sum()
    }

    pub(crate) fn messages_sent_total(&self) -> u64 {
        self.sent_by_qos.iter().map(Counter::get).sum()
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn qos_name(qos: u8) -> &'static str {
    match qos {
        0 => "0",
        1 => "1",
        _ => "2",
    }
}
