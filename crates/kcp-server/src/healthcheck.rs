//! `kcp-server healthcheck`: asks a running server for `GET /health`.
//!
//! Container images should not carry curl just for `HEALTHCHECK`; the binary they already
//! hold can ask. The check is bounded by [`TIMEOUT`] and passes only on a 200.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Longest the whole check may take.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Why the server is not healthy.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("no answer from {addr} within {secs} s", secs = TIMEOUT.as_secs())]
    Timeout { addr: SocketAddr },
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP error talking to {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("{addr} answered /health with {status}")]
    Unhealthy {
        addr: SocketAddr,
        status: StatusCode,
    },
}

/// `Ok` when `GET http://{addr}/health` answers 200 within [`TIMEOUT`].
pub async fn check(addr: SocketAddr) -> Result<(), HealthError> {
    tokio::time::timeout(TIMEOUT, ask(addr))
        .await
        .unwrap_or(Err(HealthError::Timeout { addr }))
}

async fn ask(addr: SocketAddr) -> Result<(), HealthError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| HealthError::Connect { addr, source })?;
    let http = |source| HealthError::Http { addr, source };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(http)?;
    tokio::spawn(connection);
    let request = Request::get("/health")
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|_| HealthError::Timeout { addr })?;
    let response = sender.send_request(request).await.map_err(http)?;
    match response.status() {
        StatusCode::OK => Ok(()),
        status => Err(HealthError::Unhealthy { addr, status }),
    }
}
