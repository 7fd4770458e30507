//! `[cluster]`: where replicas meet to share key state.

use kcp_core::Secret;
use serde::{Deserialize, Serialize};

/// `[cluster]`: replicas of kcp share key state changes through Redis. Absent: this
/// replica learns alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// `redis://host:port/db` or `rediss://` (TLS); it may carry a password, so it is a
    /// secret and never shown.
    pub redis_url: Secret,
    /// Environment variable holding the Redis password, instead of putting it in the url.
    pub redis_password_env: Option<String>,
    /// Prefix of everything this cluster keeps in Redis: replicas of one pool share it.
    pub namespace: String,
    /// This replica's name in the cluster; default: hostname and pid.
    pub replica_id: Option<String>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            redis_url: Secret::new(""),
            redis_password_env: None,
            namespace: "kcp".into(),
            replica_id: None,
        }
    }
}

impl ClusterSection {
    /// What is wrong with the section: `(field, message, fix)` each.
    pub fn problems(&self) -> Vec<(&'static str, String, &'static str)> {
        let mut out = Vec::new();
        let url = self.redis_url.expose();
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            out.push((
                "cluster.redis_url",
                "is not a redis:// or rediss:// url".into(),
                "write redis://host:6379 or rediss://host:6380 (TLS)",
            ));
        } else if redis::Client::open(url).is_err() {
            out.push((
                "cluster.redis_url",
                "cannot be parsed".into(),
                "write redis://[user:password@]host[:port][/db]",
            ));
        }
        if let Some(var) = &self.redis_password_env {
            match std::env::var(var) {
                Ok(value) if !value.is_empty() => {}
                _ => out.push((
                    "cluster.redis_password_env",
                    format!("names {var}, which is not set or empty"),
                    "export the variable, or remove redis_password_env",
                )),
            }
        }
        if self.namespace.is_empty() || self.namespace.contains(char::is_whitespace) {
            out.push((
                "cluster.namespace",
                "must be a non-empty word".into(),
                "use something like kcp or kcp-prod",
            ));
        }
        if self.replica_id.as_ref().is_some_and(|id| id.is_empty()) {
            out.push((
                "cluster.replica_id",
                "is empty".into(),
                "remove it to use hostname and pid, or name the replica",
            ));
        }
        out
    }

    /// The replica id in force: the configured one, else hostname and pid.
    pub fn replica(&self) -> String {
        self.replica_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "kcp".into());
            format!("{host}-{}", std::process::id())
        })
    }
}
