//! MQTT from the client's side, in 3.1.1 or 5.0, over rumqttc's `mqttbytes`: what a
//! bridge sends to a server (the upstream, or its own local session) and reads back.
//! The broker's own codec (`crate::protocol`) speaks the server's side only.

use crate::message::Message;
use crate::protocol::{ReadError, Version};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as v4b, v4, QoS};
use rumqttc::v5::mqttbytes::{self as v5b, v5};

/// What a CONNECT asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hello {
    pub(super) client_id: String,
    pub(super) keep_alive: u16,
    pub(super) clean_start: bool,
    /// MQTT 5 Session Expiry Interval (3.1.1: persistent unless `clean_start`).
    pub(super) session_expiry: u32,
    /// MQTT 5 Receive Maximum we accept.
    pub(super) receive_maximum: u16,
    /// MQTT 5 Maximum Packet Size we accept.
    pub(super) max_packet_size: u32,
}

/// One filter of a SUBSCRIBE; the options beyond QoS are MQTT 5's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Filter {
    pub(super) filter: String,
    pub(super) qos: u8,
    pub(super) no_local: bool,
    pub(super) retain_as_published: bool,
    /// 0: retained messages on every SUBSCRIBE; 1: on a new subscription only.
    pub(super) retain_handling: u8,
}

/// Packets a client sends.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ToServer {
    Connect(Hello),
    Subscribe {
        pkid: u16,
        filters: Vec<Filter>,
    },
    Publish {
        message: Message,
        pkid: u16,
        dup: bool,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    PingReq,
    Disconnect,
}

/// What a server said in its CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Welcome {
    pub(super) session_present: bool,
    /// None: accepted; otherwise the refusal, as the server's return code names it.
    pub(super) refused: Option<String>,
    /// MQTT 5 Receive Maximum of the server.
    pub(super) receive_maximum: Option<u16>,
    /// MQTT 5 Maximum Packet Size of the server.
    pub(super) max_packet_size: Option<u32>,
}

/// Packets a server sends.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum FromServer {
    ConnAck(Welcome),
    /// Per filter: Some(granted QoS) or None (refused).
    SubAck {
        pkid: u16,
        granted: Vec<Option<u8>>,
    },
    Publish {
        message: Message,
        pkid: u16,
        dup: bool,
    },
    /// `refused`: an MQTT 5 reason code of 0x80 or more, by name.
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    PubRec {
        pkid: u16,
        refused: Option<String>,
    },
    PubRel(u16),
    PubComp(u16),
    PingResp,
    /// MQTT 5 reason, by name.
    Disconnect(String),
    /// A packet only a client sends, or one the bridge never asks for.
    Unexpected(&'static str),
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> v5b::QoS {
    match q {
        0 => v5b::QoS::AtMostOnce,
        1 => v5b::QoS::AtLeastOnce,
        _ => v5b::QoS::ExactlyOnce,
    }
}

/// Encodes `packet` at the end of `out`. An error names what could not be written
/// (a PUBLISH larger than the server's Maximum Packet Size, say).
pub(super) fn encode(
    version: Version,
    packet: ToServer,
    out: &mut BytesMut,
    max_size: Option<u32>,
) -> Result<(), String> {
    match version {
        Version::V311 => v4_packet(packet)
            .write(out, max_size.map_or(usize::MAX, |m| m as usize))
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Version::V5 => {
            if let ToServer::Disconnect = packet {
                // A normal disconnection: reason 0, no properties.
                out.extend_from_slice(&[0xE0, 0x00]);
                return Ok(());
            }
            v5_packet(packet)
                .write(out, max_size)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

fn v4_packet(packet: ToServer) -> v4::Packet {
    match packet {
        ToServer::Connect(h) => v4::Packet::Connect(v4::Connect {
            protocol: v4b::Protocol::V4,
            keep_alive: h.keep_alive,
            client_id: h.client_id,
            clean_session: h.clean_start,
            last_will: None,
            login: None,
        }),
        ToServer::Subscribe { pkid, filters } => v4::Packet::Subscribe(v4::Subscribe {
            pkid,
            filters: filters
                .into_iter()
                .map(|f| v4::SubscribeFilter {
                    path: f.filter,
                    qos: qos(f.qos),
                })
                .collect(),
        }),
        ToServer::Publish { message, pkid, dup } => v4::Packet::Publish(v4::Publish {
            dup,
            qos: qos(message.qos),
            retain: message.retain,
            topic: message.topic,
            pkid,
            payload: message.payload,
        }),
        ToServer::PubAck(pkid) => v4::Packet::PubAck(v4::PubAck { pkid }),
        ToServer::PubRec(pkid) => v4::Packet::PubRec(v4::PubRec { pkid }),
        ToServer::PubRel(pkid) => v4::Packet::PubRel(v4::PubRel { pkid }),
        ToServer::PubComp(pkid) => v4::Packet::PubComp(v4::PubComp { pkid }),
        ToServer::PingReq => v4::Packet::PingReq,
        ToServer::Disconnect => v4::Packet::Disconnect,
    }
}

fn v5_packet(packet: ToServer) -> v5::Packet {
    match packet {
        ToServer::Connect(h) => {
            let properties = v5::ConnectProperties {
                session_expiry_interval: Some(h.session_expiry).filter(|s| *s > 0),
                receive_maximum: Some(h.receive_maximum),
                max_packet_size: Some(h.max_packet_size),
                ..v5::ConnectProperties::new()
            };
            v5::Packet::Connect(
                v5::Connect {
                    keep_alive: h.keep_alive,
                    client_id: h.client_id,
                    clean_start: h.clean_start,
                    properties: Some(properties),
                },
                None,
                None,
            )
        }
        ToServer::Subscribe { pkid, filters } => v5::Packet::Subscribe(v5::Subscribe {
            pkid,
            filters: filters
                .into_iter()
                .map(|f| v5::Filter {
                    path: f.filter,
                    qos: qos5(f.qos),
                    nolocal: f.no_local,
                    preserve_retain: f.retain_as_published,
                    retain_forward_rule: match f.retain_handling {
                        0 => v5::RetainForwardRule::OnEverySubscribe,
                        1 => v5::RetainForwardRule::OnNewSubscribe,
                        _ => v5::RetainForwardRule::Never,
                    },
                })
                .collect(),
            properties: None,
        }),
        ToServer::Publish { message, pkid, dup } => {
            // What is the receiving server's to assign, or only ours to know, goes.
            let properties = message.properties.map(|mut p| {
                p.topic_alias = None;
                p.subscription_identifiers.clear();
                p
            });
            v5::Packet::Publish(v5::Publish {
                dup,
                qos: qos5(message.qos),
                retain: message.retain,
                topic: Bytes::from(message.topic),
                pkid,
                payload: message.payload,
                properties,
            })
        }
        ToServer::PubAck(pkid) => v5::Packet::PubAck(v5::PubAck::new(pkid, None)),
        ToServer::PubRec(pkid) => v5::Packet::PubRec(v5::PubRec::new(pkid, None)),
        ToServer::PubRel(pkid) => v5::Packet::PubRel(v5::PubRel::new(pkid, None)),
        ToServer::PubComp(pkid) => v5::Packet::PubComp(v5::PubComp::new(pkid, None)),
        ToServer::PingReq => v5::Packet::PingReq(v5::PingReq),
        ToServer::Disconnect => v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        )),
    }
}

/// Decodes the next complete packet at the start of `buf`; None until one has arrived.
pub(super) fn decode(
    version: Version,
    buf: &mut BytesMut,
    max_size: usize,
) -> Result<Option<FromServer>, ReadError> {
    match v4b::check(buf.iter(), max_size) {
        Ok(_) => {}
        Err(v4b::Error::InsufficientBytes(_)) => return Ok(None),
        Err(v4b::Error::PayloadSizeLimitExceeded(size)) => {
            return Err(ReadError::TooLarge {
                size,
                max: max_size,
            })
        }
        Err(e) => return Err(ReadError::Malformed(e.to_string())),
    }
    let malformed = |e: &dyn std::fmt::Display| ReadError::Malformed(e.to_string());
    let packet = match version {
        Version::V311 => from_v4(v4::Packet::read(buf, max_size).map_err(|e| malformed(&e))?),
        Version::V5 => {
            // A DISCONNECT with no body is a normal disconnection (§3.14.2.1); rumqttc
            // refuses it.
            if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
                let _ = buf.split_to(2);
                return Ok(Some(FromServer::Disconnect("NormalDisconnection".into())));
            }
            from_v5(v5::Packet::read(buf, Some(max_size as u32)).map_err(|e| malformed(&e))?)
        }
    };
    packet.map(Some)
}

fn topic(bytes: &[u8]) -> Result<String, ReadError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ReadError::Malformed("PUBLISH with a topic that is not UTF-8".into()))
}

fn from_v4(packet: v4::Packet) -> Result<FromServer, ReadError> {
    Ok(match packet {
        v4::Packet::ConnAck(c) => FromServer::ConnAck(Welcome {
            session_present: c.session_present,
            refused: (c.code != v4::ConnectReturnCode::Success).then(|| format!("{:?}", c.code)),
            receive_maximum: None,
            max_packet_size: None,
        }),
        v4::Packet::SubAck(s) => FromServer::SubAck {
            pkid: s.pkid,
            granted: s
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => Some(q as u8),
                    v4::SubscribeReasonCode::Failure => None,
                })
                .collect(),
        },
        v4::Packet::Publish(p) => FromServer::Publish {
            message: Message {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos as u8,
                retain: p.retain,
                properties: None,
            },
            pkid: p.pkid,
            dup: p.dup,
        },
        v4::Packet::PubAck(a) => FromServer::PubAck {
            pkid: a.pkid,
            refused: None,
        },
        v4::Packet::PubRec(a) => FromServer::PubRec {
            pkid: a.pkid,
            refused: None,
        },
        v4::Packet::PubRel(a) => FromServer::PubRel(a.pkid),
        v4::Packet::PubComp(a) => FromServer::PubComp(a.pkid),
        v4::Packet::PingResp => FromServer::PingResp,
        v4::Packet::Disconnect => FromServer::Disconnect("NormalDisconnection".into()),
        v4::Packet::UnsubAck(_) => FromServer::Unexpected("UNSUBACK"),
        v4::Packet::Connect(_) => FromServer::Unexpected("CONNECT"),
        v4::Packet::Subscribe(_) => FromServer::Unexpected("SUBSCRIBE"),
        v4::Packet::Unsubscribe(_) => FromServer::Unexpected("UNSUBSCRIBE"),
        v4::Packet::PingReq => FromServer::Unexpected("PINGREQ"),
    })
}

fn from_v5(packet: v5::Packet) -> Result<FromServer, ReadError> {
    use v5::PubAckReason as A;
    use v5::PubRecReason as R;
    Ok(match packet {
        v5::Packet::ConnAck(c) => {
            let props = c.properties.as_ref();
            FromServer::ConnAck(Welcome {
                session_present: c.session_present,
                refused: (c.code != v5::ConnectReturnCode::Success)
                    .then(|| format!("{:?}", c.code)),
                receive_maximum: props.and_then(|p| p.receive_max),
                max_packet_size: props.and_then(|p| p.max_packet_size),
            })
        }
        v5::Packet::SubAck(s) => FromServer::SubAck {
            pkid: s.pkid,
            granted: s
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => Some(q as u8),
                    _ => None,
                })
                .collect(),
        },
        v5::Packet::Publish(p) => {
            let mut properties = p.properties;
            if properties
                .as_ref()
                .is_some_and(|pr| pr.topic_alias.is_some())
            {
                // The bridge never allows aliases (Topic Alias Maximum 0).
                return Err(ReadError::Malformed("PUBLISH with a topic alias".into()));
            }
            if let Some(pr) = properties.as_mut() {
                pr.subscription_identifiers.clear();
            }
            FromServer::Publish {
                message: Message {
                    topic: topic(&p.topic)?,
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                    properties,
                },
                pkid: p.pkid,
                dup: p.dup,
            }
        }
        v5::Packet::PubAck(a) => FromServer::PubAck {
            pkid: a.pkid,
            refused: (!matches!(a.reason, A::Success | A::NoMatchingSubscribers))
                .then(|| format!("{:?}", a.reason)),
        },
        v5::Packet::PubRec(a) => FromServer::PubRec {
            pkid: a.pkid,
            refused: (!matches!(a.reason, R::Success | R::NoMatchingSubscribers))
                .then(|| format!("{:?}", a.reason)),
        },
        v5::Packet::PubRel(a) => FromServer::PubRel(a.pkid),
        v5::Packet::PubComp(a) => FromServer::PubComp(a.pkid),
        v5::Packet::PingResp(_) => FromServer::PingResp,
        v5::Packet::Disconnect(d) => FromServer::Disconnect(format!("{:?}", d.reason_code)),
        v5::Packet::UnsubAck(_) => FromServer::Unexpected("UNSUBACK"),
        v5::Packet::Connect(..) => FromServer::Unexpected("CONNECT"),
        v5::Packet::Subscribe(_) => FromServer::Unexpected("SUBSCRIBE"),
        v5::Packet::Unsubscribe(_) => FromServer::Unexpected("UNSUBSCRIBE"),
        v5::Packet::PingReq(_) => FromServer::Unexpected("PINGREQ"),
        v5::Packet::Auth(_) => FromServer::Unexpected("AUTH"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FirstPacket, Framed, Inbound, Outbound};

    /// What the bridge writes, the broker's own server-side codec reads back, and the
    /// other way round.
    #[tokio::test]
    async fn the_broker_reads_what_the_bridge_writes_in_both_versions() {
        for version in [Version::V311, Version::V5] {
            let (client, server) = tokio::io::duplex(1 << 16);
            let (reader, writer) = tokio::io::split(server);
            let mut framed = Framed::new(reader, writer, 1 << 20);
            let mut out = BytesMut::new();
            let hello = Hello {
                client_id: "edge-1".into(),
                keep_alive: 30,
                clean_start: false,
                session_expiry: u32::MAX,
                receive_maximum: 20,
                max_packet_size: 1 << 20,
            };
            encode(version, ToServer::Connect(hello), &mut out, None).unwrap();
            let message = Message {
                topic: "sites/a".into(),
                payload: Bytes::from_static(b"hola"),
                qos: 2,
                retain: true,
                properties: None,
            };
            encode(
                version,
                ToServer::Publish {
                    message: message.clone(),
                    pkid: 7,
                    dup: true,
                },
                &mut out,
                None,
            )
            .unwrap();
            encode(version, ToServer::Disconnect, &mut out, None).unwrap();
            let (mut client_read, mut client_write) = tokio::io::split(client);
            tokio::io::AsyncWriteExt::write_all(&mut client_write, &out)
                .await
                .unwrap();
            let FirstPacket::Connect(info) = framed.read_connect().await.unwrap() else {
                panic!("not a CONNECT");
            };
            assert_eq!(info.version, version);
            assert_eq!(info.client_id, "edge-1");
            assert!(!info.clean_start);
            assert!(info.session_expiry.is_persistent());
            match framed.read().await.unwrap() {
                Inbound::Publish {
                    message: got, pkid, ..
                } => {
                    assert_eq!(pkid, 7);
                    assert_eq!(got.topic, message.topic);
                    assert_eq!((got.qos, got.retain), (2, true));
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                framed.read().await.unwrap(),
                Inbound::Disconnect { reason: 0, .. }
            ));

            framed
                .queue(Outbound::PubAck {
                    pkid: 7,
                    reason: 0x87,
                })
                .unwrap();
            framed.queue(Outbound::PubRel { pkid: 9 }).unwrap();
            framed.flush().unwrap();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            while got.len() < 2 {
                tokio::io::AsyncReadExt::read_buf(&mut client_read, &mut buf)
                    .await
                    .unwrap();
                while let Some(p) = decode(version, &mut buf, 1 << 20).unwrap() {
                    got.push(p);
                }
            }
            let refused = (version == Version::V5).then(|| "NotAuthorized".to_string());
            assert_eq!(got[0], FromServer::PubAck { pkid: 7, refused });
            assert_eq!(got[1], FromServer::PubRel(9));
        }
    }

    #[test]
    fn half_a_packet_waits_and_garbage_is_an_error() {
        let mut buf = BytesMut::from(&[0x30u8, 0x10, 0x00][..]);
        assert!(decode(Version::V311, &mut buf, 1024).unwrap().is_none());
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert!(decode(Version::V5, &mut buf, 1024).is_err());
    }
}
