//! The rumqttd router, reached through local links, for `$share` groups; and the
//! envelope's wire format, which carries through it what the router cannot (publish
//! QoS, origin, MQTT 5 properties) ahead of the payload.
//!
//! The router only routes: every subscription it holds is QoS 0 and it never sees a
//! retained message, so its retained, QoS and will quirks never reach a client.

use crate::message::Envelope;
use crate::protocol::{decode_properties, encode_properties};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::RouterConfig;
use std::sync::Arc;

type LinkFactory = dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync;

/// Creates links to one running router thread.
#[derive(Clone)]
pub(crate) struct Router {
    factory: Arc<LinkFactory>,
}

impl Router {
    /// Starts the router thread, sized for `max_links` sessions.
    pub(crate) fn spawn(max_links: usize) -> Self {
        let config = RouterConfig {
            max_connections: max_links,
            // Retained messages never pass through the router; this bounds how many
            // forwards it hands a link per wake-up.
            max_outgoing_packet_count: 200,
            // Sessions drain their link promptly, so small logs per filter suffice
            // and memory per filter stays bounded.
            max_segment_size: 4 << 20,
            max_segment_count: 4,
            ..RouterConfig::default()
        };
        // The sender's element type is private to rumqttd; the closure keeps it.
        let sender = rumqttd::Router::new(0, config).spawn();
        let factory = move |link_id: &str| {
            LinkBuilder::new(link_id, sender.clone())
                .clean_session(true)
                .build()
                .map(|(tx, rx, _ack)| (tx, rx))
                .map_err(|e: LinkError| e.to_string())
        };
        Self {
            factory: Arc::new(factory),
        }
    }

    /// Registers a link. Blocks until the router answers: call from `spawn_blocking`.
    pub(crate) fn link(&self, link_id: &str) -> Result<(LinkTx, LinkRx), String> {
        (self.factory)(link_id)
    }
}

const HAS_PROPERTIES: u8 = 0b100;
const RETAIN: u8 = 0b1000;
const HEADER_LEN: usize = 25;

/// The envelope followed by `payload`. Never empty, so the router never takes it for a
/// retained-message deletion.
pub(crate) fn wrap(envelope: &Envelope, payload: &[u8]) -> Bytes {
    let props = envelope.properties.as_ref().map(encode_properties);
    let extra = props.as_ref().map_or(0, |p| 4 + p.len());
    let mut buf = BytesMut::with_capacity(HEADER_LEN + extra + payload.len());
    let mut flags = envelope.qos & 0b11;
    if props.is_some() {
        flags |= HAS_PROPERTIES;
    }
    if envelope.retain {
        flags |= RETAIN;
    }
    buf.put_u8(flags);
    buf.put_u64(envelope.origin);
    buf.put_u64(envelope.id);
    buf.put_u64(envelope.received_at);
    if let Some(props) = props {
        buf.put_u32(props.len() as u32);
        buf.put_slice(&props);
    }
    buf.put_slice(payload);
    buf.freeze()
}

/// Splits a forwarded payload into its envelope and the original payload.
pub(crate) fn unwrap(mut data: Bytes) -> Option<(Envelope, Bytes)> {
    if data.len() < HEADER_LEN {
        return None;
    }
    let flags = data.get_u8();
    let origin = data.get_u64();
    let id = data.get_u64();
    let received_at = data.get_u64();
    let properties = if flags & HAS_PROPERTIES != 0 {
        if data.len() < 4 {
            return None;
        }
        let len = data.get_u32() as usize;
        if data.len() < len {
            return None;
        }
        decode_properties(data.split_to(len))
    } else {
        None
    };
    let envelope = Envelope {
        qos: flags & 0b11,
        retain: flags & RETAIN != 0,
        origin,
        id,
        received_at,
        properties,
    };
    Some((envelope, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::PublishProperties;

    #[test]
    fn envelope_round_trip() {
        let env = Envelope {
            qos: 2,
            retain: true,
            origin: 7,
            id: 42,
            received_at: 1_700_000_000_000_000,
            properties: None,
        };
        let (back, payload) = unwrap(wrap(&env, b"hola")).unwrap();
        assert_eq!(back, env);
        assert_eq!(&payload[..], b"hola");
    }

    #[test]
    fn envelope_keeps_properties_and_empty_payload() {
        let props = PublishProperties {
            content_type: Some("application/json".into()),
            user_properties: vec![("k".into(), "v".into())],
            message_expiry_interval: Some(30),
            ..Default::default()
        };
        let env = Envelope {
            qos: 1,
            retain: false,
            origin: 1,
            id: 2,
            received_at: 3,
            properties: Some(props),
        };
        let wrapped = wrap(&env, b"");
        assert!(!wrapped.is_empty());
        let (back, payload) = unwrap(wrapped).unwrap();
        assert_eq!(back, env);
        assert!(payload.is_empty());
    }

    #[test]
    fn short_data_is_rejected() {
        assert!(unwrap(Bytes::from_static(b"abc")).is_none());
    }
}
