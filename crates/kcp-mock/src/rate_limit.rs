//! OpenAI's per-key rate limiting, played by the mock.
//!
//! OpenAI meters each key with buckets of requests (and tokens) per minute that refill
//! continuously rather than resetting once a minute, and that hold only a few seconds' worth:
//! a key with 60 RPM cannot send 60 requests in its first second. Every answer carries
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`; an empty bucket answers 429
//! `rate_limit_exceeded` with `retry-after-ms` and `retry-after`. The demo's busy key and
//! load tests of the whole proxy need exactly this behaviour, so it is a bucket here rather
//! than a script of canned 429s.
//!
//! Time is read through `tokio::time::Instant`, so tests can pause and advance it.

use std::num::NonZeroU32;
use std::time::Duration;

use tokio::time::Instant;

/// A key's limits: `rpm` requests and optionally `tpm` tokens per minute, with buckets that
/// hold `burst` worth of each (at least one request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per minute.
    pub rpm: NonZeroU32,
    /// Tokens per minute, if tokens are metered too.
    pub tpm: Option<NonZeroU32>,
    /// How much of the per-minute rate a full bucket holds.
    pub burst: Duration,
}

impl RateLimit {
    /// Bucket size when none is given: a few seconds' worth, as OpenAI's are.
    pub const DEFAULT_BURST: Duration = Duration::from_secs(3);

    /// `rpm` requests per minute, no token limit, [`RateLimit::DEFAULT_BURST`].
    pub fn per_minute(rpm: NonZeroU32) -> Self {
        RateLimit {
            rpm,
            tpm: None,
            burst: Self::DEFAULT_BURST,
        }
    }

    /// Also meters `tpm` tokens per minute.
    pub fn with_tokens(mut self, tpm: NonZeroU32) -> Self {
        self.tpm = Some(tpm);
        self
    }

    /// A bucket holding `burst` worth of the rate.
    pub fn with_burst(mut self, burst: Duration) -> Self {
        self.burst = burst;
        self
    }
}

/// One refilling bucket: `capacity` units, `per_sec` back each second.
#[derive(Clone, Copy, Debug)]
struct Meter {
    capacity: f64,
    per_sec: f64,
    level: f64,
}

impl Meter {
    fn new(per_minute: NonZeroU32, burst: Duration) -> Self {
        let per_sec = f64::from(per_minute.get()) / 60.0;
        let capacity = (per_sec * burst.as_secs_f64()).max(1.0);
        Meter {
            capacity,
            per_sec,
            level: capacity,
        }
    }

    fn refill(&mut self, elapsed: Duration) {
        self.level = (self.level + elapsed.as_secs_f64() * self.per_sec).min(self.capacity);
    }

    /// Time until `amount` units are in the bucket.
    fn wait_for(&self, amount: f64) -> Duration {
        secs((amount.min(self.capacity) - self.level).max(0.0) / self.per_sec)
    }

    fn until_full(&self) -> Duration {
        self.wait_for(self.capacity)
    }

    fn remaining(&self) -> u64 {
        whole(self.level)
    }
}

/// What the bucket said about one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Served; these headers go on the answer.
    Granted(Headers),
    /// Refused with 429: `retry_after` until it would be served, and which limit ran out.
    Exceeded {
        retry_after: Duration,
        limit: Exhausted,
        headers: Headers,
    },
}

/// The limit a refused request ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exhausted {
    Requests,
    Tokens,
}

/// OpenAI's `x-ratelimit-*` headers for one answer, in order.
pub type Headers = Vec<(&'static str, String)>;

/// The live state of one key's limits.
#[derive(Clone, Debug)]
pub struct Bucket {
    limit: RateLimit,
    requests: Meter,
    tokens: Option<Meter>,
    updated: Instant,
}

impl Bucket {
    /// Full buckets at `now`.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Bucket {
            limit,
            requests: Meter::new(limit.rpm, limit.burst),
            tokens: limit.tpm.map(|tpm| Meter::new(tpm, limit.burst)),
            updated: now,
        }
    }

    /// Takes one request of `tokens` tokens at `now`, or says how long until it would fit.
    pub fn take(&mut self, tokens: u64, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.updated);
        self.updated = now;
        self.requests.refill(elapsed);
        if let Some(meter) = &mut self.tokens {
            meter.refill(elapsed);
        }
        let tokens = tokens as f64;
        let request_wait = self.requests.wait_for(1.0);
        let token_wait = self.tokens.map_or(Duration::ZERO, |m| m.wait_for(tokens));
        if request_wait.is_zero() && token_wait.is_zero() {
            self.requests.level -= 1.0;
            if let Some(meter) = &mut self.tokens {
                meter.level = (meter.level - tokens).max(0.0);
            }
            return Verdict::Granted(self.headers());
        }
        let limit = if request_wait >= token_wait {
            Exhausted::Requests
        } else {
            Exhausted::Tokens
        };
        Verdict::Exceeded {
            retry_after: request_wait.max(token_wait),
            limit,
            headers: self.headers(),
        }
    }

    /// The limits this bucket plays.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    fn headers(&self) -> Headers {
        let mut headers = vec![
            ("x-ratelimit-limit-requests", self.limit.rpm.to_string()),
            (
                "x-ratelimit-remaining-requests",
                self.requests.remaining().to_string(),
            ),
            (
                "x-ratelimit-reset-requests",
                go_duration(self.requests.until_full()),
            ),
        ];
        if let (Some(tpm), Some(meter)) = (self.limit.tpm, &self.tokens) {
            headers.push(("x-ratelimit-limit-tokens", tpm.to_string()));
            headers.push((
                "x-ratelimit-remaining-tokens",
                meter.remaining().to_string(),
            ));
            headers.push(("x-ratelimit-reset-tokens", go_duration(meter.until_full())));
        }
        headers
    }
}

/// A duration as OpenAI writes it: `"120ms"`, `"1.5s"`, `"6m0s"`.
pub fn go_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1_000 {
        return format!("{millis}ms");
    }
    let minutes = millis / 60_000;
    let rest = (millis % 60_000) as f64 / 1_000.0;
    let seconds = format!("{rest:.3}");
    let seconds = seconds.trim_end_matches('0').trim_end_matches('.');
    if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

fn secs(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX)
}

fn whole(value: f64) -> u64 {
    // `as` saturates and maps NaN to 0: exactly the floor wanted for a bucket level.
    value.floor() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpm(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    fn header<'a>(headers: &'a Headers, name: &str) -> &'a str {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .expect("header present")
    }

    #[test]
    fn a_full_bucket_serves_its_burst_then_refuses() {
        let start = Instant::now();
        // 60 RPM, 3 s of burst: 3 requests, then one per second.
        let mut bucket = Bucket::new(RateLimit::per_minute(rpm(60)), start);
        for left in [2, 1, 0] {
            let Verdict::Granted(headers) = bucket.take(10, start) else {
                panic!("request within the burst refused");
            };
            assert_eq!(header(&headers, "x-ratelimit-limit-requests"), "60");
            assert_eq!(
                header(&headers, "x-ratelimit-remaining-requests"),
                left.to_string()
            );
        }
        let Verdict::Exceeded {
            retry_after,
            limit,
            headers,
        } = bucket.take(10, start)
        else {
            panic!("the fourth request at once was served");
        };
        assert_eq!(retry_after, Duration::from_secs(1));
        assert_eq!(limit, Exhausted::Requests);
        assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");
        assert_eq!(header(&headers, "x-ratelimit-reset-requests"), "3s");
    }

    #[test]
    fn the_bucket_refills_continuously_and_never_past_full() {
        let start = Instant::now();
        let mut bucket = Bucket::new(RateLimit::per_minute(rpm(60)), start);
        for _ in 0..3 {
            assert!(matches!(bucket.take(1, start), Verdict::Granted(_)));
        }
        let later = start + Duration::from_millis(1_500);
        let Verdict::Granted(headers) = bucket.take(1, later) else {
            panic!("a refilled request was refused");
        };
        // 1.5 requests came back, one was spent: 0.5 left, 2.5 s until full.
        assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");
        assert_eq!(header(&headers, "x-ratelimit-reset-requests"), "2.5s");
        let Verdict::Exceeded { retry_after, .. } = bucket.take(1, later) else {
            panic!("half a request was served");
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        let much_later = later + Duration::from_secs(3_600);
        let Verdict::Granted(headers) = bucket.take(1, much_later) else {
            panic!("a full bucket refused");
        };
        assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "2");
    }

    #[test]
    fn tokens_run_out_before_requests() {
        let start = Instant::now();
        // 600 RPM (30 per 3 s) but 6000 TPM (300 tokens per 3 s, 100 per second).
        let limit = RateLimit::per_minute(rpm(600)).with_tokens(rpm(6_000));
        let mut bucket = Bucket::new(limit, start);
        let Verdict::Granted(headers) = bucket.take(250, start) else {
            panic!("250 of 300 tokens refused");
        };
        assert_eq!(header(&headers, "x-ratelimit-limit-tokens"), "6000");
        assert_eq!(header(&headers, "x-ratelimit-remaining-tokens"), "50");
        let Verdict::Exceeded {
            retry_after, limit, ..
        } = bucket.take(100, start)
        else {
            panic!("100 tokens served from 50");
        };
        assert_eq!(limit, Exhausted::Tokens);
        assert_eq!(retry_after, Duration::from_millis(500));
    }

    #[test]
    fn a_slow_key_holds_at_least_one_request() {
        let start = Instant::now();
        // 6 RPM with 3 s of burst would hold 0.3 requests: it holds one, then one per 10 s.
        let mut bucket = Bucket::new(RateLimit::per_minute(rpm(6)), start);
        assert!(matches!(bucket.take(1, start), Verdict::Granted(_)));
        let Verdict::Exceeded { retry_after, .. } = bucket.take(1, start) else {
            panic!("second request served");
        };
        assert_eq!(retry_after, Duration::from_secs(10));
    }

    #[test]
    fn durations_are_written_as_openai_does() {
        assert_eq!(go_duration(Duration::from_millis(17)), "17ms");
        assert_eq!(go_duration(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(6 * 60)), "6m0s");
        assert_eq!(go_duration(Duration::from_millis(61_250)), "1m1.25s");
    }
}
