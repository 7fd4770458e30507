//! Connection establishment bounded as a whole.
//!
//! `HttpConnector`'s own timeout covers each TCP attempt only; a server that accepts TCP and then
//! stalls the TLS handshake would otherwise hold a request until the header timeout, and be
//! reported as "may have reached upstream". Bounding TCP+TLS together keeps such a failure a
//! connect error: nothing was sent, so retrying on another upstream is safe.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connection = MaybeHttpsStream<TokioIo<TcpStream>>;

/// An HTTPS-or-HTTP connector whose whole connection setup must finish within `timeout`.
#[derive(Clone, Debug)]
pub(crate) struct TimedConnector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

impl TimedConnector {
    pub(crate) fn new(inner: HttpsConnector<HttpConnector>, timeout: Duration) -> Self {
        Self { inner, timeout }
    }
}

impl tower_service::Service<Uri> for TimedConnector {
    type Response = Connection;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Connection, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.inner.call(dst);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(Box::new(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection not established within {timeout:?}"),
                )) as BoxError),
            }
        })
    }
}
