//! The streaming response body: frames pass through as they arrive, stalls are bounded.
//!
//! The idle clock runs only while the consumer is waiting on the upstream (from the first
//! `Pending` after a frame until the next frame), so a slow downstream reader is never blamed on
//! the upstream, and a long stream with steady frames is never cut. Dropping the body drops
//! hyper's `Incoming`, which closes the HTTP/1 connection or resets the HTTP/2 stream: a client
//! going away cancels the upstream request at once.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::error::UpstreamError;
use crate::origin::Origin;

/// Far enough to never fire, near enough not to overflow `Instant` (tokio uses the same bound).
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The body of an upstream response; yields [`UpstreamError`]s of kind
/// [`Body`](crate::ErrorKind::Body) or [`BodyIdleTimeout`](crate::ErrorKind::BodyIdleTimeout).
/// After an error it ends, and the upstream connection is already released.
#[derive(Debug)]
pub struct ResponseBody {
    /// `None` once an error ended the body.
    inner: Option<Incoming>,
    idle: Pin<Box<Sleep>>,
    /// Whether `idle` is set for the current wait on the upstream.
    waiting: bool,
    idle_timeout: Duration,
    origin: Origin,
}

impl ResponseBody {
    pub(crate) fn new(inner: Incoming, idle_timeout: Duration, origin: Origin) -> Self {
        Self {
            inner: Some(inner),
            idle: Box::pin(tokio::time::sleep(FAR_FUTURE)),
            waiting: false,
            idle_timeout,
            origin,
        }
    }

    fn fail(&mut self, error: UpstreamError) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        self.inner = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                let error = UpstreamError::body(this.origin.clone(), error);
                this.fail(error)
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if !this.waiting {
                    let now = Instant::now();
                    let deadline = now
                        .checked_add(this.idle_timeout)
                        .unwrap_or(now + FAR_FUTURE);
                    this.idle.as_mut().reset(deadline);
                    this.waiting = true;
                }
                match this.idle.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        let error = UpstreamError::body_idle_timeout(
                            this.origin.clone(),
                            this.idle_timeout,
                        );
                        this.fail(error)
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
