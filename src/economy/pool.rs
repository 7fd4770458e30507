//! The provider side: the mock upstream with one OpenAI-style bucket per key, and what those
//! buckets allow.
//!
//! The allowance is computed from the mock's own configuration, not from what kcp learns: a
//! full bucket plus its refill over the span, per key. That is the most any proxy could have
//! served without a single 429.

use std::collections::HashSet;
use std::io;
use std::num::NonZeroU32;
use std::time::Duration;

use kcp_core::Secret;
use kcp_mock::{MockUpstream, RateLimit};

use super::{BUCKET, MOCK_LATENCY, POOL_RPM};

/// Header carrying the load generator's id of a client request, so the mock can tell which
/// client requests reached it and how often.
pub const REQUEST_TAG: &str = "x-economy-request";

/// One key of the pool.
#[derive(Clone, Debug)]
pub struct PoolKey {
    /// Unique name for the proxy's config (`k1-30rpm`).
    pub name: String,
    /// The bearer token the mock meters (made up, but kept redacted like any key).
    pub key: Secret,
    pub rpm: u32,
}

/// The mock provider with the pool's buckets.
#[derive(Debug)]
pub struct Pool {
    mock: MockUpstream,
    keys: Vec<PoolKey>,
}

/// The mock's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Calls received.
    pub calls: usize,
    /// Of those, 429s from an empty bucket.
    pub rate_limited: u64,
}

/// What reached the provider during one scenario.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upstream {
    /// Calls received.
    pub calls: usize,
    /// 429s from an empty bucket.
    pub rate_limited: u64,
    /// Distinct client requests among the calls.
    pub requests: usize,
}

impl Pool {
    /// The mock on `127.0.0.1:0` with [`POOL_RPM`]'s buckets, full now, and [`MOCK_LATENCY`].
    pub async fn start() -> io::Result<Pool> {
        let mock = MockUpstream::try_start().await?;
        mock.set_latency(MOCK_LATENCY);
        let mut keys = Vec::with_capacity(POOL_RPM.len());
        for (index, rpm) in POOL_RPM.into_iter().enumerate() {
            let Some(per_minute) = NonZeroU32::new(rpm) else {
                continue;
            };
            let key = PoolKey {
                name: format!("k{}-{rpm}rpm", index + 1),
                key: Secret::new(format!("sk-economy-{}-{rpm}", index + 1)),
                rpm,
            };
            mock.limit(
                key.key.expose(),
                RateLimit::per_minute(per_minute).with_burst(BUCKET),
            );
            keys.push(key);
        }
        Ok(Pool { mock, keys })
    }

    /// Base URL of the mock, as a key's `url`.
    pub fn url(&self) -> String {
        self.mock.url()
    }

    pub fn keys(&self) -> &[PoolKey] {
        &self.keys
    }

    pub fn mock(&self) -> &MockUpstream {
        &self.mock
    }

    /// Sustained requests per second of the whole pool.
    pub fn capacity_rps(&self) -> f64 {
        self.keys.iter().map(|k| per_sec(k.rpm)).sum()
    }

    /// Requests the pool's full buckets hold together.
    pub fn buckets(&self) -> f64 {
        self.keys.iter().map(|k| bucket(k.rpm)).sum()
    }

    /// Requests the buckets allowed over `span` from full: burst plus refill, per key.
    pub fn allowance(&self, span: Duration) -> f64 {
        self.buckets() + self.capacity_rps() * span.as_secs_f64()
    }

    /// The mock's counters now.
    pub fn counts(&self) -> Counts {
        Counts {
            calls: self.mock.calls().len(),
            rate_limited: self.mock.rate_limited(),
        }
    }

    /// What reached the mock since `before`, and how many distinct client requests of
    /// `scenario` it came from.
    pub fn counts_since(&self, before: &Counts, scenario: &str) -> Upstream {
        let calls = self.mock.calls();
        let window = calls.get(before.calls..).unwrap_or_default();
        let prefix = format!("{scenario}/");
        let requests: HashSet<&str> = window
            .iter()
            .filter_map(|call| call.headers.get(REQUEST_TAG)?.to_str().ok())
            .filter(|tag| tag.starts_with(&prefix))
            .collect();
        Upstream {
            calls: window.len(),
            rate_limited: self.mock.rate_limited().saturating_sub(before.rate_limited),
            requests: requests.len(),
        }
    }
}

fn per_sec(rpm: u32) -> f64 {
    f64::from(rpm) / 60.0
}

/// A bucket's size as the mock computes it: `BUCKET` of the rate, at least one request.
fn bucket(rpm: u32) -> f64 {
    (per_sec(rpm) * BUCKET.as_secs_f64()).max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_allowance_is_the_buckets_plus_their_refill() {
        let pool = Pool::start().await.expect("mock starts");
        // 720 rpm: 12 requests a second, 60 in the full buckets.
        assert!((pool.capacity_rps() - 12.0).abs() < 1e-9);
        assert!((pool.buckets() - 60.0).abs() < 1e-9);
        assert!((pool.allowance(Duration::from_secs(10)) - 180.0).abs() < 1e-9);
        let names: HashSet<&str> = pool.keys().iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names.len(), POOL_RPM.len(), "names are unique");
    }
}
