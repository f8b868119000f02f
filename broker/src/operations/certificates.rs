//! The broker's certificates over time: warnings before they (or the CRL) expire, and
//! renewal of the broker's own certificate when the CA key is at hand.

use crate::config::TlsConfig;
use crate::security::{pki, tls};
use tracing::{error, warn};

/// Certificates expiring within this many days are reported at WARN.
const EXPIRY_WARNING_DAYS: f64 = 30.0;

/// WARN for every loaded certificate (and the CRL's next update) due within 30 days.
pub(crate) fn check_expiry(config: &TlsConfig) {
    for path in [&config.ca_file, &config.cert_file] {
        if let Some(days) = tls::days_until_expiry(path) {
            if days < EXPIRY_WARNING_DAYS {
                warn!(file = %path.display(), days_left = days.floor() as i64,
                    "certificate expires soon: renew it");
            }
        }
    }
    if let Some(crl) = &config.crl_file {
        if let Some(days) = tls::crl_days_until_next_update(crl) {
            if days < EXPIRY_WARNING_DAYS {
                warn!(file = %crl.display(), days_left = days.floor() as i64,
                    "CRL next update is due soon: re-sign it (broker certs revoke re-signs)");
            }
        }
    }
}

/// Renews the broker's certificate `renew_before_days` before it expires, when the CA
/// key sits beside the CA certificate (the development PKI). True when renewed.
pub(crate) fn renew_if_due(config: &TlsConfig) -> bool {
    if config.renew_before_days == 0 {
        return false;
    }
    let layout = pki::Layout::for_broker(&config.ca_file, &config.cert_file, &config.key_file);
    if !layout.ca_key.is_file() {
        return false;
    }
    let Some(days) = tls::days_until_expiry(&config.cert_file) else {
        return false;
    };
    if days >= f64::from(config.renew_before_days) {
        return false;
    }
    match pki::renew_server(&layout) {
        Ok(()) => {
            warn!(cert = %config.cert_file.display(), days_left = days.floor() as i64,
                "broker certificate was close to expiry: renewed with the CA key");
            true
        }
        Err(e) => {
            error!(cert = %config.cert_file.display(), error = %e, "broker certificate renewal failed");
            false
        }
    }
}
