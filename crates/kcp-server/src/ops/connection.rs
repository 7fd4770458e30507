//! What bounds one client connection beyond hyper's own timers.
//!
//! - [`ConnectionSlots`]: `server.max_connections`. A connection accepted beyond it is closed
//!   at once (counted in `kcp_client_connections_refused_total`), before any byte is read, so
//!   a flood of idle sockets cannot exhaust file descriptors or memory.
//! - [`StallGuard`]: a client that stops reading its response leaves the socket's send buffer
//!   full and every write pending. After `server.response_write_timeout_ms` without a write
//!   making progress the connection fails, and hyper drops what it was sending: the response
//!   body, its in-flight slot and the upstream call behind it.
//! - [`Activity`]: requests in flight on the connection, with a guard that lives as long as
//!   the response body. [`Activity::expired`] resolves when no request started within
//!   `server.header_read_timeout_ms` of the accept, or none has been in flight for
//!   `server.idle_connection_timeout_ms`, so an h2 (or keep-alive) connection that carries no
//!   requests is closed; h2 keep-alive pings (set on the builder) drop dead peers sooner.
//! - [`error_kind`]: the label a connection error is counted under in
//!   `kcp_client_connection_errors_total`, including hyper's own 431 and 400 answers.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Sleep;

/// Client connections open now, against `server.max_connections`.
#[derive(Debug, Clone, Default)]
pub struct ConnectionSlots {
    open: Arc<AtomicUsize>,
}

impl ConnectionSlots {
    /// A slot for a new connection while fewer than `max` are open; `None` at the cap.
    pub fn try_open(&self, max: usize) -> Option<ConnectionSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| ConnectionSlot {
                open: Arc::clone(&self.open),
            })
    }
}

/// One open connection's place under `server.max_connections`; freed on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    open: Arc<AtomicUsize>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The error a stalled write ends its connection with.
#[derive(Debug, thiserror::Error)]
#[error("the client read nothing for {0:?}: response write timed out")]
pub struct WriteStalled(pub Duration);

/// A socket whose writes fail once none has made progress for `timeout`.
#[derive(Debug)]
pub struct StallGuard<T> {
    inner: T,
    timeout: Duration,
    /// Armed when a write returns pending; cleared when one makes progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> StallGuard<T> {
    /// `inner`, with writes bounded by `timeout`.
    pub fn new(inner: T, timeout: Duration) -> Self {
        StallGuard {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// Passes `polled` through, arming the stall timer on pending and failing the write once
    /// it has run out.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                WriteStalled(timeout),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

/// Requests on one connection: how many are in flight, and how many there were.
#[derive(Debug, Clone, Copy, Default)]
struct Count {
    active: usize,
    started: u64,
}

/// Requests in flight on one connection.
#[derive(Debug, Clone)]
pub struct Activity {
    count: watch::Sender<Count>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            count: watch::Sender::new(Count::default()),
        }
    }
}

impl Activity {
    /// Counts a request as in flight until the guard drops (with its response body).
    pub fn begin(&self) -> ActiveRequest {
        self.count.send_modify(|count| {
            count.active += 1;
            count.started += 1;
        });
        ActiveRequest {
            count: self.count.clone(),
        }
    }

    /// Resolves when the connection has no reason to stay open: no request has started within
    /// `first` of now (the client sent nothing usable), or later no request has been in
    /// flight for `idle`.
    pub async fn expired(&self, first: Duration, idle: Duration) {
        let mut count = self.count.subscribe();
        // The sender lives in `self`, so no wait below can see a closed channel.
        let started = tokio::time::timeout(first, count.wait_for(|c| c.started > 0))
            .await
            .is_ok();
        if !started {
            tracing::debug!("closing a connection that sent no request in time");
            return;
        }
        loop {
            let _ = count.wait_for(|c| c.active == 0).await;
            if tokio::time::timeout(idle, count.wait_for(|c| c.active > 0))
                .await
                .is_err()
            {
                tracing::debug!("closing a connection that stayed idle");
                return;
            }
        }
    }
}

/// One request in flight on its connection.
#[derive(Debug)]
pub struct ActiveRequest {
    count: watch::Sender<Count>,
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.count
            .send_modify(|count| count.active = count.active.saturating_sub(1));
    }
}

/// The `kind` label of a connection that ended with `error`, or `None` for an error not worth
/// counting (the client simply went away).
pub fn error_kind(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            if hyper.is_parse_too_large() {
                return Some("head_too_large");
            }
            if hyper.is_parse() || hyper.is_parse_status() {
                return Some("malformed");
            }
            if hyper.is_timeout() {
                return Some("header_timeout");
            }
        }
        let stalled = error
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .is_some_and(|inner| inner.is::<WriteStalled>());
        if stalled || error.is::<WriteStalled>() {
            return Some("write_stalled");
        }
        source = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stop_at_the_cap_and_come_back() {
        let slots = ConnectionSlots::default();
        let first = slots.try_open(2).expect("first");
        let _second = slots.try_open(2).expect("second");
        assert!(slots.try_open(2).is_none());
        drop(first);
        assert!(slots.try_open(2).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_expires_after_the_head_timeout() {
        let activity = Activity::default();
        let started = tokio::time::Instant::now();
        activity
            .expired(Duration::from_secs(2), Duration::from_secs(100))
            .await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_waits_out_active_requests() {
        let activity = Activity::default();
        let request = activity.begin();
        let expired = tokio::spawn({
            let activity = activity.clone();
            async move {
                activity
                    .expired(Duration::from_secs(1), Duration::from_secs(5))
                    .await;
            }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!expired.is_finished(), "a request is in flight");
        drop(request);
        let started = tokio::time::Instant::now();
        expired.await.expect("expired");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_write_fails_after_the_timeout() {
        use tokio::io::AsyncWriteExt;
        // A pipe whose reader never reads: writes stall once its buffer is full.
        let (writer, _reader) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(writer, Duration::from_secs(3));
        let started = tokio::time::Instant::now();
        let error = guarded
            .write_all(&[0; 1024])
            .await
            .expect_err("the reader never reads");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(error_kind(&error), Some("write_stalled"));
    }
}
