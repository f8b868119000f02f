//! The broker under test: ours (`target/release/broker`) or Mosquitto, configured
//! equivalently in a temporary folder, run as a child process and measured through /proc.

use crate::client::{self, ConnectOpts};
use crate::pki::Pki;
use anyhow::{bail, Context};
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_rustls::TlsConnector;

/// Which broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Ours,
    Mosquitto,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ours => "ours",
            Kind::Mosquitto => "mosquitto",
        }
    }
}

/// How to start a broker.
#[derive(Debug, Clone)]
pub struct Spec {
    pub kind: Kind,
    pub bin: PathBuf,
    pub pki: Pki,
    pub port: u16,
    /// Folder for the configuration, the log and the persistent data.
    pub dir: PathBuf,
    /// Mosquitto: `persistence true` (ours always persists retained messages).
    pub persistence: bool,
    /// Messages a session may have queued (both brokers); ours also gets 1 KiB per
    /// message as its byte limit.
    pub max_queued: usize,
    /// Ours: the per-connection read budget (`[session] max_packets_per_sec`,
    /// `max_bytes_per_sec`); 0 is off, the default. Mosquitto has no equivalent.
    pub budget: ReadBudget,
}

/// Packets and bytes per second one connection may send to our broker; 0: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadBudget {
    pub packets: u64,
    pub bytes: u64,
}

/// A running broker, killed when dropped.
pub struct Broker {
    pub spec: Spec,
    child: Child,
    pub spawned_at: Instant,
    pub log: PathBuf,
}

/// Our broker next to this executable (`target/release/broker`).
pub fn default_ours_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("broker")))
        .unwrap_or_else(|| PathBuf::from("target/release/broker"))
}

/// `mosquitto` on PATH, else /usr/sbin/mosquitto, if either exists.
pub fn find_mosquitto() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("mosquitto"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/mosquitto");
        sbin.is_file().then_some(sbin)
    })
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("local address")?.port())
}

fn ours_config(spec: &Spec) -> String {
    let p = |path: &Path| format!("{:?}", path.display().to_string());
    format!(
        r#"# Benchmark configuration: no [[acl]] rule, so every identity may do everything.
[listener]
bind = "127.0.0.1:{port}"
max_connections = 20000

[tls]
ca_file = {ca}
cert_file = {cert}
key_file = {key}
auto_generate = false

[session]
max_inflight = 100
max_queued = {max_queued}
max_queued_bytes = {max_queued_bytes}
max_packets_per_sec = {packets}
max_bytes_per_sec = {bytes}

[storage]
data_dir = {data}

# Served as in production, on a free port so that runs never collide.
[metrics]
bind = "127.0.0.1:0"

[log]
level = "warn,broker::server=info"
dir = ""
"#,
        port = spec.port,
        ca = p(&spec.pki.ca),
        cert = p(&spec.pki.server_cert),
        key = p(&spec.pki.server_key),
        data = p(&spec.dir.join("data")),
        max_queued = spec.max_queued,
        max_queued_bytes = spec.max_queued as u64 * 1024,
        packets = spec.budget.packets,
        bytes = spec.budget.bytes,
    )
}

fn mosquitto_config(spec: &Spec) -> String {
    let persistence = if spec.persistence {
        format!(
            "persistence true\npersistence_location {}/\nautosave_interval 0\n",
            spec.dir.join("data").display()
        )
    } else {
        "persistence false\n".to_string()
    };
    format!(
        "# Benchmark configuration, equivalent to ours: mutual TLS, identity = certificate CN.\n\
         user root\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         max_inflight_messages 100\n\
         max_queued_messages {max_queued}\n\
         {persistence}\
         log_dest file {log}\n\
         log_type error\n\
         log_type warning\n\
         connection_messages false\n\
         listener {port} 127.0.0.1\n\
         max_connections -1\n\
         set_tcp_nodelay true\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         require_certificate true\n\
         use_identity_as_username true\n",
        port = spec.port,
        log = spec.dir.join("broker.log").display(),
        ca = spec.pki.ca.display(),
        cert = spec.pki.server_cert.display(),
        key = spec.pki.server_key.display(),
        max_queued = spec.max_queued,
    )
}

impl Broker {
    /// Writes the configuration and starts the broker (not yet ready: see [`Broker::wait_ready`]).
    pub fn spawn(spec: Spec) -> anyhow::Result<Self> {
        fs::create_dir_all(spec.dir.join("data"))
            .with_context(|| format!("cannot create {}", spec.dir.display()))?;
        let out_path = spec.dir.join(format!("{}.out", spec.kind.name()));
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .with_context(|| format!("cannot open {}", out_path.display()))?;
        let err = out.try_clone().context("duplicating the log file")?;
        let (conf_path, conf, log) = match spec.kind {
            Kind::Ours => (
                spec.dir.join("broker.toml"),
                ours_config(&spec),
                out_path.clone(),
            ),
            Kind::Mosquitto => (
                spec.dir.join("mosquitto.conf"),
                mosquitto_config(&spec),
                spec.dir.join("broker.log"),
            ),
        };
        fs::write(&conf_path, conf)
            .with_context(|| format!("cannot write {}", conf_path.display()))?;
        let mut cmd = Command::new(&spec.bin);
        match spec.kind {
            Kind::Ours => cmd.arg("--config").arg(&conf_path).env("NO_COLOR", "1"),
            Kind::Mosquitto => cmd.arg("-c").arg(&conf_path),
        };
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let spawned_at = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", spec.bin.display()))?;
        Ok(Self {
            spec,
            child,
            spawned_at,
            log,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.spec.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Probes with full TLS + CONNECT every 5 ms until a CONNACK; returns the time since spawn.
    pub async fn wait_ready(
        &mut self,
        tls: &TlsConnector,
        limit: Duration,
    ) -> anyhow::Result<Duration> {
        let deadline = self.spawned_at + limit;
        let opts = ConnectOpts {
            timeout: Duration::from_secs(5),
            ..ConnectOpts::default()
        };
        loop {
            if let Some(status) = self.child.try_wait().context("broker status")? {
                let log = self.log_text();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!(
                    "the broker exited at start ({status}); its last lines: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                );
            }
            match client::connect(self.addr(), tls, "bench-probe", opts).await {
                Ok(conn) => {
                    let ready = self.spawned_at.elapsed();
                    conn.disconnect().await;
                    return Ok(ready);
                }
                Err(e) if Instant::now() > deadline => {
                    bail!("the broker did not accept a TLS CONNECT within {limit:?}: {e:#}")
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `None` while running; the exit status once it has stopped.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown: {e}")),
        }
    }

    /// VmRSS and VmHWM (peak) in KiB.
    pub fn memory_kib(&self) -> anyhow::Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.pid());
        let status = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("no {name} in {path}"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// User + system CPU seconds used so far.
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        process_cpu_secs(&format!("/proc/{}/stat", self.pid()))
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL. Returns how long it took.
    pub fn stop(&mut self, grace: Duration) -> Duration {
        let started = Instant::now();
        if self.exited().is_some() {
            return Duration::ZERO;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.pid()) {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        while started.elapsed() < grace {
            if self.exited().is_some() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        started.elapsed()
    }

    /// SIGKILL, as a crash would: nothing saved on the way out.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The broker's own log (ours: stdout; Mosquitto: its log file), empty if unreadable.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// utime + stime of a /proc/<pid>/stat file, in seconds.
pub fn process_cpu_secs(stat_path: &str) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(stat_path).with_context(|| format!("cannot read {stat_path}"))?;
    parse_cpu_secs(&stat, clock_ticks()).with_context(|| format!("unexpected {stat_path}"))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn parse_cpu_secs(stat: &str, ticks: f64) -> Option<f64> {
    // Fields after the command name (which may contain spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// What a broker's log says about trouble.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LogCounts {
    /// Our sessions' drop lines ("message dropped", "router overflow", the summary at the
    /// session's end): the largest `dropped=N` per client id, summed.
    pub dropped: u64,
    /// rumqttd's "Read cursor start jumped from (s, a) to (t, b)" lines: a subscriber's
    /// cursor skipping b - a messages of a filter's log that were overwritten.
    pub cursor_jumps: u64,
    pub cursor_skipped: u64,
    /// WARN and ERROR lines (Mosquitto: "Warning"/"Error").
    pub warnings: u64,
}

pub fn log_counts(log: &str) -> LogCounts {
    let mut per_client = std::collections::HashMap::<String, u64>::new();
    let mut c = LogCounts::default();
    for line in log.lines() {
        if line.contains("WARN")
            || line.contains("ERROR")
            || line.contains("Warning")
            || line.contains("Error")
        {
            c.warnings += 1;
        }
        if let Some(skipped) = cursor_jump(line) {
            c.cursor_jumps += 1;
            c.cursor_skipped += skipped;
        }
        // Our sessions' drop lines carry the session's running total (`dropped=N`):
        // queue overflow, slow readers, and router overflow noticed by the session.
        if !(line.contains("message dropped")
            || line.contains("router overflow")
            || line.contains("messages dropped in all"))
        {
            continue;
        }
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(|v| v.trim_matches('"').to_string())
        };
        if let (Some(client), Some(n)) = (
            field("client_id="),
            field("dropped=").and_then(|n| n.parse::<u64>().ok()),
        ) {
            let e = per_client.entry(client).or_default();
            *e = (*e).max(n);
        }
    }
    c.dropped = per_client.values().sum();
    c
}

/// `... error="Read cursor start jumped from (418, 1260052) to (420, 1265880) on f"` -> 5828.
fn cursor_jump(line: &str) -> Option<u64> {
    let rest = &line[line.find("Read cursor start jumped from (")? + 31..];
    let (from, rest) = rest.split_once(") to (")?;
    let (to, _) = rest.split_once(')')?;
    let offset = |pair: &str| pair.split(',').nth(1)?.trim().parse::<u64>().ok();
    Some(offset(to)?.saturating_sub(offset(from)?))
}

/// `retained messages restored messages=N took_ms=T` from our broker's log.
pub fn restored_line(log: &str) -> Option<(u64, u64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("retained messages restored"))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("messages=")?, field("took_ms=")?))
}

/// `queued=N` of the same line: messages restored into persistent sessions' queues.
pub fn restored_queued(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find(|l| l.contains("retained messages restored"))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("queued="))
        .and_then(|v| v.parse::<u64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_from_proc_stat_with_spaces_in_name() {
        let stat = "1234 (my broker) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0";
        assert_eq!(parse_cpu_secs(stat, 100.0), Some(3.0));
        assert_eq!(parse_cpu_secs("garbage", 100.0), None);
    }

    #[test]
    fn counts_reported_drops_per_client() {
        let log = [
            "2025 WARN session queue full: message dropped identity=subscriber client_id=s0 topic=a dropped=1 max_queued=10",
            "2025 WARN session queue full: message dropped identity=subscriber client_id=s0 topic=a dropped=1000 max_queued=10",
            "2025 WARN session queue full: message dropped identity=subscriber client_id=s1 topic=a dropped=1 max_queued=10",
            r#"2025 WARN request_cursor=(418, 1260052) start_cursor=(420, 1265880) error="Read cursor start jumped from (418, 1260052) to (420, 1265880) on articulos/+/futbol""#,
            "2025 INFO listening",
        ]
        .join("\n");
        let c = log_counts(&log);
        assert_eq!(c.dropped, 1001);
        assert_eq!(c.warnings, 4);
        assert_eq!((c.cursor_jumps, c.cursor_skipped), (1, 5828));
    }

    #[test]
    fn parses_restore_line() {
        let log = "x INFO retained messages restored messages=100000 sessions=0 took_ms=412\n";
        assert_eq!(restored_line(log), Some((100_000, 412)));
        assert_eq!(restored_line("nothing"), None);
    }

    #[test]
    fn configs_name_the_port_and_pki() {
        let pki = Pki {
            dir: "/p".into(),
            ca: "/p/ca.crt".into(),
            server_cert: "/p/broker.crt".into(),
            server_key: "/p/broker.key".into(),
        };
        let spec = Spec {
            kind: Kind::Mosquitto,
            bin: "mosquitto".into(),
            pki,
            port: 18883,
            dir: "/t".into(),
            persistence: true,
            max_queued: 10_000,
            budget: ReadBudget {
                packets: 5000,
                bytes: 0,
            },
        };
        let m = mosquitto_config(&spec);
        assert!(m.contains("listener 18883 127.0.0.1"));
        assert!(m.contains("require_certificate true"));
        assert!(m.contains("persistence_location /t/data/"));
        let o = ours_config(&spec);
        assert!(o.contains("bind = \"127.0.0.1:18883\""));
        assert!(o.contains("ca_file = \"/p/ca.crt\""));
        assert!(!o.lines().any(|l| l.starts_with("[[acl]]")));
        assert!(o.contains("max_packets_per_sec = 5000\nmax_bytes_per_sec = 0\n"));
    }
}
