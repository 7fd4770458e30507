//! What the provider answered, and which error class that puts it in.
//!
//! This is the only place that classifies: the caller reads the answer's status, headers and
//! (for errors) the small JSON error body, builds an [`Answer`], and [`classify`] says what
//! it means for the key and for the request.
//!
//! | class | answers | the key | the request |
//! |---|---|---|---|
//! | [`Class::KeyRejected`] | 401; 402; 429 `insufficient_quota` / `billing*`; a 403 whose body says the key or account is refused | disabled and re-checked later | next key |
//! | [`Class::ModelRefused`] | any other 403; a 404 about the model (`model_not_found`, `DeploymentNotFound`, a message naming the model) | refuses that model (or endpoint) for a while | next key that may serve it, else the provider's answer |
//! | [`Class::RateLimited`] | other 429s | rests as the provider says | next key, or a wait |
//! | [`Class::TooLarge`] | 429 "Request too large … Limit N, Requested M" | learns its token limit, nothing else | a key whose limit fits, else the provider's answer |
//! | [`Class::Upstream`] | no answer; 500, 502, 503, 504 | health penalty, circuit; a 503 `Retry-After` rests it | retried with backoff unless it may have reached the provider and may not be replayed |
//! | [`Class::Request`] | any other 4xx (a 404 for an unknown object too, Azure's 400 `content_filter`) | nothing | passed through after one call |

use std::time::Duration;

use crate::outcome::{DisableReason, UpstreamFailure};
use crate::ratelimit_headers::RateLimitHeaders;

/// One answer to one attempt, as the caller saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Answer<'a> {
    /// The provider answered with a status.
    Reply(Reply<'a>),
    /// No answer came.
    Failed {
        /// What failed.
        failure: UpstreamFailure,
        /// Whether the request may have reached the provider (it was written, or the
        /// connection broke after that): such a request may already be billed.
        reached: bool,
    },
}

/// An answer with a status.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Reply<'a> {
    /// HTTP status.
    pub status: u16,
    /// Rate-limit and retry headers.
    pub limits: RateLimitHeaders,
    /// The JSON error body's `error` object, when the caller read one.
    pub error: ErrorBody<'a>,
    /// `openai-organization`: the account the key belongs to, when the provider says.
    pub organization: Option<&'a str>,
    /// Time until the response head.
    pub latency: Duration,
}

/// The fields of an OpenAI-style error body (`{"error": {"message", "type", "code"}}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ErrorBody<'a> {
    /// `error.code`.
    pub code: Option<&'a str>,
    /// `error.type`.
    pub kind: Option<&'a str>,
    /// `error.message`.
    pub message: Option<&'a str>,
}

/// What an answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A usable answer (1xx–3xx).
    Success,
    /// The request's own fault: pass it through.
    Request,
    /// A rate limit: the key rests.
    RateLimited,
    /// The request needs more tokens than the key's limit.
    TooLarge {
        /// The key's token limit, as the message says.
        limit: Option<u64>,
        /// The tokens the request needs, as the message says.
        requested: Option<u64>,
    },
    /// The key itself is refused.
    KeyRejected(DisableReason),
    /// The key may not serve this model or endpoint.
    ModelRefused,
    /// The provider failed or could not be reached.
    Upstream {
        /// What failed.
        failure: UpstreamFailure,
        /// `Retry-After` of a 503.
        retry_after: Option<Duration>,
        /// Whether the request may have reached the provider and been run (an exchange
        /// that broke after the write; not an answered 5xx).
        reached: bool,
    },
}

/// Classifies an answer (see the module docs).
pub fn classify(answer: &Answer<'_>) -> Class {
    let reply = match answer {
        Answer::Failed { failure, reached } => {
            return Class::Upstream {
                failure: *failure,
                retry_after: None,
                reached: *reached,
            };
        }
        Answer::Reply(reply) => reply,
    };
    let error = &reply.error;
    match reply.status {
        100..=399 => Class::Success,
        401 => Class::KeyRejected(DisableReason::Unauthorized),
        402 => Class::KeyRejected(DisableReason::Billing),
        403 if refuses_the_key(error) => Class::KeyRejected(DisableReason::Forbidden),
        403 => Class::ModelRefused,
        404 if about_the_model(error) => Class::ModelRefused,
        429 => classify_429(error),
        // The provider answered that it failed: it did not run the request, so sending it
        // again cannot bill it twice.
        status @ (500 | 502 | 503 | 504) => Class::Upstream {
            failure: UpstreamFailure::Status(status),
            retry_after: (status == 503)
                .then_some(reply.limits.retry_after)
                .flatten(),
            reached: false,
        },
        _ => Class::Request,
    }
}

fn classify_429(error: &ErrorBody<'_>) -> Class {
    let is = |word: &str| error.code == Some(word) || error.kind == Some(word);
    let starts = |prefix: &str| {
        error.code.is_some_and(|c| c.starts_with(prefix))
            || error.kind.is_some_and(|k| k.starts_with(prefix))
    };
    if is("insufficient_quota") {
        return Class::KeyRejected(DisableReason::QuotaExhausted);
    }
    if starts("billing") {
        return Class::KeyRejected(DisableReason::Billing);
    }
    let message = error.message.unwrap_or("");
    let limit = number_after(message, "Limit ");
    let requested = number_after(message, "Requested ");
    let too_large = contains_ignore_case(message, "request too large")
        || matches!((limit, requested), (Some(l), Some(r)) if r > l);
    if too_large {
        Class::TooLarge { limit, requested }
    } else {
        Class::RateLimited
    }
}

/// Whether a 403's body says the key or its account itself is refused, rather than the model,
/// the endpoint or the caller's region.
fn refuses_the_key(error: &ErrorBody<'_>) -> bool {
    const KEY_CODES: [&str; 4] = [
        "invalid_api_key",
        "account_deactivated",
        "organization_deactivated",
        "api_key_revoked",
    ];
    if error.code.is_some_and(|c| KEY_CODES.contains(&c)) {
        return true;
    }
    let message = error.message.unwrap_or("");
    let about_key = contains_ignore_case(message, "api key")
        || contains_ignore_case(message, "account")
        || contains_ignore_case(message, "organization has been");
    let refused = [
        "invalid",
        "incorrect",
        "revoked",
        "disabled",
        "deactivated",
        "suspended",
    ]
    .iter()
    .any(|w| contains_ignore_case(message, w));
    about_key && refused && !contains_ignore_case(message, "model")
}

/// Whether a 404's body is about the model (or an Azure deployment), rather than an object
/// the request names.
fn about_the_model(error: &ErrorBody<'_>) -> bool {
    matches!(error.code, Some("model_not_found" | "DeploymentNotFound"))
        || error
            .message
            .is_some_and(|m| contains_ignore_case(m, "model"))
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// The number after `label` in `text` ("Limit 30000, Requested 50,000": digits, with
/// thousands separators skipped).
fn number_after(text: &str, label: &str) -> Option<u64> {
    let start = text.find(label)? + label.len();
    let mut value: u64 = 0;
    let mut digits = 0;
    for c in text[start..].chars() {
        match c {
            '0'..='9' => {
                value = value
                    .checked_mul(10)?
                    .checked_add(u64::from(c as u8 - b'0'))?;
                digits += 1;
            }
            ',' | '_' if digits > 0 => {}
            _ => break,
        }
    }
    (digits > 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(
        status: u16,
        code: Option<&'static str>,
        message: Option<&'static str>,
    ) -> Answer<'static> {
        Answer::Reply(Reply {
            status,
            error: ErrorBody {
                code,
                kind: None,
                message,
            },
            ..Reply::default()
        })
    }

    #[test]
    fn statuses_fall_into_their_classes() {
        use DisableReason::*;
        assert_eq!(classify(&reply(200, None, None)), Class::Success);
        assert_eq!(classify(&reply(304, None, None)), Class::Success);
        assert_eq!(
            classify(&reply(401, None, None)),
            Class::KeyRejected(Unauthorized)
        );
        assert_eq!(
            classify(&reply(401, Some("invalid_api_key"), None)),
            Class::KeyRejected(Unauthorized)
        );
        assert_eq!(
            classify(&reply(402, None, None)),
            Class::KeyRejected(Billing)
        );
        for s in [400, 409, 413, 422, 501] {
            assert_eq!(classify(&reply(s, None, None)), Class::Request, "{s}");
        }
        assert_eq!(
            classify(&reply(404, None, Some("No such File object: file-1"))),
            Class::Request
        );
    }

    #[test]
    fn quota_billing_and_rate_limit_429s_are_told_apart() {
        use DisableReason::*;
        assert_eq!(
            classify(&reply(429, Some("insufficient_quota"), None)),
            Class::KeyRejected(QuotaExhausted)
        );
        let by_type = Answer::Reply(Reply {
            status: 429,
            error: ErrorBody {
                code: None,
                kind: Some("insufficient_quota"),
                message: None,
            },
            ..Reply::default()
        });
        assert_eq!(classify(&by_type), Class::KeyRejected(QuotaExhausted));
        assert_eq!(
            classify(&reply(429, Some("billing_hard_limit_reached"), None)),
            Class::KeyRejected(Billing)
        );
        assert_eq!(
            classify(&reply(429, Some("rate_limit_exceeded"), None)),
            Class::RateLimited
        );
        assert_eq!(classify(&reply(429, None, None)), Class::RateLimited);
        let used = "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): \
                    Limit 30000, Used 29000, Requested 2000. Please try again in 2s.";
        assert_eq!(
            classify(&reply(429, Some("rate_limit_exceeded"), Some(used))),
            Class::RateLimited
        );
    }

    #[test]
    fn a_request_too_large_for_the_key_is_not_a_rate_limit() {
        let message = "Request too large for gpt-4o in organization org-x on tokens per min (TPM): \
                       Limit 30000, Requested 50,000. The input or output tokens must be reduced.";
        assert_eq!(
            classify(&reply(429, Some("rate_limit_exceeded"), Some(message))),
            Class::TooLarge {
                limit: Some(30_000),
                requested: Some(50_000)
            }
        );
        assert_eq!(
            classify(&reply(429, None, Some("Limit 100, Requested 101"))),
            Class::TooLarge {
                limit: Some(100),
                requested: Some(101)
            }
        );
    }

    #[test]
    fn a_403_about_the_model_endpoint_or_region_refuses_only_that() {
        for (code, message) in [
            (
                Some("model_not_found"),
                "The model `gpt-5` does not exist or you do not have access to it.",
            ),
            (None, "Project `proj_1` does not have access to model `o3`"),
            (
                None,
                "You have insufficient permissions for this operation. Missing scopes: model.request.",
            ),
            (
                Some("unsupported_country_region_territory"),
                "Country, region, or territory not supported",
            ),
            (None, "You are not allowed to sample from this model"),
            // About the account, but refusing nothing about it.
            (None, "Your account does not have access to this feature."),
            // A refusal word, but not about the key or its account.
            (None, "Invalid scope for this request."),
            (None, ""),
        ] {
            assert_eq!(
                classify(&reply(403, code, Some(message))),
                Class::ModelRefused,
                "{message}"
            );
        }
        assert_eq!(classify(&reply(403, None, None)), Class::ModelRefused);
    }

    #[test]
    fn a_403_about_the_key_disables_it() {
        for (code, message) in [
            (
                Some("invalid_api_key"),
                "Incorrect API key provided: sk-ab***cd.",
            ),
            (None, "Your API key has been revoked."),
            (None, "This account has been deactivated."),
        ] {
            assert_eq!(
                classify(&reply(403, code, Some(message))),
                Class::KeyRejected(DisableReason::Forbidden),
                "{message}"
            );
        }
    }

    /// Azure's content filter judges the prompt, not the key: another key would filter it
    /// the same way, so it is passed through after one call.
    #[test]
    fn azure_content_filter_is_a_request_error() {
        let filtered = reply(
            400,
            Some("content_filter"),
            Some(
                "The response was filtered due to the prompt triggering Azure OpenAI's \
                 content management policy. Please modify your prompt and retry.",
            ),
        );
        assert_eq!(classify(&filtered), Class::Request);
    }

    #[test]
    fn a_404_about_the_model_refuses_it() {
        assert_eq!(
            classify(&reply(404, Some("model_not_found"), None)),
            Class::ModelRefused
        );
        assert_eq!(
            classify(&reply(404, Some("DeploymentNotFound"), None)),
            Class::ModelRefused
        );
        assert_eq!(
            classify(&reply(404, None, Some("The model `x` does not exist"))),
            Class::ModelRefused
        );
    }

    #[test]
    fn failures_and_5xx_are_upstream_with_reach_and_retry_after() {
        let failed = Answer::Failed {
            failure: UpstreamFailure::Connect,
            reached: false,
        };
        assert_eq!(
            classify(&failed),
            Class::Upstream {
                failure: UpstreamFailure::Connect,
                retry_after: None,
                reached: false
            }
        );
        let limits = RateLimitHeaders {
            retry_after: Some(Duration::from_secs(30)),
            ..RateLimitHeaders::default()
        };
        for status in [500, 502, 503, 504] {
            let answer = Answer::Reply(Reply {
                status,
                limits,
                ..Reply::default()
            });
            assert_eq!(
                classify(&answer),
                Class::Upstream {
                    failure: UpstreamFailure::Status(status),
                    retry_after: (status == 503).then_some(Duration::from_secs(30)),
                    reached: false
                }
            );
        }
    }

    #[test]
    fn numbers_are_read_after_their_label() {
        assert_eq!(number_after("Limit 1,000, x", "Limit "), Some(1000));
        assert_eq!(number_after("Limit x", "Limit "), None);
        assert_eq!(
            number_after("Limit ,5", "Limit "),
            None,
            "a separator only between digits"
        );
        assert_eq!(number_after("Limit 1_000_", "Limit "), Some(1000));
        assert_eq!(number_after("no label", "Limit "), None);
        assert_eq!(
            number_after("Limit 99999999999999999999999", "Limit "),
            None
        );
    }
}
