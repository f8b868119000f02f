//! Retained messages, owned by the edge: the router never sees the retain flag, so
//! every retained message reaches a new subscriber, whatever its number, with its
//! own QoS and properties.

use crate::codec::Message;
use crate::topic;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

#[derive(Default)]
pub struct Retained {
    messages: RwLock<BTreeMap<String, Message>>,
}

impl Retained {
    /// Stores `message` as the retained one for its topic; an empty payload deletes it.
    pub fn set(&self, message: &Message) {
        let mut map = self.messages.write().unwrap_or_else(|e| e.into_inner());
        if message.payload.is_empty() {
            map.remove(&message.topic);
        } else {
            let mut stored = message.clone();
            stored.retain = true;
            map.insert(message.topic.clone(), stored);
        }
    }

    /// Every retained message whose topic matches `filter`.
    pub fn matching(&self, filter: &str) -> Vec<Message> {
        let filter = topic::matching_part(filter);
        let map = self.messages.read().unwrap_or_else(|e| e.into_inner());
        // Only topics starting with the filter's literal prefix can match.
        let prefix = literal_prefix(filter);
        map.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(t, _)| t.starts_with(prefix))
            .filter(|(t, _)| topic::matches(filter, t))
            .map(|(_, m)| m.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.messages.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    use bytes::Bytes;

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
        r.set(&msg("articulos/eldiario/futbol", b"a"));
        r.set(&msg("articulos/marca/futbol", b"b"));
        r.set(&msg("articulos/marca/economia", b"c"));
        r.set(&msg("otros", b"d"));
        assert_eq!(r.matching("articulos/+/futbol").len(), 2);
        assert_eq!(r.matching("articulos/#").len(), 3);
        assert_eq!(r.matching("#").len(), 4);
        assert_eq!(r.matching("otros").len(), 1);
        assert_eq!(r.matching("$share/g/articulos/marca/+").len(), 2);
        r.set(&msg("articulos/marca/futbol", b""));
        assert_eq!(r.matching("articulos/+/futbol").len(), 1);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn dollar_topics_need_explicit_filters() {
        let r = Retained::default();
        r.set(&msg("$SYS/broker/version", b"x"));
        assert!(r.matching("#").is_empty());
        assert_eq!(r.matching("$SYS/#").len(), 1);
    }
}
