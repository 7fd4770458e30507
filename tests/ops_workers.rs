//! End-to-end: client connections served on worker threads, as the binary serves them
//! (`server.worker_threads`). Each worker has its own runtime and its own upstream
//! connection pool; the drain still serves what is in flight on any worker. Real time: the
//! workers' runtimes are not the test's, so every wait is bounded instead of paused.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::mock_upstream::sse_events;
use support::proxy_harness::{client, loaded_config, read, send_with, start_on_workers, stopped};
use support::{Behaviour, KEY_A, MockUpstream};

/// Bound on every wait for something the proxy does at once.
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn connections_in_turn_go_to_each_worker_and_each_worker_opens_its_own_upstream_connection() {
    let mock = MockUpstream::start().await;
    let loaded = loaded_config(vec![(KEY_A, mock.url(), vec!["others"])], |_| {});
    let proxy = start_on_workers(loaded, 2).await;

    // Two client connections, one after the other: the first goes to worker 0, the second
    // to worker 1. A pool shared by both would hand the second request the first one's idle
    // upstream connection; a pool per worker cannot.
    for _ in 0..2 {
        let reply = read(send_with(&client(), proxy.chat_request("gpt-4o")).await).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["model"], "gpt-4o");
    }
    assert_eq!(mock.calls().len(), 2, "one upstream call per request");
    assert_eq!(mock.connections(), 2, "one upstream connection per worker");
    assert_eq!(proxy.stop().await.map_err(|e| e.to_string()), Ok(()));
}

#[tokio::test]
async fn a_stream_in_flight_on_a_worker_is_served_whole_by_the_drain() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 4,
            interval: Duration::from_millis(50),
        },
    );
    let loaded = loaded_config(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.server.graceful_shutdown_seconds = 10;
    });
    let mut proxy = start_on_workers(loaded, 2).await;
    let response = send_with(&client(), proxy.stream_request("gpt-4o")).await;
    assert_eq!(response.status(), StatusCode::OK);

    let run = proxy.begin_shutdown();
    let body = read(response).await;
    assert_eq!(
        body.body,
        sse_events("gpt-4o", 4).concat(),
        "every event, in order"
    );
    assert_eq!(stopped(run).await.map_err(|e| e.to_string()), Ok(()));
    assert_eq!(mock.calls().len(), 1);
    assert!(
        tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(proxy.addr))
            .await
            .expect("the connect ends in time")
            .is_err(),
        "the listener is closed after the drain"
    );
}
