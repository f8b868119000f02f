//! The development PKI: a CA, the broker's server certificate and client
//! certificates whose CN is the client's identity, all generated with rcgen.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// Client identities every development PKI contains.
pub const DEFAULT_CLIENTS: [&str; 2] = ["publisher", "subscriber"];
const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is not a valid PEM certificate or key: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("the CA certificate {cert} exists but its key {key} is missing: restore the key, or regenerate everything with --force")]
    CaKeyMissing { cert: PathBuf, key: PathBuf },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("`{0}` is not a usable certificate name: use letters, digits, '.', '_' and '-'")]
    BadName(String),
    #[error("no certificate {0}: issue it first with `broker certs issue NAME`")]
    NoSuchCertificate(PathBuf),
}

/// A certificate authority able to sign leaf certificates.
pub struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A leaf certificate to issue.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    pub sans: Vec<String>,
    pub usage: Usage,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// A client certificate valid from now for `days`.
    pub fn client(name: &str, days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: name.into(),
            sans: Vec::new(),
            usage: Usage::Client,
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(days),
        }
    }

    /// A server certificate for `sans`, valid from now for `days`.
    pub fn server(name: &str, sans: Vec<String>, days: i64) -> Self {
        Self {
            sans,
            usage: Usage::Server,
            ..Self::client(name, days)
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Authority {
    /// A new self-signed CA.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(CA_DAYS);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA stored in `cert_path` and `key_path`.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let parse = |path: &Path, e: rcgen::Error| PkiError::Parse {
            path: path.into(),
            reason: e.to_string(),
        };
        let params =
            CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|e| parse(cert_path, e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| parse(key_path, e))?;
        // Re-signing the parsed parameters rebuilds an issuer with the same subject and
        // key identifier; certificates it signs verify against the original file.
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Signs a new leaf certificate with a fresh key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(spec.sans.clone())?;
        params.distinguished_name = dn(&spec.common_name);
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match spec.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "mqtt-stack development PKI");
    dn
}

/// Where the files of a PKI live.
#[derive(Debug, Clone)]
pub struct Layout {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Folder of the client pairs `<name>.crt` / `<name>.key`.
    pub client_dir: PathBuf,
}

impl Layout {
    /// The standard layout: `ca.crt`, `ca.key`, `broker.crt`, `broker.key`, clients, in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("broker.crt"),
            server_key: dir.join("broker.key"),
            client_dir: dir.into(),
        }
    }

    /// The layout around a broker's configured files: the CA key beside the CA
    /// certificate, the clients in the CA's folder.
    pub fn for_broker(ca_cert: &Path, server_cert: &Path, server_key: &Path) -> Self {
        let dir = ca_cert.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self {
            ca_cert: ca_cert.into(),
            ca_key: ca_cert.with_extension("key"),
            server_cert: server_cert.into(),
            server_key: server_key.into(),
            client_dir: dir,
        }
    }

    pub fn client_cert(&self, name: &str) -> PathBuf {
        self.client_dir.join(format!("{name}.crt"))
    }

    pub fn client_key(&self, name: &str) -> PathBuf {
        self.client_dir.join(format!("{name}.key"))
    }
}

/// What `ensure` should create.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Extra subject alternative names for the broker certificate.
    pub extra_sans: Vec<String>,
    /// Extra client identities besides publisher and subscriber.
    pub extra_clients: Vec<String>,
    /// Replace valid existing files too.
    pub force: bool,
}

/// One file `ensure` looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub path: PathBuf,
    pub written: bool,
}

/// Creates whatever part of the PKI is missing or invalid; keeps valid files unless
/// `force`. A new CA re-issues every certificate. Private keys are mode 0600.
pub fn ensure(layout: &Layout, request: &Request) -> Result<Vec<Outcome>, PkiError> {
    let mut outcomes = Vec::new();
    let ca_valid = !request.force && cert_usable(&layout.ca_cert);
    let (ca, new_ca) = if ca_valid {
        if !layout.ca_key.is_file() {
            return Err(PkiError::CaKeyMissing {
                cert: layout.ca_cert.clone(),
                key: layout.ca_key.clone(),
            });
        }
        (Authority::load(&layout.ca_cert, &layout.ca_key)?, false)
    } else {
        let ca = Authority::generate("mqtt-stack development CA")?;
        write_pair(
            &layout.ca_cert,
            &ca.cert_pem(),
            &layout.ca_key,
            &ca.key_pem(),
        )?;
        (ca, true)
    };
    outcomes.push(Outcome {
        path: layout.ca_cert.clone(),
        written: new_ca,
    });

    let rewrite = |cert: &Path, key: &Path| new_ca || !cert_usable(cert) || !key.is_file();
    if rewrite(&layout.server_cert, &layout.server_key) {
        let issued = ca.issue(&LeafSpec::server(
            "broker",
            server_sans(&request.extra_sans),
            LEAF_DAYS,
        ))?;
        write_pair(
            &layout.server_cert,
            &issued.cert_pem,
            &layout.server_key,
            &issued.key_pem,
        )?;
        outcomes.push(Outcome {
            path: layout.server_cert.clone(),
            written: true,
        });
    } else {
        outcomes.push(Outcome {
            path: layout.server_cert.clone(),
            written: false,
        });
    }

    let clients = DEFAULT_CLIENTS
        .iter()
        .map(|s| s.to_string())
        .chain(request.extra_clients.iter().cloned());
    for name in clients {
        let (cert, key) = (layout.client_cert(&name), layout.client_key(&name));
        let written = rewrite(&cert, &key);
        if written {
            let issued = ca.issue(&LeafSpec::client(&name, LEAF_DAYS))?;
            write_pair(&cert, &issued.cert_pem, &key, &issued.key_pem)?;
        }
        outcomes.push(Outcome {
            path: cert,
            written,
        });
    }
    Ok(outcomes)
}

/// localhost, the loopback addresses, this machine's hostname, and `extra`.
pub fn server_sans(extra: &[String]) -> Vec<String> {
    let mut sans: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some(host) = hostname() {
        sans.push(host);
    }
    sans.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    sans.retain(|s| seen.insert(s.clone()));
    sans
}

/// A certificate on disk, as `broker certs status` shows it.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub path: PathBuf,
    pub common_name: String,
    /// Serial number, hex.
    pub serial: String,
    pub raw_serial: Vec<u8>,
    pub not_after: OffsetDateTime,
    pub sans: Vec<String>,
    pub is_ca: bool,
}

impl CertInfo {
    pub fn days_left(&self) -> i64 {
        (self.not_after - OffsetDateTime::now_utc()).whole_days()
    }
}

/// Reads the first certificate of a PEM file.
pub fn read_cert(path: &Path) -> Result<CertInfo, PkiError> {
    let pem = fs::read(path).map_err(|cause| PkiError::Read {
        path: path.into(),
        cause,
    })?;
    let parse = |reason: String| PkiError::Parse {
        path: path.into(),
        reason,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| parse(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| parse(e.to_string()))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_string();
    let sans = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => ip_text(ip),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let not_after = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
        .map_err(|e| parse(e.to_string()))?;
    Ok(CertInfo {
        path: path.into(),
        common_name,
        serial: cert.raw_serial_as_string().replace(':', ""),
        raw_serial: cert.raw_serial().to_vec(),
        not_after,
        sans,
        is_ca: cert.is_ca(),
    })
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).to_string()),
        _ => None,
    }
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.into()))
    }
}

/// Issues (or re-issues) the client certificate `name`, signed by the CA.
pub fn issue_client(layout: &Layout, name: &str, days: i64) -> Result<PathBuf, PkiError> {
    check_name(name)?;
    let ca = Authority::load(&layout.ca_cert, &layout.ca_key)?;
    let issued = ca.issue(&LeafSpec::client(name, days))?;
    let cert = layout.client_cert(name);
    write_pair(
        &cert,
        &issued.cert_pem,
        &layout.client_key(name),
        &issued.key_pem,
    )?;
    Ok(cert)
}

/// The CRL beside the CA certificate.
pub fn crl_path(layout: &Layout) -> PathBuf {
    layout.client_dir.join("crl.pem")
}

/// The serial numbers a CRL file revokes; none when the file does not exist.
pub fn revoked_serials(crl: &Path) -> Result<Vec<Vec<u8>>, PkiError> {
    if !crl.exists() {
        return Ok(Vec::new());
    }
    let pem = fs::read(crl).map_err(|cause| PkiError::Read {
        path: crl.into(),
        cause,
    })?;
    let parse = |reason: String| PkiError::Parse {
        path: crl.into(),
        reason,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| parse(e.to_string()))?;
    let (_, list) = x509_parser::parse_x509_crl(&pem.contents).map_err(|e| parse(e.to_string()))?;
    Ok(list
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().to_vec())
        .collect())
}

/// What `revoke` did.
#[derive(Debug, Clone)]
pub struct Revoked {
    pub serial: String,
    pub crl: PathBuf,
    /// False when it was already in the CRL.
    pub newly: bool,
}

/// Adds certificate `name` to the CRL (created if absent), signed by the CA.
pub fn revoke(layout: &Layout, name: &str) -> Result<Revoked, PkiError> {
    check_name(name)?;
    let cert_path = layout.client_cert(name);
    if !cert_path.is_file() {
        return Err(PkiError::NoSuchCertificate(cert_path));
    }
    let info = read_cert(&cert_path)?;
    let crl = crl_path(layout);
    let mut serials = revoked_serials(&crl)?;
    let newly = !serials.contains(&info.raw_serial);
    if newly {
        serials.push(info.raw_serial.clone());
    }
    write_crl(layout, &serials)?;
    Ok(Revoked {
        serial: info.serial,
        crl,
        newly,
    })
}

/// Signs a CRL revoking `serials`, valid for 30 days, and writes it beside the CA.
pub fn write_crl(layout: &Layout, serials: &[Vec<u8>]) -> Result<PathBuf, PkiError> {
    let ca = Authority::load(&layout.ca_cert, &layout.ca_key)?;
    let now = OffsetDateTime::now_utc();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(30),
        crl_number: rcgen::SerialNumber::from(now.unix_timestamp().max(1) as u64),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(s),
                revocation_time: now,
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let list = params.signed_by(&ca.cert, &ca.key)?;
    let path = crl_path(layout);
    write_file(&path, &list.pem()?, 0o644)?;
    Ok(path)
}

/// Every certificate of the PKI folder, CA and broker first.
pub fn status(layout: &Layout) -> Result<Vec<CertInfo>, PkiError> {
    let mut paths = vec![layout.ca_cert.clone(), layout.server_cert.clone()];
    let mut clients: Vec<PathBuf> = fs::read_dir(&layout.client_dir)
        .map_err(|cause| PkiError::Read {
            path: layout.client_dir.clone(),
            cause,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "crt") && !paths.contains(p))
        .collect();
    clients.sort();
    paths.extend(clients);
    paths
        .iter()
        .filter(|p| p.is_file())
        .map(|p| read_cert(p))
        .collect()
}

/// Issues a new server certificate for the broker, keeping the SANs of the current
/// one and adding the default ones.
pub fn renew_server(layout: &Layout) -> Result<(), PkiError> {
    let ca = Authority::load(&layout.ca_cert, &layout.ca_key)?;
    let mut sans = server_sans(&[]);
    if let Ok(current) = read_cert(&layout.server_cert) {
        for s in current.sans {
            if !sans.contains(&s) {
                sans.push(s);
            }
        }
    }
    let issued = ca.issue(&LeafSpec::server("broker", sans, LEAF_DAYS))?;
    write_pair(
        &layout.server_cert,
        &issued.cert_pem,
        &layout.server_key,
        &issued.key_pem,
    )
}

fn hostname() -> Option<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty() && name != "localhost").then(|| name.to_string())
}

/// A certificate file that parses and is currently within its validity period.
fn cert_usable(path: &Path) -> bool {
    let Ok(pem) = fs::read(path) else {
        return false;
    };
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(&pem) else {
        return false;
    };
    pem.parse_x509()
        .map(|cert| cert.validity().is_valid())
        .unwrap_or(false)
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|cause| PkiError::Read {
        path: path.into(),
        cause,
    })
}

fn write_pair(cert: &Path, cert_pem: &str, key: &Path, key_pem: &str) -> Result<(), PkiError> {
    write_file(key, key_pem, 0o600)?;
    write_file(cert, cert_pem, 0o644)
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let err = |cause| PkiError::Write {
        path: path.into(),
        cause,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    // Written beside and renamed into place so a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_full_pki_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::in_dir(dir.path());
        let out = ensure(&layout, &Request::default()).unwrap();
        assert!(out.iter().all(|o| o.written));
        for name in ["ca", "broker", "publisher", "subscriber"] {
            let key = dir.path().join(format!("{name}.key"));
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}.key");
            assert!(cert_usable(&dir.path().join(format!("{name}.crt"))));
        }
        let pem = fs::read(dir.path().join("publisher.crt")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "publisher");
    }

    #[test]
    fn idempotent_and_extra_client_signed_by_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::in_dir(dir.path());
        ensure(&layout, &Request::default()).unwrap();
        let ca_before = fs::read(&layout.ca_cert).unwrap();
        let request = Request {
            extra_clients: vec!["sensor-1".into()],
            ..Request::default()
        };
        let out = ensure(&layout, &request).unwrap();
        let written: Vec<_> = out.iter().filter(|o| o.written).collect();
        assert_eq!(written.len(), 1);
        assert!(written[0].path.ends_with("sensor-1.crt"));
        assert_eq!(fs::read(&layout.ca_cert).unwrap(), ca_before);

        let forced = Request {
            force: true,
            ..Request::default()
        };
        let out = ensure(&layout, &forced).unwrap();
        assert!(out.iter().all(|o| o.written));
        assert_ne!(fs::read(&layout.ca_cert).unwrap(), ca_before);
    }

    #[test]
    fn ca_without_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::in_dir(dir.path());
        ensure(&layout, &Request::default()).unwrap();
        fs::remove_file(&layout.ca_key).unwrap();
        let err = ensure(&layout, &Request::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.key") && err.contains("--force"), "{err}");
    }

    #[test]
    fn server_sans_cover_loopback_and_extras() {
        let sans = server_sans(&["mqtt.example".into(), "localhost".into()]);
        for s in ["localhost", "127.0.0.1", "::1", "mqtt.example"] {
            assert_eq!(sans.iter().filter(|x| *x == s).count(), 1, "{s}");
        }
    }
}
