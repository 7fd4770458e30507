//! The event loop: virtual time, one queue of events, kcp-core driven as the server drives it.
//!
//! Three kinds of event: a client request arrives, a waiting request wakes up, an upstream
//! answer comes back. Events are ordered by time, then answers before wake-ups before
//! arrivals (a request woken at the instant it was told gets there before one arriving at
//! that very nanosecond, which only the uniform workload produces), then by the order they
//! were scheduled, so a run is a pure function of the scenario and the seed.
//!
//! For [`Policy::Kcp`] each request goes through `KeyPool::select` as the server's attempt
//! loop (`kcp-server/src/proxy/attempts.rs`) does it: `Ok(lease)` sends the call; the
//! answer's headers are parsed with `RateLimitHeaders::parse` and reported with
//! `Lease::record`; a 429 makes the request try another key at once (the tried ones
//! excluded, each key at most once per round) and notes when that key rests until;
//! `NoKey::Busy { until }` makes it wait until then (or until the first key it saw 429 frees,
//! if earlier), `NoKey::Exhausted` until that first key frees; a wait is taken only if the
//! request waits at most [`MAX_WAITS`] times, [`super::Scenario::max_wait`] in all, and fewer
//! than [`MAX_QUEUE`] requests are waiting, else the proxy answers 429 at once. After a wait
//! the round starts over (no key excluded). A client 429 is never retried into the provider.
//!
//! [`Policy::NaiveRoundRobin`] is the original key-cycle-proxy, implemented here without
//! kcp-core: rotate, send, on 429 send to the next key until every key was tried, no pacing,
//! no learning, no cooldown, no waiting.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::Duration;

use kcp_core::{
    Demand, KeyIndex, KeyPool, KeySpec, Lease, NoKey, Outcome, PoolConfig, RateLimitHeaders,
    Secret, SplitMix64, StateChange, Strategy, Time,
};

use super::Scenario;
use super::provider::{Answer, Provider};
use super::report::{KeyReport, Report};
use super::workload::{Arrival, arrivals};

/// The model every request asks for.
const MODEL: &str = "gpt-4o-mini";
/// The url every key points at.
const URL: &str = "https://api.openai.com/v1";
/// Waits a request may take (the server's `MAX_WAITS`).
pub const MAX_WAITS: u32 = 3;
/// Requests that may wait at once (the server's `rate_limit.max_queue` default).
pub const MAX_QUEUE: usize = 1024;

/// How the simulated proxy spreads requests over the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// kcp-core with its default strategy (`round_robin_health_weighted`).
    Kcp,
    /// kcp-core with `Strategy::RoundRobin` (learning and pacing on, no rate weighting).
    KcpRoundRobin,
    /// The original behaviour, without kcp-core: rotate, on 429 try the next key.
    NaiveRoundRobin,
}

impl Policy {
    /// A short label.
    pub fn label(self) -> &'static str {
        match self {
            Policy::Kcp => "kcp",
            Policy::KcpRoundRobin => "kcp-rr",
            Policy::NaiveRoundRobin => "naive-rr",
        }
    }
}

/// Runs one scenario under one policy.
pub fn run(scenario: &Scenario, policy: Policy, seed: u64) -> Report {
    let requests = arrivals(
        scenario.workload,
        scenario.offered_rps(),
        scenario.duration,
        seed,
    );
    let mut sim = Sim::new(scenario, policy, seed, &requests);
    sim.run();
    sim.report()
}

#[derive(Debug)]
enum Kind {
    Arrive,
    /// A wait that started then ends.
    Wake(Time),
    Answer(usize),
}

#[derive(Debug)]
struct Event {
    at: Time,
    seq: u64,
    request: usize,
    kind: Kind,
}

impl Event {
    fn key(&self) -> Reverse<(Time, u8, u64)> {
        let rank = match self.kind {
            Kind::Answer(_) => 0,
            Kind::Wake(_) => 1,
            Kind::Arrive => 2,
        };
        Reverse((self.at, rank, self.seq))
    }
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Event {}

impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Event {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

#[derive(Debug)]
struct Request {
    arrival: Time,
    tokens: u64,
    tried: Vec<KeyIndex>,
    /// When the first key that answered 429 in this round frees up.
    cooling: Option<Time>,
    waits: u32,
    waited: Duration,
    first_key: usize,
    calls: u32,
}

#[derive(Debug)]
struct Attempt {
    key: usize,
    lease: Option<Lease>,
    answer: Answer,
}

#[derive(Debug, Default)]
struct Tally {
    successes: u64,
    client_429: u64,
    upstream_calls: u64,
    upstream_429: u64,
    org_429: u64,
    requests_upstream: u64,
    served_tokens: u64,
    waits: Vec<Duration>,
    refused_after: Vec<Duration>,
    per_key_success: Vec<u64>,
    per_key_429: Vec<u64>,
    end: Time,
}

struct Sim<'a> {
    scenario: &'a Scenario,
    policy: Policy,
    pool: Option<KeyPool>,
    provider: Provider,
    rng: SplitMix64,
    queue: BinaryHeap<Event>,
    seq: u64,
    requests: Vec<Request>,
    attempts: Vec<Option<Attempt>>,
    cursor: usize,
    waiting: usize,
    tally: Tally,
}

impl<'a> Sim<'a> {
    fn new(scenario: &'a Scenario, policy: Policy, seed: u64, arrivals: &[Arrival]) -> Self {
        let strategy = match policy {
            Policy::KcpRoundRobin => Strategy::RoundRobin,
            _ => Strategy::RoundRobinHealthWeighted,
        };
        let pool = (policy != Policy::NaiveRoundRobin).then(|| build_pool(scenario, strategy));
        let n = scenario.keys.len();
        let mut sim = Sim {
            scenario,
            policy,
            pool,
            provider: Provider::new(
                &scenario.keys,
                scenario.org_throttle.clone(),
                seed ^ 0x5eed_0001,
            ),
            rng: SplitMix64::new(seed ^ 0x5eed_0002),
            queue: BinaryHeap::with_capacity(arrivals.len()),
            seq: 0,
            requests: Vec::with_capacity(arrivals.len()),
            attempts: Vec::with_capacity(arrivals.len() * 2),
            cursor: 0,
            waiting: 0,
            tally: Tally {
                waits: Vec::with_capacity(arrivals.len()),
                per_key_success: vec![0; n],
                per_key_429: vec![0; n],
                ..Tally::default()
            },
        };
        for (i, a) in arrivals.iter().enumerate() {
            sim.requests.push(Request {
                arrival: a.at,
                tokens: a.tokens,
                tried: Vec::new(),
                cooling: None,
                waits: 0,
                waited: Duration::ZERO,
                first_key: 0,
                calls: 0,
            });
            sim.schedule(a.at, i, Kind::Arrive);
        }
        sim
    }

    fn schedule(&mut self, at: Time, request: usize, kind: Kind) {
        self.seq += 1;
        self.queue.push(Event {
            at,
            seq: self.seq,
            request,
            kind,
        });
    }

    fn run(&mut self) {
        while let Some(event) = self.queue.pop() {
            let now = event.at;
            self.tally.end = now;
            match (event.kind, self.policy) {
                (Kind::Arrive, Policy::NaiveRoundRobin) => {
                    let n = self.scenario.keys.len();
                    self.requests[event.request].first_key = self.cursor;
                    self.cursor = (self.cursor + 1) % n;
                    let key = self.requests[event.request].first_key;
                    self.send(event.request, key, None, now);
                }
                (Kind::Arrive, _) => self.dispatch(event.request, now),
                (Kind::Wake(since), _) => {
                    self.waiting -= 1;
                    let r = &mut self.requests[event.request];
                    r.waits += 1;
                    r.waited += now.saturating_since(since);
                    r.tried.clear();
                    r.cooling = None;
                    self.dispatch(event.request, now);
                }
                (Kind::Answer(attempt), _) => self.answered(event.request, attempt, now),
            }
        }
    }

    /// kcp: select a key, or wait, or refuse.
    fn dispatch(&mut self, request: usize, now: Time) {
        let Some(pool) = &self.pool else {
            return;
        };
        let r = &self.requests[request];
        let will_wait = if r.waits < MAX_WAITS && self.waiting < MAX_QUEUE {
            self.scenario.max_wait.saturating_sub(r.waited)
        } else {
            Duration::ZERO
        };
        let demand = Demand {
            model: Some(MODEL),
            tokens: r.tokens,
            exclude: &r.tried,
            will_wait,
        };
        let cooling = r.cooling;
        match pool.select(&demand, now, &mut self.rng) {
            Ok(lease) => {
                let key = lease.index() as usize;
                self.send(request, key, Some(lease), now);
            }
            Err(NoKey::Busy { until }) => {
                self.wait(request, cooling.map_or(until, |c| c.min(until)), now);
            }
            Err(NoKey::Exhausted) if cooling.is_some() => {
                self.wait(request, cooling.unwrap_or(now), now);
            }
            Err(_) => self.refuse(request, now),
        }
    }

    /// Waits until `until` for a key, or refuses when that is too long, the request already
    /// waited its share, or the queue is full.
    fn wait(&mut self, request: usize, until: Time, now: Time) {
        let r = &self.requests[request];
        let wait = until.saturating_since(now);
        let fits = r.waits < MAX_WAITS
            && r.waited + wait <= self.scenario.max_wait
            && self.waiting < MAX_QUEUE;
        if !fits {
            self.refuse(request, now);
            return;
        }
        self.waiting += 1;
        // A deadline at `now` would spin: wake a microsecond later at the earliest.
        let at = until.max(now + Duration::from_micros(1));
        self.schedule(at, request, Kind::Wake(now));
    }

    fn send(&mut self, request: usize, key: usize, lease: Option<Lease>, now: Time) {
        let r = &mut self.requests[request];
        if r.calls == 0 {
            self.tally.requests_upstream += 1;
        }
        r.calls += 1;
        self.tally.upstream_calls += 1;
        let answer = self.provider.call(key, r.tokens, now);
        let at = now + answer.latency;
        self.attempts.push(Some(Attempt { key, lease, answer }));
        let id = self.attempts.len() - 1;
        self.schedule(at, request, Kind::Answer(id));
    }

    fn answered(&mut self, request: usize, attempt: usize, now: Time) {
        let Some(Attempt { key, lease, answer }) = self.attempts[attempt].take() else {
            return;
        };
        let limits = RateLimitHeaders::parse(
            answer.headers.iter().map(|(n, v)| (*n, v.as_bytes())),
            Duration::ZERO,
        );
        let ok = answer.status == 200;
        // When the key (or its group) rests until, after a 429.
        let mut free = now;
        if let Some(lease) = lease {
            let outcome = if ok {
                Outcome::Success {
                    latency: answer.latency,
                    limits,
                }
            } else {
                Outcome::RateLimited { limits }
            };
            for change in lease.record(outcome, now).iter() {
                if let StateChange::Cooling { until } | StateChange::GroupThrottled { until } =
                    change
                {
                    free = free.max(until);
                }
            }
        }
        if ok {
            self.tally.per_key_success[key] += 1;
            let sent = now - answer.latency;
            let waited = sent.saturating_since(self.requests[request].arrival);
            self.tally.successes += 1;
            self.tally.served_tokens += self.requests[request].tokens;
            self.tally.waits.push(waited);
            return;
        }
        self.tally.upstream_429 += 1;
        self.tally.per_key_429[key] += 1;
        if answer.org_throttled {
            self.tally.org_429 += 1;
        }
        let n = self.scenario.keys.len();
        let r = &mut self.requests[request];
        match self.policy {
            Policy::NaiveRoundRobin if (r.calls as usize) < n => {
                let next = (r.first_key + r.calls as usize) % n;
                self.send(request, next, None, now);
            }
            Policy::NaiveRoundRobin => self.refuse(request, now),
            _ => {
                r.tried.push(key as KeyIndex);
                r.cooling = Some(r.cooling.map_or(free, |c| c.min(free)));
                self.dispatch(request, now);
            }
        }
    }

    /// The client gets a 429 from the proxy itself.
    fn refuse(&mut self, request: usize, now: Time) {
        self.tally.client_429 += 1;
        let waited = now.saturating_since(self.requests[request].arrival);
        self.tally.refused_after.push(waited);
    }

    fn report(mut self) -> Report {
        let snapshot = self.pool.as_ref().map(|p| p.snapshot(self.tally.end));
        let keys = self
            .scenario
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| KeyReport {
                rpm: k.rpm,
                successes: self.tally.per_key_success[i],
                rate_limited: self.tally.per_key_429[i],
                learned: snapshot.as_ref().map(|s| s[i].limits),
            })
            .collect();
        let servable: Vec<&Request> = self
            .requests
            .iter()
            .filter(|r| {
                self.scenario
                    .org_throttle
                    .as_ref()
                    .is_none_or(|o| o.servable(r.arrival, self.scenario.max_wait))
            })
            .collect();
        self.tally.waits.sort_unstable();
        self.tally.refused_after.sort_unstable();
        Report {
            scenario: self.scenario.name.clone(),
            policy: self.policy,
            offered: self.requests.len() as u64,
            servable: servable.len() as u64,
            servable_tokens: servable.iter().map(|r| r.tokens).sum(),
            served_tokens: self.tally.served_tokens,
            by_tokens: self.scenario.by_tokens(),
            capacity: self.scenario.capacity(),
            successes: self.tally.successes,
            client_429: self.tally.client_429,
            upstream_calls: self.tally.upstream_calls,
            upstream_429: self.tally.upstream_429,
            org_429: self.tally.org_429,
            requests_upstream: self.tally.requests_upstream,
            wait_p50: percentile(&self.tally.waits, 0.50),
            wait_p99: percentile(&self.tally.waits, 0.99),
            refused_after_p50: percentile(&self.tally.refused_after, 0.50),
            episodes: self
                .scenario
                .org_throttle
                .as_ref()
                .map_or(0, |o| o.episodes_before(self.scenario.duration)),
            keys,
        }
    }
}

fn build_pool(scenario: &Scenario, strategy: Strategy) -> KeyPool {
    let specs = scenario
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let mut spec = KeySpec::new(Secret::new(format!("sk-sim-{i}")), URL)
                .with_name(format!("k{i}-{}rpm", k.rpm));
            spec.organization = k.organization.clone();
            spec
        })
        .collect();
    let config = PoolConfig {
        strategy,
        ..PoolConfig::default()
    };
    KeyPool::new(specs, config).expect("simulated keys are distinct, non-empty and weighted 1")
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
