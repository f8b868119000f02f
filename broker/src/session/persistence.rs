//! What of a persistent session the store keeps: its subscriptions and expiry when
//! they change, what it owes its client at shutdown; and the restore after a restart.

use super::subscriptions::{Place, Subscription};
use super::Session;
use crate::protocol::SessionExpiry;
use crate::routing::fanout::{self, Inbox, Outbox};
use crate::shared::Shared;
use crate::store::{SavedSubscription, SessionRecord};
use std::time::SystemTime;
use tokio::time::Instant;
use tracing::error;

/// A saved session's plain subscriptions, placed in the index before the listener opens
/// so that nothing published after a restart misses them; the inbox they feed, for
/// `Start::Restored`.
pub(crate) fn restored(shared: &Shared, id: u64, record: &SessionRecord) -> (Outbox, Inbox) {
    let (outbox, inbox) = fanout::inbox(shared.config.session.inbox);
    for s in &record.subscriptions {
        if Place::of(&s.filter) == Place::Index {
            shared.fanout.subscribe(&s.filter, id, outbox.clone());
        }
    }
    (outbox, inbox)
}

impl Session {
    /// Restores a saved session: subscriptions back in place, queue refilled.
    pub(super) async fn restore(&mut self, record: SessionRecord) {
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
        self.outgoing.restore(record.queued, SystemTime::now());
        self.expiry = SessionExpiry::from_secs(record.expiry_secs);
        // A record that is not persistent (never written so) expires at once.
        self.expires_at = match self.expiry {
            SessionExpiry::Never => None,
            other => Some(Instant::now() + other.limit().unwrap_or_default()),
        };
        // A failure is logged where it happens; the session carries on without the
        // router, as it did before the restart would have.
        let _ = self.flush_router().await;
    }

    /// Saves a persistent session's state, or removes a session that is no longer
    /// persistent; `with_queue` at the end, when nothing more will arrive.
    pub(super) fn save(&self, with_queue: bool) {
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
                queued: if with_queue {
                    self.outgoing.owed(SystemTime::now())
                } else {
                    Vec::new()
                },
            };
            self.shared.store.put_session(key, &record)
        };
        if let Err(e) = result {
            error!(identity = %self.key.identity, client_id = %self.key.client_id, error = %e,
                "session state not saved");
        }
    }
}
