//! A new socket, up to the point it becomes a session's client: TLS handshake in its
//! own task under a timeout, identity from the certificate, CONNECT under a timeout.
//! Every refusal is logged once, at WARN, with the address and the reason.

use crate::config::LOCAL_CLIENT_PREFIX;
use crate::ids::SessionKey;
use crate::protocol::{
    ConnectCode, ConnectInfo, FirstPacket, Framed, Outbound, ReadError, Version,
};
use crate::security::acl::{Acl, Action};
use crate::security::refusal::Refusal;
use crate::security::tls;
use crate::session;
use crate::shared::registry::{Client, Reader, TlsStream};
use crate::shared::Shared;
use crate::telemetry::metrics::Metrics;
use mqtt_common::topic;
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
pub(crate) fn log_refusal(
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
pub(crate) async fn handle(
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
    let mut framed = Framed::new(Box::new(reader) as Reader, writer, listener.max_packet_size);
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
            let _ = framed.queue(Outbound::ConnAck {
                session_present: false,
                code: ConnectCode::UnsupportedProtocol,
                properties: None,
            });
            framed.shutdown();
            return refuse(Refusal::UnsupportedProtocol(level));
        }
        FirstPacket::Connect(info) => info,
    };

    let acl = shared.policy.acl();
    let assigned_id = match admit(&mut info, &identity, &acl, || shared.ids.next()) {
        Ok(assigned_id) => assigned_id,
        Err(Rejection { code, why }) => {
            if code == ConnectCode::NotAuthorized {
                metrics.denied(Action::Publish);
            }
            let _ = framed.queue(Outbound::ConnAck {
                session_present: false,
                code,
                properties: None,
            });
            framed.shutdown();
            return log_refusal(metrics, addr, Some(&identity), Some(&info.client_id), &why);
        }
    };

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
        limits: None,
    });
    session::hand_over(&shared, key, client);
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
        .policy
        .acceptor()
        .accept(tcp)
        .await
        .map_err(|e| tls::classify(&e))
}

/// Why a CONNECT is refused after it was read: its CONNACK code and the logged reason.
#[derive(Debug)]
struct Rejection {
    code: ConnectCode,
    why: Refusal,
}

/// Decides on a CONNECT from `identity`: assigns a client id to a clean session that
/// sent none (true when it did), and refuses an empty id on a persistent session, an
/// invalid will topic, and a will the ACL does not let it publish. Of several
/// problems, the last in that order is the one answered.
fn admit(
    info: &mut ConnectInfo,
    identity: &str,
    acl: &Acl,
    next_id: impl FnOnce() -> u64,
) -> Result<bool, Rejection> {
    let mut assigned_id = false;
    let mut rejection = None;
    if info.client_id.is_empty() {
        if info.clean_start {
            info.client_id = format!("auto-{}", next_id());
            assigned_id = true;
        } else {
            rejection = Some(Rejection {
                code: ConnectCode::ClientIdRejected,
                why: Refusal::BadConnect("empty client id without clean session".into()),
            });
        }
    }
    if info.client_id.starts_with(LOCAL_CLIENT_PREFIX) {
        rejection = Some(Rejection {
            code: ConnectCode::ClientIdRejected,
            why: Refusal::BadConnect(format!(
                "client ids beginning with {LOCAL_CLIENT_PREFIX} belong to the broker's bridges"
            )),
        });
    }
    if let Some(will) = &info.will {
        let topic = &will.message.topic;
        if !topic::valid_name(topic) {
            rejection = Some(Rejection {
                code: ConnectCode::TopicNameInvalid,
                why: Refusal::BadConnect("invalid will topic".into()),
            });
        }
        // `$` topics are the broker's ($SYS): no client publishes there, by will either.
        if topic.starts_with('$')
            || !acl
                .check_publish(identity, &info.client_id, topic)
                .allowed()
        {
            rejection = Some(Rejection {
                code: ConnectCode::NotAuthorized,
                why: Refusal::NotAuthorized(format!("will topic {topic}")),
            });
        }
    }
    match rejection {
        Some(rejection) => Err(rejection),
        None => Ok(assigned_id),
    }
}

/// `admit` for the fuzz targets (the crate's `fuzzing` module): the CONNACK code and
/// the reason.
#[cfg(feature = "fuzzing")]
pub(crate) fn admit_for_fuzzing(
    info: &mut ConnectInfo,
    identity: &str,
    acl: &Acl,
) -> Result<bool, (ConnectCode, String)> {
    admit(info, identity, acl, || 1).map_err(|r| (r.code, r.why.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AclRule;
    use crate::message::{Message, Will};
    use crate::protocol::SessionExpiry;

    fn connect(client_id: &str, clean_start: bool, will_topic: Option<&str>) -> ConnectInfo {
        ConnectInfo {
            version: Version::V311,
            client_id: client_id.into(),
            clean_start,
            keep_alive: 30,
            will: will_topic.map(|t| Will {
                message: Message {
                    topic: t.into(),
                    payload: bytes::Bytes::from_static(b"gone"),
                    qos: 1,
                    retain: false,
                    properties: None,
                },
                delay_secs: 0,
            }),
            session_expiry: SessionExpiry::OnClose,
            receive_maximum: u16::MAX,
            max_packet_size: None,
            topic_alias_max: 0,
            request_response_info: false,
        }
    }

    fn acl() -> Acl {
        Acl::new(vec![AclRule {
            identity: "publisher".into(),
            publish: vec!["articulos/#".into()],
            subscribe: vec![],
            ..Default::default()
        }])
        .unwrap()
    }

    fn code(result: Result<bool, Rejection>) -> Option<ConnectCode> {
        result.err().map(|r| r.code)
    }

    #[test]
    fn an_empty_client_id_is_assigned_only_with_clean_start() {
        let mut info = connect("", true, None);
        assert!(admit(&mut info, "publisher", &acl(), || 7).unwrap());
        assert_eq!(info.client_id, "auto-7");
        let mut info = connect("", false, None);
        assert_eq!(
            code(admit(&mut info, "publisher", &acl(), || 7)),
            Some(ConnectCode::ClientIdRejected)
        );
        let mut info = connect("pub-1", false, None);
        assert!(!admit(&mut info, "publisher", &acl(), || unreachable!()).unwrap());
        // A bridge's local session cannot be taken over from the network.
        let mut info = connect("$bridge/cloud", false, None);
        assert_eq!(
            code(admit(&mut info, "publisher", &acl(), || 7)),
            Some(ConnectCode::ClientIdRejected)
        );
    }

    #[test]
    fn wills_are_checked_like_publishes() {
        let check = |identity: &str, topic: &str| {
            let mut info = connect("c", true, Some(topic));
            code(admit(&mut info, identity, &acl(), || 1))
        };
        assert_eq!(check("publisher", "articulos/a/futbol"), None);
        assert_eq!(
            check("publisher", "articulos/+/futbol"),
            Some(ConnectCode::TopicNameInvalid)
        );
        assert_eq!(
            check("publisher", "otros/a"),
            Some(ConnectCode::NotAuthorized)
        );
        assert_eq!(
            check("subscriber", "articulos/a/futbol"),
            Some(ConnectCode::NotAuthorized)
        );
        assert_eq!(
            check("publisher", "$SYS/broker/x"),
            Some(ConnectCode::NotAuthorized)
        );
    }
}
