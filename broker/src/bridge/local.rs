//! The bridge's side inside this broker: a persistent session of its own, keyed by
//! (`local_identity`, `$bridge/<name>`), reached through an in-memory pipe instead of
//! a socket. Everything a client session does (durable queue, QoS state, ACL, flow
//! control) it does for the bridge, unchanged.

use super::peer::Peer;
use super::wire::{FromServer, Welcome};
use crate::config::BridgeConfig;
use crate::ids::SessionKey;
use crate::protocol::{ConnectInfo, Framed, SessionExpiry, Version};
use crate::session;
use crate::shared::registry::{Client, SessionLimits};
use crate::shared::Shared;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{DuplexStream, ReadHalf};
use tokio::sync::Semaphore;
use tokio::time::timeout;

/// Bytes the in-memory pipe holds each way before a writer waits.
const PIPE: usize = 256 << 10;
/// The local session answers CONNECT within this (it may be busy at start).
const CONNACK_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) type Local = Peer<ReadHalf<DuplexStream>>;

/// The local session's key.
pub(super) fn key(config: &BridgeConfig) -> SessionKey {
    SessionKey {
        identity: config.local_identity(),
        client_id: config.local_client_id(),
    }
}

/// The queue limits of a bridge's local session, from its section.
pub(crate) fn limits(config: &BridgeConfig) -> SessionLimits {
    SessionLimits {
        max_inflight: config.max_inflight,
        max_queued: config.max_queued,
        max_queued_bytes: config.max_queued_bytes,
    }
}

/// Connects to the local session: `keep` true resumes it (created persistent if new),
/// false ends it (Clean Start, expiring with the connection). `receive_maximum` and
/// `max_packet_size` are what the upstream accepts, so the session never sends more.
pub(super) async fn attach(
    shared: &Arc<Shared>,
    key: SessionKey,
    limits: Option<SessionLimits>,
    keep: bool,
    receive_maximum: u16,
    max_packet_size: Option<u32>,
) -> Result<(Local, Welcome), String> {
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let (their_reader, their_writer) = tokio::io::split(theirs);
    let max_in = shared.config.listener.max_packet_size;
    let mut framed = Framed::new(
        Box::new(their_reader) as crate::shared::registry::Reader,
        their_writer,
        max_in,
    );
    framed.version = Version::V5;
    let info = ConnectInfo {
        version: Version::V5,
        client_id: key.client_id.clone(),
        clean_start: !keep,
        keep_alive: 0,
        will: None,
        session_expiry: if keep {
            SessionExpiry::Never
        } else {
            SessionExpiry::OnClose
        },
        receive_maximum: receive_maximum.max(1),
        max_packet_size,
        topic_alias_max: 0,
        request_response_info: false,
    };
    // Bridges are not counted against `max_connections`.
    let permit = Arc::new(Semaphore::new(1))
        .try_acquire_owned()
        .map_err(|e| e.to_string())?;
    let client = Box::new(Client {
        framed,
        info,
        identity: key.identity.clone(),
        serial: Vec::new(),
        addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        assigned_id: false,
        permit,
        limits,
    });
    session::hand_over(shared, key, client);
    let (reader, writer) = tokio::io::split(ours);
    let mut local = Peer::new(reader, writer, Version::V5, max_in);
    match timeout(CONNACK_TIMEOUT, local.read()).await {
        Err(_) => Err("the local session did not answer CONNECT".into()),
        Ok(Err(e)) => Err(format!("the local session closed: {e}")),
        Ok(Ok(FromServer::ConnAck(welcome))) => match &welcome.refused {
            Some(why) => Err(format!("the local session refused CONNECT: {why}")),
            None => Ok((local, welcome)),
        },
        Ok(Ok(other)) => Err(format!(
            "{other:?} instead of CONNACK from the local session"
        )),
    }
}

/// Ends a bridge's local session and deletes what it queued (the bridge is gone).
pub(super) async fn discard(shared: &Arc<Shared>, key: SessionKey) -> Result<(), String> {
    let (mut local, _) = attach(shared, key, None, false, 1, None).await?;
    local
        .queue(super::wire::ToServer::Disconnect)
        .map_err(|e| e.to_string())?;
    local.close();
    Ok(())
}
