//! The client-facing HTTP service: the edge rules every request meets, then its route.
//!
//! - a method the proxy does not forward gets 405 with `Allow` ([`crate::edge::path`]);
//! - a head over `server.max_header_bytes` gets 431 ([`crate::edge::head`]);
//! - `OPTIONS` is CORS's: a preflight is answered from `[cors]` ([`crate::edge::cors`]), 403
//!   for an origin that is not allowed (every origin, until some are configured);
//! - a path with dot segments, empty segments or a backslash gets 400 ([`crate::edge::path`]);
//! - a WebSocket upgrade on `/v1/realtime` opens a realtime session ([`realtime`]);
//! - `/v1` and everything below `/v1/` runs through the [`crate::pipeline`];
//! - `GET /health` (liveness) answers 200 with the key counts by state, from memory: it
//!   never calls the upstream, so a provider outage does not get the proxy restarted;
//! - `GET /ready` (readiness) answers 200 while the proxy can serve ([`App::readiness`]),
//!   else 503 with the reason, so a load balancer stops sending it traffic;
//! - anything else is 404 in OpenAI's error shape.
//!
//! Every answer (errors included) gets the CORS headers for an allowed `Origin`, and none
//! otherwise. No refusal here reaches an upstream.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use kcp_core::StateCounts;
use serde::Serialize;
use tracing::Instrument;

use crate::app::App;
use crate::edge::openai_error::OpenAiError;
use crate::edge::{head, path};
use crate::observe::Exchange;
use crate::pipeline::{self, RequestCtx};
use crate::proxy::{ProxyBody, realtime};

/// Answers one client request, observed from its head to its response's last byte
/// ([`Exchange`]): its id comes back in `x-kcp-request-id` and tags every log line it causes,
/// and it ends with an access line and the request metrics.
pub async fn handle<B>(app: Arc<App>, request: Request<B>) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let quiet = is_probe(&request);
    let ctx = RequestCtx::arrive(&app, request.headers());
    let exchange = Exchange::begin(&app, &ctx, &request, quiet);
    let span = exchange.span().clone();
    let response = answer(&app, ctx, request).instrument(span).await;
    exchange.respond(response)
}

/// Whether `request` is a liveness or readiness probe (not logged or counted).
fn is_probe<B>(request: &Request<B>) -> bool {
    matches!(*request.method(), Method::GET | Method::HEAD)
        && matches!(request.uri().path(), "/health" | "/ready")
}

/// The answer to one request, with CORS headers for an allowed origin.
async fn answer<B>(app: &Arc<App>, ctx: RequestCtx, request: Request<B>) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let generation = Arc::clone(&ctx.generation);
    let cors = &generation.policies.cors;
    if request.method() == Method::OPTIONS {
        return cors.preflight(request.headers());
    }
    let origin = request.headers().get(header::ORIGIN).cloned();
    let mut response = route(app, ctx, request).await;
    cors.decorate(origin.as_ref(), response.headers_mut());
    response
}

/// The answer to a request that is not `OPTIONS`, before CORS decoration.
async fn route<B>(app: &Arc<App>, ctx: RequestCtx, request: Request<B>) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let method = request.method();
    if !path::is_forwarded(method) {
        return path::method_not_allowed(method);
    }
    let max_head = ctx.generation.config.config.server.max_header_bytes;
    if let Err(error) = head::check(&request, max_head) {
        // As hyper does for the heads it refuses itself: the connection is not reused.
        let mut response: Response<ProxyBody> = error.into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let target = match path::normalize(request.uri()) {
        Ok(target) => target,
        Err(error) => return error.into_openai().into_response(),
    };
    let probe = matches!(*method, Method::GET | Method::HEAD);
    match target.path() {
        "/health" if probe => health(app),
        "/ready" if probe => ready(app),
        _ if realtime::is_upgrade(&request, &target) => {
            realtime::run(app, ctx, &target, request).await
        }
        _ if target.is_api() => pipeline::run(app, ctx, &target, request).await,
        other => OpenAiError::not_found(other).into_response(),
    }
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    keys: StateCounts,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterHealth>,
}

/// `/health`'s word on `[cluster]`.
#[derive(Serialize)]
struct ClusterHealth {
    replica: String,
    redis_connected: bool,
    /// Live replicas counted (this one included); each paces a key at its share.
    replicas: i64,
}

/// `GET /health`: 200 with the key counts by state.
pub(crate) fn health(app: &App) -> Response<ProxyBody> {
    json(
        StatusCode::OK,
        &Health {
            status: "ok",
            keys: app.key_counts(),
            cluster: app.cluster.as_ref().map(|c| ClusterHealth {
                replica: c.replica().to_owned(),
                redis_connected: c.is_connected(),
                replicas: c.replicas(),
            }),
        },
    )
}

#[derive(Serialize)]
struct Ready {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

/// `GET /ready`: 200 while the proxy can serve, else 503 with the reason.
pub(crate) fn ready(app: &App) -> Response<ProxyBody> {
    match app.readiness() {
        Ok(()) => json(
            StatusCode::OK,
            &Ready {
                status: "ready",
                reason: None,
            },
        ),
        Err(reason) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &Ready {
                status: "unavailable",
                reason: Some(reason),
            },
        ),
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<ProxyBody> {
    // Plain structs of numbers and static strings always serialize.
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(ProxyBody::from(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
