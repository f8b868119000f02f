//! The `Article` message: its fields, its topic, what makes it publishable.

use serde::{Deserialize, Serialize};

use crate::topic::{article_topic, TopicError};

/// Largest accepted article, as one JSON line (the MQTT packet limit is set above this).
pub const MAX_ARTICLE_BYTES: usize = 64 * 1024;

/// A news article as sent on the wire (one JSON object per MQTT message).
///
/// Only `title` and `content` are required when parsing: other fields default to empty
/// strings so hand-written JSON sent with `mosquitto_pub` is still understood.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Article {
    /// Unique per publication; the subscriber drops redeliveries by this id.
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub newspaper: String,
    #[serde(default)]
    pub section: String,
    pub title: String,
    pub content: String,
    /// RFC 3339 timestamp, e.g. `2024-11-24T21:15:00Z`.
    #[serde(default)]
    pub published_at: String,
}

impl Article {
    /// `articulos/<newspaper>/<section>`.
    pub fn topic(&self) -> Result<String, TopicError> {
        article_topic(&self.newspaper, &self.section)
    }

    /// Checks what the publisher needs: a valid topic and a non-empty title.
    pub fn validate(&self) -> Result<(), String> {
        self.topic().map_err(|e| e.to_string())?;
        if self.title.trim().is_empty() {
            return Err("title must not be empty".into());
        }
        Ok(())
    }
}

/// Current UTC time as RFC 3339 (seconds precision).
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_timestamp_shape() {
        let a = Article {
            id: "x".into(),
            newspaper: "as".into(),
            section: "futbol".into(),
            title: "Título".into(),
            content: "Contenido con ñ".into(),
            published_at: now_rfc3339(),
        };
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Article>(&json).unwrap(), a);
        let ts = &a.published_at;
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    }
}
