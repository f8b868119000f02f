//! The state every task shares, as one narrow type: the configuration, the policy in
//! force, the services sessions publish through, the metrics, the registry of live
//! sessions and the id counter. It imports nothing from the tasks that use it (edge,
//! sessions, operations), so each of them can be read, and tested, on its own.

pub(crate) mod registry;

use crate::config::Config;
use crate::ids::Ids;
use crate::message::Message;
use crate::routing::fanout::Fanout;
use crate::routing::retained::Retained;
use crate::routing::router::Router;
use crate::security::policy::Policy;
use crate::store::Store;
use crate::telemetry::metrics::Metrics;
use registry::Registry;
use std::sync::Arc;
use tokio::sync::{watch, Semaphore};

pub(crate) struct Shared {
    /// `broker.toml` as loaded at start (the ACL part is reloaded into `policy`).
    pub(crate) config: Config,
    /// The TLS material and the ACL in force, swapped on reload.
    pub(crate) policy: Policy,
    /// rumqttd's router thread, for `$share` groups.
    pub(crate) router: Router,
    /// The index of plain subscriptions: publishing sessions hand messages over here.
    pub(crate) fanout: Fanout,
    /// Retained messages, in memory and written through to `store`.
    pub(crate) retained: Retained,
    /// The sled store: retained messages and persistent sessions.
    pub(crate) store: Arc<Store>,
    /// Live sessions by (identity, client id).
    pub(crate) registry: Registry,
    pub(crate) metrics: Metrics,
    /// Session ids, message ids, assigned client ids.
    pub(crate) ids: Ids,
    /// One per open connection, up to `max_connections`.
    pub(crate) permits: Arc<Semaphore>,
    /// The latest `$SYS` values, for sessions subscribed to them.
    pub(crate) sys: watch::Sender<Arc<Vec<Message>>>,
}
