//! Shared helpers for the end-to-end tests; each test binary declares `mod support;`.
#![allow(dead_code, unused_imports)]

/// The mock upstream lives in its own crate so `kcp-server demo` runs the very same code.
pub use kcp_mock as mock_upstream;
pub mod proxy_harness;

pub use mock_upstream::{Behaviour, Call, MockUpstream};
