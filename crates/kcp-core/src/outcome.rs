//! What happened to one attempt, and which error class that puts it in.
//!
//! The classes (GUIDE.md, "Error classes") decide everything else: a key-permanent failure
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
    /// 401, 402, 403 or an exhausted quota: the key is disabled and re-probed later.
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
            Outcome::Upstream { .. } => Some(ErrorClass::Upstream),
            Outcome::RequestError { .. } => Some(ErrorClass::Request),
        }
    }
}

/// The four error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The key is unusable until re-checked (401, 402, 403, quota).
    KeyPermanent,
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
    /// 403: the key may not be used here.
    Forbidden,
    /// 402 or a billing error: the account needs payment.
    Billing,
    /// 429 `insufficient_quota`: the account's quota is spent.
    QuotaExhausted,
    /// An operator disabled it.
    Manual,
}

impl DisableReason {
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

/// How the caller should treat an HTTP status from the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// A usable answer.
    Success,
    /// A 429 rate limit.
    RateLimited,
    /// The key is rejected.
    KeyRejected(DisableReason),
    /// The provider failed.
    Upstream,
    /// The request was refused: pass it through.
    Request,
}

/// Classifies a provider status. `error_code` is the `error.code` (or `error.type`) of the
/// JSON error body when the caller read it: it tells a quota 429 from a rate-limit 429.
pub fn classify_status(status: u16, error_code: Option<&str>) -> StatusClass {
    match status {
        401 => StatusClass::KeyRejected(DisableReason::Unauthorized),
        402 => StatusClass::KeyRejected(DisableReason::Billing),
        403 => StatusClass::KeyRejected(DisableReason::Forbidden),
        429 => match error_code {
            Some("insufficient_quota") => StatusClass::KeyRejected(DisableReason::QuotaExhausted),
            Some(code) if code.starts_with("billing") => {
                StatusClass::KeyRejected(DisableReason::Billing)
            }
            _ => StatusClass::RateLimited,
        },
        500 | 502 | 503 | 504 => StatusClass::Upstream,
        100..=399 => StatusClass::Success,
        _ => StatusClass::Request,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_fall_into_the_guide_classes() {
        use DisableReason::*;
        assert_eq!(classify_status(200, None), StatusClass::Success);
        assert_eq!(
            classify_status(401, None),
            StatusClass::KeyRejected(Unauthorized)
        );
        assert_eq!(
            classify_status(402, None),
            StatusClass::KeyRejected(Billing)
        );
        assert_eq!(
            classify_status(403, None),
            StatusClass::KeyRejected(Forbidden)
        );
        assert_eq!(
            classify_status(429, Some("insufficient_quota")),
            StatusClass::KeyRejected(QuotaExhausted)
        );
        assert_eq!(
            classify_status(429, Some("billing_hard_limit_reached")),
            StatusClass::KeyRejected(Billing)
        );
        assert_eq!(
            classify_status(429, Some("rate_limit_exceeded")),
            StatusClass::RateLimited
        );
        assert_eq!(classify_status(429, None), StatusClass::RateLimited);
        for s in [500, 502, 503, 504] {
            assert_eq!(classify_status(s, None), StatusClass::Upstream);
        }
        for s in [400, 404, 409, 413, 422, 501] {
            assert_eq!(classify_status(s, None), StatusClass::Request);
        }
    }
}
