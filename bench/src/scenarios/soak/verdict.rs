//! The soak's judgements, kept apart from the clients so they can be tested: which
//! acknowledged messages never reached a persistent subscriber, which wills misbehaved,
//! and whether the broker's RSS and descriptors stayed flat after the warm-up.

use super::ctx::Inbox;
use crate::stats::median;

/// The first few `(publisher, seq)` of `acked` that `inbox` never received.
pub fn missing(inbox: &Inbox, publisher: u32, acked: &[u64], limit: usize) -> (u64, Vec<u64>) {
    let tracker = inbox.per_publisher.get(&publisher);
    let mut count = 0;
    let mut samples = Vec::new();
    for seq in acked {
        if !tracker.is_some_and(|t| t.seen(*seq)) {
            count += 1;
            if samples.len() < limit {
                samples.push(*seq);
            }
        }
    }
    (count, samples)
}

/// How many of `cycles` (a will client's) arrived in `inbox`.
pub fn wills_seen(inbox: &Inbox, publisher: u32, cycles: &[u64]) -> u64 {
    let tracker = inbox.per_publisher.get(&publisher);
    cycles
        .iter()
        .filter(|c| tracker.is_some_and(|t| t.seen(**c)))
        .count() as u64
}

/// One sample of the broker process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the load started.
    pub at: f64,
    pub rss_kib: u64,
    pub fds: u64,
    /// Connections the soak's clients held at that moment.
    pub live: i64,
}

/// Medians of the samples taken in `from..=to` seconds; `None` without any.
pub fn level(samples: &[Sample], from: f64, to: f64) -> Option<Level> {
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= from && s.at <= to)
        .collect();
    let med = |f: &dyn Fn(&Sample) -> f64| {
        let v: Vec<f64> = inside.iter().map(|s| f(s)).collect();
        median(&v)
    };
    Some(Level {
        rss_kib: med(&|s| s.rss_kib as f64)?,
        fds: med(&|s| s.fds as f64)?,
        live: med(&|s| s.live as f64)?,
        samples: inside.len(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Level {
    pub rss_kib: f64,
    pub fds: f64,
    pub live: f64,
    pub samples: usize,
}

/// Where the reference and the end levels are taken, in seconds since the load started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Windows {
    pub reference: (f64, f64),
    pub end: (f64, f64),
}

/// The reference window starts a warm-up (10% of the run, at least 20 s) after the
/// restarted broker accepted its first CONNECT (after the start without a kill): the
/// restart resets the process, and the persistent subscribers' queues, sled's cache and
/// the allocator need that long to reach their steady level. Both windows last 5% of
/// the run (at least 15 s, three samples at the default 5 s) and the level is the median
/// of their samples, so that one sample taken while a dozen clients happen to be
/// reconnecting does not decide.
pub fn windows(total_secs: f64, restarted_at: Option<f64>) -> Windows {
    let warm = (total_secs * 0.10).max(20.0);
    let span = (total_secs * 0.05).max(15.0);
    let from = restarted_at.unwrap_or(0.0) + warm;
    Windows {
        reference: (from, from + span),
        end: (total_secs - span, total_secs),
    }
}

/// Growth from `reference` to `end`, as a fraction (0.05 = 5% more); a decrease is negative.
pub fn growth(reference: f64, end: f64) -> f64 {
    if reference > 0.0 {
        end / reference - 1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbox(publisher: u32, seqs: &[u64]) -> Inbox {
        let mut i = Inbox::default();
        for s in seqs {
            i.per_publisher.entry(publisher).or_default().record(*s);
        }
        i
    }

    #[test]
    fn missing_counts_acknowledged_messages_not_received() {
        let i = inbox(3, &[0, 1, 2, 4]);
        assert_eq!(missing(&i, 3, &[0, 1, 2, 3, 4, 5], 1), (2, vec![3]));
        assert_eq!(missing(&i, 3, &[], 8), (0, vec![]));
        assert_eq!(missing(&i, 9, &[7, 8], 8), (2, vec![7, 8]));
        assert_eq!(wills_seen(&i, 3, &[1, 3, 4]), 2);
        assert_eq!(wills_seen(&i, 4, &[1]), 0);
    }

    #[test]
    fn windows_follow_the_restart() {
        let w = windows(1800.0, Some(900.5));
        assert_eq!(w.reference, (1080.5, 1170.5));
        assert_eq!(w.end, (1710.0, 1800.0));
        let short = windows(120.0, None);
        assert_eq!(short.reference, (20.0, 35.0));
        assert_eq!(short.end, (105.0, 120.0));
    }

    #[test]
    fn level_is_the_median_inside_the_window() {
        let s = |at: f64, rss: u64, fds: u64| Sample {
            at,
            rss_kib: rss,
            fds,
            live: 10,
        };
        let samples = [
            s(0.0, 1, 1),
            s(5.0, 100, 50),
            s(10.0, 300, 52),
            s(15.0, 110, 51),
        ];
        let l = level(&samples, 5.0, 15.0).unwrap();
        assert_eq!((l.rss_kib, l.fds, l.samples), (110.0, 51.0, 3));
        assert!(level(&samples, 20.0, 30.0).is_none());
        assert!((growth(100.0, 111.0) - 0.11).abs() < 1e-9);
        assert!(growth(100.0, 90.0) < 0.0);
    }
}
