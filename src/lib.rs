//! KeyCycleProxy facade: one dependency that re-exports the three kcp crates.
//!
//! - [`core`]: the pure key pool (routing, selection, health, rate limits).
//! - [`upstream`]: the hyper client that talks to the provider.
//! - [`server`]: the proxy service and its configuration.

pub use kcp_core as core;
pub use kcp_server as server;
pub use kcp_upstream as upstream;
pub mod economy;
pub mod simulate;
