//! What one run measured, and the table the example prints.
//!
//! - goodput: successes ÷ min(offered, capacity), where capacity is what the provider could
//!   admit for the offered requests (see [`super::Scenario::capacity`]); in tokens for the
//!   token scenarios (served tokens ÷ min(offered tokens, token capacity)), since which
//!   requests fit a token budget depends on their sizes. Under an organization throttle,
//!   "offered" counts only the requests a perfect proxy could serve: those arriving outside
//!   an episode or within `max_wait` of its end;
//! - wasted: upstream 429s ÷ upstream calls;
//! - calls/req: upstream calls ÷ client requests that were sent upstream at all (a request
//!   the proxy answers 429 itself makes no call and is left out, or every overload would
//!   look cheap);
//! - client 429: requests the proxy answered 429 itself (after waiting, or at once) ÷ offered;
//! - wait p50/p99: time added before a served request's successful call was sent (waiting
//!   for a key, and any 429 attempts before it), over the served requests;
//! - 429 after: median time until the proxy answered a refused request 429.

use std::fmt::Write as _;
use std::time::Duration;

use kcp_core::LearnedLimits;

use super::driver::Policy;

/// One key's share of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyReport {
    /// Its provider limit.
    pub rpm: u32,
    /// Successful calls.
    pub successes: u64,
    /// 429 answers.
    pub rate_limited: u64,
    /// What kcp learned about it at the end of the run (`None` for the naive baseline).
    pub learned: Option<LearnedLimits>,
}

/// The measurements of one scenario under one policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Policy.
    pub policy: Policy,
    /// Client requests.
    pub offered: u64,
    /// Offered requests that any proxy could serve (all but those arriving early in an
    /// organization throttle episode).
    pub servable: u64,
    /// Their estimated tokens.
    pub servable_tokens: u64,
    /// Tokens of the requests served.
    pub served_tokens: u64,
    /// Whether goodput is measured in tokens.
    pub by_tokens: bool,
    /// What the provider could admit for them, in requests (or tokens, `by_tokens`).
    pub capacity: f64,
    /// Requests answered successfully.
    pub successes: u64,
    /// Requests the proxy answered 429 itself.
    pub client_429: u64,
    /// Upstream calls.
    pub upstream_calls: u64,
    /// Upstream 429 answers.
    pub upstream_429: u64,
    /// Of those, answers of the organization throttle.
    pub org_429: u64,
    /// Client requests that made at least one upstream call.
    pub requests_upstream: u64,
    /// Median added wait of served requests.
    pub wait_p50: Duration,
    /// 99th percentile of added wait of served requests.
    pub wait_p99: Duration,
    /// Median time until a refused request was answered 429.
    pub refused_after_p50: Duration,
    /// Organization throttle episodes in the run.
    pub episodes: u32,
    /// Per key, in pool order.
    pub keys: Vec<KeyReport>,
}

impl Report {
    /// Successes ÷ min(offered, capacity), in tokens when `by_tokens`.
    pub fn goodput(&self) -> f64 {
        let (served, offered) = if self.by_tokens {
            (self.served_tokens, self.servable_tokens)
        } else {
            (self.successes, self.servable)
        };
        served as f64 / (offered as f64).min(self.capacity).max(1.0)
    }

    /// Upstream 429s ÷ upstream calls.
    pub fn wasted(&self) -> f64 {
        self.upstream_429 as f64 / (self.upstream_calls as f64).max(1.0)
    }

    /// Upstream calls ÷ client requests sent upstream.
    pub fn calls_per_request(&self) -> f64 {
        self.upstream_calls as f64 / (self.requests_upstream as f64).max(1.0)
    }

    /// Client 429s ÷ offered.
    pub fn refused(&self) -> f64 {
        self.client_429 as f64 / (self.offered as f64).max(1.0)
    }

    /// Upstream 429s per key per organization throttle episode (`None` without episodes).
    pub fn wasted_per_key_per_episode(&self) -> Option<f64> {
        (self.episodes > 0)
            .then(|| self.upstream_429 as f64 / (self.keys.len() as f64 * f64::from(self.episodes)))
    }

    /// Successes of the key with the largest limit ÷ those of the key with the smallest.
    pub fn largest_to_smallest(&self) -> f64 {
        let by_rpm = |pick: fn(u32, u32) -> bool| {
            self.keys
                .iter()
                .reduce(|a, b| if pick(b.rpm, a.rpm) { b } else { a })
                .map_or(0, |k| k.successes)
        };
        by_rpm(|b, a| b > a) as f64 / (by_rpm(|b, a| b < a) as f64).max(1.0)
    }
}

/// The header of [`table`].
const HEADER: &str = "| scenario | policy | offered | goodput | wasted | calls/req | client 429 | 429 after | wait p50 | wait p99 | 429s/key/episode |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";

/// A markdown table of runs, one row each.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::from(HEADER);
    for r in reports {
        let episode = r
            .wasted_per_key_per_episode()
            .map_or_else(|| "–".to_owned(), |w| format!("{w:.2}"));
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.4} | {:.2}% | {:.3} | {:.1}% | {} | {} | {} | {} |",
            r.scenario,
            r.policy.label(),
            r.offered,
            r.goodput(),
            r.wasted() * 100.0,
            r.calls_per_request(),
            r.refused() * 100.0,
            if r.client_429 == 0 {
                "–".to_owned()
            } else {
                millis(r.refused_after_p50)
            },
            millis(r.wait_p50),
            millis(r.wait_p99),
            episode,
        );
    }
    out
}

/// A markdown table of one run's keys: traffic, 429s and what kcp learned.
pub fn key_table(report: &Report) -> String {
    let mut out = String::from(
        "| key rpm | successes | share vs smallest | 429s | learned rpm | remaining | reset | pace (req/s) | pace factor |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let smallest = report
        .keys
        .iter()
        .min_by_key(|k| k.rpm)
        .map_or(1, |k| k.successes.max(1));
    for k in &report.keys {
        let learned = k.learned.unwrap_or_default();
        let show = |v: Option<u64>| v.map_or_else(|| "–".to_owned(), |v| v.to_string());
        let _ = writeln!(
            out,
            "| {} | {} | {:.2}× | {} | {} | {} | {} | {} | {:.2} |",
            k.rpm,
            k.successes,
            k.successes as f64 / smallest as f64,
            k.rate_limited,
            show(learned.limit_requests),
            show(learned.remaining_requests),
            learned
                .reset_requests_secs
                .map_or_else(|| "–".to_owned(), |s| format!("{s:.2}s")),
            learned
                .pace_rps
                .map_or_else(|| "–".to_owned(), |p| format!("{p:.3}")),
            learned.pace_factor,
        );
    }
    out
}

fn millis(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}
