//! The key pool: an immutable snapshot of keys, routes and policy, with live per-key state.
//!
//! A pool is built once per configuration and shared behind an `Arc`; a reload builds a new
//! pool that takes over the live state of every key still present ([`KeyPool::rebuild`]),
//! and the caller swaps the `Arc`. Leases hold their key's state, so in-flight requests
//! finish on the key they have whatever happens to the pool.

mod admission;
mod demand;
mod home;
mod recheck;
mod strategy;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::hash::Hasher;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicUsize};
use std::sync::{Arc, OnceLock};

use crate::gcra::Gcra;
use crate::key::{KeyId, KeySpec, normalize_url};
use crate::keystate::KeyState;
use crate::lease::Lease;
use crate::rng::Random;
use crate::routing::{Fnv, KeyIndex, RouteTable, TooManyGlobs};
use crate::throttle::{Groups, ThrottleGroup};
use crate::time::Time;

use admission::Why;
pub use demand::{Demand, NoKey};
use strategy::FairQueue;
pub use strategy::{FAIR_WINDOW, MAX_LEAD, Strategy};

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
    /// The throttle group of the key's organization, once that is known.
    pub(crate) group: OnceLock<Arc<ThrottleGroup>>,
    /// The pool's groups, which the key joins when it learns its organization.
    pub(crate) groups: Arc<Groups>,
}

impl PoolKey {
    /// The key's throttle group, if its organization is known.
    pub(crate) fn group(&self) -> Option<&Arc<ThrottleGroup>> {
        self.group.get()
    }

    /// The provider named the key's organization: the key joins that organization's group
    /// (a configured organization wins).
    pub(crate) fn learn_organization(&self, organization: &str) {
        if self.group.get().is_some() || organization.is_empty() {
            return;
        }
        let _ = self.state.organization.set(organization.into());
        let group = self
            .groups
            .join(&normalize_url(&self.spec.url), organization, self.index);
        let _ = self.group.set(group);
    }
}

/// The pool.
#[derive(Debug)]
pub struct KeyPool {
    keys: Box<[Arc<PoolKey>]>,
    routes: RouteTable,
    config: PoolConfig,
    global: Arc<Gcra>,
    groups: Arc<Groups>,
    /// Where rotations over the keys start: round robin's, and the fair queue's windows in
    /// each of [`LANES`] lanes (see [`KeyPool::select`]). Each in a cache line of its own, so
    /// that threads in different lanes do not write the same line.
    cursors: [Padded<AtomicUsize>; LANES],
    fair: FairQueue,
    /// Live replicas spending these keys (see [`KeyPool::set_replica_share`]).
    pub(crate) replicas: AtomicU32,
}

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
        let mut seen: HashSet<(&str, Cow<'_, str>)> = HashSet::with_capacity(specs.len());
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
        let earlier: HashMap<(&str, Cow<'_, str>), &PoolKey> = previous
            .map(|p| p.keys.iter().map(|k| (k.spec.identity(), &**k)).collect())
            .unwrap_or_default();
        let vtime = previous.map_or(0, |p| p.fair.vtime_bits());
        let groups = Arc::new(Groups::default());
        let replicas = previous.map_or(NonZeroU32::MIN, KeyPool::replica_share);
        let mut keys = Vec::with_capacity(unique.len());
        let mut tags = Vec::with_capacity(unique.len());
        for (index, spec) in unique.into_iter().enumerate() {
            let before = earlier.get(&spec.identity());
            let state = before
                .map(|k| k.state.clone())
                .unwrap_or_else(|| Arc::new(KeyState::new(&spec, seed_of(&spec))));
            // A key that stays keeps its place in the fair rotation; a new one starts at
            // the virtual time, with no credit.
            let tag = before
                .zip(previous)
                .map_or(vtime, |(k, p)| p.fair.tag_bits(k.index));
            tags.push(tag);
            state.share(replicas);
            state.configure(&spec, config.per_key_rps, config.burst);
            let index = index as KeyIndex;
            let group = OnceLock::new();
            let organization = spec
                .organization
                .as_deref()
                .or_else(|| state.organization.get().map(|o| &**o));
            if let Some(org) = organization {
                let url = normalize_url(&spec.url);
                let previous = previous.map(|p| &*p.groups);
                let _ = group.set(groups.join_or_adopt(&url, org, index, previous));
            }
            keys.push(Arc::new(PoolKey {
                id: spec.id(),
                index,
                spec,
                state,
                group,
                groups: groups.clone(),
            }));
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
            cursors: Default::default(),
            fair: FairQueue::new(tags, vtime, max_weight, max_rpm),
            replicas: AtomicU32::new(replicas.get()),
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
    /// cooling, throttled with their group, short of learned budget (requests or the demand's
    /// tokens, counting what is in flight) or ahead of their pace. Among those,
    /// `round_robin_health_weighted` uses start-time fair queueing (Goyal, Vin & Cheng, 1996) with
    /// each key as a flow of share weight × health × rate: every lease advances its key's tag by
    /// `1 / share`, and the key with the smallest start tag (`max(tag, virtual time)`) among a window
    /// of [`FAIR_WINDOW`] candidates wins (in a larger pool the windows slide over the keys, in
    /// each of a few lanes on its own: callers that name different lanes through [`Random::lane`],
    /// one per thread, look at different keys at a time instead of contending for the same cache
    /// lines). The key furthest behind its share, i.e. with the most headroom relative to its own
    /// rate, goes first; a key held back by its pace keeps its turn instead of losing its share,
    /// but an idle key earns no credit.
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
        let bounded;
        // Only a demand over the cap is copied: the copy is most of the cost of a no-op.
        let demand = if demand.tokens > crate::budget::MAX_TOKENS {
            bounded = demand.bounded();
            &bounded
        } else {
            demand
        };
        let route = self.routes.lookup(demand.model);
        if route.is_empty() {
            return Err(NoKey::NoRoute);
        }
        if let Err(until) = self.global.try_acquire(now) {
            return Err(NoKey::Busy { until });
        }
        let mut why = Why::default();
        for tier in [&route.primary, &route.secondary] {
            if tier.is_empty() {
                continue;
            }
            let found = match self.config.strategy {
                Strategy::LeastLatency => {
                    self.two_choices(tier.keys, tier, demand, now, rng, &mut why)
                }
                Strategy::RoundRobinHealthWeighted => {
                    self.fair(tier.keys, tier, demand, now, rng.lane(), &mut why)
                }
                Strategy::RoundRobin => self.rotate(tier.keys, tier, demand, now, &mut why),
            };
            if let Some(lease) = found {
                return Ok(lease);
            }
        }
        self.global.refund();
        why.promise(&self.keys, demand, now);
        Err(why.verdict())
    }

    pub(crate) fn keys(&self) -> &[Arc<PoolKey>] {
        &self.keys
    }

    pub(crate) fn groups(&self) -> Vec<Arc<ThrottleGroup>> {
        self.groups.all()
    }
}

/// How many rotations the fair queue keeps (callers name theirs with [`Random::lane`]).
pub(crate) const LANES: usize = 4;

/// A value alone in its cache line (64 bytes on x86-64 and most ARM cores).
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

fn seed_of(spec: &KeySpec) -> u64 {
    let mut hasher = Fnv::default();
    hasher.write(spec.id().as_str().as_bytes());
    hasher.finish()
}
