//! The operations listener on `observability.metrics_bind`: `GET /metrics`, the admin API,
//! and the health checks.
//!
//! It is a listener of its own so that it can stay on loopback (the default) while the
//! client listener faces the network: metrics name upstreams and key fingerprints, and the
//! admin API steers the pool. Its requests skip client authentication and `max_inflight`,
//! so a scrape still answers when the proxy is saturated. It keeps serving while the client
//! listener drains, so `/ready` can be seen turning 503 and the drain can be watched in the
//! metrics; it closes when the drain ends.
//!
//! Routes: `GET /metrics` ([`crate::observe::render_metrics`]), `/admin/*`
//! ([`crate::admin::Admin`], answering for [`App`] through [`crate::admin::AdminOps`]),
//! `GET /` and `GET /status.json` (the status page, [`crate::status`]), `GET /health` and
//! `GET /ready` (as on the client listener); anything else is 404. The listener's task also
//! samples the pool every [`status::history::INTERVAL`] for the status page's chart.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::admin::Admin;
use crate::app::App;
use crate::clock;
use crate::edge::openai_error::OpenAiError;
use crate::observe;
use crate::observe::metrics;
use crate::proxy::ProxyBody;
use crate::service;
use crate::status::{self, StatusBoard};

/// Pause after an accept error (out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves the operations listener until the returned future is dropped (which closes the
/// listener and every connection on it).
pub async fn run(listener: TcpListener, app: Arc<App>) {
    let mut connections = JoinSet::new();
    let board = Arc::new(StatusBoard::default());
    let mut sampler = tokio::time::interval(status::history::INTERVAL);
    sampler.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sample = tokio::time::Instant::now();
    loop {
        tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            now = sampler.tick() => {
                let keys = app.pool().snapshot(clock::now());
                board.history.sample(&keys, now.saturating_duration_since(last_sample));
                last_sample = now;
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let app = Arc::clone(&app);
                    let head_timeout = app.generation.load().config.config.server.header_read_timeout();
                    let board = Arc::clone(&board);
                    connections.spawn(serve_connection(tcp, app, board, head_timeout));
                }
                Err(error) => {
                    tracing::warn!(%error, "ops listener: accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    app: Arc<App>,
    board: Arc<StatusBoard>,
    head_timeout: Duration,
) {
    let service = service_fn(move |request| {
        let app = Arc::clone(&app);
        let board = Arc::clone(&board);
        async move { Ok::<_, Infallible>(handle(&app, &board, request).await) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .serve_connection(TokioIo::new(tcp), service)
        .await;
    if let Err(error) = served {
        tracing::debug!(%error, "ops listener: connection ended with an error");
    }
}

/// Answers one request on the operations listener.
pub async fn handle(
    app: &App,
    board: &StatusBoard,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let path = request.uri().path();
    if Admin::is_admin_path(path) {
        let generation = app.generation();
        let policies = &generation.policies;
        return policies.admin.handle(request, app).await;
    }
    if status::is_status_path(path) {
        return status::handle(app, board, request.method(), path, request.headers());
    }
    let probe = matches!(*request.method(), Method::GET | Method::HEAD);
    match path {
        "/metrics" if probe => render_metrics(app),
        "/health" if probe => service::health(app),
        "/ready" if probe => service::ready(app),
        _ => not_found(path).into_response(),
    }
}

fn render_metrics(app: &App) -> Response<ProxyBody> {
    let (status, text) = observe::render_metrics(app);
    let content_type = if status.is_success() {
        metrics::CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let mut response = Response::new(ProxyBody::from(Full::new(Bytes::from(text))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn not_found(path: &str) -> OpenAiError {
    let shown: String = path.chars().take(128).collect();
    OpenAiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        format!(
            "Unknown path `{shown}`: this listener serves GET / (status page), /status.json, \
             /metrics, /admin/*, /health and /ready."
        ),
    )
}
