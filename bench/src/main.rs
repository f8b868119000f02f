//! `bench`: a load generator for our MQTT broker and Mosquitto, over mutual TLS to
//! 127.0.0.1. Each scenario starts its own broker, runs for a bounded time and prints one
//! JSON line; `bench all` runs them all, interleaved, and writes docs/BENCHMARKS.md.
//! It is a benchmark, not a test: nothing here runs in CI except the unit tests.

mod client;
mod codec;
mod judge;
mod orchestrate;
mod payload;
mod pki;
mod report;
mod scenarios;
mod stats;
mod target;

use clap::{Parser, Subcommand};
use scenarios::archive::ArchiveArgs;
use scenarios::connections::ConnArgs;
use scenarios::durable::DurableArgs;
use scenarios::flow_args::{FanoutArgs, LatencyArgs};
use scenarios::noisy::NoisyArgs;
use scenarios::offline::OfflineArgs;
use scenarios::retained::RetainedArgs;
use scenarios::slowloris::SlowlorisArgs;
use scenarios::soak::SoakArgs;
use scenarios::throughput::FlowArgs;
use scenarios::Common;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    version,
    about = "Load generator: our broker against Mosquitto over mutual TLS on 127.0.0.1",
    after_help = "Examples:\n  bench throughput --target ours --qos 1 --rate 20000\n  bench throughput --target mosquitto --sweep\n  bench connections --count 10000 --rate 1000\n  bench all --reps 3 --write docs/BENCHMARKS.md\n  bench all --quick --only latency\n  bench soak --minutes 30\n  bench noisy --target mosquitto\n  bench archive --database postgres --rate 500 --count 5000"
)]
struct Cli {
    /// Tokio worker threads of the load generator.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// N publishers on articulos/p<i>/futbol, M subscribers on articulos/+/futbol.
    Throughput {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: FlowArgs,
    },
    /// One publisher, many subscribers.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: FanoutArgs,
    },
    /// One publisher, one subscriber, a steady rate.
    Latency {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: LatencyArgs,
    },
    /// Many idle mutual-TLS connections offered at a fixed rate.
    Connections {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: ConnArgs,
    },
    /// Many retained topics, then a new subscriber to articulos/#.
    Retained {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: RetainedArgs,
    },
    /// Silent TCP sockets, then a normal client's connect time.
    Slowloris {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: SlowlorisArgs,
    },
    /// Retained QoS 1 with durable acknowledgement; restart time with a large store.
    DurableRetained {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: DurableArgs,
    },
    /// A persistent subscriber's queue of many messages across a broker crash.
    OfflineQueue {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: OfflineArgs,
    },
    /// The latency pair alone, then beside a client flooding its own topic: p99 quiet, noisy, ratio.
    Noisy {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: NoisyArgs,
    },
    /// Churn, takeovers, wills, QoS 0/1/2 and a SIGKILL for --minutes: asserts no
    /// acknowledged message is lost and RSS and descriptors stay flat (exit 1 otherwise).
    Soak {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: SoakArgs,
    },
    /// The subscriber's archive (SQLite or PostgreSQL): articles archived per second, publish-to-commit latency.
    Archive {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: ArchiveArgs,
    },
    /// Cost of the MQTT codec per packet (encode, decode), as JSON.
    Codec {
        #[arg(long, default_value_t = 300)]
        payload: usize,
        #[arg(long, default_value_t = 500_000)]
        iterations: u32,
    },
    /// Every scenario against ours and Mosquitto, interleaved, repeated; writes the report.
    All(orchestrate::AllArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_fd_limit();
    if let Cmd::All(args) = &cli.command {
        return match orchestrate::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(scenario(cli.command)) {
        Ok(json) => {
            println!("{json}");
            // Scenarios that assert say so in `pass`.
            if json.get("pass") == Some(&serde_json::Value::Bool(false)) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn scenario(cmd: Cmd) -> anyhow::Result<serde_json::Value> {
    use scenarios::{archive, connections, durable, offline, retained, slowloris, throughput};
    let out = match cmd {
        Cmd::Throughput { common, args } => throughput::run("throughput", &common, &args).await?,
        Cmd::Fanout { common, args } => throughput::run("fanout", &common, &(&args).into()).await?,
        Cmd::Latency { common, args } => {
            throughput::run("latency", &common, &(&args).into()).await?
        }
        Cmd::Connections { common, args } => connections::run(&common, &args).await?,
        Cmd::Retained { common, args } => retained::run(&common, &args).await?,
        Cmd::Slowloris { common, args } => slowloris::run(&common, &args).await?,
        Cmd::DurableRetained { common, args } => durable::run(&common, &args).await?,
        Cmd::OfflineQueue { common, args } => offline::run(&common, &args).await?,
        Cmd::Noisy { common, args } => scenarios::noisy::run(&common, &args).await?,
        Cmd::Soak { common, args } => scenarios::soak::run(&common, &args).await?,
        Cmd::Archive { common, args } => archive::run(&common, &args).await?,
        Cmd::Codec {
            payload,
            iterations,
        } => {
            let c = codec::measure(payload, iterations);
            return Ok(serde_json::json!({
                "scenario": "codec",
                "payload": payload,
                "encode_ns": scenarios::round(c.encode_ns, 1),
                "decode_ns": scenarios::round(c.decode_ns, 1),
            }));
        }
        Cmd::All(_) => anyhow::bail!("`all` is not a single scenario"),
    };
    Ok(out.into_json())
}

/// Raises the soft limit of open files to the hard limit (10,000 connections need as many
/// descriptors here and in the broker, which inherits the limit).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                eprintln!("bench: could not raise the open-file limit");
            }
        }
    }
}
