//! What a request asks of the pool, and why the pool may have no key for it.

use std::time::Duration;

use crate::routing::KeyIndex;
use crate::time::Time;

/// What one request asks of the pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Demand<'a> {
    /// The requested model, if the request names one.
    pub model: Option<&'a str>,
    /// Estimated tokens ([`crate::budget::estimate_tokens`]), spent against token budgets.
    pub tokens: u64,
    /// Keys already tried for this request: never chosen again.
    pub exclude: &'a [KeyIndex],
    /// What a key's refusal would be about: the model, or for requests that name none the
    /// endpoint. Keys that refused it lately are not chosen (see [`crate::Lease::refuse`]).
    pub scope: Option<&'a str>,
    /// Only keys whose known token limit is at least this (0: any key). Set once the provider
    /// said how many tokens the request needs and that a key's limit is too small for it.
    pub min_token_limit: u64,
    /// How much longer this request would wait for a key if none can take it now (the
    /// caller's `max_wait` minus what it already waited; zero when it will not wait). A
    /// [`NoKey::Busy`] answer within it promises the key's next cell to this request; one
    /// beyond it promises nothing, so a caller that gives up leaves nothing dangling.
    pub will_wait: Duration,
}

impl Demand<'_> {
    /// The demand with its token estimate capped at [`crate::budget::MAX_TOKENS`], whatever
    /// the client wrote as `max_tokens`.
    pub(in crate::pool) fn bounded(&self) -> Self {
        Demand {
            tokens: self.tokens.min(crate::budget::MAX_TOKENS),
            ..*self
        }
    }
}

/// Why no key can take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoKey {
    /// No key serves the model.
    NoRoute,
    /// Every key that serves it is disabled.
    AllDisabled,
    /// Every usable key is cooling or limited; the first frees up then.
    Busy {
        /// When the first key (or the global limit) frees up.
        until: Time,
    },
    /// Every usable key was already tried for this request.
    Exhausted,
    /// Every usable key's circuit is open: the provider cannot be reached through them.
    Unreachable {
        /// When the first circuit lets a trial through.
        until: Time,
    },
    /// Every key that serves the model lately refused it (or its endpoint).
    Refused,
    /// No key's known token limit is large enough for the request.
    TooLarge,
}

impl std::fmt::Display for NoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoKey::NoRoute => f.write_str("no key serves the model"),
            NoKey::AllDisabled => f.write_str("every key that serves the model is disabled"),
            NoKey::Busy { until } => write!(f, "every usable key is busy until {until:?}"),
            NoKey::Exhausted => f.write_str("every usable key was already tried"),
            NoKey::Unreachable { until } => {
                write!(f, "every usable key's circuit is open until {until:?}")
            }
            NoKey::Refused => f.write_str("every key that serves the model refused it"),
            NoKey::TooLarge => f.write_str("no key's token limit fits the request"),
        }
    }
}

impl std::error::Error for NoKey {}
