//! End-to-end: what a client can hold, and for how long. The whole-body deadline, the
//! in-flight slot taken only after the head is read and authenticated, a client that stops
//! reading its response (dropped, its slot and upstream call freed), the connection cap, and
//! idle h2 connections. Waits are bounded by `WAIT`; nothing asserts wall-clock durations.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use key_cycle_proxy::core::Secret;
use key_cycle_proxy::server::config::Config;
use support::observe::{metric, wait_metric};
use support::proxy_harness::{Proxy, Reply, WAIT, loaded_config, start_loaded, start_proxy};
use support::{Behaviour, MockUpstream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const KEY_A: &str = "sk-test-time-alpha-000001";
const KEY_B: &str = "sk-test-time-beta-0000002";
const CLIENT_KEY: &str = "kcp-client-time-4c1d9e";
const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

/// Reads from `tcp` until the server closes it, bounded by `WAIT`; what was read.
async fn read_to_close(tcp: &mut TcpStream) -> Option<String> {
    let (read, closed) = support::raw::read_to_close(tcp).await;
    closed.then(|| String::from_utf8_lossy(&read).into_owned())
}

fn chat_request(proxy: &Proxy, token: Option<&str>) -> http::Request<Full<Bytes>> {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    proxy.request(Method::POST, "/v1/chat/completions", &headers, CHAT)
}

async fn chat(proxy: &Proxy, token: Option<&str>) -> Reply {
    proxy.call(chat_request(proxy, token)).await
}

#[tokio::test]
async fn a_trickled_body_meets_the_whole_body_deadline() {
    let mock = MockUpstream::start().await;
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.server.body_read_timeout_ms = 2_000;
        config.server.body_timeout_ms = 600;
    })
    .await;
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut reader, mut writer) = tcp.into_split();
    writer
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: kcp\r\n\
              content-type: application/json\r\ncontent-length: 1000\r\n\r\n{",
        )
        .await
        .expect("head");
    // One byte every 100 ms: always inside the idle timeout, never done.
    let trickle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let text = read_first_response(&mut reader).await;
    trickle.abort();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#""code":"request_timeout""#), "{text}");
    assert_eq!(mock.calls().len(), 0);
}

/// A proxy with client keys and `max_inflight = 1`.
async fn one_slot(mock: &MockUpstream, tweak: impl FnOnce(&mut Config)) -> Proxy {
    let mut loaded = loaded_config(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.server.max_inflight = 1;
        tweak(config);
    });
    loaded.client_keys = vec![Secret::new(CLIENT_KEY)];
    start_loaded(loaded).await
}

#[tokio::test]
async fn the_slot_is_taken_after_the_head_is_read_and_authenticated() {
    let mock = MockUpstream::start().await;
    let proxy = one_slot(&mock, |_| {}).await;

    // Half a head holds no slot.
    let mut half = TcpStream::connect(proxy.addr).await.expect("connect");
    half.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: kc")
        .await
        .expect("half a head");
    // Nor does an unauthenticated head with a body still to come.
    let mut stranger = TcpStream::connect(proxy.addr).await.expect("connect");
    stranger
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: kcp\r\ncontent-length: 100\r\n\r\n",
        )
        .await
        .expect("stranger head");
    let refused = read_first_response(&mut stranger).await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert_eq!(chat(&proxy, Some(CLIENT_KEY)).await.status, StatusCode::OK);

    // An authenticated client sending its body slowly holds the one slot...
    let mut slow = TcpStream::connect(proxy.addr).await.expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: kcp\r\nauthorization: Bearer {CLIENT_KEY}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
    );
    slow.write_all(head.as_bytes()).await.expect("slow head");
    assert!(wait_metric(&proxy, "kcp_inflight_requests", 1.0).await);
    let busy = chat(&proxy, Some(CLIENT_KEY)).await;
    assert_eq!(busy.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(busy.error_code(), "overloaded");
    // ...while a stranger is still told 401, not 503: auth comes first.
    assert_eq!(chat(&proxy, None).await.status, StatusCode::UNAUTHORIZED);
    // When it leaves, the slot comes back.
    drop(slow);
    assert!(wait_metric(&proxy, "kcp_inflight_requests", 0.0).await);
    assert_eq!(chat(&proxy, Some(CLIENT_KEY)).await.status, StatusCode::OK);
    assert_eq!(mock.calls().len(), 2);
    drop(half);
}

/// Reads until one response head and its `content-length` body are in, bounded by `WAIT`.
async fn read_first_response(tcp: &mut (impl AsyncRead + Unpin)) -> String {
    let mut read = Vec::new();
    let _ = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&read);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    break;
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&read).into_owned()
}

/// A streaming request on a connection whose receive buffer is tiny and which never reads.
pub async fn non_reading_stream(addr: SocketAddr, model: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let mut tcp = socket.connect(addr).await.expect("connect");
    let body = format!(r#"{{"model":"{model}","stream":true,"messages":[]}}"#);
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: kcp\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.expect("request");
    tcp
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_with_its_slot_and_upstream_call() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        // ~50 MB: more than every socket buffer between the mock and the client can hold, so
        // the upstream is still sending when the proxy drops the client.
        Behaviour::Stream {
            chunks: 200_000,
            interval: Duration::ZERO,
        },
    );
    let proxy = start_proxy(
        vec![
            (KEY_A, mock.url(), vec!["big-stream"]),
            (KEY_B, mock.url(), vec!["others"]),
        ],
        |config| {
            config.server.max_inflight = 1;
            config.server.response_write_timeout_ms = 300;
        },
    )
    .await;
    let stalled = non_reading_stream(proxy.addr, "big-stream").await;
    assert!(mock.wait_calls(1, WAIT).await);
    assert!(
        mock.wait_cancelled(1, WAIT).await,
        "the upstream call is dropped with the client"
    );
    assert!(wait_metric(&proxy, "kcp_inflight_requests", 0.0).await);
    assert_eq!(
        metric(
            &proxy,
            "kcp_client_connection_errors_total{kind=\"write_stalled\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        chat(&proxy, None).await.status,
        StatusCode::OK,
        "the slot came back"
    );
    assert_eq!(mock.calls_for(KEY_B), 1);
    drop(stalled);
}

#[tokio::test]
async fn connections_past_max_connections_are_closed_at_once_and_counted() {
    let mock = MockUpstream::start().await;
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.server.max_connections = 2;
    })
    .await;
    let first = TcpStream::connect(proxy.addr).await.expect("first");
    let second = TcpStream::connect(proxy.addr).await.expect("second");
    assert!(wait_metric(&proxy, "kcp_client_connections", 2.0).await);
    let mut third = TcpStream::connect(proxy.addr).await.expect("third");
    let _ = third
        .write_all(b"GET /health HTTP/1.1\r\nhost: kcp\r\n\r\n")
        .await;
    let answer = read_to_close(&mut third).await.expect("closed at once");
    assert_eq!(answer, "", "nothing is served past the cap");
    assert_eq!(
        metric(&proxy, "kcp_client_connections_refused_total").await,
        1.0
    );
    drop((first, second));
    assert!(wait_metric(&proxy, "kcp_client_connections", 0.0).await);
    assert_eq!(chat(&proxy, None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn an_idle_h2_connection_is_closed() {
    let mock = MockUpstream::start().await;
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.server.header_read_timeout_ms = 60_000;
        config.server.idle_connection_timeout_ms = 300;
    })
    .await;
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{}/v1/models", proxy.addr))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);
    let closed = tokio::time::timeout(WAIT, connection).await;
    assert!(
        closed.is_ok(),
        "the idle h2 connection was closed by the proxy"
    );
    assert!(wait_metric(&proxy, "kcp_client_connections", 0.0).await);
}
