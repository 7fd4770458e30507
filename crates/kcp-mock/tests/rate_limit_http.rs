//! The rate limit as a client sees it over HTTP: burst served with OpenAI's headers, then 429.

use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kcp_mock::{Behaviour, MockUpstream, RateLimit};
use serde_json::Value;

async fn chat(mock: &MockUpstream, key: &str) -> (u16, http::HeaderMap, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::post(format!("{}/v1/chat/completions", mock.url()))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .expect("request");
    let response = client.request(request).await.expect("mock answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&body).expect("JSON body"),
    )
}

#[tokio::test]
async fn a_limited_key_serves_its_burst_then_answers_429_with_openai_headers() {
    let mock = MockUpstream::start().await;
    let rpm = NonZeroU32::new(60).expect("non-zero");
    mock.limit("sk-busy", RateLimit::per_minute(rpm));
    for left in ["2", "1", "0"] {
        let (status, headers, _) = chat(&mock, "sk-busy").await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-ratelimit-limit-requests"], "60");
        assert_eq!(headers["x-ratelimit-remaining-requests"], left);
    }
    let (status, headers, body) = chat(&mock, "sk-busy").await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    let retry_ms: u64 = headers["retry-after-ms"]
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("integer milliseconds");
    assert!(
        (900..=1_000).contains(&retry_ms),
        "retry-after-ms {retry_ms}"
    );
    assert_eq!(headers["retry-after"], "1");
    // Other keys are not metered.
    let (status, headers, _) = chat(&mock, "sk-free").await;
    assert_eq!(status, 200);
    assert!(headers.get("x-ratelimit-limit-requests").is_none());
    assert_eq!(mock.seen("sk-busy"), 4);
    assert_eq!(mock.rate_limited(), 1);
}

#[tokio::test]
async fn latency_holds_answers_but_not_a_spent_buckets_429() {
    let mock = std::sync::Arc::new(MockUpstream::start().await);
    let rpm = NonZeroU32::new(60).expect("non-zero");
    // One request's worth of bucket: the second request at once is refused.
    mock.limit(
        "sk-busy",
        RateLimit::per_minute(rpm).with_burst(Duration::from_secs(1)),
    );
    let (status, _, _) = chat(&mock, "sk-busy").await;
    assert_eq!(status, 200);
    mock.set_latency(Duration::from_secs(3_600));
    let held = tokio::spawn({
        let mock = std::sync::Arc::clone(&mock);
        async move { chat(&mock, "sk-free").await }
    });
    let (status, _, body) = tokio::time::timeout(Duration::from_secs(10), chat(&mock, "sk-busy"))
        .await
        .expect("a refusal is not held");
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(mock.rate_limited(), 1);
    assert!(
        mock.wait_calls(3, Duration::from_secs(10)).await,
        "the held request arrived"
    );
    assert!(!held.is_finished(), "an answer held for an hour came back");
    held.abort();
}

#[tokio::test]
async fn a_flaky_key_fails_every_nth_call() {
    let mock = MockUpstream::start().await;
    mock.set(
        "sk-flaky",
        Behaviour::Flaky {
            every: 3,
            status: 503,
        },
    );
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(chat(&mock, "sk-flaky").await.0);
    }
    assert_eq!(statuses, [200, 200, 503, 200, 200, 503]);
}
