//! Layering the sources into one checked [`LoadedConfig`].
//!
//! Later layers win: built-in defaults, `config.toml`, the legacy `config.json` (keys only),
//! `KCP_*` environment variables (`__` separates section and field), then flags. Each section
//! is deserialized on its own so a typo in `[server]` does not hide one in `[upstream]`, and
//! figment's per-value metadata tells which layer supplied a bad value.
//!
//! Secrets bypass figment's environment provider: it parses values as TOML-like literals, so
//! `KCP_OBSERVABILITY__ADMIN_TOKEN=0123` would arrive as the number 123. They, the key lists,
//! and `key_env`/`client_keys_env` variables are read verbatim instead.

use std::path::{Path, PathBuf};

use figment::error::Kind;
use figment::providers::{Env, Format, Json, Toml};
use figment::value::Value;
use figment::{Figment, Metadata, Provider};
use kcp_core::{KeySpec, Secret};
use serde::de::DeserializeOwned;

use super::collect::deserialize_all;
use super::error::{ConfigError, Problem, container, reword};
use super::keys::{self, KeySources};
use super::sections::{AuthSection, Config};
use super::validate;
use crate::cli::Cli;

/// Prefix of the environment variables that override `config.toml`.
const ENV_PREFIX: &str = "KCP_";
/// Read verbatim instead of through figment; see the module docs.
const ADMIN_TOKEN_VAR: &str = "KCP_OBSERVABILITY__ADMIN_TOKEN";
const CLIENT_KEYS_VAR: &str = "KCP_AUTH__CLIENT_KEYS";
const OPENAI_KEYS_VAR: &str = "OPENAI_KEYS";

/// A checked configuration with its keys resolved: what the server runs on.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// Everything but the keys.
    pub config: Config,
    /// The key pool, de-duplicated, in precedence order.
    pub keys: Vec<KeySpec>,
    /// Accepted client tokens: `[auth] client_keys` plus those in `client_keys_env`. Empty
    /// means the proxy does not authenticate clients.
    pub client_keys: Vec<Secret>,
    /// How many keys each source contributed; log it at startup.
    pub sources: KeySources,
}

/// Reads every layer, resolves the keys and checks everything, reporting all problems at
/// once. Called at startup and on every reload; reads files and the process environment.
pub fn load(cli: &Cli) -> Result<LoadedConfig, ConfigError> {
    let mut problems = Vec::new();
    let toml = ConfigFile::locate(
        cli.config.as_deref(),
        "config.toml",
        "--config",
        &mut problems,
    );
    let json = ConfigFile::locate(
        cli.keys_file.as_deref(),
        "config.json",
        "--keys-file",
        &mut problems,
    );
    if let Some(file) = &toml {
        file.check_syntax(Toml::file_exact(&file.path), &mut problems);
    }
    if let Some(file) = &json {
        file.check_syntax(Json::file_exact(&file.path), &mut problems);
    }
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems));
    }

    let mut figment = Figment::new();
    if let Some(file) = &toml {
        figment = figment.merge(Toml::file_exact(&file.path));
    }
    let figment = figment.merge(environment());
    let mut origins = Origins {
        figment: &figment,
        toml: toml.as_ref().map(|file| file.label.clone()),
        overrides: Vec::new(),
    };

    let mut config = sections(&figment, &origins, &mut problems);
    environment_secrets(&mut config, &mut origins, &mut problems);
    if let Some(bind) = cli.bind {
        config.server.bind_addr = bind;
        origins.set("server.bind_addr", "--bind");
    }
    if let Some(metrics) = cli.metrics_bind {
        config.observability.metrics_bind = metrics;
        origins.set("observability.metrics_bind", "--metrics-bind");
    }
    validate::check(&config, &origins, &mut problems);

    let before_keys = problems.len();
    let base_url = &config.upstream.base_url;
    let mut candidates = Vec::new();
    if let Some(file) = &toml {
        candidates.extend(keys::from_toml(
            &figment,
            &file.label,
            base_url,
            &mut problems,
        ));
    }
    if let Some(file) = &json {
        candidates.extend(keys::from_json(
            &file.path,
            &file.label,
            base_url,
            &mut problems,
        ));
    }
    match std::env::var(OPENAI_KEYS_VAR) {
        Ok(raw) => candidates.extend(keys::from_openai_keys(&raw, base_url)),
        Err(std::env::VarError::NotPresent) => {}
        Err(std::env::VarError::NotUnicode(_)) => problems.push(Problem::new(
            Some(OPENAI_KEYS_VAR.to_owned()),
            "is not valid UTF-8",
            "set it to comma-separated keys in plain text",
        )),
    }
    let (keys, sources) = keys::combine(candidates, &mut problems);
    if keys.is_empty() && problems.len() == before_keys {
        problems.push(Problem::new(
            None,
            "no API keys configured",
            "add [[api_keys]] to config.toml, a config.json, or set OPENAI_KEYS=sk-...,sk-...",
        ));
    }
    let client_keys = client_keys(&config.auth, &origins, &mut problems);
    validate::open_bind(&config, !client_keys.is_empty(), &origins, &mut problems);

    if problems.is_empty() {
        Ok(LoadedConfig {
            config,
            keys,
            client_keys,
            sources,
        })
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// A config file that will be read, and how messages name it.
struct ConfigFile {
    path: PathBuf,
    label: String,
}

impl ConfigFile {
    /// The file named by `flag`, which must exist, or `default` in the working directory if
    /// it exists.
    fn locate(
        explicit: Option<&Path>,
        default: &str,
        flag: &str,
        problems: &mut Vec<Problem>,
    ) -> Option<Self> {
        let path = explicit.unwrap_or(Path::new(default));
        if path.is_file() {
            return Some(Self {
                path: path.to_owned(),
                label: path.display().to_string(),
            });
        }
        if explicit.is_some() {
            problems.push(Problem::new(
                Some(flag.to_owned()),
                format!("{} does not exist or is not a file", path.display()),
                format!("check the path given to {flag}"),
            ));
        }
        None
    }

    /// Parses the file once to report I/O and syntax errors (without source snippets).
    fn check_syntax(&self, provider: impl Provider, problems: &mut Vec<Problem>) {
        if let Err(error) = provider.data() {
            for error in error {
                let message = match &error.kind {
                    Kind::Message(message) => message.clone(),
                    other => other.to_string(),
                };
                problems.push(Problem::new(
                    Some(self.label.clone()),
                    format!("cannot be read: {message}"),
                    "fix the syntax at the position shown, or the file's permissions",
                ));
            }
        }
    }
}

/// `KCP_SECTION__FIELD` variables, minus those read verbatim (see the module docs).
fn environment() -> Env {
    Env::prefixed(ENV_PREFIX).split("__").filter(|key| {
        let key = key.as_str().to_ascii_lowercase();
        key != "observability.admin_token"
            && key != "auth.client_keys"
            && !key.starts_with("api_keys")
    })
}

/// Which layer supplied each value, for problem messages.
pub(super) struct Origins<'a> {
    figment: &'a Figment,
    toml: Option<String>,
    /// Values set after figment: flags and verbatim environment variables.
    overrides: Vec<(&'static str, String)>,
}

impl Origins<'_> {
    /// Who set the value at `path` (`server.bind_addr`); `None` for a built-in default. A
    /// path into a list (`cors.allowed_origins.0`) is attributed to the list.
    pub(super) fn of(&self, path: &str) -> Option<String> {
        if let Some((_, source)) = self.overrides.iter().rev().find(|(p, _)| *p == path) {
            return Some(source.clone());
        }
        let mut prefix = path;
        while let Some((list, index)) = prefix.rsplit_once('.') {
            if index.parse::<usize>().is_err() {
                break;
            }
            prefix = list;
        }
        let metadata = self.figment.find_metadata(prefix)?;
        Some(self.label(metadata, prefix))
    }

    fn set(&mut self, path: &'static str, source: impl Into<String>) {
        self.overrides.push((path, source.into()));
    }

    fn label(&self, metadata: &Metadata, path: &str) -> String {
        let from_file = metadata
            .source
            .as_ref()
            .and_then(|s| s.file_path())
            .is_some();
        match (&self.toml, from_file) {
            (Some(toml), true) => toml.clone(),
            _ if metadata.name.contains("environment") => env_var(path),
            _ => metadata.name.to_string(),
        }
    }

    /// A figment error, located under `section`, as a problem naming its source.
    fn figment_problem(&self, error: &figment::Error, section: &str) -> Problem {
        let mut path = vec![section.to_owned()];
        path.extend_from_slice(container(&error.kind, &error.path));
        let (message, fix) = reword(&error.kind, &format!("[{section}]"), &path[1..]);
        if let Kind::UnknownField(field, _) = &error.kind {
            path.push(field.clone());
        }
        Problem::new(self.of(&path.join(".")), message, fix)
    }
}

/// `server.bind_addr` → `KCP_SERVER__BIND_ADDR`.
fn env_var(path: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        path.replace('.', "__").to_ascii_uppercase()
    )
}

/// Top-level names of the document: the sections, then the key list.
const TOP_LEVEL: &[&str] = &[
    "server",
    "upstream",
    "keys",
    "rate_limit",
    "observability",
    "auth",
    "cors",
    "cluster",
    "api_keys",
];

/// Deserializes each section on its own, so every section reports its errors.
fn sections(figment: &Figment, origins: &Origins<'_>, problems: &mut Vec<Problem>) -> Config {
    top_level(figment, origins, problems);
    Config {
        server: section(figment, "server", origins, problems),
        upstream: section(figment, "upstream", origins, problems),
        keys: section(figment, "keys", origins, problems),
        rate_limit: section(figment, "rate_limit", origins, problems),
        observability: section(figment, "observability", origins, problems),
        auth: section(figment, "auth", origins, problems),
        cors: section(figment, "cors", origins, problems),
        cluster: figment
            .find_value("cluster")
            .is_ok()
            .then(|| section(figment, "cluster", origins, problems)),
    }
}

/// Every unknown top-level name, and sections that are not tables.
fn top_level(figment: &Figment, origins: &Origins<'_>, problems: &mut Vec<Problem>) {
    let Ok(Value::Dict(_, root)) = figment.find_value("") else {
        return;
    };
    for (name, value) in &root {
        let problem = match (TOP_LEVEL.contains(&name.as_str()), value) {
            (false, _) => reword(&Kind::UnknownField(name.clone(), TOP_LEVEL), "", &[]),
            (true, Value::Dict(..)) => continue,
            (true, Value::Array(..)) if name == "api_keys" => continue,
            (true, _) if name == "api_keys" => (
                "api_keys must be a list of tables".to_owned(),
                "write each key as an [[api_keys]] table".to_owned(),
            ),
            (true, _) => (
                format!("{name} must be a table"),
                format!("put its fields under a [{name}] header"),
            ),
        };
        let (message, fix) = problem;
        problems.push(Problem::new(origins.of(name), message, fix));
    }
}

/// The section `name`, with every field serde rejects reported and left at its default.
fn section<T: DeserializeOwned + Default>(
    figment: &Figment,
    name: &str,
    origins: &Origins<'_>,
    problems: &mut Vec<Problem>,
) -> T {
    let Ok(Value::Dict(_, table)) = figment.find_value(name) else {
        return T::default();
    };
    let (value, errors) = deserialize_all(&table);
    for error in &errors {
        problems.push(origins.figment_problem(error, name));
    }
    value.unwrap_or_default()
}

/// Applies the secrets that figment's environment provider skips, verbatim.
fn environment_secrets(
    config: &mut Config,
    origins: &mut Origins<'_>,
    problems: &mut Vec<Problem>,
) {
    if let Ok(token) = std::env::var(ADMIN_TOKEN_VAR) {
        config.observability.admin_token = Some(Secret::new(token));
        origins.set("observability.admin_token", ADMIN_TOKEN_VAR);
    }
    if let Ok(raw) = std::env::var(CLIENT_KEYS_VAR) {
        config.auth.client_keys = keys::split_secrets(&raw);
        origins.set("auth.client_keys", CLIENT_KEYS_VAR);
    }
    let api_key_vars: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.to_ascii_uppercase().starts_with("KCP_API_KEYS"))
        .collect();
    for name in api_key_vars {
        problems.push(Problem::new(
            Some(name),
            "API keys cannot be set through KCP_ variables",
            "use OPENAI_KEYS=sk-...,sk-... or [[api_keys]] with key_env in config.toml",
        ));
    }
}

/// `[auth] client_keys` plus the tokens in `client_keys_env`, without repeats.
fn client_keys(
    auth: &AuthSection,
    origins: &Origins<'_>,
    problems: &mut Vec<Problem>,
) -> Vec<Secret> {
    let mut keys: Vec<Secret> = Vec::new();
    for (index, key) in auth.client_keys.iter().enumerate() {
        if key.is_empty() {
            problems.push(Problem::new(
                origins.of("auth.client_keys"),
                format!("[auth] client_keys[{index}] is empty"),
                "remove the empty entry",
            ));
        } else if !keys.contains(key) {
            keys.push(key.clone());
        }
    }
    let Some(var) = &auth.client_keys_env else {
        return keys;
    };
    let source = origins.of("auth.client_keys_env");
    let listed = match std::env::var(var) {
        Ok(raw) => keys::split_secrets(&raw),
        Err(_) => {
            problems.push(Problem::new(
                source,
                format!("[auth] client_keys_env names {var}, which is not set"),
                format!(
                    "export {var}=token1,token2 before starting kcp, or remove client_keys_env"
                ),
            ));
            return keys;
        }
    };
    if listed.is_empty() {
        problems.push(Problem::new(
            source,
            format!("[auth] client_keys_env names {var}, which holds no tokens"),
            format!("put comma-separated tokens in {var}, or remove client_keys_env"),
        ));
    }
    for key in listed {
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}
