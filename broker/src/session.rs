//! A session: one task per (identity, client id) that owns the client's subscriptions,
//! its inbox of published messages, its QoS 1/2 state and its queue, its router link
//! (shared subscriptions only), and the socket while one is attached. A persistent
//! session outlives its socket and keeps draining its inbox into its own queue, so
//! nothing a QoS 1/2 subscriber is owed is lost while it is away.

use crate::acl::Action;
use crate::codec::{
    reason, ConnectCode, ConnectInfo, Framed, Inbound, Message, Outbound, ReadError, SubRequest,
    Version, Will,
};
use crate::fanout::{Delivery, HandOver, Inbox, Outbox};
use crate::registry::{Control, SessionKey};
use crate::router::{now_micros, Envelope};
use crate::server::Shared;
use crate::store::{SavedSubscription, SessionId, SessionRecord};
use crate::topic;
use bytes::Bytes;
use futures_util::FutureExt;
use prometheus_client::metrics::gauge::Gauge;
use rumqttc::v5::mqttbytes::v5::ConnAckProperties;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{self as rp, Packet as RouterPacket};
use rumqttd::Notification;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::ReadHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

pub type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;
pub type Conn = Framed<ReadHalf<TlsStream>>;

/// Topic aliases a client may set (MQTT 5).
const TOPIC_ALIAS_MAX: u16 = 64;
/// Packets handled, or router notifications drained, before one flush.
const BATCH: usize = 256;
/// At shutdown, the router is considered drained after this long without a message...
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// ...or after this long in all.
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// Unwritten bytes beyond which QoS 0 messages for a client are dropped (and counted).
const QOS0_BACKLOG: usize = 1 << 20;
/// Unwritten bytes beyond which a client's socket is not read until it drains.
const READ_PAUSE: usize = 4 << 20;
/// Repeated denials of one action on one topic are logged once per this period.
const DENIAL_SUMMARY: Duration = Duration::from_secs(60);
/// Distinct denials remembered per session for that summary.
const DENIAL_KEYS: usize = 1024;
/// Message ids remembered to deliver one copy of a message that arrives twice (from the
/// index and through a `$share` group, or once per overlapping `$share` filter).
const RECENT_IDS: usize = 4096;

/// An authenticated connection whose CONNECT was accepted, on its way to a session.
pub struct Client {
    pub framed: Conn,
    pub info: ConnectInfo,
    pub identity: String,
    /// The client certificate's serial, to act on revocation.
    pub serial: Vec<u8>,
    pub addr: SocketAddr,
    /// The broker chose the client id (the client sent an empty one).
    pub assigned_id: bool,
    pub permit: OwnedSemaphorePermit,
}

struct Subscription {
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    id: Option<usize>,
    place: Place,
}

/// Where a subscription is served from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The fan-out index: plain filters.
    Index,
    /// rumqttd's router: shared subscriptions (`$share/group/filter`).
    Router,
    /// The session itself: `$SYS` filters, fed from the `$SYS` channel.
    Edge,
}

impl Place {
    fn of(filter: &str) -> Self {
        if topic::split_shared(filter).is_some() {
            Place::Router
        } else if filter.starts_with('$') {
            Place::Edge
        } else {
            Place::Index
        }
    }
}

/// A message waiting in the queue, with the moment its MQTT 5 expiry runs out.
struct Queued {
    message: Message,
    expires_at: Option<SystemTime>,
}

impl Queued {
    fn new(message: Message) -> Self {
        let expires_at = message
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|secs| SystemTime::now() + Duration::from_secs(secs.into()));
        Self {
            message,
            expires_at,
        }
    }

    /// The message with its expiry interval lowered by the time it waited; None once
    /// expired (MQTT 5 §3.3.2.3.3: an expired message is not delivered).
    fn take(self) -> Option<Message> {
        let mut message = self.message;
        if let Some(deadline) = self.expires_at {
            let left = deadline.duration_since(SystemTime::now()).ok()?;
            if let Some(p) = message.properties.as_mut() {
                p.message_expiry_interval = Some((left.as_secs() as u32).max(1));
            }
        }
        Some(message)
    }
}

struct Inflight {
    message: Message,
    seq: u64,
    /// PUBREC received, PUBREL sent: waiting for PUBCOMP.
    released: bool,
}

/// The socket side of an attached session.
struct Attachment {
    framed: Conn,
    identity: String,
    serial: Vec<u8>,
    client_id: String,
    addr: SocketAddr,
    version: Version,
    keep_alive: Option<Duration>,
    last_seen: Instant,
    will: Option<Will>,
    receive_max: u16,
    aliases_in: HashMap<u16, String>,
    /// Topic aliases we set towards the client (MQTT 5), up to its Topic Alias Maximum.
    aliases_out: HashMap<String, u16>,
    alias_max_out: u16,
    _permit: OwnedSemaphorePermit,
}

impl Attachment {
    /// Replaces a repeated topic by its alias, or gives a new topic an alias while the
    /// client allows more (MQTT 5 §3.3.2.3.4).
    fn alias_outgoing(&mut self, message: &mut Message) {
        if self.alias_max_out == 0 {
            return;
        }
        let alias = match self.aliases_out.get(&message.topic) {
            Some(&alias) => {
                message.topic.clear();
                alias
            }
            None if self.aliases_out.len() < usize::from(self.alias_max_out) => {
                let alias = self.aliases_out.len() as u16 + 1;
                self.aliases_out.insert(message.topic.clone(), alias);
                alias
            }
            None => return,
        };
        message
            .properties
            .get_or_insert_with(Default::default)
            .topic_alias = Some(alias);
    }

    fn deadline(&self) -> Option<Instant> {
        // MQTT allows one and a half keep-alive periods of silence.
        self.keep_alive.map(|ka| self.last_seen + ka * 3 / 2)
    }
}

/// This session's share of the gauges, so they can be corrected by difference.
#[derive(Default)]
struct Reported {
    queued: i64,
    subscriptions: i64,
    state: Option<Gauge>,
    state_name: Option<&'static str>,
}

/// Recently delivered message ids, bounded.
#[derive(Default)]
struct RecentIds {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

impl RecentIds {
    /// True when `id` was not seen yet.
    fn insert(&mut self, id: u64) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > RECENT_IDS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

pub struct Session {
    id: u64,
    key: SessionKey,
    shared: Arc<Shared>,
    ctrl: mpsc::UnboundedReceiver<Control>,
    /// Messages from publishing sessions; `outbox` is what the fan-out index holds.
    inbox: Inbox,
    outbox: Outbox,
    /// Messages published in this batch, handed over at the flush.
    deliveries: Vec<Arc<Delivery>>,
    /// The router link, made on the first packet for the router: an idle connection
    /// costs the router nothing.
    link_tx: Option<LinkTx>,
    link_rx: Option<LinkRx>,
    subs: HashMap<String, Subscription>,
    inflight: HashMap<u16, Inflight>,
    queue: VecDeque<Queued>,
    next_pkid: u16,
    seq: u64,
    qos2_in: HashSet<u16>,
    expiry_secs: u32,
    expires_at: Option<Instant>,
    recent: RecentIds,
    to_router: Vec<RouterPacket>,
    /// Denials logged recently: (action, topic) -> (last logged, repeats since).
    denials: HashMap<(Action, String), (Option<Instant>, u64)>,
    /// The ACL generation the subscriptions were last checked against.
    acl_generation: u64,
    /// What this session last added to the shared gauges.
    reported: Reported,
    /// A retained QoS 1/2 message was stored: flush the store before acknowledging.
    needs_sync: bool,
    dropped: u64,
    conn: Option<Attachment>,
    /// The latest `$SYS` values.
    sys: watch::Receiver<Arc<Vec<Message>>>,
    /// A will waiting for its Will Delay Interval (MQTT 5).
    pending_will: Option<(Instant, Will)>,
}

impl Drop for Session {
    /// Normally `teardown` has emptied `subs`; after a panic this keeps the index and
    /// the shared-subscription count true.
    fn drop(&mut self) {
        for (filter, sub) in self.subs.drain() {
            match sub.place {
                Place::Index => self.shared.fanout.unsubscribe(&filter, self.id),
                Place::Router => self.shared.fanout.shared_unsubscribed(),
                Place::Edge => {}
            }
        }
    }
}

/// How a session begins.
pub enum Start {
    Client(Box<Client>),
    /// Saved before the last stop; starts offline, its plain subscriptions already in
    /// the index (see [`restored`]).
    Restored(SessionRecord, Outbox, Inbox),
}

/// What the shutdown drain took in.
enum Drained {
    Inbox(Arc<Delivery>),
    Link(Box<Result<Option<Notification>, LinkError>>),
}

/// Why `serve` returned.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Exit {
    Ended,
    Shutdown,
}

/// Runs a session until it ends, then unregisters it.
pub async fn run(
    shared: Arc<Shared>,
    key: SessionKey,
    id: u64,
    start: Start,
    ctrl: mpsc::UnboundedReceiver<Control>,
) {
    let sys = shared.sys.subscribe();
    let (mut client, mut restored) = (None, None);
    let (outbox, inbox) = match start {
        Start::Client(c) => {
            client = Some(c);
            crate::fanout::inbox(shared.config.session.inbox)
        }
        Start::Restored(record, outbox, inbox) => {
            restored = Some(record);
            (outbox, inbox)
        }
    };
    let mut session = Session {
        sys,
        pending_will: None,
        inbox,
        outbox,
        deliveries: Vec::new(),
        id,
        key,
        shared,
        ctrl,
        link_tx: None,
        link_rx: None,
        subs: HashMap::new(),
        inflight: HashMap::new(),
        queue: VecDeque::new(),
        next_pkid: 0,
        seq: 0,
        qos2_in: HashSet::new(),
        expiry_secs: 0,
        expires_at: None,
        recent: RecentIds::default(),
        to_router: Vec::new(),
        denials: HashMap::new(),
        acl_generation: 0,
        reported: Reported::default(),
        needs_sync: false,
        dropped: 0,
        conn: None,
    };
    if let Some(client) = client {
        session.attach(client, true).await;
    } else if let Some(record) = restored {
        session.restore(record).await;
    }
    let exit = 'serving: loop {
        if session.serve().await == Exit::Shutdown {
            break Exit::Shutdown;
        }
        loop {
            let next = session
                .shared
                .registry
                .finish(&session.key, session.id, &mut session.ctrl);
            match next {
                // A client arrived just as the session ended: it starts afresh.
                Some(Control::Attach(client)) => {
                    session.reset();
                    session.attach(client, true).await;
                    continue 'serving;
                }
                Some(Control::Shutdown) => break 'serving Exit::Shutdown,
                // Nothing to close: ask again.
                Some(Control::Revoked(_)) => continue,
                None => break 'serving Exit::Ended,
            }
        }
    };
    session.teardown(exit).await;
    if exit == Exit::Shutdown {
        // Saved before unregistering: shutdown flushes the store once all are gone.
        while let Some(control) =
            session
                .shared
                .registry
                .finish(&session.key, session.id, &mut session.ctrl)
        {
            if let Control::Attach(client) = control {
                refuse_unavailable(client).await;
            }
        }
    }
}

/// A saved session's plain subscriptions, placed in the index before the listener opens
/// so that nothing published after a restart misses them; the inbox they feed, for
/// [`Start::Restored`].
pub fn restored(shared: &Shared, id: u64, record: &SessionRecord) -> (Outbox, Inbox) {
    let (outbox, inbox) = crate::fanout::inbox(shared.config.session.inbox);
    for s in &record.subscriptions {
        if Place::of(&s.filter) == Place::Index {
            shared.fanout.subscribe(&s.filter, id, outbox.clone());
        }
    }
    (outbox, inbox)
}

/// A QoS 0 subscription in the router: QoS and retained messages are the edge's.
fn router_subscribe(filter: &str) -> RouterPacket {
    RouterPacket::Subscribe(
        rp::Subscribe {
            pkid: 0,
            filters: vec![rp::Filter {
                path: filter.into(),
                qos: rp::QoS::AtMostOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: rp::RetainForwardRule::Never,
            }],
        },
        None,
    )
}

fn router_unsubscribe(filter: String) -> RouterPacket {
    RouterPacket::Unsubscribe(
        rp::Unsubscribe {
            pkid: 0,
            filters: vec![filter],
        },
        None,
    )
}

/// The next router notification, or never when there is no link yet.
async fn link_next(rx: &mut Option<LinkRx>) -> Result<Option<Notification>, LinkError> {
    match rx {
        Some(rx) => rx.next().await,
        None => std::future::pending().await,
    }
}

async fn refuse_unavailable(client: Box<Client>) {
    let mut client = *client;
    client.framed.queue(Outbound::ConnAck {
        session_present: false,
        code: ConnectCode::ServerUnavailable,
        properties: None,
    });
    client.framed.shutdown();
}

/// The next packet from the attached client; None when its socket was congested and
/// has drained. A client that does not read what we write is not read from either, so
/// its acknowledgements cannot pile up without bound.
async fn read_attached(conn: &mut Option<Attachment>) -> Option<Result<Inbound, ReadError>> {
    match conn {
        Some(c) if c.framed.unwritten() >= READ_PAUSE => {
            c.framed.drained_below(READ_PAUSE / 2).await;
            None
        }
        Some(c) => Some(c.framed.read().await),
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Session {
    /// Serves until the session should end: clean session closed, expired, or shutdown.
    async fn serve(&mut self) -> Exit {
        loop {
            let keep_alive = self.conn.as_ref().and_then(Attachment::deadline);
            let expiry = if self.conn.is_none() {
                self.expires_at
            } else {
                None
            };
            tokio::select! {
                control = self.ctrl.recv() => match control {
                    Some(Control::Attach(client)) => Box::pin(self.attach(client, false)).await,
                    Some(Control::Revoked(serials)) => Box::pin(self.close_if_revoked(&serials)).await,
                    Some(Control::Shutdown) | None => {
                        self.disconnect(reason::SERVER_SHUTTING_DOWN, "broker shutting down", false).await;
                        Box::pin(self.drain_at_shutdown()).await;
                        return Exit::Shutdown;
                    }
                },
                read = read_attached(&mut self.conn) => {
                    if let Some(read) = read {
                        self.on_read(read).await;
                    }
                }
                Some(first) = self.inbox.recv() => {
                    self.on_inbox(first);
                    self.flush().await;
                }
                note = link_next(&mut self.link_rx) => {
                    if !self.on_link(note) {
                        self.disconnect(reason::UNSPECIFIED, "router link lost", true).await;
                        return Exit::Ended;
                    }
                    self.flush().await;
                }
                changed = self.sys.changed(), if self.has_sys_subscription() => {
                    if changed.is_ok() {
                        Box::pin(self.on_sys()).await;
                    }
                }
                _ = sleep_until(self.pending_will.as_ref().map(|(at, _)| *at)) => {
                    if let Some((_, will)) = self.pending_will.take() {
                        Box::pin(self.publish_will(will)).await;
                    }
                }
                _ = sleep_until(keep_alive) => {
                    self.disconnect(reason::KEEP_ALIVE_TIMEOUT, "keep alive timeout", true).await;
                }
                _ = sleep_until(expiry) => {
                    info!(identity = %self.key.identity, client_id = %self.key.client_id, "session expired");
                    return Exit::Ended;
                }
            }
            self.report_gauges(false);
            if self.conn.is_none() && self.expiry_secs == 0 {
                return Exit::Ended;
            }
        }
    }

    /// Closes the connection if its certificate is among `serials`.
    async fn close_if_revoked(&mut self, serials: &HashSet<Vec<u8>>) {
        let Some(c) = &self.conn else {
            return;
        };
        if !serials.contains(&c.serial) {
            return;
        }
        let serial: String = c.serial.iter().map(|b| format!("{b:02x}")).collect();
        warn!(identity = %c.identity, client_id = %c.client_id, addr = %c.addr,
            serial = %serial, reason = "revoked certificate",
            "connection closed: its certificate was revoked");
        self.shared
            .metrics
            .refused(&crate::refusal::Refusal::Revoked(serial));
        self.close(Some(reason::NOT_AUTHORIZED), "certificate revoked", true)
            .await;
    }

    /// At shutdown: takes in what the inbox and the router still hold for this session
    /// (messages acknowledged to their publishers a moment ago), so it can be saved.
    async fn drain_at_shutdown(&mut self) {
        let deadline = Instant::now() + DRAIN_MAX;
        while Instant::now() < deadline {
            let (link, inbox) = (&mut self.link_rx, &mut self.inbox);
            let next = tokio::time::timeout(DRAIN_IDLE, async move {
                tokio::select! {
                    Some(delivery) = inbox.recv() => Drained::Inbox(delivery),
                    note = link_next(link) => Drained::Link(Box::new(note)),
                }
            });
            match next.await {
                Err(_) => return,
                Ok(Drained::Inbox(delivery)) => self.on_inbox(delivery),
                Ok(Drained::Link(note)) => {
                    if !self.on_link(*note) {
                        return;
                    }
                }
            }
            self.flush().await;
        }
    }

    /// Takes a new connection: closes the current one (takeover), answers CONNACK,
    /// resends what is in flight and drains the queue.
    async fn attach(&mut self, client: Box<Client>, is_new: bool) {
        if self.conn.is_some() {
            self.disconnect(
                reason::SESSION_TAKEN_OVER,
                "session taken over by a new connection",
                false,
            )
            .await;
        }
        let client = *client;
        let info = client.info;
        if info.clean_start && !is_new {
            self.reset();
        }
        // A client back before its Will Delay ran out: no will (MQTT 5 §3.1.3.2.2).
        self.pending_will = None;
        let session_present = !is_new && !info.clean_start;
        let was_saved = self.expiry_secs > 0;
        self.expiry_secs = info.session_expiry;
        self.expires_at = None;
        if was_saved || self.expiry_secs > 0 {
            self.save(false);
        }

        let max_keepalive = self.shared.config.session.max_keepalive_secs;
        let mut keep_alive = info.keep_alive;
        let mut server_keep_alive = None;
        if info.version == Version::V5 && max_keepalive > 0 && keep_alive > max_keepalive {
            keep_alive = max_keepalive;
            server_keep_alive = Some(max_keepalive);
        }
        let mut framed = client.framed;
        framed.max_out = info.max_packet_size;
        let properties = (info.version == Version::V5).then(|| ConnAckProperties {
            session_expiry_interval: None,
            receive_max: None,
            max_qos: None,
            retain_available: None,
            max_packet_size: Some(self.shared.config.listener.max_packet_size as u32),
            assigned_client_identifier: client.assigned_id.then(|| self.key.client_id.clone()),
            topic_alias_max: Some(TOPIC_ALIAS_MAX),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: None,
            subscription_identifiers_available: None,
            shared_subscription_available: None,
            server_keep_alive,
            response_information: info
                .request_response_info
                .then(|| format!("response/{}/{}", client.identity, self.key.client_id)),
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        });
        framed.queue(Outbound::ConnAck {
            session_present,
            code: ConnectCode::Accepted,
            properties,
        });
        self.shared.metrics.connections_total.inc();
        info!(
            identity = %client.identity,
            client_id = %self.key.client_id,
            addr = %client.addr,
            protocol = info.version.name(),
            clean_start = info.clean_start,
            session_present,
            keep_alive,
            "client connected"
        );
        self.conn = Some(Attachment {
            framed,
            identity: client.identity,
            serial: client.serial,
            client_id: self.key.client_id.clone(),
            addr: client.addr,
            version: info.version,
            keep_alive: (keep_alive > 0).then(|| Duration::from_secs(keep_alive.into())),
            last_seen: Instant::now(),
            will: info.will,
            receive_max: info.receive_maximum,
            aliases_in: HashMap::new(),
            aliases_out: HashMap::new(),
            alias_max_out: if info.version == Version::V5 {
                info.topic_alias_max
            } else {
                0
            },
            _permit: client.permit,
        });

        // Unacknowledged messages go again, in their original order, marked DUP.
        let mut resend: Vec<(u64, u16)> = self.inflight.iter().map(|(p, m)| (m.seq, *p)).collect();
        resend.sort_unstable();
        for (_, pkid) in resend {
            let Some(m) = self.inflight.get(&pkid) else {
                continue;
            };
            let packet = if m.released {
                Outbound::PubRel { pkid }
            } else {
                Outbound::Publish {
                    message: m.message.clone(),
                    pkid,
                    dup: true,
                }
            };
            self.send(packet);
        }
        self.pump();
        self.flush().await;
        self.report_gauges(false);
    }

    /// Forgets all session state (Clean Start, or a session ended and begun again).
    fn reset(&mut self) {
        let subs: Vec<(String, Subscription)> = self.subs.drain().collect();
        for (filter, sub) in subs {
            self.unplace(filter, sub.place);
        }
        // Messages matched for the old subscriptions go with the old inbox.
        (self.outbox, self.inbox) = crate::fanout::inbox(self.shared.config.session.inbox);
        self.inflight.clear();
        self.queue.clear();
        self.qos2_in.clear();
    }

    /// Restores a saved session: subscriptions back in place, queue refilled.
    async fn restore(&mut self, record: SessionRecord) {
        for s in record.subscriptions {
            let place = Place::of(&s.filter);
            self.place(&s.filter, place);
            let sub = Subscription {
                qos: s.qos,
                no_local: s.no_local,
                retain_as_published: s.retain_as_published,
                id: s.id,
                place,
            };
            self.subs.insert(s.filter, sub);
        }
        self.queue = record.queued.into_iter().map(Queued::new).collect();
        self.expiry_secs = record.expiry_secs;
        if self.expiry_secs != u32::MAX {
            self.expires_at = Some(Instant::now() + Duration::from_secs(self.expiry_secs.into()));
        }
        self.flush_router().await;
    }

    /// Saves a persistent session's state; `with_queue` at shutdown, when nothing
    /// more will arrive.
    fn save(&self, with_queue: bool) {
        let id = SessionId {
            identity: self.key.identity.clone(),
            client_id: self.key.client_id.clone(),
        };
        let result = if self.expiry_secs == 0 {
            self.shared.store.remove_session(&id)
        } else {
            let mut queued = Vec::new();
            if with_queue {
                let mut inflight: Vec<&Inflight> =
                    self.inflight.values().filter(|m| !m.released).collect();
                inflight.sort_unstable_by_key(|m| m.seq);
                queued.extend(inflight.into_iter().map(|m| m.message.clone()));
                queued.extend(self.queue.iter().filter_map(|q| {
                    Queued {
                        message: q.message.clone(),
                        expires_at: q.expires_at,
                    }
                    .take()
                }));
            }
            let record = SessionRecord {
                expiry_secs: self.expiry_secs,
                subscriptions: self
                    .subs
                    .iter()
                    .map(|(filter, s)| SavedSubscription {
                        filter: filter.clone(),
                        qos: s.qos,
                        no_local: s.no_local,
                        retain_as_published: s.retain_as_published,
                        id: s.id,
                    })
                    .collect(),
                queued,
            };
            self.shared.store.put_session(&id, &record)
        };
        if let Err(e) = result {
            error!(identity = %self.key.identity, client_id = %self.key.client_id, error = %e,
                "session state not saved");
        }
    }

    /// Brings the shared gauges up to date with this session; `gone` withdraws it.
    fn report_gauges(&mut self, gone: bool) {
        let metrics = &self.shared.metrics;
        let (queued, subscriptions) = if gone {
            (0, 0)
        } else {
            (self.queue.len() as i64, self.subs.len() as i64)
        };
        metrics.queued.inc_by(queued - self.reported.queued);
        metrics
            .subscriptions
            .inc_by(subscriptions - self.reported.subscriptions);
        self.reported.queued = queued;
        self.reported.subscriptions = subscriptions;
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

    async fn teardown(&mut self, exit: Exit) {
        self.report_gauges(true);
        if self.dropped > 0 {
            // The per-event lines are rate-limited; this one has the final count.
            warn!(identity = %self.key.identity, client_id = %self.key.client_id,
                dropped = self.dropped, "session ended: messages dropped in all");
        }
        // The session ends before the Will Delay: the will goes now.
        if let (Exit::Ended, Some((_, will))) = (exit, self.pending_will.take()) {
            self.publish_will(will).await;
        }
        if exit == Exit::Ended {
            self.expiry_secs = 0;
        }
        // Out of the index first, then what the inbox already holds goes into the queue,
        // and only then is the session saved: a message handed over meanwhile is either
        // saved or, the inbox being closed, counted as dropped by its publisher.
        for filter in self
            .subs
            .iter()
            .filter(|(_, s)| s.place == Place::Index)
            .map(|(f, _)| f)
        {
            self.shared.fanout.unsubscribe(filter, self.id);
        }
        self.inbox.close();
        while let Ok(delivery) = self.inbox.try_recv() {
            self.accept(&delivery);
        }
        self.save(true);
        let subs: Vec<(String, Subscription)> = self.subs.drain().collect();
        for (filter, sub) in subs {
            self.unplace(filter, sub.place);
        }
        self.flush_router().await;
        let disconnect = RouterPacket::Disconnect(
            rp::Disconnect {
                reason_code: rp::DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        // The only public way to unregister a link from the router.
        if let Some(tx) = self.link_tx.as_mut() {
            if let Err(e) = tx.send(disconnect).await {
                error!(client_id = %self.key.client_id, error = %e, "could not unregister router link");
            }
        }
    }

    fn send(&mut self, mut packet: Outbound) -> bool {
        let qos = match &packet {
            Outbound::Publish { message, .. } => Some(message.qos),
            _ => None,
        };
        if let (Outbound::Publish { message, .. }, Some(c)) = (&mut packet, self.conn.as_mut()) {
            c.alias_outgoing(message);
        }
        let sent = match &mut self.conn {
            Some(c) => c.framed.queue(packet),
            None => false,
        };
        if let (true, Some(qos)) = (sent, qos) {
            self.shared.metrics.sent(qos);
        }
        sent
    }

    fn version(&self) -> Version {
        self.conn.as_ref().map_or(Version::V311, |c| c.version)
    }

    async fn on_read(&mut self, read: Result<Inbound, ReadError>) {
        self.recheck_subscriptions();
        let mut next = read;
        for i in 1..=BATCH {
            match next {
                Ok(packet) => {
                    if !self.on_packet(packet).await {
                        return;
                    }
                }
                Err(e) => {
                    Box::pin(self.on_read_error(e)).await;
                    return;
                }
            }
            if i == BATCH {
                // The rest stays buffered for the next turn of the loop.
                break;
            }
            next = match self.conn.as_mut().map(|c| c.framed.try_read()) {
                Some(Ok(Some(packet))) => Ok(packet),
                Some(Ok(None)) | None => break,
                Some(Err(e)) => Err(e),
            };
        }
        self.flush().await;
    }

    async fn on_read_error(&mut self, e: ReadError) {
        match e {
            ReadError::Closed => self.drop_connection("connection closed by client").await,
            ReadError::Io(e) => {
                self.drop_connection(&format!("connection lost: {e}")).await;
            }
            ReadError::TooLarge { size, max } => {
                let why = crate::refusal::Refusal::PacketTooLarge { size, max }.to_string();
                self.violation(reason::PACKET_TOO_LARGE, &why).await;
            }
            ReadError::Malformed(why) => {
                self.violation(reason::MALFORMED, &format!("malformed packet: {why}"))
                    .await;
            }
        }
    }

    /// Handles one packet; false when the connection was closed.
    async fn on_packet(&mut self, packet: Inbound) -> bool {
        if let Some(c) = &mut self.conn {
            c.last_seen = Instant::now();
        }
        match packet {
            Inbound::Publish {
                message,
                pkid,
                dup: _,
                topic_alias,
            } => return self.on_publish(message, pkid, topic_alias).await,
            Inbound::PubAck(pkid) | Inbound::PubComp(pkid) => {
                self.inflight.remove(&pkid);
                self.pump();
            }
            Inbound::PubRec(pkid) => {
                if let Some(m) = self.inflight.get_mut(&pkid) {
                    m.released = true;
                }
                self.send(Outbound::PubRel { pkid });
            }
            Inbound::PubRel(pkid) => {
                self.qos2_in.remove(&pkid);
                self.send(Outbound::PubComp { pkid });
            }
            // Messages published earlier in this batch are handed over first, so a
            // subscription change applies only to what follows it.
            Inbound::Subscribe { pkid, filters, id } => {
                self.hand_over().await;
                Box::pin(self.on_subscribe(pkid, filters, id)).await
            }
            Inbound::Unsubscribe { pkid, filters } => {
                self.hand_over().await;
                self.on_unsubscribe(pkid, filters)
            }
            Inbound::PingReq => {
                self.send(Outbound::PingResp);
            }
            Inbound::Disconnect {
                reason: code,
                session_expiry,
            } => {
                if let Some(expiry) = session_expiry {
                    if self.expiry_secs == 0 && expiry > 0 {
                        self.violation(
                            reason::PROTOCOL_ERROR,
                            "session expiry set on DISCONNECT after 0 on CONNECT",
                        )
                        .await;
                        return false;
                    }
                    self.expiry_secs = expiry;
                }
                let with_will = code == reason::DISCONNECT_WITH_WILL;
                self.close(None, "client disconnected", with_will).await;
                return false;
            }
            Inbound::Unexpected(what) => {
                self.violation(reason::PROTOCOL_ERROR, &format!("unexpected {what}"))
                    .await;
                return false;
            }
        }
        true
    }

    async fn on_publish(&mut self, mut message: Message, pkid: u16, alias: Option<u16>) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        if let Some(alias) = alias {
            if alias == 0 || alias > TOPIC_ALIAS_MAX {
                self.violation(reason::TOPIC_ALIAS_INVALID, "topic alias out of range")
                    .await;
                return false;
            }
            if message.topic.is_empty() {
                match conn.aliases_in.get(&alias) {
                    Some(topic) => message.topic = topic.clone(),
                    None => {
                        self.violation(reason::PROTOCOL_ERROR, "unknown topic alias")
                            .await;
                        return false;
                    }
                }
            } else {
                conn.aliases_in.insert(alias, message.topic.clone());
            }
        }
        if !topic::valid_name(&message.topic) {
            let why = format!("invalid topic name {:?} in PUBLISH", message.topic);
            self.violation(reason::TOPIC_NAME_INVALID, &why).await;
            return false;
        }
        if message.qos == 2 && self.qos2_in.contains(&pkid) {
            // A resent QoS 2 PUBLISH we already routed: acknowledge only.
            self.send(Outbound::PubRec {
                pkid,
                reason: reason::SUCCESS,
            });
            return true;
        }
        self.shared.metrics.received(message.qos);
        let acl = self.shared.acl();
        // `$` topics belong to the broker ($SYS): no client publishes there.
        if message.topic.starts_with('$')
            || !acl
                .check_publish(&self.key.identity, &self.key.client_id, &message.topic)
                .allowed()
        {
            // Not delivered, not retained. MQTT 5 says so; 3.1.1 acknowledges and
            // drops, as Mosquitto does, since it has no code for it.
            self.log_denial(Action::Publish, &message.topic);
            let code = match self.version() {
                Version::V5 => reason::NOT_AUTHORIZED,
                Version::V311 => reason::SUCCESS,
            };
            match message.qos {
                1 => {
                    self.send(Outbound::PubAck { pkid, reason: code });
                }
                2 => {
                    if code == reason::SUCCESS {
                        self.qos2_in.insert(pkid);
                    }
                    self.send(Outbound::PubRec { pkid, reason: code });
                }
                _ => {}
            }
            return true;
        }
        if let Some(p) = message.properties.as_mut() {
            // Only the broker sets these, per subscriber.
            p.subscription_identifiers.clear();
        }
        let qos = message.qos;
        if !self.route(message) {
            self.storage_failure().await;
            return false;
        }
        match qos {
            1 => {
                self.send(Outbound::PubAck {
                    pkid,
                    reason: reason::SUCCESS,
                });
            }
            2 => {
                self.qos2_in.insert(pkid);
                self.send(Outbound::PubRec {
                    pkid,
                    reason: reason::SUCCESS,
                });
            }
            _ => {}
        }
        true
    }

    /// Stores a retained message and hands the message to the router; false when the
    /// retained message could not be stored (it is then not routed either).
    fn route(&mut self, mut message: Message) -> bool {
        if message.retain {
            if let Err(e) = self.shared.retained.set(&message) {
                error!(client_id = %self.key.client_id, topic = %message.topic, error = %e,
                    "retained message not stored");
                return false;
            }
            self.needs_sync |= message.qos > 0;
        }
        let envelope = Envelope {
            qos: message.qos,
            retain: message.retain,
            origin: self.id,
            id: self.shared.next_id(),
            received_at: now_micros(),
            properties: message.properties.take(),
        };
        if self.shared.fanout.has_shared_subscriptions() {
            let publish = rp::Publish::new(
                Bytes::from(message.topic.clone()),
                envelope.wrap(&message.payload),
                false,
            );
            self.to_router.push(RouterPacket::Publish(publish, None));
        }
        self.deliveries.push(Arc::new(Delivery {
            topic: message.topic,
            payload: message.payload,
            envelope,
        }));
        true
    }

    /// Hands this batch's messages to the subscriber sessions. Where an inbox is full
    /// the publisher waits, and with it its acknowledgements: it is slowed down, and
    /// nothing is dropped.
    async fn hand_over(&mut self) {
        if self.deliveries.is_empty() {
            return;
        }
        for delivery in std::mem::take(&mut self.deliveries) {
            let HandOver { full, ended } = self.shared.fanout.hand_over(&delivery);
            for _ in 0..ended {
                self.lost_to_ended_session(&delivery.topic);
            }
            for outbox in full {
                self.shared.metrics.publisher_waits.inc();
                self.wait_for_room(&outbox, delivery.clone()).await;
            }
        }
        // The subscriber sessions just woken run first, on this thread, and write to
        // their clients before this session writes its acknowledgements.
        tokio::task::yield_now().await;
    }

    async fn wait_for_room(&mut self, outbox: &Outbox, delivery: Arc<Delivery>) {
        // One reservation for the whole wait: made again, it would lose its place in line.
        let reserve = outbox.reserve();
        tokio::pin!(reserve);
        loop {
            tokio::select! {
                permit = &mut reserve => {
                    match permit {
                        Ok(permit) => permit.send(delivery),
                        Err(_) => self.lost_to_ended_session(&delivery.topic),
                    }
                    return;
                }
                // Our own inbox keeps draining meanwhile: two sessions publishing to
                // each other never wait on each other for ever.
                Some(incoming) = self.inbox.recv() => self.accept(&incoming),
            }
        }
    }

    /// A subscriber session ended between matching and taking the message (at
    /// shutdown): counted and logged, never silent.
    fn lost_to_ended_session(&mut self, topic: &str) {
        self.shared.metrics.dropped.inc();
        warn!(identity = %self.key.identity, client_id = %self.key.client_id, topic = %topic,
            "message dropped: a subscriber's session ended before taking it");
    }

    /// Takes messages from the inbox, the first one and what else is there.
    fn on_inbox(&mut self, first: Arc<Delivery>) {
        self.recheck_subscriptions();
        self.accept(&first);
        for _ in 1..BATCH {
            match self.inbox.try_recv() {
                Ok(delivery) => self.accept(&delivery),
                Err(_) => break,
            }
        }
    }

    fn accept(&mut self, delivery: &Delivery) {
        self.offer(
            delivery.topic.clone(),
            delivery.payload.clone(),
            delivery.envelope.clone(),
        );
    }

    /// Puts a new subscription where it is served from.
    fn place(&mut self, filter: &str, place: Place) {
        match place {
            Place::Index => self
                .shared
                .fanout
                .subscribe(filter, self.id, self.outbox.clone()),
            Place::Router => {
                self.shared.fanout.shared_subscribed();
                self.to_router.push(router_subscribe(filter));
            }
            Place::Edge => {}
        }
    }

    fn unplace(&mut self, filter: String, place: Place) {
        match place {
            Place::Index => self.shared.fanout.unsubscribe(&filter, self.id),
            Place::Router => {
                self.shared.fanout.shared_unsubscribed();
                self.to_router.push(router_unsubscribe(filter));
            }
            Place::Edge => {}
        }
    }

    /// The store failed: nothing in this batch is acknowledged, the client will resend.
    async fn storage_failure(&mut self) {
        self.needs_sync = false;
        if let Some(c) = &mut self.conn {
            c.framed.discard_pending();
        }
        self.close(
            Some(reason::UNSPECIFIED),
            "storage failure: publish not acknowledged",
            true,
        )
        .await;
    }

    async fn on_subscribe(&mut self, pkid: u16, filters: Vec<SubRequest>, id: Option<usize>) {
        let v5 = self.version() == Version::V5;
        let acl = self.shared.acl();
        let mut codes = Vec::with_capacity(filters.len());
        let mut wanted_retained = Vec::new();
        for req in filters {
            if !topic::valid_filter(&req.filter) {
                if let Some(c) = &self.conn {
                    warn!(identity = %c.identity, client_id = %c.client_id, addr = %c.addr,
                        filter = %req.filter, "subscribe refused: invalid topic filter");
                }
                codes.push(if v5 {
                    reason::TOPIC_FILTER_INVALID
                } else {
                    reason::SUB_FAILURE_V4
                });
                continue;
            }
            if !acl
                .check_subscribe(&self.key.identity, &self.key.client_id, &req.filter)
                .allowed()
            {
                self.log_denial(Action::Subscribe, &req.filter);
                codes.push(if v5 {
                    reason::NOT_AUTHORIZED
                } else {
                    reason::SUB_FAILURE_V4
                });
                continue;
            }
            let place = Place::of(&req.filter);
            let shared_sub = place == Place::Router;
            let existed = self
                .subs
                .insert(
                    req.filter.clone(),
                    Subscription {
                        qos: req.qos,
                        no_local: req.no_local,
                        retain_as_published: req.retain_as_published,
                        id,
                        place,
                    },
                )
                .is_some();
            if !existed {
                self.place(&req.filter, place);
            }
            codes.push(req.qos);
            let send_retained = !shared_sub
                && match req.retain_handling {
                    0 => true,
                    1 => !existed,
                    _ => false,
                };
            if send_retained {
                wanted_retained.push((req.filter, req.qos));
            }
        }
        if let Some(c) = &self.conn {
            debug!(identity = %c.identity, client_id = %c.client_id, codes = ?codes, "subscribed");
        }
        self.send(Outbound::SubAck { pkid, codes });
        if self.expiry_secs > 0 {
            self.save(false);
        }
        // The subscription is in place before the retained snapshot is taken, so a
        // message published meanwhile arrives live if it is not in the snapshot.
        if !self.flush_router().await {
            self.router_failed().await;
            return;
        }
        for (filter, granted) in wanted_retained {
            for mut message in self.shared.retained.matching(&filter) {
                message.qos = message.qos.min(granted);
                message.retain = true;
                if let Some(id) = id {
                    message
                        .properties
                        .get_or_insert_with(Default::default)
                        .subscription_identifiers = vec![id];
                }
                self.deliver(message, true);
            }
        }
    }

    fn on_unsubscribe(&mut self, pkid: u16, filters: Vec<String>) {
        let mut codes = Vec::with_capacity(filters.len());
        for filter in filters {
            match self.subs.remove(&filter) {
                Some(sub) => {
                    self.unplace(filter, sub.place);
                    codes.push(reason::SUCCESS);
                }
                None => codes.push(reason::NO_SUBSCRIPTION_EXISTED),
            }
        }
        // Always answered here: the router never acknowledges an unknown filter.
        self.send(Outbound::UnsubAck { pkid, codes });
        if self.expiry_secs > 0 {
            self.save(false);
        }
    }

    /// Drains router notifications; false when the link is gone. Not async: a
    /// notification is large, and no session's future should have room for one.
    fn on_link(&mut self, first: Result<Option<Notification>, LinkError>) -> bool {
        self.recheck_subscriptions();
        let mut wake = false;
        let mut next = first;
        for i in 1..=BATCH {
            match next {
                Ok(Some(Notification::Forward(forward))) => self.on_forward(forward.publish),
                Ok(Some(Notification::Unschedule)) => wake = true,
                Ok(Some(Notification::Disconnect(..))) => {
                    error!(client_id = %self.key.client_id, "router disconnected the session link");
                    return false;
                }
                Ok(_) => {}
                Err(e) => {
                    error!(client_id = %self.key.client_id, error = %e, "router link failed");
                    return false;
                }
            }
            if i == BATCH {
                // The rest stays in the link for the next turn of the loop.
                break;
            }
            let Some(rx) = self.link_rx.as_mut() else {
                break;
            };
            next = match rx.next().now_or_never() {
                Some(n) => n,
                None => break,
            };
        }
        if wake {
            // `ready` rather than `wake`: the same send on the same bounded channel as
            // `LinkTx::send`, without an `Event`-sized future in every session's state.
            let woken = match self.link_rx.as_ref() {
                Some(rx) => rx.ready(),
                None => Ok(()),
            };
            if let Err(e) = woken {
                error!(client_id = %self.key.client_id, error = %e, "router link failed");
                return false;
            }
        }
        true
    }

    /// A message of a shared subscription, from the router.
    fn on_forward(&mut self, publish: rp::Publish) {
        let Ok(topic) = String::from_utf8(publish.topic.to_vec()) else {
            return;
        };
        let Some((envelope, payload)) = Envelope::unwrap(publish.payload) else {
            error!(topic = %topic, "message without envelope from the router; dropped");
            return;
        };
        self.offer(topic, payload, envelope);
    }

    /// New `$SYS` values, for the `$SYS` subscriptions the router does not hold.
    async fn on_sys(&mut self) {
        let messages = self.sys.borrow_and_update().clone();
        for m in messages.iter() {
            let envelope = Envelope {
                qos: 0,
                retain: true,
                origin: 0,
                id: self.shared.next_id(),
                received_at: now_micros(),
                properties: None,
            };
            self.offer(m.topic.clone(), m.payload.clone(), envelope);
        }
        self.flush().await;
    }

    fn has_sys_subscription(&self) -> bool {
        self.subs.values().any(|s| s.place == Place::Edge)
    }

    /// Delivers a message to this session if one of its subscriptions matches.
    fn offer(&mut self, topic: String, payload: Bytes, envelope: Envelope) {
        let mut granted: Option<u8> = None;
        let mut matching = 0;
        let mut retain_as_published = false;
        let mut ids = Vec::new();
        for (filter, sub) in &self.subs {
            if !topic::matches(filter, &topic) || (sub.no_local && envelope.origin == self.id) {
                continue;
            }
            matching += 1;
            granted = Some(granted.map_or(sub.qos, |g| g.max(sub.qos)));
            retain_as_published |= sub.retain_as_published;
            ids.extend(sub.id);
        }
        let Some(granted) = granted else {
            return;
        };
        // Overlapping filters: the router sends one copy per filter; deliver one.
        if matching > 1 && !self.recent.insert(envelope.id) {
            return;
        }
        let qos = envelope.qos.min(granted);
        let immediate = self.conn.is_some()
            && (qos == 0 || (self.queue.is_empty() && self.inflight.len() < self.window()));
        if immediate {
            let micros = now_micros().saturating_sub(envelope.received_at);
            self.shared
                .metrics
                .delivery_seconds
                .observe(micros as f64 / 1e6);
        }
        let mut properties = envelope.properties;
        if let Some(p) = properties.as_mut() {
            if let Some(interval) = p.message_expiry_interval {
                // Lowered by the time it waited; an expired message is not delivered.
                let waited = now_micros().saturating_sub(envelope.received_at) / 1_000_000;
                if waited >= u64::from(interval) {
                    return;
                }
                p.message_expiry_interval = Some(interval - waited as u32);
            }
        }
        if !ids.is_empty() {
            properties
                .get_or_insert_with(Default::default)
                .subscription_identifiers = ids;
        }
        self.deliver(
            Message {
                topic,
                payload,
                qos,
                retain: retain_as_published && envelope.retain,
                properties,
            },
            false,
        );
    }

    /// Logs a denial at WARN; repeats of the same action and topic are summarised at
    /// most once a minute, with their count.
    fn log_denial(&mut self, action: Action, topic: &str) {
        self.shared.metrics.denied(action);
        let now = Instant::now();
        if self.denials.len() > DENIAL_KEYS {
            self.denials.clear();
        }
        let entry = self
            .denials
            .entry((action, topic.to_string()))
            .or_insert((None, 0));
        if entry
            .0
            .is_some_and(|last| now.duration_since(last) < DENIAL_SUMMARY)
        {
            entry.1 += 1;
            return;
        }
        let repeated = std::mem::take(&mut entry.1);
        entry.0 = Some(now);
        let addr = self
            .conn
            .as_ref()
            .map(|c| c.addr.to_string())
            .unwrap_or_default();
        warn!(identity = %self.key.identity, client_id = %self.key.client_id, addr = %addr,
            action = %action, topic = %topic, repeated, "denied: not authorized");
    }

    /// After an ACL change, drops the subscriptions the new rules no longer grant.
    fn recheck_subscriptions(&mut self) {
        let generation = self.shared.acl_generation();
        if generation == self.acl_generation {
            return;
        }
        self.acl_generation = generation;
        let acl = self.shared.acl();
        let revoked: Vec<String> = self
            .subs
            .keys()
            .filter(|f| {
                !acl.check_subscribe(&self.key.identity, &self.key.client_id, f)
                    .allowed()
            })
            .cloned()
            .collect();
        for filter in revoked {
            self.log_denial(Action::Subscribe, &filter);
            if let Some(sub) = self.subs.remove(&filter) {
                self.unplace(filter, sub.place);
            }
        }
    }

    fn window(&self) -> usize {
        let client = self.conn.as_ref().map_or(0, |c| c.receive_max as usize);
        client.min(self.shared.config.session.max_inflight as usize)
    }

    /// Sends a message now, or queues it; `force` ignores the queue limit (retained
    /// messages on subscribe, bounded by the retained store itself).
    fn deliver(&mut self, message: Message, force: bool) {
        if message.qos == 0 {
            // QoS 0 is not kept for offline clients, nor piled up for slow readers.
            let backlog = self.conn.as_ref().map_or(0, |c| c.framed.unwritten());
            if !force && backlog > QOS0_BACKLOG {
                self.drop_message(
                    &message.topic,
                    "client reads too slowly: QoS 0 message dropped",
                );
                return;
            }
            self.send(Outbound::Publish {
                message,
                pkid: 0,
                dup: false,
            });
            return;
        }
        if self.conn.is_some() && self.queue.is_empty() && self.inflight.len() < self.window() {
            self.send_tracked(message);
        } else if force || self.queue.len() < self.shared.config.session.max_queued {
            self.queue.push_back(Queued::new(message));
        } else {
            self.drop_message(
                &message.topic,
                "session queue full (max_queued): message dropped",
            );
        }
    }

    /// Counts a dropped message; logs the first and every thousandth.
    fn drop_message(&mut self, topic: &str, why: &str) {
        self.dropped += 1;
        self.shared.metrics.dropped.inc();
        if self.dropped == 1 || self.dropped.is_multiple_of(1000) {
            warn!(identity = %self.key.identity, client_id = %self.key.client_id,
                topic = %topic, dropped = self.dropped, "{why}");
        }
    }

    fn send_tracked(&mut self, message: Message) {
        let pkid = self.alloc_pkid();
        let sent = self.send(Outbound::Publish {
            message: message.clone(),
            pkid,
            dup: false,
        });
        if sent {
            self.seq += 1;
            self.inflight.insert(
                pkid,
                Inflight {
                    message,
                    seq: self.seq,
                    released: false,
                },
            );
        } else {
            warn!(client_id = %self.key.client_id, topic = %message.topic,
                "message larger than the client's maximum packet size: not sent");
        }
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid != 0 && !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Moves queued messages into the inflight window.
    fn pump(&mut self) {
        while self.conn.is_some() && self.inflight.len() < self.window() {
            match self.queue.pop_front() {
                Some(queued) => {
                    if let Some(message) = queued.take() {
                        self.send_tracked(message);
                    }
                }
                None => break,
            }
        }
    }

    /// Hands the batch to the router; false when no link could be made (the batch is
    /// then dropped and must not be acknowledged).
    async fn flush_router(&mut self) -> bool {
        if self.to_router.is_empty() {
            return true;
        }
        if self.link_tx.is_none() {
            let router = self.shared.router.clone();
            let link_id = format!("s{}", self.id);
            match tokio::task::spawn_blocking(move || router.link(&link_id)).await {
                Ok(Ok((tx, rx))) => {
                    self.link_tx = Some(tx);
                    self.link_rx = Some(rx);
                }
                failure => {
                    let why = match failure {
                        Ok(Err(e)) => e,
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => String::new(),
                    };
                    error!(identity = %self.key.identity, client_id = %self.key.client_id,
                        error = %why, "router refused a session link");
                    self.to_router.clear();
                    return false;
                }
            }
        }
        let (Some(tx), Some(last)) = (self.link_tx.as_mut(), self.to_router.pop()) else {
            return true;
        };
        tx.buffer().extend(self.to_router.drain(..));
        // One notification for the whole batch.
        if let Err(e) = tx.send(last).await {
            error!(client_id = %self.key.client_id, error = %e, "router link failed");
            return false;
        }
        true
    }

    /// The router refused this batch: nothing in it is acknowledged, the client resends.
    async fn router_failed(&mut self) {
        if let Some(c) = &mut self.conn {
            c.framed.discard_pending();
        }
        self.close(
            Some(reason::UNSPECIFIED),
            "router unavailable: nothing acknowledged",
            true,
        )
        .await;
    }

    async fn flush(&mut self) {
        self.hand_over().await;
        if !self.flush_router().await {
            self.router_failed().await;
            return;
        }
        if std::mem::take(&mut self.needs_sync) {
            // Durable before acknowledged: the acks wait in the buffer for the flush.
            if let Err(e) = self.shared.retained.sync().await {
                error!(client_id = %self.key.client_id, error = %e, "retained store flush failed");
                self.storage_failure().await;
                return;
            }
        }
        let Some(conn) = &mut self.conn else {
            return;
        };
        if conn.framed.has_pending_writes() {
            if let Err(e) = conn.framed.flush() {
                self.drop_connection(&format!("write failed: {e}")).await;
            }
        }
    }

    async fn publish_will(&mut self, will: Will) {
        self.route(will.message);
        self.needs_sync = false;
        self.hand_over().await;
        self.flush_router().await;
    }

    /// The client broke the protocol: tell it why (MQTT 5), log, close, publish the will.
    async fn violation(&mut self, code: u8, why: &str) {
        if let Some(c) = &self.conn {
            warn!(identity = %c.identity, client_id = %c.client_id, addr = %c.addr,
                reason = %why, "connection closed for a protocol violation");
        }
        self.close(Some(code), why, true).await;
    }

    async fn drop_connection(&mut self, why: &str) {
        self.close(None, why, true).await;
    }

    /// The broker ends the connection (shutdown, keep alive, takeover).
    async fn disconnect(&mut self, code: u8, why: &str, with_will: bool) {
        self.close(Some(code), why, with_will).await;
    }

    /// Closes the socket, keeping the session; the will is published unless the
    /// client said DISCONNECT.
    async fn close(&mut self, code: Option<u8>, why: &str, with_will: bool) {
        // Boxed, as are the other rare paths: a future is as large as its largest
        // state, and every idle session would carry this one's.
        Box::pin(self.close_now(code, why, with_will)).await;
    }

    async fn close_now(&mut self, code: Option<u8>, why: &str, with_will: bool) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Acknowledgements queued in this batch go out with the close: what they
        // acknowledge is handed over first, and made durable where it must be.
        self.hand_over().await;
        let routed = self.flush_router().await;
        let synced =
            !std::mem::take(&mut self.needs_sync) || self.shared.retained.sync().await.is_ok();
        if !routed || !synced {
            conn.framed.discard_pending();
        }
        if let (Some(reason), Version::V5) = (code, conn.version) {
            conn.framed.queue(Outbound::Disconnect { reason });
        }
        conn.framed.shutdown();
        info!(identity = %conn.identity, client_id = %conn.client_id, addr = %conn.addr,
            reason = %why, "client disconnected");
        if with_will {
            if let Some(will) = conn.will.take() {
                if will.delay_secs > 0 && self.expiry_secs > 0 {
                    // MQTT 5 Will Delay: sent when the delay or the session ends,
                    // whichever comes first; a reconnection cancels it.
                    let delay = will.delay_secs.min(self.expiry_secs);
                    let at = Instant::now() + Duration::from_secs(delay.into());
                    self.pending_will = Some((at, will));
                } else {
                    self.publish_will(will).await;
                }
            }
        }
        if self.expiry_secs != 0 && self.expiry_secs != u32::MAX {
            self.expires_at = Some(Instant::now() + Duration::from_secs(self.expiry_secs.into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut recent = RecentIds::default();
        assert!(recent.insert(1));
        assert!(!recent.insert(1));
        for id in 2..=(RECENT_IDS as u64 + 1) {
            assert!(recent.insert(id));
        }
        assert!(recent.insert(1), "the oldest id was forgotten");
    }
}
