//! The server's clock and randomness, handed to kcp-core as inputs.
//!
//! kcp-core reads no clock: the server maps `tokio::time::Instant` onto [`kcp_core::Time`]
//! from one process-wide origin, and gives each worker thread its own cheap random
//! generator, seeded once from the wall clock and the thread id.
//!
//! The clock is tokio's so that tests can pause it (`tokio::time::pause`) and advance it on
//! purpose: waits, cooldowns, re-checks and drains then run in no real time and no test
//! has to compare wall-clock durations. Outside a paused runtime tokio's `Instant` is the
//! monotonic clock.

use std::cell::RefCell;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kcp_core::{Random, SplitMix64, Time};
use tokio::time::Instant;

/// How far before its first reading the origin lies. A paused runtime's clock starts when
/// the runtime is built and then moves only when told: a test runtime built before another
/// thread first read the clock must still be after the origin, or its times would all
/// saturate to zero.
const ORIGIN_LEAD: Duration = Duration::from_secs(3_600);

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(|| {
        let first = std::time::Instant::now();
        Instant::from_std(first.checked_sub(ORIGIN_LEAD).unwrap_or(first))
    })
}

/// Now, on kcp-core's timeline.
pub fn now() -> Time {
    to_time(Instant::now())
}

/// An `Instant` on kcp-core's timeline.
pub fn to_time(instant: impl Into<Instant>) -> Time {
    let instant: Instant = instant.into();
    let since = instant.saturating_duration_since(origin());
    Time::from_nanos(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
}

/// A kcp-core time as an `Instant` on tokio's clock (for `tokio::time::sleep_until`, via
/// `into()`; a std `Instant` so callers holding either kind convert without a lint).
pub fn to_instant(time: Time) -> std::time::Instant {
    (origin() + Duration::from_nanos(time.as_nanos())).into_std()
}

/// The wall clock as a duration since the Unix epoch (for HTTP-date `Retry-After`).
pub fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

thread_local! {
    static RNG: RefCell<SplitMix64> = RefCell::new(SplitMix64::new(seed()));
}

fn seed() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(unix_now().as_nanos());
    hasher.finish()
}

/// Makes this thread's generator name `lane` to the key pool ([`Random::lane`]): a worker
/// thread ([`crate::ops::workers`]) slides the fair queue's windows with a cursor of its own,
/// from its own part of the keys, so two workers do not write the same cursor and tags.
pub fn enter_lane(lane: usize) {
    RNG.with(|rng| {
        let mut rng = rng.borrow_mut();
        *rng = rng.clone().in_lane(lane);
    });
}

/// Runs `f` with this thread's random generator.
pub fn with_rng<T>(f: impl FnOnce(&mut dyn Random) -> T) -> T {
    RNG.with(|rng| f(&mut *rng.borrow_mut()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_round_trips_through_instants() {
        let t = now();
        let back = to_time(to_instant(t));
        assert_eq!(back, t);
        assert!(with_rng(|r| r.below(10)) < 10);
    }

    #[test]
    fn a_thread_names_its_lane_to_the_pool_once_it_entered_one() {
        std::thread::spawn(|| {
            assert_eq!(with_rng(|r| r.lane()), 0);
            enter_lane(1);
            assert_eq!(with_rng(|r| r.lane()), 1);
        })
        .join()
        .expect("the thread ends");
    }

    #[tokio::test(start_paused = true)]
    async fn paused_time_moves_only_when_advanced() {
        let before = now();
        assert!(before > Time::ZERO, "a fresh runtime lies after the origin");
        assert_eq!(now(), before, "paused: no time passes by itself");
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(now().saturating_since(before), Duration::from_millis(1_500));
        tokio::time::sleep_until(to_instant(before + Duration::from_secs(60)).into()).await;
        assert_eq!(now(), before + Duration::from_secs(60));
    }
}
