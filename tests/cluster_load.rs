//! End-to-end: three replicas share one real Redis and one mock upstream that meters each
//! key like OpenAI (a bucket of one second's worth refilling at 600 a minute). Clients send
//! bursts through all three replicas at once, a combined 80% of the pool's capacity on
//! average. With `[cluster]` each replica paces every key at a third of its rate and claims
//! a third of what the provider reports left, so the replicas together stay within each
//! key; without it each replica spends a key's whole bucket and they overrun it threefold.
//!
//! The figures are printed (`--nocapture`) and quoted in docs/cluster.md and
//! docs/key-economy.md. Needs `redis-server` (FAILS without it). About 7 s per run.

mod support;

use std::num::NonZeroU32;
use std::time::Duration;

use http::StatusCode;
use key_cycle_proxy::core::Secret;
use support::cluster::{Redis, connected, join, replicas, until};
use support::mock_upstream::RateLimit;
use support::proxy_harness::{Proxy, WAIT, start_proxy};
use support::{KEY_A, KEY_B, KEY_C, MockUpstream};

const KEYS: [&str; 3] = [KEY_A, KEY_B, KEY_C];
/// Each key's limit at the mock: 10 a second, a bucket of one second's worth.
const RPM: u32 = 600;
/// A burst reaches every replica at once, every `PERIOD`.
const PERIOD: Duration = Duration::from_secs(2);
const BURSTS: u32 = 3;
/// Requests per replica per burst: 3 × 16 every 2 s is 24 a second, 80% of the pool's 30.
const PER_REPLICA: usize = 16;

/// What one run measured after the warm-up.
#[derive(Debug)]
struct Figures {
    requests: usize,
    succeeded: usize,
    upstream: u64,
    wasted: u64,
}

impl Figures {
    fn wasted_pct(&self) -> f64 {
        100.0 * self.wasted as f64 / self.upstream.max(1) as f64
    }
}

async fn start_replica(mock: &MockUpstream, redis: Option<&Redis>, name: &str) -> Proxy {
    start_proxy(
        KEYS.iter()
            .map(|k| (*k, mock.url(), vec!["others"]))
            .collect(),
        |config| {
            // A burst waits for its keys rather than being shed.
            config.rate_limit.max_wait_ms = 8_000;
            config.rate_limit.queue_interval_ms = 8_000;
            if let Some(redis) = redis {
                join(config, redis, name);
            }
        },
    )
    .await
}

/// Whether `proxy` has learned every key's request limit.
fn learned_all(proxy: &Proxy) -> bool {
    let snapshot = proxy
        .app
        .pool()
        .snapshot(key_cycle_proxy::server::clock::now());
    KEYS.iter().all(|key| {
        let fingerprint = Secret::new(*key).fingerprint();
        snapshot
            .iter()
            .any(|k| k.fingerprint == fingerprint && k.limits.limit_requests == Some(RPM.into()))
    })
}

fn upstream_calls(mock: &MockUpstream) -> u64 {
    KEYS.iter().map(|k| mock.seen(k)).sum()
}

async fn run(cluster: bool) -> Figures {
    let redis = if cluster {
        Some(Redis::start().await)
    } else {
        None
    };
    let mock = MockUpstream::start().await;
    mock.keep_calls(false);
    mock.set_latency(Duration::from_millis(20));
    let limit = RateLimit::per_minute(NonZeroU32::new(RPM).expect("not 0"))
        .with_burst(Duration::from_secs(1));
    for key in KEYS {
        mock.limit(key, limit);
    }
    let mut proxies = Vec::new();
    for name in ["r1", "r2", "r3"] {
        proxies.push(start_replica(&mock, redis.as_ref(), name).await);
    }
    if cluster {
        until("three replicas count each other", || {
            proxies.iter().all(|p| connected(p) && replicas(p) == 3)
        })
        .await;
    }
    // Warm-up: each replica learns every key's limit from the answers' headers (one at a
    // time, well within the buckets), then the buckets refill.
    for proxy in &proxies {
        let warm = async {
            while !learned_all(proxy) {
                assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
            }
        };
        tokio::time::timeout(WAIT, warm)
            .await
            .expect("limits learned");
    }
    if cluster {
        // Each replica paces every key at a third of its 10 a second.
        for proxy in &proxies {
            let now = key_cycle_proxy::server::clock::now();
            for key in proxy.app.pool().snapshot(now) {
                let pace = key.limits.pace_rps.expect("learned");
                assert!((pace - 10.0 / 3.0).abs() < 1e-6, "{pace}");
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (calls_before, wasted_before) = (upstream_calls(&mock), mock.rate_limited());

    let mut replies = Vec::new();
    let mut tick = tokio::time::interval(PERIOD);
    for _ in 0..BURSTS {
        tick.tick().await;
        for proxy in &proxies {
            for _ in 0..PER_REPLICA {
                replies.push(proxy.spawn_chat("gpt-4o"));
            }
        }
    }
    let mut succeeded = 0;
    let requests = replies.len();
    for reply in replies {
        let reply = tokio::time::timeout(WAIT, reply)
            .await
            .expect("every request answered in time")
            .expect("request task");
        if reply.status == StatusCode::OK {
            succeeded += 1;
        }
    }
    Figures {
        requests,
        succeeded,
        upstream: upstream_calls(&mock) - calls_before,
        wasted: mock.rate_limited() - wasted_before,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_at_80_percent_waste_at_most_1_percent_with_cluster_and_more_without() {
    let shared = run(true).await;
    let alone = run(false).await;
    println!(
        "three replicas, 80% in bursts: with [cluster] {shared:?} wasted {:.2}%; \
         without {alone:?} wasted {:.2}%",
        shared.wasted_pct(),
        alone.wasted_pct()
    );
    assert_eq!(shared.requests, 3 * PER_REPLICA * BURSTS as usize);
    assert_eq!(shared.succeeded, shared.requests, "no request failed");
    assert!(
        shared.wasted_pct() <= 1.0,
        "with [cluster] at most 1% of upstream calls are 429s: {shared:?}"
    );
    assert!(
        alone.wasted > shared.wasted,
        "without [cluster] the replicas overrun the keys: {alone:?} vs {shared:?}"
    );
}
