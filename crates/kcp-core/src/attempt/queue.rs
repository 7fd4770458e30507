//! The bounded queue of requests waiting for a key.
//!
//! When every key that could serve a request rests and the first frees within the request's
//! `max_wait`, the request waits for it instead of failing: a burst that briefly exceeds the
//! pool's limits is smoothed rather than bounced. The queue is a counter of waiters bounded
//! by `max_queue`; past it requests are answered at once, so a long overload cannot pile up
//! sleeping requests without limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Requests waiting for a key, shared by every request of a server (or simulation).
#[derive(Debug)]
pub struct WaitQueue {
    waiting: AtomicUsize,
    max: AtomicUsize,
}

impl WaitQueue {
    /// A queue of at most `max` waiters.
    pub fn new(max: usize) -> Arc<WaitQueue> {
        Arc::new(WaitQueue {
            waiting: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        })
    }

    /// Changes the bound (on reload); waiters already in stay.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a new waiter would be turned away.
    pub fn is_full(&self) -> bool {
        self.len() >= self.max.load(Ordering::Relaxed)
    }

    /// Takes a place in the queue, or `None` when it is full.
    pub fn enter(self: &Arc<Self>) -> Option<QueueSlot> {
        let max = self.max.load(Ordering::Relaxed);
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| QueueSlot(Arc::clone(self)))
    }
}

/// A place in the queue; dropping it leaves.
#[derive(Debug)]
pub struct QueueSlot(Arc<WaitQueue>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_bounded_and_slots_are_returned() {
        let queue = WaitQueue::new(2);
        let a = queue.enter().expect("first");
        let b = queue.enter().expect("second");
        assert!(queue.is_full());
        assert!(queue.enter().is_none());
        drop(a);
        assert!(queue.enter().is_some());
        drop(b);
        assert!(queue.is_empty());
        queue.set_max(0);
        assert!(queue.enter().is_none());
    }
}
