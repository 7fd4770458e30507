//! Command-line flags: the last and highest-priority configuration layer.
//!
//! Only what an operator changes per run lives here; everything else belongs in `config.toml`
//! or `KCP_*` environment variables (see [`crate::config`]).

use std::net::SocketAddr;
use std::path::PathBuf;

/// `kcp-server` command line.
#[derive(clap::Parser, Debug, Clone, Default, PartialEq, Eq)]
#[command(
    name = "kcp-server",
    version,
    about = "OpenAI reverse proxy that spreads requests over a pool of API keys"
)]
pub struct Cli {
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
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
