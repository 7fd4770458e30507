//! Bounded, idle-timed reading of request bodies.
//!
//! The proxy buffers each request body so it can replay it on another key after a 429 or an
//! upstream failure. Buffering without bounds would let one client exhaust memory, and
//! waiting without bounds would let slow clients (slowloris) hold connections and in-flight
//! slots forever. So a body is refused up front when its `Content-Length` exceeds
//! `server.request_body_limit_bytes` (nothing is read), a chunked body is counted as it
//! arrives and refused the moment it passes the limit, and each wait for the next chunk is
//! bounded by `server.body_read_timeout_ms`. That idle timeout alone would let a client
//! trickle one byte just inside it forever, so the whole body also has a deadline,
//! `server.body_timeout_ms`.
//!
//! Most bodies arrive in one frame; that frame's `Bytes` is returned as is, without a copy.
//! A declared `Content-Length` sizes the buffer of a multi-frame body only up to
//! [`PREALLOCATE_MAX`]: a client that declares 32 MiB and sends a few bytes gets no 32 MiB
//! allocation; beyond the bound the buffer grows with what actually arrives.

use std::fmt::Display;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, header};
use http_body::Body;
use http_body_util::BodyExt;

use crate::config::ServerSection;
use crate::edge::openai_error::OpenAiError;

/// Why a request body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Larger than the limit (declared or counted).
    #[error("the request body is larger than {limit} bytes")]
    TooLarge {
        /// `server.request_body_limit_bytes`.
        limit: u64,
    },
    /// No chunk arrived within the idle timeout, or the whole body not within its deadline.
    #[error("the request body arrived too slowly")]
    Timeout,
    /// The client's stream failed before the body ended.
    #[error("the request body ended early")]
    Aborted,
}

impl BodyError {
    /// The response for the client: 413, 408 or 400.
    pub fn into_openai(self) -> OpenAiError {
        match self {
            BodyError::TooLarge { limit } => OpenAiError::body_too_large(limit),
            BodyError::Timeout => OpenAiError::body_timeout(),
            BodyError::Aborted => OpenAiError::bad_request("the request body ended early"),
        }
    }
}

/// Most bytes a declared `Content-Length` may make the reader allocate up front.
pub const PREALLOCATE_MAX: u64 = 64 * 1024;

/// The bounds of one body read, from `[server]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// `server.request_body_limit_bytes`.
    pub limit: u64,
    /// `server.body_read_timeout_ms`: longest gap between two chunks.
    pub idle: Duration,
    /// `server.body_timeout_ms`: the whole body's deadline.
    pub deadline: Duration,
}

impl BodyLimits {
    /// The bounds of `server`.
    pub fn of(server: &ServerSection) -> Self {
        BodyLimits {
            limit: u64::try_from(server.request_body_limit_bytes).unwrap_or(u64::MAX),
            idle: server.body_read_timeout(),
            deadline: server.body_timeout(),
        }
    }
}

/// Reads the whole body within `limits`: refused when larger than `limits.limit` bytes, given
/// up on when no chunk arrives for `limits.idle` or the whole body takes longer than
/// `limits.deadline`. `content_length` (from [`content_length`]) lets an oversized body be
/// refused before any of it is read.
pub async fn read_body<B>(
    body: B,
    content_length: Option<u64>,
    limits: &BodyLimits,
) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Display,
{
    let limit = limits.limit;
    if content_length.is_some_and(|declared| declared > limit) {
        return Err(BodyError::TooLarge { limit });
    }
    tokio::time::timeout(
        limits.deadline,
        read_frames(body, content_length, limit, limits.idle),
    )
    .await
    .unwrap_or(Err(BodyError::Timeout))
}

/// The frames of `body`, joined; see [`read_body`].
async fn read_frames<B>(
    mut body: B,
    content_length: Option<u64>,
    limit: u64,
    idle: Duration,
) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Display,
{
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut total: u64 = 0;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                tracing::debug!(%error, "request body aborted");
                return Err(BodyError::Aborted);
            }
            Ok(Some(Ok(frame))) => frame,
        };
        // Trailers carry nothing the upstream request needs.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        total = total.saturating_add(data.len() as u64);
        if total > limit {
            return Err(BodyError::TooLarge { limit });
        }
        match (&mut joined, first.take()) {
            (Some(buf), _) => buf.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(head)) => {
                let mut buf = BytesMut::with_capacity(capacity(content_length, limit, total));
                buf.extend_from_slice(&head);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(match joined {
        Some(buf) => buf.freeze(),
        None => first.unwrap_or_default(),
    })
}

/// Buffer size for a multi-frame body: the declared length capped by the limit and by
/// [`PREALLOCATE_MAX`], and at least what has arrived so far.
fn capacity(content_length: Option<u64>, limit: u64, so_far: u64) -> usize {
    let expected = content_length
        .unwrap_or(0)
        .min(limit)
        .min(PREALLOCATE_MAX)
        .max(so_far);
    usize::try_from(expected).unwrap_or(usize::MAX)
}

/// The request's `Content-Length`: `None` when absent (chunked), 400 when malformed or when
/// several values disagree (RFC 9110 §8.6: `1*DIGIT`, repeated values must be identical).
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, OpenAiError> {
    let mut length: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|b| *b == b',') {
            let parsed = parse_digits(item.trim_ascii()).ok_or_else(malformed)?;
            if length.is_some_and(|seen| seen != parsed) {
                return Err(malformed());
            }
            length = Some(parsed);
        }
    }
    Ok(length)
}

/// A non-empty run of ASCII digits as a `u64` (`str::parse` would also accept `+5`).
fn parse_digits(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, b| {
        let digit = b.is_ascii_digit().then(|| u64::from(b - b'0'))?;
        acc.checked_mul(10)?.checked_add(digit)
    })
}

fn malformed() -> OpenAiError {
    OpenAiError::bad_request("The Content-Length header is not a valid length.")
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use http::{HeaderValue, StatusCode};
    use http_body::Frame;
    use http_body_util::Full;

    use super::*;

    const IDLE: Duration = Duration::from_secs(30);

    fn limits(limit: u64, idle: Duration) -> BodyLimits {
        BodyLimits {
            limit,
            idle,
            deadline: Duration::from_secs(60),
        }
    }

    /// A body that yields the given chunks and then, depending on `then`, ends, fails,
    /// hangs or panics.
    struct Script {
        chunks: VecDeque<Bytes>,
        then: Then,
    }

    #[derive(Clone, Copy)]
    enum Then {
        End,
        Fail,
        Hang,
        Panic,
    }

    impl Script {
        fn new(chunks: &[&'static [u8]], then: Then) -> Self {
            Self {
                chunks: chunks.iter().map(|c| Bytes::from_static(c)).collect(),
                then,
            }
        }
    }

    impl Body for Script {
        type Data = Bytes;
        type Error = &'static str;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if let Some(chunk) = self.chunks.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            match self.then {
                Then::End => Poll::Ready(None),
                Then::Fail => Poll::Ready(Some(Err("connection reset"))),
                Then::Hang => Poll::Pending,
                Then::Panic => panic!("the body was read past the point of refusal"),
            }
        }
    }

    #[tokio::test]
    async fn declared_length_over_the_limit_is_refused_without_reading() {
        let body = Script::new(&[], Then::Panic);
        let result = read_body(body, Some(11), &limits(10, IDLE)).await;
        assert_eq!(result, Err(BodyError::TooLarge { limit: 10 }));
    }

    #[tokio::test]
    async fn chunked_body_is_refused_as_soon_as_it_passes_the_limit() {
        let body = Script::new(&[b"123456", b"789012"], Then::Panic);
        let result = read_body(body, None, &limits(10, IDLE)).await;
        assert_eq!(result, Err(BodyError::TooLarge { limit: 10 }));
    }

    #[tokio::test]
    async fn a_body_exactly_at_the_limit_is_read() {
        let body = Script::new(&[b"12345", b"67890"], Then::End);
        let result = read_body(body, Some(10), &limits(10, IDLE)).await;
        assert_eq!(result.as_deref(), Ok(&b"1234567890"[..]));
    }

    #[tokio::test]
    async fn chunks_are_joined_in_order() {
        let body = Script::new(&[b"{\"model\":", b"", b"\"gpt-4o\"", b"}"], Then::End);
        let result = read_body(body, None, &limits(1024, IDLE)).await;
        assert_eq!(result.as_deref(), Ok(&b"{\"model\":\"gpt-4o\"}"[..]));
    }

    #[tokio::test]
    async fn a_single_frame_is_returned_without_copying() {
        let data = Bytes::from(vec![7u8; 4096]);
        let body = Full::new(data.clone());
        let read = read_body(body, Some(4096), &limits(1 << 20, IDLE))
            .await
            .expect("read");
        assert_eq!(read.as_ptr(), data.as_ptr());
        assert_eq!(read.len(), data.len());
    }

    #[tokio::test]
    async fn an_empty_body_is_empty() {
        let body = Full::new(Bytes::new());
        assert_eq!(
            read_body(body, None, &limits(10, IDLE)).await,
            Ok(Bytes::new())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_client_times_out() {
        let body = Script::new(&[b"partial"], Then::Hang);
        let started = tokio::time::Instant::now();
        let result = read_body(body, Some(100), &limits(1024, Duration::from_millis(500))).await;
        assert_eq!(result, Err(BodyError::Timeout));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(500),
            "paused time: the idle timeout, exactly"
        );
    }

    /// A body that sends one byte every `gap`, forever.
    struct Trickle {
        gap: Duration,
        next: Pin<Box<tokio::time::Sleep>>,
    }

    impl Body for Trickle {
        type Data = Bytes;
        type Error = &'static str;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.next.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let at = tokio::time::Instant::now() + self.gap;
            self.next.as_mut().reset(at);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_client_meets_the_whole_body_deadline() {
        let gap = Duration::from_millis(400);
        let body = Trickle {
            gap,
            next: Box::pin(tokio::time::sleep(gap)),
        };
        let limits = BodyLimits {
            limit: 1 << 20,
            idle: Duration::from_millis(500),
            deadline: Duration::from_secs(3),
        };
        let started = tokio::time::Instant::now();
        assert_eq!(
            read_body(body, None, &limits).await,
            Err(BodyError::Timeout)
        );
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[test]
    fn a_declared_length_preallocates_a_bounded_buffer() {
        let limit = 32 << 20;
        assert_eq!(capacity(Some(limit), limit, 10), PREALLOCATE_MAX as usize);
        assert_eq!(capacity(Some(100), limit, 10), 100);
        assert_eq!(capacity(Some(100), limit, 5_000), 5_000);
        assert_eq!(capacity(None, limit, 70_000), 70_000);
    }

    #[tokio::test]
    async fn a_failing_stream_is_aborted() {
        let body = Script::new(&[b"par"], Then::Fail);
        assert_eq!(
            read_body(body, None, &limits(1024, IDLE)).await,
            Err(BodyError::Aborted)
        );
    }

    #[test]
    fn errors_map_to_openai_statuses() {
        let too_large = BodyError::TooLarge { limit: 10 }.into_openai();
        assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(too_large.message.contains("10 bytes"));
        assert_eq!(
            BodyError::Timeout.into_openai().status,
            StatusCode::REQUEST_TIMEOUT
        );
        let aborted = BodyError::Aborted.into_openai();
        assert_eq!(aborted.status, StatusCode::BAD_REQUEST);
        assert_eq!(aborted.message, "the request body ended early");
    }

    fn lengths(values: &[&'static str]) -> Result<Option<u64>, OpenAiError> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(header::CONTENT_LENGTH, HeaderValue::from_static(value));
        }
        content_length(&headers)
    }

    #[test]
    fn content_length_parses_valid_values() {
        assert_eq!(lengths(&[]), Ok(None));
        assert_eq!(lengths(&["0"]), Ok(Some(0)));
        assert_eq!(lengths(&[" 42 "]), Ok(Some(42)));
        assert_eq!(lengths(&["42", "42"]), Ok(Some(42)));
        assert_eq!(lengths(&["42, 42"]), Ok(Some(42)));
        assert_eq!(lengths(&["18446744073709551615"]), Ok(Some(u64::MAX)));
    }

    #[test]
    fn malformed_content_length_is_400() {
        for bad in [
            &["abc"][..],
            &["+5"],
            &["-1"],
            &[""],
            &["1 2"],
            &["42", "43"],
            &["42, 43"],
            &["18446744073709551616"],
        ] {
            let err = lengths(bad).expect_err("malformed");
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    /// Compile-time check: hyper's server body fits `read_body`'s bounds.
    fn fits<B: Body<Data = Bytes> + Unpin>()
    where
        B::Error: Display,
    {
    }
    const _: fn() = fits::<hyper::body::Incoming>;
}

/// Values the tests above compare against the constant itself.
#[cfg(test)]
mod pinned {
    use super::*;

    #[test]
    fn a_declared_length_preallocates_at_most_64_kib() {
        assert_eq!(PREALLOCATE_MAX, 65_536);
        assert_eq!(capacity(Some(1 << 30), 1 << 30, 10), 65_536);
    }
}
