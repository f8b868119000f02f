//! `broker`: runs the MQTT broker, or manages its development PKI.

use anyhow::Context;
use broker::{logging, pki, Config};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    version,
    about = "Secure MQTT broker: mutual TLS on 8883, identity from the client certificate",
    after_help = "Examples:\n  broker                         run with ./broker.toml\n  broker --config /etc/broker.toml\n  broker certs --san mqtt.example.org --client sensor-1\n  broker health                  exit 0 if the running broker answers\n  BROKER__LISTENER__BIND=127.0.0.1:18883 broker"
)]
struct Cli {
    /// Configuration file; every key can be overridden by BROKER__SECTION__KEY.
    #[arg(long, default_value = "broker.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Create the development PKI (CA, broker, clients), or issue, revoke, inspect.
    Certs {
        #[command(subcommand)]
        action: Option<CertsAction>,
        /// Folder of the PKI files.
        #[arg(long, default_value = "certs", global = true)]
        dir: PathBuf,
        /// Extra subject alternative name for the broker certificate (repeatable).
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// Extra client certificate with CN=NAME (repeatable).
        #[arg(long = "client", value_name = "NAME")]
        clients: Vec<String>,
        /// Replace valid existing files too (a new CA re-issues everything).
        #[arg(long)]
        force: bool,
    },
    /// Healthcheck: exit 0 when the running broker's metrics endpoint answers with its
    /// metrics, 1 otherwise (for containers and service managers; needs [metrics] bind).
    Health {
        /// Seconds allowed for each step (connect, send, read).
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Inspect the ACL of the configuration file.
    Acl {
        #[command(subcommand)]
        command: AclCommand,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// Issue (or re-issue) a client certificate with CN=NAME, signed by the CA.
    Issue {
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
    /// Revoke certificate NAME: adds it to crl.pem (created if absent), signed by the CA.
    Revoke { name: String },
    /// Every certificate: CN, serial, expiry, revocation, and the broker's SANs.
    Status,
}

#[derive(Subcommand)]
enum AclCommand {
    /// Would IDENTITY be allowed ACTION (publish or subscribe) on TOPIC? Prints the rule that decides.
    Check {
        identity: String,
        action: AclAction,
        topic: String,
        /// Client id, for patterns with %c.
        #[arg(long, default_value = "client")]
        client_id: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AclAction {
    Publish,
    Subscribe,
}

fn main() -> ExitCode {
    broker::tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Certs {
            action: Some(action),
            dir,
            ..
        }) => certs_action(&dir, action),
        Some(Command::Certs {
            action: None,
            dir,
            sans,
            clients,
            force,
        }) => certs(dir, sans, clients, force),
        Some(Command::Acl {
            command:
                AclCommand::Check {
                    identity,
                    action,
                    topic,
                    client_id,
                },
        }) => acl_check(&cli.config, &identity, action, &topic, &client_id),
        Some(Command::Health { timeout }) => health(&cli.config, timeout),
        None => run(cli.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn certs(dir: PathBuf, sans: Vec<String>, clients: Vec<String>, force: bool) -> anyhow::Result<()> {
    let layout = pki::Layout::in_dir(&dir);
    let request = pki::Request {
        extra_sans: sans,
        extra_clients: clients,
        force,
    };
    let outcomes = pki::ensure(&layout, &request)?;
    for o in &outcomes {
        let what = if o.written { "wrote" } else { "kept " };
        println!("{what} {} (+ .key)", o.path.display());
    }
    println!(
        "PKI in {}: broker SANs {}",
        dir.display(),
        pki::server_sans(&request.extra_sans).join(", ")
    );
    Ok(())
}

fn acl_check(
    config_path: &std::path::Path,
    identity: &str,
    action: AclAction,
    topic: &str,
    client_id: &str,
) -> anyhow::Result<()> {
    use broker::acl::{Acl, Action, Decision};
    let config = Config::load(config_path)?;
    let acl = Acl::new(config.acl).map_err(anyhow::Error::msg)?;
    let action = match action {
        AclAction::Publish => Action::Publish,
        AclAction::Subscribe => Action::Subscribe,
    };
    match acl.check_action(identity, client_id, action, topic) {
        Decision::AllowedByDefault => {
            println!(
                "allow: no [[acl]] rules in {}, everything is allowed",
                config_path.display()
            )
        }
        Decision::Allowed { index, pattern } => println!(
            "allow: rule #{} (identity = \"{}\") grants {action} on \"{pattern}\"",
            index + 1,
            acl.rules()[index].identity
        ),
        Decision::DeniedBy { index, pattern } => println!(
            "deny: rule #{} (identity = \"{}\") denies {action} on \"{pattern}\"",
            index + 1,
            acl.rules()[index].identity
        ),
        Decision::Denied => {
            println!("deny: no rule grants {identity} {action} on \"{topic}\"");
        }
    }
    Ok(())
}

fn health(config_path: &std::path::Path, timeout: u64) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let timeout = std::time::Duration::from_secs(timeout.max(1));
    let addr = broker::health::check(&config.metrics, timeout)
        .with_context(|| format!("unhealthy (metrics address from {})", config_path.display()))?;
    println!("healthy: http://{addr}/metrics answered with broker metrics");
    Ok(())
}

fn certs_action(dir: &std::path::Path, action: CertsAction) -> anyhow::Result<()> {
    let layout = pki::Layout::in_dir(dir);
    match action {
        CertsAction::Issue { name, days } => {
            let path = pki::issue_client(&layout, &name, days)?;
            println!(
                "wrote {} (+ .key), CN={name}, valid {days} days",
                path.display()
            );
        }
        CertsAction::Revoke { name } => {
            let revoked = pki::revoke(&layout, &name)?;
            let what = if revoked.newly {
                "revoked"
            } else {
                "already revoked"
            };
            println!(
                "{what}: {name} (serial {}); CRL {} re-signed. Set [tls] crl_file to it; a running broker reloads it.",
                revoked.serial,
                revoked.crl.display()
            );
        }
        CertsAction::Status => {
            let revoked = pki::revoked_serials(&pki::crl_path(&layout))?;
            println!(
                "{:<22} {:<26} {:<42} {:<12} {:>9}  REVOKED",
                "FILE", "CN", "SERIAL", "NOT AFTER", "DAYS LEFT"
            );
            for c in pki::status(&layout)? {
                let file = c
                    .path
                    .file_name()
                    .map(|f| f.to_string_lossy().to_string())
                    .unwrap_or_default();
                println!(
                    "{:<22} {:<26} {:<42} {:<12} {:>9}  {}",
                    file,
                    c.common_name,
                    c.serial,
                    c.not_after.date(),
                    c.days_left(),
                    if revoked.contains(&c.raw_serial) {
                        "yes"
                    } else {
                        "no"
                    }
                );
            }
            let wanted = pki::server_sans(&[]);
            match pki::read_cert(&layout.server_cert) {
                Ok(server) => {
                    let missing: Vec<_> =
                        wanted.iter().filter(|s| !server.sans.contains(s)).collect();
                    if missing.is_empty() {
                        println!("broker certificate covers {}", wanted.join(", "));
                    } else {
                        println!("broker certificate does NOT cover {missing:?}: run `broker certs --force` or issue one with those SANs");
                    }
                }
                Err(e) => println!("broker certificate: {e}"),
            }
        }
    }
    Ok(())
}

fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    let _guard = logging::init(&config.log)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Listening before the broker says it is ready.
        let stop = mqtt_common::signal::shutdown_signal();
        let handle = broker::start(config).await?;
        tokio::spawn(reload_on_sighup(handle.reloader()));
        handle
            .run_until(async {
                stop.await;
                tracing::info!("signal received: shutting down");
            })
            .await;
        anyhow::Ok(())
    })?;
    Ok(())
}

async fn reload_on_sighup(reloader: broker::Reloader) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the ACL and the TLS material");
        reloader.reload_all();
    }
}
