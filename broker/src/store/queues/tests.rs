//! The queues against a real sled store in a temporary directory; compiled under
//! `#[cfg(test)]` only (`mod tests` in queues.rs).

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
    let message = Arc::new(queued(Vec::new()));
    q.stage(id, to.len() as u32 + 1, message.clone());
    q.queue(id, &message, to).unwrap();
    q.release(id).unwrap();
    q.write_pending().unwrap();
}

fn open(dir: &tempfile::TempDir) -> sled::Db {
    sled::Config::new().path(dir.path()).open().unwrap()
}

#[test]
fn a_message_goes_when_its_last_holder_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir);
    let (q, _) = Queues::open(&db).unwrap();
    for store_id in [1, 2] {
        q.mark(store_id, Mark::default()).unwrap();
    }
    // Two recipients, and the publisher until it wrote it.
    let message = Arc::new(queued(Vec::new()));
    q.stage(7, 3, message.clone());
    q.release(7).unwrap();
    assert!(q.message(7).unwrap().is_some(), "staged");
    q.queue(7, &message, &[(1, 0), (2, 0)]).unwrap();
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
        // No mark: a session whose queue was deleted.
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
    // Message 10 is older than any owed: collected; 13 is newer, left for later.
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
    assert!(!found.queues.contains_key(&3));
    assert!(q.message(10).unwrap().is_none() && q.message(13).unwrap().is_some());
    // Records needed: 11 and 12 (10's entries are past the mark, 13's owed to
    // nobody).
    assert_eq!(q.batches().len(), 2);
    assert_eq!(q.index.len(), 2);
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
fn index_records_go_once_every_recipient_is_past_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir);
    let (q, _) = Queues::open(&db).unwrap();
    for store_id in [1, 2] {
        q.mark(store_id, Mark::default()).unwrap();
    }
    let entry = |seq, id| Spilled { seq, id, size: 1 };
    // One publisher's batch to both sessions, then one to session 1 alone.
    q.index(&[
        (1, vec![entry(0, 10), entry(1, 11)]),
        (2, vec![entry(0, 10)]),
    ])
    .unwrap();
    q.index(&[(1, vec![entry(2, 12)])]).unwrap();
    let mark = |low| Mark {
        low,
        next: low,
        sent_below: low,
    };
    q.mark(1, mark(3)).unwrap();
    assert_eq!(q.index.len(), 1, "session 2 still needs the first");
    q.mark(2, mark(1)).unwrap();
    assert_eq!(q.index.len(), 0);
    // Finished before its publisher wrote it: deleted at once.
    q.index(&[(1, vec![entry(2, 13)])]).unwrap();
    assert_eq!(q.index.len(), 0);
    // A session whose queue is deleted lets go of what only it needed.
    q.index(&[(1, vec![entry(3, 14)]), (2, vec![entry(1, 14)])])
        .unwrap();
    q.drop_session(1).unwrap();
    assert_eq!(q.index.len(), 1);
    q.drop_session(2).unwrap();
    assert_eq!(q.index.len(), 0);
}

#[test]
fn a_store_written_before_the_index_is_indexed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open(&dir);
        let messages = db.open_tree("messages").unwrap();
        let marks = db.open_tree("marks").unwrap();
        for store_id in [1u64, 2] {
            marks
                .insert(store_id.to_be_bytes(), &Mark::default().encode())
                .unwrap();
        }
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
