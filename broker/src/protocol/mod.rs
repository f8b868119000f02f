//! MQTT 3.1.1 and 5.0 on the wire: version-free packets (`packet`), the translation to
//! and from rumqttc's per-version codecs (`v4`, `v5`), framing (`framed`) with each
//! connection's writer task (`writer`), and properties as bytes (`properties`).

mod framed;
mod packet;
mod properties;
mod v4;
mod v5;
mod writer;

pub(crate) use framed::Framed;
pub(crate) use packet::{
    reason, ConnectCode, ConnectInfo, FirstPacket, Inbound, Outbound, ReadError, SessionExpiry,
    SubRequest, TooLargeForClient, Version,
};
pub(crate) use properties::{decode_properties, encode_properties};
pub(crate) use writer::{Drain, Writer};
