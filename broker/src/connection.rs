//! A new socket, up to the point it becomes a session's client: TLS handshake in its
//! own task under a timeout, identity from the certificate, CONNECT under a timeout.
//! Every refusal is logged once, at WARN, with the address and the reason.

use crate::codec::{ConnectCode, FirstPacket, Framed, Outbound, ReadError, Version};
use crate::metrics::Metrics;
use crate::refusal::Refusal;
use crate::registry::{Attached, SessionKey};
use crate::server::Shared;
use crate::session::{self, Client, TlsStream};
use crate::tls;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout;
use tracing::warn;

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// First byte of an MQTT CONNECT.
const MQTT_CONNECT: u8 = 0x10;

/// Logs a refusal once, at WARN, and counts it.
pub fn log_refusal(
    metrics: &Metrics,
    addr: SocketAddr,
    identity: Option<&str>,
    client_id: Option<&str>,
    why: &Refusal,
) {
    metrics.refused(why);
    warn!(
        addr = %addr,
        identity = %identity.unwrap_or("-"),
        client_id = %client_id.unwrap_or("-"),
        reason = %why,
        "connection refused"
    );
}

/// Serves one accepted socket until it is refused or handed to a session.
pub async fn handle(
    tcp: TcpStream,
    addr: SocketAddr,
    permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
) {
    let _ = tcp.set_nodelay(true);
    let listener = &shared.config.listener;
    let metrics = &shared.metrics;
    let started = std::time::Instant::now();
    let tls = match timeout(listener.handshake_timeout(), handshake(tcp, &shared)).await {
        Err(_) => return log_refusal(metrics, addr, None, None, &Refusal::HandshakeTimeout),
        Ok(Err(why)) => return log_refusal(metrics, addr, None, None, &why),
        Ok(Ok(tls)) => tls,
    };
    metrics
        .handshake_seconds
        .observe(started.elapsed().as_secs_f64());
    let peer = tls.get_ref().1.peer_certificates();
    let Some(identity) = tls::identity(peer) else {
        return log_refusal(metrics, addr, None, None, &Refusal::NoIdentity);
    };
    let serial = peer
        .and_then(|certs| certs.first())
        .map(tls::raw_serial)
        .unwrap_or_default();
    let (reader, writer) = tokio::io::split(tls);
    let mut framed = Framed::new(reader, writer, listener.max_packet_size);
    framed.count_bytes(metrics.bytes_received.clone(), metrics.bytes_sent.clone());
    let refuse = |why: Refusal| log_refusal(metrics, addr, Some(&identity), None, &why);
    let first = match timeout(listener.connect_timeout(), framed.read_connect()).await {
        Err(_) => return refuse(Refusal::ConnectTimeout),
        Ok(Err(ReadError::TooLarge { size, max })) => {
            return refuse(Refusal::PacketTooLarge { size, max })
        }
        Ok(Err(ReadError::Closed)) => {
            return refuse(Refusal::BadConnect(
                "connection closed before CONNECT".into(),
            ))
        }
        Ok(Err(e)) => return refuse(Refusal::BadConnect(e.to_string())),
        Ok(Ok(first)) => first,
    };
    let mut info = match first {
        FirstPacket::NotConnect(why) => return refuse(Refusal::NotMqtt(why)),
        FirstPacket::UnsupportedProtocol(level) => {
            // Answered in 3.1.1 form, which every version can read (MQTT 5 §3.1.2.2).
            framed.version = Version::V311;
            framed.queue(Outbound::ConnAck {
                session_present: false,
                code: ConnectCode::UnsupportedProtocol,
                properties: None,
            });
            framed.shutdown();
            return refuse(Refusal::UnsupportedProtocol(level));
        }
        FirstPacket::Connect(info) => info,
    };

    let mut assigned_id = false;
    let mut rejection = None;
    if info.client_id.is_empty() {
        if info.clean_start {
            info.client_id = format!("auto-{}", shared.next_id());
            assigned_id = true;
        } else {
            rejection = Some((
                ConnectCode::ClientIdRejected,
                Refusal::BadConnect("empty client id without clean session".into()),
            ));
        }
    }
    if let Some(will) = &info.will {
        if !crate::topic::valid_name(&will.message.topic) {
            rejection = Some((
                ConnectCode::TopicNameInvalid,
                Refusal::BadConnect("invalid will topic".into()),
            ));
        }
    }
    if let Some(will) = &info.will {
        let acl = shared.acl();
        // `$` topics are the broker's ($SYS): no client publishes there, by will either.
        if will.message.topic.starts_with('$')
            || !acl
                .check_publish(&identity, &info.client_id, &will.message.topic)
                .allowed()
        {
            shared.metrics.denied(crate::acl::Action::Publish);
            rejection = Some((
                ConnectCode::NotAuthorized,
                Refusal::NotAuthorized(format!("will topic {}", will.message.topic)),
            ));
        }
    }
    if let Some((code, why)) = rejection {
        framed.queue(Outbound::ConnAck {
            session_present: false,
            code,
            properties: None,
        });
        framed.shutdown();
        return log_refusal(metrics, addr, Some(&identity), Some(&info.client_id), &why);
    }

    let key = SessionKey {
        identity: identity.clone(),
        client_id: info.client_id.clone(),
    };
    let client = Box::new(Client {
        framed,
        info: *info,
        identity,
        serial,
        addr,
        assigned_id,
        permit,
    });
    let new_id = shared.next_id();
    if let Attached::New { client, id, rx } = shared.registry.attach(key.clone(), client, new_id) {
        // A task of its own rather than awaited here: this task's state was sized for
        // the TLS handshake, which an idle connection would otherwise carry for life.
        tokio::spawn(session::run(
            shared.clone(),
            key,
            id,
            session::Start::Client(client),
            rx,
        ));
    }
}

async fn handshake(tcp: TcpStream, shared: &Shared) -> Result<TlsStream, Refusal> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => {
            return Err(Refusal::HandshakeFailed(
                "closed before the handshake".into(),
            ))
        }
        Ok(_) if first[0] != TLS_HANDSHAKE => {
            return Err(Refusal::NotTls {
                plain_mqtt: first[0] == MQTT_CONNECT,
            })
        }
        Ok(_) => {}
        Err(e) => return Err(Refusal::HandshakeFailed(e.to_string())),
    }
    shared
        .acceptor()
        .accept(tcp)
        .await
        .map_err(|e| tls::classify(&e))
}
