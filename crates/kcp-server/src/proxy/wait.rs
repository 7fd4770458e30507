//! Waiting for a cooling key instead of failing.
//!
//! When every key that could serve a request is resting and the first one frees up within
//! `rate_limit.max_wait_ms`, the request sleeps until then and selects again: a burst that
//! briefly exceeds the pool's limits is smoothed instead of bounced. The queue is bounded by
//! a counter of waiters (`rate_limit.max_queue`); past it requests get their 429 at once,
//! so a long overload cannot pile up sleeping requests without limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A place in the wait queue; leaving (dropping it) frees it.
#[derive(Debug)]
pub struct Slot<'a>(&'a AtomicUsize);

/// Takes a place among at most `max` waiters counted by `waiting`.
pub fn enter(waiting: &AtomicUsize, max: usize) -> Option<Slot<'_>> {
    waiting
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(waiting))
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `Retry-After` for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_bounded_and_slots_are_returned() {
        let waiting = AtomicUsize::new(0);
        let a = enter(&waiting, 2).expect("first");
        let b = enter(&waiting, 2).expect("second");
        assert!(enter(&waiting, 2).is_none());
        drop(a);
        assert!(enter(&waiting, 2).is_some());
        drop(b);
        assert_eq!(waiting.load(Ordering::Acquire), 0);
        assert!(enter(&waiting, 0).is_none());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
        assert_eq!(retry_after_secs(Duration::from_millis(30_001)), 31);
    }
}
