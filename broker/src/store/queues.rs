//! Persistent sessions' queues in the store, written once per message rather than once
//! per delivery:
//!
//! - `messages`: a QoS 1/2 message owed to persistent sessions, by message id (topic,
//!   payload, properties; records written before the index also list recipients);
//! - `queue_index`: per session, which messages one publisher's batch queued for it,
//!   as (sequence number, message id, size) entries, keyed by (store id, first
//!   sequence number). A fan-out writes one message record and one small index
//!   record per recipient session and batch; the start pass reads only the index, so
//!   a restart costs per batch, not per message, and never reads a payload;
//! - `marks`: per session, the sequence number below which it has everything
//!   (delivered, expired or dropped), written lazily: after a crash a session gets
//!   again what it finished after its last mark (QoS 1 may repeat, never go missing).
//!   Index records wholly below a session's mark are deleted after the mark is
//!   written;
//! - `sent`: QoS 2 messages in flight to a session (packet id, PUBREC received), so
//!   that a restart resends them under the same packet id, and those completed that
//!   the session's mark is not yet past, so that a restart does not send them again:
//!   exactly once;
//! - `qos2`: inbound QoS 2 packet ids a session has routed and not yet released.
//!
//! A message leaves the store when its last recipient releases it: a count in memory
//! (only for messages with two or more recipients left), rebuilt from the index at
//! start. Writes are not durable by themselves: a session that depends on them waits
//! for the store's group commit (`Store::sync`). sled recovers a prefix of what was
//! written, so the order of writes is what keeps the trees consistent after a crash:
//! index entries before their message (a message is never on disk without them),
//! releases before the mark that passes them, the mark before the index records it
//! makes stale. An owed entry whose message is gone was finished (or never
//! acknowledged) just before a crash: nothing to deliver.
//!
//! A publisher hands a message to its recipients before it writes the records; until
//! then the message is *staged* here in memory, so that a recipient reading it from
//! the store at once finds it. A message that is neither staged nor written is gone
//! for good.

use super::records::{
    decode_index, decode_queued, decode_recipients, decode_sent, encode_index, encode_queued,
    encode_sent, entry_key, last_seq, split_entry_key, QueuedMessage, Sent, Spilled,
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
        for item in queues.marks.iter() {
            let (key, value) = item?;
            match (<[u8; 8]>::try_from(key.as_ref()), Mark::decode(&value)) {
                (Ok(k), Some(mark)) => {
                    found.queues.entry(u64::from_be_bytes(k)).or_default().mark = mark;
                }
                _ => found.unreadable += 1,
            }
        }
        // The index alone: no message record is read at start.
        let mut stale = Vec::new();
        let mut oldest_owed = u64::MAX;
        for item in queues.index.iter() {
            let (key, value) = item?;
            let (Some((store_id, _)), Some(entries)) =
                (split_entry_key(&key), decode_index(&value))
            else {
                found.unreadable += 1;
                continue;
            };
            // A session with entries and no mark yet is owed all of them.
            let q = found.queues.entry(store_id).or_default();
            let before = q.owed.len();
            for s in entries {
                found.max_id = found.max_id.max(s.id);
                if s.seq >= q.mark.low {
                    oldest_owed = oldest_owed.min(s.id);
                    q.owed.push(s);
                }
            }
            if q.owed.len() == before {
                stale.push(key);
            }
        }
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
                self.index(store_id, chunk)?;
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

    /// Records that one publisher's batch queued `entries` for session `store_id`;
    /// written before the messages themselves.
    pub(super) fn index(&self, store_id: u64, entries: &[Spilled]) -> sled::Result<()> {
        let Some(first) = entries.iter().map(|s| s.seq).min() else {
            return Ok(());
        };
        self.index
            .insert(entry_key(store_id, first), encode_index(entries))
            .map(|_| ())
    }

    /// Deletes the index records of session `store_id` that its mark `low` is past;
    /// called once the mark is written.
    pub(super) fn trim(&self, store_id: u64, low: u64) -> sled::Result<()> {
        let stale: Vec<sled::IVec> = self
            .index
            .range(entry_key(store_id, 0)..entry_key(store_id, low))
            .filter_map(|item| match item {
                Ok((key, value)) => last_seq(&value)
                    .is_none_or(|last| last < low)
                    .then_some(Ok(key)),
                Err(e) => Some(Err(e)),
            })
            .collect::<sled::Result<_>>()?;
        for key in stale {
            self.index.remove(key)?;
        }
        Ok(())
    }

    /// Writes message `id` (its index entries are written); it is no longer staged.
    pub(super) fn put(&self, id: u64, queued: &QueuedMessage) -> sled::Result<()> {
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

    pub(super) fn mark(&self, store_id: u64, mark: Mark) -> sled::Result<()> {
        self.marks
            .insert(store_id.to_be_bytes(), &mark.encode())
            .map(|_| ())
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
    /// index, in-flight and QoS 2 records, and its mark last, so that a crash midway
    /// never leaves index entries behind a missing mark (they would be owed again).
    pub(super) fn drop_session(&self, store_id: u64) -> sled::Result<()> {
        let prefix = store_id.to_be_bytes();
        for tree in [&self.index, &self.sent, &self.qos2] {
            let keys: Vec<sled::IVec> = tree
                .scan_prefix(prefix)
                .keys()
                .collect::<sled::Result<_>>()?;
            for key in keys {
                tree.remove(key)?;
            }
        }
        self.marks.remove(prefix)?;
        Ok(())
    }
}

fn qos2_key(store_id: u64, pkid: u16) -> [u8; 10] {
    let mut key = [0; 10];
    key[..8].copy_from_slice(&store_id.to_be_bytes());
    key[8..].copy_from_slice(&pkid.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    fn queued(recipients: Vec<(u64, u64)>) -> QueuedMessage {
        QueuedMessage {
            message: Message {
                topic: "a/b".into(),
                payload: Bytes::from_static(b"hola"),
                qos: 1,
                retain: false,
                properties: None,
            },
            origin: 1,
            received_at: 2,
            recipients,
        }
    }

    /// Message `id` queued for each (session, sequence number), as a publisher writes
    /// it: the index entries, then the message.
    fn publish(q: &Queues, id: u64, to: &[(u64, u64)]) {
        for &(store_id, seq) in to {
            q.index(store_id, &[Spilled { seq, id, size: 7 }]).unwrap();
        }
        q.put(id, &queued(Vec::new())).unwrap();
    }

    fn open(dir: &tempfile::TempDir) -> sled::Db {
        sled::Config::new().path(dir.path()).open().unwrap()
    }

    #[test]
    fn a_message_goes_when_its_last_holder_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let (q, _) = Queues::open(&db).unwrap();
        q.stage(7, 3, Arc::new(queued(Vec::new())));
        publish(&q, 7, &[(1, 0), (2, 0)]);
        q.release(7).unwrap();
        q.release(7).unwrap();
        assert!(q.message(7).unwrap().is_some(), "one holder left");
        q.release(7).unwrap();
        assert!(q.message(7).unwrap().is_none());
        // One holder: no count, its release deletes.
        publish(&q, 8, &[(1, 1)]);
        q.release(8).unwrap();
        assert!(q.message(8).unwrap().is_none());
    }

    #[test]
    fn reopening_finds_what_each_session_is_still_owed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open(&dir);
            let (q, _) = Queues::open(&db).unwrap();
            let one = Mark {
                low: 5,
                next: 9,
                sent_below: 6,
            };
            q.mark(1, one).unwrap();
            q.mark(2, Mark::default()).unwrap();
            // Session 1 finished seq 4 (its release lost in a crash); 5 and 6 are
            // owed. Session 2 is owed seq 0.
            publish(&q, 10, &[(1, 4)]);
            publish(&q, 11, &[(1, 6), (2, 0)]);
            publish(&q, 12, &[(1, 5)]);
            // No mark: a session whose first mark was not written yet.
            publish(&q, 13, &[(3, 0)]);
            let released = Sent::InFlight {
                pkid: 42,
                released: true,
            };
            q.sent(1, 11, Some(released)).unwrap();
            q.sent(1, 12, Some(Sent::Completed)).unwrap();
            q.qos2(2, 9, true).unwrap();
            db.flush().unwrap();
        }
        let db = open(&dir);
        let (q, found) = Queues::open(&db).unwrap();
        // Message 10 is older than any owed: collected.
        assert_eq!((found.max_id, found.collected), (13, 1));
        let one = &found.queues[&1];
        assert_eq!(one.mark.low, 5);
        let owed: Vec<(u64, u64, u64)> = one.owed.iter().map(|s| (s.seq, s.id, s.size)).collect();
        assert_eq!(owed, [(5, 12, 7), (6, 11, 7)]);
        let released = Sent::InFlight {
            pkid: 42,
            released: true,
        };
        assert_eq!(one.sent, [(11, released), (12, Sent::Completed)]);
        assert_eq!(found.queues[&2].qos2, [9]);
        assert_eq!(found.queues[&3].owed.len(), 1);
        assert!(q.message(10).unwrap().is_none() && q.message(13).unwrap().is_some());
        // Message 11 has two holders again.
        q.release(11).unwrap();
        assert!(q.message(11).unwrap().is_some());
        q.release(11).unwrap();
        assert!(q.message(11).unwrap().is_none());
        q.drop_session(1).unwrap();
        drop(q);
        let (_, found) = Queues::open(&db).unwrap();
        assert!(!found.queues.contains_key(&1));
    }

    #[test]
    fn index_records_past_the_mark_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let (q, _) = Queues::open(&db).unwrap();
        let batch = |seqs: std::ops::Range<u64>| -> Vec<Spilled> {
            seqs.map(|seq| Spilled {
                seq,
                id: 100 + seq,
                size: 1,
            })
            .collect()
        };
        q.index(1, &batch(0..3)).unwrap();
        q.index(1, &batch(3..6)).unwrap();
        q.index(2, &batch(0..3)).unwrap();
        q.trim(1, 4).unwrap();
        // 0..3 is past; 3..6 still holds 4 and 5; session 2 is untouched.
        let keys: Vec<(u64, u64)> = q
            .index
            .iter()
            .keys()
            .map(|k| split_entry_key(&k.unwrap()).unwrap())
            .collect();
        assert_eq!(keys, [(1, 3), (2, 0)]);
        q.trim(1, 6).unwrap();
        assert_eq!(q.index.len(), 1);
        assert_eq!(decode_index(&encode_index(&batch(7..9))), Some(batch(7..9)));
        assert_eq!(last_seq(&encode_index(&batch(7..9))), Some(8));
        assert_eq!(decode_index(&[1, 1, 2]), None);
        assert_eq!(decode_index(&[1]), None);
    }

    #[test]
    fn a_store_written_before_the_index_is_indexed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open(&dir);
            let messages = db.open_tree("messages").unwrap();
            let marks = db.open_tree("marks").unwrap();
            marks
                .insert(1u64.to_be_bytes(), &Mark::default().encode())
                .unwrap();
            for (id, recipients) in [(20u64, vec![(1, 0)]), (21, vec![(1, 1), (2, 0)])] {
                messages
                    .insert(
                        id.to_be_bytes(),
                        encode_queued(&queued(recipients)).to_vec(),
                    )
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let db = open(&dir);
        let (q, found) = Queues::open(&db).unwrap();
        let owed: Vec<(u64, u64, u64)> = found.queues[&1]
            .owed
            .iter()
            .map(|s| (s.seq, s.id, s.size))
            .collect();
        assert_eq!(owed, [(0, 20, 7), (1, 21, 7)]);
        assert_eq!(found.queues[&2].owed.len(), 1);
        // Two holders of message 21.
        q.release(21).unwrap();
        assert!(q.message(21).unwrap().is_some());
    }

    #[test]
    fn a_staged_message_is_read_before_it_is_written_and_gone_once_unstaged() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let (q, _) = Queues::open(&db).unwrap();
        // Handed to a recipient that reads it before its publisher writes it.
        q.stage(5, 2, Arc::new(queued(Vec::new())));
        assert_eq!(q.message(5).unwrap(), Some(queued(Vec::new())));
        publish(&q, 5, &[(1, 0)]);
        assert_eq!(q.message(5).unwrap(), Some(queued(Vec::new())));
        // Never written (no recipient took it): nothing to read.
        q.stage(6, 2, Arc::new(queued(Vec::new())));
        q.unstage(6);
        assert_eq!(q.message(6).unwrap(), None);
    }

    #[test]
    fn an_orphaned_queue_releases_its_messages_and_leaves_no_mark() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        {
            let (q, _) = Queues::open(&db).unwrap();
            for store_id in [1, 2] {
                q.mark(store_id, Mark::default()).unwrap();
            }
            publish(&q, 10, &[(1, 0)]);
            publish(&q, 11, &[(1, 1), (2, 0)]);
            q.sent(1, 11, Some(Sent::Completed)).unwrap();
        }
        let (q, found) = Queues::open(&db).unwrap();
        // Session 1 has no record any more; session 2 does.
        assert_eq!(q.drop_orphan(1, &found.queues[&1]).unwrap(), 2);
        assert_eq!(q.message(10).unwrap(), None);
        assert!(q.message(11).unwrap().is_some(), "session 2 still holds it");
        drop(q);
        let (_, found) = Queues::open(&db).unwrap();
        assert!(!found.queues.contains_key(&1));
        assert_eq!(found.queues[&2].owed.len(), 1);
    }
}
