//! Delay before retrying an upstream failure: exponential backoff with full jitter.
//!
//! The ceiling doubles per retry from `retry_initial_backoff_ms` up to `retry_max_backoff_ms`,
//! and the delay is drawn uniformly below it ("full jitter", Brooker, *Exponential Backoff
//! And Jitter*, AWS Architecture Blog, 2015): clients that failed together do not come back
//! together, which matters most when the provider is overloaded.

use std::time::Duration;

use kcp_core::Random;

/// The retry delay policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first retry's delay.
    pub initial: Duration,
    /// Largest ceiling.
    pub max: Duration,
}

impl Backoff {
    /// The ceiling of retry number `retry` (0 for the first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        self.initial
            .saturating_mul(1u32 << retry.min(31))
            .min(self.max)
    }

    /// The delay before retry number `retry`: uniform in `[0, ceiling(retry)]`.
    pub fn delay(&self, retry: u32, rng: &mut dyn Random) -> Duration {
        self.ceiling(retry).mul_f64(rng.unit())
    }
}

#[cfg(test)]
mod tests {
    use kcp_core::SplitMix64;

    use super::*;

    const POLICY: Backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(2000),
    };

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let ceilings: Vec<u128> = (0..8).map(|r| POLICY.ceiling(r).as_millis()).collect();
        assert_eq!(ceilings, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(POLICY.ceiling(u32::MAX), POLICY.max);
    }

    #[test]
    fn delays_are_jittered_below_the_ceiling() {
        let mut rng = SplitMix64::new(1);
        let delays: Vec<Duration> = (0..200).map(|_| POLICY.delay(3, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= POLICY.ceiling(3)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 150, "jittered, not constant");
        let mean = delays.iter().sum::<Duration>() / 200;
        assert!(mean > Duration::from_millis(150) && mean < Duration::from_millis(250));
    }
}
