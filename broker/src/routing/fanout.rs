//! Which sessions a published message goes to, and the hand-over from the publishing
//! session straight into each subscriber session's inbox.
//!
//! Plain subscriptions are matched here rather than in rumqttd's router: a message then
//! crosses no thread of its own (publisher session → subscriber session, one wake-up
//! instead of three), and a full inbox slows its publisher instead of the router
//! overwriting messages. Shared subscriptions (`$share/...`) stay in the router, which
//! distributes them among a group's members.

use crate::message::Envelope;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;

/// A published message on its way to the subscriber sessions, shared between them.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) envelope: Envelope,
}

/// A message handed to one subscriber session.
#[derive(Debug, Clone)]
pub(crate) struct Handed {
    pub(crate) delivery: Arc<Delivery>,
    /// For a persistent session's QoS 1/2 message: its sequence number in the
    /// session's queue, under which the publisher stores it (message id: the
    /// envelope's) before acknowledging it. Sequence numbers reach the session in
    /// order.
    pub(crate) seq: Option<u64>,
}

/// A session's end of the hand-over: bounded, so that a session that cannot keep up
/// (starved of CPU, or holding a full queue for a slow client) slows its publishers.
pub(crate) type Inbox = mpsc::Receiver<Handed>;

/// The publishers' end of a session's inbox.
#[derive(Clone)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Handed>,
    /// The session's id in the store while it is persistent; 0 otherwise. Publishers
    /// store its QoS 1/2 messages under it before they acknowledge them.
    store_id: Arc<AtomicU64>,
    /// The next sequence number of the session's stored queue; taken and the message
    /// sent under this lock, so that the inbox holds them in order.
    next_seq: Arc<Mutex<u64>>,
}

impl Outbox {
    /// The session's store id, 0 when its messages are not stored.
    pub(crate) fn store_id(&self) -> u64 {
        self.store_id.load(Ordering::Acquire)
    }

    /// Set by the session when it becomes persistent (its store id) or stops being (0).
    pub(crate) fn set_store_id(&self, id: u64) {
        self.store_id.store(id, Ordering::Release);
    }

    /// A sequence number for a message the session stores itself.
    pub(crate) fn take_seq(&self) -> u64 {
        let mut next = self.seq_lock();
        *next += 1;
        *next - 1
    }

    /// The next sequence number, not taken.
    pub(crate) fn peek_seq(&self) -> u64 {
        *self.seq_lock()
    }

    /// Where the session's sequence numbers go on (after a restart).
    pub(crate) fn set_next_seq(&self, seq: u64) {
        *self.seq_lock() = seq;
    }

    fn seq_lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.next_seq.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `delivery` over, stored under the next sequence number if `stored`;
    /// returns that number.
    fn try_hand(
        &self,
        delivery: &Arc<Delivery>,
        stored: bool,
    ) -> Result<Option<u64>, mpsc::error::TrySendError<Handed>> {
        if !stored {
            let handed = Handed {
                delivery: delivery.clone(),
                seq: None,
            };
            return self.tx.try_send(handed).map(|()| None);
        }
        let mut next = self.seq_lock();
        let handed = Handed {
            delivery: delivery.clone(),
            seq: Some(*next),
        };
        self.tx.try_send(handed)?;
        *next += 1;
        Ok(Some(*next - 1))
    }

    /// Waits for room, then hands `delivery` over as `try_hand` does; Err when the
    /// session has ended.
    pub(crate) async fn hand(
        &self,
        delivery: Arc<Delivery>,
        stored: bool,
    ) -> Result<Option<u64>, ()> {
        let permit = self.tx.reserve().await.map_err(|_| ())?;
        if !stored {
            permit.send(Handed {
                delivery,
                seq: None,
            });
            return Ok(None);
        }
        let mut next = self.seq_lock();
        let seq = *next;
        permit.send(Handed {
            delivery,
            seq: Some(seq),
        });
        *next += 1;
        Ok(Some(seq))
    }
}

pub(crate) fn inbox(capacity: usize) -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let outbox = Outbox {
        tx,
        store_id: Arc::new(AtomicU64::new(0)),
        next_seq: Arc::new(Mutex::new(0)),
    };
    (outbox, rx)
}

/// The subscription index of plain filters, and the count of shared subscriptions,
/// which the router holds.
#[derive(Default)]
pub(crate) struct Fanout {
    root: RwLock<Node>,
    shared_subscriptions: AtomicUsize,
}

/// One topic level of the index. A `+` is a child named `+`; a `#` is held by the
/// level above it, in `rest`.
#[derive(Default)]
struct Node {
    children: HashMap<String, Node>,
    /// Subscribers whose filter ends at this level.
    here: HashMap<u64, Outbox>,
    /// Subscribers whose filter is this level followed by `#`.
    rest: HashMap<u64, Outbox>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.rest.is_empty()
    }

    /// Removes `session` from the filter `levels`; true when this node became empty.
    fn remove(&mut self, levels: &[&str], session: u64) -> bool {
        match levels {
            [] => {
                self.here.remove(&session);
            }
            ["#"] => {
                self.rest.remove(&session);
            }
            [first, tail @ ..] => {
                if let Some(child) = self.children.get_mut(*first) {
                    if child.remove(tail, session) {
                        self.children.remove(*first);
                    }
                }
            }
        }
        self.is_empty()
    }

    /// Adds every subscriber matching the topic `levels` to `out`. `dollar`: the topic
    /// begins with `$`, which wildcards at the first level never match (MQTT 4.7.2).
    fn collect<'a>(
        &'a self,
        levels: &[&str],
        first: bool,
        dollar: bool,
        out: &mut Vec<&'a HashMap<u64, Outbox>>,
    ) {
        let wildcards = !(first && dollar);
        if wildcards && !self.rest.is_empty() {
            out.push(&self.rest);
        }
        let Some((level, tail)) = levels.split_first() else {
            if !self.here.is_empty() {
                out.push(&self.here);
            }
            return;
        };
        if let Some(child) = self.children.get(*level) {
            child.collect(tail, false, dollar, out);
        }
        if wildcards {
            if let Some(child) = self.children.get("+") {
                child.collect(tail, false, dollar, out);
            }
        }
    }
}

/// What a hand-over did, and what it could not finish.
#[derive(Default)]
pub(crate) struct HandOver {
    /// Inboxes that were full, with the session's store id (0: not stored): the
    /// publisher waits for room in each, then hands over.
    pub(crate) full: Vec<(Outbox, u64)>,
    /// Sessions that ended (closed their inbox) after matching; of them, persistent.
    pub(crate) ended: usize,
    pub(crate) ended_stored: u32,
    /// The persistent sessions it went to: store id and sequence number, for the
    /// message's record in the store.
    pub(crate) recipients: Vec<(u64, u64)>,
}

impl Fanout {
    /// `filter` is a valid filter that does not begin with `$`.
    pub(crate) fn subscribe(&self, filter: &str, session: u64, outbox: Outbox) {
        let mut node = &mut *self.write();
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                node.rest.insert(session, outbox);
                return;
            }
            node = node.children.entry(level.to_string()).or_default();
        }
        node.here.insert(session, outbox);
    }

    pub(crate) fn unsubscribe(&self, filter: &str, session: u64) {
        let levels: Vec<&str> = filter.split('/').collect();
        self.write().remove(&levels, session);
    }

    /// Offers `delivery` to every session with a matching filter, once per session.
    /// For a QoS 1/2 message, `hold` is first told how many persistent sessions are
    /// among them (none: not called), before any of them can have it. Full inboxes
    /// are returned, for the caller to wait on, and ended sessions counted.
    pub(crate) fn hand_over(&self, delivery: &Arc<Delivery>, hold: impl FnOnce(u32)) -> HandOver {
        let levels: Vec<&str> = delivery.topic.split('/').collect();
        let dollar = delivery.topic.starts_with('$');
        let root = self.read();
        let mut matched = Vec::new();
        root.collect(&levels, true, dollar, &mut matched);
        let mut targets: Vec<(&u64, &Outbox)> = matched.into_iter().flatten().collect();
        if targets.len() > 1 {
            // A session with overlapping filters gets one copy (MQTT 5 allows either).
            targets.sort_unstable_by_key(|(id, _)| **id);
            targets.dedup_by_key(|(id, _)| **id);
        }
        // Read once per target: a session may become persistent meanwhile.
        let store_ids: Vec<u64> = match delivery.envelope.qos {
            0 => vec![0; targets.len()],
            _ => targets.iter().map(|(_, o)| o.store_id()).collect(),
        };
        let mut outcome = HandOver::default();
        let durable = store_ids.iter().filter(|id| **id != 0).count() as u32;
        if durable > 0 {
            hold(durable);
        }
        for ((_, outbox), store_id) in targets.into_iter().zip(store_ids) {
            let stored = store_id != 0;
            match outbox.try_hand(delivery, stored) {
                Ok(Some(seq)) => outcome.recipients.push((store_id, seq)),
                Ok(None) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    outcome.full.push((outbox.clone(), store_id));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    outcome.ended += 1;
                    outcome.ended_stored += u32::from(stored);
                }
            }
        }
        outcome
    }

    pub(crate) fn shared_subscribed(&self) {
        self.shared_subscriptions.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn shared_unsubscribed(&self) {
        self.shared_subscriptions.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether published messages must also go to the router.
    pub(crate) fn has_shared_subscriptions(&self) -> bool {
        self.shared_subscriptions.load(Ordering::Relaxed) > 0
    }

    // A panic while holding the lock leaves the index as consistent as any single
    // insert or remove does: carry on with it.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Node> {
        self.root.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Node> {
        self.root.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(topic: &str) -> Arc<Delivery> {
        Arc::new(Delivery {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            envelope: Envelope {
                qos: 0,
                retain: false,
                origin: 0,
                id: 1,
                received_at: 0,
                properties: None,
            },
        })
    }

    /// Hands over with nothing to store.
    fn hand(fanout: &Fanout, delivery: &Arc<Delivery>) -> HandOver {
        fanout.hand_over(delivery, |_| {
            panic!("nothing persistent subscribed, nothing to store")
        })
    }

    /// The session ids that received a message on `topic`.
    fn receivers(fanout: &Fanout, inboxes: &mut [(u64, Inbox)], topic: &str) -> Vec<u64> {
        let outcome = hand(fanout, &delivery(topic));
        assert!(outcome.full.is_empty() && outcome.ended == 0);
        let mut got = Vec::new();
        for (id, inbox) in inboxes.iter_mut() {
            while let Ok(d) = inbox.try_recv() {
                assert_eq!(d.delivery.topic, topic);
                got.push(*id);
            }
        }
        got
    }

    fn index(filters: &[&str]) -> (Fanout, Vec<(u64, Inbox)>) {
        let fanout = Fanout::default();
        let mut inboxes = Vec::new();
        for (i, filter) in filters.iter().enumerate() {
            let (tx, rx) = inbox(crate::config::DEFAULT_INBOX);
            fanout.subscribe(filter, i as u64, tx);
            inboxes.push((i as u64, rx));
        }
        (fanout, inboxes)
    }

    #[test]
    fn wildcards_match_as_mqtt_says() {
        let filters = [
            "articulos/+/futbol",
            "articulos/#",
            "#",
            "+/+",
            "articulos/elpais/futbol",
            "articulos",
        ];
        let (fanout, mut inboxes) = index(&filters);
        assert_eq!(
            receivers(&fanout, &mut inboxes, "articulos/elpais/futbol"),
            vec![0, 1, 2, 4]
        );
        // `#` also matches its parent level.
        assert_eq!(receivers(&fanout, &mut inboxes, "articulos"), vec![1, 2, 5]);
        assert_eq!(receivers(&fanout, &mut inboxes, "a/b"), vec![2, 3]);
        // `+` matches an empty level.
        assert_eq!(
            receivers(&fanout, &mut inboxes, "articulos//futbol"),
            vec![0, 1, 2]
        );
        assert_eq!(
            receivers(&fanout, &mut inboxes, "articulos/elpais/tenis"),
            vec![1, 2]
        );
    }

    #[test]
    fn first_level_wildcards_never_match_dollar_topics() {
        let (fanout, mut inboxes) = index(&["#", "+/broker", "$SYS/#", "$SYS/+"]);
        assert_eq!(receivers(&fanout, &mut inboxes, "$SYS/broker"), vec![2, 3]);
    }

    #[test]
    fn overlapping_filters_give_one_copy() {
        let fanout = Fanout::default();
        let (tx, mut rx) = inbox(crate::config::DEFAULT_INBOX);
        for filter in ["a/#", "a/+", "a/b", "#"] {
            fanout.subscribe(filter, 7, tx.clone());
        }
        assert!(hand(&fanout, &delivery("a/b")).full.is_empty());
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn unsubscribe_removes_only_that_session_and_prunes() {
        let (fanout, mut inboxes) = index(&["a/+/c", "a/+/c", "a/#"]);
        fanout.unsubscribe("a/+/c", 0);
        assert_eq!(receivers(&fanout, &mut inboxes, "a/b/c"), vec![1, 2]);
        fanout.unsubscribe("a/+/c", 1);
        fanout.unsubscribe("a/#", 2);
        assert!(fanout.read().is_empty());
        // Unknown filters and sessions are ignored.
        fanout.unsubscribe("x/y", 9);
    }

    #[test]
    fn a_full_inbox_is_reported_not_dropped() {
        let fanout = Fanout::default();
        let (tx, mut rx) = inbox(1);
        fanout.subscribe("t", 1, tx);
        assert!(hand(&fanout, &delivery("t")).full.is_empty());
        assert_eq!(hand(&fanout, &delivery("t")).full.len(), 1);
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn a_closed_inbox_is_counted() {
        let fanout = Fanout::default();
        let (tx, rx) = inbox(crate::config::DEFAULT_INBOX);
        fanout.subscribe("t", 1, tx);
        drop(rx);
        let outcome = hand(&fanout, &delivery("t"));
        assert_eq!((outcome.full.len(), outcome.ended), (0, 1));
    }

    #[test]
    fn persistent_sessions_get_qos1_messages_in_sequence() {
        let fanout = Fanout::default();
        let (durable, mut durable_rx) = inbox(8);
        let (plain, mut plain_rx) = inbox(8);
        durable.set_store_id(42);
        durable.set_next_seq(5);
        fanout.subscribe("t", 1, durable);
        fanout.subscribe("t", 2, plain);
        let mut qos1 = (*delivery("t")).clone();
        qos1.envelope.qos = 1;
        let qos1 = Arc::new(qos1);
        for seq in [5, 6] {
            let mut held = 0;
            let outcome = fanout.hand_over(&qos1, |n| held = n);
            assert_eq!(held, 1, "held for the one persistent session");
            assert_eq!(outcome.recipients, [(42, seq)]);
            assert_eq!(durable_rx.try_recv().unwrap().seq, Some(seq));
            assert_eq!(plain_rx.try_recv().unwrap().seq, None);
        }
        // QoS 0 is never stored.
        hand(&fanout, &delivery("t"));
        assert_eq!(durable_rx.try_recv().unwrap().seq, None);
    }

    #[tokio::test]
    async fn a_full_persistent_inbox_gets_its_sequence_number_when_there_is_room() {
        let fanout = Fanout::default();
        let (durable, mut rx) = inbox(1);
        durable.set_store_id(7);
        fanout.subscribe("t", 1, durable.clone());
        let mut qos1 = (*delivery("t")).clone();
        qos1.envelope.qos = 1;
        let qos1 = Arc::new(qos1);
        assert_eq!(fanout.hand_over(&qos1, |_| {}).recipients, [(7, 0)]);
        let outcome = fanout.hand_over(&qos1, |_| {});
        assert!(outcome.recipients.is_empty());
        assert_eq!(outcome.full.len(), 1);
        assert_eq!(rx.try_recv().unwrap().seq, Some(0));
        assert_eq!(durable.hand(qos1.clone(), true).await, Ok(Some(1)));
        assert_eq!(rx.try_recv().unwrap().seq, Some(1));
    }
}
