//! End-to-end: `[rate_limit] per_key_rps`, `global_rps` and `burst` through the server, in
//! paused time (see `support::time`): a burst goes at once, the next request waits for
//! exactly its cell, and a request that would wait longer than `max_wait_ms` is refused at once.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::proxy_harness::{Proxy, Reply, start_proxy};
use support::time::{advance, eventually, finish, freeze, still_running};
use support::{Behaviour, KEY_A, KEY_B, MockUpstream, two_keys};
use tokio::task::JoinHandle;

const STEP: Duration = Duration::from_millis(1);
const LIMIT: Duration = Duration::from_secs(5);

/// Sends `n` chats at once; each must be answered without time moving.
async fn served_at_once(proxy: &Proxy, n: usize) {
    let pending: Vec<JoinHandle<Reply>> = (0..n).map(|_| proxy.spawn_chat("gpt-4o")).collect();
    assert!(
        eventually(|| pending.iter().all(JoinHandle::is_finished)).await,
        "{n} requests served at once"
    );
    for reply in pending {
        assert_eq!(reply.await.expect("no panic").status, StatusCode::OK);
    }
}

/// A chat that must wait exactly `wait` of paused time.
async fn served_after(proxy: &Proxy, wait: Duration) -> Reply {
    let pending = proxy.spawn_chat("gpt-4o");
    advance(wait - STEP).await;
    assert!(still_running(&pending).await, "served before its cell");
    let (reply, advanced) = finish(pending, STEP, LIMIT).await;
    assert_eq!(advanced, STEP, "served on its cell");
    reply
}

#[tokio::test(start_paused = true)]
async fn per_key_rps_lets_a_burst_through_then_paces_the_key() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.rate_limit.per_key_rps = Some(2.0);
        config.rate_limit.burst = 3;
    })
    .await;
    served_at_once(&proxy, 3).await;
    assert_eq!(mock.calls().len(), 3, "the burst");
    let reply = served_after(&proxy, Duration::from_millis(500)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(mock.calls().len(), 4, "one more per 1/per_key_rps");
}

#[tokio::test(start_paused = true)]
async fn per_key_rps_paces_each_key_on_its_own() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let proxy = two_keys(&mock, |config| {
        config.rate_limit.per_key_rps = Some(1.0);
        config.rate_limit.burst = 1;
    })
    .await;
    served_at_once(&proxy, 2).await;
    assert_eq!((mock.calls_for(KEY_A), mock.calls_for(KEY_B)), (1, 1));
    served_after(&proxy, Duration::from_secs(1)).await;
    assert_eq!(mock.calls().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn global_rps_paces_the_whole_pool() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let proxy = two_keys(&mock, |config| {
        config.rate_limit.global_rps = Some(4.0);
        config.rate_limit.burst = 2;
    })
    .await;
    served_at_once(&proxy, 2).await;
    // Key B is idle, but the pool as a whole is at its rate.
    let reply = served_after(&proxy, Duration::from_millis(250)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(mock.calls().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_wait_beyond_max_wait_is_refused_at_once_with_retry_after() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    mock.set_default(Behaviour::Ok);
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.rate_limit.per_key_rps = Some(0.1);
        config.rate_limit.burst = 1;
        config.rate_limit.max_wait_ms = 2_000;
    })
    .await;
    served_at_once(&proxy, 1).await;
    let pending = proxy.spawn_chat("gpt-4o");
    assert!(
        eventually(|| pending.is_finished()).await,
        "refused without a wait"
    );
    let reply = pending.await.expect("no panic");
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        reply.text()
    );
    assert_eq!(reply.error_code(), "rate_limit_exceeded");
    assert_eq!(
        reply.header("retry-after"),
        Some("10"),
        "the key's next cell"
    );
    assert_eq!(mock.calls().len(), 1, "a proxy 429 never goes upstream");
}
