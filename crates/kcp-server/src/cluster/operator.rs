//! An operator's disables are the whole cluster's, and outlive what pub/sub can tell.
//!
//! An operator who takes a key out through one replica's admin API expects every replica
//! to stop using it, until an operator puts it back. The change is published like any
//! other, and also recorded in the hash `{namespace}:operator-disabled` (field: the key's
//! fingerprint, value: the replica that disabled it; no TTL), which an enable clears. A
//! rest or a provider's disable ends by itself, so a replica that missed one catches up
//! from the others' answers to its hello; an operator's disable does not end by itself, so
//! a replica that missed an enable would keep the key out for good, or hand the lifted
//! disable back to the others in its answers. Instead a replica that (re)connects takes
//! the record as it is: keys in it are disabled, keys it holds disabled by an operator and
//! not in it are put back. Its own decisions made while Redis was away are sent (and
//! recorded) first.
//!
//! Redis may lose the record (restarted without persistence): then an empty record would
//! put every key back. The marker `{namespace}:operator-record`, set with the record, tells
//! a kept record from a lost one; a replica that finds no marker writes its own operator
//! disables into the record (and the marker) and lifts none.

use std::collections::HashSet;

use kcp_core::{DisableReason, KeyPool, RemoteChange, SharedState, Time};
use redis::aio::MultiplexedConnection;

/// Where the operator's disables of `namespace` are recorded.
pub fn record_key(namespace: &str) -> String {
    format!("{namespace}:operator-disabled")
}

/// The marker of a record Redis kept, next to the record `record`.
fn marker_key(record: &str) -> String {
    format!(
        "{}:operator-record",
        record.trim_end_matches(":operator-disabled")
    )
}

/// The command that records `change` when it is an operator's decision: `None` for other
/// changes.
pub fn record(key: &str, replica: &str, change: &RemoteChange) -> Option<redis::Cmd> {
    match change.state {
        SharedState::Disabled {
            reason: DisableReason::Manual,
            ..
        } => {
            let mut command = redis::cmd("HSET");
            command.arg(key).arg(&change.key).arg(replica);
            Some(command)
        }
        SharedState::OperatorEnabled => {
            let mut command = redis::cmd("HDEL");
            command.arg(key).arg(&change.key);
            Some(command)
        }
        _ => None,
    }
}

/// Brings `pool` to the cluster's record `key` of operator disables at `now` (or, when
/// Redis lost the record, the record to `pool`'s, written as `replica`'s); returns how
/// many keys changed here.
pub async fn reconcile(
    key: &str,
    replica: &str,
    redis: &mut MultiplexedConnection,
    pool: &KeyPool,
    now: Time,
) -> redis::RedisResult<usize> {
    let marker = marker_key(key);
    let (kept, mut recorded): (Option<String>, HashSet<String>) = redis::pipe()
        .cmd("GET")
        .arg(&marker)
        .cmd("HKEYS")
        .arg(key)
        .query_async(redis)
        .await?;
    if kept.is_none() {
        let mut write = redis::pipe();
        for fingerprint in pool.operator_disabled() {
            write
                .cmd("HSET")
                .arg(key)
                .arg(&fingerprint)
                .arg(replica)
                .ignore();
            recorded.insert(fingerprint);
        }
        write.cmd("SET").arg(&marker).arg(1).ignore();
        write.query_async::<()>(redis).await?;
    }
    Ok(apply(&recorded, pool, now))
}

fn apply(recorded: &HashSet<String>, pool: &KeyPool, now: Time) -> usize {
    let here: HashSet<String> = pool.operator_disabled().into_iter().collect();
    let disable = recorded.difference(&here).map(|key| RemoteChange {
        key: key.clone(),
        state: SharedState::Disabled {
            reason: DisableReason::Manual,
            recheck_at: Time::NEVER,
        },
    });
    let enable = here.difference(recorded).map(|key| RemoteChange {
        key: key.clone(),
        state: SharedState::OperatorEnabled,
    });
    disable
        .chain(enable)
        .filter(|change| pool.apply_remote(change, now))
        .count()
}

#[cfg(test)]
mod tests {
    use kcp_core::{KeySpec, PoolConfig, Secret};

    use super::*;

    #[test]
    fn the_record_wins_over_what_a_replica_held_while_away() {
        let pool = KeyPool::new(
            ["sk-a", "sk-b", "sk-c"]
                .iter()
                .map(|s| KeySpec::new(Secret::new(*s), "http://upstream"))
                .collect(),
            PoolConfig::default(),
        )
        .expect("valid pool");
        let now = Time::from_secs(10);
        let names: Vec<String> = pool.snapshot(now).into_iter().map(|k| k.name).collect();
        let id = |i: usize| names[i].clone();
        // Here sk-a and sk-b are disabled by an operator; the record says sk-b and sk-c.
        pool.set_disabled(&id(0), true, now);
        pool.set_disabled(&id(1), true, now);
        let fingerprint = |s: &str| Secret::new(s).fingerprint();
        let recorded: HashSet<String> =
            [fingerprint("sk-b"), fingerprint("sk-c"), "key-gone".into()]
                .into_iter()
                .collect();
        assert_eq!(apply(&recorded, &pool, now), 2);
        let mut held = pool.operator_disabled();
        held.sort();
        let mut want = vec![fingerprint("sk-b"), fingerprint("sk-c")];
        want.sort();
        assert_eq!(held, want);
        assert_eq!(apply(&recorded, &pool, now), 0);
    }

    #[test]
    fn the_marker_sits_next_to_the_record() {
        assert_eq!(
            marker_key(&record_key("kcp-prod")),
            "kcp-prod:operator-record"
        );
    }

    #[test]
    fn only_operator_decisions_are_recorded() {
        let change = |state| RemoteChange {
            key: "key-1".into(),
            state,
        };
        let manual = change(SharedState::Disabled {
            reason: DisableReason::Manual,
            recheck_at: Time::NEVER,
        });
        let args = |c: redis::Cmd| {
            c.args_iter()
                .map(|a| match a {
                    redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    _ => String::new(),
                })
                .collect::<Vec<_>>()
        };
        let set = record("ns:operator-disabled", "r1", &manual).expect("recorded");
        assert_eq!(args(set), ["HSET", "ns:operator-disabled", "key-1", "r1"]);
        let del = record(
            "ns:operator-disabled",
            "r1",
            &change(SharedState::OperatorEnabled),
        )
        .expect("recorded");
        assert_eq!(args(del), ["HDEL", "ns:operator-disabled", "key-1"]);
        for state in [
            SharedState::Enabled,
            SharedState::Disabled {
                reason: DisableReason::Unauthorized,
                recheck_at: Time::NEVER,
            },
        ] {
            assert!(record("ns:operator-disabled", "r1", &change(state)).is_none());
        }
    }
}
