//! MQTT 5 PUBLISH properties as bytes, for what carries them outside a packet: the
//! store's records and the envelope through rumqttd's router.

use crate::message::PublishProperties;
use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::{v5, QoS};

// Carried as an encoded, empty MQTT 5 PUBLISH: the codec we already trust, rather than
// a second serialisation of the same fields.
pub(crate) fn encode_properties(props: &PublishProperties) -> Bytes {
    let publish = v5::Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: Bytes::from_static(b"-"),
        pkid: 0,
        payload: Bytes::new(),
        properties: Some(props.clone()),
    };
    let mut buf = BytesMut::new();
    match publish.write(&mut buf) {
        Ok(_) => buf.freeze(),
        Err(_) => Bytes::new(),
    }
}

/// None when `data` is not what `encode_properties` writes.
pub(crate) fn decode_properties(data: Bytes) -> Option<PublishProperties> {
    let mut buf = BytesMut::from(&data[..]);
    match v5::Packet::read(&mut buf, None) {
        Ok(v5::Packet::Publish(p)) => p.properties,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip_and_garbage_is_refused() {
        let props = PublishProperties {
            content_type: Some("application/json".into()),
            message_expiry_interval: Some(30),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        assert_eq!(decode_properties(encode_properties(&props)), Some(props));
        assert_eq!(decode_properties(Bytes::from_static(b"\xff\x01")), None);
    }
}
