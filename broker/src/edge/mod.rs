//! The network edge: the listener (accept loop, connection limit, shutdown) and each
//! new connection up to an accepted CONNECT (TLS handshake, identity, admission).

pub(crate) mod connection;
pub(crate) mod listener;
