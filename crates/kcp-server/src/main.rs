//! `kcp-server`: config → logging → build → serve → drain.
//!
//! Exit codes: 0 after a shutdown (or `--check-config` with a valid config), also when the
//! grace period ran out and the rest was cut; 64 (`EX_USAGE`) for a configuration error; 1
//! when the server cannot start. SIGHUP reloads the configuration, SIGTERM and SIGINT drain
//! and stop ([`Signals::until_shutdown`]).
//!
//! `kcp-server demo` runs the proxy against an embedded mock provider ([`kcp_server::demo`]);
//! `kcp-server healthcheck` exits 0 when a server answers `/health` ([`kcp_server::healthcheck`]).

use std::process::ExitCode;

use clap::Parser;
use kcp_server::app::App;
use kcp_server::cli::{Cli, Command};
use kcp_server::config::{self, ConfigError, LogFormat};
use kcp_server::demo::{Demo, DemoOptions};
use kcp_server::healthcheck;
use kcp_server::observe::logging;
use kcp_server::ops::serve::{Server, error_chain};
use kcp_server::ops::signals::Signals;
use kcp_server::ops::workers::{self, Workers};

/// The runtime of `main` is the control plane's (accepting, signals, probes, the cluster's
/// sync, the ops listener); client connections are served on worker threads of their own
/// ([`Workers`]).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Demo { traffic, port }) => return demo(DemoOptions { port, traffic }).await,
        Some(Command::Healthcheck { addr }) => {
            return match healthcheck::check(addr).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("kcp-server healthcheck: {error}");
                    ExitCode::FAILURE
                }
            };
        }
        None => {}
    }
    // Logging follows the config it is configured by; config errors go to stderr.
    let loaded = match config::load(&cli) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("kcp-server: invalid configuration:\n{error}");
            return exit_code(ConfigError::EXIT_CODE);
        }
    };
    if cli.check_config {
        println!("{}", config::render_effective(&loaded));
        return ExitCode::SUCCESS;
    }
    let observability = &loaded.config.observability;
    if let Err(error) = logging::init(&observability.tracing_level, observability.log_format) {
        eprintln!("kcp-server: {error}");
        return exit_code(ConfigError::EXIT_CODE);
    }
    logging::log_panics();
    tracing::info!(
        keys = loaded.sources.total(),
        "configuration loaded: {}",
        loaded.sources
    );
    let signals = match Signals::new() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let worker_threads = workers::resolve(loaded.config.server.worker_threads);
    let bound = match App::new(loaded) {
        Ok(app) => Server::bind_app(app.reloadable(cli)).await,
        Err(error) => Err(error),
    };
    let server = match bound {
        Ok(server) => server,
        Err(error) => {
            tracing::error!(error = %error_chain(&error), "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let server = match Workers::start(worker_threads) {
        Ok(workers) => server.with_workers(workers),
        Err(error) => {
            tracing::error!(%error, "cannot start the worker threads");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        addr = %server.local_addr(),
        metrics_addr = %server.metrics_addr(),
        worker_threads,
        "listening"
    );
    let shutdown = signals.until_shutdown(server.app());
    match server.run(shutdown).await {
        Ok(()) => tracing::info!("stopped"),
        Err(error) => tracing::warn!(%error, "stopped"),
    }
    ExitCode::SUCCESS
}

/// `kcp-server demo`: the proxy and an embedded mock provider until SIGINT/SIGTERM.
async fn demo(options: DemoOptions) -> ExitCode {
    if let Err(error) = logging::init("warn", LogFormat::Text) {
        eprintln!("kcp-server: {error}");
        return ExitCode::FAILURE;
    }
    let signals = match Signals::new() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("kcp-server demo: cannot install signal handlers: {error}");
            return ExitCode::FAILURE;
        }
    };
    let demo = match Demo::start(options).await {
        Ok(demo) => demo,
        Err(error) => {
            eprintln!("kcp-server demo: cannot start: {}", error_chain(&error));
            return ExitCode::FAILURE;
        }
    };
    println!("{}", demo.banner());
    let shutdown = signals.until_shutdown(demo.app());
    match demo.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kcp-server demo: {error}");
            ExitCode::SUCCESS
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
