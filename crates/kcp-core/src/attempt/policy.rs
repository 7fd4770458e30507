//! How hard one request tries: retries, their backoff, and how long it may wait for a key.

use std::time::Duration;

use super::queue::DelayControl;
use crate::rng::Random;

/// The retry and wait settings of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after upstream-class failures (key-class failovers do not count).
    pub max_retries: u32,
    /// Delay before each retry.
    pub backoff: Backoff,
    /// Longest a request waits, in all, for a key to free up.
    pub max_wait: Duration,
    /// Most times one request waits: enough for a throttled group's trial and a lost race or
    /// two, few enough that a provider answering every call with a short 429 cannot multiply
    /// one request into many calls.
    pub max_waits: u32,
    /// Most requests waiting at once ([`crate::WaitQueue`]).
    pub max_queue: usize,
    /// The wait queue's delay target: past it, for an interval, excess is shed at once.
    pub queue_delay: DelayControl,
    /// Longest rest a 503's `Retry-After` may order for a key: one provider answer must not
    /// bench a key for long while the request moves on to another.
    pub max_unavailable_rest: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        let backoff = Backoff::default();
        RetryPolicy {
            max_retries: 3,
            backoff,
            max_wait: Duration::from_secs(5),
            max_waits: 3,
            max_queue: 1024,
            queue_delay: DelayControl::default(),
            max_unavailable_rest: backoff.max,
        }
    }
}

/// Delay before retrying an upstream failure: exponential backoff with full jitter.
///
/// The ceiling doubles per retry from `initial` up to `max`, and the delay is drawn uniformly
/// below it ("full jitter", Brooker, *Exponential Backoff And Jitter*, AWS Architecture Blog,
/// 2015): clients that failed together do not come back together, which matters most when
/// the provider is overloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first retry's delay.
    pub initial: Duration,
    /// Largest ceiling.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// The ceiling of retry number `retry` (0 for the first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        self.initial
            .saturating_mul(1u32 << retry.min(31))
            .min(self.max)
    }

    /// The delay before retry number `retry`: uniform in `[0, ceiling(retry)]`.
    pub fn delay<R: Random + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        self.ceiling(retry).mul_f64(rng.unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

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

    #[test]
    fn defaults_cap_a_503_rest_at_the_backoff_ceiling() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_unavailable_rest, p.backoff.max);
        assert_eq!((p.max_retries, p.max_waits, p.max_queue), (3, 3, 1024));
    }
}
