//! Tunables of the upstream client; the server crate fills them from its config file.

use std::path::PathBuf;
use std::time::Duration;

/// How [`Upstream`](crate::Upstream) connects, waits and pools.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// Bound on establishing a connection: TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// Bound from sending a request until its response headers arrive (connecting included).
    pub request_timeout: Duration,
    /// Longest gap allowed between two response body frames while waiting on the upstream.
    /// Never a cap on the total duration of a stream.
    pub stream_idle_timeout: Duration,
    /// Extra PEM CA certificate(s), trusted in addition to the webpki and native roots.
    pub ca_file: Option<PathBuf>,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Most idle connections kept per origin (in each lane).
    pub pool_max_idle_per_host: usize,
    /// Connection pools, one per worker thread ([`enter_lane`](crate::enter_lane)); at least 1.
    pub lanes: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            stream_idle_timeout: Duration::from_secs(60),
            ca_file: None,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
            lanes: 1,
        }
    }
}
