//! The API keys of the end-to-end tests, and the pools most tests start from.
//!
//! Keys look like OpenAI's (`sk-…`) and are long enough for the mock to mask them as OpenAI
//! does, so a test that finds one in a log, a metric or a reply has found a leak.

use key_cycle_proxy::server::config::Config;

use super::mock_upstream::MockUpstream;
use super::proxy_harness::{Proxy, start_proxy};

pub const KEY_A: &str = "sk-test-alpha-000000000001";
pub const KEY_B: &str = "sk-test-bravo-000000000002";
pub const KEY_C: &str = "sk-test-charlie-0000000003";

/// The proxy with key A on `mock`, serving every model, and the test config.
pub async fn one_key(mock: &MockUpstream) -> Proxy {
    start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |_| {}).await
}

/// The proxy with keys A and B on `mock`, serving every model, and the test config after
/// `tweak`.
pub async fn two_keys(mock: &MockUpstream, tweak: impl FnOnce(&mut Config)) -> Proxy {
    start_proxy(
        vec![
            (KEY_A, mock.url(), vec!["others"]),
            (KEY_B, mock.url(), vec!["others"]),
        ],
        tweak,
    )
    .await
}

/// The proxy with keys A, B and C on `mock`, serving every model, and the test config.
pub async fn three_keys(mock: &MockUpstream) -> Proxy {
    start_proxy(
        vec![
            (KEY_A, mock.url(), vec!["others"]),
            (KEY_B, mock.url(), vec!["others"]),
            (KEY_C, mock.url(), vec!["others"]),
        ],
        |_| {},
    )
    .await
}

/// The proxy with key A serving `gpt-4o` and key B serving `whisper-1` and `gpt-4o-mini` on
/// `mock`, and the test config after `tweak`: a pool routed by model.
pub async fn routed_keys(mock: &MockUpstream, tweak: impl FnOnce(&mut Config)) -> Proxy {
    start_proxy(
        vec![
            (KEY_A, mock.url(), vec!["gpt-4o"]),
            (KEY_B, mock.url(), vec!["whisper-1", "gpt-4o-mini"]),
        ],
        tweak,
    )
    .await
}
