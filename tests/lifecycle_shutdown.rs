//! End-to-end: `server.graceful_shutdown_seconds` in paused time (see `support::time`). The
//! drain waits for work in flight for exactly the grace period: what ends within it is
//! served whole, what outlives it is cut when the period is up, not a millisecond before.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use key_cycle_proxy::server::ops::serve::ServeError;
use support::mock_upstream::sse_events;
use support::proxy_harness::{Proxy, start_proxy};
use support::time::{advance, eventually, finish, freeze, still_running};
use support::{Behaviour, KEY_A, MockUpstream};

const GRACE_SECS: u64 = 2;
const STEP: Duration = Duration::from_millis(1);
const LIMIT: Duration = Duration::from_secs(5);

async fn proxy_with_grace(mock: &MockUpstream) -> Proxy {
    start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.server.graceful_shutdown_seconds = GRACE_SECS;
        config.upstream.request_timeout_ms = 60_000;
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn work_that_outlives_the_grace_period_is_cut_when_it_is_up() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Hang);
    let mut proxy = proxy_with_grace(&mock).await;
    let client = proxy.client.clone();
    let request = proxy.chat_request("gpt-4o");
    let pending = tokio::spawn(async move { client.request(request).await });
    assert!(
        eventually(|| mock.calls().len() == 1).await,
        "the request is upstream"
    );

    let stopped = proxy.begin_shutdown();
    assert!(
        eventually(|| proxy.app.readiness().is_err()).await,
        "the drain begins"
    );
    assert_eq!(
        proxy.app.readiness(),
        Err("draining: the proxy is shutting down")
    );
    advance(Duration::from_secs(GRACE_SECS) - STEP).await;
    assert!(
        still_running(&stopped).await,
        "cut before the grace period is up"
    );
    assert!(!pending.is_finished(), "the client still waits");
    assert_eq!(mock.cancelled(), 0);

    let (result, advanced) = finish(stopped, STEP, LIMIT).await;
    assert_eq!(advanced, STEP, "cut when the grace period is up");
    match result {
        Err(ServeError::DrainTimeout { connections, grace }) => {
            assert_eq!(connections, 1, "the one hung request's connection");
            assert_eq!(grace, Duration::from_secs(GRACE_SECS));
        }
        other => panic!("expected a drain timeout, got {other:?}"),
    }
    let (answer, _) = finish(pending, STEP, LIMIT).await;
    assert!(answer.is_err(), "no answer for a cut request: {answer:?}");
    assert!(
        eventually(|| mock.cancelled() == 1).await,
        "the upstream request is dropped"
    );
    assert_eq!(mock.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_ends_within_the_grace_period_is_served_whole() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let interval = Duration::from_millis(300);
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 5,
            interval,
        },
    );
    let mut proxy = proxy_with_grace(&mock).await;
    let pending = proxy.spawn(proxy.stream_request("gpt-4o"));
    assert!(eventually(|| mock.calls().len() == 1).await);

    let stopped = proxy.begin_shutdown();
    // Five intervals (1.5 s) of stream left: within the 2 s grace period.
    let (reply, advanced) = finish(pending, interval, LIMIT).await;
    assert_eq!(advanced, interval * 5);
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.body,
        Bytes::from(sse_events("gpt-4o", 5).concat()),
        "the stream in flight completes"
    );
    assert!(
        eventually(|| stopped.is_finished()).await,
        "run returns once drained, without waiting out the grace period"
    );
    let result = stopped.await.expect("no panic");
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(mock.cancelled(), 0);
}
