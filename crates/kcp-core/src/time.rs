//! Time as an input.
//!
//! kcp-core never reads a clock (as in the governor crate): every call that depends on time
//! takes a [`Time`], a point on a monotonic timeline of the caller's choosing, counted in
//! nanoseconds. The server maps `std::time::Instant` onto it; tests and the simulator pass
//! a fake clock and never sleep.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on the caller's monotonic timeline, in nanoseconds since its origin.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(u64);

impl std::fmt::Debug for Time {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Time::NEVER {
            f.write_str("Time(never)")
        } else {
            write!(
                f,
                "Time({}.{:09}s)",
                self.0 / 1_000_000_000,
                self.0 % 1_000_000_000
            )
        }
    }
}

impl Time {
    /// The origin of the timeline.
    pub const ZERO: Time = Time(0);
    /// A time later than any real one: "never" for deadlines.
    pub const NEVER: Time = Time(u64::MAX);

    /// A point `nanos` nanoseconds after the origin.
    pub const fn from_nanos(nanos: u64) -> Self {
        Time(nanos)
    }

    /// A point `millis` milliseconds after the origin.
    pub const fn from_millis(millis: u64) -> Self {
        Time(millis.saturating_mul(1_000_000))
    }

    /// A point `secs` seconds after the origin.
    pub const fn from_secs(secs: u64) -> Self {
        Time(secs.saturating_mul(1_000_000_000))
    }

    /// Nanoseconds since the origin.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// Nanoseconds of a duration, saturating at `u64::MAX` (about 584 years).
pub(crate) fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, rhs: Duration) -> Time {
        Time(self.0.saturating_add(nanos(rhs)))
    }
}

impl Sub<Duration> for Time {
    type Output = Time;
    fn sub(self, rhs: Duration) -> Time {
        Time(self.0.saturating_sub(nanos(rhs)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(Time::NEVER + Duration::from_secs(1), Time::NEVER);
        assert_eq!(Time::ZERO - Duration::from_secs(1), Time::ZERO);
        assert_eq!(
            Time::from_secs(3).saturating_since(Time::from_secs(1)),
            Duration::from_secs(2)
        );
        assert_eq!(
            Time::from_secs(1).saturating_since(Time::from_secs(3)),
            Duration::ZERO
        );
    }

    #[test]
    fn debug_shows_seconds_or_never_and_subtraction_saturates() {
        assert_eq!(
            format!("{:?}", Time::from_millis(1_500)),
            "Time(1.500000000s)"
        );
        assert_eq!(format!("{:?}", Time::NEVER), "Time(never)");
        let t = Time::from_secs(10);
        assert_eq!(t - Duration::from_secs(4), Time::from_secs(6));
        assert_eq!(t - Duration::from_secs(40), Time::ZERO);
    }
}
