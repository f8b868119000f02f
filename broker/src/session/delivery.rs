//! Messages to this session's client: taken from the inbox, the router link, the
//! `$SYS` channel or the store's queue, matched against the subscriptions, then written
//! now, queued by the QoS engine (`outgoing`) or, for QoS 0 to a client that reads too
//! slowly, dropped.

use super::outgoing::{Admission, Owed, Resend, Transmit};
use super::subscriptions::matching;
use super::Session;
use crate::message::{now_micros, Envelope, Message};
use crate::protocol::{Outbound, TooLargeForClient};
use crate::routing::fanout::Handed;
use crate::store::Sent;
use bytes::Bytes;
use mqtt_common::topic;
use std::collections::{HashSet, VecDeque};
use std::time::SystemTime;
use tracing::warn;

/// Deliveries taken from the inbox before one flush.
pub(super) const BATCH: usize = 256;
/// Unwritten bytes beyond which QoS 0 messages for a client are dropped (and counted).
const QOS0_BACKLOG: usize = 1 << 20;
/// Message ids remembered to deliver one copy of a message that arrives twice (from the
/// index and through a `$share` group, or once per overlapping `$share` filter).
const RECENT_IDS: usize = 4096;

/// Recently delivered message ids, bounded.
#[derive(Default)]
pub(super) struct RecentIds {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

impl RecentIds {
    /// True when `id` was not seen yet.
    fn insert(&mut self, id: u64) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > RECENT_IDS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// Nothing went out: no client is attached, or the packet is larger than it accepts.
pub(super) struct NotSent;

impl From<TooLargeForClient> for NotSent {
    fn from(_: TooLargeForClient) -> Self {
        NotSent
    }
}

impl Session {
    /// Takes messages from the inbox, the first one and what else is there; stops
    /// early when the queue of a connected client fills (its publishers then wait).
    pub(super) fn on_inbox(&mut self, first: Handed) {
        self.recheck_subscriptions();
        self.accept(first);
        for _ in 1..BATCH {
            if !self.takes_inbox() {
                break;
            }
            match self.inbox.try_recv() {
                Ok(handed) => self.accept(handed),
                Err(_) => break,
            }
        }
    }

    /// Whether the session takes more from its inbox now: not while its client is
    /// connected and its queue is full, so that publishers wait rather than messages
    /// being dropped.
    pub(super) fn takes_inbox(&self) -> bool {
        self.conn.is_none() || !self.outgoing.full()
    }

    pub(super) fn accept(&mut self, handed: Handed) {
        let d = &handed.delivery;
        self.offer(
            d.topic.clone(),
            d.payload.clone(),
            d.envelope.clone(),
            handed.seq,
        );
    }

    /// New `$SYS` values, for the `$SYS` subscriptions the router does not hold.
    pub(super) async fn on_sys(&mut self) {
        let messages = self.sys.borrow_and_update().clone();
        for m in messages.iter() {
            let envelope = Envelope {
                qos: 0,
                retain: true,
                origin: 0,
                id: self.shared.ids.next(),
                received_at: now_micros(),
                properties: None,
            };
            self.offer(m.topic.clone(), m.payload.clone(), envelope, None);
        }
        self.flush().await;
    }

    /// Delivers a message to this session if one of its subscriptions matches.
    /// `seq`: the store holds it for this session under this sequence number (and the
    /// envelope's id).
    pub(super) fn offer(
        &mut self,
        topic: String,
        payload: Bytes,
        envelope: Envelope,
        seq: Option<u64>,
    ) {
        let id = envelope.id;
        match self.prepare(topic, payload, envelope, true) {
            Some(message) => self.deliver(Owed { id, seq, message }, false),
            None if seq.is_some() => {
                // Never held: the engine's next sequence number still moves on.
                self.outgoing.skip(seq);
                self.release(id);
            }
            None => {}
        }
    }

    /// Whether the ACL's `deny_subscribe` keeps `topic` from this client: a wider
    /// subscription was granted without it.
    pub(super) fn is_hidden(&self, topic: &str) -> bool {
        self.hidden.iter().any(|p| topic::matches(p, topic))
    }

    /// The message as this session delivers it: QoS min(published, granted), retain
    /// as its subscriptions ask, subscription identifiers, expiry lowered. None when no
    /// subscription matches, the ACL hides its topic, it expired, or (`dedupe`) it
    /// arrived before.
    pub(super) fn prepare(
        &mut self,
        topic: String,
        payload: Bytes,
        envelope: Envelope,
        dedupe: bool,
    ) -> Option<Message> {
        let matched = matching(&self.subs, &topic, envelope.origin == self.id)?;
        if self.is_hidden(&topic) {
            return None;
        }
        // Overlapping filters: the router sends one copy per filter; deliver one.
        if dedupe && matched.count > 1 && !self.recent.insert(envelope.id) {
            return None;
        }
        let qos = envelope.qos.min(matched.granted);
        let immediate = self.conn.is_some() && (qos == 0 || self.outgoing.sends_now());
        if immediate {
            let micros = now_micros().saturating_sub(envelope.received_at);
            self.shared
                .metrics
                .delivery_seconds
                .observe(micros as f64 / 1e6);
        }
        let expires = envelope
            .properties
            .as_ref()
            .is_some_and(|p| p.message_expiry_interval.is_some());
        let received = envelope.received();
        let mut message = Message {
            topic,
            payload,
            qos,
            retain: matched.retain_as_published && envelope.retain,
            properties: envelope.properties,
        };
        if expires {
            // Lowered by the time it waited; an expired message is not delivered.
            message = message.unexpired(received, SystemTime::now())?;
        }
        if !matched.ids.is_empty() {
            message
                .properties
                .get_or_insert_with(Default::default)
                .subscription_identifiers = matched.ids;
        }
        Some(message)
    }

    /// Sends a message now, or queues it; `force` ignores the queue limit (retained
    /// messages on subscribe, bounded by the retained store itself). A connected
    /// client's queue never drops: its publishers wait instead (`takes_inbox`).
    pub(super) fn deliver(&mut self, owed: Owed, force: bool) {
        if owed.message.qos == 0 {
            // QoS 0 is not kept for offline clients, nor piled up for slow readers.
            let backlog = self.conn.as_ref().map_or(0, |c| c.framed.unwritten());
            let (id, seq) = (owed.id, owed.seq);
            if !force && backlog > QOS0_BACKLOG {
                self.drop_message(
                    &owed.message.topic,
                    "client reads too slowly: QoS 0 message dropped",
                );
            } else {
                let _ = self.send(Outbound::Publish {
                    message: owed.message,
                    pkid: 0,
                    dup: false,
                });
            }
            if seq.is_some() {
                self.outgoing.skip(seq);
                self.release(id);
            }
            return;
        }
        let force = force || self.conn.is_some();
        match self.outgoing.admit(owed, SystemTime::now(), force) {
            Admission::Send(transmit) => self.transmit(transmit),
            Admission::Queued | Admission::OnDisk => {}
            Admission::Dropped(dropped) => {
                self.drop_message(
                    &dropped.message.topic,
                    "session queue full (max_queued): message dropped",
                );
                if dropped.stored() {
                    self.release(dropped.id);
                }
            }
        }
    }

    /// Writes a QoS 1/2 PUBLISH the engine put in flight, and tells the store.
    fn transmit(&mut self, Transmit { pkid, dup, owed }: Transmit) {
        let Owed { id, seq, message } = owed;
        let stored = seq.is_some();
        let qos = message.qos;
        let sent = self.send(Outbound::Publish { message, pkid, dup });
        if sent.is_err() {
            let topic = self
                .outgoing
                .unsent(pkid)
                .map(|o| o.message.topic)
                .unwrap_or_default();
            warn!(client_id = %self.key.client_id, topic = %topic,
                "message larger than the client's maximum packet size: not sent");
            if stored {
                self.release(id);
            }
            return;
        }
        if stored && qos == 2 {
            // Exactly once: its packet id is on disk before the client can see it, so
            // that a restart resends it under the same one.
            self.record_qos2_out(
                id,
                Some(Sent::InFlight {
                    pkid,
                    released: false,
                }),
            );
            self.needs_sync = true;
        }
    }

    /// Moves queued messages into the inflight window, reading from the store what
    /// waits there.
    pub(super) fn pump(&mut self) {
        if self.outgoing.queued() == 0 {
            return;
        }
        let now = SystemTime::now();
        loop {
            self.read_from_disk();
            let Some(transmit) = self.outgoing.next(now) else {
                break;
            };
            self.transmit(transmit);
        }
        for id in self.outgoing.take_expired() {
            self.release(id);
        }
    }

    /// Writes again what the client had not acknowledged, then what is queued.
    pub(super) fn resend(&mut self, resends: Vec<Resend>) {
        for resend in resends {
            let packet = match resend {
                Resend::Publish { pkid, message } => Outbound::Publish {
                    message,
                    pkid,
                    dup: true,
                },
                Resend::PubRel { pkid } => Outbound::PubRel { pkid },
            };
            let _ = self.send(packet);
        }
        self.pump();
    }

    /// Queues a packet for the attached client, with a topic alias where one applies.
    pub(super) fn send(&mut self, mut packet: Outbound) -> Result<(), NotSent> {
        let Some(c) = self.conn.as_mut() else {
            return Err(NotSent);
        };
        let (qos, new_alias) = match &mut packet {
            Outbound::Publish { message, .. } => (Some(message.qos), c.aliases_out.apply(message)),
            _ => (None, None),
        };
        c.framed.queue(packet)?;
        // Recorded only now: an alias the client never received must not be reused.
        if let Some((topic, alias)) = new_alias {
            c.aliases_out.record(topic, alias);
        }
        if let Some(qos) = qos {
            self.shared.metrics.sent(qos);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut recent = RecentIds::default();
        assert!(recent.insert(1));
        assert!(!recent.insert(1));
        for id in 2..=(RECENT_IDS as u64 + 1) {
            assert!(recent.insert(id));
        }
        assert!(recent.insert(1), "the oldest id was forgotten");
    }
}
