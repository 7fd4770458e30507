//! KeyCycleProxy server: the hyper service that wires kcp-core and kcp-upstream together.
//!
//! Only this crate knows HTTP; only kcp-core knows policy. The folders follow a request:
//! [`edge`] (what a client may send), [`proxy`] (the attempt loop's I/O and streaming back),
//! [`observe`] (metrics, access log, logging) and [`ops`] (serving, signals, reload);
//! [`service`] routes a request and [`pipeline`] runs a `/v1` request through them in order.
//! [`ops_listener`], [`admin`] and [`status`] serve operators; [`demo`] and [`healthcheck`] are
//! the binary's subcommands.
pub mod admin;
pub mod app;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod edge;
pub mod healthcheck;
pub mod observe;
pub mod ops;
pub mod ops_listener;
pub mod pipeline;
pub mod proxy;
pub mod service;
pub mod status;
