//! Shared helpers for the end-to-end tests; each test binary declares `mod support;`.
#![allow(dead_code, unused_imports)]

pub mod mock_upstream;
pub mod proxy_harness;
pub mod time;

pub use mock_upstream::{Behaviour, Call, MockUpstream};
