//! Configuration: where kcp's settings and API keys come from, and the checks that let the
//! rest of the server trust them.
//!
//! Layers, later wins: built-in defaults, `config.toml` (`--config`), the legacy
//! `config.json` of the original project (`--keys-file`, keys only), `KCP_*` environment
//! variables (`KCP_SERVER__BIND_ADDR`), then flags (`--bind`, `--metrics-bind`). API keys are
//! collected from `config.toml`, `config.json` and `OPENAI_KEYS` together rather than
//! overridden. [`load`] checks everything before any port is bound and reports every problem
//! at once, each with its source and a fix; a rejected config exits with
//! [`ConfigError::EXIT_CODE`]. Secrets are [`Secret`](kcp_core::Secret)s from the moment they
//! are read and never appear in output, logs or errors.

mod collect;
mod error;
mod keys;
mod load;
mod render;
mod sections;
mod validate;

#[cfg(test)]
mod tests;

pub use error::{ConfigError, Problem};
pub use keys::KeySources;
pub use load::{LoadedConfig, load};
pub use render::render_effective;
pub use sections::{
    AuthSection, Config, CorsSection, KeysSection, LogFormat, ObservabilitySection,
    RateLimitSection, ServerSection, UpstreamSection,
};
