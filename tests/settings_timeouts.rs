//! End-to-end: `[upstream] connect_timeout_ms` and `stream_idle_timeout_ms` through the proxy,
//! in paused time (see `support::time`): each fires exactly when it is due, and not before.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use support::mock_upstream::sse_events;
use support::proxy_harness::start_proxy;
use support::time::{advance, eventually, finish, freeze, still_running};
use support::{Behaviour, KEY_A, MockUpstream};

const STEP: Duration = Duration::from_millis(1);
const LIMIT: Duration = Duration::from_secs(5);

/// A TLS upstream that accepts TCP and never answers the ClientHello: the connection is
/// never established, so only the connect timeout can end the attempt. Counts what it
/// accepted.
async fn silent_tls_upstream() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    (format!("https://{addr}"), accepted, task)
}

#[tokio::test(start_paused = true)]
async fn connect_timeout_ends_an_attempt_that_cannot_connect() {
    let _frozen = freeze();
    let (url, accepted, _upstream) = silent_tls_upstream().await;
    let proxy = start_proxy(vec![(KEY_A, url, vec!["others"])], |config| {
        config.upstream.connect_timeout_ms = 300;
        config.upstream.request_timeout_ms = 10_000;
        config.upstream.max_retries = 0;
    })
    .await;
    let pending = proxy.spawn_chat("gpt-4o");
    // The attempt's connect timer started before the TCP connection the upstream accepts.
    assert!(eventually(|| accepted.load(Ordering::SeqCst) == 1).await);
    advance(Duration::from_millis(299)).await;
    assert!(
        still_running(&pending).await,
        "cut before connect_timeout_ms"
    );
    let (reply, advanced) = finish(pending, STEP, LIMIT).await;
    assert_eq!(
        advanced, STEP,
        "cut when connect_timeout_ms is up, not request_timeout_ms"
    );
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.error_code(), "upstream_unavailable");
}

#[tokio::test(start_paused = true)]
async fn stream_idle_timeout_cuts_a_stalled_stream_after_exactly_the_idle_time() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 3,
            interval: Duration::from_secs(2),
        },
    );
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.upstream.stream_idle_timeout_ms = 500;
        config.upstream.request_timeout_ms = 10_000;
    })
    .await;
    let response = proxy.send(proxy.stream_request("gpt-4o")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let received = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = Arc::clone(&received);
    let mut body = response.into_body();
    let reader = tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    let data = frame.into_data().unwrap_or_default();
                    sink.lock().expect("not poisoned").extend_from_slice(&data);
                }
                Err(_) => return "error",
            }
        }
        "clean end"
    });
    let first = sse_events("gpt-4o", 3)[0].clone();
    let arrived = || received.lock().expect("not poisoned").len();
    assert!(
        eventually(|| arrived() == first.len()).await,
        "the first event"
    );
    advance(Duration::from_millis(499)).await;
    assert!(
        still_running(&reader).await,
        "cut before stream_idle_timeout_ms"
    );
    let (ended, advanced) = finish(reader, STEP, LIMIT).await;
    assert_eq!(
        advanced, STEP,
        "cut when the stream has been idle for 500 ms"
    );
    assert_eq!(ended, "error", "a cut stream must not look complete");
    assert_eq!(*received.lock().expect("not poisoned"), first.to_vec());
    assert!(
        eventually(|| mock.cancelled() == 1).await,
        "the upstream stream is dropped"
    );
    assert_eq!(
        mock.calls().len(),
        1,
        "never retried once the response started"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_slower_in_total_than_the_idle_timeout_but_never_idle_that_long_completes() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let interval = Duration::from_millis(400);
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 5,
            interval,
        },
    );
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.upstream.stream_idle_timeout_ms = 500;
        config.upstream.request_timeout_ms = 1_000;
    })
    .await;
    let pending = proxy.spawn(proxy.stream_request("gpt-4o"));
    let (reply, advanced) = finish(pending, interval, LIMIT).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, Bytes::from(sse_events("gpt-4o", 5).concat()));
    assert_eq!(
        advanced,
        interval * 5,
        "six events, five intervals: longer than both the idle and the request timeout"
    );
}
