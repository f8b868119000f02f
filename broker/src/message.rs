//! An application message as the broker keeps it, whatever the MQTT version it came in:
//! the message, a client's will, the envelope that travels with a published message to
//! the subscriber sessions, and message expiry.

use bytes::Bytes;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) use rumqttc::v5::mqttbytes::v5::PublishProperties;

/// An application message as published.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Message {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) qos: u8,
    pub(crate) retain: bool,
    /// MQTT 5 properties; None on 3.1.1.
    pub(crate) properties: Option<PublishProperties>,
}

/// What a client asked to be published if its connection ends without DISCONNECT.
#[derive(Debug, Clone)]
pub(crate) struct Will {
    pub(crate) message: Message,
    /// MQTT 5 Will Delay Interval; 0 publishes at once.
    pub(crate) delay_secs: u32,
}

impl Message {
    /// The message with its MQTT 5 Message Expiry Interval lowered by the time since
    /// `since`; None once it has run out (MQTT 5 §3.3.2.3.3: an expired message is not
    /// delivered). A message without an interval never expires.
    pub(crate) fn unexpired(mut self, since: SystemTime, now: SystemTime) -> Option<Self> {
        if let Some(p) = self.properties.as_mut() {
            if let Some(interval) = p.message_expiry_interval {
                p.message_expiry_interval = Some(expiry_left(interval, since, now)?);
            }
        }
        Some(self)
    }
}

/// Seconds left of a Message Expiry Interval of `interval` seconds counted from
/// `since`; None once it has run out. At least 1 while the message lives, so that a
/// message that has not expired never reads as having no time left.
pub(crate) fn expiry_left(interval: u32, since: SystemTime, now: SystemTime) -> Option<u32> {
    let age = now.duration_since(since).unwrap_or(Duration::ZERO);
    let left = Duration::from_secs(interval.into()).checked_sub(age)?;
    Some((left.as_secs() as u32).max(1))
}

/// What travels with a published message to the subscriber sessions, beside its topic
/// and payload: what they need to deliver it, including what rumqttd's router cannot
/// carry for `$share` groups (see `routing::router`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Envelope {
    /// The QoS it was published with; each subscriber delivers min(this, granted).
    pub(crate) qos: u8,
    /// The publish's retain flag, for MQTT 5 Retain As Published.
    pub(crate) retain: bool,
    /// The publishing session, for MQTT 5 No Local.
    pub(crate) origin: u64,
    /// Unique per message: a copy that reaches a session twice (index and `$share`, or
    /// overlapping `$share` filters) is recognised by it.
    pub(crate) id: u64,
    /// When the broker received it (µs since the Unix epoch): delivery latency and
    /// message expiry count from here.
    pub(crate) received_at: u64,
    pub(crate) properties: Option<PublishProperties>,
}

impl Envelope {
    /// When the broker received the message.
    pub(crate) fn received(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.received_at)
    }
}

/// Microseconds since the Unix epoch.
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expiring(interval: u32) -> Message {
        Message {
            topic: "t".into(),
            payload: Bytes::from_static(b"x"),
            qos: 1,
            retain: false,
            properties: Some(PublishProperties {
                message_expiry_interval: Some(interval),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn expiry_counts_down_to_one_then_runs_out() {
        let since = UNIX_EPOCH + Duration::from_secs(1_000);
        let at = |secs: f64| since + Duration::from_secs_f64(secs);
        assert_eq!(expiry_left(10, since, at(0.0)), Some(10));
        assert_eq!(expiry_left(10, since, at(3.5)), Some(6));
        assert_eq!(expiry_left(10, since, at(9.9)), Some(1));
        assert_eq!(expiry_left(10, since, at(10.0)), Some(1));
        assert_eq!(expiry_left(10, since, at(10.1)), None);
        // A clock that went backwards counts as no time passed.
        assert_eq!(
            expiry_left(10, since, since - Duration::from_secs(5)),
            Some(10)
        );
    }

    #[test]
    fn unexpired_lowers_the_interval_or_drops_the_message() {
        let since = UNIX_EPOCH + Duration::from_secs(1_000);
        let later = since + Duration::from_secs(4);
        let lowered = expiring(60).unexpired(since, later).unwrap();
        let left = lowered.properties.and_then(|p| p.message_expiry_interval);
        assert_eq!(left, Some(56));
        assert!(expiring(3).unexpired(since, later).is_none());
        let plain = Message {
            properties: None,
            ..expiring(1)
        };
        let far = since + Duration::from_secs(1_000_000);
        assert_eq!(plain.clone().unexpired(since, far), Some(plain));
    }
}
