//! The gauges that are read rather than counted, brought up to date before each scrape
//! and each `$SYS` update.

use crate::security::tls;
use crate::shared::Shared;

pub(crate) fn refresh_gauges(shared: &Shared) {
    let m = &shared.metrics;
    let open = shared.config.listener.max_connections - shared.permits.available_permits();
    m.connections.set(open as i64);
    m.retained.set(shared.retained.len() as i64);
    m.storage_bytes.set(shared.store.size_on_disk() as i64);
    for (file, not_after) in &shared.policy.tls().expiry {
        if let Some(days) = tls::days_until(*not_after) {
            m.set_certificate_expiry(file, days);
        }
    }
}
