//! The subscriber: persistent session, QoS 1 subscriptions (optionally shared), payload
//! parsing, de-duplication of redelivered articles, and the archive (`crate::archive`).

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use rumqttc::{Event, Packet, QoS, SubscribeFilter, SubscribeReasonCode};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::archive::{ArchiveOptions, Commit, Pipeline};
use crate::backoff::Backoff;
use crate::connection::{
    describe_connection_error, emit, log_failure, ClientEvent, ConnectionOptions, Session,
};
use crate::dedupe::{DedupeWindow, DEFAULT_DEDUPE_WINDOW};
use crate::error::ClientError;
use crate::payload::{sanitize_for_display, Payload};
use crate::topic::{parse_article_topic, subscription_filter, DEFAULT_FILTER};

#[derive(Debug, Clone)]
pub struct SubscriberOptions {
    /// Connection options; the client id should be stable (persistent session).
    pub connection: ConnectionOptions,
    /// Topic filters, default `["articulos/+/futbol"]`.
    pub topics: Vec<String>,
    /// Shared-subscription group: subscribes to `$share/<group>/<topic>`.
    pub group: Option<String>,
    /// Output as JSON lines (used by [`stdout_sink`] in the binary).
    pub json: bool,
    /// Start with a clean session instead of resuming the persistent one.
    pub clean_session: bool,
    /// How many article ids to remember for de-duplication.
    pub dedupe_window: usize,
    /// Optional observer: `Connected`, `Subscribed` (after SUBACK), `ConnectionLost`,
    /// `Archived` (after each commit).
    pub events: Option<mpsc::UnboundedSender<ClientEvent>>,
    /// Keep every article in a database, acknowledged once stored (`None`: print only).
    pub archive: Option<ArchiveOptions>,
}

impl SubscriberOptions {
    /// Defaults: `articulos/+/futbol`, no group, text output, persistent session,
    /// 10 000-id dedupe window.
    pub fn new(connection: ConnectionOptions) -> Self {
        Self {
            connection,
            topics: vec![DEFAULT_FILTER.to_owned()],
            group: None,
            json: false,
            clean_session: false,
            dedupe_window: DEFAULT_DEDUPE_WINDOW,
            events: None,
            archive: None,
        }
    }

    /// The filters actually subscribed to (with the `$share/<group>/` prefix if any).
    pub fn filters(&self) -> Result<Vec<String>, ClientError> {
        if self.topics.is_empty() {
            return Err(ClientError::InvalidOption(
                "at least one topic is needed".into(),
            ));
        }
        self.topics
            .iter()
            .map(|t| subscription_filter(t, self.group.as_deref()).map_err(Into::into))
            .collect()
    }
}

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Received {
    pub topic: String,
    pub payload: Payload,
    /// The broker delivered it as a retained message.
    pub retain: bool,
    /// An article with this id was already received (a redelivery).
    pub duplicate: bool,
}

impl Received {
    /// `[eldiario/futbol] Título — Contenido` (raw payloads: `[topic] text`).
    pub fn to_text(&self) -> String {
        let label = match parse_article_topic(&self.topic) {
            Some((newspaper, section)) => format!("{newspaper}/{section}"),
            None => self.topic.clone(),
        };
        let label = sanitize_for_display(&label);
        match &self.payload {
            Payload::Article(a) => format!(
                "[{label}] {} — {}",
                sanitize_for_display(&a.title),
                sanitize_for_display(&a.content)
            ),
            Payload::Plain { title, content } => format!(
                "[{label}] {} — {}",
                sanitize_for_display(title),
                sanitize_for_display(content)
            ),
            Payload::Raw { text, .. } => format!("[{label}] {}", sanitize_for_display(text)),
        }
    }

    /// One JSON object (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                "{{\"topic\":{:?},\"error\":{:?}}}",
                self.topic,
                e.to_string()
            )
        })
    }
}

/// The binary's sink: prints each new message (text or JSON line) to stdout; duplicates
/// are only logged at debug level, raw payloads come with a warning. If stdout is a closed
/// pipe (`subscriber | head -3`), the process exits quietly with status 0.
pub fn stdout_sink(json: bool) -> impl FnMut(Received) {
    move |r: Received| {
        if r.duplicate {
            debug!(topic = %r.topic, id = r.payload.article_id().unwrap_or(""), "duplicate article dropped");
            return;
        }
        if let Payload::Raw { valid_utf8, .. } = &r.payload {
            warn!(
                topic = %r.topic,
                valid_utf8,
                "payload is neither a JSON article nor 'Título: … | Contenido: …'; showing it raw"
            );
        }
        let line = if json { r.to_json() } else { r.to_text() };
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            warn!("cannot write to stdout: {e}");
        }
    }
}

/// Splits the requested filters into (accepted, refused) according to a SUBACK.
/// A missing return code counts as refused.
fn split_suback(filters: &[String], codes: &[SubscribeReasonCode]) -> (Vec<String>, Vec<String>) {
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for (i, filter) in filters.iter().enumerate() {
        match codes.get(i) {
            Some(SubscribeReasonCode::Success(_)) => accepted.push(filter.clone()),
            _ => refused.push(filter.clone()),
        }
    }
    (accepted, refused)
}

/// What happened during a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriberReport {
    /// Messages delivered to the sink (duplicates included).
    pub received: u64,
    /// Of those, redeliveries of an already seen article id.
    pub duplicates: u64,
    /// Successful connections (1 + reconnections).
    pub connections: u64,
    /// With an archive: new rows committed.
    pub archived: u64,
    /// With an archive: messages acknowledged without a row (not articles).
    pub not_archived: u64,
}

/// Runs the subscriber until `shutdown` completes, delivering every message to `sink`.
///
/// Subscribes (QoS 1) on the first connection and again whenever the broker has no
/// session for us (`session_present = false`). The first connection failing is an error
/// unless `connection.retry` is set; afterwards it reconnects forever with backoff.
///
/// With `archive`, each message is acknowledged only once its row is committed (or it
/// is refused as not an article); while the database is down nothing is acknowledged,
/// the MQTT session stays up and the broker keeps the messages.
pub async fn run_subscriber<F, S>(
    opts: SubscriberOptions,
    mut sink: F,
    shutdown: S,
) -> Result<SubscriberReport, ClientError>
where
    F: FnMut(Received),
    S: Future<Output = ()>,
{
    opts.connection
        .validate()
        .map_err(ClientError::InvalidOption)?;
    let filters = opts.filters()?;
    let mut archive = match &opts.archive {
        Some(a) => Some(Pipeline::start(a, opts.connection.retry).await?),
        None => None,
    };
    let manual_acks = archive.is_some();
    let mut dedupe = DedupeWindow::new(opts.dedupe_window);
    let mut backoff = Backoff::new(opts.connection.backoff);
    let mut report = SubscriberReport::default();
    let mut subscribed_once = false;
    tokio::pin!(shutdown);

    loop {
        let mut established = false;
        let capacity = if manual_acks { 128 } else { 16 };
        let failure = match Session::start(
            &opts.connection,
            opts.clean_session,
            capacity,
            manual_acks,
        ) {
            Err(tls) => {
                if report.connections == 0 && !opts.connection.retry {
                    return Err(tls.into());
                }
                tls.to_string()
            }
            Ok(mut session) => {
                let mut connected = false;
                let outcome = loop {
                    tokio::select! {
                        biased;
                        () = &mut shutdown => {
                            if let Some(a) = archive.as_mut() {
                                a.drain(connected.then_some(&mut session), &opts.events).await;
                            }
                            if connected {
                                session.disconnect(Duration::from_secs(1)).await;
                            }
                            return Ok(finish(report, archive.as_ref()));
                        }
                        commit = next_commit(&mut archive) => {
                            let Some(a) = archive.as_mut() else { continue };
                            let Some(commit) = commit else {
                                return Err(ClientError::Archive("the archive's writer task stopped".into()));
                            };
                            let ids = a.on_commit(commit);
                            a.pump(&session.client);
                            emit(&opts.events, ClientEvent::Archived { ids });
                        }
                        event = session.next() => {
                            if let Some(a) = archive.as_mut() {
                                // rumqttc took a request (or something came in): room for more.
                                a.pump(&session.client);
                            }
                            match event {
                            Err(e) => break e,
                            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                                connected = true;
                                backoff.reset();
                                report.connections += 1;
                                if let Some(a) = archive.as_mut() {
                                    a.new_connection();
                                }
                                info!(
                                    broker = %opts.connection.broker(),
                                    client_id = %opts.connection.client_id,
                                    session_present = ack.session_present,
                                    "connected"
                                );
                                emit(&opts.events, ClientEvent::Connected { session_present: ack.session_present });
                                if !ack.session_present || !subscribed_once {
                                    let request = filters
                                        .iter()
                                        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                                    if let Err(e) = session.client.try_subscribe_many(request) {
                                        warn!("cannot queue the subscription request: {e}");
                                    }
                                } else {
                                    info!("persistent session resumed; subscriptions kept by the broker");
                                }
                            }
                            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                                let (accepted, refused) = split_suback(&filters, &ack.return_codes);
                                if accepted.is_empty() {
                                    session.disconnect(Duration::from_secs(1)).await;
                                    return Err(ClientError::SubscriptionRefused {
                                        filters: filters.join(", "),
                                    });
                                }
                                if !refused.is_empty() {
                                    warn!(?refused, "the broker refused some subscriptions");
                                }
                                subscribed_once = true;
                                info!(filters = ?accepted, "subscribed");
                                emit(&opts.events, ClientEvent::Subscribed { filters: accepted });
                            }
                            Ok(Event::Incoming(Packet::Publish(publish))) => {
                                let payload = Payload::parse(&publish.topic, &publish.payload);
                                if let Some(a) = archive.as_mut() {
                                    a.on_publish(&publish, &payload);
                                    a.pump(&session.client);
                                }
                                let duplicate = payload
                                    .article_id()
                                    .is_some_and(|id| !dedupe.insert(id));
                                report.received += 1;
                                if duplicate {
                                    report.duplicates += 1;
                                }
                                sink(Received {
                                    topic: publish.topic,
                                    payload,
                                    retain: publish.retain,
                                    duplicate,
                                });
                            }
                            Ok(_) => {}
                        }},
                    }
                };
                if let Some(a) = archive.as_mut() {
                    a.new_connection();
                }
                let reason = describe_connection_error(&outcome, &opts.connection, connected);
                established = connected;
                if report.connections == 0 && !opts.connection.retry {
                    return Err(ClientError::Connect {
                        broker: opts.connection.broker(),
                        reason,
                    });
                }
                reason
            }
        };

        let delay = backoff.next_delay();
        log_failure(
            &opts.connection,
            established,
            report.connections,
            &failure,
            delay,
        );
        emit(
            &opts.events,
            ClientEvent::ConnectionLost { reason: failure },
        );
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    if let Some(a) = archive.as_mut() {
                        a.drain(None, &opts.events).await;
                    }
                    return Ok(finish(report, archive.as_ref()));
                }
                () = &mut sleep => break,
                // Rows still commit while disconnected; their PUBACKs are owed no more.
                Some(commit) = next_commit(&mut archive) => {
                    if let Some(a) = archive.as_mut() {
                        let ids = a.on_commit(commit);
                        emit(&opts.events, ClientEvent::Archived { ids });
                    }
                }
            }
        }
    }
}

/// The archive's next commit, or never without an archive.
async fn next_commit(archive: &mut Option<Pipeline>) -> Option<Commit> {
    match archive {
        Some(a) => a.next_commit().await,
        None => std::future::pending().await,
    }
}

fn finish(mut report: SubscriberReport, archive: Option<&Pipeline>) -> SubscriberReport {
    if let Some(a) = archive {
        report.archived = a.archived;
        report.not_archived = a.refused;
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::article::Article;

    fn conn() -> ConnectionOptions {
        ConnectionOptions::new("localhost", 8883, "ca", "c", "k", "sub")
    }

    #[test]
    fn filters_default_and_shared() {
        let mut o = SubscriberOptions::new(conn());
        assert_eq!(o.filters().unwrap(), ["articulos/+/futbol"]);
        o.group = Some("lectores".into());
        o.topics.push("articulos/marca/#".into());
        assert_eq!(
            o.filters().unwrap(),
            [
                "$share/lectores/articulos/+/futbol",
                "$share/lectores/articulos/marca/#"
            ]
        );
        o.topics = vec!["articulos/#/x".into()];
        assert!(o.filters().is_err());
        o.topics.clear();
        assert!(o.filters().is_err());
    }

    #[test]
    fn suback_failures_are_separated() {
        let filters = vec!["a/#".to_owned(), "b/#".to_owned(), "c/#".to_owned()];
        let (ok, ko) = split_suback(
            &filters,
            &[
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
            ],
        );
        assert_eq!(ok, ["a/#"]);
        assert_eq!(ko, ["b/#", "c/#"], "missing code counts as refused");
    }

    #[test]
    fn text_and_json_rendering() {
        let r = Received {
            topic: "articulos/eldiario/futbol".into(),
            payload: Payload::Article(Article {
                id: "1".into(),
                newspaper: "eldiario".into(),
                section: "futbol".into(),
                title: "El Alavés en descenso".into(),
                content: "El Alavés pelea por no descender.".into(),
                published_at: String::new(),
            }),
            retain: false,
            duplicate: false,
        };
        assert_eq!(
            r.to_text(),
            "[eldiario/futbol] El Alavés en descenso — El Alavés pelea por no descender."
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["topic"], "articulos/eldiario/futbol");
        assert_eq!(v["payload"]["kind"], "article");
        assert_eq!(v["payload"]["title"], "El Alavés en descenso");
        assert_eq!(v["duplicate"], false);

        let raw = Received {
            topic: "otros/tema".into(),
            payload: Payload::parse("otros/tema", b"hola\x1b[2J"),
            retain: true,
            duplicate: false,
        };
        assert_eq!(raw.to_text(), "[otros/tema] hola\\u{1b}[2J");
        let v: serde_json::Value = serde_json::from_str(&raw.to_json()).unwrap();
        assert_eq!(v["payload"]["kind"], "raw");
        assert_eq!(v["retain"], true);
    }
}
