//! Clients of the secure MQTT news stack: a publisher that sends articles to
//! `articulos/<newspaper>/<section>` and a subscriber that follows `articulos/+/futbol`,
//! both over mutual TLS (rustls + ring) with rumqttc.
//!
//! Both run as library functions so tests can drive them in-process:
//!
//! ```no_run
//! # async fn demo() -> Result<(), clients::ClientError> {
//! use clients::*;
//! use tokio::sync::{mpsc, oneshot};
//!
//! let conn = |id: &str, who: &str| {
//!     ConnectionOptions::new("localhost", 8883, "certs/ca.crt",
//!         format!("certs/{who}.crt"), format!("certs/{who}.key"), id)
//! };
//! // Subscriber: messages to a channel, progress events to another, stop with a oneshot.
//! let (msg_tx, mut messages) = mpsc::unbounded_channel();
//! let (ev_tx, mut events) = mpsc::unbounded_channel();
//! let (stop, stopped) = oneshot::channel::<()>();
//! let mut sub = SubscriberOptions::new(conn("test-sub", "subscriber"));
//! sub.events = Some(ev_tx);
//! let sub = tokio::spawn(run_subscriber(
//!     sub,
//!     move |r: Received| { let _ = msg_tx.send(r); },
//!     async { let _ = stopped.await; },
//! ));
//! while let Some(ev) = events.recv().await {
//!     if matches!(ev, ClientEvent::Subscribed { .. }) { break; }
//! }
//! // Publisher: three football articles, then it returns.
//! let mut publ = PublisherOptions::new(conn("test-pub", "publisher"));
//! publ.count = Some(3);
//! publ.interval = std::time::Duration::from_millis(10);
//! let report = run_publisher(publ, std::future::pending()).await?;
//! assert_eq!(report.acknowledged, 3);
//! let mut got = 0;
//! while got < 3 {
//!     if let Some(r) = messages.recv().await { if !r.duplicate { got += 1; } }
//! }
//! let _ = stop.send(());
//! let _ = sub.await;
//! # Ok(()) }
//! ```

pub mod archive;
pub mod article;
pub mod backoff;
pub mod catalogue;
pub mod cli;
pub mod connection;
pub mod dedupe;
pub mod error;
pub mod payload;
pub mod publisher;
pub mod source;
pub mod subscriber;
pub mod tls;
pub mod topic;

pub use archive::{ArchiveOptions, ArchiveUrl, Store};
pub use article::Article;
pub use backoff::{Backoff, BackoffPolicy};
pub use connection::{default_publisher_id, default_subscriber_id, ClientEvent, ConnectionOptions};
pub use error::ClientError;
pub use payload::Payload;
pub use publisher::{run_publisher, PublisherOptions, PublisherReport};
pub use source::{ArticleError, ArticleSource};
pub use subscriber::{run_subscriber, stdout_sink, Received, SubscriberOptions, SubscriberReport};
pub use tls::TlsError;
