//! What happened to one attempt, and which error class that puts it in.
//!
//! The classes (README.md, "How a request flows") decide everything else: a key-permanent failure
//! disables the key, a key-transient one cools it, an upstream failure costs health and may
//! open the key's circuit, and a request-class answer says nothing about the key at all.

use std::time::Duration;

use crate::ratelimit_headers::RateLimitHeaders;

/// The result of one attempt on one key, as the caller reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A 2xx/3xx answer.
    Success {
        /// Time until response headers.
        latency: Duration,
        /// Rate-limit headers of the answer.
        limits: RateLimitHeaders,
    },
    /// A 429 rate limit: the key cools until the provider's deadline.
    RateLimited {
        /// Rate-limit and retry headers of the answer.
        limits: RateLimitHeaders,
    },
    /// 401, 402, a 403 about the key itself, or an exhausted quota: the key is disabled and
    /// re-checked later.
    KeyRejected {
        /// Why.
        reason: DisableReason,
    },
    /// The upstream failed: connect/TLS error, no headers in time, 500/502/503/504.
    Upstream {
        /// What failed.
        failure: UpstreamFailure,
        /// `Retry-After` of a 503, if any.
        retry_after: Option<Duration>,
    },
    /// A 403/404 about the model or endpoint: the key may not serve that one scope (recorded
    /// with [`crate::Lease::refuse`], which also marks the scope), and nothing else changes.
    ModelRefused,
    /// A 429 "request too large": the request needs more tokens than the key's limit. Not a
    /// rate limit: the key neither rests nor slows down, but learns its token limit.
    TooLarge {
        /// Rate-limit headers of the answer, with the limit the message reported.
        limits: RateLimitHeaders,
    },
    /// Any other 4xx: the request's fault, not the key's.
    RequestError {
        /// Time until response headers.
        latency: Duration,
        /// Rate-limit headers of the answer.
        limits: RateLimitHeaders,
    },
    /// The attempt ended without an answer that says anything (client left, lease dropped).
    Cancelled,
}

impl Outcome {
    /// The error class, `None` for success and cancellation.
    pub fn class(&self) -> Option<ErrorClass> {
        match self {
            Outcome::Success { .. } | Outcome::Cancelled => None,
            Outcome::RateLimited { .. } => Some(ErrorClass::KeyTransient),
            Outcome::KeyRejected { .. } => Some(ErrorClass::KeyPermanent),
            Outcome::ModelRefused => Some(ErrorClass::KeyForModel),
            Outcome::TooLarge { .. } => Some(ErrorClass::TooLargeForKey),
            Outcome::Upstream { .. } => Some(ErrorClass::Upstream),
            Outcome::RequestError { .. } => Some(ErrorClass::Request),
        }
    }
}

/// The error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The key is unusable until re-checked (401, 402, a 403 about the key, quota).
    KeyPermanent,
    /// The key may not serve this model or endpoint (a 403/404 about it).
    KeyForModel,
    /// The request needs more tokens than this key's limit allows.
    TooLargeForKey,
    /// The key is rate limited for a while (429).
    KeyTransient,
    /// The provider or the network failed.
    Upstream,
    /// The request itself was refused.
    Request,
}

/// Why a key is disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
pub enum DisableReason {
    /// 401: the key is invalid or revoked.
    Unauthorized,
    /// A 403 whose body says the key or its account itself is refused.
    Forbidden,
    /// 402 or a billing error: the account needs payment.
    Billing,
    /// 429 `insufficient_quota`: the account's quota is spent.
    QuotaExhausted,
    /// An operator disabled it.
    Manual,
}

impl DisableReason {
    /// Whether the key is re-checked by letting one real request through (a spent quota or
    /// an unpaid bill: `GET /v1/models` answers 200 for those) rather than by the caller's
    /// re-check request ([`crate::KeyPool::due_probes`]).
    pub fn rechecked_by_request(self) -> bool {
        matches!(self, DisableReason::QuotaExhausted | DisableReason::Billing)
    }

    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DisableReason::Unauthorized => "unauthorized",
            DisableReason::Forbidden => "forbidden",
            DisableReason::Billing => "billing",
            DisableReason::QuotaExhausted => "quota_exhausted",
            DisableReason::Manual => "manual",
        }
    }
}

/// What failed on the way to the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamFailure {
    /// TCP or TLS connect failed: nothing was sent.
    Connect,
    /// No response headers in time.
    Timeout,
    /// The connection broke or spoke nonsense.
    Protocol,
    /// A 500, 502, 503 or 504.
    Status(u16),
}
