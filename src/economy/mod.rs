//! The key economy measured through the real server: open-loop load over loopback against the
//! mock provider's per-key buckets.
//!
//! The simulator ([`crate::simulate`]) proves the policy in virtual time; this module measures
//! what a client of a running `kcp-server` actually gets, with real sockets, real timers and
//! the real service in between. A [`Pool`] is the in-process mock upstream playing OpenAI's
//! continuously refilling per-key buckets (30, 60, 120, 120, 240 and 150 rpm, 5 s of burst)
//! with a fixed answer latency; the proxy under test is told nothing about the limits. The
//! [`Plan`]'s scenarios run one after the other against the same proxy:
//!
//! - 80% of the pool's capacity, Poisson arrivals, for 30 s;
//! - 150% for 20 s;
//! - after 10 s idle, a burst the size of the pool's buckets at once.
//!
//! Arrivals are open-loop ([`load`]): every request is its own task, sent on schedule whatever
//! the answers before it. [`figures`] turns the samples and the mock's counts into the measures
//! and the one table with the targets.
//!
//! `cargo bench --bench economy` runs the real binary; `tests/economy_smoke.rs` runs the
//! `--smoke` plan in-process. `docs/key-economy.md` holds the method and the figures.

pub mod figures;
pub mod load;
pub mod pool;

use std::net::SocketAddr;
use std::time::Duration;

pub use figures::{Figures, table};
pub use load::{Sample, drive};
pub use pool::{Pool, PoolKey};

/// Requests per minute of each key of the pool.
pub const POOL_RPM: [u32; 6] = [30, 60, 120, 120, 240, 150];
/// How much of its rate each key's bucket holds, as OpenAI's few seconds' worth.
pub const BUCKET: Duration = Duration::from_secs(5);
/// The mock's fixed answer time: a short chat completion.
pub const MOCK_LATENCY: Duration = Duration::from_millis(300);
/// Seed of the arrival times unless told otherwise.
pub const DEFAULT_SEED: u64 = 2026;
/// Longest a single request may take before it counts as unanswered.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How requests arrive in one scenario.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Shape {
    /// Poisson arrivals at `load` times the pool's sustained capacity for `duration`.
    Poisson { load: f64, duration: Duration },
    /// As many requests as the pool's full buckets hold, all at once.
    Burst,
}

/// One measured situation.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Name in the table: `80%`, `150%` or `burst`.
    pub name: &'static str,
    pub shape: Shape,
    /// Quiet time before the first request. At least [`BUCKET`] refills every bucket, which the
    /// goodput's allowance assumes.
    pub idle_before: Duration,
}

/// The scenarios of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub scenarios: Vec<Scenario>,
    pub seed: u64,
}

impl Plan {
    /// The measurement: 80% for 30 s, 150% for 20 s, then 10 s idle and a burst.
    pub fn full() -> Plan {
        Plan::with(
            Duration::from_secs(30),
            Duration::from_secs(20),
            Duration::from_secs(10),
        )
    }

    /// The same code path in seconds: 2 s per load, a short idle. Its figures mean nothing.
    pub fn smoke() -> Plan {
        Plan::with(
            Duration::from_secs(2),
            Duration::from_secs(2),
            Duration::from_secs(1),
        )
    }

    fn with(steady: Duration, overload: Duration, idle: Duration) -> Plan {
        let settle = BUCKET + Duration::from_secs(1);
        Plan {
            scenarios: vec![
                Scenario {
                    name: "80%",
                    shape: Shape::Poisson {
                        load: 0.8,
                        duration: steady,
                    },
                    idle_before: Duration::ZERO,
                },
                Scenario {
                    name: "150%",
                    shape: Shape::Poisson {
                        load: 1.5,
                        duration: overload,
                    },
                    idle_before: settle.min(idle),
                },
                Scenario {
                    name: "burst",
                    shape: Shape::Burst,
                    idle_before: idle,
                },
            ],
            seed: DEFAULT_SEED,
        }
    }

    /// Only the scenario called `name`, if there is one.
    pub fn only(mut self, name: &str) -> Option<Plan> {
        self.scenarios.retain(|scenario| scenario.name == name);
        (!self.scenarios.is_empty()).then_some(self)
    }
}

/// Runs every scenario of `plan` against the proxy at `proxy` in front of `pool`, in order.
pub async fn run(proxy: SocketAddr, pool: &Pool, plan: &Plan) -> Vec<Figures> {
    let mut all = Vec::with_capacity(plan.scenarios.len());
    for (index, scenario) in plan.scenarios.iter().enumerate() {
        tokio::time::sleep(scenario.idle_before).await;
        let seed = plan.seed.wrapping_add(index as u64);
        let before = pool.counts();
        let samples = drive(proxy, pool, scenario, seed).await;
        let upstream = pool.counts_since(&before, scenario.name);
        all.push(Figures::new(scenario, pool, &samples, &upstream));
    }
    all
}
