//! End-to-end: how long a key state change takes from one replica to the other on
//! loopback. Replica a meets a stream of short 429s (50 ms rests) on key A; replica b applies each rest
//! and records publish → applied on `kcp_cluster_apply_delay_seconds`. The test pins that
//! every change arrived and was timed; the p99 is printed (`--nocapture`) and quoted in
//! docs/cluster.md, never asserted (timings on a shared 2-core machine are noise).
//!
//! Needs `redis-server` (FAILS without it).

mod support;

use std::time::Duration;

use http::StatusCode;
use support::cluster::{Redis, connected, join, until};
use support::observe::{scrape, value};
use support::proxy_harness::{Proxy, start_proxy};
use support::{Behaviour, KEY_A, KEY_B, MockUpstream};

const REQUESTS: usize = 100;

async fn replica(mock: &MockUpstream, redis: &Redis, name: &str) -> Proxy {
    start_proxy(
        vec![
            (KEY_A, mock.url(), vec!["others"]),
            (KEY_B, mock.url(), vec!["others"]),
        ],
        |config| join(config, redis, name),
    )
    .await
}

/// The smallest bucket bound holding `quantile` of the histogram's samples, and the count.
fn quantile_bound(metrics: &str, name: &str, quantile: f64) -> (f64, f64) {
    let count = value(metrics, &format!("{name}_count")).unwrap_or(0.0);
    let bound = metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&format!("{name}_bucket{{le=\""))?;
            let (le, n) = rest.split_once("\"} ")?;
            Some((
                le.parse::<f64>().unwrap_or(f64::INFINITY),
                n.parse::<f64>().ok()?,
            ))
        })
        .find(|&(_, n)| n >= quantile * count)
        .map_or(f64::INFINITY, |(le, _)| le);
    (bound, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shared_rest_is_applied_on_the_other_replica_and_timed() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    mock.keep_calls(false);
    let a = replica(&mock, &redis, "a").await;
    let b = replica(&mock, &redis, "b").await;
    until("both replicas reach redis", || {
        connected(&a) && connected(&b)
    })
    .await;
    mock.set(
        KEY_A,
        Behaviour::RateLimited {
            retry_after: None,
            retry_after_ms: Some("50".into()),
            reset_requests: None,
        },
    );
    let before = value(&scrape(&b).await, "kcp_cluster_apply_delay_seconds_count").unwrap_or(0.0);
    for _ in 0..REQUESTS {
        assert_eq!(a.chat("gpt-4o").await.status, StatusCode::OK);
        // Past the 50 ms rest: key A is a candidate again.
        tokio::time::sleep(Duration::from_millis(55)).await;
    }
    let rests = mock.seen(KEY_A) as f64;
    assert!(rests >= 20.0, "key A rested {rests} times");
    let name = "kcp_cluster_apply_delay_seconds";
    let timed = || async { quantile_bound(&scrape(&b).await, name, 0.99).1 - before };
    let all = async {
        while timed().await < rests {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(support::proxy_harness::WAIT, all)
        .await
        .expect("b applied and timed every rest a shared");
    let metrics = scrape(&b).await;
    let (p50, _) = quantile_bound(&metrics, name, 0.5);
    let (p99, count) = quantile_bound(&metrics, name, 0.99);
    println!(
        "propagation a → b over loopback redis: {count} changes, p50 ≤ {} ms, p99 ≤ {} ms",
        p50 * 1000.0,
        p99 * 1000.0
    );
}
