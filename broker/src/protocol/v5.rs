//! MQTT 5.0 to and from the version-free packets, with rumqttc's `mqttbytes::v5` codec.

use super::packet::{
    reason, ConnectCode, ConnectInfo, Inbound, Outbound, ReadError, SessionExpiry, SubRequest,
    Version,
};
use crate::message::{Message, PublishProperties, Will};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::{v5, QoS};

pub(super) fn connect(
    c: v5::Connect,
    will: Option<v5::LastWill>,
) -> Result<ConnectInfo, ReadError> {
    let props = c.properties.unwrap_or_default();
    let will = match will {
        Some(w) => {
            let topic = String::from_utf8(w.topic.to_vec())
                .map_err(|_| ReadError::Malformed("will topic is not UTF-8".into()))?;
            let (delay, properties) = match w.properties {
                Some(wp) => (
                    wp.delay_interval.unwrap_or(0),
                    Some(PublishProperties {
                        payload_format_indicator: wp.payload_format_indicator,
                        message_expiry_interval: wp.message_expiry_interval,
                        topic_alias: None,
                        response_topic: wp.response_topic,
                        correlation_data: wp.correlation_data,
                        user_properties: wp.user_properties,
                        subscription_identifiers: Vec::new(),
                        content_type: wp.content_type,
                    }),
                ),
                None => (0, None),
            };
            Some(Will {
                message: Message {
                    topic,
                    payload: w.message,
                    qos: w.qos as u8,
                    retain: w.retain,
                    properties,
                },
                delay_secs: delay,
            })
        }
        None => None,
    };
    Ok(ConnectInfo {
        version: Version::V5,
        client_id: c.client_id,
        clean_start: c.clean_start,
        keep_alive: c.keep_alive,
        will,
        session_expiry: SessionExpiry::from_secs(props.session_expiry_interval.unwrap_or(0)),
        receive_maximum: props.receive_maximum.unwrap_or(u16::MAX).max(1),
        max_packet_size: props.max_packet_size,
        topic_alias_max: props.topic_alias_max.unwrap_or(0),
        request_response_info: props.request_response_info == Some(1),
    })
}

pub(super) fn inbound(packet: v5::Packet) -> Inbound {
    match packet {
        v5::Packet::Publish(p) => {
            let mut properties = p.properties;
            let topic_alias = properties.as_mut().and_then(|pr| pr.topic_alias.take());
            let Ok(topic) = String::from_utf8(p.topic.to_vec()) else {
                return Inbound::Unexpected("PUBLISH with a topic that is not UTF-8");
            };
            Inbound::Publish {
                message: Message {
                    topic,
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                    properties,
                },
                pkid: p.pkid,
                topic_alias,
            }
        }
        v5::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v5::Packet::PubRec(a) => Inbound::PubRec(a.pkid),
        v5::Packet::PubRel(a) => Inbound::PubRel(a.pkid),
        v5::Packet::PubComp(a) => Inbound::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            id: s.properties.and_then(|p| p.id),
            filters: s
                .filters
                .into_iter()
                .map(|f| SubRequest {
                    filter: f.path,
                    qos: f.qos as u8,
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => 0,
                        v5::RetainForwardRule::OnNewSubscribe => 1,
                        v5::RetainForwardRule::Never => 2,
                    },
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            reason: d.reason_code as u8,
            session_expiry: d
                .properties
                .and_then(|p| p.session_expiry_interval)
                .map(SessionExpiry::from_secs),
        },
        v5::Packet::Connect(..) => Inbound::Unexpected("second CONNECT"),
        v5::Packet::Auth(_) => {
            Inbound::Unexpected("AUTH (enhanced authentication is not supported)")
        }
        v5::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v5::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v5::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v5::Packet::PingResp(_) => Inbound::Unexpected("PINGRESP"),
    }
}

pub(super) fn outbound(packet: Outbound) -> v5::Packet {
    match packet {
        Outbound::ConnAck {
            session_present,
            code,
            properties,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present,
            code: connect_code(code),
            properties,
        }),
        Outbound::Publish { message, pkid, dup } => v5::Packet::Publish(v5::Publish {
            dup,
            qos: qos(message.qos),
            retain: message.retain,
            topic: Bytes::from(message.topic),
            pkid,
            payload: message.payload,
            properties: message.properties,
        }),
        Outbound::PubAck { pkid, reason } => v5::Packet::PubAck(v5::PubAck {
            pkid,
            reason: puback_reason(reason),
            properties: None,
        }),
        Outbound::PubRec { pkid, reason } => v5::Packet::PubRec(v5::PubRec {
            pkid,
            reason: pubrec_reason(reason),
            properties: None,
        }),
        Outbound::PubRel { pkid } => v5::Packet::PubRel(v5::PubRel::new(pkid, None)),
        Outbound::PubComp { pkid } => v5::Packet::PubComp(v5::PubComp::new(pkid, None)),
        Outbound::SubAck { pkid, codes } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: codes.into_iter().map(suback_reason).collect(),
            properties: None,
        }),
        Outbound::UnsubAck { pkid, codes } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: codes
                .into_iter()
                .map(|c| match c {
                    reason::SUCCESS => v5::UnsubAckReason::Success,
                    reason::NO_SUBSCRIPTION_EXISTED => v5::UnsubAckReason::NoSubscriptionExisted,
                    reason::NOT_AUTHORIZED => v5::UnsubAckReason::NotAuthorized,
                    reason::TOPIC_FILTER_INVALID => v5::UnsubAckReason::TopicFilterInvalid,
                    _ => v5::UnsubAckReason::UnspecifiedError,
                })
                .collect(),
            properties: None,
        }),
        Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
        Outbound::Disconnect { reason } => v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::try_from(reason)
                .unwrap_or(v5::DisconnectReasonCode::UnspecifiedError),
        )),
    }
}

/// PUBACK and PUBREC share their reason codes, in two rumqttc types.
macro_rules! ack_reason {
    ($name:ident, $ty:ty) => {
        fn $name(code: u8) -> $ty {
            use $ty as R;
            match code {
                0x00 => R::Success,
                0x10 => R::NoMatchingSubscribers,
                0x87 => R::NotAuthorized,
                0x90 => R::TopicNameInvalid,
                0x91 => R::PacketIdentifierInUse,
                0x97 => R::QuotaExceeded,
                0x99 => R::PayloadFormatInvalid,
                0x83 => R::ImplementationSpecificError,
                _ => R::UnspecifiedError,
            }
        }
    };
}

ack_reason!(puback_reason, v5::PubAckReason);
ack_reason!(pubrec_reason, v5::PubRecReason);

fn suback_reason(code: u8) -> v5::SubscribeReasonCode {
    use v5::SubscribeReasonCode as R;
    match code {
        0..=2 => R::Success(qos(code)),
        0x83 => R::ImplementationSpecific,
        0x87 => R::NotAuthorized,
        0x8F => R::TopicFilterInvalid,
        0x91 => R::PkidInUse,
        0x97 => R::QuotaExceeded,
        0x9E => R::SharedSubscriptionsNotSupported,
        0xA1 => R::SubscriptionIdNotSupported,
        0xA2 => R::WildcardSubscriptionsNotSupported,
        _ => R::Unspecified,
    }
}

fn connect_code(code: ConnectCode) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as C;
    match code {
        ConnectCode::Accepted => C::Success,
        ConnectCode::UnsupportedProtocol => C::UnsupportedProtocolVersion,
        ConnectCode::ClientIdRejected => C::ClientIdentifierNotValid,
        ConnectCode::ServerUnavailable => C::ServerUnavailable,
        ConnectCode::NotAuthorized => C::NotAuthorized,
        ConnectCode::TopicNameInvalid => C::TopicNameInvalid,
    }
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}
