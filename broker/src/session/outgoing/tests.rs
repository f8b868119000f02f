//! The outgoing engine's unit tests; compiled under `#[cfg(test)]` only (`mod tests` in
//! outgoing.rs).

use super::*;
use crate::message::PublishProperties;
use bytes::Bytes;
use std::time::{Duration, UNIX_EPOCH};

fn limits(max_inflight: u16, max_queued: usize) -> Limits {
    Limits {
        max_inflight,
        max_queued,
        max_queued_bytes: u64::MAX,
        queue_full: QueueFull::DropNew,
        in_memory: 1000,
    }
}

fn msg(n: u32) -> Message {
    Message {
        topic: format!("t/{n}"),
        payload: Bytes::from(n.to_string()),
        qos: 1,
        retain: false,
        properties: None,
    }
}

fn owed(n: u32) -> Owed {
    Owed {
        id: n.into(),
        seq: None,
        message: msg(n),
    }
}

/// Stored under sequence number `n` (message id 100 + n).
fn stored(n: u32) -> Owed {
    Owed {
        id: 100 + u64::from(n),
        seq: Some(n.into()),
        message: msg(n),
    }
}

fn spilled(n: u32) -> Spilled {
    Spilled {
        seq: n.into(),
        id: 100 + u64::from(n),
        size: 4,
    }
}

fn expiring(n: u32, secs: u32) -> Owed {
    let mut o = owed(n);
    o.message.properties = Some(PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    });
    o
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

fn topics(owed: &[Owed]) -> Vec<&str> {
    owed.iter().map(|o| o.message.topic.as_str()).collect()
}

fn drain(out: &mut Outgoing, now: SystemTime) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(t) = out.next(now) {
        got.push(t.owed.message.topic.clone());
        out.acknowledged(t.pkid);
    }
    got
}

#[test]
fn offline_messages_wait_for_a_client() {
    let mut out = Outgoing::new(limits(10, 100));
    assert_eq!(out.admit(owed(1), t(0), false), Admission::Queued);
    assert!(!out.sends_now());
    assert!(out.next(t(0)).is_none(), "no client: nothing goes out");
    assert!(out.attach(u16::MAX).is_empty());
    let first = out.next(t(1)).unwrap();
    assert_eq!((first.pkid, first.owed.message.topic.as_str()), (1, "t/1"));
    assert!(out.next(t(1)).is_none());
}

#[test]
fn the_window_is_the_smaller_of_receive_maximum_and_max_inflight() {
    for (receive_max, max_inflight, window) in [(3, 10, 3), (u16::MAX, 2, 2)] {
        let mut out = Outgoing::new(limits(max_inflight, 100));
        out.attach(receive_max);
        let sends = (0..10)
            .filter(|n| matches!(out.admit(owed(*n), t(0), false), Admission::Send(_)))
            .count();
        assert_eq!(sends, window);
        assert_eq!(out.queued(), 10 - window);
    }
}

#[test]
fn an_acknowledgement_makes_room_for_the_next_in_order() {
    let mut out = Outgoing::new(limits(2, 100));
    out.attach(u16::MAX);
    let a = sent(out.admit(owed(1), t(0), false));
    sent(out.admit(owed(2), t(0), false));
    assert_eq!(out.admit(owed(3), t(0), false), Admission::Queued);
    // Queued ahead: a new message waits behind msg 3 even with room.
    assert!(out.next(t(0)).is_none());
    assert_eq!(out.acknowledged(a.pkid), Some(owed(1)));
    assert_eq!(out.acknowledged(a.pkid), None, "acknowledged once");
    assert!(!out.sends_now(), "msg 3 goes before anything new");
    assert_eq!(out.next(t(0)).unwrap().owed.message.topic, "t/3");
    assert_eq!(out.queued(), 0);
}

#[test]
fn the_queue_is_bounded_unless_forced() {
    let mut out = Outgoing::new(limits(1, 2));
    assert_eq!(out.admit(owed(1), t(0), false), Admission::Queued);
    assert_eq!(out.admit(owed(2), t(0), false), Admission::Queued);
    assert!(out.full());
    assert_eq!(out.admit(owed(3), t(0), false), Admission::Dropped(owed(3)));
    assert_eq!(out.admit(owed(4), t(0), true), Admission::Queued);
    assert_eq!(out.queued(), 3);
}

#[test]
fn drop_oldest_makes_room_for_the_new_message() {
    let mut out = Outgoing::new(Limits {
        queue_full: QueueFull::DropOldest,
        ..limits(1, 2)
    });
    out.admit(owed(1), t(0), false);
    out.admit(owed(2), t(0), false);
    assert_eq!(out.admit(owed(3), t(0), false), Admission::Dropped(owed(1)));
    out.attach(1);
    assert_eq!(drain(&mut out, t(0)), ["t/2", "t/3"]);
}

#[test]
fn the_byte_limit_counts_topics_and_payloads() {
    let mut out = Outgoing::new(Limits {
        max_queued_bytes: 8,
        ..limits(1, 100)
    });
    // "t/1" + "1": 4 bytes each.
    out.admit(owed(1), t(0), false);
    assert!(!out.full());
    out.admit(owed(2), t(0), false);
    assert!(out.full());
    assert!(matches!(
        out.admit(owed(3), t(0), false),
        Admission::Dropped(_)
    ));
    out.attach(1);
    let first = out.next(t(0)).unwrap();
    assert!(!out.full(), "sending frees its bytes");
    out.acknowledged(first.pkid);
}

#[test]
fn packet_ids_wrap_around_skipping_zero_and_ids_in_flight() {
    let mut out = Outgoing::new(limits(u16::MAX, 100));
    out.attach(u16::MAX);
    out.last_pkid = u16::MAX - 2;
    let keep = sent(out.admit(owed(0), t(0), false));
    assert_eq!(keep.pkid, u16::MAX - 1);
    let acked = sent(out.admit(owed(1), t(0), false));
    assert_eq!(acked.pkid, u16::MAX);
    out.acknowledged(acked.pkid);
    assert_eq!(
        sent(out.admit(owed(2), t(0), false)).pkid,
        1,
        "0 is skipped"
    );
    // All the way round: the id still in flight is skipped, a freed one reused.
    out.last_pkid = u16::MAX - 2;
    assert_eq!(sent(out.admit(owed(3), t(0), false)).pkid, u16::MAX);
    assert_eq!(sent(out.admit(owed(4), t(0), false)).pkid, 2);
}

#[test]
fn reattaching_resends_in_the_original_order_with_pubrel_for_released() {
    let mut out = Outgoing::new(limits(10, 100));
    out.attach(u16::MAX);
    out.last_pkid = 65_000;
    let ids: Vec<u16> = (1..=4)
        .map(|n| sent(out.admit(owed(n), t(0), false)).pkid)
        .collect();
    assert_eq!(out.received(ids[1]), Some((2, false)));
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
    let mut out = Outgoing::new(limits(1, 100));
    out.attach(u16::MAX);
    let big = sent(out.admit(stored(1), t(0), false));
    assert_eq!(out.low(), 1, "in flight: not finished");
    assert_eq!(out.unsent(big.pkid), Some(stored(1)));
    assert_eq!(out.low(), 2);
    assert!(out.sends_now());
    assert!(out.attach(u16::MAX).is_empty());
}

#[test]
fn queued_messages_expire_and_the_rest_have_their_expiry_lowered() {
    let mut out = Outgoing::new(limits(10, 100));
    out.admit(expiring(1, 5), t(0), false);
    out.admit(expiring(2, 60), t(0), false);
    out.admit(owed(3), t(0), false);
    out.admit(
        Owed {
            id: 104,
            seq: Some(4),
            ..expiring(4, 5)
        },
        t(0),
        false,
    );
    assert_eq!(topics(&out.unstored(t(10))), ["t/2", "t/3"]);
    out.attach(u16::MAX);
    let first = out.next(t(10)).unwrap();
    assert_eq!(
        first.owed.message.topic, "t/2",
        "the expired one is skipped"
    );
    let left = first
        .owed
        .message
        .properties
        .and_then(|p| p.message_expiry_interval);
    assert_eq!(left, Some(50));
    assert_eq!(out.next(t(10)).unwrap().owed.message.topic, "t/3");
    assert!(out.next(t(10)).is_none());
    assert_eq!(out.take_expired(), [104], "the stored one is released");
    assert_eq!(out.low(), 5);
}

#[test]
fn stored_messages_beyond_the_memory_share_wait_on_disk_in_order() {
    let mut out = Outgoing::new(Limits {
        in_memory: 4,
        ..limits(1, 100)
    });
    for n in 1..=4 {
        assert_eq!(out.admit(stored(n), t(0), false), Admission::Queued);
    }
    // Memory is full: the rest wait on disk, and so does everything after them.
    assert_eq!(out.admit(stored(5), t(0), false), Admission::OnDisk);
    assert_eq!(out.admit(stored(6), t(0), false), Admission::OnDisk);
    assert_eq!(out.queued(), 6);
    assert!(
        out.take_to_load().is_empty(),
        "memory is more than half full"
    );
    out.attach(1);
    let mut got = Vec::new();
    loop {
        for s in out.take_to_load() {
            let n = s.seq as u32;
            out.loaded(stored(n), t(0));
        }
        let Some(t) = out.next(t(0)) else { break };
        got.push(t.owed.seq.unwrap());
        assert_eq!(out.acknowledged(t.pkid).map(|o| o.id), Some(t.owed.id));
    }
    assert_eq!(got, [1, 2, 3, 4, 5, 6]);
    assert_eq!(out.queued(), 0);
    assert_eq!(out.low(), 7);
}

#[test]
fn a_message_not_stored_waits_behind_those_on_disk() {
    // The session stopped being persistent with messages on disk: what comes next is
    // not stored, and still goes out after them.
    let mut out = Outgoing::new(Limits {
        in_memory: 2,
        ..limits(1, 100)
    });
    out.restore(vec![spilled(1), spilled(2), spilled(3)], Vec::new(), 4, 0);
    assert_eq!(out.admit(owed(7), t(0), false), Admission::Queued);
    assert_eq!(out.admit(owed(8), t(0), false), Admission::Queued);
    // Stored again (persistent again): behind those.
    assert_eq!(out.admit(stored(4), t(0), false), Admission::OnDisk);
    assert_eq!(out.queued(), 6);
    assert_eq!(topics(&out.unstored(t(0))), ["t/7", "t/8"]);
    assert_eq!(out.low(), 1);
    out.attach(1);
    let mut got = Vec::new();
    loop {
        for s in out.take_to_load() {
            out.loaded(stored(s.seq as u32), t(0));
        }
        let Some(t) = out.next(t(0)) else { break };
        got.push(t.owed.message.topic.clone());
        out.acknowledged(t.pkid);
    }
    assert_eq!(got, ["t/1", "t/2", "t/3", "t/7", "t/8", "t/4"]);
    assert_eq!(out.queued(), 0);
    assert_eq!(out.low(), 5);
}

#[test]
fn low_is_the_oldest_stored_message_not_finished() {
    let mut out = Outgoing::new(limits(10, 100));
    assert_eq!(out.low(), 0);
    out.attach(10);
    let first = sent(out.admit(stored(0), t(0), false));
    sent(out.admit(stored(1), t(0), false));
    // Received and finished with at once (no subscription matched).
    out.skip(Some(2));
    assert_eq!(out.low(), 0);
    out.acknowledged(first.pkid);
    assert_eq!(out.low(), 1);
    assert_eq!(out.next_seq(), 3);
    assert_eq!(out.sent_below(), 2);
}

#[test]
fn a_message_not_yet_readable_waits_on_disk_first() {
    let mut out = Outgoing::new(Limits {
        in_memory: 2,
        ..limits(1, 100)
    });
    out.restore(vec![spilled(3), spilled(4), spilled(5)], Vec::new(), 9, 0);
    let wanted = out.take_to_load();
    assert_eq!(wanted, [spilled(3), spilled(4)]);
    out.loaded(stored(3), t(0));
    out.unloaded(vec![spilled(4)]);
    assert_eq!(out.queued(), 3);
    assert_eq!(out.low(), 3);
    assert!(
        out.take_to_load().is_empty(),
        "half of the memory share is in use"
    );
}

#[test]
fn after_a_restart_what_was_in_flight_goes_first_and_the_rest_is_marked_dup() {
    let mut out = Outgoing::new(limits(10, 100));
    out.restore(
        vec![spilled(1), spilled(2), spilled(3), spilled(4)],
        vec![
            WasInflight {
                pkid: 7,
                released: false,
                owed: stored(1),
            },
            WasInflight {
                pkid: 8,
                released: true,
                owed: stored(2),
            },
        ],
        10,
        4,
    );
    assert_eq!(out.queued(), 2, "3 and 4 wait on disk");
    assert_eq!(out.low(), 1);
    assert_eq!(
        out.attach(10),
        vec![
            Resend::Publish {
                pkid: 7,
                message: msg(1)
            },
            Resend::PubRel { pkid: 8 },
        ]
    );
    for s in out.take_to_load() {
        out.loaded(stored(s.seq as u32), t(0));
    }
    let three = out.next(t(0)).unwrap();
    assert_eq!(three.pkid, 9, "packet ids go on from the restored");
    assert!(three.dup, "sent before the restart, maybe");
    let four = out.next(t(0)).unwrap();
    assert!(!four.dup, "seq 4 was never sent (sent below 4)");
    assert!(!sent(out.admit(stored(10), t(0), false)).dup);
}

#[test]
fn clear_forgets_everything() {
    let mut out = Outgoing::new(limits(2, 100));
    out.attach(u16::MAX);
    sent(out.admit(stored(1), t(0), false));
    out.admit(stored(2), t(0), false);
    out.admit(owed(3), t(0), false);
    let mut stored = out.take_stored();
    stored.sort_unstable();
    assert_eq!(
        stored,
        [101, 102],
        "stored ones, in any order; never the unstored 3"
    );
    assert_eq!(out.queued(), 0);
    assert!(out.attach(u16::MAX).is_empty());
}
