//! Read-only views of the pool for health checks, the admin API and metrics.
//!
//! A snapshot never contains a secret: keys appear by id and fingerprint only.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::gate::Pass;
use crate::outcome::DisableReason;
use crate::pool::{KeyPool, PoolKey};
use crate::time::Time;

/// Where a key stands at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
pub enum KeyStatus {
    /// Can take requests.
    Available,
    /// Resting after a 429.
    Cooling,
    /// Its learned budget or pace is spent for now.
    Limited,
    /// Too many upstream failures: resting, then one trial.
    CircuitOpen,
    /// Its url/organization group is throttled as a whole.
    Throttled,
    /// Out of rotation.
    Disabled,
}

impl KeyStatus {
    /// Every status, for metrics that export one series per state.
    pub const ALL: [KeyStatus; 6] = [
        KeyStatus::Available,
        KeyStatus::Cooling,
        KeyStatus::Limited,
        KeyStatus::CircuitOpen,
        KeyStatus::Throttled,
        KeyStatus::Disabled,
    ];

    /// A short label.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Available => "available",
            KeyStatus::Cooling => "cooling",
            KeyStatus::Limited => "limited",
            KeyStatus::CircuitOpen => "circuit_open",
            KeyStatus::Throttled => "throttled",
            KeyStatus::Disabled => "disabled",
        }
    }
}

/// Outcome counts of one key since it joined the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct OutcomeCounts {
    /// Successes.
    pub success: u64,
    /// 429 rate limits.
    pub rate_limited: u64,
    /// 401/402/403/quota rejections.
    pub rejected: u64,
    /// Upstream failures.
    pub upstream_error: u64,
    /// Request-class errors passed through.
    pub request_error: u64,
    /// 403/404 refusals of a model or endpoint.
    pub refused: u64,
    /// 429 "request too large" for the key's token limit.
    pub too_large: u64,
    /// Attempts that ended without an answer.
    pub cancelled: u64,
}

/// What the provider's headers taught about a key's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LearnedLimits {
    /// Requests per minute.
    pub limit_requests: Option<u64>,
    /// Tokens per minute.
    pub limit_tokens: Option<u64>,
    /// Requests left now (estimated from the last report and refill).
    pub remaining_requests: Option<u64>,
    /// Tokens left now.
    pub remaining_tokens: Option<u64>,
    /// Seconds until the request budget is full again, per the last report.
    pub reset_requests_secs: Option<f64>,
    /// Seconds until the token budget is full again.
    pub reset_tokens_secs: Option<f64>,
    /// The pace (requests per second) the key is held to; `None` while unknown.
    pub pace_rps: Option<f64>,
    /// The AIMD factor applied to the learned rate (0.25..=1).
    pub pace_factor: f64,
}

/// One key at one instant.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct KeySnapshot {
    /// Name or fingerprint.
    pub name: String,
    /// Fingerprint of the secret.
    pub fingerprint: String,
    /// Upstream url.
    pub url: String,
    /// Model patterns.
    pub models: Vec<String>,
    /// Status.
    pub status: KeyStatus,
    /// Why it is disabled.
    pub disabled_reason: Option<DisableReason>,
    /// Seconds until it can take requests again (0 when available, `None` when disabled).
    pub blocked_secs: Option<f64>,
    /// Seconds until the next re-check of a disabled key.
    pub next_probe_secs: Option<f64>,
    /// Attempts in flight.
    pub in_flight: u32,
    /// Health score, 1..=1000.
    pub health: u32,
    /// Peak-EWMA latency to response headers, in milliseconds.
    pub latency_ms: Option<f64>,
    /// Outcome counts.
    pub outcomes: OutcomeCounts,
    /// Learned limits and pace.
    pub limits: LearnedLimits,
    /// Models (or endpoints) the key refused lately, with seconds until each is re-checked.
    pub refused: Vec<(String, f64)>,
}

/// What the keys that serve one model have, summed: the pool as one budget, for clients that
/// pace themselves by `x-ratelimit-*`. Keys whose figures are not known count as zero, and
/// disabled keys are left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolBudget {
    /// Requests per minute.
    pub limit_requests: u64,
    /// Requests left now.
    pub remaining_requests: u64,
    /// Tokens per minute.
    pub limit_tokens: u64,
    /// Tokens left now.
    pub remaining_tokens: u64,
}

/// Number of keys in each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct StateCounts {
    /// All keys.
    pub total: usize,
    /// Available.
    pub available: usize,
    /// Cooling.
    pub cooling: usize,
    /// Limited.
    pub limited: usize,
    /// Circuit open.
    pub circuit_open: usize,
    /// Throttled with their group.
    pub throttled: usize,
    /// Disabled.
    pub disabled: usize,
}

impl KeyPool {
    /// Every key's view at `now`, in pool order.
    pub fn snapshot(&self, now: Time) -> Vec<KeySnapshot> {
        self.keys().iter().map(|k| key_snapshot(k, now)).collect()
    }

    /// How many keys are in each status at `now`.
    pub fn counts(&self, now: Time) -> StateCounts {
        let mut counts = StateCounts {
            total: self.len(),
            ..StateCounts::default()
        };
        for key in self.keys() {
            let (status, _) = status(key, now);
            *match status {
                KeyStatus::Available => &mut counts.available,
                KeyStatus::Cooling => &mut counts.cooling,
                KeyStatus::Limited => &mut counts.limited,
                KeyStatus::CircuitOpen => &mut counts.circuit_open,
                KeyStatus::Throttled => &mut counts.throttled,
                KeyStatus::Disabled => &mut counts.disabled,
            } += 1;
        }
        counts
    }

    /// The budget of the keys that serve `model`, summed (see [`PoolBudget`]). Walks those
    /// keys: meant for the proxy's own 429s, not for every answer.
    pub fn budget(&self, model: Option<&str>, now: Time) -> PoolBudget {
        let route = self.routes().lookup(model);
        let mut seen = std::collections::HashSet::new();
        let mut budget = PoolBudget::default();
        for tier in route.tiers() {
            for index in tier.iter() {
                let Some(key) = self.keys().get(index as usize) else {
                    continue;
                };
                if !seen.insert(index) || key.state.disabled.load(Ordering::Acquire) {
                    continue;
                }
                let (requests, tokens) = (&key.state.requests, &key.state.tokens);
                budget.limit_requests += requests.limit().unwrap_or(0);
                budget.remaining_requests += requests.remaining(now).unwrap_or(0);
                budget.limit_tokens += tokens.limit().unwrap_or(0);
                budget.remaining_tokens += tokens.remaining(now).unwrap_or(0);
            }
        }
        budget
    }

    /// Whether any throttle group is resting now (for logs and metrics).
    pub fn throttled_groups(&self, now: Time) -> usize {
        self.groups()
            .iter()
            .filter(|g| !matches!(g.gate.check(now), Pass::Open))
            .count()
    }
}

fn status(key: &PoolKey, now: Time) -> (KeyStatus, Time) {
    let state = &key.state;
    if state.disabled.load(Ordering::Acquire) {
        return (KeyStatus::Disabled, Time::NEVER);
    }
    let (cooldown, circuit, _, _) = state.policy_view();
    if let Some(open) = circuit.open_until() {
        if now < open || state.gate.trial_pending() {
            return (KeyStatus::CircuitOpen, open.max(now));
        }
    }
    if cooldown.until() > now {
        return (KeyStatus::Cooling, cooldown.until());
    }
    if let Some(Pass::Until(t)) = key.group().map(|g| g.gate.check(now)) {
        return (KeyStatus::Throttled, t);
    }
    let free = state.requests.free_at(now, 1);
    let paced = state.pace.check(now).and(state.local.check(now)).err();
    match paced.map_or(free, |p| p.max(free)) {
        t if t > now => (KeyStatus::Limited, t),
        _ => (KeyStatus::Available, now),
    }
}

fn secs_until(t: Time, now: Time) -> f64 {
    t.saturating_since(now).as_secs_f64()
}

fn key_snapshot(key: &PoolKey, now: Time) -> KeySnapshot {
    let state = &key.state;
    let (status, until) = status(key, now);
    let (_, _, disabled, pace) = state.policy_view();
    let c = &state.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    KeySnapshot {
        name: key.id.to_string(),
        fingerprint: key.spec.secret.fingerprint(),
        url: key.spec.url.clone(),
        models: key.spec.models.clone(),
        status,
        disabled_reason: disabled.map(|d| d.reason),
        blocked_secs: (until != Time::NEVER).then(|| secs_until(until, now)),
        next_probe_secs: disabled
            .filter(|d| d.probe_at != Time::NEVER)
            .map(|d| secs_until(d.probe_at, now)),
        in_flight: u32::try_from(state.requests.pending()).unwrap_or(u32::MAX),
        health: state.health.get(),
        latency_ms: state
            .latency
            .get(now)
            .map(|d: Duration| d.as_secs_f64() * 1e3),
        outcomes: OutcomeCounts {
            success: load(&c.success),
            rate_limited: load(&c.rate_limited),
            rejected: load(&c.rejected),
            upstream_error: load(&c.upstream),
            request_error: load(&c.request_error),
            cancelled: load(&c.cancelled),
            refused: load(&c.refused),
            too_large: load(&c.too_large),
        },
        limits: LearnedLimits {
            limit_requests: state.requests.limit(),
            limit_tokens: state.tokens.limit(),
            remaining_requests: state.requests.remaining(now),
            remaining_tokens: state.tokens.remaining(now),
            reset_requests_secs: state.requests.reset_at().map(|t| secs_until(t, now)),
            reset_tokens_secs: state.tokens.reset_at().map(|t| secs_until(t, now)),
            pace_rps: state.pace.rate_per_sec().filter(|r| r.is_finite()),
            pace_factor: pace.factor(),
        },
        refused: state
            .refusals
            .active(now)
            .into_iter()
            .map(|(scope, until)| (scope, secs_until(until, now)))
            .collect(),
    }
}
