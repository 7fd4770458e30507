//! Self-test of the mock OpenAI upstream the end-to-end tests run the proxy against.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use support::mock_upstream::{COMPLETION_TEXT, mask_key, sse_events};
use support::time::{advance, eventually, freeze, still_not};
use support::{Behaviour, MockUpstream};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Upper bound for anything that should happen promptly on loopback.
const WAIT: Duration = Duration::from_secs(5);

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn request(method: Method, url: &str, key: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    if let Some(key) = key {
        builder = builder.header("authorization", format!("Bearer {key}"));
    }
    builder
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("valid request")
}

async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Response<Incoming> {
    tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("response head in time")
        .expect("response head")
}

async fn post_chat(client: &HttpClient, mock: &MockUpstream, key: &str) -> Response<Incoming> {
    let url = format!("{}/v1/chat/completions", mock.url());
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    send(client, request(Method::POST, &url, Some(key), body)).await
}

async fn text(response: Response<Incoming>) -> String {
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("body in time")
        .expect("complete body")
        .to_bytes();
    String::from_utf8(body.to_vec()).expect("UTF-8 body")
}

async fn json_of(response: Response<Incoming>) -> Value {
    serde_json::from_str(&text(response).await).expect("JSON body")
}

fn header<'a>(response: &'a Response<Incoming>, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII"))
}

#[tokio::test]
async fn ok_chat_echoes_model_and_records_the_call() {
    let mock = MockUpstream::start().await;
    let url = format!("{}/v1/chat/completions?api-version=2024-06-01", mock.url());
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let mut req = request(Method::POST, &url, Some("sk-alpha-0001"), body);
    req.headers_mut()
        .insert("x-trace", "abc".parse().expect("header value"));

    let response = send(&client(), req).await;

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    assert_eq!(header(&response, "x-request-id"), Some("req_mock_1"));
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), None);
    let reply = json_of(response).await;
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["model"], "gpt-4o");
    assert_eq!(reply["choices"][0]["message"]["content"], COMPLETION_TEXT);

    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.key.as_deref(), Some("sk-alpha-0001"));
    assert_eq!(call.method, "POST");
    assert_eq!(
        call.path_and_query,
        "/v1/chat/completions?api-version=2024-06-01"
    );
    assert_eq!(call.path(), "/v1/chat/completions");
    assert_eq!(call.headers["x-trace"], "abc");
    assert_eq!(call.body, Bytes::from(body));
    assert_eq!(call.json().expect("JSON")["model"], "gpt-4o");
    assert_eq!(call.version, Version::HTTP_11);
    assert_eq!(mock.calls_for("sk-alpha-0001"), 1);
    assert_eq!(mock.calls_for("sk-other"), 0);
    assert_eq!(mock.connections(), 1);
    assert_eq!(mock.cancelled(), 0);
}

#[tokio::test]
async fn script_runs_in_order_then_key_default_then_global_default() {
    let mock = MockUpstream::start().await;
    let client = client();
    mock.set("sk-scripted-1", Behaviour::status(503));
    mock.script(
        "sk-scripted-1",
        vec![Behaviour::Unauthorized, Behaviour::rate_limited_secs(2)],
    );

    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(post_chat(&client, &mock, "sk-scripted-1").await.status());
    }
    assert_eq!(statuses, [401, 429, 503, 503]);

    assert_eq!(post_chat(&client, &mock, "sk-plain-1").await.status(), 200);
    mock.set_default(Behaviour::Forbidden);
    let forbidden = post_chat(&client, &mock, "sk-plain-1").await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        json_of(forbidden).await["error"]["type"],
        "request_forbidden"
    );
    assert_eq!(mock.calls_for("sk-scripted-1"), 4);
    assert_eq!(mock.calls_for("sk-plain-1"), 2);
}

#[tokio::test]
async fn unauthorized_quotes_the_masked_key_never_the_whole_key() {
    let mock = MockUpstream::start().await;
    let client = client();
    mock.set_default(Behaviour::Unauthorized);
    let key = "sk-abcdefghijklmnopqrstuvwxyz";

    let response = post_chat(&client, &mock, key).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body = text(response).await;
    assert!(
        body.contains("Incorrect API key provided: sk-ab***xyz."),
        "{body}"
    );
    assert!(!body.contains(key), "{body}");
    let error: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert_eq!(error["error"]["code"], "invalid_api_key");

    let url = format!("{}/v1/models", mock.url());
    let anonymous = send(&client, request(Method::GET, &url, None, "")).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let message = json_of(anonymous).await["error"]["message"].to_string();
    assert!(
        message.contains("You didn't provide an API key"),
        "{message}"
    );
    assert_eq!(mask_key("sk-short"), "***");
}

#[tokio::test]
async fn rate_limits_and_quota_carry_openai_headers_and_codes() {
    let mock = MockUpstream::start().await;
    let client = client();
    mock.set(
        "sk-limited-1",
        Behaviour::RateLimited {
            retry_after: Some("7".into()),
            retry_after_ms: Some("6500".into()),
            reset_requests: Some("6.5s".into()),
        },
    );
    mock.set(
        "sk-bare-429",
        Behaviour::RateLimited {
            retry_after: None,
            retry_after_ms: None,
            reset_requests: None,
        },
    );
    mock.set("sk-broke-1", Behaviour::InsufficientQuota);
    mock.set(
        "sk-healthy-1",
        Behaviour::OkWithLimits {
            limit_requests: 500,
            remaining_requests: 499,
            reset_requests: "120ms".into(),
            limit_tokens: 30000,
            remaining_tokens: 29900,
            reset_tokens: "200ms".into(),
        },
    );

    let limited = post_chat(&client, &mock, "sk-limited-1").await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&limited, "retry-after"), Some("7"));
    assert_eq!(header(&limited, "retry-after-ms"), Some("6500"));
    assert_eq!(header(&limited, "x-ratelimit-reset-requests"), Some("6.5s"));
    assert_eq!(
        header(&limited, "x-ratelimit-remaining-requests"),
        Some("0")
    );
    let error = json_of(limited).await;
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(error["error"]["type"], "requests");
    let message = error["error"]["message"].as_str().expect("message");
    assert!(
        message.starts_with("Rate limit reached for gpt-4o"),
        "{message}"
    );

    let bare = post_chat(&client, &mock, "sk-bare-429").await;
    assert_eq!(bare.status(), StatusCode::TOO_MANY_REQUESTS);
    for name in [
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-reset-requests",
    ] {
        assert_eq!(header(&bare, name), None, "{name}");
    }

    let broke = post_chat(&client, &mock, "sk-broke-1").await;
    assert_eq!(broke.status(), StatusCode::TOO_MANY_REQUESTS);
    let error = json_of(broke).await;
    assert_eq!(error["error"]["type"], "insufficient_quota");
    assert_eq!(error["error"]["code"], "insufficient_quota");

    let healthy = post_chat(&client, &mock, "sk-healthy-1").await;
    assert_eq!(healthy.status(), StatusCode::OK);
    assert_eq!(header(&healthy, "x-ratelimit-limit-requests"), Some("500"));
    assert_eq!(
        header(&healthy, "x-ratelimit-remaining-requests"),
        Some("499")
    );
    assert_eq!(
        header(&healthy, "x-ratelimit-reset-requests"),
        Some("120ms")
    );
    assert_eq!(header(&healthy, "x-ratelimit-limit-tokens"), Some("30000"));
    assert_eq!(
        header(&healthy, "x-ratelimit-remaining-tokens"),
        Some("29900")
    );
    assert_eq!(header(&healthy, "x-ratelimit-reset-tokens"), Some("200ms"));
}

#[tokio::test]
async fn ok_answers_each_endpoint_in_openai_shape() {
    let mock = MockUpstream::start().await;
    let client = client();
    let base = mock.url();
    let key = Some("sk-endpoints-1");
    let get = |path: &str| request(Method::GET, &format!("{base}{path}"), key, "");

    let models = json_of(send(&client, get("/v1/models")).await).await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["object"], "model");

    let embeddings_body = r#"{"model":"text-embedding-3-small","input":["a","b"]}"#;
    let url = format!("{base}/v1/embeddings");
    let embeddings = send(&client, request(Method::POST, &url, key, embeddings_body)).await;
    let embeddings = json_of(embeddings).await;
    assert_eq!(embeddings["model"], "text-embedding-3-small");
    assert_eq!(embeddings["data"].as_array().map(Vec::len), Some(2));

    let url = format!("{base}/v1/audio/transcriptions");
    let transcription = send(&client, request(Method::POST, &url, key, "--multipart--")).await;
    assert_eq!(
        json_of(transcription).await,
        json!({ "text": COMPLETION_TEXT })
    );

    let file = json_of(send(&client, get("/v1/files/file-abc123")).await).await;
    assert_eq!(file["id"], "file-abc123");
    assert_eq!(file["object"], "file");
    let url = format!("{base}/v1/files/file-abc123");
    let deleted = send(&client, request(Method::DELETE, &url, key, "")).await;
    assert_eq!(
        json_of(deleted).await,
        json!({ "id": "file-abc123", "object": "file", "deleted": true })
    );

    let other = json_of(send(&client, get("/v1/v1/odd?x=1")).await).await;
    assert_eq!(other, json!({ "ok": true, "path": "/v1/v1/odd" }));

    mock.set_default(Behaviour::Status {
        status: 418,
        body: "teapot".into(),
        headers: vec![
            ("content-type".into(), "text/plain".into()),
            ("x-extra".into(), "1".into()),
        ],
    });
    let teapot = send(&client, get("/v1/anything")).await;
    assert_eq!(teapot.status(), StatusCode::IM_A_TEAPOT);
    assert_eq!(header(&teapot, "content-type"), Some("text/plain"));
    assert_eq!(header(&teapot, "x-extra"), Some("1"));
    assert_eq!(header(&teapot, "x-request-id"), Some("req_mock_7"));
    assert_eq!(text(teapot).await, "teapot");
    assert_eq!(mock.calls().len(), 7);
}

#[tokio::test(start_paused = true)]
async fn stream_arrives_frame_by_frame() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let interval = Duration::from_millis(20);
    mock.set_default(Behaviour::Stream {
        chunks: 3,
        interval,
    });
    let response = post_chat(&client(), &mock, "sk-stream-1").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-type"), Some("text/event-stream"));

    let arrived = Arc::new(std::sync::Mutex::new(Vec::<Bytes>::new()));
    let sink = Arc::clone(&arrived);
    let mut body = response.into_body();
    let reader = tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("clean stream").into_data() {
                sink.lock().expect("not poisoned").push(data);
            }
        }
    });
    let count = || arrived.lock().expect("not poisoned").len();
    // One event at once, then one per interval of paused time, never earlier.
    assert!(eventually(|| count() == 1).await, "the first event at once");
    for n in 2..=4 {
        advance(interval - Duration::from_millis(1)).await;
        assert!(
            still_not(|| count() == n).await,
            "event {n} before its interval"
        );
        advance(Duration::from_millis(1)).await;
        assert!(
            eventually(|| count() == n).await,
            "event {n} after its interval"
        );
    }
    assert!(eventually(|| reader.is_finished()).await, "the stream ends");
    let frames = arrived.lock().expect("not poisoned").clone();
    let received: Vec<u8> = frames.concat();
    let expected: Vec<u8> = sse_events("gpt-4o", 3).concat();
    assert_eq!(received, expected);
    let text = String::from_utf8(received).expect("UTF-8");
    assert!(text.contains("\"tok2 \"") && text.ends_with("data: [DONE]\n\n"));
    assert_eq!(mock.cancelled(), 0);
}

#[tokio::test]
async fn stream_then_reset_makes_the_client_see_an_error() {
    let mock = MockUpstream::start().await;
    mock.set_default(Behaviour::StreamThenReset { chunks: 2 });
    let response = post_chat(&client(), &mock, "sk-reset-1").await;
    assert_eq!(response.status(), StatusCode::OK);

    let mut body = response.into_body();
    let mut received = Vec::new();
    let outcome = loop {
        match tokio::time::timeout(WAIT, body.frame()).await {
            Err(_) => panic!("stream neither ended nor failed in time"),
            Ok(None) => break Ok(()),
            Ok(Some(Err(error))) => break Err(error),
            Ok(Some(Ok(frame))) => received.extend(frame.into_data().unwrap_or_default()),
        }
    };

    assert!(outcome.is_err(), "a reset must not look like a clean end");
    assert_eq!(received, sse_events("gpt-4o", 2)[..2].concat());
    assert_eq!(mock.cancelled(), 0);
}

#[tokio::test]
async fn hang_counts_as_cancelled_once_the_client_gives_up() {
    let mock = MockUpstream::start().await;
    mock.set("sk-hang-1", Behaviour::Hang);
    let client = client();
    let url = format!("{}/v1/chat/completions", mock.url());
    let req = request(Method::POST, &url, Some("sk-hang-1"), "{}");
    let pending = tokio::spawn(async move { client.request(req).await });

    assert!(mock.wait_calls(1, WAIT).await, "the hung request arrives");
    assert!(!pending.is_finished(), "no response head while hanging");
    assert_eq!(mock.cancelled(), 0);
    pending.abort();

    assert!(mock.wait_cancelled(1, WAIT).await, "drop reaches the mock");
    assert_eq!(mock.cancelled(), 1);
}

#[tokio::test]
async fn dropping_a_stream_midway_counts_as_cancelled() {
    let mock = MockUpstream::start().await;
    mock.set_default(Behaviour::Stream {
        chunks: 5,
        interval: Duration::from_secs(30),
    });
    let response = post_chat(&client(), &mock, "sk-stream-2").await;
    let mut body = response.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first event in time")
        .expect("a frame")
        .expect("data");
    assert!(first.is_data());
    drop(body);

    assert!(mock.wait_cancelled(1, WAIT).await, "drop reaches the mock");
}

#[tokio::test]
async fn waits_are_bounded() {
    let mock = MockUpstream::start().await;
    assert!(!mock.wait_calls(1, Duration::from_millis(20)).await);
    assert!(!mock.wait_cancelled(1, Duration::from_millis(20)).await);
}

#[tokio::test]
async fn plain_h2_prior_knowledge_is_served() {
    let mock = MockUpstream::start().await;
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let response = post_chat(&client, &mock, "sk-h2-1").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json_of(response).await["model"], "gpt-4o");
    assert_eq!(mock.calls()[0].version, Version::HTTP_2);

    mock.set("sk-h2-reset", Behaviour::StreamThenReset { chunks: 2 });
    let mut body = post_chat(&client, &mock, "sk-h2-reset").await.into_body();
    let mut received = Vec::new();
    let error = loop {
        match tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("frame in time")
        {
            None => panic!("a reset must not look like a clean end"),
            Some(Err(error)) => break error,
            Some(Ok(frame)) => received.extend(frame.into_data().unwrap_or_default()),
        }
    };
    assert!(!error.to_string().is_empty());
    assert_eq!(received, sse_events("gpt-4o", 2)[..2].concat());

    mock.set("sk-h2-hang", Behaviour::Hang);
    let hung = client.request(request(
        Method::POST,
        &format!("{}/v1/chat/completions", mock.url()),
        Some("sk-h2-hang"),
        "{}",
    ));
    let gave_up = tokio::time::timeout(Duration::from_millis(50), hung).await;
    assert!(gave_up.is_err(), "no response head while hanging");
    assert!(
        mock.wait_cancelled(1, WAIT).await,
        "RST_STREAM reaches the mock"
    );
    assert_eq!(mock.connections(), 1, "one h2 connection for everything");
}

/// Sends `req` over TLS trusting only the mock's CA, negotiating `alpn`.
async fn tls_send(
    mock: &MockUpstream,
    server_name: ServerName<'static>,
    alpn: &[u8],
    req: Request<Full<Bytes>>,
) -> Response<Incoming> {
    let pem = std::fs::read(mock.ca_file().expect("TLS mock has a CA file")).expect("read CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("PEM certificate")).expect("CA cert");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];

    let exchange = async {
        let tcp = TcpStream::connect(mock.addr()).await.expect("connect");
        let tls = TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .expect("TLS handshake verifies against the CA");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        let io = TokioIo::new(tls);
        if alpn == b"h2" {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
            tokio::spawn(conn);
            sender.send_request(req).await.expect("h2 response")
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("http1 handshake");
            tokio::spawn(conn);
            sender.send_request(req).await.expect("http1 response")
        }
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .expect("TLS exchange in time")
}

#[tokio::test]
async fn tls_variant_answers_over_http1_and_h2() {
    let mock = MockUpstream::start_tls().await;
    let port = mock.addr().port();
    assert_eq!(mock.url(), format!("https://localhost:{port}"));
    let ca_file = mock.ca_file().expect("CA file").to_path_buf();
    assert!(ca_file.exists());
    assert!(
        mock.ca_pem()
            .expect("CA PEM")
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let body = r#"{"model":"gpt-4o-mini"}"#;
    let localhost = ServerName::try_from("localhost").expect("DNS name");

    let h1 = Request::post("/v1/chat/completions")
        .header("host", format!("localhost:{port}"))
        .header("authorization", "Bearer sk-tls-1")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let response = tls_send(&mock, localhost.clone(), b"http/1.1", h1).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json_of(response).await["model"], "gpt-4o-mini");

    let h2 = Request::post(format!("{}/v1/chat/completions", mock.url()))
        .header("authorization", "Bearer sk-tls-2")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let response = tls_send(&mock, localhost, b"h2", h2).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2);
    text(response).await;

    let by_ip = Request::get("/v1/models")
        .header("host", format!("127.0.0.1:{port}"))
        .header("authorization", "Bearer sk-tls-3")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let response = tls_send(&mock, ip, b"http/1.1", by_ip).await;
    assert_eq!(response.status(), StatusCode::OK);

    let calls = mock.calls();
    let keys: Vec<_> = calls.iter().map(|c| c.key.as_deref()).collect();
    assert_eq!(keys, [Some("sk-tls-1"), Some("sk-tls-2"), Some("sk-tls-3")]);
    assert_eq!(calls[1].version, Version::HTTP_2);
    assert_eq!(mock.connections(), 3);

    drop(mock);
    assert!(!ca_file.exists(), "CA file removed on drop");
}

#[tokio::test]
async fn dropping_the_mock_stops_the_server() {
    let mock = MockUpstream::start().await;
    let addr = mock.addr();
    drop(mock);
    let refused = async {
        // The accept task is aborted asynchronously; the listener closes at its next poll.
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    };
    assert!(tokio::time::timeout(WAIT, refused).await.is_ok());
}
