//! Start and stop: loads the policy, opens the store, starts the router, restores the
//! persistent sessions, binds the listener and starts the tasks beside it. The top of
//! the module graph: it wires the parts together, and nothing imports it.

use crate::bridge::{self, BridgeControl};
use crate::config::Config;
use crate::edge::listener;
use crate::ids::{Ids, SessionKey};
use crate::operations::certificates::{check_expiry, renew_if_due};
use crate::operations::endpoint::{self, EndpointError};
use crate::operations::gauges::refresh_gauges;
use crate::operations::reload::{self, Reloader};
use crate::operations::sys;
use crate::routing::fanout::Fanout;
use crate::routing::retained::Retained;
use crate::routing::router::Router;
use crate::security::acl::Acl;
use crate::security::pki;
use crate::security::policy::Policy;
use crate::security::tls::{self, TlsError};
use crate::session::{self, Restored, Start};
use crate::shared::registry::Registry;
use crate::shared::Shared;
use crate::store::{Mark, QueueState, SessionRecord, Store, StoreError};
use crate::telemetry::metrics::Metrics;
use prometheus_client::metrics::histogram::Histogram;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "TLS: {0}; set [tls] auto_generate = true to create a development PKI, or fix the file"
    )]
    Tls(#[from] TlsError),
    #[error("cannot create the development PKI: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("ACL: {0}")]
    Acl(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}; change [metrics] bind, or set it to \"\" to disable")]
    Metrics(#[from] EndpointError),
    #[error("cannot listen on {addr}: {cause}; is another broker running? change [listener] bind")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

/// A running broker.
pub struct Handle {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    /// Set to true to stop.
    stop: watch::Sender<bool>,
    /// The bridges in force, for reloads.
    bridges: BridgeControl,
    /// The accept loop, which ends once every session has closed.
    task: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Handle {
    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The Prometheus endpoint's address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Something that reloads the ACL, for signal handlers and watchers.
    pub fn reloader(&self) -> Reloader {
        Reloader::new(self.shared.clone(), self.bridges.clone())
    }

    /// Stops accepting, closes every session, and returns when they are closed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Runs until `signal` completes, then shuts down.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }
}

/// Loads (or creates) the TLS material, starts the router, binds the listener and
/// starts accepting. Returns once the listener is open.
pub async fn start(config: Config) -> Result<Handle, StartError> {
    let tls_conf = &config.tls;
    if tls_conf.auto_generate {
        ensure_development_pki(&config)?;
    }
    renew_if_due(tls_conf);
    let tls_material = tls::load(tls_conf)?;
    let acl = Acl::new(config.acl.clone()).map_err(StartError::Acl)?;
    if acl.is_open() {
        warn!("no [[acl]] rules: every identity with a valid certificate may publish and subscribe anywhere");
    }
    let metrics = Metrics::new();
    let config_max_connections = config.listener.max_connections;
    let Opened {
        store,
        retained,
        sessions,
        max_id,
    } = open_store(&config, metrics.flush_seconds.clone()).await?;
    let bind = config.listener.bind;
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|cause| StartError::Bind { addr: bind, cause })?;
    let local_addr = listener
        .local_addr()
        .map_err(|cause| StartError::Bind { addr: bind, cause })?;
    // Persistent sessions keep their link while offline: room for them too.
    let router = Router::spawn(config.listener.max_connections.saturating_mul(2).max(64));
    let shared = Arc::new(Shared {
        policy: Policy::new(tls_material, acl),
        router,
        fanout: Fanout::default(),
        retained,
        store,
        registry: Registry::default(),
        metrics,
        ids: Ids::above(max_id),
        permits: Arc::new(Semaphore::new(config_max_connections)),
        sys: watch::channel(Arc::new(Vec::new())).0,
        config,
    });
    restore_sessions(&shared, sessions);
    let (stop, stopped) = watch::channel(false);
    let metrics_addr = match shared.config.metrics.addr() {
        Some(addr) => {
            let scraped = shared.clone();
            let render = Arc::new(move || {
                refresh_gauges(&scraped);
                scraped.metrics.render()
            });
            Some(endpoint::serve(addr, render, stopped.clone()).await?)
        }
        None => None,
    };
    if shared.config.metrics.sys_interval_secs > 0 {
        tokio::spawn(sys::publish_loop(shared.clone(), stopped.clone()));
    }
    info!(addr = %local_addr, "listening for MQTT over mutual TLS");
    if let Some(addr) = metrics_addr {
        info!(addr = %addr, "serving Prometheus metrics on /metrics");
    }
    check_expiry(&shared.config.tls);
    // Before the first client is accepted: each bridge's local session holds its
    // subscriptions by then, so what goes out is queued from the first message.
    let bridges = bridge::start(shared.clone(), stopped.clone()).await;
    tokio::spawn(reload::watch(
        Reloader::new(shared.clone(), bridges.clone()),
        stopped.clone(),
    ));
    let task = tokio::spawn(listener::accept_loop(listener, shared.clone(), stopped));
    Ok(Handle {
        local_addr,
        metrics_addr,
        stop,
        bridges,
        task,
        shared,
    })
}

/// What the store held: the store, retained messages, persistent sessions with their
/// queues, and the highest id in use.
struct Opened {
    store: Arc<Store>,
    retained: Retained,
    sessions: Vec<(SessionKey, SessionRecord, QueueState)>,
    max_id: u64,
}

/// How many malloc arenas the process may use: glibc's default (8 per core) lets each
/// thread keep freed memory of its own. Measured on 2 cores, draining 1,000,000 queued
/// messages: peak RSS 136–143 MB with the default, 95–112 MB with one per core, at the
/// same rate; 4 × 4 QoS 1 throughput no lower (858k–902k against 839k–866k
/// deliveries/s).
const ARENAS_PER_CORE: usize = 1;

/// Sets the allocator up for a long-running broker; call before the async runtime
/// starts its threads (the `broker` binary and the stack do). `MALLOC_ARENA_MAX` in
/// the environment, when set, is left to decide.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = libc::c_int::try_from(cores * ARENAS_PER_CORE).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a tuning parameter of glibc's allocator.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Hands the memory the start pass freed back to the system: reading a large store
/// through sled leaves hundreds of MB of freed heap that glibc would otherwise keep.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap; no pointer of ours is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Opens the store and loads what it holds, before the listener opens.
async fn open_store(config: &Config, flush_seconds: Histogram) -> Result<Opened, StartError> {
    let started = std::time::Instant::now();
    let storage = &config.storage;
    let opened = Store::open(
        &storage.data_dir,
        storage.on_corruption,
        storage.cache_mb << 20,
        storage.sync,
        flush_seconds,
    )
    .await?;
    if opened.unreadable_records > 0 {
        warn!(store = %opened.store.path().display(), skipped = opened.unreadable_records,
            "unreadable records skipped");
    }
    let store = Arc::new(opened.store);
    release_freed_memory();
    let retained = Retained::with_store(store.clone(), opened.messages);
    let mut queues = opened.queues;
    let mut max_id = opened.max_id;
    let sessions: Vec<(SessionKey, SessionRecord, QueueState)> = opened
        .sessions
        .into_iter()
        .map(|(key, record)| {
            max_id = max_id.max(record.store_id);
            let queue = queues.remove(&record.store_id).unwrap_or_default();
            (key, record, queue)
        })
        .collect();
    // Queues left without a session: it stopped being persistent before a crash, or
    // its record was unreadable. Nobody will ever ask for them.
    let mut orphaned = 0;
    for (store_id, queue) in &queues {
        orphaned += store.drop_orphan(*store_id, queue)?;
    }
    if orphaned > 0 {
        warn!(store = %store.path().display(), sessions = queues.len(), messages = orphaned,
            "queues of sessions no longer saved deleted");
    }
    let queued: usize = sessions.iter().map(|(_, _, q)| q.owed.len()).sum();
    info!(
        messages = retained.len(),
        sessions = sessions.len(),
        queued,
        collected = opened.collected,
        quarantined = ?opened.quarantined,
        took_ms = started.elapsed().as_millis() as u64,
        "retained messages restored"
    );
    Ok(Opened {
        store,
        retained,
        sessions,
        max_id,
    })
}

/// Starts the persistent sessions saved before the last stop, offline, so messages
/// published before their clients return are queued for them.
fn restore_sessions(shared: &Arc<Shared>, sessions: Vec<(SessionKey, SessionRecord, QueueState)>) {
    for (key, mut record, queue) in sessions {
        if record.store_id == 0 {
            // Saved before durable queues. Its first mark before any publisher stores
            // for it: the store knows a queue by its mark.
            record.store_id = shared.ids.next();
            if let Err(e) = shared.store.mark(record.store_id, Mark::default()) {
                error!(identity = %key.identity, client_id = %key.client_id, error = %e,
                    "session's queue not created in the store");
            }
        }
        let id = shared.ids.next();
        let rx = shared.registry.register(key.clone(), id);
        // In the index now, before the listener opens, rather than when the task runs.
        let (outbox, inbox) = session::restored(shared, id, &record, &queue);
        let start = Start::Restored(Box::new(Restored {
            record,
            queue,
            outbox,
            inbox,
        }));
        tokio::spawn(session::run(shared.clone(), key, id, start, rx));
    }
}

fn ensure_development_pki(config: &Config) -> Result<(), StartError> {
    let t = &config.tls;
    if t.ca_file.is_file() && t.cert_file.is_file() && t.key_file.is_file() {
        return Ok(());
    }
    let layout = pki::Layout::for_broker(&t.ca_file, &t.cert_file, &t.key_file);
    let outcomes = pki::ensure(&layout, &pki::Request::default())?;
    for o in outcomes.iter().filter(|o| o.written) {
        info!(file = %o.path.display(), "certificate written");
    }
    warn!(
        dir = %layout.client_dir.display(),
        "created a DEVELOPMENT PKI (CA, broker and client certificates) in {}: fine for trying \
         the stack, not for production; set [tls] auto_generate = false and use your own CA there",
        layout.client_dir.display()
    );
    Ok(())
}
