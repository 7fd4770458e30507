//! Soak: abusive clients of every kind at once, against the real server on loopback, bounded
//! well under a minute. Slow-body clients (trickling inside the idle timeout), clients that
//! never read their streamed responses, and idle h2 connections all run together while a real
//! client sends its requests. Every real request must be served, the
//! abusers must be cut off by the edge limits, and afterwards every in-flight slot must be
//! back: `max_inflight` requests at once all succeed.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::observe::metric;
use support::proxy_harness::{WAIT, start_proxy};
use support::{Behaviour, MockUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

const KEY_STREAM: &str = "sk-test-soak-stream-00001";
const KEY_REAL: &str = "sk-test-soak-real-0000002";

/// Real requests made while the abuse goes on; the abuse lasts until they are done.
const REAL: usize = 30;
/// The whole test, abuse and checks included.
const BOUND: Duration = Duration::from_secs(50);

const SLOW_BODIES: usize = 12;
const NON_READERS: usize = 4;
const IDLE_H2: usize = 20;
const MAX_INFLIGHT: usize = 32;

/// One slow-body client, over and over until `done` (at least once): a head promising 1000
/// bytes, then a byte every 150 ms. Returns how many times it was answered 408.
async fn slow_body(addr: SocketAddr, done: Arc<AtomicBool>) -> usize {
    let mut timeouts = 0;
    while timeouts == 0 || !done.load(Ordering::Relaxed) {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (mut reader, mut writer) = tcp.into_split();
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: kcp\r\n\
            content-type: application/json\r\ncontent-length: 1000\r\n\r\n{";
        writer.write_all(head).await.expect("head");
        let trickle = tokio::spawn(async move {
            while writer.write_all(b" ").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        let mut answer = [0u8; 12];
        let read = tokio::time::timeout(WAIT, reader.read_exact(&mut answer)).await;
        trickle.abort();
        if matches!(read, Ok(Ok(_))) && &answer == b"HTTP/1.1 408" {
            timeouts += 1;
        } else {
            panic!("a slow body was not cut off with 408");
        }
    }
    timeouts
}

/// A streamed request on a connection with a tiny receive buffer that never reads; the caller
/// holds the socket.
async fn non_reader(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let mut tcp = socket.connect(addr).await.expect("connect");
    let body = r#"{"model":"big-stream","stream":true,"messages":[]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: kcp\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.expect("request");
    tcp
}

/// An h2 connection that makes one request and then idles; whether the proxy closed it.
async fn idle_h2(addr: SocketAddr) -> bool {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{addr}/health"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await;
    let status = response.as_ref().map(http::Response::status);
    assert!(matches!(status, Ok(StatusCode::OK)), "{response:?}");
    drop(response);
    tokio::time::timeout(WAIT, connection).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_clients_do_not_starve_real_ones_and_slots_come_back() {
    tokio::time::timeout(BOUND, soak())
        .await
        .expect("the soak finishes within its bound");
}

async fn soak() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_STREAM,
        Behaviour::Stream {
            chunks: 30_000,
            interval: Duration::ZERO,
        },
    );
    let proxy = start_proxy(
        vec![
            (KEY_STREAM, mock.url(), vec!["big-stream"]),
            (KEY_REAL, mock.url(), vec!["others"]),
        ],
        |config| {
            config.server.max_inflight = MAX_INFLIGHT;
            config.server.body_read_timeout_ms = 500;
            config.server.body_timeout_ms = 1_200;
            config.server.response_write_timeout_ms = 500;
            config.server.idle_connection_timeout_ms = 1_000;
            // Generous: on a loaded 2-core machine an h2 handshake among dozens can take a while.
            config.server.header_read_timeout_ms = 8_000;
        },
    )
    .await;
    let addr = proxy.addr;
    let done = Arc::new(AtomicBool::new(false));

    let mut slow = JoinSet::new();
    for _ in 0..SLOW_BODIES {
        slow.spawn(slow_body(addr, Arc::clone(&done)));
    }
    let mut readers = JoinSet::new();
    for _ in 0..NON_READERS {
        readers.spawn(non_reader(addr));
    }
    let mut idle = JoinSet::new();
    for _ in 0..IDLE_H2 {
        idle.spawn(idle_h2(addr));
    }

    // The real client, all along: every one of its requests is served.
    for _ in 0..REAL {
        let reply = proxy.chat("gpt-4o").await;
        assert_eq!(reply.status, StatusCode::OK, "a real request was refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::Relaxed);
    assert_eq!(mock.calls_for(KEY_REAL), REAL);

    let mut timeouts = 0;
    while let Some(done) = slow.join_next().await {
        timeouts += done.expect("slow client");
    }
    assert!(
        timeouts >= SLOW_BODIES,
        "slow bodies cut off {timeouts} times"
    );
    while let Some(done) = idle.join_next().await {
        assert!(
            done.expect("h2 client"),
            "an idle h2 connection was left open"
        );
    }
    // Not reading is the point: the sockets stay open until the proxy has dropped them all.
    let mut held = Vec::new();
    while let Some(done) = readers.join_next().await {
        held.push(done.expect("non-reader"));
    }
    let stalled = "kcp_client_connection_errors_total{kind=\"write_stalled\"}";
    let dropped = tokio::time::timeout(WAIT, async {
        while metric(&proxy, stalled).await != NON_READERS as f64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(dropped.is_ok(), "a client that stopped reading was kept");
    drop(held);

    // Every slot is back: the in-flight gauge is 0 and `max_inflight` requests at once pass.
    let drained = tokio::time::timeout(WAIT, async {
        while metric(&proxy, "kcp_inflight_requests").await != 0.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(drained.is_ok(), "in-flight slots were not all released");
    let before = mock.calls_for(KEY_REAL);
    let proxy = Arc::new(proxy);
    let mut burst = JoinSet::new();
    for _ in 0..MAX_INFLIGHT {
        let proxy = Arc::clone(&proxy);
        burst.spawn(async move { proxy.chat("gpt-4o").await.status });
    }
    while let Some(status) = burst.join_next().await {
        assert_eq!(status.expect("burst request"), StatusCode::OK);
    }
    assert_eq!(mock.calls_for(KEY_REAL), before + MAX_INFLIGHT);
}
