//! How many replicas are alive: each one keeps a key `{namespace}:replica:{replica_id}`
//! with a short TTL ([`TTL`]), refreshed every [`EVERY`], and counts the others' keys.
//!
//! Keys with a TTL rather than a sorted set of timestamps: Redis expires them on its own
//! clock, so the replicas' clocks need not agree, and a replica that dies (no clean
//! shutdown) drops out of the count [`TTL`] later without anyone cleaning up. The count is
//! the divisor of each key's rate ([`kcp_core::KeyPool::set_replica_share`]).

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

/// How often a replica refreshes its heartbeat and recounts.
pub const EVERY: Duration = Duration::from_secs(1);
/// How long a heartbeat lives: a replica gone silent this long no longer counts.
pub const TTL: Duration = Duration::from_secs(3);
/// Keys asked for per SCAN step, and the most steps one count takes: a namespace is shared
/// by a handful of replicas, this only bounds a count on a very busy Redis.
const SCAN_STEP: usize = 500;
const SCAN_STEPS: usize = 200;

/// This replica's heartbeat key and the pattern matching every replica's.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    key: String,
    pattern: String,
}

impl Heartbeat {
    /// The heartbeat of `replica` in `namespace`.
    pub fn new(namespace: &str, replica: &str) -> Heartbeat {
        Heartbeat {
            key: format!("{namespace}:replica:{replica}"),
            pattern: format!("{}:replica:*", escape_glob(namespace)),
        }
    }

    /// Refreshes this replica's heartbeat and counts the live ones (itself included).
    pub async fn beat(&self, redis: &mut MultiplexedConnection) -> redis::RedisResult<NonZeroU32> {
        let ttl_ms = u64::try_from(TTL.as_millis()).unwrap_or(u64::MAX);
        redis::cmd("SET")
            .arg(&self.key)
            .arg(1)
            .arg("PX")
            .arg(ttl_ms)
            .query_async::<()>(redis)
            .await?;
        let mut cursor = 0u64;
        let mut live = HashSet::new();
        for _ in 0..SCAN_STEPS {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&self.pattern)
                .arg("COUNT")
                .arg(SCAN_STEP)
                .query_async(redis)
                .await?;
            live.extend(keys);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        // SCAN may return a key twice while Redis rehashes (hence the set); never below
        // this replica itself.
        let live = u32::try_from(live.len()).unwrap_or(u32::MAX);
        Ok(NonZeroU32::new(live).unwrap_or(NonZeroU32::MIN))
    }

    /// Takes this replica out of the count at once (a clean shutdown).
    pub async fn stop(&self, redis: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        redis::cmd("DEL")
            .arg(&self.key)
            .query_async::<()>(redis)
            .await
    }
}

/// `namespace` with Redis glob characters escaped, for a MATCH pattern.
fn escape_glob(namespace: &str) -> String {
    let mut out = String::with_capacity(namespace.len());
    for c in namespace.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_matches_this_namespace_only() {
        let beat = Heartbeat::new("kcp-prod", "host-12");
        assert_eq!(beat.key, "kcp-prod:replica:host-12");
        assert_eq!(beat.pattern, "kcp-prod:replica:*");
        assert_eq!(
            Heartbeat::new("a*b[1]", "r").pattern,
            r"a\*b\[1\]:replica:*"
        );
    }
}
