//! The upstream HTTP client of KeyCycleProxy.
//!
//! One [`Upstream`] is one connection pool (hyper-util's legacy client over hyper-rustls) per
//! worker thread ([`enter_lane`]), shared by every key: connections are keyed by origin, never
//! by key, so keys of the same provider reuse each other's warm TCP+TLS connections. ALPN picks
//! HTTP/2 or HTTP/1.1 per origin.
//!
//! The crate adds what a proxy needs on top of hyper and nothing else:
//! - bounded waits: connect (TCP+TLS), response headers, and the gap between two body frames,
//!   but never the total length of a stream;
//! - a streaming [`ResponseBody`] that forwards frames as they arrive and cancels the upstream
//!   request when dropped;
//! - errors tagged with where they happened ([`ErrorKind`]) and whether the request may have
//!   reached the upstream, naming only the origin, so a key or a query string never leaks.

mod body;
mod client;
mod config;
mod connector;
mod error;
mod lane;
mod origin;
mod tls;

pub use body::ResponseBody;
pub use client::Upstream;
pub use config::UpstreamConfig;
pub use error::{BuildError, ErrorKind, UpstreamError};
pub use lane::enter_lane;
pub use tls::client_config as tls_client_config;
