//! Which records of the queue index are still needed, kept in memory (no IO): a
//! record holds what one publisher's batch queued for each of its recipient sessions,
//! and may be deleted once every one of those sessions has a mark past its entries
//! there, or has no mark any more (its queue was deleted).
//!
//! The store calls this after each write it depends on (`Queues`): a record is
//! deleted only after the marks that make it unneeded are written, so a crash that
//! keeps the deletion keeps the marks too (sled recovers a prefix).

use std::collections::{BTreeSet, HashMap};

/// The needed records of the queue index; see the module notes.
#[derive(Debug, Default)]
pub(super) struct Batches {
    /// Sessions with a mark, by store id.
    sessions: HashMap<u64, SessionBatches>,
    /// Record key -> sessions whose entries in it are not all finished.
    pending: HashMap<u64, u32>,
}

#[derive(Debug, Default)]
struct SessionBatches {
    /// The `low` of the session's last written mark.
    low: u64,
    /// The records with its entries not all finished, as (its highest sequence number
    /// there, record key): the first ones go as `low` passes them.
    batches: BTreeSet<(u64, u64)>,
}

impl Batches {
    /// Session `store_id` wrote a mark with `low`; returns the records nobody needs
    /// any more.
    pub(super) fn marked(&mut self, store_id: u64, low: u64) -> Vec<u64> {
        let session = self.sessions.entry(store_id).or_default();
        session.low = session.low.max(low);
        let mut finished = Vec::new();
        while let Some(&(last, key)) = session.batches.first() {
            if last >= session.low {
                break;
            }
            session.batches.pop_first();
            finished.push(key);
        }
        finished
            .into_iter()
            .filter(|key| self.finish(*key))
            .collect()
    }

    /// Record `key` was written with entries for these sessions, each given as (store
    /// id, its highest sequence number there); true when nobody needs it (every one
    /// of them is past it already, or has no mark).
    pub(super) fn written(
        &mut self,
        key: u64,
        groups: impl IntoIterator<Item = (u64, u64)>,
    ) -> bool {
        let mut needed = 0;
        for (store_id, last) in groups {
            if let Some(session) = self.sessions.get_mut(&store_id) {
                if last >= session.low && session.batches.insert((last, key)) {
                    needed += 1;
                }
            }
        }
        if needed == 0 {
            return true;
        }
        *self.pending.entry(key).or_default() += needed;
        false
    }

    /// Session `store_id`'s mark was deleted: its entries are owed to nobody. Returns
    /// the records nobody needs any more.
    pub(super) fn dropped(&mut self, store_id: u64) -> Vec<u64> {
        let Some(session) = self.sessions.remove(&store_id) else {
            return Vec::new();
        };
        session
            .batches
            .into_iter()
            .filter(|(_, key)| self.finish(*key))
            .map(|(_, key)| key)
            .collect()
    }

    /// One session is done with record `key`; true when it was the last.
    fn finish(&mut self, key: u64) -> bool {
        match self.pending.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.pending.remove(&key);
                true
            }
        }
    }

    /// Records still needed.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_goes_when_every_session_is_past_it() {
        let mut b = Batches::default();
        b.marked(1, 0);
        b.marked(2, 0);
        // Record 10: session 1's seqs up to 4, session 2's up to 7.
        assert!(!b.written(10, [(1, 4), (2, 7)]));
        assert!(!b.written(11, [(1, 6)]));
        assert_eq!(
            b.marked(1, 5),
            Vec::<u64>::new(),
            "session 2 still needs 10"
        );
        assert_eq!(b.marked(2, 8), [10]);
        assert_eq!(b.marked(1, 7), [11]);
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn a_record_nobody_needs_is_said_so_when_written() {
        let mut b = Batches::default();
        b.marked(1, 10);
        // Session 1 finished seq 9 before its publisher wrote the record; session 3
        // has no mark (its queue was deleted).
        assert!(b.written(20, [(1, 9), (3, 0)]));
        assert!(!b.written(21, [(1, 10)]));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn a_dropped_session_lets_go_of_its_records() {
        let mut b = Batches::default();
        b.marked(1, 0);
        b.marked(2, 0);
        b.written(30, [(1, 0), (2, 0)]);
        b.written(31, [(1, 1)]);
        assert_eq!(b.dropped(1), [31]);
        assert_eq!(b.marked(2, 1), [30]);
        // Entries for it after that are owed to nobody.
        assert!(b.written(32, [(1, 2)]));
        // A mark never goes back.
        b.marked(2, 0);
        assert!(b.written(33, [(2, 0)]));
    }
}
