//! The listener: accepts sockets under a connection limit, gives each its own task,
//! and stops everything on shutdown.

use crate::acl::Acl;
use crate::config::Config;
use crate::connection::{self, log_refusal};
use crate::metrics::Metrics;
use crate::pki;
use crate::refusal::Refusal;
use crate::registry::Registry;
use crate::registry::SessionKey;
use crate::reload::{self, Reloader};
use crate::retained::Retained;
use crate::router::Router;
use crate::session::{self, Start};
use crate::store::{SessionId, SessionRecord, Store};
use crate::tls::{self, TlsError, TlsMaterial};
use prometheus_client::metrics::histogram::Histogram;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

/// How long shutdown waits for sessions to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

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
    Store(#[from] crate::store::StoreError),
    #[error("cannot serve metrics on {addr}: {cause}; change [metrics] bind, or set it to \"\" to disable")]
    Metrics {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("cannot listen on {addr}: {cause}; is another broker running? change [listener] bind")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

/// State every connection and session shares.
pub struct Shared {
    pub config: Config,
    tls: RwLock<Arc<TlsMaterial>>,
    pub router: Router,
    pub fanout: crate::fanout::Fanout,
    pub retained: Retained,
    pub store: Arc<Store>,
    pub registry: Registry,
    pub metrics: Metrics,
    acl: RwLock<Arc<Acl>>,
    /// Bumped on every ACL change, so sessions re-check their subscriptions.
    acl_generation: AtomicU64,
    ids: AtomicU64,
    /// One per open connection, up to `max_connections`.
    pub permits: Arc<Semaphore>,
    pub started: std::time::Instant,
    /// The latest `$SYS` values, for sessions subscribed to them.
    pub sys: watch::Sender<Arc<Vec<crate::codec::Message>>>,
}

impl Shared {
    /// A process-unique number (session ids, message ids, assigned client ids).
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Sets the gauges that are read rather than counted.
    pub fn refresh_gauges(&self) {
        let m = &self.metrics;
        let open = self.config.listener.max_connections - self.permits.available_permits();
        m.connections.set(open as i64);
        m.retained.set(self.retained.len() as i64);
        m.storage_bytes.set(self.store.size_on_disk() as i64);
        let tls = self.tls.read().unwrap_or_else(|e| e.into_inner()).clone();
        for (file, not_after) in &tls.expiry {
            if let Some(days) = crate::tls::days_until(*not_after) {
                m.set_certificate_expiry(file, days);
            }
        }
    }

    /// The acceptor for new handshakes (replaced on reload).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.tls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .acceptor
            .clone()
    }

    pub fn set_tls(&self, material: TlsMaterial) {
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(material);
    }

    pub fn acl(&self) -> Arc<Acl> {
        self.acl.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn acl_generation(&self) -> u64 {
        self.acl_generation.load(Ordering::Acquire)
    }

    pub fn set_acl(&self, acl: Acl) {
        *self.acl.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(acl);
        self.acl_generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// A running broker.
pub struct Handle {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
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
        Reloader::new(self.shared.clone())
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
    reload::renew_if_due(tls_conf);
    let tls_material = tls::load(tls_conf)?;
    let acl = Acl::new(config.acl.clone()).map_err(StartError::Acl)?;
    if acl.is_open() {
        warn!("no [[acl]] rules: every identity with a valid certificate may publish and subscribe anywhere");
    }
    let metrics = Metrics::new();
    let config_max_connections = config.listener.max_connections;
    let (store, retained, sessions) = open_store(&config, metrics.flush_seconds.clone()).await?;
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
        tls: RwLock::new(Arc::new(tls_material)),
        router,
        fanout: crate::fanout::Fanout::default(),
        retained,
        store,
        registry: Registry::default(),
        metrics,
        acl: RwLock::new(Arc::new(acl)),
        acl_generation: AtomicU64::new(0),
        ids: AtomicU64::new(1),
        permits: Arc::new(Semaphore::new(config_max_connections)),
        started: std::time::Instant::now(),
        sys: watch::channel(Arc::new(Vec::new())).0,
        config,
    });
    restore_sessions(&shared, sessions);
    let (stop, stopped) = watch::channel(false);
    let metrics_addr = match shared.config.metrics.addr() {
        Some(addr) => Some(crate::metrics::serve(addr, shared.clone(), stopped.clone()).await?),
        None => None,
    };
    if shared.config.metrics.sys_interval_secs > 0 {
        tokio::spawn(crate::sys::publish_loop(shared.clone(), stopped.clone()));
    }
    info!(addr = %local_addr, "listening for MQTT over mutual TLS");
    if let Some(addr) = metrics_addr {
        info!(addr = %addr, "serving Prometheus metrics on /metrics");
    }
    reload::check_expiry(&shared.config.tls);
    tokio::spawn(reload::watch(
        Reloader::new(shared.clone()),
        stopped.clone(),
    ));
    let task = tokio::spawn(accept_loop(listener, shared.clone(), stopped));
    Ok(Handle {
        local_addr,
        metrics_addr,
        stop,
        task,
        shared,
    })
}

type Restored = (Arc<Store>, Retained, Vec<(SessionId, SessionRecord)>);

/// Opens the store and loads what it holds, before the listener opens.
async fn open_store(config: &Config, flush_seconds: Histogram) -> Result<Restored, StartError> {
    let started = std::time::Instant::now();
    let storage = &config.storage;
    let opened = Store::open(&storage.data_dir, storage.on_corruption, flush_seconds).await?;
    if opened.unreadable_records > 0 {
        warn!(store = %opened.store.path().display(), skipped = opened.unreadable_records,
            "unreadable records skipped");
    }
    let store = Arc::new(opened.store);
    let retained = Retained::with_store(store.clone(), opened.messages);
    info!(
        messages = retained.len(),
        sessions = opened.sessions.len(),
        took_ms = started.elapsed().as_millis() as u64,
        "retained messages restored"
    );
    Ok((store, retained, opened.sessions))
}

/// Starts the persistent sessions saved before the last stop, offline, so messages
/// published before their clients return are queued for them.
fn restore_sessions(shared: &Arc<Shared>, sessions: Vec<(SessionId, SessionRecord)>) {
    for (saved, record) in sessions {
        let key = SessionKey {
            identity: saved.identity,
            client_id: saved.client_id,
        };
        let id = shared.next_id();
        let rx = shared.registry.register(key.clone(), id);
        // In the index now, before the listener opens, rather than when the task runs.
        let (outbox, inbox) = session::restored(shared, id, &record);
        tokio::spawn(session::run(
            shared.clone(),
            key,
            id,
            Start::Restored(record, outbox, inbox),
            rx,
        ));
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

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let max = shared.config.listener.max_connections;
    let permits = shared.permits.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.changed() => break,
        };
        let (tcp, addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Usually out of file descriptors: wait instead of spinning.
                error!(error = %e, "accept failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(connection::handle(tcp, addr, permit, shared.clone()));
            }
            Err(_) => {
                log_refusal(
                    &shared.metrics,
                    addr,
                    None,
                    None,
                    &Refusal::TooManyConnections(max),
                );
                drop(tcp);
            }
        }
    }
    drop(listener);
    info!(
        sessions = shared.registry.len(),
        "shutting down: closing sessions"
    );
    shared.registry.shutdown_all();
    if tokio::time::timeout(SHUTDOWN_GRACE, shared.registry.wait_empty())
        .await
        .is_err()
    {
        warn!(
            left = shared.registry.len(),
            "some sessions did not close in time"
        );
    }
    if let Err(e) = shared.retained.close() {
        error!(error = %e, "final flush of the retained store failed");
    }
    info!("broker stopped");
}
