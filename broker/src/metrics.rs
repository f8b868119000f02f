//! Prometheus metrics: one registry per broker, served as text at `/metrics`.

use crate::refusal::Refusal;
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
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub connections_total: Counter,
    refusals: Family<Labels, Counter>,
    messages_received: Family<Labels, Counter>,
    messages_sent: Family<Labels, Counter>,
    /// The families' counters per QoS, looked up once: they are counted per message.
    received_by_qos: [Counter; 3],
    sent_by_qos: [Counter; 3],
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    pub retained: Gauge,
    sessions: Family<Labels, Gauge>,
    pub queued: Gauge,
    pub dropped: Counter,
    pub publisher_waits: Counter,
    pub subscriptions: Gauge,
    acl_denials: Family<Labels, Counter>,
    pub handshake_seconds: Histogram,
    pub delivery_seconds: Histogram,
    cert_expiry_days: Family<Labels, Gauge<f64, AtomicU64>>,
    pub storage_bytes: Gauge,
    pub flush_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
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
        Self { registry, ..m }
    }

    pub fn refused(&self, why: &Refusal) {
        self.refusals
            .get_or_create(&label("reason", why.metric_label()))
            .inc();
    }

    pub fn received(&self, qos: u8) {
        self.received_by_qos[usize::from(qos.min(2))].inc();
    }

    pub fn sent(&self, qos: u8) {
        self.sent_by_qos[usize::from(qos.min(2))].inc();
    }

    pub fn denied(&self, action: crate::acl::Action) {
        self.acl_denials
            .get_or_create(&label("action", &action.to_string()))
            .inc();
    }

    pub fn session_state(&self, state: &str) -> Gauge {
        self.sessions.get_or_create(&label("state", state)).clone()
    }

    pub fn set_certificate_expiry(&self, file: &str, days: f64) {
        self.cert_expiry_days
            .get_or_create(&label("file", file))
            .set(days);
    }

    /// Totals for `$SYS`.
    pub fn messages_received_total(&self) -> u64 {
        self.received_by_qos.iter().map(Counter::get).sum()
    }

    pub fn messages_sent_total(&self) -> u64 {
        self.sent_by_qos.iter().map(Counter::get).sum()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
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

/// Serves `/metrics` on `addr` until `stopped` changes; returns the bound address.
pub async fn serve(
    addr: std::net::SocketAddr,
    shared: std::sync::Arc<crate::server::Shared>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<std::net::SocketAddr, crate::server::StartError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|cause| crate::server::StartError::Metrics { addr, cause })?;
    let bound = listener
        .local_addr()
        .map_err(|cause| crate::server::StartError::Metrics { addr, cause })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let shared = shared.clone();
            async move {
                shared.refresh_gauges();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    shared.metrics.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let stop = async move {
            let _ = stopped.changed().await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    tracing::info!(addr = %bound, "Prometheus metrics at /metrics");
    Ok(bound)
}
