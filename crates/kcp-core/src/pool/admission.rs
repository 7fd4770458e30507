//! Admission: whether one key can take one request now, and leasing it if so.
//!
//! Every strategy asks the same questions of a candidate ([`KeyPool::check`]): is it
//! disabled, excluded by the request, resting (cooldown, open circuit, throttled group),
//! short of learned budget, ahead of its pace or over its local limit? The answers of the
//! keys that could not take it are summed up in [`Why`], which says when the first one frees
//! and, when that one is paced, on which key a waiting request may be promised a cell.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::keystate::{KeyState, Trial};
use crate::lease::Lease;
use crate::pool::{Demand, KeyPool, NoKey, PoolKey};
use crate::routing::KeyIndex;
use crate::time::Time;

pub(in crate::pool) enum Check {
    Ok {
        key_trial: Option<u64>,
        group_trial: Option<u64>,
    },
    /// Over its local limit until then.
    Blocked(Time),
    /// Resting, short of budget or ahead of its pace: free for one more request then, after
    /// the requests already promised its next cells.
    Paced(Time),
    /// Its circuit is open after upstream failures: no request through it until then.
    Unreachable(Time),
    /// Disabled for its quota or bill, and due for its re-check: one real request may go.
    Recheck,
    Disabled,
    Excluded,
    /// It refused the request's model or endpoint.
    Refused,
    /// Its known token limit is below what the request needs.
    TooSmall,
}

#[derive(Default)]
pub(in crate::pool) struct Why {
    until: Option<Time>,
    /// The key that frees first, when it is a paced one (a promise can be made on it).
    paced: Option<KeyIndex>,
    /// When the first open circuit lets a trial through.
    unreachable: Option<Time>,
    excluded: bool,
    disabled: bool,
    refused: bool,
    too_small: bool,
}

impl Why {
    pub(in crate::pool) fn note(&mut self, check: &Check, key: KeyIndex) {
        match *check {
            Check::Blocked(t) | Check::Paced(t) if self.until.is_none_or(|u| t < u) => {
                self.until = Some(t);
                self.paced = matches!(check, Check::Paced(_)).then_some(key);
            }
            Check::Unreachable(t) if self.unreachable.is_none_or(|u| t < u) => {
                self.unreachable = Some(t);
            }
            Check::Disabled => self.disabled = true,
            Check::Excluded => self.excluded = true,
            Check::Refused => self.refused = true,
            Check::TooSmall => self.too_small = true,
            Check::Blocked(_)
            | Check::Paced(_)
            | Check::Unreachable(_)
            | Check::Recheck
            | Check::Ok { .. } => {}
        }
    }

    /// When the key that frees first is paced and frees within the request's wait, promises
    /// its next cell to this request: the request will come back then for it, and whoever
    /// asks next is told the cell after it.
    pub(in crate::pool) fn promise(&self, keys: &[Arc<PoolKey>], demand: &Demand<'_>, now: Time) {
        if let (Some(index), Some(until)) = (self.paced, self.until) {
            if until.saturating_since(now) <= demand.will_wait {
                keys[index as usize]
                    .state
                    .held
                    .fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    pub(in crate::pool) fn verdict(self) -> NoKey {
        match self {
            Why {
                until: Some(until), ..
            } => NoKey::Busy { until },
            Why {
                unreachable: Some(until),
                ..
            } => NoKey::Unreachable { until },
            Why {
                too_small: true, ..
            } => NoKey::TooLarge,
            Why { refused: true, .. } => NoKey::Refused,
            Why { excluded: true, .. } => NoKey::Exhausted,
            Why { disabled: true, .. } => NoKey::AllDisabled,
            _ => NoKey::NoRoute,
        }
    }
}

/// A gate value that means "a trial is under way": report a short, honest wait.
pub(in crate::pool) const PENDING_WAIT: Duration = Duration::from_secs(1);

impl KeyPool {
    /// Checks one key, notes why it cannot take the request, or leases it.
    pub(in crate::pool) fn try_key(
        &self,
        index: KeyIndex,
        demand: &Demand<'_>,
        now: Time,
        why: &mut Why,
    ) -> Option<Lease> {
        let key = &self.keys[index as usize];
        let check = self.check(key, demand, now);
        why.note(&check, index);
        match check {
            Check::Ok {
                key_trial,
                group_trial,
            } => self.take(key, demand, now, key_trial, group_trial),
            Check::Recheck => self.recheck(key, demand, now),
            _ => None,
        }
    }

    /// Whether `key` can take the request now, without changing anything.
    pub(in crate::pool) fn check(&self, key: &PoolKey, demand: &Demand<'_>, now: Time) -> Check {
        use crate::gate::Pass;
        let state = &key.state;
        let excluded = demand.exclude.contains(&key.index);
        // Disabled before excluded: a key tried and then rejected in this request counts as
        // disabled, so a pool that rejected every key says so rather than "all tried".
        if state.disabled.load(Ordering::Acquire) {
            return if !excluded && state.trial_due(now) && self.serves(key, demand) {
                Check::Recheck
            } else {
                Check::Disabled
            };
        }
        if excluded {
            return Check::Excluded;
        }
        if demand
            .scope
            .is_some_and(|s| state.refusals.refuses(s, now).is_some())
        {
            return Check::Refused;
        }
        if !self.serves(key, demand) {
            return Check::TooSmall;
        }
        let mut rest = now;
        let key_trial = match state.gate.check(now) {
            Pass::Open => None,
            Pass::Until(t) if state.gate.holds_trial() => {
                return Check::Unreachable(honest(t, now));
            }
            Pass::Until(t) => {
                rest = honest(t, now);
                None
            }
            Pass::Trial(seen) => Some(seen),
        };
        let group_trial = match key.group().map_or(Pass::Open, |g| g.gate.check(now)) {
            Pass::Open => None,
            Pass::Until(t) => {
                rest = rest.max(after_probe(t, now));
                None
            }
            Pass::Trial(seen) => Some(seen),
        };
        let budget = state
            .requests
            .free_at(now, 1)
            .max(state.tokens.free_at(now, demand.tokens));
        // What the provider reported left may be spent at once; the pace only holds back
        // what goes beyond it, or everything while no report is trusted.
        let trusted = state.trusts_budget(now);
        let blocked = rest > now || budget > now || (!trusted && state.pace.check(now).is_err());
        if blocked {
            let paced = promise(state, demand, rest, trusted, now);
            return match state.local.check(paced) {
                Err(t) => Check::Blocked(t),
                Ok(()) => Check::Paced(paced),
            };
        }
        if let Err(t) = state.local.check(now) {
            return Check::Blocked(t);
        }
        Check::Ok {
            key_trial,
            group_trial,
        }
    }

    /// Whether the key's token limit is large enough for the request: a known limit at least
    /// the request's estimate, and at least what the provider said it needs
    /// ([`Demand::min_token_limit`], which only a known limit can meet).
    fn serves(&self, key: &PoolKey, demand: &Demand<'_>) -> bool {
        match key.state.tokens.limit() {
            Some(limit) => limit >= demand.tokens.max(demand.min_token_limit),
            None => demand.min_token_limit == 0,
        }
    }

    /// Starts the re-check of a key disabled for its quota or bill: this request is it.
    /// `None` if another request got there first.
    fn recheck(&self, key: &Arc<PoolKey>, demand: &Demand<'_>, now: Time) -> Option<Lease> {
        key.state.start_probe_by_request(now).then(|| {
            Lease::new(
                key.clone(),
                demand.tokens,
                Trial::Probe,
                None,
                self.config.unhealthy_penalty,
                now,
            )
        })
    }

    /// Claims the key's trials and limiter cells, then leases it; `None` if another thread
    /// got there first.
    pub(in crate::pool) fn take(
        &self,
        key: &Arc<PoolKey>,
        demand: &Demand<'_>,
        now: Time,
        key_trial: Option<u64>,
        group_trial: Option<u64>,
    ) -> Option<Lease> {
        let state = &key.state;
        if let Some(seen) = key_trial {
            if !state.gate.claim_trial(seen) {
                return None;
            }
        }
        let release = || {
            if let Some(seen) = key_trial {
                state.gate.release_trial(seen);
            }
        };
        let group = key.group();
        if let (Some(seen), Some(group)) = (group_trial, group) {
            if !group.gate.claim_trial(seen) {
                release();
                return None;
            }
        }
        let release_all = || {
            release();
            if let (Some(seen), Some(group)) = (group_trial, group) {
                group.gate.release_trial(seen);
            }
        };
        if state.local.try_acquire(now).is_err() {
            release_all();
            return None;
        }
        // A trusted budget needs no pace cell, but takes one when there is one, so that the
        // pace is in step when the trust ends.
        if state.pace.try_acquire(now).is_err() && !state.trusts_budget(now) {
            state.local.refund();
            release_all();
            return None;
        }
        // Whoever takes a cell while some are promised takes the earliest promise: its
        // holder is due now, or late and gone (it found another key, or gave up).
        let _ = state
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| h.checked_sub(1));
        self.advance(key);
        let trial = if key_trial.is_some() {
            Trial::Circuit
        } else {
            Trial::None
        };
        Some(Lease::new(
            key.clone(),
            demand.tokens,
            trial,
            group_trial,
            self.config.unhealthy_penalty,
            now,
        ))
    }
}

/// When a key resting until `rest` frees for one more request after the `n - 1` already
/// promised its next cells: its `n`-th pace cell from the end of the rest, once its budget
/// covers `n` such requests.
pub(in crate::pool) fn promise(
    state: &KeyState,
    demand: &Demand<'_>,
    rest: Time,
    trusted: bool,
    now: Time,
) -> Time {
    let n = state.held.load(Ordering::Acquire).saturating_add(1);
    let budget = state.requests.free_at(now, u64::from(n)).max(
        state
            .tokens
            .free_at(now, demand.tokens.saturating_mul(u64::from(n))),
    );
    if trusted {
        rest.max(budget)
    } else {
        state.pace.nth_conforms(rest, n).max(budget)
    }
}

/// When a throttled group that rests until `until` takes more than its single probe: a
/// probe's round trip after the rest ends (or from now, when the probe is under way).
fn after_probe(until: Time, now: Time) -> Time {
    match honest(until, now) {
        t if t == until => t + PENDING_WAIT,
        t => t,
    }
}

/// A trial under way has no deadline: say "soon" rather than "never".
fn honest(until: Time, now: Time) -> Time {
    if until.as_nanos() >= crate::gate::Gate::PENDING - 1 {
        now + PENDING_WAIT
    } else {
        until
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::keystate::StateChange;
    use crate::outcome::{Outcome, UpstreamFailure};
    use crate::{
        Demand, KeyPool, KeySpec, NoKey, PoolConfig, RateLimitHeaders, Secret, SplitMix64, Time,
    };

    const T: Time = Time::from_secs(100);

    fn pool(names: &[&str]) -> KeyPool {
        let specs = names
            .iter()
            .map(|n| KeySpec::new(Secret::new(format!("sk-{n}")), "http://h").with_name(*n))
            .collect();
        KeyPool::new(specs, PoolConfig::default()).expect("valid pool")
    }

    /// Leases the key `name` at `now` and records `outcome` on it; returns its changes.
    fn on_key(p: &KeyPool, name: &str, outcome: Outcome, now: Time) -> Vec<StateChange> {
        let mut rng = SplitMix64::new(1);
        let mut exclude = Vec::new();
        for _ in 0..8 {
            let demand = Demand {
                exclude: &exclude,
                ..Demand::default()
            };
            let lease = p.select(&demand, now, &mut rng).expect("a free key");
            if lease.id().as_str() == name {
                return lease.record(outcome, now).iter().collect();
            }
            exclude.push(lease.index());
            lease.record(Outcome::Cancelled, now);
        }
        panic!("no key {name}");
    }

    fn rest(p: &KeyPool, name: &str, secs: u64, limit_requests: Option<u64>) {
        let limits = RateLimitHeaders {
            retry_after: Some(Duration::from_secs(secs)),
            limit_requests,
            ..RateLimitHeaders::default()
        };
        on_key(p, name, Outcome::RateLimited { limits }, T);
    }

    fn select(p: &KeyPool, now: Time, will_wait: Duration) -> Result<String, NoKey> {
        let demand = Demand {
            will_wait,
            ..Demand::default()
        };
        p.select(&demand, now, &mut SplitMix64::new(3))
            .map(|l| l.id().as_str().to_owned())
    }

    #[test]
    fn a_busy_pool_says_when_its_first_key_frees_whatever_the_order() {
        for (a, b) in [(3, 10), (10, 3)] {
            let p = pool(&["a", "b"]);
            rest(&p, "a", a, None);
            rest(&p, "b", b, None);
            assert_eq!(
                select(&p, T, Duration::ZERO),
                Err(NoKey::Busy {
                    until: T + Duration::from_secs(3)
                }),
                "rests {a} s and {b} s"
            );
        }
    }

    /// Opens the circuit of `name` at `now`; returns when it lets a trial through.
    fn open_circuit(p: &KeyPool, name: &str, now: Time) -> Time {
        let fail = || Outcome::Upstream {
            failure: UpstreamFailure::Status(502),
            retry_after: None,
        };
        for _ in 0..crate::circuit::FAILURES_TO_OPEN {
            for change in on_key(p, name, fail(), now) {
                if let StateChange::CircuitOpened { until } = change {
                    return until;
                }
            }
        }
        panic!("the circuit of {name} did not open");
    }

    #[test]
    fn an_unreachable_pool_says_when_its_first_circuit_lets_a_trial_through() {
        // Every order of opening, so that the first circuit to reopen is sometimes looked at
        // first and sometimes last.
        let orders = [
            ["a", "b", "c"],
            ["a", "c", "b"],
            ["b", "a", "c"],
            ["b", "c", "a"],
            ["c", "a", "b"],
            ["c", "b", "a"],
        ];
        for order in orders {
            let p = pool(&["a", "b", "c"]);
            let mut reopen = Vec::new();
            for (i, name) in (0u64..).zip(order) {
                reopen.push(open_circuit(&p, name, T + Duration::from_millis(500 * i)));
            }
            let first = *reopen.iter().min().expect("three circuits");
            let now = T + Duration::from_secs(1);
            // The gate keeps deadlines at even nanoseconds (its low bit marks a trial).
            let Err(NoKey::Unreachable { until }) = select(&p, now, Duration::ZERO) else {
                panic!("every circuit is open")
            };
            assert!(
                until.max(first).saturating_since(until.min(first)) <= Duration::from_nanos(1),
                "opened in the order {order:?}: {until:?}, not {first:?} of {reopen:?}"
            );
        }
    }

    #[test]
    fn a_request_that_will_wait_is_promised_the_next_cell_and_the_next_one_a_later_cell() {
        // 60 a minute learned: the key is paced after its rest.
        let p = pool(&["a"]);
        rest(&p, "a", 2, Some(60));
        let free = T + Duration::from_secs(2);
        // Not waiting: nothing is promised, every request hears the same time.
        for _ in 0..2 {
            assert_eq!(
                select(&p, T, Duration::ZERO),
                Err(NoKey::Busy { until: free })
            );
        }
        // Waiting (and it fits): the first gets the cell at the end of the rest, the next
        // is told a later one.
        let wait = Duration::from_secs(5);
        assert_eq!(select(&p, T, wait), Err(NoKey::Busy { until: free }));
        let Err(NoKey::Busy { until }) = select(&p, T, wait) else {
            panic!("still resting")
        };
        assert!(until > free, "{until:?} after {free:?}");
        // A wait that just fits is a promise too.
        let q = pool(&["a"]);
        rest(&q, "a", 2, Some(60));
        assert_eq!(
            select(&q, T, Duration::from_secs(2)),
            Err(NoKey::Busy { until: free })
        );
        assert_ne!(
            select(&q, T, Duration::ZERO),
            Err(NoKey::Busy { until: free })
        );
    }

    #[test]
    fn while_a_circuits_trial_is_under_way_others_hear_soon_not_never() {
        let p = pool(&["a"]);
        let reopen = open_circuit(&p, "a", T);
        let mut rng = SplitMix64::new(5);
        let trial = p
            .select(&Demand::default(), reopen, &mut rng)
            .expect("the trial");
        let later = reopen + Duration::from_millis(300);
        assert_eq!(
            select(&p, later, Duration::ZERO),
            Err(NoKey::Unreachable {
                until: later + super::PENDING_WAIT
            })
        );
        drop(trial);
    }

    #[test]
    fn a_throttled_group_frees_a_probes_round_trip_after_its_rest() {
        let p = pool(&["a", "b", "c"]);
        let mut rng = SplitMix64::new(5);
        for _ in 0..3 {
            let lease = p.select(&Demand::default(), T, &mut rng).expect("free");
            lease.learn_organization("org-shared");
            lease.record(Outcome::Cancelled, T);
        }
        let mut group_until = None;
        for _ in 0..3 {
            let Ok(lease) = p.select(&Demand::default(), T, &mut rng) else {
                break;
            };
            for c in lease
                .record(
                    Outcome::RateLimited {
                        limits: RateLimitHeaders::default(),
                    },
                    T,
                )
                .iter()
            {
                if let StateChange::GroupThrottled { until } = c {
                    group_until = Some(until);
                }
            }
        }
        let group_until = group_until.expect("throttled");
        assert_eq!(
            select(&p, T, Duration::ZERO),
            Err(NoKey::Busy {
                until: group_until + super::PENDING_WAIT
            })
        );
        // At its end one request probes the group; while it is under way, the others hear
        // "a probe's round trip from now".
        let probe = p
            .select(&Demand::default(), group_until, &mut rng)
            .expect("the group's probe");
        let later = group_until + Duration::from_millis(300);
        assert_eq!(
            select(&p, later, Duration::ZERO),
            Err(NoKey::Busy {
                until: later + super::PENDING_WAIT
            })
        );
        drop(probe);
    }
}
