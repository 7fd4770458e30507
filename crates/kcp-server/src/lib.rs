//! KeyCycleProxy server: the hyper service that wires kcp-core and kcp-upstream together.
//!
//! Only this crate knows HTTP; only kcp-core knows policy.
pub mod cli;
pub mod clock;
pub mod config;
pub mod openai_error;
