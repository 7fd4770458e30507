//! The measures of one scenario and the table that sets them next to their targets.
//!
//! - goodput: served ÷ min(requests, allowance), where the allowance is what the mock's buckets
//!   allowed from the first request's due time to the last success (full buckets plus their
//!   refill, [`Pool::allowance`]). 1.0 means no request the provider would have taken was lost.
//! - wasted: the provider's 429s ÷ the provider's calls.
//! - calls per request: the provider's calls ÷ the client requests that reached it at all (a
//!   request the proxy refuses itself costs nothing upstream).
//! - added latency: a served request's latency minus the mock's fixed answer time; it holds
//!   the proxy's own work, any wait for a key and any 429'd attempts before the success.

use std::time::Duration;

use http::StatusCode;

use super::pool::Upstream;
use super::{MOCK_LATENCY, Pool, Sample, Scenario, Shape};

/// What one scenario measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    pub scenario: &'static str,
    pub shape: Shape,
    /// Client requests sent.
    pub requests: usize,
    /// Answered 200.
    pub served: usize,
    /// Answered 429 (by the proxy or passed through from the provider).
    pub refused: usize,
    /// Answered with another status.
    pub other: usize,
    /// Failed, or no answer within the request timeout.
    pub unanswered: usize,
    /// What reached the provider.
    pub upstream: Upstream,
    /// From the first request's due time to the last success.
    pub span: Duration,
    /// Requests the buckets allowed over `span`.
    pub allowance: f64,
    /// Added latency of served requests, sorted.
    added: Vec<Duration>,
}

impl Figures {
    pub fn new(scenario: &Scenario, pool: &Pool, samples: &[Sample], upstream: &Upstream) -> Self {
        let count = |status: StatusCode| {
            samples
                .iter()
                .filter(|sample| sample.status == Some(status))
                .count()
        };
        let served = count(StatusCode::OK);
        let refused = count(StatusCode::TOO_MANY_REQUESTS);
        let unanswered = samples.iter().filter(|s| s.status.is_none()).count();
        let first = samples.iter().map(|s| s.due).min().unwrap_or_default();
        let last = samples
            .iter()
            .filter(|s| s.served())
            .map(Sample::done)
            .max()
            .unwrap_or(first);
        let span = last.saturating_sub(first);
        let mut added: Vec<Duration> = samples
            .iter()
            .filter(|s| s.served())
            .map(|s| s.latency.saturating_sub(MOCK_LATENCY))
            .collect();
        added.sort_unstable();
        Figures {
            scenario: scenario.name,
            shape: scenario.shape,
            requests: samples.len(),
            served,
            refused,
            other: samples.len() - served - refused - unanswered,
            unanswered,
            upstream: upstream.clone(),
            span,
            allowance: pool.allowance(span),
            added,
        }
    }

    /// served ÷ min(requests, allowance).
    pub fn goodput(&self) -> f64 {
        ratio(
            self.served as f64,
            (self.requests as f64).min(self.allowance),
        )
    }

    /// The provider's 429s ÷ its calls.
    pub fn wasted(&self) -> f64 {
        ratio(
            self.upstream.rate_limited as f64,
            self.upstream.calls as f64,
        )
    }

    /// The provider's calls ÷ client requests that reached it.
    pub fn calls_per_request(&self) -> f64 {
        ratio(self.upstream.calls as f64, self.upstream.requests as f64)
    }

    /// Calls the provider answered with success: each must be exactly one served request.
    pub fn upstream_served(&self) -> u64 {
        (self.upstream.calls as u64).saturating_sub(self.upstream.rate_limited)
    }

    /// The `q` quantile (0..=1) of the served requests' added latency.
    pub fn added(&self, q: f64) -> Option<Duration> {
        let last = self.added.len().checked_sub(1)?;
        let index = ((last as f64) * q).round() as usize;
        self.added.get(index.min(last)).copied()
    }

    /// Share of the requests served within `within` of their due time.
    pub fn served_within(&self, within: Duration) -> f64 {
        let fast = self
            .added
            .iter()
            .filter(|added| **added + MOCK_LATENCY <= within)
            .count();
        ratio(fast as f64, self.requests as f64)
    }

    /// The table rows of this scenario: the counts, then each measure with its target.
    fn rows(&self) -> Vec<Row> {
        let mut rows = vec![Row::info(
            "requests: served / 429 / other / unanswered",
            format!(
                "{} : {} / {} / {} / {}",
                self.requests, self.served, self.refused, self.other, self.unanswered
            ),
        )];
        rows.push(Row::info(
            "provider: calls / 429s / requests reaching it",
            format!(
                "{} / {} / {}",
                self.upstream.calls, self.upstream.rate_limited, self.upstream.requests
            ),
        ));
        rows.push(Row::info(
            "span / what the buckets allowed",
            format!("{:.1} s / {:.0}", self.span.as_secs_f64(), self.allowance),
        ));
        match self.shape {
            Shape::Poisson { load, .. } if load <= 1.0 => {
                rows.push(Row::at_least("goodput", self.goodput(), 0.999, fraction));
                rows.push(Row::at_most("wasted calls", self.wasted(), 0.01, percent));
                rows.push(Row::latency("added latency p50", self.added(0.5), None));
                rows.push(Row::latency(
                    "added latency p99",
                    self.added(0.99),
                    Some(50),
                ));
            }
            Shape::Poisson { .. } => {
                rows.push(Row::at_least("goodput", self.goodput(), 0.97, fraction));
                rows.push(Row::at_most("wasted calls", self.wasted(), 0.02, percent));
                let calls = self.calls_per_request();
                rows.push(Row::at_most(
                    "provider calls per request",
                    calls,
                    1.05,
                    plain,
                ));
                rows.push(Row::latency(
                    "served p50 (added)",
                    self.added(0.5),
                    Some(250),
                ));
                rows.push(Row::latency("added latency p99", self.added(0.99), None));
            }
            Shape::Burst => {
                let share = self.served_within(Duration::from_secs(1));
                rows.push(Row::at_least("served within 1 s", share, 0.95, percent));
                let refusals = self.upstream.rate_limited as f64;
                rows.push(Row::at_most("provider 429s", refusals, 0.0, whole));
                rows.push(Row::latency("served p50 (added)", self.added(0.5), None));
            }
        }
        rows
    }
}

/// One markdown table of every scenario's figures, targets beside them.
pub fn table(figures: &[Figures]) -> String {
    let mut out =
        String::from("| scenario | measure | target | measured | met |\n|---|---|---|---:|:-:|\n");
    for f in figures {
        for row in f.rows() {
            let met = match row.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {met} |\n",
                f.scenario, row.measure, row.target, row.measured
            ));
        }
    }
    out
}

/// One line of the table.
#[derive(Debug)]
struct Row {
    measure: &'static str,
    target: String,
    measured: String,
    met: Option<bool>,
}

impl Row {
    fn info(measure: &'static str, measured: String) -> Row {
        Row {
            measure,
            target: "—".to_owned(),
            measured,
            met: None,
        }
    }

    fn at_least(measure: &'static str, value: f64, target: f64, show: fn(f64) -> String) -> Row {
        Row {
            measure,
            target: format!("≥ {}", show(target)),
            measured: show(value),
            met: Some(value >= target),
        }
    }

    fn at_most(measure: &'static str, value: f64, target: f64, show: fn(f64) -> String) -> Row {
        Row {
            measure,
            target: format!("≤ {}", show(target)),
            measured: show(value),
            met: Some(value <= target),
        }
    }

    fn latency(measure: &'static str, value: Option<Duration>, target_ms: Option<u64>) -> Row {
        let measured = value.map_or_else(|| "n/a".to_owned(), millis);
        let target = target_ms.map_or_else(|| "—".to_owned(), |ms| format!("≤ {ms} ms"));
        let met = target_ms.map(|ms| value.is_some_and(|v| v <= Duration::from_millis(ms)));
        Row {
            measure,
            target,
            measured,
            met,
        }
    }
}

fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole } else { 0.0 }
}

fn fraction(value: f64) -> String {
    format!("{value:.4}")
}

fn percent(value: f64) -> String {
    format!("{:.2}%", value * 100.0)
}

fn plain(value: f64) -> String {
    format!("{value:.3}")
}

fn whole(value: f64) -> String {
    format!("{value:.0}")
}

fn millis(value: Duration) -> String {
    format!("{:.1} ms", value.as_secs_f64() * 1_000.0)
}
