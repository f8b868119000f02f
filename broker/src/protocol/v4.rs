//! MQTT 3.1.1 (protocol level 4) to and from the version-free packets, with rumqttc's
//! `mqttbytes::v4` codec.

use super::packet::{
    ConnectCode, ConnectInfo, Inbound, Outbound, SessionExpiry, SubRequest, Version,
};
use crate::message::{Message, Will};
use rumqttc::mqttbytes::{v4, QoS};

pub(super) fn connect(c: v4::Connect) -> ConnectInfo {
    ConnectInfo {
        version: Version::V311,
        session_expiry: if c.clean_session {
            SessionExpiry::OnClose
        } else {
            SessionExpiry::Never
        },
        client_id: c.client_id,
        clean_start: c.clean_session,
        keep_alive: c.keep_alive,
        will: c.last_will.map(|w| Will {
            message: Message {
                topic: w.topic,
                payload: w.message,
                qos: w.qos as u8,
                retain: w.retain,
                properties: None,
            },
            delay_secs: 0,
        }),
        receive_maximum: u16::MAX,
        max_packet_size: None,
        topic_alias_max: 0,
        request_response_info: false,
    }
}

pub(super) fn inbound(packet: v4::Packet) -> Inbound {
    match packet {
        v4::Packet::Publish(p) => Inbound::Publish {
            message: Message {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos as u8,
                retain: p.retain,
                properties: None,
            },
            pkid: p.pkid,
            topic_alias: None,
        },
        v4::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v4::Packet::PubRec(a) => Inbound::PubRec(a.pkid),
        v4::Packet::PubRel(a) => Inbound::PubRel(a.pkid),
        v4::Packet::PubComp(a) => Inbound::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubRequest {
                    filter: f.path,
                    qos: f.qos as u8,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect(),
            id: None,
        },
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        v4::Packet::Connect(_) => Inbound::Unexpected("second CONNECT"),
        v4::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => Inbound::Unexpected("PINGRESP"),
    }
}

/// None for a packet 3.1.1 does not have (DISCONNECT from the server).
pub(super) fn outbound(packet: Outbound) -> Option<v4::Packet> {
    Some(match packet {
        Outbound::ConnAck {
            session_present,
            code,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(connect_code(code), session_present)),
        Outbound::Publish { message, pkid, dup } => v4::Packet::Publish(v4::Publish {
            dup,
            qos: qos(message.qos),
            retain: message.retain,
            topic: message.topic,
            pkid,
            payload: message.payload,
        }),
        Outbound::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(pkid)),
        Outbound::PubRec { pkid, .. } => v4::Packet::PubRec(v4::PubRec::new(pkid)),
        Outbound::PubRel { pkid } => v4::Packet::PubRel(v4::PubRel::new(pkid)),
        Outbound::PubComp { pkid } => v4::Packet::PubComp(v4::PubComp::new(pkid)),
        Outbound::SubAck { pkid, codes } => v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            codes
                .into_iter()
                .map(|c| match c {
                    0..=2 => v4::SubscribeReasonCode::Success(qos(c)),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        Outbound::PingResp => v4::Packet::PingResp,
        Outbound::Disconnect { .. } => return None,
    })
}

fn connect_code(code: ConnectCode) -> v4::ConnectReturnCode {
    use v4::ConnectReturnCode as C;
    match code {
        ConnectCode::Accepted => C::Success,
        ConnectCode::UnsupportedProtocol => C::RefusedProtocolVersion,
        ConnectCode::ClientIdRejected => C::BadClientId,
        ConnectCode::ServerUnavailable | ConnectCode::TopicNameInvalid => C::ServiceUnavailable,
        ConnectCode::NotAuthorized => C::NotAuthorized,
    }
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}
