//! One development PKI for both brokers, made with `broker::pki`.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// The files of the benchmark PKI.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    /// Creates (or keeps) a CA, a broker certificate for 127.0.0.1/localhost and the
    /// `publisher` and `subscriber` client certificates in `dir`.
    pub fn ensure(dir: &Path) -> anyhow::Result<Self> {
        let layout = broker::pki::Layout::in_dir(dir);
        broker::pki::ensure(&layout, &broker::pki::Request::default())
            .with_context(|| format!("cannot create the benchmark PKI in {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            ca: layout.ca_cert,
            server_cert: layout.server_cert,
            server_key: layout.server_key,
        })
    }

    pub fn client_cert(&self, identity: &str) -> PathBuf {
        self.dir.join(format!("{identity}.crt"))
    }

    pub fn client_key(&self, identity: &str) -> PathBuf {
        self.dir.join(format!("{identity}.key"))
    }
}
