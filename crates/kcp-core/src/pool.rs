//! The key pool: an immutable snapshot of keys, routes and policy, with live per-key state.
//!
//! A pool is built once per configuration and shared behind an `Arc`; a reload builds a new
//! pool that takes over the live state of every key still present ([`KeyPool::rebuild`]),
//! and the caller swaps the `Arc`. Leases hold their key's state, so in-flight requests
//! finish on the key they have whatever happens to the pool.

use std::collections::{HashMap, HashSet};
use std::hash::Hasher;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::gcra::Gcra;
use crate::key::{KeyId, KeySpec, normalize_url};
use crate::keystate::{KeyState, Trial};
use crate::lease::{Changes, Lease};
use crate::rng::Random;
use crate::routing::{Fnv, KeyIndex, RouteTable, TooManyGlobs};
use crate::throttle::ThrottleGroup;
use crate::time::Time;

/// How selection chooses among the keys that can take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Strategy {
    /// Plain rotation over the keys that can take the request.
    RoundRobin,
    /// Fair rotation in proportion to each key's weight × health × rate (its pace: learned
    /// or configured, less after 429s), so a 240 rpm key carries eight times the traffic of a
    /// 30 rpm one and a failing key only a trickle. A key that is briefly held back keeps
    /// its turn for when it frees (start-time fair queueing, see [`KeyPool::select`]).
    #[default]
    RoundRobinHealthWeighted,
    /// Power of two choices over peak-EWMA latency × (in-flight + 1), as tower's p2c.
    LeastLatency,
}

/// Pool-wide policy.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Selection strategy.
    pub strategy: Strategy,
    /// Health cost of one upstream failure, in units of [`crate::health::PENALTY_UNIT`].
    pub unhealthy_penalty: u32,
    /// Local per-key limit (requests per second) for keys without their own `rpm`.
    pub per_key_rps: Option<f64>,
    /// Local limit over the whole pool (requests per second).
    pub global_rps: Option<f64>,
    /// Burst of the local limiters.
    pub burst: NonZeroU32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            strategy: Strategy::default(),
            unhealthy_penalty: 5,
            per_key_rps: None,
            global_rps: None,
            burst: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// A pool that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A key's secret is empty.
    #[error("api key #{0} is empty: set `key` (or `key_env`) to the secret")]
    EmptySecret(usize),
    /// A weight of zero would never be chosen.
    #[error("api key `{0}` has weight 0: use 1 or more, or remove the key")]
    ZeroWeight(KeyId),
    /// Too many globs.
    #[error(transparent)]
    TooManyGlobs(#[from] TooManyGlobs),
}

/// A key as the pool holds it: its config plus its live state.
#[derive(Debug)]
pub struct PoolKey {
    pub(crate) spec: KeySpec,
    pub(crate) id: KeyId,
    pub(crate) index: KeyIndex,
    pub(crate) state: Arc<KeyState>,
    pub(crate) group: Arc<ThrottleGroup>,
}

/// What one request asks of the pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Demand<'a> {
    /// The requested model, if the request names one.
    pub model: Option<&'a str>,
    /// Estimated tokens ([`crate::budget::estimate_tokens`]), spent against token budgets.
    pub tokens: u64,
    /// Keys already tried for this request: never chosen again.
    pub exclude: &'a [KeyIndex],
    /// How much longer this request would wait for a key if none can take it now (the
    /// caller's `max_wait` minus what it already waited; zero when it will not wait). A
    /// [`NoKey::Busy`] answer within it promises the key's next cell to this request; one
    /// beyond it promises nothing, so a caller that gives up leaves nothing dangling.
    pub will_wait: Duration,
}

impl Demand<'_> {
    /// The demand with its token estimate capped at [`crate::budget::MAX_TOKENS`], whatever
    /// the client wrote as `max_tokens`.
    fn bounded(&self) -> Self {
        Demand {
            tokens: self.tokens.min(crate::budget::MAX_TOKENS),
            ..*self
        }
    }
}

/// Why no key can take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoKey {
    /// No key serves the model.
    NoRoute,
    /// Every key that serves it is disabled.
    AllDisabled,
    /// Every usable key is cooling or limited; the first frees up then.
    Busy {
        /// When the first key (or the global limit) frees up.
        until: Time,
    },
    /// Every usable key was already tried for this request.
    Exhausted,
}

/// The pool.
#[derive(Debug)]
pub struct KeyPool {
    keys: Box<[Arc<PoolKey>]>,
    routes: RouteTable,
    config: PoolConfig,
    global: Arc<Gcra>,
    groups: Vec<Arc<ThrottleGroup>>,
    cursor: AtomicUsize,
    max_rpm: AtomicU64,
    /// The largest configured weight.
    max_weight: f64,
    /// Virtual time of the fair rotation (f64 bits; see [`KeyPool::select`]).
    vtime: AtomicU64,
    /// Each key's tag in the fair rotation (f64 bits), side by side so a window of tags is
    /// two cache lines rather than sixteen scattered ones.
    tags: Box<[AtomicU64]>,
}

enum Check {
    Ok {
        key_trial: Option<u64>,
        group_trial: Option<u64>,
    },
    /// Over its local limit until then.
    Blocked(Time),
    /// Resting, short of budget or ahead of its pace: free for one more request then, after
    /// the requests already promised its next cells.
    Paced(Time),
    Disabled,
    Excluded,
}

#[derive(Default)]
struct Why {
    until: Option<Time>,
    /// The key that frees first, when it is a paced one (a promise can be made on it).
    paced: Option<KeyIndex>,
    excluded: bool,
    disabled: bool,
}

impl Why {
    fn note(&mut self, check: &Check, key: KeyIndex) {
        match *check {
            Check::Blocked(t) | Check::Paced(t) if self.until.is_none_or(|u| t < u) => {
                self.until = Some(t);
                self.paced = matches!(check, Check::Paced(_)).then_some(key);
            }
            Check::Disabled => self.disabled = true,
            Check::Excluded => self.excluded = true,
            Check::Blocked(_) | Check::Paced(_) | Check::Ok { .. } => {}
        }
    }

    fn verdict(self) -> NoKey {
        match self {
            Why {
                until: Some(until), ..
            } => NoKey::Busy { until },
            Why { excluded: true, .. } => NoKey::Exhausted,
            Why { disabled: true, .. } => NoKey::AllDisabled,
            _ => NoKey::NoRoute,
        }
    }
}

/// Candidates the fair rotation compares: all of them in pools of up to this many keys,
/// a rotating window of this many in larger ones, so selection stays O(1) in pool size
/// when keys are free.
pub const FAIR_WINDOW: usize = 16;

/// How many strides of the fastest key a tag may lead the virtual time by: keys up to 64
/// times slower than the fastest keep their exact share.
pub const MAX_LEAD: f64 = 64.0;

/// A gate value that means "a trial is under way": report a short, honest wait.
const PENDING_WAIT: Duration = Duration::from_secs(1);

impl KeyPool {
    /// Builds a pool with fresh state for every key.
    pub fn new(specs: Vec<KeySpec>, config: PoolConfig) -> Result<KeyPool, PoolError> {
        Self::build(specs, config, None)
    }

    /// Builds a pool for a new key list, keeping the live state (cooldowns, disabled keys,
    /// health, learned limits, counters) of every key that is still present.
    pub fn rebuild(&self, specs: Vec<KeySpec>, config: PoolConfig) -> Result<KeyPool, PoolError> {
        Self::build(specs, config, Some(self))
    }

    fn build(
        specs: Vec<KeySpec>,
        config: PoolConfig,
        previous: Option<&KeyPool>,
    ) -> Result<KeyPool, PoolError> {
        let mut unique: Vec<KeySpec> = Vec::with_capacity(specs.len());
        let mut seen: HashSet<(&str, &str)> = HashSet::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            if spec.secret.is_empty() {
                return Err(PoolError::EmptySecret(i));
            }
            if spec.weight == 0 {
                return Err(PoolError::ZeroWeight(spec.id()));
            }
            if seen.insert(spec.identity()) {
                unique.push(spec.clone());
            }
        }
        let routes =
            RouteTable::build(&unique.iter().map(|s| s.models.clone()).collect::<Vec<_>>())?;
        let earlier: HashMap<(&str, &str), &PoolKey> = previous
            .map(|p| p.keys.iter().map(|k| (k.spec.identity(), &**k)).collect())
            .unwrap_or_default();
        let vtime = previous.map_or(0, |p| p.vtime.load(Ordering::Relaxed));
        let mut groups: Vec<Arc<ThrottleGroup>> = Vec::new();
        let mut keys = Vec::with_capacity(unique.len());
        let mut tags = Vec::with_capacity(unique.len());
        for (index, spec) in unique.into_iter().enumerate() {
            let before = earlier.get(&spec.identity());
            let state = before
                .map(|k| k.state.clone())
                .unwrap_or_else(|| Arc::new(KeyState::new(&spec, seed_of(&spec))));
            // A key that stays keeps its place in the fair rotation; a new one starts at
            // the virtual time, with no credit.
            let tag = before.zip(previous).map_or(vtime, |(k, p)| {
                p.tags[k.index as usize].load(Ordering::Relaxed)
            });
            tags.push(AtomicU64::new(tag));
            state.configure(&spec, config.per_key_rps, config.burst);
            let group = group_for(&mut groups, previous, &spec);
            keys.push(Arc::new(PoolKey {
                id: spec.id(),
                index: index as KeyIndex,
                spec,
                state,
                group,
            }));
        }
        for group in &groups {
            let members = keys
                .iter()
                .filter(|k| Arc::ptr_eq(&k.group, group))
                .map(|k| k.index)
                .collect();
            group.set_members(members);
        }
        let global = previous.map_or_else(|| Arc::new(Gcra::unlimited()), |p| p.global.clone());
        global.set_rate(config.global_rps.unwrap_or(f64::INFINITY), config.burst);
        let max_weight = f64::from(keys.iter().map(|k| k.spec.weight).max().unwrap_or(1));
        let max_rpm = keys
            .iter()
            .filter_map(|k| k.state.requests.limit())
            .max()
            .unwrap_or(1);
        Ok(KeyPool {
            keys: keys.into_boxed_slice(),
            routes,
            config,
            global,
            groups,
            cursor: AtomicUsize::new(0),
            max_rpm: AtomicU64::new(max_rpm),
            max_weight,
            vtime: AtomicU64::new(vtime),
            tags: tags.into_boxed_slice(),
        })
    }

    /// The pool's policy.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the pool has no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The route table (for bounded metric labels).
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// The configuration of every key, in pool order.
    pub fn specs(&self) -> impl Iterator<Item = &KeySpec> {
        self.keys.iter().map(|k| &k.spec)
    }

    /// Chooses a key for a request, or says why none can take it now.
    ///
    /// Only keys that can take the request at `now` are candidates: not excluded, disabled,
    /// cooling, throttled with their group, short of learned budget (requests or the
    /// demand's tokens, counting what is in flight) or ahead of their pace. Among those,
    /// `round_robin_health_weighted` uses start-time fair queueing (Goyal, Vin & Cheng,
    /// 1996) with each key as a flow of share weight × health × rate: every lease advances
    /// its key's tag by `1 / share`, and the key with the smallest start tag
    /// (`max(tag, virtual time)`) among a window of [`FAIR_WINDOW`] candidates wins. The key furthest behind its share, i.e. with the most headroom relative
    /// to its own rate, goes first; a key held back by its pace keeps its turn instead of
    /// losing its share, but an idle key earns no credit.
    ///
    /// When no key can take it, [`NoKey::Busy`] says when one can: for each key, the instant
    /// its rest (and its group's) is over, its budget covers the request and its pace has a
    /// cell not yet promised to another waiting request; the earliest of those. If that is
    /// within [`Demand::will_wait`], the key's cell is promised to this request: only a count
    /// per key, so the next request that has to wait is told the cell after it, and whoever
    /// takes a key's cell while some are promised takes the earliest promise. Requests that
    /// wait are thus spread over the coming cells in order instead of all waking at the
    /// first one, and once the cells within the caller's `max_wait` are promised, a new
    /// request hears at once that its wait would be too long.
    pub fn select<R: Random + ?Sized>(
        &self,
        demand: &Demand<'_>,
        now: Time,
        rng: &mut R,
    ) -> Result<Lease, NoKey> {
        let demand = &demand.bounded();
        let route = self.routes.lookup(demand.model);
        if route.is_empty() {
            return Err(NoKey::NoRoute);
        }
        if let Err(until) = self.global.try_acquire(now) {
            return Err(NoKey::Busy { until });
        }
        let mut why = Why::default();
        for tier in route.tiers() {
            if tier.is_empty() {
                continue;
            }
            let found = match self.config.strategy {
                Strategy::LeastLatency => {
                    self.two_choices(tier.keys, &tier, demand, now, rng, &mut why)
                }
                Strategy::RoundRobinHealthWeighted => {
                    self.fair(tier.keys, &tier, demand, now, &mut why)
                }
                Strategy::RoundRobin => self.rotate(tier.keys, &tier, demand, now, &mut why),
            };
            if let Some(lease) = found {
                return Ok(lease);
            }
        }
        self.global.refund();
        if let (Some(index), Some(until)) = (why.paced, why.until) {
            if until.saturating_since(now) <= demand.will_wait {
                // The request will come back then for that key's cell: whoever asks next is
                // told the cell after it.
                let held = &self.keys[index as usize].state.held;
                held.fetch_add(1, Ordering::AcqRel);
            }
        }
        Err(why.verdict())
    }

    /// Chooses the request's stable "home" key: the first key (in config order) that serves
    /// it and is not disabled. Objects created through one key (files, batches, threads)
    /// live in its account, so stateful endpoints must keep going there.
    pub fn select_home(&self, demand: &Demand<'_>, now: Time) -> Result<Lease, NoKey> {
        let demand = &demand.bounded();
        let route = self.routes.lookup(demand.model);
        if route.is_empty() {
            return Err(NoKey::NoRoute);
        }
        let mut why = Why::default();
        let home = route.tiers().into_iter().flat_map(|t| {
            let c = t;
            t.keys.iter().copied().filter(move |&k| c.admits(k))
        });
        for index in home {
            let key = &self.keys[index as usize];
            let check = self.check(key, demand, now);
            why.note(&check, index);
            match check {
                Check::Disabled | Check::Excluded => continue,
                Check::Blocked(_) | Check::Paced(_) => break,
                Check::Ok {
                    key_trial,
                    group_trial,
                } => {
                    if let Err(until) = self.global.try_acquire(now) {
                        return Err(NoKey::Busy { until });
                    }
                    if let Some(lease) = self.take(key, demand, now, key_trial, group_trial) {
                        return Ok(lease);
                    }
                    self.global.refund();
                    why.note(&Check::Blocked(now + PENDING_WAIT), index);
                    break;
                }
            }
        }
        Err(why.verdict())
    }

    fn rotate(
        &self,
        keys: &[KeyIndex],
        tier: &crate::routing::Candidates<'_>,
        demand: &Demand<'_>,
        now: Time,
        why: &mut Why,
    ) -> Option<Lease> {
        let n = keys.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        for step in 0..n {
            let index = keys[(start + step) % n];
            if !tier.admits(index) {
                continue;
            }
            if let Some(lease) = self.try_key(index, demand, now, why) {
                return Some(lease);
            }
        }
        None
    }

    /// Checks one key, notes why it cannot take the request, or leases it.
    fn try_key(
        &self,
        index: KeyIndex,
        demand: &Demand<'_>,
        now: Time,
        why: &mut Why,
    ) -> Option<Lease> {
        let key = &self.keys[index as usize];
        let check = self.check(key, demand, now);
        why.note(&check, index);
        let Check::Ok {
            key_trial,
            group_trial,
        } = check
        else {
            return None;
        };
        self.take(key, demand, now, key_trial, group_trial)
    }

    /// Start-time fair queueing over the candidates (see [`KeyPool::select`]).
    ///
    /// Reading a key's tag is one atomic load, while checking whether it can take the
    /// request is a dozen; so the tags of a window of candidates are read first and only
    /// then are keys checked, smallest tag first, usually just one. When none in a window
    /// can take the request, the next window is tried.
    fn fair(
        &self,
        keys: &[KeyIndex],
        tier: &crate::routing::Candidates<'_>,
        demand: &Demand<'_>,
        now: Time,
        why: &mut Why,
    ) -> Option<Lease> {
        let n = keys.len();
        // Up to FAIR_WINDOW keys all fit one window. In a larger pool the windows slide
        // over the keys with a shared cursor, so that every key is looked at in turn: a key
        // never seen would fall behind the virtual time and lose its share.
        let start = if n > FAIR_WINDOW {
            self.cursor.fetch_add(1, Ordering::Relaxed) % n
        } else {
            0
        };
        let vtime = f64::from_bits(self.vtime.load(Ordering::Acquire));
        let lead = self.max_lead();
        let mut window = [(0.0_f64, 0 as KeyIndex); FAIR_WINDOW];
        let mut step = 0;
        while step < n {
            let mut len = 0;
            while step < n && len < FAIR_WINDOW {
                let index = keys[(start + step) % n];
                step += 1;
                if tier.admits(index) {
                    window[len] = (self.tag(index, vtime, lead), index);
                    len += 1;
                }
            }
            while len > 0 {
                // Smallest tag first; usually the first one checked takes the request.
                let mut first = 0;
                for i in 1..len {
                    if window[i].0 < window[first].0 {
                        first = i;
                    }
                }
                let index = window[first].1;
                len -= 1;
                window.swap(first, len);
                if let Some(lease) = self.try_key(index, demand, now, why) {
                    return Some(lease);
                }
            }
        }
        None
    }

    /// A lease on `key` starts: its start tag is `max(tag, virtual time)`, which becomes the
    /// virtual time, and its tag moves on by `1 / share`.
    fn advance(&self, key: &PoolKey) {
        let vtime = f64::from_bits(self.vtime.load(Ordering::Acquire));
        let lead = self.max_lead();
        let stride = 1.0 / self.share(key);
        let mut start = vtime;
        // The closure always returns Some, so the update cannot fail.
        let _ = self.tags[key.index as usize].fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |pass| {
                start = f64::from_bits(pass).clamp(vtime, vtime + lead);
                Some((start + stride).to_bits())
            },
        );
        // Non-negative floats order like their bit patterns. Most leases start at the
        // virtual time itself; only a later start needs the shared write.
        if start > vtime {
            self.vtime.fetch_max(start.to_bits(), Ordering::AcqRel);
        }
    }

    /// A key's start tag if chosen now: its tag, at least the virtual time. A tag further
    /// ahead than `lead` is pulled back for good (written back), so the key's turn comes
    /// once the others catch up instead of trailing the virtual time forever.
    fn tag(&self, index: KeyIndex, vtime: f64, lead: f64) -> f64 {
        let slot = &self.tags[index as usize];
        let raw = slot.load(Ordering::Acquire);
        let tag = f64::from_bits(raw);
        if tag > vtime + lead {
            let pulled = vtime + lead;
            // Losing this race to a concurrent advance is fine: that one moved the tag.
            let _ =
                slot.compare_exchange(raw, pulled.to_bits(), Ordering::AcqRel, Ordering::Acquire);
            pulled
        } else {
            tag.max(vtime)
        }
    }

    /// How far a key's tag may run ahead of the virtual time: [`MAX_LEAD`] strides of the
    /// fastest possible key. Shares change as limits are learned; a tag advanced by a
    /// stride from before (say, while no limit was known) must not bench the key for ages.
    fn max_lead(&self) -> f64 {
        let max_rate = self.max_rpm.load(Ordering::Relaxed).max(1) as f64 / 60.0;
        MAX_LEAD / (self.max_weight * max_rate)
    }

    /// A key's share of the fair rotation: weight × health × requests per second (its pace;
    /// a key whose rate is not known yet counts as the fastest known one).
    fn share(&self, key: &PoolKey) -> f64 {
        let state = &key.state;
        let max_rpm = self.max_rpm.load(Ordering::Relaxed);
        let rate = match (state.requests.limit(), state.pace.rate_per_sec()) {
            (Some(rpm), Some(rate)) if rate > 0.0 => {
                if rpm > max_rpm {
                    self.max_rpm.fetch_max(rpm, Ordering::Relaxed);
                }
                rate
            }
            _ => max_rpm as f64 / 60.0,
        };
        let health = f64::from(state.health.get()) / f64::from(crate::health::MAX_HEALTH);
        (f64::from(key.spec.weight) * health * rate).max(f64::MIN_POSITIVE)
    }

    fn two_choices<R: Random + ?Sized>(
        &self,
        keys: &[KeyIndex],
        tier: &crate::routing::Candidates<'_>,
        demand: &Demand<'_>,
        now: Time,
        rng: &mut R,
        why: &mut Why,
    ) -> Option<Lease> {
        let n = keys.len() as u64;
        let a = rng.below(n) as usize;
        let b = if n > 1 {
            (a + 1 + rng.below(n - 1) as usize) % n as usize
        } else {
            a
        };
        let mut best: Option<(f64, usize, Option<u64>, Option<u64>)> = None;
        for pick in [a, b] {
            let index = keys[pick];
            if !tier.admits(index) {
                continue;
            }
            let key = &self.keys[index as usize];
            if let Check::Ok {
                key_trial,
                group_trial,
            } = self.check(key, demand, now)
            {
                let cost = self.cost(key, now);
                if best.is_none_or(|(c, ..)| cost < c) {
                    best = Some((cost, index as usize, key_trial, group_trial));
                }
            }
        }
        if let Some((_, index, key_trial, group_trial)) = best {
            if let Some(lease) = self.take(&self.keys[index], demand, now, key_trial, group_trial) {
                return Some(lease);
            }
        }
        // Neither sample can take it: fall back to any key that can.
        self.rotate(keys, tier, demand, now, why)
    }

    /// Peak-EWMA latency × (in-flight + 1) / weight: lower is better.
    fn cost(&self, key: &PoolKey, now: Time) -> f64 {
        let in_flight = key.state.requests.pending() as f64;
        key.state.latency.cost_nanos(now) * (in_flight + 1.0) / f64::from(key.spec.weight)
    }

    /// Whether `key` can take the request now, without changing anything.
    fn check(&self, key: &PoolKey, demand: &Demand<'_>, now: Time) -> Check {
        use crate::gate::Pass;
        let state = &key.state;
        // Disabled before excluded: a key tried and then rejected in this request counts as
        // disabled, so a pool that rejected every key says so rather than "all tried".
        if state.disabled.load(Ordering::Acquire) {
            return Check::Disabled;
        }
        if demand.exclude.contains(&key.index) {
            return Check::Excluded;
        }
        let mut rest = now;
        let key_trial = match state.gate.check(now) {
            Pass::Open => None,
            Pass::Until(t) => {
                rest = honest(t, now);
                None
            }
            Pass::Trial(seen) => Some(seen),
        };
        let group_trial = match key.group.gate.check(now) {
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
        let blocked = rest > now || budget > now || state.pace.check(now).is_err();
        if blocked {
            let paced = promise(state, demand, rest, now);
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

    /// Claims the key's trials and limiter cells, then leases it; `None` if another thread
    /// got there first.
    fn take(
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
        if let Some(seen) = group_trial {
            if !key.group.gate.claim_trial(seen) {
                release();
                return None;
            }
        }
        let release_all = || {
            release();
            if let Some(seen) = group_trial {
                key.group.gate.release_trial(seen);
            }
        };
        if state.local.try_acquire(now).is_err() {
            release_all();
            return None;
        }
        if state.pace.try_acquire(now).is_err() {
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

    /// Disabled keys whose re-check is due at `now`.
    pub fn due_probes(&self, now: Time) -> Vec<KeyIndex> {
        self.keys
            .iter()
            .filter(|k| k.state.probe_due(now))
            .map(|k| k.index)
            .collect()
    }

    /// Starts the re-check of a disabled key: a lease whose success re-enables it. `None`
    /// when the key is not disabled, not due, or already being re-checked.
    pub fn probe(&self, index: KeyIndex, now: Time) -> Option<Lease> {
        let key = self.keys.get(index as usize)?;
        key.state.start_probe(now).then(|| {
            Lease::new(
                key.clone(),
                0,
                Trial::Probe,
                None,
                self.config.unhealthy_penalty,
                now,
            )
        })
    }

    /// An operator disables or re-enables the key with this id; `None` if there is none.
    pub fn set_disabled(&self, id: &str, disabled: bool, now: Time) -> Option<Changes> {
        let key = self.keys.iter().find(|k| k.id.as_str() == id)?;
        let change = key.state.set_manual(disabled, now);
        Some(Changes::from_key(change))
    }

    /// An operator wants the key with this id re-checked now: `Some(true)` when its re-check
    /// is due from `now` on, `Some(false)` when it is not disabled or was disabled by an
    /// operator (nothing to re-check), `None` when there is no such key.
    pub fn recheck_now(&self, id: &str, now: Time) -> Option<bool> {
        let key = self.keys.iter().find(|k| k.id.as_str() == id)?;
        Some(key.state.probe_now(now))
    }

    pub(crate) fn keys(&self) -> &[Arc<PoolKey>] {
        &self.keys
    }

    pub(crate) fn groups(&self) -> &[Arc<ThrottleGroup>] {
        &self.groups
    }
}

/// When a key resting until `rest` frees for one more request after the `n - 1` already
/// promised its next cells: its `n`-th pace cell from the end of the rest, once its budget
/// covers `n` such requests.
fn promise(state: &KeyState, demand: &Demand<'_>, rest: Time, now: Time) -> Time {
    let n = state.held.load(Ordering::Acquire).saturating_add(1);
    let budget = state.requests.free_at(now, u64::from(n)).max(
        state
            .tokens
            .free_at(now, demand.tokens.saturating_mul(u64::from(n))),
    );
    state.pace.nth_conforms(rest, n).max(budget)
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

fn seed_of(spec: &KeySpec) -> u64 {
    let mut hasher = Fnv::default();
    hasher.write(spec.id().as_str().as_bytes());
    hasher.finish()
}

fn group_for(
    groups: &mut Vec<Arc<ThrottleGroup>>,
    previous: Option<&KeyPool>,
    spec: &KeySpec,
) -> Arc<ThrottleGroup> {
    let url = normalize_url(&spec.url);
    let org = spec.organization.as_deref();
    if let Some(group) = groups.iter().find(|g| g.is_for(url, org)) {
        return group.clone();
    }
    let group = previous
        .and_then(|p| p.groups.iter().find(|g| g.is_for(url, org)).cloned())
        .unwrap_or_else(|| Arc::new(ThrottleGroup::new(url, org)));
    groups.push(group.clone());
    group
}
