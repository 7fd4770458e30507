//! Re-checks of disabled keys.
//!
//! A key the provider rejected (401, 402, 403, exhausted quota) is out of rotation, but keys
//! get restored and quotas topped up. kcp-core says which disabled keys are due for a
//! re-check (on a backoff from a minute to an hour); this task asks every [`INTERVAL`],
//! sends each due key `GET <url>/v1/models` (free, and answered only for a valid key) and
//! records the outcome on the probe lease: a success puts the key back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::Full;
use kcp_core::{Changes, Lease, Outcome};

use super::classify;
use super::headers;
use super::target_url;
use crate::app::App;
use crate::clock;
use crate::observe::access_log::log_state_change;

/// How often due re-checks are looked for.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The path a re-check requests.
const PROBE_PATH: &str = "/v1/models";

/// Runs forever: starts the re-check of every due key. Abort the task to stop it.
pub async fn run(app: Arc<App>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let pool = app.pool();
        let now = clock::now();
        for index in pool.due_probes(now) {
            if let Some(lease) = pool.probe(index, now) {
                let app = Arc::clone(&app);
                tokio::spawn(async move { check(&app, lease).await });
            }
        }
    }
}

/// Re-checks the key of a probe lease (from `KeyPool::probe`) and records the outcome.
pub async fn check(app: &App, lease: Lease) -> Changes {
    let key = lease.id().clone();
    let outcome = match request(&lease) {
        Some(request) => {
            let started = clock::now();
            match app.upstream.send(request).await {
                Ok(response) => {
                    let latency = clock::now().saturating_since(started);
                    classify::classify(response).await.outcome(latency)
                }
                Err(error) => Outcome::Upstream {
                    failure: classify::failure_of(error.kind()),
                    retry_after: None,
                },
            }
        }
        None => Outcome::Cancelled,
    };
    tracing::debug!(key = key.as_str(), outcome = ?outcome.class(), "key re-checked");
    let now = clock::now();
    let changes = lease.record(outcome, now);
    for change in changes.iter() {
        log_state_change(key.as_str(), &change, now);
    }
    changes
}

fn request(lease: &Lease) -> Option<Request<Full<Bytes>>> {
    let spec = lease.spec();
    let uri = target_url::join(&spec.url, PROBE_PATH).ok()?;
    let mut headers = HeaderMap::new();
    headers::add_key(&mut headers, spec).ok()?;
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Some(request)
}
