//! How long a rate-limited key rests.
//!
//! The provider's word wins: `retry-after-ms`, then `retry-after` (seconds or HTTP-date),
//! then the reset of whichever budget the 429 says is empty (`x-ratelimit-reset-*` with
//! `remaining = 0`). Without any of these the key rests 1 s, doubling per consecutive 429 up
//! to 60 s. A later deadline always wins over an earlier one: a second, shorter 429 never
//! shortens a rest already ordered.

use std::time::Duration;

use crate::ratelimit_headers::RateLimitHeaders;
use crate::time::Time;

/// First rest without headers.
pub const BASE: Duration = Duration::from_secs(1);
/// Longest rest without headers.
pub const MAX: Duration = Duration::from_secs(60);
/// Longest rest a provider can order: a day (daily limits reset within one). A larger or
/// garbled `Retry-After` must not park a key for centuries.
pub const MAX_PROVIDER_REST: Duration = Duration::from_secs(24 * 3600);

/// A key's rate-limit rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cooldown {
    until: Time,
    streak: u32,
}

impl Cooldown {
    /// A 429 at `now`: extends the rest and returns the deadline now in force.
    pub fn rate_limited(&mut self, limits: &RateLimitHeaders, now: Time) -> Time {
        let rest = provider_rest(limits)
            .map(|r| r.min(MAX_PROVIDER_REST))
            .unwrap_or_else(|| {
                let doublings = self.streak.min(16);
                (BASE * 2u32.pow(doublings)).min(MAX)
            });
        self.streak = self.streak.saturating_add(1);
        self.until = self.until.max(now + rest);
        self.until
    }

    /// The provider asked (a 503's `Retry-After`) not to come back before `until`: extends
    /// the rest without counting a 429 towards the header-less backoff.
    pub fn rest_until(&mut self, now: Time, rest: Duration) {
        self.until = self.until.max(now + rest.min(MAX_PROVIDER_REST));
    }

    /// Whether no 429 streak is running (a success would change nothing).
    pub fn is_calm(&self) -> bool {
        self.streak == 0
    }

    /// A success: the next header-less 429 starts again at [`BASE`].
    pub fn succeeded(&mut self) {
        self.streak = 0;
    }

    /// Until when the key rests (in the past when it does not).
    pub fn until(&self) -> Time {
        self.until
    }

    /// Ends the rest at once (an operator re-enabled the key).
    pub fn clear(&mut self) {
        *self = Cooldown::default();
    }
}

/// The rest the provider asked for, if its headers say.
pub fn provider_rest(limits: &RateLimitHeaders) -> Option<Duration> {
    limits.retry_after.or_else(|| {
        let requests = limits
            .reset_requests
            .filter(|_| limits.remaining_requests == Some(0));
        let tokens = limits
            .reset_tokens
            .filter(|_| limits.remaining_tokens == Some(0));
        requests.max(tokens)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn provider_deadline_is_honoured() {
        let mut c = Cooldown::default();
        let limits = RateLimitHeaders {
            retry_after: Some(Duration::from_millis(1500)),
            ..Default::default()
        };
        assert_eq!(
            c.rate_limited(&limits, Time::from_secs(10)),
            Time::from_millis(11_500)
        );
    }

    #[test]
    fn empty_budget_reset_is_used_without_retry_after() {
        let mut c = Cooldown::default();
        let limits = RateLimitHeaders {
            remaining_requests: Some(0),
            reset_requests: Some(Duration::from_secs(6)),
            remaining_tokens: Some(500),
            reset_tokens: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        assert_eq!(c.rate_limited(&limits, Time::ZERO), Time::from_secs(6));
    }

    #[test]
    fn without_headers_backs_off_exponentially_to_a_minute() {
        let mut c = Cooldown::default();
        let none = RateLimitHeaders::default();
        let mut now = Time::ZERO;
        let mut rests = Vec::new();
        for _ in 0..9 {
            let until = c.rate_limited(&none, now);
            rests.push(until.saturating_since(now).as_secs());
            now = until;
        }
        assert_eq!(rests, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        c.succeeded();
        assert_eq!(c.rate_limited(&none, now), now + BASE);
    }

    #[test]
    fn a_503_rest_does_not_count_as_a_429() {
        let mut c = Cooldown::default();
        c.rest_until(Time::ZERO, Duration::from_secs(30));
        assert_eq!(c.until(), Time::from_secs(30));
        assert!(c.is_calm());
        c.rest_until(Time::ZERO, Duration::from_secs(10));
        assert_eq!(c.until(), Time::from_secs(30), "a later deadline wins");
        let none = RateLimitHeaders::default();
        assert_eq!(
            c.rate_limited(&none, Time::from_secs(40)),
            Time::from_secs(41)
        );
    }

    #[test]
    fn absurd_provider_rests_are_capped_at_a_day() {
        let mut c = Cooldown::default();
        let limits = RateLimitHeaders {
            retry_after: Some(Duration::MAX),
            ..Default::default()
        };
        assert_eq!(
            c.rate_limited(&limits, Time::ZERO),
            Time::ZERO + MAX_PROVIDER_REST
        );
        c.rest_until(Time::ZERO, Duration::MAX);
        assert_eq!(c.until(), Time::ZERO + MAX_PROVIDER_REST);
    }

    #[test]
    fn a_provider_rest_of_hours_is_honoured_up_to_a_day() {
        let mut c = Cooldown::default();
        let two_hours = RateLimitHeaders {
            retry_after: Some(Duration::from_secs(2 * 3600)),
            ..Default::default()
        };
        assert_eq!(
            c.rate_limited(&two_hours, Time::ZERO),
            Time::from_secs(7_200)
        );
        let two_days = RateLimitHeaders {
            retry_after: Some(Duration::from_secs(48 * 3600)),
            ..Default::default()
        };
        assert_eq!(
            c.rate_limited(&two_days, Time::ZERO),
            Time::from_secs(86_400)
        );
    }

    #[test]
    fn a_429_streak_is_not_calm_until_a_success() {
        let mut c = Cooldown::default();
        assert!(c.is_calm());
        c.rate_limited(&RateLimitHeaders::default(), Time::ZERO);
        assert!(!c.is_calm(), "a 429 streak runs");
        c.succeeded();
        assert!(c.is_calm());
    }

    #[test]
    fn clearing_ends_the_rest_and_the_streak() {
        let mut c = Cooldown::default();
        let none = RateLimitHeaders::default();
        for _ in 0..3 {
            c.rate_limited(&none, Time::ZERO);
        }
        assert_eq!(c.until(), Time::from_secs(4));
        c.clear();
        assert_eq!(c.until(), Time::ZERO, "no rest left");
        assert!(c.is_calm());
        assert_eq!(
            c.rate_limited(&none, Time::from_secs(1)),
            Time::from_secs(2),
            "the next header-less 429 starts again at BASE"
        );
    }

    proptest! {
        /// A later deadline always wins: the rest never shrinks, whatever arrives.
        #[test]
        fn cooldown_is_monotonic(events in prop::collection::vec((0u64..120_000, prop::option::of(0u64..90_000)), 1..40)) {
            let mut c = Cooldown::default();
            let mut now = Time::ZERO;
            let mut last = Time::ZERO;
            for (step_ms, retry_ms) in events {
                now = now + Duration::from_millis(step_ms);
                let limits = RateLimitHeaders { retry_after: retry_ms.map(Duration::from_millis), ..Default::default() };
                let until = c.rate_limited(&limits, now);
                prop_assert!(until >= last);
                prop_assert!(until >= now);
                last = until;
            }
        }
    }
}
