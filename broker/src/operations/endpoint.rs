//! The Prometheus endpoint: `/metrics` over HTTP (axum), serving whatever `render`
//! returns at each scrape.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// The endpoint's address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {cause}")]
pub struct EndpointError {
    addr: SocketAddr,
    cause: std::io::Error,
}

/// Serves `/metrics` on `addr` until `stopped` changes; returns the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    mut stopped: watch::Receiver<bool>,
) -> Result<SocketAddr, EndpointError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|cause| EndpointError { addr, cause })?;
    let bound = listener
        .local_addr()
        .map_err(|cause| EndpointError { addr, cause })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let stop = async move {
            let _ = stopped.changed().await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    tracing::info!(addr = %bound, "Prometheus metrics at /metrics");
    Ok(bound)
}
