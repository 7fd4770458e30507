//! Write coalescing of an upstream body: frames that are already there go out in one write.
//!
//! hyper's HTTP/1 client hands a response body over one frame at a time, and its server
//! flushes whenever the body it sends has no frame ready, so an upstream that sends a whole
//! stream at once (a short completion, a cached answer, a burst of tokens) would cost one
//! write syscall per SSE event towards the client. [`Coalesced`] holds a frame back while more
//! are arriving: after a frame it asks for the next at once, and when that one is not there
//! yet it yields to the scheduler (waking itself, so the task goes to the back of the run
//! queue and the upstream connection's task gets to read the next frame first). If a frame
//! came in meanwhile it is appended and the same happens again; once [`IDLE_YIELDS`] yields
//! in a row brought nothing, everything held goes out. A frame is therefore never held for
//! want of the next one: a token stream with gaps between tokens passes token by token,
//! delayed by a few turns of the scheduler (microseconds), and a burst goes out as one write
//! of up to [`MAX_HELD`] bytes. More than one yield is needed because an idle worker thread
//! may steal the yielding task and poll it again before the upstream's task has run.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

/// Most bytes held back before they are sent anyway.
pub const MAX_HELD: usize = 16 * 1024;

/// Yields in a row without a new frame after which the held data goes out.
pub const IDLE_YIELDS: u8 = 3;

/// A body whose data frames that arrive back to back are merged.
#[derive(Debug)]
pub struct Coalesced<B: Body> {
    inner: B,
    /// Data not sent yet.
    held: Held,
    /// Yields in a row that brought no new frame.
    yields: u8,
    /// What the inner body returned after the held data: it goes out next.
    after: Option<After<B::Error>>,
    /// An error follows data just sent: the connection must flush that data first (hyper
    /// flushes when the body is `Pending`), or the client's response is cut without it.
    flush_first: bool,
}

// No field is ever pinned: the inner body is polled through `Pin::new`, which needs it `Unpin`.
impl<B: Body + Unpin> Unpin for Coalesced<B> {}

#[derive(Debug, Default)]
enum Held {
    #[default]
    Nothing,
    One(Bytes),
    Many(BytesMut),
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::Nothing => 0,
            Held::One(bytes) => bytes.len(),
            Held::Many(buf) => buf.len(),
        }
    }

    fn push(&mut self, data: Bytes) {
        *self = match std::mem::take(self) {
            Held::Nothing => Held::One(data),
            Held::One(first) => {
                let mut buf = BytesMut::with_capacity((first.len() + data.len()).max(1024));
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                Held::Many(buf)
            }
            Held::Many(mut buf) => {
                buf.extend_from_slice(&data);
                Held::Many(buf)
            }
        };
    }

    fn take(&mut self) -> Option<Bytes> {
        match std::mem::take(self) {
            Held::Nothing => None,
            Held::One(bytes) => Some(bytes),
            Held::Many(buf) => Some(buf.freeze()),
        }
    }
}

#[derive(Debug)]
enum After<E> {
    Frame(Frame<Bytes>),
    Error(E),
    End,
}

impl<B: Body<Data = Bytes> + Unpin> Coalesced<B> {
    /// `inner`, its back-to-back data frames merged.
    pub fn new(inner: B) -> Self {
        Coalesced {
            inner,
            held: Held::Nothing,
            yields: 0,
            after: None,
            flush_first: false,
        }
    }

    fn release(&mut self) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.yields = 0;
        match self.held.take() {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None => self.next_after(),
        }
    }

    fn next_after(&mut self) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.after.take() {
            Some(After::Frame(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(After::Error(error)) => Poll::Ready(Some(Err(error))),
            Some(After::End) => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Coalesced<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if this.flush_first {
            this.flush_first = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if this.after.is_some() {
            return this.release();
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.held.push(data);
                        this.yields = 0;
                        if this.held.len() >= MAX_HELD || this.inner.is_end_stream() {
                            return this.release();
                        }
                    }
                    Err(frame) => {
                        this.after = Some(After::Frame(frame));
                        return this.release();
                    }
                },
                Poll::Ready(Some(Err(error))) => {
                    this.flush_first = !matches!(this.held, Held::Nothing);
                    this.after = Some(After::Error(error));
                    return this.release();
                }
                Poll::Ready(None) => {
                    this.after = Some(After::End);
                    return this.release();
                }
                Poll::Pending => {
                    if matches!(this.held, Held::Nothing) {
                        return Poll::Pending;
                    }
                    if this.yields >= IDLE_YIELDS {
                        return this.release();
                    }
                    // A turn of the scheduler for the upstream to catch up (see the module
                    // docs); the inner body has registered the waker too.
                    this.yields += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.held, Held::Nothing)
            && match &self.after {
                Some(After::End) => true,
                Some(_) => false,
                None => self.inner.is_end_stream(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let held = self.held.len() as u64;
        if held > 0 {
            hint.set_lower(hint.lower().saturating_add(held));
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(held));
            }
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use super::*;

    /// A body that plays a script of polls: `Some(frame)`, or `None` for one `Pending`.
    struct Script {
        polls: VecDeque<Option<Result<Frame<Bytes>, &'static str>>>,
    }

    impl Body for Script {
        type Data = Bytes;
        type Error = &'static str;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            match self.polls.pop_front() {
                Some(Some(frame)) => Poll::Ready(Some(frame)),
                Some(None) => Poll::Pending,
                None => Poll::Ready(None),
            }
        }

        fn is_end_stream(&self) -> bool {
            self.polls.is_empty()
        }
    }

    fn data(text: &'static str) -> Option<Result<Frame<Bytes>, &'static str>> {
        Some(Ok(Frame::data(Bytes::from_static(text.as_bytes()))))
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polls once: `Some(Ok(text))` for a data frame, `Some(Err(..))` for an error or
    /// trailers, `None` for the end.
    fn poll(body: &mut Coalesced<Script>, waker: &Waker) -> Poll<Option<Result<String, String>>> {
        let mut cx = Context::from_waker(waker);
        Pin::new(body).poll_frame(&mut cx).map(|frame| {
            frame.map(|f| match f {
                Ok(frame) => {
                    let data = frame.into_data().map_err(|_| "trailers".to_owned())?;
                    Ok(String::from_utf8(data.to_vec()).expect("utf-8"))
                }
                Err(error) => Err(error.to_owned()),
            })
        })
    }

    fn body(polls: Vec<Option<Result<Frame<Bytes>, &'static str>>>) -> Coalesced<Script> {
        Coalesced::new(Script {
            polls: polls.into(),
        })
    }

    #[test]
    fn frames_that_are_there_go_out_as_one() {
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut body = body(vec![data("a"), data("b"), data("c")]);
        assert_eq!(poll(&mut body, &waker), Poll::Ready(Some(Ok("abc".into()))));
        assert!(body.is_end_stream());
        assert_eq!(poll(&mut body, &waker), Poll::Ready(None));
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "no yield when the end is known"
        );
    }

    #[test]
    fn a_frame_waits_a_few_yields_for_the_next_and_no_longer() {
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let idle = usize::from(IDLE_YIELDS);
        // "a", nothing yet, "b" arrived during the first yield, then nothing for IDLE_YIELDS
        // polls, then "c" and the end.
        let mut polls = vec![data("a"), None, data("b")];
        polls.extend((0..=idle).map(|_| None));
        polls.extend([None, data("c")]);
        let mut body = body(polls);
        assert_eq!(poll(&mut body, &waker), Poll::Pending);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "yielded once");
        // "b" came during the yield: held with "a"; then a yield per poll that brings nothing.
        for yielded in 2..=idle + 1 {
            assert_eq!(poll(&mut body, &waker), Poll::Pending);
            assert_eq!(wakes.0.load(Ordering::SeqCst), yielded);
        }
        // IDLE_YIELDS yields brought nothing: "ab" goes out.
        assert_eq!(poll(&mut body, &waker), Poll::Ready(Some(Ok("ab".into()))));
        // Nothing held: a plain Pending, no self-wake.
        assert_eq!(poll(&mut body, &waker), Poll::Pending);
        assert_eq!(wakes.0.load(Ordering::SeqCst), idle + 1);
        assert_eq!(poll(&mut body, &waker), Poll::Ready(Some(Ok("c".into()))));
        assert_eq!(poll(&mut body, &waker), Poll::Ready(None));
    }

    #[test]
    fn held_data_goes_out_before_an_error_or_trailers() {
        let waker = Waker::from(Arc::new(Wakes::default()));
        let mut failing = body(vec![data("a"), data("b"), Some(Err("reset"))]);
        assert_eq!(
            poll(&mut failing, &waker),
            Poll::Ready(Some(Ok("ab".into())))
        );
        assert!(!failing.is_end_stream());
        // One `Pending` in between, so that the connection flushes "ab" before the error
        // aborts the response.
        assert_eq!(poll(&mut failing, &waker), Poll::Pending);
        assert_eq!(
            poll(&mut failing, &waker),
            Poll::Ready(Some(Err("reset".into())))
        );
        let trailers = Some(Ok(Frame::trailers(http::HeaderMap::new())));
        let mut with_trailers = body(vec![data("a"), trailers, data("x")]);
        assert_eq!(
            poll(&mut with_trailers, &waker),
            Poll::Ready(Some(Ok("a".into())))
        );
        assert_eq!(
            poll(&mut with_trailers, &waker),
            Poll::Ready(Some(Err("trailers".into())))
        );
    }

    #[test]
    fn a_long_burst_is_cut_at_the_bound() {
        let waker = Waker::from(Arc::new(Wakes::default()));
        let chunk = "x".repeat(MAX_HELD / 2);
        let chunk: &'static str = Box::leak(chunk.into_boxed_str());
        let mut body = body(vec![data(chunk), data(chunk), data(chunk), None]);
        let Poll::Ready(Some(Ok(first))) = poll(&mut body, &waker) else {
            panic!("the first two chunks fill the bound")
        };
        assert_eq!(first.len(), MAX_HELD);
        assert_eq!(poll(&mut body, &waker), Poll::Pending);
        let Poll::Ready(Some(Ok(rest))) = poll(&mut body, &waker) else {
            panic!("the third chunk when the body ends")
        };
        assert_eq!(rest.len(), MAX_HELD / 2);
    }
}
