//! A `config.toml` in the temp directory that a test rewrites, and the command line that
//! points the server at it: how the reload tests change the configuration of a running proxy.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use key_cycle_proxy::server::app::App;
use key_cycle_proxy::server::cli::Cli;
use key_cycle_proxy::server::config;

/// The admin token of the generated configs.
pub const ADMIN_TOKEN: &str = "admin-token-ops-5e1f0c9a77";

/// One config file, removed on drop.
pub struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    /// A new file holding `toml`.
    pub fn new(toml: &str) -> ConfigFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "kcp-ops-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let file = ConfigFile {
            path: std::env::temp_dir().join(name),
        };
        file.write(toml);
        file
    }

    /// Replaces the content at once (write aside, then rename), as an operator's editor or
    /// a config manager would.
    pub fn write(&self, toml: &str) {
        let aside = self.path.with_extension("toml.new");
        std::fs::write(&aside, toml).expect("write the config file");
        std::fs::rename(&aside, &self.path).expect("move the config file in place");
    }

    /// `kcp-server --config <this file>`.
    pub fn cli(&self) -> Cli {
        Cli {
            config: Some(self.path.clone()),
            ..Cli::default()
        }
    }

    /// The app of this file's configuration, able to reload from it.
    pub fn app(&self) -> App {
        let cli = self.cli();
        let loaded = config::load(&cli).unwrap_or_else(|e| panic!("valid config:\n{e}"));
        App::new(loaded).expect("valid proxy").reloadable(cli)
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A complete `config.toml`: loopback listeners on ephemeral ports, fast retries, the admin
/// token, round-robin selection, `keys` as `(name, key)` on `base_url`, then `extra` (more
/// sections, which must not repeat the ones written here).
pub fn config_toml(base_url: &str, keys: &[(&str, &str)], extra: &str) -> String {
    let mut toml = format!(
        r#"[server]
bind_addr = "127.0.0.1:0"
graceful_shutdown_seconds = 5

[upstream]
base_url = "{base_url}"
request_timeout_ms = 5000
retry_initial_backoff_ms = 5
retry_max_backoff_ms = 50

[keys]
rotation_strategy = "round_robin"

[observability]
metrics_bind = "127.0.0.1:0"
admin_token = "{ADMIN_TOKEN}"
{extra}
"#
    );
    for (name, key) in keys {
        toml.push_str(&format!(
            "\n[[api_keys]]\nname = \"{name}\"\nkey = \"{key}\"\n"
        ));
    }
    toml
}
