//! The bridge's protocol logic, sans IO: every packet from the local session or the
//! upstream becomes packets for the other side (or an answer on the same side).
//!
//! Packet ids pass through unchanged, so each side's QoS state is the other's: the
//! local session's outgoing ids are ours towards the upstream, the upstream's ids are
//! ours towards the local session. Both sessions are persistent and keep that state
//! (the local one on disk), so a QoS 2 exchange interrupted by a crash or a lost
//! connection resumes with the same ids on both sides, and a QoS 1 message leaves the
//! local queue only when the upstream has acknowledged it.

use super::routes::Routes;
use super::wire::{FromServer, ToServer};
use crate::message::Message;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

/// How long a message sent upstream is remembered, to recognise its echo.
const ECHO_WINDOW: Duration = Duration::from_secs(60);
/// Messages remembered for that, at most.
const ECHO_CAPACITY: usize = 65_536;

/// What to do with a packet.
#[derive(Debug, PartialEq)]
pub(super) enum Step {
    ToLocal(ToServer),
    ToRemote(ToServer),
    /// The upstream refused a message sent out (MQTT 5 reason): it is dropped.
    Refused {
        topic: String,
        reason: String,
    },
}

/// Why a connection ends.
#[derive(Debug, PartialEq)]
pub(super) enum Broken {
    /// The side sent DISCONNECT (its reason) or a packet it must not send.
    Local(String),
    Remote(String),
}

/// Counts since the relay began; the task turns them into metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) out: u64,
    pub(super) inward: u64,
    /// Refused by the upstream.
    pub(super) refused: u64,
    /// Echoes of our own messages, taken off (3.1.1 upstreams).
    pub(super) echoes: u64,
}

/// Messages sent upstream that may come back on our own subscription there, as
/// fingerprints of topic and payload, each taking one echo off.
#[derive(Default)]
struct Echoes {
    pending: HashMap<u64, u32>,
    order: VecDeque<(Instant, u64)>,
}

impl Echoes {
    fn fingerprint(topic: &str, payload: &[u8]) -> u64 {
        let mut h = DefaultHasher::new();
        topic.hash(&mut h);
        payload.hash(&mut h);
        h.finish()
    }

    fn note(&mut self, topic: &str, payload: &[u8], now: Instant) {
        self.expire(now);
        if self.order.len() >= ECHO_CAPACITY {
            self.pop();
        }
        let fp = Self::fingerprint(topic, payload);
        *self.pending.entry(fp).or_default() += 1;
        self.order.push_back((now, fp));
    }

    /// Whether this message is the echo of one we sent (taken off if so).
    fn take(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        self.expire(now);
        let fp = Self::fingerprint(topic, payload);
        match self.pending.get_mut(&fp) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.pending.remove(&fp);
                }
                if let Some(at) = self.order.iter().position(|(_, f)| *f == fp) {
                    self.order.remove(at);
                }
                true
            }
            None => false,
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > ECHO_WINDOW)
        {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some((_, fp)) = self.order.pop_front() {
            if let Some(n) = self.pending.get_mut(&fp) {
                *n -= 1;
                if *n == 0 {
                    self.pending.remove(&fp);
                }
            }
        }
    }
}

pub(super) struct Relay {
    routes: Routes,
    /// Set when the upstream may echo what we send (3.1.1: no No Local).
    echoes: Option<Echoes>,
    /// QoS 2 ids of the upstream's messages acknowledged without going local (echoes,
    /// topics no route takes): their PUBREL is answered here.
    answered_in: HashSet<u16>,
    /// QoS 2 ids of the local session's messages that stop here (no route, refused
    /// upstream): their PUBREL is answered here.
    answered_out: HashSet<u16>,
    /// Upstream topics of our QoS 1/2 messages in flight, by packet id: a refusal
    /// names the topic.
    in_flight: HashMap<u16, String>,
    pub(super) counts: Counts,
}

impl Relay {
    /// `echoing`: the upstream does not honour No Local.
    pub(super) fn new(routes: Routes, echoing: bool) -> Self {
        let echoes = (echoing && routes.can_echo()).then(Echoes::default);
        Self {
            routes,
            echoes,
            answered_in: HashSet::new(),
            answered_out: HashSet::new(),
            in_flight: HashMap::new(),
            counts: Counts::default(),
        }
    }

    /// A packet from the local session (messages going out, acknowledgements of ours).
    pub(super) fn on_local(
        &mut self,
        packet: FromServer,
        now: Instant,
    ) -> Result<Vec<Step>, Broken> {
        Ok(match packet {
            FromServer::Publish {
                mut message,
                pkid,
                dup,
            } => match self.routes.outward(&message.topic) {
                Some(remote) => {
                    if let Some(echoes) = &mut self.echoes {
                        if self.routes.comes_back(&remote) {
                            echoes.note(&remote, &message.payload, now);
                        }
                    }
                    if message.qos > 0 {
                        self.in_flight.insert(pkid, remote.clone());
                    }
                    message.topic = remote;
                    self.counts.out += 1;
                    vec![Step::ToRemote(ToServer::Publish { message, pkid, dup })]
                }
                // A subscription of an earlier configuration: acknowledged, not sent.
                None => self.swallow_out(&message, pkid),
            },
            FromServer::PubAck { pkid, .. } => vec![Step::ToRemote(ToServer::PubAck(pkid))],
            FromServer::PubRec { pkid, .. } => vec![Step::ToRemote(ToServer::PubRec(pkid))],
            FromServer::PubComp(pkid) => vec![Step::ToRemote(ToServer::PubComp(pkid))],
            FromServer::PubRel(pkid) => {
                if self.answered_out.remove(&pkid) {
                    vec![Step::ToLocal(ToServer::PubComp(pkid))]
                } else {
                    vec![Step::ToRemote(ToServer::PubRel(pkid))]
                }
            }
            FromServer::PingResp | FromServer::SubAck { .. } => Vec::new(),
            FromServer::Disconnect(reason) => {
                return Err(Broken::Local(format!("DISCONNECT {reason}")))
            }
            FromServer::ConnAck(_) => return Err(Broken::Local("a second CONNACK".into())),
            FromServer::Unexpected(what) => {
                return Err(Broken::Local(format!("unexpected {what}")))
            }
        })
    }

    /// A packet from the upstream (messages coming in, acknowledgements of ours).
    pub(super) fn on_remote(
        &mut self,
        packet: FromServer,
        now: Instant,
    ) -> Result<Vec<Step>, Broken> {
        Ok(match packet {
            FromServer::Publish {
                mut message,
                pkid,
                dup,
            } => {
                let echo = self
                    .echoes
                    .as_mut()
                    .is_some_and(|e| e.take(&message.topic, &message.payload, now));
                if echo {
                    self.counts.echoes += 1;
                    return Ok(self.swallow_in(&message, pkid));
                }
                match self.routes.inward(&message.topic) {
                    Some(local) => {
                        message.topic = local;
                        self.counts.inward += 1;
                        vec![Step::ToLocal(ToServer::Publish { message, pkid, dup })]
                    }
                    None => self.swallow_in(&message, pkid),
                }
            }
            FromServer::PubAck { pkid, refused } => {
                let topic = self.in_flight.remove(&pkid);
                let mut steps = vec![Step::ToLocal(ToServer::PubAck(pkid))];
                if let Some(reason) = refused {
                    self.counts.refused += 1;
                    steps.push(Step::Refused {
                        topic: topic.unwrap_or_default(),
                        reason,
                    });
                }
                steps
            }
            FromServer::PubRec { pkid, refused } => {
                let mut steps = vec![Step::ToLocal(ToServer::PubRec(pkid))];
                if let Some(reason) = refused {
                    // MQTT 5 §4.3.3: the exchange ends here; the local PUBREL is ours.
                    self.answered_out.insert(pkid);
                    self.counts.refused += 1;
                    let topic = self.in_flight.remove(&pkid).unwrap_or_default();
                    steps.push(Step::Refused { topic, reason });
                }
                steps
            }
            FromServer::PubRel(pkid) => {
                if self.answered_in.remove(&pkid) {
                    vec![Step::ToRemote(ToServer::PubComp(pkid))]
                } else {
                    vec![Step::ToLocal(ToServer::PubRel(pkid))]
                }
            }
            FromServer::PubComp(pkid) => {
                self.in_flight.remove(&pkid);
                vec![Step::ToLocal(ToServer::PubComp(pkid))]
            }
            FromServer::PingResp | FromServer::SubAck { .. } => Vec::new(),
            FromServer::Disconnect(reason) => {
                return Err(Broken::Remote(format!("DISCONNECT {reason}")))
            }
            FromServer::ConnAck(_) => return Err(Broken::Remote("a second CONNACK".into())),
            FromServer::Unexpected(what) => {
                return Err(Broken::Remote(format!("unexpected {what}")))
            }
        })
    }

    /// A message of the local session that cannot go out (too large for the
    /// upstream): acknowledged locally, as if delivered, so the queue moves on.
    pub(super) fn give_up(&mut self, qos: u8, pkid: u16) -> Vec<Step> {
        self.in_flight.remove(&pkid);
        self.counts.out = self.counts.out.saturating_sub(1);
        self.answer_out(qos, pkid)
    }

    fn swallow_out(&mut self, message: &Message, pkid: u16) -> Vec<Step> {
        self.answer_out(message.qos, pkid)
    }

    fn answer_out(&mut self, qos: u8, pkid: u16) -> Vec<Step> {
        match qos {
            0 => Vec::new(),
            1 => vec![Step::ToLocal(ToServer::PubAck(pkid))],
            _ => {
                self.answered_out.insert(pkid);
                vec![Step::ToLocal(ToServer::PubRec(pkid))]
            }
        }
    }

    fn swallow_in(&mut self, message: &Message, pkid: u16) -> Vec<Step> {
        match message.qos {
            0 => Vec::new(),
            1 => vec![Step::ToRemote(ToServer::PubAck(pkid))],
            _ => {
                self.answered_in.insert(pkid);
                vec![Step::ToRemote(ToServer::PubRec(pkid))]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BridgeTopic, Direction};
    use bytes::Bytes;

    fn routes(direction: Direction) -> Routes {
        Routes::new(&[BridgeTopic {
            pattern: "a/#".into(),
            direction,
            qos: 2,
            local_prefix: String::new(),
            remote_prefix: "up/".into(),
        }])
    }

    fn publish(topic: &str, qos: u8, pkid: u16) -> FromServer {
        FromServer::Publish {
            message: Message {
                topic: topic.into(),
                payload: Bytes::from_static(b"p"),
                qos,
                retain: false,
                properties: None,
            },
            pkid,
            dup: false,
        }
    }

    fn sent_topic(steps: &[Step]) -> Option<(&str, u16, bool)> {
        match steps {
            [Step::ToRemote(ToServer::Publish { message, pkid, .. })] => {
                Some((&message.topic, *pkid, true))
            }
            [Step::ToLocal(ToServer::Publish { message, pkid, .. })] => {
                Some((&message.topic, *pkid, false))
            }
            _ => None,
        }
    }

    #[test]
    fn qos2_out_keeps_its_packet_id_end_to_end() {
        let now = Instant::now();
        let mut relay = Relay::new(routes(Direction::Out), false);
        let steps = relay.on_local(publish("a/x", 2, 9), now).unwrap();
        assert_eq!(sent_topic(&steps), Some(("up/a/x", 9, true)));
        let steps = relay
            .on_remote(
                FromServer::PubRec {
                    pkid: 9,
                    refused: None,
                },
                now,
            )
            .unwrap();
        assert_eq!(steps, [Step::ToLocal(ToServer::PubRec(9))]);
        let steps = relay.on_local(FromServer::PubRel(9), now).unwrap();
        assert_eq!(steps, [Step::ToRemote(ToServer::PubRel(9))]);
        let steps = relay.on_remote(FromServer::PubComp(9), now).unwrap();
        assert_eq!(steps, [Step::ToLocal(ToServer::PubComp(9))]);
        assert_eq!(relay.counts.out, 1);
    }

    #[test]
    fn qos1_in_is_acknowledged_upstream_only_when_the_local_side_acknowledges() {
        let now = Instant::now();
        let mut relay = Relay::new(routes(Direction::In), false);
        let steps = relay.on_remote(publish("up/a/y", 1, 4), now).unwrap();
        assert_eq!(sent_topic(&steps), Some(("a/y", 4, false)));
        let steps = relay
            .on_local(
                FromServer::PubAck {
                    pkid: 4,
                    refused: None,
                },
                now,
            )
            .unwrap();
        assert_eq!(steps, [Step::ToRemote(ToServer::PubAck(4))]);
    }

    #[test]
    fn messages_no_route_takes_are_acknowledged_where_they_came_from() {
        let now = Instant::now();
        let mut relay = Relay::new(routes(Direction::Out), false);
        let steps = relay.on_local(publish("b/x", 1, 3), now).unwrap();
        assert_eq!(steps, [Step::ToLocal(ToServer::PubAck(3))]);
        let steps = relay.on_local(publish("b/x", 2, 5), now).unwrap();
        assert_eq!(steps, [Step::ToLocal(ToServer::PubRec(5))]);
        let steps = relay.on_local(FromServer::PubRel(5), now).unwrap();
        assert_eq!(steps, [Step::ToLocal(ToServer::PubComp(5))]);
        let steps = relay.on_remote(publish("up/a/x", 2, 6), now).unwrap();
        assert_eq!(steps, [Step::ToRemote(ToServer::PubRec(6))]);
        let steps = relay.on_remote(FromServer::PubRel(6), now).unwrap();
        assert_eq!(steps, [Step::ToRemote(ToServer::PubComp(6))]);
    }

    #[test]
    fn an_upstream_without_no_local_has_its_echoes_taken_off_once_each() {
        let now = Instant::now();
        let mut relay = Relay::new(routes(Direction::Both), true);
        relay.on_local(publish("a/x", 1, 1), now).unwrap();
        relay.on_local(publish("a/x", 1, 2), now).unwrap();
        // Both copies come back: neither goes local.
        for pkid in [10, 11] {
            let steps = relay.on_remote(publish("up/a/x", 1, pkid), now).unwrap();
            assert_eq!(steps, [Step::ToRemote(ToServer::PubAck(pkid))]);
        }
        // A third is somebody else's: it goes local.
        let steps = relay.on_remote(publish("up/a/x", 1, 12), now).unwrap();
        assert_eq!(sent_topic(&steps), Some(("a/x", 12, false)));
        assert_eq!(relay.counts.echoes, 2);
        // Remembered for a while only.
        relay.on_local(publish("a/z", 1, 3), now).unwrap();
        let later = now + ECHO_WINDOW + Duration::from_secs(1);
        let steps = relay.on_remote(publish("up/a/z", 1, 13), later).unwrap();
        assert_eq!(sent_topic(&steps), Some(("a/z", 13, false)));
    }

    #[test]
    fn a_refusal_upstream_is_reported_and_ends_the_local_exchange() {
        let now = Instant::now();
        let mut relay = Relay::new(routes(Direction::Out), false);
        relay.on_local(publish("a/x", 2, 9), now).unwrap();
        let steps = relay
            .on_remote(
                FromServer::PubRec {
                    pkid: 9,
                    refused: Some("NotAuthorized".into()),
                },
                now,
            )
            .unwrap();
        assert_eq!(steps[0], Step::ToLocal(ToServer::PubRec(9)));
        assert_eq!(
            steps[1],
            Step::Refused {
                topic: "up/a/x".into(),
                reason: "NotAuthorized".into()
            }
        );
        let steps = relay.on_local(FromServer::PubRel(9), now).unwrap();
        assert_eq!(steps, [Step::ToLocal(ToServer::PubComp(9))]);
        assert_eq!(relay.counts.refused, 1);
    }

    #[test]
    fn a_disconnect_ends_the_relay_naming_the_side() {
        let mut relay = Relay::new(routes(Direction::Out), false);
        let err = relay
            .on_remote(
                FromServer::Disconnect("ServerShuttingDown".into()),
                Instant::now(),
            )
            .unwrap_err();
        assert_eq!(err, Broken::Remote("DISCONNECT ServerShuttingDown".into()));
    }
}
