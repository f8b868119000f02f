//! The publisher: sends articles periodically at QoS 1 and keeps every article until the
//! broker has acknowledged it, resending after reconnections (none lost; duplicates on the
//! wire are possible and the subscriber drops them by id).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{Event, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use crate::article::{now_rfc3339, Article};
use crate::backoff::Backoff;
use crate::connection::{
    describe_connection_error, emit, log_failure, ClientEvent, ConnectionOptions, Session,
};
use crate::error::ClientError;
use crate::source::ArticleSource;

/// Articles submitted to rumqttc but not yet acknowledged, per connection.
const WINDOW: usize = 32;
/// Production pauses (nothing is dropped) while this many articles await a PUBACK.
const MAX_QUEUE: usize = 10_000;
/// Shortest interval between articles.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

#[derive(Debug, Clone)]
pub struct PublisherOptions {
    pub connection: ConnectionOptions,
    /// Time between two articles (the first one is sent right away).
    pub interval: Duration,
    /// Stop after this many articles have been acknowledged (`None`: run until shutdown).
    pub count: Option<u64>,
    /// Publish one article and return after its PUBACK (same as `count: Some(1)`).
    pub once: bool,
    /// Set the MQTT retain flag.
    pub retain: bool,
    /// Where the articles come from; the publisher cycles through them.
    pub articles: ArticleSource,
    /// On shutdown, how long to wait for outstanding PUBACKs before disconnecting.
    pub drain_timeout: Duration,
    /// Optional observer: receives `Connected`, `Published` (after PUBACK), `ConnectionLost`.
    pub events: Option<mpsc::UnboundedSender<ClientEvent>>,
}

impl PublisherOptions {
    /// Defaults: 5 s interval, unlimited count, built-in catalogue, no retain, 2 s drain.
    pub fn new(connection: ConnectionOptions) -> Self {
        Self {
            connection,
            interval: Duration::from_secs(5),
            count: None,
            once: false,
            retain: false,
            articles: ArticleSource::Builtin,
            drain_timeout: Duration::from_secs(2),
            events: None,
        }
    }
}

/// What happened during a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublisherReport {
    /// Articles acknowledged by the broker.
    pub acknowledged: u64,
    /// Articles produced but never acknowledged (only possible when stopped by shutdown).
    pub unacknowledged: u64,
    /// Successful connections (1 + reconnections).
    pub connections: u64,
}

struct Pending {
    article: Article,
    topic: String,
    payload: Vec<u8>,
}

/// Bookkeeping of one connection: which queued articles were handed to rumqttc, and
/// which packet id each one got.
#[derive(Default)]
struct Inflight {
    connected: bool,
    /// Next queue key to hand to rumqttc.
    cursor: u64,
    /// Handed to rumqttc, waiting for `Outgoing::Publish(pkid)` (emitted in order).
    awaiting_pkid: VecDeque<u64>,
    /// pkid → queue key, waiting for PUBACK.
    by_pkid: HashMap<u16, u64>,
}

impl Inflight {
    fn len(&self) -> usize {
        self.awaiting_pkid.len() + self.by_pkid.len()
    }
}

struct Publisher {
    opts: PublisherOptions,
    templates: Vec<(Article, String)>,
    target: Option<u64>,
    run_tag: String,
    produced: u64,
    queue: BTreeMap<u64, Pending>,
    report: PublisherReport,
    queue_full_warned: bool,
}

impl Publisher {
    fn can_produce(&self) -> bool {
        self.target.is_none_or(|t| self.produced < t) && self.queue.len() < MAX_QUEUE
    }

    fn finished(&self) -> bool {
        self.target.is_some_and(|t| self.produced >= t) && self.queue.is_empty()
    }

    /// Queues the next article from the (cycled) templates with a fresh id and timestamp.
    fn produce(&mut self) -> Result<(), ClientError> {
        if self.templates.is_empty() {
            return Err(ClientError::InvalidOption("no articles to publish".into()));
        }
        let index = (self.produced % self.templates.len() as u64) as usize;
        let (template, topic) = &self.templates[index];
        let seq = self.produced;
        self.produced += 1;
        let article = Article {
            id: format!("{}-{}", self.run_tag, seq + 1),
            published_at: now_rfc3339(),
            ..template.clone()
        };
        let payload = serde_json::to_vec(&article)?;
        self.queue.insert(
            seq,
            Pending {
                article,
                topic: topic.clone(),
                payload,
            },
        );
        if self.queue.len() >= MAX_QUEUE && !self.queue_full_warned {
            self.queue_full_warned = true;
            warn!(
                queued = self.queue.len(),
                "too many unacknowledged articles; pausing production until the broker catches up"
            );
        }
        Ok(())
    }

    /// Hands queued articles to rumqttc, in order, up to the in-flight window.
    fn submit(&mut self, session: &Session, inflight: &mut Inflight) {
        if !inflight.connected {
            return;
        }
        let keys: Vec<u64> = self
            .queue
            .range(inflight.cursor..)
            .map(|(k, _)| *k)
            .take(WINDOW.saturating_sub(inflight.len()))
            .collect();
        for key in keys {
            let Some(p) = self.queue.get(&key) else {
                continue;
            };
            match session.client.try_publish(
                p.topic.as_str(),
                QoS::AtLeastOnce,
                self.opts.retain,
                p.payload.clone(),
            ) {
                Ok(()) => {
                    inflight.awaiting_pkid.push_back(key);
                    inflight.cursor = key + 1;
                }
                // Request channel full or closed: retry on the next event.
                Err(_) => break,
            }
        }
    }

    /// Handles one event of the current connection.
    fn on_event(
        &mut self,
        event: Event,
        session: &Session,
        inflight: &mut Inflight,
        backoff: &mut Backoff,
    ) {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                *inflight = Inflight {
                    connected: true,
                    ..Inflight::default()
                };
                backoff.reset();
                self.report.connections += 1;
                info!(
                    broker = %self.opts.connection.broker(),
                    client_id = %self.opts.connection.client_id,
                    pending = self.queue.len(),
                    "connected"
                );
                emit(
                    &self.opts.events,
                    ClientEvent::Connected {
                        session_present: ack.session_present,
                    },
                );
                self.submit(session, inflight);
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(key) = inflight.awaiting_pkid.pop_front() {
                    inflight.by_pkid.insert(pkid, key);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(key) = inflight.by_pkid.remove(&ack.pkid) {
                    if let Some(p) = self.queue.remove(&key) {
                        self.report.acknowledged += 1;
                        info!(id = %p.article.id, topic = %p.topic, "published");
                        emit(
                            &self.opts.events,
                            ClientEvent::Published {
                                article: p.article,
                                topic: p.topic,
                            },
                        );
                    }
                }
                if self.queue.len() < MAX_QUEUE {
                    self.queue_full_warned = false;
                }
                self.submit(session, inflight);
            }
            _ => {}
        }
    }

    fn final_report(&mut self) -> PublisherReport {
        self.report.unacknowledged = self.queue.len() as u64;
        if !self.queue.is_empty() {
            warn!(
                count = self.queue.len(),
                "stopping with articles the broker never acknowledged"
            );
        }
        self.report.clone()
    }
}

/// Runs the publisher until `count`/`once` is satisfied or `shutdown` completes.
///
/// The first connection failing is an error unless `connection.retry` is set; after a
/// first success, the publisher reconnects forever (capped exponential backoff), keeping
/// unacknowledged articles and resending them. On shutdown it waits up to
/// `drain_timeout` for outstanding PUBACKs, then disconnects.
pub async fn run_publisher<S>(
    opts: PublisherOptions,
    shutdown: S,
) -> Result<PublisherReport, ClientError>
where
    S: Future<Output = ()>,
{
    opts.connection
        .validate()
        .map_err(ClientError::InvalidOption)?;
    let mut templates = Vec::new();
    for article in opts.articles.load()? {
        let topic = article.topic()?;
        templates.push((article, topic));
    }
    let target = if opts.once { Some(1) } else { opts.count };
    let run_tag = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    );
    let mut ticker = tokio::time::interval(opts.interval.max(MIN_INTERVAL));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut backoff = Backoff::new(opts.connection.backoff);
    let mut p = Publisher {
        opts,
        templates,
        target,
        run_tag,
        produced: 0,
        queue: BTreeMap::new(),
        report: PublisherReport::default(),
        queue_full_warned: false,
    };
    if p.finished() {
        return Ok(p.final_report());
    }
    tokio::pin!(shutdown);

    loop {
        // One connection per iteration; TLS files are re-read here.
        let mut established = false;
        let failure = match Session::start(&p.opts.connection, true, WINDOW + 8, false) {
            Err(tls) => {
                if p.report.connections == 0 && !p.opts.connection.retry {
                    return Err(tls.into());
                }
                tls.to_string()
            }
            Ok(mut session) => {
                let mut inflight = Inflight::default();
                let outcome = loop {
                    tokio::select! {
                        biased;
                        () = &mut shutdown => {
                            if inflight.connected {
                                drain(&mut p, &mut session, &mut inflight, &mut backoff).await;
                                session.disconnect(Duration::from_secs(1)).await;
                            }
                            return Ok(p.final_report());
                        }
                        event = session.next() => match event {
                            Ok(event) => {
                                p.on_event(event, &session, &mut inflight, &mut backoff);
                                if p.finished() {
                                    session.disconnect(Duration::from_secs(1)).await;
                                    return Ok(p.final_report());
                                }
                            }
                            Err(e) => break e,
                        },
                        _ = ticker.tick(), if p.can_produce() => {
                            p.produce()?;
                            p.submit(&session, &mut inflight);
                        }
                    }
                };
                let reason =
                    describe_connection_error(&outcome, &p.opts.connection, inflight.connected);
                established = inflight.connected;
                if p.report.connections == 0 && !p.opts.connection.retry {
                    return Err(ClientError::Connect {
                        broker: p.opts.connection.broker(),
                        reason,
                    });
                }
                reason
            }
        };

        // Wait before the next attempt, still producing articles on schedule.
        let delay = backoff.next_delay();
        log_failure(
            &p.opts.connection,
            established,
            p.report.connections,
            &failure,
            delay,
        );
        emit(
            &p.opts.events,
            ClientEvent::ConnectionLost { reason: failure },
        );
        let wake = tokio::time::sleep(delay);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(p.final_report()),
                () = &mut wake => break,
                _ = ticker.tick(), if p.can_produce() => p.produce()?,
            }
        }
    }
}

/// After shutdown: keep handling events until every queued article is acknowledged or
/// `drain_timeout` passes.
async fn drain(
    p: &mut Publisher,
    session: &mut Session,
    inflight: &mut Inflight,
    backoff: &mut Backoff,
) {
    if p.queue.is_empty() {
        return;
    }
    info!(
        pending = p.queue.len(),
        timeout = ?p.opts.drain_timeout,
        "waiting for outstanding acknowledgements"
    );
    let deadline = Instant::now() + p.opts.drain_timeout;
    while !p.queue.is_empty() {
        match tokio::time::timeout_at(deadline, session.next()).await {
            Ok(Ok(event)) => p.on_event(event, session, inflight, backoff),
            Ok(Err(_)) | Err(_) => break,
        }
    }
}
