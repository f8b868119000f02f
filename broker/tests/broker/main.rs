//! The broker tested through its network edge: real TLS, real sockets, 127.0.0.1:0;
//! its source layout (`layout`), and the deployment files beside it (`deploy`).

mod acl;
mod bridge_interop;
mod bridges;
mod common;
mod conformance;
mod deploy;
mod durability;
mod interop;
mod layout;
mod lifecycle;
mod limits;
mod messaging;
mod observability;
mod persistence;
mod powercut;
mod powerfs;
mod process;
mod recovery;
mod refusals;
mod upstream;
