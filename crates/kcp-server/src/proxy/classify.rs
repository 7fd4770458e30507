//! An upstream answer or failure, as kcp-core's [`Outcome`] and error class.
//!
//! A status decides the class (GUIDE.md, "Error classes"), except for 429: OpenAI sends 429
//! both for a rate limit (the key rests, then works again) and for an exhausted quota (the
//! key is useless until someone pays), and only the body's `error.code` tells them apart. So
//! a 429's small error body is read; every other body is left for the client.

use std::borrow::Cow;
use std::time::Duration;

use http::Response;
use http_body_util::{BodyExt, Limited};
use kcp_core::{
    DisableReason, Outcome, RateLimitHeaders, StatusClass, UpstreamFailure, classify_status,
};
use kcp_upstream::{ErrorKind, ResponseBody};

use crate::clock;
use crate::metrics::UpstreamOutcome;

/// Largest 429 body read to find its error code; OpenAI's are a few hundred bytes.
const ERROR_BODY_LIMIT: usize = 16 * 1024;

/// How long a 429's body may take after its headers. It follows them at once in practice;
/// waiting longer would only delay the failover to the next key.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(5);

/// An upstream answer, classified.
#[derive(Debug)]
pub struct Classified {
    /// HTTP status.
    pub status: u16,
    /// Error class of the status (for a 429, of its error code).
    pub class: StatusClass,
    /// Rate-limit headers of the answer.
    pub limits: RateLimitHeaders,
    /// The answer itself, unless its body was read to classify it (a 429).
    pub response: Option<Response<ResponseBody>>,
}

/// Classifies an answer, reading the body of a 429 to tell a quota from a rate limit.
pub async fn classify(response: Response<ResponseBody>) -> Classified {
    let headers = response.headers();
    let limits = RateLimitHeaders::parse(
        headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
        clock::unix_now(),
    );
    let status = response.status().as_u16();
    if status != 429 {
        return Classified {
            status,
            class: classify_status(status, None),
            limits,
            response: Some(response),
        };
    }
    let code = error_code(response.into_body()).await;
    Classified {
        status,
        class: classify_status(status, code.as_deref()),
        limits,
        response: None,
    }
}

impl Classified {
    /// The outcome to record; `latency` is the time to the response headers.
    pub fn outcome(&self, latency: Duration) -> Outcome {
        let limits = self.limits;
        match self.class {
            StatusClass::Success => Outcome::Success { latency, limits },
            StatusClass::Request => Outcome::RequestError { latency, limits },
            StatusClass::RateLimited => Outcome::RateLimited { limits },
            StatusClass::KeyRejected(reason) => Outcome::KeyRejected { reason },
            StatusClass::Upstream => Outcome::Upstream {
                failure: UpstreamFailure::Status(self.status),
                retry_after: self.retry_after(),
            },
        }
    }

    /// `Retry-After` of a 503 (the only upstream-class status where it is honoured).
    pub fn retry_after(&self) -> Option<Duration> {
        (self.status == 503)
            .then_some(self.limits.retry_after)
            .flatten()
    }

    /// The metrics label of this attempt.
    pub fn label(&self) -> UpstreamOutcome {
        match self.class {
            StatusClass::Success => UpstreamOutcome::Success,
            StatusClass::Request => UpstreamOutcome::ClientError,
            StatusClass::RateLimited => UpstreamOutcome::RateLimited,
            StatusClass::KeyRejected(DisableReason::QuotaExhausted | DisableReason::Billing) => {
                UpstreamOutcome::Quota
            }
            StatusClass::KeyRejected(_) => UpstreamOutcome::Auth,
            StatusClass::Upstream => UpstreamOutcome::ServerError,
        }
    }
}

/// The upstream failure of a failed exchange.
pub fn failure_of(kind: ErrorKind) -> UpstreamFailure {
    match kind {
        ErrorKind::Connect | ErrorKind::Tls => UpstreamFailure::Connect,
        ErrorKind::HeadersTimeout => UpstreamFailure::Timeout,
        ErrorKind::Protocol | ErrorKind::BodyIdleTimeout | ErrorKind::Body => {
            UpstreamFailure::Protocol
        }
    }
}

/// The metrics label of a failed exchange.
pub fn failure_label(kind: ErrorKind) -> UpstreamOutcome {
    match kind {
        ErrorKind::Connect | ErrorKind::Tls => UpstreamOutcome::ConnectError,
        ErrorKind::HeadersTimeout => UpstreamOutcome::Timeout,
        ErrorKind::Protocol | ErrorKind::BodyIdleTimeout | ErrorKind::Body => {
            UpstreamOutcome::ServerError
        }
    }
}

/// `error.code` (else `error.type`) of an OpenAI error body; `None` when the body is
/// missing, too large, too slow or not that shape.
async fn error_code(body: ResponseBody) -> Option<String> {
    let read = Limited::new(body, ERROR_BODY_LIMIT).collect();
    let bytes = tokio::time::timeout(ERROR_BODY_WAIT, read)
        .await
        .ok()?
        .ok()?
        .to_bytes();
    code_of(&bytes)
}

fn code_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow)]
        error: Inner<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Inner<'a> {
        #[serde(borrow, default)]
        code: Option<Cow<'a, str>>,
        #[serde(borrow, default, rename = "type")]
        kind: Option<Cow<'a, str>>,
    }
    let envelope: Envelope<'_> = serde_json::from_slice(body).ok()?;
    let Inner { code, kind } = envelope.error;
    code.or(kind).map(Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_of_openai_bodies() {
        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        assert_eq!(code_of(quota).as_deref(), Some("insufficient_quota"));
        let rate = br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        assert_eq!(code_of(rate).as_deref(), Some("rate_limit_exceeded"));
        let type_only = br#"{"error":{"message":"m","type":"insufficient_quota","code":null}}"#;
        assert_eq!(code_of(type_only).as_deref(), Some("insufficient_quota"));
        assert_eq!(code_of(b"<html>Too Many Requests</html>"), None);
        assert_eq!(code_of(br#"{"error":"slow down"}"#), None);
        assert_eq!(code_of(b""), None);
    }

    #[test]
    fn exchange_failures_map_to_core_failures() {
        assert_eq!(failure_of(ErrorKind::Tls), UpstreamFailure::Connect);
        assert_eq!(
            failure_of(ErrorKind::HeadersTimeout),
            UpstreamFailure::Timeout
        );
        assert_eq!(failure_of(ErrorKind::Protocol), UpstreamFailure::Protocol);
        assert_eq!(
            failure_label(ErrorKind::Connect),
            UpstreamOutcome::ConnectError
        );
    }
}
