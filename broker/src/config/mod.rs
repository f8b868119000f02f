//! `broker.toml`, environment overrides (`BROKER__SECTION__KEY`) and validation.
//!
//! A leaf: every part of the broker reads its settings from here, and this module
//! imports none of them.

mod bridge;

pub(crate) use bridge::LOCAL_CLIENT_PREFIX;
pub use bridge::{BridgeConfig, BridgeProtocol, BridgeTopic, Direction};

use mqtt_common::topic;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Messages a session's inbox holds before publishers wait, unless configured otherwise.
pub(crate) const DEFAULT_INBOX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} not found: pass --config PATH or run from the folder that holds broker.toml")]
    NotFound { path: PathBuf },
    #[error("{path}: {cause}")]
    Invalid {
        path: PathBuf,
        cause: config::ConfigError,
    },
    #[error("{path}: {problem}")]
    Acl { path: PathBuf, problem: String },
    #[error("{path}: {problem}")]
    Bridge { path: PathBuf, problem: String },
    #[error("{path}: key `{key}`: {problem}")]
    BadValue {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listener: ListenerConfig,
    pub tls: TlsConfig,
    pub session: SessionConfig,
    pub storage: StorageConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    /// `[[acl]]` rules; none at all lets every authenticated identity do everything.
    pub acl: Vec<AclRule>,
    /// `[[bridge]]` sections: upstream brokers and the topics forwarded to and from them.
    #[serde(deserialize_with = "bridge::deserialize_bridges")]
    pub bridge: Vec<BridgeConfig>,
    /// The file this was read from, re-read to reload the ACL.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    #[serde(deserialize_with = "socket_addr")]
    pub bind: SocketAddr,
    pub handshake_timeout_secs: u64,
    pub connect_timeout_secs: u64,
    pub max_connections: usize,
    pub max_packet_size: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Revoked client certificates (PEM CRL, signed by the CA); none when absent.
    pub crl_file: Option<PathBuf>,
    pub auto_generate: bool,
    /// Close live connections whose certificate a reloaded CRL revokes.
    pub disconnect_revoked: bool,
    /// Renew the broker's certificate this many days before it expires (when the CA key
    /// is at hand, as in the development PKI); 0 disables renewal.
    pub renew_before_days: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// QoS 1/2 messages sent to a client and not yet acknowledged, at most.
    pub max_inflight: u16,
    /// Messages queued per session beyond the inflight window (offline included).
    pub max_queued: usize,
    /// Bytes (topics and payloads) queued per session, at most.
    pub max_queued_bytes: u64,
    /// What an offline session's full queue gives up: the new message or the oldest.
    pub queue_full: QueueFull,
    /// Seconds a connected client may leave its queue full (not reading) before it is
    /// disconnected as a slow consumer; its publishers wait meanwhile.
    pub slow_consumer_secs: u64,
    /// Messages of a persistent session's queue held in memory; the rest wait on disk.
    pub in_memory: usize,
    /// Longest keep alive granted; a larger request is lowered (MQTT 5 Server Keep Alive).
    pub max_keepalive_secs: u16,
    /// Published messages a session's inbox holds before their publishers wait for it.
    pub inbox: usize,
    /// Subscriptions one session may hold; a SUBSCRIBE beyond is refused (5.0: 0x97).
    pub max_subscriptions: usize,
    /// Bytes of a topic name or filter, at most: a PUBLISH beyond closes the connection
    /// (0x90), a SUBSCRIBE filter beyond is refused (0x8F).
    pub max_topic_length: usize,
    /// Levels of a topic name or filter, at most; beyond, as for `max_topic_length`.
    pub max_topic_levels: usize,
    /// The broker's Receive Maximum (MQTT 5, told in CONNACK): inbound QoS 2 messages a
    /// client may have awaiting PUBREL; one more closes the connection (0x93).
    pub receive_maximum: u16,
    /// Packets per second read from one connection, a second's worth of burst; beyond,
    /// reading it waits (nothing is dropped). 0: no limit.
    pub max_packets_per_sec: u64,
    /// Bytes per second read from one connection, the same way. 0: no limit.
    pub max_bytes_per_sec: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// A damaged store: `quarantine` (move it aside, start empty) or `fail`.
    pub on_corruption: OnCorruption,
    /// Memory the store may use to cache what it read or wrote, in MiB.
    pub cache_mb: u64,
    /// What an acknowledged QoS 1/2 message waits for: `disk` (stable storage) or `os`.
    pub sync: SyncMode,
}

/// How durable a write is before the broker acknowledges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(try_from = "String")]
pub enum SyncMode {
    /// On stable storage (fsync): survives a power cut or a kernel crash.
    #[default]
    Disk,
    /// Handed to the kernel: survives the broker's process dying, not the machine.
    Os,
}

impl TryFrom<String> for SyncMode {
    type Error = String;

    // The config crate's own enum errors name neither the key nor the choices.
    fn try_from(value: String) -> Result<Self, String> {
        match value.as_str() {
            "disk" => Ok(Self::Disk),
            "os" => Ok(Self::Os),
            other => Err(format!(
                "storage.sync must be \"disk\" or \"os\", not \"{other}\""
            )),
        }
    }
}

/// What a full queue of an offline session gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(try_from = "String")]
pub enum QueueFull {
    /// The message that does not fit (as Mosquitto does).
    #[default]
    DropNew,
    /// The oldest queued message, to make room.
    DropOldest,
}

/// What to do with a store that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(try_from = "String")]
pub enum OnCorruption {
    /// Move it aside, log where, and start empty.
    #[default]
    Quarantine,
    /// Refuse to start.
    Fail,
}

impl TryFrom<String> for QueueFull {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.as_str() {
            "drop_new" => Ok(Self::DropNew),
            "drop_oldest" => Ok(Self::DropOldest),
            other => Err(format!(
                "session.queue_full must be \"drop_new\" or \"drop_oldest\", not \"{other}\""
            )),
        }
    }
}

impl TryFrom<String> for OnCorruption {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.as_str() {
            "quarantine" => Ok(Self::Quarantine),
            "fail" => Ok(Self::Fail),
            other => Err(format!(
                "storage.on_corruption must be \"quarantine\" or \"fail\", not \"{other}\""
            )),
        }
    }
}

/// One `[[acl]]` rule: what an identity may publish to and subscribe to, and what not.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// Certificate CN, or `*` for any identity.
    pub identity: String,
    /// Topic patterns it may publish to (`%u` identity, `%c` client id).
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic patterns it may subscribe to.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Topic patterns it may not publish to, whatever any rule grants.
    #[serde(default)]
    pub deny_publish: Vec<String>,
    /// Topic patterns it may not receive, whatever any rule grants: a SUBSCRIBE inside
    /// one is refused, and a wider one is granted without them.
    #[serde(default)]
    pub deny_subscribe: Vec<String>,
}

/// Checks every rule; the error names the rule and the pattern (`acl[0].publish[1]`).
pub(crate) fn check_acl_rules(rules: &[AclRule]) -> Result<(), String> {
    for (i, rule) in rules.iter().enumerate() {
        if rule.identity.is_empty() {
            return Err(format!(
                "acl[{i}].identity: must be a certificate CN or \"*\""
            ));
        }
        for (key, patterns) in [
            ("publish", &rule.publish),
            ("subscribe", &rule.subscribe),
            ("deny_publish", &rule.deny_publish),
            ("deny_subscribe", &rule.deny_subscribe),
        ] {
            for (j, p) in patterns.iter().enumerate() {
                let sample = p.replace("%u", "u").replace("%c", "c");
                if !topic::valid_filter(&sample) {
                    return Err(format!(
                        "acl[{i}].{key}[{j}]: `{p}` is not a valid topic pattern"
                    ));
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint `/metrics`; empty disables it.
    pub bind: String,
    /// Seconds between two `$SYS` updates; 0 disables them.
    pub sys_interval_secs: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:9883".into(),
            sys_interval_secs: 10,
        }
    }
}

impl MetricsConfig {
    /// The endpoint's address, None when disabled.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.bind.parse().ok()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    /// Folder of the daily-rotated `broker.log`; empty: no file.
    pub dir: PathBuf,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([0, 0, 0, 0], 8883)),
            handshake_timeout_secs: 10,
            connect_timeout_secs: 10,
            max_connections: 10_000,
            max_packet_size: 1 << 20,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            ca_file: "certs/ca.crt".into(),
            cert_file: "certs/broker.crt".into(),
            key_file: "certs/broker.key".into(),
            crl_file: None,
            auto_generate: true,
            disconnect_revoked: true,
            renew_before_days: 30,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_inflight: 100,
            max_queued: 100_000,
            max_queued_bytes: 64 << 20,
            queue_full: QueueFull::DropNew,
            slow_consumer_secs: 30,
            in_memory: 1000,
            max_keepalive_secs: 3600,
            inbox: DEFAULT_INBOX,
            max_subscriptions: 1000,
            max_topic_length: 1024,
            max_topic_levels: 32,
            receive_maximum: 1024,
            max_packets_per_sec: 0,
            max_bytes_per_sec: 0,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: "data".into(),
            on_corruption: OnCorruption::Quarantine,
            cache_mb: 16,
            sync: SyncMode::Disk,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
            dir: "logs".into(),
        }
    }
}

impl ListenerConfig {
    pub(crate) fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}

impl Config {
    /// Reads `path`, applies `BROKER__SECTION__KEY` environment overrides, checks every
    /// value and resolves relative paths against the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::NotFound { path: path.into() });
        }
        let invalid = |cause| ConfigError::Invalid {
            path: path.into(),
            cause,
        };
        let mut config: Config = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("BROKER")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .map_err(invalid)?
            .try_deserialize()
            .map_err(invalid)?;
        config.validate(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.source = Some(path.into());
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key, problem: &str| {
            Err(ConfigError::BadValue {
                path: path.into(),
                key,
                problem: problem.into(),
            })
        };
        let l = &self.listener;
        if l.handshake_timeout_secs == 0 {
            return bad("listener.handshake_timeout_secs", "must be at least 1");
        }
        if l.connect_timeout_secs == 0 {
            return bad("listener.connect_timeout_secs", "must be at least 1");
        }
        if l.max_connections == 0 {
            return bad("listener.max_connections", "must be at least 1");
        }
        if !(128..=268_435_455).contains(&l.max_packet_size) {
            return bad(
                "listener.max_packet_size",
                "must be between 128 and 268435455 bytes",
            );
        }
        if !self.metrics.bind.is_empty() && self.metrics.addr().is_none() {
            return bad(
                "metrics.bind",
                "must be an address:port such as 127.0.0.1:9883, or empty to disable",
            );
        }
        if self.session.max_inflight == 0 {
            return bad("session.max_inflight", "must be at least 1");
        }
        if self.session.max_queued == 0 {
            return bad("session.max_queued", "must be at least 1");
        }
        if self.session.max_queued_bytes == 0 {
            return bad("session.max_queued_bytes", "must be at least 1");
        }
        if self.session.slow_consumer_secs == 0 {
            return bad("session.slow_consumer_secs", "must be at least 1");
        }
        if self.session.in_memory == 0 {
            return bad("session.in_memory", "must be at least 1");
        }
        if self.storage.cache_mb == 0 {
            return bad("storage.cache_mb", "must be at least 1");
        }
        let at_least_one = [
            ("session.inbox", self.session.inbox),
            ("session.max_subscriptions", self.session.max_subscriptions),
            ("session.max_topic_length", self.session.max_topic_length),
            ("session.max_topic_levels", self.session.max_topic_levels),
            (
                "session.receive_maximum",
                self.session.receive_maximum.into(),
            ),
        ];
        for (key, value) in at_least_one {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if let Err(problem) = check_acl_rules(&self.acl) {
            return Err(ConfigError::Acl {
                path: path.into(),
                problem,
            });
        }
        if let Err(problem) = bridge::check_bridges(&self.bridge) {
            return Err(ConfigError::Bridge {
                path: path.into(),
                problem,
            });
        }
        if !valid_log_level(&self.log.level) {
            return bad(
                "log.level",
                "must be a level (error, warn, info, debug, trace) or a tracing filter",
            );
        }
        Ok(())
    }

    /// Makes every relative path relative to `base` (the config file's folder).
    fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.tls.ca_file,
            &mut self.tls.cert_file,
            &mut self.tls.key_file,
            &mut self.storage.data_dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(crl) = &mut self.tls.crl_file {
            if crl.as_os_str().is_empty() {
                self.tls.crl_file = None;
            } else if crl.is_relative() {
                *crl = base.join(&*crl);
            }
        }
        for b in &mut self.bridge {
            b.resolve_paths(base);
        }
        if !self.log.dir.as_os_str().is_empty() && self.log.dir.is_relative() {
            self.log.dir = base.join(&self.log.dir);
        }
    }
}

fn socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "key `listener.bind`: `{text}` is not an address:port such as 0.0.0.0:8883"
        ))
    })
}

/// A level (`info`) or a list of them per target (`info,broker=debug`).
fn valid_log_level(text: &str) -> bool {
    use std::str::FromStr;
    use tracing::level_filters::LevelFilter;
    !text.is_empty()
        && text.split(',').all(|directive| {
            let level = directive.rsplit('=').next().unwrap_or(directive);
            LevelFilter::from_str(level.trim()).is_ok()
        })
        && tracing_subscriber::EnvFilter::try_new(text).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("broker.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn shipped_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker.toml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.listener.bind.port(), 8883);
        assert!(config.tls.auto_generate);
        assert!(config.tls.ca_file.ends_with("certs/ca.crt"));
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[tls]\nca_file = \"pki/ca.pem\"\n");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.tls.ca_file, dir.path().join("pki/ca.pem"));
        assert_eq!(config.storage.data_dir, dir.path().join("data"));
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[listener]\nbindd = \"0.0.0.0:1\"\n");
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("bindd"), "{err}");
        assert!(err.contains("broker.toml"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[listener]\nmax_connections = \"many\"\n");
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("max_connections"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[listener]\nhandshake_timeout_secs = 0\n");
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("listener.handshake_timeout_secs"), "{err}");
        let path = write(dir.path(), "[log]\nlevel = \"loud!!\"\n");
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("log.level"), "{err}");
        for key in [
            "inbox",
            "max_subscriptions",
            "max_topic_levels",
            "receive_maximum",
        ] {
            let path = write(dir.path(), &format!("[session]\n{key} = 0\n"));
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(err.contains(&format!("session.{key}")), "{err}");
        }
    }

    #[test]
    fn storage_sync_is_disk_unless_said_and_a_bad_mode_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[storage]\ncache_mb = 8\n");
        assert_eq!(Config::load(&path).unwrap().storage.sync, SyncMode::Disk);
        let path = write(dir.path(), "[storage]\nsync = \"os\"\n");
        assert_eq!(Config::load(&path).unwrap().storage.sync, SyncMode::Os);
        let path = write(dir.path(), "[storage]\nsync = \"fast\"\n");
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("sync") && err.contains("disk"), "{err}");
        let path = write(dir.path(), "[storage]\non_corruption = \"ignore\"\n");
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("storage.on_corruption") && err.contains("quarantine"),
            "{err}"
        );
        let path = write(dir.path(), "[session]\nqueue_full = \"block\"\n");
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("session.queue_full") && err.contains("drop_oldest"),
            "{err}"
        );
        let path = write(dir.path(), "[session]\nqueue_full = \"drop_oldest\"\n");
        assert_eq!(
            Config::load(&path).unwrap().session.queue_full,
            QueueFull::DropOldest
        );
    }

    #[test]
    fn bridge_sections_load_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"
[[bridge]]
name = "cloud"
address = "cloud.example.com:8883"
ca_file = "certs/cloud-ca.crt"
cert_file = "certs/bridge.crt"
key_file = "certs/bridge.key"
client_id = "edge-1"
protocol = "3.1.1"
keep_alive_secs = 30
local_identity = "bridge-cloud"

[[bridge.topic]]
pattern = "articulos/#"
direction = "both"
qos = 1
local_prefix = ""
remote_prefix = "sites/edge-1/"
"#;
        let config = Config::load(&write(dir.path(), text)).unwrap();
        let b = &config.bridge[0];
        assert_eq!(b.protocol, BridgeProtocol::V311);
        assert_eq!(b.topic[0].direction, Direction::Both);
        assert_eq!(b.topic[0].remote_prefix, "sites/edge-1/");
        assert_eq!(b.ca_file, dir.path().join("certs/cloud-ca.crt"));
        let err = Config::load(&write(
            dir.path(),
            &text.replace("\"both\"", "\"sideways\""),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("direction") && err.contains("sideways"),
            "{err}"
        );
        let err = Config::load(&write(dir.path(), &text.replace("\"3.1.1\"", "\"4.0\"")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("protocol") && err.contains("4.0"), "{err}");
        let err = Config::load(&write(dir.path(), &text.replace("8883", "x")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[[bridge]] \"cloud\": address"), "{err}");
    }

    #[test]
    fn missing_file_says_what_to_do() {
        let err = Config::load(Path::new("/nonexistent/broker.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/broker.toml") && err.contains("--config"));
    }
}
