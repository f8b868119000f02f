//! What survives a restart, in sled: retained messages (durable before acknowledged,
//! with group commit: concurrent publishers waiting for durability share one flush)
//! and persistent sessions (subscriptions, and their queues at shutdown). `records`
//! says how each is written.

mod disk;
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing;
mod index;
mod queues;
mod records;

pub(crate) use queues::{Mark, QueueState};
pub(crate) use records::{
    QueuedMessage, SavedSubscription, SavedWill, Sent, SessionRecord, Spilled, Stored,
};

use crate::config::{OnCorruption, SyncMode};
use crate::ids::SessionKey;
use crate::message::Message;
use bytes::Bytes;
use prometheus_client::metrics::histogram::Histogram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tracing::error;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage {path} cannot be opened: {reason}; check its permissions and free space")]
    Open { path: PathBuf, reason: String },
    #[error("storage {path} is damaged ({reason}); move it aside or set [storage] on_corruption = \"quarantine\"")]
    Corrupt { path: PathBuf, reason: String },
    #[error("storage {path}: write failed: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("storage {path}: read failed: {reason}")]
    Read { path: PathBuf, reason: String },
}

/// What opening found.
pub(crate) struct Opened {
    pub(crate) store: Store,
    pub(crate) messages: Vec<Stored>,
    pub(crate) sessions: Vec<(SessionKey, SessionRecord)>,
    /// Persistent sessions' queues, by store id.
    pub(crate) queues: std::collections::HashMap<u64, QueueState>,
    /// The highest message id the store holds: new ids start above it.
    pub(crate) max_id: u64,
    /// Queued messages no session needed any more, removed.
    pub(crate) collected: usize,
    /// Where a damaged store was moved, if it was.
    pub(crate) quarantined: Option<PathBuf>,
    pub(crate) unreadable_records: usize,
}

pub(crate) struct Store {
    path: PathBuf,
    /// Retained messages by topic.
    tree: sled::Tree,
    /// Persistent sessions by (identity, client id).
    sessions: sled::Tree,
    /// Persistent sessions' queues; their pending writes are the group commit's.
    queues: Arc<queues::Queues>,
    /// What a group commit does; also run once more at shutdown.
    commit: Commit,
    db: sled::Db,
    flush_requests: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
    /// The group-commit task; awaited when a test reopens the store in-process.
    #[cfg_attr(not(test), allow(dead_code))]
    flusher: tokio::task::JoinHandle<()>,
}

impl Store {
    /// Opens (or creates) `data_dir/retained` and reads what a restart needs.
    /// `sync`: what the group commit waits for; `flush_seconds` records the duration
    /// of each.
    pub(crate) async fn open(
        data_dir: &Path,
        on_corruption: OnCorruption,
        cache_bytes: u64,
        sync: SyncMode,
        flush_seconds: Histogram,
    ) -> Result<Opened, StoreError> {
        let path = data_dir.join("retained");
        let mut quarantined = None;
        let db = match open_db(&path, cache_bytes).await {
            Ok(db) => db,
            Err(OpenFailure::Io(reason) | OpenFailure::Locked(reason)) => {
                return Err(StoreError::Open { path, reason })
            }
            Err(OpenFailure::Corrupt(reason)) => match on_corruption {
                OnCorruption::Fail => return Err(StoreError::Corrupt { path, reason }),
                OnCorruption::Quarantine => {
                    let aside = quarantine(&path)?;
                    error!(store = %path.display(), moved_to = %aside.display(), reason = %reason,
                        "retained store damaged: moved aside, starting with an empty store");
                    quarantined = Some(aside);
                    open_db(&path, cache_bytes)
                        .await
                        .map_err(|e| StoreError::Open {
                            path: path.clone(),
                            reason: e.to_string(),
                        })?
                }
            },
        };
        let disk = match sync {
            SyncMode::Os => None,
            SyncMode::Disk => Some(Arc::new(Mutex::new(disk::Disk::open(&path).map_err(
                |e| StoreError::Open {
                    path: path.clone(),
                    reason: e.to_string(),
                },
            )?))),
        };
        let mut unreadable_records = 0;
        let tree = db.open_tree("retained").map_err(|e| StoreError::Open {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let session_tree = db.open_tree("sessions").map_err(|e| StoreError::Open {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut sessions = Vec::new();
        for item in session_tree.iter() {
            let decoded = item.ok().and_then(|(k, v)| {
                Some((
                    records::session_key(&k)?,
                    records::decode_session(Bytes::copy_from_slice(&v))?,
                ))
            });
            match decoded {
                Some(s) => sessions.push(s),
                None => unreadable_records += 1,
            }
        }
        let mut messages = Vec::new();
        for item in tree.iter() {
            let decoded = item
                .ok()
                .and_then(|(k, v)| records::decode(&k, Bytes::copy_from_slice(&v)));
            match decoded {
                Some(stored) => messages.push(stored),
                None => unreadable_records += 1,
            }
        }
        let (queues, found) = queues::Queues::open(&db).map_err(|e| StoreError::Open {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        unreadable_records += found.unreadable;
        let (flush_requests, requests) = mpsc::unbounded_channel();
        let queues = Arc::new(queues);
        let commit = Commit {
            db: db.clone(),
            queues: queues.clone(),
            disk,
        };
        let flusher = tokio::spawn(group_commit(commit.clone(), requests, flush_seconds));
        Ok(Opened {
            store: Store {
                path,
                commit,
                tree,
                sessions: session_tree,
                queues,
                db,
                flush_requests,
                flusher,
            },
            messages,
            sessions,
            queues: found.queues,
            max_id: found.max_id,
            collected: found.collected,
            quarantined,
            unreadable_records,
        })
    }

    /// Writes (or, for an empty payload, deletes) the retained message of a topic.
    /// Not durable until `sync` returns.
    pub(crate) fn put(&self, message: &Message, stored_at: SystemTime) -> Result<(), StoreError> {
        let result = if message.payload.is_empty() {
            self.tree.remove(message.topic.as_bytes()).map(|_| ())
        } else {
            self.tree
                .insert(
                    message.topic.as_bytes(),
                    records::encode(message, stored_at).to_vec(),
                )
                .map(|_| ())
        };
        result.map_err(|e| self.write_error(e.to_string()))
    }

    /// Removes expired messages.
    pub(crate) fn remove(&self, topic: &str) -> Result<(), StoreError> {
        self.tree
            .remove(topic.as_bytes())
            .map(|_| ())
            .map_err(|e| self.write_error(e.to_string()))
    }

    /// Saves a persistent session's state (durable with the next flush).
    pub(crate) fn put_session(
        &self,
        id: &SessionKey,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        self.sessions
            .insert(
                records::key_of(id),
                records::encode_session(record).to_vec(),
            )
            .map(|_| ())
            .map_err(|e| self.write_error(e.to_string()))
    }

    pub(crate) fn remove_session(&self, id: &SessionKey) -> Result<(), StoreError> {
        self.sessions
            .remove(records::key_of(id))
            .map(|_| ())
            .map_err(|e| self.write_error(e.to_string()))
    }

    /// Message `id` is about to go to `holders` holders: its recipients, and its
    /// publisher until it has written it (`queue_message`, then `release`). Until
    /// then recipients read `message` from memory.
    pub(crate) fn stage(&self, id: u64, holders: u32, message: Arc<QueuedMessage>) {
        self.queues.stage(id, holders, message);
    }

    /// Message `id` will not be written: no recipient took it, or writing failed.
    pub(crate) fn unstage(&self, id: u64) {
        self.queues.unstage(id);
    }

    /// Writes message `id` (staged until then), owed to `recipients` (store id,
    /// sequence number); their index entries go with the next group commit (`sync`).
    pub(crate) fn queue_message(
        &self,
        id: u64,
        message: &QueuedMessage,
        recipients: &[(u64, u64)],
    ) -> Result<(), StoreError> {
        self.queues
            .queue(id, message, recipients)
            .map_err(|e| self.write_error(e.to_string()))
    }

    /// An inbound QoS 2 packet id routed by session `store_id`: written by the next
    /// group commit (`sync`), after the messages it stands for.
    pub(crate) fn queue_qos2_routed(&self, store_id: u64, pkid: u16) {
        self.queues.queue_qos2(store_id, pkid);
    }

    pub(crate) fn queued_message(&self, id: u64) -> Result<Option<QueuedMessage>, StoreError> {
        self.queues
            .message(id)
            .map_err(|e| self.read_error(e.to_string()))
    }

    /// One holder of message `id` is done with it (delivered, expired, dropped).
    pub(crate) fn release(&self, id: u64) -> Result<(), StoreError> {
        self.queues
            .release(id)
            .map_err(|e| self.write_error(e.to_string()))
    }

    /// How far a session's queue has come (written lazily); the index records it
    /// makes unneeded are deleted after it.
    pub(crate) fn mark(&self, store_id: u64, mark: Mark) -> Result<(), StoreError> {
        self.queues
            .mark(store_id, mark)
            .map_err(|e| self.write_error(e.to_string()))
    }

    /// What a session sends of stored QoS 2 message `id`; `None` forgets it (the
    /// session's mark is past it).
    pub(crate) fn sent(
        &self,
        store_id: u64,
        id: u64,
        state: Option<Sent>,
    ) -> Result<(), StoreError> {
        self.queues
            .sent(store_id, id, state)
            .map_err(|e| self.write_error(e.to_string()))
    }

    /// An inbound QoS 2 message was released by PUBREL.
    pub(crate) fn qos2_released(&self, store_id: u64, pkid: u16) -> Result<(), StoreError> {
        self.queues
            .qos2(store_id, pkid, false)
            .map_err(|e| self.write_error(e.to_string()))
    }

    /// Deletes the queue of a session that has no record any more, releasing its
    /// messages; returns how many it held.
    pub(crate) fn drop_orphan(
        &self,
        store_id: u64,
        queue: &QueueState,
    ) -> Result<usize, StoreError> {
        self.queues
            .drop_orphan(store_id, queue)
            .map_err(|e| self.write_error(e.to_string()))
    }

    /// Removes a session's mark and records (its messages it releases itself).
    pub(crate) fn drop_session_queue(&self, store_id: u64) -> Result<(), StoreError> {
        self.queues
            .drop_session(store_id)
            .map_err(|e| self.write_error(e.to_string()))
    }

    /// Returns once everything written so far is on disk. Concurrent callers share
    /// one flush.
    pub(crate) async fn sync(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        if self.flush_requests.send(tx).is_err() {
            return Err(self.write_error("flusher stopped".into()));
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(self.write_error(reason)),
            Err(_) => Err(self.write_error("flusher stopped".into())),
        }
    }

    /// Writes what is queued and makes it durable, before the process exits.
    pub(crate) fn close(&self) -> Result<(), StoreError> {
        self.commit.run().map_err(|e| self.write_error(e))
    }

    /// Flushes and releases the files, so the store can be opened again in-process.
    #[cfg(test)]
    pub(crate) async fn shutdown(self) -> Result<(), StoreError> {
        let result = self.close();
        let Store {
            flush_requests,
            flusher,
            ..
        } = self;
        drop(flush_requests);
        let _ = flusher.await;
        result
    }

    /// Bytes the store takes on disk.
    pub(crate) fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn read_error(&self, reason: String) -> StoreError {
        StoreError::Read {
            path: self.path.clone(),
            reason,
        }
    }

    fn write_error(&self, reason: String) -> StoreError {
        StoreError::Write {
            path: self.path.clone(),
            reason,
        }
    }
}

/// What one group commit does: the queue index record, sled's flush, and with `sync =
/// "disk"` the fsyncs that make it survive a power cut.
#[derive(Clone)]
struct Commit {
    db: sled::Db,
    queues: Arc<queues::Queues>,
    disk: Option<Arc<Mutex<disk::Disk>>>,
}

impl Commit {
    /// Blocking: run on a blocking thread.
    fn run(&self) -> Result<(), String> {
        self.queues
            .write_pending()
            .and_then(|()| self.db.flush())
            .map_err(|e| e.to_string())?;
        match &self.disk {
            Some(disk) => disk.lock().unwrap_or_else(|e| e.into_inner()).sync(),
            None => Ok(()),
        }
    }
}

/// The group commit: every session waiting shares one index record for the messages
/// they queued, one flush and one fsync.
async fn group_commit(
    commit: Commit,
    mut requests: mpsc::UnboundedReceiver<oneshot::Sender<Result<(), String>>>,
    flush_seconds: Histogram,
) {
    while let Some(first) = requests.recv().await {
        let mut waiting = vec![first];
        while let Ok(more) = requests.try_recv() {
            waiting.push(more);
        }
        let commit = commit.clone();
        let started = std::time::Instant::now();
        let done = tokio::task::spawn_blocking(move || commit.run()).await;
        flush_seconds.observe(started.elapsed().as_secs_f64());
        let result = match done {
            Ok(result) => result,
            Err(e) => Err(e.to_string()),
        };
        for w in waiting {
            let _ = w.send(result.clone());
        }
    }
}

enum OpenFailure {
    Io(String),
    Locked(String),
    Corrupt(String),
}

impl std::fmt::Display for OpenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(r) | Self::Locked(r) | Self::Corrupt(r) => f.write_str(r),
        }
    }
}

/// How long to wait for another process (or a broker stopping in this one) to
/// release the store's lock.
const LOCK_WAIT: Duration = Duration::from_secs(5);

async fn open_db(path: &Path, cache_bytes: u64) -> Result<sled::Db, OpenFailure> {
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        match try_open_db(path, cache_bytes).await {
            Err(OpenFailure::Locked(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(OpenFailure::Locked(reason)) => {
                return Err(OpenFailure::Io(format!(
                    "{reason}: is another broker using this data_dir?"
                )))
            }
            other => return other,
        }
    }
}

async fn try_open_db(path: &Path, cache_bytes: u64) -> Result<sled::Db, OpenFailure> {
    let owned = path.to_path_buf();
    // sled may panic on some damaged files instead of returning an error.
    let opened = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(|| {
            sled::Config::new()
                .path(owned)
                .cache_capacity(cache_bytes)
                .open()
        })
    })
    .await;
    match opened {
        Ok(Ok(Ok(db))) => Ok(db),
        // sled reports a held lock as an `Other` error naming it.
        Ok(Ok(Err(sled::Error::Io(e))))
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.to_string().contains("could not acquire lock") =>
        {
            Err(OpenFailure::Locked(e.to_string()))
        }
        Ok(Ok(Err(sled::Error::Io(e)))) if e.kind() != std::io::ErrorKind::InvalidData => {
            Err(OpenFailure::Io(e.to_string()))
        }
        Ok(Ok(Err(e))) => Err(OpenFailure::Corrupt(e.to_string())),
        Ok(Err(_)) => Err(OpenFailure::Corrupt(
            "sled panicked while reading it".into(),
        )),
        Err(e) => Err(OpenFailure::Io(e.to_string())),
    }
}

fn quarantine(path: &Path) -> Result<PathBuf, StoreError> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let aside = path.with_file_name(format!("retained.corrupt-{stamp}"));
    std::fs::rename(path, &aside).map_err(|e| StoreError::Open {
        path: path.into(),
        reason: format!(
            "cannot move the damaged store aside to {}: {e}",
            aside.display()
        ),
    })?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::records::tests::message;
    use super::*;

    /// The store in `dir` as the broker opens it, with a small cache.
    async fn open(dir: &Path, on_corruption: OnCorruption) -> Result<Opened, StoreError> {
        let flush_seconds = Histogram::new([1.0]);
        Store::open(dir, on_corruption, 8 << 20, SyncMode::Disk, flush_seconds).await
    }

    #[tokio::test]
    async fn put_sync_reopen_delete() {
        let dir = tempfile::tempdir().unwrap();
        {
            let opened = open(dir.path(), OnCorruption::Fail).await.unwrap();
            assert!(opened.messages.is_empty());
            opened
                .store
                .put(&message("a", b"1"), SystemTime::now())
                .unwrap();
            opened
                .store
                .put(&message("b", b"2"), SystemTime::now())
                .unwrap();
            opened
                .store
                .put(&message("b", b""), SystemTime::now())
                .unwrap();
            opened.store.sync().await.unwrap();
            opened.store.shutdown().await.unwrap();
        }
        let opened = open(dir.path(), OnCorruption::Fail).await.unwrap();
        let topics: Vec<_> = opened
            .messages
            .iter()
            .map(|s| s.message.topic.clone())
            .collect();
        assert_eq!(topics, vec!["a".to_string()]);
    }

    #[tokio::test]
    async fn garbage_is_quarantined_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("retained");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(store.join("conf"), b"\xde\xad\xbe\xef garbage").unwrap();
        std::fs::write(store.join("db"), vec![0xA5u8; 4096]).unwrap();
        let err = match open(dir.path(), OnCorruption::Fail).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("garbage opened as a store"),
        };
        assert!(err.contains("retained") && err.contains("damaged"), "{err}");
        // The quarantined store, reopened, is empty and usable.
        let opened = open(dir.path(), OnCorruption::Quarantine).await.unwrap();
        let aside = opened.quarantined.expect("moved aside");
        assert!(aside.join("db").is_file());
        assert!(opened.messages.is_empty());
    }
}
