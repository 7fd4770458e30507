//! End-to-end: the server's background re-check of disabled keys, in paused time (see
//! `support::time`). Nothing calls the check by hand: the server's own loop sends
//! `GET /v1/models` with the key when the re-check is due (a minute after the rejection,
//! doubling after each failed re-check) and puts the key back when it answers.

mod support;

use std::time::Duration;

use http::StatusCode;
use key_cycle_proxy::core::{DisableReason, KeyStatus};
use support::time::{advance, eventually, freeze, still_not};
use support::{Behaviour, KEY_A, MockUpstream, one_key};

/// The loop looks for due re-checks once a second.
const TICK: Duration = Duration::from_secs(1);

/// The re-check calls so far: `GET /v1/models` with the key.
fn rechecks(mock: &MockUpstream) -> usize {
    mock.calls()
        .iter()
        .filter(|c| c.method == "GET" && c.path_and_query == "/v1/models")
        .count()
}

/// Advances to `at` after the rejection and checks that no re-check went out before it.
async fn no_recheck_until(mock: &MockUpstream, since_rejection: &mut Duration, at: Duration) {
    let before = rechecks(mock);
    advance(at - TICK - *since_rejection).await;
    *since_rejection = at - TICK;
    assert!(
        still_not(|| rechecks(mock) > before).await,
        "a re-check before {at:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rejected_key_is_re_checked_by_the_server_and_comes_back() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Unauthorized);
    let proxy = one_key(&mock).await;
    assert_eq!(
        proxy.chat("gpt-4o").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        proxy.key_status(KEY_A),
        (KeyStatus::Disabled, Some(DisableReason::Unauthorized))
    );
    let mut since = Duration::ZERO;

    // First re-check a minute after the rejection; the key is still rejected.
    no_recheck_until(&mock, &mut since, Duration::from_secs(60)).await;
    advance(TICK).await;
    since += TICK;
    assert!(
        eventually(|| rechecks(&mock) == 1).await,
        "re-checked at 60 s"
    );
    assert_eq!(proxy.key_status(KEY_A).0, KeyStatus::Disabled);

    // The next one waits twice as long: 120 s after the first.
    mock.set(KEY_A, Behaviour::Ok);
    no_recheck_until(&mock, &mut since, Duration::from_secs(180)).await;
    assert_eq!(proxy.key_status(KEY_A).0, KeyStatus::Disabled);
    advance(TICK).await;
    assert!(
        eventually(|| rechecks(&mock) == 2).await,
        "re-checked at 180 s"
    );
    assert!(
        eventually(|| proxy.key_status(KEY_A).0 == KeyStatus::Available).await,
        "the key answered: back in rotation"
    );

    let probe = mock.calls().pop().expect("the re-check");
    assert_eq!(probe.key.as_deref(), Some(KEY_A));
    assert!(probe.body.is_empty());
    assert_eq!(proxy.get("/ready").await.status, StatusCode::OK);
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    assert_eq!(
        mock.calls_for(KEY_A),
        4,
        "one rejection, two re-checks, one chat"
    );
}
