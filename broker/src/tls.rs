//! Mutual TLS: the server configuration, the client's identity, and what a failed
//! handshake means.

use crate::refusal::Refusal;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore, ServerConfig};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS configuration rejected: {0}")]
    Config(String),
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.into(),
        reason: reason.to_string(),
    }
}

/// A server configuration that requires a client certificate signed by any CA in
/// `ca_file`, and speaks TLS 1.2 and 1.3 only.
pub fn server_config(
    ca_file: &Path,
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots
            .add(cert)
            .map_err(|e| file_error(ca_file, format!("unusable CA certificate: {e}")))?;
    }
    let chain = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| file_error(key_file, format!("no usable private key: {e}")))?;
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let config = ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ])
    .with_client_cert_verifier(verifier)
    .with_single_cert(chain, key)
    .map_err(|e| file_error(cert_file, format!("certificate and key do not match: {e}")))?;
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    if !path.is_file() {
        return Err(file_error(path, "file not found"));
    }
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in file"));
    }
    Ok(certs)
}

/// Days until the first certificate in `path` expires (negative once expired).
pub fn days_until_expiry(path: &Path) -> Option<f64> {
    let pem = std::fs::read(path).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let not_after = cert.validity().not_after.timestamp();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    Some((not_after - now) as f64 / 86_400.0)
}

/// The client's identity: the CN of its certificate.
pub fn identity(peer_certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let der = peer_certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    let cn = cn.as_str().ok()?;
    (!cn.is_empty()).then(|| cn.to_string())
}

/// Classifies the error of a failed TLS accept.
pub fn classify(err: &io::Error) -> Refusal {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return Refusal::HandshakeFailed(err.to_string());
    };
    match tls {
        rustls::Error::NoCertificatesPresented => Refusal::NoCertificate,
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => Refusal::UnknownCa,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Refusal::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Refusal::NotYetValid
            }
            CertificateError::Revoked => Refusal::Revoked,
            other => Refusal::BadCertificate(format!("{other:?}")),
        },
        rustls::Error::AlertReceived(alert) => Refusal::ClientAborted(format!("{alert:?}")),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            Refusal::NotTls { plain_mqtt: false }
        }
        other => Refusal::HandshakeFailed(other.to_string()),
    }
}
