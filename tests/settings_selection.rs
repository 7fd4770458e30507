//! End-to-end: the settings that decide which key serves, through the server: a key's
//! `weight` and `tpm`, `[keys] unhealthy_penalty` and `[rate_limit] default_completion_tokens`.
//! Each test pins how many requests each key serves, in paused time (see `support::time`) so
//! that no token or request budget refills while it runs.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use key_cycle_proxy::server::config::Config;
use support::proxy_harness::{Proxy, loaded_config, resolved_key, start_loaded};
use support::time::{advance, finish, freeze, still_running};
use support::{Behaviour, KEY_A, KEY_B, MockUpstream};

const STEP: Duration = Duration::from_millis(1);

/// Keys `(key, weight, tpm)` on `mock`, in that order, and the test config after `tweak`.
async fn keys(
    mock: &MockUpstream,
    keys: &[(&str, u32, Option<u32>)],
    tweak: impl FnOnce(&mut Config),
) -> Proxy {
    let mut loaded = loaded_config(vec![], tweak);
    for (key, weight, tpm) in keys {
        let mut key = resolved_key(key, &mock.url(), &["others"]);
        key.weight = *weight;
        key.tpm = *tpm;
        loaded.keys.push(key);
    }
    start_loaded(loaded).await
}

/// Sends `n` chats one after the other; each must succeed.
async fn chats(proxy: &Proxy, n: usize) {
    for i in 0..n {
        let reply = proxy.chat("gpt-4o").await;
        assert_eq!(reply.status, StatusCode::OK, "chat {i}: {}", reply.text());
    }
}

/// A chat whose body is exactly 100 bytes (25 prompt tokens by the proxy's estimate), with
/// `max_tokens` if given.
fn chat_body(max_tokens: Option<u32>) -> String {
    let head = match max_tokens {
        Some(n) => format!(r#"{{"model":"gpt-4o","max_tokens":{n},"messages":[],"pad":""#),
        None => r#"{"model":"gpt-4o","messages":[],"pad":""#.to_owned(),
    };
    let body = format!("{head}{}\"}}", "x".repeat(100 - head.len() - 2));
    assert_eq!(body.len(), 100);
    body
}

/// One key of `tpm` tokens a minute, whose provider reports `x-ratelimit-remaining-tokens: 0`
/// and no limit: the configured `tpm` is the limit, and so the refill rate. A first chat
/// spends the budget; a second of `body` must wait until `tpm` refills its estimated tokens.
/// Checks that it waits exactly `wait` of paused time.
async fn second_chat_waits(tpm: u32, body: &str, wait: Duration, tweak: impl FnOnce(&mut Config)) {
    let mock = MockUpstream::start().await;
    mock.set_default(Behaviour::Status {
        status: 200,
        body: r#"{"object":"chat.completion","choices":[]}"#.to_owned(),
        headers: vec![("x-ratelimit-remaining-tokens".to_owned(), "0".to_owned())],
    });
    let proxy = keys(&mock, &[(KEY_A, 1, Some(tpm))], |config| {
        config.rate_limit.max_wait_ms = 60_000;
        tweak(config);
    })
    .await;
    assert_eq!(
        proxy.post("/v1/chat/completions", body).await.status,
        StatusCode::OK
    );
    let pending = proxy.spawn(proxy.request(
        Method::POST,
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        body.to_owned(),
    ));
    advance(wait - STEP).await;
    assert!(
        still_running(&pending).await,
        "tpm {tpm}: sent before {wait:?}"
    );
    assert_eq!(mock.calls().len(), 1);
    let (reply, advanced) = finish(pending, STEP, wait).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        advanced <= STEP * 2,
        "tpm {tpm}: sent {advanced:?} after {wait:?}"
    );
    assert_eq!(mock.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn weight_sets_each_keys_share() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let proxy = keys(&mock, &[(KEY_A, 3, None), (KEY_B, 1, None)], |_| {}).await;
    chats(&proxy, 8).await;
    assert_eq!((mock.calls_for(KEY_A), mock.calls_for(KEY_B)), (6, 2));
}

#[tokio::test(start_paused = true)]
async fn configured_tpm_sets_the_refill_and_default_completion_tokens_the_need() {
    let _frozen = freeze();
    let ms = Duration::from_millis;
    // 25 prompt tokens + 256 assumed completion tokens = 281 at 100 tokens a second.
    second_chat_waits(6_000, &chat_body(None), ms(2_810), |_| {}).await;
    // Ten times the tpm, a tenth of the wait.
    second_chat_waits(60_000, &chat_body(None), ms(281), |_| {}).await;
    // 25 + 100 assumed = 125 tokens.
    let fewer = |config: &mut Config| config.rate_limit.default_completion_tokens = 100;
    second_chat_waits(6_000, &chat_body(None), ms(1_250), fewer).await;
    // A request's own max_tokens wins over the default: 25 + 15 = 40 tokens.
    second_chat_waits(6_000, &chat_body(Some(15)), ms(400), |_| {}).await;
}

/// Key A fails once (a 500, retried on B); then `n` chats. How many went to A among them.
async fn share_of_a_failed_key(unhealthy_penalty: u32, n: usize) -> usize {
    let mock = MockUpstream::start().await;
    mock.script(KEY_A, vec![Behaviour::status(500)]);
    let proxy = keys(&mock, &[(KEY_A, 1, None), (KEY_B, 1, None)], |config| {
        config.keys.unhealthy_penalty = unhealthy_penalty;
        config.upstream.retry_initial_backoff_ms = 0;
        config.upstream.retry_max_backoff_ms = 0;
    })
    .await;
    chats(&proxy, 1).await;
    assert_eq!((mock.calls_for(KEY_A), mock.calls_for(KEY_B)), (1, 1));
    chats(&proxy, n).await;
    mock.calls_for(KEY_A) - 1
}

#[tokio::test(start_paused = true)]
async fn unhealthy_penalty_sets_how_much_a_failure_costs_a_key() {
    let _frozen = freeze();
    // Health starts at 1000 points; a failure costs `unhealthy_penalty` × 20 and the key's
    // share follows its health (each success earns 10 back).
    assert_eq!(
        share_of_a_failed_key(0, 10).await,
        5,
        "no penalty: an equal share"
    );
    assert_eq!(share_of_a_failed_key(25, 10).await, 4, "half the health");
    assert_eq!(share_of_a_failed_key(50, 10).await, 1, "the health floor");
}
