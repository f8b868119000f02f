//! Mutual-TLS client configuration (rustls with the *ring* provider), built from PEM files.
//!
//! The files are read every time [`client_config`] is called; the publisher and subscriber
//! call it before every (re)connection attempt, so a renewed certificate is picked up
//! without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use thiserror::Error;

/// What to tell the user when certificate files are missing or broken.
pub const CERTS_HINT: &str = "run `just certs` to (re)generate the certificates, or point --ca/--cert/--key at the right files";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {error}; {CERTS_HINT}")]
    Read {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{what} {path} is not valid PEM: {error}; {CERTS_HINT}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        error: String,
    },
    #[error("{what} {path} contains no {expected}; {CERTS_HINT}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("CA certificate {path} is unusable: {error}; {CERTS_HINT}")]
    BadCa { path: PathBuf, error: rustls::Error },
    #[error(
        "client certificate {cert} and key {key} cannot be used together: {error}; {CERTS_HINT}"
    )]
    BadClientIdentity {
        cert: PathBuf,
        key: PathBuf,
        error: rustls::Error,
    },
    #[error("TLS configuration error: {0}")]
    Config(rustls::Error),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_owned(),
        error,
    })
}

/// All certificates in a PEM file (at least one).
pub fn load_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            error: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            what,
            path: path.to_owned(),
            expected: "PEM certificate (-----BEGIN CERTIFICATE-----)",
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "private key";
    let pem = read(WHAT, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing {
            what: WHAT,
            path: path.to_owned(),
            expected: "PEM private key (-----BEGIN PRIVATE KEY-----)",
        },
        other => TlsError::Pem {
            what: WHAT,
            path: path.to_owned(),
            error: other.to_string(),
        },
    })
}

/// Builds a rustls client configuration trusting only `ca` and presenting `cert`/`key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for der in load_certificates("CA certificate", ca)? {
        roots.add(der).map_err(|error| TlsError::BadCa {
            path: ca.to_owned(),
            error,
        })?;
    }
    let chain = load_certificates("client certificate", cert)?;
    let private_key = load_private_key(key)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private_key)
        .map_err(|error| TlsError::BadClientIdentity {
            cert: cert.to_owned(),
            key: key.to_owned(),
            error,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (certificate PEM, key PEM) of a fresh self-signed P-256 certificate.
    fn self_signed() -> (String, String) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (ck.cert.pem(), ck.key_pair.serialize_pem())
    }

    fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn builds_config_from_valid_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_pem, key_pem) = self_signed();
        let ca = write(dir.path(), "ca.crt", &cert_pem);
        let cert = write(dir.path(), "c.crt", &cert_pem);
        let key = write(dir.path(), "c.key", &key_pem);
        let cfg = client_config(&ca, &cert, &key).unwrap();
        assert!(cfg.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn missing_file_error_names_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_pem, key_pem) = self_signed();
        let cert = write(dir.path(), "c.crt", &cert_pem);
        let key = write(dir.path(), "c.key", &key_pem);
        let ca = dir.path().join("missing-ca.crt");
        let err = client_config(&ca, &cert, &key).unwrap_err();
        assert!(matches!(
            err,
            TlsError::Read {
                what: "CA certificate",
                ..
            }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains("missing-ca.crt") && msg.contains("just certs"),
            "{msg}"
        );
    }

    #[test]
    fn non_pem_files_are_rejected_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_pem, key_pem) = self_signed();
        let ca = write(dir.path(), "ca.crt", &cert_pem);
        let key = write(dir.path(), "c.key", &key_pem);
        let garbage = write(dir.path(), "garbage.crt", "hello, not a certificate\n");
        let err = client_config(&ca, &garbage, &key).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Missing {
                    what: "client certificate",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("garbage.crt"));

        // A certificate where a key is expected.
        let cert = write(dir.path(), "c.crt", &cert_pem);
        let err = client_config(&ca, &cert, &cert).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Missing {
                    what: "private key",
                    ..
                }
            ),
            "{err:?}"
        );

        // Truncated PEM.
        let truncated = write(dir.path(), "t.crt", &cert_pem[..cert_pem.len() / 2]);
        let err = client_config(&truncated, &cert, &key).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Pem {
                    what: "CA certificate",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_pem, _) = self_signed();
        let (_, other_key_pem) = self_signed();
        let ca = write(dir.path(), "ca.crt", &cert_pem);
        let cert = write(dir.path(), "c.crt", &cert_pem);
        let key = write(dir.path(), "other.key", &other_key_pem);
        let err = client_config(&ca, &cert, &key).unwrap_err();
        assert!(matches!(err, TlsError::BadClientIdentity { .. }), "{err:?}");
        assert!(err.to_string().contains("other.key"));
    }
}
