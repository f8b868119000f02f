//! A connection's read budget (`session.max_packets_per_sec`, `max_bytes_per_sec`):
//! token buckets holding a second's worth, spent by each packet read and refilled
//! with time. Over budget, the session reads nothing until the deficit is paid back:
//! the client is slowed by TCP's own flow control, nothing it sent is dropped. No
//! socket and no clock here: the session passes the time in.

use std::time::Duration;
use tokio::time::Instant;

/// The read budget of one connection.
#[derive(Debug)]
pub(super) struct Throttle {
    packets: Option<Bucket>,
    bytes: Option<Bucket>,
    /// Bytes the connection had read when it was last charged.
    charged_bytes: u64,
    /// It was slowed down at least once (logged once per connection).
    pub(super) slowed: bool,
}

#[derive(Debug)]
struct Bucket {
    /// Tokens per second, and at most this many held.
    rate: f64,
    /// Negative: the deficit to pay back before reading again.
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Option<Self> {
        (rate > 0).then_some(Self {
            rate: rate as f64,
            tokens: rate as f64,
            at: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + secs * self.rate).min(self.rate);
        self.at = now;
    }

    fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

impl Throttle {
    /// None when neither limit is set (0).
    pub(super) fn new(packets_per_sec: u64, bytes_per_sec: u64, now: Instant) -> Option<Self> {
        let packets = Bucket::new(packets_per_sec, now);
        let bytes = Bucket::new(bytes_per_sec, now);
        (packets.is_some() || bytes.is_some()).then_some(Self {
            packets,
            bytes,
            charged_bytes: 0,
            slowed: false,
        })
    }

    /// A packet was read; `read_total` is every byte the connection has read so far.
    pub(super) fn charge(&mut self, read_total: u64, now: Instant) {
        let bytes = read_total.saturating_sub(self.charged_bytes);
        self.charged_bytes = read_total;
        for (bucket, spent) in [(&mut self.packets, 1), (&mut self.bytes, bytes)] {
            if let Some(b) = bucket {
                b.refill(now);
                b.tokens -= spent as f64;
            }
        }
    }

    /// How long to wait before reading again, if the budget is spent.
    pub(super) fn delay(&mut self, now: Instant) -> Option<Duration> {
        let waits = [&mut self.packets, &mut self.bytes]
            .into_iter()
            .flatten()
            .filter_map(|b| b.wait(now));
        waits.max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_limit_is_no_throttle() {
        assert!(Throttle::new(0, 0, Instant::now()).is_none());
    }

    #[test]
    fn a_seconds_worth_then_the_rate() {
        let start = Instant::now();
        let mut t = Throttle::new(10, 0, start).unwrap();
        for _ in 0..10 {
            assert_eq!(t.delay(start), None);
            t.charge(0, start);
        }
        assert_eq!(t.delay(start), None, "exactly the budget");
        t.charge(0, start);
        let wait = t.delay(start).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // Paid back with time; never more than a second's worth held.
        assert_eq!(t.delay(start + Duration::from_millis(100)), None);
        let later = start + Duration::from_secs(60);
        for _ in 0..10 {
            t.charge(0, later);
        }
        assert!(t.delay(later).is_none());
        t.charge(0, later);
        assert!(t.delay(later).is_some());
    }

    #[test]
    fn bytes_are_charged_by_what_was_read_since_the_last_packet() {
        let start = Instant::now();
        let mut t = Throttle::new(0, 1000, start).unwrap();
        t.charge(600, start);
        assert_eq!(t.delay(start), None);
        t.charge(1500, start);
        let wait = t.delay(start).unwrap();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
    }
}
