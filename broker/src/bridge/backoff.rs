//! When to try the upstream again, and when to say so: exponential backoff with
//! jitter, for ever; failures logged at most once per period unless the reason changes.
//! Sans IO: the time and the randomness's seed are passed in.

use std::time::{Duration, Instant};

const FIRST: Duration = Duration::from_secs(1);
const LONGEST: Duration = Duration::from_secs(60);
/// Failures with the same reason are logged once per this period, with their count.
const LOG_PERIOD: Duration = Duration::from_secs(30);

pub(super) struct Backoff {
    next: Duration,
    /// xorshift64 state: jitter needs no cryptographic randomness.
    state: u64,
}

impl Backoff {
    pub(super) fn new(seed: u64) -> Self {
        Self {
            next: FIRST,
            state: seed | 1,
        }
    }

    /// The wait before the next attempt: between half and all of a doubling delay, so
    /// that many edges cut off together do not come back together.
    pub(super) fn delay(&mut self) -> Duration {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let fraction = 0.5 + (self.state % 1000) as f64 / 2000.0;
        let delay = self.next.mul_f64(fraction);
        self.next = (self.next * 2).min(LONGEST);
        delay
    }

    /// A connection was made: the next loss starts from the shortest delay again.
    pub(super) fn reset(&mut self) {
        self.next = FIRST;
    }
}

/// Which failures to log.
#[derive(Default)]
pub(super) struct FailureLog {
    last: Option<(Instant, String)>,
    /// Failures not logged since the last line.
    unlogged: u64,
}

impl FailureLog {
    /// Some(failures left unlogged before this one) when this failure is to be logged.
    pub(super) fn note(&mut self, reason: &str, now: Instant) -> Option<u64> {
        if let Some((at, last)) = &self.last {
            if last == reason && now.duration_since(*at) < LOG_PERIOD {
                self.unlogged += 1;
                return None;
            }
        }
        self.last = Some((now, reason.to_string()));
        Some(std::mem::take(&mut self.unlogged))
    }

    /// Connected: the next failure is logged whatever it is.
    pub(super) fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_up_to_a_minute_and_start_again_after_a_connection() {
        let mut b = Backoff::new(42);
        let delays: Vec<Duration> = (0..10).map(|_| b.delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let full = (FIRST * 2u32.pow(i as u32)).min(LONGEST);
            assert!(*d >= full / 2 && *d <= full, "attempt {i}: {d:?}");
        }
        assert!(delays[9] >= LONGEST / 2);
        b.reset();
        assert!(b.delay() <= FIRST);
        // Two edges seeded differently do not wait the same.
        let (mut x, mut y) = (Backoff::new(1), Backoff::new(2));
        assert!((0..5).any(|_| x.delay() != y.delay()));
    }

    #[test]
    fn repeated_failures_are_summarised_and_a_new_reason_is_told_at_once() {
        let mut log = FailureLog::default();
        let t = Instant::now();
        assert_eq!(log.note("refused", t), Some(0));
        assert_eq!(log.note("refused", t + Duration::from_secs(2)), None);
        assert_eq!(log.note("refused", t + Duration::from_secs(5)), None);
        assert_eq!(log.note("timeout", t + Duration::from_secs(6)), Some(2));
        assert_eq!(log.note("timeout", t + Duration::from_secs(40)), Some(0));
        log.reset();
        assert_eq!(log.note("timeout", t + Duration::from_secs(41)), Some(0));
    }
}
