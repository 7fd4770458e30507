//! End-to-end: providers' rate-limit dialects rest a key as long as the provider says.
//!
//! Gemini's OpenAI endpoint answers 429 `RESOURCE_EXHAUSTED` with the delay in its body
//! (`retryDelay`) and no `Retry-After`; Anthropic's sends `anthropic-ratelimit-*` headers.

mod support;

use http::StatusCode;
use support::proxy_harness::start_proxy;
use support::time::{eventually, freeze};
use support::{Behaviour, KEY_A, KEY_B, MockUpstream};

const GEMINI_429: &str = r#"[{"error": {"code": 429, "message": "You exceeded your current quota, please check your plan and billing details.", "status": "RESOURCE_EXHAUSTED", "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}]}}]"#;

#[tokio::test(start_paused = true)]
async fn gemini_retry_delay_in_the_body_rests_the_keys() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    mock.set_default(Behaviour::Status {
        status: 429,
        body: GEMINI_429.to_owned(),
        headers: Vec::new(),
    });
    let root = format!("{}/v1beta/openai/", mock.url());
    let proxy = start_proxy(
        vec![
            (KEY_A, root.clone(), vec!["gemini-2.0-flash"]),
            (KEY_B, root, vec!["gemini-2.0-flash"]),
        ],
        |_| {},
    )
    .await;
    let pending = proxy.spawn_chat("gemini-2.0-flash");
    assert!(
        eventually(|| pending.is_finished()).await,
        "no pointless wait"
    );
    let reply = pending.await.expect("no panic");
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("retry-after"), Some("37"), "the body's delay");
    let paths: Vec<String> = mock.calls().into_iter().map(|c| c.path_and_query).collect();
    assert_eq!(
        paths,
        [
            "/v1beta/openai/chat/completions",
            "/v1beta/openai/chat/completions"
        ],
        "each key once, on Gemini's root"
    );

    // Both keys rest for the body's delay: the next request costs no upstream call.
    let reply = proxy.chat("gemini-2.0-flash").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("retry-after"), Some("37"));
    assert_eq!(mock.calls().len(), 2);
}
