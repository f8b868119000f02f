//! The names the broker gives things: a session's key, and process-unique numbers.

use std::sync::atomic::{AtomicU64, Ordering};

/// A session's owner and client id. Keyed by certificate identity as well, a client id
/// sent under another certificate never reaches the session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SessionKey {
    /// The CN of the client certificate.
    pub(crate) identity: String,
    pub(crate) client_id: String,
}

/// Process-unique numbers: session ids, message ids, assigned client ids.
pub(crate) struct Ids(AtomicU64);

impl Default for Ids {
    fn default() -> Self {
        // 0 stands for "the broker itself" as a message origin ($SYS).
        Self(AtomicU64::new(1))
    }
}

impl Ids {
    /// Ids above `highest`: those the store holds from before a restart stay unique.
    pub(crate) fn above(highest: u64) -> Self {
        Self(AtomicU64::new(highest.saturating_add(1)))
    }

    pub(crate) fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}
