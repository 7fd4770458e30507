//! kcp-core: the pure logic of KeyCycleProxy.
//!
//! A [`KeyPool`] holds API keys, routes each request to the keys that serve its model,
//! chooses one that can take the request now ([`KeyPool::select`]) and learns from every
//! attempt's [`Outcome`] ([`Lease::record`]): rate-limited keys rest exactly as long as the
//! provider asks, rejected keys are disabled and re-checked later, failing keys lose health
//! and eventually open their circuit, and each key is paced at the rate its provider reports.
//!
//! There is no I/O, no async runtime and no clock here: time comes in as a [`Time`]
//! argument and randomness through [`Random`], so embedding services, tests and the
//! simulator drive the very same policy deterministically.
#![forbid(unsafe_code)]

pub mod budget;
pub mod circuit;
pub mod cooldown;
pub mod gate;
pub mod gcra;
pub mod health;
pub mod key;
pub mod keystate;
pub mod lease;
pub mod outcome;
pub mod pool;
pub mod probe;
pub mod ratelimit_headers;
pub mod rng;
pub mod routing;
pub mod secret;
pub mod snapshot;
pub mod throttle;
pub mod time;

pub use budget::estimate_tokens;
pub use key::{KeyId, KeySpec};
pub use keystate::StateChange;
pub use lease::{Changes, Lease};
pub use outcome::{
    DisableReason, ErrorClass, Outcome, StatusClass, UpstreamFailure, classify_status,
};
pub use pool::{Demand, KeyPool, NoKey, PoolConfig, PoolError, Strategy};
pub use ratelimit_headers::RateLimitHeaders;
pub use rng::{Random, SplitMix64};
pub use routing::KeyIndex;
pub use secret::Secret;
pub use snapshot::{KeySnapshot, KeyStatus, StateCounts};
pub use time::Time;
