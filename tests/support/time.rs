//! Paused time for end-to-end tests that talk over real sockets.
//!
//! The server reads tokio's clock, so a test on a paused runtime
//! (`#[tokio::test(start_paused = true)]`) decides when waits, cooldowns, re-checks and
//! timeouts fire. Tokio auto-advances a paused clock to the next timer whenever the runtime
//! is idle, and a runtime waiting on a loopback socket looks idle: a request in flight would
//! see its own timeout fire. [`freeze`] stops that (tokio holds the clock while a blocking
//! task runs, as `tokio::time::pause` documents), and the test moves time itself with
//! [`advance`] or [`advance_until`].
//!
//! A frozen test that waits for something that never comes must still fail: after
//! [`REAL_TIME_BOUND`] of real time the freeze lets go, time auto-advances again, and the
//! test's own bounded waits time out.

use std::sync::mpsc;
use std::time::Duration;

/// Real time after which a freeze lets go of the clock.
pub const REAL_TIME_BOUND: Duration = Duration::from_secs(30);

/// Real time after which a condition that has not come true is taken as "not yet": the
/// runtime has had this long to handle the loopback I/O in hand, the clock standing still.
/// A machine too slow for that can only make a "not yet" check pass wrongly, never fail.
pub const SETTLE: Duration = Duration::from_millis(200);

/// Real time a test waits for something that must happen without time moving.
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// Holds a paused clock still while alive; see the module docs.
#[must_use = "the clock moves again once this is dropped"]
pub struct Frozen {
    _release: mpsc::Sender<()>,
}

/// Freezes the paused clock of the current runtime until the guard is dropped.
pub fn freeze() -> Frozen {
    let (release, held) = mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _ = held.recv_timeout(REAL_TIME_BOUND);
    });
    Frozen { _release: release }
}

/// Moves the paused clock forward by `by`, firing the timers due on the way.
pub async fn advance(by: Duration) {
    tokio::time::advance(by).await;
}

/// Polls `done` every millisecond of real time, the clock still, for at most `within`;
/// whether it came true.
async fn poll_for(within: Duration, done: impl Fn() -> bool) -> bool {
    for _ in 0..within.as_millis() {
        if done() {
            return true;
        }
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(1)))
            .await
            .expect("a sleep does not panic");
    }
    done()
}

/// Whether `done` comes true without time moving, within [`EVENTUALLY`] of real time.
pub async fn eventually(done: impl Fn() -> bool) -> bool {
    poll_for(EVENTUALLY, done).await
}

/// Whether `happened` is still false after [`SETTLE`], the clock still.
pub async fn still_not(happened: impl Fn() -> bool) -> bool {
    !poll_for(SETTLE, happened).await
}

/// Gives the runtime [`SETTLE`] of real time, the clock still.
pub async fn settle() {
    poll_for(SETTLE, || false).await;
}

/// Advances in `step`s until `done` holds, at most `limit` in all; the time advanced.
pub async fn advance_until(step: Duration, limit: Duration, done: impl Fn() -> bool) -> Duration {
    let mut advanced = Duration::ZERO;
    while !poll_for(SETTLE, &done).await {
        assert!(advanced < limit, "not done after advancing {advanced:?}");
        advance(step).await;
        advanced += step;
    }
    advanced
}

/// Advances in `step`s until `task` has finished, at most `limit` in all; its output and the
/// time advanced.
pub async fn finish<T>(
    task: tokio::task::JoinHandle<T>,
    step: Duration,
    limit: Duration,
) -> (T, Duration) {
    let advanced = advance_until(step, limit, || task.is_finished()).await;
    let output = task.await.expect("the task does not panic");
    (output, advanced)
}

/// Whether `task` is still running after [`SETTLE`], the clock still.
pub async fn still_running<T>(task: &tokio::task::JoinHandle<T>) -> bool {
    still_not(|| task.is_finished()).await
}
