//! Paused time over loopback sockets: the clock moves only when a test advances it.
//!
//! Tokio auto-advances a paused clock whenever the runtime looks idle, and a runtime waiting
//! on a socket looks idle, so a request in flight would see its own timeout fire. While a
//! blocking task runs tokio holds the clock (as `tokio::time::pause` documents): [`freeze`]
//! keeps one running, for at most [`REAL_TIME_BOUND`] of real time so that a test waiting
//! for something that never comes still fails on its own bounded waits.

use std::sync::mpsc;
use std::time::Duration;

/// Real time after which a freeze lets go of the clock.
pub const REAL_TIME_BOUND: Duration = Duration::from_secs(30);

/// Real time given to the runtime to handle loopback I/O before a "not yet" check (a machine
/// too slow for it can only make such a check pass wrongly, never fail).
pub const SETTLE: Duration = Duration::from_millis(200);

/// Holds a paused clock still while alive.
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

/// Whether `task` is still running once the runtime has handled its I/O, the clock still.
pub async fn still_running<T>(task: &tokio::task::JoinHandle<T>) -> bool {
    for _ in 0..SETTLE.as_millis() {
        if task.is_finished() {
            return false;
        }
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(1)))
            .await
            .expect("a sleep does not panic");
    }
    !task.is_finished()
}

/// Advances in `step`s until `task` finishes, at most `limit`; its output and the time
/// advanced.
pub async fn finish<T>(
    task: tokio::task::JoinHandle<T>,
    step: Duration,
    limit: Duration,
) -> (T, Duration) {
    let mut advanced = Duration::ZERO;
    while still_running(&task).await {
        assert!(advanced < limit, "not done after advancing {advanced:?}");
        tokio::time::advance(step).await;
        advanced += step;
    }
    (task.await.expect("the task does not panic"), advanced)
}
