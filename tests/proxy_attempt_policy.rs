//! End-to-end: the attempt policy's rules where a client sees them, with the exact status,
//! error code, keys and number of upstream calls.

mod support;

use http::{Method, StatusCode};
use key_cycle_proxy::core::{DisableReason, KeyStatus};
use key_cycle_proxy::server::clock;
use support::proxy_harness::{Proxy, closed_port_url, start_proxy};
use support::{Behaviour, MockUpstream};

const KEY_A: &str = "sk-test-alpha-000000000001";
const KEY_B: &str = "sk-test-bravo-000000000002";
const KEY_C: &str = "sk-test-charl-000000000003";

async fn three_keys(
    mock: &MockUpstream,
    tweak: impl FnOnce(&mut key_cycle_proxy::server::config::Config),
) -> Proxy {
    start_proxy(
        vec![
            (KEY_A, mock.url(), vec!["others"]),
            (KEY_B, mock.url(), vec!["others"]),
            (KEY_C, mock.url(), vec!["others"]),
        ],
        tweak,
    )
    .await
}

fn chat_body(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

fn statuses(proxy: &Proxy) -> Vec<(KeyStatus, Option<DisableReason>)> {
    proxy
        .app
        .pool()
        .snapshot(clock::now())
        .into_iter()
        .map(|k| (k.status, k.disabled_reason))
        .collect()
}

#[tokio::test]
async fn a_forbidden_model_leaves_every_key_serving_other_models() {
    let mock = MockUpstream::start().await;
    let forbidden = Behaviour::Status {
        status: 403,
        body: r#"{"error":{"message":"Project `proj_x` does not have access to model `o3`. Key sk-proj-ab***cd","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#.to_owned(),
        headers: vec![],
    };
    let proxy = three_keys(&mock, |_| {}).await;
    for key in [KEY_A, KEY_B, KEY_C] {
        mock.script(key, vec![forbidden.clone()]);
    }
    let reply = proxy.chat("o3").await;
    assert_eq!(
        reply.status,
        StatusCode::FORBIDDEN,
        "the provider's own answer"
    );
    assert_eq!(reply.error_code(), "model_not_found");
    assert!(
        !reply.text().contains("ab***cd"),
        "key fragments masked: {}",
        reply.text()
    );
    assert_eq!(mock.calls().len(), 3, "each key asked once");

    // A second request for the model is answered without a call.
    let again = proxy.chat("o3").await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(again.error_code(), "model_not_found");
    assert_eq!(mock.calls().len(), 3);

    // Every key still serves every other model, and the proxy is ready.
    assert!(
        statuses(&proxy)
            .iter()
            .all(|s| *s == (KeyStatus::Available, None))
    );
    for _ in 0..3 {
        assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    }
    for key in [KEY_A, KEY_B, KEY_C] {
        assert_eq!(mock.calls_for(key), 2, "{key}: one refusal, one chat");
    }
    assert_eq!(proxy.get("/ready").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_402_disables_the_key_for_billing_and_the_next_key_serves() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::status(402));
    let proxy = three_keys(&mock, |config| config.upstream.max_retries = 0).await;
    for _ in 0..3 {
        assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    }
    assert_eq!(mock.calls_for(KEY_A), 1);
    assert_eq!(mock.calls_for(KEY_B) + mock.calls_for(KEY_C), 3);
    assert_eq!(
        statuses(&proxy)[0],
        (KeyStatus::Disabled, Some(DisableReason::Billing))
    );
}

#[tokio::test]
async fn key_failovers_do_not_count_against_max_retries() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Unauthorized);
    mock.set(KEY_B, Behaviour::InsufficientQuota);
    let proxy = three_keys(&mock, |config| config.upstream.max_retries = 0).await;
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        (
            mock.calls_for(KEY_A),
            mock.calls_for(KEY_B),
            mock.calls_for(KEY_C)
        ),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn a_request_too_large_for_every_key_is_answered_once() {
    let mock = MockUpstream::start().await;
    mock.set_default(Behaviour::Status {
        status: 429,
        body: r#"{"error":{"message":"Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 50000.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#.to_owned(),
        headers: vec![],
    });
    let proxy = three_keys(&mock, |_| {}).await;
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(reply.text().contains("Request too large"));
    assert_eq!(mock.calls().len(), 1, "no fan-out over the pool");
    assert!(
        statuses(&proxy).iter().all(|s| s.0 == KeyStatus::Available),
        "too large is not a rate limit"
    );
}

#[tokio::test]
async fn a_timed_out_post_is_replayed_only_with_an_idempotency_key() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Hang);
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.upstream.request_timeout_ms = 200;
        config.upstream.max_retries = 1;
    })
    .await;
    let body = chat_body("gpt-4o");
    let json = ("content-type", "application/json");
    let plain = proxy
        .call(proxy.request(Method::POST, "/v1/chat/completions", &[json], body.clone()))
        .await;
    assert_eq!(plain.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(plain.error_code(), "upstream_timeout");
    assert_eq!(
        mock.calls_for(KEY_A),
        1,
        "it may have been billed: not sent again"
    );

    let keyed = proxy
        .call(proxy.request(
            Method::POST,
            "/v1/chat/completions",
            &[json, ("idempotency-key", "req-42")],
            body,
        ))
        .await;
    assert_eq!(keyed.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(mock.calls_for(KEY_A), 3, "one retry for the keyed request");
    let replayed = mock.calls();
    assert_eq!(
        replayed[2]
            .headers
            .get("idempotency-key")
            .map(|v| v.as_bytes()),
        Some(&b"req-42"[..]),
        "the provider sees the same key on the replay"
    );
}

#[tokio::test]
async fn an_unreachable_provider_is_reported_as_unavailable_never_as_rate_limited() {
    let closed = closed_port_url().await;
    let proxy = start_proxy(vec![(KEY_A, closed, vec!["others"])], |config| {
        config.upstream.max_retries = 1;
    })
    .await;
    let mut seen = Vec::new();
    for _ in 0..8 {
        let reply = proxy.chat("gpt-4o").await;
        assert_ne!(
            reply.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            reply.text()
        );
        assert_eq!(reply.error_code(), "upstream_unavailable");
        seen.push(reply.status);
    }
    assert_eq!(
        seen[0],
        StatusCode::BAD_GATEWAY,
        "the connect failure itself"
    );
    assert_eq!(
        seen.last(),
        Some(&StatusCode::SERVICE_UNAVAILABLE),
        "then the open circuit, without a call: {seen:?}"
    );
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        reply.header("retry-after").is_some(),
        "an honest Retry-After"
    );
}

#[tokio::test]
async fn a_proxy_429_says_when_to_retry_and_what_the_pool_has_left() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::rate_limited_secs(60));
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |_| {}).await;
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.error_code(), "rate_limit_exceeded");
    assert_eq!(
        mock.calls().len(),
        1,
        "the rest is longer than max_wait: no wait, no call"
    );
    assert_eq!(reply.header("retry-after"), Some("60"));
    let millis: u64 = reply
        .header("retry-after-ms")
        .expect("retry-after-ms")
        .parse()
        .expect("a number");
    assert!((59_000..=60_000).contains(&millis), "{millis}");
    for name in [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
    ] {
        assert!(reply.header(name).is_some(), "{name}");
    }
}
