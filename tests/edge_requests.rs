//! End-to-end: what a client can send. Path rules (dot, empty and backslash segments, the `/v1`
//! boundary, stateful detection on the normalized path), methods, the model name's length,
//! CORS off by default, and the proxy's own answers to oversized and malformed heads. Every
//! refusal is pinned with its status and code, and with the upstream calls it did not make.

mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, StatusCode};
use key_cycle_proxy::core::Strategy;
use support::observe::metric;
use support::proxy_harness::{Proxy, start_proxy};
use support::raw::read_to_close;
use support::{Behaviour, MockUpstream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const KEY_A: &str = "sk-test-edge-alpha-0000001";
const KEY_B: &str = "sk-test-edge-beta-00000002";

async fn two_keys(mock: &MockUpstream) -> Proxy {
    start_proxy(
        vec![
            (KEY_A, mock.url(), vec!["others"]),
            (KEY_B, mock.url(), vec!["others"]),
        ],
        |config| config.keys.rotation_strategy = Strategy::RoundRobin,
    )
    .await
}

/// Writes `bytes` on a fresh connection and reads until the server closes it or `WAIT`.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(bytes).await.expect("write");
    let (read, _) = read_to_close(&mut tcp).await;
    String::from_utf8_lossy(&read).into_owned()
}

#[tokio::test]
async fn dot_empty_and_backslash_segments_are_400_without_an_upstream_call() {
    let mock = MockUpstream::start().await;
    let proxy = two_keys(&mock).await;
    for path in [
        "/v1/files/../chat/completions",
        "/v1/./models",
        "/v1/files/%2e%2e/chat/completions",
        "/v1/files/.%2E/models",
        "/v1/%2e/models",
        "/v1//models",
        "//v1/models",
        "/v1/files/a%5cb",
        "/v1/files/a%5Cb",
        "/v1/files/a%zz",
    ] {
        let reply = proxy.get(path).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(
            reply.json()["error"]["type"],
            "invalid_request_error",
            "{path}"
        );
        assert_eq!(reply.error_code(), "invalid_path", "{path}");
    }
    // A raw backslash never reaches the upstream either (hyper or the proxy answers 400).
    let reply = raw(
        proxy.addr,
        b"GET /v1\\models HTTP/1.1\r\nhost: kcp\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert_eq!(mock.calls().len(), 0);

    let ok = proxy.get("/v1/models/").await;
    assert_eq!(
        ok.status,
        StatusCode::OK,
        "a trailing slash is the client's to send"
    );
    assert_eq!(mock.calls()[0].path(), "/v1/models/");
}

#[tokio::test]
async fn v1_is_a_segment_boundary() {
    let mock = MockUpstream::start().await;
    let proxy = two_keys(&mock).await;
    for path in [
        "/v1beta/models",
        "/v10/models",
        "/v1.5/models",
        "/V1/models",
    ] {
        let reply = proxy.get(path).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(reply.error_code(), "unknown_url", "{path}");
    }
    assert_eq!(mock.calls().len(), 0);
    assert_eq!(proxy.get("/%76%31/models").await.status, StatusCode::OK);
    assert_eq!(mock.calls()[0].path(), "/v1/models");
}

#[tokio::test]
async fn stateful_endpoints_are_detected_on_the_normalized_path() {
    let mock = MockUpstream::start().await;
    let proxy = two_keys(&mock).await;
    for _ in 0..4 {
        let reply = proxy.get("/v1/%66iles/file-abc%2d1").await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(mock.calls_for(KEY_A), 4, "every call goes to the home key");
    assert_eq!(mock.calls_for(KEY_B), 0);
    assert!(
        mock.calls()
            .iter()
            .all(|c| c.path() == "/v1/files/file-abc-1")
    );
    for _ in 0..4 {
        assert_eq!(proxy.get("/v1/models").await.status, StatusCode::OK);
    }
    assert_eq!(mock.calls_for(KEY_B), 2, "a stateless path is spread");
}

#[tokio::test]
async fn only_api_methods_are_forwarded() {
    let mock = MockUpstream::start().await;
    let proxy = two_keys(&mock).await;
    for method in ["TRACE", "PROPFIND", "BREW"] {
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let reply = proxy
            .call(proxy.request(method.clone(), "/v1/models", &[], Bytes::new()))
            .await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(
            reply.header("allow"),
            Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
        );
        assert_eq!(reply.error_code(), "method_not_allowed");
    }
    let connect = raw(
        proxy.addr,
        b"CONNECT api.openai.com:443 HTTP/1.1\r\nhost: api.openai.com:443\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    assert_eq!(mock.calls().len(), 0);

    for (i, method) in [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ]
    .into_iter()
    .enumerate()
    {
        let reply = proxy
            .call(proxy.request(method.clone(), "/v1/models", &[], Bytes::new()))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{method}");
        assert_eq!(
            mock.calls().len(),
            i + 1,
            "{method} reaches the upstream once"
        );
        assert_eq!(mock.calls()[i].method, method.as_str());
    }
    // OPTIONS is CORS's: never forwarded.
    let options = proxy
        .call(proxy.request(Method::OPTIONS, "/v1/models", &[], Bytes::new()))
        .await;
    assert_eq!(options.status, StatusCode::FORBIDDEN);
    assert_eq!(mock.calls().len(), 6);
}

#[tokio::test]
async fn a_model_name_is_at_most_256_bytes() {
    let mock = MockUpstream::start().await;
    let proxy = two_keys(&mock).await;
    let reply = proxy.chat(&"m".repeat(257)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    assert_eq!(reply.error_code(), "model_name_too_long");
    assert!(reply.body.len() < 400, "the name is not echoed");
    assert_eq!(mock.calls().len(), 0);

    let multipart = "--b\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\n".to_owned()
        + &"w".repeat(300)
        + "\r\n--b--\r\n";
    let reply = proxy
        .call(proxy.request(
            Method::POST,
            "/v1/audio/transcriptions",
            &[("content-type", "multipart/form-data; boundary=b")],
            multipart,
        ))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "model_name_too_long");
    assert_eq!(mock.calls().len(), 0);

    let at_limit = proxy.chat(&"m".repeat(256)).await;
    assert_eq!(at_limit.status, StatusCode::OK);
    assert_eq!(mock.calls().len(), 1);
}

#[tokio::test]
async fn cors_is_off_until_configured() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Status {
            status: 200,
            body: r#"{"ok":true}"#.to_owned(),
            headers: vec![("access-control-allow-origin".to_owned(), "*".to_owned())],
        },
    );
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |_| {}).await;
    let preflight = proxy
        .call(proxy.request(
            Method::OPTIONS,
            "/v1/chat/completions",
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "POST"),
            ],
            Bytes::new(),
        ))
        .await;
    assert_eq!(preflight.status, StatusCode::FORBIDDEN);
    assert_eq!(preflight.json()["error"]["type"], "invalid_request_error");
    assert_eq!(preflight.error_code(), "origin_not_allowed");
    let reply = proxy
        .call(proxy.request(
            Method::GET,
            "/v1/models",
            &[("origin", "https://app.example.com")],
            Bytes::new(),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        mock.calls().len(),
        1,
        "the preflight never reached the upstream"
    );
    for headers in [&reply.headers, &preflight.headers] {
        let cors: Vec<_> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .collect();
        assert!(cors.is_empty(), "{cors:?}");
    }

    let any = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.cors.allowed_origins = vec!["*".to_owned()];
    })
    .await;
    let reply = any
        .call(any.request(
            Method::GET,
            "/v1/models",
            &[("origin", "https://anything.test")],
            Bytes::new(),
        ))
        .await;
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
}

#[tokio::test]
async fn oversized_and_malformed_heads_are_answered_and_counted() {
    let mock = MockUpstream::start().await;
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.server.max_header_bytes = 16_384;
    })
    .await;
    // Between the limit and twice it: the proxy's own 431, in OpenAI's shape.
    let head = format!(
        "GET /v1/models HTTP/1.1\r\nhost: kcp\r\nx-filler: {}\r\n\r\n",
        "f".repeat(20_000)
    );
    let reply = raw(proxy.addr, head.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    assert!(
        reply.contains(r#""code":"request_header_too_large""#),
        "{reply}"
    );
    // Past twice the limit: hyper's own 431, counted.
    let head = format!(
        "GET /v1/models HTTP/1.1\r\nhost: kcp\r\nx-filler: {}\r\n\r\n",
        "f".repeat(40_000)
    );
    let reply = raw(proxy.addr, head.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    // Not HTTP at all: hyper's own 400, counted.
    let reply = raw(proxy.addr, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert_eq!(mock.calls().len(), 0);
    let errors = "kcp_client_connection_errors_total";
    assert_eq!(
        metric(&proxy, &format!("{errors}{{kind=\"head_too_large\"}}")).await,
        1.0
    );
    assert_eq!(
        metric(&proxy, &format!("{errors}{{kind=\"malformed\"}}")).await,
        1.0
    );
    assert_eq!(proxy.get("/v1/models").await.status, StatusCode::OK);
}
