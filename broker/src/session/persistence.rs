//! What the store keeps of a persistent session besides its queue (`spool`): its
//! subscriptions, expiry, store id and delayed will, written whenever they change; and
//! the restore after a restart.

use super::outgoing::Owed;
use super::subscriptions::{Place, Subscription};
use super::Session;
use crate::message::Will;
use crate::protocol::SessionExpiry;
use crate::routing::fanout::{self, Inbox, Outbox};
use crate::shared::Shared;
use crate::store::{QueueState, SavedSubscription, SavedWill, SessionRecord};
use std::time::SystemTime;
use tokio::time::Instant;
use tracing::error;

/// A saved session's plain subscriptions, placed in the index before the listener opens
/// so that nothing published after a restart misses them (and is stored for it); the
/// inbox they feed, for `Start::Restored`.
pub(crate) fn restored(
    shared: &Shared,
    id: u64,
    record: &SessionRecord,
    queue: &QueueState,
) -> (Outbox, Inbox) {
    let (outbox, inbox) = fanout::inbox(shared.config.session.inbox);
    outbox.set_next_seq(super::spool::restart_seq(queue));
    outbox.set_store_id(record.store_id);
    for s in &record.subscriptions {
        if Place::of(&s.filter) == Place::Index {
            shared.fanout.subscribe(&s.filter, id, outbox.clone());
        }
    }
    (outbox, inbox)
}

impl Session {
    /// Restores a saved session: subscriptions back in place, its queue taken up where
    /// the store holds it, a delayed will rescheduled.
    pub(super) async fn restore(&mut self, record: SessionRecord, queue: QueueState) {
        for s in record.subscriptions {
            let place = Place::of(&s.filter);
            self.place(&s.filter, place);
            let sub = Subscription {
                qos: s.qos,
                no_local: s.no_local,
                retain_as_published: s.retain_as_published,
                id: s.id,
                place,
            };
            self.subs.insert(s.filter, sub);
        }
        self.store_id = record.store_id;
        self.expiry = SessionExpiry::from_secs(record.expiry_secs);
        // A record that is not persistent (never written so) expires at once.
        self.expires_at = match self.expiry {
            SessionExpiry::Never => None,
            other => Some(Instant::now() + other.limit().unwrap_or_default()),
        };
        self.take_up_queue(queue);
        // Saved before durable queues: held in memory, and stored when the session
        // stops.
        let now = SystemTime::now();
        for message in record.queued {
            let owed = Owed {
                id: self.shared.ids.next(),
                seq: None,
                message,
            };
            self.outgoing.admit(owed, now, true);
        }
        if let Some(will) = record.will {
            let left = will
                .due
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let will = Will {
                message: will.message,
                delay_secs: 0,
            };
            self.pending_will = Some((Instant::now() + left, will));
        }
        self.save();
        // A failure is logged where it happens; the session carries on without the
        // router, as it did before the restart would have.
        let _ = self.flush_router().await;
    }

    /// The session's expiry changed to `expiry`: a persistent session gets a store id,
    /// its publishers store its messages from now on, and the record follows.
    pub(super) fn became(&mut self, expiry: SessionExpiry) {
        if expiry.is_persistent() {
            if self.store_id == 0 {
                self.store_id = self.shared.ids.next();
                // Its first mark, before any publisher stores for it: the store's start
                // knows the session by its mark.
                self.mark.low = u64::MAX;
            }
            // Mark and record before any publisher stores for it.
            self.write_mark(None);
            self.save();
            self.outbox.set_store_id(self.store_id);
        } else {
            self.outbox.set_store_id(0);
            self.save();
        }
    }

    /// Saves a persistent session's record, or removes a session that is no longer
    /// persistent.
    pub(super) fn save(&self) {
        let key = &self.key;
        let result = if !self.expiry.is_persistent() {
            self.shared.store.remove_session(key)
        } else {
            let record = SessionRecord {
                expiry_secs: self.expiry.secs(),
                subscriptions: self
                    .subs
                    .iter()
                    .map(|(filter, s)| SavedSubscription {
                        filter: filter.clone(),
                        qos: s.qos,
                        no_local: s.no_local,
                        retain_as_published: s.retain_as_published,
                        id: s.id,
                    })
                    .collect(),
                // The queue is in the store itself, under `store_id`.
                queued: Vec::new(),
                store_id: self.store_id,
                will: self.pending_will.as_ref().map(|(at, will)| SavedWill {
                    message: will.message.clone(),
                    due: SystemTime::now() + at.saturating_duration_since(Instant::now()),
                }),
            };
            self.shared.store.put_session(key, &record)
        };
        if let Err(e) = result {
            error!(identity = %self.key.identity, client_id = %self.key.client_id, error = %e,
                "session state not saved");
        }
    }
}
