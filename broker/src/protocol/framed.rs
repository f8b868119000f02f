//! Framing: reads packets from a connection's byte stream and encodes packets for it,
//! in the MQTT version its CONNECT chose. Writes go to the connection's writer task.

use super::packet::{FirstPacket, Inbound, Outbound, ReadError, TooLargeForClient, Version};
use super::writer::Writer;
use super::{v4, v5};
use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use rumqttc::mqttbytes::{self as v4b, v4 as mqtt4};
use rumqttc::v5::mqttbytes::v5 as mqtt5;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

/// Read buffer of a new connection: room for a typical CONNECT.
const READ_FIRST: usize = 512;
/// Read buffer growth under traffic, once less than `READ_MIN_SPARE` is free.
const READ_CHUNK: usize = 4096;
const READ_MIN_SPARE: usize = 128;
/// Write buffer allocated when the first packet of a flush is queued.
const WRITE_CHUNK: usize = 4096;

/// Reads packets from a byte stream and writes packets to another, for one version.
pub(crate) struct Framed<R> {
    reader: R,
    writer: Writer,
    /// Bytes read and not yet decoded.
    rbuf: BytesMut,
    /// Packets encoded since the last flush.
    wbuf: BytesMut,
    /// Chosen by the CONNECT's protocol level.
    pub(crate) version: Version,
    /// Our Maximum Packet Size.
    max_in: usize,
    /// The client's Maximum Packet Size (MQTT 5).
    pub(crate) max_out: Option<u32>,
    /// Bytes read and written, for the metrics.
    counters: Option<(Counter, Counter)>,
    /// Bytes read from the socket so far (the session's read budget is charged by it).
    read_total: u64,
}

impl<R: AsyncRead + Unpin> Framed<R> {
    pub(crate) fn new<W: AsyncWrite + Unpin + Send + 'static>(
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
            read_total: 0,
        }
    }

    /// Counts bytes read into `read` and bytes written into `written`.
    pub(crate) fn count_bytes(&mut self, read: Counter, written: Counter) {
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
                self.read_total += n as u64;
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
    pub(crate) async fn read_connect(&mut self) -> Result<FirstPacket, ReadError> {
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
                let packet = mqtt4::Packet::read(&mut self.rbuf, self.max_in).map_err(malformed)?;
                let mqtt4::Packet::Connect(c) = packet else {
                    return Err(ReadError::Malformed("not a CONNECT".into()));
                };
                self.version = Version::V311;
                Ok(FirstPacket::Connect(Box::new(v4::connect(c))))
            }
            5 => {
                let packet = mqtt5::Packet::read(&mut self.rbuf, Some(self.max_in as u32))
                    .map_err(malformed)?;
                let mqtt5::Packet::Connect(c, will, _login) = packet else {
                    return Err(ReadError::Malformed("not a CONNECT".into()));
                };
                self.version = Version::V5;
                Ok(FirstPacket::Connect(Box::new(v5::connect(c, will)?)))
            }
            other => {
                self.rbuf.clear();
                Ok(FirstPacket::UnsupportedProtocol(other))
            }
        }
    }

    /// Bytes read from the socket so far.
    pub(crate) fn read_total(&self) -> u64 {
        self.read_total
    }

    /// Reads the next packet; cancel-safe.
    pub(crate) async fn read(&mut self) -> Result<Inbound, ReadError> {
        loop {
            if self.frame_ready()? {
                return self.decode();
            }
            self.fill().await?;
        }
    }

    /// Decodes a packet already in the buffer, if there is a complete one.
    pub(crate) fn try_read(&mut self) -> Result<Option<Inbound>, ReadError> {
        if self.frame_ready()? {
            self.decode().map(Some)
        } else {
            Ok(None)
        }
    }

    fn decode(&mut self) -> Result<Inbound, ReadError> {
        match self.version {
            Version::V311 => {
                let packet = mqtt4::Packet::read(&mut self.rbuf, self.max_in).map_err(malformed)?;
                Ok(v4::inbound(packet))
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
                let packet = mqtt5::Packet::read(&mut self.rbuf, Some(self.max_in as u32))
                    .map_err(malformed)?;
                Ok(v5::inbound(packet))
            }
        }
    }

    /// Encodes a packet into the write buffer. A PUBLISH larger than the client's
    /// Maximum Packet Size is not sent.
    pub(crate) fn queue(&mut self, packet: Outbound) -> Result<(), TooLargeForClient> {
        if self.wbuf.capacity() == 0 {
            self.wbuf.reserve(WRITE_CHUNK);
        }
        if let (Outbound::Disconnect { reason }, Version::V5) = (&packet, self.version) {
            // rumqttc writes a reason code without properties as a bare normal
            // disconnection; written by hand: reason code, empty properties.
            self.wbuf.extend_from_slice(&[0xE0, 0x02, *reason, 0x00]);
            return Ok(());
        }
        let written = match self.version {
            Version::V311 => match v4::outbound(packet) {
                Some(p) => p.write(&mut self.wbuf, usize::MAX).is_ok(),
                None => true,
            },
            Version::V5 => v5::outbound(packet)
                .write(&mut self.wbuf, self.max_out)
                .is_ok(),
        };
        written.then_some(()).ok_or(TooLargeForClient)
    }

    /// Drops what is queued and not written (acknowledgements that must not go out).
    pub(crate) fn discard_pending(&mut self) {
        self.wbuf.clear();
    }

    pub(crate) fn has_pending_writes(&self) -> bool {
        !self.wbuf.is_empty()
    }

    /// Hands everything queued to the writer task; fails once the socket is broken.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        // Taken whole, not split: an idle connection keeps no write buffer.
        let data = std::mem::take(&mut self.wbuf).freeze();
        if let Some((_, written)) = &self.counters {
            written.inc_by(data.len() as u64);
        }
        self.writer
            .send(data)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "connection closed"))
    }

    /// Bytes handed to the writer and not yet on the socket.
    pub(crate) fn unwritten(&self) -> usize {
        self.writer.unwritten()
    }

    /// Returns once fewer than `limit` bytes wait to be written.
    pub(crate) async fn drained_below(&self, limit: usize) {
        self.writer.drained_below(limit).await
    }

    /// Writes what is queued, then closes the connection (in the writer task).
    pub(crate) fn shutdown(&mut self) {
        let _ = self.flush();
        self.writer.close();
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
        assert!(framed.queue(Outbound::PingResp).is_ok());
        framed.flush().unwrap();
        assert_eq!(framed.wbuf.capacity(), 0);
        let mut written = [0u8; 2];
        client.read_exact(&mut written).await.unwrap();
        assert_eq!(written, [0xD0, 0x00]);
    }
}
