//! A session: one task per (identity, client id) that owns the client's subscriptions,
//! its inbox of published messages, its QoS 1/2 state and its queue, its router link
//! (shared subscriptions only), and the socket while one is attached. A persistent
//! session outlives its socket and keeps draining its inbox into its own queue, so
//! nothing a QoS 1/2 subscriber is owed is lost while it is away.
//!
//! `impl Session` is spread over one file per concern:
//!
//! | file | concern |
//! |---|---|
//! | `driver` | the task: the wait on every event, the end of a batch, teardown |
//! | `connect` | a connection joins: takeover, Clean Start, CONNACK, resend |
//! | `inbound` | one handler per packet from the client |
//! | `publish` | what the session publishes: retained store, hand-over, router |
//! | `delivery` | messages to the client: matching, QoS, writing |
//! | `outgoing` | the QoS engine (window, queue, packet ids, resend, expiry), sans IO |
//! | `subscriptions` | SUBSCRIBE, UNSUBSCRIBE, retained on subscribe, ACL re-check |
//! | `link` | the router link for `$share` groups |
//! | `persistence` | the session record the store keeps, and the restore |
//! | `spool` | a persistent session's queue in the store |
//! | `close` | every reason a connection ends: DISCONNECT, log line, metric, will |
//! | `telemetry` | gauges, denial and drop logging |
//! | `attachment` | the socket side: keep alive, will, topic aliases |

mod attachment;
mod close;
mod connect;
mod delivery;
mod driver;
mod inbound;
mod link;
mod outgoing;
mod persistence;
mod publish;
mod spool;
mod subscriptions;
mod telemetry;
mod throttle;

pub(crate) use driver::{hand_over, run};
pub(crate) use persistence::restored;

use crate::config::LOCAL_CLIENT_PREFIX;
use crate::ids::SessionKey;
use crate::message::{Message, Will};
use crate::protocol::SessionExpiry;
use crate::routing::fanout::{Delivery, Inbox, Outbox};
use crate::shared::registry::{Client, Control};
use crate::shared::Shared;
use crate::store::{Mark, QueueState, SessionRecord};
use crate::telemetry::bridges::BridgeMetrics;
use attachment::Attachment;
use delivery::RecentIds;
use link::RouterLink;
use outgoing::Limits;
use outgoing::Outgoing;
use rumqttd::protocol::Packet as RouterPacket;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use subscriptions::{Place, Subscription};
use telemetry::{Denials, Reported};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How a session begins.
pub(crate) enum Start {
    Client(Box<Client>),
    /// Saved before the last stop; starts offline, its plain subscriptions already in
    /// the index (see [`restored`]).
    Restored(Box<Restored>),
}

/// A session saved before the last stop, ready to start.
pub(crate) struct Restored {
    pub(crate) record: SessionRecord,
    /// Its queue as the store found it.
    pub(crate) queue: QueueState,
    pub(crate) outbox: Outbox,
    pub(crate) inbox: Inbox,
}

pub(crate) struct Session {
    /// Unique per session task: its entry in the fan-out index, its router link's name,
    /// the origin of what it publishes (No Local).
    id: u64,
    key: SessionKey,
    shared: Arc<Shared>,
    /// New connections, shutdown and revocations, from the registry.
    ctrl: mpsc::UnboundedReceiver<Control>,
    /// Messages from publishing sessions; `outbox` is what the fan-out index holds.
    inbox: Inbox,
    outbox: Outbox,
    /// Messages published in this batch, handed over at the flush.
    deliveries: Vec<Arc<Delivery>>,
    /// The router link, made on the first packet for the router: an idle session
    /// costs the router nothing.
    link: Option<Box<RouterLink>>,
    /// The session's id in the store while it is (or was) persistent; 0 before.
    store_id: u64,
    /// The queue's mark as last written to the store.
    mark: Mark,
    /// Stored QoS 2 messages completed (PUBCOMP) that the mark is not yet past:
    /// (sequence number, message id). Their `Sent::Completed` records go once it is.
    completed: Vec<(u64, u64)>,
    /// A store write failed in this batch: its acknowledgements must not go out.
    store_broken: bool,
    /// Since when a connected client's queue has been full (slow consumer).
    full_since: Option<Instant>,
    /// Inbound QoS 2 packet ids routed in this batch, recorded in the store after the
    /// messages themselves.
    qos2_routed: Vec<u16>,
    /// Packets for the router in this batch, sent at the flush.
    to_router: Vec<RouterPacket>,
    /// Subscriptions by filter.
    subs: HashMap<String, Subscription>,
    /// QoS 1/2 messages to the client: in flight and queued.
    outgoing: Outgoing,
    /// Inbound QoS 2 packet ids routed and not yet released by PUBREL: a resent
    /// PUBLISH with one of them is acknowledged, not routed again.
    qos2_in: HashSet<u16>,
    /// How long the session outlives its connection.
    expiry: SessionExpiry,
    /// When an offline session ends; None while attached or never.
    expires_at: Option<Instant>,
    /// Message ids delivered lately, to deliver one copy of a message that arrives twice.
    recent: RecentIds,
    /// Denials logged recently, for the once-a-minute summary.
    denials: Denials,
    /// The ACL generation the subscriptions were last checked against.
    acl_generation: u64,
    /// Topics the ACL's `deny_subscribe` keeps from this client, whatever it
    /// subscribed to; checked on every delivery when not empty.
    hidden: Vec<String>,
    /// What this session last added to the shared gauges.
    reported: Reported,
    /// A retained QoS 1/2 message was stored: flush the store before acknowledging.
    needs_sync: bool,
    /// Messages dropped for this session's client, for the summary at its end.
    dropped: u64,
    /// The client's connection, while one is attached.
    conn: Option<Attachment>,
    /// The latest `$SYS` values.
    sys: watch::Receiver<Arc<Vec<Message>>>,
    /// A will waiting for its Will Delay Interval (MQTT 5).
    pending_will: Option<(Instant, Will)>,
    /// The series of the bridge this session is the local side of, if any.
    bridge: Option<Box<BridgeMetrics>>,
}

impl Session {
    fn new(
        shared: Arc<Shared>,
        key: SessionKey,
        id: u64,
        ctrl: mpsc::UnboundedReceiver<Control>,
        outbox: Outbox,
        inbox: Inbox,
    ) -> Self {
        let config = &shared.config.session;
        let hidden = shared.policy.acl().hidden(&key.identity, &key.client_id);
        let mut limits = Limits {
            max_inflight: config.max_inflight,
            max_queued: config.max_queued,
            max_queued_bytes: config.max_queued_bytes,
            queue_full: config.queue_full,
            in_memory: config.in_memory,
        };
        // A bridge's local session: its section's limits and series from the start
        // (restored sessions begin before the bridge attaches).
        let bridge = key.client_id.strip_prefix(LOCAL_CLIENT_PREFIX).map(|name| {
            let section = shared
                .config
                .bridge
                .iter()
                .find(|b| b.name == name && b.local_identity() == key.identity);
            if let Some(b) = section {
                limits.max_inflight = b.max_inflight;
                limits.max_queued = b.max_queued;
                limits.max_queued_bytes = b.max_queued_bytes;
            }
            Box::new(shared.metrics.bridges.of(name))
        });
        Self {
            sys: shared.sys.subscribe(),
            outgoing: Outgoing::new(limits),
            store_id: 0,
            mark: Mark::default(),
            completed: Vec::new(),
            store_broken: false,
            qos2_routed: Vec::new(),
            full_since: None,
            pending_will: None,
            bridge,
            inbox,
            outbox,
            deliveries: Vec::new(),
            id,
            key,
            ctrl,
            link: None,
            to_router: Vec::new(),
            subs: HashMap::new(),
            qos2_in: HashSet::new(),
            expiry: SessionExpiry::OnClose,
            expires_at: None,
            recent: RecentIds::default(),
            denials: Denials::default(),
            acl_generation: 0,
            hidden,
            reported: Reported::default(),
            needs_sync: false,
            dropped: 0,
            conn: None,
            shared,
        }
    }
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
