//! What the attempt loop did for one request, for the access log and metrics in one place.
//!
//! The service puts the report in the response's extensions, where [`crate::observe`] takes it
//! to write the access line and the request metrics once the body is done.

use std::time::Duration;

use http::StatusCode;
use kcp_core::KeyId;

use super::model::ModelName;

/// The result of forwarding one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Status sent to the client.
    pub status: StatusCode,
    /// The model the request named (not used for routing on stateful endpoints).
    pub model: Option<ModelName>,
    /// Key of the upstream answer passed to the client; `None` when the proxy answered.
    pub key: Option<KeyId>,
    /// Upstream calls made.
    pub attempts: u32,
    /// Time to the passed-through answer's response headers.
    pub upstream_ttfb: Option<Duration>,
    /// Time spent waiting on the upstream over all attempts, to each answer's head (and a 429's
    /// small body).
    pub upstream_time: Duration,
    /// Time spent waiting for a cooling key.
    pub waited: Duration,
    /// Time spent in backoff before retrying an upstream failure.
    pub backoff: Duration,
    /// Response body length when known in advance (proxy answers, `Content-Length`).
    pub bytes_out: Option<u64>,
    /// OpenAI `error.code` when the proxy answered itself (`rate_limit_exceeded`, ...).
    pub proxy_error: Option<&'static str>,
    /// Retries after upstream failures (each counts against `upstream.max_retries`).
    pub retries: u32,
    /// Keys given up on for this request after a 401/402/403/429.
    pub key_failovers: u32,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            status: StatusCode::OK,
            model: None,
            key: None,
            attempts: 0,
            upstream_ttfb: None,
            upstream_time: Duration::ZERO,
            waited: Duration::ZERO,
            backoff: Duration::ZERO,
            bytes_out: None,
            proxy_error: None,
            retries: 0,
            key_failovers: 0,
        }
    }
}

impl Report {
    /// Time the request spent, by design, away from the proxy's own work before its answer's
    /// head: on the upstream, waiting for a key, and in retry backoff.
    pub fn elsewhere(&self) -> Duration {
        self.upstream_time + self.waited + self.backoff
    }

    /// A debug line with every field; the access log proper is written by the service.
    pub fn trace(&self) {
        tracing::debug!(
            status = self.status.as_u16(),
            key = self.key.as_ref().map(KeyId::as_str),
            attempts = self.attempts,
            upstream_ttfb_ms = self.upstream_ttfb.map(|d| d.as_secs_f64() * 1e3),
            upstream_ms = self.upstream_time.as_secs_f64() * 1e3,
            waited_ms = self.waited.as_secs_f64() * 1e3,
            backoff_ms = self.backoff.as_secs_f64() * 1e3,
            bytes_out = self.bytes_out,
            proxy_error = self.proxy_error,
            retries = self.retries,
            key_failovers = self.key_failovers,
            "request forwarded"
        );
    }
}
