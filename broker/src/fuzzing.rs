//! The fuzz targets' one door into the crate (`fuzz/`, cargo-fuzz): thin wrappers over
//! the code that reads bytes from clients and from disk, which take bytes and strings
//! and return plain results. Compiled only with the `fuzzing` feature; not an API.

use crate::config::{check_acl_rules as check_rules, AclRule, ListenerConfig};
use crate::edge::connection::admit_for_fuzzing;
use crate::message::{Envelope, Message, PublishProperties};
use crate::protocol::{
    reason, ConnectCode, FirstPacket, Framed, Inbound, Outbound, ReadError, Version,
};
use crate::routing::fanout::{inbox, Delivery, Fanout};
use crate::security::acl::Acl;
use crate::store::fuzzing as records;
use crate::store::{QueuedMessage, SavedSubscription, SavedWill, SessionRecord};
use bytes::Bytes;
use mqtt_common::topic;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

thread_local! {
    // One runtime per fuzzing thread: `Framed` spawns its writer task.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("no tokio runtime for fuzzing: {e}"));
}

fn block_on<T>(future: impl Future<Output = T>) -> T {
    RUNTIME.with(|rt| {
        let out = rt.block_on(future);
        // Lets the writer tasks of dropped connections end, so none accumulate.
        rt.block_on(tokio::task::yield_now());
        out
    })
}

fn framed(data: &[u8]) -> Framed<&[u8]> {
    Framed::new(
        data,
        tokio::io::sink(),
        ListenerConfig::default().max_packet_size,
    )
}

/// What a byte stream after CONNECT decoded to.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Packets decoded, each answered as the session would.
    pub packets: usize,
    /// Why decoding stopped, when not at the end of the bytes.
    pub error: Option<String>,
    /// A published message that did not read back from its store record.
    pub store_mismatch: Option<String>,
}

/// Decodes `data` as the packets a client sends after a CONNECT of 3.1.1 (or 5.0 with
/// `v5`), and encodes what the broker answers and forwards for each.
pub fn packets(v5: bool, data: &[u8]) -> Decoded {
    block_on(async {
        let mut framed = framed(data);
        framed.version = if v5 { Version::V5 } else { Version::V311 };
        let mut out = Decoded::default();
        loop {
            match framed.read().await {
                Ok(packet) => {
                    out.packets += 1;
                    if let Err(e) = answer(&mut framed, packet) {
                        out.store_mismatch.get_or_insert(e);
                    }
                    framed.discard_pending();
                }
                Err(ReadError::Closed) => break,
                Err(e) => {
                    out.error = Some(e.to_string());
                    break;
                }
            }
        }
        out
    })
}

/// Encodes what the session sends for `packet`; a PUBLISH is also forwarded in both
/// versions and written as the store's queue record, which must read back.
fn answer(framed: &mut Framed<&[u8]>, packet: Inbound) -> Result<(), String> {
    let v5 = framed.version == Version::V5;
    let replies = match packet {
        Inbound::Publish {
            mut message, pkid, ..
        } => {
            if let Some(p) = message.properties.as_mut() {
                // As the session does: only the broker sets these.
                p.subscription_identifiers.clear();
            }
            let own = framed.version;
            for version in [Version::V311, Version::V5] {
                framed.version = version;
                let _ = framed.queue(Outbound::Publish {
                    message: message.clone(),
                    pkid,
                    dup: false,
                });
            }
            framed.version = own;
            let queued = QueuedMessage {
                message: message.clone(),
                origin: 1,
                received_at: 2,
                recipients: vec![(3, 4)],
            };
            records::queued_round_trip(&queued)?;
            match message.qos {
                1 => vec![Outbound::PubAck {
                    pkid,
                    reason: reason::SUCCESS,
                }],
                2 => vec![Outbound::PubRec {
                    pkid,
                    reason: reason::SUCCESS,
                }],
                _ => vec![],
            }
        }
        Inbound::PubRec(pkid) => vec![Outbound::PubRel { pkid }],
        Inbound::PubRel(pkid) => vec![Outbound::PubComp { pkid }],
        Inbound::PubAck(_) | Inbound::PubComp(_) => vec![],
        Inbound::Subscribe { pkid, filters, .. } => {
            let invalid = if v5 {
                reason::TOPIC_FILTER_INVALID
            } else {
                reason::SUB_FAILURE_V4
            };
            let codes = filters
                .iter()
                .map(|f| match topic::valid_filter(&f.filter) {
                    true => f.qos.min(2),
                    false => invalid,
                })
                .collect();
            vec![Outbound::SubAck { pkid, codes }]
        }
        Inbound::Unsubscribe { pkid, filters } => vec![Outbound::UnsubAck {
            pkid,
            codes: filters.iter().map(|_| reason::SUCCESS).collect(),
        }],
        Inbound::PingReq => vec![Outbound::PingResp],
        Inbound::Disconnect { .. } => vec![],
        Inbound::Unexpected(_) => vec![Outbound::Disconnect {
            reason: reason::PROTOCOL_ERROR,
        }],
    };
    for reply in replies {
        let _ = framed.queue(reply);
    }
    Ok(())
}

/// How a connection's first bytes ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connect {
    /// Not read as a CONNECT: malformed, too large, not MQTT, or cut short.
    Unreadable(String),
    /// A protocol level we do not speak (answered with a 3.1.1 CONNACK).
    Unsupported(u8),
    /// A CONNECT `admit` refused, with its 3.1.1-style code name and reason.
    Rejected { code: String, why: String },
    Accepted {
        v5: bool,
        client_id: String,
        assigned_id: bool,
        will_topic: Option<String>,
    },
}

/// Reads a connection's first packet from `data` and decides on it for `identity`
/// under `acl`, as the edge does, CONNACK encoded.
pub fn connect(data: &[u8], identity: &str, acl: &Acl) -> Connect {
    block_on(async {
        let mut framed = framed(data);
        let mut info = match framed.read_connect().await {
            Err(e) => return Connect::Unreadable(e.to_string()),
            Ok(FirstPacket::NotConnect(why)) => return Connect::Unreadable(why),
            Ok(FirstPacket::UnsupportedProtocol(level)) => {
                framed.version = Version::V311;
                let _ = framed.queue(connack(ConnectCode::UnsupportedProtocol));
                return Connect::Unsupported(level);
            }
            Ok(FirstPacket::Connect(info)) => info,
        };
        match admit_for_fuzzing(&mut info, identity, acl) {
            Err((code, why)) => {
                let _ = framed.queue(connack(code));
                Connect::Rejected {
                    code: format!("{code:?}"),
                    why,
                }
            }
            Ok(assigned_id) => {
                let _ = framed.queue(connack(ConnectCode::Accepted));
                Connect::Accepted {
                    v5: info.version == Version::V5,
                    client_id: info.client_id,
                    assigned_id,
                    will_topic: info.will.map(|w| w.message.topic),
                }
            }
        }
    })
}

fn connack(code: ConnectCode) -> Outbound {
    Outbound::ConnAck {
        session_present: false,
        code,
        properties: None,
    }
}

/// The `[[acl]]` rules' validation (`config::check_acl_rules`).
pub fn check_acl_rules(rules: &[AclRule]) -> Result<(), String> {
    check_rules(rules)
}

/// The broker's subscription index after `ops` (subscribe when true, else unsubscribe;
/// filter; session), asked for `topic`: the sessions handed the message, one entry per
/// copy. Filters subscribed must be valid plain filters not beginning with `$`.
pub fn fanout_receivers(ops: &[(bool, &str, u64)], topic_name: &str) -> Vec<u64> {
    let fanout = Fanout::default();
    let mut inboxes = std::collections::BTreeMap::new();
    for (subscribe, filter, session) in ops {
        if *subscribe {
            let (outbox, _) = inboxes.entry(*session).or_insert_with(|| inbox(64));
            fanout.subscribe(filter, *session, outbox.clone());
        } else {
            fanout.unsubscribe(filter, *session);
        }
    }
    let delivery = Arc::new(Delivery {
        topic: topic_name.into(),
        payload: Bytes::new(),
        envelope: Envelope {
            qos: 0,
            retain: false,
            origin: 0,
            id: 1,
            received_at: 0,
            properties: None,
        },
    });
    let _ = fanout.hand_over(&delivery, |_| {});
    let mut got = Vec::new();
    for (session, (_, rx)) in inboxes.iter_mut() {
        while rx.try_recv().is_ok() {
            got.push(*session);
        }
    }
    got
}

/// Every store decoder on `key` and `value` (a damaged record is None, never a
/// panic); each record read is written again and must read back the same. Returns how
/// many decoders read a record.
pub fn decode_records(key: &[u8], value: &[u8]) -> Result<usize, String> {
    records::decode_all(key, value)
}

/// Records built from `data` (retained message, persistent session, queued message,
/// session key), written and read back: Err names the first that came back different.
pub fn records_round_trip(data: &[u8]) -> Result<(), String> {
    let mut r = Input(data);
    let message = r.message();
    let at = UNIX_EPOCH + Duration::from_millis(u64::from(r.u32()) * 1000);
    records::retained_round_trip(
        &Message {
            retain: true,
            ..message.clone()
        },
        at,
    )?;
    records::queued_round_trip(&QueuedMessage {
        message: message.clone(),
        origin: u64::from(r.u32()),
        received_at: u64::from(r.u32()) << 20,
        recipients: (0..r.u8() % 4)
            .map(|_| (u64::from(r.u32()), u64::from(r.u32())))
            .collect(),
    })?;
    let record = SessionRecord {
        expiry_secs: r.u32(),
        subscriptions: (0..r.u8() % 4)
            .map(|_| {
                let flags = r.u8();
                SavedSubscription {
                    filter: r.string(),
                    qos: flags % 3,
                    no_local: flags & 4 != 0,
                    retain_as_published: flags & 8 != 0,
                    id: (flags & 16 != 0).then(|| (r.u32() % 268_435_455) as usize + 1),
                }
            })
            .collect(),
        queued: (0..r.u8() % 3)
            .map(|_| Message {
                retain: false,
                ..r.message()
            })
            .collect(),
        store_id: u64::from(r.u32()),
        will: (r.u8() & 1 == 1).then(|| SavedWill {
            message: r.message(),
            due: UNIX_EPOCH + Duration::from_millis(u64::from(r.u32())),
        }),
    };
    records::session_round_trip(&record)?;
    records::key_round_trip(&r.string(), &r.string())
}

/// Values drawn from fuzz input; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn bytes(&mut self) -> Bytes {
        let len = usize::from(self.u8()).min(self.0.len());
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Bytes::copy_from_slice(taken)
    }

    fn string(&mut self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    fn message(&mut self) -> Message {
        let flags = self.u8();
        Message {
            topic: self.string(),
            payload: self.bytes(),
            qos: flags % 3,
            retain: flags & 4 != 0,
            properties: match flags >> 3 {
                0 => None,
                // Present but empty: what a PUBLISH with only a topic alias leaves.
                1 => Some(PublishProperties::default()),
                _ => Some(self.properties()),
            },
        }
    }

    fn properties(&mut self) -> PublishProperties {
        let present = self.u8();
        let option = |bit: u8| present & (1 << bit) != 0;
        let (format, expiry, response, correlation, content) =
            (option(0), option(1), option(2), option(3), option(4));
        let users = option(5);
        PublishProperties {
            payload_format_indicator: format.then(|| self.u8()),
            message_expiry_interval: expiry.then(|| self.u32()),
            topic_alias: None,
            response_topic: response.then(|| self.string()),
            correlation_data: correlation.then(|| self.bytes()),
            user_properties: match users {
                true => (0..self.u8() % 3)
                    .map(|_| (self.string(), self.string()))
                    .collect(),
                false => Vec::new(),
            },
            subscription_identifiers: Vec::new(),
            content_type: content.then(|| self.string()),
        }
    }
}

/// Bytes from a server as a bridge reads them (first byte: version and side), decoded,
/// relayed and the results encoded: never a panic. The packets relayed, or why decoding
/// stopped.
pub fn bridge(data: &[u8]) -> Result<usize, String> {
    crate::bridge::fuzz_relay(data)
}
