//! The policy in force: the TLS material for new handshakes and the ACL. Both are
//! swapped whole when their files change or on SIGHUP; readers take an `Arc` of the
//! current one and never see half of a reload.

use crate::security::acl::Acl;
use crate::security::tls::TlsMaterial;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

pub(crate) struct Policy {
    /// Certificates, key, CRL: what new handshakes use.
    tls: RwLock<Arc<TlsMaterial>>,
    /// The `[[acl]]` rules.
    acl: RwLock<Arc<Acl>>,
    /// Bumped on every ACL change, so sessions re-check their subscriptions.
    acl_generation: AtomicU64,
}

impl Policy {
    pub(crate) fn new(tls: TlsMaterial, acl: Acl) -> Self {
        Self {
            tls: RwLock::new(Arc::new(tls)),
            acl: RwLock::new(Arc::new(acl)),
            acl_generation: AtomicU64::new(0),
        }
    }

    /// The acceptor for new handshakes.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.tls().acceptor.clone()
    }

    /// The TLS material in force (expiry dates, revoked serials).
    pub(crate) fn tls(&self) -> Arc<TlsMaterial> {
        // A panic while holding the lock leaves a whole value behind: carry on with it.
        self.tls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_tls(&self, material: TlsMaterial) {
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(material);
    }

    pub(crate) fn acl(&self) -> Arc<Acl> {
        self.acl.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn acl_generation(&self) -> u64 {
        self.acl_generation.load(Ordering::Acquire)
    }

    pub(crate) fn set_acl(&self, acl: Acl) {
        *self.acl.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(acl);
        self.acl_generation.fetch_add(1, Ordering::AcqRel);
    }
}
