//! What publisher and subscriber share: connection options, the per-connection rumqttc
//! session, events for observers, and turning connection errors into readable reasons.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Outgoing,
    TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::article::{Article, MAX_ARTICLE_BYTES};
use crate::backoff::BackoffPolicy;
use crate::tls::{client_config, TlsError};

/// MQTT packet size limit, in and out (rumqttc's default of 10 KiB is too small).
const MAX_PACKET_BYTES: usize = 4 * MAX_ARTICLE_BYTES;

/// How to reach and authenticate to the broker.
#[derive(Debug, Clone)]
pub struct ConnectionOptions {
    pub host: String,
    pub port: u16,
    /// CA that signed the broker's certificate (PEM).
    pub ca: PathBuf,
    /// Client certificate (PEM); re-read before every connection attempt.
    pub cert: PathBuf,
    /// Client private key (PEM, PKCS#8/SEC1/PKCS#1); re-read before every attempt.
    pub key: PathBuf,
    pub client_id: String,
    /// Keep retrying when the *first* connection fails, instead of returning an error.
    /// (After a first success, reconnection is always retried until shutdown.)
    pub retry: bool,
    /// MQTT keep-alive; whole seconds, at least 1 s.
    pub keep_alive: Duration,
    /// Timeout of one connection attempt (TCP + TLS + CONNACK); whole seconds, at least 1 s.
    pub connect_timeout: Duration,
    /// Delay between attempts.
    pub backoff: BackoffPolicy,
}

impl ConnectionOptions {
    /// Options with defaults: no first-connection retry, 30 s keep-alive, 5 s connect
    /// timeout, 100 ms → 5 s backoff.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
        client_id: impl Into<String>,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
            client_id: client_id.into(),
            retry: false,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            backoff: BackoffPolicy::default(),
        }
    }

    /// `host:port`, for messages.
    pub fn broker(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// rumqttc options with a freshly built TLS configuration (certificate files re-read).
    /// `manual_acks`: incoming QoS 1 messages are acknowledged by the caller (the
    /// archiving subscriber, once stored), not by rumqttc on receipt.
    pub(crate) fn mqtt_options(
        &self,
        clean_session: bool,
        manual_acks: bool,
    ) -> Result<MqttOptions, TlsError> {
        let tls = client_config(&self.ca, &self.cert, &self.key)?;
        let mut opts = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        opts.set_keep_alive(Duration::from_secs(self.keep_alive.as_secs().max(1)))
            // rumqttc panics on a persistent session with an empty id; validated earlier,
            // but never risk a panic here.
            .set_clean_session(clean_session || self.client_id.is_empty())
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
            .set_manual_acks(manual_acks)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        Ok(opts)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.host.is_empty() {
            return Err("host must not be empty".into());
        }
        if self.port == 0 {
            return Err("port must not be 0".into());
        }
        if self.client_id.is_empty() {
            return Err("client id must not be empty".into());
        }
        Ok(())
    }
}

/// Progress notifications, for tests and other observers (optional `events` sender in
/// the publisher and subscriber options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// CONNACK received.
    Connected { session_present: bool },
    /// SUBACK received; `filters` are the ones the broker accepted.
    Subscribed { filters: Vec<String> },
    /// The broker acknowledged (PUBACK) this article.
    Published { article: Article, topic: String },
    /// A connection attempt failed or an established connection dropped.
    ConnectionLost { reason: String },
    /// The archive committed these articles' rows (new, or already there).
    Archived { ids: Vec<String> },
}

pub(crate) fn emit(events: &Option<mpsc::UnboundedSender<ClientEvent>>, event: ClientEvent) {
    if let Some(tx) = events {
        // A dropped receiver just means nobody is watching any more.
        let _ = tx.send(event);
    }
}

/// One MQTT connection: a fresh rumqttc client + event loop, the event loop driven by its
/// own task so that `select!`-ing on events never cancels a half-done network operation.
/// The event loop is used for ONE connection only: on the first error the task ends and
/// the caller builds a new session after a backoff delay.
pub(crate) struct Session {
    pub client: AsyncClient,
    events: mpsc::Receiver<Result<Event, ConnectionError>>,
    task: JoinHandle<()>,
}

impl Session {
    pub fn start(
        opts: &ConnectionOptions,
        clean_session: bool,
        request_capacity: usize,
        manual_acks: bool,
    ) -> Result<Self, TlsError> {
        let mqtt = opts.mqtt_options(clean_session, manual_acks)?;
        let (client, mut eventloop) = AsyncClient::new(mqtt, request_capacity);
        eventloop
            .network_options
            .set_connection_timeout(opts.connect_timeout.as_secs().max(1));
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if tx.send(event).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Self {
            client,
            events: rx,
            task,
        })
    }

    /// Next event; cancel-safe.
    pub async fn next(&mut self) -> Result<Event, ConnectionError> {
        match self.events.recv().await {
            Some(event) => event,
            None => Err(ConnectionError::RequestsDone),
        }
    }

    /// Sends DISCONNECT and waits (bounded) until it has been written.
    pub async fn disconnect(mut self, wait: Duration) {
        if self.client.try_disconnect().is_err() {
            return;
        }
        let _ = tokio::time::timeout(wait, async {
            loop {
                match self.next().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A one-line, actionable explanation of a connection failure. `established`: the
/// connection had been accepted (CONNACK) before failing, so certificate problems are not
/// a likely cause.
pub fn describe_connection_error(
    err: &ConnectionError,
    opts: &ConnectionOptions,
    established: bool,
) -> String {
    match err {
        ConnectionError::ConnectionRefused(code) => {
            let hint = match code {
                ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword => {
                    format!(
                        "; is the CN of {} allowed by the broker?",
                        opts.cert.display()
                    )
                }
                ConnectReturnCode::BadClientId => "; try another --client-id".to_owned(),
                _ => String::new(),
            };
            format!("the broker refused the MQTT connection ({code:?}){hint}")
        }
        ConnectionError::NetworkTimeout => format!(
            "no answer within {} s (is {} the right host and port?)",
            opts.connect_timeout.as_secs().max(1),
            opts.broker()
        ),
        _ => {
            if let Some(tls) = find_in_chain::<rustls::Error>(err) {
                return describe_tls(tls, opts);
            }
            if let Some(io) = find_in_chain::<io::Error>(err) {
                return describe_io(io, opts, established);
            }
            if matches!(
                err,
                ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted)
            ) {
                return closed_by_broker("", opts, established);
            }
            err.to_string()
        }
    }
}

fn describe_tls(err: &rustls::Error, opts: &ConnectionOptions) -> String {
    use rustls::AlertDescription as A;
    match err {
        rustls::Error::InvalidCertificate(e) => format!(
            "the broker's certificate was rejected ({e:?}); was it signed by {} and is it valid for host '{}'?",
            opts.ca.display(),
            opts.host
        ),
        rustls::Error::AlertReceived(
            alert @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateRequired
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::AccessDenied
            | A::DecryptError),
        ) => format!(
            "the broker rejected the client certificate {} (TLS alert: {alert:?}); is it signed by the broker's CA and still valid?",
            opts.cert.display()
        ),
        other => format!("TLS error: {other}"),
    }
}

fn closed_by_broker(detail: &str, opts: &ConnectionOptions, established: bool) -> String {
    if established {
        format!("the broker closed the connection{detail}")
    } else {
        format!(
            "the broker closed the connection{detail} before accepting it; it may have rejected the client certificate {}",
            opts.cert.display()
        )
    }
}

fn describe_io(err: &io::Error, opts: &ConnectionOptions, established: bool) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => format!(
            "connection refused; is the broker running and listening on {}?",
            opts.broker()
        ),
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => closed_by_broker(&format!(" ({err})"), opts, established),
        _ => format!("network error: {err}"),
    }
}

/// Finds an error of type `T` in the source chain, looking inside `io::Error`s too.
fn find_in_chain<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(found) = inner.downcast_ref::<T>() {
                return Some(found);
            }
        }
        current = e.source();
    }
    None
}

/// One WARN line for a failed attempt or a lost connection, with the next delay.
pub(crate) fn log_failure(
    opts: &ConnectionOptions,
    established: bool,
    connections: u64,
    reason: &str,
    delay: Duration,
) {
    let what = if established {
        "connection lost"
    } else if connections == 0 {
        "connection failed"
    } else {
        "reconnection failed"
    };
    tracing::warn!(broker = %opts.broker(), "{what}: {reason} — retrying in {delay:?}");
}

/// This machine's host name (or `local`), restricted to `[A-Za-z0-9_-]`.
pub fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    if clean.is_empty() {
        "local".to_owned()
    } else {
        clean
    }
}

/// `subscriber-<hostname>`: stable across restarts so the persistent session is resumed.
pub fn default_subscriber_id() -> String {
    format!("subscriber-{}", hostname())
}

/// `publisher-<hostname>-<pid>`: two publishers on one machine must not take over each
/// other's connection.
pub fn default_publisher_id() -> String {
    format!("publisher-{}-{}", hostname(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ConnectionOptions {
        ConnectionOptions::new("localhost", 8883, "ca.crt", "me.crt", "me.key", "me")
    }

    #[test]
    fn refused_tcp_connection_is_explained() {
        let err = ConnectionError::Io(io::Error::from(io::ErrorKind::ConnectionRefused));
        let msg = describe_connection_error(&err, &opts(), false);
        assert!(
            msg.contains("is the broker running") && msg.contains("localhost:8883"),
            "{msg}"
        );
    }

    #[test]
    fn tls_alert_inside_io_error_is_found() {
        let inner = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        let err = ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::Error::Io(io::Error::new(io::ErrorKind::InvalidData, inner)),
        ));
        let msg = describe_connection_error(&err, &opts(), false);
        assert!(
            msg.contains("rejected the client certificate me.crt"),
            "{msg}"
        );
    }

    #[test]
    fn bad_server_certificate_points_at_ca() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let err = ConnectionError::Tls(rumqttc::TlsError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            inner,
        )));
        let msg = describe_connection_error(&err, &opts(), false);
        assert!(
            msg.contains("ca.crt") && msg.contains("UnknownIssuer"),
            "{msg}"
        );
    }

    #[test]
    fn closed_connection_mentions_the_certificate_only_before_connack() {
        let err = || ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted);
        let before = describe_connection_error(&err(), &opts(), false);
        assert!(before.contains("me.crt"), "{before}");
        let after = describe_connection_error(&err(), &opts(), true);
        assert_eq!(after, "the broker closed the connection");
    }

    #[test]
    fn mqtt_refusal_is_explained() {
        let err = ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized);
        let msg = describe_connection_error(&err, &opts(), false);
        assert!(
            msg.contains("NotAuthorized") && msg.contains("me.crt"),
            "{msg}"
        );
    }

    #[test]
    fn default_ids_are_valid() {
        let h = hostname();
        assert!(!h.is_empty());
        assert!(h
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(default_subscriber_id(), default_subscriber_id(), "stable");
        assert!(default_publisher_id().starts_with("publisher-"));
    }
}
