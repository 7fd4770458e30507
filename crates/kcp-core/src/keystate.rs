//! The live state of one key, and how each outcome changes it.
//!
//! Selection reads only atomics (the disabled flag, the [`Gate`] that sums up cooldown and
//! circuit, in-flight counts, the budget gauges and the pace limiter). Recording an outcome
//! takes the key's own short critical section to update the policy structs ([`Cooldown`],
//! [`Circuit`], [`Disabled`], [`Pace`]) and then republishes the gate. There is no lock
//! shared between keys.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use crate::budget::{Gauge, PACE_BURST, Pace};
use crate::circuit::Circuit;
use crate::cooldown::Cooldown;
use crate::gate::Gate;
use crate::gcra::Gcra;
use crate::health::{Health, PeakEwma};
use crate::key::KeySpec;
use crate::outcome::{DisableReason, Outcome};
use crate::probe::Disabled;
use crate::ratelimit_headers::RateLimitHeaders;
use crate::refusal::Refusals;
use crate::rng::{Random, SplitMix64};
use crate::time::Time;

/// Outcome counters of one key, by class.
#[derive(Debug, Default)]
pub struct Counters {
    pub(crate) success: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) upstream: AtomicU64,
    pub(crate) request_error: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) too_large: AtomicU64,
    pub(crate) cancelled: AtomicU64,
}

impl Counters {
    fn count(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Success { .. } => &self.success,
            Outcome::RateLimited { .. } => &self.rate_limited,
            Outcome::KeyRejected { .. } => &self.rejected,
            Outcome::Upstream { .. } => &self.upstream,
            Outcome::RequestError { .. } => &self.request_error,
            Outcome::ModelRefused => &self.refused,
            Outcome::TooLarge { .. } => &self.too_large,
            Outcome::Cancelled => &self.cancelled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A change of a key's state worth telling an operator about.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StateChange {
    /// Rate limited: resting until then.
    Cooling {
        /// End of the rest.
        until: Time,
    },
    /// Taken out of rotation.
    Disabled {
        /// Why.
        reason: DisableReason,
    },
    /// Back in rotation after a successful re-check or an operator's word.
    Enabled,
    /// Too many upstream failures in a row: no traffic until then, then one trial.
    CircuitOpened {
        /// End of the open period.
        until: Time,
    },
    /// The trial succeeded.
    CircuitClosed,
    /// The key may not serve the request's model (or endpoint) until then.
    ModelRefused {
        /// End of the mark; the next request for the model after it is the re-check.
        until: Time,
    },
    /// Most keys of the key's url and organization were rate limited together.
    GroupThrottled {
        /// End of the group's rest.
        until: Time,
    },
    /// The group's probe succeeded.
    GroupRecovered,
}

/// Whether a 429 is about the key's own pace: its headers say one of its budgets is spent,
/// or they say nothing about its budgets. A 429 that reports budget left comes from a limit
/// the key shares (an organization or account throttle, see [`crate::throttle`]): slowing
/// this key down would not help, so its pace is left alone.
fn own_budget_spent(limits: &RateLimitHeaders) -> bool {
    match (limits.remaining_requests, limits.remaining_tokens) {
        (None, None) => true,
        (requests, tokens) => requests == Some(0) || tokens == Some(0),
    }
}

/// Where a request stands in its key's send sequences, for dating and ordering the report
/// its answer brings (see [`crate::budget`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    /// When it was sent (the provider admits it then).
    pub(crate) at: Time,
    /// Its mark in the request budget's sequence.
    pub(crate) requests: u64,
    /// Its mark in the token budget's sequence.
    pub(crate) tokens: u64,
}

/// Which single-trial slot a lease holds, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Trial {
    #[default]
    None,
    /// The half-open circuit's single trial.
    Circuit,
    /// A disabled key's re-check.
    Probe,
}

#[derive(Debug, Default)]
pub(crate) struct Policy {
    pub(crate) cooldown: Cooldown,
    circuit: Circuit,
    pub(crate) disabled: Option<Disabled>,
    pub(crate) pace: Pace,
    /// When a re-check last brought the key back, and the wait it had been on.
    recovered: Option<(Time, Duration)>,
}

/// How long after a 429 the key's reported budget is not spent beyond its pace.
pub const DISTRUST_AFTER_429: Duration = Duration::from_secs(30);

/// A key rejected again within this long of a re-check bringing it back has relapsed.
pub const RELAPSE_WINDOW: Duration = Duration::from_secs(600);

impl Policy {
    /// At rest: no 429 streak, circuit closed with no failures counted, enabled, full pace.
    /// A success changes nothing here then, so it can skip the lock.
    pub(crate) fn is_calm(&self) -> bool {
        self.cooldown.is_calm()
            && self.circuit == Circuit::default()
            && self.disabled.is_none()
            && self.pace == Pace::default()
    }
}

/// The live, non-configuration state of one key. Kept across reloads while the key stays.
#[derive(Debug)]
pub struct KeyState {
    pub(crate) disabled: AtomicBool,
    pub(crate) gate: Gate,
    pub(crate) health: Health,
    pub(crate) latency: PeakEwma,
    pub(crate) requests: Gauge,
    pub(crate) tokens: Gauge,
    pub(crate) pace: Gcra,
    pub(crate) local: Gcra,
    /// Pace cells promised to requests told to wait for this key (see `KeyPool::select`).
    pub(crate) held: AtomicU32,
    pub(crate) counters: Counters,
    /// Models or endpoints the key refused.
    pub(crate) refusals: Refusals,
    /// When a key disabled for its quota or bill may take one real request as its re-check
    /// (nanoseconds; `u64::MAX` when no such re-check is pending). Read by selection.
    trial_at: AtomicU64,
    /// Until when the provider's reported budget is not trusted beyond the pace (nanoseconds):
    /// a 429 showed the model of it wrong.
    distrust_until: AtomicU64,
    /// The organization the provider named in its answers (`openai-organization`), learned
    /// once; it puts the key in a throttle group with the other keys of that organization.
    pub(crate) organization: OnceLock<Box<str>>,
    /// Mirrors `Policy::is_calm` for the lock-free success path.
    pub(crate) calm: AtomicBool,
    policy: Mutex<Policy>,
    jitter: Mutex<SplitMix64>,
}

impl KeyState {
    /// Fresh state for a key, seeded from what its config knows.
    pub(crate) fn new(spec: &KeySpec, seed: u64) -> Self {
        let state = KeyState {
            disabled: AtomicBool::new(false),
            gate: Gate::default(),
            health: Health::default(),
            latency: PeakEwma::default(),
            requests: Gauge::new(spec.rpm.map(u64::from)),
            tokens: Gauge::new(spec.tpm.map(u64::from)),
            pace: Gcra::unlimited(),
            local: Gcra::unlimited(),
            held: AtomicU32::new(0),
            counters: Counters::default(),
            refusals: Refusals::default(),
            trial_at: AtomicU64::new(u64::MAX),
            distrust_until: AtomicU64::new(0),
            organization: OnceLock::new(),
            calm: AtomicBool::new(true),
            policy: Mutex::new(Policy::default()),
            jitter: Mutex::new(SplitMix64::new(seed)),
        };
        state.repace(&Pace::default());
        state
    }

    pub(crate) fn policy(&self) -> MutexGuard<'_, Policy> {
        // The policy structs stay consistent at every step, so a poisoned lock is still usable.
        self.policy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the pace limiter from the learned request limit, the AIMD factor and this
    /// replica's share of the key.
    pub(crate) fn repace(&self, pace: &Pace) {
        let Some(rpm) = self.requests.limit() else {
            return;
        };
        let rate = pace.rate_per_sec(rpm) / f64::from(self.requests.share());
        let burst = (rate * PACE_BURST.as_secs_f64()).floor().max(1.0) as u32;
        self.pace
            .set_rate(rate, NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
    }

    /// Takes the budget figures of any answer to the request `sent`.
    fn learn(&self, limits: &RateLimitHeaders, sent: &Sent, pace: &Pace) {
        let had_limit = self.requests.limit();
        self.requests.report(
            limits.limit_requests,
            limits.remaining_requests,
            limits.reset_requests,
            sent.at,
            sent.requests,
        );
        self.tokens.report(
            limits.limit_tokens,
            limits.remaining_tokens,
            limits.reset_tokens,
            sent.at,
            sent.tokens,
        );
        if self.requests.limit() != had_limit {
            self.repace(pace);
        }
    }

    /// A request leaves for this key at `now`, needing `tokens`.
    pub(crate) fn send(&self, tokens: u64, now: Time) -> Sent {
        Sent {
            at: now,
            requests: self.requests.spend(1),
            tokens: self.tokens.spend(tokens),
        }
    }

    /// Applies the outcome of the request `sent` (needing `tokens`); returns what changed.
    /// `penalty` is `unhealthy_penalty`. The common case, a success on a key at rest, is
    /// inlined into the lease's record; the rest is [`KeyState::record_policy`].
    #[inline]
    pub(crate) fn record(
        &self,
        outcome: &Outcome,
        sent: &Sent,
        tokens: u64,
        trial: Trial,
        penalty: u32,
        now: Time,
    ) -> Option<StateChange> {
        self.requests.settle(1);
        self.tokens.settle(tokens);
        self.counters.count(outcome);
        if let Outcome::Success { latency, limits } = outcome {
            if trial == Trial::None && self.calm.load(Ordering::Acquire) {
                // The hot path: a success on a key at rest only feeds the health, latency and
                // budget atomics; the policy has nothing to reset.
                self.health.reward();
                self.latency.observe(*latency, now);
                self.learn(limits, sent, &Pace::default());
                return None;
            }
        }
        self.record_policy(outcome, sent, trial, penalty, now)
    }

    /// [`KeyState::record`] of an outcome that changes the policy: under the key's lock.
    #[inline(never)]
    fn record_policy(
        &self,
        outcome: &Outcome,
        sent: &Sent,
        trial: Trial,
        penalty: u32,
        now: Time,
    ) -> Option<StateChange> {
        let mut policy = self.policy();
        let change = match outcome {
            Outcome::Success { latency, limits } => {
                self.health.reward();
                self.latency.observe(*latency, now);
                self.learn(limits, sent, &policy.pace);
                policy.cooldown.succeeded();
                policy.pace.grow();
                self.repace(&policy.pace);
                let closed = policy.circuit.succeeded(trial == Trial::Circuit);
                let probed = policy
                    .disabled
                    .filter(|d| trial == Trial::Probe && d.reason != DisableReason::Manual);
                if let Some(disabled) = probed {
                    // Remember the wait in force: a relapse soon after continues from it.
                    policy.recovered = Some((now, disabled.backoff()));
                    policy.disabled = None;
                    self.publish_trial(None);
                    self.disabled.store(false, Ordering::Release);
                    Some(StateChange::Enabled)
                } else {
                    closed.then_some(StateChange::CircuitClosed)
                }
            }
            Outcome::RateLimited { limits } => {
                // The key rests: what was promised of its next cells no longer holds.
                self.held.store(0, Ordering::Release);
                let distrust = (now + DISTRUST_AFTER_429).as_nanos();
                self.distrust_until.fetch_max(distrust, Ordering::AcqRel);
                self.learn(limits, sent, &policy.pace);
                if own_budget_spent(limits) {
                    policy.pace.cut();
                    self.repace(&policy.pace);
                }
                let until = policy.cooldown.rate_limited(limits, now);
                Some(StateChange::Cooling { until })
            }
            Outcome::KeyRejected { reason } => self.reject(&mut policy, *reason, trial, now),
            Outcome::Upstream { retry_after, .. } => {
                self.health.penalize(penalty);
                if let Some(rest) = retry_after {
                    policy.cooldown.rest_until(now, *rest);
                }
                let jitter = self
                    .jitter
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .unit();
                policy
                    .circuit
                    .failed(now, jitter, trial == Trial::Circuit)
                    .map(|until| StateChange::CircuitOpened { until })
            }
            Outcome::RequestError { limits, .. } | Outcome::TooLarge { limits } => {
                self.learn(limits, sent, &policy.pace);
                None
            }
            Outcome::ModelRefused | Outcome::Cancelled => None,
        };
        self.calm.store(policy.is_calm(), Ordering::Release);
        if trial == Trial::Circuit || !self.gate.trial_pending() {
            // While a trial is under way only its own outcome may reopen the gate: anything
            // else republishing it would let a second trial through.
            self.publish(&policy, now);
        }
        change
    }

    fn reject(
        &self,
        policy: &mut Policy,
        reason: DisableReason,
        trial: Trial,
        now: Time,
    ) -> Option<StateChange> {
        match (&mut policy.disabled, trial) {
            // An operator's disable stands until the operator lifts it.
            (Some(disabled), _) if disabled.reason == DisableReason::Manual => None,
            (Some(disabled), Trial::Probe) => {
                disabled.probe_failed(reason, now);
                self.publish_trial(Some(*disabled));
                None
            }
            (Some(_), _) => None,
            (None, _) => {
                let disabled = match policy.recovered.take() {
                    Some((at, backoff)) if now.saturating_since(at) <= RELAPSE_WINDOW => {
                        Disabled::relapse(reason, now, backoff)
                    }
                    _ => Disabled::new(reason, now),
                };
                policy.disabled = Some(disabled);
                self.publish_trial(Some(disabled));
                self.disabled.store(true, Ordering::Release);
                Some(StateChange::Disabled { reason })
            }
        }
    }

    /// Republishes the gate from the policy: closed until the later of cooldown and open
    /// circuit, with a trial when the circuit is what holds it.
    pub(crate) fn publish(&self, policy: &Policy, now: Time) {
        let cooling = Some(policy.cooldown.until()).filter(|&t| t > now);
        match (cooling, policy.circuit.open_until()) {
            (None, None) => self.gate.set(None, false),
            (Some(c), None) => self.gate.set(Some(c), false),
            (c, Some(open)) => self.gate.set(Some(c.map_or(open, |c| c.max(open))), true),
        }
    }

    /// Starts a re-check if one is due; `false` when the key is not disabled or not due.
    pub(crate) fn start_probe(&self, now: Time) -> bool {
        let mut policy = self.policy();
        match &mut policy.disabled {
            Some(disabled) if disabled.probe_due(now) => {
                disabled.probe_started(now);
                let disabled = *disabled;
                self.publish_trial(Some(disabled));
                true
            }
            _ => false,
        }
    }

    /// Whether what the provider last reported left of the key's requests may be spent at
    /// once, beyond the pace: there is a report, no 429 showed it wrong lately, and no
    /// other replica spends the key (their spending since the report is unknown here, so
    /// the report is only a ceiling and the shared pace is what keeps them within it).
    pub(crate) fn trusts_budget(&self, now: Time) -> bool {
        self.requests.has_report()
            && self.requests.share() == 1
            && now.as_nanos() >= self.distrust_until.load(Ordering::Acquire)
    }

    /// Starts the re-check of a key disabled for its quota or bill, made by a real request:
    /// `false` when the key is not such a key, not due, or another request got there first.
    pub(crate) fn start_probe_by_request(&self, now: Time) -> bool {
        let by_request = self
            .policy()
            .disabled
            .is_some_and(|d| d.reason.rechecked_by_request());
        by_request && self.start_probe(now)
    }

    /// Publishes when a key disabled for its quota or bill may take its one real request.
    pub(crate) fn publish_trial(&self, disabled: Option<Disabled>) {
        let at = disabled
            .filter(|d| d.reason.rechecked_by_request())
            .map_or(u64::MAX, |d| d.probe_at.as_nanos());
        self.trial_at.store(at, Ordering::Release);
    }

    /// Whether a key disabled for its quota or bill may take one real request at `now` as its
    /// re-check (claim it with [`KeyState::start_probe`]).
    pub(crate) fn trial_due(&self, now: Time) -> bool {
        now.as_nanos() >= self.trial_at.load(Ordering::Acquire)
    }

    /// Whether the caller's re-check request is due at `now` (keys re-checked by a real
    /// request are not: selection lets their trial through).
    pub(crate) fn probe_due(&self, now: Time) -> bool {
        self.disabled.load(Ordering::Acquire)
            && self
                .policy()
                .disabled
                .is_some_and(|d| d.probe_due(now) && !d.reason.rechecked_by_request())
    }

    /// Makes the re-check of a key disabled by the provider due at `now`.
    pub(crate) fn probe_now(&self, now: Time) -> bool {
        match &mut self.policy().disabled {
            Some(d) if d.reason != DisableReason::Manual => {
                d.probe_at = d.probe_at.min(now);
                let disabled = *d;
                self.publish_trial(Some(disabled));
                true
            }
            _ => false,
        }
    }

    /// An operator disables (`true`) or enables (`false`) the key.
    pub(crate) fn set_manual(&self, disable: bool, now: Time) -> Option<StateChange> {
        let mut policy = self.policy();
        let change = if disable {
            policy.disabled = Some(Disabled::new(DisableReason::Manual, now));
            self.publish_trial(None);
            self.disabled.store(true, Ordering::Release);
            Some(StateChange::Disabled {
                reason: DisableReason::Manual,
            })
        } else {
            let was = policy.disabled.take().is_some();
            policy.cooldown.clear();
            policy.circuit.reset();
            policy.recovered = None;
            self.refusals.clear();
            self.publish_trial(None);
            self.disabled.store(false, Ordering::Release);
            was.then_some(StateChange::Enabled)
        };
        self.calm.store(policy.is_calm(), Ordering::Release);
        self.publish(&policy, now);
        change
    }

    /// A copy of the policy figures for snapshots.
    pub(crate) fn policy_view(&self) -> (Cooldown, Circuit, Option<Disabled>, Pace) {
        let p = self.policy();
        (p.cooldown, p.circuit, p.disabled, p.pace)
    }

    /// Seeds the pace from a configured rpm (on build and reload).
    pub(crate) fn configure(&self, spec: &KeySpec, local_rps: Option<f64>, burst: NonZeroU32) {
        if let Some(rpm) = spec.rpm {
            if self.requests.limit().is_none() {
                self.requests
                    .report(Some(u64::from(rpm)), None, None, Time::ZERO, 0);
            }
        }
        if let Some(tpm) = spec.tpm {
            if self.tokens.limit().is_none() {
                self.tokens
                    .report(Some(u64::from(tpm)), None, None, Time::ZERO, 0);
            }
        }
        // A key's own rpm is more specific than the pool-wide per_key_rps, and spent by
        // every replica: this one takes its share of it.
        let share = f64::from(self.requests.share());
        let rps = spec.rpm.map(|r| f64::from(r) / 60.0 / share).or(local_rps);
        match rps {
            Some(rps) => self.local.set_rate(rps, burst),
            None => self.local.set_rate(f64::INFINITY, burst),
        }
        let policy = self.policy();
        self.repace(&policy.pace);
    }
}
