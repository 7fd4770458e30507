//! The attempt loop: one client request, as many upstream attempts as its error classes allow.
//!
//! Each attempt leases a key from kcp-core, sends the request with it, records the outcome
//! on the lease, and acts on the outcome's class (GUIDE.md, "Error classes"):
//!
//! - success and request-class answers (other 4xx) pass to the client unchanged, after
//!   exactly one upstream call;
//! - key-class answers (401, 402, 403, 429) move on to the next eligible key at once. Each
//!   key is tried at most once per round (between waits) and this costs no retry. Their
//!   bodies (a 401 quotes a masked fragment of the key) never reach the client;
//! - upstream-class failures (connect/TLS, no headers in time, 500/502/503/504) are retried
//!   up to `upstream.max_retries` times after a jittered backoff, preferring a key not tried
//!   yet: one that frees up within `rate_limit.max_wait_ms` is waited for, and the same key
//!   is allowed again when no other is left or the others rest longer. A 503's
//!   `Retry-After` is waited out, unless it exceeds `retry_max_backoff_ms`: then the 503 is
//!   passed through. When retries run out the last upstream answer is passed through, so
//!   the client sees the provider's real status and body rather than a generic 502.
//!
//! When every eligible key is resting and the first frees up within `rate_limit.max_wait_ms`,
//! the request waits for it ([`super::wait`]); otherwise, and when it gives up, the proxy
//! answers in OpenAI's error shape: 404 `model_not_found` (no upstream call), 429
//! `rate_limit_exceeded` with `Retry-After`, 503 `no_available_keys`, 502
//! `upstream_unavailable` or 504 `upstream_timeout` (or, after an upstream failure, passes
//! that failure through).
//!
//! A "busy" answer of `KeyPool::select` within `max_wait` promises the request a key's next
//! free cell, so that requests waiting together are spread over the coming cells. The loop
//! therefore asks again only when the pool's answer promised nothing, and follows a busy
//! answer with a wait for it (unless this request's own wait limits or the queue refuse it).
//!
//! Every attempt is counted in `kcp_upstream_requests_total{key,outcome}`, with its time to the
//! response head in `kcp_upstream_ttfb_seconds`; an attempt made after a failed one counts in
//! `kcp_retries_total{reason}` with that failure's reason (key failovers included); the time a
//! request waited for a key goes to `kcp_queue_wait_seconds` once per request (zero for most),
//! and every key state change an outcome causes is logged at warn ([`crate::access_log`]).
//!
//! Everything happens before the first response byte goes to the client, and the loop is
//! the request's own future: when the client leaves, hyper drops it, which drops the
//! in-flight upstream call and the lease (recorded as cancelled). Nothing retries after that.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, header};
use http_body::Body;
use http_body_util::Full;
use kcp_core::{
    Changes, Demand, KeyId, KeyIndex, KeyPool, Lease, NoKey, Outcome, StateChange, StatusClass,
    Time,
};
use kcp_upstream::{ErrorKind, ResponseBody, UpstreamError};

use super::backoff::Backoff;
use super::body::ProxyBody;
use super::classify::{self, Classified};
use super::headers::{self, KeyHeaderError};
use super::report::Report;
use super::target_url;
use super::wait;
use crate::access_log::log_state_change;
use crate::app::App;
use crate::clock;
use crate::config::Config;
use crate::metrics::UpstreamOutcome;
use crate::observe::Unfinished;
use crate::openai_error::OpenAiError;

/// Most times one request waits for a cooling key: enough for a throttled group's trial and
/// a lost race or two, few enough that a provider answering every retry with a short 429
/// cannot multiply one request into many calls.
const MAX_WAITS: u32 = 3;

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
    /// Estimated tokens, for token budgets.
    pub tokens: u64,
    /// Whether the request must go to the home key.
    pub stateful: bool,
}

/// The retry and wait settings of one request, read once from the config in force.
#[derive(Debug, Clone, Copy)]
struct Policy {
    max_retries: u32,
    backoff: Backoff,
    max_wait: Duration,
    max_queue: usize,
}

impl Policy {
    fn of(config: &Config) -> Self {
        Policy {
            max_retries: config.upstream.max_retries,
            backoff: Backoff {
                initial: config.upstream.retry_initial_backoff(),
                max: config.upstream.retry_max_backoff(),
            },
            max_wait: config.rate_limit.max_wait(),
            max_queue: config.rate_limit.max_queue,
        }
    }
}

/// Forwards `request` and returns the answer for the client with `report` completed. If the
/// request is abandoned (its future dropped) first, the report so far is left in `unfinished`.
pub async fn forward(
    app: &App,
    config: &Config,
    request: &Outgoing<'_>,
    report: Report,
    unfinished: Option<Unfinished>,
) -> (Response<ProxyBody>, Report) {
    let attempts = Attempts {
        app,
        request,
        pool: app.pool(),
        policy: Policy::of(config),
        exclude: Vec::new(),
        readmit: Vec::new(),
        cooling: None,
        last: None,
        waits: 0,
        retry_reason: None,
        report,
        unfinished,
    };
    attempts.run().await
}

/// The state of one request's attempts.
struct Attempts<'a> {
    app: &'a App,
    request: &'a Outgoing<'a>,
    /// The pool as it was when the request arrived: key indices stay meaningful.
    pool: Arc<KeyPool>,
    policy: Policy,
    /// Keys not to choose again (tried in this round).
    exclude: Vec<KeyIndex>,
    /// Keys excluded after an upstream failure: allowed again when no other key is left.
    readmit: Vec<KeyIndex>,
    /// Earliest end of the rests ordered by this round's 429s.
    cooling: Option<Time>,
    /// The latest attempt's upstream failure while it is being retried; the answer if the
    /// request has to give up before another attempt.
    last: Option<Failure>,
    waits: u32,
    /// Why the next upstream attempt is a retry, if it is one (`kcp_retries_total`'s reason).
    retry_reason: Option<&'static str>,
    report: Report,
    /// Where the report goes if the request is abandoned before its answer.
    unfinished: Option<Unfinished>,
}

impl Drop for Attempts<'_> {
    fn drop(&mut self) {
        if let Some(unfinished) = self.unfinished.take() {
            unfinished.keep(std::mem::take(&mut self.report));
        }
    }
}

/// An upstream-class failure that may become the client's answer.
enum Failure {
    /// A 500/502/503/504, passed through if the request gives up.
    Answer {
        response: Box<Response<ResponseBody>>,
        key: KeyId,
        ttfb: Duration,
    },
    /// No answer at all: 502 or 504.
    Exchange(UpstreamError),
}

/// What to do after an attempt or a failed selection.
#[allow(
    clippy::large_enum_variant,
    reason = "lives on the stack for one loop turn; boxing the answer would allocate per request"
)]
enum Step {
    /// Send this to the client.
    Answer(Response<ProxyBody>),
    /// Select again now.
    Next,
    /// Select again after this delay.
    Retry(Duration),
    /// Wait for a key that frees up then, or give up with a 429.
    Wait(Time),
}

impl Attempts<'_> {
    async fn run(mut self) -> (Response<ProxyBody>, Report) {
        loop {
            let step = match self.select() {
                Ok(lease) => self.attempt(lease).await,
                Err(no_key) => self.no_key(no_key),
            };
            let answer = match step {
                Step::Answer(answer) => answer,
                Step::Next => continue,
                Step::Retry(delay) => {
                    tokio::time::sleep(delay).await;
                    self.report.backoff += delay;
                    continue;
                }
                Step::Wait(until) => match self.wait(until).await {
                    Some(answer) => answer,
                    None => continue,
                },
            };
            self.report.status = answer.status();
            self.app.metrics.queue_wait(self.report.waited);
            self.unfinished = None;
            return (answer, std::mem::take(&mut self.report));
        }
    }

    /// Leases a key: the home key for stateful requests, else one not tried yet, else (with
    /// retries left) one that failed upstream before.
    ///
    /// The keys that failed upstream are let back in only after an answer that promised
    /// nothing (see the module docs): none left untried, or the untried ones rest beyond
    /// `max_wait`. An untried key that frees up sooner is waited for instead, so one round
    /// never holds two promises, nor drops one for a key it could take at once.
    fn select(&mut self) -> Result<Lease, NoKey> {
        let now = clock::now();
        if self.request.stateful {
            let demand = self.demand(&[]);
            return self.pool.select_home(&demand, now);
        }
        let selected = self.select_excluding(now);
        let promised_nothing = match selected {
            Err(NoKey::Exhausted) => true,
            Err(NoKey::Busy { until }) => until.saturating_since(now) > self.will_wait(),
            _ => false,
        };
        if !promised_nothing || self.readmit.is_empty() {
            return selected;
        }
        self.exclude.retain(|k| !self.readmit.contains(k));
        self.readmit.clear();
        self.select_excluding(now)
    }

    fn select_excluding(&self, now: Time) -> Result<Lease, NoKey> {
        let demand = self.demand(&self.exclude);
        clock::with_rng(|rng| self.pool.select(&demand, now, rng))
    }

    fn demand<'d>(&'d self, exclude: &'d [KeyIndex]) -> Demand<'d> {
        Demand {
            model: self.request.model,
            tokens: self.request.tokens,
            exclude,
            will_wait: self.will_wait(),
        }
    }

    /// How much longer this request would wait for a key (see [`Self::wait`]): what is left
    /// of `max_wait`, or nothing once it has waited its number of times or the queue is full.
    fn will_wait(&self) -> Duration {
        let queue_full = self.app.waiting.load(Ordering::Relaxed) >= self.policy.max_queue;
        if self.waits >= MAX_WAITS || queue_full {
            return Duration::ZERO;
        }
        self.policy.max_wait.saturating_sub(self.report.waited)
    }

    /// No key can take the request now: wait, or give up.
    fn no_key(&mut self, no_key: NoKey) -> Step {
        if no_key == NoKey::NoRoute {
            let error = match self.request.model {
                Some(model) => OpenAiError::model_not_found(model),
                None => OpenAiError::no_available_keys(),
            };
            return Step::Answer(self.proxy_answer(error));
        }
        // A busy answer may hold a promise: it is always followed by a wait, if one fits.
        match (no_key, self.cooling) {
            (NoKey::Busy { until }, cooling) => Step::Wait(cooling.map_or(until, |c| c.min(until))),
            (NoKey::Exhausted, Some(cooling)) if self.last.is_none() => Step::Wait(cooling),
            _ => Step::Answer(self.give_up_or(OpenAiError::no_available_keys())),
        }
    }

    /// One upstream call with `lease`'s key.
    async fn attempt(&mut self, lease: Lease) -> Step {
        let request = match self.build(&lease) {
            Ok(request) => request,
            Err(error) => {
                tracing::error!(key = lease.id().as_str(), %error, "cannot build the upstream request");
                let error = OpenAiError::upstream_unavailable(
                    "the API key's configuration cannot form a request",
                );
                return Step::Answer(self.proxy_answer(error));
            }
        };
        self.report.attempts += 1;
        if let Some(reason) = self.retry_reason.take() {
            self.app.metrics.retry(reason);
        }
        let started = clock::now();
        let sent = self.app.upstream.send(request).await;
        let now = clock::now();
        let ttfb = now.saturating_since(started);
        self.report.upstream_time += ttfb;
        match sent {
            Ok(response) => self.answered(lease, response, ttfb).await,
            Err(error) => {
                self.note_attempt(lease.id(), classify::failure_label(error.kind()), None);
                let index = lease.index();
                let failure = classify::failure_of(error.kind());
                record(
                    lease,
                    Outcome::Upstream {
                        failure,
                        retry_after: None,
                    },
                    now,
                );
                self.upstream_failed(index, Failure::Exchange(error), None)
            }
        }
    }

    /// The upstream answered: record the outcome and act on its class.
    async fn answered(
        &mut self,
        lease: Lease,
        response: Response<ResponseBody>,
        ttfb: Duration,
    ) -> Step {
        let headed = clock::now();
        let classified = classify::classify(response).await;
        let now = clock::now();
        self.report.upstream_time += now.saturating_since(headed);
        let key = lease.id().clone();
        let index = lease.index();
        self.note_attempt(&key, classified.label(), Some(ttfb));
        let changes = record(lease, classified.outcome(ttfb), now);
        let retry_after = classified.retry_after();
        let Classified {
            class, response, ..
        } = classified;
        match (class, response) {
            (StatusClass::Success | StatusClass::Request, Some(response)) => {
                Step::Answer(self.pass(response, key, ttfb))
            }
            (StatusClass::Upstream, Some(response)) => {
                let failure = Failure::Answer {
                    response: Box::new(response),
                    key,
                    ttfb,
                };
                self.upstream_failed(index, failure, retry_after)
            }
            (StatusClass::RateLimited, _) => self.rate_limited(index, &changes, now),
            _ => {
                self.key_failed(index);
                Step::Next
            }
        }
    }

    /// A 429 rate limit: this key rests; try the next one, or (stateful) wait for this one.
    fn rate_limited(&mut self, index: KeyIndex, changes: &Changes, now: Time) -> Step {
        let free = changes.iter().fold(now, |free, change| match change {
            StateChange::Cooling { until } | StateChange::GroupThrottled { until } => {
                free.max(until)
            }
            _ => free,
        });
        self.key_failed(index);
        if self.request.stateful {
            return Step::Wait(free);
        }
        self.cooling = Some(self.cooling.map_or(free, |c| c.min(free)));
        Step::Next
    }

    /// A key-class answer: this key is done for the round.
    fn key_failed(&mut self, index: KeyIndex) {
        self.last = None;
        self.report.key_failovers += 1;
        if !self.request.stateful {
            self.exclude.push(index);
        }
    }

    /// An upstream-class failure: retry after a backoff, or give up with it.
    fn upstream_failed(
        &mut self,
        index: KeyIndex,
        failure: Failure,
        retry_after: Option<Duration>,
    ) -> Step {
        let policy = self.policy;
        let too_long = retry_after.is_some_and(|wait| wait > policy.backoff.max);
        if self.report.retries >= policy.max_retries || too_long {
            return Step::Answer(self.give_up(failure));
        }
        let retry = self.report.retries;
        let delay = clock::with_rng(|rng| policy.backoff.delay(retry, rng))
            .max(retry_after.unwrap_or_default());
        self.report.retries += 1;
        if !self.request.stateful {
            self.exclude.push(index);
            self.readmit.push(index);
        }
        self.last = Some(failure);
        Step::Retry(delay)
    }

    /// Waits until `until` for a resting key, or gives up when that is too long, this
    /// request already waited its share, or the queue is full: with the upstream failure
    /// being retried if there is one, else with a 429.
    async fn wait(&mut self, until: Time) -> Option<Response<ProxyBody>> {
        let now = clock::now();
        let wait = until.saturating_since(now);
        let fits = self.waits < MAX_WAITS && self.report.waited + wait <= self.policy.max_wait;
        let slot = fits
            .then(|| wait::enter(&self.app.waiting, self.policy.max_queue))
            .flatten();
        let Some(slot) = slot else {
            let busy = OpenAiError::all_keys_busy(wait::retry_after_secs(wait));
            return Some(self.give_up_or(busy));
        };
        tokio::time::sleep_until(clock::to_instant(until).into()).await;
        drop(slot);
        self.waits += 1;
        self.report.waited += clock::now().saturating_since(now);
        self.exclude.clear();
        self.readmit.clear();
        self.cooling = None;
        None
    }

    /// Gives up: with the upstream failure being retried if there is one, else with `error`.
    fn give_up_or(&mut self, error: OpenAiError) -> Response<ProxyBody> {
        match self.last.take() {
            Some(failure) => self.give_up(failure),
            None => self.proxy_answer(error),
        }
    }

    /// The answer after the last retry: the upstream's own, or 502/504.
    fn give_up(&mut self, failure: Failure) -> Response<ProxyBody> {
        match failure {
            Failure::Answer {
                response,
                key,
                ttfb,
            } => self.pass(*response, key, ttfb),
            Failure::Exchange(error) => {
                tracing::warn!(%error, kind = error.kind().as_str(), "giving up on the upstream");
                let error = match error.kind() {
                    ErrorKind::HeadersTimeout => OpenAiError::upstream_timeout(),
                    kind => OpenAiError::upstream_unavailable(describe(kind)),
                };
                self.proxy_answer(error)
            }
        }
    }

    /// One upstream attempt's result, for metrics; a failure makes the next attempt a retry.
    fn note_attempt(&mut self, key: &KeyId, outcome: UpstreamOutcome, ttfb: Option<Duration>) {
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
    }

    /// The upstream answer for the client, hop-by-hop headers removed, body streaming.
    fn pass(
        &mut self,
        response: Response<ResponseBody>,
        key: KeyId,
        ttfb: Duration,
    ) -> Response<ProxyBody> {
        let (parts, body) = response.into_parts();
        let mut headers = parts.headers;
        headers::strip_response(&mut headers);
        self.report.bytes_out = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        self.report.upstream_ttfb = Some(ttfb);
        self.report.key = Some(key.clone());
        let mut answer = Response::new(ProxyBody::upstream(body, key));
        *answer.status_mut() = parts.status;
        *answer.headers_mut() = headers;
        answer
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
        let uri = target_url::join(&spec.url, self.request.path_and_query)?;
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

/// Records `outcome` on the lease and logs the state changes it caused.
fn record(lease: Lease, outcome: Outcome, now: Time) -> Changes {
    let key = lease.id().clone();
    let changes = lease.record(outcome, now);
    for change in changes.iter() {
        log_state_change(key.as_str(), &change, now);
    }
    changes
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
    use http::StatusCode;

    use super::*;

    #[test]
    fn failures_are_described_without_details() {
        for kind in [ErrorKind::Connect, ErrorKind::Tls, ErrorKind::Protocol] {
            assert!(!describe(kind).contains("http"));
        }
    }

    #[test]
    fn policy_reads_the_config() {
        let mut config = Config::default();
        config.upstream.max_retries = 7;
        config.rate_limit.max_queue = 3;
        let policy = Policy::of(&config);
        assert_eq!(policy.max_retries, 7);
        assert_eq!(policy.max_queue, 3);
        assert_eq!(policy.max_wait, Duration::from_millis(5000));
        assert_eq!(policy.backoff.initial, Duration::from_millis(50));
        assert_eq!(policy.backoff.max, Duration::from_millis(2000));
        assert_eq!(StatusCode::OK, Report::default().status);
    }
}
