//! A secure MQTT broker behind our own mutual-TLS edge, with rumqttd's router for
//! shared subscriptions. See docs/ARCHITECTURE.md for the layers and the tasks.
//!
//! The public API is what the `broker` binary, the one-process stack, the tests and
//! the benchmarks use: start a broker from a [`Config`], stop it through its
//! [`Handle`], reload it, and the development PKI, ACL and logging helpers.
#![warn(unreachable_pub)]

mod bridge;
mod config;
mod edge;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod ids;
mod message;
mod operations;
mod protocol;
mod routing;
mod security;
mod server;
mod session;
mod shared;
mod store;
mod telemetry;

pub use config::{
    AclRule, BridgeConfig, BridgeProtocol, BridgeTopic, Config, ConfigError, Direction,
    ListenerConfig, LogConfig, LogFormat, MetricsConfig, OnCorruption, QueueFull, SessionConfig,
    StorageConfig, SyncMode, TlsConfig,
};
pub use operations::endpoint::EndpointError;
pub use operations::health;
pub use operations::reload::Reloader;
pub use security::tls::TlsError;
pub use security::{acl, pki};
pub use server::{start, tune_allocator, Handle, StartError};
pub use store::StoreError;
pub use telemetry::logging;
