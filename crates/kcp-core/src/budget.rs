//! A key's budget as the provider reports it, and the pace that keeps it clear of 429s.
//!
//! OpenAI answers every request with `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
//! Each [`Gauge`] keeps the newest report of one budget and models it as the provider does: a
//! bucket refilling continuously at `limit` per minute, full again `reset` after the report,
//! so it holds at most `remaining + reset × limit / 60` (the whole `limit` for OpenAI's
//! minute buckets, a few seconds' worth for providers that enforce shorter windows).
//!
//! A provider decides, and writes these headers, when it admits a request, not when the
//! answer arrives: a report is therefore dated at the reporting request's send time, and it
//! already accounts for every request sent before it. What it cannot know is what was sent
//! after it, so those requests, while still in flight, count against the budget until a newer
//! report covers them. Reports are ordered by a send sequence (the units spent up to the
//! reporting request), and an older report arriving late is ignored. From that the gauge
//! computes the earliest instant at which the budget covers a new request; a key whose budget
//! is spent is held back until then instead of being sent into a 429.
//!
//! What the newest report says is left may be spent at once (less what is in flight): a
//! provider that answers "R left" admits R more now. Beyond that, and while no report is
//! trusted, each key is paced (see [`Pace`]) at its learned rate with a one-second burst,
//! because providers enforce per-minute limits over much shorter windows. The pace adapts by
//! AIMD as in TCP congestion control: a 429 halves it, every success adds back a little, up to
//! the learned limit; and a 429 stops the trust in the reported budget for a while
//! (`DISTRUST_AFTER_429`), so a budget model the provider contradicts is not spent again.
//!
//! Replicas of one pool ([`crate::KeyPool::set_replica_share`]) spend the same provider
//! budget: with `n` live replicas each one claims `1/n` of the reported level and of its
//! refill ([`Gauge::set_share`]), so together they stay within it.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::time::Time;

const UNKNOWN: u64 = u64::MAX;
const MINUTE: Duration = Duration::from_secs(60);
/// How finely providers print `x-ratelimit-reset-*` (OpenAI: `"59.6ms"`, `"1.2s"`, `"6m0s"`).
pub const RESET_PRECISION: Duration = Duration::from_millis(1);

/// The newest report of one budget (requests or tokens) and the units spent since, in
/// atomics so selection can read it without a lock. Reports are written under the key's
/// lock; readers may see a report half-written, which only blurs one estimate.
#[derive(Debug)]
pub struct Gauge {
    limit: AtomicU64,
    /// The level at the newest report (f64 bits).
    remaining: AtomicU64,
    /// Level at which the bucket is full: the largest `remaining + reset × rate` reported
    /// since the limit last changed (f64 bits).
    full: AtomicU64,
    observed: AtomicU64,
    reset_at: AtomicU64,
    /// Units spent up to and including the request whose answer made the newest report.
    covered: AtomicU64,
    /// Units spent on this key so far.
    sent: AtomicU64,
    /// Units of those whose request was answered (or abandoned); `sent - settled` are in
    /// flight. Two counters rather than one in-flight count keep `spend` to one
    /// read-modify-write.
    settled: AtomicU64,
    /// How many replicas spend this budget; this one may claim `1/share` of it.
    share: AtomicU32,
}

impl Gauge {
    /// A gauge with an optional configured per-minute limit and no report yet.
    pub fn new(limit: Option<u64>) -> Self {
        Gauge {
            limit: AtomicU64::new(limit.filter(|&l| l > 0).unwrap_or(UNKNOWN)),
            remaining: AtomicU64::new(UNKNOWN),
            full: AtomicU64::new(0),
            observed: AtomicU64::new(0),
            reset_at: AtomicU64::new(0),
            covered: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            share: AtomicU32::new(1),
        }
    }

    /// Spends only `1/replicas` of the budget from now on: the others spend the rest.
    pub fn set_share(&self, replicas: NonZeroU32) {
        self.share.store(replicas.get(), Ordering::Relaxed);
    }

    /// How many replicas spend this budget (1 alone).
    pub fn share(&self) -> u32 {
        self.share.load(Ordering::Relaxed).max(1)
    }

    /// A request needing `units` is sent: returns its mark in the send sequence, to be
    /// passed back with the report its answer brings ([`Gauge::report`]).
    pub fn spend(&self, units: u64) -> u64 {
        if units == 0 {
            return self.sent.load(Ordering::Acquire);
        }
        self.sent
            .fetch_add(units, Ordering::AcqRel)
            .saturating_add(units)
    }

    /// The request that spent `units` was answered (or abandoned). Every `spend` is settled
    /// exactly once (by its lease).
    pub fn settle(&self, units: u64) {
        if units != 0 {
            self.settled.fetch_add(units, Ordering::AcqRel);
        }
    }

    /// Units of requests sent and not answered yet (for the request budget: requests in
    /// flight).
    pub fn pending(&self) -> u64 {
        let settled = self.settled.load(Ordering::Acquire);
        self.sent.load(Ordering::Acquire).saturating_sub(settled)
    }

    /// Takes a report (any of limit, remaining and time-to-reset) made by the provider at
    /// `at`, when it admitted the request whose mark is `mark`. A report older than the one
    /// held only contributes its limit.
    ///
    /// Providers round `remaining` down to a whole unit, which hides up to one request; the
    /// reset does not: once the size of the full bucket is known (the largest
    /// `remaining + reset × rate` seen), the level is `full − reset × rate`. As the reset is
    /// printed to [`RESET_PRECISION`] and may be cut short, the level is taken that much
    /// lower, and never a whole unit above `remaining`.
    pub fn report(
        &self,
        limit: Option<u64>,
        remaining: Option<u64>,
        reset: Option<Duration>,
        at: Time,
        mark: u64,
    ) {
        if let Some(limit) = limit.filter(|&l| l > 0) {
            if self.limit.swap(limit, Ordering::Relaxed) != limit {
                self.full.store(0, Ordering::Relaxed);
            }
        }
        let Some(remaining) = remaining else {
            return;
        };
        let held = self.remaining.load(Ordering::Relaxed) != UNKNOWN;
        if held && mark < self.covered.load(Ordering::Relaxed) {
            return;
        }
        let mut level = remaining.min(UNKNOWN - 1) as f64;
        let full = match (self.limit(), reset) {
            (Some(limit), Some(reset)) => {
                let refill = reset.as_secs_f64() * per_sec(limit);
                let full = (level + refill)
                    .max(f64::from_bits(self.full.load(Ordering::Relaxed)))
                    .min(limit as f64);
                let slack = RESET_PRECISION.as_secs_f64() * per_sec(limit);
                level = level.max((full - refill - slack).min(just_below(level + 1.0)));
                full
            }
            (Some(limit), None) => limit as f64,
            (None, _) => f64::INFINITY,
        };
        self.remaining.store(level.to_bits(), Ordering::Relaxed);
        self.full.store(full.to_bits(), Ordering::Relaxed);
        self.observed.store(at.as_nanos(), Ordering::Relaxed);
        self.covered.store(mark, Ordering::Relaxed);
        let reset_at = reset.map_or(0, |r| (at + r).as_nanos());
        self.reset_at.store(reset_at, Ordering::Relaxed);
    }

    /// Whether the provider reported this budget's level at least once.
    pub fn has_report(&self) -> bool {
        self.reported().is_some()
    }

    /// The per-minute limit, configured or learned.
    pub fn limit(&self) -> Option<u64> {
        known(self.limit.load(Ordering::Relaxed))
    }

    /// Units sent after the newest report and still unanswered: the report could not count
    /// them, the provider already has.
    pub fn reserved(&self) -> u64 {
        let since = self
            .sent
            .load(Ordering::Acquire)
            .saturating_sub(self.covered.load(Ordering::Relaxed));
        since.min(self.pending())
    }

    /// The budget estimated at `now`: the newest report, plus what refilled since, minus what
    /// was sent since.
    pub fn remaining(&self, now: Time) -> Option<u64> {
        let remaining = self.reported()?;
        let level = match self.limit() {
            Some(limit) => self.level(remaining, limit, now),
            None if self.reset_passed(now) => return Some(UNKNOWN - 1),
            None => remaining,
        };
        Some((level - self.reserved() as f64).max(0.0) as u64)
    }

    /// When the reported budget is back to full, if the report said.
    pub fn reset_at(&self) -> Option<Time> {
        match self.reset_at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Time::from_nanos(at)),
        }
    }

    /// The earliest instant from `now` at which the budget covers what was sent since the
    /// newest report plus `need`. A need larger than the whole bucket waits for a full
    /// bucket, never forever. Shared by `n` replicas, this one's part of the level and of
    /// the refill is `1/n`: it waits until the level covers `n` times its own needs.
    pub fn free_at(&self, now: Time, need: u64) -> Time {
        let Some(remaining) = self.reported() else {
            return now;
        };
        let share = f64::from(self.share());
        let reserved = self.reserved() as f64 * share;
        let need = need as f64 * share;
        let Some(limit) = self.limit() else {
            return if reserved + need <= remaining || self.reset_passed(now) {
                now
            } else {
                self.reset_at().unwrap_or(now).max(now)
            };
        };
        let full = f64::from_bits(self.full.load(Ordering::Relaxed));
        let target = reserved + need.min(full);
        let level = self.level(remaining, limit, now);
        if level >= target {
            return now;
        }
        let wait = (target - level) / per_sec(limit);
        now + Duration::from_secs_f64(wait.min(MINUTE.as_secs_f64()))
    }

    /// The provider's level at `now` as the newest report predicts it, before what was
    /// sent since.
    fn level(&self, remaining: f64, limit: u64, now: Time) -> f64 {
        let observed = Time::from_nanos(self.observed.load(Ordering::Relaxed));
        let full = f64::from_bits(self.full.load(Ordering::Relaxed));
        let refilled = now.saturating_since(observed).as_secs_f64() * per_sec(limit);
        (remaining + refilled).min(full)
    }

    /// The level at the newest report, if there is one.
    fn reported(&self) -> Option<f64> {
        match self.remaining.load(Ordering::Relaxed) {
            UNKNOWN => None,
            bits => Some(f64::from_bits(bits)),
        }
    }

    fn reset_passed(&self, now: Time) -> bool {
        let at = self.reset_at.load(Ordering::Relaxed);
        at != 0 && now.as_nanos() >= at
    }
}

/// The largest `f64` below `x` (positive and finite): `x - f64::EPSILON` is `x` itself from
/// 2 on, which would let the level reach a whole unit above `remaining`.
fn just_below(x: f64) -> f64 {
    f64::from_bits(x.to_bits() - 1)
}

fn per_sec(per_minute: u64) -> f64 {
    per_minute as f64 / MINUTE.as_secs_f64()
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
pub fn estimate_tokens(
    prompt_bytes: usize,
    max_completion: Option<u64>,
    default_completion: u32,
) -> u64 {
    (prompt_bytes as u64 / 4)
        .saturating_add(max_completion.unwrap_or(u64::from(default_completion)))
        .min(MAX_TOKENS)
}

/// The most tokens one request is counted for. A client can write any `max_tokens`; no
/// model takes more than this, and the budget arithmetic must never come near overflow.
pub const MAX_TOKENS: u64 = 1 << 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_budget_is_free() {
        let g = Gauge::new(None);
        g.spend(100);
        assert_eq!(g.free_at(Time::from_secs(5), 1), Time::from_secs(5));
        assert_eq!(g.remaining(Time::ZERO), None);
    }

    #[test]
    fn spent_budget_frees_as_it_refills() {
        let g = Gauge::new(None);
        let t0 = Time::from_secs(100);
        let mark = g.spend(1);
        g.settle(1);
        g.report(Some(60), Some(0), Some(Duration::from_secs(60)), t0, mark);
        // 60 per minute refills one per second.
        assert_eq!(g.free_at(t0, 1), t0 + Duration::from_secs(1));
        assert_eq!(g.free_at(t0, 3), t0 + Duration::from_secs(3));
        assert_eq!(g.remaining(t0 + Duration::from_secs(30)), Some(30));
        assert_eq!(g.remaining(t0 + Duration::from_secs(600)), Some(60));
    }

    #[test]
    fn requests_sent_after_the_report_count_against_it_until_answered() {
        let g = Gauge::new(Some(600));
        let t0 = Time::from_secs(1);
        let first = g.spend(1);
        // Two more leave before the first answer comes back.
        g.spend(1);
        g.spend(1);
        g.settle(1);
        g.report(None, Some(3), None, t0, first);
        assert_eq!(g.reserved(), 2);
        assert_eq!(g.free_at(t0, 1), t0);
        assert!(g.free_at(t0, 2) > t0);
        // One of them ends without a report (cancelled): it no longer counts.
        g.settle(1);
        assert_eq!(g.reserved(), 1);
        assert_eq!(g.free_at(t0, 2), t0);
    }

    #[test]
    fn a_report_is_dated_at_admission_and_an_older_one_is_ignored() {
        let g = Gauge::new(None);
        let sent = Time::from_secs(10);
        let first = g.spend(1);
        let second = g.spend(1);
        g.settle(1);
        g.report(
            Some(60),
            Some(0),
            Some(Duration::from_secs(2)),
            sent,
            second,
        );
        // Answered 500 ms after it was sent: the refill since admission counts.
        let answered = sent + Duration::from_millis(500);
        assert_eq!(g.free_at(answered, 1), sent + Duration::from_secs(1));
        // The first request's answer arrives late, with a stale figure: ignored.
        g.settle(1);
        g.report(Some(60), Some(5), None, sent, first);
        assert_eq!(g.remaining(answered), Some(0));
    }

    #[test]
    fn the_reset_tells_how_full_the_bucket_gets() {
        // A provider enforcing 240 per minute over a 3 s window: 12 requests at most.
        let g = Gauge::new(None);
        let t0 = Time::ZERO;
        let mark = g.spend(1);
        g.settle(1);
        g.report(
            Some(240),
            Some(11),
            Some(Duration::from_millis(250)),
            t0,
            mark,
        );
        assert_eq!(g.remaining(Time::from_secs(60)), Some(12));
        // A burst of 12 unanswered requests empties it whatever the idle time before.
        let later = Time::from_secs(60);
        for _ in 0..12 {
            g.spend(1);
        }
        assert_eq!(g.remaining(later), Some(0));
        assert_eq!(g.free_at(later, 1), later + Duration::from_millis(250));
    }

    #[test]
    fn oversized_need_waits_for_a_full_bucket_not_forever() {
        let g = Gauge::new(None);
        let t0 = Time::ZERO;
        g.report(Some(1000), Some(0), None, t0, 0);
        assert_eq!(g.free_at(t0, 5000), t0 + Duration::from_secs(60));
    }

    #[test]
    fn without_a_limit_the_reset_frees_the_budget() {
        let g = Gauge::new(None);
        let t0 = Time::from_secs(10);
        g.report(None, Some(0), Some(Duration::from_secs(7)), t0, 0);
        assert_eq!(g.free_at(t0, 1), Time::from_secs(17));
        assert_eq!(g.free_at(Time::from_secs(17), 1), Time::from_secs(17));
    }

    /// A gauge of `limit` per minute with one report of `remaining` and `reset` at `at`.
    fn reported(limit: Option<u64>, remaining: u64, reset: Option<Duration>, at: Time) -> Gauge {
        let g = Gauge::new(None);
        let mark = g.spend(1);
        g.settle(1);
        g.report(limit, Some(remaining), reset, at, mark);
        g
    }

    #[test]
    fn a_known_bucket_size_recovers_the_fraction_remaining_rounds_away() {
        // 120 a minute: 2 a second. The first report shows the bucket is full at 120.
        let t0 = Time::from_secs(10);
        let g = reported(Some(120), 40, Some(Duration::from_secs(40)), t0);
        assert_eq!(g.remaining(t0), Some(40));
        // 39 left, full again in 40.25 s: the level is 120 - 80.5 = 39.5, less the
        // reset's print precision (1 ms of refill): one more unit is 0.251 s away.
        let mark = g.spend(1);
        g.settle(1);
        g.report(
            Some(120),
            Some(39),
            Some(Duration::from_millis(40_250)),
            t0,
            mark,
        );
        let wait = g.free_at(t0, 40).saturating_since(t0).as_secs_f64();
        assert!((wait - 0.251).abs() < 1e-6, "{wait}");
        assert_eq!(
            g.remaining(t0 + Duration::from_secs(5)),
            Some(49),
            "2 a second"
        );
    }

    #[test]
    fn the_reset_never_lifts_the_level_a_whole_unit_above_remaining() {
        let t0 = Time::from_secs(10);
        let g = reported(Some(120), 40, Some(Duration::from_secs(40)), t0);
        // 39 left, full in 39.9 s: the reset alone would say 40.2, but `remaining` is
        // rounded down from less than 40.
        let mark = g.spend(1);
        g.settle(1);
        g.report(
            Some(120),
            Some(39),
            Some(Duration::from_millis(39_900)),
            t0,
            mark,
        );
        assert_eq!(g.remaining(t0), Some(39));
        assert!(
            g.free_at(t0, 40) < t0 + Duration::from_micros(1),
            "just short of 40"
        );
        assert_eq!(g.free_at(t0, 41), t0 + Duration::from_millis(500));
    }

    #[test]
    fn a_zero_limit_is_no_limit() {
        let g = reported(Some(0), 3, None, Time::ZERO);
        assert_eq!(g.limit(), None);
        assert_eq!(g.remaining(Time::from_secs(60)), Some(3), "nothing refills");
    }

    #[test]
    fn a_new_limit_forgets_the_old_bucket_size() {
        let t0 = Time::ZERO;
        let g = reported(Some(240), 200, Some(Duration::from_secs(10)), t0);
        assert_eq!(g.remaining(Time::from_secs(600)), Some(240));
        // The limit drops to 60 with a bucket of a quarter second's refill.
        let mark = g.spend(1);
        g.settle(1);
        g.report(
            Some(60),
            Some(11),
            Some(Duration::from_millis(250)),
            t0,
            mark,
        );
        assert_eq!(g.remaining(Time::from_secs(600)), Some(11));
    }

    #[test]
    fn reports_apply_in_send_order_and_an_equal_mark_replaces() {
        let g = Gauge::new(Some(60));
        let t0 = Time::ZERO;
        let first = g.spend(1);
        g.settle(1);
        g.report(None, Some(5), None, t0, first);
        assert_eq!(g.remaining(t0), Some(5));
        let second = g.spend(1);
        g.settle(1);
        g.report(None, Some(2), None, t0, second);
        assert_eq!(g.remaining(t0), Some(2), "a newer report wins");
        g.report(None, Some(1), None, t0, second);
        assert_eq!(
            g.remaining(t0),
            Some(1),
            "so does a second word on the same request"
        );
    }

    #[test]
    fn without_a_limit_the_report_holds_until_its_reset() {
        let t0 = Time::from_secs(10);
        let g = reported(None, 5, Some(Duration::from_secs(7)), t0);
        assert_eq!(g.free_at(t0, 1), t0, "5 left");
        assert_eq!(g.free_at(t0, 6), Time::from_secs(17), "not 6");
        assert_eq!(g.remaining(t0), Some(5));
        assert_eq!(g.remaining(Time::from_secs(16)), Some(5));
        assert_eq!(
            g.remaining(Time::from_secs(17)),
            Some(u64::MAX - 1),
            "after the reset: as much as can be counted"
        );
    }

    #[test]
    fn pace_is_aimd() {
        let mut p = Pace::default();
        p.cut();
        assert_eq!(p.factor(), 0.5);
        assert_eq!(p.rate_per_sec(120), 1.0, "half of 2 a second");
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
    fn token_estimate_is_bounded() {
        assert_eq!(estimate_tokens(0, Some(u64::MAX), 256), MAX_TOKENS);
    }

    #[test]
    fn token_estimate() {
        assert_eq!(estimate_tokens(400, Some(50), 256), 150);
        assert_eq!(estimate_tokens(400, None, 256), 356);
    }
}
