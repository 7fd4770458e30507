//! The status page on the ops listener: every key's state in a browser.
//!
//! Users of other key pools (gpt-load, new-api, LiteLLM) expect to see at a glance which keys
//! serve, which rest and why, and what each has learned about its limits. `GET /` serves one
//! self-contained page (HTML, CSS and JS embedded in the binary, no CDN, no build step) that
//! refreshes itself from `GET /status.json`: the pool snapshot, pool totals and a few minutes
//! of per-key request rates ([`history`]).
//!
//! Keys appear by name and fingerprint only; a key's url is shown without user info or
//! query, where a provider's credentials could sit. With `observability.admin_token` set, both
//! routes need the token (Bearer, or HTTP Basic with the token as the password, which the
//! browser asks for through `WWW-Authenticate`) and the page shows disable, enable and
//! re-check buttons that call the admin API with the same credentials.

pub mod history;

use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, header};
use http_body_util::Full;
use kcp_core::{KeySnapshot, StateCounts};
use serde::Serialize;

use crate::app::App;
use crate::clock;
use crate::edge::openai_error::OpenAiError;
use crate::proxy::ProxyBody;
use history::{HistoryView, RateHistory};

/// The page, with its stylesheet and script inlined.
static PAGE: LazyLock<String> = LazyLock::new(|| {
    include_str!("page.html")
        .replace("/*CSS*/", include_str!("page.css"))
        .replace("/*JS*/", include_str!("page.js"))
});

/// What the status routes keep between requests.
#[derive(Debug, Default)]
pub struct StatusBoard {
    /// Per-key request rates, sampled by the ops listener.
    pub history: RateHistory,
}

/// Whether `path` is one of the status page's routes.
pub fn is_status_path(path: &str) -> bool {
    matches!(path, "/" | "/index.html" | "/status.json")
}

/// Answers `GET /` and `GET /status.json` (see the module docs).
pub fn handle(
    app: &App,
    board: &StatusBoard,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Response<ProxyBody> {
    if !matches!(*method, Method::GET | Method::HEAD) {
        return method_not_allowed(method, path).into_response();
    }
    let generation = app.generation();
    let policies = &generation.policies;
    let admin = policies.admin.is_enabled();
    if admin && !policies.admin.authorized(headers) {
        return unauthorized();
    }
    match path {
        "/status.json" => match serde_json::to_vec(&status(app, board, admin)) {
            Ok(body) => respond(body.into(), "application/json"),
            Err(error) => {
                tracing::error!(%error, "status: snapshot did not serialize");
                OpenAiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal_error",
                    "The status could not be encoded.",
                )
                .into_response()
            }
        },
        _ => respond(
            Bytes::from_static(PAGE.as_bytes()),
            "text/html; charset=utf-8",
        ),
    }
}

/// `status.json`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Whether the admin API is on (the page then shows its buttons).
    pub admin: bool,
    pub draining: bool,
    pub totals: Totals,
    pub keys: Vec<KeyView>,
    pub history: HistoryView,
}

/// Pool totals.
#[derive(Debug, Serialize)]
pub struct Totals {
    pub keys: StateCounts,
    pub requests: u64,
    pub rate_limited: u64,
    /// Rejections (401/402/403/quota) and upstream failures.
    pub errors: u64,
    pub in_flight: u64,
    /// Requests waiting for a key to free up.
    pub waiting: usize,
    /// Requests per second over the last sample.
    pub rps: f64,
}

/// One key on the page: its snapshot plus the derived counts the page shows.
#[derive(Debug, Serialize)]
pub struct KeyView {
    #[serde(flatten)]
    pub snapshot: KeySnapshot,
    pub requests: u64,
    pub errors: u64,
}

/// The data behind the page at this instant.
pub fn status(app: &App, board: &StatusBoard, admin: bool) -> Status {
    let pool = app.pool();
    let now = clock::now();
    let history = board.history.view();
    let keys: Vec<KeyView> = pool
        .snapshot(now)
        .into_iter()
        .map(|mut snapshot| {
            snapshot.url = shown_url(&snapshot.url);
            KeyView {
                requests: history::requests(&snapshot),
                errors: snapshot.outcomes.rejected + snapshot.outcomes.upstream_error,
                snapshot,
            }
        })
        .collect();
    let totals = Totals {
        keys: pool.counts(now),
        requests: keys.iter().map(|k| k.requests).sum(),
        rate_limited: keys.iter().map(|k| k.snapshot.outcomes.rate_limited).sum(),
        errors: keys.iter().map(|k| k.errors).sum(),
        in_flight: keys.iter().map(|k| u64::from(k.snapshot.in_flight)).sum(),
        waiting: app.queue.len(),
        rps: history.keys.values().filter_map(|rates| rates.last()).sum(),
    };
    Status {
        admin,
        draining: app.draining.load(std::sync::atomic::Ordering::Relaxed),
        totals,
        keys,
        history,
    }
}

/// A key's url without user info, query or fragment: `scheme://host[:port]/path`.
fn shown_url(url: &str) -> String {
    let Ok(uri) = url.parse::<Uri>() else {
        return "(unparsable url)".to_owned();
    };
    let scheme = uri.scheme_str().unwrap_or("https");
    let host = uri.host().unwrap_or("?");
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!("{scheme}://{host}{port}{}", uri.path())
}

fn respond(body: Bytes, content_type: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::from(Full::new(body)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    response
}

fn unauthorized() -> Response<ProxyBody> {
    let mut response = OpenAiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_admin_token",
        "The status page needs the admin token: HTTP Basic with the token as the password, \
         or `Authorization: Bearer <observability.admin_token>`.",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"kcp status\", charset=\"UTF-8\""),
    );
    response
}

fn method_not_allowed(method: &Method, path: &str) -> OpenAiError {
    OpenAiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("`{method} {path}` is not served: the status page answers GET."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_credentials_and_query() {
        assert_eq!(
            shown_url("https://user:pw@example.com:8443/v1?api-key=secret#x"),
            "https://example.com:8443/v1"
        );
        assert_eq!(shown_url("http://127.0.0.1:9/"), "http://127.0.0.1:9/");
    }

    #[test]
    fn the_page_is_self_contained() {
        assert!(PAGE.contains("function refresh()"), "script inlined");
        assert!(PAGE.contains(".state-cooling"), "stylesheet inlined");
        assert!(!PAGE.contains("/*CSS*/") && !PAGE.contains("/*JS*/"));
        assert!(!PAGE.contains("src=\"http") && !PAGE.contains("href=\"http"));
    }
}
