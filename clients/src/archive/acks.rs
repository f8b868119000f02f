//! Which PUBACKs may go out: a message is acknowledged once its row, and every row
//! received before it, is committed (or refused), in the order the messages came, as
//! MQTT requires. Acknowledgements belong to one connection: after a reconnection the
//! broker sends the unacknowledged messages again, and those are acknowledged instead.

use std::collections::VecDeque;

use rumqttc::{AsyncClient, Publish, QoS};

/// A message waiting for its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiting {
    /// Last row that must be resolved first (its own, or the one before it).
    seq: u64,
    pkid: u16,
    qos: QoS,
}

#[derive(Debug, Default)]
pub(crate) struct AckTracker {
    /// This connection's unacknowledged messages, in the order received.
    waiting: VecDeque<Waiting>,
    /// Acknowledgements due, not yet accepted by rumqttc's request queue.
    due: VecDeque<(u16, QoS)>,
    /// Every row up to this seq is resolved.
    resolved: u64,
    /// The last seq given to a row.
    last_seq: u64,
}

impl AckTracker {
    /// The seq the next row gets (taken by `after_row`).
    pub(crate) fn next_seq(&self) -> u64 {
        self.last_seq + 1
    }

    /// `publish` is acknowledged once its row, `next_seq()`, and those before it are
    /// resolved.
    pub(crate) fn after_row(&mut self, publish: &Publish) {
        self.last_seq += 1;
        self.wait_for(self.last_seq, publish);
    }

    /// `publish` has no row of its own (refused): acknowledged after the rows before it.
    pub(crate) fn after_previous(&mut self, publish: &Publish) {
        self.wait_for(self.last_seq, publish);
    }

    fn wait_for(&mut self, seq: u64, publish: &Publish) {
        if publish.qos == QoS::AtMostOnce {
            return;
        }
        self.waiting.push_back(Waiting {
            seq,
            pkid: publish.pkid,
            qos: publish.qos,
        });
        self.release();
    }

    /// Rows up to `seq` are resolved.
    pub(crate) fn resolved(&mut self, seq: u64) {
        self.resolved = self.resolved.max(seq);
        self.release();
    }

    fn release(&mut self) {
        while let Some(w) = self.waiting.front().copied() {
            if w.seq > self.resolved {
                break;
            }
            self.waiting.pop_front();
            self.due.push_back((w.pkid, w.qos));
        }
    }

    /// A new connection: what was owed on the old one is owed no more.
    pub(crate) fn new_connection(&mut self) {
        self.waiting.clear();
        self.due.clear();
    }

    /// Hands due acknowledgements to rumqttc until its request queue is full; the
    /// subscriber calls it again on its next event (each acknowledgement rumqttc sends
    /// is one), so it never waits on the queue and never deadlocks with the event loop.
    pub(crate) fn pump(&mut self, client: &AsyncClient) {
        while let Some(&(pkid, qos)) = self.due.front() {
            let mut stub = Publish::new("", qos, Vec::new());
            stub.pkid = pkid;
            if client.try_ack(&stub).is_err() {
                return;
            }
            self.due.pop_front();
        }
    }

    /// Acknowledgements owed, due or waiting for rows.
    pub(crate) fn owed(&self) -> usize {
        self.waiting.len() + self.due.len()
    }

    /// Acknowledgements due but not yet handed to rumqttc.
    pub(crate) fn due(&self) -> usize {
        self.due.len()
    }

    #[cfg(test)]
    fn due_pkids(&self) -> Vec<u16> {
        self.due.iter().map(|(p, _)| *p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(pkid: u16) -> Publish {
        let mut p = Publish::new("articulos/a/futbol", QoS::AtLeastOnce, Vec::new());
        p.pkid = pkid;
        p
    }

    #[test]
    fn acknowledged_in_order_of_reception_once_committed() {
        let mut t = AckTracker::default();
        let a = t.next_seq();
        t.after_row(&publish(1));
        let b = t.next_seq();
        t.after_row(&publish(2));
        t.after_previous(&publish(3)); // refused: acknowledged right after b
        let c = t.next_seq();
        t.after_row(&publish(4));
        assert!(t.due_pkids().is_empty(), "nothing committed yet");
        t.resolved(a);
        assert_eq!(t.due_pkids(), [1]);
        t.resolved(b);
        assert_eq!(t.due_pkids(), [1, 2, 3]);
        t.resolved(c);
        assert_eq!(t.due_pkids(), [1, 2, 3, 4]);
        assert_eq!(t.owed(), 4);
    }

    #[test]
    fn a_refused_message_first_is_acknowledged_at_once() {
        let mut t = AckTracker::default();
        t.after_previous(&publish(7));
        assert_eq!(t.due_pkids(), [7]);
    }

    #[test]
    fn a_later_message_never_overtakes_an_earlier_one() {
        let mut t = AckTracker::default();
        let a = t.next_seq();
        t.after_row(&publish(1));
        t.after_previous(&publish(2)); // a duplicate whose row is a's: waits for a
        assert!(t.due_pkids().is_empty());
        t.resolved(a);
        assert_eq!(t.due_pkids(), [1, 2]);
    }

    #[test]
    fn a_new_connection_forgets_what_the_old_one_owed() {
        let mut t = AckTracker::default();
        let a = t.next_seq();
        t.after_row(&publish(1));
        t.new_connection();
        t.resolved(a);
        assert_eq!(t.owed(), 0);
        // Seqs go on across connections.
        assert_eq!(t.next_seq(), a + 1);
    }

    #[test]
    fn qos0_needs_no_acknowledgement() {
        let mut t = AckTracker::default();
        let mut p = publish(0);
        p.qos = QoS::AtMostOnce;
        t.after_previous(&p);
        assert_eq!(t.owed(), 0);
    }
}
