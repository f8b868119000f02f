//! What the broker reports: Prometheus metrics and operator logs.

pub mod logging;
pub(crate) mod metrics;
