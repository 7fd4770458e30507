//! End-to-end: limits and bad input. Oversized bodies (413) and heads (431), clients that
//! stall while sending a body (408) or a head (connection closed), and a corpus of odd bodies
//! against a model-routed pool. None of them reaches the upstream unless it is a request the
//! upstream should judge, and none of them stops the proxy from serving the next one.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, StatusCode};
use support::proxy_harness::WAIT;
use support::time::{advance, finish, freeze, settle};
use support::{Behaviour, MockUpstream, routed_keys};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The short client timeouts of these tests.
const SLOW_CLIENT_MS: u64 = 200;

/// What a raw client read before the server closed the connection (or sent a whole response).
struct RawReply {
    bytes: Vec<u8>,
}

impl RawReply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    fn status(&self) -> Option<u16> {
        let text = self.text();
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    fn body_json(&self) -> serde_json::Value {
        let text = self.text();
        let (_, body) = text.split_once("\r\n\r\n").expect("a response head");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body ({e}): {body}"))
    }
}

/// Writes `bytes` on a fresh connection to `addr`, keeps the connection open without writing
/// more, and reads until the server closes it (bounded by [`WAIT`]).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> RawReply {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(bytes).await.expect("write");
    read_until_closed(tcp).await
}

/// Reads until the server closes the connection (bounded by [`WAIT`]).
async fn read_until_closed(mut tcp: TcpStream) -> RawReply {
    let (bytes, closed) = support::raw::read_to_close(&mut tcp).await;
    assert!(closed, "the server kept the connection open");
    RawReply { bytes }
}

/// Writes `bytes` on a fresh connection to `addr` in a task of its own, for tests that move
/// paused time while it runs: returns once the bytes are written; the task then reads until
/// the server closes the connection.
async fn spawn_raw_exchange(addr: SocketAddr, bytes: &[u8]) -> tokio::task::JoinHandle<RawReply> {
    let bytes = bytes.to_vec();
    let (written, wrote) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&bytes).await.expect("write");
        let _ = written.send(());
        read_until_closed(tcp).await
    });
    wrote.await.expect("the bytes are written");
    task
}

/// Steps of paused time in the slow-client tests.
const STEP: Duration = Duration::from_millis(1);

/// Sends `bytes` and stalls: the connection stays open for `SLOW_CLIENT_MS` of paused time,
/// not a millisecond less, then the server ends it; what the server sent.
///
/// The server's timer starts when it has accepted the connection, which the test cannot
/// observe: the clock stands still until then (the runtime is given `support::time::SETTLE` of real
/// time)
/// and an accept later than that would only make the close later. Hence the exact lower
/// bound and the loose upper one.
async fn stall(addr: SocketAddr, bytes: &[u8]) -> RawReply {
    let pending = spawn_raw_exchange(addr, bytes).await;
    settle().await;
    advance(Duration::from_millis(SLOW_CLIENT_MS) - STEP).await;
    let (reply, advanced) = finish(pending, STEP, Duration::from_millis(SLOW_CLIENT_MS)).await;
    assert!(
        advanced >= STEP,
        "{:?}: closed before the timeout",
        String::from_utf8_lossy(bytes)
    );
    reply
}

fn assert_openai_error(json: &serde_json::Value, code: &str) {
    assert_eq!(json["error"]["code"], code, "{json}");
    assert!(json["error"]["message"].is_string(), "{json}");
    assert!(json["error"]["type"].is_string(), "{json}");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_whether_declared_or_chunked() {
    let mock = MockUpstream::start().await;
    let proxy = routed_keys(&mock, |config| {
        config.server.request_body_limit_bytes = 1024;
    })
    .await;
    let big = format!(r#"{{"model":"gpt-4o","x":"{}"}}"#, "a".repeat(2048));
    let declared = proxy.post("/v1/chat/completions", &big).await;
    assert_eq!(declared.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_openai_error(&declared.json(), "request_too_large");

    let chunked = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: kcp\r\ncontent-type: application/json\r\n\
         connection: close\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let reply = raw_exchange(proxy.addr, chunked.as_bytes()).await;
    assert_eq!(reply.status(), Some(413), "{}", reply.text());
    assert_openai_error(&reply.body_json(), "request_too_large");

    let at_limit = format!(r#"{{"model":"gpt-4o","x":"{}"}}"#, "a".repeat(900));
    assert!(at_limit.len() <= 1024);
    assert_eq!(
        proxy.post("/v1/chat/completions", &at_limit).await.status,
        StatusCode::OK
    );
    assert_eq!(
        mock.calls().len(),
        1,
        "only the body within the limit went up"
    );
}

#[tokio::test]
async fn a_head_over_max_header_bytes_is_431() {
    let mock = MockUpstream::start().await;
    let proxy = routed_keys(&mock, |config| {
        config.server.max_header_bytes = 16_384;
    })
    .await;
    let head = |filler: usize| {
        format!(
            "GET /v1/models HTTP/1.1\r\nhost: kcp\r\nx-filler: {}\r\n\r\n",
            "f".repeat(filler)
        )
    };
    let reply = raw_exchange(proxy.addr, head(20_000).as_bytes()).await;
    assert_eq!(reply.status(), Some(431), "{}", reply.text());
    assert_eq!(mock.calls().len(), 0);

    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let request = format!("GET /v1/models HTTP/1.1\r\nhost: kcp\r\n{many}\r\n");
    let reply = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert_eq!(
        reply.status(),
        Some(431),
        "too many headers: {}",
        reply.text()
    );
    assert_eq!(mock.calls().len(), 0);

    let within = proxy
        .call(proxy.request(
            Method::GET,
            "/v1/models",
            &[("x-filler", &"f".repeat(12_000))],
            Vec::new(),
        ))
        .await;
    assert_eq!(
        within.status,
        StatusCode::OK,
        "a 12 kB head is within 16 kB"
    );
    assert_eq!(mock.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_client_stalling_mid_body_gets_408() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let proxy = routed_keys(&mock, |config| {
        config.server.body_read_timeout_ms = SLOW_CLIENT_MS;
    })
    .await;
    let request = "POST /v1/chat/completions HTTP/1.1\r\nhost: kcp\r\n\
                   content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":";
    let reply = stall(proxy.addr, request.as_bytes()).await;
    assert_eq!(reply.status(), Some(408), "{}", reply.text());
    assert_openai_error(&reply.body_json(), "request_timeout");
    assert_eq!(mock.calls().len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_client_stalling_in_the_head_is_disconnected() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let proxy = routed_keys(&mock, |config| {
        config.server.header_read_timeout_ms = SLOW_CLIENT_MS;
    })
    .await;
    let stalls: [&[u8]; 4] = [
        b"GET /v1/mod",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: kcp\r\ncontent-le",
        b"PRI * HTTP/2",
        b"",
    ];
    for bytes in stalls {
        let reply = stall(proxy.addr, bytes).await;
        let shown = String::from_utf8_lossy(bytes);
        assert!(
            reply.bytes.is_empty(),
            "{shown:?}: closed without an answer, got {}",
            reply.text()
        );
    }
    assert_eq!(mock.calls().len(), 0);
    assert_eq!(proxy.get("/health").await.status, StatusCode::OK);
}

/// A head that trickles in over 1.5 s of paused time (one piece every 300 ms) is served:
/// only a head that is not complete within `header_read_timeout_ms` is cut.
#[tokio::test(start_paused = true)]
async fn a_slow_but_steady_request_is_served() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let proxy = routed_keys(&mock, |config| {
        config.server.header_read_timeout_ms = 2_000;
    })
    .await;
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let request = b"GET /v1/models HTTP/1.1\r\nhost: kcp\r\nconnection: close\r\n\r\n";
    let parts: Vec<&[u8]> = request.chunks(10).collect();
    assert_eq!(parts.len(), 6);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            advance(Duration::from_millis(300)).await;
        }
        tcp.write_all(part).await.expect("write");
    }
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut response))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert_eq!(mock.calls().len(), 1);
}

/// Bodies the proxy cannot read a model from are forwarded once, byte for byte, to whichever
/// key is next, for the upstream to judge (its 400 comes back unchanged); a model the proxy
/// can read but no key serves is answered 404 `model_not_found` without a call. The proxy
/// keeps serving after each.
/// Complements `odd_bodies_are_forwarded_for_the_upstream_to_judge` (one unrouted key).
#[tokio::test]
async fn odd_bodies_against_a_routed_pool_never_break_the_proxy() {
    let mock = MockUpstream::start().await;
    mock.set_default(Behaviour::status(400));
    let proxy = routed_keys(&mock, |_| {}).await;
    let deep = format!(
        "{{\"model\":{}1{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let long_form_model = "w".repeat(10_000);
    let json = "application/json";
    let multipart = "multipart/form-data; boundary=XyZ";
    let corpus: Vec<(&str, &str, Vec<u8>)> = vec![
        ("empty", json, Vec::new()),
        ("whitespace", json, b" \r\n\t ".to_vec()),
        ("array", json, br#"[{"model":"gpt-4o"}]"#.to_vec()),
        ("model is an object", json, br#"{"model":{"name":"gpt-4o"}}"#.to_vec()),
        ("model is an array", json, br#"{"model":["gpt-4o"]}"#.to_vec()),
        ("model is true", json, br#"{"model":true}"#.to_vec()),
        ("huge number", json, format!(r#"{{"model":1{}}}"#, "0".repeat(5_000)).into_bytes()),
        ("lone surrogate", json, br#"{"model":"gpt-\ud800"}"#.to_vec()),
        ("bad escape", json, br#"{"model":"gpt-\x"}"#.to_vec()),
        ("byte order mark", json, b"\xef\xbb\xbf{\"model\":\"gpt-4o\"}".to_vec()),
        ("duplicate model", json, br#"{"model":"gpt-4o","model":"whisper-1"}"#.to_vec()),
        ("nested 100k deep", json, deep.into_bytes()),
        ("no content type", "", br#"{"model":"gpt-4o""#.to_vec()),
        ("multipart, no boundary", "multipart/form-data", b"--XyZ\r\n".to_vec()),
        ("multipart, garbage", multipart, b"\x00\xff--XyZ--garbage".to_vec()),
        (
            "multipart, 10 kB model",
            multipart,
            format!(
                "--XyZ\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\n{long_form_model}\r\n--XyZ--\r\n"
            )
            .into_bytes(),
        ),
        (
            "multipart, unterminated",
            multipart,
            b"--XyZ\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nwhisper-1".to_vec(),
        ),
    ];
    // The one body whose model the proxy reads (from the form): too long a name to route.
    const UNSERVED_FORM_MODEL: &str = "multipart, 10 kB model";
    let upstream_400 = proxy.chat("gpt-4o").await.body;
    for (name, content_type, body) in &corpus {
        let before = mock.calls().len();
        let headers: Vec<(&str, &str)> = if content_type.is_empty() {
            Vec::new()
        } else {
            vec![("content-type", content_type)]
        };
        let reply = proxy
            .call(proxy.request(Method::POST, "/v1/chat/completions", &headers, body.clone()))
            .await;
        let calls = mock.calls();
        if *name == UNSERVED_FORM_MODEL {
            assert_eq!(calls.len(), before, "{name}: no upstream call");
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{name}: {}",
                reply.text()
            );
            assert_eq!(reply.error_code(), "model_name_too_long", "{name}");
        } else {
            assert_eq!(calls.len(), before + 1, "{name}: exactly one upstream call");
            assert_eq!(
                calls[before].body,
                body.as_slice(),
                "{name}: forwarded byte for byte"
            );
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{name}: upstream's answer"
            );
            assert_eq!(
                reply.body, upstream_400,
                "{name}: upstream's body, unchanged"
            );
        }
        assert!(reply.body.len() < 2_000, "{name}: the answer stays short");
    }
    assert_eq!(proxy.get("/health").await.status, StatusCode::OK);
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::BAD_REQUEST);
}
