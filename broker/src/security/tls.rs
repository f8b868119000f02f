//! Mutual TLS: the server configuration, the client's identity, and what a failed
//! handshake means.

use crate::config::TlsConfig;
use crate::security::refusal::Refusal;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::pki_types::{CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};
use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

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

/// Certificates and keys in force: the acceptor for new handshakes and the serials
/// the CRL revokes (to close live connections of revoked clients).
pub(crate) struct TlsMaterial {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) revoked: HashSet<Vec<u8>>,
    /// (file, its certificate's notAfter in seconds since the epoch), read at load so
    /// that the expiry gauges never read files on a runtime worker.
    pub(crate) expiry: Vec<(String, i64)>,
}

/// Loads everything from the configured files. Requires a client certificate signed by
/// any CA in `ca_file`, not revoked by `crl_file`; TLS 1.2 and 1.3 only.
pub(crate) fn load(config: &TlsConfig) -> Result<TlsMaterial, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(&config.ca_file)? {
        roots
            .add(cert)
            .map_err(|e| file_error(&config.ca_file, format!("unusable CA certificate: {e}")))?;
    }
    let chain = read_certs(&config.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| file_error(&config.key_file, format!("no usable private key: {e}")))?;
    let mut builder = WebPkiClientVerifier::builder(Arc::new(roots));
    let mut revoked = HashSet::new();
    // A CRL that does not exist yet revokes nothing; the watcher loads it when it appears.
    if let Some(crl_file) = config.crl_file.as_ref().filter(|p| p.exists()) {
        let crls = CertificateRevocationListDer::pem_file_iter(crl_file)
            .map_err(|e| file_error(crl_file, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error(crl_file, format!("not a PEM CRL file: {e}")))?;
        if crls.is_empty() {
            return Err(file_error(crl_file, "no CRL in file"));
        }
        revoked = crate::pki::revoked_serials(crl_file)
            .map_err(|e| file_error(crl_file, e))?
            .into_iter()
            .collect();
        builder = builder
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let verifier = builder
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = Arc::new(ExplainRevocation { inner: verifier });
    let server = ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ])
    .with_client_cert_verifier(verifier)
    .with_single_cert(chain, key)
    .map_err(|e| {
        file_error(
            &config.cert_file,
            format!("certificate and key do not match: {e}"),
        )
    })?;
    let expiry = [&config.ca_file, &config.cert_file]
        .into_iter()
        .filter_map(|path| Some((path.display().to_string(), not_after(path)?)))
        .collect();
    Ok(TlsMaterial {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        revoked,
        expiry,
    })
}

/// A revoked client certificate, named, so the refusal can say whose it was.
#[derive(Debug)]
struct RevokedCertificate {
    common_name: String,
    serial: String,
}

impl std::fmt::Display for RevokedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "revoked certificate CN={} serial={}",
            self.common_name, self.serial
        )
    }
}

impl std::error::Error for RevokedCertificate {}

/// The standard verifier, except that a revocation names the certificate.
#[derive(Debug)]
struct ExplainRevocation {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ExplainRevocation {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(CertificateError::Revoked) => {
                    let named = RevokedCertificate {
                        common_name: identity(Some(std::slice::from_ref(end_entity)))
                            .unwrap_or_default(),
                        serial: serial_hex(end_entity),
                    };
                    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                        Arc::new(named),
                    )))
                }
                other => other,
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The raw serial number of a certificate (DER integer bytes).
pub(crate) fn raw_serial(der: &CertificateDer<'_>) -> Vec<u8> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.raw_serial().to_vec())
        .unwrap_or_default()
}

fn serial_hex(der: &CertificateDer<'_>) -> String {
    raw_serial(der).iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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

/// Days until the CRL in `path` is due for its next update.
pub(crate) fn crl_days_until_next_update(path: &Path) -> Option<f64> {
    let pem = std::fs::read(path).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let (_, crl) = x509_parser::parse_x509_crl(&pem.contents).ok()?;
    let next = crl.next_update()?.timestamp();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    Some((next - now) as f64 / 86_400.0)
}

/// Days until the first certificate in `path` expires (negative once expired).
pub(crate) fn days_until_expiry(path: &Path) -> Option<f64> {
    days_until(not_after(path)?)
}

/// Days from now until `not_after` (seconds since the epoch); negative once past.
pub(crate) fn days_until(not_after: i64) -> Option<f64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    Some((not_after - now) as f64 / 86_400.0)
}

/// The notAfter of the first certificate in a PEM file.
fn not_after(path: &Path) -> Option<i64> {
    let pem = std::fs::read(path).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The client's identity: the CN of its certificate.
pub(crate) fn identity(peer_certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let der = peer_certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    let cn = cn.as_str().ok()?;
    (!cn.is_empty()).then(|| cn.to_string())
}

/// Classifies the error of a failed TLS accept.
pub(crate) fn classify(err: &io::Error) -> Refusal {
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
            CertificateError::Revoked => Refusal::Revoked(String::new()),
            CertificateError::Other(other) => match other.0.downcast_ref::<RevokedCertificate>() {
                Some(named) => {
                    Refusal::Revoked(format!("CN={} serial={}", named.common_name, named.serial))
                }
                None => Refusal::BadCertificate(other.to_string()),
            },
            other => Refusal::BadCertificate(format!("{other:?}")),
        },
        rustls::Error::AlertReceived(alert) => Refusal::ClientAborted(format!("{alert:?}")),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            Refusal::NotTls { plain_mqtt: false }
        }
        other => Refusal::HandshakeFailed(other.to_string()),
    }
}
