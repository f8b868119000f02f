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
        stored: false,
        message: msg(n),
    }
}

fn stored(n: u32) -> Owed {
    Owed {
        stored: true,
        ..owed(n)
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
    assert_eq!(sent(out.admit(owed(2), t(0), false)).pkid, 1, "0 is skipped");
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
    assert_eq!(out.unsent(big.pkid), Some(stored(1)));
    assert!(!out.holds(1));
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
            stored: true,
            ..expiring(4, 5)
        },
        t(0),
        false,
    );
    assert_eq!(topics(&out.unstored(t(10))), ["t/2", "t/3"]);
    out.attach(u16::MAX);
    let first = out.next(t(10)).unwrap();
    assert_eq!(first.owed.message.topic, "t/2", "the expired one is skipped");
    let left = first
        .owed
        .message
        .properties
        .and_then(|p| p.message_expiry_interval);
    assert_eq!(left, Some(50));
    assert_eq!(out.next(t(10)).unwrap().owed.message.topic, "t/3");
    assert!(out.next(t(10)).is_none());
    assert_eq!(out.take_expired(), [4], "the stored one is deleted");
    assert!(!out.holds(4));
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
    assert!(out.holds(4) && !out.holds(5));
    assert_eq!(out.wants_from_disk(), None, "memory is more than half full");
    out.attach(1);
    let mut got = Vec::new();
    loop {
        if let Some(n) = out.wants_from_disk() {
            // What a session reads: the oldest on disk that the engine does not hold.
            let read: Vec<(Owed, SystemTime)> = (1..=6u32)
                .filter(|id| !out.holds((*id).into()) && !got.contains(id))
                .take(n)
                .map(|id| (stored(id), t(0)))
                .collect();
            let end = read.len() < n;
            out.loaded(read, end);
        }
        let Some(t) = out.next(t(0)) else { break };
        let id = t.owed.id as u32;
        got.push(id);
        assert_eq!(out.acknowledged(t.pkid).map(|o| o.id), Some(id.into()));
    }
    assert_eq!(got, [1, 2, 3, 4, 5, 6]);
    assert_eq!(out.queued(), 0);
}

#[test]
fn after_a_restart_what_was_in_flight_goes_first_and_ids_continue() {
    let mut out = Outgoing::new(limits(10, 100));
    out.restore(
        2,
        8,
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
    );
    assert_eq!(out.queued(), 2);
    assert!(out.holds(1) && out.holds(2));
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
    assert_eq!(out.wants_from_disk(), Some(1000));
    out.loaded(vec![(stored(3), t(0)), (stored(4), t(0))], true);
    assert_eq!(out.next(t(0)).unwrap().pkid, 9, "packet ids go on from the restored");
}

#[test]
fn clear_forgets_everything() {
    let mut out = Outgoing::new(limits(2, 100));
    out.attach(u16::MAX);
    sent(out.admit(stored(1), t(0), false));
    out.admit(owed(2), t(0), false);
    out.admit(owed(3), t(0), false);
    out.clear();
    assert_eq!(out.queued(), 0);
    assert!(!out.holds(1));
    assert!(out.attach(u16::MAX).is_empty());
}
