//! KeyCycleProxy server: the hyper service that wires kcp-core and kcp-upstream together.
//!
//! Only this crate knows HTTP; only kcp-core knows policy. The folders follow a request:
//! [`edge`] (what a client may send), [`proxy`] (the attempt loop and streaming back),
//! [`observe`] (metrics, access log, logging) and [`ops`] (serving, signals, reload);
//! [`service`] routes a request and [`pipeline`] runs a `/v1` request through them in order.
pub mod admin;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod edge;
pub mod observe;
pub mod ops;
pub mod ops_listener;
pub mod pipeline;
pub mod proxy;
pub mod service;

// The attempt loop (`proxy/attempts.rs`, `proxy/classify.rs`) still names these by their old
// flat paths; these aliases go once it is rewritten on top of kcp-core's attempt policy.
pub(crate) use edge::openai_error;
pub(crate) use observe::{access_log, metrics};
