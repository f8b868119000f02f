//! What runs beside the sessions for operators: reloading the ACL and TLS material,
//! certificate expiry warnings and renewal, `$SYS` values, the `/metrics` endpoint and
//! the gauges it reads; and the healthcheck that asks a running broker's endpoint.

pub(crate) mod certificates;
pub(crate) mod endpoint;
pub(crate) mod gauges;
pub mod health;
pub(crate) mod reload;
pub(crate) mod sys;
