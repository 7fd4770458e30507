//! Behaviour of the upstream client against in-process loopback upstreams.

mod support;

use std::error::Error as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use http_body_util::channel::Channel;
use hyper::body::Incoming;
use kcp_upstream::{ErrorKind, ResponseBody, Upstream, UpstreamConfig, UpstreamError};
use support::time::{finish, freeze, still_running};
use support::{
    BOUND, Pki, TestBody, bounded, full, raw_server, read_head, request, serve, upstream, write,
};
use tokio::sync::{Notify, mpsc, oneshot};

const SHORT: Duration = Duration::from_millis(200);
/// The step of paused time past a timeout.
const STEP: Duration = Duration::from_millis(1);

/// Spawns `future` and returns once it has been polled: the timers it starts on its first
/// poll start at the current paused time, before the test advances it.
async fn polled<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (started, polled) = oneshot::channel();
    let task = tokio::spawn(async move {
        let _ = started.send(());
        future.await
    });
    polled.await.expect("the task runs");
    task
}

/// Sends `request` on a frozen clock: it is still pending 1 ms before [`SHORT`] of paused
/// time and has failed 1 ms after.
async fn fails_after_short(
    client: Upstream,
    request: Request<http_body_util::Full<Bytes>>,
) -> UpstreamError {
    let pending = polled(async move { send_err(&client, request).await }).await;
    tokio::time::advance(SHORT - STEP).await;
    assert!(still_running(&pending).await, "failed before the timeout");
    let (error, advanced) = finish(pending, STEP, BOUND).await;
    assert_eq!(advanced, STEP, "failed when the timeout was up");
    error
}

fn config() -> UpstreamConfig {
    UpstreamConfig {
        connect_timeout: BOUND,
        request_timeout: BOUND,
        stream_idle_timeout: BOUND,
        ..UpstreamConfig::default()
    }
}

async fn send(
    client: &Upstream,
    request: Request<http_body_util::Full<Bytes>>,
) -> Response<ResponseBody> {
    bounded("response headers", client.send(request))
        .await
        .expect("request succeeds")
}

async fn send_err(
    client: &Upstream,
    request: Request<http_body_util::Full<Bytes>>,
) -> UpstreamError {
    bounded("request failure", client.send(request))
        .await
        .expect_err("request must fail")
}

async fn text(response: Response<ResponseBody>) -> String {
    let body = bounded("whole body", response.into_body().collect())
        .await
        .expect("body completes")
        .to_bytes();
    String::from_utf8(body.to_vec()).expect("UTF-8 body")
}

async fn next_data(body: &mut ResponseBody) -> Result<Bytes, UpstreamError> {
    let frame = bounded("next body frame", body.frame())
        .await
        .expect("body has another frame")?;
    Ok(frame.into_data().expect("a data frame"))
}

/// Reads until the body ends; returns the data seen and the error it ended with, if any.
async fn drain(mut body: ResponseBody) -> (Vec<u8>, Option<UpstreamError>) {
    let mut data = Vec::new();
    while let Some(frame) = bounded("body frame", body.frame()).await {
        match frame {
            Ok(frame) => data.extend_from_slice(&frame.into_data().expect("a data frame")),
            Err(error) => return (data, Some(error)),
        }
    }
    (data, None)
}

fn ok(body: TestBody) -> Response<TestBody> {
    Response::new(body)
}

/// A streaming response whose sender the test's server task drives.
fn channel() -> (http_body_util::channel::Sender<Bytes, io::Error>, TestBody) {
    let (tx, body) = Channel::new(1);
    (tx, body.boxed())
}

#[test]
fn public_types_are_thread_safe() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    fn assert_unpin<T: Unpin>() {}
    assert_send_sync::<Upstream>();
    assert_send_sync::<ResponseBody>();
    assert_send_sync::<UpstreamError>();
    assert_unpin::<ResponseBody>();
}

#[tokio::test]
async fn get_and_post_round_trip_intact() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let server = serve(None, move |req: Request<Incoming>| {
        let seen_tx = seen_tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.expect("request body").to_bytes();
            seen_tx.send((parts, body)).expect("test still listening");
            Response::builder()
                .status(StatusCode::CREATED)
                .header("x-upstream", "yes")
                .body(full("answer"))
                .expect("valid response")
        }
    })
    .await;
    let client = upstream(config());

    let get = Request::get(server.url("http", "/v1/models?limit=2&order=desc"))
        .header("authorization", "Bearer sk-test")
        .header("x-custom", "a b")
        .body(http_body_util::Full::default())
        .expect("valid request");
    let response = send(&client, get).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["x-upstream"], "yes");
    assert_eq!(text(response).await, "answer");
    let (parts, body) = seen.recv().await.expect("server saw the GET");
    assert_eq!(parts.method, http::Method::GET);
    assert_eq!(parts.uri, "/v1/models?limit=2&order=desc");
    assert_eq!(parts.headers["authorization"], "Bearer sk-test");
    assert_eq!(parts.headers["x-custom"], "a b");
    assert_eq!(parts.headers["host"], server.addr.to_string().as_str());
    assert!(body.is_empty());

    let payload = r#"{"model":"gpt-4o","messages":[]}"#;
    let post = Request::post(server.url("http", "/v1/chat/completions?x=1"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from_static(
            payload.as_bytes(),
        )))
        .expect("valid request");
    let response = send(&client, post).await;
    assert_eq!(text(response).await, "answer");
    let (parts, body) = seen.recv().await.expect("server saw the POST");
    assert_eq!(parts.method, http::Method::POST);
    assert_eq!(parts.uri, "/v1/chat/completions?x=1");
    assert_eq!(parts.headers["content-type"], "application/json");
    assert_eq!(
        parts.headers["content-length"],
        payload.len().to_string().as_str()
    );
    assert_eq!(body, payload.as_bytes());
}

#[tokio::test]
async fn sequential_requests_share_one_connection() {
    let server = serve(None, |_req| async { ok(full("pong")) }).await;
    let client = upstream(config());
    let other_key = client.clone();

    for (i, client) in [&client, &other_key, &client].into_iter().enumerate() {
        let response = send(client, request(&server.url("http", &format!("/ping/{i}")))).await;
        assert_eq!(text(response).await, "pong");
    }
    assert_eq!(
        server.accepts(),
        1,
        "every request must reuse the pooled connection"
    );
}

#[tokio::test]
async fn alpn_negotiates_http2_over_tls() {
    let pki = Pki::new();
    let ca_file = pki.ca_file();
    let server = serve(
        Some(pki.server_config(&[b"h2", b"http/1.1"])),
        |req: Request<Incoming>| async move { ok(full(format!("{:?}", req.version()))) },
    )
    .await;
    let client = upstream(UpstreamConfig {
        ca_file: Some(ca_file.path().to_owned()),
        ..config()
    });

    let response = send(&client, request(&server.url("https", "/v1/models"))).await;
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(text(response).await, "HTTP/2.0");
    let response = send(&client, request(&server.url("https", "/v1/models"))).await;
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(
        server.accepts(),
        1,
        "HTTP/2 requests multiplex on one connection"
    );
}

#[tokio::test]
async fn alpn_falls_back_to_http1_over_tls() {
    let pki = Pki::new();
    let ca_file = pki.ca_file();
    let server = serve(
        Some(pki.server_config(&[b"http/1.1"])),
        |req: Request<Incoming>| async move { ok(full(format!("{:?}", req.version()))) },
    )
    .await;
    let client = upstream(UpstreamConfig {
        ca_file: Some(ca_file.path().to_owned()),
        ..config()
    });

    let response = send(&client, request(&server.url("https", "/v1/models"))).await;
    assert_eq!(response.version(), Version::HTTP_11);
    assert_eq!(text(response).await, "HTTP/1.1");
}

#[tokio::test]
async fn untrusted_certificate_is_a_tls_error() {
    let pki = Pki::new();
    let server = serve(
        Some(pki.server_config(&[b"h2", b"http/1.1"])),
        |_req| async { ok(full("never")) },
    )
    .await;
    let client = upstream(config());

    let error = send_err(&client, request(&server.url("https", "/v1/models"))).await;
    assert_eq!(error.kind(), ErrorKind::Tls, "{error:?}");
    assert!(!error.may_have_reached_upstream());
    assert!(
        error.to_string().contains(&server.url("https", "")),
        "{error}"
    );
}

#[tokio::test]
async fn refused_connection_is_a_connect_error() {
    let client = upstream(config());
    let error = send_err(
        &client,
        request(&format!("http://{}/v1/models", refused_addr().await)),
    )
    .await;
    assert_eq!(error.kind(), ErrorKind::Connect, "{error:?}");
    assert_eq!(error.kind().as_str(), "connect");
    assert!(!error.may_have_reached_upstream());
}

#[tokio::test]
async fn url_with_credentials_is_refused_before_any_connection() {
    let (addr, _server) = hanging_server().await;
    let client = upstream(config());
    let error = send_err(
        &client,
        request(&format!("http://user:sk-secret-in-url@{addr}/v1/models")),
    )
    .await;
    assert_eq!(error.kind(), ErrorKind::Connect, "{error:?}");
    assert!(!error.may_have_reached_upstream());
    assert!(!format!("{error} {error:?}").contains("sk-secret-in-url"));
}

#[tokio::test(start_paused = true)]
async fn stalled_tls_handshake_is_a_connect_error() {
    let _frozen = freeze();
    let (addr, _server) = raw_server(|mut tcp| async move {
        // Accept TCP, then never answer the ClientHello.
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut sink).await;
    })
    .await;
    let client = upstream(UpstreamConfig {
        connect_timeout: SHORT,
        ..config()
    });

    let error = fails_after_short(client, request(&format!("https://{addr}/v1/models"))).await;
    assert_eq!(error.kind(), ErrorKind::Connect, "{error:?}");
    assert!(!error.may_have_reached_upstream());
}

#[tokio::test(start_paused = true)]
async fn missing_headers_time_out() {
    let _frozen = freeze();
    let (addr, _server) = hanging_server().await;
    let client = upstream(UpstreamConfig {
        request_timeout: SHORT,
        ..config()
    });

    let error = fails_after_short(client, request(&format!("http://{addr}/v1/models"))).await;
    assert_eq!(error.kind(), ErrorKind::HeadersTimeout, "{error:?}");
    assert_eq!(error.kind().as_str(), "timeout");
    assert!(error.may_have_reached_upstream());
}

#[tokio::test]
async fn malformed_response_is_a_protocol_error() {
    let (addr, _server) = raw_server(|mut tcp| async move {
        read_head(&mut tcp).await;
        write(&mut tcp, b"this is not HTTP\r\n\r\n").await;
    })
    .await;
    let client = upstream(config());

    let error = send_err(&client, request(&format!("http://{addr}/v1/models"))).await;
    assert_eq!(error.kind(), ErrorKind::Protocol, "{error:?}");
    assert!(error.may_have_reached_upstream());
}

#[tokio::test]
async fn body_streams_without_buffering() {
    let release = Arc::new(Notify::new());
    let server_release = release.clone();
    let server = serve(None, move |_req| {
        let release = server_release.clone();
        async move {
            let (mut tx, body) = channel();
            tokio::spawn(async move {
                tx.send_data(Bytes::from_static(b"chunk 1"))
                    .await
                    .expect("client reads");
                release.notified().await;
                tx.send_data(Bytes::from_static(b"chunk 2"))
                    .await
                    .expect("client reads");
            });
            ok(body)
        }
    })
    .await;
    let client = upstream(config());

    let mut body = send(&client, request(&server.url("http", "/stream")))
        .await
        .into_body();
    assert_eq!(next_data(&mut body).await.expect("chunk 1"), "chunk 1");
    release.notify_one();
    assert_eq!(next_data(&mut body).await.expect("chunk 2"), "chunk 2");
    let (rest, error) = drain(body).await;
    assert!(rest.is_empty() && error.is_none());
}

#[tokio::test(start_paused = true)]
async fn stalled_body_hits_the_idle_timeout() {
    let _frozen = freeze();
    let server = serve(None, |_req| async {
        let (mut tx, body) = channel();
        tokio::spawn(async move {
            tx.send_data(Bytes::from_static(b"first"))
                .await
                .expect("client reads");
            // Keep the stream open without sending anything more.
            std::future::pending::<()>().await;
        });
        ok(body)
    })
    .await;
    let client = upstream(UpstreamConfig {
        stream_idle_timeout: SHORT,
        ..config()
    });

    let mut body = send(&client, request(&server.url("http", "/stream")))
        .await
        .into_body();
    assert_eq!(next_data(&mut body).await.expect("first chunk"), "first");
    let waiting = polled(async move {
        let error = next_data(&mut body).await.map(|_| ());
        (error, body)
    })
    .await;
    tokio::time::advance(SHORT - Duration::from_millis(1)).await;
    assert!(
        still_running(&waiting).await,
        "idle for less than the timeout"
    );
    let ((error, mut body), advanced) = finish(waiting, STEP, BOUND).await;
    assert_eq!(advanced, STEP, "cut when the idle timeout is up");
    let error = error.expect_err("the stall must end the body");
    assert_eq!(error.kind(), ErrorKind::BodyIdleTimeout, "{error:?}");
    assert!(error.may_have_reached_upstream());
    assert!(bounded("end after error", body.frame()).await.is_none());
}

#[tokio::test(start_paused = true)]
async fn slow_steady_stream_outlives_the_idle_timeout() {
    let _frozen = freeze();
    const IDLE: Duration = Duration::from_millis(400);
    const GAP: Duration = Duration::from_millis(100);
    const CHUNKS: usize = 7;
    let server = serve(None, |_req| async {
        let (mut tx, body) = channel();
        tokio::spawn(async move {
            for i in 0..CHUNKS {
                // Pacing of the simulated upstream, not a wait for an event.
                tokio::time::sleep(GAP).await;
                tx.send_data(Bytes::from(i.to_string()))
                    .await
                    .expect("client reads");
            }
        });
        ok(body)
    })
    .await;
    let client = upstream(UpstreamConfig {
        stream_idle_timeout: IDLE,
        ..config()
    });

    let response = send(&client, request(&server.url("http", "/stream"))).await;
    let draining = tokio::spawn(drain(response.into_body()));
    let ((data, error), advanced) = finish(draining, GAP, BOUND).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(data, b"0123456");
    assert_eq!(
        advanced,
        GAP * 7,
        "seven gaps: the stream outlived the idle timeout"
    );
    assert!(advanced > IDLE);
}

#[tokio::test]
async fn truncated_bodies_end_with_a_body_error() {
    let truncations: [&[u8]; 2] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ];
    let client = upstream(config());
    for response in truncations {
        let (addr, _server) = raw_server(move |mut tcp| async move {
            read_head(&mut tcp).await;
            write(&mut tcp, response).await;
        })
        .await;

        let response = send(&client, request(&format!("http://{addr}/stream"))).await;
        let (data, error) = drain(response.into_body()).await;
        let error = error.expect("a truncated body must not end cleanly");
        assert_eq!(error.kind(), ErrorKind::Body, "{error:?}");
        assert_eq!(error.kind().as_str(), "body");
        assert!(error.source().is_some(), "the hyper cause stays available");
        assert!(b"hello".starts_with(&data));
    }
}

#[tokio::test]
async fn dropping_the_body_closes_the_http1_connection() {
    let (addr, server) = raw_server(|mut tcp| async move {
        read_head(&mut tcp).await;
        write(
            &mut tcp,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await;
        let mut rest = Vec::new();
        // Returns once the client closes the connection (EOF or reset).
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest).await;
    })
    .await;
    let client = upstream(config());

    let mut body = send(&client, request(&format!("http://{addr}/stream")))
        .await
        .into_body();
    assert_eq!(next_data(&mut body).await.expect("first chunk"), "hello");
    drop(body);
    bounded("upstream connection closed", server)
        .await
        .expect("server task");
}

#[tokio::test]
async fn dropping_the_body_resets_the_http2_stream() {
    let pki = Pki::new();
    let ca_file = pki.ca_file();
    let (dropped_tx, dropped) = oneshot::channel::<()>();
    let dropped_tx = Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    let server = serve(Some(pki.server_config(&[b"h2"])), move |_req| {
        let signal = dropped_tx
            .lock()
            .expect("lock")
            .take()
            .expect("one request");
        async move {
            let (mut tx, body) = channel();
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from_static(b"hello")).await;
                std::future::pending::<()>().await;
            });
            ok(DropSignal {
                inner: body,
                _signal: signal,
            }
            .boxed())
        }
    })
    .await;
    let client = upstream(UpstreamConfig {
        ca_file: Some(ca_file.path().to_owned()),
        ..config()
    });

    let response = send(&client, request(&server.url("https", "/stream"))).await;
    assert_eq!(response.version(), Version::HTTP_2);
    let mut body = response.into_body();
    assert_eq!(next_data(&mut body).await.expect("first chunk"), "hello");
    drop(body);
    let outcome = bounded("upstream stream reset", dropped).await;
    assert!(outcome.is_err(), "the server dropped the response body");
}

#[tokio::test]
async fn errors_never_show_path_query_or_headers() {
    let secret_request = |addr: std::net::SocketAddr| {
        Request::post(format!("http://{addr}/v1/x?token=abc"))
            .header("authorization", "Bearer sk-secret-xyz")
            .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
            .expect("valid request")
    };
    let (hanging, _server) = hanging_server().await;
    let refused = refused_addr().await;
    let client = upstream(UpstreamConfig {
        request_timeout: SHORT,
        ..config()
    });

    for addr in [refused, hanging] {
        let error = send_err(&client, secret_request(addr)).await;
        assert!(
            error.to_string().contains(&format!("http://{addr}")),
            "{error}"
        );
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&error);
        while let Some(error) = next {
            for shown in [error.to_string(), format!("{error:?}")] {
                assert!(!shown.contains("sk-secret-xyz"), "{shown}");
                assert!(!shown.contains("token=abc"), "{shown}");
                assert!(!shown.contains("/v1/x"), "{shown}");
            }
            next = error.source();
        }
    }
}

/// An address nothing listens on: a listener's port, freed.
async fn refused_addr() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("local addr")
}

/// A server that reads the request and never answers, holding the connection open.
async fn hanging_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    raw_server(|mut tcp| async move {
        read_head(&mut tcp).await;
        std::future::pending::<()>().await;
    })
    .await
}

/// A response body that reports, by dropping a oneshot sender, when the server discards it.
struct DropSignal {
    inner: TestBody,
    _signal: oneshot::Sender<()>,
}

impl Body for DropSignal {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
}
