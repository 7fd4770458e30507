//! Prometheus metrics: what the proxy did, how long it took, and where every key stands.
//!
//! All series live in a [`Registry`] handed in by the caller (no global statics), so tests and
//! embedders get their own, and [`render`] turns it into the text exposition format served on
//! `observability.metrics_bind` at `/metrics`.
//!
//! Two families of series:
//! - **Request path** (`kcp_requests_total`, `kcp_upstream_requests_total`, the latency
//!   histograms, `kcp_retries_total`, `kcp_inflight_requests`): updated by the service as it
//!   works. These calls take no lock of ours; the model allow-list is an immutable set swapped
//!   atomically on reload ([`ArcSwap`]), so the request path takes no lock.
//! - **Key state** (`kcp_key_state`, `kcp_key_cooldown_seconds`, `kcp_key_remaining_*`):
//!   gauges copied from `KeyPool::snapshot(now)` by [`Metrics::refresh_keys`] right before each
//!   scrape, so they are exact at scrape time and cost nothing between scrapes.
//!
//! Cardinality is bounded by construction: `key` is a configured key's name or fingerprint
//! (never the secret), `model` is a model named in the config or `other` ([`Metrics::set_models`]),
//! `status` is a three-digit HTTP status, and `outcome`, `reason` and `state` come from closed
//! sets. Per-key counters and histograms of a key removed by a reload stay until restart (a
//! counter that vanishes and reappears would read as a reset); its gauges are removed at once,
//! because a stale "available" would lie.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use kcp_core::{KeySnapshot, KeyStatus};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// `model` label of a request whose model is not named in the config.
pub const OTHER_MODEL: &str = "other";

/// `model` label of a request that names no model (`GET /v1/models`, uploads).
pub const NO_MODEL: &str = "none";

/// Client-facing and upstream latencies: a completion can take minutes before it ends.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The proxy's own share of a request: 10 µs … 100 ms, finer than any upstream latency.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1,
];

/// Waiting for a key: from none (the common case) up to `rate_limit.max_wait_ms` and beyond.
const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How one upstream attempt ended, as the `outcome` label of `kcp_upstream_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamOutcome {
    /// A 2xx or 3xx.
    Success,
    /// A 429 rate limit.
    RateLimited,
    /// A 429 `insufficient_quota` or a billing error (402).
    Quota,
    /// A 401 or 403: the key was rejected.
    Auth,
    /// A 500, 502, 503 or 504, or a broken connection.
    ServerError,
    /// No response headers in time.
    Timeout,
    /// TCP or TLS connect failed.
    ConnectError,
    /// Any other 4xx: the request's own fault, passed through.
    ClientError,
    /// A 403/404 refusing the model or endpoint for this key.
    ModelRefused,
    /// A 429 "request too large" for this key's token limit.
    TooLarge,
}

impl UpstreamOutcome {
    /// Every outcome, in label order.
    pub const ALL: [UpstreamOutcome; 10] = [
        UpstreamOutcome::Success,
        UpstreamOutcome::RateLimited,
        UpstreamOutcome::Quota,
        UpstreamOutcome::Auth,
        UpstreamOutcome::ServerError,
        UpstreamOutcome::Timeout,
        UpstreamOutcome::ConnectError,
        UpstreamOutcome::ClientError,
        UpstreamOutcome::ModelRefused,
        UpstreamOutcome::TooLarge,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamOutcome::Success => "success",
            UpstreamOutcome::RateLimited => "rate_limited",
            UpstreamOutcome::Quota => "quota",
            UpstreamOutcome::Auth => "auth",
            UpstreamOutcome::ServerError => "server_error",
            UpstreamOutcome::Timeout => "timeout",
            UpstreamOutcome::ConnectError => "connect_error",
            UpstreamOutcome::ClientError => "client_error",
            UpstreamOutcome::ModelRefused => "model_refused",
            UpstreamOutcome::TooLarge => "too_large",
        }
    }
}

impl UpstreamOutcome {
    /// The `reason` label of `kcp_retries_total` for an attempt made after this outcome:
    /// `rate_limited`, `key_rejected` (quota, billing, auth), `server_error`, `timeout` or
    /// `connect_error`; `None` for outcomes that end the request.
    pub fn retry_reason(self) -> Option<&'static str> {
        match self {
            UpstreamOutcome::Success | UpstreamOutcome::ClientError => None,
            UpstreamOutcome::RateLimited => Some("rate_limited"),
            UpstreamOutcome::Quota | UpstreamOutcome::Auth => Some("key_rejected"),
            UpstreamOutcome::ModelRefused => Some("model_refused"),
            UpstreamOutcome::TooLarge => Some("too_large"),
            UpstreamOutcome::ServerError => Some("server_error"),
            UpstreamOutcome::Timeout => Some("timeout"),
            UpstreamOutcome::ConnectError => Some("connect_error"),
        }
    }
}

impl fmt::Display for UpstreamOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The proxy's metrics. Cheap to clone: every clone updates the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_requests: IntCounterVec,
    upstream_ttfb: HistogramVec,
    overhead: Histogram,
    retries: IntCounterVec,
    inflight: IntGauge,
    queue_wait: Histogram,
    key_state: IntGaugeVec,
    key_cooldown: prometheus::GaugeVec,
    key_remaining_requests: IntGaugeVec,
    key_remaining_tokens: IntGaugeVec,
    connections: IntGauge,
    connections_refused: prometheus::IntCounter,
    connection_errors: IntCounterVec,
    /// Models that get their own `model` label; replaced whole on reload.
    models: ArcSwap<HashSet<Box<str>>>,
    /// Keys whose gauges are exported, so a refresh can remove the ones that left the pool.
    /// Only the scrape path touches it.
    exported_keys: Mutex<HashSet<String>>,
}

impl Metrics {
    /// Creates every series and registers it, with the process collector (Linux), in `registry`.
    ///
    /// Fails if a metric of the same name is already registered there, e.g. when called twice
    /// with one registry.
    pub fn new(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let inner = Inner {
            requests: IntCounterVec::new(
                Opts::new(
                    "kcp_requests_total",
                    "Responses sent to clients, by model and HTTP status.",
                ),
                &["model", "status"],
            )?,
            request_duration: HistogramVec::new(
                histogram(
                    "kcp_request_duration_seconds",
                    "Client-facing request time, from the request head to the last body byte.",
                    LATENCY_BUCKETS,
                ),
                &["model"],
            )?,
            upstream_requests: IntCounterVec::new(
                Opts::new(
                    "kcp_upstream_requests_total",
                    "Upstream attempts, by key and outcome.",
                ),
                &["key", "outcome"],
            )?,
            upstream_ttfb: HistogramVec::new(
                histogram(
                    "kcp_upstream_ttfb_seconds",
                    "Time from sending an upstream request to its response headers.",
                    LATENCY_BUCKETS,
                ),
                &["key"],
            )?,
            overhead: Histogram::with_opts(histogram(
                "kcp_overhead_seconds",
                "Time spent in the proxy itself up to the response head: that time minus \
                 upstream time, waits for a key and retry backoff.",
                OVERHEAD_BUCKETS,
            ))?,
            retries: IntCounterVec::new(
                Opts::new("kcp_retries_total", "Extra upstream attempts, by reason."),
                &["reason"],
            )?,
            inflight: IntGauge::new("kcp_inflight_requests", "Client requests being served now.")?,
            queue_wait: Histogram::with_opts(histogram(
                "kcp_queue_wait_seconds",
                "Time a request waited for a key that could take it.",
                QUEUE_WAIT_BUCKETS,
            ))?,
            key_state: IntGaugeVec::new(
                Opts::new(
                    "kcp_key_state",
                    "1 for the key's current state, 0 for the others.",
                ),
                &["key", "state"],
            )?,
            key_cooldown: prometheus::GaugeVec::new(
                Opts::new(
                    "kcp_key_cooldown_seconds",
                    "Seconds until the key can take requests again (a disabled key: until its \
                     next re-check).",
                ),
                &["key"],
            )?,
            key_remaining_requests: IntGaugeVec::new(
                Opts::new(
                    "kcp_key_remaining_requests",
                    "Requests left in the key's current window, as learned from the provider's \
                     headers.",
                ),
                &["key"],
            )?,
            key_remaining_tokens: IntGaugeVec::new(
                Opts::new(
                    "kcp_key_remaining_tokens",
                    "Tokens left in the key's current window, as learned from the provider's \
                     headers.",
                ),
                &["key"],
            )?,
            connections: IntGauge::new("kcp_client_connections", "Client connections open now.")?,
            connections_refused: prometheus::IntCounter::new(
                "kcp_client_connections_refused_total",
                "Client connections closed at accept because server.max_connections were open.",
            )?,
            connection_errors: IntCounterVec::new(
                Opts::new(
                    "kcp_client_connection_errors_total",
                    "Client connections ended by an error, by kind: head_too_large, malformed, \
                     header_timeout, write_stalled, idle, io.",
                ),
                &["kind"],
            )?,
            models: ArcSwap::from_pointee(HashSet::new()),
            exported_keys: Mutex::new(HashSet::new()),
        };
        inner.register(registry)?;
        Ok(Metrics {
            inner: Arc::new(inner),
        })
    }

    /// Replaces the models that get their own `model` label (call on start and on reload with
    /// `KeyPool::routes().named_models()`). Any other model is counted as `other`.
    pub fn set_models<'a>(&self, models: impl IntoIterator<Item = &'a str>) {
        let set = models.into_iter().map(Box::from).collect::<HashSet<_>>();
        self.inner.models.store(Arc::new(set));
    }

    /// The `model` label for a request's model: the model itself when the config names it,
    /// [`OTHER_MODEL`] otherwise, [`NO_MODEL`] when the request names none.
    pub fn model_label<'a>(&self, model: Option<&'a str>) -> &'a str {
        match model {
            None => NO_MODEL,
            Some(m) if self.inner.models.load().contains(m) => m,
            Some(_) => OTHER_MODEL,
        }
    }

    /// Records a finished client request: its status, its total time (head to last body byte),
    /// and the proxy's `overhead`: the time to the response head minus the time spent waiting on
    /// the provider and, by policy, for a key or a retry backoff ([`crate::observe`]); `None`
    /// when the request never got a head (its client left first).
    pub fn request_finished(
        &self,
        model: Option<&str>,
        status: u16,
        total: Duration,
        overhead: Option<Duration>,
    ) {
        let model = self.model_label(model);
        let code = http::StatusCode::from_u16(status);
        let status = code.as_ref().map_or("invalid", http::StatusCode::as_str);
        let inner = &self.inner;
        inner.requests.with_label_values(&[model, status]).inc();
        inner
            .request_duration
            .with_label_values(&[model])
            .observe(total.as_secs_f64());
        if let Some(overhead) = overhead {
            inner.overhead.observe(overhead.as_secs_f64());
        }
    }

    /// Records one upstream attempt with `key` (name or fingerprint) and, when response headers
    /// arrived, its time to first byte.
    pub fn upstream_attempt(&self, key: &str, outcome: UpstreamOutcome, ttfb: Option<Duration>) {
        let inner = &self.inner;
        inner
            .upstream_requests
            .with_label_values(&[key, outcome.as_str()])
            .inc();
        if let Some(ttfb) = ttfb {
            inner
                .upstream_ttfb
                .with_label_values(&[key])
                .observe(ttfb.as_secs_f64());
        }
    }

    /// Records a retry: an upstream attempt made because the previous one ended with `reason`
    /// (see [`UpstreamOutcome::retry_reason`]).
    pub fn retry(&self, reason: &'static str) {
        self.inner.retries.with_label_values(&[reason]).inc();
    }

    /// Counts a request as in flight until the returned guard drops.
    pub fn inflight(&self) -> InflightGauge {
        InflightGauge::new(self.inner.inflight.clone())
    }

    /// Counts a client connection as open until the returned guard drops.
    pub fn connection(&self) -> InflightGauge {
        InflightGauge::new(self.inner.connections.clone())
    }

    /// Counts a connection closed at accept because `server.max_connections` were open.
    pub fn connection_refused(&self) {
        self.inner.connections_refused.inc();
    }

    /// Counts a client connection that ended with an error of `kind`.
    pub fn connection_error(&self, kind: &'static str) {
        self.inner
            .connection_errors
            .with_label_values(&[kind])
            .inc();
    }

    /// Records how long a request waited for a key.
    pub fn queue_wait(&self, waited: Duration) {
        self.inner.queue_wait.observe(waited.as_secs_f64());
    }

    /// Sets the key gauges from `KeyPool::snapshot(now)`, and removes the gauges of keys that
    /// are no longer in it. Called by the `/metrics` handler before [`render`].
    pub fn refresh_keys(&self, snapshots: &[KeySnapshot]) {
        let inner = &self.inner;
        let mut exported = inner
            .exported_keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current: HashSet<&str> = snapshots.iter().map(|s| s.name.as_str()).collect();
        exported.retain(|key| {
            let stays = current.contains(key.as_str());
            if !stays {
                inner.remove_key(key);
            }
            stays
        });
        for snapshot in snapshots {
            inner.set_key(snapshot);
            if !exported.contains(&snapshot.name) {
                exported.insert(snapshot.name.clone());
            }
        }
    }
}

impl Inner {
    fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.request_duration.clone()))?;
        registry.register(Box::new(self.upstream_requests.clone()))?;
        registry.register(Box::new(self.upstream_ttfb.clone()))?;
        registry.register(Box::new(self.overhead.clone()))?;
        registry.register(Box::new(self.retries.clone()))?;
        registry.register(Box::new(self.inflight.clone()))?;
        registry.register(Box::new(self.queue_wait.clone()))?;
        registry.register(Box::new(self.key_state.clone()))?;
        registry.register(Box::new(self.key_cooldown.clone()))?;
        registry.register(Box::new(self.key_remaining_requests.clone()))?;
        registry.register(Box::new(self.key_remaining_tokens.clone()))?;
        registry.register(Box::new(self.connections.clone()))?;
        registry.register(Box::new(self.connections_refused.clone()))?;
        registry.register(Box::new(self.connection_errors.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(())
    }

    fn set_key(&self, s: &KeySnapshot) {
        let key = s.name.as_str();
        for state in KeyStatus::ALL {
            self.key_state
                .with_label_values(&[key, state.as_str()])
                .set(i64::from(state == s.status));
        }
        set_or_remove(
            &self.key_cooldown,
            key,
            s.blocked_secs.or(s.next_probe_secs),
        );
        set_or_remove(
            &self.key_remaining_requests,
            key,
            s.limits.remaining_requests.map(saturating_i64),
        );
        set_or_remove(
            &self.key_remaining_tokens,
            key,
            s.limits.remaining_tokens.map(saturating_i64),
        );
    }

    fn remove_key(&self, key: &str) {
        for state in KeyStatus::ALL {
            // An absent label set is the state we want.
            let _ = self.key_state.remove_label_values(&[key, state.as_str()]);
        }
        let _ = self.key_cooldown.remove_label_values(&[key]);
        let _ = self.key_remaining_requests.remove_label_values(&[key]);
        let _ = self.key_remaining_tokens.remove_label_values(&[key]);
    }
}

/// Sets a per-key gauge, or removes it while the value is unknown: an absent series says
/// "unknown", a zero would say "exhausted".
fn set_or_remove<P: prometheus::core::Atomic>(
    gauges: &prometheus::core::GenericGaugeVec<P>,
    key: &str,
    value: Option<P::T>,
) {
    match value {
        Some(v) => gauges.with_label_values(&[key]).set(v),
        None => {
            let _ = gauges.remove_label_values(&[key]);
        }
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

/// A request counted in `kcp_inflight_requests`: incremented on creation, decremented on drop,
/// so every exit path (errors, panics, a client that hangs up) balances it.
#[derive(Debug)]
#[must_use = "the request stops counting as in flight when the guard drops"]
pub struct InflightGauge {
    gauge: IntGauge,
}

impl InflightGauge {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        InflightGauge { gauge }
    }
}

impl Drop for InflightGauge {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Every metric in `registry`, in Prometheus' text exposition format ([`CONTENT_TYPE`]).
pub fn render(registry: &Registry) -> Result<String, prometheus::Error> {
    TextEncoder::new().encode_to_string(&registry.gather())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kcp_core::{LearnedLimits, OutcomeCounts};

    fn setup() -> (Registry, Metrics) {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).expect("fresh registry");
        (registry, metrics)
    }

    fn text(registry: &Registry) -> String {
        render(registry).expect("encodable")
    }

    /// The lines of the exposition that start with `prefix`, without comments.
    fn series(registry: &Registry, prefix: &str) -> Vec<String> {
        text(registry)
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    fn snapshot(name: &str, status: KeyStatus) -> KeySnapshot {
        KeySnapshot {
            name: name.to_owned(),
            fingerprint: format!("fp-{name}"),
            url: "https://api.openai.com/v1".to_owned(),
            models: vec!["others".to_owned()],
            status,
            disabled_reason: None,
            blocked_secs: Some(0.0),
            next_probe_secs: None,
            in_flight: 0,
            health: 1000,
            latency_ms: None,
            outcomes: OutcomeCounts::default(),
            limits: LearnedLimits::default(),
            refused: Vec::new(),
        }
    }

    #[test]
    fn a_retried_rate_limit_is_counted_exactly() {
        let (registry, metrics) = setup();
        metrics.set_models(["gpt-4o", "gpt-4o-mini"]);
        metrics.upstream_attempt(
            "k1",
            UpstreamOutcome::RateLimited,
            Some(Duration::from_millis(20)),
        );
        metrics.retry("rate_limited");
        metrics.upstream_attempt(
            "k2",
            UpstreamOutcome::Success,
            Some(Duration::from_millis(300)),
        );
        metrics.request_finished(
            Some("gpt-4o"),
            200,
            Duration::from_millis(330),
            Some(Duration::from_millis(1)),
        );

        assert_eq!(
            series(&registry, "kcp_upstream_requests_total"),
            [
                r#"kcp_upstream_requests_total{key="k1",outcome="rate_limited"} 1"#,
                r#"kcp_upstream_requests_total{key="k2",outcome="success"} 1"#,
            ]
        );
        assert_eq!(
            series(&registry, "kcp_retries_total"),
            [r#"kcp_retries_total{reason="rate_limited"} 1"#]
        );
        assert_eq!(
            series(&registry, "kcp_requests_total"),
            [r#"kcp_requests_total{model="gpt-4o",status="200"} 1"#]
        );
        let out = text(&registry);
        for line in [
            r#"kcp_request_duration_seconds_count{model="gpt-4o"} 1"#,
            r#"kcp_request_duration_seconds_sum{model="gpt-4o"} 0.33"#,
            r#"kcp_request_duration_seconds_bucket{model="gpt-4o",le="0.25"} 0"#,
            r#"kcp_request_duration_seconds_bucket{model="gpt-4o",le="0.5"} 1"#,
            r#"kcp_upstream_ttfb_seconds_count{key="k1"} 1"#,
            r#"kcp_upstream_ttfb_seconds_bucket{key="k2",le="0.25"} 0"#,
            r#"kcp_upstream_ttfb_seconds_bucket{key="k2",le="0.5"} 1"#,
            "kcp_overhead_seconds_count 1",
            "kcp_overhead_seconds_sum 0.001",
            r#"kcp_overhead_seconds_bucket{le="0.0005"} 0"#,
            r#"kcp_overhead_seconds_bucket{le="0.001"} 1"#,
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
    }

    #[test]
    fn attempts_without_headers_observe_no_ttfb() {
        let (registry, metrics) = setup();
        metrics.upstream_attempt("k1", UpstreamOutcome::ConnectError, None);
        assert_eq!(
            series(&registry, "kcp_upstream_requests_total"),
            [r#"kcp_upstream_requests_total{key="k1",outcome="connect_error"} 1"#]
        );
        assert!(series(&registry, "kcp_upstream_ttfb_seconds").is_empty());
    }

    #[test]
    fn model_labels_are_bounded_and_replaced_on_reload() {
        let (registry, metrics) = setup();
        metrics.set_models(["gpt-4o"]);
        assert_eq!(metrics.model_label(Some("gpt-4o")), "gpt-4o");
        assert_eq!(metrics.model_label(Some("gpt-4o-2024-08-06")), OTHER_MODEL);
        assert_eq!(metrics.model_label(None), NO_MODEL);

        let zero = Duration::ZERO;
        metrics.request_finished(Some("made-up-model-123"), 404, zero, Some(zero));
        metrics.request_finished(None, 200, zero, Some(zero));
        assert_eq!(
            series(&registry, "kcp_requests_total"),
            [
                r#"kcp_requests_total{model="none",status="200"} 1"#,
                r#"kcp_requests_total{model="other",status="404"} 1"#,
            ]
        );

        metrics.set_models(["o3"]);
        assert_eq!(metrics.model_label(Some("gpt-4o")), OTHER_MODEL);
        assert_eq!(metrics.model_label(Some("o3")), "o3");
    }

    #[test]
    fn overhead_is_observed_as_given() {
        let (registry, metrics) = setup();
        metrics.request_finished(None, 502, Duration::from_secs(2), Some(Duration::ZERO));
        metrics.request_finished(None, 499, Duration::from_secs(1), None);
        let out = text(&registry);
        assert!(
            out.lines().any(|l| l == "kcp_overhead_seconds_sum 0"),
            "{out}"
        );
        assert!(
            out.lines().any(|l| l == "kcp_overhead_seconds_count 1"),
            "{out}"
        );
        assert!(
            out.lines()
                .any(|l| l == r#"kcp_requests_total{model="none",status="502"} 1"#)
        );
        assert!(
            out.lines()
                .any(|l| l == r#"kcp_requests_total{model="none",status="499"} 1"#)
        );
    }

    #[test]
    fn impossible_status_gets_a_bounded_label() {
        let (registry, metrics) = setup();
        metrics.request_finished(None, 42, Duration::ZERO, None);
        assert_eq!(
            series(&registry, "kcp_requests_total"),
            [r#"kcp_requests_total{model="none",status="invalid"} 1"#]
        );
    }

    #[test]
    fn refresh_sets_one_state_per_key_and_forgets_removed_keys() {
        let (registry, metrics) = setup();
        let mut cooling = snapshot("k2", KeyStatus::Cooling);
        cooling.blocked_secs = Some(12.5);
        cooling.limits.remaining_requests = Some(0);
        cooling.limits.remaining_tokens = Some(1_500);
        metrics.refresh_keys(&[snapshot("k1", KeyStatus::Available), cooling]);

        let states = series(&registry, "kcp_key_state");
        assert_eq!(states.len(), 2 * KeyStatus::ALL.len());
        for key in ["k1", "k2"] {
            let ones: Vec<_> = states
                .iter()
                .filter(|l| l.contains(&format!(r#"key="{key}""#)) && l.ends_with(" 1"))
                .collect();
            assert_eq!(ones.len(), 1, "{key}: {states:?}");
        }
        assert!(states.contains(&r#"kcp_key_state{key="k1",state="available"} 1"#.to_owned()));
        assert!(states.contains(&r#"kcp_key_state{key="k2",state="cooling"} 1"#.to_owned()));
        assert!(states.contains(&r#"kcp_key_state{key="k2",state="available"} 0"#.to_owned()));
        assert_eq!(
            series(&registry, "kcp_key_cooldown_seconds"),
            [
                r#"kcp_key_cooldown_seconds{key="k1"} 0"#,
                r#"kcp_key_cooldown_seconds{key="k2"} 12.5"#,
            ]
        );
        assert_eq!(
            series(&registry, "kcp_key_remaining_requests"),
            [r#"kcp_key_remaining_requests{key="k2"} 0"#]
        );
        assert_eq!(
            series(&registry, "kcp_key_remaining_tokens"),
            [r#"kcp_key_remaining_tokens{key="k2"} 1500"#]
        );

        // Reload: k2 left the pool, k3 joined, k1 is now disabled with a re-check in 30 s.
        let mut disabled = snapshot("k1", KeyStatus::Disabled);
        disabled.blocked_secs = None;
        disabled.next_probe_secs = Some(30.0);
        metrics.refresh_keys(&[disabled, snapshot("k3", KeyStatus::Limited)]);
        let out = text(&registry);
        assert!(!out.contains(r#"key="k2""#), "{out}");
        assert_eq!(
            series(&registry, "kcp_key_state")
                .iter()
                .filter(|l| l.ends_with(" 1"))
                .collect::<Vec<_>>(),
            [
                r#"kcp_key_state{key="k1",state="disabled"} 1"#,
                r#"kcp_key_state{key="k3",state="limited"} 1"#,
            ]
        );
        assert!(
            out.lines()
                .any(|l| l == r#"kcp_key_cooldown_seconds{key="k1"} 30"#)
        );
        assert!(series(&registry, "kcp_key_remaining_").is_empty());
    }

    #[test]
    fn refresh_with_an_empty_pool_removes_every_key_gauge() {
        let (registry, metrics) = setup();
        metrics.refresh_keys(&[snapshot("k1", KeyStatus::Available)]);
        metrics.refresh_keys(&[]);
        assert!(series(&registry, "kcp_key_").is_empty());
    }

    #[test]
    fn upstream_counters_of_removed_keys_stay() {
        let (registry, metrics) = setup();
        metrics.upstream_attempt("gone", UpstreamOutcome::Success, None);
        metrics.refresh_keys(&[snapshot("k1", KeyStatus::Available)]);
        assert_eq!(
            series(&registry, "kcp_upstream_requests_total"),
            [r#"kcp_upstream_requests_total{key="gone",outcome="success"} 1"#]
        );
    }

    #[test]
    fn inflight_guard_balances() {
        let (registry, metrics) = setup();
        let first = metrics.inflight();
        let second = metrics.clone().inflight();
        assert_eq!(
            series(&registry, "kcp_inflight_requests"),
            ["kcp_inflight_requests 2"]
        );
        drop(first);
        assert_eq!(
            series(&registry, "kcp_inflight_requests"),
            ["kcp_inflight_requests 1"]
        );
        drop(second);
        assert_eq!(
            series(&registry, "kcp_inflight_requests"),
            ["kcp_inflight_requests 0"]
        );
    }

    #[test]
    fn queue_wait_is_observed() {
        let (registry, metrics) = setup();
        metrics.queue_wait(Duration::from_millis(3));
        let out = text(&registry);
        assert!(out.lines().any(|l| l == "kcp_queue_wait_seconds_count 1"));
        assert!(
            out.lines()
                .any(|l| l == r#"kcp_queue_wait_seconds_bucket{le="0.0025"} 0"#)
        );
        assert!(
            out.lines()
                .any(|l| l == r#"kcp_queue_wait_seconds_bucket{le="0.005"} 1"#)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_are_exported() {
        let (registry, _metrics) = setup();
        let out = text(&registry);
        for name in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            assert!(out.lines().any(|l| l.starts_with(name)), "missing {name}");
        }
    }

    #[test]
    fn registering_twice_in_one_registry_fails() {
        let (registry, _metrics) = setup();
        assert!(Metrics::new(&registry).is_err());
    }

    #[test]
    fn outcome_labels_are_distinct_snake_case() {
        let labels: HashSet<_> = UpstreamOutcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(labels.len(), UpstreamOutcome::ALL.len());
        assert!(
            labels
                .iter()
                .all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
        assert_eq!(UpstreamOutcome::ServerError.to_string(), "server_error");
    }

    #[test]
    fn only_failures_have_a_retry_reason() {
        let reasons: HashSet<_> = UpstreamOutcome::ALL
            .iter()
            .filter_map(|o| o.retry_reason())
            .collect();
        assert_eq!(
            reasons,
            HashSet::from([
                "rate_limited",
                "key_rejected",
                "model_refused",
                "too_large",
                "server_error",
                "timeout",
                "connect_error"
            ])
        );
        assert_eq!(UpstreamOutcome::Success.retry_reason(), None);
        assert_eq!(UpstreamOutcome::ClientError.retry_reason(), None);
        assert_eq!(UpstreamOutcome::Quota.retry_reason(), Some("key_rejected"));
    }
}
