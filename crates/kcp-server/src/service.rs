//! The client-facing HTTP service: routes each request to the proxy path, the health checks
//! or a 404.
//!
//! - every method under `/v1/*` is forwarded ([`crate::proxy`]);
//! - `GET /health` (liveness) answers 200 with the key counts by state, from memory: it
//!   never calls the upstream, so a provider outage does not get the proxy restarted;
//! - `GET /ready` (readiness) answers 200 while the proxy can serve ([`App::readiness`]),
//!   else 503 with the reason, so a load balancer stops sending it traffic;
//! - anything else is 404 in OpenAI's error shape.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use kcp_core::StateCounts;
use serde::Serialize;

use crate::app::App;
use crate::body_limit;
use crate::openai_error::OpenAiError;
use crate::proxy::{self, ProxyBody};

/// Answers one client request.
pub async fn handle<B>(app: Arc<App>, request: Request<B>) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let path = request.uri().path();
    let probe = matches!(*request.method(), Method::GET | Method::HEAD);
    match path {
        "/health" if probe => health(&app),
        "/ready" if probe => ready(&app),
        _ if is_api(path) => forward(&app, request).await,
        _ => OpenAiError::not_found(path).into_response(),
    }
}

/// Whether `path` is under the proxied API.
fn is_api(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

async fn forward<B>(app: &App, request: Request<B>) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let (parts, body) = request.into_parts();
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
    let (response, report) = proxy::forward(app, parts, body).await;
    report.trace();
    response
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    keys: StateCounts,
}

fn health(app: &App) -> Response<ProxyBody> {
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

fn ready(app: &App) -> Response<ProxyBody> {
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
