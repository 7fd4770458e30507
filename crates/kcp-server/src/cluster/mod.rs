//! Replicas share key state through Redis (`[cluster]`).
//!
//! Each replica still selects keys from its own memory, lock-free: sharing is background
//! work. The request path hands the state changes its answers caused (a key resting,
//! disabled, back, refusing a model, its learned limits) to [`Cluster::share`], which only
//! `try_send`s them into a bounded channel and never waits. One task per replica
//! publishes them on the pub/sub channel `{namespace}:changes` and applies what the other
//! replicas publish there ([`kcp_core::KeyPool::apply_remote`]: the later deadline wins,
//! as locally). Keys are named by fingerprint, never by secret.
//!
//! Redis down or slow never fails a request: the replica serves on its own state, logs
//! once at warn (and once at info when Redis is back), shows it on `kcp_cluster_connected`
//! and `/health`, keeps the newest changes it could not send (up to [`PENDING`]) and sends
//! them when Redis is back.
//!
//! Budgets are shared by splitting: the task keeps a heartbeat in Redis ([`Heartbeat`]),
//! counts the live replicas and hands the count to the pool, which paces each key at its
//! share. While Redis is down the last count stays in force: the other replicas are most
//! likely still serving, so assuming this one is alone would overrun every key N-fold.

mod heartbeat;
mod operator;
mod settings;
mod wire;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use kcp_core::{Changes, Class, DisableReason, KeyId, KeyPool, RemoteChange, StateChange, Verdict};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use tokio::sync::mpsc;

pub use heartbeat::{EVERY as HEARTBEAT_EVERY, Heartbeat, TTL as HEARTBEAT_TTL};
pub use settings::ClusterSection;
pub use wire::{Message, WireState};

use crate::app::App;
use crate::clock;

/// Changes waiting in the channel between the request path and the sync task; beyond it
/// a change is dropped (counted) rather than waited for.
pub const CHANNEL: usize = 4096;
/// Changes kept while Redis is unreachable, the newest win; sent once it is back.
pub const PENDING: usize = 1024;
/// Longest wait for Redis to connect or answer before it counts as down.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a shutting-down replica waits to take itself out of the replica count.
pub const LEAVE_TIMEOUT: Duration = Duration::from_millis(500);
/// Wait between reconnection attempts.
pub const RETRY: Duration = Duration::from_millis(250);

/// Why `[cluster]` cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The Redis url cannot be used (its text is a secret and not shown).
    #[error("cluster.redis_url cannot be used: {0}")]
    Url(&'static str),
    /// The cluster's metrics cannot be registered.
    #[error("cannot register the cluster metrics")]
    Metrics(#[from] prometheus::Error),
}

/// This replica's side of the cluster.
pub struct Cluster {
    replica: String,
    channel: String,
    operators: String,
    client: redis::Client,
    outbox: mpsc::Sender<RemoteChange>,
    inbox: Mutex<Option<mpsc::Receiver<RemoteChange>>>,
    connected: AtomicBool,
    heartbeat: Heartbeat,
    gauge: IntGauge,
    replicas: IntGauge,
    dropped: IntCounter,
    applied: IntCounter,
    delay: Histogram,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("replica", &self.replica)
            .field("channel", &self.channel)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Sets up the cluster side from a checked `[cluster]` section; no I/O yet.
    pub fn new(section: &ClusterSection, registry: &Registry) -> Result<Cluster, ClusterError> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(section.redis_url.expose())
            .map_err(|_| ClusterError::Url("not a redis:// or rediss:// url"))?;
        if let Some(var) = &section.redis_password_env {
            let password = std::env::var(var)
                .map_err(|_| ClusterError::Url("redis_password_env is not set"))?;
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client =
            redis::Client::open(info).map_err(|_| ClusterError::Url("cannot build a client"))?;
        let gauge = IntGauge::new(
            "kcp_cluster_connected",
            "1 while this replica reaches the cluster's Redis, else 0.",
        )?;
        let dropped = IntCounter::new(
            "kcp_cluster_dropped_changes_total",
            "Key state changes not shared: the sync queue was full.",
        )?;
        let applied = IntCounter::new(
            "kcp_cluster_applied_changes_total",
            "Key state changes received from other replicas and applied.",
        )?;
        let replicas = IntGauge::new(
            "kcp_cluster_replicas",
            "Live replicas sharing the keys (this one included): each paces a key at 1/n of its rate.",
        )?;
        replicas.set(1);
        let delay = Histogram::with_opts(
            HistogramOpts::new(
                "kcp_cluster_apply_delay_seconds",
                "From another replica publishing a key change to this one applying it (wall clocks).",
            )
            .buckets(vec![0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
        )?;
        registry.register(Box::new(gauge.clone()))?;
        registry.register(Box::new(replicas.clone()))?;
        registry.register(Box::new(delay.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(applied.clone()))?;
        let (outbox, inbox) = mpsc::channel(CHANNEL);
        let replica = section.replica();
        Ok(Cluster {
            heartbeat: Heartbeat::new(&section.namespace, &replica),
            replica,
            channel: format!("{}:changes", section.namespace),
            operators: operator::record_key(&section.namespace),
            client,
            outbox,
            inbox: Mutex::new(Some(inbox)),
            connected: AtomicBool::new(false),
            gauge,
            replicas,
            dropped,
            applied,
            delay,
        })
    }

    /// This replica's id.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The live replica count in force (this one included); the last one counted while
    /// Redis is unreachable.
    pub fn replicas(&self) -> i64 {
        self.replicas.get()
    }

    /// Leaves the cluster on a clean shutdown (after the sync task stopped): the others stop
    /// counting this replica now rather than when its heartbeat expires. Best effort, within
    /// [`LEAVE_TIMEOUT`].
    pub async fn leave(&self) {
        let leave = async {
            let mut redis = self.client.get_multiplexed_async_connection().await?;
            self.heartbeat.stop(&mut redis).await
        };
        if let Ok(Ok(())) = tokio::time::timeout(LEAVE_TIMEOUT, leave).await {
            tracing::debug!(replica = %self.replica, "cluster: left");
        }
    }

    /// Whether Redis is reachable now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Hands the shareable part of `changes` (which key `key` of `pool` just went through,
    /// for a request of refusal scope `scope`) to the sync task. Never waits: when the
    /// queue is full the change is dropped and counted.
    pub fn share(&self, pool: &KeyPool, key: &KeyId, changes: &Changes, scope: Option<&str>) {
        for change in changes.iter() {
            for remote in pool.export(key, &change, scope) {
                if self.outbox.try_send(remote).is_err() {
                    self.dropped.inc();
                }
            }
        }
    }

    /// Shares what one upstream answer did to the key `key` of `pool` (its [`Verdict`],
    /// for a request of refusal scope `scope`): its state changes, and the rest a 503's
    /// `Retry-After` asked for (which is no state change of its own). Never waits.
    pub fn share_answer(
        &self,
        pool: &KeyPool,
        key: &KeyId,
        verdict: &Verdict,
        scope: Option<&str>,
    ) {
        self.share(pool, key, &verdict.changes, scope);
        if let Class::Upstream {
            retry_after: Some(_),
            ..
        } = verdict.class
        {
            self.send_all(pool.export_rest(key, clock::now()));
        }
    }

    /// Shares an operator's disable or enable of the key named `key` (the `changes` the
    /// admin API's action caused: an operator's disable always causes one, an enable of a
    /// key that was not disabled here causes none and is shared all the same, as the key
    /// may be disabled elsewhere). Never waits.
    pub fn share_operator(&self, pool: &KeyPool, key: &str, changes: &Changes) {
        let disable = changes.iter().any(|c| {
            c == StateChange::Disabled {
                reason: DisableReason::Manual,
            }
        });
        self.send_all(pool.export_operator(key, disable));
    }

    fn send_all(&self, changes: Vec<RemoteChange>) {
        for remote in changes {
            if self.outbox.try_send(remote).is_err() {
                self.dropped.inc();
            }
        }
    }

    /// Records whether Redis is reachable; logs a change (and the first word) once.
    fn set_connected(&self, up: bool, known: &mut Option<bool>) {
        self.connected.store(up, Ordering::Release);
        self.gauge.set(i64::from(up));
        if *known == Some(up) {
            return;
        }
        *known = Some(up);
        if up {
            tracing::info!(replica = %self.replica, "cluster: redis reachable, sharing key state");
        } else {
            tracing::warn!(
                replica = %self.replica,
                "cluster: redis unreachable, serving on this replica's own key state"
            );
        }
    }
}

/// The sync task: publishes this replica's changes and applies the others', reconnecting
/// to Redis for as long as the server runs. Returns at once without `[cluster]`.
pub async fn run(app: Arc<App>) {
    let Some(cluster) = app.cluster.as_ref() else {
        return;
    };
    let taken = cluster
        .inbox
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    let Some(mut inbox) = taken else {
        return;
    };
    let mut pending = VecDeque::with_capacity(PENDING);
    let mut known = None;
    loop {
        if let Some((mut publisher, pubsub)) = connect(cluster).await {
            cluster.set_connected(true, &mut known);
            if serve(
                &app,
                cluster,
                &mut publisher,
                pubsub,
                &mut inbox,
                &mut pending,
            )
            .await
                == Ended::Shutdown
            {
                return;
            }
        }
        cluster.set_connected(false, &mut known);
        let retry = tokio::time::sleep(RETRY);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                () = &mut retry => break,
                change = inbox.recv() => match change {
                    Some(change) => keep(&mut pending, change),
                    None => return,
                },
            }
        }
    }
}

#[derive(Debug, PartialEq)]
enum Ended {
    Lost,
    Shutdown,
}

async fn connect(
    cluster: &Cluster,
) -> Option<(redis::aio::MultiplexedConnection, redis::aio::PubSub)> {
    let attempt = async {
        let publisher = cluster.client.get_multiplexed_async_connection().await?;
        let mut pubsub = cluster.client.get_async_pubsub().await?;
        pubsub.subscribe(&cluster.channel).await?;
        Ok::<_, redis::RedisError>((publisher, pubsub))
    };
    match tokio::time::timeout(REDIS_TIMEOUT, attempt).await {
        Ok(Ok(connections)) => Some(connections),
        Ok(Err(error)) => {
            // The kind only: an error's text could quote the url.
            tracing::debug!(kind = ?error.kind(), "cluster: redis connection failed");
            None
        }
        Err(_) => None,
    }
}

async fn serve(
    app: &App,
    cluster: &Cluster,
    publisher: &mut redis::aio::MultiplexedConnection,
    pubsub: redis::aio::PubSub,
    inbox: &mut mpsc::Receiver<RemoteChange>,
    pending: &mut VecDeque<RemoteChange>,
) -> Ended {
    while let Some(change) = pending.pop_front() {
        if !publish(cluster, publisher, &change).await {
            pending.push_front(change);
            return Ended::Lost;
        }
    }
    // An operator's decisions made elsewhere meanwhile: the cluster's record holds them.
    let pool = app.pool();
    let reconcile = operator::reconcile(
        &cluster.operators,
        &cluster.replica,
        publisher,
        &pool,
        clock::now(),
    );
    match tokio::time::timeout(REDIS_TIMEOUT, reconcile).await {
        Ok(Ok(0)) => {}
        Ok(Ok(changed)) => {
            tracing::info!(replica = %cluster.replica, keys = changed, "cluster: operator disables brought up to date");
        }
        _ => return Ended::Lost,
    }
    // Pub/sub does not replay: whatever the others learned while this replica was away
    // (or before it started) comes back as their answers to this hello.
    if !send(cluster, publisher, Message::hello(&cluster.replica)).await {
        return Ended::Lost;
    }
    let mut messages = pubsub.into_on_message();
    let mut beat = tokio::time::interval(heartbeat::EVERY);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = beat.tick() => {
                if !count_replicas(app, cluster, publisher).await {
                    return Ended::Lost;
                }
            }
            message = messages.next() => match message {
                Some(message) => receive(app, cluster, &message),
                None => return Ended::Lost,
            },
            change = inbox.recv() => match change {
                Some(change) => {
                    if !publish(cluster, publisher, &change).await {
                        keep(pending, change);
                        return Ended::Lost;
                    }
                }
                None => return Ended::Shutdown,
            },
        }
    }
}

/// Refreshes the heartbeat and gives the pool this replica's share of the keys; `false`
/// when Redis did not answer (the last count stays in force).
async fn count_replicas(
    app: &App,
    cluster: &Cluster,
    publisher: &mut redis::aio::MultiplexedConnection,
) -> bool {
    let beat = cluster.heartbeat.beat(publisher);
    let Ok(Ok(live)) = tokio::time::timeout(REDIS_TIMEOUT, beat).await else {
        return false;
    };
    if i64::from(live.get()) != cluster.replicas.get() {
        tracing::info!(replica = %cluster.replica, replicas = live.get(), "cluster: live replicas changed, each key paced at its share");
    }
    cluster.replicas.set(i64::from(live.get()));
    app.pool().set_replica_share(live);
    true
}

/// Milliseconds since the Unix epoch by the wall clock (0 before it).
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Keeps a change for later, dropping the oldest when full.
fn keep(pending: &mut VecDeque<RemoteChange>, change: RemoteChange) {
    if pending.len() >= PENDING {
        pending.pop_front();
    }
    pending.push_back(change);
}

async fn publish(
    cluster: &Cluster,
    publisher: &mut redis::aio::MultiplexedConnection,
    change: &RemoteChange,
) -> bool {
    if let Some(command) = operator::record(&cluster.operators, &cluster.replica, change) {
        let recorded = command.query_async::<i64>(publisher);
        if !matches!(
            tokio::time::timeout(REDIS_TIMEOUT, recorded).await,
            Ok(Ok(_))
        ) {
            return false;
        }
    }
    match Message::encode(&cluster.replica, change, clock::now()) {
        Some(message) => send(cluster, publisher, message).await,
        None => true,
    }
}

/// Publishes `message`, stamped with the wall clock; `false` when Redis did not take it.
async fn send(
    cluster: &Cluster,
    publisher: &mut redis::aio::MultiplexedConnection,
    mut message: Message,
) -> bool {
    message.sent_ms = Some(wall_ms());
    let Ok(text) = serde_json::to_string(&message) else {
        return true;
    };
    let mut command = redis::cmd("PUBLISH");
    command.arg(&cluster.channel).arg(text);
    let sent = command.query_async::<i64>(publisher);
    matches!(tokio::time::timeout(REDIS_TIMEOUT, sent).await, Ok(Ok(_)))
}

fn receive(app: &App, cluster: &Cluster, message: &redis::Msg) {
    let Ok(text) = message.get_payload::<String>() else {
        return;
    };
    let Ok(message) = serde_json::from_str::<Message>(&text) else {
        tracing::debug!("cluster: unreadable message ignored");
        return;
    };
    if message.from == cluster.replica {
        return;
    }
    if message.state == WireState::Hello {
        // Answered through the outbox like any change: never waits here.
        for change in app.pool().export_all(clock::now()) {
            if cluster.outbox.try_send(change).is_err() {
                cluster.dropped.inc();
            }
        }
        return;
    }
    let sent_ms = message.sent_ms;
    let now = clock::now();
    let Some(change) = message.decode(now) else {
        return;
    };
    if app.pool().apply_remote(&change, now) {
        cluster.applied.inc();
        if let Some(sent) = sent_ms {
            // Wall clocks of two hosts may disagree: a negative delay counts as none.
            let delay = Duration::from_millis(wall_ms().saturating_sub(sent));
            cluster.delay.observe(delay.as_secs_f64());
        }
        tracing::debug!(key = %change.key, "cluster: applied another replica's key change");
    }
}
