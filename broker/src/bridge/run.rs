//! One bridge's task: keeps its local session subscribed, reaches the upstream (for
//! ever, backing off), and relays between the two while both are up. While the
//! upstream is away the local session is offline and queues what goes out, on disk.

use super::backoff::{Backoff, FailureLog};
use super::local::{self, Local};
use super::peer::Closed;
use super::relay::{Broken, Relay, Step};
use super::routes::Routes;
use super::upstream::{self, Upstream};
use super::wire::{Filter, FromServer, Hello, ToServer};
use crate::config::{BridgeConfig, BridgeProtocol};
use crate::shared::Shared;
use crate::telemetry::bridges::BridgeMetrics;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

/// Bytes waiting to be written to one side before the bridge stops reading the other.
const HIGH_WATER: usize = 4 << 20;
/// SUBSCRIBE packet id: sent before any PUBLISH of the connection.
const SUBSCRIBE_PKID: u16 = 1;
/// The local side's name in errors.
const LOCAL: &str = "local session";
/// How long a SUBACK may take.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How a connection to the upstream ended.
enum Ended {
    /// The bridge is stopping (reload or shutdown).
    Stopped,
    Lost(String),
}

pub(super) struct Bridge {
    pub(super) config: Arc<BridgeConfig>,
    pub(super) shared: Arc<Shared>,
    pub(super) metrics: BridgeMetrics,
    pub(super) routes: Routes,
}

/// Runs bridge `config` until `stop` turns true; `ready` is told once its local
/// session holds its subscriptions, so that nothing published after is missed.
pub(super) async fn run(
    bridge: Bridge,
    mut stop: watch::Receiver<bool>,
    ready: oneshot::Sender<()>,
) {
    let name = bridge.config.name.clone();
    let mut subscribed_locally = match bridge.prepare_local().await {
        Ok(()) => true,
        Err(e) => {
            warn!(bridge = %name, error = %e, "bridge: local subscriptions not made; retried at the next connection");
            false
        }
    };
    let _ = ready.send(());
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut backoff = Backoff::new(seed);
    let mut failures = FailureLog::default();
    let mut attempts = 0u64;
    let mut subscribed_upstream = false;
    loop {
        if *stop.borrow() {
            return;
        }
        attempts += 1;
        if attempts > 1 {
            bridge.metrics.reconnects.inc();
        }
        let dialled = tokio::select! {
            d = upstream::dial(&bridge.config, bridge.hello(), bridge.shared.config.listener.max_packet_size) => d,
            _ = stop.changed() => return,
        };
        let wait = match dialled {
            Err(failure) => {
                bridge.metrics.failed(failure.label());
                if let Some(unlogged) = failures.note(&failure.to_string(), Instant::now()) {
                    warn!(bridge = %name, address = %bridge.config.address, reason = %failure,
                        failed_attempts_not_logged = unlogged, "bridge: cannot reach the upstream; retrying");
                }
                backoff.delay()
            }
            Ok((remote, welcome)) => {
                backoff.reset();
                failures.reset();
                info!(bridge = %name, address = %bridge.config.address, client_id = %bridge.config.remote_client_id(),
                    protocol = bridge.config.protocol.name(), session_present = welcome.session_present, "bridge connected");
                bridge.metrics.connected.set(1);
                let resubscribe = !subscribed_upstream || !welcome.session_present;
                let ended = bridge
                    .serve(
                        remote,
                        welcome.receive_maximum,
                        resubscribe,
                        &mut subscribed_upstream,
                        &mut subscribed_locally,
                        &mut stop,
                    )
                    .await;
                bridge.metrics.connected.set(0);
                match ended {
                    Ended::Stopped => return,
                    Ended::Lost(why) => {
                        warn!(bridge = %name, address = %bridge.config.address, reason = %why,
                            "bridge: connection lost; messages going out wait in its queue");
                    }
                }
                backoff.delay()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

impl Bridge {
    fn hello(&self) -> Hello {
        Hello {
            client_id: self.config.remote_client_id(),
            keep_alive: self.config.keep_alive_secs,
            clean_start: false,
            // Kept by the upstream while we are away, as long as it allows.
            session_expiry: u32::MAX,
            // What the local side accepts from us.
            receive_maximum: self.shared.config.session.receive_maximum,
            max_packet_size: self.shared.config.listener.max_packet_size as u32,
        }
    }

    fn echoing(&self) -> bool {
        self.config.protocol == BridgeProtocol::V311
    }

    /// Attaches to the local session once, subscribes what goes out, and leaves it
    /// offline: from here on, what goes out is queued even before the first connection.
    async fn prepare_local(&self) -> Result<(), String> {
        let (mut local, _) = self.attach_local(1, None).await?;
        // What the session resends meanwhile stays unacknowledged: it comes again.
        subscribe(&mut local, self.routes.local_filters(), LOCAL).await?;
        local.queue(ToServer::Disconnect)?;
        local.close();
        Ok(())
    }

    async fn attach_local(
        &self,
        receive_maximum: u16,
        max_packet_size: Option<u32>,
    ) -> Result<(Local, bool), String> {
        let key = local::key(&self.config);
        let limits = Some(local::limits(&self.config));
        let (local, welcome) = local::attach(
            &self.shared,
            key,
            limits,
            true,
            receive_maximum,
            max_packet_size,
        )
        .await?;
        Ok((local, welcome.session_present))
    }

    /// Relays between the upstream and the local session until one goes or `stop`.
    async fn serve(
        &self,
        mut remote: Upstream,
        upstream_receive_max: Option<u16>,
        resubscribe: bool,
        subscribed_upstream: &mut bool,
        subscribed_locally: &mut bool,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let name = &self.config.name;
        let mut early = Vec::new();
        if resubscribe {
            match subscribe(&mut remote, self.routes.remote_filters(), "upstream").await {
                Ok(packets) => early = packets,
                Err(e) => {
                    remote.close();
                    return Ended::Lost(e);
                }
            }
            *subscribed_upstream = true;
        }
        let window = upstream_receive_max
            .unwrap_or(u16::MAX)
            .min(self.config.max_inflight);
        let (mut local, present) = match self.attach_local(window, remote.max_out).await {
            Ok(attached) => attached,
            Err(e) => {
                let _ = remote.queue(ToServer::Disconnect);
                remote.close();
                return Ended::Lost(e);
            }
        };
        let mut relay = Relay::new(self.routes.clone(), self.echoing());
        let mut local_early = Vec::new();
        if !present || !*subscribed_locally {
            // The local session was lost (its store quarantined, say), or the first
            // subscription failed: subscribe again.
            match subscribe(&mut local, self.routes.local_filters(), LOCAL).await {
                Ok(packets) => local_early = packets,
                Err(e) => {
                    remote.close();
                    local.close();
                    return Ended::Lost(e);
                }
            }
            *subscribed_locally = true;
        }
        let now = Instant::now();
        let early = early
            .into_iter()
            .map(|p| (true, p))
            .chain(local_early.into_iter().map(|p| (false, p)));
        for (from_remote, packet) in early {
            let steps = if from_remote {
                relay.on_remote(packet, now)
            } else {
                relay.on_local(packet, now)
            };
            match steps {
                Ok(steps) => {
                    for step in steps {
                        self.apply(step, &mut relay, &mut local, &mut remote);
                    }
                }
                Err(why) => {
                    remote.close();
                    local.close();
                    return Ended::Lost(format!("{why:?}"));
                }
            }
        }
        let keep_alive = Duration::from_secs(self.config.keep_alive_secs.into());
        let mut heard = Instant::now();
        let mut next_ping = tokio::time::Instant::now() + keep_alive;
        let mut reported = relay.counts;
        let (local_drain, remote_drain) = (local.drain(), remote.drain());
        let ended = loop {
            let (local_full, remote_full) = (
                local.unwritten() >= HIGH_WATER,
                remote.unwritten() >= HIGH_WATER,
            );
            let steps = tokio::select! {
                biased;
                _ = stop.changed() => break Ended::Stopped,
                packet = remote.read(), if !local_full => {
                    heard = Instant::now();
                    match packet {
                        Ok(p) => self.drain(&mut relay, p, &mut remote, true),
                        Err(e) => break Ended::Lost(format!("upstream: {e}")),
                    }
                }
                packet = local.read(), if !remote_full => match packet {
                    Ok(p) => self.drain(&mut relay, p, &mut local, false),
                    Err(e) => break Ended::Lost(format!("local session: {e}")),
                },
                _ = tokio::time::sleep_until(next_ping), if !keep_alive.is_zero() => {
                    if heard.elapsed() > keep_alive.mul_f32(1.5) {
                        break Ended::Lost(format!("keep alive: the upstream said nothing for {} s", heard.elapsed().as_secs()));
                    }
                    next_ping = tokio::time::Instant::now() + keep_alive;
                    Ok(vec![Step::ToRemote(ToServer::PingReq)])
                }
                _ = remote_drain.below(HIGH_WATER), if remote_full => Ok(Vec::new()),
                _ = local_drain.below(HIGH_WATER), if local_full => Ok(Vec::new()),
            };
            let steps = match steps {
                Ok(steps) => steps,
                Err(Broken::Local(why)) => break Ended::Lost(format!("local session: {why}")),
                Err(Broken::Remote(why)) => break Ended::Lost(format!("upstream: {why}")),
            };
            for step in steps {
                self.apply(step, &mut relay, &mut local, &mut remote);
            }
            let counts = relay.counts;
            self.metrics.forwarded_out.inc_by(counts.out - reported.out);
            self.metrics
                .forwarded_in
                .inc_by(counts.inward - reported.inward);
            self.metrics
                .dropped
                .inc_by(counts.refused - reported.refused);
            reported = counts;
            if remote.flush().is_err() {
                break Ended::Lost("upstream: connection closed".into());
            }
            if local.flush().is_err() {
                break Ended::Lost("local session: closed".into());
            }
        };
        // DISCONNECT both ways: the upstream keeps our session, the local session
        // goes offline and queues for the next connection.
        let _ = remote.queue(ToServer::Disconnect);
        let _ = local.queue(ToServer::Disconnect);
        remote.close();
        local.close();
        if relay.counts.echoes > 0 {
            info!(bridge = %name, echoes = relay.counts.echoes, "bridge: own messages echoed by the upstream were not brought back in");
        }
        ended
    }

    /// Relays `first` and whatever else has already arrived from the same side.
    fn drain<R: tokio::io::AsyncRead + Unpin>(
        &self,
        relay: &mut Relay,
        first: FromServer,
        from: &mut super::peer::Peer<R>,
        remote: bool,
    ) -> Result<Vec<Step>, Broken> {
        let now = Instant::now();
        let mut steps = Vec::new();
        let mut next = Some(first);
        // Bounded, so the other side is read too under a steady stream.
        for _ in 0..256 {
            let Some(packet) = next.take() else { break };
            steps.extend(if remote {
                relay.on_remote(packet, now)?
            } else {
                relay.on_local(packet, now)?
            });
            next = match from.try_read() {
                Ok(p) => p,
                Err(e) if remote => return Err(Broken::Remote(e.to_string())),
                Err(e) => return Err(Broken::Local(e.to_string())),
            };
        }
        if let Some(packet) = next {
            steps.extend(if remote {
                relay.on_remote(packet, now)?
            } else {
                relay.on_local(packet, now)?
            });
        }
        Ok(steps)
    }

    fn apply(&self, step: Step, relay: &mut Relay, local: &mut Local, remote: &mut Upstream) {
        let name = &self.config.name;
        match step {
            Step::ToLocal(packet) => {
                if let Err(e) = local.queue(packet) {
                    warn!(bridge = %name, error = %e, "bridge: packet not passed to the local session");
                }
            }
            Step::ToRemote(packet) => {
                let undeliverable = match &packet {
                    ToServer::Publish { message, pkid, .. } => {
                        Some((message.topic.clone(), message.qos, *pkid))
                    }
                    _ => None,
                };
                if let Err(e) = remote.queue(packet) {
                    // Larger than the upstream accepts: it can never go; acknowledged
                    // locally so that it does not block the queue.
                    self.metrics.dropped.inc();
                    if let Some((topic, qos, pkid)) = undeliverable {
                        warn!(bridge = %name, topic = %topic, error = %e, "bridge: message dropped: the upstream cannot take it");
                        for step in relay.give_up(qos, pkid) {
                            self.apply(step, relay, local, remote);
                        }
                    }
                }
            }
            Step::Refused { topic, reason } => {
                warn!(bridge = %name, topic = %topic, reason = %reason, "bridge: message dropped: refused by the upstream");
            }
        }
    }
}

/// Subscribes `filters` on `peer` and waits for the SUBACK; a refused filter is
/// logged (the others still work). Returns what arrived before the SUBACK: a
/// persistent session's messages come as soon as it is resumed.
async fn subscribe<R: tokio::io::AsyncRead + Unpin>(
    peer: &mut super::peer::Peer<R>,
    filters: Vec<Filter>,
    side: &str,
) -> Result<Vec<FromServer>, String> {
    let mut early = Vec::new();
    if filters.is_empty() {
        return Ok(early);
    }
    let names: Vec<String> = filters.iter().map(|f| f.filter.clone()).collect();
    let local = side == LOCAL;
    peer.queue(ToServer::Subscribe {
        pkid: SUBSCRIBE_PKID,
        filters,
    })?;
    peer.flush()
        .map_err(|Closed| format!("{side}: connection closed"))?;
    let deadline = tokio::time::Instant::now() + SUBACK_TIMEOUT;
    loop {
        let packet = tokio::time::timeout_at(deadline, peer.read())
            .await
            .map_err(|_| format!("{side}: no SUBACK within {} s", SUBACK_TIMEOUT.as_secs()))?
            .map_err(|e| format!("{side}: {e}"))?;
        match packet {
            FromServer::SubAck { granted, .. } => {
                let refused: Vec<&String> = names
                    .iter()
                    .zip(granted)
                    .filter(|(_, qos)| qos.is_none())
                    .map(|(filter, _)| filter)
                    .collect();
                if refused.is_empty() {
                    return Ok(early);
                }
                // Locally the ACL decides, for good: said once, the rest still works.
                // Upstream it may be passing (a cluster electing a leader): the
                // connection is tried again, so nothing that comes in is missed.
                if local {
                    warn!(filters = ?refused, "bridge: local subscription refused; check the [[acl]] rules of the bridge's local_identity");
                    return Ok(early);
                }
                return Err(format!(
                    "the upstream refused the subscription to {refused:?}"
                ));
            }
            other => early.push(other),
        }
    }
}
