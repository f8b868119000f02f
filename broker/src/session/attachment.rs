//! The socket side of an attached session: the connection, who is on it, its keep
//! alive, its will, its read budget, and the topic aliases of both directions (MQTT 5).

use super::throttle::Throttle;
use crate::config::SessionConfig;
use crate::message::{Message, Will};
use crate::protocol::{Inbound, ReadError, Version};
use crate::shared::registry::{Client, Conn};
use std::collections::HashMap;
use std::net::SocketAddr;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Duration, Instant};
use tracing::warn;

/// Topic aliases a client may set (MQTT 5).
pub(super) const TOPIC_ALIAS_MAX: u16 = 64;
/// Unwritten bytes beyond which a client's socket is not read until it drains.
const READ_PAUSE: usize = 4 << 20;

pub(super) struct Attachment {
    pub(super) framed: Conn,
    /// The CN of the client's certificate.
    pub(super) identity: String,
    /// Its certificate's serial, checked against a reloaded CRL.
    pub(super) serial: Vec<u8>,
    pub(super) client_id: String,
    pub(super) addr: SocketAddr,
    pub(super) version: Version,
    /// The keep alive granted; None: the client asked for none.
    pub(super) keep_alive: Option<Duration>,
    /// When the client last sent a packet.
    pub(super) last_seen: Instant,
    /// Published if the connection ends without DISCONNECT.
    pub(super) will: Option<Will>,
    /// Topic aliases the client set (MQTT 5).
    aliases_in: HashMap<u16, String>,
    /// Topic aliases we set towards the client, up to its Topic Alias Maximum.
    pub(super) aliases_out: OutAliases,
    /// Its read budget (`max_packets_per_sec`, `max_bytes_per_sec`), if limited.
    pub(super) throttle: Option<Throttle>,
    /// Its place under `max_connections`, released when the connection goes.
    _permit: OwnedSemaphorePermit,
}

/// The topic aliases we set towards a client (MQTT 5 §3.3.2.3.4), up to the Topic
/// Alias Maximum it allows.
pub(super) struct OutAliases {
    by_topic: HashMap<String, u16>,
    max: u16,
}

impl OutAliases {
    fn new(max: u16) -> Self {
        Self {
            by_topic: HashMap::new(),
            max,
        }
    }

    /// Replaces a repeated topic by its alias, or gives a new topic an alias while the
    /// client allows more. A new alias is returned, to `record` once the PUBLISH that
    /// carries it is queued: an alias the client never received must not be reused.
    pub(super) fn apply(&self, message: &mut Message) -> Option<(String, u16)> {
        if self.max == 0 {
            return None;
        }
        let (alias, new) = match self.by_topic.get(&message.topic) {
            Some(&alias) => (alias, None),
            None if self.by_topic.len() < usize::from(self.max) => {
                let alias = self.by_topic.len() as u16 + 1;
                (alias, Some((message.topic.clone(), alias)))
            }
            None => return None,
        };
        if new.is_none() {
            message.topic.clear();
        }
        message
            .properties
            .get_or_insert_with(Default::default)
            .topic_alias = Some(alias);
        new
    }

    pub(super) fn record(&mut self, topic: String, alias: u16) {
        self.by_topic.insert(topic, alias);
    }
}

/// The client broke the topic alias rules (MQTT 5 §3.3.2.3.4).
pub(super) enum AliasError {
    OutOfRange,
    Unknown,
}

impl Attachment {
    /// The socket side of `client`, whose CONNECT was granted `keep_alive`.
    pub(super) fn new(
        client: Client,
        client_id: String,
        keep_alive: Option<Duration>,
        limits: &SessionConfig,
    ) -> Self {
        let info = client.info;
        // A bridge (limits of its own) carries many clients' traffic: not throttled as one.
        let throttle = if client.limits.is_some() {
            None
        } else {
            Throttle::new(
                limits.max_packets_per_sec,
                limits.max_bytes_per_sec,
                Instant::now(),
            )
        };
        Self {
            framed: client.framed,
            identity: client.identity,
            serial: client.serial,
            client_id,
            addr: client.addr,
            version: info.version,
            keep_alive,
            last_seen: Instant::now(),
            will: info.will,
            aliases_in: HashMap::new(),
            aliases_out: OutAliases::new(match info.version {
                Version::V5 => info.topic_alias_max,
                Version::V311 => 0,
            }),
            throttle,
            _permit: client.permit,
        }
    }

    /// Whether the read budget is spent: packets already buffered wait too.
    pub(super) fn over_budget(&mut self) -> bool {
        // The clock is read only for a limited connection.
        self.throttle
            .as_mut()
            .is_some_and(|t| t.delay(Instant::now()).is_some())
    }

    /// A packet was read: charged to the read budget.
    pub(super) fn charge(&mut self, now: Instant) {
        let read_total = self.framed.read_total();
        if let Some(t) = self.throttle.as_mut() {
            t.charge(read_total, now);
        }
    }

    /// Resolves or records the topic alias of an incoming PUBLISH.
    pub(super) fn alias_incoming(
        &mut self,
        message: &mut Message,
        alias: u16,
    ) -> Result<(), AliasError> {
        if alias == 0 || alias > TOPIC_ALIAS_MAX {
            return Err(AliasError::OutOfRange);
        }
        if message.topic.is_empty() {
            message.topic = self
                .aliases_in
                .get(&alias)
                .ok_or(AliasError::Unknown)?
                .clone();
        } else {
            self.aliases_in.insert(alias, message.topic.clone());
        }
        Ok(())
    }

    /// When the connection has been silent too long.
    pub(super) fn deadline(&self) -> Option<Instant> {
        // MQTT allows one and a half keep-alive periods of silence.
        self.keep_alive.map(|ka| self.last_seen + ka * 3 / 2)
    }

    /// The certificate serial as hex, for log lines.
    pub(super) fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The next packet from the attached client; None when its socket was congested and
/// has drained. A client that does not read what we write is not read from either, so
/// its acknowledgements cannot pile up without bound.
pub(super) async fn read_attached(
    conn: &mut Option<Attachment>,
) -> Option<Result<Inbound, ReadError>> {
    match conn {
        Some(c) if c.framed.unwritten() >= READ_PAUSE => {
            c.framed.drained_below(READ_PAUSE / 2).await;
            None
        }
        Some(c) => {
            if let Some(wait) = c.throttle.as_mut().and_then(|t| t.delay(Instant::now())) {
                if let Some(t) = c.throttle.as_mut().filter(|t| !t.slowed) {
                    t.slowed = true;
                    warn!(identity = %c.identity, client_id = %c.client_id, addr = %c.addr,
                        "client slowed down: over its read budget (session.max_packets_per_sec, max_bytes_per_sec); nothing is dropped");
                }
                tokio::time::sleep(wait).await;
                return None;
            }
            Some(c.framed.read().await)
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn publish(topic: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos: 0,
            retain: false,
            properties: None,
        }
    }

    fn alias_of(m: &Message) -> Option<u16> {
        m.properties.as_ref().and_then(|p| p.topic_alias)
    }

    #[test]
    fn a_topic_gets_an_alias_once_sent_then_goes_by_it() {
        let mut aliases = OutAliases::new(2);
        let mut first = publish("a/b");
        let new = aliases.apply(&mut first);
        assert_eq!(new, Some(("a/b".to_string(), 1)));
        assert_eq!((first.topic.as_str(), alias_of(&first)), ("a/b", Some(1)));
        // Not recorded (the first was never queued): the topic goes in full again.
        let mut again = publish("a/b");
        assert!(aliases.apply(&mut again).is_some());
        assert_eq!(again.topic, "a/b");
        aliases.record("a/b".into(), 1);
        let mut known = publish("a/b");
        assert_eq!(aliases.apply(&mut known), None);
        assert_eq!((known.topic.as_str(), alias_of(&known)), ("", Some(1)));
    }

    #[test]
    fn no_aliases_beyond_the_clients_maximum() {
        let mut aliases = OutAliases::new(1);
        aliases.record("a".into(), 1);
        let mut other = publish("b");
        assert_eq!(aliases.apply(&mut other), None);
        assert_eq!((other.topic.as_str(), alias_of(&other)), ("b", None));
        let mut none = publish("a");
        assert_eq!(OutAliases::new(0).apply(&mut none), None);
        assert_eq!(alias_of(&none), None);
    }
}
