//! kcp-core: the pure logic of KeyCycleProxy.
//!
//! A [`KeyPool`] holds API keys, routes each request to the keys that serve its model,
//! chooses one that can take the request now ([`KeyPool::select`]) and learns from every
//! attempt's [`Outcome`] ([`Lease::record`]): rate-limited keys rest exactly as long as the
//! provider asks, rejected keys are disabled and re-checked later, failing keys lose health
//! and eventually open their circuit, and each key is paced at the rate its provider reports.
//! An [`Attempt`] is the policy of one client request over the pool: which key next, what an
//! answer means ([`classify`]), when to retry, wait or give up.
//!
//! There is no I/O, no async runtime and no clock here: time comes in as a [`Time`]
//! argument and randomness through [`Random`], so embedding services, tests and the
//! simulator drive the very same policy deterministically.
#![forbid(unsafe_code)]

mod attempt;
mod budget;
mod circuit;
mod cooldown;
mod gate;
mod gcra;
mod health;
mod key;
mod keystate;
mod lease;
mod outcome;
mod pool;
mod probe;
mod ratelimit_headers;
mod refusal;
mod rng;
mod routing;
mod secret;
mod shared;
mod snapshot;
mod throttle;
mod time;

pub use attempt::{
    Action, Answer, Attempt, Backoff, Class, ClientRequest, DelayControl, ErrorBody, GiveUp, Next,
    QueueSlot, Replay, Reply, RetryPolicy, Stats, Verdict, Wait, WaitQueue, classify,
};
pub use budget::{MAX_TOKENS, estimate_tokens};
pub use circuit::{BASE_OPEN, FAILURES_TO_OPEN, MAX_OPEN};
pub use key::{KeyId, KeyKind, KeySpec, normalize_url};
pub use keystate::StateChange;
pub use lease::{Changes, Lease};
pub use outcome::{DisableReason, ErrorClass, Outcome, UpstreamFailure};
pub use pool::{Demand, FAIR_WINDOW, KeyPool, MAX_LEAD, NoKey, PoolConfig, PoolError, Strategy};
pub use ratelimit_headers::{RateLimitHeaders, parse_reset, parse_reset_at, retry_delay_in_body};
pub use refusal::{FIRST_REST as FIRST_REFUSAL_REST, MAX_REST as MAX_REFUSAL_REST};
pub use rng::{Random, SplitMix64};
pub use routing::{KeyIndex, MAX_GLOBS, RouteTable};
pub use secret::Secret;
pub use shared::{RemoteChange, SharedState};
pub use snapshot::{KeySnapshot, KeyStatus, LearnedLimits, OutcomeCounts, PoolBudget, StateCounts};
pub use time::Time;
