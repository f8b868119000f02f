//! What survives a restart, in sled: retained messages (durable before acknowledged,
//! with group commit: concurrent publishers waiting for durability share one flush)
//! and persistent sessions (subscriptions, and their queues at shutdown).

use crate::codec::{decode_properties, encode_properties, Message};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prometheus_client::metrics::histogram::Histogram;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tracing::error;

const RECORD_VERSION: u8 = 1;

/// What to do with a store that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnCorruption {
    /// Move it aside, log where, and start empty.
    #[default]
    Quarantine,
    /// Refuse to start.
    Fail,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage {path} cannot be opened: {reason}; check its permissions and free space")]
    Open { path: PathBuf, reason: String },
    #[error("storage {path} is damaged ({reason}); move it aside or set [storage] on_corruption = \"quarantine\"")]
    Corrupt { path: PathBuf, reason: String },
    #[error("storage {path}: write failed: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// A stored retained message and when it was stored (for message expiry).
pub struct Stored {
    pub message: Message,
    pub stored_at: SystemTime,
}

/// What opening found.
pub struct Opened {
    pub store: Store,
    pub messages: Vec<Stored>,
    pub sessions: Vec<(SessionId, SessionRecord)>,
    /// Where a damaged store was moved, if it was.
    pub quarantined: Option<PathBuf>,
    pub unreadable_records: usize,
}

/// A persistent session's owner and client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionId {
    pub identity: String,
    pub client_id: String,
}

/// What a persistent session needs to resume after a restart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionRecord {
    pub expiry_secs: u32,
    pub subscriptions: Vec<SavedSubscription>,
    /// Messages owed to the client (saved at shutdown).
    pub queued: Vec<Message>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SavedSubscription {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub id: Option<usize>,
}

pub struct Store {
    path: PathBuf,
    tree: sled::Tree,
    sessions: sled::Tree,
    db: sled::Db,
    flush_requests: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
    flusher: tokio::task::JoinHandle<()>,
}

impl Store {
    /// Opens (or creates) `data_dir/retained` and reads every record.
    /// `flush_seconds` records the duration of each group-commit flush.
    pub async fn open(
        data_dir: &Path,
        on_corruption: OnCorruption,
        flush_seconds: Histogram,
    ) -> Result<Opened, StoreError> {
        let path = data_dir.join("retained");
        let mut quarantined = None;
        let db = match open_db(&path).await {
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
                    open_db(&path).await.map_err(|e| StoreError::Open {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?
                }
            },
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
                Some((session_id(&k)?, decode_session(Bytes::copy_from_slice(&v))?))
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
                .and_then(|(k, v)| decode(&k, Bytes::copy_from_slice(&v)));
            match decoded {
                Some(stored) => messages.push(stored),
                None => unreadable_records += 1,
            }
        }
        let (flush_requests, requests) = mpsc::unbounded_channel();
        let flusher = tokio::spawn(group_commit(db.clone(), requests, flush_seconds));
        Ok(Opened {
            store: Store {
                path,
                tree,
                sessions: session_tree,
                db,
                flush_requests,
                flusher,
            },
            messages,
            sessions,
            quarantined,
            unreadable_records,
        })
    }

    /// Writes (or, for an empty payload, deletes) the retained message of a topic.
    /// Not durable until `sync` returns.
    pub fn put(&self, message: &Message, stored_at: SystemTime) -> Result<(), StoreError> {
        let result = if message.payload.is_empty() {
            self.tree.remove(message.topic.as_bytes()).map(|_| ())
        } else {
            self.tree
                .insert(
                    message.topic.as_bytes(),
                    encode(message, stored_at).to_vec(),
                )
                .map(|_| ())
        };
        result.map_err(|e| self.write_error(e.to_string()))
    }

    /// Removes expired messages.
    pub fn remove(&self, topic: &str) -> Result<(), StoreError> {
        self.tree
            .remove(topic.as_bytes())
            .map(|_| ())
            .map_err(|e| self.write_error(e.to_string()))
    }

    /// Saves a persistent session's state (durable with the next flush).
    pub fn put_session(&self, id: &SessionId, record: &SessionRecord) -> Result<(), StoreError> {
        self.sessions
            .insert(session_key(id), encode_session(record).to_vec())
            .map(|_| ())
            .map_err(|e| self.write_error(e.to_string()))
    }

    pub fn remove_session(&self, id: &SessionId) -> Result<(), StoreError> {
        self.sessions
            .remove(session_key(id))
            .map(|_| ())
            .map_err(|e| self.write_error(e.to_string()))
    }

    /// Returns once everything written so far is on disk. Concurrent callers share
    /// one flush.
    pub async fn sync(&self) -> Result<(), StoreError> {
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

    /// Flushes before the process exits.
    pub fn close(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| self.write_error(e.to_string()))
    }

    /// Flushes and releases the files, so the store can be opened again in-process.
    pub async fn shutdown(self) -> Result<(), StoreError> {
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
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_error(&self, reason: String) -> StoreError {
        StoreError::Write {
            path: self.path.clone(),
            reason,
        }
    }
}

async fn group_commit(
    db: sled::Db,
    mut requests: mpsc::UnboundedReceiver<oneshot::Sender<Result<(), String>>>,
    flush_seconds: Histogram,
) {
    while let Some(first) = requests.recv().await {
        let mut waiting = vec![first];
        while let Ok(more) = requests.try_recv() {
            waiting.push(more);
        }
        let db = db.clone();
        let started = std::time::Instant::now();
        let flushed = tokio::task::spawn_blocking(move || db.flush()).await;
        flush_seconds.observe(started.elapsed().as_secs_f64());
        let result = match flushed {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
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

async fn open_db(path: &Path) -> Result<sled::Db, OpenFailure> {
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        match try_open_db(path).await {
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

async fn try_open_db(path: &Path) -> Result<sled::Db, OpenFailure> {
    let owned = path.to_path_buf();
    // sled may panic on some damaged files instead of returning an error.
    let opened = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(|| sled::Config::new().path(owned).open())
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

fn encode(message: &Message, stored_at: SystemTime) -> Bytes {
    let props = message.properties.as_ref().map(encode_properties);
    let props_len = props.as_ref().map_or(0, |p| p.len());
    let mut buf = BytesMut::with_capacity(14 + props_len + message.payload.len());
    buf.put_u8(RECORD_VERSION);
    buf.put_u8(message.qos);
    let millis = stored_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    buf.put_u64(millis);
    buf.put_u32(props_len as u32);
    if let Some(p) = props {
        buf.put_slice(&p);
    }
    buf.put_slice(&message.payload);
    buf.freeze()
}

fn decode(key: &[u8], mut value: Bytes) -> Option<Stored> {
    let topic = String::from_utf8(key.to_vec()).ok()?;
    if value.len() < 14 || value.get_u8() != RECORD_VERSION {
        return None;
    }
    let qos = value.get_u8().min(2);
    let stored_at = UNIX_EPOCH + Duration::from_millis(value.get_u64());
    let props_len = value.get_u32() as usize;
    if value.len() < props_len {
        return None;
    }
    let properties = if props_len > 0 {
        Some(decode_properties(value.split_to(props_len))?)
    } else {
        None
    };
    Some(Stored {
        message: Message {
            topic,
            payload: value,
            qos,
            retain: true,
            properties,
        },
        stored_at,
    })
}

fn session_key(id: &SessionId) -> Vec<u8> {
    let mut key = id.identity.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(id.client_id.as_bytes());
    key
}

fn session_id(key: &[u8]) -> Option<SessionId> {
    let split = key.iter().position(|b| *b == 0)?;
    Some(SessionId {
        identity: String::from_utf8(key[..split].to_vec()).ok()?,
        client_id: String::from_utf8(key[split + 1..].to_vec()).ok()?,
    })
}

fn put_str(buf: &mut BytesMut, s: &str) {
    buf.put_u32(s.len() as u32);
    buf.put_slice(s.as_bytes());
}

fn take(buf: &mut Bytes, len: usize) -> Option<Bytes> {
    (buf.len() >= len).then(|| buf.split_to(len))
}

fn take_u32(buf: &mut Bytes) -> Option<u32> {
    (buf.len() >= 4).then(|| buf.get_u32())
}

fn take_str(buf: &mut Bytes) -> Option<String> {
    let len = take_u32(buf)? as usize;
    String::from_utf8(take(buf, len)?.to_vec()).ok()
}

fn encode_session(record: &SessionRecord) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(RECORD_VERSION);
    buf.put_u32(record.expiry_secs);
    buf.put_u32(record.subscriptions.len() as u32);
    for s in &record.subscriptions {
        put_str(&mut buf, &s.filter);
        buf.put_u8(s.qos);
        buf.put_u8(u8::from(s.no_local) | u8::from(s.retain_as_published) << 1);
        buf.put_u32(s.id.map_or(0, |id| id as u32));
    }
    buf.put_u32(record.queued.len() as u32);
    let now = SystemTime::now();
    for m in &record.queued {
        put_str(&mut buf, &m.topic);
        let body = encode(m, now);
        buf.put_u32(body.len() as u32);
        buf.put_slice(&body);
    }
    buf.freeze()
}

fn decode_session(mut buf: Bytes) -> Option<SessionRecord> {
    if take(&mut buf, 1)?[0] != RECORD_VERSION {
        return None;
    }
    let expiry_secs = take_u32(&mut buf)?;
    let mut subscriptions = Vec::new();
    for _ in 0..take_u32(&mut buf)? {
        let filter = take_str(&mut buf)?;
        let fixed = take(&mut buf, 6)?;
        let id = u32::from_be_bytes([fixed[2], fixed[3], fixed[4], fixed[5]]);
        subscriptions.push(SavedSubscription {
            filter,
            qos: fixed[0].min(2),
            no_local: fixed[1] & 1 != 0,
            retain_as_published: fixed[1] & 2 != 0,
            id: (id != 0).then_some(id as usize),
        });
    }
    let mut queued = Vec::new();
    for _ in 0..take_u32(&mut buf)? {
        let topic = take_str(&mut buf)?;
        let len = take_u32(&mut buf)? as usize;
        let mut message = decode(topic.as_bytes(), take(&mut buf, len)?)?.message;
        message.retain = false;
        queued.push(message);
    }
    Some(SessionRecord {
        expiry_secs,
        subscriptions,
        queued,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::PublishProperties;

    fn test_histogram() -> Histogram {
        Histogram::new([1.0])
    }

    fn message(topic: &str, payload: &'static [u8]) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: 1,
            retain: true,
            properties: Some(PublishProperties {
                content_type: Some("application/json".into()),
                message_expiry_interval: Some(60),
                user_properties: vec![("fuente".into(), "test".into())],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn record_round_trip() {
        let m = message("articulos/a/futbol", b"{}");
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let back = decode(m.topic.as_bytes(), encode(&m, at)).unwrap();
        assert_eq!(back.stored_at, at);
        assert_eq!(back.message.payload, m.payload);
        assert_eq!(back.message.qos, 1);
        assert_eq!(back.message.properties, m.properties);
    }

    #[test]
    fn session_record_round_trip() {
        let record = SessionRecord {
            expiry_secs: u32::MAX,
            subscriptions: vec![SavedSubscription {
                filter: "articulos/+/futbol".into(),
                qos: 1,
                no_local: true,
                retain_as_published: false,
                id: Some(7),
            }],
            queued: vec![Message {
                retain: false,
                ..message("articulos/a/futbol", b"{}")
            }],
        };
        assert_eq!(decode_session(encode_session(&record)), Some(record));
        let id = SessionId {
            identity: "subscriber".into(),
            client_id: "sub-1".into(),
        };
        assert_eq!(session_id(&session_key(&id)), Some(id));
        assert_eq!(decode_session(Bytes::from_static(b"\x01\x00")), None);
    }

    #[tokio::test]
    async fn put_sync_reopen_delete() {
        let dir = tempfile::tempdir().unwrap();
        {
            let opened = Store::open(dir.path(), OnCorruption::Fail, test_histogram())
                .await
                .unwrap();
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
        let opened = Store::open(dir.path(), OnCorruption::Fail, test_histogram())
            .await
            .unwrap();
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
        let err = match Store::open(dir.path(), OnCorruption::Fail, test_histogram()).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("garbage opened as a store"),
        };
        assert!(err.contains("retained") && err.contains("damaged"), "{err}");
        // The quarantined store, reopened, is empty and usable.
        let opened = Store::open(dir.path(), OnCorruption::Quarantine, test_histogram())
            .await
            .unwrap();
        let aside = opened.quarantined.expect("moved aside");
        assert!(aside.join("db").is_file());
        assert!(opened.messages.is_empty());
    }
}
