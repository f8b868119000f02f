//! The outgoing QoS engine: which QoS 1/2 messages a session sends now, which wait, and
//! what is in flight. Packet ids, the inflight window (the client's Receive Maximum
//! capped by `max_inflight`), the queue behind it and its limits (`max_queued`,
//! `max_queued_bytes`, `queue_full`), resending with DUP in the original order, message
//! expiry while queued, and which queued messages wait on disk rather than in memory
//! (`in_memory`). No socket, no store, no shared state: the session feeds it events,
//! messages read from disk and the time, and carries out what it returns.
//!
//! A message is `stored` when the store holds it for this session (a persistent
//! session's QoS 1/2 messages, written by their publisher before its PUBACK). Only
//! stored messages wait on disk; the session deletes a stored message from the store
//! when the engine says it is delivered, expired or dropped.

use crate::config::QueueFull;
use crate::message::Message;
use std::collections::{HashMap, HashSet, VecDeque};
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
    /// Stored messages waiting on disk: all newer than those in `queue`.
    on_disk: usize,
    /// Their topic and payload bytes.
    on_disk_bytes: u64,
    /// Topic and payload bytes of `queue`.
    bytes: u64,
    /// Ids of the stored messages in `queue` or in flight: the rest of the stored ones
    /// are on disk.
    held: HashSet<u64>,
    /// Stored messages that expired while queued: to delete from the store.
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
    /// The message id (the envelope's); the store's key when `stored`.
    pub(crate) id: u64,
    pub(crate) stored: bool,
    pub(crate) message: Message,
}

impl Owed {
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
            on_disk: 0,
            on_disk_bytes: 0,
            bytes: 0,
            held: HashSet::new(),
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
        self.queue.is_empty() && self.on_disk == 0 && self.inflight.len() < self.window
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
        let admission = if owed.stored && (self.on_disk > 0 || self.queue.len() >= self.limits.in_memory)
        {
            self.on_disk += 1;
            self.on_disk_bytes += owed.size();
            Admission::OnDisk
        } else {
            self.hold(&owed);
            self.queue.push_back(Queued { owed, since: now });
            Admission::Queued
        };
        match dropped {
            Some(oldest) => Admission::Dropped(oldest),
            None => admission,
        }
    }

    /// How many stored messages to read from disk now, if any: memory holds less than
    /// half its share and more waits on disk.
    pub(crate) fn wants_from_disk(&self) -> Option<usize> {
        (self.on_disk > 0 && self.queue.len() < self.limits.in_memory.div_ceil(2))
            .then(|| self.limits.in_memory - self.queue.len())
    }

    /// Whether the store's message `id` is already here (in memory or in flight), so a
    /// read from disk skips it.
    pub(crate) fn holds(&self, id: u64) -> bool {
        self.held.contains(&id)
    }

    /// Messages read from disk, oldest first, each with the moment it was received;
    /// `end`: nothing more is on disk.
    pub(crate) fn loaded(&mut self, read: Vec<(Owed, SystemTime)>, end: bool) {
        for (owed, since) in read {
            self.on_disk = self.on_disk.saturating_sub(1);
            self.on_disk_bytes = self.on_disk_bytes.saturating_sub(owed.size());
            self.hold(&owed);
            self.queue.push_back(Queued { owed, since });
        }
        if end {
            self.on_disk = 0;
            self.on_disk_bytes = 0;
        }
    }

    /// A stored message read from disk turned out to need no delivery (it no longer
    /// matches a subscription, or expired): it is no longer on disk either.
    pub(crate) fn gone_from_disk(&mut self, bytes: u64) {
        self.on_disk = self.on_disk.saturating_sub(1);
        self.on_disk_bytes = self.on_disk_bytes.saturating_sub(bytes);
    }

    /// After a restart: what waits on disk, and what was in flight (resent on attach).
    pub(crate) fn restore(&mut self, on_disk: usize, on_disk_bytes: u64, inflight: Vec<WasInflight>) {
        self.on_disk = on_disk;
        self.on_disk_bytes = on_disk_bytes;
        for was in inflight {
            self.seq += 1;
            self.held.insert(was.owed.id);
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

    /// The next queued message that fits in the window; expired ones are skipped (the
    /// stored among them wait in `take_expired`). None also when the next ones are on
    /// disk: see `wants_from_disk`.
    pub(crate) fn next(&mut self, now: SystemTime) -> Option<Transmit> {
        while self.inflight.len() < self.window {
            let queued = self.queue.pop_front()?;
            self.bytes = self.bytes.saturating_sub(queued.owed.size());
            let Owed {
                id,
                stored,
                message,
            } = queued.owed;
            match message.unexpired(queued.since, now) {
                Some(message) => {
                    return Some(self.track_held(Owed {
                        id,
                        stored,
                        message,
                    }))
                }
                None if stored => {
                    self.held.remove(&id);
                    self.expired.push(id);
                }
                None => {}
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
        self.held.remove(&owed.id);
        Some(owed)
    }

    /// PUBACK or PUBCOMP: the message is delivered. None for an unknown packet id.
    pub(crate) fn acknowledged(&mut self, pkid: u16) -> Option<Owed> {
        let owed = self.inflight.remove(&pkid)?.owed;
        self.held.remove(&owed.id);
        Some(owed)
    }

    /// PUBREC: the client has the message; PUBREL follows. The message's id and
    /// whether it is stored; None for an unknown packet id.
    pub(crate) fn received(&mut self, pkid: u16) -> Option<(u64, bool)> {
        let m = self.inflight.get_mut(&pkid)?;
        m.released = true;
        Some((m.owed.id, m.owed.stored))
    }

    /// The messages in memory that the store does not hold, in order: what a
    /// persistent session must store before it stops. Those in flight and not yet
    /// received come first; expiry is lowered.
    pub(crate) fn unstored(&self, now: SystemTime) -> Vec<Owed> {
        let mut inflight: Vec<&Inflight> = self
            .inflight
            .values()
            .filter(|m| !m.released && !m.owed.stored)
            .collect();
        inflight.sort_unstable_by_key(|m| m.seq);
        let mut owed: Vec<Owed> = inflight.into_iter().map(|m| m.owed.clone()).collect();
        owed.extend(self.queue.iter().filter(|q| !q.owed.stored).filter_map(|q| {
            let message = q.owed.message.clone().unexpired(q.since, now)?;
            Some(Owed {
                message,
                ..q.owed.clone()
            })
        }));
        owed
    }

    /// Forgets everything (a new session under the same key); the store's copies are
    /// the session's to delete.
    pub(crate) fn clear(&mut self) {
        self.inflight.clear();
        self.queue.clear();
        self.held.clear();
        self.expired.clear();
        self.on_disk = 0;
        self.on_disk_bytes = 0;
        self.bytes = 0;
    }

    /// Messages queued, in memory and on disk (not those in flight).
    pub(crate) fn queued(&self) -> usize {
        self.queue.len() + self.on_disk
    }

    fn hold(&mut self, owed: &Owed) {
        self.bytes += owed.size();
        if owed.stored {
            self.held.insert(owed.id);
        }
    }

    fn forget(&mut self, owed: &Owed) {
        self.bytes = self.bytes.saturating_sub(owed.size());
        self.held.remove(&owed.id);
    }

    /// Puts a message in flight that was not held yet.
    fn track(&mut self, owed: Owed) -> Transmit {
        if owed.stored {
            self.held.insert(owed.id);
        }
        self.track_held(owed)
    }

    fn track_held(&mut self, owed: Owed) -> Transmit {
        let pkid = self.next_pkid();
        self.seq += 1;
        self.inflight.insert(
            pkid,
            Inflight {
                owed: owed.clone(),
                seq: self.seq,
                released: false,
            },
        );
        Transmit { pkid, owed }
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
