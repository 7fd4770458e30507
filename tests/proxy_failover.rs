//! End-to-end: failover, retries, waiting and giving up, by error class, with the exact
//! number of upstream calls each scenario may make.

mod support;

use std::time::Duration;

use http::StatusCode;
use key_cycle_proxy::core::{DisableReason, KeyStatus};
use support::proxy_harness::{
    Proxy, Reply, client, closed_port_url, loaded_config, read, resolved_key, send_with,
    start_loaded, start_proxy,
};
use support::time::{advance, advance_until, eventually, finish, freeze, still_running};
use support::{Behaviour, KEY_A, KEY_B, MockUpstream, two_keys};

/// Steps of paused time for requests that only back off between tries.
const STEP: Duration = Duration::from_millis(10);
/// The test config's `retry_max_backoff_ms`.
const BACKOFF_CAP: Duration = Duration::from_millis(50);
/// Paused time a request may take before a test gives up on it.
const WAIT_LIMIT: Duration = Duration::from_secs(5);

/// No trace of a provider's key-rejection body (which quotes a masked key) in a reply.
fn assert_no_key_leak(reply: &Reply) {
    let text = String::from_utf8_lossy(&reply.body);
    for leak in [
        "Incorrect API key",
        "sk-te",
        "***",
        "current quota",
        "Country",
    ] {
        assert!(!text.contains(leak), "reply leaks {leak:?}: {text}");
    }
}

/// Sends four chats with key A answering `behaviour`: A is called once and then avoided,
/// B serves everything, and the client never sees A's answer.
async fn fails_over_once(behaviour: Behaviour) -> Proxy {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, behaviour);
    let proxy = two_keys(&mock, |_| {}).await;
    for _ in 0..4 {
        let reply = proxy.chat("gpt-4o").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_no_key_leak(&reply);
    }
    assert_eq!(mock.calls_for(KEY_A), 1, "A is tried once, then left alone");
    assert_eq!(mock.calls_for(KEY_B), 4);
    proxy
}

#[tokio::test]
async fn unauthorized_key_fails_over_and_is_disabled() {
    let proxy = fails_over_once(Behaviour::Unauthorized).await;
    assert_eq!(
        proxy.key_status(KEY_A),
        (KeyStatus::Disabled, Some(DisableReason::Unauthorized))
    );
}

#[tokio::test]
async fn a_region_403_fails_over_and_refuses_only_the_model() {
    let proxy = fails_over_once(Behaviour::Forbidden).await;
    assert_eq!(proxy.key_status(KEY_A), (KeyStatus::Available, None));
}

#[tokio::test]
async fn exhausted_quota_fails_over_and_is_disabled() {
    let proxy = fails_over_once(Behaviour::InsufficientQuota).await;
    assert_eq!(
        proxy.key_status(KEY_A),
        (KeyStatus::Disabled, Some(DisableReason::QuotaExhausted))
    );
}

#[tokio::test]
async fn rate_limited_key_fails_over_and_cools() {
    let proxy = fails_over_once(Behaviour::rate_limited_secs(30)).await;
    assert_eq!(proxy.key_status(KEY_A), (KeyStatus::Cooling, None));
}

#[tokio::test]
async fn server_error_is_retried_then_succeeds() {
    let mock = MockUpstream::start().await;
    mock.script(
        KEY_A,
        vec![
            Behaviour::status(500),
            Behaviour::status(502),
            Behaviour::Ok,
        ],
    );
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.upstream.max_retries = 3;
    })
    .await;
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["model"], "gpt-4o");
    assert_eq!(mock.calls().len(), 3);
}

#[tokio::test]
async fn server_error_on_every_try_passes_the_last_answer_through() {
    let mock = MockUpstream::start().await;
    let provider_body =
        r#"{"error":{"message":"engine exploded","type":"server_error","param":null,"code":null}}"#;
    mock.set_default(Behaviour::Status {
        status: 500,
        body: provider_body.to_owned(),
        headers: vec![("x-provider-trace".to_owned(), "t-1".to_owned())],
    });
    let proxy = two_keys(&mock, |config| config.upstream.max_retries = 3).await;
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.text(), provider_body, "the provider's own body");
    assert_eq!(reply.header("x-provider-trace"), Some("t-1"));
    assert_eq!(mock.calls().len(), 4, "max_retries + 1 calls");
    assert_eq!(mock.calls_for(KEY_A), 2, "retries alternate between keys");
    assert_eq!(mock.calls_for(KEY_B), 2);
}

#[tokio::test]
async fn retries_reuse_the_only_key() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::status(503));
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.upstream.max_retries = 2;
    })
    .await;
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"]["type"], "server_error");
    assert_eq!(mock.calls_for(KEY_A), 3);
}

#[tokio::test]
async fn request_errors_are_passed_through_after_exactly_one_call() {
    let mock = MockUpstream::start().await;
    mock.set_default(Behaviour::status(400));
    let proxy = two_keys(&mock, |config| config.upstream.max_retries = 3).await;
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"]["message"], "Invalid request.");
    assert_eq!(mock.calls().len(), 1, "never retried, never on another key");
    mock.set_default(Behaviour::status(404));
    assert_eq!(
        proxy.get("/v1/models/nope").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(mock.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn refused_connections_end_in_502() {
    let _frozen = freeze();
    let url = closed_port_url().await;
    let proxy = start_proxy(vec![(KEY_A, url, vec!["others"])], |config| {
        config.upstream.max_retries = 1;
    })
    .await;
    // One step covers any backoff: the request needs at most one.
    let (reply, advanced) = finish(proxy.spawn_chat("gpt-4o"), BACKOFF_CAP, WAIT_LIMIT).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error_code(), "upstream_unavailable");
    assert!(
        !reply.text().contains("127.0.0.1"),
        "no upstream address for the client"
    );
    assert!(
        advanced <= BACKOFF_CAP,
        "one backoff, no other wait: {advanced:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hanging_upstream_is_retried_after_a_backoff_then_ends_in_504() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Hang);
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.upstream.request_timeout_ms = 200;
        config.upstream.max_retries = 1;
    })
    .await;
    // With an Idempotency-Key a POST that may have reached the provider may be sent again.
    let mut request = proxy.chat_request("gpt-4o");
    request.headers_mut().insert(
        "idempotency-key",
        http::HeaderValue::from_static("retry-me"),
    );
    let pending = proxy.spawn(request);
    assert!(eventually(|| mock.calls_for(KEY_A) == 1).await);
    advance(Duration::from_millis(199)).await;
    assert!(still_running(&pending).await, "the first try has 200 ms");
    assert_eq!(mock.calls_for(KEY_A), 1);
    // The first try times out at 200 ms; the retry is sent after its backoff, at the step
    // that ends it: the retry then has its own 200 ms, not a millisecond less.
    let to_retry = advance_until(STEP, WAIT_LIMIT, || mock.calls_for(KEY_A) == 2).await;
    assert!(
        to_retry <= BACKOFF_CAP + STEP * 2,
        "one backoff: {to_retry:?}"
    );
    advance(Duration::from_millis(199)).await;
    assert!(still_running(&pending).await, "the retry has 200 ms");
    advance(Duration::from_millis(1)).await;
    assert!(
        eventually(|| pending.is_finished()).await,
        "the retry timed out"
    );
    let reply = pending.await.expect("no panic");
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.error_code(), "upstream_timeout");
    assert_eq!(mock.calls_for(KEY_A), 2, "one retry");
    assert!(
        mock.wait_cancelled(1, Duration::from_secs(2)).await,
        "timed-out requests are dropped upstream"
    );
}

#[tokio::test(start_paused = true)]
async fn all_keys_briefly_rate_limited_means_waiting_then_success() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let limited = Behaviour::RateLimited {
        retry_after: None,
        retry_after_ms: Some("300".to_owned()),
        reset_requests: None,
    };
    mock.script(KEY_A, vec![limited.clone()]);
    mock.script(KEY_B, vec![limited]);
    let proxy = two_keys(&mock, |config| config.rate_limit.max_wait_ms = 2_000).await;
    let pending = proxy.spawn_chat("gpt-4o");
    let resting = |key| proxy.key_status(key).0 == KeyStatus::Cooling;
    assert!(eventually(|| resting(KEY_A) && resting(KEY_B)).await);
    advance(Duration::from_millis(299)).await;
    assert!(still_running(&pending).await, "both keys rest for 300 ms");
    assert_eq!(mock.calls().len(), 2);
    let (reply, advanced) = finish(pending, STEP, WAIT_LIMIT).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        advanced <= STEP,
        "served once the rest is over: {advanced:?}"
    );
    assert_eq!(
        mock.calls().len(),
        3,
        "A, B, then one of them after the rest"
    );
}

#[tokio::test(start_paused = true)]
async fn all_keys_rate_limited_for_long_means_429_with_retry_after() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    mock.set_default(Behaviour::rate_limited_secs(30));
    let proxy = two_keys(&mock, |_| {}).await;
    let pending = proxy.spawn_chat("gpt-4o");
    assert!(
        eventually(|| pending.is_finished()).await,
        "no pointless wait"
    );
    let reply = pending.await.expect("no panic");
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.error_code(), "rate_limit_exceeded");
    assert_eq!(reply.header("retry-after"), Some("30"));
    assert_eq!(mock.calls().len(), 2, "each key once");
    assert_no_key_leak(&reply);

    // Both keys rest now: the next request is answered without an upstream call.
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert_eq!(retry_after, 30, "no time has passed");
    assert_eq!(mock.calls().len(), 2);
    advance(Duration::from_millis(10_500)).await;
    // A fresh connection: the server has closed the idle one meanwhile.
    let reply = read(send_with(&client(), proxy.chat_request("gpt-4o")).await).await;
    assert_eq!(reply.header("retry-after"), Some("20"), "rounded up");
    assert_eq!(mock.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_full_wait_queue_answers_429_at_once() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    mock.set_default(Behaviour::RateLimited {
        retry_after: None,
        retry_after_ms: Some("800".to_owned()),
        reset_requests: None,
    });
    let proxy = two_keys(&mock, |config| config.rate_limit.max_queue = 0).await;
    let pending = proxy.spawn_chat("gpt-4o");
    assert!(
        eventually(|| pending.is_finished()).await,
        "answered at once"
    );
    let reply = pending.await.expect("no panic");
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(mock.calls().len(), 2, "each key once, then no wait");
}

#[tokio::test]
async fn all_keys_rejected_means_503_without_the_providers_words() {
    let mock = MockUpstream::start().await;
    mock.set_default(Behaviour::Unauthorized);
    let proxy = two_keys(&mock, |_| {}).await;
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "no_available_keys");
    assert_no_key_leak(&reply);
    assert_eq!(mock.calls().len(), 2);
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.error_code(), "no_available_keys");
    assert_eq!(mock.calls().len(), 2, "disabled keys are not called");
}

#[tokio::test]
async fn unknown_model_without_fallback_is_404_without_calls() {
    let mock = MockUpstream::start().await;
    let proxy = start_proxy(
        vec![
            (KEY_A, mock.url(), vec!["gpt-4o"]),
            (KEY_B, mock.url(), vec!["gpt-4o-mini"]),
        ],
        |_| {},
    )
    .await;
    let reply = proxy.chat("claude-3").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code(), "model_not_found");
    assert!(reply.text().contains("claude-3"));
    assert_eq!(mock.calls().len(), 0);
    assert_eq!(proxy.chat("gpt-4o-mini").await.status, StatusCode::OK);
    assert_eq!(mock.calls_for(KEY_B), 1);
}

#[tokio::test(start_paused = true)]
async fn a_503_retry_after_within_the_cap_is_waited_out() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let unavailable = Behaviour::Status {
        status: 503,
        body: r#"{"error":{"message":"busy","type":"server_error","param":null,"code":null}}"#
            .to_owned(),
        headers: vec![("retry-after".to_owned(), "1".to_owned())],
    };
    mock.script(KEY_A, vec![unavailable]);
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.upstream.retry_max_backoff_ms = 1_500;
    })
    .await;
    let pending = proxy.spawn_chat("gpt-4o");
    // The key rests from when the proxy read the 503 (at time zero), however late the
    // runtime gets to it.
    assert!(eventually(|| proxy.key_status(KEY_A).0 == KeyStatus::Cooling).await);
    advance(Duration::from_millis(999)).await;
    assert!(still_running(&pending).await, "Retry-After honoured");
    assert_eq!(mock.calls().len(), 1);
    let (reply, advanced) = finish(pending, STEP, WAIT_LIMIT).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        advanced <= STEP,
        "retried once the second is over: {advanced:?}"
    );
    assert_eq!(mock.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_long_503_retry_after_rests_the_key_briefly_and_the_request_moves_on() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Status {
            status: 503,
            body: r#"{"error":{"message":"down for maintenance","type":"server_error","param":null,"code":null}}"#
                .to_owned(),
            headers: vec![("retry-after".to_owned(), "86400".to_owned())],
        },
    );
    let proxy = two_keys(&mock, |_| {}).await;
    let pending = proxy.spawn_chat("gpt-4o");
    let (reply, advanced) = finish(pending, STEP, WAIT_LIMIT).await;
    assert!(
        advanced <= BACKOFF_CAP + STEP,
        "one retry's backoff, not the Retry-After: {advanced:?}"
    );
    assert_eq!(reply.status, StatusCode::OK, "another key serves it");
    assert_eq!((mock.calls_for(KEY_A), mock.calls_for(KEY_B)), (1, 1));
    let snapshot = proxy
        .app
        .pool()
        .snapshot(key_cycle_proxy::server::clock::now());
    let a = snapshot
        .iter()
        .find(|k| k.status != KeyStatus::Available)
        .expect("A rests");
    let rest = a.blocked_secs.expect("resting, not disabled");
    assert!(rest <= 2.0, "at most retry_max_backoff, not a day: {rest}");
}

/// Keys A and B on `mock`, in that order, with these rpm and weights (A first on a tie).
async fn paced_keys(mock: &MockUpstream, keys: [(&str, Option<u32>, u32); 2]) -> Proxy {
    let mut loaded = loaded_config(vec![], |_| {});
    for (key, rpm, weight) in keys {
        let mut key = resolved_key(key, &mock.url(), &["others"]);
        key.rpm = rpm;
        key.weight = weight;
        loaded.keys.push(key);
    }
    start_loaded(loaded).await
}

fn keys_called(mock: &MockUpstream) -> Vec<String> {
    mock.calls()
        .into_iter()
        .map(|c| c.key.expect("a key"))
        .collect()
}

/// A's pace is spent by a first chat; B fails the second chat's first try. The retry finds
/// every key busy: the pool promises it A's next cell, a second away, and the request waits
/// for it rather than asking again (and being promised B's as well) or giving up.
async fn a_retry_waits_for_a(keys: [(&str, Option<u32>, u32); 2]) {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    mock.script(KEY_B, vec![Behaviour::status(500)]);
    let proxy = paced_keys(&mock, keys).await;
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    let pending = proxy.spawn_chat("gpt-4o");
    assert!(eventually(|| mock.calls().len() == 2).await);
    advance(Duration::from_millis(990)).await;
    assert!(
        still_running(&pending).await,
        "A's next cell is a second away"
    );
    let (reply, advanced) = finish(pending, STEP, WAIT_LIMIT).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        advanced <= BACKOFF_CAP,
        "served on A's next cell: {advanced:?}"
    );
    assert_eq!(keys_called(&mock), [KEY_A, KEY_B, KEY_A]);
}

#[tokio::test(start_paused = true)]
async fn a_retry_that_finds_every_key_briefly_busy_waits_instead_of_giving_up() {
    // 60 rpm: one request a second each.
    a_retry_waits_for_a([(KEY_A, Some(60), 1), (KEY_B, Some(60), 1)]).await;
}

#[tokio::test(start_paused = true)]
async fn a_retry_waits_for_an_untried_key_that_frees_up_soon() {
    // B is unpaced and weighs less: the retry still takes A's promised cell instead of
    // going back to B and leaving the promise to delay the requests after it.
    a_retry_waits_for_a([(KEY_A, Some(60), 2), (KEY_B, None, 1)]).await;
}

#[tokio::test(start_paused = true)]
async fn a_retry_goes_back_to_the_failed_key_when_the_others_rest_long() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    mock.script(KEY_A, vec![Behaviour::rate_limited_secs(30)]);
    mock.script(KEY_B, vec![Behaviour::Ok, Behaviour::status(500)]);
    let proxy = two_keys(&mock, |_| {}).await;
    // A rests for 30 s, beyond max_wait: B's failure is retried on B at once.
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    let (reply, advanced) = finish(proxy.spawn_chat("gpt-4o"), BACKOFF_CAP, WAIT_LIMIT).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        advanced <= BACKOFF_CAP,
        "one backoff, no wait for A: {advanced:?}"
    );
    assert_eq!(keys_called(&mock), [KEY_A, KEY_B, KEY_B, KEY_B]);
}
