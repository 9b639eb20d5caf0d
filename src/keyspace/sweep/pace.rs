//! How fast a sweep deletes: at most a fixed number of keys per second, and,
//! when paced by latency, only as fast as live traffic allows.
//!
//! A fixed rate cannot be right for every Redis: the same 100k keys/s is
//! harmless on an idle node and doubles the tail latency of a busy one. So a
//! latency-paced sweep measures what it does to others. Before the sweep it
//! times a probe (a `PING`, best on a connection of its own) to learn how
//! fast Redis answers under today's traffic. During the sweep the probe goes
//! on at its own cadence, one every [`PROBE_SPACING`], out of step with the
//! batches: it lands in a batch as often as a reader's command would, so its
//! round trips grow with how busy the sweep keeps Redis. They are judged per
//! window of [`WINDOW`] probes. A window slower than the baseline by more
//! than the headroom halves the rate; a window within it raises the rate by
//! a quarter, up to the ceiling: quick to back off, quick to find the rate
//! that the traffic leaves room for. The probe costs Redis about a thousand
//! PINGs a second.

use std::time::Duration;

/// Pacing of a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Keys deleted per second at most: the rate of a fixed pace, the ceiling
    /// of a latency-paced one.
    pub keys_per_second: u64,
    /// SCAN COUNT, and the most keys per UNLINK.
    pub batch: u64,
    /// Latency pacing: how much slower (in percent) than before the sweep a
    /// probe's round trip may get. `None` is a fixed pace.
    pub headroom_percent: Option<u32>,
}

impl Pace {
    /// At most `keys_per_second`, whatever the latency.
    pub fn fixed(keys_per_second: u64, batch: u64) -> Pace {
        Pace {
            keys_per_second,
            batch,
            headroom_percent: None,
        }
    }
}

impl Default for Pace {
    /// Paced by latency: probes at most 25% slower than before the sweep,
    /// under a ceiling of a million keys per second.
    fn default() -> Self {
        Pace {
            keys_per_second: 1_000_000,
            batch: 100,
            headroom_percent: Some(25),
        }
    }
}

/// Probes per judgement.
pub const WINDOW: usize = 16;
/// Probes timed before the sweep.
pub const BASELINE_PROBES: usize = 64;
/// The pause before each probe, so that probes sample the traffic at
/// different moments instead of in one burst. Tokio's timer makes it a
/// millisecond at least.
pub const PROBE_SPACING: Duration = Duration::from_millis(1);
/// The slowest a latency-paced sweep goes, so that it always ends: about
/// 17 minutes for a million keys.
pub const FLOOR_KEYS_PER_SECOND: f64 = 1000.0;

/// The statistic judged, of a baseline and of each window: the mean without
/// the slowest eighth, so that one scheduling hiccup on a busy host does not
/// halve the rate, while a batch that delays many probes still shows.
pub fn typical(probes: &[Duration]) -> Duration {
    let mut sorted = probes.to_vec();
    sorted.sort_unstable();
    let kept = &sorted[..sorted.len() - sorted.len() / 8];
    if kept.is_empty() {
        return Duration::ZERO;
    }
    kept.iter().sum::<Duration>() / kept.len() as u32
}

/// The current rate of a sweep, and what its probes said.
#[derive(Debug, Clone)]
pub struct Pacer {
    ceiling: f64,
    rate: f64,
    /// The window statistic may go up to this; `None`: a fixed pace.
    limit: Option<Duration>,
    window: Vec<Duration>,
    /// Windows over the limit.
    pub slowdowns: u64,
    /// The baseline statistic.
    pub baseline: Option<Duration>,
}

impl Pacer {
    /// A fixed pace of `keys_per_second`.
    pub fn fixed(keys_per_second: u64) -> Pacer {
        let rate = keys_per_second.max(1) as f64;
        Pacer {
            ceiling: rate,
            rate,
            limit: None,
            window: Vec::new(),
            slowdowns: 0,
            baseline: None,
        }
    }

    /// A latency pace judged against `baseline` probes: it starts at a tenth
    /// of the ceiling (at least the floor) and finds its rate from there.
    pub fn latency(ceiling: u64, baseline: &[Duration], headroom_percent: u32) -> Pacer {
        let ceiling = (ceiling.max(1) as f64).max(FLOOR_KEYS_PER_SECOND);
        let base = typical(baseline);
        let limit = base.mul_f64(1.0 + f64::from(headroom_percent) / 100.0);
        Pacer {
            ceiling,
            rate: (ceiling / 10.0).max(FLOOR_KEYS_PER_SECOND),
            limit: Some(limit),
            window: Vec::with_capacity(WINDOW),
            slowdowns: 0,
            baseline: Some(base),
        }
    }

    /// Keys per second now.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Counts one probe's round trip; every [`WINDOW`] probes, the rate moves.
    pub fn observe(&mut self, probe: Duration) {
        let Some(limit) = self.limit else {
            return;
        };
        self.window.push(probe);
        if self.window.len() < WINDOW {
            return;
        }
        if typical(&self.window) > limit {
            self.slowdowns += 1;
            self.rate = (self.rate / 2.0).max(FLOOR_KEYS_PER_SECOND);
        } else {
            self.rate = (self.rate * 1.25).min(self.ceiling);
        }
        self.window.clear();
    }
}

/// When the next batch is due. Tokio's timer ticks in milliseconds, far
/// longer than a batch takes, so the sweep keeps a due time that each batch
/// moves on by its keys at the current rate, and sleeps only when it is
/// ahead. After a stall it may catch up by at most [`Schedule::SLACK`], never
/// in one burst of everything it fell behind.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    due: Duration,
}

impl Schedule {
    /// The most time a sweep may catch up after it fell behind.
    pub const SLACK: Duration = Duration::from_millis(10);

    /// A schedule due now.
    pub fn start() -> Schedule {
        Schedule {
            due: Duration::ZERO,
        }
    }

    /// Moves on by `work` units at `rate` per second; returns how long to
    /// sleep, `elapsed` being the time since the sweep started.
    pub fn next(&mut self, work: u64, rate: f64, elapsed: Duration) -> Duration {
        self.due += Duration::from_secs_f64(work as f64 / rate.max(1.0));
        if elapsed > self.due + Self::SLACK {
            self.due = elapsed - Self::SLACK;
        }
        self.due.saturating_sub(elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn the_typical_probe_ignores_the_slowest_eighth() {
        let mut probes = vec![us(100); 7];
        probes.push(us(50_000));
        assert_eq!(typical(&probes), us(100));
        // Two slow probes in eight are not a hiccup.
        probes[0] = us(50_000);
        assert!(typical(&probes) > us(7_000));
        assert_eq!(typical(&[]), Duration::ZERO);
    }

    #[test]
    fn a_latency_pace_backs_off_when_probes_slow_down_and_recovers() {
        let mut pacer = Pacer::latency(1_000_000, &[us(100); BASELINE_PROBES], 25);
        assert_eq!(pacer.rate(), 100_000.0);
        // Within the headroom: up by a quarter per window, to the ceiling.
        for _ in 0..WINDOW {
            pacer.observe(us(120));
        }
        assert_eq!(pacer.rate(), 125_000.0);
        for _ in 0..WINDOW * 20 {
            pacer.observe(us(110));
        }
        assert_eq!(pacer.rate(), 1_000_000.0);
        // Over the limit (125 µs): halved per window, down to the floor.
        for _ in 0..WINDOW {
            pacer.observe(us(130));
        }
        assert_eq!(pacer.rate(), 500_000.0);
        assert_eq!(pacer.slowdowns, 1);
        for _ in 0..WINDOW * 20 {
            pacer.observe(us(10_000));
        }
        assert_eq!(pacer.rate(), FLOOR_KEYS_PER_SECOND);
        // A part window does not count.
        for _ in 0..WINDOW - 1 {
            pacer.observe(us(100));
        }
        assert_eq!(pacer.rate(), FLOOR_KEYS_PER_SECOND);
    }

    #[test]
    fn a_fixed_pace_ignores_probes() {
        let mut pacer = Pacer::fixed(100_000);
        for _ in 0..WINDOW * 4 {
            pacer.observe(Duration::from_secs(1));
        }
        assert_eq!(pacer.rate(), 100_000.0);
        assert_eq!(pacer.slowdowns, 0);
        assert_eq!(pacer.baseline, None);
    }

    #[test]
    fn the_schedule_sleeps_when_ahead_and_catches_up_by_the_slack_only() {
        let mut s = Schedule::start();
        // 100 keys at 100k/s are due after 1 ms; 0.2 ms went by.
        assert_eq!(s.next(100, 100_000.0, us(200)), us(800));
        // Many small batches add up to a sleep, though each is under a tick.
        let mut s = Schedule::start();
        let mut slept = Duration::ZERO;
        for i in 1..=10u64 {
            slept = s.next(10, 100_000.0, us(10 * i));
        }
        assert_eq!(slept, us(900));
        // A stall of a second: only the slack is caught up.
        let mut s = Schedule::start();
        assert_eq!(
            s.next(100, 100_000.0, Duration::from_secs(1)),
            Duration::ZERO
        );
        let after = Duration::from_secs(1) + us(100);
        let mut caught_up = 0;
        let mut elapsed = after;
        while s.next(100, 100_000.0, elapsed).is_zero() {
            caught_up += 100;
            elapsed += us(1);
        }
        // About SLACK × rate keys (1,000) before it sleeps again.
        assert!((900..=1100).contains(&caught_up), "{caught_up}");
    }
}
