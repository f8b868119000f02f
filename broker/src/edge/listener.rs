//! The listener: accepts sockets under the connection limit, gives each its own task,
//! and on shutdown closes every session and waits for them.

use super::connection::{self, log_refusal};
use crate::security::refusal::Refusal;
use crate::shared::Shared;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// How long shutdown waits for sessions to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// Accepts until `stopped` changes, then shuts the sessions down and flushes the store.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let max = shared.config.listener.max_connections;
    let permits = shared.permits.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.changed() => break,
        };
        let (tcp, addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Usually out of file descriptors: wait instead of spinning.
                error!(error = %e, "accept failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(connection::handle(tcp, addr, permit, shared.clone()));
            }
            Err(_) => {
                log_refusal(
                    &shared.metrics,
                    addr,
                    None,
                    None,
                    &Refusal::TooManyConnections(max),
                );
                drop(tcp);
            }
        }
    }
    drop(listener);
    info!(
        sessions = shared.registry.len(),
        "shutting down: closing sessions"
    );
    shared.registry.shutdown_all();
    if tokio::time::timeout(SHUTDOWN_GRACE, shared.registry.wait_empty())
        .await
        .is_err()
    {
        warn!(
            left = shared.registry.len(),
            "some sessions did not close in time"
        );
    }
    if let Err(e) = shared.retained.close() {
        error!(error = %e, "final flush of the retained store failed");
    }
    info!("broker stopped");
}
