//! `broker health`: the healthcheck of a container or a service manager. A scratch image
//! has no shell or curl, so the binary itself asks the running broker's `/metrics`
//! endpoint for a page, which also proves the store was loaded and the listener opened
//! (the endpoint starts after both). It does not touch the MQTT port: a probe there would
//! log a refusal at every check.

use crate::config::MetricsConfig;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// A metric every broker exposes from its start: proof the page is ours.
const PROOF: &str = "broker_connections_open";
/// Enough of the page to find the status line and [`PROOF`]; the rest is not read.
const MAX_READ: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("[metrics] bind is empty or not an address: `broker health` asks the metrics endpoint, so enable it")]
    Disabled,
    #[error("no answer from http://{addr}/metrics: {cause}")]
    Unreachable {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("http://{addr}/metrics answered `{status}` without broker metrics")]
    NotBroker { addr: SocketAddr, status: String },
}

/// Where a client reaches an endpoint bound to `bind`: an unspecified address
/// (0.0.0.0, ::), as in a container, is reached on the loopback of its family.
pub fn probe_addr(bind: SocketAddr) -> SocketAddr {
    let ip = match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bind.port())
}

/// Asks the endpoint of `metrics` for `/metrics`, each step within `timeout`; returns the
/// address that answered with a page of broker metrics.
pub fn check(metrics: &MetricsConfig, timeout: Duration) -> Result<SocketAddr, HealthError> {
    let addr = probe_addr(metrics.addr().ok_or(HealthError::Disabled)?);
    let unreachable = |cause| HealthError::Unreachable { addr, cause };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(unreachable)?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(unreachable)?;
    let mut page = Vec::new();
    stream
        .take(MAX_READ)
        .read_to_end(&mut page)
        .map_err(unreachable)?;
    let page = String::from_utf8_lossy(&page);
    let status = page.lines().next().unwrap_or_default().trim();
    let ok = status.split_whitespace().nth(1) == Some("200");
    if ok && page.contains(PROOF) {
        Ok(addr)
    } else {
        Err(HealthError::NotBroker {
            addr,
            status: status.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn config(addr: SocketAddr) -> MetricsConfig {
        MetricsConfig {
            bind: addr.to_string(),
            ..MetricsConfig::default()
        }
    }

    /// A one-shot HTTP server answering `reply` to the first request.
    fn serve_once(reply: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(reply.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn unspecified_binds_are_probed_on_loopback() {
        let probe = |s: &str| probe_addr(s.parse().unwrap()).to_string();
        assert_eq!(probe("0.0.0.0:9883"), "127.0.0.1:9883");
        assert_eq!(probe("[::]:9883"), "[::1]:9883");
        assert_eq!(probe("10.0.0.5:9883"), "10.0.0.5:9883");
    }

    #[test]
    fn a_page_of_broker_metrics_is_healthy() {
        let addr =
            serve_once("HTTP/1.1 200 OK\r\ncontent-length: 26\r\n\r\nbroker_connections_open 0\n");
        assert_eq!(check(&config(addr), Duration::from_secs(5)).unwrap(), addr);
    }

    #[test]
    fn another_server_or_an_error_status_is_not() {
        for reply in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            "HTTP/1.1 503 Service Unavailable\r\n\r\nbroker_connections_open 0\n",
            "",
        ] {
            let addr = serve_once(reply);
            let err = check(&config(addr), Duration::from_secs(5)).unwrap_err();
            assert!(
                matches!(err, HealthError::NotBroker { .. }),
                "{reply:?}: {err}"
            );
        }
    }

    #[test]
    fn nothing_listening_or_disabled_is_an_error_naming_why() {
        let free = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = check(&config(free), Duration::from_secs(5)).unwrap_err();
        assert!(
            err.to_string().contains(&format!("http://{free}/metrics")),
            "{err}"
        );
        let disabled = MetricsConfig {
            bind: String::new(),
            ..MetricsConfig::default()
        };
        assert!(matches!(
            check(&disabled, Duration::from_secs(1)),
            Err(HealthError::Disabled)
        ));
    }
}
