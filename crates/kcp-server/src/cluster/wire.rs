//! What replicas say to each other on `{namespace}:changes`: one JSON message per change.
//!
//! Each process has its own monotonic clock, so times travel as what is left of them when
//! the change is sent (`rest_ms`); the receiver counts from its own now. The transit time
//! (a millisecond on a LAN) only makes a shared rest end that much later.

use std::time::Duration;

use kcp_core::{DisableReason, RemoteChange, SharedState, Time};
use serde::{Deserialize, Serialize};

/// One change on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The sending replica (a replica skips its own messages).
    pub from: String,
    /// The key's fingerprint.
    pub key: String,
    /// When it was sent, in milliseconds since the Unix epoch by the sender's wall clock
    /// (for `kcp_cluster_apply_delay_seconds` only; times in the change are relative).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_ms: Option<u64>,
    /// What changed.
    #[serde(flatten)]
    pub state: WireState,
}

/// [`SharedState`] with times as what is left of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireState {
    /// Resting for this much longer.
    Cooling {
        /// Milliseconds left.
        rest_ms: u64,
    },
    /// Out of rotation.
    Disabled {
        /// [`DisableReason::as_str`].
        reason: String,
        /// Milliseconds to the re-check; none for an operator's disable.
        recheck_ms: Option<u64>,
    },
    /// Back in rotation (a re-check succeeded).
    Enabled,
    /// An operator put the key back.
    OperatorEnabled,
    /// Refusing a model (or endpoint) for this much longer.
    ModelRefused {
        /// The model or endpoint.
        scope: String,
        /// Milliseconds left.
        rest_ms: u64,
    },
    /// Learned per-minute limits.
    Limits {
        /// Requests per minute.
        requests: Option<u64>,
        /// Tokens per minute.
        tokens: Option<u64>,
    },
    /// The sender (re)joined and missed what was said meanwhile: the others answer with
    /// everything they know (`key` is empty).
    Hello,
}

fn left(until: Time, now: Time) -> u64 {
    u64::try_from(until.saturating_since(now).as_millis()).unwrap_or(u64::MAX)
}

fn reason_of(label: &str) -> Option<DisableReason> {
    [
        DisableReason::Unauthorized,
        DisableReason::Forbidden,
        DisableReason::Billing,
        DisableReason::QuotaExhausted,
        DisableReason::Manual,
    ]
    .into_iter()
    .find(|r| r.as_str() == label)
}

impl Message {
    /// `from` (re)joined: asks the others for their state.
    pub fn hello(from: &str) -> Message {
        Message {
            from: from.into(),
            key: String::new(),
            sent_ms: None,
            state: WireState::Hello,
        }
    }

    /// The message for `change`, sent by `from` at `now`; `None` when it is over already.
    pub fn encode(from: &str, change: &RemoteChange, now: Time) -> Option<Message> {
        let state = match &change.state {
            SharedState::Cooling { until } if *until > now => WireState::Cooling {
                rest_ms: left(*until, now),
            },
            SharedState::ModelRefused { scope, until } if *until > now => WireState::ModelRefused {
                scope: scope.clone(),
                rest_ms: left(*until, now),
            },
            SharedState::Cooling { .. } | SharedState::ModelRefused { .. } => return None,
            SharedState::Disabled { reason, recheck_at } => WireState::Disabled {
                reason: reason.as_str().into(),
                recheck_ms: (*recheck_at != Time::NEVER).then(|| left(*recheck_at, now)),
            },
            SharedState::Enabled => WireState::Enabled,
            SharedState::OperatorEnabled => WireState::OperatorEnabled,
            SharedState::Limits { requests, tokens } => WireState::Limits {
                requests: *requests,
                tokens: *tokens,
            },
        };
        Some(Message {
            from: from.into(),
            key: change.key.clone(),
            sent_ms: None,
            state,
        })
    }

    /// The change this message brings, received at `now`; `None` for one this version
    /// cannot read.
    pub fn decode(self, now: Time) -> Option<RemoteChange> {
        let at = |ms: u64| now + Duration::from_millis(ms);
        let state = match self.state {
            WireState::Cooling { rest_ms } => SharedState::Cooling { until: at(rest_ms) },
            WireState::Disabled { reason, recheck_ms } => SharedState::Disabled {
                reason: reason_of(&reason)?,
                recheck_at: recheck_ms.map_or(Time::NEVER, at),
            },
            WireState::Enabled => SharedState::Enabled,
            WireState::OperatorEnabled => SharedState::OperatorEnabled,
            WireState::ModelRefused { scope, rest_ms } => SharedState::ModelRefused {
                scope,
                until: at(rest_ms),
            },
            WireState::Limits { requests, tokens } => SharedState::Limits { requests, tokens },
            WireState::Hello => return None,
        };
        Some(RemoteChange {
            key: self.key,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_travel_as_what_is_left_and_come_back_on_the_receivers_clock() {
        let sent = Time::from_secs(100);
        let change = RemoteChange {
            key: "key-0123abcd".into(),
            state: SharedState::Cooling {
                until: sent + Duration::from_millis(2_500),
            },
        };
        let message = Message::encode("a", &change, sent).expect("not over");
        let text = serde_json::to_string(&message).expect("serializes");
        assert_eq!(
            text,
            r#"{"from":"a","key":"key-0123abcd","kind":"cooling","rest_ms":2500}"#
        );
        let back: Message = serde_json::from_str(&text).expect("parses");
        let received = Time::from_secs(7);
        assert_eq!(
            back.decode(received),
            Some(RemoteChange {
                key: "key-0123abcd".into(),
                state: SharedState::Cooling {
                    until: received + Duration::from_millis(2_500)
                },
            })
        );
        assert_eq!(
            Message::encode("a", &change, sent + Duration::from_secs(3)),
            None
        );
    }

    #[test]
    fn a_disable_keeps_its_reason_and_an_operators_has_no_recheck() {
        let now = Time::from_secs(10);
        for (reason, recheck_at) in [
            (DisableReason::QuotaExhausted, now + Duration::from_secs(60)),
            (DisableReason::Manual, Time::NEVER),
        ] {
            let change = RemoteChange {
                key: "key-1".into(),
                state: SharedState::Disabled { reason, recheck_at },
            };
            let message = Message::encode("a", &change, now).expect("encodes");
            assert_eq!(message.clone().decode(now), Some(change));
        }
        let unknown = Message {
            from: "a".into(),
            key: "key-1".into(),
            sent_ms: None,
            state: WireState::Disabled {
                reason: "gone".into(),
                recheck_ms: None,
            },
        };
        assert_eq!(unknown.decode(now), None);
    }

    #[test]
    fn an_operators_enable_is_told_apart_from_a_recheck() {
        let now = Time::from_secs(10);
        let change = RemoteChange {
            key: "key-1".into(),
            state: SharedState::OperatorEnabled,
        };
        let message = Message::encode("a", &change, now).expect("encodes");
        let text = serde_json::to_string(&message).expect("serializes");
        assert_eq!(
            text,
            r#"{"from":"a","key":"key-1","kind":"operator_enabled"}"#
        );
        let back: Message = serde_json::from_str(&text).expect("parses");
        assert_eq!(back.decode(now), Some(change));
    }

    #[test]
    fn a_hello_carries_no_change() {
        let hello = Message::hello("b");
        let text = serde_json::to_string(&hello).expect("serializes");
        assert_eq!(text, r#"{"from":"b","key":"","kind":"hello"}"#);
        let back: Message = serde_json::from_str(&text).expect("parses");
        assert_eq!(back.state, WireState::Hello);
        assert_eq!(back.decode(Time::from_secs(1)), None);
    }
}
