//! The key-economy simulator: kcp-core against a model of OpenAI's rate limits, in virtual
//! time.
//!
//! A deterministic discrete-event simulation (no sockets, no sleeps, no clock): client
//! requests arrive by a [`Workload`], the proxy spreads them over the keys as the server does
//! with kcp-core ([`Policy::Kcp`]) or as the original key-cycle-proxy did
//! ([`Policy::NaiveRoundRobin`]), and a [`Provider`] with per-key token buckets admits or
//! refuses each call and answers with OpenAI's rate-limit headers. The same scenario and seed
//! always give the same [`Report`].
//!
//! - [`provider`]: the provider model (buckets, headers, organization throttles);
//! - [`workload`]: arrival processes and token sizes;
//! - [`driver`]: the event loop and the policies;
//! - [`report`]: the measurements and the table.
//!
//! `cargo run --release --example simulate` prints the table for [`suite`];
//! `docs/key-economy.md` holds the method and the latest figures.

pub mod driver;
pub mod provider;
pub mod report;
pub mod workload;

use std::time::Duration;

pub use driver::{Policy, run};
pub use provider::{KeyLimits, OrgThrottle, Provider};
pub use report::{Report, key_table, table};
pub use workload::Workload;

/// The tiered pool of the spec: requests per minute of each key.
pub const TIERS: [u32; 6] = [30, 60, 120, 120, 240, 150];
/// Token limits of the token scenarios, per key: at the mean request size they allow 25, 50,
/// 75, 75, 150 and 100 requests per minute, so the tokens bind before the requests on every
/// key.
pub const TIER_TPM: [u32; 6] = [20_000, 40_000, 60_000, 60_000, 120_000, 80_000];
/// Simulated time of a scenario.
pub const DURATION: Duration = Duration::from_secs(600);
/// The proxy's `max_wait`.
pub const MAX_WAIT: Duration = Duration::from_secs(5);
/// The seed the example and the tests use unless told otherwise.
pub const DEFAULT_SEED: u64 = 2026;

/// One simulated situation.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Name in the table.
    pub name: String,
    /// The keys, as the provider enforces them (kcp is told nothing about them).
    pub keys: Vec<KeyLimits>,
    /// Arrival process.
    pub workload: Workload,
    /// Offered load as a fraction of the pool's capacity.
    pub load: f64,
    /// Requests arrive during `[0, duration)`; the run goes on until every one is answered.
    pub duration: Duration,
    /// How long a request may wait for a key.
    pub max_wait: Duration,
    /// Optional organization throttle episodes.
    pub org_throttle: Option<OrgThrottle>,
}

impl Scenario {
    /// The tiered pool under `workload` at `load`.
    pub fn tiered(workload: Workload, load: f64) -> Self {
        Scenario {
            name: format!("tiered {} {:.0}%", workload.label(), load * 100.0),
            keys: TIERS.iter().map(|&rpm| KeyLimits::rpm(rpm)).collect(),
            workload,
            load,
            duration: DURATION,
            max_wait: MAX_WAIT,
            org_throttle: None,
        }
    }

    /// The tiered pool with token limits that bind before the request limits on every key.
    pub fn tokens(load: f64) -> Self {
        let mut s = Scenario::tiered(Workload::Poisson, load);
        s.name = format!("tokens poisson {:.0}%", load * 100.0);
        for (key, tpm) in s.keys.iter_mut().zip(TIER_TPM) {
            key.tpm = Some(tpm);
        }
        s
    }

    /// The tiered pool in one organization that the provider throttles as a whole for 20 s
    /// every 2 minutes (from the first minute on), at 80% Poisson load.
    pub fn org_throttle() -> Self {
        let org = "org-shared";
        let mut s = Scenario::tiered(Workload::Poisson, 0.8);
        s.name = "org throttle poisson 80%".to_owned();
        s.keys = TIERS
            .iter()
            .map(|&rpm| KeyLimits::rpm(rpm).in_organization(org))
            .collect();
        s.org_throttle = Some(OrgThrottle {
            organization: org.to_owned(),
            first: Duration::from_secs(60),
            every: Duration::from_secs(120),
            length: Duration::from_secs(20),
        });
        s
    }

    /// Simulates `minutes` instead of the default duration (for quick tests).
    pub fn for_minutes(mut self, minutes: u64) -> Self {
        self.duration = Duration::from_secs(60 * minutes);
        self
    }

    /// Whether the scenario is measured in tokens: every key has a token limit (and the
    /// token scenarios make it bind before the request limit).
    pub fn by_tokens(&self) -> bool {
        self.keys.iter().all(|k| k.tpm.is_some())
    }

    /// The pool's sustained capacity in requests per second (token limits at the mean
    /// request size).
    pub fn capacity_rps(&self) -> f64 {
        let mean_tokens = workload::mean_tokens();
        self.keys
            .iter()
            .map(|k| {
                let by_tokens = k.tpm.map_or(f64::INFINITY, |t| f64::from(t) / mean_tokens);
                f64::from(k.rpm).min(by_tokens) / 60.0
            })
            .sum()
    }

    /// The mean arrival rate.
    pub fn offered_rps(&self) -> f64 {
        self.capacity_rps() * self.load
    }

    /// What the provider could admit for the requests that arrive in `[0, duration)`, in
    /// requests (or tokens, [`Scenario::by_tokens`]): every bucket full at the start, plus
    /// its refill until the last of them may still be sent (`duration + max_wait`), except
    /// while the organization throttle refuses everything.
    pub fn capacity(&self) -> f64 {
        let window = self.duration + self.max_wait;
        let throttled = self
            .org_throttle
            .as_ref()
            .map_or(Duration::ZERO, |o| o.throttled_within(window));
        let open = window.saturating_sub(throttled).as_secs_f64();
        self.keys
            .iter()
            .map(|k| match (self.by_tokens(), k.tpm, k.token_capacity()) {
                (true, Some(tpm), Some(burst)) => burst + f64::from(tpm) / 60.0 * open,
                _ => k.request_capacity() + f64::from(k.rpm) / 60.0 * open,
            })
            .sum()
    }
}

/// Every scenario of the table: the tiered pool under each workload at 50, 80, 100 and 150%
/// load, the token-bound pool at 80 and 150%, and the organization throttle.
pub fn suite() -> Vec<Scenario> {
    let mut out = Vec::new();
    for workload in [Workload::Uniform, Workload::Poisson, Workload::BURSTY] {
        for load in [0.5, 0.8, 1.0, 1.5] {
            out.push(Scenario::tiered(workload, load));
        }
    }
    out.push(Scenario::tokens(0.8));
    out.push(Scenario::tokens(1.5));
    out.push(Scenario::org_throttle());
    out
}

/// Runs every scenario of `scenarios` under every policy of `policies`.
pub fn run_all(scenarios: &[Scenario], policies: &[Policy], seed: u64) -> Vec<Report> {
    scenarios
        .iter()
        .flat_map(|s| policies.iter().map(move |&p| run(s, p, seed)))
        .collect()
}
