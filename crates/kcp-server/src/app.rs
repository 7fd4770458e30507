//! The proxy's shared state: one [`App`] per running server, behind an `Arc`.
//!
//! Request handling never takes a lock here. The configuration, the key pool built from it and
//! the policies derived from it form one [`Generation`] behind one [`ArcSwap`]: a request loads
//! it once (one atomic increment) when it arrives and keeps that snapshot to its end, so it
//! never sees a mix of an old and a new configuration, while a reload builds a whole new
//! generation (`KeyPool::rebuild` keeps the live state of every key still present) and stores
//! it for the next requests. One [`Upstream`] (one connection pool per worker thread) serves
//! every key, so keys of the same provider share warm connections.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use kcp_core::{KeyPool, KeySpec, PoolConfig, StateCounts, WaitQueue};
use kcp_upstream::{Upstream, UpstreamConfig};
use prometheus::Registry;

use crate::cli::Cli;
use crate::clock;
use crate::config::{Config, LoadedConfig, UpstreamSection};
use crate::edge::overload::InflightLimit;
use crate::observe::metrics::Metrics;
use crate::ops::reload::Policies;
use crate::ops::serve::StartError;
use crate::proxy::headers;

/// One configuration in force with everything built from it, swapped as a whole on reload.
#[derive(Debug)]
pub struct Generation {
    /// The configuration (settings, keys as configured, client tokens).
    pub config: LoadedConfig,
    /// The key pool built from its keys.
    pub pool: Arc<KeyPool>,
    /// Client auth, CORS and the admin gate.
    pub policies: Policies,
}

impl Generation {
    /// The generation of `config` with `pool`.
    pub fn new(config: LoadedConfig, pool: Arc<KeyPool>) -> Generation {
        Generation {
            policies: Policies::new(&config),
            config,
            pool,
        }
    }
}

/// State shared by every connection and request of one server.
#[derive(Debug)]
pub struct App {
    /// The generation in force; a reload stores a new one.
    pub generation: ArcSwap<Generation>,
    /// The upstream client: one connection pool per worker thread, for every key.
    pub upstream: Upstream,
    /// Set once shutdown begins: the proxy finishes what it has and takes nothing new.
    pub draining: AtomicBool,
    /// Requests waiting for a key right now (the bounded queue of `rate_limit`).
    pub queue: Arc<WaitQueue>,
    /// The proxy's metrics, registered in [`App::registry`].
    pub metrics: Metrics,
    /// Every metric of this server, rendered on `/metrics` ([`crate::observe`]).
    pub registry: Registry,
    /// `server.max_inflight`: requests past it are refused with 503.
    pub inflight: InflightLimit,
    /// Realtime (WebSocket) sessions open now: the drain waits for them.
    pub realtime: crate::proxy::realtime::Sessions,
    /// The command line the configuration is re-read with on reload ([`App::reloadable`]);
    /// `None` for a configuration built in code. The lock makes reloads run one at a time.
    pub(crate) source: Mutex<Option<Cli>>,
    /// Counts successful reloads ([`App::subscribe_reloads`]).
    pub(crate) reloads: tokio::sync::watch::Sender<u64>,
    /// Becomes true when the drain begins ([`App::drain_begun`]).
    drain_began: tokio::sync::watch::Sender<bool>,
    /// `[cluster]`: sharing key state with other replicas; `None` without it.
    pub cluster: Option<crate::cluster::Cluster>,
}

impl App {
    /// Builds the pool and the upstream client from a checked configuration. No I/O except
    /// reading `upstream.ca_file`.
    pub fn new(loaded: LoadedConfig) -> Result<App, StartError> {
        check_key_headers(&loaded.keys)?;
        let pool = KeyPool::new(loaded.keys.clone(), pool_config(&loaded.config))?;
        let upstream = Upstream::new(&UpstreamConfig {
            lanes: crate::ops::workers::resolve(loaded.config.server.worker_threads),
            ..upstream_config(&loaded.config.upstream)
        })?;
        let registry = Registry::new();
        let metrics =
            Metrics::new(&registry).expect("a fresh registry holds none of the proxy's metrics");
        let inflight = InflightLimit::new(loaded.config.server.max_inflight);
        let queue = WaitQueue::new(loaded.config.rate_limit.max_queue);
        let cluster = loaded
            .config
            .cluster
            .as_ref()
            .map(|section| crate::cluster::Cluster::new(section, &registry))
            .transpose()?;
        let app = App {
            generation: ArcSwap::from_pointee(Generation::new(loaded, Arc::new(pool))),
            upstream,
            draining: AtomicBool::new(false),
            queue,
            metrics,
            registry,
            inflight,
            source: Mutex::new(None),
            reloads: tokio::sync::watch::Sender::new(0),
            drain_began: tokio::sync::watch::Sender::new(false),
            realtime: crate::proxy::realtime::Sessions::default(),
            cluster,
        };
        app.on_pool_swapped(&app.pool());
        Ok(app)
    }

    /// Brings what depends on the key pool up to date with `pool`, the pool now in service:
    /// the models that get their own `model` metric label. Called at start and after every
    /// reload that stored a new pool.
    pub fn on_pool_swapped(&self, pool: &KeyPool) {
        self.metrics.set_models(pool.routes().named_models());
    }

    /// The generation in force now: a request takes it once, on arrival.
    pub fn generation(&self) -> Arc<Generation> {
        self.generation.load_full()
    }

    /// The key pool in service now.
    pub fn pool(&self) -> Arc<KeyPool> {
        Arc::clone(&self.generation.load().pool)
    }

    /// How many keys are in each state now (`GET /health`).
    pub fn key_counts(&self) -> StateCounts {
        self.generation.load().pool.counts(clock::now())
    }

    /// Marks the start of the drain: the client listener is closed and `/ready` answers 503.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain_began.send_replace(true);
    }

    /// Resolves once the drain has begun ([`App::begin_drain`]).
    pub async fn drain_begun(&self) {
        let mut began = self.drain_began.subscribe();
        // The sender lives in `self`, so the channel cannot close while this borrows it.
        let _ = began.wait_for(|began| *began).await;
    }

    /// Whether the proxy should get traffic (`GET /ready`): not while it drains, and not
    /// while every key is disabled, since then each request could only fail.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Acquire) {
            return Err("draining: the proxy is shutting down");
        }
        let counts = self.key_counts();
        if counts.total == counts.disabled {
            return Err("no usable API key: every key is disabled");
        }
        Ok(())
    }
}

/// The pool-wide policy of `[keys]` and `[rate_limit]`.
pub fn pool_config(config: &Config) -> PoolConfig {
    PoolConfig {
        strategy: config.keys.rotation_strategy,
        unhealthy_penalty: config.keys.unhealthy_penalty,
        per_key_rps: config.rate_limit.per_key_rps,
        global_rps: config.rate_limit.global_rps,
        burst: NonZeroU32::new(config.rate_limit.burst).unwrap_or(NonZeroU32::MIN),
    }
}

/// The upstream client's settings of `[upstream]`.
pub fn upstream_config(section: &UpstreamSection) -> UpstreamConfig {
    UpstreamConfig {
        connect_timeout: section.connect_timeout(),
        request_timeout: section.request_timeout(),
        stream_idle_timeout: section.stream_idle_timeout(),
        ca_file: section.ca_file.clone(),
        ..UpstreamConfig::default()
    }
}

/// Every key must fit in the headers it is sent with; checked once here rather than failing
/// each request that lands on it.
pub(crate) fn check_key_headers(keys: &[KeySpec]) -> Result<(), StartError> {
    for key in keys {
        if let Err(field) = headers::check_key(
            &key.secret,
            key.organization.as_deref(),
            key.project.as_deref(),
        ) {
            return Err(StartError::KeyHeader {
                key: key.id().to_string(),
                field,
            });
        }
    }
    Ok(())
}
