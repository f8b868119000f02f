//! Reaching the upstream: the address resolved and the client certificate read again
//! on every attempt, TCP, TLS, CONNECT and CONNACK, each under a timeout; a failure
//! says which step failed and why, in the words an operator acts on.

use super::peer::Peer;
use super::wire::{FromServer, Hello, ToServer, Welcome};
use crate::config::{BridgeConfig, BridgeProtocol};
use crate::protocol::{ReadError, Version};
use crate::security::tls::read_certs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::ReadHalf;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Each step of an attempt (resolve, TCP, TLS, CONNACK) gets this long.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) type Upstream = Peer<ReadHalf<TlsStream<TcpStream>>>;

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Failure {
    #[error("name not resolved: {0}")]
    NotResolved(String),
    #[error("connection refused by {0}")]
    ConnectionRefused(String),
    #[error("timeout: no answer to {0} within 10 s")]
    Timeout(&'static str),
    #[error("certificate refused by the upstream: {0}")]
    CertificateRefused(String),
    #[error("the upstream's certificate is not trusted: {0}")]
    UpstreamNotTrusted(String),
    #[error("{0}")]
    LocalFiles(String),
    #[error("CONNECT refused: {0}")]
    ConnectRefused(String),
    #[error("{0}")]
    Network(String),
}

impl Failure {
    /// Short and stable, for the metric label.
    pub(super) fn label(&self) -> &'static str {
        match self {
            Self::NotResolved(_) => "not_resolved",
            Self::ConnectionRefused(_) => "connection_refused",
            Self::Timeout(_) => "timeout",
            Self::CertificateRefused(_) => "certificate_refused",
            Self::UpstreamNotTrusted(_) => "upstream_not_trusted",
            Self::LocalFiles(_) => "local_files",
            Self::ConnectRefused(_) => "connect_refused",
            Self::Network(_) => "network",
        }
    }
}

/// Our side of TLS towards the upstream, from the files as they are now.
fn client_config(config: &BridgeConfig) -> Result<ClientConfig, Failure> {
    let files = |e: crate::security::tls::TlsError| Failure::LocalFiles(e.to_string());
    let mut roots = RootCertStore::empty();
    for cert in read_certs(&config.ca_file).map_err(files)? {
        roots.add(cert).map_err(|e| {
            Failure::LocalFiles(format!(
                "{}: unusable CA certificate: {e}",
                config.ca_file.display()
            ))
        })?;
    }
    let chain = read_certs(&config.cert_file).map_err(files)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| {
        Failure::LocalFiles(format!(
            "{}: no usable private key: {e}",
            config.key_file.display()
        ))
    })?;
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::LocalFiles(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            Failure::LocalFiles(format!(
                "{} and {} do not make a client identity: {e}",
                config.cert_file.display(),
                config.key_file.display()
            ))
        })
}

/// What a TLS error means for the operator: our certificate refused (an alert from
/// the upstream), theirs not trusted (our verification), or something else.
fn classify(err: &io::Error) -> Failure {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => Failure::Network(format!(
                "the upstream closed the connection during TLS ({err}); does it accept our certificate?"
            )),
            _ => Failure::Network(err.to_string()),
        };
    };
    match tls {
        rustls::Error::AlertReceived(alert) => {
            Failure::CertificateRefused(format!("TLS alert {alert:?}"))
        }
        rustls::Error::InvalidCertificate(why) => Failure::UpstreamNotTrusted(format!("{why:?}")),
        other => Failure::Network(format!("TLS: {other}")),
    }
}

/// Connects, says CONNECT and waits for the CONNACK.
pub(super) async fn dial(
    config: &BridgeConfig,
    hello: Hello,
    max_in: usize,
) -> Result<(Upstream, Welcome), Failure> {
    let tls = client_config(config)?;
    let name = ServerName::try_from(config.host().to_string())
        .map_err(|e| Failure::NotResolved(format!("{}: {e}", config.address)))?;
    let addrs: Vec<_> = timeout(STEP_TIMEOUT, tokio::net::lookup_host(&config.address))
        .await
        .map_err(|_| Failure::Timeout("the name lookup"))?
        .map_err(|e| Failure::NotResolved(format!("{}: {e}", config.address)))?
        .collect();
    let mut last = Failure::NotResolved(format!("{}: no address", config.address));
    let mut tcp = None;
    for addr in addrs {
        match timeout(STEP_TIMEOUT, TcpStream::connect(addr)).await {
            Err(_) => last = Failure::Timeout("the TCP connection"),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                last = Failure::ConnectionRefused(addr.to_string())
            }
            Ok(Err(e)) => last = Failure::Network(format!("{addr}: {e}")),
            Ok(Ok(stream)) => {
                tcp = Some(stream);
                break;
            }
        }
    }
    let tcp = tcp.ok_or(last)?;
    let _ = tcp.set_nodelay(true);
    let stream = timeout(
        STEP_TIMEOUT,
        TlsConnector::from(Arc::new(tls)).connect(name, tcp),
    )
    .await
    .map_err(|_| Failure::Timeout("the TLS handshake"))?
    .map_err(|e| classify(&e))?;
    let (reader, writer) = tokio::io::split(stream);
    let version = match config.protocol {
        BridgeProtocol::V311 => Version::V311,
        BridgeProtocol::V5 => Version::V5,
    };
    let mut peer = Peer::new(reader, writer, version, max_in);
    peer.queue(ToServer::Connect(hello))
        .map_err(Failure::Network)?;
    peer.flush()
        .map_err(|_| Failure::Network("connection closed".into()))?;
    // With TLS 1.3 a server that refuses our certificate says so after the handshake,
    // so its alert arrives here.
    let welcome = match timeout(STEP_TIMEOUT, peer.read()).await {
        Err(_) => return Err(Failure::Timeout("CONNECT")),
        Ok(Err(ReadError::Io(e))) => return Err(classify(&e)),
        Ok(Err(ReadError::Closed)) => {
            return Err(Failure::Network(
                "the upstream closed the connection before CONNACK; does it accept our certificate and client id?".into(),
            ))
        }
        Ok(Err(e)) => return Err(Failure::Network(e.to_string())),
        Ok(Ok(FromServer::ConnAck(welcome))) => welcome,
        Ok(Ok(other)) => return Err(Failure::Network(format!("{other:?} instead of CONNACK"))),
    };
    if let Some(refused) = &welcome.refused {
        return Err(Failure::ConnectRefused(refused.clone()));
    }
    peer.max_out = welcome.max_packet_size;
    Ok((peer, welcome))
}
