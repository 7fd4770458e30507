//! Selection strategies: how the pool chooses among the keys that can take a request.
//!
//! Each strategy is one module with an `impl KeyPool` block; [`KeyPool::select`] dispatches on
//! [`Strategy`]. All of them only ever lease a key that admission ([`super::admission`]) says
//! can take the request now.

mod fair;
mod least_latency;
mod round_robin;

pub(crate) use fair::FairQueue;
pub use fair::{FAIR_WINDOW, MAX_LEAD};

/// How selection chooses among the keys that can take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Strategy {
    /// Plain rotation over the keys that can take the request.
    RoundRobin,
    /// Fair rotation in proportion to each key's weight × health × rate (its pace: learned
    /// or configured, less after 429s), so a 240 rpm key carries eight times the traffic of a
    /// 30 rpm one and a failing key only a trickle. A key that is briefly held back keeps
    /// its turn for when it frees (start-time fair queueing, see [`KeyPool::select`]).
    #[default]
    RoundRobinHealthWeighted,
    /// Power of two choices over peak-EWMA latency × (in-flight + 1), as tower's p2c.
    LeastLatency,
}
