//! End-to-end, in paused time: the retry backoff the attempt policy draws is really slept
//! before the retry goes out (its own binary: it captures the debug log for the drawn delay).

mod support;

use std::time::Duration;

use http::StatusCode;
use support::observe::capture_logs;
use support::proxy_harness::start_proxy;
use support::time::{advance_until, eventually, finish, freeze};
use support::{Behaviour, KEY_A, MockUpstream};

/// Steps of paused time: the retry must come at the first step at or after its backoff.
const STEP: Duration = Duration::from_millis(10);
/// The backoff ceiling of the test: the drawn delay is uniform below it (full jitter).
const CEILING: Duration = Duration::from_millis(200);

#[tokio::test(start_paused = true)]
async fn the_drawn_backoff_is_slept_before_the_retry() {
    let logs = capture_logs("debug");
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    mock.script(KEY_A, vec![Behaviour::status(500)]);
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.upstream.retry_initial_backoff_ms = CEILING.as_millis() as u64;
        config.upstream.retry_max_backoff_ms = CEILING.as_millis() as u64;
        config.upstream.max_retries = 1;
    })
    .await;
    let pending = proxy.spawn_chat("gpt-4o");
    assert!(eventually(|| mock.calls_for(KEY_A) == 1).await);
    // Time stands still until the test moves it: the retry can only go out once the clock
    // has passed the backoff.
    let to_retry = advance_until(STEP, CEILING + STEP, || mock.calls_for(KEY_A) == 2).await;
    let (reply, _) = finish(pending, STEP, CEILING).await;
    assert_eq!(reply.status, StatusCode::OK, "the retry is served");

    let forwarded = logs
        .json_lines()
        .into_iter()
        .find(|line| line["message"] == "request forwarded")
        .expect("the request's debug summary");
    assert_eq!(forwarded["retries"], 1);
    let backoff =
        Duration::from_secs_f64(forwarded["backoff_ms"].as_f64().expect("backoff_ms") / 1e3);
    assert!(backoff <= CEILING, "drawn below the ceiling: {backoff:?}");
    assert!(
        to_retry + Duration::from_millis(1) >= backoff,
        "the retry waited out its backoff: sent after {to_retry:?}, backoff {backoff:?}"
    );
    assert!(
        to_retry <= backoff + STEP,
        "and went out as soon as it was over: {to_retry:?} for {backoff:?}"
    );
}
