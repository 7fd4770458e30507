//! Key state that replicas share.
//!
//! Several replicas in front of one key pool each learn by themselves that a key rests, is
//! revoked or refuses a model, unless they tell each other. This module turns a local
//! [`StateChange`] into a [`RemoteChange`] other replicas can apply, and applies theirs.
//! A key is named by its fingerprint ([`crate::Secret::fingerprint`]), never by its secret
//! nor its configured name, so replicas with different config files still agree on which
//! key is which, and a key a replica does not have is ignored.
//!
//! Applying merges the way a local event would: the later rest deadline wins, a disabled key
//! stays disabled with the later re-check, an operator's disable is only lifted by an
//! operator. An operator's disable or enable on one replica is the whole cluster's: it is
//! shared too ([`KeyPool::export_operator`]); an enable received from another replica
//! lifts an operator's disable but not the provider's (that key's re-check is made due
//! at once instead: the provider, not the operator, says whether it works again). What is not shared: health, latency, circuits (they are about this replica's
//! path to the provider), counters and in-flight figures. Transport and encoding are the
//! embedding service's business; times here are this process's [`Time`].
//!
//! The keys' budgets are shared by splitting them: with `n` live replicas (the embedding
//! service counts them, e.g. by heartbeats) each one paces a key at `1/n` of its rate, and
//! what the provider reports left is only a ceiling of which it claims `1/n`, never spent
//! at once beyond the pace ([`KeyPool::set_replica_share`]). That
//! keeps selection local and lock-free; the price is that a replica receiving more than
//! `1/n` of the traffic waits for its own share while another's goes unused.

use std::num::NonZeroU32;
use std::sync::atomic::Ordering;

use crate::key::KeyId;
use crate::keystate::{KeyState, StateChange};
use crate::outcome::DisableReason;
use crate::pool::{KeyPool, PoolKey};
use crate::probe::Disabled;
use crate::refusal::{FIRST_REST, MAX_SCOPES, Mark};
use crate::time::Time;

/// One key's state change, as replicas tell each other.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteChange {
    /// The key's fingerprint.
    pub key: String,
    /// What changed.
    pub state: SharedState,
}

/// The shareable part of a key's state change.
#[derive(Debug, Clone, PartialEq)]
pub enum SharedState {
    /// The key rests until then (a 429, or a 503 that asked for a rest).
    Cooling {
        /// End of the rest.
        until: Time,
    },
    /// The key is out of rotation.
    Disabled {
        /// Why.
        reason: DisableReason,
        /// When it is looked at again (`Time::NEVER` for an operator's disable).
        recheck_at: Time,
    },
    /// A re-check brought the key back.
    Enabled,
    /// An operator put the key back (admin API). Lifts an operator's disable; a key the
    /// provider disabled stays out, with its re-check due now.
    OperatorEnabled,
    /// The key refuses a model (or endpoint) until then.
    ModelRefused {
        /// The model or endpoint.
        scope: String,
        /// End of the mark.
        until: Time,
    },
    /// What the provider reported of the key's limits (per minute).
    Limits {
        /// Requests per minute.
        requests: Option<u64>,
        /// Tokens per minute.
        tokens: Option<u64>,
    },
}

impl KeyPool {
    /// `replicas` live replicas (this one included) spend these keys from now on: each key
    /// is paced at `1/replicas` of its rate (learned or configured), and what the provider
    /// reports left is a ceiling of which this replica claims `1/replicas` (with more than
    /// one replica it is not spent beyond the pace). Background work: it takes each key's
    /// lock briefly; selection reads the result from atomics. Kept across reloads. Calling
    /// it again with the same count re-applies it: a pace set concurrently from the old
    /// count (an answer teaching a new limit at that moment) is put right.
    pub fn set_replica_share(&self, replicas: NonZeroU32) {
        self.replicas.store(replicas.get(), Ordering::Release);
        for key in self.keys() {
            key.state.share(replicas);
            key.state
                .configure(&key.spec, self.config().per_key_rps, self.config().burst);
        }
    }

    /// How many replicas this one shares the keys with, itself included (1 alone).
    pub fn replica_share(&self) -> NonZeroU32 {
        NonZeroU32::new(self.replicas.load(Ordering::Acquire)).unwrap_or(NonZeroU32::MIN)
    }

    fn key_by_id(&self, id: &KeyId) -> Option<&PoolKey> {
        self.keys().iter().map(AsRef::as_ref).find(|k| &k.id == id)
    }

    fn key_by_fingerprint(&self, fingerprint: &str) -> Option<&PoolKey> {
        self.keys()
            .iter()
            .map(AsRef::as_ref)
            .find(|k| k.spec.secret.fingerprint() == fingerprint)
    }

    /// What the other replicas should hear of `change`, which the key `key` just went
    /// through (as [`crate::Lease::record`] or [`crate::Attempt`] returned it). `scope` is the
    /// request's refusal scope, needed to share a [`StateChange::ModelRefused`]. A rest also
    /// carries the limits the key learned. Empty for changes that are not shared (circuits,
    /// throttle groups) and for a key no longer in the pool.
    pub fn export(
        &self,
        key: &KeyId,
        change: &StateChange,
        scope: Option<&str>,
    ) -> Vec<RemoteChange> {
        let Some(pool_key) = self.key_by_id(key) else {
            return Vec::new();
        };
        let fingerprint = pool_key.spec.secret.fingerprint();
        let state = &pool_key.state;
        let mut out = Vec::with_capacity(2);
        let mut push = |state| {
            out.push(RemoteChange {
                key: fingerprint.clone(),
                state,
            })
        };
        match *change {
            StateChange::Cooling { until } => {
                push(SharedState::Cooling { until });
                let (requests, tokens) = (state.requests.limit(), state.tokens.limit());
                if requests.is_some() || tokens.is_some() {
                    push(SharedState::Limits { requests, tokens });
                }
            }
            StateChange::Disabled { reason } => {
                let recheck_at = state.policy().disabled.map_or(Time::NEVER, |d| d.probe_at);
                push(SharedState::Disabled { reason, recheck_at });
            }
            StateChange::Enabled => push(SharedState::Enabled),
            StateChange::ModelRefused { until } => {
                if let Some(scope) = scope {
                    push(SharedState::ModelRefused {
                        scope: scope.to_owned(),
                        until,
                    });
                }
            }
            StateChange::CircuitOpened { .. }
            | StateChange::CircuitClosed
            | StateChange::GroupThrottled { .. }
            | StateChange::GroupRecovered => {}
        }
        out
    }

    /// What the other replicas should hear of an operator disabling (`disable`) or
    /// enabling the key with id `key` here: the whole cluster follows an operator. An
    /// enable is sent even when the key was not disabled here (it may be elsewhere).
    /// Empty for a key not in the pool.
    pub fn export_operator(&self, key: &str, disable: bool) -> Vec<RemoteChange> {
        let Some(pool_key) = self.keys().iter().find(|k| k.id.as_str() == key) else {
            return Vec::new();
        };
        let state = if disable {
            SharedState::Disabled {
                reason: DisableReason::Manual,
                recheck_at: Time::NEVER,
            }
        } else {
            SharedState::OperatorEnabled
        };
        vec![RemoteChange {
            key: pool_key.spec.secret.fingerprint(),
            state,
        }]
    }

    /// A 503 asked the key `key` to rest (`Retry-After`): its rest as the other replicas
    /// should hear it (a 503 causes no [`StateChange`] of its own). Empty when the key
    /// does not rest past `now` or is not in the pool.
    pub fn export_rest(&self, key: &KeyId, now: Time) -> Vec<RemoteChange> {
        let Some(pool_key) = self.key_by_id(key) else {
            return Vec::new();
        };
        let until = pool_key.state.policy().cooldown.until();
        if until <= now {
            return Vec::new();
        }
        vec![RemoteChange {
            key: pool_key.spec.secret.fingerprint(),
            state: SharedState::Cooling { until },
        }]
    }

    /// Fingerprints of the keys an operator disabled (here or on another replica), to
    /// compare with the cluster's record of operator disables after a reconnection.
    pub fn operator_disabled(&self) -> Vec<String> {
        self.keys()
            .iter()
            .filter(|k| {
                k.state
                    .policy()
                    .disabled
                    .is_some_and(|d| d.reason == DisableReason::Manual)
            })
            .map(|k| k.spec.secret.fingerprint())
            .collect()
    }

    /// Everything shareable this replica knows at `now`, as the changes that would bring
    /// another replica to it: each key's rest, disable (not an operator's: the
    /// cluster keeps a record of those, so a replica never brings back an operator's
    /// disable lifted while it was away), refused scopes and learned limits. A replica
    /// that (re)joins asks for this, since pub/sub does not replay what it missed.
    pub fn export_all(&self, now: Time) -> Vec<RemoteChange> {
        let mut out = Vec::new();
        for key in self.keys() {
            let fingerprint = key.spec.secret.fingerprint();
            let state = &key.state;
            let mut push = |state| {
                out.push(RemoteChange {
                    key: fingerprint.clone(),
                    state,
                })
            };
            let (requests, tokens) = (state.requests.limit(), state.tokens.limit());
            if requests.is_some() || tokens.is_some() {
                push(SharedState::Limits { requests, tokens });
            }
            let (until, disabled) = {
                let policy = state.policy();
                (policy.cooldown.until(), policy.disabled)
            };
            if until > now {
                push(SharedState::Cooling { until });
            }
            if let Some(d) = disabled.filter(|d| d.reason != DisableReason::Manual) {
                push(SharedState::Disabled {
                    reason: d.reason,
                    recheck_at: d.probe_at,
                });
            }
            for (scope, until) in state.refusals.active(now) {
                push(SharedState::ModelRefused { scope, until });
            }
        }
        out
    }

    /// Applies another replica's change at `now`; returns whether the pool has the key.
    pub fn apply_remote(&self, change: &RemoteChange, now: Time) -> bool {
        match self.key_by_fingerprint(&change.key) {
            Some(key) => {
                key.state.apply_remote(&change.state, now);
                true
            }
            None => false,
        }
    }
}

impl KeyState {
    /// This replica spends `1/replicas` of the key's budget (call `configure` after, for
    /// the pace).
    pub(crate) fn share(&self, replicas: NonZeroU32) {
        self.requests.set_share(replicas);
        self.tokens.set_share(replicas);
    }

    /// Merges a remote change into this key's state, as a local event would.
    pub(crate) fn apply_remote(&self, change: &SharedState, now: Time) {
        match change {
            SharedState::Cooling { until } => {
                if *until <= now {
                    return;
                }
                let mut policy = self.policy();
                // The key rests: what was promised of its next cells no longer holds.
                self.held.store(0, Ordering::Release);
                policy.cooldown.rest_until(now, until.saturating_since(now));
                self.calm.store(policy.is_calm(), Ordering::Release);
                if !self.gate.trial_pending() {
                    self.publish(&policy, now);
                }
            }
            SharedState::Disabled {
                reason: DisableReason::Manual,
                ..
            } => {
                // An operator's disable is the whole cluster's, whatever the key was here.
                let mut policy = self.policy();
                if !policy
                    .disabled
                    .is_some_and(|d| d.reason == DisableReason::Manual)
                {
                    policy.disabled = Some(Disabled::new(DisableReason::Manual, now));
                    self.publish_trial(None);
                    self.disabled.store(true, Ordering::Release);
                }
                self.calm.store(policy.is_calm(), Ordering::Release);
            }
            SharedState::Disabled { reason, recheck_at } => {
                let mut policy = self.policy();
                match &mut policy.disabled {
                    Some(d) if d.reason == DisableReason::Manual => {}
                    Some(d) => {
                        d.probe_at = d.probe_at.max(*recheck_at);
                        let d = *d;
                        self.publish_trial(Some(d));
                    }
                    None => {
                        let mut disabled = Disabled::new(*reason, now);
                        disabled.probe_at = (*recheck_at).max(now);
                        policy.disabled = Some(disabled);
                        self.publish_trial(Some(disabled));
                        self.disabled.store(true, Ordering::Release);
                    }
                }
                self.calm.store(policy.is_calm(), Ordering::Release);
            }
            SharedState::Enabled => {
                let mut policy = self.policy();
                if policy
                    .disabled
                    .is_some_and(|d| d.reason != DisableReason::Manual)
                {
                    policy.disabled = None;
                    self.publish_trial(None);
                    self.disabled.store(false, Ordering::Release);
                }
                self.calm.store(policy.is_calm(), Ordering::Release);
            }
            SharedState::OperatorEnabled => {
                let mut policy = self.policy();
                match policy.disabled {
                    Some(d) if d.reason == DisableReason::Manual => {
                        policy.disabled = None;
                        self.publish_trial(None);
                        self.disabled.store(false, Ordering::Release);
                        self.calm.store(policy.is_calm(), Ordering::Release);
                        self.publish(&policy, now);
                    }
                    Some(_) => {
                        drop(policy);
                        self.probe_now(now);
                    }
                    None => {}
                }
            }
            SharedState::ModelRefused { scope, until } => {
                if *until > now {
                    self.refusals.mark_until(scope, *until);
                }
            }
            SharedState::Limits { requests, tokens } => {
                let policy = self.policy();
                let had = self.requests.limit();
                self.requests.report(*requests, None, None, now, 0);
                self.tokens.report(*tokens, None, None, now, 0);
                if self.requests.limit() != had {
                    self.repace(&policy.pace);
                }
            }
        }
    }
}

impl crate::refusal::Refusals {
    /// Another replica marked `scope` until `until`: the later end wins.
    fn mark_until(&self, scope: &str, until: Time) {
        let mut marks = self.marks();
        match marks.iter_mut().find(|m| &*m.scope == scope) {
            Some(mark) => mark.until = mark.until.max(until),
            None => {
                if marks.len() >= MAX_SCOPES {
                    if let Some(first) = (0..marks.len()).min_by_key(|&i| marks[i].until) {
                        marks.swap_remove(first);
                    }
                }
                marks.push(Mark {
                    scope: scope.into(),
                    until,
                    rest: FIRST_REST,
                });
            }
        }
        self.any.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use super::*;
    use crate::{
        Demand, KeySpec, KeyStatus, Outcome, PoolConfig, RateLimitHeaders, Secret, SplitMix64,
    };

    fn pool(secrets: &[&str]) -> KeyPool {
        let specs = secrets
            .iter()
            .map(|s| KeySpec::new(Secret::new(*s), "http://upstream"))
            .collect();
        KeyPool::new(specs, PoolConfig::default()).expect("valid pool")
    }

    fn demand(exclude: &[crate::KeyIndex]) -> Demand<'_> {
        Demand {
            model: Some("gpt-4o"),
            tokens: 10,
            exclude,
            scope: Some("gpt-4o"),
            min_token_limit: 0,
            will_wait: Duration::ZERO,
        }
    }

    /// Replica `a` records `outcome` on the key with secret `secret`; returns its exports.
    fn record_on(a: &KeyPool, secret: &str, outcome: Outcome, now: Time) -> Vec<RemoteChange> {
        let fingerprint = Secret::new(secret).fingerprint();
        let mut rng = SplitMix64::new(1);
        let mut excluded = Vec::new();
        loop {
            let lease = a
                .select(&demand(&excluded), now, &mut rng)
                .expect("a key is free");
            if lease.spec().secret.fingerprint() == fingerprint {
                let id = lease.id().clone();
                let changes = lease.record(outcome, now);
                return changes
                    .iter()
                    .flat_map(|c| a.export(&id, &c, Some("gpt-4o")))
                    .collect();
            }
            excluded.push(lease.index());
            drop(lease);
        }
    }

    fn status_of(pool: &KeyPool, secret: &str, now: Time) -> crate::KeySnapshot {
        let fingerprint = Secret::new(secret).fingerprint();
        pool.snapshot(now)
            .into_iter()
            .find(|k| k.fingerprint == fingerprint)
            .expect("key present")
    }

    #[test]
    fn a_rest_learned_on_one_replica_holds_on_the_other_until_its_end() {
        let t = Time::from_secs(100);
        let (a, b) = (pool(&["sk-a", "sk-b"]), pool(&["sk-b", "sk-a"]));
        let limits = RateLimitHeaders {
            retry_after: Some(Duration::from_secs(20)),
            limit_requests: Some(600),
            ..Default::default()
        };
        let changes = record_on(&a, "sk-a", Outcome::RateLimited { limits }, t);
        assert_eq!(
            changes,
            vec![
                RemoteChange {
                    key: Secret::new("sk-a").fingerprint(),
                    state: SharedState::Cooling {
                        until: t + Duration::from_secs(20)
                    },
                },
                RemoteChange {
                    key: Secret::new("sk-a").fingerprint(),
                    state: SharedState::Limits {
                        requests: Some(600),
                        tokens: None
                    },
                },
            ]
        );
        for c in &changes {
            assert!(b.apply_remote(c, t));
        }
        // On b only sk-b is chosen while sk-a rests, and sk-a comes back at the deadline.
        let mut rng = SplitMix64::new(7);
        for s in 0..19 {
            let lease = b
                .select(&demand(&[]), t + Duration::from_secs(s), &mut rng)
                .expect("sk-b is free");
            assert_eq!(
                lease.spec().secret.fingerprint(),
                Secret::new("sk-b").fingerprint()
            );
        }
        let snap = status_of(&b, "sk-a", t);
        assert_eq!(snap.status, KeyStatus::Cooling);
        assert_eq!(snap.limits.limit_requests, Some(600));
        assert_eq!(
            status_of(&b, "sk-a", t + Duration::from_secs(20)).status,
            KeyStatus::Available
        );
    }

    #[test]
    fn the_later_rest_wins_whichever_comes_first() {
        let t = Time::from_secs(100);
        let b = pool(&["sk-a"]);
        let key = Secret::new("sk-a").fingerprint();
        let rest = |s| RemoteChange {
            key: key.clone(),
            state: SharedState::Cooling {
                until: t + Duration::from_secs(s),
            },
        };
        b.apply_remote(&rest(30), t);
        b.apply_remote(&rest(10), t);
        assert_eq!(status_of(&b, "sk-a", t).blocked_secs, Some(30.0));
        // A rest already over changes nothing.
        b.apply_remote(&rest(5), t + Duration::from_secs(40));
        assert_eq!(
            status_of(&b, "sk-a", t + Duration::from_secs(40)).status,
            KeyStatus::Available
        );
    }

    #[test]
    fn a_revoked_key_is_disabled_with_the_same_recheck_and_brought_back_by_its_recheck() {
        let t = Time::from_secs(100);
        let (a, b) = (pool(&["sk-a"]), pool(&["sk-a"]));
        let changes = record_on(
            &a,
            "sk-a",
            Outcome::KeyRejected {
                reason: DisableReason::Unauthorized,
            },
            t,
        );
        assert_eq!(
            changes,
            vec![RemoteChange {
                key: Secret::new("sk-a").fingerprint(),
                state: SharedState::Disabled {
                    reason: DisableReason::Unauthorized,
                    recheck_at: t + crate::probe::FIRST_PROBE,
                },
            }]
        );
        let later = t + Duration::from_secs(5);
        b.apply_remote(&changes[0], later);
        let snap = status_of(&b, "sk-a", later);
        assert_eq!(snap.status, KeyStatus::Disabled);
        assert_eq!(snap.disabled_reason, Some(DisableReason::Unauthorized));
        assert_eq!(snap.next_probe_secs, Some(55.0));
        let mut rng = SplitMix64::new(3);
        assert!(b.select(&demand(&[]), later, &mut rng).is_err());
        b.apply_remote(
            &RemoteChange {
                key: Secret::new("sk-a").fingerprint(),
                state: SharedState::Enabled,
            },
            later,
        );
        assert_eq!(status_of(&b, "sk-a", later).status, KeyStatus::Available);
    }

    #[test]
    fn an_operators_disable_is_not_lifted_by_a_remote_change() {
        let t = Time::from_secs(100);
        let b = pool(&["sk-a"]);
        let key = Secret::new("sk-a").fingerprint();
        b.apply_remote(
            &RemoteChange {
                key: key.clone(),
                state: SharedState::Disabled {
                    reason: DisableReason::Manual,
                    recheck_at: Time::NEVER,
                },
            },
            t,
        );
        for state in [
            SharedState::Enabled,
            SharedState::Disabled {
                reason: DisableReason::Unauthorized,
                recheck_at: t,
            },
        ] {
            b.apply_remote(
                &RemoteChange {
                    key: key.clone(),
                    state,
                },
                t,
            );
            let snap = status_of(&b, "sk-a", t);
            assert_eq!(snap.disabled_reason, Some(DisableReason::Manual));
            assert_eq!(snap.next_probe_secs, None);
        }
    }

    #[test]
    fn a_model_refusal_is_shared_for_its_scope_only() {
        let t = Time::from_secs(100);
        let (a, b) = (pool(&["sk-a"]), pool(&["sk-a"]));
        let fingerprint = Secret::new("sk-a").fingerprint();
        let mut rng = SplitMix64::new(1);
        let lease = a.select(&demand(&[]), t, &mut rng).expect("free");
        let id = lease.id().clone();
        let changes: Vec<_> = lease
            .refuse("gpt-4o", t)
            .iter()
            .flat_map(|c| a.export(&id, &c, Some("gpt-4o")))
            .collect();
        assert_eq!(
            changes,
            vec![RemoteChange {
                key: fingerprint,
                state: SharedState::ModelRefused {
                    scope: "gpt-4o".into(),
                    until: t + FIRST_REST,
                },
            }]
        );
        b.apply_remote(&changes[0], t);
        assert!(b.select(&demand(&[]), t, &mut rng).is_err());
        let other = Demand {
            model: Some("gpt-4o-mini"),
            scope: Some("gpt-4o-mini"),
            ..demand(&[])
        };
        assert!(b.select(&other, t, &mut rng).is_ok());
        assert!(b.select(&demand(&[]), t + FIRST_REST, &mut rng).is_ok());
    }

    #[test]
    fn unknown_keys_and_unshared_changes_are_ignored() {
        let t = Time::from_secs(100);
        let a = pool(&["sk-a"]);
        let change = RemoteChange {
            key: Secret::new("sk-other").fingerprint(),
            state: SharedState::Enabled,
        };
        assert!(!a.apply_remote(&change, t));
        let id = a.keys()[0].id.clone();
        assert!(
            a.export(&id, &StateChange::CircuitOpened { until: t }, None)
                .is_empty()
        );
        assert!(
            a.export(&id, &StateChange::ModelRefused { until: t }, None)
                .is_empty()
        );
    }

    /// Leases taken from `pool` over one minute from `t`, asking every 100 ms and
    /// answering each at once with `limits`.
    fn admitted_in_a_minute(pool: &KeyPool, t: Time, limits: &RateLimitHeaders) -> usize {
        let mut rng = SplitMix64::new(5);
        let mut admitted = 0;
        for step in 0..600 {
            let now = t + Duration::from_millis(100 * step);
            while let Ok(lease) = pool.select(&demand(&[]), now, &mut rng) {
                admitted += 1;
                lease.record(
                    Outcome::Success {
                        latency: Duration::from_millis(1),
                        limits: *limits,
                    },
                    now,
                );
            }
        }
        admitted
    }

    fn configured(rpm: u32) -> KeyPool {
        let spec = KeySpec::new(Secret::new("sk-a"), "http://upstream").with_rpm(rpm);
        KeyPool::new(vec![spec], PoolConfig::default()).expect("valid pool")
    }

    #[test]
    fn a_60_rpm_key_shared_by_three_replicas_admits_20_a_minute_on_each() {
        let t = Time::from_secs(100);
        let none = RateLimitHeaders::default();
        assert_eq!(admitted_in_a_minute(&configured(60), t, &none), 60);
        let shared = configured(60);
        shared.set_replica_share(NonZeroU32::new(3).expect("3"));
        assert_eq!(shared.replica_share().get(), 3);
        assert_eq!(admitted_in_a_minute(&shared, t, &none), 20);
        // Back to one replica: the whole rate again.
        shared.set_replica_share(NonZeroU32::MIN);
        let later = t + Duration::from_secs(60);
        assert_eq!(admitted_in_a_minute(&shared, later, &none), 60);
    }

    #[test]
    fn a_learned_limit_is_shared_too_and_the_share_survives_a_reload() {
        let t = Time::from_secs(100);
        let learned = RateLimitHeaders {
            limit_requests: Some(60),
            ..Default::default()
        };
        let a = pool(&["sk-a"]);
        a.set_replica_share(NonZeroU32::new(3).expect("3"));
        // The first answer teaches 60 a minute (that request went unpaced); from then on a
        // third of it.
        assert_eq!(admitted_in_a_minute(&a, t, &learned), 1 + 20);
        let specs = a.specs().cloned().collect();
        let reloaded = a.rebuild(specs, PoolConfig::default()).expect("valid");
        assert_eq!(reloaded.replica_share().get(), 3);
        let later = t + Duration::from_secs(60);
        assert_eq!(admitted_in_a_minute(&reloaded, later, &learned), 20);
    }

    #[test]
    fn shared_keys_go_at_their_paced_share_and_what_is_reported_left_is_only_a_ceiling() {
        // 600 a minute (10 a second): right after an answer reporting `left`, how many
        // requests this replica sends at once.
        let t = Time::from_secs(100);
        let at_once = |replicas: u32, left: u64| {
            let p = pool(&["sk-a"]);
            p.set_replica_share(NonZeroU32::new(replicas).expect("not 0"));
            let mut rng = SplitMix64::new(9);
            let first = p.select(&demand(&[]), t, &mut rng).expect("free");
            let report = RateLimitHeaders {
                limit_requests: Some(600),
                remaining_requests: Some(left),
                reset_requests: Some(Duration::from_secs(1)),
                ..Default::default()
            };
            first.record(
                Outcome::Success {
                    latency: Duration::from_millis(1),
                    limits: report,
                },
                t,
            );
            let mut held = Vec::new();
            while let Ok(lease) = p.select(&demand(&[]), t, &mut rng) {
                held.push(lease);
                assert!(held.len() <= 30, "bounded by the report");
            }
            held.len()
        };
        // Alone, what the provider reports left may all go at once.
        assert_eq!(at_once(1, 30), 30);
        // One of three replicas: the others spend the key too, so only its pace's burst
        // (a third of 10 a second, for one second) ...
        assert_eq!(at_once(3, 30), 3);
        // ... and never more than its third of what is reported left.
        assert_eq!(at_once(3, 6), 2);
    }

    #[test]
    fn a_replica_that_joins_late_catches_up_from_the_others_whole_state() {
        let t = Time::from_secs(100);
        let a = pool(&["sk-a", "sk-b", "sk-c"]);
        let limits = RateLimitHeaders {
            retry_after: Some(Duration::from_secs(20)),
            limit_requests: Some(600),
            ..Default::default()
        };
        record_on(&a, "sk-a", Outcome::RateLimited { limits }, t);
        record_on(
            &a,
            "sk-b",
            Outcome::KeyRejected {
                reason: DisableReason::QuotaExhausted,
            },
            t,
        );
        let mut rng = SplitMix64::new(2);
        let mut excluded = Vec::new();
        loop {
            let lease = a
                .select(&demand(&excluded), t, &mut rng)
                .expect("sk-c is free");
            if lease.spec().secret.fingerprint() == Secret::new("sk-c").fingerprint() {
                lease.refuse("gpt-4o", t);
                break;
            }
            excluded.push(lease.index());
        }
        let later = t + Duration::from_secs(5);
        let b = pool(&["sk-c", "sk-b", "sk-a"]);
        for change in a.export_all(later) {
            assert!(b.apply_remote(&change, later));
        }
        let a_key = status_of(&b, "sk-a", later);
        assert_eq!(a_key.status, KeyStatus::Cooling);
        assert_eq!(a_key.blocked_secs, Some(15.0));
        assert_eq!(a_key.limits.limit_requests, Some(600));
        let b_key = status_of(&b, "sk-b", later);
        assert_eq!(b_key.disabled_reason, Some(DisableReason::QuotaExhausted));
        // Nothing else serves gpt-4o on b now: sk-c refuses it, the others are out.
        assert!(b.select(&demand(&[]), later, &mut rng).is_err());
        // An operator's disable is not exported.
        let id = a.keys()[2].id.clone();
        a.set_disabled(id.as_str(), true, later);
        assert!(a.export_all(later).iter().all(|c| !matches!(
            c.state,
            SharedState::Disabled {
                reason: DisableReason::Manual,
                ..
            }
        )));
    }

    #[test]
    fn an_operators_disable_and_enable_on_one_replica_are_followed_on_the_other() {
        let t = Time::from_secs(100);
        let (a, b) = (pool(&["sk-a", "sk-b"]), pool(&["sk-b", "sk-a"]));
        let key = Secret::new("sk-a").fingerprint();
        let id = a.keys()[0].id.clone();
        assert!(a.set_disabled(id.as_str(), true, t).is_some());
        let disable = a.export_operator(id.as_str(), true);
        assert_eq!(
            disable,
            vec![RemoteChange {
                key: key.clone(),
                state: SharedState::Disabled {
                    reason: DisableReason::Manual,
                    recheck_at: Time::NEVER,
                },
            }]
        );
        // On b the key was out already, by the provider: the operator's word replaces it,
        // and no re-check brings it back.
        b.apply_remote(
            &RemoteChange {
                key: key.clone(),
                state: SharedState::Disabled {
                    reason: DisableReason::Unauthorized,
                    recheck_at: t + Duration::from_secs(60),
                },
            },
            t,
        );
        assert!(b.apply_remote(&disable[0], t));
        let snap = status_of(&b, "sk-a", t);
        assert_eq!(snap.disabled_reason, Some(DisableReason::Manual));
        assert_eq!(snap.next_probe_secs, None);
        assert_eq!(b.operator_disabled(), vec![key.clone()]);
        b.apply_remote(
            &RemoteChange {
                key: key.clone(),
                state: SharedState::Enabled,
            },
            t,
        );
        assert_eq!(
            status_of(&b, "sk-a", t).disabled_reason,
            Some(DisableReason::Manual)
        );
        // The operator puts it back on a: b follows.
        a.set_disabled(id.as_str(), false, t);
        let enable = a.export_operator(id.as_str(), false);
        assert_eq!(
            enable,
            vec![RemoteChange {
                key: key.clone(),
                state: SharedState::OperatorEnabled,
            }]
        );
        b.apply_remote(&enable[0], t);
        assert_eq!(status_of(&b, "sk-a", t).status, KeyStatus::Available);
        assert!(b.operator_disabled().is_empty());
        assert!(a.export_operator("no-such-key", true).is_empty());
    }

    #[test]
    fn an_operators_enable_from_elsewhere_makes_a_provider_disabled_key_due_for_its_recheck() {
        let t = Time::from_secs(100);
        let b = pool(&["sk-a"]);
        let key = Secret::new("sk-a").fingerprint();
        b.apply_remote(
            &RemoteChange {
                key: key.clone(),
                state: SharedState::Disabled {
                    reason: DisableReason::Billing,
                    recheck_at: t + Duration::from_secs(600),
                },
            },
            t,
        );
        let later = t + Duration::from_secs(5);
        b.apply_remote(
            &RemoteChange {
                key,
                state: SharedState::OperatorEnabled,
            },
            later,
        );
        let snap = status_of(&b, "sk-a", later);
        assert_eq!(snap.disabled_reason, Some(DisableReason::Billing));
        assert_eq!(snap.next_probe_secs, Some(0.0));
    }

    #[test]
    fn a_503_rest_is_exported_while_it_lasts() {
        let t = Time::from_secs(100);
        let a = pool(&["sk-a"]);
        let mut rng = SplitMix64::new(4);
        let lease = a.select(&demand(&[]), t, &mut rng).expect("free");
        let id = lease.id().clone();
        let changes = lease.record(
            Outcome::Upstream {
                failure: crate::UpstreamFailure::Status(503),
                retry_after: Some(Duration::from_secs(7)),
            },
            t,
        );
        // A 503 causes no state change of its own ...
        assert!(
            changes
                .iter()
                .all(|c| !matches!(c, StateChange::Cooling { .. }))
        );
        // ... its rest is exported by asking for it.
        assert_eq!(
            a.export_rest(&id, t),
            vec![RemoteChange {
                key: Secret::new("sk-a").fingerprint(),
                state: SharedState::Cooling {
                    until: t + Duration::from_secs(7)
                },
            }]
        );
        assert!(a.export_rest(&id, t + Duration::from_secs(7)).is_empty());
        // A joining replica hears of the rest until, not at, its end.
        let cooling = |now| {
            a.export_all(now)
                .into_iter()
                .filter(|c| matches!(c.state, SharedState::Cooling { .. }))
                .count()
        };
        assert_eq!(
            cooling(t + Duration::from_secs(7) - Duration::from_nanos(1)),
            1
        );
        assert_eq!(cooling(t + Duration::from_secs(7)), 0);
    }

    #[test]
    fn a_remote_disable_of_a_key_disabled_here_keeps_the_later_recheck() {
        let t = Time::from_secs(100);
        let b = pool(&["sk-a"]);
        let disable = |secs| RemoteChange {
            key: Secret::new("sk-a").fingerprint(),
            state: SharedState::Disabled {
                reason: DisableReason::Unauthorized,
                recheck_at: t + Duration::from_secs(secs),
            },
        };
        b.apply_remote(&disable(60), t);
        assert_eq!(status_of(&b, "sk-a", t).next_probe_secs, Some(60.0));
        b.apply_remote(&disable(300), t);
        assert_eq!(status_of(&b, "sk-a", t).next_probe_secs, Some(300.0));
        b.apply_remote(&disable(120), t);
        assert_eq!(
            status_of(&b, "sk-a", t).next_probe_secs,
            Some(300.0),
            "the later re-check wins"
        );
    }

    #[test]
    fn remote_refusals_keep_each_scope_and_one_ending_now_marks_nothing() {
        let t = Time::from_secs(100);
        let b = pool(&["sk-a"]);
        let state = &b.keys()[0].state;
        let refuse = |scope: &str, until| SharedState::ModelRefused {
            scope: scope.to_owned(),
            until,
        };
        let (m1, m2) = (t + Duration::from_secs(60), t + Duration::from_secs(30));
        state.apply_remote(&refuse("m1", m1), t);
        state.apply_remote(&refuse("m2", m2), t);
        assert_eq!(
            state.refusals.active(t),
            vec![("m1".to_owned(), m1), ("m2".to_owned(), m2)]
        );
        // A mark ending now is no mark: a refusal here now starts a fresh first rest
        // rather than doubling one.
        state.apply_remote(&refuse("m3", t), t);
        assert_eq!(state.refusals.refused("m3", t), t + FIRST_REST);
    }

    #[test]
    fn a_limit_heard_from_another_replica_paces_the_key_here() {
        let t = Time::from_secs(100);
        let b = pool(&["sk-a"]);
        assert_eq!(status_of(&b, "sk-a", t).limits.pace_rps, None);
        b.apply_remote(
            &RemoteChange {
                key: Secret::new("sk-a").fingerprint(),
                state: SharedState::Limits {
                    requests: Some(600),
                    tokens: None,
                },
            },
            t,
        );
        let snap = status_of(&b, "sk-a", t);
        assert_eq!(snap.limits.limit_requests, Some(600));
        assert_eq!(snap.limits.pace_rps, Some(10.0));
    }
}
