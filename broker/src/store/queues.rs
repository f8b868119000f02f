//! Persistent sessions' queues in the store. A message owed to one or more persistent
//! sessions is written once (`messages`, by id); each session's queue refers to it
//! (`queue`: store id ++ message id, ordered); what was in flight to a session
//! (`sent`: its packet id, and whether PUBREC came back) and the inbound QoS 2 packet
//! ids it has not yet released (`qos2`) are kept beside. A message leaves the store
//! when the last session that queued it is done with it.
//!
//! Writes are not durable by themselves: the session that writes waits for the store's
//! group commit (`Store::sync`) before it acknowledges what depends on them.

use super::records::{
    decode_queued, decode_sent, encode_queued, encode_sent, entry_key, split_entry_key,
    QueuedMessage,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Mutex;

/// The trees of the queues, and how many queues refer to each message.
pub(super) struct Queues {
    messages: sled::Tree,
    queue: sled::Tree,
    sent: sled::Tree,
    qos2: sled::Tree,
    /// Message id -> queues that still hold it. Rebuilt from `queue` at start.
    refs: Mutex<HashMap<u64, u32>>,
}

/// One session's queue as the store found it at start.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct QueueState {
    /// Messages queued (those in flight included).
    pub(crate) count: usize,
    /// Their topic and payload bytes.
    pub(crate) bytes: u64,
    /// In flight when the broker stopped: message id, packet id, PUBREC received.
    pub(crate) sent: Vec<(u64, u16, bool)>,
    /// Inbound QoS 2 packet ids awaiting PUBREL.
    pub(crate) qos2: Vec<u16>,
}

/// What opening the queues found.
pub(super) struct Found {
    pub(super) queues: HashMap<u64, QueueState>,
    /// The highest message id in the store: new ids must start above it.
    pub(super) max_id: u64,
    pub(super) unreadable: usize,
}

fn size_of(message: &crate::message::Message) -> u32 {
    (message.topic.len() + message.payload.len()) as u32
}

impl Queues {
    pub(super) fn open(db: &sled::Db) -> sled::Result<(Self, Found)> {
        let queues = Self {
            messages: db.open_tree("messages")?,
            queue: db.open_tree("queue")?,
            sent: db.open_tree("sent")?,
            qos2: db.open_tree("qos2")?,
            refs: Mutex::new(HashMap::new()),
        };
        let mut found = Found {
            queues: HashMap::new(),
            max_id: 0,
            unreadable: 0,
        };
        if let Some((key, _)) = queues.messages.last()? {
            found.max_id = key.as_ref().try_into().map_or(0, u64::from_be_bytes);
        }
        {
            let mut refs = queues.lock();
            for item in queues.queue.iter() {
                let (key, value) = item?;
                let (Some((store_id, id)), Ok(size)) =
                    (split_entry_key(&key), <[u8; 4]>::try_from(value.as_ref()))
                else {
                    found.unreadable += 1;
                    continue;
                };
                let state = found.queues.entry(store_id).or_default();
                state.count += 1;
                state.bytes += u64::from(u32::from_be_bytes(size));
                *refs.entry(id).or_default() += 1;
            }
        }
        for item in queues.sent.iter() {
            let (key, value) = item?;
            match (split_entry_key(&key), decode_sent(&value)) {
                (Some((store_id, id)), Some((pkid, released))) => found
                    .queues
                    .entry(store_id)
                    .or_default()
                    .sent
                    .push((id, pkid, released)),
                _ => found.unreadable += 1,
            }
        }
        for item in queues.qos2.iter() {
            let (key, _) = item?;
            match <[u8; 10]>::try_from(key.as_ref()) {
                Ok(k) => {
                    let store_id = u64::from_be_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]]);
                    let pkid = u16::from_be_bytes([k[8], k[9]]);
                    found.queues.entry(store_id).or_default().qos2.push(pkid);
                }
                Err(_) => found.unreadable += 1,
            }
        }
        Ok((queues, found))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        // A panic while holding the lock leaves a consistent count behind.
        self.refs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores message `id` once and queues it for each of `store_ids`.
    pub(super) fn put(&self, id: u64, queued: &QueuedMessage, store_ids: &[u64]) -> sled::Result<()> {
        // Counted first, so that garbage collection never takes it for an orphan.
        *self.lock().entry(id).or_default() += store_ids.len() as u32;
        self.messages.insert(id.to_be_bytes(), encode_queued(queued).to_vec())?;
        let size = size_of(&queued.message).to_be_bytes();
        let mut batch = sled::Batch::default();
        for store_id in store_ids {
            batch.insert(&entry_key(*store_id, id), &size);
        }
        self.queue.apply_batch(batch)
    }

    /// The oldest messages of a session's queue that `skip` does not hold, up to
    /// `max`; and whether the queue holds nothing more. Entries whose message is gone
    /// are removed on the way.
    pub(super) fn read(
        &self,
        store_id: u64,
        skip: impl Fn(u64) -> bool,
        max: usize,
    ) -> sled::Result<(Vec<(u64, QueuedMessage)>, bool)> {
        let mut read = Vec::new();
        for item in self.queue.scan_prefix(store_id.to_be_bytes()) {
            let (key, _) = item?;
            let Some((_, id)) = split_entry_key(&key) else {
                continue;
            };
            if skip(id) {
                continue;
            }
            if read.len() == max {
                return Ok((read, false));
            }
            match self.message(id)? {
                Some(queued) => read.push((id, queued)),
                None => {
                    self.queue.remove(key)?;
                }
            }
        }
        Ok((read, true))
    }

    /// Message `id`, if the store holds it (and can read it).
    pub(super) fn message(&self, id: u64) -> sled::Result<Option<QueuedMessage>> {
        Ok(self
            .messages
            .get(id.to_be_bytes())?
            .and_then(|v| decode_queued(Bytes::copy_from_slice(&v))))
    }

    /// The session is done with message `id` (delivered, expired, dropped): out of its
    /// queue, and out of the store once no queue holds it.
    pub(super) fn release(&self, store_id: u64, id: u64) -> sled::Result<()> {
        let key = entry_key(store_id, id);
        if self.queue.remove(key)?.is_none() {
            return Ok(());
        }
        self.sent.remove(key)?;
        let last = {
            let mut refs = self.lock();
            match refs.get_mut(&id) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => {
                    refs.remove(&id);
                    true
                }
            }
        };
        if last {
            self.messages.remove(id.to_be_bytes())?;
        }
        Ok(())
    }

    /// Message `id` went out to the session with `pkid`; `released` once PUBREC came.
    pub(super) fn sent(&self, store_id: u64, id: u64, pkid: u16, released: bool) -> sled::Result<()> {
        self.sent
            .insert(entry_key(store_id, id), &encode_sent(pkid, released))
            .map(|_| ())
    }

    pub(super) fn qos2_received(&self, store_id: u64, pkid: u16) -> sled::Result<()> {
        self.qos2.insert(qos2_key(store_id, pkid), &[]).map(|_| ())
    }

    pub(super) fn qos2_released(&self, store_id: u64, pkid: u16) -> sled::Result<()> {
        self.qos2.remove(qos2_key(store_id, pkid)).map(|_| ())
    }

    /// Everything of one session: its queue (messages released), in-flight and QoS 2
    /// records. Returns how many messages it had queued.
    pub(super) fn drop_session(&self, store_id: u64) -> sled::Result<usize> {
        let prefix = store_id.to_be_bytes();
        let ids: Vec<u64> = self
            .queue
            .scan_prefix(prefix)
            .keys()
            .filter_map(|k| k.ok().and_then(|k| split_entry_key(&k)).map(|(_, id)| id))
            .collect();
        for id in &ids {
            self.release(store_id, *id)?;
        }
        for tree in [&self.sent, &self.qos2] {
            let keys: Vec<sled::IVec> = tree.scan_prefix(prefix).keys().filter_map(Result::ok).collect();
            for key in keys {
                tree.remove(key)?;
            }
        }
        Ok(ids.len())
    }

    /// Messages no queue refers to (left by a crash between two writes), removed.
    pub(super) fn collect_garbage(&self) -> sled::Result<usize> {
        let mut removed = 0;
        for key in self.messages.iter().keys() {
            let key = key?;
            let Ok(id) = <[u8; 8]>::try_from(key.as_ref()).map(u64::from_be_bytes) else {
                continue;
            };
            if !self.lock().contains_key(&id) {
                self.messages.remove(&key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn qos2_key(store_id: u64, pkid: u16) -> [u8; 10] {
    let mut key = [0; 10];
    key[..8].copy_from_slice(&store_id.to_be_bytes());
    key[8..].copy_from_slice(&pkid.to_be_bytes());
    key
}
