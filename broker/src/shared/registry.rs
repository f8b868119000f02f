//! Live sessions by (certificate identity, client id), and what reaches a session task
//! through it: a new connection, shutdown, revocation. Keying by identity means a
//! certificate can never reach another identity's session, whatever client id it sends.

use crate::ids::SessionKey;
use crate::protocol::{ConnectInfo, Framed};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};

pub(crate) type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;
/// The reading half of a client's connection: a TLS socket, or a bridge's in-memory pipe.
pub(crate) type Reader = Box<dyn AsyncRead + Send + Sync + Unpin>;
/// A client's connection as a session reads it (its writes go to a writer task).
pub(crate) type Conn = Framed<Reader>;

/// Queue limits of one session other than `[session]`'s (a bridge's, from its section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionLimits {
    pub(crate) max_inflight: u16,
    pub(crate) max_queued: usize,
    pub(crate) max_queued_bytes: u64,
}

/// An authenticated connection whose CONNECT was accepted, on its way to a session.
pub(crate) struct Client {
    pub(crate) framed: Conn,
    pub(crate) info: ConnectInfo,
    /// The CN of its certificate.
    pub(crate) identity: String,
    /// The client certificate's serial, to act on revocation.
    pub(crate) serial: Vec<u8>,
    pub(crate) addr: SocketAddr,
    /// The broker chose the client id (the client sent an empty one).
    pub(crate) assigned_id: bool,
    /// Its place under `max_connections`, held while the connection lives.
    pub(crate) permit: OwnedSemaphorePermit,
    /// Limits of its session other than `[session]`'s; None for network clients.
    pub(crate) limits: Option<SessionLimits>,
}

/// Messages to a session task.
pub(crate) enum Control {
    /// A new connection for this session (a reconnect or a takeover).
    Attach(Box<Client>),
    /// The broker is stopping.
    Shutdown,
    /// A reloaded CRL revokes these serials: close the connection if it uses one.
    Revoked(Arc<HashSet<Vec<u8>>>),
}

struct Entry {
    /// The session task's id: a task that ended unregisters only itself.
    id: u64,
    tx: mpsc::UnboundedSender<Control>,
}

#[derive(Default)]
pub(crate) struct Registry {
    sessions: Mutex<HashMap<SessionKey, Entry>>,
    /// Woken when the last session unregisters (shutdown waits for it).
    emptied: Notify,
}

/// What `attach` did with a client.
pub(crate) enum Attached {
    /// Handed to the live session.
    Existing,
    /// No live session: the caller starts one with this id and receiver.
    New {
        client: Box<Client>,
        id: u64,
        rx: mpsc::UnboundedReceiver<Control>,
    },
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Entry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `client` to its live session, or registers a new one under `new_id`.
    pub(crate) fn attach(&self, key: SessionKey, client: Box<Client>, new_id: u64) -> Attached {
        let mut sessions = self.lock();
        let client = match sessions.get(&key) {
            Some(entry) => match entry.tx.send(Control::Attach(client)) {
                Ok(()) => return Attached::Existing,
                Err(mpsc::error::SendError(Control::Attach(client))) => client,
                Err(_) => return Attached::Existing,
            },
            None => client,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        sessions.insert(key, Entry { id: new_id, tx });
        Attached::New {
            client,
            id: new_id,
            rx,
        }
    }

    /// Registers a session started without a client (restored from the store).
    pub(crate) fn register(&self, key: SessionKey, id: u64) -> mpsc::UnboundedReceiver<Control> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(key, Entry { id, tx });
        rx
    }

    /// Removes session `id` unless a message reached it meanwhile, which is returned
    /// for the session to handle. Checked under the lock `attach` takes, so no
    /// connection is ever handed to a session that has gone.
    pub(crate) fn finish(
        &self,
        key: &SessionKey,
        id: u64,
        rx: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Option<Control> {
        let mut sessions = self.lock();
        if let Ok(control) = rx.try_recv() {
            return Some(control);
        }
        if sessions.get(key).is_some_and(|e| e.id == id) {
            sessions.remove(key);
        }
        if sessions.is_empty() {
            self.emptied.notify_waiters();
        }
        None
    }

    /// Tells every session to stop.
    pub(crate) fn shutdown_all(&self) {
        self.broadcast(|| Control::Shutdown);
    }

    /// Sends a message to every session.
    pub(crate) fn broadcast(&self, message: impl Fn() -> Control) {
        for entry in self.lock().values() {
            let _ = entry.tx.send(message());
        }
    }

    /// Waits until no session is left.
    pub(crate) async fn wait_empty(&self) {
        loop {
            let notified = self.emptied.notified();
            if self.lock().is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// The keys of the live sessions whose client id starts with `prefix`.
    pub(crate) fn keys_with_client_prefix(&self, prefix: &str) -> Vec<SessionKey> {
        self.lock()
            .keys()
            .filter(|k| k.client_id.starts_with(prefix))
            .cloned()
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}
