//! One row of the `articles` table, built from a received message, and the timestamps'
//! one text form (UTC, milliseconds: `2024-11-24T21:15:00.000Z`), which sorts as it reads.

use ring::digest::{digest, SHA256};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::{Date, Month, OffsetDateTime, UtcOffset};

use crate::payload::Payload;
use crate::topic::parse_article_topic;

/// Longest id, newspaper or section stored (they are indexed; PostgreSQL refuses index
/// entries over ~2,700 bytes, and no real one comes near this).
pub const MAX_KEY_BYTES: usize = 256;

/// A stored article: the columns of `articles`, in their order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// Primary key: the article's own id, or `txt-<hash>` of topic and payload when it
    /// has none (the plain-text form), so a redelivery maps to the same row.
    pub id: String,
    pub newspaper: String,
    pub section: String,
    pub title: String,
    pub content: String,
    /// The article's `published_at` when it is RFC 3339, else the time it was received.
    #[serde(serialize_with = "serialize_time")]
    pub published_at: OffsetDateTime,
    /// The MQTT topic it arrived on.
    pub topic: String,
    /// When the subscriber received it.
    #[serde(serialize_with = "serialize_time")]
    pub received_at: OffsetDateTime,
}

/// Why a message is not archived (it is still acknowledged, so it cannot block the
/// stream, and logged once at WARN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl Record {
    /// The row for a message received on `topic`. Messages that are neither a JSON
    /// article nor `Título: … | Contenido: …` are refused, as are absurd keys.
    pub fn from_message(
        topic: &str,
        bytes: &[u8],
        payload: &Payload,
        received_at: OffsetDateTime,
    ) -> Result<Record, Refusal> {
        let received_at = to_millis(received_at);
        let from_topic = parse_article_topic(topic).unwrap_or(("", ""));
        let record = match payload {
            Payload::Article(a) => Record {
                id: if a.id.is_empty() {
                    content_id(topic, bytes)
                } else {
                    clean(&a.id)
                },
                newspaper: clean(&a.newspaper),
                section: clean(&a.section),
                title: clean(&a.title),
                content: clean(&a.content),
                published_at: parse_time(&a.published_at).unwrap_or(received_at),
                topic: clean(topic),
                received_at,
            },
            Payload::Plain { title, content } => Record {
                id: content_id(topic, bytes),
                newspaper: from_topic.0.to_owned(),
                section: from_topic.1.to_owned(),
                title: clean(title),
                content: clean(content),
                published_at: received_at,
                topic: clean(topic),
                received_at,
            },
            Payload::Raw { valid_utf8, .. } => {
                return Err(Refusal(format!(
                    "not an article: neither JSON {{\"title\", \"content\", ...}} nor 'Título: … | Contenido: …'{}",
                    if *valid_utf8 { "" } else { " (not even UTF-8)" }
                )))
            }
        };
        for (what, value) in [
            ("id", &record.id),
            ("newspaper", &record.newspaper),
            ("section", &record.section),
        ] {
            if value.len() > MAX_KEY_BYTES {
                return Err(Refusal(format!(
                    "{what} is {} bytes long; at most {MAX_KEY_BYTES} are archived",
                    value.len()
                )));
            }
        }
        Ok(record)
    }
}

/// `txt-` and 128 bits of SHA-256 over topic, a NUL and payload: stable across runs,
/// machines and Rust versions.
pub fn content_id(topic: &str, payload: &[u8]) -> String {
    let mut input = Vec::with_capacity(topic.len() + 1 + payload.len());
    input.extend_from_slice(topic.as_bytes());
    input.push(0);
    input.extend_from_slice(payload);
    let hash = digest(&SHA256, &input);
    let mut id = String::from("txt-");
    for b in &hash.as_ref()[..16] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// PostgreSQL text cannot hold NUL; nobody needs it in an article.
fn clean(s: &str) -> String {
    s.replace('\0', "")
}

fn to_millis(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(UtcOffset::UTC);
    t.replace_nanosecond(t.millisecond() as u32 * 1_000_000)
        .unwrap_or(t)
}

/// RFC 3339 in any offset, to UTC milliseconds; `None` for anything else.
pub fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s.trim(), &Rfc3339)
        .ok()
        .map(to_millis)
}

/// `2024-11-24` (midnight UTC) or RFC 3339, for `--since`.
pub fn parse_since(s: &str) -> Result<OffsetDateTime, String> {
    if let Some(t) = parse_time(s) {
        return Ok(t);
    }
    let parts: Vec<&str> = s.trim().split('-').collect();
    let bad = || format!("{s:?} is not a date: use 2024-11-24 or 2024-11-24T21:15:00Z");
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    let (Ok(y), Ok(m), Ok(d)) = (y.parse::<i32>(), m.parse::<u8>(), d.parse::<u8>()) else {
        return Err(bad());
    };
    let month = Month::try_from(m).map_err(|_| bad())?;
    let date = Date::from_calendar_date(y, month, d).map_err(|_| bad())?;
    Ok(date.midnight().assume_utc())
}

/// `2024-11-24T21:15:00.000Z`: fixed width, so text order is time order (SQLite keeps
/// timestamps as this text).
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn serialize_time<S: serde::Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*t))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "articulos/eldiario/futbol";

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(1_732_482_900_123_456_789).unwrap()
    }

    #[test]
    fn json_article_keeps_its_id_and_time() {
        let bytes =
            br#"{"id":"a-1","title":"T","content":"C","published_at":"2024-11-24T22:15:00+01:00"}"#;
        let r = Record::from_message(TOPIC, bytes, &Payload::parse(TOPIC, bytes), now()).unwrap();
        assert_eq!(r.id, "a-1");
        assert_eq!(
            (r.newspaper.as_str(), r.section.as_str()),
            ("eldiario", "futbol")
        );
        assert_eq!(format_time(r.published_at), "2024-11-24T21:15:00.000Z");
        assert_eq!(format_time(r.received_at), "2024-11-24T21:15:00.123Z");
        assert_eq!(r.topic, TOPIC);
    }

    #[test]
    fn plain_text_gets_a_stable_id_from_topic_and_payload() {
        let bytes = "Título: Gol | Contenido: Golazo".as_bytes();
        let p = Payload::parse(TOPIC, bytes);
        let a = Record::from_message(TOPIC, bytes, &p, now()).unwrap();
        let b = Record::from_message(TOPIC, bytes, &p, now() + time::Duration::HOUR).unwrap();
        assert_eq!(a.id, b.id, "a redelivery is the same row");
        // Pinned: the id must not change between versions (rows already stored).
        assert_eq!(a.id, content_id(TOPIC, bytes));
        assert_eq!(
            content_id("a", b"b"),
            "txt-59b271ae1bbcb1d31d41929817f4b16f"
        );
        assert!(a.id.starts_with("txt-") && a.id.len() == 36);
        assert_ne!(
            a.id,
            content_id("articulos/as/futbol", bytes),
            "topic counts"
        );
        assert_eq!((a.title.as_str(), a.content.as_str()), ("Gol", "Golazo"));
        assert_eq!(a.published_at, a.received_at);
    }

    #[test]
    fn article_without_id_or_valid_time_is_still_kept() {
        let bytes = br#"{"title":"T","content":"C","published_at":"ayer"}"#;
        let r = Record::from_message(TOPIC, bytes, &Payload::parse(TOPIC, bytes), now()).unwrap();
        assert_eq!(r.id, content_id(TOPIC, bytes));
        assert_eq!(r.published_at, r.received_at);
    }

    #[test]
    fn raw_payloads_and_absurd_keys_are_refused() {
        for bytes in [&b"hola"[..], b"\xff\xfe", br#"{"foo":1}"#] {
            let p = Payload::parse(TOPIC, bytes);
            let err = Record::from_message(TOPIC, bytes, &p, now()).unwrap_err();
            assert!(err.0.contains("not an article"), "{err:?}");
        }
        let long = format!(
            r#"{{"id":"{}","title":"T","content":"C"}}"#,
            "x".repeat(300)
        );
        let p = Payload::parse(TOPIC, long.as_bytes());
        let err = Record::from_message(TOPIC, long.as_bytes(), &p, now()).unwrap_err();
        assert!(err.0.contains("id is 300 bytes"), "{err:?}");
    }

    #[test]
    fn nul_characters_are_dropped() {
        let bytes = b"{\"id\":\"1\",\"title\":\"a\\u0000b\",\"content\":\"c\"}";
        let r = Record::from_message(TOPIC, bytes, &Payload::parse(TOPIC, bytes), now()).unwrap();
        assert_eq!(r.title, "ab");
    }

    #[test]
    fn since_accepts_dates_and_timestamps() {
        assert_eq!(
            format_time(parse_since("2024-11-24").unwrap()),
            "2024-11-24T00:00:00.000Z"
        );
        assert_eq!(
            format_time(parse_since("2024-11-24T21:15:00.5Z").unwrap()),
            "2024-11-24T21:15:00.500Z"
        );
        for bad in ["", "2024-13-01", "ayer", "2024-11", "2024-02-30"] {
            assert!(parse_since(bad).is_err(), "{bad}");
        }
    }
}
