//! Bridges: this broker as a client of upstream brokers, forwarding `[[bridge]]`
//! topics out, in or both, with store-and-forward through outages.
//!
//! A bridge is two connections and a relay between them. Inside, a persistent
//! session of its own (`local`): what goes out is queued there, on disk, exactly as
//! for an offline client, so it survives a crash and waits for the upstream in order.
//! Outside, a TLS client connection to the upstream (`upstream`), with a persistent
//! session there for what comes in. The relay (`relay`, sans IO) passes packets
//! between the two with their packet ids unchanged, so each side is acknowledged only
//! when the other has acknowledged: a message leaves the local queue on the
//! upstream's PUBACK/PUBCOMP, and the upstream's message is acknowledged once the
//! local session has taken it (durably where its subscribers are persistent).
//!
//! | file | concern |
//! |---|---|
//! | `mod` | the bridges in force: start, reload, stop, sessions of removed bridges |
//! | `run` | one bridge's task: reconnect loop, keep alive, the relay's IO |
//! | `relay` | packet by packet, what goes where; echoes of 3.1.1 upstreams |
//! | `routes` | topic mapping by prefix, the subscriptions each side gets |
//! | `upstream` | resolve, TCP, TLS, CONNECT; why an attempt failed |
//! | `local` | the local session through an in-memory pipe |
//! | `peer` | one connection: framing, queued writes |
//! | `wire` | MQTT 3.1.1/5.0 from the client's side |
//! | `backoff` | when to try again, when to log |

mod backoff;
mod local;
mod peer;
mod relay;
mod routes;
mod run;
mod upstream;
mod wire;

use crate::config::{BridgeConfig, LOCAL_CLIENT_PREFIX};
use crate::ids::SessionKey;
use crate::shared::Shared;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

/// How long start waits for a bridge's local subscriptions.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Tells the running bridges about a reloaded configuration.
#[derive(Clone)]
pub(crate) struct BridgeControl {
    tx: mpsc::UnboundedSender<Vec<BridgeConfig>>,
}

impl BridgeControl {
    /// Applies `bridges`: new ones start, removed ones stop (their queue deleted),
    /// changed ones restart.
    pub(crate) fn apply(&self, bridges: Vec<BridgeConfig>) {
        let _ = self.tx.send(bridges);
    }
}

/// A running bridge.
struct Running {
    config: Arc<BridgeConfig>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Starts the configured bridges and waits until each one's local session holds its
/// subscriptions (so nothing published once the listener opens is missed); ends
/// those of bridges no longer configured. Runs until `stopped` turns true.
pub(crate) async fn start(shared: Arc<Shared>, stopped: watch::Receiver<bool>) -> BridgeControl {
    let mut running = HashMap::new();
    apply(&shared, &mut running, shared.config.bridge.clone()).await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(manage(shared, running, rx, stopped));
    BridgeControl { tx }
}

async fn manage(
    shared: Arc<Shared>,
    mut running: HashMap<String, Running>,
    mut rx: mpsc::UnboundedReceiver<Vec<BridgeConfig>>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some(bridges) => apply(&shared, &mut running, bridges).await,
                None => break,
            },
            _ = stopped.changed() => break,
        }
    }
    for (_, r) in running.drain() {
        stop(r).await;
    }
}

async fn stop(r: Running) {
    let _ = r.stop.send(true);
    let _ = r.task.await;
}

async fn apply(
    shared: &Arc<Shared>,
    running: &mut HashMap<String, Running>,
    bridges: Vec<BridgeConfig>,
) {
    let wanted: HashMap<String, Arc<BridgeConfig>> = bridges
        .into_iter()
        .map(|b| (b.name.clone(), Arc::new(b)))
        .collect();
    let names: Vec<String> = running.keys().cloned().collect();
    for name in names {
        let changed = wanted
            .get(&name)
            .is_none_or(|b| **b != *running[&name].config);
        if changed {
            if let Some(r) = running.remove(&name) {
                stop(r).await;
                if !wanted.contains_key(&name) {
                    shared.metrics.bridges.forget(&name);
                    info!(bridge = %name, "bridge removed from the configuration: stopped");
                }
            }
        }
    }
    // Local sessions no bridge owns any more (removed, or its identity changed while
    // running or while the broker was stopped): their queues would grow for ever.
    let owned: Vec<SessionKey> = wanted.values().map(|b| local::key(b)).collect();
    for key in shared.registry.keys_with_client_prefix(LOCAL_CLIENT_PREFIX) {
        if !owned.contains(&key) {
            match local::discard(shared, key.clone()).await {
                Ok(()) => warn!(identity = %key.identity, client_id = %key.client_id,
                    "session of a bridge no longer configured ended; what it queued is deleted"),
                Err(e) => error!(identity = %key.identity, client_id = %key.client_id, error = %e,
                    "session of a bridge no longer configured could not be ended"),
            }
        }
    }
    let mut readiness = Vec::new();
    for (name, config) in wanted {
        if running.contains_key(&name) {
            continue;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = oneshot::channel();
        let bridge = run::Bridge {
            routes: routes::Routes::new(&config.topic),
            metrics: shared.metrics.bridges.of(&name),
            shared: shared.clone(),
            config: config.clone(),
        };
        let task = tokio::spawn(run::run(bridge, stop_rx, ready_tx));
        readiness.push((name.clone(), ready_rx));
        running.insert(
            name,
            Running {
                config,
                stop: stop_tx,
                task,
            },
        );
    }
    for (name, ready) in readiness {
        if tokio::time::timeout(READY_TIMEOUT, ready).await.is_err() {
            warn!(bridge = %name, waited_secs = READY_TIMEOUT.as_secs(),
                "bridge: local subscriptions still not made; messages published meanwhile may not go out");
        }
    }
}

/// For the fuzz target `bridge` (through the crate's `fuzzing` module): `data` as
/// packets from a server (the upstream in 3.1.1 or 5.0, or the local session), decoded
/// and relayed; each step is encoded for the side it goes to. The packets relayed, or
/// why decoding stopped.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_relay(data: &[u8]) -> Result<usize, String> {
    use crate::config::{BridgeTopic, Direction};
    use crate::protocol::Version;
    let Some((&mode, rest)) = data.split_first() else {
        return Ok(0);
    };
    let version = if mode & 1 == 0 {
        Version::V311
    } else {
        Version::V5
    };
    let from_remote = mode & 2 == 0;
    let topic = |pattern: &str, direction, local: &str, remote: &str| BridgeTopic {
        pattern: pattern.into(),
        direction,
        qos: 2,
        local_prefix: local.into(),
        remote_prefix: remote.into(),
    };
    let routes = routes::Routes::new(&[
        topic("articulos/#", Direction::Both, "", "sites/e/"),
        topic("+/x", Direction::In, "in/", ""),
    ]);
    let mut relay = relay::Relay::new(routes, version == Version::V311);
    let mut buf = bytes::BytesMut::from(rest);
    let now = std::time::Instant::now();
    let mut relayed = 0;
    loop {
        let side = if from_remote { version } else { Version::V5 };
        let packet = match wire::decode(side, &mut buf, 1 << 20) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(relayed),
            Err(e) => return Err(e.to_string()),
        };
        let steps = if from_remote {
            relay.on_remote(packet, now)
        } else {
            relay.on_local(packet, now)
        };
        let Ok(steps) = steps else {
            return Ok(relayed);
        };
        relayed += 1;
        let mut out = bytes::BytesMut::new();
        for step in steps {
            // Encoding may refuse (a packet too large): never panic.
            let _ = match step {
                relay::Step::ToLocal(p) => wire::encode(Version::V5, p, &mut out, None),
                relay::Step::ToRemote(p) => wire::encode(version, p, &mut out, Some(1 << 20)),
                relay::Step::Refused { .. } => Ok(()),
            };
        }
    }
}
