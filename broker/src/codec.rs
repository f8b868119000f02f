//! MQTT 3.1.1 and 5.0 on the wire: framing, and the translation between rumqttc's
//! per-version packets and the version-free packets the session works with.

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use rumqttc::mqttbytes::{self as v4b, v4};
use rumqttc::v5::mqttbytes::{self as v5b, v5};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

pub use v5::PublishProperties;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5.0",
        }
    }
}

/// An application message as published.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: Option<PublishProperties>,
}

#[derive(Debug, Clone)]
pub struct Will {
    pub message: Message,
    pub delay_secs: u32,
}

/// What a CONNECT asked for, whatever its version.
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    pub version: Version,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub will: Option<Will>,
    /// Seconds the session outlives the connection; 3.1.1 persistent sessions never expire.
    pub session_expiry: u32,
    pub receive_maximum: u16,
    pub max_packet_size: Option<u32>,
    pub topic_alias_max: u16,
    /// MQTT 5 Request Response Information.
    pub request_response_info: bool,
}

#[derive(Debug, Clone)]
pub struct SubRequest {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

/// Packets a client sends after CONNECT.
#[derive(Debug)]
pub enum Inbound {
    Publish {
        message: Message,
        pkid: u16,
        dup: bool,
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
        session_expiry: Option<u32>,
    },
    /// A packet only a server sends, or a second CONNECT.
    Unexpected(&'static str),
}

/// Why a CONNECT is refused; each maps to a 3.1.1 return code and a 5.0 reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCode {
    Accepted,
    UnsupportedProtocol,
    ClientIdRejected,
    ServerUnavailable,
    NotAuthorized,
    Malformed,
    TopicNameInvalid,
}

impl ConnectCode {
    fn v4(self) -> v4::ConnectReturnCode {
        use v4::ConnectReturnCode as C;
        match self {
            Self::Accepted => C::Success,
            Self::UnsupportedProtocol => C::RefusedProtocolVersion,
            Self::ClientIdRejected => C::BadClientId,
            Self::ServerUnavailable | Self::Malformed | Self::TopicNameInvalid => {
                C::ServiceUnavailable
            }
            Self::NotAuthorized => C::NotAuthorized,
        }
    }

    fn v5(self) -> v5::ConnectReturnCode {
        use v5::ConnectReturnCode as C;
        match self {
            Self::Accepted => C::Success,
            Self::UnsupportedProtocol => C::UnsupportedProtocolVersion,
            Self::ClientIdRejected => C::ClientIdentifierNotValid,
            Self::ServerUnavailable => C::ServerUnavailable,
            Self::NotAuthorized => C::NotAuthorized,
            Self::Malformed => C::MalformedPacket,
            Self::TopicNameInvalid => C::TopicNameInvalid,
        }
    }
}

/// Packets the broker sends.
#[derive(Debug)]
pub enum Outbound {
    ConnAck {
        session_present: bool,
        code: ConnectCode,
        properties: Option<v5::ConnAckProperties>,
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
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const SUB_FAILURE_V4: u8 = 0x80;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("packet too large ({size} bytes, max {max})")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// Outcome of parsing the first packet.
#[derive(Debug)]
pub enum FirstPacket {
    Connect(Box<ConnectInfo>),
    /// Protocol name or level we do not speak: answer with a 3.1.1-style CONNACK.
    UnsupportedProtocol(u8),
    NotConnect(String),
}

/// Read buffer of a new connection: room for a typical CONNECT.
const READ_FIRST: usize = 512;
/// Read buffer growth under traffic, once less than `READ_MIN_SPARE` is free.
const READ_CHUNK: usize = 4096;
const READ_MIN_SPARE: usize = 128;
/// Write buffer allocated when the first packet of a flush is queued.
const WRITE_CHUNK: usize = 4096;

/// The writing half, in a task of its own: a client that reads slowly never stalls
/// its session, which keeps draining the router meanwhile.
struct Writer {
    tx: mpsc::UnboundedSender<Option<Bytes>>,
    /// Bytes handed to the task and not yet written.
    pending: Arc<AtomicUsize>,
    drained: Arc<Notify>,
}

impl Writer {
    fn spawn<W: AsyncWrite + Unpin + Send + 'static>(mut writer: W) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Option<Bytes>>();
        let pending = Arc::new(AtomicUsize::new(0));
        let drained = Arc::new(Notify::new());
        let (left, wake) = (pending.clone(), drained.clone());
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                let Some(data) = item else {
                    let _ = writer.shutdown().await;
                    break;
                };
                let written = writer.write_all(&data).await.is_ok() && writer.flush().await.is_ok();
                left.fetch_sub(data.len(), Ordering::AcqRel);
                wake.notify_waiters();
                if !written {
                    // The receiver goes with this task: the session's next send fails.
                    break;
                }
            }
        });
        Self {
            tx,
            pending,
            drained,
        }
    }
}

/// Reads packets from a byte stream and writes packets to another, for one version.
pub struct Framed<R> {
    reader: R,
    writer: Writer,
    rbuf: BytesMut,
    wbuf: BytesMut,
    pub version: Version,
    max_in: usize,
    /// The client's Maximum Packet Size (MQTT 5).
    pub max_out: Option<u32>,
    /// Bytes read and written, for the metrics.
    counters: Option<(Counter, Counter)>,
}

impl<R: AsyncRead + Unpin> Framed<R> {
    pub fn new<W: AsyncWrite + Unpin + Send + 'static>(
        reader: R,
        writer: W,
        max_in: usize,
    ) -> Self {
        Self {
            reader,
            writer: Writer::spawn(writer),
            // Small until traffic needs more: most connections sit idle.
            rbuf: BytesMut::with_capacity(READ_FIRST),
            wbuf: BytesMut::new(),
            version: Version::V311,
            max_in,
            max_out: None,
            counters: None,
        }
    }

    /// Counts bytes read into `read` and bytes written into `written`.
    pub fn count_bytes(&mut self, read: Counter, written: Counter) {
        self.counters = Some((read, written));
    }

    /// Reads more bytes; cancel-safe (bytes read are kept in the buffer).
    async fn fill(&mut self) -> Result<(), ReadError> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_MIN_SPARE {
            self.rbuf.reserve(READ_CHUNK);
        }
        match self.reader.read_buf(&mut self.rbuf).await? {
            0 => Err(ReadError::Closed),
            n => {
                if let Some((read, _)) = &self.counters {
                    read.inc_by(n as u64);
                }
                Ok(())
            }
        }
    }

    /// The fixed header of the next complete frame, if the buffer holds one.
    fn frame_ready(&self) -> Result<bool, ReadError> {
        match v4b::check(self.rbuf.iter(), self.max_in) {
            Ok(_) => Ok(true),
            Err(v4b::Error::InsufficientBytes(_)) => Ok(false),
            Err(v4b::Error::PayloadSizeLimitExceeded(size)) => Err(ReadError::TooLarge {
                size,
                max: self.max_in,
            }),
            Err(e) => Err(ReadError::Malformed(e.to_string())),
        }
    }

    /// Reads the first packet, which must be a CONNECT of 3.1.1 or 5.0.
    pub async fn read_connect(&mut self) -> Result<FirstPacket, ReadError> {
        while self.rbuf.is_empty() {
            self.fill().await?;
        }
        // Judged on the first byte: garbage is refused at once, not after a timeout.
        let first = self.rbuf[0];
        if first >> 4 != 1 {
            return Ok(FirstPacket::NotConnect(format!(
                "first packet has type {} instead of CONNECT",
                first >> 4
            )));
        }
        while !self.frame_ready()? {
            self.fill().await?;
        }
        if first & 0x0F != 0 {
            return Err(ReadError::Malformed(
                "CONNECT with reserved flags set".into(),
            ));
        }
        let (name, level) = protocol_of(&self.rbuf)
            .ok_or_else(|| ReadError::Malformed("CONNECT too short for a protocol name".into()))?;
        if name != b"MQTT" {
            // MQTT 3.1 ("MQIsdp") and others: refuse with return code 1.
            self.rbuf.clear();
            return Ok(FirstPacket::UnsupportedProtocol(level));
        }
        match level {
            4 => {
                let packet = v4::Packet::read(&mut self.rbuf, self.max_in).map_err(malformed)?;
                let v4::Packet::Connect(c) = packet else {
                    return Err(ReadError::Malformed("not a CONNECT".into()));
                };
                self.version = Version::V311;
                Ok(FirstPacket::Connect(Box::new(connect_from_v4(c))))
            }
            5 => {
                let packet = v5::Packet::read(&mut self.rbuf, Some(self.max_in as u32))
                    .map_err(malformed)?;
                let v5::Packet::Connect(c, will, _login) = packet else {
                    return Err(ReadError::Malformed("not a CONNECT".into()));
                };
                self.version = Version::V5;
                Ok(FirstPacket::Connect(Box::new(connect_from_v5(c, will)?)))
            }
            other => {
                self.rbuf.clear();
                Ok(FirstPacket::UnsupportedProtocol(other))
            }
        }
    }

    /// Reads the next packet; cancel-safe.
    pub async fn read(&mut self) -> Result<Inbound, ReadError> {
        loop {
            if self.frame_ready()? {
                return self.decode();
            }
            self.fill().await?;
        }
    }

    /// Decodes a packet already in the buffer, if there is a complete one.
    pub fn try_read(&mut self) -> Result<Option<Inbound>, ReadError> {
        if self.frame_ready()? {
            self.decode().map(Some)
        } else {
            Ok(None)
        }
    }

    fn decode(&mut self) -> Result<Inbound, ReadError> {
        match self.version {
            Version::V311 => {
                let packet = v4::Packet::read(&mut self.rbuf, self.max_in).map_err(malformed)?;
                Ok(inbound_from_v4(packet))
            }
            Version::V5 => {
                // rumqttc refuses a DISCONNECT with no body, which 5.0 allows (§3.14.2.1).
                if self.rbuf.len() >= 2 && self.rbuf[0] == 0xE0 && self.rbuf[1] == 0 {
                    let _ = self.rbuf.split_to(2);
                    return Ok(Inbound::Disconnect {
                        reason: 0,
                        session_expiry: None,
                    });
                }
                let packet = v5::Packet::read(&mut self.rbuf, Some(self.max_in as u32))
                    .map_err(malformed)?;
                Ok(inbound_from_v5(packet))
            }
        }
    }

    /// Encodes a packet into the write buffer. A PUBLISH larger than the client's
    /// Maximum Packet Size is not sent, and `false` is returned.
    pub fn queue(&mut self, packet: Outbound) -> bool {
        if self.wbuf.capacity() == 0 {
            self.wbuf.reserve(WRITE_CHUNK);
        }
        if let (Outbound::Disconnect { reason }, Version::V5) = (&packet, self.version) {
            // rumqttc writes a reason code without properties as a bare normal
            // disconnection; written by hand: reason code, empty properties.
            self.wbuf.extend_from_slice(&[0xE0, 0x02, *reason, 0x00]);
            return true;
        }
        match self.version {
            Version::V311 => match outbound_to_v4(packet) {
                Some(p) => p.write(&mut self.wbuf, usize::MAX).is_ok(),
                None => true,
            },
            Version::V5 => outbound_to_v5(packet)
                .write(&mut self.wbuf, self.max_out)
                .is_ok(),
        }
    }

    /// Drops what is queued and not written (acknowledgements that must not go out).
    pub fn discard_pending(&mut self) {
        self.wbuf.clear();
    }

    pub fn has_pending_writes(&self) -> bool {
        !self.wbuf.is_empty()
    }

    /// Hands everything queued to the writer task; fails once the socket is broken.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        // Taken whole, not split: an idle connection keeps no write buffer.
        let data = std::mem::take(&mut self.wbuf).freeze();
        let len = data.len();
        self.writer.pending.fetch_add(len, Ordering::AcqRel);
        if let Some((_, written)) = &self.counters {
            written.inc_by(len as u64);
        }
        self.writer
            .tx
            .send(Some(data))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "connection closed"))
    }

    /// Bytes handed to the writer and not yet on the socket.
    pub fn unwritten(&self) -> usize {
        self.writer.pending.load(Ordering::Acquire)
    }

    /// Returns once fewer than `limit` bytes wait to be written.
    pub async fn drained_below(&self, limit: usize) {
        loop {
            let drained = self.writer.drained.notified();
            if self.unwritten() < limit {
                return;
            }
            drained.await;
        }
    }

    /// Writes what is queued, then closes the connection (in the writer task).
    pub fn shutdown(&mut self) {
        let _ = self.flush();
        let _ = self.writer.tx.send(None);
    }
}

// Properties are carried as an encoded, empty MQTT 5 PUBLISH: the codec we already
// trust, rather than a second serialisation of the same fields.
pub fn encode_properties(props: &PublishProperties) -> Bytes {
    let publish = v5::Publish {
        dup: false,
        qos: v5b::QoS::AtMostOnce,
        retain: false,
        topic: Bytes::from_static(b"-"),
        pkid: 0,
        payload: Bytes::new(),
        properties: Some(props.clone()),
    };
    let mut buf = BytesMut::new();
    match publish.write(&mut buf) {
        Ok(_) => buf.freeze(),
        Err(_) => Bytes::new(),
    }
}

pub fn decode_properties(data: Bytes) -> Option<PublishProperties> {
    let mut buf = BytesMut::from(&data[..]);
    match v5::Packet::read(&mut buf, None) {
        Ok(v5::Packet::Publish(p)) => p.properties,
        _ => None,
    }
}

fn malformed<E: std::fmt::Display>(e: E) -> ReadError {
    ReadError::Malformed(e.to_string())
}

/// Protocol name and level of a CONNECT frame at the start of `buf`.
fn protocol_of(buf: &[u8]) -> Option<(&[u8], u8)> {
    let mut i = 1;
    while *buf.get(i)? & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let len = u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]) as usize;
    let name = buf.get(i + 2..i + 2 + len)?;
    let level = *buf.get(i + 2 + len)?;
    Some((name, level))
}

fn qos4(q: v4b::QoS) -> u8 {
    q as u8
}

fn qos5(q: v5b::QoS) -> u8 {
    q as u8
}

fn to_qos4(q: u8) -> v4b::QoS {
    match q {
        0 => v4b::QoS::AtMostOnce,
        1 => v4b::QoS::AtLeastOnce,
        _ => v4b::QoS::ExactlyOnce,
    }
}

fn to_qos5(q: u8) -> v5b::QoS {
    match q {
        0 => v5b::QoS::AtMostOnce,
        1 => v5b::QoS::AtLeastOnce,
        _ => v5b::QoS::ExactlyOnce,
    }
}

fn connect_from_v4(c: v4::Connect) -> ConnectInfo {
    ConnectInfo {
        version: Version::V311,
        session_expiry: if c.clean_session { 0 } else { u32::MAX },
        client_id: c.client_id,
        clean_start: c.clean_session,
        keep_alive: c.keep_alive,
        will: c.last_will.map(|w| Will {
            message: Message {
                topic: w.topic,
                payload: w.message,
                qos: qos4(w.qos),
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

fn connect_from_v5(c: v5::Connect, will: Option<v5::LastWill>) -> Result<ConnectInfo, ReadError> {
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
                    qos: qos5(w.qos),
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
        session_expiry: props.session_expiry_interval.unwrap_or(0),
        receive_maximum: props.receive_maximum.unwrap_or(u16::MAX).max(1),
        max_packet_size: props.max_packet_size,
        topic_alias_max: props.topic_alias_max.unwrap_or(0),
        request_response_info: props.request_response_info == Some(1),
    })
}

fn inbound_from_v4(packet: v4::Packet) -> Inbound {
    match packet {
        v4::Packet::Publish(p) => Inbound::Publish {
            message: Message {
                topic: p.topic,
                payload: p.payload,
                qos: qos4(p.qos),
                retain: p.retain,
                properties: None,
            },
            pkid: p.pkid,
            dup: p.dup,
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
                    qos: qos4(f.qos),
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

fn inbound_from_v5(packet: v5::Packet) -> Inbound {
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
                    qos: qos5(p.qos),
                    retain: p.retain,
                    properties,
                },
                pkid: p.pkid,
                dup: p.dup,
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
                    qos: qos5(f.qos),
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
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
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

fn outbound_to_v4(packet: Outbound) -> Option<v4::Packet> {
    Some(match packet {
        Outbound::ConnAck {
            session_present,
            code,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(code.v4(), session_present)),
        Outbound::Publish { message, pkid, dup } => v4::Packet::Publish(v4::Publish {
            dup,
            qos: to_qos4(message.qos),
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
                    0..=2 => v4::SubscribeReasonCode::Success(to_qos4(c)),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        Outbound::PingResp => v4::Packet::PingResp,
        Outbound::Disconnect { .. } => return None,
    })
}

fn outbound_to_v5(packet: Outbound) -> v5::Packet {
    match packet {
        Outbound::ConnAck {
            session_present,
            code,
            properties,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present,
            code: code.v5(),
            properties,
        }),
        Outbound::Publish { message, pkid, dup } => v5::Packet::Publish(v5::Publish {
            dup,
            qos: to_qos5(message.qos),
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
        0..=2 => R::Success(to_qos5(code)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// What an idle connection costs is what the `connections` benchmark measures: a
    /// small read buffer and no write buffer once its writes are handed over.
    #[tokio::test]
    async fn idle_connection_keeps_small_buffers() {
        let (mut client, server) = tokio::io::duplex(1024);
        let (reader, writer) = tokio::io::split(server);
        let mut framed = Framed::new(reader, writer, 1 << 20);
        assert!(framed.rbuf.capacity() <= READ_FIRST);
        assert!(framed.queue(Outbound::PingResp));
        framed.flush().unwrap();
        assert_eq!(framed.wbuf.capacity(), 0);
        let mut written = [0u8; 2];
        client.read_exact(&mut written).await.unwrap();
        assert_eq!(written, [0xD0, 0x00]);
    }
}
