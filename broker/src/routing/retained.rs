//! Retained messages, owned by the edge: the router never sees the retain flag, so
//! every retained message reaches a new subscriber, whatever its number, with its
//! own QoS and properties. Kept in memory for matching and, when a store is open,
//! written through to sled.

use crate::message::{expiry_left, Message};
use crate::store::{Store, StoreError, Stored};
use mqtt_common::topic;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

struct Entry {
    message: Message,
    stored_at: SystemTime,
}

impl Entry {
    /// Seconds of life left under an MQTT 5 Message Expiry Interval (None: it has
    /// none); None when expired.
    fn remaining(&self, now: SystemTime) -> Option<Option<u32>> {
        let interval = self
            .message
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval);
        match interval {
            None => Some(None),
            Some(interval) => expiry_left(interval, self.stored_at, now).map(Some),
        }
    }
}

#[derive(Default)]
pub(crate) struct Retained {
    messages: RwLock<BTreeMap<String, Entry>>,
    store: Option<Arc<Store>>,
}

impl Retained {
    /// Retained messages backed by `store`, starting with what it held (expired ones
    /// are dropped, from the store too).
    pub(crate) fn with_store(store: Arc<Store>, stored: Vec<Stored>) -> Self {
        let now = SystemTime::now();
        let mut map = BTreeMap::new();
        for s in stored {
            let entry = Entry {
                message: s.message,
                stored_at: s.stored_at,
            };
            if entry.remaining(now).is_some() {
                map.insert(entry.message.topic.clone(), entry);
            } else {
                let _ = store.remove(&entry.message.topic);
            }
        }
        Self {
            messages: RwLock::new(map),
            store: Some(store),
        }
    }

    /// Stores `message` as the retained one for its topic; an empty payload deletes
    /// it. Written to the store, not yet durable: see `sync`.
    pub(crate) fn set(&self, message: &Message) -> Result<(), StoreError> {
        if let Some(store) = &self.store {
            store.put(message, SystemTime::now())?;
        }
        self.set_volatile(message);
        Ok(())
    }

    /// Keeps `message` as retained in memory only (`$SYS` values, rebuilt at start).
    pub(crate) fn set_volatile(&self, message: &Message) {
        let now = SystemTime::now();
        let mut map = self.messages.write().unwrap_or_else(|e| e.into_inner());
        if message.payload.is_empty() {
            map.remove(&message.topic);
        } else {
            let mut stored = message.clone();
            stored.retain = true;
            let entry = Entry {
                message: stored,
                stored_at: now,
            };
            map.insert(message.topic.clone(), entry);
        }
    }

    /// Returns once every `set` so far is on disk (shared with concurrent callers).
    pub(crate) async fn sync(&self) -> Result<(), StoreError> {
        match &self.store {
            Some(store) => store.sync().await,
            None => Ok(()),
        }
    }

    /// Flushes the store before exit.
    pub(crate) fn close(&self) -> Result<(), StoreError> {
        match &self.store {
            Some(store) => store.close(),
            None => Ok(()),
        }
    }

    /// Every unexpired retained message whose topic matches `filter`, its expiry
    /// interval lowered by the time it has waited.
    pub(crate) fn matching(&self, filter: &str) -> Vec<Message> {
        let filter = topic::matching_part(filter);
        let now = SystemTime::now();
        let map = self.messages.read().unwrap_or_else(|e| e.into_inner());
        // Only topics starting with the filter's literal prefix can match.
        let prefix = literal_prefix(filter);
        map.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(t, _)| t.starts_with(prefix))
            .filter(|(t, _)| topic::matches(filter, t))
            .filter_map(|(_, entry)| {
                let remaining = entry.remaining(now)?;
                let mut message = entry.message.clone();
                if let (Some(left), Some(p)) = (remaining, message.properties.as_mut()) {
                    p.message_expiry_interval = Some(left);
                }
                Some(message)
            })
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.messages.read().map(|m| m.len()).unwrap_or(0)
    }
}

/// The part of a filter before its first wildcard level.
fn literal_prefix(filter: &str) -> &str {
    match filter.find(['+', '#']) {
        Some(i) => &filter[..i],
        None => filter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::PublishProperties;
    use bytes::Bytes;
    use std::time::Duration;

    fn msg(topic: &str, payload: &'static [u8]) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: 1,
            retain: true,
            properties: None,
        }
    }

    #[test]
    fn set_match_delete() {
        let r = Retained::default();
        r.set(&msg("articulos/eldiario/futbol", b"a")).unwrap();
        r.set(&msg("articulos/marca/futbol", b"b")).unwrap();
        r.set(&msg("articulos/marca/economia", b"c")).unwrap();
        r.set(&msg("otros", b"d")).unwrap();
        assert_eq!(r.matching("articulos/+/futbol").len(), 2);
        assert_eq!(r.matching("articulos/#").len(), 3);
        assert_eq!(r.matching("#").len(), 4);
        assert_eq!(r.matching("otros").len(), 1);
        assert_eq!(r.matching("$share/g/articulos/marca/+").len(), 2);
        r.set(&msg("articulos/marca/futbol", b"")).unwrap();
        assert_eq!(r.matching("articulos/+/futbol").len(), 1);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn dollar_topics_need_explicit_filters() {
        let r = Retained::default();
        r.set(&msg("$SYS/broker/version", b"x")).unwrap();
        assert!(r.matching("#").is_empty());
        assert_eq!(r.matching("$SYS/#").len(), 1);
    }

    #[test]
    fn expiry_counts_down_and_expired_messages_are_not_matched() {
        let entry = |age_secs: u64| Entry {
            message: Message {
                properties: Some(PublishProperties {
                    message_expiry_interval: Some(10),
                    ..Default::default()
                }),
                ..msg("t", b"x")
            },
            stored_at: SystemTime::now() - Duration::from_secs(age_secs),
        };
        let now = SystemTime::now();
        assert_eq!(entry(3).remaining(now), Some(Some(7)));
        assert_eq!(entry(11).remaining(now), None);
        let plain = Entry {
            message: msg("t", b"x"),
            stored_at: now - Duration::from_secs(1_000_000),
        };
        assert_eq!(plain.remaining(now), Some(None));
    }
}
