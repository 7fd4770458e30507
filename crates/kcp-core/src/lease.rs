//! A lease: one attempt on one key, from selection to outcome.
//!
//! Selection counts the attempt in flight (and its estimated tokens against the key's
//! token budget); [`Lease::record`] takes the outcome and releases both. A lease dropped
//! without an outcome counts as cancelled, so a client that goes away never leaks an
//! in-flight slot or a trial.

use std::sync::Arc;

use crate::key::{KeyId, KeySpec};
use crate::keystate::{Sent, StateChange, Trial};
use crate::outcome::Outcome;
use crate::pool::PoolKey;
use crate::routing::KeyIndex;
use crate::time::Time;

/// One attempt on one key.
#[derive(Debug)]
pub struct Lease {
    key: Arc<PoolKey>,
    tokens: u64,
    trial: Trial,
    group_trial: Option<u64>,
    penalty: u32,
    sent: Sent,
    done: bool,
}

impl Lease {
    pub(crate) fn new(
        key: Arc<PoolKey>,
        tokens: u64,
        trial: Trial,
        group_trial: Option<u64>,
        penalty: u32,
        now: Time,
    ) -> Self {
        let sent = key.state.send(tokens, now);
        Lease {
            key,
            tokens,
            trial,
            group_trial,
            penalty,
            sent,
            done: false,
        }
    }

    /// The key's configuration (url, secret, organization, project).
    pub fn spec(&self) -> &KeySpec {
        &self.key.spec
    }

    /// The key's public id.
    pub fn id(&self) -> &KeyId {
        &self.key.id
    }

    /// The key's index in the pool it was selected from.
    pub fn index(&self) -> KeyIndex {
        self.key.index
    }

    /// When the attempt started.
    pub fn started(&self) -> Time {
        self.sent.at
    }

    /// Whether this attempt is a re-check of a disabled key.
    pub fn is_probe(&self) -> bool {
        self.trial == Trial::Probe
    }

    /// Reports the outcome of the attempt; returns the key state changes it caused
    /// (at most one for the key, one for its throttle group).
    pub fn record(mut self, outcome: Outcome, now: Time) -> Changes {
        self.finish(&outcome, now)
    }

    fn finish(&mut self, outcome: &Outcome, now: Time) -> Changes {
        self.done = true;
        let key_change = self.key.state.record(
            outcome,
            &self.sent,
            self.tokens,
            self.trial,
            self.penalty,
            now,
        );
        let group_change = self.group_outcome(outcome, now);
        Changes([key_change, group_change])
    }

    /// Classifies `answer` and records it: for attempts outside an [`crate::Attempt`], such
    /// as the re-check of a disabled key.
    pub fn record_answer(self, answer: &crate::Answer<'_>, now: Time) -> Changes {
        use crate::attempt::Class;
        let (limits, latency) = match answer {
            crate::Answer::Reply(r) => (r.limits, r.latency),
            crate::Answer::Failed { .. } => (Default::default(), std::time::Duration::ZERO),
        };
        let outcome = match crate::classify(answer) {
            Class::Success => Outcome::Success { latency, limits },
            Class::Request => Outcome::RequestError { latency, limits },
            Class::RateLimited => Outcome::RateLimited { limits },
            Class::TooLarge { .. } => Outcome::TooLarge { limits },
            Class::KeyRejected(reason) => Outcome::KeyRejected { reason },
            Class::ModelRefused => Outcome::ModelRefused,
            Class::Upstream {
                failure,
                retry_after,
                ..
            } => Outcome::Upstream {
                failure,
                retry_after,
            },
        };
        self.record(outcome, now)
    }

    /// The key refused the request's `scope` (its model, or its endpoint): it stops being a
    /// candidate for that scope for a while, and nothing else about it changes.
    pub fn refuse(mut self, scope: &str, now: Time) -> Changes {
        let mut changes = self.finish(&Outcome::ModelRefused, now);
        let until = self.key.state.refusals.refused(scope, now);
        changes.0[0] = Some(StateChange::ModelRefused { until });
        changes
    }

    /// The provider named the key's organization (`openai-organization`): from now on the
    /// key shares a throttle group with the other keys of that organization.
    pub fn learn_organization(&self, organization: &str) {
        self.key.learn_organization(organization);
    }

    fn group_outcome(&self, outcome: &Outcome, now: Time) -> Option<StateChange> {
        let group = self.key.group()?;
        match outcome {
            Outcome::RateLimited { .. } => {
                let rest = state_rest(&self.key, now);
                group
                    .rate_limited(self.key.index, rest, now, self.group_trial.is_some())
                    .map(|until| StateChange::GroupThrottled { until })
            }
            Outcome::Success { .. } | Outcome::RequestError { .. }
                if self.group_trial.is_some() =>
            {
                group.recovered();
                Some(StateChange::GroupRecovered)
            }
            _ => {
                if let Some(seen) = self.group_trial {
                    group.gate.release_trial(seen);
                }
                None
            }
        }
    }
}

/// How long the key itself now rests (its cooldown), for the group's longest-rest rule.
fn state_rest(key: &PoolKey, now: Time) -> std::time::Duration {
    let (cooldown, ..) = key.state.policy_view();
    cooldown.until().saturating_since(now)
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.done {
            // Time is not known here; the cancelled outcome does not depend on it beyond
            // republishing the gate, for which the start time is a safe lower bound.
            let started = self.sent.at;
            self.finish(&Outcome::Cancelled, started);
        }
    }
}

/// State changes caused by one outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Changes([Option<StateChange>; 2]);

impl Changes {
    pub(crate) fn from_key(change: Option<StateChange>) -> Self {
        Changes([change, None])
    }

    /// The changes, key first.
    pub fn iter(&self) -> impl Iterator<Item = StateChange> + '_ {
        self.0.iter().flatten().copied()
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }
}
