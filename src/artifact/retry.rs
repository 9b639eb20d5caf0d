//! Jittered exponential backoff inside one overall deadline.

use std::time::{Duration, Instant};

/// The retry budget of one request.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    max_attempts: u32,
    base: Duration,
    cap: Duration,
    deadline: Instant,
}

impl Backoff {
    /// A budget of `max_attempts` per request, all within `deadline`.
    pub fn new(max_attempts: u32, deadline: Instant) -> Self {
        Backoff {
            attempt: 0,
            max_attempts,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
            deadline,
        }
    }

    /// Shorter delays, for tests of the retry paths.
    pub fn with_base(mut self, base: Duration, cap: Duration) -> Self {
        self.base = base;
        self.cap = cap;
        self
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next attempt, or `None` when the attempts or the
    /// deadline are spent. Full jitter: uniform in `[0, min(cap, base·2^n)]`,
    /// so that many parts failing together do not retry together.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.attempt += 1;
        if self.attempt >= self.max_attempts {
            return None;
        }
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        let delay = ceiling.mul_f64(fastrand::f64());
        if Instant::now() + delay >= self.deadline {
            return None;
        }
        Some(delay)
    }

    /// A new budget for the next request of the same deadline, after progress.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_within_the_cap_and_stop_at_max_attempts() {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut b =
            Backoff::new(6, far).with_base(Duration::from_millis(100), Duration::from_secs(1));
        let mut n = 0;
        while let Some(d) = b.next_delay() {
            assert!(d <= Duration::from_secs(1), "{d:?}");
            assert!(d <= Duration::from_millis(100) * (1 << (n + 1)), "{d:?}");
            n += 1;
        }
        assert_eq!(n, 5, "six attempts: the first plus five retries");
        b.reset();
        assert!(b.next_delay().is_some());
    }

    #[test]
    fn the_deadline_ends_retries() {
        let mut b = Backoff::new(100, Instant::now() + Duration::from_millis(1))
            .with_base(Duration::from_secs(5), Duration::from_secs(10));
        // Any delay drawn above 1 ms crosses the deadline; 5 draws below are
        // vanishingly unlikely.
        let stopped = (0..5).any(|_| b.next_delay().is_none());
        assert!(stopped);
    }
}
