//! The provider model: per-key token buckets that answer like OpenAI.
//!
//! Each key has a request bucket holding `limit / 60 ×` [`BURST_SECS`] requests (at least
//! one) and optionally a token bucket holding [`TOKEN_BURST_SECS`] of its rate, full at the
//! start and refilling continuously at `limit / 60` per second: the provider's per-minute
//! limit enforced over a few seconds, as OpenAI documents ("limits may be quantized and
//! enforced over shorter periods").
//!
//! A request is admitted when it reaches the provider (the instant it is sent: the model has
//! no network delay) if its key's buckets hold one request and its tokens. Every answer
//! carries the headers OpenAI sends, as text, computed at admission:
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (remaining = whole cells left,
//! reset = time until the bucket is full again, written as a Go duration). A refusal is a 429
//! with `retry-after` (whole seconds, rounded up) and `retry-after-ms` (time until the
//! missing cells are back). Successes answer after a latency drawn uniformly from
//! [`LATENCY_MS`], refusals from [`REFUSAL_MS`] (a 429 is decided before any work).
//!
//! An optional organization throttle models a limit shared by the keys of one
//! organization: during each episode every request of the organization gets a 429 whose
//! `retry-after` is the time left in the episode, whatever the key's own budget.

use std::time::Duration;

use kcp_core::{Random, SplitMix64, Time};

/// Seconds of its per-minute rate a request bucket holds.
pub const BURST_SECS: f64 = 3.0;
/// Seconds of its per-minute rate a token bucket holds (enough for the largest request of
/// the workload on the smallest key of the token scenarios).
pub const TOKEN_BURST_SECS: f64 = 6.0;
/// Latency of an admitted request to response headers, in milliseconds (uniform).
pub const LATENCY_MS: (u64, u64) = (300, 800);
/// Latency of a 429, in milliseconds (uniform).
pub const REFUSAL_MS: (u64, u64) = (50, 150);

/// One key as the provider knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyLimits {
    /// Requests per minute.
    pub rpm: u32,
    /// Tokens per minute, if the provider enforces a token limit for the key.
    pub tpm: Option<u32>,
    /// The key's organization (keys of one organization form one throttle group in kcp).
    pub organization: Option<String>,
}

impl KeyLimits {
    /// A key limited to `rpm` requests per minute, no token limit, no organization.
    pub fn rpm(rpm: u32) -> Self {
        KeyLimits {
            rpm,
            tpm: None,
            organization: None,
        }
    }

    /// Sets a token limit.
    pub fn with_tpm(mut self, tpm: u32) -> Self {
        self.tpm = Some(tpm);
        self
    }

    /// Sets the organization.
    pub fn in_organization(mut self, organization: &str) -> Self {
        self.organization = Some(organization.to_owned());
        self
    }

    /// Requests the request bucket holds.
    pub fn request_capacity(&self) -> f64 {
        capacity(f64::from(self.rpm), BURST_SECS)
    }

    /// Tokens the token bucket holds, if there is one.
    pub fn token_capacity(&self) -> Option<f64> {
        self.tpm.map(|t| capacity(f64::from(t), TOKEN_BURST_SECS))
    }
}

/// Periodic throttles of one whole organization.
#[derive(Debug, Clone, PartialEq)]
pub struct OrgThrottle {
    /// The organization throttled.
    pub organization: String,
    /// Start of the first episode.
    pub first: Duration,
    /// Time from one episode's start to the next.
    pub every: Duration,
    /// Length of an episode.
    pub length: Duration,
}

impl OrgThrottle {
    /// The end of the episode under way at `now`, if one is.
    fn episode_end(&self, now: Time) -> Option<Time> {
        let t = Duration::from_nanos(now.as_nanos());
        let since = t.checked_sub(self.first)?;
        let k = since.as_nanos() / self.every.as_nanos().max(1);
        let start = self.first + self.every * u32::try_from(k).unwrap_or(u32::MAX);
        let end = start + self.length;
        (t < end).then(|| Time::from_nanos(u64::try_from(end.as_nanos()).unwrap_or(u64::MAX)))
    }

    /// Whether a request arriving at `at` could be served at all by a proxy that lets it
    /// wait up to `max_wait`: it does not arrive during an episode, or close enough to its end.
    pub fn servable(&self, at: Time, max_wait: Duration) -> bool {
        self.episode_end(at)
            .is_none_or(|end| end.saturating_since(at) <= max_wait)
    }

    /// How much of `[0, horizon)` episodes cover.
    pub fn throttled_within(&self, horizon: Duration) -> Duration {
        (0..self.episodes_before(horizon))
            .map(|k| {
                let start = self.first + self.every * k;
                (start + self.length).min(horizon).saturating_sub(start)
            })
            .sum()
    }

    /// Number of episodes that start before `horizon`.
    pub fn episodes_before(&self, horizon: Duration) -> u32 {
        match horizon.checked_sub(self.first) {
            Some(span) if !span.is_zero() => {
                let every = self.every.as_nanos().max(1);
                u32::try_from(span.as_nanos().div_ceil(every)).unwrap_or(u32::MAX)
            }
            _ => 0,
        }
    }
}

/// A continuously refilling bucket.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    capacity: f64,
    level: f64,
    last: Time,
}

fn capacity(per_minute: f64, burst_secs: f64) -> f64 {
    (per_minute / 60.0 * burst_secs).max(1.0)
}

impl Bucket {
    fn per_minute(per_minute: f64, burst_secs: f64) -> Self {
        let capacity = capacity(per_minute, burst_secs);
        Bucket {
            rate: per_minute / 60.0,
            capacity,
            level: capacity,
            last: Time::ZERO,
        }
    }

    fn refill(&mut self, now: Time) {
        let elapsed = now.saturating_since(self.last).as_secs_f64();
        self.level = (self.level + elapsed * self.rate).min(self.capacity);
        self.last = self.last.max(now);
    }

    /// Time until `amount` is in the bucket (zero if it is).
    fn wait_for(&self, amount: f64) -> Duration {
        let missing = amount.min(self.capacity) - self.level;
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / self.rate)
        }
    }

    fn remaining(&self) -> u64 {
        self.level.max(0.0).floor() as u64
    }

    fn reset(&self) -> Duration {
        Duration::from_secs_f64(((self.capacity - self.level) / self.rate).max(0.0))
    }
}

#[derive(Debug, Clone)]
struct KeyBuckets {
    limits: KeyLimits,
    requests: Bucket,
    tokens: Option<Bucket>,
}

/// The provider's answer to one call.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// 200 or 429.
    pub status: u16,
    /// Response headers as the provider writes them.
    pub headers: Vec<(&'static str, String)>,
    /// Time until the response headers arrive.
    pub latency: Duration,
    /// Whether the 429 came from the organization throttle.
    pub org_throttled: bool,
}

/// The simulated provider.
#[derive(Debug)]
pub struct Provider {
    keys: Vec<KeyBuckets>,
    org: Option<OrgThrottle>,
    rng: SplitMix64,
}

impl Provider {
    /// A provider for these keys, with full buckets at time zero.
    pub fn new(keys: &[KeyLimits], org: Option<OrgThrottle>, seed: u64) -> Self {
        Provider {
            keys: keys
                .iter()
                .map(|k| KeyBuckets {
                    limits: k.clone(),
                    requests: Bucket::per_minute(f64::from(k.rpm), BURST_SECS),
                    tokens: k
                        .tpm
                        .map(|t| Bucket::per_minute(f64::from(t), TOKEN_BURST_SECS)),
                })
                .collect(),
            org,
            rng: SplitMix64::new(seed),
        }
    }

    /// One call on key `key` costing `tokens`, arriving at `now`.
    pub fn call(&mut self, key: usize, tokens: u64, now: Time) -> Response {
        let throttled = self.org.as_ref().and_then(|org| {
            let member = self.keys[key].limits.organization.as_deref() == Some(&org.organization);
            member.then(|| org.episode_end(now)).flatten()
        });
        let k = &mut self.keys[key];
        k.requests.refill(now);
        if let Some(bucket) = &mut k.tokens {
            bucket.refill(now);
        }
        let need = tokens as f64;
        let wait = k.requests.wait_for(1.0).max(
            k.tokens
                .as_ref()
                .map_or(Duration::ZERO, |b| b.wait_for(need)),
        );
        let mut headers = Vec::with_capacity(9);
        let admitted = throttled.is_none() && wait.is_zero();
        if admitted {
            k.requests.level -= 1.0;
            if let Some(bucket) = &mut k.tokens {
                bucket.level -= need.min(bucket.capacity);
            }
        }
        push_budget(&mut headers, "requests", k.limits.rpm.into(), &k.requests);
        if let (Some(tpm), Some(bucket)) = (k.limits.tpm, &k.tokens) {
            push_budget(&mut headers, "tokens", tpm.into(), bucket);
        }
        let (status, range) = if admitted {
            (200, LATENCY_MS)
        } else {
            let rest = throttled.map_or(wait, |end| end.saturating_since(now));
            headers.push(("retry-after", rest.as_secs_f64().ceil().to_string()));
            headers.push((
                "retry-after-ms",
                rest.as_nanos().div_ceil(1_000_000).max(1).to_string(),
            ));
            (429, REFUSAL_MS)
        };
        let latency = Duration::from_millis(range.0 + self.rng.below(range.1 - range.0 + 1));
        Response {
            status,
            headers,
            latency,
            org_throttled: throttled.is_some(),
        }
    }
}

fn push_budget(
    headers: &mut Vec<(&'static str, String)>,
    what: &'static str,
    limit: u64,
    bucket: &Bucket,
) {
    let (l, r, s) = match what {
        "requests" => (
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ),
        _ => (
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ),
    };
    headers.push((l, limit.to_string()));
    headers.push((r, bucket.remaining().to_string()));
    headers.push((s, go_duration(bucket.reset())));
}

/// A duration written as Go's `time.Duration` prints it (`"850ms"`, `"1.5s"`, `"2m3.25s"`),
/// to the millisecond.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let minutes = ms / 60_000;
    let rest = ms % 60_000;
    let secs = trim(format!("{}.{:03}", rest / 1000, rest % 1000));
    if minutes == 0 {
        format!("{secs}s")
    } else {
        format!("{minutes}m{secs}s")
    }
}

fn trim(s: String) -> String {
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kcp_core::RateLimitHeaders;

    fn parse(answer: &Response) -> RateLimitHeaders {
        RateLimitHeaders::parse(
            answer.headers.iter().map(|(n, v)| (*n, v.as_bytes())),
            Duration::ZERO,
        )
    }

    #[test]
    fn go_durations_parse_back() {
        for (ms, text) in [
            (0, "0s"),
            (850, "850ms"),
            (1500, "1.5s"),
            (60_000, "1m0s"),
            (123_250, "2m3.25s"),
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(go_duration(d), text);
            assert_eq!(kcp_core::parse_reset(text), Some(d));
        }
    }

    #[test]
    fn bucket_admits_its_burst_then_refuses_with_an_exact_retry() {
        let mut p = Provider::new(&[KeyLimits::rpm(60)], None, 1);
        let t = Time::from_secs(10);
        for left in [2, 1, 0] {
            let a = p.call(0, 0, t);
            assert_eq!(a.status, 200);
            let h = parse(&a);
            assert_eq!(h.limit_requests, Some(60));
            assert_eq!(h.remaining_requests, Some(left));
        }
        let a = p.call(0, 0, t);
        assert_eq!(a.status, 429);
        assert_eq!(parse(&a).retry_after, Some(Duration::from_secs(1)));
        assert_eq!(p.call(0, 0, t + Duration::from_secs(1)).status, 200);
    }

    #[test]
    fn organization_episodes_refuse_every_member() {
        let org = OrgThrottle {
            organization: "o".to_owned(),
            first: Duration::from_secs(10),
            every: Duration::from_secs(100),
            length: Duration::from_secs(20),
        };
        assert_eq!(org.episodes_before(Duration::from_secs(10)), 0);
        assert_eq!(org.episodes_before(Duration::from_secs(11)), 1);
        assert_eq!(org.episodes_before(Duration::from_secs(600)), 6);
        assert_eq!(
            org.throttled_within(Duration::from_secs(515)),
            Duration::from_secs(20 * 5 + 5)
        );
        let keys = [
            KeyLimits::rpm(600).in_organization("o"),
            KeyLimits::rpm(600),
        ];
        let mut p = Provider::new(&keys, Some(org), 1);
        let t = Time::from_secs(115);
        assert!(
            !p.org
                .as_ref()
                .is_some_and(|o| o.servable(t, Duration::from_secs(5)))
        );
        assert!(
            p.org
                .as_ref()
                .is_some_and(|o| o.servable(Time::from_secs(125), Duration::from_secs(5)))
        );
        let a = p.call(0, 0, t);
        assert_eq!((a.status, a.org_throttled), (429, true));
        assert_eq!(parse(&a).retry_after, Some(Duration::from_secs(15)));
        assert_eq!(p.call(1, 0, t).status, 200);
        assert_eq!(p.call(0, 0, Time::from_secs(130)).status, 200);
    }
}
