//! Client workloads: when requests arrive and what each one costs in tokens.
//!
//! Arrivals are generated up front from their own seeded stream, so every policy run on a
//! scenario sees exactly the same requests. Poisson inter-arrival times are exponential,
//! drawn by inversion: `-ln(U) / λ`.

use std::time::Duration;

use kcp_core::{Random, SplitMix64, Time};

/// The shape of the arrival process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Workload {
    /// Evenly spaced requests.
    Uniform,
    /// A Poisson process (exponential gaps).
    Poisson,
    /// On/off: Poisson at a higher rate while on, nothing while off, with the same mean.
    Bursty {
        /// Length of an on period.
        on: Duration,
        /// Length of an off period.
        off: Duration,
    },
}

impl Workload {
    /// The default bursty shape: 10 s on, 10 s off (twice the mean rate while on).
    pub const BURSTY: Workload = Workload::Bursty {
        on: Duration::from_secs(10),
        off: Duration::from_secs(10),
    };

    /// A short label.
    pub fn label(&self) -> &'static str {
        match self {
            Workload::Uniform => "uniform",
            Workload::Poisson => "poisson",
            Workload::Bursty { .. } => "bursty",
        }
    }
}

/// One client request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    /// When it arrives.
    pub at: Time,
    /// Its estimated tokens (prompt bytes / 4 + max_tokens), as the server computes them.
    pub tokens: u64,
}

/// Prompt size range in bytes (uniform).
pub const PROMPT_BYTES: (u64, u64) = (200, 4000);
/// `max_tokens` range (uniform).
pub const MAX_TOKENS: (u64, u64) = (50, 500);
/// The server's default completion budget when a request names none.
pub const DEFAULT_COMPLETION: u32 = 256;

/// The mean token estimate of a request.
pub fn mean_tokens() -> f64 {
    let mid = |(lo, hi): (u64, u64)| (lo + hi) as f64 / 2.0;
    mid(PROMPT_BYTES) / 4.0 + mid(MAX_TOKENS)
}

/// Arrivals at `rate_per_sec` on average over `[0, horizon)`.
pub fn arrivals(
    workload: Workload,
    rate_per_sec: f64,
    horizon: Duration,
    seed: u64,
) -> Vec<Arrival> {
    let mut rng = SplitMix64::new(seed);
    let end = horizon.as_secs_f64();
    let mut out = Vec::with_capacity((rate_per_sec * end * 1.1) as usize + 16);
    let mut t = 0.0;
    loop {
        t = match workload {
            Workload::Uniform => t + 1.0 / rate_per_sec,
            Workload::Poisson => t + exponential(&mut rng, rate_per_sec),
            Workload::Bursty { on, off } => {
                let (on, off) = (on.as_secs_f64(), off.as_secs_f64());
                let busy_rate = rate_per_sec * (on + off) / on;
                let mut next = t + exponential(&mut rng, busy_rate);
                // Time in an off period is skipped: the process only runs while on.
                let period = on + off;
                let phase = next % period;
                if phase >= on {
                    next += period - phase;
                }
                next
            }
        };
        if t >= end {
            return out;
        }
        let bytes = uniform(&mut rng, PROMPT_BYTES) as usize;
        let max_tokens = uniform(&mut rng, MAX_TOKENS);
        out.push(Arrival {
            at: Time::from_nanos((t * 1e9) as u64),
            tokens: kcp_core::estimate_tokens(bytes, Some(max_tokens), DEFAULT_COMPLETION),
        });
    }
}

fn exponential(rng: &mut SplitMix64, rate: f64) -> f64 {
    // 1 - U is in (0, 1]: the logarithm is finite.
    -(1.0 - rng.unit()).ln() / rate
}

fn uniform(rng: &mut SplitMix64, (lo, hi): (u64, u64)) -> u64 {
    lo + rng.below(hi - lo + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_rates_hold_for_every_shape() {
        let horizon = Duration::from_secs(600);
        for workload in [Workload::Uniform, Workload::Poisson, Workload::BURSTY] {
            let a = arrivals(workload, 10.0, horizon, 42);
            let rate = a.len() as f64 / 600.0;
            assert!((rate - 10.0).abs() < 0.3, "{workload:?}: {rate}");
            assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
        }
    }

    #[test]
    fn bursty_is_silent_while_off() {
        let a = arrivals(Workload::BURSTY, 5.0, Duration::from_secs(100), 1);
        assert!(
            a.iter()
                .all(|r| (r.at.as_nanos() / 1_000_000_000) % 20 < 10)
        );
    }
}
