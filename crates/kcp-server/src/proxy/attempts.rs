//! The attempt loop's I/O: kcp-core's [`Attempt`] decides, this module performs.
//!
//! For one client request it asks the attempt what to do next and does it: sends the request
//! with the leased key and reads the answer ([`super::reply`]), sleeps a retry's backoff, waits
//! for a key holding a place in the wait queue, or answers the client. Every rule (which key,
//! what an answer means, when to retry, wait or give up) is kcp-core's; see its `attempt`
//! module and the README's error-class table.
//!
//! What is left here is what only a server knows: building the upstream request, keeping the
//! one answer the attempt may still deliver (the last upstream failure, or the provider's
//! refusal of a model), turning a give-up into an OpenAI-shaped error, and recording each
//! attempt in `kcp_upstream_requests_total{key,outcome}` and `kcp_upstream_ttfb_seconds`,
//! retries in `kcp_retries_total{reason}`, the time waited for a key in
//! `kcp_queue_wait_seconds`, and every key state change as a warn log line.
//!
//! Everything happens before the first response byte goes to the client, and the loop is the
//! request's own future: when the client leaves, hyper drops it, which drops the in-flight
//! upstream call and the lease (recorded as cancelled). Nothing retries after that.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, header};
use http_body::Body;
use http_body_util::Full;
use kcp_core::{
    Action, Answer, Attempt, Backoff, Changes, Class, ClientRequest, DisableReason, GiveUp, KeyId,
    KeyPool, Lease, Next, Replay, RetryPolicy, Time, UpstreamFailure, Verdict,
};
use kcp_upstream::{ErrorKind, UpstreamError};

use super::body::ProxyBody;
use super::headers::{self, KeyHeaderError};
use super::reply;
use super::report::Report;
use super::target_url;
use crate::app::App;
use crate::clock;
use crate::config::Config;
use crate::edge::openai_error::OpenAiError;
use crate::observe::Unfinished;
use crate::observe::access_log::log_state_change;
use crate::observe::metrics::UpstreamOutcome;

/// A client request, ready to be sent with any key.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// Method.
    pub method: &'a Method,
    /// Client request target below the key's base url (`/v1/...?...`).
    pub path_and_query: &'a str,
    /// The client's headers, already rewritten for the upstream (`headers::rewrite_request`).
    pub headers: &'a HeaderMap,
    /// The buffered body, replayed on each attempt without a copy.
    pub body: &'a Bytes,
    /// Model used for routing.
    pub model: Option<&'a str>,
    /// What a key's refusal is about: the model, else the endpoint.
    pub scope: Option<&'a str>,
    /// Estimated tokens, for token budgets.
    pub tokens: u64,
    /// Whether the request must go to the home key.
    pub stateful: bool,
    /// Whether the client sent an `Idempotency-Key` (a POST may then be replayed).
    pub idempotency_key: bool,
}

/// The retry and wait settings of the config in force.
pub fn retry_policy(config: &Config) -> RetryPolicy {
    let backoff = Backoff {
        initial: config.upstream.retry_initial_backoff(),
        max: config.upstream.retry_max_backoff(),
    };
    RetryPolicy {
        max_retries: config.upstream.max_retries,
        backoff,
        max_wait: config.rate_limit.max_wait(),
        max_queue: config.rate_limit.max_queue,
        queue_delay: config.rate_limit.queue_delay(),
        max_unavailable_rest: backoff.max,
        ..RetryPolicy::default()
    }
}

/// Forwards `request` and returns the answer for the client with `report` completed. If the
/// request is abandoned (its future dropped) first, the report so far is left in `unfinished`.
pub async fn forward(
    app: &App,
    pool: Arc<KeyPool>,
    config: &Config,
    request: &Outgoing<'_>,
    report: Report,
    unfinished: Option<Unfinished>,
) -> (Response<ProxyBody>, Report) {
    let attempt = Attempt::new(
        ClientRequest {
            model: request.model,
            scope: request.scope,
            tokens: request.tokens,
            replay: Replay::of(request.method.as_str(), request.idempotency_key),
            home: request.stateful,
        },
        retry_policy(config),
    );
    let driver = Driver {
        app,
        request,
        pool,
        kept: None,
        retry_reason: None,
        report,
        unfinished,
    };
    driver.run(attempt).await
}

/// The I/O side of one request's attempts.
struct Driver<'a> {
    app: &'a App,
    request: &'a Outgoing<'a>,
    /// The pool of the generation the request arrived in: key indices stay meaningful.
    pool: Arc<KeyPool>,
    /// The answer to deliver if the attempt gives up with [`GiveUp::LastAnswer`].
    kept: Option<Kept>,
    /// Why the next upstream call is a retry, if it is one (`kcp_retries_total`'s reason).
    retry_reason: Option<&'static str>,
    report: Report,
    /// Where the report goes if the request is abandoned before its answer.
    unfinished: Option<Unfinished>,
}

impl Drop for Driver<'_> {
    fn drop(&mut self) {
        if let Some(unfinished) = self.unfinished.take() {
            unfinished.keep(std::mem::take(&mut self.report));
        }
    }
}

/// An answer the attempt may still deliver.
enum Kept {
    /// An upstream answer (a 5xx, or a key's refusal of the model).
    Answer {
        response: Box<Response<ProxyBody>>,
        key: KeyId,
        ttfb: Duration,
    },
    /// No answer at all: 502 or 504.
    Exchange(UpstreamError),
}

impl Driver<'_> {
    async fn run(mut self, mut attempt: Attempt<'_>) -> (Response<ProxyBody>, Report) {
        let answer = loop {
            let now = clock::now();
            let next = clock::with_rng(|rng| attempt.next(&self.pool, &self.app.queue, now, rng));
            match next {
                Next::Send(lease) => {
                    if let Some(answer) = self.send(&mut attempt, lease).await {
                        break answer;
                    }
                }
                Next::Sleep(delay) => tokio::time::sleep(delay).await,
                Next::Wait(wait) => {
                    tokio::time::sleep_until(clock::to_instant(wait.until).into()).await;
                    drop(wait.slot);
                }
                Next::GiveUp(why) => break self.give_up(why),
            }
        };
        let stats = attempt.stats();
        self.report.retries = stats.retries;
        self.report.key_failovers = stats.key_failovers;
        self.report.waited = stats.waited;
        self.report.backoff = stats.backoff;
        self.report.status = answer.status();
        self.app.metrics.queue_wait(stats.waited);
        self.unfinished = None;
        (answer, std::mem::take(&mut self.report))
    }

    /// One upstream call with `lease`'s key; the client's answer if the attempt delivers it.
    async fn send(
        &mut self,
        attempt: &mut Attempt<'_>,
        lease: Lease,
    ) -> Option<Response<ProxyBody>> {
        let request = match self.build(&lease) {
            Ok(request) => request,
            Err(error) => {
                tracing::error!(key = lease.id().as_str(), %error, "cannot build the upstream request");
                let error = OpenAiError::upstream_unavailable(
                    "the API key's configuration cannot form a request",
                );
                return Some(self.proxy_answer(error));
            }
        };
        if let Some(reason) = self.retry_reason.take() {
            self.app.metrics.retry(reason);
        }
        self.report.attempts += 1;
        let key = lease.id().clone();
        let started = clock::now();
        let sent = self.app.upstream.send(request).await;
        let headed = clock::now();
        let ttfb = headed.saturating_since(started);
        self.report.upstream_time += ttfb;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(
                    key = key.as_str(),
                    cause = error.cause(),
                    %error,
                    "upstream call failed"
                );
                let answer = Answer::Failed {
                    failure: failure_of(error.kind()),
                    reached: error.may_have_reached_upstream(),
                };
                let verdict = attempt.on_answer(lease, &answer, headed);
                self.note(&key, &verdict, None, headed);
                self.kept = Some(Kept::Exchange(error));
                return None;
            }
        };
        let read = reply::read(response).await;
        let now = clock::now();
        self.report.upstream_time += now.saturating_since(headed);
        let verdict = attempt.on_answer(lease, &read.answer(ttfb), now);
        self.note(&key, &verdict, Some(ttfb), now);
        let response = read.into_response(key.clone());
        match verdict.action {
            Action::Deliver => Some(self.pass(response, key, ttfb)),
            Action::Keep => {
                self.kept = Some(Kept::Answer {
                    response: Box::new(response),
                    key,
                    ttfb,
                });
                None
            }
            Action::Forget => {
                self.kept = None;
                None
            }
        }
    }

    /// One attempt's result, for metrics and logs; a failed one makes the next call a retry.
    fn note(&mut self, key: &KeyId, verdict: &Verdict, ttfb: Option<Duration>, now: Time) {
        let outcome = outcome_of(verdict.class);
        tracing::debug!(
            key = key.as_str(),
            outcome = outcome.as_str(),
            ttfb_ms = ttfb.map(|d| d.as_secs_f64() * 1e3),
            "upstream attempt"
        );
        self.app
            .metrics
            .upstream_attempt(key.as_str(), outcome, ttfb);
        self.retry_reason = outcome.retry_reason();
        log_changes(key, &verdict.changes, now);
        if let Some(cluster) = &self.app.cluster {
            cluster.share_answer(&self.pool, key, verdict, self.request.scope);
        }
    }

    /// The client's answer when the attempt gives up.
    fn give_up(&mut self, why: GiveUp) -> Response<ProxyBody> {
        let error = match why {
            GiveUp::LastAnswer => match self.kept.take() {
                Some(Kept::Answer {
                    response,
                    key,
                    ttfb,
                }) => return self.pass(*response, key, ttfb),
                Some(Kept::Exchange(error)) => {
                    tracing::warn!(cause = error.cause(), %error, "giving up on the upstream");
                    match error.kind() {
                        ErrorKind::HeadersTimeout => OpenAiError::upstream_timeout(),
                        kind => OpenAiError::upstream_unavailable(describe(kind)),
                    }
                }
                None => OpenAiError::no_available_keys(),
            },
            GiveUp::NoRoute => match self.request.model {
                Some(model) => OpenAiError::model_not_found(model),
                None => OpenAiError::no_available_keys(),
            },
            GiveUp::Busy { retry_after } => {
                // The pool as one budget, so that clients can pace themselves.
                let budget = self.pool.budget(self.request.model, clock::now());
                OpenAiError::all_keys_busy(retry_after)
                    .header("x-ratelimit-limit-requests", budget.limit_requests)
                    .header("x-ratelimit-remaining-requests", budget.remaining_requests)
                    .header("x-ratelimit-limit-tokens", budget.limit_tokens)
                    .header("x-ratelimit-remaining-tokens", budget.remaining_tokens)
            }
            GiveUp::NoKeys => OpenAiError::no_available_keys(),
            GiveUp::Unreachable { retry_after } => {
                tracing::warn!(
                    retry_after_ms = retry_after.as_millis() as u64,
                    "every usable key's circuit is open: the provider cannot be reached"
                );
                OpenAiError::provider_unreachable(retry_after)
            }
            GiveUp::Refused => OpenAiError::refused_by_every_key(self.request.scope.unwrap_or("")),
            GiveUp::TooLarge => OpenAiError::too_large_for_every_key(),
        };
        self.proxy_answer(error)
    }

    /// The upstream answer for the client, hop-by-hop headers removed, body streaming.
    fn pass(
        &mut self,
        response: Response<ProxyBody>,
        key: KeyId,
        ttfb: Duration,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        headers::strip_response(&mut parts.headers);
        self.report.bytes_out = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        self.report.upstream_ttfb = Some(ttfb);
        self.report.key = Some(key);
        Response::from_parts(parts, body)
    }

    /// The proxy's own answer.
    fn proxy_answer(&mut self, error: OpenAiError) -> Response<ProxyBody> {
        self.report.proxy_error = Some(error.code);
        let answer: Response<ProxyBody> = error.into_response();
        self.report.bytes_out = answer.body().size_hint().exact();
        answer
    }

    /// The request as `lease`'s key sends it.
    fn build(&self, lease: &Lease) -> Result<Request<Full<Bytes>>, BuildError> {
        let spec = lease.spec();
        let uri = target_url::join(spec, self.request.path_and_query, self.request.model)?;
        let mut headers = self.request.headers.clone();
        headers::add_key(&mut headers, spec)?;
        let mut request = Request::new(Full::new(self.request.body.clone()));
        *request.method_mut() = self.request.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }
}

/// Why a key cannot form a request (its config slipped past validation).
#[derive(Debug, thiserror::Error)]
enum BuildError {
    #[error("the key's url and the request path do not form a valid URI")]
    Uri(#[from] http::uri::InvalidUri),
    #[error(transparent)]
    Header(#[from] KeyHeaderError),
}

/// Logs the key state changes an answer caused.
pub fn log_changes(key: &KeyId, changes: &Changes, now: Time) {
    for change in changes.iter() {
        log_state_change(key.as_str(), &change, now);
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

/// The metrics label of an answer's class.
pub fn outcome_of(class: Class) -> UpstreamOutcome {
    match class {
        Class::Success => UpstreamOutcome::Success,
        Class::Request => UpstreamOutcome::ClientError,
        Class::RateLimited => UpstreamOutcome::RateLimited,
        Class::TooLarge { .. } => UpstreamOutcome::TooLarge,
        Class::ModelRefused => UpstreamOutcome::ModelRefused,
        Class::KeyRejected(DisableReason::QuotaExhausted | DisableReason::Billing) => {
            UpstreamOutcome::Quota
        }
        Class::KeyRejected(_) => UpstreamOutcome::Auth,
        Class::Upstream { failure, .. } => match failure {
            UpstreamFailure::Connect => UpstreamOutcome::ConnectError,
            UpstreamFailure::Timeout => UpstreamOutcome::Timeout,
            UpstreamFailure::Protocol | UpstreamFailure::Status(_) => UpstreamOutcome::ServerError,
        },
    }
}

/// Plain words for a failed exchange, for the client (no host, no path).
fn describe(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Connect => "the connection to the provider failed",
        ErrorKind::Tls => "the TLS handshake with the provider failed",
        ErrorKind::HeadersTimeout => "the provider sent no response in time",
        ErrorKind::Protocol | ErrorKind::BodyIdleTimeout | ErrorKind::Body => {
            "the connection to the provider broke before it answered"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_described_without_details() {
        for kind in [ErrorKind::Connect, ErrorKind::Tls, ErrorKind::Protocol] {
            assert!(!describe(kind).contains("http"));
        }
    }

    #[test]
    fn the_retry_policy_reads_the_config() {
        let mut config = Config::default();
        config.upstream.max_retries = 7;
        config.rate_limit.max_queue = 3;
        let policy = retry_policy(&config);
        assert_eq!(policy.max_retries, 7);
        assert_eq!(policy.max_queue, 3);
        assert_eq!(policy.max_wait, Duration::from_millis(5000));
        assert_eq!(policy.backoff.initial, Duration::from_millis(50));
        assert_eq!(policy.backoff.max, Duration::from_millis(2000));
        assert_eq!(policy.max_unavailable_rest, policy.backoff.max);
        assert_eq!(policy.max_waits, RetryPolicy::default().max_waits);
        config.rate_limit.queue_interval_ms = 900;
        assert_eq!(
            retry_policy(&config).queue_delay.interval,
            Duration::from_millis(900)
        );
        assert_eq!(
            retry_policy(&Config::default()),
            RetryPolicy::default(),
            "the config's defaults are kcp-core's"
        );
    }

    #[test]
    fn exchange_failures_map_to_core_failures_and_labels() {
        assert_eq!(failure_of(ErrorKind::Tls), UpstreamFailure::Connect);
        assert_eq!(
            failure_of(ErrorKind::HeadersTimeout),
            UpstreamFailure::Timeout
        );
        assert_eq!(failure_of(ErrorKind::Protocol), UpstreamFailure::Protocol);
        let connect = Class::Upstream {
            failure: UpstreamFailure::Connect,
            retry_after: None,
            reached: false,
        };
        assert_eq!(outcome_of(connect), UpstreamOutcome::ConnectError);
        assert_eq!(
            outcome_of(Class::ModelRefused),
            UpstreamOutcome::ModelRefused
        );
    }
}

#[cfg(test)]
#[path = "attempts_tests.rs"]
mod driver_tests;
