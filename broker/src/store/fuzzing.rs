//! The record codecs as the fuzz targets reach them (the crate's `fuzzing` module):
//! every decoder on the same bytes, and encode → decode round trips. Compiled only
//! with the `fuzzing` feature.

use super::records::{
    decode, decode_batch, decode_queued, decode_recipients, decode_sent, decode_session, encode,
    encode_batch, encode_queued, encode_sent, encode_session, entry_key, session_key,
    split_entry_key, QueuedMessage, SessionRecord, Spilled,
};
use crate::ids::SessionKey;
use crate::message::Message;
use bytes::Bytes;
use std::time::SystemTime;

/// Runs every decoder on `key` and `value`; how many of them read a record. Each
/// record that decodes is written again, and must read back the same.
pub(crate) fn decode_all(key: &[u8], value: &[u8]) -> Result<usize, String> {
    let bytes = Bytes::copy_from_slice(value);
    let mut read = 0;
    if let Some(mut stored) = decode(key, bytes.clone()) {
        read += 1;
        without_subscription_ids(&mut stored.message);
        let again = encode(&stored.message, stored.stored_at);
        let back = decode(key, again).ok_or("retained: re-encoded record unreadable")?;
        if back.message != stored.message || back.stored_at != stored.stored_at {
            return Err(format!(
                "retained: {:?} at {:?} reads back as {:?} at {:?}",
                stored.message, stored.stored_at, back.message, back.stored_at
            ));
        }
    }
    if let Some(mut record) = decode_session(bytes.clone()) {
        read += 1;
        record.queued.iter_mut().for_each(without_subscription_ids);
        if let Some(will) = record.will.as_mut() {
            without_subscription_ids(&mut will.message);
        }
        session_round_trip(&record)?;
    }
    if let Some(mut queued) = decode_queued(bytes.clone()) {
        read += 1;
        without_subscription_ids(&mut queued.message);
        queued_round_trip(&queued)?;
    }
    if let Some((recipients, _)) = decode_recipients(value) {
        read += 1;
        // What the store's start reads must agree with the full decoding.
        if let Some(queued) = decode_queued(bytes) {
            if queued.recipients != recipients {
                return Err("decode_recipients disagrees with decode_queued".into());
            }
        }
    }
    if let Some(sent) = decode_sent(value) {
        read += 1;
        if decode_sent(&encode_sent(sent)) != Some(sent) {
            return Err("sent state does not round-trip".into());
        }
    }
    if let Some(groups) = decode_batch(value) {
        read += 1;
        if decode_batch(&encode_batch(&groups)).as_ref() != Some(&groups) && sorted(&groups) {
            return Err("batch does not round-trip".into());
        }
    }
    if let Some((store_id, id)) = split_entry_key(key) {
        read += 1;
        if entry_key(store_id, id)[..] != key[..] {
            return Err("entry key does not round-trip".into());
        }
    }
    if let Some(id) = session_key(key) {
        read += 1;
        if super::records::key_of(&id) != key {
            return Err("session key does not round-trip".into());
        }
    }
    Ok(read)
}

/// Records the broker writes never hold subscription identifiers (the session clears
/// them before routing), and rumqttc does not read a run of them back as it writes
/// them (ten `11`s came back as seven): left out of the round trips.
fn without_subscription_ids(message: &mut Message) {
    if let Some(p) = message.properties.as_mut() {
        p.subscription_identifiers.clear();
    }
    *message = written(message);
}

/// `encode_batch` sorts each group by sequence number: only sorted groups come back
/// as they were.
fn sorted(groups: &[(u64, Vec<Spilled>)]) -> bool {
    groups
        .iter()
        .all(|(_, e)| e.windows(2).all(|w| w[0].seq <= w[1].seq))
}

/// `message` as it reads back: empty properties are written as none.
fn written(message: &Message) -> Message {
    let mut m = message.clone();
    m.properties = m
        .properties
        .filter(|p| *p != crate::message::PublishProperties::default());
    m
}

pub(crate) fn session_round_trip(record: &SessionRecord) -> Result<(), String> {
    let mut expected = record.clone();
    expected.queued = expected.queued.iter().map(written).collect();
    if let Some(will) = expected.will.as_mut() {
        will.message = written(&will.message);
    }
    match decode_session(encode_session(record)) {
        Some(back) if back == expected => Ok(()),
        Some(back) => Err(format!("session record reads back as {back:?}")),
        None => Err("session record unreadable once written".into()),
    }
}

pub(crate) fn queued_round_trip(queued: &QueuedMessage) -> Result<(), String> {
    let mut expected = queued.clone();
    expected.message = written(&queued.message);
    match decode_queued(encode_queued(queued)) {
        Some(back) if back == expected => Ok(()),
        Some(back) => Err(format!("queued record reads back as {back:?}")),
        None => Err("queued record unreadable once written".into()),
    }
}

/// `message` as a retained record; empty properties are written as none (`encode`).
pub(crate) fn retained_round_trip(message: &Message, at: SystemTime) -> Result<(), String> {
    let expected = written(message);
    match decode(message.topic.as_bytes(), encode(message, at)) {
        Some(back) if back.message == expected => Ok(()),
        Some(back) => Err(format!("retained record reads back as {:?}", back.message)),
        None => Err("retained record unreadable once written".into()),
    }
}

pub(crate) fn key_round_trip(identity: &str, client_id: &str) -> Result<(), String> {
    let id = SessionKey {
        identity: identity.into(),
        client_id: client_id.into(),
    };
    // An identity with a NUL would split elsewhere; certificates' CNs have none.
    if identity.contains('\0') {
        return Ok(());
    }
    match session_key(&super::records::key_of(&id)) {
        Some(back) if back == id => Ok(()),
        _ => Err("session key does not round-trip".into()),
    }
}
