//! The body of every response the proxy sends: its own small JSON, or the upstream's stream.
//!
//! Upstream bodies (SSE or not) pass as they arrive: nothing waits for more data, so a
//! streamed completion reaches the client token by token; frames that arrive back to back
//! go out in one write ([`super::coalesce`]). If the client goes away, hyper
//! drops this body, which drops the upstream response and with it the upstream request. If
//! the upstream fails mid-stream, the error is passed on, and hyper aborts the client's
//! response (HTTP/1.1: the connection closes before the final chunk; h2: `RST_STREAM`), so
//! the client sees an error and never a clean but truncated end.
//!
//! A body may carry the request's [`Exchange`] ([`ProxyBody::observed`]): it counts the bytes
//! handed to the connection and is ended, for the access line and the request metrics, when the
//! last frame goes out, the upstream fails, or the body is dropped early (the client left). The
//! count is one addition per frame; nothing is allocated.
//!
//! A body may also hold its request's `server.max_inflight` slot ([`ProxyBody::holding`]) and
//! its place among its connection's active requests ([`ProxyBody::active_on`]), so a stream
//! counts as in flight, and its connection as busy, until its last byte is sent or its client
//! leaves.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use kcp_core::KeyId;
use kcp_upstream::{ResponseBody, UpstreamError};

use super::coalesce::Coalesced;
use crate::edge::overload::InflightGuard;
use crate::observe::Exchange;
use crate::observe::access_log::BodyEnd;
use crate::ops::connection::ActiveRequest;

/// A response body: proxy-made bytes or an upstream stream.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    /// The request this body answers, ended with the body.
    exchange: Option<Box<Exchange>>,
    /// The request's `max_inflight` slot, freed when the body is dropped.
    admitted: Option<InflightGuard>,
    /// The request's place among its connection's active requests, for the idle timeout.
    active: Option<ActiveRequest>,
}

#[derive(Debug)]
enum Kind {
    Full(Full<Bytes>),
    /// Boxed: the stream's state is several times the size of a small answer's.
    Upstream {
        body: Box<Coalesced<ResponseBody>>,
        key: KeyId,
    },
}

impl ProxyBody {
    /// The upstream's body, streamed as it arrives; `key` names the key in failure logs.
    pub fn upstream(body: ResponseBody, key: KeyId) -> Self {
        ProxyBody {
            kind: Kind::Upstream {
                body: Box::new(Coalesced::new(body)),
                key,
            },
            exchange: None,
            admitted: None,
            active: None,
        }
    }

    /// This body, ending `exchange` when it ends.
    pub fn observed(mut self, exchange: Box<Exchange>) -> Self {
        self.exchange = Some(exchange);
        self
    }

    /// This body, holding the request's `max_inflight` slot until it is dropped.
    pub fn holding(mut self, admitted: InflightGuard) -> Self {
        self.admitted = Some(admitted);
        self
    }

    /// This body, keeping its connection active (not idle) until it is dropped.
    pub fn active_on(mut self, active: ActiveRequest) -> Self {
        self.active = Some(active);
        self
    }

    fn end(&mut self, end: BodyEnd) {
        if let Some(exchange) = self.exchange.take() {
            exchange.end(end);
        }
    }
}

impl Drop for ProxyBody {
    /// hyper drops a body it knows to be empty or finished without polling it to the end, and
    /// one whose client went away.
    fn drop(&mut self) {
        let end = if self.is_end_stream() {
            BodyEnd::Complete
        } else {
            BodyEnd::Cancelled
        };
        self.end(end);
    }
}

impl From<Full<Bytes>> for ProxyBody {
    fn from(full: Full<Bytes>) -> Self {
        ProxyBody {
            kind: Kind::Full(full),
            exchange: None,
            admitted: None,
            active: None,
        }
    }
}

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        ProxyBody::from(Full::new(bytes))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(|never: Infallible| match never {}))),
            Kind::Upstream { body, key } => {
                let polled = Pin::new(&mut **body).poll_frame(cx);
                if let Poll::Ready(Some(Err(error))) = &polled {
                    let _request = this.exchange.as_ref().map(|e| e.span().enter());
                    tracing::warn!(
                        key = key.as_str(),
                        error = %error,
                        kind = error.kind().as_str(),
                        "upstream response failed mid-stream; aborting the client's response"
                    );
                }
                polled
            }
        };
        if this.exchange.is_some() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let (Some(exchange), Some(data)) = (&mut this.exchange, frame.data_ref()) {
                        exchange.sent(data.len());
                    }
                    if this.is_end_stream() {
                        this.end(BodyEnd::Complete);
                    }
                }
                Poll::Ready(Some(Err(_))) => this.end(BodyEnd::Failed),
                Poll::Ready(None) => this.end(BodyEnd::Complete),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(full) => full.is_end_stream(),
            Kind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(full) => full.size_hint(),
            Kind::Upstream { body, .. } => body.size_hint(),
        }
    }
}
