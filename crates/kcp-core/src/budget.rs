//! A key's budget as the provider reports it, and the pace that keeps it clear of 429s.
//!
//! OpenAI answers every request with `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
//! Each [`Gauge`] keeps the last report of one budget and models it as the provider does: a
//! bucket of `limit` per minute refilling continuously. From that it computes the earliest
//! instant at which the budget covers what is already in flight plus the new request; a key
//! whose budget is spent is held back until then instead of being sent into a 429.
//!
//! On top, each key is paced (see [`Pace`]) at its learned rate with a one-second burst,
//! because providers enforce per-minute limits over much shorter windows. The pace adapts
//! by AIMD as in TCP congestion control: a 429 halves it, every success adds back a little,
//! up to the learned limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::time::{Time, nanos};

const UNKNOWN: u64 = u64::MAX;
const MINUTE: Duration = Duration::from_secs(60);

/// The last report of one budget (requests or tokens), in atomics so selection can read it
/// without a lock.
#[derive(Debug)]
pub struct Gauge {
    limit: AtomicU64,
    remaining: AtomicU64,
    observed: AtomicU64,
    reset_at: AtomicU64,
}

impl Gauge {
    /// A gauge with an optional configured per-minute limit and no report yet.
    pub fn new(limit: Option<u64>) -> Self {
        Gauge {
            limit: AtomicU64::new(limit.filter(|&l| l > 0).unwrap_or(UNKNOWN)),
            remaining: AtomicU64::new(UNKNOWN),
            observed: AtomicU64::new(0),
            reset_at: AtomicU64::new(0),
        }
    }

    /// Takes a report: any of limit, remaining and time-to-reset, observed at `now`.
    pub fn report(&self, limit: Option<u64>, remaining: Option<u64>, reset: Option<Duration>, now: Time) {
        if let Some(limit) = limit.filter(|&l| l > 0) {
            self.limit.store(limit, Ordering::Relaxed);
        }
        if let Some(remaining) = remaining {
            self.remaining.store(remaining.min(UNKNOWN - 1), Ordering::Relaxed);
            self.observed.store(now.as_nanos(), Ordering::Relaxed);
            let reset_at = reset.map_or(0, |r| (now + r).as_nanos());
            self.reset_at.store(reset_at, Ordering::Relaxed);
        }
    }

    /// The per-minute limit, configured or learned.
    pub fn limit(&self) -> Option<u64> {
        known(self.limit.load(Ordering::Relaxed))
    }

    /// The budget estimated at `now`: the last report plus what refilled since.
    pub fn remaining(&self, now: Time) -> Option<u64> {
        let remaining = known(self.remaining.load(Ordering::Relaxed))?;
        let observed = Time::from_nanos(self.observed.load(Ordering::Relaxed));
        Some(match self.limit() {
            Some(limit) => {
                let refilled = now.saturating_since(observed).as_secs_f64() / MINUTE.as_secs_f64() * limit as f64;
                (remaining as f64 + refilled).min(limit as f64) as u64
            }
            None if now.as_nanos() >= self.reset_at.load(Ordering::Relaxed) && self.reset_at.load(Ordering::Relaxed) != 0 => {
                UNKNOWN - 1
            }
            None => remaining,
        })
    }

    /// When the reported budget is back to full, if the report said.
    pub fn reset_at(&self) -> Option<Time> {
        match self.reset_at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Time::from_nanos(at)),
        }
    }

    /// The earliest instant from `now` at which the budget covers `reserved` (already in
    /// flight) plus `need`. A need larger than the whole limit waits for a full bucket, never
    /// forever.
    pub fn free_at(&self, now: Time, reserved: u64, need: u64) -> Time {
        let Some(remaining) = known(self.remaining.load(Ordering::Relaxed)) else {
            return now;
        };
        let observed = Time::from_nanos(self.observed.load(Ordering::Relaxed));
        match self.limit() {
            Some(limit) => {
                let target = reserved.saturating_add(need).min(limit);
                if target <= remaining {
                    return now;
                }
                let per_unit = nanos(MINUTE) as f64 / limit as f64;
                let at = observed + Duration::from_nanos(((target - remaining) as f64 * per_unit) as u64);
                at.max(now)
            }
            None if reserved.saturating_add(need) <= remaining => now,
            None => self.reset_at().unwrap_or(now).max(now),
        }
    }
}

fn known(value: u64) -> Option<u64> {
    (value != UNKNOWN).then_some(value)
}

/// Additive-increase / multiplicative-decrease factor applied to a key's learned rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    factor: f64,
}

/// Lowest pace factor: a key is never throttled below a quarter of its learned rate.
pub const MIN_PACE: f64 = 0.25;
/// What a 429 multiplies the pace by.
pub const DECREASE: f64 = 0.5;
/// What a success adds to the pace factor.
pub const INCREASE: f64 = 0.05;
/// Burst of the pace limiter, in seconds of the pace rate.
pub const PACE_BURST: Duration = Duration::from_secs(1);

impl Default for Pace {
    fn default() -> Self {
        Pace { factor: 1.0 }
    }
}

impl Pace {
    /// The provider disagreed (429): slow down.
    pub fn cut(&mut self) {
        self.factor = (self.factor * DECREASE).max(MIN_PACE);
    }

    /// A success: speed up a little, back towards the learned limit.
    pub fn grow(&mut self) {
        self.factor = (self.factor + INCREASE).min(1.0);
    }

    /// The current factor, `MIN_PACE..=1.0`.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// Requests per second to pace a key whose limit is `rpm` per minute.
    pub fn rate_per_sec(&self, rpm: u64) -> f64 {
        rpm as f64 / 60.0 * self.factor
    }
}

/// Estimated tokens of a request: prompt bytes / 4 plus the completion budget
/// (`max_tokens` / `max_completion_tokens`, else `default_completion`).
pub fn estimate_tokens(prompt_bytes: usize, max_completion: Option<u64>, default_completion: u32) -> u64 {
    (prompt_bytes as u64 / 4).saturating_add(max_completion.unwrap_or(u64::from(default_completion)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_budget_is_free() {
        let g = Gauge::new(None);
        assert_eq!(g.free_at(Time::from_secs(5), 100, 1), Time::from_secs(5));
        assert_eq!(g.remaining(Time::ZERO), None);
    }

    #[test]
    fn spent_budget_frees_as_it_refills() {
        let g = Gauge::new(None);
        let t0 = Time::from_secs(100);
        g.report(Some(60), Some(0), Some(Duration::from_secs(1)), t0);
        // 60 per minute refills one per second.
        assert_eq!(g.free_at(t0, 0, 1), t0 + Duration::from_secs(1));
        assert_eq!(g.free_at(t0, 2, 1), t0 + Duration::from_secs(3));
        assert_eq!(g.remaining(t0 + Duration::from_secs(30)), Some(30));
        assert_eq!(g.remaining(t0 + Duration::from_secs(600)), Some(60));
    }

    #[test]
    fn in_flight_counts_against_remaining() {
        let g = Gauge::new(Some(600));
        let t0 = Time::from_secs(1);
        g.report(None, Some(3), None, t0);
        assert_eq!(g.free_at(t0, 2, 1), t0);
        assert!(g.free_at(t0, 3, 1) > t0);
    }

    #[test]
    fn oversized_need_waits_for_a_full_bucket_not_forever() {
        let g = Gauge::new(None);
        let t0 = Time::ZERO;
        g.report(Some(1000), Some(0), None, t0);
        assert_eq!(g.free_at(t0, 0, 5000), t0 + Duration::from_secs(60));
    }

    #[test]
    fn without_a_limit_the_reset_frees_the_budget() {
        let g = Gauge::new(None);
        let t0 = Time::from_secs(10);
        g.report(None, Some(0), Some(Duration::from_secs(7)), t0);
        assert_eq!(g.free_at(t0, 0, 1), Time::from_secs(17));
    }

    #[test]
    fn pace_is_aimd() {
        let mut p = Pace::default();
        p.cut();
        assert_eq!(p.factor(), 0.5);
        for _ in 0..3 {
            p.cut();
        }
        assert_eq!(p.factor(), MIN_PACE);
        for _ in 0..100 {
            p.grow();
        }
        assert_eq!(p.factor(), 1.0);
        assert_eq!(p.rate_per_sec(120), 2.0);
    }

    #[test]
    fn token_estimate() {
        assert_eq!(estimate_tokens(400, Some(50), 256), 150);
        assert_eq!(estimate_tokens(400, None, 256), 356);
    }
}
