//! `--check-config` output: the effective configuration with every secret redacted.
//!
//! Secrets serialize as `[redacted]` through [`Secret`](kcp_core::Secret) itself; keys are
//! listed by name and fingerprint so an operator can tell which of their keys were loaded
//! without the output ever holding one.

use serde::Serialize;

use super::load::LoadedConfig;
use super::sections::Config;
use std::collections::BTreeMap;

use kcp_core::{KeyKind, KeySpec};

#[derive(Serialize)]
struct Effective<'a> {
    config: &'a Config,
    api_keys: Vec<KeyView<'a>>,
    client_keys: usize,
    key_sources: String,
}

#[derive(Serialize)]
struct KeyView<'a> {
    name: Option<&'a str>,
    fingerprint: String,
    url: &'a str,
    models: &'a [String],
    weight: u32,
    rpm: Option<u32>,
    tpm: Option<u32>,
    organization: Option<&'a str>,
    project: Option<&'a str>,
    kind: KeyKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_version: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    deployments: &'a BTreeMap<String, String>,
}

impl<'a> From<&'a KeySpec> for KeyView<'a> {
    fn from(key: &'a KeySpec) -> Self {
        Self {
            name: key.name.as_deref(),
            fingerprint: key.secret.fingerprint(),
            url: &key.url,
            models: &key.models,
            weight: key.weight,
            rpm: key.rpm,
            tpm: key.tpm,
            organization: key.organization.as_deref(),
            project: key.project.as_deref(),
            kind: key.kind,
            api_version: key.api_version.as_deref(),
            deployments: &key.deployments,
        }
    }
}

/// The effective configuration as pretty JSON: all settings, each key by name, fingerprint,
/// url and models, and the number of client tokens. Contains no secret.
pub fn render_effective(loaded: &LoadedConfig) -> String {
    let effective = Effective {
        config: &loaded.config,
        api_keys: loaded.keys.iter().map(KeyView::from).collect(),
        client_keys: loaded.client_keys.len(),
        key_sources: loaded.sources.to_string(),
    };
    serde_json::to_string_pretty(&effective)
        .unwrap_or_else(|error| format!("effective configuration cannot be rendered: {error}"))
}
