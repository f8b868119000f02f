//! `bench all`: every scenario against ours and Mosquitto, interleaved, repeated; each run is
//! a child process (`bench <scenario> ...`, one JSON line), so a crash or a hang costs one
//! run only. Medians, ratios and the bars go into docs/BENCHMARKS.md.

use crate::codec;
use crate::judge::{bars, rows};
use crate::pki::Pki;
use crate::report;
use crate::stats::median;
use crate::target::{self, Kind};
use anyhow::Context;
use serde_json::{json, Value};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct AllArgs {
    /// Repetitions (default 3; 1 with --quick).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Shorter runs and fewer connections/messages: a pass of a few minutes.
    #[arg(long)]
    pub quick: bool,
    /// Markdown file to update (the part between the bench markers).
    #[arg(long)]
    pub write: Option<PathBuf>,
    /// Raw results, one JSON line per run.
    #[arg(long, default_value = "target/bench/results.jsonl")]
    pub results: PathBuf,
    /// Only these cases (see `bench all --list`).
    #[arg(long = "only", value_name = "CASE")]
    pub only: Vec<String>,
    /// Do not run anything: render the report from a results file of an earlier run.
    #[arg(long, value_name = "JSONL")]
    pub from_results: Option<PathBuf>,
    /// List the cases and exit.
    #[arg(long)]
    pub list: bool,
    /// Skip Mosquitto even if installed.
    #[arg(long)]
    pub no_mosquitto: bool,
    /// Seconds before a run is killed and counted as failed.
    #[arg(long, default_value_t = 300)]
    pub run_timeout: u64,
    /// Our broker's binary; default: `broker` beside this executable.
    #[arg(long)]
    pub broker_bin: Option<PathBuf>,
    /// Mosquitto's binary; default: `mosquitto` on PATH, else /usr/sbin/mosquitto.
    #[arg(long)]
    pub mosquitto_bin: Option<PathBuf>,
}

/// One scenario invocation, run for each target and repetition.
#[derive(Debug, Clone)]
pub struct Case {
    pub id: &'static str,
    pub args: Vec<String>,
    /// Run against our broker only (an option Mosquitto has no equivalent of).
    pub ours_only: bool,
}

fn case(id: &'static str, args: &str) -> Case {
    Case {
        id,
        args: args.split_whitespace().map(String::from).collect(),
        ours_only: false,
    }
}

fn ours_only(id: &'static str, args: &str) -> Case {
    Case {
        ours_only: true,
        ..case(id, args)
    }
}

/// The per-connection read budget (packets/s) of the `noisy-budget` case: well above what
/// the latency pair sends (1,000 publishes or PUBACKs a second per connection), far below
/// what the flood would.
const NOISY_BUDGET: u64 = 10_000;

/// The cases of a full or quick pass.
pub fn cases(quick: bool) -> Vec<Case> {
    let (d, step, lat, conns, handshakes, restart, queued) = if quick {
        ("2", "1.5", "5", "2000", "1000", "20000", "100000")
    } else {
        ("5", "2.5", "10", "10000", "5000", "100000", "1000000")
    };
    vec![
        case("tp-qos0", &format!("throughput --qos 0 --duration {d}")),
        case("tp-qos1", &format!("throughput --qos 1 --duration {d}")),
        case(
            "tp-qos1-rate",
            &format!("throughput --qos 1 --rate 5000 --duration {d}"),
        ),
        case(
            "tp-sweep",
            &format!("throughput --qos 1 --sweep --start-rate 4000 --step-secs {step}"),
        ),
        case("fanout", &format!("fanout --qos 1 --duration {d}")),
        case(
            "fanout-durable",
            &format!("fanout --qos 1 --persistent --duration {d}"),
        ),
        case("latency", &format!("latency --rate 1000 --duration {lat}")),
        case("noisy", &format!("noisy --duration {lat}")),
        ours_only(
            "noisy-budget",
            &format!("noisy --duration {lat} --max-packets-per-sec {NOISY_BUDGET}"),
        ),
        case(
            "connections",
            &format!("connections --count {conns} --rate 1000"),
        ),
        case(
            "handshakes",
            &format!("connections --count {handshakes} --concurrency 32 --hold 0"),
        ),
        case("retained", "retained --topics 10000"),
        case("slowloris", "slowloris --silent 1000"),
        case(
            "durable-one",
            &format!("durable-retained --mode one --duration {d}"),
        ),
        case(
            "durable-many",
            &format!("durable-retained --mode many --publishers 8 --duration {d}"),
        ),
        case(
            "durable-restart",
            &format!("durable-retained --mode restart --messages {restart}"),
        ),
        case(
            "offline-queue",
            &format!("offline-queue --messages {queued}"),
        ),
    ]
}

/// All runs' JSON objects, with `case` and `rep` added.
pub struct Results(pub Vec<Value>);

impl Results {
    pub(crate) fn values(&self, case: &str, target: Kind, key: &str) -> Vec<f64> {
        self.0
            .iter()
            .filter(|v| v["case"] == case && v["target"] == target.name())
            .filter_map(|v| v.get(key).and_then(Value::as_f64))
            .collect()
    }

    pub fn median(&self, case: &str, target: Kind, key: &str) -> Option<f64> {
        median(&self.values(case, target, key))
    }

    pub(crate) fn max(&self, case: &str, target: Kind, key: &str) -> Option<f64> {
        self.values(case, target, key).into_iter().reduce(f64::max)
    }

    pub(crate) fn runs(&self, target: Kind) -> impl Iterator<Item = &Value> {
        self.0.iter().filter(move |v| v["target"] == target.name())
    }
}

pub fn run(args: &AllArgs) -> anyhow::Result<()> {
    let all = cases(args.quick);
    if args.list {
        for c in &all {
            let only = if c.ours_only { "  (ours only)" } else { "" };
            println!("{:16} bench {}{only}", c.id, c.args.join(" "));
        }
        return Ok(());
    }
    if let Some(path) = &args.from_results {
        return rerender(args, path);
    }
    let selected: Vec<Case> = all
        .into_iter()
        .filter(|c| args.only.is_empty() || args.only.iter().any(|o| o == c.id))
        .collect();
    anyhow::ensure!(
        !selected.is_empty(),
        "no case matches --only {:?}",
        args.only
    );
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let ours_bin = args
        .broker_bin
        .clone()
        .unwrap_or_else(target::default_ours_bin);
    anyhow::ensure!(
        ours_bin.is_file(),
        "{} not found: run `cargo build --release -p broker -p bench` first",
        ours_bin.display()
    );
    let mosquitto = if args.no_mosquitto {
        None
    } else {
        args.mosquitto_bin.clone().or_else(target::find_mosquitto)
    };
    let mut targets = vec![Kind::Ours];
    if mosquitto.is_some() {
        targets.push(Kind::Mosquitto);
    } else {
        eprintln!("bench: mosquitto not found: measuring our broker only");
    }

    let pki_dir = tempfile::tempdir().context("temporary folder for the PKI")?;
    Pki::ensure(pki_dir.path())?;
    // A copy of our broker, so a rebuild during the run cannot change or break it midway.
    let snapshot = pki_dir.path().join("broker-under-test");
    fs::copy(&ours_bin, &snapshot).with_context(|| {
        format!(
            "cannot copy {} to {}",
            ours_bin.display(),
            snapshot.display()
        )
    })?;
    if let Some(dir) = args.results.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut raw = fs::File::create(&args.results)
        .with_context(|| format!("cannot write {}", args.results.display()))?;

    let started = Instant::now();
    let mut results = Results(Vec::new());
    for rep in 1..=reps {
        for c in &selected {
            // Alternate which broker goes first, so neither always runs on a warmer machine.
            let mut order = targets.clone();
            if rep % 2 == 0 {
                order.reverse();
            }
            for t in order {
                if c.ours_only && t != Kind::Ours {
                    continue;
                }
                let mut cmd = Command::new(&exe);
                cmd.args(&c.args)
                    .args(["--target", t.name()])
                    .arg("--pki-dir")
                    .arg(pki_dir.path())
                    .arg("--broker-bin")
                    .arg(&snapshot);
                if let Some(m) = &mosquitto {
                    cmd.arg("--mosquitto-bin").arg(m);
                }
                eprintln!(
                    "bench: [{:>4.0}s] rep {rep}/{reps} {} on {}",
                    started.elapsed().as_secs_f64(),
                    c.id,
                    t.name()
                );
                let mut v = run_child(cmd, Duration::from_secs(args.run_timeout), t, c)?;
                v["case"] = json!(c.id);
                v["rep"] = json!(rep);
                eprintln!("bench:        {}", summary_line(&v));
                writeln!(raw, "{v}").context("writing the raw results")?;
                results.0.push(v);
            }
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "bench: done in {:.0} s; raw results in {}",
        elapsed.as_secs_f64(),
        args.results.display()
    );

    let command = std::env::args().collect::<Vec<_>>().join(" ");
    // Beside the raw results, so `--from-results` can render the same header later.
    let _ = fs::write(args.results.with_extension("cmd"), &command);
    let _ = fs::write(
        args.results.with_extension("meta"),
        format!("{:.0}", elapsed.as_secs_f64()),
    );
    let generated = render(
        &results,
        &targets,
        args,
        reps,
        &command,
        elapsed,
        mosquitto.as_deref(),
    );
    write_report(args.write.as_deref(), &generated)
}

/// The report of an earlier run, from its raw results.
fn rerender(args: &AllArgs, path: &Path) -> anyhow::Result<()> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let runs = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str::<Value>)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not one JSON object per line", path.display()))?;
    let reps = runs
        .iter()
        .filter_map(|v| v["rep"].as_u64())
        .max()
        .unwrap_or(1) as usize;
    let mut targets = vec![Kind::Ours];
    if runs.iter().any(|v| v["target"] == "mosquitto") {
        targets.push(Kind::Mosquitto);
    }
    let elapsed = fs::read_to_string(path.with_extension("meta"))
        .ok()
        .and_then(|m| m.trim().parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or_default();
    let command = fs::read_to_string(path.with_extension("cmd"))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    let mosquitto = args.mosquitto_bin.clone().or_else(target::find_mosquitto);
    let generated = render(
        &Results(runs),
        &targets,
        args,
        reps,
        &command,
        elapsed,
        mosquitto.as_deref(),
    );
    write_report(args.write.as_deref(), &generated)
}

fn write_report(path: Option<&Path>, generated: &str) -> anyhow::Result<()> {
    match path {
        Some(path) => {
            let existing = fs::read_to_string(path).unwrap_or_default();
            fs::write(path, report::splice(&existing, generated))
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("bench: wrote {}", path.display());
        }
        None => println!("{generated}"),
    }
    Ok(())
}

/// Runs one scenario process; its last stdout line is the result.
fn run_child(mut cmd: Command, limit: Duration, t: Kind, c: &Case) -> anyhow::Result<Value> {
    let out = tempfile::NamedTempFile::new().context("temporary file")?;
    let file = out.reopen().context("temporary file")?;
    cmd.stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("starting a scenario process")?;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().context("waiting for a scenario")? {
            break Some(s);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = fs::read_to_string(out.path()).unwrap_or_default();
    let parsed = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok());
    Ok(match (parsed, status) {
        (Some(v), _) => v,
        (None, Some(s)) => json!({
            "scenario": c.args.first(), "target": t.name(), "errors": 1,
            "error_samples": [format!("the scenario process failed ({s}) without a result")],
        }),
        (None, None) => json!({
            "scenario": c.args.first(), "target": t.name(), "errors": 1,
            "error_samples": [format!("killed after {limit:?}")],
        }),
    })
}

fn summary_line(v: &Value) -> String {
    let keys = [
        "msgs_per_s",
        "max_rate_zero_loss",
        "lost",
        "p99_ms",
        "p99_ratio",
        "established",
        "handshakes_per_s",
        "time_to_all_ms",
        "loaded_connect_ms",
        "start_ms",
        "broker_peak_rss_mb",
        "errors",
    ];
    keys.iter()
        .filter_map(|k| {
            v.get(*k)
                .filter(|x| !x.is_null())
                .map(|x| format!("{k}={x}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn read_trim(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.lines().next().map(|l| l.trim().to_string())
}

/// nproc, memory, CPU model, kernel, versions.
pub fn machine(mosquitto: Option<&Path>, ours: &Path) -> String {
    let cpu = read_trim("/proc/cpuinfo")
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = read_trim("/proc/meminfo")
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let kernel = read_trim("/proc/sys/kernel/osrelease").unwrap_or_default();
    let rustc = command_line("rustc", &["--version"]).unwrap_or_else(|| "unknown".into());
    let ours_v = command_line(&ours.display().to_string(), &["--version"]).unwrap_or_default();
    let git = command_line("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let mosq = mosquitto
        .and_then(|m| command_line(&m.display().to_string(), &["-h"]))
        .unwrap_or_else(|| "not installed".into());
    let openssl = command_line("openssl", &["version"]).unwrap_or_else(|| "unknown".into());
    format!(
        "- CPU: {cpu}, {nproc} cores (nproc)\n- memory: {mem}\n- kernel: Linux {kernel}\n\
         - {rustc}; our broker: {ours_v}, commit {git}{}; rustls 0.23 (ring), tokio 1\n\
         - Mosquitto: {mosq} ({openssl} on this machine)\n\
         - load generator and brokers on the same machine, over 127.0.0.1\n",
        if dirty {
            " with uncommitted changes"
        } else {
            ""
        }
    )
}

fn render(
    results: &Results,
    targets: &[Kind],
    args: &AllArgs,
    reps: usize,
    command: &str,
    elapsed: Duration,
    mosquitto: Option<&Path>,
) -> String {
    let now = time::OffsetDateTime::now_utc();
    let date = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string());
    let ours_bin = args
        .broker_bin
        .clone()
        .unwrap_or_else(target::default_ours_bin);
    let cost = codec::measure(300, 200_000);
    let share = |case: &str| results.median(case, Kind::Ours, "codec_share_of_bench_cpu");
    let core = |case: &str| results.median(case, Kind::Ours, "codec_share_of_one_core");
    let pct = |x: Option<f64>| {
        x.map(|x| format!("{:.1}%", x * 100.0))
            .unwrap_or_else(|| "–".into())
    };
    let mut s = String::new();
    s.push_str(&format!(
        "## Results\n\nGenerated {date} by `{command}` ({} pass, {reps} repetition{}, {:.0} s; targets: {}). \
         Each figure is the median over the repetitions; the ratio is ours / Mosquitto, and \
         the `better` column says which direction is better.\n\n",
        if args.quick { "quick" } else { "full" },
        if reps == 1 { "" } else { "s" },
        elapsed.as_secs_f64(),
        targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
    ));
    s.push_str("### Machine\n\n");
    s.push_str(&machine(mosquitto, &ours_bin));
    s.push_str("\n### Load generator cost\n\n");
    s.push_str(&format!(
        "MQTT codec (rumqttc `mqttbytes` v4), timed loops of a 300-byte QoS 1 PUBLISH: encode \
         {:.0} ns, decode {:.0} ns per packet, i.e. one core could encode {} and decode {} \
         packets/s. In the unbounded throughput runs against our broker (the most packets per \
         second) the codec took {} (QoS 0) and {} (QoS 1) of one core, and {} / {} of the load \
         generator's own CPU time (medians); the rest is TLS, the kernel and tokio.\n\n",
        cost.encode_ns,
        cost.decode_ns,
        report::fmt_num(1e9 / cost.encode_ns.max(1.0)),
        report::fmt_num(1e9 / cost.decode_ns.max(1.0)),
        pct(core("tp-qos0")),
        pct(core("tp-qos1")),
        pct(share("tp-qos0")),
        pct(share("tp-qos1")),
    ));
    s.push_str("### Table\n\n");
    s.push_str(&report::render_table(&rows(results)));
    s.push_str("\n### Bars\n\n");
    s.push_str(&report::render_bars(&bars(results)));
    s.push_str("\n### Errors and anomalies in these runs\n\n");
    let mut any = false;
    for v in &results.0 {
        let errors = v.get("errors").and_then(Value::as_u64).unwrap_or(0);
        let exited = v.get("broker_exited").and_then(Value::as_str);
        let drops = v
            .get("broker_reported_drops")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let skipped = v.get("router_skipped").and_then(Value::as_u64).unwrap_or(0);
        let lost = v.get("lost").and_then(Value::as_u64).unwrap_or(0);
        if errors == 0 && exited.is_none() && drops == 0 && skipped == 0 {
            continue;
        }
        any = true;
        let samples: Vec<String> = v["error_samples"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        s.push_str(&format!(
            "- {} on {} (rep {}): {} error(s), {} lost{}{}{}{}\n",
            v["case"].as_str().unwrap_or("?"),
            v["target"].as_str().unwrap_or("?"),
            v["rep"],
            errors,
            lost,
            if skipped > 0 {
                format!(", rumqttd cursor jumps skipped {skipped}")
            } else {
                String::new()
            },
            exited
                .map(|e| format!(", broker exited: {e}"))
                .unwrap_or_default(),
            if drops > 0 {
                format!(", broker logged {drops} dropped messages")
            } else {
                String::new()
            },
            if samples.is_empty() {
                String::new()
            } else {
                format!(": {}", samples.join("; ").replace('|', "/"))
            },
        ));
    }
    if !any {
        s.push_str("None.\n");
    }
    s
}
