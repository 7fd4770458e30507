//! Command-line flags: the last and highest-priority configuration layer.
//!
//! Only what an operator changes per run lives here; everything else belongs in `config.toml`
//! or `KCP_*` environment variables (see [`crate::config`]).

use std::net::SocketAddr;
use std::path::PathBuf;

/// Shown after the flags by `--help`: what a new user needs before the first run.
const AFTER_HELP: &str = "\
Try it first, without keys or network:  kcp-server demo

Where API keys come from (all sources are combined):
  OPENAI_KEYS=sk-...,sk-...      environment variable, comma-separated
  config.json (--keys-file)      the original key-cycle-proxy's file, read as is:
                                 {\"apiKeys\": [{\"key\": \"sk-...\", \"url\": \"...\", \"models\": [...]}]}
  config.toml (--config)         [[api_keys]] entries, plus every other setting
Settings: defaults < config.toml < KCP_* environment variables
  (KCP_SECTION__FIELD, e.g. KCP_SERVER__BIND_ADDR=0.0.0.0:8080) < flags.

Exit codes: 0 stopped cleanly (or --check-config passed); 64 invalid configuration;
  1 could not start (port in use, bad CA file, ...).
Signals: SIGHUP reloads the configuration (keys keep their state); SIGTERM or SIGINT
  stop taking requests, drain for server.graceful_shutdown_seconds, then exit.";

/// `kcp-server` command line.
#[derive(clap::Parser, Debug, Clone, Default, PartialEq, Eq)]
#[command(
    name = "kcp-server",
    version,
    about = "OpenAI reverse proxy that spreads requests over a pool of API keys",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Something other than serving (run without one to serve).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// TOML configuration file [default: ./config.toml, if present]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Legacy key file `{"apiKeys": [...]}` [default: ./config.json, if present]
    #[arg(long, value_name = "PATH")]
    pub keys_file: Option<PathBuf>,

    /// Address to serve clients on; overrides [server] bind_addr
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<SocketAddr>,

    /// Address to serve metrics on; overrides [observability] metrics_bind
    #[arg(long, value_name = "ADDR")]
    pub metrics_bind: Option<SocketAddr>,

    /// Validate the configuration, print it with secrets redacted, and exit
    #[arg(long)]
    pub check_config: bool,
}

/// Subcommands.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the proxy with an embedded mock provider and five demo keys: no keys, config or
    /// network needed. Prints what to try.
    Demo {
        /// Send this many requests per second through the proxy (loopback only), to watch
        /// rotation, cooldowns, a disabled key and its re-check on the status page
        #[arg(long, value_name = "RPS", value_parser = clap::value_parser!(u32).range(1..=500))]
        traffic: Option<u32>,
        /// Port of the proxy on 127.0.0.1 (0 picks a free one); the status page is on the next
        #[arg(long, value_name = "N", default_value_t = 8080)]
        port: u16,
    },
    /// Exit 0 if the server at ADDR answers `GET /health` with 200, else 1 (for container
    /// health checks: no curl needed)
    Healthcheck {
        /// The client listener to ask
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
    },
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "kcp-server",
            "--config",
            "/etc/kcp/config.toml",
            "--keys-file",
            "keys.json",
            "--bind",
            "127.0.0.1:3000",
            "--metrics-bind",
            "127.0.0.1:3001",
            "--check-config",
        ])
        .expect("valid flags");
        assert_eq!(cli.config, Some(PathBuf::from("/etc/kcp/config.toml")));
        assert_eq!(cli.keys_file, Some(PathBuf::from("keys.json")));
        assert_eq!(cli.bind, Some(SocketAddr::from(([127, 0, 0, 1], 3000))));
        assert_eq!(
            cli.metrics_bind,
            Some(SocketAddr::from(([127, 0, 0, 1], 3001)))
        );
        assert!(cli.check_config);
    }

    #[test]
    fn no_flags_is_the_default() {
        let cli = Cli::try_parse_from(["kcp-server"]).expect("no flags");
        assert_eq!(cli, Cli::default());
    }

    #[test]
    fn bad_address_is_rejected() {
        assert!(Cli::try_parse_from(["kcp-server", "--bind", "localhost"]).is_err());
    }

    #[test]
    fn subcommands_parse() {
        let cli = Cli::try_parse_from(["kcp-server", "demo", "--traffic", "20", "--port", "0"])
            .expect("demo flags");
        assert_eq!(
            cli.command,
            Some(Command::Demo {
                traffic: Some(20),
                port: 0
            })
        );
        let cli = Cli::try_parse_from(["kcp-server", "healthcheck"]).expect("healthcheck");
        assert_eq!(
            cli.command,
            Some(Command::Healthcheck {
                addr: SocketAddr::from(([127, 0, 0, 1], 8080))
            })
        );
        assert!(Cli::try_parse_from(["kcp-server", "demo", "--traffic", "0"]).is_err());
    }

    #[test]
    fn help_says_where_keys_come_from_and_how_it_exits() {
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "OPENAI_KEYS",
            "config.json",
            "config.toml",
            "KCP_",
            "Exit codes",
            "64",
            "SIGHUP",
            "SIGTERM",
            "demo",
        ] {
            assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
        }
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
