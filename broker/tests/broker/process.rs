//! The `broker` binary as an operator runs it.

use crate::common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_broker");

pub fn write_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        "[listener]\nbind = \"127.0.0.1:0\"\n[tls]\nauto_generate = true\n[log]\ndir = \"logs\"\n[metrics]\nbind = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    path
}

/// Runs the broker binary with `args` to completion; its standard output, which the
/// test fails on an unsuccessful exit, showing the standard error.
pub fn run_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A broker process, killed if a test fails before it exits.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary; returns it, the port it listens on (read from its log), the
/// lines logged until then and the channel of the next ones.
pub fn spawn_broker(
    config: &Path,
) -> (Running, u16, Vec<String>, std::sync::mpsc::Receiver<String>) {
    let mut child = Running(
        Command::new(BIN)
            .arg("--config")
            .arg(config)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("broker did not report its listening address");
        if line.contains("listening") {
            let port = line
                .rsplit(':')
                .next()
                .and_then(|p| p.trim().parse().ok())
                .expect("port in the listening line");
            return (child, port, seen, rx);
        }
        seen.push(line);
    }
}

#[tokio::test]
async fn binary_creates_pki_logs_to_file_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let (mut child, port, before, lines) = spawn_broker(&config);
    for f in [
        "ca.crt",
        "ca.key",
        "broker.crt",
        "publisher.key",
        "subscriber.crt",
    ] {
        assert!(
            dir.path().join("certs").join(f).is_file(),
            "{f} not created"
        );
    }
    // A real client connects with the generated certificates.
    let pki = broker::pki::Layout::in_dir(&dir.path().join("certs"));
    let ca = std::fs::read_to_string(&pki.ca_cert).unwrap();
    let cert = broker::pki::Issued {
        cert_pem: std::fs::read_to_string(pki.client_cert("publisher")).unwrap(),
        key_pem: std::fs::read_to_string(pki.client_key("publisher")).unwrap(),
    };
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = TestClient::tls(addr, &ca, Some(&cert)).await.unwrap();
    c.connect("proc", true, 30).await;

    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "broker still running 5 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit:?}");
    c.expect_closed().await;
    assert!(
        before
            .iter()
            .any(|l| l.contains("WARN") && l.contains("DEVELOPMENT PKI")),
        "{before:?}"
    );
    let after: Vec<String> = lines.try_iter().collect();
    assert!(
        after.iter().any(|l| l.contains("broker stopped")),
        "{after:?}"
    );
    let log_dir = dir.path().join("logs");
    let logged: String = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert!(
        logged.contains("client connected") && logged.contains("identity=publisher"),
        "{logged}"
    );
}

#[test]
fn a_sigterm_as_soon_as_it_listens_stops_it_cleanly() {
    // The handler is installed before the broker says it listens: a SIGTERM right
    // after that line is a clean stop, never the default action's kill.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    for _ in 0..10 {
        let (mut child, _, _, _) = spawn_broker(&config);
        let pid = child.0.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = child.0.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

#[test]
fn bad_environment_override_is_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env("BROKER__LISTENER__MAX_CONNECTIONS", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("max_connections"), "{stderr}");
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env("BROKER__LISTENER__BIND", "not-an-address")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bind"));
}

#[test]
fn missing_config_file_says_what_to_do() {
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/broker.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/broker.toml") && stderr.contains("--config"),
        "{stderr}"
    );
}

#[test]
fn certs_subcommand_writes_and_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("pki");
    let run = |extra: &[&str]| {
        let dir = certs.as_os_str();
        run_ok(
            ["certs".as_ref(), "--dir".as_ref(), dir]
                .into_iter()
                .chain(extra.iter().map(|a| a.as_ref())),
        )
    };
    let first = run(&["--san", "mqtt.example.org"]);
    assert!(
        first.contains("wrote") && first.contains("mqtt.example.org"),
        "{first}"
    );
    let second = run(&["--client", "sensor-1"]);
    assert_eq!(second.matches("wrote").count(), 1, "{second}");
    assert!(certs.join("sensor-1.crt").is_file());
}

/// `broker health` as a container healthcheck runs it: the running broker's own config
/// (metrics on 0.0.0.0, probed on loopback), exit 0; once it has stopped, exit 1 naming
/// the address.
#[test]
fn health_subcommand_follows_the_running_broker() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    // A fixed port, found free, so that `health` can read it from the same file.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let health = || {
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(["health", "--timeout", "2"])
            .env("BROKER__METRICS__BIND", format!("0.0.0.0:{port}"))
            .output()
            .unwrap()
    };
    let before = health();
    assert!(
        !before.status.success(),
        "healthy before the broker started"
    );

    let mut child = Running(
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env("BROKER__METRICS__BIND", format!("0.0.0.0:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + WAIT;
    let up = loop {
        let out = health();
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(
        up.status.success() && stdout.contains(&format!("127.0.0.1:{port}")),
        "{stdout}{}",
        String::from_utf8_lossy(&up.stderr)
    );

    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let down = health();
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert!(!down.status.success());
    assert!(
        stderr.contains("unhealthy") && stderr.contains(&format!("127.0.0.1:{port}/metrics")),
        "{stderr}"
    );
}
