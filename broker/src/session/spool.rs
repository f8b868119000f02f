//! A persistent session's queue in the store: what the QoS engine is done with is
//! released, what waits on disk is read when memory has room, QoS 2 messages in flight
//! are recorded, the queue's mark is written at the end of each batch, and after a
//! restart the queue is taken up where it stood. A store that fails here closes the
//! client's connection at the next flush: nothing that depends on it is acknowledged.

use super::outgoing::{Owed, WasInflight};
use super::Session;
use crate::message::{now_micros, Envelope, Message};
use crate::store::{Mark, QueueState, QueuedMessage, Sent, Spilled, StoreError};
use std::collections::HashMap;
use std::time::SystemTime;
use tracing::{debug, error, warn};

/// After a restart, a session's sequence numbers go on this far above its last mark:
/// numbers handed out after the mark was written are never reused.
const SEQ_GAP: u64 = 1 << 32;

/// Where a restored session's sequence numbers start.
pub(crate) fn restart_seq(queue: &QueueState) -> u64 {
    let owed = queue.owed.last().map_or(0, |s| s.seq + 1);
    queue.mark.next.saturating_add(SEQ_GAP).max(owed)
}

impl Session {
    /// One holder of stored message `id` (this session) is done with it.
    pub(super) fn release(&mut self, id: u64) {
        if let Err(e) = self.shared.store.release(id) {
            self.store_failed(&e);
        }
    }

    /// What this session sends of stored QoS 2 message `id`; `None` forgets it.
    pub(super) fn record_qos2_out(&mut self, id: u64, state: Option<Sent>) {
        if let Err(e) = self.shared.store.sent(self.store_id, id, state) {
            self.store_failed(&e);
        }
    }

    /// PUBCOMP for stored QoS 2 message `id` (sequence number `seq`): until the mark
    /// is past it, a restart would find it owed, so the store says it is complete.
    pub(super) fn qos2_completed(&mut self, seq: u64, id: u64) {
        self.record_qos2_out(id, Some(Sent::Completed));
        self.completed.push((seq, id));
    }

    /// An inbound QoS 2 message was routed: recorded once the batch's messages are
    /// stored (`record_qos2_routed`), so that the record never stands for a message
    /// the store does not hold.
    pub(super) fn qos2_routed(&mut self, pkid: u16) {
        if self.expiry.is_persistent() && self.store_id != 0 {
            self.qos2_routed.push(pkid);
        }
    }

    /// Queues the QoS 2 records of this batch's routed messages for the group commit,
    /// which writes them after the messages; PUBREC waits for it (a resent PUBLISH
    /// must be recognised after a restart).
    pub(super) fn record_qos2_routed(&mut self) {
        for pkid in std::mem::take(&mut self.qos2_routed) {
            self.shared.store.queue_qos2_routed(self.store_id, pkid);
            self.needs_sync = true;
        }
    }

    /// PUBREL released an inbound QoS 2 message.
    pub(super) fn qos2_released(&mut self, pkid: u16) {
        if self.store_id == 0 {
            return;
        }
        if let Err(e) = self.shared.store.qos2_released(self.store_id, pkid) {
            self.store_failed(&e);
        }
        // Durable before the PUBCOMP, which frees the packet id for a new message: a
        // restart must not take that one for a repeat and drop it.
        self.needs_sync = true;
    }

    /// Writes how far the queue has come, when that changed (not waited for: after a
    /// crash, what was finished since is delivered again). `stored_from`: the first
    /// sequence number of messages stored by the session itself, which the engine
    /// does not hold.
    pub(super) fn write_mark(&mut self, stored_from: Option<u64>) {
        if self.store_id == 0 || !self.expiry.is_persistent() {
            return;
        }
        let mut mark = Mark {
            low: self.outgoing.low(),
            next: self.outgoing.next_seq(),
            sent_below: self.outgoing.sent_below(),
        };
        if let Some(first) = stored_from {
            mark.low = mark.low.min(first);
            mark.next = mark.next.max(self.outbox.peek_seq());
        }
        if mark != self.mark {
            if let Err(e) = self.shared.store.mark(self.store_id, mark) {
                return self.store_failed(&e);
            }
            self.mark = mark;
        }
        if self.completed.is_empty() {
            return;
        }
        // Forgotten after the mark was written: whatever a crash keeps of the two, a
        // completed message is never owed again.
        let low = self.mark.low;
        let (past, waiting) = std::mem::take(&mut self.completed)
            .into_iter()
            .partition(|(seq, _)| *seq < low);
        self.completed = waiting;
        for (_, id) in past {
            self.record_qos2_out(id, None);
        }
    }

    /// Reads from the store the messages the engine wants into memory.
    pub(super) fn read_from_disk(&mut self) {
        loop {
            let wanted = self.outgoing.take_to_load();
            if wanted.is_empty() {
                return;
            }
            let now = SystemTime::now();
            let mut rest = wanted.into_iter();
            while let Some(spilled) = rest.next() {
                match self.shared.store.queued_message(spilled.id) {
                    Ok(Some(queued)) => match self.owed_from_store(spilled, queued) {
                        Some(owed) => self.outgoing.loaded(owed, now),
                        None => self.release(spilled.id),
                    },
                    // Gone: finished (delivered, expired, dropped) just before a crash
                    // that kept its index entry and lost the mark past it, or never
                    // written by a publisher that could not store it (and so did not
                    // acknowledge it, logged there). Nothing to deliver either way.
                    Ok(None) => {
                        debug!(identity = %self.key.identity, client_id = %self.key.client_id,
                            message = spilled.id, "queued message no longer in the store: skipped");
                    }
                    Err(e) => {
                        self.store_failed(&e);
                        let mut back = vec![spilled];
                        back.extend(rest);
                        self.outgoing.unloaded(back);
                        return;
                    }
                }
            }
        }
    }

    /// A message read from the store as this session delivers it; None when it no
    /// longer does (no subscription matches, or it expired).
    fn owed_from_store(&mut self, spilled: Spilled, queued: QueuedMessage) -> Option<Owed> {
        let QueuedMessage {
            mut message,
            origin,
            received_at,
            ..
        } = queued;
        let envelope = Envelope {
            qos: message.qos,
            retain: message.retain,
            origin,
            id: spilled.id,
            received_at,
            properties: message.properties.take(),
        };
        let message = self.prepare(message.topic, message.payload, envelope, false)?;
        Some(Owed {
            id: spilled.id,
            seq: Some(spilled.seq),
            message,
        })
    }

    /// After a restart: QoS 2 messages in flight come back as they were, those
    /// completed or expired in flight are finished with, the rest waits on disk.
    pub(super) fn take_up_queue(&mut self, mut state: QueueState) {
        self.mark = state.mark;
        let next = restart_seq(&state);
        let mut sent: HashMap<u64, Sent> = std::mem::take(&mut state.sent).into_iter().collect();
        let mut inflight = Vec::new();
        // Only messages with a `sent` record are taken out; the rest stay in place (a
        // restored queue may hold millions).
        let mut waiting = std::mem::take(&mut state.owed);
        let mut was_sent = Vec::new();
        if !sent.is_empty() {
            waiting.retain(|s| match sent.remove(&s.id) {
                Some(was) => {
                    was_sent.push((*s, was));
                    false
                }
                None => true,
            });
        }
        let mut back = Vec::new();
        for (spilled, was) in was_sent {
            let Sent::InFlight { pkid, released } = was else {
                self.finished_in_flight(spilled);
                continue;
            };
            match self.shared.store.queued_message(spilled.id) {
                Ok(Some(queued)) => match self.owed_from_store(spilled, queued) {
                    Some(owed) => inflight.push(WasInflight {
                        pkid,
                        released,
                        owed,
                    }),
                    // Expired in flight, or no subscription matches any more.
                    None => self.finished_in_flight(spilled),
                },
                Ok(None) => self.finished_in_flight(spilled),
                Err(e) => {
                    self.store_failed(&e);
                    back.push(spilled);
                }
            }
        }
        if !back.is_empty() {
            waiting.extend(back);
            waiting.sort_unstable_by_key(|s| s.seq);
        }
        // The mark is past these, or their messages are gone: nothing owed.
        for id in sent.into_keys() {
            self.record_qos2_out(id, None);
        }
        inflight.sort_unstable_by_key(|w| w.owed.seq);
        self.outgoing
            .restore(waiting, inflight, next, state.mark.sent_below);
        self.qos2_in.extend(state.qos2);
    }

    /// A QoS 2 message found in flight at a restart that is not sent again: released,
    /// and recorded as complete until the mark is past it.
    fn finished_in_flight(&mut self, spilled: Spilled) {
        self.release(spilled.id);
        self.qos2_completed(spilled.seq, spilled.id);
    }

    /// Stores what the engine holds in memory only (retained messages on subscribe,
    /// queues saved before durable queues), so that a persistent session stops with
    /// its whole queue in the store.
    pub(super) fn store_unstored(&mut self, messages: Vec<Message>) {
        for message in messages {
            let id = self.shared.ids.next();
            let seq = self.outbox.take_seq();
            let queued = QueuedMessage {
                message,
                origin: 0,
                received_at: now_micros(),
                recipients: Vec::new(),
            };
            let recipient = [(self.store_id, seq)];
            if let Err(e) = self.shared.store.queue_message(id, &queued, &recipient) {
                error!(identity = %self.key.identity, client_id = %self.key.client_id,
                    error = %e, "queued message not saved");
            }
        }
    }

    /// Releases everything the store keeps for this session (it ended, or began again
    /// with Clean Start); returns how many messages that was.
    pub(super) fn drop_stored_queue(&mut self) -> usize {
        let ids = self.outgoing.take_stored();
        for id in &ids {
            self.release(*id);
        }
        if self.store_id != 0 {
            if let Err(e) = self.shared.store.drop_session_queue(self.store_id) {
                error!(identity = %self.key.identity, client_id = %self.key.client_id,
                    error = %e, "stored queue not deleted");
            }
            self.mark = Mark::default();
        }
        if !ids.is_empty() {
            warn!(identity = %self.key.identity, client_id = %self.key.client_id,
                dropped = ids.len(), "session ended: its stored queue was deleted");
        }
        ids.len()
    }

    /// The store failed: logged here with its path; the batch's acknowledgements are
    /// withheld by closing the connection at the next flush.
    fn store_failed(&mut self, e: &StoreError) {
        error!(identity = %self.key.identity, client_id = %self.key.client_id, error = %e,
            "store failed");
        self.store_broken = true;
    }
}
