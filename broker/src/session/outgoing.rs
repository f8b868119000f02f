//! The outgoing QoS engine: which QoS 1/2 messages a session sends now, which wait, and
//! what is in flight. Packet ids, the inflight window (the client's Receive Maximum
//! capped by `max_inflight`), the queue behind it (`max_queued`), resending with DUP in
//! the original order, and message expiry while queued. No socket, no shared state:
//! the session feeds it events and the time, and writes what it returns.

use crate::message::Message;
use std::collections::{HashMap, VecDeque};
use std::time::SystemTime;

pub(crate) struct Outgoing {
    /// Sent and not yet acknowledged, by packet id.
    inflight: HashMap<u16, Inflight>,
    /// Waiting for room in the window or for the client, oldest first.
    queue: VecDeque<Queued>,
    /// The packet id handed out last; 0 is never used.
    last_pkid: u16,
    /// Counts sends, so that inflight messages are resent in the order first sent.
    seq: u64,
    /// Room in flight: the attached client's Receive Maximum capped by
    /// `max_inflight`; 0 while no client is attached.
    window: usize,
    /// `[session] max_inflight`.
    max_inflight: usize,
    /// `[session] max_queued`.
    max_queued: usize,
}

struct Inflight {
    message: Message,
    seq: u64,
    /// PUBREC received, PUBREL sent: waiting for PUBCOMP.
    released: bool,
}

/// A message waiting in the queue, with the moment its wait began (message expiry).
struct Queued {
    message: Message,
    since: SystemTime,
}

/// A QoS 1/2 PUBLISH to write now; it is already counted in flight.
#[derive(Debug, PartialEq)]
pub(crate) struct Transmit {
    pub(crate) pkid: u16,
    pub(crate) message: Message,
}

/// What became of a message offered for delivery.
#[derive(Debug, PartialEq)]
pub(crate) enum Admission {
    /// Write it now.
    Send(Transmit),
    /// Queued behind the window, or for the client to return.
    Queued,
    /// The queue holds `max_queued` messages: not kept.
    QueueFull(Message),
}

/// What to write again when a client attaches, in the order first sent.
#[derive(Debug, PartialEq)]
// Short-lived, in a Vec made once per attach: not worth a box per message.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Resend {
    /// Not acknowledged: the PUBLISH again, with DUP set.
    Publish { pkid: u16, message: Message },
    /// PUBREC received, PUBCOMP not yet: the PUBREL again.
    PubRel { pkid: u16 },
}

impl Outgoing {
    pub(crate) fn new(max_inflight: u16, max_queued: usize) -> Self {
        Self {
            inflight: HashMap::new(),
            queue: VecDeque::new(),
            last_pkid: 0,
            seq: 0,
            window: 0,
            max_inflight: usize::from(max_inflight),
            max_queued,
        }
    }

    /// A client attached with this Receive Maximum: what is in flight goes again.
    pub(crate) fn attach(&mut self, receive_max: u16) -> Vec<Resend> {
        self.window = usize::from(receive_max).min(self.max_inflight);
        let mut order: Vec<(u64, u16)> = self.inflight.iter().map(|(p, m)| (m.seq, *p)).collect();
        order.sort_unstable();
        order
            .into_iter()
            .filter_map(|(_, pkid)| {
                let m = self.inflight.get(&pkid)?;
                Some(if m.released {
                    Resend::PubRel { pkid }
                } else {
                    Resend::Publish {
                        pkid,
                        message: m.message.clone(),
                    }
                })
            })
            .collect()
    }

    /// The client is gone: everything waits for the next one.
    pub(crate) fn detach(&mut self) {
        self.window = 0;
    }

    /// Whether a message offered now would be written at once (nothing queued ahead of
    /// it, room in the window).
    pub(crate) fn sends_now(&self) -> bool {
        self.queue.is_empty() && self.inflight.len() < self.window
    }

    /// Offers a QoS 1/2 message; `force` queues it even beyond `max_queued` (retained
    /// messages on subscribe, bounded by the retained store itself).
    pub(crate) fn admit(&mut self, message: Message, now: SystemTime, force: bool) -> Admission {
        if self.sends_now() {
            Admission::Send(self.track(message))
        } else if force || self.queue.len() < self.max_queued {
            self.queue.push_back(Queued {
                message,
                since: now,
            });
            Admission::Queued
        } else {
            Admission::QueueFull(message)
        }
    }

    /// The next queued message that fits in the window; expired ones are skipped.
    pub(crate) fn next(&mut self, now: SystemTime) -> Option<Transmit> {
        while self.inflight.len() < self.window {
            let queued = self.queue.pop_front()?;
            if let Some(message) = queued.message.unexpired(queued.since, now) {
                return Some(self.track(message));
            }
        }
        None
    }

    /// A transmit could not be written (larger than the client accepts): it is not in
    /// flight after all. Returns the message.
    pub(crate) fn unsent(&mut self, pkid: u16) -> Option<Message> {
        self.inflight.remove(&pkid).map(|m| m.message)
    }

    /// PUBACK or PUBCOMP: the message is delivered. False for an unknown packet id.
    pub(crate) fn acknowledged(&mut self, pkid: u16) -> bool {
        self.inflight.remove(&pkid).is_some()
    }

    /// PUBREC: the client has the message; PUBREL follows. False for an unknown id.
    pub(crate) fn received(&mut self, pkid: u16) -> bool {
        match self.inflight.get_mut(&pkid) {
            Some(m) => {
                m.released = true;
                true
            }
            None => false,
        }
    }

    /// Every message still owed to the client, in the order it would get them: those in
    /// flight and not yet received, then the unexpired queue (expiry lowered).
    pub(crate) fn owed(&self, now: SystemTime) -> Vec<Message> {
        let mut inflight: Vec<&Inflight> = self.inflight.values().filter(|m| !m.released).collect();
        inflight.sort_unstable_by_key(|m| m.seq);
        let mut owed: Vec<Message> = inflight.into_iter().map(|m| m.message.clone()).collect();
        owed.extend(
            self.queue
                .iter()
                .filter_map(|q| q.message.clone().unexpired(q.since, now)),
        );
        owed
    }

    /// Queues messages saved before a restart; their expiry counts from `now`.
    pub(crate) fn restore(&mut self, messages: Vec<Message>, now: SystemTime) {
        self.queue = messages
            .into_iter()
            .map(|message| Queued {
                message,
                since: now,
            })
            .collect();
    }

    /// Forgets everything (a new session under the same key).
    pub(crate) fn clear(&mut self) {
        self.inflight.clear();
        self.queue.clear();
    }

    /// Messages in the queue (not those in flight).
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    fn track(&mut self, message: Message) -> Transmit {
        let pkid = self.next_pkid();
        self.seq += 1;
        self.inflight.insert(
            pkid,
            Inflight {
                message: message.clone(),
                seq: self.seq,
                released: false,
            },
        );
        Transmit { pkid, message }
    }

    /// The next packet id after the last, skipping 0 and ids still in flight. The window
    /// is at most 65,535, so one is always free.
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1);
            if self.last_pkid != 0 && !self.inflight.contains_key(&self.last_pkid) {
                return self.last_pkid;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::PublishProperties;
    use bytes::Bytes;
    use std::time::{Duration, UNIX_EPOCH};

    fn msg(n: u32) -> Message {
        Message {
            topic: format!("t/{n}"),
            payload: Bytes::from(n.to_string()),
            qos: 1,
            retain: false,
            properties: None,
        }
    }

    fn expiring(n: u32, secs: u32) -> Message {
        Message {
            properties: Some(PublishProperties {
                message_expiry_interval: Some(secs),
                ..Default::default()
            }),
            ..msg(n)
        }
    }

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn sent(admission: Admission) -> Transmit {
        match admission {
            Admission::Send(t) => t,
            other => panic!("expected a send, got {other:?}"),
        }
    }

    fn topics(messages: &[Message]) -> Vec<&str> {
        messages.iter().map(|m| m.topic.as_str()).collect()
    }

    #[test]
    fn offline_messages_wait_for_a_client() {
        let mut out = Outgoing::new(10, 100);
        assert_eq!(out.admit(msg(1), t(0), false), Admission::Queued);
        assert!(!out.sends_now());
        assert!(out.next(t(0)).is_none(), "no client: nothing goes out");
        assert!(out.attach(u16::MAX).is_empty());
        let first = out.next(t(1)).unwrap();
        assert_eq!((first.pkid, first.message.topic.as_str()), (1, "t/1"));
        assert!(out.next(t(1)).is_none());
    }

    #[test]
    fn the_window_is_the_smaller_of_receive_maximum_and_max_inflight() {
        for (receive_max, max_inflight, window) in [(3, 10, 3), (u16::MAX, 2, 2)] {
            let mut out = Outgoing::new(max_inflight, 100);
            out.attach(receive_max);
            let sends = (0..10)
                .filter(|n| matches!(out.admit(msg(*n), t(0), false), Admission::Send(_)))
                .count();
            assert_eq!(sends, window);
            assert_eq!(out.queued(), 10 - window);
        }
    }

    #[test]
    fn an_acknowledgement_makes_room_for_the_next_in_order() {
        let mut out = Outgoing::new(2, 100);
        out.attach(u16::MAX);
        let a = sent(out.admit(msg(1), t(0), false));
        sent(out.admit(msg(2), t(0), false));
        assert_eq!(out.admit(msg(3), t(0), false), Admission::Queued);
        // Queued ahead: a new message waits behind msg 3 even with room.
        assert!(out.next(t(0)).is_none());
        assert!(out.acknowledged(a.pkid));
        assert!(!out.acknowledged(a.pkid), "acknowledged once");
        assert!(!out.sends_now(), "msg 3 goes before anything new");
        assert_eq!(out.next(t(0)).unwrap().message.topic, "t/3");
        assert_eq!(out.queued(), 0);
    }

    #[test]
    fn the_queue_is_bounded_unless_forced() {
        let mut out = Outgoing::new(1, 2);
        assert_eq!(out.admit(msg(1), t(0), false), Admission::Queued);
        assert_eq!(out.admit(msg(2), t(0), false), Admission::Queued);
        assert_eq!(out.admit(msg(3), t(0), false), Admission::QueueFull(msg(3)));
        assert_eq!(out.admit(msg(4), t(0), true), Admission::Queued);
        assert_eq!(out.queued(), 3);
    }

    #[test]
    fn packet_ids_wrap_around_skipping_zero_and_ids_in_flight() {
        let mut out = Outgoing::new(u16::MAX, 100);
        out.attach(u16::MAX);
        out.last_pkid = u16::MAX - 2;
        let keep = sent(out.admit(msg(0), t(0), false));
        assert_eq!(keep.pkid, u16::MAX - 1);
        let acked = sent(out.admit(msg(1), t(0), false));
        assert_eq!(acked.pkid, u16::MAX);
        out.acknowledged(acked.pkid);
        assert_eq!(sent(out.admit(msg(2), t(0), false)).pkid, 1, "0 is skipped");
        // All the way round: the id still in flight is skipped, a freed one reused.
        out.last_pkid = u16::MAX - 2;
        assert_eq!(sent(out.admit(msg(3), t(0), false)).pkid, u16::MAX);
        assert_eq!(sent(out.admit(msg(4), t(0), false)).pkid, 2);
    }

    #[test]
    fn reattaching_resends_in_the_original_order_with_pubrel_for_released() {
        let mut out = Outgoing::new(10, 100);
        out.attach(u16::MAX);
        out.last_pkid = 65_000;
        let ids: Vec<u16> = (1..=4)
            .map(|n| sent(out.admit(msg(n), t(0), false)).pkid)
            .collect();
        out.received(ids[1]);
        out.acknowledged(ids[2]);
        out.detach();
        assert!(!out.sends_now());
        assert_eq!(
            out.attach(u16::MAX),
            vec![
                Resend::Publish {
                    pkid: ids[0],
                    message: msg(1)
                },
                Resend::PubRel { pkid: ids[1] },
                Resend::Publish {
                    pkid: ids[3],
                    message: msg(4)
                },
            ]
        );
    }

    #[test]
    fn a_message_that_cannot_be_written_is_not_in_flight() {
        let mut out = Outgoing::new(1, 100);
        out.attach(u16::MAX);
        let big = sent(out.admit(msg(1), t(0), false));
        assert_eq!(out.unsent(big.pkid), Some(msg(1)));
        assert!(out.sends_now());
        assert!(out.attach(u16::MAX).is_empty());
    }

    #[test]
    fn queued_messages_expire_and_the_rest_have_their_expiry_lowered() {
        let mut out = Outgoing::new(10, 100);
        out.admit(expiring(1, 5), t(0), false);
        out.admit(expiring(2, 60), t(0), false);
        out.admit(msg(3), t(0), false);
        let owed = out.owed(t(10));
        assert_eq!(topics(&owed), ["t/2", "t/3"]);
        out.attach(u16::MAX);
        let first = out.next(t(10)).unwrap();
        assert_eq!(first.message.topic, "t/2", "the expired one is skipped");
        let left = first
            .message
            .properties
            .and_then(|p| p.message_expiry_interval);
        assert_eq!(left, Some(50));
        assert_eq!(out.next(t(10)).unwrap().message.topic, "t/3");
    }

    #[test]
    fn owed_lists_inflight_then_queue_and_restore_requeues_them() {
        let mut out = Outgoing::new(2, 100);
        out.attach(u16::MAX);
        let a = sent(out.admit(msg(1), t(0), false));
        let b = sent(out.admit(msg(2), t(0), false));
        out.admit(msg(3), t(0), false);
        out.received(b.pkid);
        let owed = out.owed(t(0));
        assert_eq!(
            topics(&owed),
            ["t/1", "t/3"],
            "a released message is the client's"
        );
        assert!(out.acknowledged(a.pkid));

        let mut back = Outgoing::new(2, 100);
        back.restore(owed, t(100));
        assert_eq!(back.queued(), 2);
        back.attach(u16::MAX);
        assert_eq!(back.next(t(100)).unwrap().message.topic, "t/1");
        back.clear();
        assert_eq!(back.queued(), 0);
        assert!(back.attach(u16::MAX).is_empty());
    }
}
