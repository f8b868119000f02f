//! What the broker reports: Prometheus metrics (per-bridge series in `bridges`) and
//! operator logs.

pub(crate) mod bridges;
pub mod logging;
pub(crate) mod metrics;
