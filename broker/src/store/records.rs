//! How the store writes what it keeps: a retained message (version, QoS, when stored,
//! properties, payload; keyed by topic) and a persistent session (expiry,
//! subscriptions, queued messages; keyed by identity NUL client id). A damaged record
//! decodes to None, never to a panic.

use crate::ids::SessionKey;
use crate::message::{Message, PublishProperties};
use crate::protocol::{decode_properties, encode_properties};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const RECORD_VERSION: u8 = 1;
/// Records of the queue index.
const INDEX_VERSION: u8 = 1;
/// Bytes of one index entry: sequence number, message id, size.
const ENTRY_LEN: usize = 20;
/// Session records since durable queues: a store id and a delayed will follow.
const SESSION_VERSION: u8 = 2;

/// A stored retained message and when it was stored (for message expiry).
pub(crate) struct Stored {
    pub(crate) message: Message,
    pub(crate) stored_at: SystemTime,
}

/// What a persistent session needs to resume after a restart.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct SessionRecord {
    /// MQTT 5 Session Expiry Interval as encoded (u32::MAX: never).
    pub(crate) expiry_secs: u32,
    pub(crate) subscriptions: Vec<SavedSubscription>,
    /// Messages owed to the client, in records written before durable queues (their
    /// queue is now in the store under `store_id`); read to move them there.
    pub(crate) queued: Vec<Message>,
    /// The session's id in the store: its queue, in-flight and QoS 2 records are keyed
    /// by it. 0 in records written before durable queues.
    pub(crate) store_id: u64,
    /// A will waiting for its delay, and when it is due.
    pub(crate) will: Option<SavedWill>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SavedWill {
    pub(crate) message: Message,
    pub(crate) due: SystemTime,
}

/// A message in the store's queue of one or more sessions.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QueuedMessage {
    /// As published: its QoS, retain flag and properties.
    pub(crate) message: Message,
    /// The publishing session (MQTT 5 No Local).
    pub(crate) origin: u64,
    /// When the broker received it, µs since the Unix epoch (message expiry).
    pub(crate) received_at: u64,
    /// The persistent sessions it is owed to: store id, and its sequence number in
    /// that session's queue.
    pub(crate) recipients: Vec<(u64, u64)>,
}

/// A message waiting in a session's queue, as the store knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spilled {
    pub(crate) seq: u64,
    pub(crate) id: u64,
    /// Topic and payload bytes.
    pub(crate) size: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SavedSubscription {
    pub(crate) filter: String,
    pub(crate) qos: u8,
    pub(crate) no_local: bool,
    pub(crate) retain_as_published: bool,
    pub(crate) id: Option<usize>,
}

pub(super) fn encode(message: &Message, stored_at: SystemTime) -> Bytes {
    // Empty properties (a will's, say) are written as none: they would read back as
    // none, and "some, but unreadable" means a damaged record.
    let props = message
        .properties
        .as_ref()
        .filter(|p| **p != PublishProperties::default())
        .map(encode_properties);
    let props_len = props.as_ref().map_or(0, |p| p.len());
    let mut buf = BytesMut::with_capacity(14 + props_len + message.payload.len());
    buf.put_u8(RECORD_VERSION);
    buf.put_u8(message.qos);
    let millis = stored_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    buf.put_u64(millis);
    buf.put_u32(props_len as u32);
    if let Some(p) = props {
        buf.put_slice(&p);
    }
    buf.put_slice(&message.payload);
    buf.freeze()
}

pub(super) fn decode(key: &[u8], mut value: Bytes) -> Option<Stored> {
    let topic = String::from_utf8(key.to_vec()).ok()?;
    if value.len() < 14 || value.get_u8() != RECORD_VERSION {
        return None;
    }
    let qos = value.get_u8().min(2);
    let stored_at = UNIX_EPOCH + Duration::from_millis(value.get_u64());
    let props_len = value.get_u32() as usize;
    if value.len() < props_len {
        return None;
    }
    let properties = if props_len > 0 {
        Some(decode_properties(value.split_to(props_len))?)
    } else {
        None
    };
    Some(Stored {
        message: Message {
            topic,
            payload: value,
            qos,
            retain: true,
            properties,
        },
        stored_at,
    })
}

pub(super) fn key_of(id: &SessionKey) -> Vec<u8> {
    let mut key = id.identity.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(id.client_id.as_bytes());
    key
}

pub(super) fn session_key(key: &[u8]) -> Option<SessionKey> {
    let split = key.iter().position(|b| *b == 0)?;
    Some(SessionKey {
        identity: String::from_utf8(key[..split].to_vec()).ok()?,
        client_id: String::from_utf8(key[split + 1..].to_vec()).ok()?,
    })
}

fn put_str(buf: &mut BytesMut, s: &str) {
    buf.put_u32(s.len() as u32);
    buf.put_slice(s.as_bytes());
}

fn take(buf: &mut Bytes, len: usize) -> Option<Bytes> {
    (buf.len() >= len).then(|| buf.split_to(len))
}

fn take_u32(buf: &mut Bytes) -> Option<u32> {
    (buf.len() >= 4).then(|| buf.get_u32())
}

fn take_str(buf: &mut Bytes) -> Option<String> {
    let len = take_u32(buf)? as usize;
    String::from_utf8(take(buf, len)?.to_vec()).ok()
}

pub(super) fn encode_session(record: &SessionRecord) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(SESSION_VERSION);
    buf.put_u32(record.expiry_secs);
    buf.put_u32(record.subscriptions.len() as u32);
    for s in &record.subscriptions {
        put_str(&mut buf, &s.filter);
        buf.put_u8(s.qos);
        buf.put_u8(u8::from(s.no_local) | u8::from(s.retain_as_published) << 1);
        buf.put_u32(s.id.map_or(0, |id| id as u32));
    }
    buf.put_u32(record.queued.len() as u32);
    let now = SystemTime::now();
    for m in &record.queued {
        put_str(&mut buf, &m.topic);
        let body = encode(m, now);
        buf.put_u32(body.len() as u32);
        buf.put_slice(&body);
    }
    buf.put_u64(record.store_id);
    match &record.will {
        None => buf.put_u8(0),
        Some(will) => {
            buf.put_u8(1);
            buf.put_u64(millis(will.due));
            put_str(&mut buf, &will.message.topic);
            let body = encode(&will.message, will.due);
            buf.put_u32(body.len() as u32);
            buf.put_slice(&body);
            buf.put_u8(u8::from(will.message.retain));
        }
    }
    buf.freeze()
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

pub(super) fn decode_session(mut buf: Bytes) -> Option<SessionRecord> {
    let version = take(&mut buf, 1)?[0];
    if version != RECORD_VERSION && version != SESSION_VERSION {
        return None;
    }
    let expiry_secs = take_u32(&mut buf)?;
    let mut subscriptions = Vec::new();
    for _ in 0..take_u32(&mut buf)? {
        let filter = take_str(&mut buf)?;
        let fixed = take(&mut buf, 6)?;
        let id = u32::from_be_bytes([fixed[2], fixed[3], fixed[4], fixed[5]]);
        subscriptions.push(SavedSubscription {
            filter,
            qos: fixed[0].min(2),
            no_local: fixed[1] & 1 != 0,
            retain_as_published: fixed[1] & 2 != 0,
            id: (id != 0).then_some(id as usize),
        });
    }
    let mut queued = Vec::new();
    for _ in 0..take_u32(&mut buf)? {
        let topic = take_str(&mut buf)?;
        let len = take_u32(&mut buf)? as usize;
        let mut message = decode(topic.as_bytes(), take(&mut buf, len)?)?.message;
        message.retain = false;
        queued.push(message);
    }
    let (mut store_id, mut will) = (0, None);
    if version == SESSION_VERSION {
        store_id = take(&mut buf, 8)?.get_u64();
        if take(&mut buf, 1)?[0] == 1 {
            let due = UNIX_EPOCH + Duration::from_millis(take(&mut buf, 8)?.get_u64());
            let topic = take_str(&mut buf)?;
            let len = take_u32(&mut buf)? as usize;
            let mut message = decode(topic.as_bytes(), take(&mut buf, len)?)?.message;
            message.retain = take(&mut buf, 1)?[0] == 1;
            will = Some(SavedWill { message, due });
        }
    }
    Some(SessionRecord {
        expiry_secs,
        subscriptions,
        queued,
        store_id,
        will,
    })
}

/// `store_id` then `id`, big-endian: a session's entries sort by message id.
pub(super) fn entry_key(store_id: u64, id: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&store_id.to_be_bytes());
    key[8..].copy_from_slice(&id.to_be_bytes());
    key
}

/// The `(store_id, id)` of an entry key.
pub(super) fn split_entry_key(key: &[u8]) -> Option<(u64, u64)> {
    let key: &[u8; 16] = key.try_into().ok()?;
    let (store_id, id) = key.split_at(8);
    Some((
        u64::from_be_bytes(store_id.try_into().ok()?),
        u64::from_be_bytes(id.try_into().ok()?),
    ))
}

const HAS_PROPERTIES: u8 = 0b100;
const RETAIN: u8 = 0b1000;

pub(super) fn encode_queued(q: &QueuedMessage) -> Bytes {
    let m = &q.message;
    // Empty properties are written as none, as `encode` does: they read back as none,
    // and a record whose properties do not read back is damaged (fuzz target
    // `records`: an MQTT 5 PUBLISH with only a Topic Alias leaves them empty, and its
    // queued record was unreadable after a restart).
    let props = m
        .properties
        .as_ref()
        .filter(|p| **p != PublishProperties::default())
        .map(encode_properties);
    let props_len = props.as_ref().map_or(0, |p| p.len());
    let mut buf = BytesMut::with_capacity(30 + props_len + m.topic.len() + m.payload.len());
    buf.put_u8(RECORD_VERSION);
    let mut flags = m.qos & 0b11;
    if props.is_some() {
        flags |= HAS_PROPERTIES;
    }
    if m.retain {
        flags |= RETAIN;
    }
    buf.put_u8(flags);
    buf.put_u64(q.origin);
    buf.put_u64(q.received_at);
    buf.put_u32(q.recipients.len() as u32);
    for (store_id, seq) in &q.recipients {
        buf.put_u64(*store_id);
        buf.put_u64(*seq);
    }
    if let Some(p) = props {
        buf.put_u32(p.len() as u32);
        buf.put_slice(&p);
    }
    put_str(&mut buf, &m.topic);
    buf.put_slice(&m.payload);
    buf.freeze()
}

pub(super) fn decode_queued(mut buf: Bytes) -> Option<QueuedMessage> {
    if take(&mut buf, 1)?[0] != RECORD_VERSION {
        return None;
    }
    let flags = take(&mut buf, 1)?[0];
    let origin = take(&mut buf, 8)?.get_u64();
    let received_at = take(&mut buf, 8)?.get_u64();
    let recipients = take_recipients(&mut buf)?;
    let properties = if flags & HAS_PROPERTIES != 0 {
        let len = take_u32(&mut buf)? as usize;
        Some(decode_properties(take(&mut buf, len)?)?)
    } else {
        None
    };
    let topic = take_str(&mut buf)?;
    Some(QueuedMessage {
        message: Message {
            topic,
            payload: buf,
            qos: (flags & 0b11).min(2),
            retain: flags & RETAIN != 0,
            properties,
        },
        origin,
        received_at,
        recipients,
    })
}

fn take_recipients(buf: &mut Bytes) -> Option<Vec<(u64, u64)>> {
    let n = take_u32(buf)? as usize;
    let mut pairs = take(buf, n.checked_mul(16)?)?;
    Some((0..n).map(|_| (pairs.get_u64(), pairs.get_u64())).collect())
}

/// The recipients of a queued-message record and its topic and payload bytes, without
/// decoding (or copying) the rest: the store's start reads every record this way.
pub(super) fn decode_recipients(value: &[u8]) -> Option<(Vec<(u64, u64)>, u64)> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let part = value.get(at..at.checked_add(n)?)?;
        at += n;
        Some(part)
    };
    let u32_of = |b: &[u8]| b.try_into().ok().map(u32::from_be_bytes);
    let u64_of = |b: &[u8]| b.try_into().ok().map(u64::from_be_bytes);
    if take(1)?[0] != RECORD_VERSION {
        return None;
    }
    let flags = take(1)?[0];
    take(16)?;
    let n = u32_of(take(4)?)? as usize;
    let mut recipients = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        recipients.push((u64_of(take(8)?)?, u64_of(take(8)?)?));
    }
    if flags & HAS_PROPERTIES != 0 {
        let len = u32_of(take(4)?)? as usize;
        take(len)?;
    }
    // The topic's length prefix; topic and payload are the rest.
    take(4)?;
    Some((recipients, value.len().saturating_sub(at) as u64))
}

/// What the store knows of a stored QoS 2 message a session sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Written under this packet id; `released`: PUBREC came back, PUBREL sent.
    InFlight { pkid: u16, released: bool },
    /// PUBCOMP came back. Kept until the session's mark is past the message: until
    /// then a restart would find it still owed, and must not send it again.
    Completed,
}

pub(super) fn encode_sent(sent: Sent) -> [u8; 3] {
    match sent {
        Sent::InFlight { pkid, released } => {
            let [a, b] = pkid.to_be_bytes();
            [a, b, u8::from(released)]
        }
        Sent::Completed => [0, 0, 2],
    }
}

pub(super) fn decode_sent(value: &[u8]) -> Option<Sent> {
    match value {
        [_, _, 2] => Some(Sent::Completed),
        [a, b, r @ (0 | 1)] => Some(Sent::InFlight {
            pkid: u16::from_be_bytes([*a, *b]),
            released: *r == 1,
        }),
        _ => None,
    }
}

/// A record of the queue index: what one publisher's batch queued, as the store id of
/// each session it went to with that session's entries (sequence number, message id,
/// size), in sequence order.
pub(super) fn encode_batch(groups: &[(u64, Vec<Spilled>)]) -> Vec<u8> {
    let n: usize = groups.iter().map(|(_, e)| 12 + e.len() * ENTRY_LEN).sum();
    let mut out = Vec::with_capacity(1 + n);
    out.push(INDEX_VERSION);
    for (store_id, entries) in groups {
        let mut sorted = entries.clone();
        sorted.sort_unstable_by_key(|s| s.seq);
        out.extend_from_slice(&store_id.to_be_bytes());
        out.extend_from_slice(&(sorted.len() as u32).to_be_bytes());
        for s in sorted {
            out.extend_from_slice(&s.seq.to_be_bytes());
            out.extend_from_slice(&s.id.to_be_bytes());
            out.extend_from_slice(&u32::try_from(s.size).unwrap_or(u32::MAX).to_be_bytes());
        }
    }
    out
}

pub(super) fn decode_batch(value: &[u8]) -> Option<Vec<(u64, Vec<Spilled>)>> {
    let (&version, mut rest) = value.split_first()?;
    if version != INDEX_VERSION || rest.is_empty() {
        return None;
    }
    let word = |b: &[u8]| b.try_into().ok().map(u64::from_be_bytes);
    let mut groups = Vec::new();
    while !rest.is_empty() {
        let store_id = word(rest.get(..8)?)?;
        let n = u32::from_be_bytes(rest.get(8..12)?.try_into().ok()?) as usize;
        let body = rest.get(12..12 + n.checked_mul(ENTRY_LEN)?)?;
        let entries = body
            .chunks_exact(ENTRY_LEN)
            .map(|e| {
                Some(Spilled {
                    seq: word(&e[..8])?,
                    id: word(&e[8..16])?,
                    size: u64::from(u32::from_be_bytes(e[16..].try_into().ok()?)),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        groups.push((store_id, entries));
        rest = &rest[12 + body.len()..];
    }
    Some(groups)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::message::PublishProperties;

    /// A retained message with properties, as the store's tests write it.
    pub(in crate::store) fn message(topic: &str, payload: &'static [u8]) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: 1,
            retain: true,
            properties: Some(PublishProperties {
                content_type: Some("application/json".into()),
                message_expiry_interval: Some(60),
                user_properties: vec![("fuente".into(), "test".into())],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn record_round_trip() {
        let m = message("articulos/a/futbol", b"{}");
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let back = decode(m.topic.as_bytes(), encode(&m, at)).unwrap();
        assert_eq!(back.stored_at, at);
        assert_eq!(back.message.payload, m.payload);
        assert_eq!(back.message.qos, 1);
        assert_eq!(back.message.properties, m.properties);
    }

    #[test]
    fn session_record_round_trip() {
        let record = SessionRecord {
            expiry_secs: u32::MAX,
            subscriptions: vec![SavedSubscription {
                filter: "articulos/+/futbol".into(),
                qos: 1,
                no_local: true,
                retain_as_published: false,
                id: Some(7),
            }],
            queued: vec![Message {
                retain: false,
                ..message("articulos/a/futbol", b"{}")
            }],
            store_id: 9,
            will: Some(SavedWill {
                message: message("clientes/s/estado", b"offline"),
                due: UNIX_EPOCH + Duration::from_millis(1_800_000_000_123),
            }),
        };
        assert_eq!(decode_session(encode_session(&record)), Some(record));
        let id = SessionKey {
            identity: "subscriber".into(),
            client_id: "sub-1".into(),
        };
        assert_eq!(session_key(&key_of(&id)), Some(id));
        assert_eq!(decode_session(Bytes::from_static(b"\x01\x00")), None);
    }

    #[test]
    fn a_will_with_empty_properties_reads_back() {
        // An MQTT 5 will whose properties are only the will's own (delay).
        let will = Message {
            properties: Some(PublishProperties::default()),
            ..message("clientes/s/estado", b"offline")
        };
        let read = decode(will.topic.as_bytes(), encode(&will, SystemTime::now())).unwrap();
        assert_eq!(read.message.payload, will.payload);
        assert_eq!(read.message.properties, None);
    }

    #[test]
    fn sessions_saved_before_durable_queues_still_load() {
        // Version 1: expiry 600, no subscription, one queued message.
        let m = Message {
            retain: false,
            ..message("a/b", b"x")
        };
        let mut v1 = BytesMut::new();
        v1.put_u8(1);
        v1.put_u32(600);
        v1.put_u32(0);
        v1.put_u32(1);
        put_str(&mut v1, &m.topic);
        let body = encode(&m, SystemTime::now());
        v1.put_u32(body.len() as u32);
        v1.put_slice(&body);
        let record = decode_session(v1.freeze()).unwrap();
        assert_eq!((record.expiry_secs, record.store_id), (600, 0));
        assert_eq!(record.queued, vec![m]);
        assert_eq!(record.will, None);
    }

    #[test]
    fn batch_records_round_trip_and_damage_reads_as_none() {
        let entries = |seqs: std::ops::Range<u64>| -> Vec<Spilled> {
            seqs.map(|seq| Spilled {
                seq,
                id: 100 + seq,
                size: 300,
            })
            .collect()
        };
        let groups = vec![(1, entries(0..3)), (9, entries(5..6))];
        let encoded = encode_batch(&groups);
        assert_eq!(decode_batch(&encoded), Some(groups));
        // Cut inside an entry, or inside a group's header; never a panic.
        for cut in [encoded.len() - 5, 1 + 8, 1, 0] {
            assert_eq!(decode_batch(&encoded[..cut]), None, "{cut} bytes");
        }
        assert_eq!(decode_batch(&[2, 0]), None);
    }

    /// Fuzz finding (target `records`, input `01 0b 03 61 2f 62 02 68 69 ff…`): a
    /// queued message with present but empty properties, as a PUBLISH carrying only a
    /// Topic Alias leaves them, was written unreadable.
    #[test]
    fn a_queued_message_with_empty_properties_reads_back() {
        let q = QueuedMessage {
            message: Message {
                topic: "a/b".into(),
                payload: Bytes::from_static(b"hi"),
                qos: 2,
                retain: true,
                properties: Some(PublishProperties::default()),
            },
            origin: 0xffff_ffff,
            received_at: 0xffff_ffff << 20,
            recipients: vec![(u64::from(u32::MAX), u64::from(u32::MAX))],
        };
        let back = decode_queued(encode_queued(&q)).expect("readable");
        assert_eq!(back.message.properties, None);
        assert_eq!(back.message.payload, q.message.payload);
        assert_eq!(back.recipients, q.recipients);
    }

    #[test]
    fn queued_messages_and_entry_keys_round_trip() {
        let q = QueuedMessage {
            message: message("articulos/a/futbol", b"{}"),
            origin: 7,
            received_at: 1_700_000_000_000_001,
            recipients: vec![(3, 9), (4, 0)],
        };
        let encoded = encode_queued(&q);
        assert_eq!(decode_queued(encoded.clone()), Some(q.clone()));
        let size = ("articulos/a/futbol".len() + 2) as u64;
        assert_eq!(
            decode_recipients(&encoded),
            Some((vec![(3, 9), (4, 0)], size))
        );
        let plain = QueuedMessage {
            message: Message {
                properties: None,
                retain: false,
                qos: 2,
                ..q.message.clone()
            },
            ..q
        };
        assert_eq!(decode_queued(encode_queued(&plain)), Some(plain));
        assert_eq!(decode_queued(Bytes::from_static(b"\x01\x05")), None);
        assert_eq!(
            split_entry_key(&entry_key(3, u64::MAX)),
            Some((3, u64::MAX))
        );
        assert!(entry_key(1, 2) < entry_key(1, 3) && entry_key(1, u64::MAX) < entry_key(2, 0));
        for sent in [
            Sent::InFlight {
                pkid: 513,
                released: true,
            },
            Sent::InFlight {
                pkid: 1,
                released: false,
            },
            Sent::Completed,
        ] {
            assert_eq!(decode_sent(&encode_sent(sent)), Some(sent));
        }
        assert_eq!(decode_sent(b"\x01"), None);
        assert_eq!(decode_sent(b"\x00\x01\x07"), None);
    }
}
