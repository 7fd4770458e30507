//! The event loop: virtual time, one queue of events, kcp-core driven as the server drives it.
//!
//! Three kinds of event: a client request arrives, a waiting request wakes up, an upstream
//! answer comes back. Events are ordered by time, then answers before wake-ups before
//! arrivals (a request woken at the instant it was told gets there before one arriving at
//! that very nanosecond, which only the uniform workload produces), then by the order they
//! were scheduled, so a run is a pure function of the scenario and the seed.
//!
//! For [`Policy::Kcp`] each request is a kcp-core `Attempt`, driven exactly as the server
//! drives it: `Next::Send(lease)` sends the call to the simulated provider, whose answer (its
//! status and headers, parsed with `RateLimitHeaders::parse`) goes back through
//! `Attempt::on_answer`; `Next::Sleep` and `Next::Wait` schedule a wake-up, and
//! `Next::GiveUp` is the proxy's own 429. The retry, wait and queue rules and their constants
//! are kcp-core's (`RetryPolicy`), with [`super::Scenario::max_wait`] as `max_wait`.
//!
//! [`Policy::NaiveRoundRobin`] is the original key-cycle-proxy, implemented here without
//! kcp-core: rotate, send, on 429 send to the next key until every key was tried, no pacing,
//! no learning, no cooldown, no waiting.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::Duration;

use std::sync::Arc;

use kcp_core::{
    Action, Answer, Attempt, ClientRequest, KeyPool, KeySpec, Lease, Next, PoolConfig,
    RateLimitHeaders, Replay, Reply, RetryPolicy, Secret, SplitMix64, Strategy, Time, WaitQueue,
};

use super::Scenario;
use super::provider::{Provider, Response};
use super::report::{KeyReport, Report};
use super::workload::{Arrival, arrivals};

/// The model every request asks for.
const MODEL: &str = "gpt-4o-mini";
/// The url every key points at.
const URL: &str = "https://api.openai.com/v1";

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
    /// A wait (or a retry's backoff) ends.
    Wake,
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
            Kind::Wake => 1,
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
    /// kcp's policy for this request (`None` for the naive proxy, or once it is over).
    attempt: Option<Attempt<'static>>,
    /// The wait-queue place held while the request waits.
    slot: Option<kcp_core::QueueSlot>,
    first_key: usize,
    calls: u32,
}

/// A call on its way to the provider and back.
#[derive(Debug)]
struct Call {
    key: usize,
    lease: Option<Lease>,
    answer: Response,
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
    calls: Vec<Option<Call>>,
    cursor: usize,
    waiting: Arc<WaitQueue>,
    retry: RetryPolicy,
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
            calls: Vec::with_capacity(arrivals.len() * 2),
            cursor: 0,
            waiting: WaitQueue::new(RetryPolicy::default().max_queue),
            retry: RetryPolicy {
                max_wait: scenario.max_wait,
                ..RetryPolicy::default()
            },
            tally: Tally {
                waits: Vec::with_capacity(arrivals.len()),
                per_key_success: vec![0; n],
                per_key_429: vec![0; n],
                ..Tally::default()
            },
        };
        for (i, a) in arrivals.iter().enumerate() {
            let attempt = (policy != Policy::NaiveRoundRobin).then(|| {
                Attempt::new(
                    ClientRequest {
                        model: Some(MODEL),
                        scope: Some(MODEL),
                        tokens: a.tokens,
                        replay: Replay::BeforeSend,
                        home: false,
                    },
                    sim.retry,
                )
            });
            sim.requests.push(Request {
                arrival: a.at,
                tokens: a.tokens,
                attempt,
                slot: None,
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
                (Kind::Wake, _) => {
                    self.requests[event.request].slot = None;
                    self.dispatch(event.request, now);
                }
                (Kind::Answer(call), _) => self.answered(event.request, call, now),
            }
        }
    }

    /// kcp: ask the request's attempt what to do, and do it.
    fn dispatch(&mut self, request: usize, now: Time) {
        let Some(pool) = &self.pool else {
            return;
        };
        let Some(attempt) = self.requests[request].attempt.as_mut() else {
            return;
        };
        match attempt.next(pool, &self.waiting, now, &mut self.rng) {
            Next::Send(lease) => {
                let key = lease.index() as usize;
                self.send(request, key, Some(lease), now);
            }
            Next::Sleep(delay) => self.schedule(now + delay, request, Kind::Wake),
            Next::Wait(wait) => {
                self.requests[request].slot = Some(wait.slot);
                // A deadline at `now` would spin: wake a microsecond later at the earliest.
                let at = wait.until.max(now + Duration::from_micros(1));
                self.schedule(at, request, Kind::Wake);
            }
            Next::GiveUp(_) => {
                self.requests[request].attempt = None;
                self.refuse(request, now);
            }
        }
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
        self.calls.push(Some(Call { key, lease, answer }));
        let id = self.calls.len() - 1;
        self.schedule(at, request, Kind::Answer(id));
    }

    fn answered(&mut self, request: usize, call: usize, now: Time) {
        let Some(Call { key, lease, answer }) = self.calls[call].take() else {
            return;
        };
        let limits = RateLimitHeaders::parse(
            answer.headers.iter().map(|(n, v)| (*n, v.as_bytes())),
            Duration::ZERO,
        );
        let ok = answer.status == 200;
        if let (Some(lease), Some(attempt)) = (lease, self.requests[request].attempt.as_mut()) {
            let reply = Answer::Reply(Reply {
                status: answer.status,
                limits,
                latency: answer.latency,
                ..Reply::default()
            });
            let verdict = attempt.on_answer(lease, &reply, now);
            debug_assert_eq!(verdict.action == Action::Deliver, ok);
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
            _ => self.dispatch(request, now),
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
