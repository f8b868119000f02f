//! Persistent sessions' queues in the store, written once per message rather than once
//! per delivery:
//!
//! - `messages`: a QoS 1/2 message owed to persistent sessions, by message id, with
//!   its recipients: each session's store id and the sequence number the message has
//!   in that session's queue;
//! - `marks`: per session, the sequence number below which it has everything
//!   (delivered, expired or dropped), written lazily: after a crash a session gets
//!   again what it finished after its last mark (QoS 1 may repeat, never go missing);
//! - `sent`: QoS 2 messages in flight to a session (packet id, PUBREC received), so
//!   that a restart resends them under the same packet id, and those completed that
//!   the session's mark is not yet past, so that a restart does not send them again:
//!   exactly once;
//! - `qos2`: inbound QoS 2 packet ids a session has routed and not yet released.
//!
//! A message leaves the store when its last recipient releases it: a count in memory
//! (only for messages with two or more recipients left), rebuilt from the records at
//! start. Writes are not durable by themselves: a session that depends on them waits
//! for the store's group commit (`Store::sync`).
//!
//! A publisher hands a message to its recipients before it writes the record (the
//! record lists the sequence numbers they gave it); until then the message is
//! *staged* here in memory, so that a recipient reading it from the store at once
//! finds it. A message that is neither staged nor written is gone for good.

use super::records::{
    decode_queued, decode_recipients, decode_sent, encode_queued, encode_sent, entry_key,
    split_entry_key, QueuedMessage, Sent,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Mutex;

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

/// A message waiting in a session's queue, as the store knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spilled {
    pub(crate) seq: u64,
    pub(crate) id: u64,
    /// Topic and payload bytes.
    pub(crate) size: u64,
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
    /// Messages handed to their recipients and not yet written, by id.
    staged: HashMap<u64, QueuedMessage>,
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
        let queues = Self {
            messages: db.open_tree("messages")?,
            marks: db.open_tree("marks")?,
            sent: db.open_tree("sent")?,
            qos2: db.open_tree("qos2")?,
            held: Mutex::new(Held::default()),
        };
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
        let mut dead = Vec::new();
        {
            let mut held = queues.lock();
            for item in queues.messages.iter() {
                let (key, value) = item?;
                let (Ok(id), Some((recipients, size))) = (
                    <[u8; 8]>::try_from(key.as_ref()).map(u64::from_be_bytes),
                    decode_recipients(&value),
                ) else {
                    found.unreadable += 1;
                    continue;
                };
                found.max_id = found.max_id.max(id);
                let mut owed = 0;
                for (store_id, seq) in recipients {
                    if let Some(q) = found.queues.get_mut(&store_id) {
                        if seq >= q.mark.low {
                            q.owed.push(Spilled { seq, id, size });
                            owed += 1;
                        }
                    }
                }
                match owed {
                    0 => dead.push(key),
                    1 => {}
                    n => {
                        held.holders.insert(id, n);
                    }
                }
            }
        }
        found.collected = dead.len();
        for key in dead {
            queues.messages.remove(key)?;
        }
        for q in found.queues.values_mut() {
            q.owed.sort_unstable_by_key(|s| s.seq);
        }
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // A panic while holding the lock leaves consistent counts behind.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Message `id` is about to go to `holders` holders (its recipients, and its
    /// publisher until the record is written): staged until `put` or `unstage`.
    pub(super) fn stage(&self, id: u64, holders: u32, message: QueuedMessage) {
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

    /// Writes message `id` with its recipients; it is no longer staged.
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
            return Ok(Some(staged.clone()));
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
    /// mark, its in-flight and QoS 2 records.
    pub(super) fn drop_session(&self, store_id: u64) -> sled::Result<()> {
        let prefix = store_id.to_be_bytes();
        self.marks.remove(prefix)?;
        for tree in [&self.sent, &self.qos2] {
            let keys: Vec<sled::IVec> = tree
                .scan_prefix(prefix)
                .keys()
                .filter_map(Result::ok)
                .collect();
            for key in keys {
                tree.remove(key)?;
            }
        }
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

    #[test]
    fn a_message_goes_when_its_last_holder_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let (q, _) = Queues::open(&db).unwrap();
        q.stage(7, 3, queued(Vec::new()));
        q.put(7, &queued(vec![(1, 0), (2, 0)])).unwrap();
        q.release(7).unwrap();
        q.release(7).unwrap();
        assert!(q.message(7).unwrap().is_some(), "one holder left");
        q.release(7).unwrap();
        assert!(q.message(7).unwrap().is_none());
        // One holder: no count, its release deletes.
        q.put(8, &queued(vec![(1, 1)])).unwrap();
        q.release(8).unwrap();
        assert!(q.message(8).unwrap().is_none());
    }

    #[test]
    fn reopening_finds_what_each_session_is_still_owed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let (q, _) = Queues::open(&db).unwrap();
            q.mark(
                1,
                Mark {
                    low: 5,
                    next: 9,
                    sent_below: 6,
                },
            )
            .unwrap();
            q.mark(
                2,
                Mark {
                    low: 0,
                    next: 1,
                    sent_below: 0,
                },
            )
            .unwrap();
            // Session 1 finished seq 4; 5 and 6 are owed. Session 2 is owed seq 0.
            q.put(10, &queued(vec![(1, 4)])).unwrap();
            q.put(11, &queued(vec![(1, 6), (2, 0)])).unwrap();
            q.put(12, &queued(vec![(1, 5)])).unwrap();
            // No mark: a session that is gone.
            q.put(13, &queued(vec![(3, 0)])).unwrap();
            let released = Sent::InFlight {
                pkid: 42,
                released: true,
            };
            q.sent(1, 11, Some(released)).unwrap();
            q.sent(1, 12, Some(Sent::Completed)).unwrap();
            q.qos2(2, 9, true).unwrap();
            db.flush().unwrap();
        }
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let (q, found) = Queues::open(&db).unwrap();
        assert_eq!((found.max_id, found.collected), (13, 2));
        let one = &found.queues[&1];
        assert_eq!(
            one.mark,
            Mark {
                low: 5,
                next: 9,
                sent_below: 6
            }
        );
        let owed: Vec<(u64, u64)> = one.owed.iter().map(|s| (s.seq, s.id)).collect();
        assert_eq!(owed, [(5, 12), (6, 11)]);
        let released = Sent::InFlight {
            pkid: 42,
            released: true,
        };
        assert_eq!(one.sent, [(11, released), (12, Sent::Completed)]);
        assert_eq!(found.queues[&2].qos2, [9]);
        assert!(q.message(10).unwrap().is_none() && q.message(13).unwrap().is_none());
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
    fn a_staged_message_is_read_before_it_is_written_and_gone_once_unstaged() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let (q, _) = Queues::open(&db).unwrap();
        // Handed to a recipient that reads it before its publisher writes it.
        q.stage(5, 2, queued(Vec::new()));
        assert_eq!(q.message(5).unwrap(), Some(queued(Vec::new())));
        q.put(5, &queued(vec![(1, 0)])).unwrap();
        assert_eq!(q.message(5).unwrap(), Some(queued(vec![(1, 0)])));
        // Never written (no recipient took it): nothing to read.
        q.stage(6, 2, queued(Vec::new()));
        q.unstage(6);
        assert_eq!(q.message(6).unwrap(), None);
    }

    #[test]
    fn an_orphaned_queue_releases_its_messages_and_leaves_no_mark() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        {
            let (q, _) = Queues::open(&db).unwrap();
            for store_id in [1, 2] {
                q.mark(store_id, Mark::default()).unwrap();
            }
            q.put(10, &queued(vec![(1, 0)])).unwrap();
            q.put(11, &queued(vec![(1, 1), (2, 0)])).unwrap();
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
