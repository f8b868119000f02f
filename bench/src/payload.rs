//! The benchmark payload: publisher id, sequence number and send timestamp, padded.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes the header takes: publisher id (u32), sequence (u64), send time in ns (u64).
pub const HEADER: usize = 4 + 8 + 8;

/// What a subscriber reads back from a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub publisher: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

/// A payload of `len` bytes (at least [`HEADER`]) carrying `stamp`.
pub fn encode(stamp: Stamp, len: usize, buf: &mut BytesMut) -> Bytes {
    let len = len.max(HEADER);
    buf.reserve(len);
    buf.put_u32_le(stamp.publisher);
    buf.put_u64_le(stamp.seq);
    buf.put_u64_le(stamp.sent_ns);
    buf.put_bytes(b'x', len - HEADER);
    buf.split().freeze()
}

/// The stamp of a benchmark payload; `None` for anything shorter than the header.
pub fn decode(mut payload: &[u8]) -> Option<Stamp> {
    if payload.len() < HEADER {
        return None;
    }
    Some(Stamp {
        publisher: payload.get_u32_le(),
        seq: payload.get_u64_le(),
        sent_ns: payload.get_u64_le(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let stamp = Stamp {
            publisher: 3,
            seq: 1 << 40,
            sent_ns: 123_456_789,
        };
        let mut buf = BytesMut::new();
        let p = encode(stamp, 300, &mut buf);
        assert_eq!(p.len(), 300);
        assert_eq!(decode(&p), Some(stamp));
        assert_eq!(encode(stamp, 1, &mut buf).len(), HEADER);
        assert_eq!(decode(&p[..HEADER - 1]), None);
    }
}
