//! End-to-end: Redis killed under load. Two replicas share one real Redis and one mock
//! upstream while clients keep sending through both; Redis dies and comes back on the same
//! port. No client request fails, `kcp_cluster_connected` reads 0 and then 1 again, the
//! replica count stays at its last value while Redis is gone, and a rest learned by one
//! replica during the outage reaches the other once both are back (the returning replica
//! asks the others for their state: pub/sub alone does not replay).
//!
//! Needs `redis-server` (FAILS without it).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use key_cycle_proxy::core::KeyStatus;
use support::cluster::{Redis, connected, join, replicas, until};
use support::observe::scrape;
use support::proxy_harness::{Proxy, WAIT, start_proxy};
use support::{Behaviour, KEY_A, KEY_B, KEY_C, MockUpstream};

/// Keys A and B serve the load's model; key C alone serves `gpt-4o-mini`, which the load
/// never asks for, so only the shared change can teach replica b that C rests.
async fn replica(mock: &MockUpstream, redis: &Redis, name: &str) -> Proxy {
    start_proxy(
        vec![
            (KEY_A, mock.url(), vec!["gpt-4o"]),
            (KEY_B, mock.url(), vec!["gpt-4o"]),
            (KEY_C, mock.url(), vec!["gpt-4o-mini"]),
        ],
        |config| join(config, redis, name),
    )
    .await
}

/// Clients sending through both replicas in turn until told to stop (at most 2000).
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<StatusCode>>,
}

impl Load {
    fn start(a: &Proxy, b: &Proxy) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let requests = [a.chat_request("gpt-4o"), b.chat_request("gpt-4o")];
        let (urls, client) = (
            requests.map(|r| r.uri().clone()),
            support::proxy_harness::client(),
        );
        let (stop_, sent_) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let mut statuses = Vec::new();
            for n in 0..2000 {
                if stop_.load(Ordering::Acquire) {
                    break;
                }
                let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
                let request = http::Request::post(urls[n % 2].clone())
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                        body.as_bytes(),
                    )))
                    .expect("valid request");
                let reply = support::proxy_harness::send_with(&client, request).await;
                statuses.push(reply.status());
                sent_.fetch_add(1, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            statuses
        });
        Load { stop, sent, task }
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::Acquire)
    }

    /// Waits until `more` further requests were answered.
    async fn go_on(&self, more: usize) {
        let target = self.sent() + more;
        until("the load goes on", || self.sent() >= target).await;
    }

    async fn finish(self) -> Vec<StatusCode> {
        self.stop.store(true, Ordering::Release);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("load ends")
            .expect("load task")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_fails_no_request_and_state_converges_after_its_restart() {
    let mut redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    mock.keep_calls(false);
    let a = replica(&mock, &redis, "a").await;
    let b = replica(&mock, &redis, "b").await;
    until("both replicas count two", || {
        connected(&a) && connected(&b) && replicas(&a) == 2 && replicas(&b) == 2
    })
    .await;
    let load = Load::start(&a, &b);
    load.go_on(20).await;

    redis.kill();
    until("both replicas see redis gone", || {
        !connected(&a) && !connected(&b)
    })
    .await;
    for proxy in [&a, &b] {
        let metrics = scrape(proxy).await;
        assert!(metrics.contains("kcp_cluster_connected 0"), "{metrics}");
        assert!(
            metrics.contains("kcp_cluster_replicas 2"),
            "the last count stays"
        );
        assert_eq!(
            proxy.get("/health").await.json()["cluster"]["redis_connected"],
            false
        );
    }
    // During the outage key C answers a 429 through a: a rests it, b cannot know yet.
    mock.set(KEY_C, Behaviour::rate_limited_secs(60));
    let mini = a.chat("gpt-4o-mini").await;
    assert_eq!(
        mini.status,
        StatusCode::TOO_MANY_REQUESTS,
        "C is all gpt-4o-mini has"
    );
    assert_eq!(mock.seen(KEY_C), 1);
    assert_eq!(a.key_status(KEY_C).0, KeyStatus::Cooling);
    assert_eq!(b.key_status(KEY_C).0, KeyStatus::Available);
    load.go_on(20).await;

    redis.restart().await;
    until("both replicas reach redis again", || {
        connected(&a) && connected(&b)
    })
    .await;
    until("b learns that C rests", || {
        b.key_status(KEY_C).0 == KeyStatus::Cooling
    })
    .await;
    load.go_on(20).await;
    let statuses = load.finish().await;
    assert!(statuses.len() >= 60, "{} requests", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "no client request failed: {statuses:?}"
    );
    for proxy in [&a, &b] {
        assert!(scrape(proxy).await.contains("kcp_cluster_connected 1"));
    }
    // b never called C itself.
    assert_eq!(mock.seen(KEY_C), 1);
}
