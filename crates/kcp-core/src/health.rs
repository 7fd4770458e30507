//! Health score and peak-EWMA latency of one key.
//!
//! The health score (1..=1000, per mille) weights `round_robin_health_weighted`: every
//! success earns [`SUCCESS_GAIN`] points, every upstream failure costs
//! `unhealthy_penalty × PENALTY_UNIT` points. It never drops to zero, so a sick key still
//! sees a trickle of traffic and can prove it recovered; the circuit breaker is what takes a
//! failing key out entirely.
//!
//! Latency is tracked as a peak-EWMA (Finagle, and tower's `load::peak_ewma`): a sample
//! above the estimate replaces it at once, samples below pull it down with time constant
//! [`EWMA_DECAY`], and without samples the estimate decays towards zero, so a key that was
//! slow once is tried again.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::time::Time;

/// Best health.
pub const MAX_HEALTH: u32 = 1000;
/// Points a success earns.
pub const SUCCESS_GAIN: u32 = 10;
/// Points one `unhealthy_penalty` unit costs on an upstream failure.
pub const PENALTY_UNIT: u32 = 20;
/// Time constant of the latency average.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Latency assumed for a key with no samples yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(100);

/// A key's health score.
#[derive(Debug)]
pub struct Health(AtomicU32);

impl Default for Health {
    fn default() -> Self {
        Health(AtomicU32::new(MAX_HEALTH))
    }
}

impl Health {
    /// The score, 1..=1000.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// A success.
    pub fn reward(&self) {
        // A healthy key (the common case) costs a load, not a read-modify-write.
        if self.get() < MAX_HEALTH {
            self.adjust(|h| (h + SUCCESS_GAIN).min(MAX_HEALTH));
        }
    }

    /// An upstream failure scaled by `unhealthy_penalty`.
    pub fn penalize(&self, unhealthy_penalty: u32) {
        let cost = unhealthy_penalty.saturating_mul(PENALTY_UNIT);
        self.adjust(|h| h.saturating_sub(cost).max(1));
    }

    fn adjust(&self, f: impl Fn(u32) -> u32) {
        // fetch_update only fails when the closure returns None, which it never does.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| Some(f(h)));
    }
}

/// Peak-EWMA of response latency, as two atomics (estimate in ns as f64 bits, and the time
/// of the last update).
#[derive(Debug, Default)]
pub struct PeakEwma {
    estimate: AtomicU64,
    updated: AtomicU64,
}

impl PeakEwma {
    /// Folds in one latency sample taken at `now`.
    pub fn observe(&self, sample: Duration, now: Time) {
        let sample = sample.as_secs_f64() * 1e9;
        let stored = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let updated = Time::from_nanos(self.updated.load(Ordering::Relaxed));
        let w = decay_weight(now.saturating_since(updated));
        // The estimate first decays towards zero over the time elapsed, as a read would see
        // it; a sample above that replaces it, one below is averaged in with the same weight.
        let current = stored * w;
        let next = if sample > current {
            sample
        } else {
            current * w + sample * (1.0 - w)
        };
        self.estimate.store(next.to_bits(), Ordering::Relaxed);
        self.updated.store(now.as_nanos(), Ordering::Relaxed);
    }

    /// The estimate at `now`, decayed towards zero since the last sample; `None` before any.
    pub fn get(&self, now: Time) -> Option<Duration> {
        let updated = self.updated.load(Ordering::Relaxed);
        (updated != 0 || self.estimate.load(Ordering::Relaxed) != 0)
            .then(|| Duration::from_nanos(self.estimate_at(now) as u64))
    }

    /// The estimate in nanoseconds, [`DEFAULT_RTT`] before any sample.
    pub fn cost_nanos(&self, now: Time) -> f64 {
        match self.get(now) {
            Some(_) => self.estimate_at(now),
            None => DEFAULT_RTT.as_secs_f64() * 1e9,
        }
    }

    fn estimate_at(&self, now: Time) -> f64 {
        let estimate = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let since = now.saturating_since(Time::from_nanos(self.updated.load(Ordering::Relaxed)));
        estimate * decay_weight(since)
    }
}

fn decay_weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_moves_within_bounds() {
        let h = Health::default();
        assert_eq!(h.get(), MAX_HEALTH);
        for _ in 0..100 {
            h.penalize(5);
        }
        assert_eq!(h.get(), 1);
        h.reward();
        assert_eq!(h.get(), 1 + SUCCESS_GAIN);
        for _ in 0..200 {
            h.reward();
        }
        assert_eq!(h.get(), MAX_HEALTH);
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let e = PeakEwma::default();
        assert_eq!(e.get(Time::ZERO), None);
        let t = Time::from_secs(1);
        e.observe(Duration::from_millis(100), t);
        e.observe(Duration::from_millis(500), t);
        assert_eq!(e.get(t), Some(Duration::from_millis(500)));
        let later = t + EWMA_DECAY;
        let decayed = e.get(later).expect("has samples");
        assert!(decayed < Duration::from_millis(200), "{decayed:?}");
        e.observe(Duration::from_millis(50), later);
        assert!(e.get(later).expect("has samples") < decayed);
    }

    #[test]
    fn a_sample_below_the_estimate_is_averaged_in_by_the_decay_weight() {
        let e = PeakEwma::default();
        let t = Time::from_secs(1);
        e.observe(Duration::from_millis(500), t);
        e.observe(Duration::from_millis(50), t);
        assert_eq!(
            e.get(t),
            Some(Duration::from_millis(500)),
            "no time passed: a lower sample weighs nothing yet"
        );
        let later = t + EWMA_DECAY;
        e.observe(Duration::from_millis(50), later);
        // Decayed over one time constant to 500/e, then averaged with weight w = 1/e.
        let w = (-1.0f64).exp();
        let expected = 500e6 * w * w + 50e6 * (1.0 - w);
        let got = e.cost_nanos(later);
        assert!(
            (got - expected).abs() < 1.0,
            "{got} ns, expected {expected} ns"
        );
    }

    #[test]
    fn cost_is_the_default_rtt_before_any_sample_then_the_estimate() {
        let e = PeakEwma::default();
        assert_eq!(e.cost_nanos(Time::from_secs(5)), 100e6);
        e.observe(Duration::from_millis(250), Time::from_secs(5));
        assert_eq!(e.cost_nanos(Time::from_secs(5)), 250e6);
    }

    #[test]
    fn a_sample_at_time_zero_counts() {
        let e = PeakEwma::default();
        e.observe(Duration::from_millis(80), Time::ZERO);
        assert_eq!(e.get(Time::ZERO), Some(Duration::from_millis(80)));
    }
}
