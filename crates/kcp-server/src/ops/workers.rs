//! Worker threads: one single-threaded runtime per core serves the client connections.
//!
//! A proxied request is a chain of hand-overs between two tasks: the client connection's
//! (hyper's server side and the service) and the upstream connection's (hyper's client
//! side): the request goes out, the response head comes back, then each body chunk. On
//! tokio's work-stealing runtime either task may run on any thread, so a hand-over can wake
//! another thread (a futex call, a context switch on a busy machine) and move the request's
//! state between caches; profiles of the proxy under load put half its time in the kernel,
//! most of it in such wake-ups. Here each worker thread runs its own current-thread runtime,
//! as nginx runs one event loop per worker process: the listener hands each accepted
//! connection to the next worker, the connection and every task it spawns stay on that
//! thread, and its upstream connections come from that thread's own pool
//! ([`kcp_upstream::enter_lane`]), so a hand-over is a push on a local run queue. Each worker
//! also selects keys in a lane of its own ([`crate::clock::enter_lane`]), so two workers
//! selecting at once do not write the same cursor of the key pool.
//!
//! The control plane (the accept loop, re-check probes, the cluster's sync, the ops
//! listener, signals) stays on the runtime that started the server.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// The worker threads of a server; dropping it stops them (after the server's drain, the
/// tasks left on them are cut).
#[derive(Debug)]
pub struct Workers {
    workers: Vec<Worker>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct Worker {
    runtime: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` worker threads (at least one), each with its own runtime, upstream
    /// connection pool and selection lane.
    pub fn start(count: usize) -> io::Result<Workers> {
        let mut workers = Workers {
            workers: Vec::with_capacity(count.max(1)),
            next: AtomicUsize::new(0),
        };
        for lane in 0..count.max(1) {
            // Pushed one by one, so the threads started so far stop if a later one fails.
            workers.workers.push(Worker::start(lane)?);
        }
        Ok(workers)
    }

    /// How many worker threads there are.
    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// The runtime of the worker that takes the next connection: each in turn.
    pub(crate) fn next(&self) -> &Handle {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        &self.workers[turn % self.workers.len()].runtime
    }
}

impl Worker {
    fn start(lane: usize) -> io::Result<Worker> {
        let runtime = Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("kcp-worker-{lane}"))
            .spawn(move || {
                kcp_upstream::enter_lane(lane);
                crate::clock::enter_lane(lane);
                // Runs the tasks handed to the runtime (queued until now, if any) until told
                // to stop; the tasks left then are dropped with the runtime.
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Worker {
            runtime: handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The number of worker threads for `server.worker_threads`: the setting, or one per core
/// when it is 0.
pub fn resolve(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, |cores| cores.get())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn connections_go_to_each_worker_in_turn_and_stay_on_its_thread() {
        let workers = Workers::start(2).expect("threads start");
        assert_eq!(workers.count(), 2);
        let waiter = Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime to wait with");
        let thread_name = || std::thread::current().name().map(str::to_owned);
        let names: Vec<String> = (0..4)
            .map(|_| {
                let task = workers.next().spawn(async move {
                    // A task spawned from a worker's task runs on the same thread.
                    let inner = tokio::spawn(async move { thread_name() });
                    let lane = crate::clock::with_rng(|rng| rng.lane());
                    let name = thread_name();
                    assert_eq!(
                        name,
                        Some(format!("kcp-worker-{lane}")),
                        "selects in its lane"
                    );
                    (name, inner.await.expect("the inner task ends"))
                });
                let (outer, inner) = waiter
                    .block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await })
                    .expect("the task ends within 10 s")
                    .expect("the task does not panic");
                assert_eq!(outer, inner);
                outer.expect("worker threads are named")
            })
            .collect();
        assert_eq!(
            names,
            [
                "kcp-worker-0",
                "kcp-worker-1",
                "kcp-worker-0",
                "kcp-worker-1"
            ]
        );
    }

    #[test]
    fn dropping_the_workers_stops_their_threads() {
        let workers = Workers::start(2).expect("threads start");
        let held = std::sync::Arc::new(());
        for _ in 0..2 {
            let held = std::sync::Arc::clone(&held);
            workers.next().spawn(async move {
                let _held = held;
                std::future::pending::<()>().await;
            });
        }
        let runtime = workers.next().clone();
        drop(workers);
        assert_eq!(
            std::sync::Arc::strong_count(&held),
            1,
            "once the drop returns, the workers' runtimes are gone with their tasks"
        );
        // The runtime is gone with its thread: a task handed to it now never runs.
        let task = runtime.spawn(async {});
        let waiter = Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime to wait with");
        let ended =
            waiter.block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await });
        assert!(
            ended
                .expect("the join handle resolves")
                .is_err_and(|e| e.is_cancelled()),
            "a stopped worker runs nothing"
        );
    }

    #[test]
    fn zero_means_one_worker_per_core() {
        assert_eq!(resolve(3), 3);
        let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
        assert_eq!(resolve(0), cores);
    }

    #[test]
    fn at_least_one_worker_starts() {
        assert_eq!(Workers::start(0).expect("a thread starts").count(), 1);
    }
}
