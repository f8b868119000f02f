//! Why a connection was refused, in words an operator understands.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    TooManyConnections(usize),
    HandshakeTimeout,
    /// The first bytes were not a TLS record; `plain_mqtt` when they were an MQTT CONNECT.
    NotTls {
        plain_mqtt: bool,
    },
    NoCertificate,
    UnknownCa,
    Expired,
    NotYetValid,
    /// The CN and serial, when known.
    Revoked(String),
    BadCertificate(String),
    NoIdentity,
    /// The client ended the handshake, usually because it does not trust our certificate.
    ClientAborted(String),
    HandshakeFailed(String),
    ConnectTimeout,
    NotMqtt(String),
    BadConnect(String),
    UnsupportedProtocol(u8),
    PacketTooLarge {
        size: usize,
        max: usize,
    },
    NotAuthorized(String),
}

impl Refusal {
    /// The `reason` label of the refusal metric.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Self::TooManyConnections(_) => "too_many_connections",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::NotTls { .. } => "not_tls",
            Self::NoCertificate => "no_certificate",
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Revoked(_) => "revoked",
            Self::BadCertificate(_) | Self::NoIdentity => "bad_certificate",
            Self::ClientAborted(_) | Self::HandshakeFailed(_) => "handshake_failed",
            Self::ConnectTimeout => "connect_timeout",
            Self::NotMqtt(_) => "not_mqtt",
            Self::BadConnect(_) | Self::UnsupportedProtocol(_) => "bad_connect",
            Self::NotAuthorized(_) => "not_authorized",
            Self::PacketTooLarge { .. } => "packet_too_large",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyConnections(max) => {
                write!(f, "too many connections (max_connections = {max})")
            }
            Self::HandshakeTimeout => write!(f, "handshake timeout"),
            Self::NotTls { plain_mqtt: true } => {
                write!(f, "not TLS: plain MQTT sent to the TLS port")
            }
            Self::NotTls { plain_mqtt: false } => write!(f, "not TLS"),
            Self::NoCertificate => write!(f, "no client certificate"),
            Self::UnknownCa => write!(f, "unknown CA: client certificate not signed by ca_file"),
            Self::Expired => write!(f, "expired certificate"),
            Self::NotYetValid => write!(f, "certificate not yet valid"),
            Self::Revoked(who) => write!(f, "revoked certificate {who}"),
            Self::BadCertificate(why) => write!(f, "bad client certificate: {why}"),
            Self::NoIdentity => write!(f, "client certificate has no CN to use as identity"),
            Self::ClientAborted(alert) => write!(
                f,
                "client aborted the handshake ({alert}): does it trust the broker's CA?"
            ),
            Self::HandshakeFailed(why) => write!(f, "TLS handshake failed: {why}"),
            Self::ConnectTimeout => write!(f, "no CONNECT within connect_timeout_secs"),
            Self::NotMqtt(why) => write!(f, "not MQTT: {why}"),
            Self::BadConnect(why) => write!(f, "bad CONNECT: {why}"),
            Self::UnsupportedProtocol(level) => {
                write!(f, "unsupported MQTT protocol level {level}")
            }
            Self::NotAuthorized(why) => write!(f, "not authorized: {why}"),
            Self::PacketTooLarge { size, max } => {
                write!(
                    f,
                    "packet too large ({size} bytes, max_packet_size = {max})"
                )
            }
        }
    }
}
