//! The typed sections of `config.toml` and their built-in defaults.
//!
//! Every struct is `#[serde(default, deny_unknown_fields)]`: an omitted field takes its default
//! and a misspelled one is an error instead of a silently ignored setting. Values are checked
//! once, in `validate`, so the rest of the server trusts them. Times are stored as integer
//! milliseconds (what users write) and exposed as [`Duration`]s through helper methods.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kcp_core::{RetryPolicy, Secret, Strategy};
use serde::{Deserialize, Serialize};

/// The whole configuration apart from the API keys, which `load` resolves separately.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The client-facing listener.
    pub server: ServerSection,
    /// Where requests go and how long to wait for them.
    pub upstream: UpstreamSection,
    /// How a key is picked for each request.
    pub keys: KeysSection,
    /// Proxy-side request throttling.
    pub rate_limit: RateLimitSection,
    /// Logs, metrics and the admin API.
    pub observability: ObservabilitySection,
    /// Who may use the proxy.
    pub auth: AuthSection,
    /// Browser access.
    pub cors: CorsSection,
    /// Replicas sharing key state through Redis; absent: this replica learns alone.
    pub cluster: Option<crate::cluster::ClusterSection>,
}

/// `[server]`: the listener clients connect to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Address clients connect to.
    pub bind_addr: SocketAddr,
    /// Largest request body accepted; bodies are buffered so they can be replayed on retry.
    pub request_body_limit_bytes: usize,
    /// How long in-flight requests may finish after a shutdown signal; 0 stops at once.
    pub graceful_shutdown_seconds: u64,
    /// Requests served at once; more are refused instead of queueing without bound.
    pub max_inflight: usize,
    /// Time a client has to send the request line and headers.
    pub header_read_timeout_ms: u64,
    /// Longest idle gap between two body chunks from the client.
    pub body_read_timeout_ms: u64,
    /// Largest request head (request line + headers) accepted.
    pub max_header_bytes: usize,
    /// Deadline for a whole request body, on top of the idle gap between chunks, so a client
    /// trickling one byte at a time cannot hold a slot for long.
    pub body_timeout_ms: u64,
    /// Longest a client may leave a response chunk unread before it is dropped, which frees its
    /// slot and cancels its upstream call.
    pub response_write_timeout_ms: u64,
    /// Client connections open at once; a connection beyond it is closed at once.
    pub max_connections: usize,
    /// Interval of h2 keep-alive pings to a client; a dead peer is dropped when one goes
    /// unanswered for `h2_keepalive_timeout_ms`.
    pub h2_keepalive_interval_ms: u64,
    /// How long an h2 keep-alive ping may go unanswered.
    pub h2_keepalive_timeout_ms: u64,
    /// A connection (h2 or keep-alive HTTP/1.1) with no request in flight for this long is closed.
    pub idle_connection_timeout_ms: u64,
    /// Threads serving client connections, each with its own runtime and upstream connection
    /// pool; 0 means one per CPU core.
    pub worker_threads: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            bind_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            request_body_limit_bytes: 32 * 1024 * 1024,
            graceful_shutdown_seconds: 10,
            max_inflight: 10_000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            max_header_bytes: 65_536,
            body_timeout_ms: 60_000,
            response_write_timeout_ms: 60_000,
            max_connections: 20_000,
            h2_keepalive_interval_ms: 20_000,
            h2_keepalive_timeout_ms: 20_000,
            idle_connection_timeout_ms: 120_000,
            worker_threads: 0,
        }
    }
}

impl ServerSection {
    /// Grace period for in-flight requests on shutdown.
    pub fn graceful_shutdown(&self) -> Duration {
        Duration::from_secs(self.graceful_shutdown_seconds)
    }

    /// Deadline for the request head.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    /// Longest idle gap between request body chunks.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }

    /// Deadline for a whole request body.
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }

    /// Longest a response chunk may wait for the client to read it.
    pub fn response_write_timeout(&self) -> Duration {
        Duration::from_millis(self.response_write_timeout_ms)
    }

    /// Interval of h2 keep-alive pings.
    pub fn h2_keepalive_interval(&self) -> Duration {
        Duration::from_millis(self.h2_keepalive_interval_ms)
    }

    /// How long an h2 keep-alive ping may go unanswered.
    pub fn h2_keepalive_timeout(&self) -> Duration {
        Duration::from_millis(self.h2_keepalive_timeout_ms)
    }

    /// How long a connection may sit with no request in flight.
    pub fn idle_connection_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_connection_timeout_ms)
    }
}

/// `[upstream]`: the default provider and the client's timeouts and retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    /// Base URL of keys that name no `url` of their own (and of every `OPENAI_KEYS` key).
    pub base_url: String,
    /// TCP + TLS connect deadline.
    pub connect_timeout_ms: u64,
    /// Deadline for the response headers, not the body: a non-streaming completion can take
    /// minutes before its first byte, a stream can run for longer.
    pub request_timeout_ms: u64,
    /// First retry delay; doubles per attempt (with jitter) up to `retry_max_backoff_ms`.
    pub retry_initial_backoff_ms: u64,
    /// Cap on one retry delay.
    pub retry_max_backoff_ms: u64,
    /// Extra attempts after the first for one client request.
    pub max_retries: u32,
    /// Longest gap between two chunks of a streaming response before it is cut.
    pub stream_idle_timeout_ms: u64,
    /// Extra PEM CA bundle to trust, for upstreams behind a private CA.
    pub ca_file: Option<PathBuf>,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".to_owned(),
            connect_timeout_ms: 3_000,
            request_timeout_ms: 600_000,
            retry_initial_backoff_ms: millis(RetryPolicy::default().backoff.initial),
            retry_max_backoff_ms: millis(RetryPolicy::default().backoff.max),
            max_retries: RetryPolicy::default().max_retries,
            stream_idle_timeout_ms: 60_000,
            ca_file: None,
        }
    }
}

impl UpstreamSection {
    /// TCP + TLS connect deadline.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Deadline for the response headers.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// First retry delay.
    pub fn retry_initial_backoff(&self) -> Duration {
        Duration::from_millis(self.retry_initial_backoff_ms)
    }

    /// Cap on one retry delay.
    pub fn retry_max_backoff(&self) -> Duration {
        Duration::from_millis(self.retry_max_backoff_ms)
    }

    /// Longest gap between two chunks of a streaming response.
    pub fn stream_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.stream_idle_timeout_ms)
    }
}

/// `[keys]`: key selection policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysSection {
    /// How the next key is chosen among the eligible ones.
    pub rotation_strategy: Strategy,
    /// Health lost per upstream failure, in units of 20 points out of 1000 (a success earns
    /// 10); the health score weights `round_robin_health_weighted`.
    pub unhealthy_penalty: u32,
}

impl Default for KeysSection {
    fn default() -> Self {
        Self {
            rotation_strategy: Strategy::default(),
            unhealthy_penalty: 5,
        }
    }
}

/// `[rate_limit]`: throttling the proxy applies before a request reaches a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSection {
    /// Requests per second per key; `None` leaves keys unthrottled.
    pub per_key_rps: Option<f64>,
    /// Requests per second over all keys; `None` leaves the proxy unthrottled.
    pub global_rps: Option<f64>,
    /// Requests that may go at once above the steady rate.
    pub burst: u32,
    /// Longest a request waits for capacity before it is refused.
    pub max_wait_ms: u64,
    /// Requests that may wait for capacity at once; more are refused.
    pub max_queue: usize,
    /// Delay target of the wait queue: once waits have stayed above it for
    /// `queue_interval_ms`, the queue is standing and new excess is answered at once (429 with
    /// `Retry-After`) instead of waiting up to `max_wait_ms`.
    pub queue_target_ms: u64,
    /// How long waits must stay above `queue_target_ms` before excess is shed. Raise it to let
    /// longer bursts wait (batch jobs), at the cost of latency under sustained overload.
    pub queue_interval_ms: u64,
    /// Completion tokens assumed for a request without `max_tokens`, for `tpm` accounting.
    pub default_completion_tokens: u32,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            per_key_rps: None,
            global_rps: None,
            burst: 10,
            max_wait_ms: millis(RetryPolicy::default().max_wait),
            max_queue: RetryPolicy::default().max_queue,
            queue_target_ms: millis(RetryPolicy::default().queue_delay.target),
            queue_interval_ms: millis(RetryPolicy::default().queue_delay.interval),
            default_completion_tokens: 256,
        }
    }
}

impl RateLimitSection {
    /// Longest wait for capacity.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    /// The wait queue's delay control.
    pub fn queue_delay(&self) -> kcp_core::DelayControl {
        kcp_core::DelayControl {
            target: Duration::from_millis(self.queue_target_ms),
            interval: Duration::from_millis(self.queue_interval_ms),
        }
    }
}

/// A default given in kcp-core as a duration, in the config's milliseconds.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `[observability]`: logs, metrics and the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObservabilitySection {
    /// Address of the Prometheus metrics listener; loopback by default because metrics name
    /// upstreams and key fingerprints.
    pub metrics_bind: SocketAddr,
    /// Log filter (`info`, `debug`, or directives like `kcp_server=debug,info`); `RUST_LOG`
    /// overrides it.
    pub tracing_level: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// Bearer token for the admin API; the admin API is off while it is unset.
    pub admin_token: Option<Secret>,
}

impl Default for ObservabilitySection {
    fn default() -> Self {
        Self {
            metrics_bind: SocketAddr::from(([127, 0, 0, 1], 9090)),
            tracing_level: "info".to_owned(),
            log_format: LogFormat::Text,
            admin_token: None,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogFormat {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// `[auth]`: tokens clients must present. With none configured the proxy is open: that is
/// allowed on a loopback bind, and elsewhere only with `allow_anonymous = true`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Accepted client tokens.
    pub client_keys: Vec<Secret>,
    /// Name of an environment variable holding more tokens, comma-separated, so they need not
    /// be written into the file.
    pub client_keys_env: Option<String>,
    /// Says that an open proxy on a non-loopback address is intended (a container behind a
    /// private network); without it such a bind refuses to start.
    pub allow_anonymous: bool,
}

/// `[cors]`: which browser origins may call the proxy. Off (no origin) until configured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsSection {
    /// Allowed origins (`https://app.example.com`), or `*` for any; none by default.
    pub allowed_origins: Vec<String>,
}
