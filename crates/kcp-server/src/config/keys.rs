//! The API key pool: read from three sources, resolved, checked and de-duplicated.
//!
//! figment would let a later source *replace* an earlier array, which would make a
//! `config.json` silently discard the keys of `config.toml`. So each source's list is read on
//! its own and the lists are concatenated in precedence order: `config.toml` `[[api_keys]]`,
//! the legacy `config.json` `apiKeys`, then `OPENAI_KEYS`. The same secret on the same url is
//! the same key; the first occurrence wins, so a named, weighted TOML entry is not replaced by
//! a bare copy from `OPENAI_KEYS`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use figment::Figment;
use figment::providers::{Format, Json};
use figment::value::Value;
use kcp_core::{KeyKind, KeySpec, Secret};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde::de::IgnoredAny;

use super::collect::deserialize_all;
use super::error::{Problem, reword};
use super::validate::http_url;

/// The model name that makes a key serve every model no other key lists.
const ANY_MODEL: &str = "others";

/// How many keys each source contributed, after duplicates were removed. Its `Display` is
/// the startup line: `3 keys: 2 from config.toml, 1 from config.json, 0 from OPENAI_KEYS
/// (1 duplicate removed)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeySources {
    /// Kept keys from `config.toml` `[[api_keys]]`.
    pub toml: usize,
    /// Kept keys from the legacy `config.json`.
    pub json: usize,
    /// Kept keys from `OPENAI_KEYS`.
    pub env: usize,
    /// Entries dropped because an earlier entry had the same secret and url.
    pub duplicates: usize,
}

impl KeySources {
    /// Keys in the pool.
    pub fn total(&self) -> usize {
        self.toml + self.json + self.env
    }
}

impl fmt::Display for KeySources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total();
        write!(
            f,
            "{total} key{}: {} from config.toml, {} from config.json, {} from OPENAI_KEYS",
            plural(total),
            self.toml,
            self.json,
            self.env
        )?;
        if self.duplicates > 0 {
            write!(
                f,
                " ({} duplicate{} removed)",
                self.duplicates,
                plural(self.duplicates)
            )?;
        }
        Ok(())
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Where a key came from, for [`KeySources`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Toml,
    Json,
    Env,
}

/// A checked key before de-duplication, with where it was written for error messages.
#[derive(Debug)]
pub(super) struct Candidate {
    origin: Origin,
    source: String,
    place: String,
    key: KeySpec,
}

/// A `[[api_keys]]` entry of `config.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key: Option<Secret>,
    key_env: Option<String>,
    url: Option<String>,
    models: Option<Vec<String>>,
    name: Option<String>,
    weight: Option<u32>,
    rpm: Option<u32>,
    tpm: Option<u32>,
    organization: Option<String>,
    project: Option<String>,
    kind: Option<KeyKind>,
    deployments: Option<BTreeMap<String, String>>,
    api_version: Option<String>,
}

/// Which provider dialect a key speaks, in both config formats: `kind` (`openai` by
/// default, or `azure`) and, for Azure's classic deployments form, `api_version` and the
/// `deployments` map from model to deployment.
#[derive(Debug, Default)]
struct Provider {
    kind: Option<KeyKind>,
    deployments: Option<BTreeMap<String, String>>,
    api_version: Option<String>,
}

/// The legacy `config.json` of the original project: `{"apiKeys": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyFile {
    #[serde(rename = "apiKeys")]
    _api_keys: Vec<IgnoredAny>,
}

/// One `apiKeys` entry of the legacy `config.json`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyKey {
    key: Secret,
    url: Option<String>,
    models: Option<Vec<String>>,
    kind: Option<KeyKind>,
    deployments: Option<BTreeMap<String, String>>,
    #[serde(alias = "apiVersion")]
    api_version: Option<String>,
}

/// Reads `[[api_keys]]` from `figment` (whose only array source is `config.toml`).
pub(super) fn from_toml(
    figment: &Figment,
    source: &str,
    base_url: &str,
    problems: &mut Vec<Problem>,
) -> Vec<Candidate> {
    let Ok(Value::Array(_, entries)) = figment.find_value("api_keys") else {
        return Vec::new();
    };
    let mut candidates = Vec::new();
    for (index, value) in entries.iter().enumerate() {
        let place = format!("[[api_keys]] #{}", index + 1);
        let fail = Failure::new(source, &place);
        let Some(entry) = fail.deserialize::<KeyEntry>(value, problems) else {
            continue;
        };
        let before = problems.len();
        entry_limits(&entry, &fail, problems);
        let secret = entry_secret(entry.key, entry.key_env, &fail, problems);
        let url = entry_url(entry.url, base_url, &fail, problems);
        let models = entry_models(entry.models, &fail, problems);
        let provider = Provider {
            kind: entry.kind,
            deployments: entry.deployments,
            api_version: entry.api_version,
        };
        entry_provider(&provider, &fail, problems);
        if let (Some(secret), true) = (secret, problems.len() == before) {
            let mut key = with_provider(plain_key(secret, url, models), provider);
            key.name = entry.name;
            key.weight = entry.weight.unwrap_or(1);
            key.rpm = entry.rpm;
            key.tpm = entry.tpm;
            key.organization = entry.organization;
            key.project = entry.project;
            candidates.push(Candidate {
                origin: Origin::Toml,
                source: source.to_owned(),
                place,
                key,
            });
        }
    }
    candidates
}

/// Reads the legacy `config.json` at `path`; its syntax was checked by the caller.
pub(super) fn from_json(
    path: &Path,
    source: &str,
    base_url: &str,
    problems: &mut Vec<Problem>,
) -> Vec<Candidate> {
    let figment = Figment::from(Json::file_exact(path));
    let root = figment
        .find_value("")
        .unwrap_or_else(|_| Value::from(figment::value::Dict::new()));
    if Failure::new(source, "")
        .deserialize::<LegacyFile>(&root, problems)
        .is_none()
    {
        return Vec::new();
    }
    let Ok(Value::Array(_, entries)) = figment.find_value("apiKeys") else {
        return Vec::new();
    };
    let mut candidates = Vec::new();
    for (index, value) in entries.iter().enumerate() {
        let place = format!("apiKeys[{index}]");
        let fail = Failure::new(source, &place);
        let Some(entry) = fail.deserialize::<LegacyKey>(value, problems) else {
            continue;
        };
        let before = problems.len();
        let secret = entry_secret(Some(entry.key), None, &fail, problems);
        let url = entry_url(entry.url, base_url, &fail, problems);
        let models = entry_models(entry.models, &fail, problems);
        let provider = Provider {
            kind: entry.kind,
            deployments: entry.deployments,
            api_version: entry.api_version,
        };
        entry_provider(&provider, &fail, problems);
        if let (Some(secret), true) = (secret, problems.len() == before) {
            candidates.push(Candidate {
                origin: Origin::Json,
                source: source.to_owned(),
                place,
                key: with_provider(plain_key(secret, url, models), provider),
            });
        }
    }
    candidates
}

/// Keys from `OPENAI_KEYS=k1,k2`: on `base_url`, serving every model. Empty entries (a
/// stray or trailing comma) are skipped.
pub(super) fn from_openai_keys(raw: &str, base_url: &str) -> Vec<Candidate> {
    split_secrets(raw)
        .into_iter()
        .enumerate()
        .map(|(index, secret)| Candidate {
            origin: Origin::Env,
            source: "OPENAI_KEYS".to_owned(),
            place: format!("entry #{}", index + 1),
            key: plain_key(secret, root_url(base_url), vec![ANY_MODEL.to_owned()]),
        })
        .collect()
}

/// Splits a comma-separated list of secrets, dropping empty entries.
pub(super) fn split_secrets(raw: &str) -> Vec<Secret> {
    raw.split(',')
        .map(Secret::new)
        .filter(|secret| !secret.is_empty())
        .collect()
}

/// Drops repeated keys (`KeySpec::same_key`), keeping the first, counts keys per source, and
/// rejects a name used by two keys.
pub(super) fn combine(
    candidates: Vec<Candidate>,
    problems: &mut Vec<Problem>,
) -> (Vec<KeySpec>, KeySources) {
    let mut sources = KeySources::default();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut keys = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let key = candidate.key;
        // kcp-core's one identity rule: same secret, same url up to a trailing `/` or `/v1`.
        if keys.iter().any(|kept: &KeySpec| kept.same_key(&key)) {
            sources.duplicates += 1;
            continue;
        }
        if let Some(name) = &key.name {
            let place = format!("{} {}", candidate.source, candidate.place);
            if let Some(first) = names.insert(name.clone(), place) {
                problems.push(Problem::new(
                    Some(candidate.source.clone()),
                    format!(
                        "{}: name `{name}` is already used by {first}",
                        candidate.place
                    ),
                    "give each key a unique name",
                ));
            }
        }
        match candidate.origin {
            Origin::Toml => sources.toml += 1,
            Origin::Json => sources.json += 1,
            Origin::Env => sources.env += 1,
        }
        keys.push(key);
    }
    (keys, sources)
}

fn plain_key(secret: Secret, url: String, models: Vec<String>) -> KeySpec {
    KeySpec::new(secret, url).with_models(models)
}

fn with_provider(mut key: KeySpec, provider: Provider) -> KeySpec {
    key.kind = provider.kind.unwrap_or_default();
    key.deployments = provider.deployments.unwrap_or_default();
    key.api_version = provider.api_version;
    key
}

/// `deployments` and `api_version` belong to an Azure key, `deployments` needs the
/// `api_version` of the classic form, and both go into a URL as written, so they are plain
/// names (letters, digits, `-`, `_`, `.`).
fn entry_provider(provider: &Provider, fail: &Failure<'_>, problems: &mut Vec<Problem>) {
    let azure = provider.kind == Some(KeyKind::Azure);
    if !azure && (provider.deployments.is_some() || provider.api_version.is_some()) {
        fail.push(
            problems,
            "sets deployments or api_version, which only an Azure key has",
            "add kind = \"azure\", or remove them",
        );
    }
    if azure && provider.deployments.is_some() && provider.api_version.is_none() {
        fail.push(
            problems,
            "sets deployments without api_version (Azure's classic form needs both)",
            "add api_version = \"2024-10-21\" (or your version), or remove deployments to use Azure's v1 API",
        );
    }
    let plain = |name: &str| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if provider.api_version.as_deref().is_some_and(|v| !plain(v)) {
        fail.push(
            problems,
            "api_version is empty or has characters other than letters, digits, -, _ and .",
            "write it as Azure documents it, e.g. api_version = \"2024-10-21\"",
        );
    }
    for (model, deployment) in provider.deployments.iter().flatten() {
        if !plain(deployment) {
            fail.push(
                problems,
                format!("deployment `{deployment}` of model `{model}` is not a plain name"),
                "use the deployment's name as shown in Azure (letters, digits, -, _ and .)",
            );
        }
    }
}

/// The secret of an entry: exactly one of `key` and `key_env`, non-empty.
fn entry_secret(
    key: Option<Secret>,
    key_env: Option<String>,
    fail: &Failure<'_>,
    problems: &mut Vec<Problem>,
) -> Option<Secret> {
    let secret = match (key, key_env) {
        (Some(_), Some(_)) => {
            fail.push(
                problems,
                "sets both key and key_env",
                "keep only one: key = \"sk-...\" or key_env = \"VAR_NAME\"",
            );
            return None;
        }
        (None, None) => {
            fail.push(
                problems,
                "has neither key nor key_env",
                "add key = \"sk-...\" or key_env = \"VAR_NAME\"",
            );
            return None;
        }
        (Some(key), None) => key,
        (None, Some(var)) => match std::env::var(&var) {
            Ok(value) if !value.trim().is_empty() => Secret::new(value),
            Ok(_) => {
                fail.push(
                    problems,
                    format!("key_env names {var}, which is empty"),
                    format!("put the API key in {var}, or use key"),
                );
                return None;
            }
            Err(std::env::VarError::NotPresent) => {
                fail.push(
                    problems,
                    format!("key_env names {var}, which is not set"),
                    format!("export {var}=<API key> before starting kcp, or use key"),
                );
                return None;
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                fail.push(
                    problems,
                    format!("key_env names {var}, which is not valid UTF-8"),
                    format!("put the API key in {var} as plain text"),
                );
                return None;
            }
        },
    };
    if secret.is_empty() {
        fail.push(
            problems,
            "key is empty",
            "set the API key or remove the entry",
        );
        return None;
    }
    Some(secret)
}

/// `weight`, `rpm` and `tpm` must not be 0 (omit them instead) and a name must not be blank.
fn entry_limits(entry: &KeyEntry, fail: &Failure<'_>, problems: &mut Vec<Problem>) {
    if entry.weight == Some(0) {
        fail.push(
            problems,
            "weight is 0",
            "set weight to 1 or more, or remove it",
        );
    }
    for (field, value) in [("rpm", entry.rpm), ("tpm", entry.tpm)] {
        if value == Some(0) {
            fail.push(
                problems,
                format!("{field} is 0"),
                format!("set {field} to the provider's limit, or remove it"),
            );
        }
    }
    if entry
        .name
        .as_deref()
        .is_some_and(|name| name.trim().is_empty())
    {
        fail.push(problems, "name is empty", "set a name or remove it");
    }
}

/// The entry's url, checked, or the default `base_url` (checked once, as `[upstream]`).
fn entry_url(
    url: Option<String>,
    base_url: &str,
    fail: &Failure<'_>,
    problems: &mut Vec<Problem>,
) -> String {
    match url {
        Some(url) => {
            if let Err(reason) = http_url(&url) {
                fail.push(
                    problems,
                    format!("url {reason}"),
                    "use an http(s) URL with a host, e.g. https://api.openai.com/v1",
                );
            }
            root_url(&url)
        }
        None => root_url(base_url),
    }
}

/// The entry's models, or `["others"]`; an empty list or an empty name is an error.
fn entry_models(
    models: Option<Vec<String>>,
    fail: &Failure<'_>,
    problems: &mut Vec<Problem>,
) -> Vec<String> {
    let Some(models) = models else {
        return vec![ANY_MODEL.to_owned()];
    };
    if models.is_empty() {
        fail.push(
            problems,
            "models is empty, so the key would never be used",
            "list model names, add \"others\", or remove models to serve every model",
        );
    }
    if models.iter().any(|model| model.trim().is_empty()) {
        fail.push(
            problems,
            "models contains an empty name",
            "remove the empty name",
        );
    }
    models
}

/// The key's url as its provider root: kcp-core's one rule, so what the pool counts as one
/// key and where the proxy sends a request always agree.
fn root_url(url: &str) -> String {
    kcp_core::normalize_url(url).into_owned()
}

/// Reports problems of one key entry, prefixed with where it was written.
struct Failure<'a> {
    source: &'a str,
    place: &'a str,
}

impl<'a> Failure<'a> {
    fn new(source: &'a str, place: &'a str) -> Self {
        Self { source, place }
    }

    fn push(
        &self,
        problems: &mut Vec<Problem>,
        message: impl fmt::Display,
        fix: impl Into<String>,
    ) {
        problems.push(Problem::new(
            Some(self.source.to_owned()),
            format!("{} {message}", self.place),
            fix,
        ));
    }

    /// Deserializes one table, reporting every field error; `None` if there was any.
    fn deserialize<T: DeserializeOwned>(
        &self,
        value: &Value,
        problems: &mut Vec<Problem>,
    ) -> Option<T> {
        let Value::Dict(_, table) = value else {
            let place = if self.place.is_empty() {
                "the file"
            } else {
                self.place
            };
            problems.push(Problem::new(
                Some(self.source.to_owned()),
                format!("{place} must be a table (an object in JSON)"),
                "write it as key = value pairs",
            ));
            return None;
        };
        let (entry, errors) = deserialize_all(table);
        for error in &errors {
            let (message, fix) = reword(&error.kind, self.place, &error.path);
            problems.push(Problem::new(Some(self.source.to_owned()), message, fix));
        }
        entry.filter(|_| errors.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_line_counts_and_pluralizes() {
        let sources = KeySources {
            toml: 2,
            json: 1,
            env: 0,
            duplicates: 1,
        };
        assert_eq!(
            sources.to_string(),
            "3 keys: 2 from config.toml, 1 from config.json, 0 from OPENAI_KEYS (1 duplicate removed)"
        );
        let one = KeySources {
            env: 1,
            ..KeySources::default()
        };
        assert_eq!(
            one.to_string(),
            "1 key: 0 from config.toml, 0 from config.json, 1 from OPENAI_KEYS"
        );
    }

    #[test]
    fn secret_lists_skip_empty_entries() {
        let secrets = split_secrets(",k1,, k2 ,");
        let exposed: Vec<&str> = secrets.iter().map(Secret::expose).collect();
        assert_eq!(exposed, ["k1", "k2"]);
    }

    #[test]
    fn a_key_is_labelled_by_name_or_fingerprint() {
        let secret = Secret::new("sk-label-test");
        let mut key = plain_key(secret.clone(), "https://x".into(), vec![]);
        assert_eq!(key.id().as_str(), secret.fingerprint());
        key.name = Some("team-a".into());
        assert_eq!(key.id().as_str(), "team-a");
    }
}
