//! Errors the proxy itself answers with, in OpenAI's error shape.
//!
//! SDKs parse `{"error":{"message","type","param","code"}}` to decide whether to retry and
//! what to show, so every error kcp makes (as opposed to passing the provider's through)
//! uses that shape, with a message that says what happened in plain words and never a
//! secret.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

/// One proxy-made error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI's `error.type`.
    pub kind: &'static str,
    /// OpenAI's `error.code`.
    pub code: &'static str,
    /// Plain-words message.
    pub message: String,
    /// When retrying may help: sent as `Retry-After` (whole seconds, rounded up) and
    /// `retry-after-ms`.
    pub retry_after: Option<Duration>,
    /// More headers (the pool's `x-ratelimit-*`).
    pub headers: Vec<(HeaderName, u64)>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl OpenAiError {
    /// An error with the given status, type, code and message.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        OpenAiError {
            status,
            kind,
            code,
            message: message.into(),
            retry_after: None,
            headers: Vec::new(),
        }
    }

    /// Adds `Retry-After` (whole seconds, at least 1).
    pub fn retry_after(self, secs: u64) -> Self {
        self.retry_after_exactly(Duration::from_secs(secs))
    }

    /// Adds `Retry-After` (whole seconds, rounded up, at least 1) and `retry-after-ms` (at
    /// least 1).
    pub fn retry_after_exactly(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// Adds a header with a number.
    pub fn header(mut self, name: &'static str, value: u64) -> Self {
        self.headers.push((HeaderName::from_static(name), value));
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let envelope = Envelope {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: None,
                code: self.code,
            },
        };
        // Serializing plain strings into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default())
    }

    /// The HTTP response.
    pub fn into_response<B: From<Full<Bytes>>>(self) -> Response<B> {
        let mut response = Response::new(B::from(Full::new(self.body())));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(wait) = self.retry_after {
            let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
            let millis = wait.as_nanos().div_ceil(1_000_000).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            headers.insert(
                HeaderName::from_static("retry-after-ms"),
                HeaderValue::from(u64::try_from(millis).unwrap_or(u64::MAX)),
            );
        }
        for (name, value) in self.headers {
            headers.insert(name, HeaderValue::from(value));
        }
        response
    }

    /// 404 `model_not_found`: no key serves the model; no upstream call was made.
    pub fn model_not_found(model: &str) -> Self {
        let shown: String = model.chars().take(128).collect();
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("No API key in this proxy's pool serves the model `{shown}`."),
        )
    }

    /// 429 `rate_limit_exceeded`: every eligible key is cooling or limited, and the first
    /// frees in `wait`.
    pub fn all_keys_busy(wait: Duration) -> Self {
        let retry_after_secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            "rate_limit_exceeded",
            format!("Every API key that serves this request is rate limited; the first one frees up in about {retry_after_secs} s."),
        )
        .retry_after_exactly(wait)
    }

    /// 503 `no_available_keys`: every eligible key is disabled.
    pub fn no_available_keys() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no_available_keys",
            "Every API key that serves this request has been rejected by the provider (revoked, forbidden or out of quota) and is disabled until it is re-checked.",
        )
    }

    /// 502 `upstream_unavailable`: the provider could not be reached or kept failing.
    pub fn upstream_unavailable(detail: &str) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "upstream_unavailable",
            format!("The upstream API could not serve the request: {detail}."),
        )
    }

    /// 503 `upstream_unavailable`: every usable key's circuit is open after failures to reach
    /// the provider; the first lets a trial through in about `retry_after_secs`.
    pub fn provider_unreachable(wait: Duration) -> Self {
        let retry_after_secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "upstream_unavailable",
            format!("The upstream API cannot be reached (connections failed or timed out on every key); the proxy tries again in about {retry_after_secs} s."),
        )
        .retry_after_exactly(wait)
    }

    /// 404 `model_not_found`: every key that serves the model (or endpoint) was lately
    /// refused it by the provider; each is re-checked after a backoff.
    pub fn refused_by_every_key(scope: &str) -> Self {
        let shown: String = scope.chars().take(128).collect();
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "The provider refused `{shown}` for every API key in this proxy's pool that serves it; they are re-checked after a backoff."
            ),
        )
    }

    /// 413 `request_too_large`: the provider reported that the request needs more tokens
    /// than any key's limit allows.
    pub fn too_large_for_every_key() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            "The request needs more tokens than the limit of any API key in this proxy's pool that serves its model.",
        )
    }

    /// 504 `upstream_timeout`: no response headers in time.
    pub fn upstream_timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "upstream_timeout",
            "The upstream API sent no response in time.",
        )
    }

    /// 401 `invalid_api_key` for a client that did not present a valid proxy key.
    pub fn client_unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "Missing or invalid proxy key: send one of the configured client keys as `Authorization: Bearer <key>` or `api-key: <key>`.",
        )
    }

    /// 413: the request body is larger than `server.request_body_limit_bytes`.
    pub fn body_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("The request body is larger than this proxy's limit of {limit} bytes."),
        )
    }

    /// 408: the client sent its body too slowly.
    pub fn body_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            "The request body arrived too slowly and the proxy stopped waiting for it.",
        )
    }

    /// 503 `overloaded`: more requests in flight than `server.max_inflight`.
    pub fn overloaded(retry_after_secs: u64) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "overloaded",
            "The proxy is at its limit of concurrent requests; retry shortly.",
        )
        .retry_after(retry_after_secs)
    }

    /// 404 for paths the proxy does not serve.
    pub fn not_found(path: &str) -> Self {
        let shown: String = path.chars().take(128).collect();
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_url",
            format!("Unknown path `{shown}`: this proxy serves /v1/*, /health and /ready."),
        )
    }

    /// 400 for a request the proxy cannot even read (e.g. a malformed multipart body).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_openai_shape() {
        let err = OpenAiError::all_keys_busy(Duration::from_millis(2_500));
        let response: Response<Full<Bytes>> = err.clone().into_response();
        assert_eq!(response.headers()["retry-after"], "3");
        assert_eq!(response.headers()["retry-after-ms"], "2500");
        let value: serde_json::Value = serde_json::from_slice(&err.body()).expect("json");
        assert_eq!(value["error"]["code"], "rate_limit_exceeded");
        assert_eq!(value["error"]["type"], "requests");
        assert!(value["error"]["param"].is_null());
        assert!(
            value["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("3 s"))
        );
        let response: Response<Full<Bytes>> = err.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
    }

    #[test]
    fn long_model_names_are_cut() {
        let model = "m".repeat(10_000);
        assert!(OpenAiError::model_not_found(&model).message.len() < 300);
    }
}

/// `Retry-After` rounding at its edges.
#[cfg(test)]
mod retry_after_tests {
    use super::*;

    fn headers(wait: Duration) -> (String, String) {
        let response: Response<Full<Bytes>> = OpenAiError::overloaded(0)
            .retry_after_exactly(wait)
            .into_response();
        let header = |name: &str| response.headers()[name].to_str().expect("ascii").to_owned();
        (header("retry-after"), header("retry-after-ms"))
    }

    #[test]
    fn whole_seconds_are_sent_as_they_are_and_a_fraction_rounds_up() {
        assert_eq!(headers(Duration::from_secs(2)), ("2".into(), "2000".into()));
        assert_eq!(
            headers(Duration::from_secs(2) + Duration::from_nanos(1)),
            ("3".into(), "2001".into())
        );
        assert_eq!(headers(Duration::ZERO), ("1".into(), "1".into()));
        assert_eq!(headers(Duration::from_micros(1)), ("1".into(), "1".into()));
    }

    /// The seconds a message quotes: whole seconds as they are, a fraction rounded up.
    fn quoted(error: &OpenAiError) -> &str {
        let at = error.message.find("about ").expect("quotes a wait") + "about ".len();
        let rest = &error.message[at..];
        &rest[..rest.find(' ').expect("a unit follows")]
    }

    #[test]
    fn messages_quote_the_wait_rounded_up() {
        for (wait, secs) in [
            (Duration::from_secs(2), "2"),
            (Duration::from_millis(2_500), "3"),
            (Duration::from_nanos(1), "1"),
            (Duration::ZERO, "1"),
        ] {
            assert_eq!(quoted(&OpenAiError::all_keys_busy(wait)), secs, "{wait:?}");
            assert_eq!(
                quoted(&OpenAiError::provider_unreachable(wait)),
                secs,
                "{wait:?}"
            );
        }
    }
}
