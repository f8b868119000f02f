//! What runs beside the sessions for operators: reloading the ACL and TLS material,
//! certificate expiry warnings and renewal, `$SYS` values, the `/metrics` endpoint and
//! the gauges it reads.

pub(crate) mod certificates;
pub(crate) mod endpoint;
pub(crate) mod gauges;
pub(crate) mod reload;
pub(crate) mod sys;
