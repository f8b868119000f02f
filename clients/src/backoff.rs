//! Capped exponential backoff between (re)connection attempts.
//!
//! rumqttc reconnects as soon as `EventLoop::poll` is called again, with no delay; the
//! publisher and subscriber wait for [`Backoff::next_delay`] between attempts instead.

use std::time::Duration;

/// Shortest delay ever used, so a zero `initial` cannot turn into a busy loop.
const MIN_DELAY: Duration = Duration::from_millis(1);

/// Parameters of the backoff: the first delay and the cap it doubles up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    /// 100 ms doubling up to 5 s.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// Stateful delay sequence: `initial, 2*initial, 4*initial, ...` capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Self {
        let policy = BackoffPolicy {
            initial: policy.initial.max(MIN_DELAY),
            max: policy.max.max(MIN_DELAY),
        };
        Self {
            next: policy.initial.min(policy.max),
            policy,
        }
    }

    /// Returns the delay to wait now and advances the sequence.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = delay.saturating_mul(2).min(self.policy.max);
        delay
    }

    /// Back to the initial delay (call after a successful connection).
    pub fn reset(&mut self) {
        self.next = self.policy.initial.min(self.policy.max);
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BackoffPolicy::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn default_sequence_doubles_and_caps_at_five_seconds() {
        let mut b = Backoff::default();
        let seq: Vec<_> = (0..9).map(|_| b.next_delay()).collect();
        assert_eq!(
            seq,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000].map(ms)
        );
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::default();
        for _ in 0..5 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
        assert_eq!(b.next_delay(), ms(200));
    }

    #[test]
    fn initial_above_cap_is_capped_and_zero_is_not_a_busy_loop() {
        let mut b = Backoff::new(BackoffPolicy {
            initial: ms(10_000),
            max: ms(300),
        });
        assert_eq!(b.next_delay(), ms(300));
        assert_eq!(b.next_delay(), ms(300));

        let mut z = Backoff::new(BackoffPolicy {
            initial: Duration::ZERO,
            max: ms(4),
        });
        assert_eq!(
            [
                z.next_delay(),
                z.next_delay(),
                z.next_delay(),
                z.next_delay()
            ],
            [1, 2, 4, 4].map(ms)
        );
    }

    #[test]
    fn huge_cap_does_not_overflow() {
        let mut b = Backoff::new(BackoffPolicy {
            initial: Duration::from_secs(u64::MAX / 2 + 1),
            max: Duration::MAX,
        });
        b.next_delay();
        assert_eq!(b.next_delay(), Duration::MAX);
        assert_eq!(b.next_delay(), Duration::MAX);
    }
}
