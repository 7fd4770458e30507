//! End-to-end: streams that fail, clients that leave, and shutdown with streams in flight.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use key_cycle_proxy::server::ops::serve::ServeError;
use support::mock_upstream::sse_events;
use support::proxy_harness::{WAIT, read, start_proxy, stopped};
use support::{Behaviour, KEY_A, MockUpstream, one_key};

/// Bound for cancellation to travel from the client, through the proxy, to the upstream.
const CANCEL_WITHIN: Duration = Duration::from_secs(1);

#[tokio::test]
async fn an_upstream_failure_mid_stream_aborts_the_client_response() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::StreamThenReset { chunks: 3 });
    let proxy = one_key(&mock).await;
    let response = proxy.send(proxy.stream_request("gpt-4o")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = Vec::new();
    let ended = loop {
        match tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("frame or error in time")
        {
            Some(Ok(frame)) => received.extend_from_slice(&frame.into_data().unwrap_or_default()),
            Some(Err(_)) => break "error",
            None => break "clean end",
        }
    };
    assert_eq!(ended, "error", "a cut stream must not look complete");
    let sent: Vec<u8> = sse_events("gpt-4o", 3)[..3].concat();
    assert_eq!(
        String::from_utf8_lossy(&received),
        String::from_utf8_lossy(&sent),
        "every event the upstream sent before the cut reaches the client, then the error"
    );
    assert_eq!(
        mock.calls().len(),
        1,
        "never retried once the response started"
    );
}

#[tokio::test]
async fn a_client_leaving_mid_stream_cancels_the_upstream() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 200,
            interval: Duration::from_millis(20),
        },
    );
    let proxy = one_key(&mock).await;
    let response = proxy.send(proxy.stream_request("gpt-4o")).await;
    let mut body = response.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first frame in time");
    assert!(first.is_some_and(|f| f.is_ok()));
    assert_eq!(mock.cancelled(), 0);
    drop(body);
    assert!(
        mock.wait_cancelled(1, CANCEL_WITHIN).await,
        "the upstream stream was not dropped within {CANCEL_WITHIN:?}"
    );
}

#[tokio::test]
async fn a_client_leaving_before_the_answer_cancels_the_upstream() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Hang);
    let proxy = one_key(&mock).await;
    let client = proxy.client.clone();
    let request = proxy.stream_request("gpt-4o");
    let pending = tokio::spawn(async move { client.request(request).await });
    assert!(
        mock.wait_calls(1, WAIT).await,
        "request reached the upstream"
    );
    pending.abort();
    assert!(
        mock.wait_cancelled(1, CANCEL_WITHIN).await,
        "the hung upstream request was not dropped within {CANCEL_WITHIN:?}"
    );
    assert_eq!(mock.calls().len(), 1, "no retry after the client left");
}

#[tokio::test]
async fn shutdown_drains_a_running_stream_and_refuses_new_connections() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 10,
            interval: Duration::from_millis(30),
        },
    );
    let mut proxy = one_key(&mock).await;
    let response = proxy.send(proxy.stream_request("gpt-4o")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let run = proxy.begin_shutdown();
    let reply = read(response).await;
    assert_eq!(
        reply.body,
        Bytes::from(sse_events("gpt-4o", 10).concat()),
        "the stream in flight completes"
    );
    let result = stopped(run).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        tokio::net::TcpStream::connect(proxy.addr).await.is_err(),
        "the listener is closed"
    );
    assert_eq!(
        proxy.app.readiness(),
        Err("draining: the proxy is shutting down")
    );
}

#[tokio::test]
async fn shutdown_cuts_what_outlives_the_grace_period() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Hang);
    let mut proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.server.graceful_shutdown_seconds = 0;
    })
    .await;
    let client = proxy.client.clone();
    let request = proxy.stream_request("gpt-4o");
    let pending = tokio::spawn(async move { client.request(request).await });
    assert!(mock.wait_calls(1, WAIT).await);
    let run = proxy.begin_shutdown();
    let result = stopped(run).await;
    assert!(
        matches!(
            result,
            Err(ServeError::DrainTimeout { connections: 1, grace }) if grace.is_zero()
        ),
        "the hung request's connection was cut: {result:?}"
    );
    let answer = tokio::time::timeout(WAIT, pending)
        .await
        .expect("client sees the cut")
        .expect("no panic");
    assert!(answer.is_err(), "no answer for a cut request");
    assert!(mock.wait_cancelled(1, CANCEL_WITHIN).await);
}
