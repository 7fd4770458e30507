//! Embedding kcp-core in another service: build a pool, select keys, report outcomes, and
//! watch a rate-limited key cool down and come back. No network, no async runtime: the
//! service brings its own HTTP client and clock.
//!
//! Run with `cargo run --example embed_core`.

use std::time::Duration;

use kcp_core::{
    Demand, KeyPool, KeySpec, NoKey, Outcome, PoolConfig, RateLimitHeaders, Secret, SplitMix64,
    Strategy, Time,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let keys = vec![
        KeySpec::new(
            Secret::new("sk-example-team-a"),
            "https://api.openai.com/v1",
        )
        .with_name("team-a")
        .with_models(["gpt-4o*"]),
        KeySpec::new(
            Secret::new("sk-example-team-b"),
            "https://api.openai.com/v1",
        )
        .with_name("team-b")
        .with_models(["gpt-4o*", "others"]),
    ];
    let pool = KeyPool::new(
        keys,
        PoolConfig {
            strategy: Strategy::RoundRobinHealthWeighted,
            ..PoolConfig::default()
        },
    )?;
    // The embedding service owns the clock; here a virtual one.
    let mut now = Time::from_secs(1);
    let mut rng = SplitMix64::new(2026);
    let demand = Demand {
        model: Some("gpt-4o-mini"),
        ..Demand::default()
    };

    for _ in 0..4 {
        let lease = pool
            .select(&demand, now, &mut rng)
            .map_err(|e| format!("{e:?}"))?;
        println!("{:>5.1}s  sending to {}", secs(now), lease.id());
        // ... send the request with lease.spec().secret.expose() here ...
        lease.record(
            Outcome::Success {
                latency: Duration::from_millis(180),
                limits: RateLimitHeaders::default(),
            },
            now,
        );
        now = now + Duration::from_millis(500);
    }

    // The provider answers 429 with `retry-after-ms: 3000` for the next key.
    let lease = pool
        .select(&demand, now, &mut rng)
        .map_err(|e| format!("{e:?}"))?;
    let limited = lease.id().clone();
    let limits = RateLimitHeaders::parse([("retry-after-ms", b"3000".as_slice())], Duration::ZERO);
    for change in lease.record(Outcome::RateLimited { limits }, now).iter() {
        println!("{:>5.1}s  {limited}: {change:?}", secs(now));
    }

    // While it rests, every request goes to the other key.
    for _ in 0..4 {
        now = now + Duration::from_millis(500);
        match pool.select(&demand, now, &mut rng) {
            Ok(lease) => {
                println!(
                    "{:>5.1}s  sending to {} ({limited} is resting)",
                    secs(now),
                    lease.id()
                );
                drop(lease); // dropping a lease reports the attempt as cancelled
            }
            Err(NoKey::Busy { until }) => {
                println!("{:>5.1}s  all busy until {:.1}s", secs(now), secs(until))
            }
            Err(other) => println!("{:>5.1}s  no key: {other:?}", secs(now)),
        }
    }

    now = now + Duration::from_secs(2);
    for snapshot in pool.snapshot(now) {
        println!(
            "{:>5.1}s  {} is {} (rate limited {} time(s), {} successes)",
            secs(now),
            snapshot.name,
            snapshot.status.as_str(),
            snapshot.outcomes.rate_limited,
            snapshot.outcomes.success
        );
    }
    Ok(())
}

fn secs(t: Time) -> f64 {
    t.as_nanos() as f64 / 1e9
}
