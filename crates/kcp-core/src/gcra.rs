//! A lock-free request-rate limiter: the Generic Cell Rate Algorithm.
//!
//! Each key has its own requests-per-minute budget, and the proxy must stay under it on its own
//! instead of learning the limit from a 429. GCRA is the "virtual scheduling" form of the leaky
//! bucket from the ATM Forum's Traffic Management Specification 4.0 (also ITU-T I.371). It keeps
//! a single number: the *theoretical arrival time* (TAT), the instant by which every cell admitted
//! so far would have been paid off at the emission interval `T = 1 / rate`. A cell arriving at
//! `now` is admitted iff the new TAT, `max(TAT, now) + T`, lies at most `T × burst` ahead of `now`.
//!
//! As in the governor crate, the TAT is one atomic word updated by compare-and-swap, so many
//! threads share a limiter without a lock, and the caller passes `now`: the limiter never reads a
//! clock, so tests drive it with a fake one. A refused cell comes back with the exact instant at
//! which it would be admitted, which the pool turns into a precise wait.
//!
//! The rate can change in place ([`Gcra::set_rate`]) for adaptive pacing. The TAT is kept as it
//! is, so debt already built up at the old rate is still owed; the new rate applies to the cells
//! that follow. The interval and the burst are separate words read without ordering: a decision
//! racing a rate change may pair the new interval with the old burst, which is harmless.

use std::cmp;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::Time;

/// Interval value meaning "no limit".
const UNLIMITED: u64 = 0;
/// Interval value meaning "admit nothing" (a rate of zero, negative or NaN).
const CLOSED: u64 = u64::MAX;
/// Nanoseconds per second, as a float for rate conversions.
const NANOS_PER_SEC: f64 = 1e9;

/// A GCRA rate limiter admitting `rate` cells per second with bursts of up to `burst` cells.
#[derive(Debug)]
pub struct Gcra {
    /// Theoretical arrival time, in nanoseconds on the caller's timeline.
    tat: AtomicU64,
    /// Emission interval `T` in nanoseconds; [`UNLIMITED`] or [`CLOSED`] for the special rates.
    interval: AtomicU64,
    /// The number of cells admitted back to back when the limiter is idle.
    burst: AtomicU32,
}

/// One consistent reading of the configuration.
#[derive(Clone, Copy)]
enum Mode {
    Unlimited,
    Closed,
    /// Emission interval `t` and tolerance `tau = t × burst`, both in nanoseconds.
    Limited {
        t: u64,
        tau: u64,
    },
}

impl Gcra {
    /// A limiter admitting `rate_per_sec` cells per second, `burst` at once when idle.
    ///
    /// A rate of zero, below zero or NaN admits nothing; `f64::INFINITY` admits everything.
    /// The interval is rounded up to a whole nanosecond, so the limiter never exceeds the rate.
    pub fn new(rate_per_sec: f64, burst: NonZeroU32) -> Gcra {
        Gcra {
            tat: AtomicU64::new(Time::ZERO.as_nanos()),
            interval: AtomicU64::new(interval_nanos(rate_per_sec)),
            burst: AtomicU32::new(burst.get()),
        }
    }

    /// A limiter admitting `per_minute` cells per minute: the unit OpenAI's limits are given in.
    #[cfg(test)]
    pub fn per_minute(per_minute: f64, burst: NonZeroU32) -> Gcra {
        Gcra::new(per_minute / 60.0, burst)
    }

    /// A limiter that admits everything.
    pub fn unlimited() -> Gcra {
        Gcra::new(f64::INFINITY, NonZeroU32::MIN)
    }

    /// Admits one cell at `now` and consumes it, or returns the earliest time it would be admitted.
    pub fn try_acquire(&self, now: Time) -> Result<(), Time> {
        match self.mode() {
            Mode::Unlimited => Ok(()),
            Mode::Closed => Err(Time::NEVER),
            Mode::Limited { t, tau } => self
                .tat
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                    next_tat(tat, now.as_nanos(), t, tau)
                })
                .map(drop)
                .map_err(|tat| earliest(tat, now.as_nanos(), t, tau)),
        }
    }

    /// Like [`Gcra::try_acquire`] but only looks: the state does not change.
    pub fn check(&self, now: Time) -> Result<(), Time> {
        match self.mode() {
            Mode::Unlimited => Ok(()),
            Mode::Closed => Err(Time::NEVER),
            Mode::Limited { t, tau } => {
                let tat = self.tat.load(Ordering::Acquire);
                match next_tat(tat, now.as_nanos(), t, tau) {
                    Some(_) => Ok(()),
                    None => Err(earliest(tat, now.as_nanos(), t, tau)),
                }
            }
        }
    }

    /// When the `n`-th cell from `from` on conforms, if the ones before it are taken as soon
    /// as they conform (`n = 1` at `from = now` is [`Gcra::check`]'s answer):
    /// `max(from, max(tat, from) + n·T − τ)`.
    pub fn nth_conforms(&self, from: Time, n: u32) -> Time {
        match self.mode() {
            Mode::Unlimited => from,
            Mode::Closed => Time::NEVER,
            Mode::Limited { t, tau } => {
                let tat = self.tat.load(Ordering::Acquire).max(from.as_nanos());
                let at = t
                    .checked_mul(u64::from(n.max(1)))
                    .and_then(|span| tat.checked_add(span))
                    .map_or(Time::NEVER, |end| Time::from_nanos(end.saturating_sub(tau)));
                at.max(from)
            }
        }
    }

    /// Gives back one cell taken by [`Gcra::try_acquire`] that was not used.
    ///
    /// The TAT moves back by one interval (at the current rate), saturating at the origin. A TAT
    /// in the past means "idle", so refunding more than was taken never grants more than a burst.
    pub fn refund(&self) {
        if let Mode::Limited { t, .. } = self.mode() {
            // The closure always returns `Some`, so the update cannot fail.
            let _ = self
                .tat
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                    Some(tat.saturating_sub(t))
                });
        }
    }

    /// Changes the rate and burst in place, keeping the TAT (see the module docs).
    pub fn set_rate(&self, rate_per_sec: f64, burst: NonZeroU32) {
        self.interval
            .store(interval_nanos(rate_per_sec), Ordering::Relaxed);
        self.burst.store(burst.get(), Ordering::Relaxed);
    }

    /// The rate in cells per second (after rounding the interval); `None` when unlimited.
    pub fn rate_per_sec(&self) -> Option<f64> {
        match self.interval.load(Ordering::Relaxed) {
            UNLIMITED => None,
            CLOSED => Some(0.0),
            t => Some(NANOS_PER_SEC / t as f64),
        }
    }

    /// The number of cells admitted back to back when idle.
    pub fn burst(&self) -> u32 {
        self.burst.load(Ordering::Relaxed)
    }

    fn mode(&self) -> Mode {
        match self.interval.load(Ordering::Relaxed) {
            UNLIMITED => Mode::Unlimited,
            CLOSED => Mode::Closed,
            t => {
                let burst = u64::from(self.burst());
                Mode::Limited {
                    t,
                    tau: t.saturating_mul(burst),
                }
            }
        }
    }
}

/// The emission interval for a rate, in whole nanoseconds rounded up.
fn interval_nanos(rate_per_sec: f64) -> u64 {
    if rate_per_sec.is_nan() || rate_per_sec <= 0.0 {
        CLOSED
    } else if rate_per_sec.is_infinite() {
        UNLIMITED
    } else {
        // `as` saturates; the bounds keep the special values for the special rates.
        ((NANOS_PER_SEC / rate_per_sec).ceil() as u64).clamp(1, CLOSED - 1)
    }
}

/// The TAT after admitting a cell at `now`, or `None` if the cell does not conform.
fn next_tat(tat: u64, now: u64, t: u64, tau: u64) -> Option<u64> {
    let next = cmp::max(tat, now).checked_add(t)?;
    (next - now <= tau).then_some(next)
}

/// The earliest time a cell refused at `now` conforms: when `tat + t - tau` is reached.
fn earliest(tat: u64, now: u64, t: u64, tau: u64) -> Time {
    match cmp::max(tat, now).checked_add(t) {
        // `tat + t` cannot overflow when `max(tat, now) + t` does not.
        Some(_) => Time::from_nanos((tat + t).saturating_sub(tau)),
        None => Time::NEVER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn burst(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("test bursts are non-zero")
    }

    fn ms(millis: u64) -> Time {
        Time::from_millis(millis)
    }

    #[test]
    fn admits_the_burst_at_once_then_one_per_interval() {
        let gcra = Gcra::new(10.0, burst(3));
        for _ in 0..3 {
            assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        }
        assert_eq!(gcra.try_acquire(ms(0)), Err(ms(100)));
        assert_eq!(gcra.try_acquire(ms(99)), Err(ms(100)));
        assert_eq!(gcra.try_acquire(ms(100)), Ok(()));
        assert_eq!(gcra.try_acquire(ms(100)), Err(ms(200)));
        assert_eq!(gcra.try_acquire(ms(200)), Ok(()));
    }

    #[test]
    fn an_idle_limiter_refills_to_the_burst_and_no_further() {
        let gcra = Gcra::per_minute(60.0, burst(2));
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        let later = Time::from_secs(3600);
        assert_eq!(gcra.try_acquire(later), Ok(()));
        assert_eq!(gcra.try_acquire(later), Ok(()));
        assert_eq!(gcra.try_acquire(later), Err(later + Duration::from_secs(1)));
    }

    #[test]
    fn check_does_not_consume() {
        let gcra = Gcra::new(1.0, burst(1));
        for _ in 0..5 {
            assert_eq!(gcra.check(ms(0)), Ok(()));
        }
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        assert_eq!(gcra.check(ms(0)), Err(ms(1000)));
        assert_eq!(gcra.check(ms(500)), Err(ms(1000)));
        assert_eq!(gcra.try_acquire(ms(0)), Err(ms(1000)));
    }

    #[test]
    fn nth_conforms_counts_the_cells_before() {
        let gcra = Gcra::new(10.0, burst(2));
        assert_eq!(gcra.nth_conforms(ms(0), 1), ms(0));
        assert_eq!(gcra.nth_conforms(ms(0), 2), ms(0));
        assert_eq!(gcra.nth_conforms(ms(0), 3), ms(100));
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        assert_eq!(Err(gcra.nth_conforms(ms(0), 1)), gcra.check(ms(0)));
        assert_eq!(gcra.nth_conforms(ms(0), 3), ms(300));
        // From a later instant (a rest that ends then), the burst is back by then.
        assert_eq!(gcra.nth_conforms(ms(1000), 2), ms(1000));
        assert_eq!(gcra.nth_conforms(ms(1000), 3), ms(1100));
        assert_eq!(Gcra::unlimited().nth_conforms(ms(7), 9), ms(7));
        assert_eq!(Gcra::new(0.0, burst(1)).nth_conforms(ms(7), 1), Time::NEVER);
    }

    #[test]
    fn refund_gives_a_cell_back() {
        let gcra = Gcra::new(1.0, burst(2));
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        assert!(gcra.check(ms(0)).is_err());
        gcra.refund();
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        assert_eq!(gcra.try_acquire(ms(0)), Err(ms(1000)));
    }

    #[test]
    fn refunds_on_an_idle_limiter_never_exceed_the_burst() {
        let gcra = Gcra::new(1.0, burst(2));
        for _ in 0..10 {
            gcra.refund();
        }
        let now = Time::from_secs(100);
        assert_eq!(gcra.try_acquire(now), Ok(()));
        assert_eq!(gcra.try_acquire(now), Ok(()));
        assert!(gcra.try_acquire(now).is_err());
    }

    #[test]
    fn set_rate_keeps_the_debt() {
        let gcra = Gcra::new(1.0, burst(2));
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        gcra.set_rate(2.0, burst(2));
        assert_eq!(gcra.rate_per_sec(), Some(2.0));
        assert_eq!(gcra.burst(), 2);
        // TAT is still 2 s: the next cell conforms at 2 s + 0.5 s - 1 s.
        assert_eq!(gcra.try_acquire(ms(0)), Err(ms(1500)));
        assert_eq!(gcra.try_acquire(ms(1500)), Ok(()));
        assert_eq!(gcra.try_acquire(ms(1500)), Err(ms(2000)));
    }

    #[test]
    fn the_interval_rounds_up_so_the_rate_is_never_exceeded() {
        let gcra = Gcra::new(3.0, burst(1));
        assert!(gcra.rate_per_sec().is_some_and(|rate| rate < 3.0));
        assert_eq!(gcra.try_acquire(Time::ZERO), Ok(()));
        assert_eq!(
            gcra.try_acquire(Time::ZERO),
            Err(Time::from_nanos(333_333_334))
        );
    }

    #[test]
    fn unlimited_admits_everything() {
        let gcra = Gcra::unlimited();
        assert_eq!(gcra.rate_per_sec(), None);
        for _ in 0..10_000 {
            assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        }
        gcra.refund();
        assert_eq!(gcra.check(ms(0)), Ok(()));
    }

    #[test]
    fn switching_between_unlimited_and_limited_works() {
        let gcra = Gcra::unlimited();
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        gcra.set_rate(1.0, burst(1));
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
        assert_eq!(gcra.try_acquire(ms(0)), Err(ms(1000)));
        gcra.set_rate(f64::INFINITY, burst(1));
        assert_eq!(gcra.try_acquire(ms(0)), Ok(()));
    }

    #[test]
    fn a_rate_of_zero_negative_or_nan_admits_nothing() {
        for rate in [0.0, -0.0, -1.0, f64::NEG_INFINITY, f64::NAN] {
            let gcra = Gcra::new(rate, burst(5));
            assert_eq!(gcra.rate_per_sec(), Some(0.0), "rate {rate}");
            assert_eq!(gcra.try_acquire(ms(0)), Err(Time::NEVER), "rate {rate}");
            assert_eq!(gcra.check(Time::NEVER), Err(Time::NEVER), "rate {rate}");
            gcra.refund();
        }
    }

    #[test]
    fn extreme_rates_do_not_panic() {
        let slow = Gcra::new(1e-30, burst(5));
        assert_eq!(slow.try_acquire(ms(0)), Ok(()));
        assert_eq!(slow.try_acquire(ms(0)), Err(Time::NEVER));
        let fast = Gcra::new(f64::MAX, burst(u32::MAX));
        assert_eq!(fast.rate_per_sec(), Some(1e9));
        assert_eq!(fast.try_acquire(Time::from_secs(1)), Ok(()));
        assert_eq!(fast.try_acquire(Time::NEVER), Err(Time::NEVER));
        let late = Gcra::new(1.0, burst(1));
        assert_eq!(late.try_acquire(Time::NEVER), Err(Time::NEVER));
    }

    #[test]
    fn is_send_sync_and_debug() {
        fn assert_traits<T: Send + Sync + std::fmt::Debug>() {}
        assert_traits::<Gcra>();
        assert!(format!("{:?}", Gcra::new(1.0, burst(3))).contains("burst: 3"));
    }

    #[test]
    fn two_threads_share_exactly_one_burst() {
        const BURST: u32 = 1000;
        let gcra = Gcra::new(1.0, burst(BURST));
        let now = Time::from_secs(7);
        let admitted: u32 = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        (0..BURST)
                            .map(|_| u32::from(gcra.try_acquire(now).is_ok()))
                            .sum::<u32>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("worker does not panic"))
                .sum()
        });
        assert_eq!(admitted, BURST);
    }

    proptest! {
        #[test]
        fn never_admits_more_than_rate_times_window_plus_burst(
            rate in 0.1f64..10_000.0,
            burst_size in 1u32..50,
            start in 0u64..1_000_000_000_000,
            gaps in prop::collection::vec(0.0f64..2.5, 1..300),
        ) {
            let gcra = Gcra::new(rate, burst(burst_size));
            let interval = 1e9 / rate;
            let mut now = Time::from_nanos(start);
            let mut admitted = 0u32;
            for gap in gaps {
                now = now + Duration::from_nanos((gap * interval) as u64);
                match gcra.try_acquire(now) {
                    Ok(()) => admitted += 1,
                    Err(at) => {
                        prop_assert!(at > now);
                        prop_assert_eq!(gcra.check(at), Ok(()));
                        prop_assert!(gcra.check(at - Duration::from_nanos(1)).is_err());
                    }
                }
            }
            let window = now.saturating_since(Time::from_nanos(start)).as_secs_f64();
            let bound = rate * window + f64::from(burst_size);
            prop_assert!(
                f64::from(admitted) <= bound + 1e-6,
                "admitted {} > bound {}", admitted, bound
            );
        }

        #[test]
        fn cells_spaced_at_the_interval_are_admitted_after_the_burst(
            rate in 0.1f64..10_000.0,
            burst_size in 1u32..50,
            start in 0u64..1_000_000_000_000,
            steps in 1u64..200,
        ) {
            let gcra = Gcra::new(rate, burst(burst_size));
            let t = gcra.interval.load(Ordering::Relaxed);
            let mut now = Time::from_nanos(start);
            for _ in 0..burst_size {
                prop_assert_eq!(gcra.try_acquire(now), Ok(()));
            }
            prop_assert_eq!(gcra.try_acquire(now), Err(now + Duration::from_nanos(t)));
            for _ in 0..steps {
                let next = now + Duration::from_nanos(t);
                prop_assert_eq!(gcra.try_acquire(next - Duration::from_nanos(1)), Err(next));
                prop_assert_eq!(gcra.try_acquire(next), Ok(()));
                now = next;
            }
        }
    }
}
