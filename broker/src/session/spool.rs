//! A persistent session's queue in the store: what the QoS engine releases is deleted,
//! what it wants from disk is read, what was in flight is recorded, and after a restart
//! the queue is taken up where it stood. A store that fails here closes the client's
//! connection: nothing that depends on the failed write is acknowledged.

use super::outgoing::{Owed, WasInflight};
use super::Session;
use crate::message::Envelope;
use crate::store::{QueueState, QueuedMessage, StoreError};
use std::time::SystemTime;
use tracing::{error, warn};

impl Session {
    /// The session is done with stored message `id`: delivered, expired or dropped.
    pub(super) fn release(&mut self, id: u64) {
        if let Err(e) = self.shared.store.release(self.store_id, id) {
            self.store_failed(&e);
        }
    }

    /// Stored message `id` went out with `pkid` (`released`: PUBREC came back).
    pub(super) fn record_sent(&mut self, id: u64, pkid: u16, released: bool) {
        if let Err(e) = self.shared.store.sent(self.store_id, id, pkid, released) {
            self.store_failed(&e);
        }
    }

    /// An inbound QoS 2 message was routed: recorded once the batch's messages are
    /// stored (`record_qos2_routed`), so that the record never stands for a message
    /// the store does not hold.
    pub(super) fn qos2_routed(&mut self, pkid: u16) {
        if self.expiry.is_persistent() && self.store_id != 0 {
            self.qos2_routed.push(pkid);
        }
    }

    /// Writes the QoS 2 records of this batch's routed messages; PUBREC waits for
    /// them (a resent PUBLISH must be recognised after a restart).
    pub(super) fn record_qos2_routed(&mut self) {
        for pkid in std::mem::take(&mut self.qos2_routed) {
            if let Err(e) = self.shared.store.qos2(self.store_id, pkid, true) {
                self.store_failed(&e);
            }
            self.needs_sync = true;
        }
    }

    /// PUBREL released an inbound QoS 2 message.
    pub(super) fn qos2_released(&mut self, pkid: u16) {
        if self.store_id == 0 {
            return;
        }
        if let Err(e) = self.shared.store.qos2(self.store_id, pkid, false) {
            self.store_failed(&e);
        }
    }

    /// Reads from the store what the engine wants of the queue waiting on disk.
    pub(super) fn read_from_disk(&mut self) {
        while let Some(wanted) = self.outgoing.wants_from_disk() {
            let outgoing = &self.outgoing;
            let read = self
                .shared
                .store
                .read_queue(self.store_id, |id| outgoing.holds(id), wanted);
            let (read, end) = match read {
                Ok(read) => read,
                Err(e) => {
                    self.store_failed(&e);
                    return;
                }
            };
            let got_any = !read.is_empty();
            let now = SystemTime::now();
            let mut owed = Vec::with_capacity(read.len());
            for (id, queued) in read {
                match self.owed_from_store(id, queued) {
                    Some(o) => owed.push((o, now)),
                    None => self.release(id),
                }
            }
            self.outgoing.loaded(owed, end);
            if end || !got_any {
                return;
            }
        }
    }

    /// A message read from the store as this session delivers it, or None (and the
    /// engine told) when it no longer does.
    fn owed_from_store(&mut self, id: u64, queued: QueuedMessage) -> Option<Owed> {
        let QueuedMessage {
            mut message,
            origin,
            received_at,
        } = queued;
        let size = (message.topic.len() + message.payload.len()) as u64;
        let envelope = Envelope {
            qos: message.qos,
            retain: message.retain,
            origin,
            id,
            received_at,
            properties: message.properties.take(),
        };
        match self.prepare(message.topic, message.payload, envelope, false) {
            Some(message) => Some(Owed {
                id,
                stored: true,
                message,
            }),
            None => {
                self.outgoing.gone_from_disk(size);
                None
            }
        }
    }

    /// After a restart: what was in flight comes back, the rest waits on disk.
    pub(super) fn take_up_queue(&mut self, state: QueueState) {
        let mut inflight = Vec::new();
        let mut sent_bytes = 0;
        let mut sent = state.sent;
        sent.sort_unstable();
        for (id, pkid, released) in sent {
            let queued = match self.shared.store.queued_message(id) {
                Ok(Some(queued)) => queued,
                Ok(None) => continue,
                Err(e) => {
                    self.store_failed(&e);
                    continue;
                }
            };
            sent_bytes += (queued.message.topic.len() + queued.message.payload.len()) as u64;
            match self.owed_from_store(id, queued) {
                Some(owed) => inflight.push(WasInflight {
                    pkid,
                    released,
                    owed,
                }),
                None => self.release(id),
            }
        }
        let on_disk = state.count.saturating_sub(inflight.len());
        self.outgoing
            .restore(on_disk, state.bytes.saturating_sub(sent_bytes), inflight);
        self.qos2_in.extend(state.qos2);
    }

    /// Stores what the engine holds in memory only (retained messages on subscribe,
    /// records saved before durable queues), so that a persistent session stops with
    /// its whole queue in the store.
    pub(super) fn store_unstored(&mut self, messages: Vec<crate::message::Message>) {
        for message in messages {
            let id = self.shared.ids.next();
            let queued = QueuedMessage {
                message,
                origin: 0,
                received_at: crate::message::now_micros(),
            };
            if let Err(e) = self.shared.store.put_queued(id, &queued, &[self.store_id]) {
                error!(identity = %self.key.identity, client_id = %self.key.client_id,
                    error = %e, "queued message not saved");
            }
        }
    }

    /// Deletes everything the store keeps of this session's queue (it ended, or began
    /// again with Clean Start).
    pub(super) fn drop_stored_queue(&mut self) {
        if self.store_id == 0 {
            return;
        }
        match self.shared.store.drop_session_queue(self.store_id) {
            Ok(0) => {}
            Ok(n) => {
                self.shared.metrics.dropped.inc_by(n as u64);
                warn!(identity = %self.key.identity, client_id = %self.key.client_id,
                    dropped = n, "session ended: its stored queue was deleted");
            }
            Err(e) => error!(identity = %self.key.identity, client_id = %self.key.client_id,
                error = %e, "stored queue not deleted"),
        }
    }

    /// The store failed: logged once here with its path; the batch's acknowledgements
    /// are withheld by closing the connection at the next flush.
    fn store_failed(&mut self, e: &StoreError) {
        error!(identity = %self.key.identity, client_id = %self.key.client_id, error = %e,
            "store failed");
        self.store_broken = true;
    }
}
