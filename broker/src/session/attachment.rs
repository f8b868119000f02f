//! The socket side of an attached session: the connection, who is on it, its keep
//! alive, its will, and the topic aliases of both directions (MQTT 5).

use crate::message::{Message, Will};
use crate::protocol::{Inbound, ReadError, Version};
use crate::shared::registry::{Client, Conn};
use std::collections::HashMap;
use std::net::SocketAddr;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Duration, Instant};

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
    aliases_out: HashMap<String, u16>,
    alias_max_out: u16,
    /// Its place under `max_connections`, released when the connection goes.
    _permit: OwnedSemaphorePermit,
}

/// The client broke the topic alias rules (MQTT 5 §3.3.2.3.4).
pub(super) enum AliasError {
    OutOfRange,
    Unknown,
}

impl Attachment {
    /// The socket side of `client`, whose CONNECT was granted `keep_alive`.
    pub(super) fn new(client: Client, client_id: String, keep_alive: Option<Duration>) -> Self {
        let info = client.info;
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
            aliases_out: HashMap::new(),
            alias_max_out: match info.version {
                Version::V5 => info.topic_alias_max,
                Version::V311 => 0,
            },
            _permit: client.permit,
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

    /// Replaces a repeated topic by its alias, or gives a new topic an alias while the
    /// client allows more (MQTT 5 §3.3.2.3.4).
    pub(super) fn alias_outgoing(&mut self, message: &mut Message) {
        if self.alias_max_out == 0 {
            return;
        }
        let alias = match self.aliases_out.get(&message.topic) {
            Some(&alias) => {
                message.topic.clear();
                alias
            }
            None if self.aliases_out.len() < usize::from(self.alias_max_out) => {
                let alias = self.aliases_out.len() as u16 + 1;
                self.aliases_out.insert(message.topic.clone(), alias);
                alias
            }
            None => return,
        };
        message
            .properties
            .get_or_insert_with(Default::default)
            .topic_alias = Some(alias);
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
        Some(c) => Some(c.framed.read().await),
        None => std::future::pending().await,
    }
}
