//! The client-facing HTTP service: routes each request to the proxy path, the health checks
//! or a 404.
//!
//! - every method under `/v1/*` is forwarded ([`crate::proxy`]);
//! - `GET /health` (liveness) answers 200 with the key counts by state, from memory: it
//!   never calls the upstream, so a provider outage does not get the proxy restarted;
//! - `GET /ready` (readiness) answers 200 while the proxy can serve ([`App::readiness`]),
//!   else 503 with the reason, so a load balancer stops sending it traffic;
//! - anything else is 404 in OpenAI's error shape.
//!
//! Before routing, a CORS preflight is answered from `[cors]` ([`crate::edge::cors`]); after it,
//! every answer (errors included) gets the CORS headers for an allowed `Origin`. A `/v1`
//! request must carry a client key when `[auth]` lists some ([`crate::edge::auth`]) and is refused
//! with 503 `overloaded` past `server.max_inflight` ([`crate::edge::overload`]); neither refusal
//! reaches an upstream.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use kcp_core::StateCounts;
use serde::Serialize;
use tracing::Instrument;

use crate::app::App;
use crate::edge::auth::ClientAuth;
use crate::edge::body_limit;
use crate::edge::cors::Cors;
use crate::edge::openai_error::OpenAiError;
use crate::edge::overload::InflightLimit;
use crate::observe::Exchange;
use crate::ops::reload::Policies;
use crate::proxy::{self, ProxyBody};

/// Answers one client request, observed from its head to its response's last byte
/// ([`Exchange`]): its id comes back in `x-kcp-request-id` and tags every log line it causes,
/// and it ends with an access line and the request metrics.
pub async fn handle<B>(app: Arc<App>, mut request: Request<B>) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let quiet = is_probe(&request);
    let exchange = Exchange::begin(&app, &mut request, quiet);
    let span = exchange.span().clone();
    let response = answer(app, request).instrument(span).await;
    exchange.respond(response)
}

/// Whether `request` is a liveness or readiness probe (not logged or counted).
fn is_probe<B>(request: &Request<B>) -> bool {
    matches!(*request.method(), Method::GET | Method::HEAD)
        && matches!(request.uri().path(), "/health" | "/ready")
}

/// Answers one client request: a CORS preflight, or the route's answer with CORS headers.
async fn answer<B>(app: Arc<App>, request: Request<B>) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let policies = app.policies.load_full();
    if Cors::is_preflight(request.method(), request.headers()) {
        return policies.cors.preflight(request.headers());
    }
    let origin = request.headers().get(header::ORIGIN).cloned();
    let mut response = route(&app, &policies, request).await;
    policies
        .cors
        .decorate(origin.as_ref(), response.headers_mut());
    response
}

/// The answer to a request that is not a preflight, before CORS decoration.
async fn route<B>(app: &App, policies: &Policies, request: Request<B>) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let path = request.uri().path();
    let probe = matches!(*request.method(), Method::GET | Method::HEAD);
    match path {
        "/health" if probe => health(app),
        "/ready" if probe => ready(app),
        _ if is_api(path) => forward(app, &policies.auth, request).await,
        _ => OpenAiError::not_found(path).into_response(),
    }
}

/// Whether `path` is under the proxied API.
fn is_api(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

async fn forward<B>(app: &App, auth: &ClientAuth, request: Request<B>) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let (parts, body) = request.into_parts();
    if let Err(error) = auth.check(&parts.headers) {
        return error.into_response();
    }
    let Some(admitted) = app.inflight.try_enter() else {
        return InflightLimit::refusal().into_response();
    };
    let (limit, idle) = {
        let config = app.config.load();
        let server = &config.config.server;
        let limit = u64::try_from(server.request_body_limit_bytes).unwrap_or(u64::MAX);
        (limit, server.body_read_timeout())
    };
    let declared = match body_limit::content_length(&parts.headers) {
        Ok(declared) => declared,
        Err(error) => return error.into_response(),
    };
    let body = match body_limit::read_body(body, declared, limit, idle).await {
        Ok(body) => body,
        Err(error) => return error.into_openai().into_response(),
    };
    let (mut response, report) = proxy::forward(app, parts, body).await;
    report.trace();
    response.extensions_mut().insert(report);
    response.map(|body| body.holding(admitted))
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    keys: StateCounts,
}

/// `GET /health`: 200 with the key counts by state.
pub(crate) fn health(app: &App) -> Response<ProxyBody> {
    json(
        StatusCode::OK,
        &Health {
            status: "ok",
            keys: app.key_counts(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_v1_paths_are_proxied() {
        for path in ["/v1", "/v1/", "/v1/chat/completions", "/v1/files/f?x=1"] {
            assert!(is_api(path), "{path}");
        }
        for path in [
            "/",
            "/v1beta/models",
            "/v2/models",
            "/health",
            "/admin/keys",
        ] {
            assert!(!is_api(path), "{path}");
        }
    }
}
