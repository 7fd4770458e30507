//! CORS: which browser origins may call the proxy.
//!
//! Browser apps using the OpenAI SDKs send `Authorization`, `Content-Type: application/json`
//! and the SDK's own headers (`x-stainless-*`, `openai-*`), so every call is preceded by a
//! preflight `OPTIONS` (Fetch standard, "CORS protocol"). The proxy answers preflights itself
//! rather than forwarding them: the provider's answer would describe the provider's policy,
//! not `[cors] allowed_origins`. For the same reason [`Cors::decorate`] removes any CORS
//! headers the upstream sent before adding the proxy's own, so a disallowed origin gets none.
//!
//! The requested headers are echoed back only when allowed: `Access-Control-Allow-Headers: *`
//! does not cover `Authorization`, and `x-stainless-*` is a prefix family that cannot be
//! listed. `Access-Control-Expose-Headers` cannot use prefixes either, so the rate-limit
//! headers are listed one by one.

use bytes::Bytes;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::config::CorsSection;
use crate::edge::openai_error::OpenAiError;

/// Methods the OpenAI API uses.
const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";

/// A day: browsers cap it lower (Chromium at 2 h), which is fine.
const MAX_AGE_SECS: &str = "86400";

/// Request headers the OpenAI and Azure SDKs send, lowercase. `accept` and `user-agent` are
/// included because browsers that let scripts set them (Firefox) then list them in the
/// preflight.
const ALLOWED_HEADERS: [&str; 10] = [
    "authorization",
    "api-key",
    "content-type",
    "openai-beta",
    "openai-organization",
    "openai-project",
    "idempotency-key",
    "x-request-id",
    "accept",
    "user-agent",
];

/// The SDKs' platform headers (`x-stainless-os`, `x-stainless-retry-count`, …).
const ALLOWED_PREFIX: &str = "x-stainless-";

/// Response headers scripts may read: request ids, timing and rate-limit state.
const EXPOSE_HEADERS: &str = "x-request-id, x-kcp-request-id, openai-processing-ms, \
     x-ratelimit-limit-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-requests, \
     x-ratelimit-remaining-tokens, x-ratelimit-reset-requests, x-ratelimit-reset-tokens, \
     retry-after, retry-after-ms";

/// CORS headers an upstream may send; replaced by the proxy's own.
const UPSTREAM_CORS: [HeaderName; 6] = [
    ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_ALLOW_CREDENTIALS,
    ACCESS_CONTROL_EXPOSE_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_MAX_AGE,
];

/// The proxy's CORS policy, built once from `[cors]`.
#[derive(Debug, Clone)]
pub struct Cors {
    any_origin: bool,
    origins: Vec<String>,
}

impl Cors {
    /// The policy of `[cors] allowed_origins`; `*` allows every origin, an empty list none.
    pub fn new(section: &CorsSection) -> Self {
        Self {
            any_origin: section.allowed_origins.iter().any(|o| o == "*"),
            origins: section.allowed_origins.clone(),
        }
    }

    /// Whether every origin is allowed (`"*"`).
    pub fn allows_any_origin(&self) -> bool {
        self.any_origin
    }

    /// The answer to an `OPTIONS` request (the service sends every one here): 204 with the
    /// allowed methods and headers, or 403 in OpenAI's error shape for an origin that is not
    /// allowed (or none).
    pub fn preflight<B: From<Full<Bytes>>>(&self, headers: &HeaderMap) -> Response<B> {
        let Some(allow_origin) = self.allow_origin(headers.get(ORIGIN)) else {
            return origin_not_allowed().into_response();
        };
        let mut response = Response::new(B::from(Full::new(Bytes::new())));
        *response.status_mut() = StatusCode::NO_CONTENT;
        let out = response.headers_mut();
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        out.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        if let Some(allowed) = allow_headers(headers) {
            out.insert(ACCESS_CONTROL_ALLOW_HEADERS, allowed);
        }
        out.insert(
            ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(MAX_AGE_SECS),
        );
        out.insert(
            VARY,
            HeaderValue::from_static("Origin, Access-Control-Request-Headers"),
        );
        response
    }

    /// Adds the CORS headers of a non-preflight response when the request's `Origin` is
    /// allowed, after removing any the upstream sent.
    pub fn decorate(&self, origin: Option<&HeaderValue>, response_headers: &mut HeaderMap) {
        for name in &UPSTREAM_CORS {
            response_headers.remove(name);
        }
        let Some(allow_origin) = self.allow_origin(origin) else {
            return;
        };
        response_headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        response_headers.insert(
            ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
        let varies = response_headers
            .get_all(VARY)
            .iter()
            .any(|v| v.to_str().is_ok_and(mentions_origin));
        if !varies {
            response_headers.append(VARY, HeaderValue::from_static("Origin"));
        }
    }

    /// `Access-Control-Allow-Origin` for the request's `Origin`: `*` when any origin is
    /// allowed, the origin itself when it is listed, `None` otherwise (or without `Origin`).
    fn allow_origin(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        let origin = origin?;
        if self.any_origin {
            return Some(HeaderValue::from_static("*"));
        }
        let text = origin.to_str().ok()?;
        // Scheme and host are case-insensitive; browsers send them lowercase.
        self.origins
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(text))
            .then(|| origin.clone())
    }
}

/// 403 for a preflight from an origin outside `[cors] allowed_origins`.
fn origin_not_allowed() -> OpenAiError {
    OpenAiError::new(
        StatusCode::FORBIDDEN,
        "invalid_request_error",
        "origin_not_allowed",
        "This origin is not allowed to call the proxy: add it to [cors] allowed_origins.",
    )
}

/// The requested headers that are allowed, lowercase and comma-separated; without a request
/// list, the fixed allowed names. `None` when nothing requested is allowed.
fn allow_headers(headers: &HeaderMap) -> Option<HeaderValue> {
    let Some(requested) = headers.get(ACCESS_CONTROL_REQUEST_HEADERS) else {
        return HeaderValue::from_str(&ALLOWED_HEADERS.join(", ")).ok();
    };
    let requested = requested.to_str().ok()?;
    let allowed: Vec<String> = requested
        .split(',')
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| is_allowed_header(name))
        .collect();
    if allowed.is_empty() {
        return None;
    }
    HeaderValue::from_str(&allowed.join(", ")).ok()
}

/// Whether a lowercase request header name may be sent cross-origin.
fn is_allowed_header(name: &str) -> bool {
    ALLOWED_HEADERS.contains(&name)
        || name
            .strip_prefix(ALLOWED_PREFIX)
            .is_some_and(|rest| !rest.is_empty() && HeaderName::from_bytes(name.as_bytes()).is_ok())
}

/// Whether a `Vary` value already lists `Origin` (or is `*`).
fn mentions_origin(vary: &str) -> bool {
    vary.split(',')
        .map(str::trim)
        .any(|v| v == "*" || v.eq_ignore_ascii_case("origin"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "https://app.example.com";

    fn cors(origins: &[&str]) -> Cors {
        Cors::new(&CorsSection {
            allowed_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
        })
    }

    fn request(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).expect("valid header"));
        }
        map
    }

    fn preflight_from(origin: &str, requested: &str) -> HeaderMap {
        request(&[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", requested),
        ])
    }

    fn header(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
        headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn preflight_from_a_listed_origin_echoes_it() {
        let cors = cors(&[APP, "http://localhost:3000"]);
        let response: Response<Full<Bytes>> =
            cors.preflight(&preflight_from(APP, "authorization, content-type"));
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        let h = response.headers();
        assert_eq!(header(h, ACCESS_CONTROL_ALLOW_ORIGIN), Some(APP));
        assert_eq!(header(h, ACCESS_CONTROL_ALLOW_METHODS), Some(ALLOW_METHODS));
        assert_eq!(
            header(h, ACCESS_CONTROL_ALLOW_HEADERS),
            Some("authorization, content-type")
        );
        assert_eq!(header(h, ACCESS_CONTROL_MAX_AGE), Some("86400"));
        assert!(header(h, VARY).is_some_and(|v| v.contains("Origin")));
    }

    #[test]
    fn preflight_with_wildcard_answers_star() {
        let response: Response<Full<Bytes>> =
            cors(&["*"]).preflight(&preflight_from("https://anything.test", "api-key"));
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            header(response.headers(), ACCESS_CONTROL_ALLOW_ORIGIN),
            Some("*")
        );
        assert_eq!(
            header(response.headers(), ACCESS_CONTROL_ALLOW_HEADERS),
            Some("api-key")
        );
    }

    #[test]
    fn preflight_from_another_origin_is_403_without_cors_headers() {
        let response: Response<Full<Bytes>> =
            cors(&[APP]).preflight(&preflight_from("https://evil.example.com", "authorization"));
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert!(
            response
                .headers()
                .get(ACCESS_CONTROL_ALLOW_ORIGIN)
                .is_none()
        );
        assert!(
            response
                .headers()
                .get(ACCESS_CONTROL_ALLOW_HEADERS)
                .is_none()
        );
        let empty: Response<Full<Bytes>> =
            cors(&[]).preflight(&preflight_from(APP, "authorization"));
        assert_eq!(empty.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn preflight_echoes_sdk_headers_and_drops_unknown_ones() {
        let requested = "Authorization, X-Stainless-OS, x-stainless-retry-count, \
                         openai-organization, x-secret-thing, x-stainless-";
        let response: Response<Full<Bytes>> =
            cors(&["*"]).preflight(&preflight_from(APP, requested));
        assert_eq!(
            header(response.headers(), ACCESS_CONTROL_ALLOW_HEADERS),
            Some("authorization, x-stainless-os, x-stainless-retry-count, openai-organization")
        );
    }

    #[test]
    fn preflight_without_a_request_list_names_the_fixed_headers() {
        let headers = request(&[("origin", APP), ("access-control-request-method", "GET")]);
        let response: Response<Full<Bytes>> = cors(&["*"]).preflight(&headers);
        let allowed = header(response.headers(), ACCESS_CONTROL_ALLOW_HEADERS).expect("list");
        for name in ALLOWED_HEADERS {
            assert!(allowed.contains(name), "{name} missing from {allowed}");
        }
        let none: Response<Full<Bytes>> = cors(&["*"]).preflight(&preflight_from(APP, "x-other"));
        assert!(none.headers().get(ACCESS_CONTROL_ALLOW_HEADERS).is_none());
    }

    #[test]
    fn origins_match_case_insensitively() {
        let response: Response<Full<Bytes>> =
            cors(&["https://App.Example.com"]).preflight(&preflight_from(APP, "authorization"));
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }

    #[test]
    fn decorate_adds_headers_for_an_allowed_origin() {
        let mut response = request(&[("vary", "Accept-Encoding")]);
        cors(&[APP]).decorate(Some(&HeaderValue::from_static(APP)), &mut response);
        assert_eq!(header(&response, ACCESS_CONTROL_ALLOW_ORIGIN), Some(APP));
        let exposed = header(&response, ACCESS_CONTROL_EXPOSE_HEADERS).expect("exposed");
        for name in [
            "x-request-id",
            "x-kcp-request-id",
            "openai-processing-ms",
            "retry-after",
        ] {
            assert!(exposed.contains(name), "{name}");
        }
        assert!(exposed.contains("x-ratelimit-remaining-tokens"));
        let vary: Vec<_> = response.get_all(VARY).iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin"]);
    }

    #[test]
    fn decorate_adds_vary_once() {
        let mut response = request(&[("vary", "origin")]);
        cors(&["*"]).decorate(Some(&HeaderValue::from_static(APP)), &mut response);
        assert_eq!(response.get_all(VARY).iter().count(), 1);
        assert_eq!(header(&response, ACCESS_CONTROL_ALLOW_ORIGIN), Some("*"));
    }

    #[test]
    fn decorate_omits_headers_for_other_or_no_origins_and_drops_upstream_ones() {
        let upstream = || {
            request(&[
                ("access-control-allow-origin", "*"),
                ("access-control-allow-credentials", "true"),
                ("content-type", "application/json"),
            ])
        };
        let mut response = upstream();
        cors(&[APP]).decorate(
            Some(&HeaderValue::from_static("https://evil.example.com")),
            &mut response,
        );
        assert!(response.get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        assert!(response.get(ACCESS_CONTROL_ALLOW_CREDENTIALS).is_none());
        assert!(response.get(ACCESS_CONTROL_EXPOSE_HEADERS).is_none());
        assert!(response.get(VARY).is_none());
        assert!(response.get("content-type").is_some());

        let mut response = upstream();
        cors(&["*"]).decorate(None, &mut response);
        assert!(response.get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    }
}
