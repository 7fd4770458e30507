//! `kcp-server`: config → logging → build → serve → drain.
//!
//! Exit codes: 0 after a clean shutdown (or `--check-config` with a valid config), 64
//! (`EX_USAGE`) for a configuration error, 1 when the server cannot start or its drain had
//! to cut connections.

use std::process::ExitCode;

use clap::Parser;
use kcp_server::cli::Cli;
use kcp_server::config::{self, ConfigError};
use kcp_server::logging;
use kcp_server::serve::Server;
use kcp_server::signals::{Signal, Signals};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
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
    tracing::info!(keys = %loaded.sources, "configuration loaded");
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::bind(loaded).await {
        Ok(server) => server,
        Err(error) => {
            tracing::error!(error = %error_chain(&error), "cannot start");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %server.local_addr(), "listening");
    let shutdown = async move {
        while signals.recv().await != Signal::Shutdown {
            tracing::warn!("configuration reload on SIGHUP is not available yet; ignored");
        }
    };
    match server.run(shutdown).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::warn!(%error, "stopped");
            ExitCode::FAILURE
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// An error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
