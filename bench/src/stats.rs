//! Latency percentiles and loss counting by per-publisher sequence numbers.

use std::time::Instant;

/// Latency samples in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    samples: Vec<u32>,
}

/// Percentiles of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latencies {
    pub fn record_us(&mut self, us: u64) {
        self.samples.push(u32::try_from(us).unwrap_or(u32::MAX));
    }

    pub fn merge(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
    }

    /// p50, p99, p99.9 and max (nearest rank); `None` without samples.
    pub fn summary(&mut self) -> Option<Summary> {
        self.samples.sort_unstable();
        let ms = |p| percentile(&self.samples, p).map(|us| f64::from(us) / 1000.0);
        Some(Summary {
            count: self.samples.len(),
            p50_ms: ms(50.0)?,
            p99_ms: ms(99.0)?,
            p999_ms: ms(99.9)?,
            max_ms: ms(100.0)?,
        })
    }
}

/// The nearest-rank percentile `p` (0 < p <= 100) of sorted samples.
pub fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    // A small epsilon keeps 99.9% of 1000 at rank 999 despite binary fractions.
    let rank = ((p / 100.0) * n as f64 - 1e-9).ceil().max(1.0) as usize;
    Some(sorted[rank.min(n) - 1])
}

/// Which sequence numbers of one publisher a subscriber has seen.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    bits: Vec<u64>,
    distinct: u64,
    duplicates: u64,
    reordered: u64,
    highest: Option<u64>,
}

impl SeqTracker {
    /// Records `seq`; false when it had been seen already (a duplicate).
    pub fn record(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return false;
        }
        self.bits[word] |= 1 << bit;
        self.distinct += 1;
        match self.highest {
            Some(h) if seq < h => self.reordered += 1,
            _ => self.highest = Some(seq),
        }
        true
    }

    pub fn distinct(&self) -> u64 {
        self.distinct
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Messages that arrived after a higher sequence number.
    pub fn reordered(&self) -> u64 {
        self.reordered
    }

    /// Sequence numbers in `0..sent` never seen.
    pub fn lost(&self, sent: u64) -> u64 {
        sent - self.seen_below(sent)
    }

    fn seen_below(&self, sent: u64) -> u64 {
        let full = (sent / 64) as usize;
        let mut seen: u64 = self
            .bits
            .iter()
            .take(full)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let rest = sent % 64;
        if rest > 0 {
            if let Some(w) = self.bits.get(full) {
                seen += u64::from((w & ((1u64 << rest) - 1)).count_ones());
            }
        }
        seen
    }

    /// Whether `seq` has been recorded.
    pub fn seen(&self, seq: u64) -> bool {
        self.bits
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    /// The first `limit` sequence numbers in `0..sent` never seen.
    pub fn missing(&self, sent: u64, limit: usize) -> Vec<u64> {
        (0..sent)
            .filter(|seq| !self.seen(*seq))
            .take(limit)
            .collect()
    }

    /// Runs of consecutive missing sequence numbers in `0..sent`.
    pub fn gaps(&self, sent: u64) -> u64 {
        let mut gaps = 0;
        let mut in_gap = false;
        for seq in 0..sent {
            let seen = self.seen(seq);
            if !seen && !in_gap {
                gaps += 1;
            }
            in_gap = !seen;
        }
        gaps
    }
}

/// Nanoseconds since the first call in this process: the clock of the send timestamps.
pub fn now_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The median of `values` (mean of the two middle ones for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if !v.len().is_multiple_of(2) {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let sorted: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&sorted, 50.0), Some(500));
        assert_eq!(percentile(&sorted, 99.0), Some(990));
        assert_eq!(percentile(&sorted, 99.9), Some(999));
        assert_eq!(percentile(&sorted, 100.0), Some(1000));
        assert_eq!(percentile(&[7], 99.9), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_sorts_and_converts_to_ms() {
        let mut l = Latencies::default();
        for us in (1..=100).rev() {
            l.record_us(us * 1000);
        }
        let s = l.summary().unwrap();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.p999_ms, 100.0);
        assert_eq!(s.max_ms, 100.0);
        assert!(Latencies::default().summary().is_none());
    }

    #[test]
    fn counts_losses_gaps_duplicates_and_reordering() {
        let mut t = SeqTracker::default();
        for seq in [0, 1, 2, 5, 6, 4, 9, 70, 130] {
            assert!(t.record(seq));
        }
        assert!(!t.record(5));
        assert_eq!(t.distinct(), 9);
        assert_eq!(t.duplicates(), 1);
        // 4 arrived after 6.
        assert_eq!(t.reordered(), 1);
        // Sent 0..=130 (131 messages): 9 seen, the rest lost.
        assert_eq!(t.lost(131), 131 - 9);
        // Missing runs in 0..10: {3}, {7, 8}.
        assert_eq!(t.gaps(10), 2);
        assert_eq!(t.missing(10, 2), vec![3, 7]);
        assert_eq!(t.lost(10), 3);
        // A tail that never arrived is lost too, and a publisher never heard from loses all.
        assert_eq!(t.lost(3), 0);
        assert_eq!(SeqTracker::default().lost(42), 42);
        assert_eq!(SeqTracker::default().gaps(42), 1);
    }

    #[test]
    fn lost_counts_across_word_boundaries() {
        let mut t = SeqTracker::default();
        for seq in 0..200 {
            if seq != 63 && seq != 64 && seq != 128 {
                t.record(seq);
            }
        }
        assert_eq!(t.lost(200), 3);
        assert_eq!(t.lost(64), 1);
        assert_eq!(t.lost(65), 2);
        assert_eq!(t.gaps(200), 2);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN]), None);
        assert_eq!(median(&[]), None);
    }
}
