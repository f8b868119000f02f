//! One of a bridge's two connections, both to a server: the upstream (TLS) or its own
//! local session (in memory). Reads are cancel-safe; writes are queued and handed to a
//! writer task at `flush`, so the bridge never waits on one side while the other talks.

use super::wire::{self, FromServer, ToServer};
use crate::protocol::{Drain, ReadError, Version, Writer};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

const READ_CHUNK: usize = 8192;

pub(super) struct Peer<R> {
    reader: R,
    writer: Writer,
    /// Bytes read and not yet decoded.
    rbuf: BytesMut,
    /// Packets encoded since the last flush.
    wbuf: BytesMut,
    version: Version,
    /// The largest packet we read.
    max_in: usize,
    /// The server's Maximum Packet Size (MQTT 5), once its CONNACK said it.
    pub(super) max_out: Option<u32>,
}

/// The connection is closed or broken.
#[derive(Debug)]
pub(super) struct Closed;

impl<R: AsyncRead + Unpin> Peer<R> {
    pub(super) fn new<W: AsyncWrite + Unpin + Send + 'static>(
        reader: R,
        writer: W,
        version: Version,
        max_in: usize,
    ) -> Self {
        Self {
            reader,
            writer: Writer::spawn(writer),
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::new(),
            version,
            max_in,
            max_out: None,
        }
    }

    /// The next packet; cancel-safe (bytes read are kept).
    pub(super) async fn read(&mut self) -> Result<FromServer, ReadError> {
        loop {
            if let Some(packet) = self.try_read()? {
                return Ok(packet);
            }
            if self.rbuf.capacity() - self.rbuf.len() < 512 {
                self.rbuf.reserve(READ_CHUNK);
            }
            if self.reader.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ReadError::Closed);
            }
        }
    }

    /// A packet already read, if a whole one is in the buffer.
    pub(super) fn try_read(&mut self) -> Result<Option<FromServer>, ReadError> {
        wire::decode(self.version, &mut self.rbuf, self.max_in)
    }

    /// Queues a packet for the next flush; an error says why it cannot be sent (a
    /// PUBLISH over the server's Maximum Packet Size).
    pub(super) fn queue(&mut self, packet: ToServer) -> Result<(), String> {
        wire::encode(self.version, packet, &mut self.wbuf, self.max_out)
    }

    /// Hands what is queued to the writer task.
    pub(super) fn flush(&mut self) -> Result<(), Closed> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.wbuf).freeze();
        self.writer.send(data).map_err(|_| Closed)
    }

    /// Bytes handed to the writer and not yet written.
    pub(super) fn unwritten(&self) -> usize {
        self.writer.unwritten()
    }

    /// Waits for the writes to drain, apart from this peer.
    pub(super) fn drain(&self) -> Drain {
        self.writer.drain()
    }

    /// Writes what is queued, then closes the connection.
    pub(super) fn close(&mut self) {
        let _ = self.flush();
        self.writer.close();
    }
}
