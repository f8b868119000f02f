//! The broker tested through its network edge: real TLS, real sockets, 127.0.0.1:0;
//! and its source layout (`layout`).

mod acl;
mod common;
mod conformance;
mod durability;
mod interop;
mod layout;
mod lifecycle;
mod messaging;
mod observability;
mod persistence;
mod process;
mod refusals;
