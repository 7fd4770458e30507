//! Lanes: one connection pool per worker thread of the server.
//!
//! A pooled connection is driven by a task on the runtime that opened it. kcp-server serves
//! connections on one single-threaded runtime per core; a request served on one of them that
//! took a connection opened by another would wake that other thread for every read and write
//! of the exchange, and both threads would take the pool's lock. So [`Upstream`](crate::Upstream)
//! keeps one pool per lane, each worker thread enters its own lane once when it starts, and a
//! request uses the pool of the thread it runs on: its upstream connection lives on the same
//! thread, and handing a response chunk from one task to the other costs no cross-thread
//! wake-up. A thread that entered no lane (a test's runtime, the control runtime) uses lane 0.

use std::cell::Cell;

thread_local! {
    static LANE: Cell<usize> = const { Cell::new(0) };
}

/// Makes the calling thread use lane `lane` (taken modulo the client's lane count) from now
/// on. Call it once at the start of a worker thread that never moves its tasks elsewhere (a
/// current-thread runtime's thread).
pub fn enter_lane(lane: usize) {
    LANE.with(|current| current.set(lane));
}

/// The lane of the calling thread.
pub(crate) fn current() -> usize {
    LANE.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_uses_lane_zero_until_it_enters_one() {
        std::thread::spawn(|| {
            assert_eq!(current(), 0);
            enter_lane(3);
            assert_eq!(current(), 3);
        })
        .join()
        .expect("the thread ends");
        // Another thread's lane is not this one's.
        assert_eq!(current(), 0);
    }
}
