//! The signals that stop a process cleanly.

use std::future::Future;

/// Completes on Ctrl-C or SIGTERM. The handlers are installed when this is called,
/// not when the future is first polled: a process that says it is ready and then
/// starts waiting would otherwise die of a SIGTERM sent in between (the default
/// action) instead of stopping cleanly. A signal that cannot be listened for is
/// reported once and never completes, so the other one still works.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot listen for {name}: {e}");
                None
            }
        };
        let mut term = listen(SignalKind::terminate(), "SIGTERM");
        let mut int = listen(SignalKind::interrupt(), "Ctrl-C");
        async move {
            tokio::select! {
                () = wait(term.as_mut()) => {}
                () = wait(int.as_mut()) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::warn!("cannot listen for Ctrl-C: {e}");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The next delivery of a signal; never, for one that could not be listened for.
#[cfg(unix)]
async fn wait(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
