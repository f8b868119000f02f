//! A raw MQTT 3.1.1 client over mutual TLS: rustls (ring) and rumqttc's `mqttbytes` codec,
//! with no event loop of its own, so the benchmark decides when to read, write and flush.

use crate::pki::Pki;
use anyhow::{anyhow, bail, Context};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, Subscribe, SubscribeReasonCode};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Largest packet the benchmark accepts from a broker.
pub const MAX_PACKET: usize = 1 << 20;

/// A TLS connector presenting `identity`'s certificate and trusting only the PKI's CA.
/// Session resumption is off: every connection pays a full handshake, as a fleet of
/// distinct devices would.
pub fn connector(pki: &Pki, identity: &str) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&pki.ca)
        .with_context(|| format!("cannot read {}", pki.ca.display()))?
    {
        roots
            .add(cert.with_context(|| format!("bad certificate in {}", pki.ca.display()))?)
            .context("unusable CA certificate")?;
    }
    let cert_path = pki.client_cert(identity);
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("cannot read {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad certificate in {}", cert_path.display()))?;
    let key_path = pki.client_key(identity);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("cannot read the private key {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("client certificate and key do not match")?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// TCP (no Nagle) and the TLS handshake, naming the server `localhost`.
pub async fn tls_connect(addr: SocketAddr, tls: &TlsConnector) -> anyhow::Result<TlsStream> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("TCP connect to {addr}"))?;
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let name = ServerName::try_from("localhost").context("server name")?;
    tls.connect(name, tcp).await.context("TLS handshake")
}

/// Reads MQTT packets from a byte stream, keeping what it has read beyond a packet.
pub struct Reader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(inner: R, buf: BytesMut) -> Self {
        Self { inner, buf }
    }

    /// The next complete packet already read, without waiting.
    pub fn buffered(&mut self) -> anyhow::Result<Option<Packet>> {
        match Packet::read(&mut self.buf, MAX_PACKET) {
            Ok(packet) => Ok(Some(packet)),
            Err(CodecError::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(anyhow!("malformed packet from the broker: {e}")),
        }
    }

    /// Waits for more bytes; false at the end of the stream.
    pub async fn fill(&mut self) -> anyhow::Result<bool> {
        self.buf.reserve(64 * 1024);
        let n = self
            .inner
            .read_buf(&mut self.buf)
            .await
            .context("reading from the broker")?;
        Ok(n > 0)
    }

    /// Waits up to `wait` for more bytes (none coming is fine); an error names why the
    /// stream is over: closed by the broker, or failed.
    pub async fn fill_within(&mut self, wait: Duration) -> Result<(), String> {
        match tokio::time::timeout(wait, self.fill()).await {
            Ok(Ok(true)) | Err(_) => Ok(()),
            Ok(Ok(false)) => Err("the broker closed the connection".into()),
            Ok(Err(e)) => Err(format!("{e:#}")),
        }
    }

    /// The next packet; `None` when the broker closed the connection.
    pub async fn next(&mut self) -> anyhow::Result<Option<Packet>> {
        loop {
            if let Some(p) = self.buffered()? {
                return Ok(Some(p));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }
}

/// A connected MQTT session (CONNACK received).
pub struct Conn {
    pub reader: Reader<ReadHalf<TlsStream>>,
    pub writer: WriteHalf<TlsStream>,
}

/// Options of a CONNECT.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOpts {
    pub keep_alive: u16,
    pub clean_session: bool,
    pub timeout: Duration,
}

impl Default for ConnectOpts {
    fn default() -> Self {
        Self {
            keep_alive: 600,
            clean_session: true,
            timeout: Duration::from_secs(15),
        }
    }
}

/// TCP, TLS, CONNECT and CONNACK within `opts.timeout`.
pub async fn connect(
    addr: SocketAddr,
    tls: &TlsConnector,
    client_id: &str,
    opts: ConnectOpts,
) -> anyhow::Result<Conn> {
    tokio::time::timeout(opts.timeout, connect_inner(addr, tls, client_id, opts))
        .await
        .map_err(|_| anyhow!("no CONNACK within {:?}", opts.timeout))?
}

async fn connect_inner(
    addr: SocketAddr,
    tls: &TlsConnector,
    client_id: &str,
    opts: ConnectOpts,
) -> anyhow::Result<Conn> {
    let mut connect = Connect::new(client_id);
    connect.keep_alive = opts.keep_alive;
    connect.clean_session = opts.clean_session;
    send_connect(addr, tls, connect).await
}

/// [`connect`] with a CONNECT packet of the caller's (a will, for instance).
pub async fn connect_packet(
    addr: SocketAddr,
    tls: &TlsConnector,
    connect: Connect,
    timeout: Duration,
) -> anyhow::Result<Conn> {
    tokio::time::timeout(timeout, send_connect(addr, tls, connect))
        .await
        .map_err(|_| anyhow!("no CONNACK within {timeout:?}"))?
}

async fn send_connect(
    addr: SocketAddr,
    tls: &TlsConnector,
    connect: Connect,
) -> anyhow::Result<Conn> {
    let stream = tls_connect(addr, tls).await?;
    let (rd, mut writer) = tokio::io::split(stream);
    let mut buf = BytesMut::new();
    connect.write(&mut buf).context("encoding CONNECT")?;
    write_flush(&mut writer, &buf).await?;
    let mut reader = Reader::new(rd, BytesMut::with_capacity(4096));
    match reader.next().await? {
        Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
            Ok(Conn { reader, writer })
        }
        Some(Packet::ConnAck(ack)) => bail!("CONNECT refused: {:?}", ack.code),
        Some(other) => bail!("expected CONNACK, got {other:?}"),
        None => bail!("the broker closed the connection before CONNACK"),
    }
}

impl Conn {
    /// SUBSCRIBE to one filter and wait for its SUBACK (packets before it are dropped).
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        let mut buf = BytesMut::new();
        let mut sub = Subscribe::new(filter, qos);
        sub.pkid = 1;
        sub.write(&mut buf).context("encoding SUBSCRIBE")?;
        write_flush(&mut self.writer, &buf).await?;
        loop {
            match self.reader.next().await? {
                Some(Packet::SubAck(ack)) => {
                    return match ack.return_codes.first() {
                        Some(SubscribeReasonCode::Success(_)) => Ok(()),
                        other => bail!("SUBSCRIBE {filter} refused: {other:?}"),
                    };
                }
                Some(_) => continue,
                None => bail!("the broker closed the connection before SUBACK"),
            }
        }
    }

    /// DISCONNECT and close; errors are ignored (the benchmark is done with it).
    pub async fn disconnect(mut self) {
        let mut buf = BytesMut::new();
        if Packet::Disconnect.write(&mut buf, MAX_PACKET).is_ok() {
            let _ = write_flush(&mut self.writer, &buf).await;
        }
        let _ = self.writer.shutdown().await;
    }
}

/// Writes all of `bytes` and flushes the TLS layer.
pub async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> anyhow::Result<()> {
    w.write_all(bytes).await.context("writing to the broker")?;
    w.flush().await.context("flushing to the broker")
}
