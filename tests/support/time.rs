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

/// Real time given to the runtime to finish what loopback I/O it has in hand. Only used
/// before asserting that something has NOT happened yet; a slow machine can make such a
/// check pass wrongly, never fail wrongly.
pub const SETTLE: Duration = Duration::from_millis(50);

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

/// Lets the runtime handle the loopback I/O in flight, the clock still, until `done` holds
/// or [`SETTLE`] of real time has passed; whether `done` holds.
pub async fn settled(done: impl Fn() -> bool) -> bool {
    for _ in 0..SETTLE.as_millis() {
        if done() {
            return true;
        }
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(1)))
            .await
            .expect("a sleep does not panic");
    }
    done()
}

/// Advances in `step`s until `done` holds, at most `limit` in all; the time advanced.
pub async fn advance_until(step: Duration, limit: Duration, done: impl Fn() -> bool) -> Duration {
    let mut advanced = Duration::ZERO;
    while !settled(&done).await {
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

/// Whether `task` is still running after the runtime has settled, the clock still.
pub async fn still_running<T>(task: &tokio::task::JoinHandle<T>) -> bool {
    !settled(|| task.is_finished()).await
}
