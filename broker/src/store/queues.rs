//! Persistent sessions' queues in the store, written once per message rather than once
//! per delivery:
//!
//! - `messages`: a QoS 1/2 message owed to persistent sessions, by message id (topic,
//!   payload, properties; records written before the index also list recipients),
//!   written by its publisher;
//! - `queue_index`: what was queued between two group commits, one record each,
//!   keyed by its first message id: for each recipient session, its store id and
//!   entries (sequence number, message id, size). Written by the group commit before
//!   its flush, so a fan-out to N persistent sessions costs one message record, and
//!   all publishers waiting share one index record; the start pass reads only the
//!   index: a restart costs per group commit, and never reads a payload;
//! - `marks`: per session, the sequence number below which it has everything
//!   (delivered, expired or dropped), written lazily: after a crash a session gets
//!   again what it finished after its last mark (QoS 1 may repeat, never go missing).
//!   A session is owed the entries at or above its mark; a store id without a mark
//!   (its queue was deleted) is owed nothing, so a session's first mark is written
//!   before any publisher stores for it. An index record goes once no session is
//!   owed any of it (`index.rs` keeps count);
//! - `sent`: QoS 2 messages in flight to a session (packet id, PUBREC received), so
//!   that a restart resends them under the same packet id, and those completed that
//!   the session's mark is not yet past, so that a restart does not send them again:
//!   exactly once;
//! - `qos2`: inbound QoS 2 packet ids a session has routed and not yet released,
//!   written by the group commit after the messages they stand for.
//!
//! A message leaves the store when its last recipient releases it: a count in memory
//! (only for messages with two or more recipients left), rebuilt from the index at
//! start. Writes are not durable by themselves: a session that depends on them waits
//! for the store's group commit (`Store::sync`). sled recovers a prefix of what was
//! written, so the order of writes is what keeps the trees consistent after a crash:
//! releases before the mark that passes them, the mark before the deletion of the
//! index records it makes unneeded, messages before the QoS 2 records that stand for
//! them. A crash between a message and its index entries leaves a message nobody
//! owes, never acknowledged: the start pass deletes messages older than every owed
//! one. An owed entry whose message is gone was finished (or never acknowledged) just
//! before a crash: nothing to deliver.
//!
//! A publisher hands a message to its recipients before it writes it; until then the
//! message is *staged* here in memory, so that a recipient reading it from the store
//! at once finds it. A message that is neither staged nor written is gone for good.

use super::index::Batches;
use super::records::{
    decode_batch, decode_queued, decode_recipients, decode_sent, encode_batch, encode_queued,
    encode_sent, entry_key, split_entry_key, QueuedMessage, Sent, Spilled,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The index tree; a store without it was written before the index.
const INDEX_TREE: &[u8] = b"queue_index";
/// Entries per index record when old records are indexed at start.
const MIGRATION_CHUNK: usize = 1024;

/// How far a session's queue has come; see the module notes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Mark {
    /// Every message with a lower sequence number is finished with.
    pub(crate) low: u64,
    /// The next sequence number the session expected.
    pub(crate) next: u64,
    /// Messages below this sequence number were sent at least once (resent with DUP).
    pub(crate) sent_below: u64,
}

impl Mark {
    fn encode(&self) -> [u8; 24] {
        let mut out = [0; 24];
        out[..8].copy_from_slice(&self.low.to_be_bytes());
        out[8..16].copy_from_slice(&self.next.to_be_bytes());
        out[16..].copy_from_slice(&self.sent_below.to_be_bytes());
        out
    }

    fn decode(value: &[u8]) -> Option<Self> {
        let v: &[u8; 24] = value.try_into().ok()?;
        let word = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().unwrap_or_default());
        Some(Self {
            low: word(0),
            next: word(8),
            sent_below: word(16),
        })
    }
}

/// One session's queue as the store found it at start.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct QueueState {
    pub(crate) mark: Mark,
    /// Messages still owed, in sequence order.
    pub(crate) owed: Vec<Spilled>,
    /// Stored QoS 2 messages in flight or completed, by message id.
    pub(crate) sent: Vec<(u64, Sent)>,
    /// Inbound QoS 2 packet ids awaiting PUBREL.
    pub(crate) qos2: Vec<u16>,
}

/// The trees of the queues, and who still holds each message.
pub(super) struct Queues {
    messages: sled::Tree,
    index: sled::Tree,
    marks: sled::Tree,
    sent: sled::Tree,
    qos2: sled::Tree,
    held: Mutex<Held>,
    /// What the next group commit writes.
    pending: Mutex<Pending>,
    /// Which index records are still needed.
    batches: Mutex<Batches>,
}

/// What publishers queued since the last group commit, which writes it: one index
/// record for all of it, then the QoS 2 records.
#[derive(Default)]
struct Pending {
    /// Per recipient session (store id): its entries.
    entries: HashMap<u64, Vec<Spilled>>,
    /// Inbound QoS 2 packet ids routed, by session (store id): written after the
    /// messages they stand for.
    qos2: Vec<(u64, u16)>,
}

/// What the queues keep in memory; see the module notes.
#[derive(Default)]
struct Held {
    /// Message id -> holders left, for messages with two or more; a message not here
    /// has one holder, whose release deletes it.
    holders: HashMap<u64, u32>,
    /// Messages handed to their recipients and not yet written, by id: the publisher's
    /// own copy, shared rather than copied.
    staged: HashMap<u64, Arc<QueuedMessage>>,
}

/// What opening the queues found.
pub(super) struct Found {
    pub(super) queues: HashMap<u64, QueueState>,
    /// The highest message id in the store: new ids must start above it.
    pub(super) max_id: u64,
    pub(super) unreadable: usize,
    /// Messages no session needed any more, removed.
    pub(super) collected: usize,
}

impl Queues {
    pub(super) fn open(db: &sled::Db) -> sled::Result<(Self, Found)> {
        let indexed = db.tree_names().iter().any(|n| n.as_ref() == INDEX_TREE);
        let queues = Self {
            messages: db.open_tree("messages")?,
            index: db.open_tree(INDEX_TREE)?,
            marks: db.open_tree("marks")?,
            sent: db.open_tree("sent")?,
            qos2: db.open_tree("qos2")?,
            held: Mutex::new(Held::default()),
            pending: Mutex::new(Pending::default()),
            batches: Mutex::new(Batches::default()),
        };
        if !indexed {
            queues.index_old_records()?;
        }
        let mut found = Found {
            queues: HashMap::new(),
            max_id: 0,
            unreadable: 0,
            collected: 0,
        };
        let mut batches = Batches::default();
        for item in queues.marks.iter() {
            let (key, value) = item?;
            match (<[u8; 8]>::try_from(key.as_ref()), Mark::decode(&value)) {
                (Ok(k), Some(mark)) => {
                    let store_id = u64::from_be_bytes(k);
                    found.queues.entry(store_id).or_default().mark = mark;
                    batches.marked(store_id, mark.low);
                }
                _ => found.unreadable += 1,
            }
        }
        // The index alone: no message record is read at start.
        let mut stale = Vec::new();
        let mut oldest_owed = u64::MAX;
        for item in queues.index.iter() {
            let (key, value) = item?;
            let (Ok(batch), Some(groups)) = (
                <[u8; 8]>::try_from(key.as_ref()).map(u64::from_be_bytes),
                decode_batch(&value),
            ) else {
                found.unreadable += 1;
                continue;
            };
            let mut lasts = Vec::with_capacity(groups.len());
            for (store_id, entries) in groups {
                found.max_id = entries.iter().fold(found.max_id, |m, s| m.max(s.id));
                let Some(q) = found.queues.get_mut(&store_id) else {
                    continue;
                };
                let owed = entries.into_iter().filter(|s| s.seq >= q.mark.low);
                let before = q.owed.len();
                q.owed.extend(owed);
                if let Some(last) = q.owed[before..].iter().map(|s| s.seq).max() {
                    oldest_owed = q.owed[before..]
                        .iter()
                        .fold(oldest_owed, |m, s| m.min(s.id));
                    lasts.push((store_id, last));
                }
            }
            if batches.written(batch, lasts) {
                stale.push(key);
            }
        }
        *queues.batches.lock().unwrap_or_else(|e| e.into_inner()) = batches;
        for key in stale {
            queues.index.remove(key)?;
        }
        if let Some((key, _)) = queues.messages.last()? {
            if let Ok(k) = <[u8; 8]>::try_from(key.as_ref()) {
                found.max_id = found.max_id.max(u64::from_be_bytes(k));
            }
        }
        // Message ids grow with time, so a message older than every owed one is owed
        // to nobody: left behind by a release a crash lost. Newer ones left behind are
        // collected at a later start, once what is older has drained.
        let dead: Vec<sled::IVec> = queues
            .messages
            .range(..oldest_owed.to_be_bytes())
            .keys()
            .collect::<sled::Result<_>>()?;
        found.collected = dead.len();
        for key in dead {
            queues.messages.remove(key)?;
        }
        for q in found.queues.values_mut() {
            q.owed.sort_unstable_by_key(|s| s.seq);
        }
        queues.count_holders(&found.queues);
        for item in queues.sent.iter() {
            let (key, value) = item?;
            match (split_entry_key(&key), decode_sent(&value)) {
                (Some((store_id, id)), Some(sent)) => found
                    .queues
                    .entry(store_id)
                    .or_default()
                    .sent
                    .push((id, sent)),
                _ => found.unreadable += 1,
            }
        }
        for item in queues.qos2.iter() {
            let (key, _) = item?;
            match <[u8; 10]>::try_from(key.as_ref()) {
                Ok(k) => {
                    let (store_id, pkid) = k.split_at(8);
                    let store_id = u64::from_be_bytes(store_id.try_into().unwrap_or_default());
                    let pkid = u16::from_be_bytes(pkid.try_into().unwrap_or_default());
                    found.queues.entry(store_id).or_default().qos2.push(pkid);
                }
                Err(_) => found.unreadable += 1,
            }
        }
        Ok((queues, found))
    }

    /// Messages owed to two or more sessions get their count of holders back. With one
    /// session owed anything, there is nothing to count.
    fn count_holders(&self, queues: &HashMap<u64, QueueState>) {
        if queues.values().filter(|q| !q.owed.is_empty()).count() < 2 {
            return;
        }
        let mut ids: Vec<u64> = queues
            .values()
            .flat_map(|q| q.owed.iter().map(|s| s.id))
            .collect();
        ids.sort_unstable();
        let mut held = self.lock();
        for run in ids.chunk_by(|a, b| a == b) {
            if run.len() > 1 {
                held.holders.insert(run[0], run.len() as u32);
            }
        }
    }

    /// A store written before the index: its message records list their recipients,
    /// read once to write the index.
    fn index_old_records(&self) -> sled::Result<()> {
        let mut by_session: HashMap<u64, Vec<Spilled>> = HashMap::new();
        for item in self.messages.iter() {
            let (key, value) = item?;
            let (Ok(id), Some((recipients, size))) = (
                <[u8; 8]>::try_from(key.as_ref()).map(u64::from_be_bytes),
                decode_recipients(&value),
            ) else {
                continue;
            };
            for (store_id, seq) in recipients {
                by_session
                    .entry(store_id)
                    .or_default()
                    .push(Spilled { seq, id, size });
            }
        }
        for (store_id, mut entries) in by_session {
            entries.sort_unstable_by_key(|s| s.seq);
            for chunk in entries.chunks(MIGRATION_CHUNK) {
                // Keyed by its first message id, as a publisher's batch is.
                let key = chunk.iter().map(|s| s.id).min().unwrap_or_default();
                self.index.insert(
                    key.to_be_bytes(),
                    encode_batch(&[(store_id, chunk.to_vec())]),
                )?;
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // A panic while holding the lock leaves consistent counts behind.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Message `id` is about to go to `holders` holders (its recipients, and its
    /// publisher until the record is written): staged until `put` or `unstage`.
    pub(super) fn stage(&self, id: u64, holders: u32, message: Arc<QueuedMessage>) {
        let mut held = self.lock();
        if holders > 1 {
            held.holders.insert(id, holders);
        }
        held.staged.insert(id, message);
    }

    /// Message `id` will not be written after all (no recipient took it, or writing
    /// failed).
    pub(super) fn unstage(&self, id: u64) {
        self.lock().staged.remove(&id);
    }

    /// Writes message `id` (staged until then), owed to `recipients` (store id,
    /// sequence number): their index entries are written by the next group commit.
    /// Publishers write their messages themselves, in parallel with the flush of the
    /// one before; a crash between the two leaves a message no entry points to,
    /// never acknowledged, collected at a later start.
    pub(super) fn queue(
        &self,
        id: u64,
        message: &QueuedMessage,
        recipients: &[(u64, u64)],
    ) -> sled::Result<()> {
        let size = (message.message.topic.len() + message.message.payload.len()) as u64;
        {
            let mut pending = self.pending();
            for &(store_id, seq) in recipients {
                pending
                    .entries
                    .entry(store_id)
                    .or_default()
                    .push(Spilled { seq, id, size });
            }
        }
        self.put(id, message)
    }

    /// An inbound QoS 2 packet id routed by session `store_id`: written with the next
    /// group commit, after the messages it stands for.
    pub(super) fn queue_qos2(&self, store_id: u64, pkid: u16) {
        self.pending().qos2.push((store_id, pkid));
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes what was queued since the last call: one index record for all of it
    /// (keyed by its first message id), then the QoS 2 records. The group commit
    /// calls this before its flush.
    pub(super) fn write_pending(&self) -> sled::Result<()> {
        let Pending { entries, qos2 } = std::mem::take(&mut *self.pending());
        let groups: Vec<(u64, Vec<Spilled>)> = entries.into_iter().collect();
        self.index(&groups)?;
        for (store_id, pkid) in qos2 {
            self.qos2(store_id, pkid, true)?;
        }
        Ok(())
    }

    /// Writes an index record: what was queued for each recipient session (store id,
    /// entries), keyed by its first message id.
    fn index(&self, groups: &[(u64, Vec<Spilled>)]) -> sled::Result<()> {
        let Some(key) = groups
            .iter()
            .flat_map(|(_, e)| e.iter().map(|s| s.id))
            .min()
        else {
            return Ok(());
        };
        self.index.insert(key.to_be_bytes(), encode_batch(groups))?;
        let lasts = groups
            .iter()
            .filter_map(|(store_id, e)| Some((*store_id, e.iter().map(|s| s.seq).max()?)));
        // Its recipients may have finished with all of it before it was written.
        if self.batches().written(key, lasts) {
            self.index.remove(key.to_be_bytes())?;
        }
        Ok(())
    }

    fn batches(&self) -> std::sync::MutexGuard<'_, Batches> {
        self.batches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes the index records in `keys` (after the writes that made them unneeded).
    fn delete_batches(&self, keys: Vec<u64>) -> sled::Result<()> {
        for key in keys {
            self.index.remove(key.to_be_bytes())?;
        }
        Ok(())
    }

    /// Writes message `id` (its index entries are written); it is no longer staged.
    fn put(&self, id: u64, queued: &QueuedMessage) -> sled::Result<()> {
        let written = self
            .messages
            .insert(id.to_be_bytes(), encode_queued(queued).to_vec())
            .map(|_| ());
        // After the insert: a reader that misses it staged finds it written.
        self.unstage(id);
        written
    }

    /// Message `id`, if it is staged or the store holds it (and can read it).
    pub(super) fn message(&self, id: u64) -> sled::Result<Option<QueuedMessage>> {
        // Staged first: unstaged only once written, so one of the two has it.
        if let Some(staged) = self.lock().staged.get(&id) {
            return Ok(Some(QueuedMessage::clone(staged)));
        }
        Ok(self
            .messages
            .get(id.to_be_bytes())?
            .and_then(|v| decode_queued(Bytes::copy_from_slice(&v))))
    }

    /// One holder of message `id` is done with it; the last one deletes it.
    pub(super) fn release(&self, id: u64) -> sled::Result<()> {
        let last = {
            let holders = &mut self.lock().holders;
            match holders.get_mut(&id) {
                Some(n) => {
                    *n -= 1;
                    if *n <= 1 {
                        holders.remove(&id);
                    }
                    false
                }
                None => true,
            }
        };
        if last {
            self.messages.remove(id.to_be_bytes())?;
        }
        Ok(())
    }

    /// Writes a session's mark; then the index records it makes unneeded go.
    pub(super) fn mark(&self, store_id: u64, mark: Mark) -> sled::Result<()> {
        self.marks.insert(store_id.to_be_bytes(), &mark.encode())?;
        let finished = self.batches().marked(store_id, mark.low);
        self.delete_batches(finished)
    }

    /// What a session sends of stored QoS 2 message `id`; `None` forgets it (the
    /// session's mark is past it).
    pub(super) fn sent(&self, store_id: u64, id: u64, state: Option<Sent>) -> sled::Result<()> {
        let key = entry_key(store_id, id);
        match state {
            Some(sent) => self.sent.insert(key, &encode_sent(sent)),
            None => self.sent.remove(key),
        }
        .map(|_| ())
    }

    pub(super) fn qos2(&self, store_id: u64, pkid: u16, received: bool) -> sled::Result<()> {
        let key = qos2_key(store_id, pkid);
        if received {
            self.qos2.insert(key, &[]).map(|_| ())
        } else {
            self.qos2.remove(key).map(|_| ())
        }
    }

    /// The queue of a session the store no longer has a record of (it stopped being
    /// persistent, or its record was unreadable), as opening found it: its messages
    /// released, its records deleted. Returns how many messages it held.
    pub(super) fn drop_orphan(&self, store_id: u64, queue: &QueueState) -> sled::Result<usize> {
        for s in &queue.owed {
            self.release(s.id)?;
        }
        self.drop_session(store_id)?;
        Ok(queue.owed.len())
    }

    /// Everything of one session but its messages (which it releases itself): its
    /// in-flight and QoS 2 records, its mark, and then the index records only it
    /// still needed (without the mark, its entries are owed to nobody).
    pub(super) fn drop_session(&self, store_id: u64) -> sled::Result<()> {
        let prefix = store_id.to_be_bytes();
        for tree in [&self.sent, &self.qos2] {
            let keys: Vec<sled::IVec> = tree
                .scan_prefix(prefix)
                .keys()
                .collect::<sled::Result<_>>()?;
            for key in keys {
                tree.remove(key)?;
            }
        }
        self.marks.remove(prefix)?;
        let finished = self.batches().dropped(store_id);
        self.delete_batches(finished)
    }
}

fn qos2_key(store_id: u64, pkid: u16) -> [u8; 10] {
    let mut key = [0; 10];
    key[..8].copy_from_slice(&store_id.to_be_bytes());
    key[8..].copy_from_slice(&pkid.to_be_bytes());
    key
}

#[cfg(test)]
mod tests;
