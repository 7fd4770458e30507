//! Load shedding: a cap on requests served at once (`server.max_inflight`).
//!
//! Past its capacity a proxy that keeps accepting work only gets slower for everyone and
//! eventually runs out of memory or file descriptors. Refusing the excess at once with
//! 503 `overloaded` and `Retry-After: 1` keeps latency bounded for the admitted requests and
//! tells SDKs (which retry 503s with backoff) to come back shortly — the load-shedding half of
//! tower's `ConcurrencyLimit`, without its queue. The count is one atomic updated by
//! compare-and-swap, so it never exceeds the cap even transiently, and admission takes no lock.
//! A reload may change the cap ([`InflightLimit::set_max`]); requests already admitted keep
//! their slots, and new ones are admitted only while the count is below the new cap.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::edge::openai_error::OpenAiError;

/// Seconds a refused client is asked to wait.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The in-flight counter and its cap. Cheap to clone: clones share the count.
#[derive(Clone)]
pub struct InflightLimit {
    inner: Arc<Counter>,
}

struct Counter {
    current: AtomicUsize,
    max: AtomicUsize,
}

/// One admitted request; leaving (dropping the guard) frees its slot.
#[must_use = "the slot is freed as soon as the guard is dropped"]
pub struct InflightGuard {
    inner: Arc<Counter>,
}

impl InflightLimit {
    /// A limit admitting at most `max` requests at once (0 admits none).
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::new(Counter {
                current: AtomicUsize::new(0),
                max: AtomicUsize::new(max),
            }),
        }
    }

    /// Admits one request, or `None` when `max` are already in flight.
    pub fn try_enter(&self) -> Option<InflightGuard> {
        let max = self.max();
        self.inner
            .current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InflightGuard {
                inner: Arc::clone(&self.inner),
            })
    }

    /// Requests in flight now.
    pub fn current(&self) -> usize {
        self.inner.current.load(Ordering::Acquire)
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.inner.max.load(Ordering::Acquire)
    }

    /// Changes the cap (on reload). Admitted requests keep their slots; past a lowered cap,
    /// new requests are refused until enough of them have left.
    pub fn set_max(&self, max: usize) {
        self.inner.max.store(max, Ordering::Release);
    }

    /// The answer to a refused request: 503 `overloaded` with `Retry-After: 1`.
    pub fn refusal() -> OpenAiError {
        OpenAiError::overloaded(RETRY_AFTER_SECS)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.inner.current.fetch_sub(1, Ordering::AcqRel);
    }
}

impl fmt::Debug for InflightLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InflightLimit")
            .field("current", &self.current())
            .field("max", &self.max())
            .finish()
    }
}

impl fmt::Debug for InflightGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InflightGuard")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_max_then_refuses() {
        let limit = InflightLimit::new(3);
        let guards: Vec<_> = (0..3).map(|_| limit.try_enter().expect("room")).collect();
        assert_eq!(limit.current(), 3);
        assert!(limit.try_enter().is_none());
        assert_eq!(limit.current(), 3);
        drop(guards);
        assert_eq!(limit.current(), 0);
        assert_eq!(limit.max(), 3);
    }

    #[test]
    fn dropping_a_guard_frees_its_slot() {
        let limit = InflightLimit::new(1);
        let guard = limit.try_enter().expect("room");
        assert!(limit.try_enter().is_none());
        drop(guard);
        assert!(limit.try_enter().is_some());
        assert_eq!(limit.current(), 0);
    }

    #[test]
    fn clones_share_the_count_and_guards_outlive_the_limit() {
        let limit = InflightLimit::new(2);
        let other = limit.clone();
        let guard = limit.try_enter().expect("room");
        assert_eq!(other.current(), 1);
        drop(limit);
        let _second = other.try_enter().expect("room");
        assert!(other.try_enter().is_none());
        drop(guard);
        assert_eq!(other.current(), 1);
    }

    #[test]
    fn a_new_cap_applies_to_the_next_admissions() {
        let limit = InflightLimit::new(2);
        let first = limit.try_enter().expect("room");
        let second = limit.try_enter().expect("room");
        limit.set_max(1);
        assert_eq!(limit.max(), 1);
        assert!(limit.try_enter().is_none());
        drop(first);
        assert!(limit.try_enter().is_none(), "still at the new cap");
        drop(second);
        let _third = limit.try_enter().expect("below the new cap");
        limit.set_max(3);
        assert!(limit.try_enter().is_some());
    }

    #[test]
    fn zero_admits_nothing() {
        assert!(InflightLimit::new(0).try_enter().is_none());
    }

    #[test]
    fn concurrent_threads_never_exceed_max() {
        const MAX: usize = 4;
        let limit = InflightLimit::new(MAX);
        let holders = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let admitted = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..20_000 {
                        if let Some(_guard) = limit.try_enter() {
                            let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            peak.fetch_max(limit.current(), Ordering::SeqCst);
                            admitted.fetch_add(1, Ordering::Relaxed);
                            holders.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= MAX);
        assert!(admitted.load(Ordering::Relaxed) > 0);
        assert_eq!(limit.current(), 0);
    }

    #[test]
    fn refusal_is_503_with_retry_after() {
        let err = InflightLimit::refusal();
        assert_eq!(err.status, http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.code, "overloaded");
        assert_eq!(err.retry_after, Some(std::time::Duration::from_secs(1)));
    }
}

/// What the app's `Debug` output shows of the limit (`App` derives `Debug`).
#[cfg(test)]
mod debug_tests {
    use super::*;

    #[test]
    fn debug_shows_the_count_and_the_cap() {
        let limit = InflightLimit::new(2);
        let guard = limit.try_enter().expect("room");
        assert_eq!(format!("{limit:?}"), "InflightLimit { current: 1, max: 2 }");
        assert_eq!(format!("{guard:?}"), "InflightGuard");
    }
}
