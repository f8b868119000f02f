//! What the broker and the clients share: the MQTT rules for topic names and filters,
//! and the signal that stops a process.

pub mod signal;
pub mod topic;
