//! What the MQTT codec costs the benchmark: timed encode and decode loops of the PUBLISH
//! packets the scenarios send, to show the load generator is not limited by encoding.

use crate::payload::{self, Stamp};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Packet, Publish};
use rumqttc::mqttbytes::QoS;
use std::hint::black_box;
use std::time::Instant;

/// Nanoseconds per packet.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    /// Payload stamp + PUBLISH encoding, as the publishers do it.
    pub encode_ns: f64,
    /// PUBLISH decoding + stamp reading, as the subscribers do it.
    pub decode_ns: f64,
}

/// Times `iterations` encodes and decodes of a QoS 1 PUBLISH with a `payload`-byte payload.
pub fn measure(payload_len: usize, iterations: u32) -> Cost {
    let iterations = iterations.max(1);
    let mut pbuf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::with_capacity(64 * 1024);
    let started = Instant::now();
    for i in 0..iterations {
        let stamp = Stamp {
            publisher: 1,
            seq: u64::from(i),
            sent_ns: u64::from(i),
        };
        let mut p = Publish::from_bytes(
            "articulos/p1/futbol",
            QoS::AtLeastOnce,
            payload::encode(stamp, payload_len, &mut pbuf),
        );
        p.pkid = 1 + (i % 60_000) as u16;
        let _ = black_box(p.write(&mut out));
        if out.len() > 32 * 1024 {
            out.clear();
        }
    }
    let encode_ns = started.elapsed().as_nanos() as f64 / f64::from(iterations);

    // A buffer of many encoded packets, decoded the way the subscribers do.
    let mut one = BytesMut::new();
    let mut p = Publish::from_bytes(
        "articulos/p1/futbol",
        QoS::AtLeastOnce,
        payload::encode(
            Stamp {
                publisher: 1,
                seq: 1,
                sent_ns: 1,
            },
            payload_len,
            &mut pbuf,
        ),
    );
    p.pkid = 7;
    let _ = p.write(&mut one);
    let per_batch = 256u32;
    let mut batch = BytesMut::with_capacity(one.len() * per_batch as usize);
    let mut decoded = 0u64;
    let started = Instant::now();
    let batches = iterations.div_ceil(per_batch);
    for _ in 0..batches {
        for _ in 0..per_batch {
            batch.extend_from_slice(&one);
        }
        while let Ok(Packet::Publish(p)) = Packet::read(&mut batch, 1 << 20) {
            black_box(payload::decode(&p.payload));
            decoded += 1;
        }
    }
    let decode_ns = started.elapsed().as_nanos() as f64 / decoded.max(1) as f64;
    Cost {
        encode_ns,
        decode_ns,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_positive_costs() {
        let c = super::measure(300, 1000);
        assert!(c.encode_ns > 0.0 && c.decode_ns > 0.0, "{c:?}");
    }
}
