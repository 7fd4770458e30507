//! KeyCycleProxy server: the hyper service that wires kcp-core and kcp-upstream together.
//!
//! Only this crate knows HTTP; only kcp-core knows policy.
pub mod access_log;
pub mod admin;
pub mod app;
pub mod auth;
pub mod body_limit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod cors;
pub mod demo;
pub mod healthcheck;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod openai_error;
pub mod ops_listener;
pub mod overload;
pub mod proxy;
pub mod reload;
pub mod request_id;
pub mod serve;
pub mod service;
pub mod signals;
pub mod status;
