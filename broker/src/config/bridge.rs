//! `[[bridge]]` sections: an upstream broker this one connects to as a client, and the
//! topics forwarded each way. Read and checked here; the `bridge` layer runs them.

use mqtt_common::topic;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// One `[[bridge]]` section, as read: enumerations still text, so that a bad value is
/// reported with the section it is in (serde's own errors name neither).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBridge {
    name: String,
    address: String,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default = "default_keep_alive")]
    keep_alive_secs: u16,
    #[serde(default)]
    local_identity: Option<String>,
    #[serde(default = "default_max_queued")]
    max_queued: usize,
    #[serde(default = "default_max_queued_bytes")]
    max_queued_bytes: u64,
    #[serde(default = "default_max_inflight")]
    max_inflight: u16,
    #[serde(default)]
    topic: Vec<RawTopic>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopic {
    pattern: String,
    #[serde(default)]
    direction: Option<String>,
    #[serde(default = "default_qos")]
    qos: u8,
    #[serde(default)]
    local_prefix: String,
    #[serde(default)]
    remote_prefix: String,
}

/// Reads the `[[bridge]]` sections; a bad `protocol` or `direction` names its section.
pub(super) fn deserialize_bridges<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<BridgeConfig>, D::Error> {
    let raw = Vec::<RawBridge>::deserialize(d)?;
    raw.into_iter()
        .map(|r| {
            let section = format!("[[bridge]] \"{}\"", r.name);
            let bad = |e: String| serde::de::Error::custom(format!("{section}: {e}"));
            let protocol = match r.protocol {
                Some(p) => BridgeProtocol::try_from(p).map_err(bad)?,
                None => BridgeProtocol::default(),
            };
            let topic = r
                .topic
                .into_iter()
                .enumerate()
                .map(|(j, t)| {
                    let direction = match t.direction {
                        Some(d) => Direction::try_from(d)
                            .map_err(|e| bad(e.replace("bridge.topic.", &format!("topic[{j}].")))),
                        None => Ok(Direction::default()),
                    }?;
                    Ok(BridgeTopic {
                        pattern: t.pattern,
                        direction,
                        qos: t.qos,
                        local_prefix: t.local_prefix,
                        remote_prefix: t.remote_prefix,
                    })
                })
                .collect::<Result<Vec<_>, D::Error>>()?;
            Ok(BridgeConfig {
                name: r.name,
                address: r.address,
                ca_file: r.ca_file,
                cert_file: r.cert_file,
                key_file: r.key_file,
                client_id: r.client_id,
                protocol,
                keep_alive_secs: r.keep_alive_secs,
                local_identity: r.local_identity,
                max_queued: r.max_queued,
                max_queued_bytes: r.max_queued_bytes,
                max_inflight: r.max_inflight,
                topic,
            })
        })
        .collect()
}

/// One `[[bridge]]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// In logs, metrics and the bridge's local client id (`$bridge/<name>`).
    pub name: String,
    /// The upstream's `host:port`; always TLS. Resolved again on every attempt.
    pub address: String,
    /// CA of the upstream's certificate.
    pub ca_file: PathBuf,
    /// Our client certificate towards the upstream, re-read on every attempt.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Client id towards the upstream; `<hostname>-<name>` when absent.
    pub client_id: Option<String>,
    /// MQTT version spoken to the upstream.
    pub protocol: BridgeProtocol,
    pub keep_alive_secs: u16,
    /// The identity the `[[acl]]` rules see for the bridge's local session: what it
    /// subscribes to (out) and publishes (in). `bridge-<name>` when absent.
    pub local_identity: Option<String>,
    /// Messages waiting for the upstream, at most (beyond, `[session] queue_full`).
    pub max_queued: usize,
    /// Bytes (topics and payloads) waiting for the upstream, at most.
    pub max_queued_bytes: u64,
    /// Messages sent to the upstream and not yet acknowledged, at most (an MQTT 5
    /// upstream's Receive Maximum lowers it).
    pub max_inflight: u16,
    pub topic: Vec<BridgeTopic>,
}

/// One `[[bridge.topic]]`: a filter T forwarded out, in or both ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeTopic {
    /// The filter T; the local side sees `local_prefix + T`, the remote `remote_prefix + T`.
    pub pattern: String,
    pub direction: Direction,
    /// The subscription's QoS on the side messages come from.
    pub qos: u8,
    pub local_prefix: String,
    pub remote_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BridgeProtocol {
    V311,
    #[default]
    V5,
}

impl BridgeProtocol {
    /// As `protocol` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5",
        }
    }
}

impl TryFrom<String> for BridgeProtocol {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.as_str() {
            "3.1.1" | "311" | "4" => Ok(Self::V311),
            "5" | "5.0" => Ok(Self::V5),
            other => Err(format!(
                "protocol must be \"3.1.1\" or \"5\", not \"{other}\""
            )),
        }
    }
}

/// Which way a bridged topic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// Local to remote.
    #[default]
    Out,
    /// Remote to local.
    In,
    Both,
}

impl Direction {
    pub(crate) fn out(self) -> bool {
        matches!(self, Self::Out | Self::Both)
    }
    pub(crate) fn inward(self) -> bool {
        matches!(self, Self::In | Self::Both)
    }
}

impl TryFrom<String> for Direction {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.as_str() {
            "out" => Ok(Self::Out),
            "in" => Ok(Self::In),
            "both" => Ok(Self::Both),
            other => Err(format!(
                "bridge.topic.direction must be \"out\", \"in\" or \"both\", not \"{other}\""
            )),
        }
    }
}

fn default_keep_alive() -> u16 {
    30
}
fn default_max_queued() -> usize {
    1_000_000
}
fn default_max_queued_bytes() -> u64 {
    1 << 30
}
fn default_max_inflight() -> u16 {
    100
}
fn default_qos() -> u8 {
    1
}

/// The client id every bridge's local session has: no network client may take it.
pub(crate) const LOCAL_CLIENT_PREFIX: &str = "$bridge/";

impl BridgeConfig {
    /// The client id sent to the upstream.
    pub fn remote_client_id(&self) -> String {
        match &self.client_id {
            Some(id) => id.clone(),
            None => format!("{}-{}", hostname(), self.name),
        }
    }

    /// The identity of the bridge's local session.
    pub fn local_identity(&self) -> String {
        match &self.local_identity {
            Some(identity) => identity.clone(),
            None => format!("bridge-{}", self.name),
        }
    }

    /// The client id of the bridge's local session.
    pub(crate) fn local_client_id(&self) -> String {
        format!("{LOCAL_CLIENT_PREFIX}{}", self.name)
    }

    /// The upstream's host name, as its certificate must carry it.
    pub(crate) fn host(&self) -> &str {
        let host = match self.address.rsplit_once(':') {
            Some((host, _)) => host,
            None => &self.address,
        };
        host.trim_start_matches('[').trim_end_matches(']')
    }

    pub(super) fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.ca_file, &mut self.cert_file, &mut self.key_file] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

/// This machine's name, for default client ids.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "broker".into())
}

/// Checks every section; the error names the section (`[[bridge]] "cloud"`) and the key.
pub(crate) fn check_bridges(bridges: &[BridgeConfig]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for (i, b) in bridges.iter().enumerate() {
        let section = if b.name.is_empty() {
            format!("[[bridge]] #{}", i + 1)
        } else {
            format!("[[bridge]] \"{}\"", b.name)
        };
        check_bridge(b).map_err(|problem| format!("{section}: {problem}"))?;
        if !names.insert(b.name.as_str()) {
            return Err(format!("{section}: name: another [[bridge]] has it"));
        }
    }
    Ok(())
}

fn check_bridge(b: &BridgeConfig) -> Result<(), String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if b.name.is_empty() || !b.name.chars().all(plain) {
        return Err("name: must be letters, digits, '-', '_' or '.'".into());
    }
    match b.address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
        _ => {
            return Err(format!(
                "address: `{}` is not host:port such as cloud.example.com:8883",
                b.address
            ))
        }
    }
    for (key, path) in [
        ("ca_file", &b.ca_file),
        ("cert_file", &b.cert_file),
        ("key_file", &b.key_file),
    ] {
        if path.as_os_str().is_empty() {
            return Err(format!("{key}: must name a PEM file"));
        }
    }
    if b.client_id.as_deref() == Some("") {
        return Err("client_id: must not be empty (leave it out for <hostname>-<name>)".into());
    }
    if b.local_identity.as_deref() == Some("") {
        return Err("local_identity: must not be empty (leave it out for bridge-<name>)".into());
    }
    for (key, zero) in [
        ("max_queued", b.max_queued == 0),
        ("max_queued_bytes", b.max_queued_bytes == 0),
        ("max_inflight", b.max_inflight == 0),
    ] {
        if zero {
            return Err(format!("{key}: must be at least 1"));
        }
    }
    if b.topic.is_empty() {
        return Err("needs at least one [[bridge.topic]]".into());
    }
    for (j, t) in b.topic.iter().enumerate() {
        let at = format!("topic[{j}]");
        if t.qos > 2 {
            return Err(format!("{at}.qos: must be 0, 1 or 2"));
        }
        for (key, prefix) in [
            ("local_prefix", &t.local_prefix),
            ("remote_prefix", &t.remote_prefix),
        ] {
            if prefix.contains(['+', '#']) {
                return Err(format!("{at}.{key}: `{prefix}` must not hold wildcards"));
            }
            let filter = format!("{prefix}{}", t.pattern);
            if !topic::valid_filter(&filter) {
                return Err(format!(
                    "{at}: `{filter}` ({key} + pattern) is not a valid topic filter"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge() -> BridgeConfig {
        BridgeConfig {
            name: "cloud".into(),
            address: "cloud.example.com:8883".into(),
            ca_file: "ca.crt".into(),
            cert_file: "b.crt".into(),
            key_file: "b.key".into(),
            client_id: None,
            protocol: BridgeProtocol::V5,
            keep_alive_secs: 30,
            local_identity: None,
            max_queued: 10,
            max_queued_bytes: 10,
            max_inflight: 10,
            topic: vec![BridgeTopic {
                pattern: "articulos/#".into(),
                direction: Direction::Out,
                qos: 1,
                local_prefix: String::new(),
                remote_prefix: "sites/edge-1/".into(),
            }],
        }
    }

    #[test]
    fn each_problem_names_the_section_and_key() {
        let check = |f: &dyn Fn(&mut BridgeConfig)| {
            let mut b = bridge();
            f(&mut b);
            check_bridges(&[b]).err().unwrap_or_default()
        };
        assert_eq!(check(&|_| {}), "");
        let err = check(&|b| b.address = "nohost".into());
        assert!(err.starts_with("[[bridge]] \"cloud\": address"), "{err}");
        let err = check(&|b| b.topic[0].pattern = "a/#/b".into());
        assert!(err.contains("topic[0]") && err.contains("a/#/b"), "{err}");
        let err = check(&|b| b.topic[0].remote_prefix = "x/+/".into());
        assert!(err.contains("topic[0].remote_prefix"), "{err}");
        let err = check(&|b| b.topic[0].qos = 3);
        assert!(err.contains("topic[0].qos"), "{err}");
        let err = check(&|b| b.topic.clear());
        assert!(err.contains("[[bridge.topic]]"), "{err}");
        let err = check(&|b| b.name = "a b".into());
        assert!(err.starts_with("[[bridge]] \"a b\": name"), "{err}");
        let err = check(&|b| b.name = String::new());
        assert!(err.starts_with("[[bridge]] #1: name"), "{err}");
        let err = check_bridges(&[bridge(), bridge()]).unwrap_err();
        assert!(err.contains("another [[bridge]]"), "{err}");
    }

    #[test]
    fn defaults_derive_from_the_name() {
        let b = bridge();
        assert_eq!(b.local_identity(), "bridge-cloud");
        assert_eq!(b.local_client_id(), "$bridge/cloud");
        assert!(b.remote_client_id().ends_with("-cloud"));
        assert_eq!(b.host(), "cloud.example.com");
        let mut b = bridge();
        b.address = "[::1]:8883".into();
        assert_eq!(b.host(), "::1");
    }
}
