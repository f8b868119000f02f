//! The deployment files (Dockerfile, compose.yaml, the monitoring profile's Prometheus
//! and Grafana files, deploy/broker.service) agree with each other and with the broker,
//! checked offline: the images of the monitoring profile cannot be pulled here, and
//! `just container-test` runs the containers themselves.

use crate::common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

const IMAGE: &str = "localhost/mqtt-stack:latest";
/// The image's working directory, where broker.toml and the volumes are.
const APP: &str = "/mqtt";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Yaml {
    let mut docs = YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(docs.len(), 1, "{rel}: one document");
    docs.remove(0)
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `${VAR:-default}` as Compose resolves it with VAR unset.
fn defaults(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').map(|e| i + e).expect("closed ${");
        let inner = &rest[i + 2..end];
        out.push_str(inner.split_once(":-").map(|(_, d)| d).unwrap_or(""));
        rest = &rest[end + 1..];
    }
    out + rest
}

/// The (source, target, read-only) of each `source:target[:ro]` volume of a service.
fn mounts(service: &Yaml) -> Vec<(String, String, bool)> {
    strings(&service["volumes"])
        .iter()
        .map(|m| {
            let parts: Vec<&str> = m.split(':').collect();
            assert!((2..=3).contains(&parts.len()), "volume {m}");
            let ro = parts.get(2) == Some(&"ro");
            (parts[0].to_string(), parts[1].to_string(), ro)
        })
        .collect()
}

/// A Dockerfile instruction's arguments, continuation lines joined.
fn instruction(dockerfile: &str, name: &str) -> Vec<String> {
    dockerfile
        .replace("\\\n", " ")
        .lines()
        .filter_map(|l| l.trim().strip_prefix(name).map(|a| a.trim().to_string()))
        .collect()
}

/// The broker.toml the image holds (the repository's), with the image's environment.
fn image_metrics_port(dockerfile: &str) -> u16 {
    let env = instruction(dockerfile, "ENV ").join(" ");
    let bind = env
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("BROKER__METRICS__BIND="))
        .expect("the image binds the metrics on every interface");
    assert!(
        bind.starts_with("0.0.0.0:"),
        "{bind}: unreachable from the host"
    );
    bind.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn compose_runs_the_image_as_its_dockerfile_and_broker_toml_lay_it_out() {
    let dockerfile = read("Dockerfile");
    let compose = yaml("compose.yaml");
    let config = broker::Config::load(&root().join("broker.toml")).unwrap();
    let services = &compose["services"];
    let broker = &services["broker"];

    // The image: a non-root user who owns the volume folders, the config in the workdir.
    assert_eq!(instruction(&dockerfile, "FROM "), ["scratch"]);
    let user = instruction(&dockerfile, "USER ").pop().expect("USER");
    assert!(!user.starts_with('0') && user != "root", "USER {user}");
    assert!(
        dockerfile.contains(&format!("--chown={user} dist/state/ {APP}/")),
        "volume folders owned by {user}"
    );
    assert_eq!(instruction(&dockerfile, "WORKDIR "), [APP]);
    assert!(dockerfile.contains(&format!("COPY broker.toml {APP}/broker.toml")));
    let health = instruction(&dockerfile, "HEALTHCHECK ").join(" ");
    assert!(
        health.contains(r#"CMD ["broker", "health""#),
        "exec-form healthcheck: {health}"
    );

    // Ports: the listener as broker.toml binds it, the metrics on the host's loopback.
    let ports: Vec<String> = strings(&broker["ports"])
        .iter()
        .map(|p| defaults(p))
        .collect();
    let mqtt = config.listener.bind.port();
    assert!(ports.contains(&format!("{mqtt}:{mqtt}")), "{ports:?}");
    let metrics = image_metrics_port(&dockerfile);
    assert!(
        ports.contains(&format!("127.0.0.1:{metrics}:{metrics}")),
        "metrics published on loopback only: {ports:?}"
    );

    // The broker's writable folders are named volumes, at the paths broker.toml names.
    let in_image = |p: &Path| {
        let rel = p.strip_prefix(root()).unwrap_or(p);
        format!("{APP}/{}", rel.display())
    };
    let folder = |p: &Path| in_image(p.parent().unwrap());
    let declared = compose["volumes"].as_hash().expect("top-level volumes");
    let broker_mounts = mounts(broker);
    for wanted in [
        folder(&config.tls.ca_file),
        in_image(&config.storage.data_dir),
        in_image(&config.log.dir),
    ] {
        let found = broker_mounts.iter().find(|(_, t, _)| *t == wanted);
        let (source, _, ro) = found.unwrap_or_else(|| panic!("no volume at {wanted}"));
        assert!(!ro, "{wanted} must be writable");
        assert!(
            declared.contains_key(&Yaml::String(source.clone())),
            "{source}"
        );
    }
    assert_eq!(broker["read_only"].as_bool(), Some(true));
    assert_eq!(broker["hostname"].as_str(), Some("broker"));

    // Clients: the same image, the PKI read-only, the broker by the name its cert holds.
    let certs = folder(&config.tls.ca_file);
    for name in ["broker", "publisher", "subscriber"] {
        let s = &services[name];
        assert_eq!(s["image"].as_str(), Some(IMAGE), "{name}");
        assert_eq!(s["restart"].as_str(), Some("unless-stopped"), "{name}");
        assert_eq!(s["read_only"].as_bool(), Some(true), "{name}");
        assert!(s["profiles"].is_badvalue(), "{name} runs without a profile");
        // podman-compose runs a Compose healthcheck in /bin/sh, which the image lacks:
        // the broker's is the image's, and the clients turn it off.
        let test = strings(&s["healthcheck"]["test"]);
        let want: &[&str] = if name == "broker" { &[] } else { &["NONE"] };
        assert_eq!(test, want, "{name}: healthcheck in compose");
        let command = strings(&s["command"]);
        assert_eq!(command.first().map(String::as_str), Some(name), "{name}");
        if name != "broker" {
            assert!(command.windows(2).any(|w| w == ["--host", "broker"]));
            assert!(command.contains(&"--retry".to_string()), "{name}");
            let m = mounts(s);
            assert_eq!((m[0].1.as_str(), m[0].2), (certs.as_str(), true), "{name}");
            if name == "subscriber" {
                // The archive: a writable named volume at the folder --archive names.
                let url = command
                    .windows(2)
                    .find(|w| w[0] == "--archive")
                    .map(|w| w[1].clone())
                    .expect("the subscriber archives");
                let file = url.strip_prefix("sqlite:").expect("a SQLite archive");
                let dir = format!("{APP}/{}", Path::new(file).parent().unwrap().display());
                assert_eq!(m.len(), 2, "{name}: {m:?}");
                assert_eq!((m[1].1.as_str(), m[1].2), (dir.as_str(), false), "{m:?}");
                assert!(declared.contains_key(&Yaml::String(m[1].0.clone())));
            } else {
                assert_eq!(m.len(), 1, "{name}: {m:?}");
            }
        }
    }

    // Monitoring: only in its profile; every file it mounts is in the repository.
    for name in ["prometheus", "grafana"] {
        let s = &services[name];
        assert_eq!(strings(&s["profiles"]), ["monitoring"], "{name}");
        for (source, _, ro) in mounts(s) {
            if source.starts_with("./") {
                assert!(root().join(&source).is_file(), "{source}");
                assert!(ro, "{source} mounted read-only");
            }
        }
    }
}

/// The names a scrape of a fresh broker exposes, with the suffixes Prometheus adds.
async fn exposed_metric_names() -> BTreeSet<String> {
    let broker = TestBroker::start().await;
    let addr = broker.handle.as_ref().unwrap().metrics_addr().unwrap();
    let body = scrape(addr).await;
    let mut names = BTreeSet::new();
    for line in body.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
    }
    broker.shutdown().await;
    names
}

#[tokio::test]
async fn monitoring_profile_scrapes_the_broker_and_provisions_the_shipped_dashboard() {
    let compose = yaml("compose.yaml");
    let services = &compose["services"];
    let metrics = image_metrics_port(&read("Dockerfile"));

    // Prometheus scrapes the broker service on the port the image binds.
    let prometheus = yaml("deploy/monitoring/prometheus.yml");
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    let targets = strings(&job["static_configs"][0]["targets"]);
    assert_eq!(targets, [format!("broker:{metrics}")]);
    let in_prometheus = mounts(&services["prometheus"]);
    assert!(in_prometheus
        .iter()
        .any(|(s, t, _)| s == "./deploy/monitoring/prometheus.yml"
            && t == "/etc/prometheus/prometheus.yml"));

    // Grafana: the data source is that Prometheus; the provider reads the folder where
    // compose.yaml mounts docs/grafana-dashboard.json.
    let datasources = yaml("deploy/monitoring/grafana/datasources.yaml");
    let source = &datasources["datasources"][0];
    assert_eq!(source["type"].as_str(), Some("prometheus"));
    assert_eq!(source["url"].as_str(), Some("http://prometheus:9090"));
    assert!(strings(&services["prometheus"]["ports"]).contains(&"127.0.0.1:9090:9090".into()));
    let providers = yaml("deploy/monitoring/grafana/dashboards.yaml");
    let folder = providers["providers"][0]["options"]["path"]
        .as_str()
        .expect("provider path")
        .to_string();
    let in_grafana = mounts(&services["grafana"]);
    let dashboard_target = in_grafana
        .iter()
        .find(|(s, ..)| s == "./docs/grafana-dashboard.json")
        .map(|(_, t, _)| t.clone())
        .expect("the dashboard is mounted");
    assert_eq!(
        Path::new(&dashboard_target).parent(),
        Some(Path::new(&folder))
    );
    for kind in ["datasources", "dashboards"] {
        let target = format!("/etc/grafana/provisioning/{kind}/");
        assert!(
            in_grafana.iter().any(|(s, t, _)| t.starts_with(&target)
                && s == &format!("./deploy/monitoring/grafana/{kind}.yaml")),
            "{kind} provisioning mounted"
        );
    }

    // The dashboard loads, and resolves when provisioned: Grafana skips __inputs then,
    // so every ${VAR} must be a dashboard variable.
    let text = read("docs/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let variables: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .map(|l| l.iter().filter_map(|v| v["name"].as_str()).collect())
        .unwrap_or_default();
    for (i, _) in text.match_indices("${") {
        let name = text[i + 2..].split('}').next().unwrap();
        assert!(
            variables.contains(name),
            "${{{name}}} is not a dashboard variable"
        );
    }

    // Every broker metric a panel queries is one the broker exposes.
    let exposed = exposed_metric_names().await;
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = 0;
    for expr in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
    {
        for (i, _) in expr.match_indices("broker_") {
            let name: String = expr[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(exposed.contains(&name), "{name} in {expr:?} is not exposed");
            queried += 1;
        }
    }
    assert!(queried > 10, "only {queried} metrics queried");
}

/// The unit as systemd reads it; `systemd-analyze` where it exists (not in every CI
/// container), with the binary it names replaced by one that exists here.
#[test]
fn systemd_unit_is_hardened_reloads_on_sighup_and_its_overrides_are_broker_keys() {
    let unit = read("deploy/broker.service");
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")).map(String::from))
            .collect()
    };
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("StateDirectory", "mqtt-broker"),
        ("LogsDirectory", "mqtt-broker"),
        ("ConfigurationDirectory", "mqtt-broker"),
    ] {
        assert_eq!(values(key), [value], "{key}");
    }
    assert_eq!(values("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    let exec = values("ExecStart").pop().expect("ExecStart");
    assert_eq!(
        exec,
        "/usr/local/bin/broker --config /etc/mqtt-broker/broker.toml"
    );

    // Every override is a key the broker accepts (unknown keys stop it), and each
    // path is in a folder the service may write.
    let overrides: Vec<(String, String)> = values("Environment")
        .iter()
        .filter_map(|e| e.split_once('='))
        .filter(|(k, _)| k.starts_with("BROKER__"))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(overrides.len() >= 6, "{overrides:?}");
    for (key, path) in &overrides {
        assert!(
            path.starts_with("/var/lib/mqtt-broker/") || path.starts_with("/var/log/mqtt-broker"),
            "{key}={path}: not writable under ProtectSystem=strict"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broker.toml"), read("broker.toml")).unwrap();
    let out = Command::new(crate::process::BIN)
        .arg("--config")
        .arg(dir.path().join("broker.toml"))
        .args(["acl", "check", "publisher", "publish", "articulos/x/futbol"])
        .envs(overrides.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIPPED systemd-analyze checks: systemd-analyze not installed");
        return;
    }
    let copy = dir.path().join("mqtt-broker.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/broker", crate::process::BIN),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");
    // Exposure on systemd's 0-10 scale (threshold in tenths): "OK" is below 2.
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        security.status.success(),
        "{}",
        String::from_utf8_lossy(&security.stdout)
    );
}
