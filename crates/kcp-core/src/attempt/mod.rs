//! The attempt policy: what one client request does next, from its first key to its answer.
//!
//! An [`Attempt`] is a pure state machine in the style of tower's retry `Policy`: it decides,
//! the caller performs. The caller (the server, the simulator, an embedding service) loops:
//!
//! ```text
//! loop match attempt.next(&pool, &queue, now, rng) {
//!     Next::Send(lease)   => send the request with lease's key; build an Answer;
//!                            match attempt.on_answer(lease, &answer, now).action {
//!                                Deliver => return the answer,
//!                                Keep    => keep it as the fallback answer, loop,
//!                                Forget  => drop it (and any kept one), loop }
//!     Next::Sleep(d)      => sleep d (a retry's backoff), loop
//!     Next::Wait(w)       => sleep until w.until, holding w's queue slot, loop
//!     Next::GiveUp(why)   => answer the client (the kept answer, or the proxy's own error)
//! }
//! ```
//!
//! Time and randomness come in as arguments; nothing here reads a clock or does I/O.
//!
//! The rules, by the class of each answer ([`classify`]):
//! - **success and request errors** are delivered after exactly one call;
//! - **key-class answers** (rejected key, refused model, rate limit, too large) move on to
//!   the next eligible key at once, each key at most once per round (between waits), and cost
//!   no retry. A rejected key's body (it may quote the key) is never delivered; a refused
//!   model's or too-large answer is kept and delivered when no other key can serve;
//! - **upstream failures** are retried up to `max_retries` times after a jittered backoff,
//!   preferring keys not tried yet; a key that failed is let back in only when no untried key
//!   can take the request and none frees within the request's wait. A failure after the
//!   request may have reached the provider is not retried unless the request may be replayed
//!   ([`Replay`]): it could be billed twice. A 503's `Retry-After` rests the key for at most
//!   `max_unavailable_rest`, and the request moves on;
//! - **no key now**: when the first key frees within what is left of `max_wait` (at most
//!   `max_waits` times, with a place in the [`WaitQueue`], and within the queue's delay target
//!   while the queue is standing) the request waits for it; else it gives up: with the kept
//!   answer if there is one, else with the proxy's own [`GiveUp`].
//!   Keys held back only by open circuits are not waited for: the provider cannot be reached,
//!   and the client hears so ([`GiveUp::Unreachable`]), not "rate limited".

mod answer;
mod policy;
mod queue;

use std::sync::Arc;
use std::time::Duration;

pub use answer::{Answer, Class, ErrorBody, Reply, classify};
pub use policy::{Backoff, RetryPolicy};
pub use queue::{DelayControl, QueueSlot, WaitQueue};

use crate::keystate::StateChange;
use crate::lease::{Changes, Lease};
use crate::outcome::Outcome;
use crate::pool::{Demand, KeyPool, NoKey};
use crate::ratelimit_headers::RateLimitHeaders;
use crate::rng::Random;
use crate::routing::KeyIndex;
use crate::time::Time;

/// Whether a request may be sent again after it may have reached the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Idempotent (GET, HEAD, DELETE, PUT, OPTIONS) or carrying an `Idempotency-Key`: a second
    /// copy does no harm.
    Safe,
    /// Only before it was written: a POST or PATCH without `Idempotency-Key` may have started
    /// a billed completion.
    BeforeSend,
}

impl Replay {
    /// The replay rule for an HTTP method, and whether the client sent `Idempotency-Key`.
    pub fn of(method: &str, idempotency_key: bool) -> Replay {
        let idempotent = matches!(method, "GET" | "HEAD" | "DELETE" | "PUT" | "OPTIONS");
        if idempotent || idempotency_key {
            Replay::Safe
        } else {
            Replay::BeforeSend
        }
    }
}

/// What the client request asks of the pool.
#[derive(Debug, Clone, Copy)]
pub struct ClientRequest<'a> {
    /// The model it is routed by (`None`: any key).
    pub model: Option<&'a str>,
    /// What a key's refusal would be about: the model, or the endpoint for requests that
    /// name no model.
    pub scope: Option<&'a str>,
    /// Estimated tokens, spent against token budgets.
    pub tokens: u64,
    /// Whether it may be replayed after it may have reached the provider.
    pub replay: Replay,
    /// Whether it must go to the home key (stateful endpoints: files, batches, threads, ...).
    pub home: bool,
}

/// What the caller does next.
#[derive(Debug)]
pub enum Next {
    /// Send the request with this key and report the answer with [`Attempt::on_answer`].
    Send(Lease),
    /// Sleep this long (a retry's backoff), then ask again.
    Sleep(Duration),
    /// Wait for a key until `until`, holding the queue slot, then ask again.
    Wait(Wait),
    /// Stop and answer the client.
    GiveUp(GiveUp),
}

/// A wait for a key.
#[derive(Debug)]
pub struct Wait {
    /// When to ask again.
    pub until: Time,
    /// The request's place in the wait queue: drop it when the wait ends.
    pub slot: QueueSlot,
}

/// Why a request stops without a delivered answer, and so what the client hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// Deliver the kept answer (the last upstream failure, or a key's refusal of the model).
    LastAnswer,
    /// No key serves the model.
    NoRoute,
    /// Every key rests longer than the request may wait (or the queue is full).
    Busy {
        /// When the first key frees.
        retry_after: Duration,
    },
    /// Every key that serves the model is disabled or was tried.
    NoKeys,
    /// The provider cannot be reached: every usable key's circuit is open.
    Unreachable {
        /// When the first circuit lets a trial through.
        retry_after: Duration,
    },
    /// Every key that serves the model lately refused it (or its endpoint).
    Refused,
    /// No key's token limit fits the request.
    TooLarge,
}

/// What to do with an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Deliver it to the client: the attempt is over.
    Deliver,
    /// Keep it, replacing any kept one: it is the answer if the request gives up.
    Keep,
    /// Drop it and any kept answer.
    Forget,
}

/// The attempt's word on one answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// What to do with the answer.
    pub action: Action,
    /// Its class.
    pub class: Class,
    /// The key state changes it caused (for logs).
    pub changes: Changes,
}

/// What one request went through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Upstream calls.
    pub calls: u32,
    /// Retries after upstream failures.
    pub retries: u32,
    /// Moves to another key after a key-class answer.
    pub key_failovers: u32,
    /// Waits for a key.
    pub waits: u32,
    /// Time spent waiting for a key.
    pub waited: Duration,
    /// Time spent in retry backoff.
    pub backoff: Duration,
}

/// One client request's way through the pool (see the module docs).
#[derive(Debug)]
pub struct Attempt<'a> {
    request: ClientRequest<'a>,
    policy: RetryPolicy,
    /// Keys not to choose again this round.
    exclude: Vec<KeyIndex>,
    /// Excluded keys that failed upstream: let back in when no other key is left.
    readmit: Vec<KeyIndex>,
    /// Earliest end of the rests ordered by this round's 429s.
    cooling: Option<Time>,
    /// A wait the attempt already decided on (the home key rests).
    pending_wait: Option<Time>,
    /// When the current wait started.
    waiting_since: Option<Time>,
    /// A retry is due after a backoff.
    backoff_due: bool,
    /// The kept answer must be delivered: retrying is not allowed.
    stop: bool,
    /// The caller keeps an answer to deliver if the request gives up.
    kept: bool,
    /// Only keys with at least this token limit (0: any).
    min_token_limit: u64,
    stats: Stats,
}

impl<'a> Attempt<'a> {
    /// A request about to make its first attempt.
    pub fn new(request: ClientRequest<'a>, policy: RetryPolicy) -> Self {
        Attempt {
            request,
            policy,
            exclude: Vec::new(),
            readmit: Vec::new(),
            cooling: None,
            pending_wait: None,
            waiting_since: None,
            backoff_due: false,
            stop: false,
            kept: false,
            min_token_limit: 0,
            stats: Stats::default(),
        }
    }

    /// What the request went through so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// What to do next, at `now`.
    pub fn next<R: Random + ?Sized>(
        &mut self,
        pool: &KeyPool,
        queue: &Arc<WaitQueue>,
        now: Time,
        rng: &mut R,
    ) -> Next {
        if let Some(since) = self.waiting_since.take() {
            self.stats.waits += 1;
            self.stats.waited += now.saturating_since(since);
            self.exclude.clear();
            self.readmit.clear();
            self.cooling = None;
        }
        if self.stop {
            return Next::GiveUp(GiveUp::LastAnswer);
        }
        if std::mem::take(&mut self.backoff_due) {
            let delay = self.policy.backoff.delay(self.stats.retries - 1, rng);
            self.stats.backoff += delay;
            return Next::Sleep(delay);
        }
        if let Some(until) = self.pending_wait.take() {
            return self.wait(until, queue, now);
        }
        match self.select(pool, queue, now, rng) {
            Ok(lease) => {
                self.stats.calls += 1;
                Next::Send(lease)
            }
            Err(no_key) => self.no_key(no_key, queue, now),
        }
    }

    /// Records the answer to the attempt made with `lease` and says what to do with it.
    pub fn on_answer(&mut self, lease: Lease, answer: &Answer<'_>, now: Time) -> Verdict {
        if let Answer::Reply(Reply {
            organization: Some(org),
            ..
        }) = answer
        {
            lease.learn_organization(org);
        }
        let class = classify(answer);
        let index = lease.index();
        let (limits, latency) = match answer {
            Answer::Reply(r) => (r.limits, r.latency),
            Answer::Failed { .. } => (RateLimitHeaders::default(), Duration::ZERO),
        };
        let (action, changes) = match class {
            Class::Success => (
                Action::Deliver,
                lease.record(Outcome::Success { latency, limits }, now),
            ),
            Class::Request => (
                Action::Deliver,
                lease.record(Outcome::RequestError { latency, limits }, now),
            ),
            Class::RateLimited => {
                let changes = lease.record(Outcome::RateLimited { limits }, now);
                self.rate_limited(index, &changes, now);
                (Action::Forget, changes)
            }
            Class::KeyRejected(reason) => {
                let changes = lease.record(Outcome::KeyRejected { reason }, now);
                self.key_failed(index);
                (Action::Forget, changes)
            }
            Class::ModelRefused if self.request.home => (
                // Objects live on the home key: another key cannot help.
                Action::Deliver,
                lease.record(Outcome::RequestError { latency, limits }, now),
            ),
            Class::ModelRefused => {
                let changes = match self.request.scope {
                    Some(scope) => lease.refuse(scope, now),
                    None => lease.record(Outcome::ModelRefused, now),
                };
                self.key_failed(index);
                self.kept = true;
                (Action::Keep, changes)
            }
            Class::TooLarge { limit, requested } => {
                let limits = RateLimitHeaders {
                    limit_tokens: limit.or(limits.limit_tokens),
                    ..limits
                };
                let changes = lease.record(Outcome::TooLarge { limits }, now);
                self.too_large(index, requested);
                (Action::Keep, changes)
            }
            Class::Upstream {
                failure,
                retry_after,
                reached,
            } => {
                let retry_after = retry_after.map(|r| r.min(self.policy.max_unavailable_rest));
                let outcome = Outcome::Upstream {
                    failure,
                    retry_after,
                };
                let changes = lease.record(outcome, now);
                self.upstream_failed(index, reached);
                (Action::Keep, changes)
            }
        };
        Verdict {
            action,
            class,
            changes,
        }
    }

    /// Leases a key: the home key for stateful requests, else one not tried yet, else (with
    /// retries left) one that failed upstream before, once the untried ones promise nothing.
    fn select<R: Random + ?Sized>(
        &mut self,
        pool: &KeyPool,
        queue: &WaitQueue,
        now: Time,
        rng: &mut R,
    ) -> Result<Lease, NoKey> {
        let will_wait = self.will_wait(queue, now);
        if self.request.home {
            return pool.select_home(&self.demand(&[], will_wait), now);
        }
        let selected = pool.select(&self.demand(&self.exclude, will_wait), now, rng);
        let promised_nothing = match selected {
            Err(NoKey::Exhausted) => true,
            Err(NoKey::Busy { until }) => until.saturating_since(now) > will_wait,
            _ => false,
        };
        if !promised_nothing || self.readmit.is_empty() {
            return selected;
        }
        self.exclude.retain(|k| !self.readmit.contains(k));
        self.readmit.clear();
        pool.select(&self.demand(&self.exclude, will_wait), now, rng)
    }

    fn demand<'d>(&'d self, exclude: &'d [KeyIndex], will_wait: Duration) -> Demand<'d> {
        Demand {
            model: self.request.model,
            tokens: self.request.tokens,
            exclude,
            scope: self.request.scope,
            min_token_limit: self.min_token_limit,
            will_wait,
        }
    }

    /// How much longer this request would wait for a key: what is left of `max_wait` (at most
    /// the delay target while the queue is standing), or nothing once it has waited its
    /// number of times or the queue is full.
    fn will_wait(&self, queue: &WaitQueue, now: Time) -> Duration {
        if self.stats.waits >= self.policy.max_waits || queue.is_full() {
            return Duration::ZERO;
        }
        let left = self.policy.max_wait.saturating_sub(self.stats.waited);
        if queue.is_standing(now, self.policy.queue_delay) {
            left.min(self.policy.queue_delay.target)
        } else {
            left
        }
    }

    /// No key can take the request now: wait, or give up.
    fn no_key(&mut self, no_key: NoKey, queue: &Arc<WaitQueue>, now: Time) -> Next {
        match no_key {
            NoKey::NoRoute => Next::GiveUp(GiveUp::NoRoute),
            // A busy answer may hold a promise: it is always followed by a wait, if one fits.
            NoKey::Busy { until } => {
                let until = self.cooling.map_or(until, |c| c.min(until));
                self.wait(until, queue, now)
            }
            NoKey::Exhausted if !self.kept => match self.cooling {
                Some(cooling) => self.wait(cooling, queue, now),
                None => self.give_up(GiveUp::NoKeys),
            },
            NoKey::Unreachable { until } => self.give_up(GiveUp::Unreachable {
                retry_after: until.saturating_since(now),
            }),
            NoKey::Refused => self.give_up(GiveUp::Refused),
            NoKey::TooLarge => self.give_up(GiveUp::TooLarge),
            NoKey::AllDisabled | NoKey::Exhausted => self.give_up(GiveUp::NoKeys),
        }
    }

    /// Waits until `until` for a key, or gives up when that is too long, this request already
    /// waited its share, or the queue is full.
    fn wait(&mut self, until: Time, queue: &Arc<WaitQueue>, now: Time) -> Next {
        let wait = until.saturating_since(now);
        let fits = self.stats.waits < self.policy.max_waits
            && self.stats.waited + wait <= self.policy.max_wait;
        let delay = self.policy.queue_delay;
        match fits.then(|| queue.enter(now, wait, delay)).flatten() {
            Some(slot) => {
                self.waiting_since = Some(now);
                Next::Wait(Wait { until, slot })
            }
            None => self.give_up(GiveUp::Busy { retry_after: wait }),
        }
    }

    /// Gives up: with the kept answer if there is one, else with `why`.
    fn give_up(&self, why: GiveUp) -> Next {
        Next::GiveUp(if self.kept { GiveUp::LastAnswer } else { why })
    }

    /// A 429 rate limit: this key rests; try the next one, or (home key) wait for this one.
    fn rate_limited(&mut self, index: KeyIndex, changes: &Changes, now: Time) {
        let free = changes.iter().fold(now, |free, change| match change {
            StateChange::Cooling { until } | StateChange::GroupThrottled { until } => {
                free.max(until)
            }
            _ => free,
        });
        self.key_failed(index);
        self.kept = false;
        if self.request.home {
            self.pending_wait = Some(free);
        } else {
            self.cooling = Some(self.cooling.map_or(free, |c| c.min(free)));
        }
    }

    /// A key-class answer: this key is done for the round, at no retry's cost.
    fn key_failed(&mut self, index: KeyIndex) {
        self.kept = false;
        self.stats.key_failovers += 1;
        if !self.request.home {
            self.exclude.push(index);
        }
    }

    /// The request needs `requested` tokens, more than this key's limit: only keys whose
    /// known limit is large enough may take it. Without a figure, no key is known to fit.
    fn too_large(&mut self, index: KeyIndex, requested: Option<u64>) {
        self.key_failed(index);
        self.kept = true;
        self.min_token_limit = self
            .min_token_limit
            .max(requested.unwrap_or(u64::MAX))
            .max(1);
        if self.request.home {
            self.stop = true;
        }
    }

    /// An upstream-class failure: retry after a backoff, or stop with it.
    fn upstream_failed(&mut self, index: KeyIndex, reached: bool) {
        self.kept = true;
        let unsafe_replay = reached && self.request.replay == Replay::BeforeSend;
        if unsafe_replay || self.stats.retries >= self.policy.max_retries {
            self.stop = true;
            return;
        }
        self.stats.retries += 1;
        self.backoff_due = true;
        if !self.request.home {
            self.exclude.push(index);
            self.readmit.push(index);
        }
    }
}

#[cfg(test)]
mod tests;
