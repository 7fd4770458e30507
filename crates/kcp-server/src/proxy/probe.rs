//! Re-checks of disabled keys.
//!
//! A key the provider rejected (401, a 403 about the key) is out of rotation, but keys get
//! restored. kcp-core says which disabled keys are due for a re-check (on a backoff from a
//! minute to an hour); this task asks every [`INTERVAL`], sends each due key
//! `GET <url>/v1/models` (free, and answered only for a valid key) and records the answer on
//! the probe lease: a success puts the key back. Keys disabled for a spent quota or an unpaid
//! bill are not probed here (that endpoint answers 200 for them): kcp-core lets one real
//! request through as their re-check.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::Full;
use kcp_core::{Answer, Changes, Lease};

use super::attempts::{failure_of, log_changes};
use super::headers;
use super::reply;
use super::target_url;
use crate::app::App;
use crate::clock;

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
    let Some(request) = request(&lease) else {
        return lease.record(kcp_core::Outcome::Cancelled, clock::now());
    };
    let started = clock::now();
    let changes = match app.upstream.send(request).await {
        Ok(response) => {
            let latency = clock::now().saturating_since(started);
            let read = reply::read(response).await;
            lease.record_answer(&read.answer(latency), clock::now())
        }
        Err(error) => {
            let answer = Answer::Failed {
                failure: failure_of(error.kind()),
                reached: error.may_have_reached_upstream(),
            };
            lease.record_answer(&answer, clock::now())
        }
    };
    tracing::debug!(
        key = key.as_str(),
        changed = !changes.is_empty(),
        "key re-checked"
    );
    log_changes(&key, &changes, clock::now());
    if let Some(cluster) = &app.cluster {
        cluster.share(&app.pool(), &key, &changes, None);
    }
    changes
}

fn request(lease: &Lease) -> Option<Request<Full<Bytes>>> {
    let spec = lease.spec();
    let uri = target_url::join(spec, PROBE_PATH, None).ok()?;
    let mut headers = HeaderMap::new();
    headers::add_key(&mut headers, spec).ok()?;
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Some(request)
}
