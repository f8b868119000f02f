//! The outgoing QoS engine: which QoS 1/2 messages a session sends now, which wait, and
//! what is in flight. Packet ids, the inflight window (the client's Receive Maximum
//! capped by `max_inflight`), the queue behind it and its limits (`max_queued`,
//! `max_queued_bytes`, `queue_full`), resending with DUP in the original order, message
//! expiry while queued, and which queued messages wait on disk rather than in memory
//! (`in_memory`). No socket, no store, no shared state: the session feeds it events,
//! messages read from disk and the time, and carries out what it returns.
//!
//! A message is stored when the store holds it for this session (a persistent
//! session's QoS 1/2 messages, written by their publisher before its PUBACK), under a
//! sequence number of this session's queue. Only stored messages wait on disk; the
//! session releases a stored message in the store when the engine says it is
//! delivered, expired or dropped, and records `low()`: every sequence number below it
//! is finished with.

use crate::config::QueueFull;
use crate::message::Message;
use crate::store::Spilled;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::SystemTime;

/// The limits of one session's queue, from `[session]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_inflight: u16,
    pub(crate) max_queued: usize,
    pub(crate) max_queued_bytes: u64,
    pub(crate) queue_full: QueueFull,
    pub(crate) in_memory: usize,
}

pub(crate) struct Outgoing {
    /// Sent and not yet acknowledged, by packet id.
    inflight: HashMap<u16, Inflight>,
    /// Waiting in memory for room in the window or for the client, oldest first.
    queue: VecDeque<Queued>,
    /// Stored messages waiting on disk, in sequence order: all newer than those in
    /// `queue`. Their messages are read when memory has room.
    on_disk: VecDeque<Spilled>,
    /// How many were ever put at the back of `on_disk`: `on_disk`'s front is number
    /// `disk_pushed - on_disk.len()`.
    disk_pushed: u64,
    /// Messages not stored that arrived while stored ones waited on disk (the session
    /// stopped being persistent), in memory, each with the number of `on_disk`
    /// messages that go before it: order holds.
    behind_disk: VecDeque<(u64, Queued)>,
    /// Their topic and payload bytes.
    on_disk_bytes: u64,
    /// Topic and payload bytes of the messages waiting in memory.
    bytes: u64,
    /// Sequence numbers of the stored messages in `queue` or in flight.
    held: BTreeSet<u64>,
    /// The sequence number after the last stored message received.
    next_seq: u64,
    /// The sequence number after the highest written to the client.
    sent_below: u64,
    /// After a restart: stored messages below this sequence number may have been sent
    /// before, and go out marked DUP.
    resent_below: u64,
    /// Stored messages that expired while queued: to release in the store.
    expired: Vec<u64>,
    /// The packet id handed out last; 0 is never used.
    last_pkid: u16,
    /// Counts sends, so that inflight messages are resent in the order first sent.
    seq: u64,
    /// Room in flight: the attached client's Receive Maximum capped by
    /// `max_inflight`; 0 while no client is attached.
    window: usize,
    limits: Limits,
}

/// A message owed to the client.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Owed {
    /// The message id (the envelope's); the store's key when stored.
    pub(crate) id: u64,
    /// Its sequence number in this session's queue, when the store holds it.
    pub(crate) seq: Option<u64>,
    pub(crate) message: Message,
}

impl Owed {
    pub(crate) fn stored(&self) -> bool {
        self.seq.is_some()
    }

    fn size(&self) -> u64 {
        (self.message.topic.len() + self.message.payload.len()) as u64
    }
}

struct Inflight {
    owed: Owed,
    seq: u64,
    /// PUBREC received, PUBREL sent: waiting for PUBCOMP.
    released: bool,
}

/// A message waiting in the queue, with the moment its wait began (message expiry).
struct Queued {
    owed: Owed,
    since: SystemTime,
}

/// A QoS 1/2 PUBLISH to write now; it is already counted in flight.
#[derive(Debug, PartialEq)]
pub(crate) struct Transmit {
    pub(crate) pkid: u16,
    /// It may have reached the client before a restart: marked DUP.
    pub(crate) dup: bool,
    pub(crate) owed: Owed,
}

/// What became of a message offered for delivery.
#[derive(Debug, PartialEq)]
pub(crate) enum Admission {
    /// Write it now.
    Send(Transmit),
    /// Queued in memory, behind the window or for the client to return.
    Queued,
    /// Left on disk (stored, and newer than what memory holds).
    OnDisk,
    /// The queue is full: this message (`queue_full = "drop_new"`) or the oldest
    /// (`"drop_oldest"`) is given up.
    Dropped(Owed),
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

/// A message in flight when the broker stopped, as the store kept it.
#[derive(Debug, PartialEq)]
pub(crate) struct WasInflight {
    pub(crate) pkid: u16,
    pub(crate) released: bool,
    pub(crate) owed: Owed,
}

impl Outgoing {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            inflight: HashMap::new(),
            queue: VecDeque::new(),
            on_disk: VecDeque::new(),
            disk_pushed: 0,
            behind_disk: VecDeque::new(),
            on_disk_bytes: 0,
            bytes: 0,
            held: BTreeSet::new(),
            next_seq: 0,
            sent_below: 0,
            resent_below: 0,
            expired: Vec::new(),
            last_pkid: 0,
            seq: 0,
            window: 0,
            limits,
        }
    }

    /// A client attached with this Receive Maximum: what is in flight goes again.
    pub(crate) fn attach(&mut self, receive_max: u16) -> Vec<Resend> {
        self.window = usize::from(receive_max).min(usize::from(self.limits.max_inflight));
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
                        message: m.owed.message.clone(),
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
        self.queue.is_empty() && !self.waits_on_disk() && self.inflight.len() < self.window
    }

    /// Whether the queue is at `max_queued` or `max_queued_bytes`.
    pub(crate) fn full(&self) -> bool {
        self.queued() >= self.limits.max_queued
            || self.bytes + self.on_disk_bytes >= self.limits.max_queued_bytes
    }

    /// Offers a QoS 1/2 message; `force` queues it even when the queue is full (a
    /// connected client's, which slows its publishers instead; retained messages on
    /// subscribe, bounded by the retained store).
    pub(crate) fn admit(&mut self, owed: Owed, now: SystemTime, force: bool) -> Admission {
        if let Some(seq) = owed.seq {
            self.next_seq = self.next_seq.max(seq + 1);
        }
        if self.sends_now() {
            return Admission::Send(self.track(owed));
        }
        let mut dropped = None;
        if self.full() && !force {
            match self.limits.queue_full {
                QueueFull::DropNew => return Admission::Dropped(owed),
                QueueFull::DropOldest => match self.queue.pop_front() {
                    Some(oldest) => {
                        self.forget(&oldest.owed);
                        dropped = Some(oldest.owed);
                    }
                    // All of it on disk: the session refills first, so this is rare;
                    // the new message is the one given up then.
                    None => return Admission::Dropped(owed),
                },
            }
        }
        let behind_disk = self.waits_on_disk();
        let admission = match owed.seq {
            Some(seq) if behind_disk || self.queue.len() >= self.limits.in_memory => {
                self.on_disk_bytes += owed.size();
                self.push_on_disk(Spilled {
                    seq,
                    id: owed.id,
                    size: owed.size(),
                });
                Admission::OnDisk
            }
            _ => {
                self.hold(&owed);
                let queued = Queued { owed, since: now };
                if behind_disk {
                    self.behind_disk.push_back((self.disk_pushed, queued));
                } else {
                    self.queue.push_back(queued);
                }
                Admission::Queued
            }
        };
        match dropped {
            Some(oldest) => Admission::Dropped(oldest),
            None => admission,
        }
    }

    /// Stored messages to read from disk now, oldest first: memory holds less than
    /// half its share and more waits on disk. Each comes back through `loaded`, or
    /// `unloaded` when its message could not be read yet.
    pub(crate) fn take_to_load(&mut self) -> Vec<Spilled> {
        if !self.waits_on_disk() || self.queue.len() >= self.limits.in_memory.div_ceil(2) {
            return Vec::new();
        }
        let front = self.disk_pushed - self.on_disk.len() as u64;
        // Those kept in memory whose turn it is join the queue, in their place.
        while self
            .behind_disk
            .front()
            .is_some_and(|(after, _)| *after <= front)
        {
            if let Some((_, queued)) = self.behind_disk.pop_front() {
                self.queue.push_back(queued);
            }
        }
        // Then the stored ones before the next of those.
        let until = self
            .behind_disk
            .front()
            .map_or(u64::MAX, |(after, _)| *after);
        let room = self.limits.in_memory.saturating_sub(self.queue.len());
        let n = room
            .min(self.on_disk.len())
            .min(usize::try_from(until - front).unwrap_or(usize::MAX));
        let taken: Vec<Spilled> = self.on_disk.drain(..n).collect();
        for s in &taken {
            self.on_disk_bytes = self.on_disk_bytes.saturating_sub(s.size);
        }
        taken
    }

    /// A message read from disk, with the moment its wait counts from.
    pub(crate) fn loaded(&mut self, owed: Owed, since: SystemTime) {
        self.hold(&owed);
        self.queue.push_back(Queued { owed, since });
    }

    /// Messages taken by `take_to_load` whose records could not be read yet: they wait on
    /// disk again, first.
    pub(crate) fn unloaded(&mut self, rest: Vec<Spilled>) {
        for s in rest.into_iter().rev() {
            self.on_disk_bytes += s.size;
            self.on_disk.push_front(s);
        }
    }

    /// After a restart: what the store owes this session, what of it was in flight
    /// (QoS 2, resent on attach), and where its queue stood.
    pub(crate) fn restore(
        &mut self,
        owed: Vec<Spilled>,
        inflight: Vec<WasInflight>,
        next_seq: u64,
        sent_below: u64,
    ) {
        let in_flight: BTreeSet<u64> = inflight.iter().filter_map(|w| w.owed.seq).collect();
        let mut owed = owed;
        owed.retain(|s| !in_flight.contains(&s.seq));
        for s in &owed {
            self.on_disk_bytes += s.size;
            self.next_seq = self.next_seq.max(s.seq + 1);
        }
        // Taken whole, not copied: a restored queue may hold millions of references.
        self.disk_pushed += owed.len() as u64;
        if self.on_disk.is_empty() {
            self.on_disk = VecDeque::from(owed);
        } else {
            self.on_disk.extend(owed);
        }
        self.next_seq = self.next_seq.max(next_seq);
        self.sent_below = sent_below;
        self.resent_below = sent_below;
        for was in inflight {
            self.seq += 1;
            if let Some(seq) = was.owed.seq {
                self.held.insert(seq);
                self.next_seq = self.next_seq.max(seq + 1);
            }
            self.last_pkid = self.last_pkid.max(was.pkid);
            self.inflight.insert(
                was.pkid,
                Inflight {
                    owed: was.owed,
                    seq: self.seq,
                    released: was.released,
                },
            );
        }
    }

    /// A stored message received and finished with at once (sent at QoS 0, or not
    /// matching any more): the queue moves past it.
    pub(crate) fn skip(&mut self, seq: Option<u64>) {
        if let Some(seq) = seq {
            self.next_seq = self.next_seq.max(seq + 1);
        }
    }

    /// Every stored message below this sequence number is finished with.
    pub(crate) fn low(&self) -> u64 {
        let held = self.held.first().copied().unwrap_or(u64::MAX);
        let waiting = self.on_disk.front().map_or(u64::MAX, |s| s.seq);
        held.min(waiting).min(self.next_seq)
    }

    /// The sequence number after the last stored message received.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The sequence number after the highest written to the client.
    pub(crate) fn sent_below(&self) -> u64 {
        self.sent_below
    }

    /// The next queued message that fits in the window; expired ones are skipped (the
    /// stored among them wait in `take_expired`). None also when the next ones are on
    /// disk: see `wants_from_disk`.
    pub(crate) fn next(&mut self, now: SystemTime) -> Option<Transmit> {
        while self.inflight.len() < self.window {
            let queued = self.queue.pop_front()?;
            self.bytes = self.bytes.saturating_sub(queued.owed.size());
            let Owed { id, seq, message } = queued.owed;
            match message.unexpired(queued.since, now) {
                Some(message) => return Some(self.track_held(Owed { id, seq, message })),
                None => {
                    if let Some(seq) = seq {
                        self.held.remove(&seq);
                        self.expired.push(id);
                    }
                }
            }
        }
        None
    }

    /// Stored messages that expired in the queue, for the session to delete.
    pub(crate) fn take_expired(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.expired)
    }

    /// A transmit could not be written (larger than the client accepts): it is not in
    /// flight after all. Returns the message, which the client will never get.
    pub(crate) fn unsent(&mut self, pkid: u16) -> Option<Owed> {
        let owed = self.inflight.remove(&pkid)?.owed;
        self.unhold(&owed);
        Some(owed)
    }

    /// PUBACK or PUBCOMP: the message is delivered. None for an unknown packet id.
    pub(crate) fn acknowledged(&mut self, pkid: u16) -> Option<Owed> {
        let owed = self.inflight.remove(&pkid)?.owed;
        self.unhold(&owed);
        Some(owed)
    }

    /// PUBREC: the client has the message; PUBREL follows. The message's id and
    /// whether it is stored; None for an unknown packet id.
    pub(crate) fn received(&mut self, pkid: u16) -> Option<(u64, bool)> {
        let m = self.inflight.get_mut(&pkid)?;
        m.released = true;
        Some((m.owed.id, m.owed.stored()))
    }

    /// The messages in memory that the store does not hold, in order: what a
    /// persistent session must store before it stops. Those in flight and not yet
    /// received come first; expiry is lowered.
    pub(crate) fn unstored(&self, now: SystemTime) -> Vec<Owed> {
        let mut inflight: Vec<&Inflight> = self
            .inflight
            .values()
            .filter(|m| !m.released && !m.owed.stored())
            .collect();
        inflight.sort_unstable_by_key(|m| m.seq);
        let mut owed: Vec<Owed> = inflight.into_iter().map(|m| m.owed.clone()).collect();
        owed.extend(
            self.queue
                .iter()
                .chain(self.behind_disk.iter().map(|(_, q)| q))
                .filter(|q| !q.owed.stored())
                .filter_map(|q| {
                    let message = q.owed.message.clone().unexpired(q.since, now)?;
                    Some(Owed {
                        message,
                        ..q.owed.clone()
                    })
                }),
        );
        owed
    }

    /// Forgets everything (a new session under the same key); the store's copies are
    /// the session's to delete.
    pub(crate) fn clear(&mut self) {
        self.inflight.clear();
        self.queue.clear();
        self.held.clear();
        self.expired.clear();
        self.on_disk.clear();
        self.behind_disk.clear();
        self.on_disk_bytes = 0;
        self.bytes = 0;
    }

    /// Every stored message the engine knows of, in memory, in flight or on disk: what
    /// a session that ends releases. Empties the engine.
    pub(crate) fn take_stored(&mut self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.on_disk.iter().map(|s| s.id).collect();
        ids.extend(
            self.queue
                .iter()
                .filter(|q| q.owed.stored())
                .map(|q| q.owed.id),
        );
        ids.extend(
            self.inflight
                .values()
                .filter(|m| m.owed.stored())
                .map(|m| m.owed.id),
        );
        self.clear();
        ids
    }

    /// Sets the window and queue limits other than `[session]`'s (a bridge's).
    pub(crate) fn set_limits(
        &mut self,
        max_inflight: u16,
        max_queued: usize,
        max_queued_bytes: u64,
    ) {
        self.limits.max_inflight = max_inflight;
        self.limits.max_queued = max_queued;
        self.limits.max_queued_bytes = max_queued_bytes;
    }

    /// Messages not yet acknowledged by the client: in flight and queued.
    pub(crate) fn waiting(&self) -> usize {
        self.inflight.len() + self.queued()
    }

    /// Bytes (topics and payloads) of those, in memory and on disk.
    pub(crate) fn waiting_bytes(&self) -> u64 {
        self.bytes + self.on_disk_bytes
    }

    /// Messages queued, in memory and on disk (not those in flight).
    pub(crate) fn queued(&self) -> usize {
        self.queue.len() + self.on_disk.len() + self.behind_disk.len()
    }

    /// Whether messages wait behind those in memory (on disk, or behind those).
    fn waits_on_disk(&self) -> bool {
        !self.on_disk.is_empty() || !self.behind_disk.is_empty()
    }

    fn push_on_disk(&mut self, spilled: Spilled) {
        self.on_disk.push_back(spilled);
        self.disk_pushed += 1;
    }

    fn hold(&mut self, owed: &Owed) {
        self.bytes += owed.size();
        if let Some(seq) = owed.seq {
            self.held.insert(seq);
        }
    }

    fn forget(&mut self, owed: &Owed) {
        self.bytes = self.bytes.saturating_sub(owed.size());
        self.unhold(owed);
    }

    fn unhold(&mut self, owed: &Owed) {
        if let Some(seq) = owed.seq {
            self.held.remove(&seq);
        }
    }

    /// Puts a message in flight that was not held yet.
    fn track(&mut self, owed: Owed) -> Transmit {
        if let Some(seq) = owed.seq {
            self.held.insert(seq);
        }
        self.track_held(owed)
    }

    fn track_held(&mut self, owed: Owed) -> Transmit {
        let pkid = self.next_pkid();
        self.seq += 1;
        let dup = owed.seq.is_some_and(|seq| seq < self.resent_below);
        if let Some(seq) = owed.seq {
            self.sent_below = self.sent_below.max(seq + 1);
        }
        self.inflight.insert(
            pkid,
            Inflight {
                owed: owed.clone(),
                seq: self.seq,
                released: false,
            },
        );
        Transmit { pkid, dup, owed }
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
mod tests;
