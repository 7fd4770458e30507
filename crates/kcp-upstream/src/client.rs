//! The pooled client: one hyper-util client per lane for every key, bounded by the header
//! timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ResponseBody;
use crate::config::UpstreamConfig;
use crate::connector::TimedConnector;
use crate::error::{BuildError, UpstreamError};
use crate::lane;
use crate::origin::Origin;
use crate::tls;

/// A pooled HTTP/1.1 + HTTP/2 client for upstream requests. Cloning shares the pool.
#[derive(Clone, Debug)]
pub struct Upstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// One client (one pool) per lane ([`crate::lane`]); never empty.
    lanes: Box<[Client<TimedConnector, Full<Bytes>>]>,
    request_timeout: Duration,
    stream_idle_timeout: Duration,
}

impl Upstream {
    /// Builds the client; fails only if the TLS trust setup (`ca_file`) is unusable.
    pub fn new(config: &UpstreamConfig) -> Result<Upstream, BuildError> {
        let tls = tls::client_config(config.ca_file.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let lanes = (0..config.lanes.max(1))
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(config.pool_idle_timeout)
                    .pool_max_idle_per_host(config.pool_max_idle_per_host)
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .build(TimedConnector::new(https.clone(), config.connect_timeout))
            })
            .collect();
        Ok(Upstream {
            inner: Arc::new(Inner {
                lanes,
                request_timeout: config.request_timeout,
                stream_idle_timeout: config.stream_idle_timeout,
            }),
        })
    }

    /// Sends one request, whose URI must be absolute (`https://host/...` or `http://host/...`),
    /// and waits for the response headers. The body streams afterwards through [`ResponseBody`].
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let origin = Origin::of(request.uri());
        if request
            .uri()
            .authority()
            .is_some_and(|authority| authority.as_str().contains('@'))
        {
            return Err(UpstreamError::credentials(origin));
        }
        let timeout = self.inner.request_timeout;
        let lanes = &self.inner.lanes;
        let client = &lanes[lane::current() % lanes.len()];
        let response = match tokio::time::timeout(timeout, client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Err(UpstreamError::from_client(origin, error)),
            Err(_) => return Err(UpstreamError::headers_timeout(origin, timeout)),
        };
        let idle_timeout = self.inner.stream_idle_timeout;
        Ok(response.map(|body| ResponseBody::new(body, idle_timeout, origin)))
    }
}
