//! How many requests a download keeps in flight: a fixed number, or found
//! while it runs.
//!
//! The right number depends on what is between the pod and the bytes. A CDN
//! or S3 caps each connection, so more connections add throughput until the
//! pod's link is full; a server that pays for every range (moto copies the
//! whole object first) or a full link gains nothing and loses CPU. So the
//! adaptive mode climbs: it measures aggregate throughput at one level,
//! doubles the level while that is saturated (every slot holds a request),
//! keeps the new level only when throughput grew by a tenth, and otherwise
//! goes back and holds there a while (longer after each step that gained
//! nothing) before it tries again.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Where the adaptive mode starts: the fixed default it replaced, so that
/// no store is slower for it; a store that pays for every range (moto) is
/// slow to start each, and a climb from lower spends seconds there.
pub const ADAPTIVE_START: usize = 16;
/// The adaptive mode's default ceiling.
pub const ADAPTIVE_MAX: usize = 64;

/// Requests in flight at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// Always this many.
    Fixed(usize),
    /// Found by measuring, between `start` and `max`.
    Adaptive {
        /// The first level.
        start: usize,
        /// The highest level tried.
        max: usize,
    },
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency::Adaptive {
            start: ADAPTIVE_START,
            max: ADAPTIVE_MAX,
        }
    }
}

impl Concurrency {
    /// The most requests it ever has in flight.
    pub fn max(&self) -> usize {
        match *self {
            Concurrency::Fixed(n) => n.max(1),
            Concurrency::Adaptive { start, max } => max.max(start).max(1),
        }
    }

    /// The same mode with its ceiling at `max` (a fixed level is kept).
    pub fn with_max(self, max: usize) -> Concurrency {
        match self {
            Concurrency::Fixed(n) => Concurrency::Fixed(n),
            Concurrency::Adaptive { start, .. } => Concurrency::Adaptive {
                start: start.min(max).max(1),
                max: max.max(1),
            },
        }
    }
}

/// Why a concurrency did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected `auto` or a number of requests from 1 to 256, got {0:?}")]
pub struct ConcurrencyError(String);

impl FromStr for Concurrency {
    type Err = ConcurrencyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Concurrency::default());
        }
        match s.parse::<usize>() {
            Ok(n @ 1..=256) => Ok(Concurrency::Fixed(n)),
            _ => Err(ConcurrencyError(s.into())),
        }
    }
}

impl std::fmt::Display for Concurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Concurrency::Fixed(n) => write!(f, "{n}"),
            Concurrency::Adaptive { .. } => f.write_str("auto"),
        }
    }
}

/// Throughput must grow by this much for a higher level to be kept.
const GAIN: f64 = 1.1;
/// How long a level is held after a step up that gained nothing; doubled
/// after each such step in a row (a store that pays for every range should
/// not pay for a probe every few seconds), up to `MAX_HOLD`.
const HOLD: Duration = Duration::from_secs(5);
const MAX_HOLD: Duration = Duration::from_secs(60);
/// How long a level is measured, at least.
const WINDOW: Duration = Duration::from_millis(500);

/// The slots of one download: how many requests may be in flight now, and
/// how many are.
pub struct Slots {
    limit: AtomicUsize,
    active: AtomicUsize,
}

impl Slots {
    /// `limit` slots.
    pub fn new(limit: usize) -> Slots {
        Slots {
            limit: AtomicUsize::new(limit.max(1)),
            active: AtomicUsize::new(0),
        }
    }

    /// Take a slot, if one is free.
    pub fn acquire(&self) -> bool {
        let limit = self.limit.load(Ordering::Acquire);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                (a < limit).then_some(a + 1)
            })
            .is_ok()
    }

    /// Give a slot back.
    pub fn release(&self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    fn set_limit(&self, limit: usize) {
        self.limit.store(limit.max(1), Ordering::Release);
    }

    fn saturated(&self) -> bool {
        self.active.load(Ordering::Acquire) >= self.limit()
    }
}

enum Phase {
    /// Measuring the current level.
    Baseline,
    /// Measuring a step up from `from`, which made `from_rate` bytes/s.
    Probe { from: usize, from_rate: f64 },
    /// Back at a level after a step that gained nothing.
    Hold { until: Instant },
}

/// The climb of the adaptive mode, fed by samples of the bytes received.
/// Pure: the engine's task calls [`Climb::sample`] on a timer.
pub struct Climb {
    max: usize,
    level: usize,
    phase: Phase,
    /// The measuring window's start: the first sample after the change.
    window: Option<(Instant, u64)>,
    /// Samples in the window, and how many of them found every slot taken.
    samples: u32,
    saturated: u32,
    /// Steps up in a row that gained nothing.
    failed: u32,
    /// Bytes per second in the last window measured.
    rate: f64,
}

impl Climb {
    /// A climb from `start` up to `max`.
    pub fn new(start: usize, max: usize) -> Climb {
        Climb {
            max: max.max(1),
            level: start.clamp(1, max.max(1)),
            phase: Phase::Baseline,
            window: None,
            samples: 0,
            saturated: 0,
            failed: 0,
            rate: 0.0,
        }
    }

    /// The level now.
    pub fn level(&self) -> usize {
        self.level
    }

    /// Bytes per second in the last window measured.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Record that `received` bytes had arrived `now`, while the slots were
    /// `saturated` or not; `settle` is how long new requests take to reach
    /// their speed (a few times the time to first byte), and a level is
    /// measured for twice that at least. Returns the new level when it
    /// changes.
    pub fn sample(
        &mut self,
        now: Instant,
        received: u64,
        saturated: bool,
        settle: Duration,
    ) -> Option<usize> {
        if let Phase::Hold { until } = self.phase {
            if now < until {
                return None;
            }
            self.phase = Phase::Baseline;
            self.restart();
        }
        // The window opens at the change and spans the new requests' start:
        // a store that pays for each range up front (moto copies the object
        // before its first byte) pays inside the window, so a step that only
        // moves work around is not mistaken for a gain.
        let Some((start, at_start)) = self.window else {
            self.window = Some((now, received));
            return None;
        };
        self.samples += 1;
        self.saturated += u32::from(saturated);
        let span = now.duration_since(start);
        if span < WINDOW.max(2 * settle) {
            return None;
        }
        let rate = received.saturating_sub(at_start) as f64 / span.as_secs_f64();
        self.rate = rate;
        // Most of the window with every slot taken: more slots would be used.
        let full = self.saturated * 2 > self.samples;
        tracing::trace!(
            level = self.level,
            mb_per_s = (rate / 1e6).round(),
            full,
            "measured"
        );
        let before = self.level;
        match self.phase {
            Phase::Baseline | Phase::Hold { .. } => {
                if full && self.level < self.max {
                    self.phase = Phase::Probe {
                        from: self.level,
                        from_rate: rate,
                    };
                    self.level = (self.level * 2).min(self.max);
                }
            }
            Phase::Probe { from, from_rate } => {
                if rate >= from_rate * GAIN {
                    self.failed = 0;
                    if full && self.level < self.max {
                        self.phase = Phase::Probe {
                            from: self.level,
                            from_rate: rate,
                        };
                        self.level = (self.level * 2).min(self.max);
                    } else {
                        self.phase = Phase::Baseline;
                    }
                } else {
                    self.level = from;
                    let hold = (HOLD * 2u32.pow(self.failed.min(4))).min(MAX_HOLD);
                    self.failed += 1;
                    self.phase = Phase::Hold { until: now + hold };
                }
            }
        }
        self.restart();
        (self.level != before).then_some(self.level)
    }

    fn restart(&mut self) {
        self.window = None;
        self.samples = 0;
        self.saturated = 0;
    }
}

/// Moves `slots`' limit as `climb` decides, every `tick`, from the bytes
/// `received` says have arrived and the time to first byte `ttfb` says a
/// request takes to start (seconds, once known). Runs until aborted.
pub async fn govern(
    slots: &Slots,
    mut climb: Climb,
    received: impl Fn() -> u64,
    ttfb: impl Fn() -> Option<f64>,
) {
    slots.set_limit(climb.level());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A new request reaches its speed after its first byte and a few
        // round trips of TCP's slow start: about three first-byte times.
        let settle = Duration::from_secs_f64((3.0 * ttfb().unwrap_or(0.1)).clamp(0.2, 3.0));
        if let Some(level) = climb.sample(Instant::now(), received(), slots.saturated(), settle) {
            tracing::debug!(
                level,
                mb_per_s = (climb.rate() / 1e6).round(),
                "requests in flight"
            );
            slots.set_limit(level);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_auto_and_numbers() {
        assert_eq!("auto".parse(), Ok(Concurrency::default()));
        assert_eq!("16".parse(), Ok(Concurrency::Fixed(16)));
        for bad in ["0", "257", "many", "-1"] {
            let e = bad.parse::<Concurrency>().unwrap_err().to_string();
            assert!(e.contains("expected `auto`") && e.contains(bad), "{e}");
        }
        assert_eq!(Concurrency::Fixed(16).max(), 16);
        assert_eq!(Concurrency::default().max(), ADAPTIVE_MAX);
        assert_eq!(Concurrency::default().with_max(4).max(), 4);
        assert_eq!(Concurrency::Fixed(16).with_max(4), Concurrency::Fixed(16));
    }

    #[test]
    fn slots_are_bounded_by_the_limit() {
        let slots = Slots::new(2);
        assert!(slots.acquire() && slots.acquire());
        assert!(!slots.acquire() && slots.saturated());
        slots.release();
        assert!(slots.acquire());
        slots.set_limit(1);
        slots.release();
        assert!(!slots.acquire(), "over the new limit until one more ends");
        slots.release();
        assert!(slots.acquire());
    }

    /// Drives a climb against a link whose throughput at each level is
    /// `rate(level)`, with every slot busy; returns the levels it visited.
    fn run(rate: impl Fn(usize) -> f64, seconds: u64) -> Vec<usize> {
        run_since(|level, _| rate(level), seconds)
    }

    /// The same, with the rate also a function of the seconds since the
    /// level last changed.
    fn run_since(rate: impl Fn(usize, f64) -> f64, seconds: u64) -> Vec<usize> {
        let t0 = Instant::now();
        let mut climb = Climb::new(8, 64);
        let settle = Duration::from_millis(200);
        let (mut received, mut levels, mut changed) = (0f64, vec![climb.level()], 0u64);
        for i in 1..=seconds * 10 {
            let now = t0 + Duration::from_millis(i * 100);
            received += rate(climb.level(), (i - changed) as f64 / 10.0) / 10.0;
            if let Some(l) = climb.sample(now, received as u64, true, settle) {
                levels.push(l);
                changed = i;
            }
        }
        levels
    }

    #[test]
    fn a_step_whose_requests_cost_up_front_is_not_a_gain() {
        // Beyond 16, each new request stalls the server for its first
        // 0.4 s (moto copies the object), then streams 20 % faster: the
        // window includes the stall, so the step is undone.
        let rate = |level: usize, since: f64| match level {
            ..=16 => level as f64 * 25e6,
            _ if since < 0.4 => 100e6,
            _ => 480e6,
        };
        let levels = run_since(rate, 4);
        assert_eq!(levels, vec![8, 16, 32, 16], "{levels:?}");
    }

    #[test]
    fn climbs_while_throughput_grows() {
        // Each connection capped at 32 MB/s, the link at 1.5 GB/s.
        let levels = run(|l| (l as f64 * 32e6).min(1.5e9), 10);
        assert_eq!(levels, vec![8, 16, 32, 64]);
    }

    #[test]
    fn steps_back_when_more_requests_gain_nothing() {
        // Full at 16; beyond it each request costs the server (moto).
        let levels = run(|l| if l <= 16 { l as f64 * 30e6 } else { 400e6 }, 4);
        assert_eq!(levels, vec![8, 16, 32, 16], "{levels:?}");
        // It holds 5 s, tries again, steps back again, and then holds 10 s.
        let levels = run(|l| if l <= 16 { l as f64 * 30e6 } else { 400e6 }, 12);
        assert_eq!(levels, vec![8, 16, 32, 16, 32, 16], "{levels:?}");
        let levels = run(|l| if l <= 16 { l as f64 * 30e6 } else { 400e6 }, 18);
        assert_eq!(levels, vec![8, 16, 32, 16, 32, 16], "{levels:?}");
    }

    #[test]
    fn stays_while_slots_are_not_all_used() {
        let t0 = Instant::now();
        let mut climb = Climb::new(8, 64);
        for i in 1..=50u64 {
            let now = t0 + Duration::from_millis(i * 100);
            let changed = climb.sample(now, i * 1_000_000, false, Duration::from_millis(200));
            assert_eq!(changed, None, "a level with idle slots is never raised");
        }
        assert_eq!(climb.level(), 8);
    }
}
