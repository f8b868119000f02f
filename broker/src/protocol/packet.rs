//! The packets a session works with, the same for MQTT 3.1.1 and 5.0: what a client
//! sends (`Inbound`), what the broker sends (`Outbound`), what a CONNECT asked for, and
//! the reason codes. `v4` and `v5` translate them to and from rumqttc's packets.

use crate::message::{Message, Will};
use rumqttc::v5::mqttbytes::v5::ConnAckProperties;
use std::io;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V311,
    V5,
}

impl Version {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5.0",
        }
    }
}

/// How long a session outlives its connection: MQTT 5's Session Expiry Interval, or
/// 3.1.1's clean session flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionExpiry {
    /// The session ends with its connection (interval 0; 3.1.1 clean session).
    OnClose,
    /// The session ends this many seconds after its connection closes.
    After(u32),
    /// The session never expires (0xFFFFFFFF; 3.1.1 persistent session).
    Never,
}

impl SessionExpiry {
    /// From the interval as MQTT 5 encodes it.
    pub(crate) fn from_secs(secs: u32) -> Self {
        match secs {
            0 => Self::OnClose,
            u32::MAX => Self::Never,
            n => Self::After(n),
        }
    }

    /// The interval as MQTT 5 encodes it (and the store keeps it).
    pub(crate) fn secs(self) -> u32 {
        match self {
            Self::OnClose => 0,
            Self::After(n) => n,
            Self::Never => u32::MAX,
        }
    }

    /// Whether the session outlives its connection at all.
    pub(crate) fn is_persistent(self) -> bool {
        self != Self::OnClose
    }

    /// How long the session lives on after its connection, when that is bounded.
    pub(crate) fn limit(self) -> Option<Duration> {
        match self {
            Self::After(n) => Some(Duration::from_secs(n.into())),
            Self::OnClose | Self::Never => None,
        }
    }
}

/// What a CONNECT asked for, whatever its version.
#[derive(Debug, Clone)]
pub(crate) struct ConnectInfo {
    pub(crate) version: Version,
    pub(crate) client_id: String,
    pub(crate) clean_start: bool,
    pub(crate) keep_alive: u16,
    pub(crate) will: Option<Will>,
    pub(crate) session_expiry: SessionExpiry,
    /// QoS 1/2 messages the client accepts unacknowledged (MQTT 5; 3.1.1: no limit).
    pub(crate) receive_maximum: u16,
    /// The largest packet the client accepts (MQTT 5).
    pub(crate) max_packet_size: Option<u32>,
    /// Topic aliases the client accepts from us (MQTT 5).
    pub(crate) topic_alias_max: u16,
    /// MQTT 5 Request Response Information.
    pub(crate) request_response_info: bool,
}

/// One filter of a SUBSCRIBE, with its options.
#[derive(Debug, Clone)]
pub(crate) struct SubRequest {
    pub(crate) filter: String,
    pub(crate) qos: u8,
    pub(crate) no_local: bool,
    pub(crate) retain_as_published: bool,
    /// 0: send retained messages; 1: only for a new subscription; 2: never.
    pub(crate) retain_handling: u8,
}

/// Packets a client sends after CONNECT.
#[derive(Debug)]
pub(crate) enum Inbound {
    Publish {
        message: Message,
        pkid: u16,
        topic_alias: Option<u16>,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<SubRequest>,
        id: Option<usize>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
        session_expiry: Option<SessionExpiry>,
    },
    /// A packet only a server sends, or a second CONNECT.
    Unexpected(&'static str),
}

/// Why a CONNECT is refused; each maps to a 3.1.1 return code and a 5.0 reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectCode {
    Accepted,
    UnsupportedProtocol,
    ClientIdRejected,
    ServerUnavailable,
    NotAuthorized,
    TopicNameInvalid,
}

/// Packets the broker sends.
#[derive(Debug)]
pub(crate) enum Outbound {
    ConnAck {
        session_present: bool,
        code: ConnectCode,
        properties: Option<ConnAckProperties>,
    },
    Publish {
        message: Message,
        pkid: u16,
        dup: bool,
    },
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    PingResp,
    /// MQTT 5 only; on 3.1.1 the socket is just closed.
    Disconnect {
        reason: u8,
    },
}

/// MQTT 5 reason codes used by the broker (3.1.1 keeps the ones it has).
pub(crate) mod reason {
    pub(crate) const SUCCESS: u8 = 0x00;
    pub(crate) const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub(crate) const SUB_FAILURE_V4: u8 = 0x80;
    pub(crate) const UNSPECIFIED: u8 = 0x80;
    pub(crate) const MALFORMED: u8 = 0x81;
    pub(crate) const PROTOCOL_ERROR: u8 = 0x82;
    pub(crate) const NOT_AUTHORIZED: u8 = 0x87;
    pub(crate) const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub(crate) const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub(crate) const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub(crate) const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub(crate) const TOPIC_NAME_INVALID: u8 = 0x90;
    pub(crate) const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub(crate) const PACKET_TOO_LARGE: u8 = 0x95;
    pub(crate) const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub(crate) const QUOTA_EXCEEDED: u8 = 0x97;
    pub(crate) const DISCONNECT_WITH_WILL: u8 = 0x04;
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("packet too large ({size} bytes, max {max})")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// A packet that could not be encoded for this client: a PUBLISH larger than its
/// Maximum Packet Size (MQTT 5).
#[derive(Debug, thiserror::Error)]
#[error("packet larger than the client's maximum packet size")]
pub(crate) struct TooLargeForClient;

/// Outcome of parsing the first packet.
#[derive(Debug)]
pub(crate) enum FirstPacket {
    Connect(Box<ConnectInfo>),
    /// Protocol name or level we do not speak: answer with a 3.1.1-style CONNACK.
    UnsupportedProtocol(u8),
    NotConnect(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_expiry_keeps_the_wire_values() {
        for secs in [0, 1, 600, u32::MAX - 1, u32::MAX] {
            assert_eq!(SessionExpiry::from_secs(secs).secs(), secs);
        }
        assert!(!SessionExpiry::from_secs(0).is_persistent());
        assert!(SessionExpiry::Never.is_persistent());
        assert_eq!(SessionExpiry::Never.limit(), None);
        assert_eq!(
            SessionExpiry::from_secs(5).limit(),
            Some(Duration::from_secs(5))
        );
    }
}
