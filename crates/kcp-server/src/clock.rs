//! The server's clock and randomness, handed to kcp-core as inputs.
//!
//! kcp-core reads no clock: the server maps `std::time::Instant` onto [`kcp_core::Time`]
//! from one process-wide origin, and gives each worker thread its own cheap random
//! generator, seeded once from the wall clock and the thread id.

use std::cell::RefCell;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kcp_core::{Random, SplitMix64, Time};

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Now, on kcp-core's timeline.
pub fn now() -> Time {
    to_time(Instant::now())
}

/// An `Instant` on kcp-core's timeline.
pub fn to_time(instant: Instant) -> Time {
    let since = instant.saturating_duration_since(origin());
    Time::from_nanos(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
}

/// A kcp-core time as an `Instant` (for timers).
pub fn to_instant(time: Time) -> Instant {
    origin() + Duration::from_nanos(time.as_nanos())
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
}
