//! A secure MQTT broker behind our own mutual-TLS edge, with rumqttd's router for
//! shared subscriptions.
//!
//! `server` accepts sockets; `connection` does the TLS handshake and reads CONNECT;
//! `session` owns a client's state; `fanout` hands published messages from session to
//! session; `router` wraps rumqttd. See docs/ARCHITECTURE.md.

pub mod acl;
pub mod codec;
pub mod config;
pub mod connection;
pub mod fanout;
pub mod logging;
pub mod metrics;
pub mod pki;
pub mod refusal;
pub mod registry;
pub mod reload;
pub mod retained;
pub mod router;
pub mod server;
pub mod session;
pub mod store;
pub mod sys;
pub mod tls;
pub mod topic;

pub use config::Config;
pub use reload::Reloader;
pub use server::{start, Handle, StartError};
