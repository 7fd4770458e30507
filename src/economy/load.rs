//! Open-loop load: every request is its own task, sent at its scheduled time whatever happened
//! to the ones before it, so a slow proxy meets the demand it would meet in production instead
//! of throttling its own load generator (no coordinated omission).
//!
//! Arrival times are drawn up front from a seeded `SplitMix64` (exponential gaps for Poisson);
//! latency is measured from the scheduled time to the last byte of the answer. Every request is
//! bounded by [`REQUEST_TIMEOUT`] and the whole scenario by its length plus that timeout, so a
//! run always ends by itself.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kcp_core::{Random, SplitMix64};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::pool::REQUEST_TAG;
use super::{Pool, REQUEST_TIMEOUT, Scenario, Shape};

/// The chat completion every request sends.
const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}"#;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What happened to one client request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// When it was due, from the scenario's start.
    pub due: Duration,
    /// The answer's status; `None` if it failed or took longer than [`REQUEST_TIMEOUT`].
    pub status: Option<StatusCode>,
    /// From `due` to the answer's last byte (or to the failure).
    pub latency: Duration,
}

impl Sample {
    pub fn served(&self) -> bool {
        self.status == Some(StatusCode::OK)
    }

    /// When the answer was complete, from the scenario's start.
    pub fn done(&self) -> Duration {
        self.due + self.latency
    }
}

/// The due times of `scenario`'s requests, from its start, in order.
pub fn schedule(scenario: &Scenario, pool: &Pool, seed: u64) -> Vec<Duration> {
    match scenario.shape {
        Shape::Burst => {
            let size = pool.buckets().round() as usize;
            vec![Duration::ZERO; size]
        }
        Shape::Poisson { load, duration } => {
            let rate = load * pool.capacity_rps();
            let mut rng = SplitMix64::new(seed);
            let mut due = Vec::new();
            let mut t = 0.0;
            loop {
                // 1 - U is in (0, 1]: the logarithm is finite.
                t += -(1.0 - rng.unit()).ln() / rate;
                if !t.is_finite() || t >= duration.as_secs_f64() {
                    return due;
                }
                due.push(Duration::from_secs_f64(t));
            }
        }
    }
}

/// Sends `scenario`'s requests to the proxy at `proxy` on schedule and waits for every answer.
pub async fn drive(proxy: SocketAddr, pool: &Pool, scenario: &Scenario, seed: u64) -> Vec<Sample> {
    let due = schedule(scenario, pool, seed);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let uri = format!("http://{proxy}/v1/chat/completions");
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = JoinSet::new();
    for (index, at) in due.iter().copied().enumerate() {
        let request = Request::builder()
            .method(Method::POST)
            .uri(&uri)
            .header("content-type", "application/json")
            .header(REQUEST_TAG, format!("{}/{index}", scenario.name))
            .body(Full::new(Bytes::from_static(BODY.as_bytes())));
        let client = client.clone();
        tasks.spawn(async move {
            tokio::time::sleep_until(start + at).await;
            let status = match request {
                Ok(request) => send(&client, request).await,
                Err(_) => None,
            };
            let latency = Instant::now().saturating_duration_since(start + at);
            (
                index,
                Sample {
                    due: at,
                    status,
                    latency,
                },
            )
        });
    }
    let last = due.last().copied().unwrap_or_default();
    let deadline = start + last + REQUEST_TIMEOUT + Duration::from_secs(5);
    // A request whose task never reported counts as unanswered.
    let mut samples: Vec<Sample> = due
        .iter()
        .map(|&at| Sample {
            due: at,
            status: None,
            latency: REQUEST_TIMEOUT,
        })
        .collect();
    while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        if let Ok((index, sample)) = joined {
            if let Some(slot) = samples.get_mut(index) {
                *slot = sample;
            }
        }
    }
    tasks.abort_all();
    samples
}

/// The status once the whole answer arrived, or `None` on failure or timeout.
async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Option<StatusCode> {
    let exchange = async {
        let response = client.request(request).await.ok()?;
        let status = response.status();
        response.into_body().collect().await.ok()?;
        Some(status)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::economy::Plan;

    #[tokio::test]
    async fn poisson_arrivals_are_seeded_ordered_and_within_the_scenario() {
        let pool = Pool::start().await.expect("mock starts");
        let plan = Plan::full();
        let steady = &plan.scenarios[0];
        let Shape::Poisson { duration, .. } = steady.shape else {
            panic!("the first scenario is Poisson");
        };
        let due = schedule(steady, &pool, 7);
        assert_eq!(due, schedule(steady, &pool, 7));
        assert_ne!(due, schedule(steady, &pool, 8));
        assert!(due.windows(2).all(|pair| pair[0] <= pair[1]));
        assert!(due.iter().all(|&at| at < duration));
        assert!(!due.is_empty());
    }

    #[tokio::test]
    async fn a_burst_is_the_pools_buckets_at_once() {
        let pool = Pool::start().await.expect("mock starts");
        let burst = Plan::full().only("burst").expect("a burst scenario");
        let due = schedule(&burst.scenarios[0], &pool, 1);
        assert_eq!(due, vec![Duration::ZERO; 60]);
    }
}
