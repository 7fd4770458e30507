//! The one test kit of the end-to-end tests; each test binary declares `mod support;`.
//!
//! - [`mock_upstream`]: the in-process mock OpenAI upstream.
//! - [`proxy_harness`]: the real proxy on `127.0.0.1:0`, configured in code, and its client.
//! - [`keys`]: the test keys and the pools most tests start from.
//! - [`time`]: paused time over loopback sockets.
//! - [`observe`]: metric scrapes and captured logs.
//! - [`config_file`]: a config file on disk, for reloads and signals.
//! - [`raw`]: raw TCP, for tests below HTTP.
//! - [`cluster`]: a real `redis-server` on a free loopback port and replicas sharing it.
//! - [`python`]: the official OpenAI Python SDK, run as a child process.
//! - [`realtime`]: a WebSocket echo upstream and client, for the Realtime API.
//! - [`secrets`]: distinctive secrets and the checks that none leaked, for the leak tests.
#![allow(dead_code, unused_imports)]

pub mod config_file;
pub mod keys;
/// The mock upstream lives in its own crate so `kcp-server demo` runs the very same code.
pub use kcp_mock as mock_upstream;
pub mod cluster;
pub mod observe;
pub mod proxy_harness;
pub mod python;
pub mod raw;
pub mod realtime;
pub mod secrets;
pub mod time;

pub use keys::{KEY_A, KEY_B, KEY_C, one_key, routed_keys, three_keys, two_keys};
pub use mock_upstream::{Behaviour, Call, MockUpstream};
