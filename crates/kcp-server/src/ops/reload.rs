//! Hot reload: re-reading every configuration source and swapping it in while the proxy runs.
//!
//! SIGHUP and `POST /admin/reload` both call [`App::reload`]. It re-runs [`config::load`] with
//! the command line the server started with, builds the new key pool with
//! `KeyPool::rebuild` (a key still present keeps its live state: cooldown, disabled, health,
//! learned limits, counters) and only then stores the configuration, the pool and the
//! [`Policies`] derived from it as one [`Generation`], in one atomic swap (no lock on the request path): a
//! request in flight keeps the generation and the lease it has, the next one sees the new one.
//! Nothing is stored unless everything checks out, so an invalid file leaves the running
//! configuration in effect. Settings bound at start (listen addresses, the upstream client's
//! timeouts and CA, logging) keep their value until restart, with a warning naming them.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};

use kcp_core::{Changes, KeyPool};

use crate::admin::{Admin, AdminOps};
use crate::app::{self, App, Generation};
use crate::cli::Cli;
use crate::config::{self, Config, ConfigError, LoadedConfig};
use crate::edge::auth::{self, ClientAuth};
use crate::edge::cors::Cors;
use crate::ops::serve::StartError;

/// What the service derives from the configuration once per load rather than per request.
#[derive(Debug)]
pub struct Policies {
    /// `[auth]`: the client tokens `/v1` requests must present.
    pub auth: ClientAuth,
    /// `[cors]`: the browser origins that may call the proxy.
    pub cors: Cors,
    /// `observability.admin_token`: the admin API's gate.
    pub admin: Admin,
}

impl Policies {
    /// The policies of `loaded`.
    pub fn new(loaded: &LoadedConfig) -> Policies {
        Policies {
            auth: ClientAuth::new(loaded.client_keys.clone()),
            cors: Cors::new(&loaded.config.cors),
            admin: Admin::new(loaded.config.observability.admin_token.clone()),
        }
    }

    /// Logs a warning for each way these policies, served on `bind`, let strangers spend the
    /// keys: an open proxy off loopback (allowed by `allow_anonymous`), and any web page
    /// calling an open proxy through a visitor's browser (`"*"` origins without client keys).
    pub fn warn_if_exposed(&self, bind: SocketAddr) {
        if let Some(warning) = auth::warn_if_open(bind, &self.auth) {
            tracing::warn!("{warning}");
        }
        if self.cors.allows_any_origin() && !self.auth.is_enabled() {
            tracing::warn!(
                "[cors] allowed_origins is \"*\" and no client keys are set: \
                 any web page can spend the API keys through its visitors' browsers"
            );
        }
    }
}

/// A reload that was refused; the running configuration stays in effect.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The server was started from a configuration built in code.
    #[error(
        "this server was not started from configuration sources, so there is nothing to re-read"
    )]
    NoSource,
    /// The sources do not form a valid configuration.
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigError),
    /// The new keys cannot form a pool.
    #[error("{}", crate::ops::serve::error_chain(.0))]
    Pool(#[from] StartError),
}

impl App {
    /// Where [`App::reload`] re-reads the configuration from: the sources `cli` names.
    pub fn reloadable(self, cli: Cli) -> App {
        *self.source.lock().unwrap_or_else(PoisonError::into_inner) = Some(cli);
        self
    }

    /// Re-reads every configuration source and swaps the result in: the number of keys now in
    /// the pool. On error nothing changes. Reloads run one at a time.
    pub fn reload(&self) -> Result<usize, ReloadError> {
        let source = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        let cli = source.as_ref().ok_or(ReloadError::NoSource)?;
        let loaded = config::load(cli)?;
        app::check_key_headers(&loaded.keys)?;
        let old = self.generation();
        let pool = old
            .pool
            .rebuild(loaded.keys.clone(), app::pool_config(&loaded.config));
        let pool = Arc::new(pool.map_err(StartError::from)?);
        warn_restart_only(&old.config.config, &loaded.config);
        self.inflight.set_max(loaded.config.server.max_inflight);
        let generation = Generation::new(loaded, Arc::clone(&pool));
        let bind = generation.config.config.server.bind_addr;
        generation.policies.warn_if_exposed(bind);
        self.queue
            .set_max(generation.config.config.rate_limit.max_queue);
        self.generation.store(Arc::new(generation));
        self.on_pool_swapped(&pool);
        self.reloads.send_modify(|count| *count += 1);
        Ok(pool.len())
    }

    /// [`App::reload`] with its outcome logged; `trigger` says what asked for it.
    pub fn reload_logged(&self, trigger: &'static str) -> Result<usize, ReloadError> {
        let result = self.reload();
        match &result {
            Ok(keys) => {
                let sources = &self.generation.load().config.sources;
                tracing::info!(trigger, keys, %sources, "configuration reloaded");
            }
            Err(error) => tracing::error!(
                trigger,
                %error,
                "configuration reload refused; the running configuration stays in effect"
            ),
        }
        result
    }

    /// The number of successful reloads so far, and a way to wait for the next one.
    pub fn subscribe_reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }
}

impl AdminOps for App {
    fn pool(&self) -> Arc<KeyPool> {
        App::pool(self)
    }

    fn reload(&self) -> Result<usize, String> {
        // The admin API logs the outcome itself.
        App::reload(self).map_err(|e| e.to_string())
    }

    fn key_changed(&self, key: &str, changes: Changes) {
        for change in changes.iter() {
            crate::observe::access_log::log_state_change(key, &change, crate::clock::now());
        }
        if let Some(cluster) = &self.cluster {
            cluster.share_operator(&App::pool(self), key, &changes);
        }
    }
}

/// Warns about settings that changed but only take effect on restart.
fn warn_restart_only(old: &Config, new: &Config) {
    let (o, n) = (old, new);
    let ignored = [
        ("server.bind_addr", o.server.bind_addr != n.server.bind_addr),
        (
            "server.worker_threads",
            o.server.worker_threads != n.server.worker_threads,
        ),
        (
            "observability.metrics_bind",
            o.observability.metrics_bind != n.observability.metrics_bind,
        ),
        (
            "observability.tracing_level",
            o.observability.tracing_level != n.observability.tracing_level,
        ),
        (
            "observability.log_format",
            o.observability.log_format != n.observability.log_format,
        ),
        (
            "upstream.connect_timeout_ms",
            o.upstream.connect_timeout_ms != n.upstream.connect_timeout_ms,
        ),
        (
            "upstream.request_timeout_ms",
            o.upstream.request_timeout_ms != n.upstream.request_timeout_ms,
        ),
        (
            "upstream.stream_idle_timeout_ms",
            o.upstream.stream_idle_timeout_ms != n.upstream.stream_idle_timeout_ms,
        ),
        ("upstream.ca_file", o.upstream.ca_file != n.upstream.ca_file),
    ];
    for (setting, changed) in ignored {
        if changed {
            tracing::warn!(setting, "changed setting ignored until restart");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, LogFormat};
    use crate::observe::logging::capture::Captured;

    fn policies(origins: &[&str], client_keys: &[&str]) -> Policies {
        let mut config = Config::default();
        config.cors.allowed_origins = origins.iter().map(|o| (*o).to_owned()).collect();
        Policies::new(&LoadedConfig {
            config,
            keys: Vec::new(),
            client_keys: client_keys
                .iter()
                .map(|k| kcp_core::Secret::new(*k))
                .collect(),
            sources: config::KeySources::default(),
        })
    }

    fn warnings(policies: &Policies, bind: &str) -> String {
        let bind: SocketAddr = bind.parse().expect("address");
        let ((), logs) = Captured::run("warn", LogFormat::Text, || {
            policies.warn_if_exposed(bind);
        });
        logs.text()
    }

    #[test]
    fn any_origin_with_anonymous_access_warns_that_any_page_can_spend_the_keys() {
        let logs = warnings(&policies(&["*"], &[]), "127.0.0.1:8080");
        assert!(
            logs.contains("any web page can spend the API keys"),
            "{logs}"
        );
        assert_eq!(logs.lines().count(), 1, "{logs}");

        let open = warnings(&policies(&[], &[]), "0.0.0.0:8080");
        assert!(open.contains("can spend the key pool"), "{open}");
        assert!(!open.contains("web page"), "{open}");

        for quiet in [
            policies(&["*"], &["kcp-token"]),
            policies(&["https://app.example.com"], &[]),
            policies(&[], &[]),
        ] {
            assert_eq!(warnings(&quiet, "127.0.0.1:8080"), "");
        }
    }
}
