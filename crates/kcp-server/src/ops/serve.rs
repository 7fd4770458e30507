//! The listener: accepting connections, serving HTTP/1.1 and h2 on them, and draining on
//! shutdown.
//!
//! Each accepted connection is served by hyper-util's `auto` builder (HTTP/1.1, or h2 with prior
//! knowledge) in its own task, on the next worker thread when the server has them
//! ([`Server::with_workers`], [`super::workers`]), else on the runtime that runs the server. On
//! shutdown the listener is dropped at once, so new connections are refused rather than served
//! during the grace period (the original kept serving while it "drained"); every open connection is
//! told to finish: HTTP/1.1 completes its current response, streams included, then closes; h2 sends
//! GOAWAY and completes its open streams. After `server.graceful_shutdown_seconds` whatever is left
//! is cut.
//!
//! Slow clients cannot hold a connection: a connection that has not started a request within
//! `server.header_read_timeout_ms` of being accepted is closed (hyper's own header timer only
//! starts once the HTTP version is known, so a client that sends nothing would otherwise stay
//! forever), hyper's timer bounds every later request head, and a head larger than
//! `server.max_header_bytes` gets 431 (in OpenAI's shape up to twice that size, past which
//! hyper answers it alone). Past `server.max_connections` a new connection is closed at once;
//! a client that stops reading is dropped after `server.response_write_timeout_ms`; a
//! connection with no request in flight is closed after `server.idle_connection_timeout_ms`;
//! h2 connections are pinged every `server.h2_keepalive_interval_ms` ([`super::connection`]).
//! Connection errors are counted by kind. Changed limits apply to connections accepted after a
//! reload.
//!
//! Connections are served with upgrades, for the realtime API's WebSocket sessions; an upgraded
//! connection leaves hyper's graceful shutdown, so the drain also waits for the open sessions
//! ([`crate::proxy::realtime::Sessions`]), which it has told to close.
//!
//! A second listener on `observability.metrics_bind` serves `/metrics` and the admin API
//! ([`crate::ops_listener`]); it keeps serving during the drain and closes when it ends.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinSet;

use super::connection::{self, Activity, ConnectionSlots, StallGuard};
use super::workers::Workers;
use crate::app::App;
use crate::config::{LoadedConfig, ServerSection};
use crate::ops_listener;
use crate::proxy::probe;
use crate::service;

/// Pause after an accept error such as running out of file descriptors, so the loop does
/// not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The key pool cannot be built from the configured keys.
    #[error("cannot build the key pool")]
    Pool(#[from] kcp_core::PoolError),
    /// `[cluster]` cannot be set up.
    #[error("cannot set up the cluster")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The upstream client cannot be built (`upstream.ca_file`).
    #[error("cannot set up the upstream client")]
    Upstream(#[from] kcp_upstream::BuildError),
    /// A key field cannot be sent as an HTTP header.
    #[error("API key `{key}`: its {field} is not a valid HTTP header value")]
    KeyHeader {
        /// The key's name or fingerprint.
        key: String,
        /// `key`, `organization` or `project`.
        field: &'static str,
    },
    /// A listen address cannot be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// `server.bind_addr` or `observability.metrics_bind`.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Serving ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The grace period ended with connections still open; they were cut.
    #[error("{connections} connection(s) still open after the {grace:?} grace period were cut")]
    DrainTimeout {
        /// Connections cut.
        connections: usize,
        /// `server.graceful_shutdown_seconds`.
        grace: Duration,
    },
}

/// A bound server, ready to run.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    ops: TcpListener,
    ops_addr: SocketAddr,
    app: Arc<App>,
    workers: Option<Workers>,
}

impl Server {
    /// Builds everything from a loaded config and binds `config.server.bind_addr` and
    /// `config.observability.metrics_bind`. No I/O before this (apart from reading
    /// `upstream.ca_file`).
    pub async fn bind(loaded: LoadedConfig) -> Result<Server, StartError> {
        Server::bind_app(App::new(loaded)?).await
    }

    /// Binds the listeners of `app`'s configuration (an [`App`] built by the caller, for
    /// example one that can reload: [`App::reloadable`]).
    pub async fn bind_app(app: App) -> Result<Server, StartError> {
        let (addr, ops_addr) = {
            let config = &app.generation().config.config;
            (config.server.bind_addr, config.observability.metrics_bind)
        };
        let (listener, local_addr) = listen(addr).await?;
        let (ops, ops_addr) = listen(ops_addr).await?;
        app.generation().policies.warn_if_exposed(local_addr);
        Ok(Server {
            listener,
            local_addr,
            ops,
            ops_addr,
            app: Arc::new(app),
            workers: None,
        })
    }

    /// Serves client connections on `workers` (one runtime per thread) rather than on the
    /// runtime that runs the server, which keeps the control plane: accepting, probes, the
    /// cluster's sync and the ops listener.
    pub fn with_workers(mut self, workers: Workers) -> Server {
        self.workers = Some(workers);
        self
    }

    /// The address actually bound (the port is chosen by the OS for `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the metrics and admin listener.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// The shared state, for tests and the admin API.
    pub fn app(&self) -> Arc<App> {
        Arc::clone(&self.app)
    }

    /// Serves until `shutdown` resolves, then stops accepting at once, drains in-flight
    /// requests (streams included) for up to `server.graceful_shutdown_seconds`, and
    /// returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Server {
            listener,
            ops,
            app,
            workers,
            ..
        } = self;
        let mut limits = Arc::new(Limits::new(&app.generation().config.config.server));
        let slots = ConnectionSlots::default();
        let probes = tokio::spawn(probe::run(Arc::clone(&app)));
        let cluster = tokio::spawn(crate::cluster::run(Arc::clone(&app)));
        let ops = tokio::spawn(ops_listener::run(ops, Arc::clone(&app)));
        let graceful = GracefulShutdown::new();
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(finished) = connections.join_next(), if !connections.is_empty() => {
                    if let Ok(Err(error)) = finished {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => {
                        Limits::refresh(&mut limits, &app.generation.load().config.config.server);
                        let Some(slot) = slots.try_open(limits.server.max_connections) else {
                            app.metrics.connection_refused();
                            drop(tcp);
                            continue;
                        };
                        let _ = tcp.set_nodelay(true);
                        // The socket leaves this runtime's reactor for the one of the runtime
                        // that serves it, so that its readiness wakes that runtime directly.
                        let tcp = match tcp.into_std() {
                            Ok(tcp) => tcp,
                            Err(error) => {
                                tracing::debug!(%error, "handing a connection over failed");
                                continue;
                            }
                        };
                        let runtime = workers
                            .as_ref()
                            .map_or_else(Handle::current, |workers| workers.next().clone());
                        let app = Arc::clone(&app);
                        let limits = Arc::clone(&limits);
                        let watcher = graceful.watcher();
                        connections.spawn_on(async move {
                            let _slot = slot;
                            let tcp = TcpStream::from_std(tcp)?;
                            serve_connection(tcp, app, &limits, watcher).await
                        }, &runtime);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                },
            }
        }
        drop(listener);
        app.begin_drain();
        let grace = app.generation().config.config.server.graceful_shutdown();
        tracing::info!(
            connections = connections.len(),
            grace_secs = grace.as_secs(),
            "shutting down: draining connections"
        );
        let drain = async {
            graceful.shutdown().await;
            while connections.join_next().await.is_some() {}
            app.realtime.all_closed().await;
        };
        let drained = tokio::time::timeout(grace, drain).await.is_ok();
        probes.abort();
        cluster.abort();
        if let Some(sync) = &app.cluster {
            // The sync task is gone before the heartbeat goes, or it could set it again.
            let _ = cluster.await;
            sync.leave().await;
        }
        ops.abort();
        if drained {
            return Ok(());
        }
        let cut = connections.len();
        connections.shutdown().await;
        Err(ServeError::DrainTimeout {
            connections: cut,
            grace,
        })
    }
}

/// The connection builder for the `[server]` limits in force, rebuilt when a reload changes
/// them; each connection's task holds the one it was accepted under.
struct Limits {
    server: ServerSection,
    builder: auto::Builder<TokioExecutor>,
}

impl Limits {
    fn new(server: &ServerSection) -> Limits {
        Limits {
            server: server.clone(),
            builder: http_builder(server),
        }
    }

    fn refresh(limits: &mut Arc<Limits>, server: &ServerSection) {
        if *server != limits.server {
            *limits = Arc::new(Limits::new(server));
        }
    }
}

/// What serving one connection ends with.
type ConnectionResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Serves one client connection until it ends or the drain closes it. A connection that has
/// not started a request within `server.header_read_timeout_ms` is closed, and so is one with
/// no request in flight for `server.idle_connection_timeout_ms`.
fn serve_connection(
    tcp: TcpStream,
    app: Arc<App>,
    limits: &Limits,
    watcher: Watcher,
) -> impl Future<Output = ConnectionResult> + Send + 'static {
    let activity = Activity::default();
    let metrics = app.metrics.clone();
    let service = {
        let activity = activity.clone();
        service_fn(move |request| {
            let active = activity.begin();
            let app = Arc::clone(&app);
            async move {
                let response = service::handle(app, request).await;
                Ok::<_, Infallible>(response.map(|body| body.active_on(active)))
            }
        })
    };
    let io = StallGuard::new(tcp, limits.server.response_write_timeout());
    let connection = limits
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    let head_timeout = limits.server.header_read_timeout();
    let idle = limits.server.idle_connection_timeout();
    async move {
        let _open = metrics.connection();
        let connection = watcher.watch(connection);
        tokio::pin!(connection);
        let served = tokio::select! {
            served = &mut connection => served,
            () = activity.expired(head_timeout, idle) => return Ok(()),
        };
        if let Err(error) = &served {
            if let Some(kind) = connection::error_kind(error.as_ref()) {
                metrics.connection_error(kind);
            }
        }
        served
    }
}

async fn listen(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

/// An error and its sources on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// The HTTP/1.1 + h2 connection builder with the listener's limits.
fn http_builder(server: &ServerSection) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Heads up to twice the limit reach the service, which answers 431 in OpenAI's shape
    // ([`crate::edge::head`]); hyper refuses larger ones with its own bare 431.
    let hard_limit = server.max_header_bytes.saturating_mul(2);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout())
        .max_buf_size(hard_limit.max(MIN_BUF_SIZE));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(server.h2_keepalive_interval()))
        .keep_alive_timeout(server.h2_keepalive_timeout())
        .max_header_list_size(u32::try_from(hard_limit).unwrap_or(u32::MAX));
    builder
}

/// hyper's lower bound for its HTTP/1 read buffer.
const MIN_BUF_SIZE: usize = 8192;
