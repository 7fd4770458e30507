//! The queue of requests waiting for a key, bounded in size and controlled by its delay.
//!
//! When every key that could serve a request rests and the first frees within the request's
//! `max_wait`, the request waits for it instead of failing: a burst that briefly exceeds the
//! pool's limits is smoothed rather than bounced. The queue is a counter of waiters bounded
//! by `max_queue`; past it requests are answered at once.
//!
//! A size bound alone still lets overload keep a standing queue: under sustained excess every
//! served request waits about `max_wait`, because the queue stays full. So the queue is also
//! controlled by its delay, as CoDel controls a packet queue (Nichols & Jacobson, *Controlling
//! Queue Delay*, 2012) and as large RPC servers shed load: every wait granted is a delay sample.
//! While the samples stay above [`DelayControl::target`] for [`DelayControl::interval`], the
//! queue is *standing*: a new request is granted a wait only up to the target, and the excess is
//! answered at once with an honest `Retry-After`. The first wait at or below the target ends
//! that. A short burst (shorter than the interval) is therefore absorbed up to `max_wait`, while
//! sustained overload is shed at the door and the requests that are served wait little.
//!
//! Waiters keep their order: a waiting request is promised a specific key's next free cell
//! (see `KeyPool::select`), and later requests are told later cells, so no waiting request is
//! overtaken by a later one for the same keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::time::Time;

/// The delay target of the wait queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayControl {
    /// A wait at or below this is no sign of a standing queue.
    pub target: Duration,
    /// How long waits must stay above the target before the queue counts as standing.
    pub interval: Duration,
}

impl Default for DelayControl {
    /// 50 ms and 100 ms: an LLM call takes hundreds of milliseconds to seconds, so 50 ms of
    /// queueing is noise to a client, and 100 ms is longer than any burst of requests sent
    /// together.
    fn default() -> Self {
        DelayControl {
            target: Duration::from_millis(50),
            interval: Duration::from_millis(100),
        }
    }
}

/// Requests waiting for a key, shared by every request of a server (or simulation).
#[derive(Debug)]
pub struct WaitQueue {
    waiting: AtomicUsize,
    max: AtomicUsize,
    /// Since when every wait granted was above the target (nanoseconds; 0: the last one was
    /// not).
    above_since: AtomicU64,
}

impl WaitQueue {
    /// A queue of at most `max` waiters.
    pub fn new(max: usize) -> Arc<WaitQueue> {
        Arc::new(WaitQueue {
            waiting: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            above_since: AtomicU64::new(0),
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

    /// Whether the queue is standing at `now`: waits have stayed above the target for the
    /// interval. A new request may then wait only up to the target.
    pub fn is_standing(&self, now: Time, control: DelayControl) -> bool {
        match self.above_since.load(Ordering::Acquire) {
            0 => false,
            since => now.saturating_since(Time::from_nanos(since)) >= control.interval,
        }
    }

    /// Takes a place in the queue for a wait of `wait` from `now`, or `None` when the queue is
    /// full, or standing and the wait is above the target.
    pub fn enter(
        self: &Arc<Self>,
        now: Time,
        wait: Duration,
        control: DelayControl,
    ) -> Option<QueueSlot> {
        if wait <= control.target {
            self.above_since.store(0, Ordering::Release);
        } else {
            let _ = self.above_since.compare_exchange(
                0,
                now.as_nanos().max(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if self.is_standing(now, control) {
                return None;
            }
        }
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

    const SHORT: Duration = Duration::from_millis(10);
    const LONG: Duration = Duration::from_secs(2);

    #[test]
    fn queue_is_bounded_and_slots_are_returned() {
        let queue = WaitQueue::new(2);
        let c = DelayControl::default();
        let a = queue.enter(Time::ZERO, SHORT, c).expect("first");
        let b = queue.enter(Time::ZERO, SHORT, c).expect("second");
        assert_eq!(queue.len(), 2);
        assert!(!queue.is_empty());
        assert!(queue.is_full());
        assert!(queue.enter(Time::ZERO, SHORT, c).is_none());
        drop(a);
        assert!(queue.enter(Time::ZERO, SHORT, c).is_some());
        drop(b);
        assert!(queue.is_empty());
        queue.set_max(0);
        assert!(queue.enter(Time::ZERO, SHORT, c).is_none());
    }

    #[test]
    fn a_burst_shorter_than_the_interval_waits_long() {
        let queue = WaitQueue::new(1024);
        let c = DelayControl::default();
        let t0 = Time::from_secs(10);
        let slots: Vec<_> = (0..50)
            .map(|i| queue.enter(t0 + Duration::from_millis(i), LONG, c))
            .collect();
        assert!(
            slots.iter().all(Option::is_some),
            "the whole burst is absorbed"
        );
    }

    #[test]
    fn waits_above_the_target_for_an_interval_make_a_standing_queue_that_sheds() {
        let queue = WaitQueue::new(1024);
        let c = DelayControl::default();
        let t0 = Time::from_secs(10);
        let _first = queue
            .enter(t0, LONG, c)
            .expect("above the target, not yet standing");
        let just_before = t0 + c.interval - Duration::from_millis(1);
        assert!(queue.enter(just_before, LONG, c).is_some());
        let after = t0 + c.interval;
        assert!(queue.is_standing(after, c));
        assert!(queue.enter(after, LONG, c).is_none(), "long waits are shed");
        let _short = queue
            .enter(after, c.target, c)
            .expect("a wait at the target is fine");
        assert!(
            !queue.is_standing(after, c),
            "and it ends the standing queue"
        );
        assert!(
            queue.enter(after, LONG, c).is_some(),
            "long waits are absorbed again"
        );
    }
}
