//! The body of every response the proxy sends: its own small JSON, or the upstream's stream.
//!
//! Upstream bodies (SSE or not) pass frame by frame as they arrive: nothing is buffered, so
//! a streamed completion reaches the client token by token. If the client goes away, hyper
//! drops this body, which drops the upstream response and with it the upstream request. If
//! the upstream fails mid-stream, the error is passed on, and hyper aborts the client's
//! response (HTTP/1.1: the connection closes before the final chunk; h2: `RST_STREAM`), so
//! the client sees an error and never a clean but truncated end.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use kcp_core::KeyId;
use kcp_upstream::{ResponseBody, UpstreamError};

/// A response body: proxy-made bytes or an upstream stream.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Full(Full<Bytes>),
    Upstream { body: ResponseBody, key: KeyId },
}

impl ProxyBody {
    /// The upstream's body, streamed as it arrives; `key` names the key in failure logs.
    pub fn upstream(body: ResponseBody, key: KeyId) -> Self {
        ProxyBody {
            kind: Kind::Upstream { body, key },
        }
    }
}

impl From<Full<Bytes>> for ProxyBody {
    fn from(full: Full<Bytes>) -> Self {
        ProxyBody {
            kind: Kind::Full(full),
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
        match &mut self.get_mut().kind {
            Kind::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(|never: Infallible| match never {}))),
            Kind::Upstream { body, key } => {
                let polled = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(Some(Err(error))) = &polled {
                    tracing::warn!(
                        key = key.as_str(),
                        error = %error,
                        kind = error.kind().as_str(),
                        "upstream response failed mid-stream; aborting the client's response"
                    );
                }
                polled
            }
        }
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
