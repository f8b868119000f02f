//! What changes while the broker runs: the ACL and the `[[bridge]]` sections of the
//! configuration file, and the TLS material (CA, certificate, key, CRL), reloaded on
//! SIGHUP and when their files change. The watcher also runs the
//! daily certificate checks (`certificates`).

use super::certificates::{check_expiry, renew_if_due};
use crate::bridge::BridgeControl;
use crate::config::Config;
use crate::security::acl::Acl;
use crate::security::{pki, tls};
use crate::shared::registry::Control;
use crate::shared::Shared;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tracing::{error, info};

/// How often watched files are checked for changes.
const POLL: Duration = Duration::from_secs(1);
/// How often expiry is checked (and the broker's certificate renewed when due).
const EXPIRY_CHECK: Duration = Duration::from_secs(24 * 3600);

/// Reloads the ACL, the bridges and the TLS material of a running broker.
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
    bridges: BridgeControl,
}

impl Reloader {
    pub(crate) fn new(shared: Arc<Shared>, bridges: BridgeControl) -> Self {
        Self { shared, bridges }
    }

    /// Everything a SIGHUP reloads.
    pub fn reload_all(&self) {
        self.reload_acl();
        self.reload_tls();
    }

    /// Loads the configuration file again and swaps in its ACL and its bridges; an
    /// invalid file (a bad `[[bridge]]` section included) keeps both in force and says
    /// why, naming the section.
    pub fn reload_acl(&self) {
        let Some(path) = self.shared.config.source.clone() else {
            return;
        };
        let refused = |e: &dyn std::fmt::Display| {
            error!(file = %path.display(), error = %e,
                "configuration reload failed; the previous ACL and bridges stay in force")
        };
        let config = match Config::load(&path) {
            Ok(config) => config,
            Err(e) => return refused(&e),
        };
        let acl = match Acl::new(config.acl) {
            Ok(acl) => acl,
            Err(e) => return refused(&e),
        };
        let rules = acl.rules().len();
        self.shared.policy.set_acl(acl);
        info!(file = %path.display(), rules, bridges = config.bridge.len(), "ACL and bridges reloaded");
        self.bridges.apply(config.bridge);
    }

    /// Loads the TLS files again for new handshakes; live connections stay up, except
    /// those whose certificate the CRL now revokes. Invalid material is refused and the
    /// old stays in force.
    pub fn reload_tls(&self) {
        let config = &self.shared.config.tls;
        match tls::load(config) {
            Ok(material) => {
                let revoked = Arc::new(material.revoked.clone());
                self.shared.policy.set_tls(material);
                let serial = pki::read_cert(&config.cert_file)
                    .map(|c| c.serial)
                    .unwrap_or_default();
                info!(cert = %config.cert_file.display(), serial = %serial, revoked = revoked.len(),
                    "TLS material reloaded: used for new handshakes");
                if config.disconnect_revoked && !revoked.is_empty() {
                    self.shared
                        .registry
                        .broadcast(|| Control::Revoked(revoked.clone()));
                }
            }
            Err(e) => {
                error!(error = %e, "TLS reload failed; the previous certificates stay in force")
            }
        }
    }
}

/// Watches the configuration file (ACL) and the TLS files until `stopped` changes;
/// checks expiry daily.
pub(crate) async fn watch(reloader: Reloader, mut stopped: watch::Receiver<bool>) {
    let config = reloader.shared.config.clone();
    let tls_files: Vec<PathBuf> = [
        Some(config.tls.ca_file.clone()),
        Some(config.tls.cert_file.clone()),
        Some(config.tls.key_file.clone()),
        config.tls.crl_file.clone(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let stamps = |files: &[PathBuf]| -> Vec<Option<SystemTime>> {
        files
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    };
    let config_file: Vec<PathBuf> = config.source.iter().cloned().collect();
    let mut last_config = stamps(&config_file);
    let mut last_tls = stamps(&tls_files);
    let mut next_expiry_check = tokio::time::Instant::now() + EXPIRY_CHECK;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stopped.changed() => return,
        }
        let now_config = stamps(&config_file);
        if now_config != last_config {
            last_config = now_config;
            info!("configuration file changed");
            reloader.reload_acl();
        }
        if tokio::time::Instant::now() >= next_expiry_check {
            next_expiry_check += EXPIRY_CHECK;
            check_expiry(&config.tls);
            // A renewed certificate is picked up by the file check below.
            renew_if_due(&config.tls);
        }
        let now_tls = stamps(&tls_files);
        if now_tls != last_tls {
            last_tls = now_tls;
            info!("TLS files changed");
            reloader.reload_tls();
        }
    }
}
