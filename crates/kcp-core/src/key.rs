//! What a key is: its secret, where it goes, what it serves.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::secret::Secret;

/// One API key as configured.
///
/// Two specs with the same secret and url are the same key ([`KeySpec::same_key`]); the pool
/// uses that identity to remove duplicates and to keep a key's state across reloads.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct KeySpec {
    /// The API key.
    pub secret: Secret,
    /// A configured name; the id falls back to the secret's fingerprint.
    pub name: Option<String>,
    /// The provider's OpenAI-compatible root (`https://api.openai.com/v1`,
    /// `https://generativelanguage.googleapis.com/v1beta/openai`, ...); a bare host means `/v1`.
    pub url: String,
    /// Model patterns: exact names, globs (`gpt-4o*`), or the fallback markers `others` / `*`.
    pub models: Vec<String>,
    /// Relative share of traffic among otherwise equal keys (at least 1).
    pub weight: u32,
    /// Known requests-per-minute limit: a starting point until the provider's headers arrive.
    pub rpm: Option<u32>,
    /// Known tokens-per-minute limit: a starting point until the provider's headers arrive.
    pub tpm: Option<u32>,
    /// `OpenAI-Organization` to send with this key.
    pub organization: Option<String>,
    /// `OpenAI-Project` to send with this key.
    pub project: Option<String>,
    /// Which provider dialect the key speaks: how it authenticates and where requests go.
    pub kind: KeyKind,
    /// Azure's classic form: the deployment serving each model (a model not listed is
    /// assumed deployed under its own name).
    pub deployments: BTreeMap<String, String>,
    /// Azure's classic form: the `api-version` query every request carries. Set, it selects
    /// the classic deployments form; unset, an Azure key uses the v1 API under its url.
    pub api_version: Option<String>,
}

/// The provider dialect of a key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum KeyKind {
    /// OpenAI and every OpenAI-compatible API: `Authorization: Bearer <key>`.
    #[default]
    OpenAi,
    /// Azure OpenAI: `api-key: <key>`, never `Authorization`.
    Azure,
}

impl KeySpec {
    /// A key serving every model (`others`) with weight 1.
    pub fn new(secret: Secret, url: impl Into<String>) -> Self {
        Self {
            secret,
            name: None,
            url: url.into(),
            models: vec!["others".to_owned()],
            weight: 1,
            rpm: None,
            tpm: None,
            organization: None,
            project: None,
            kind: KeyKind::OpenAi,
            deployments: BTreeMap::new(),
            api_version: None,
        }
    }

    /// Makes the key an Azure OpenAI key.
    pub fn azure(mut self) -> Self {
        self.kind = KeyKind::Azure;
        self
    }

    /// Azure's classic deployments form: the `api-version` and the deployment per model.
    pub fn with_deployments<M: Into<String>, D: Into<String>>(
        mut self,
        api_version: impl Into<String>,
        deployments: impl IntoIterator<Item = (M, D)>,
    ) -> Self {
        self.api_version = Some(api_version.into());
        self.deployments = deployments
            .into_iter()
            .map(|(model, deployment)| (model.into(), deployment.into()))
            .collect();
        self
    }

    /// The deployment serving `model` on an Azure classic key: the mapped one, else the
    /// model's own name.
    pub fn deployment<'a>(&'a self, model: &'a str) -> &'a str {
        self.deployments.get(model).map_or(model, String::as_str)
    }

    /// Sets the model patterns.
    pub fn with_models<S: Into<String>>(mut self, models: impl IntoIterator<Item = S>) -> Self {
        self.models = models.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets a known requests-per-minute limit.
    pub fn with_rpm(mut self, rpm: u32) -> Self {
        self.rpm = Some(rpm);
        self
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Whether `other` names the same key: same secret and same url.
    pub fn same_key(&self, other: &KeySpec) -> bool {
        self.identity() == other.identity()
    }

    /// What makes a key itself, for hashing: the secret and the normalized url. Internal:
    /// it holds the secret.
    pub(crate) fn identity(&self) -> (&str, Cow<'_, str>) {
        (self.secret.expose(), normalize_url(&self.url))
    }

    /// The stable, non-secret id: the name, else the secret's fingerprint.
    pub fn id(&self) -> KeyId {
        KeyId(match &self.name {
            Some(name) => name.as_str().into(),
            None => self.secret.fingerprint().into(),
        })
    }
}

/// A key url as the provider's OpenAI-compatible root: the url without surrounding
/// whitespace and trailing slashes, and a bare host (`https://api.openai.com`) means its `/v1`.
///
/// The client's `/v1` prefix is replaced by this root, whatever the root ends in (`/v1`,
/// `/openai/v1`, `/api/v1`, `/v1beta/openai`), so `https://h`, `https://h/v1` and
/// `https://h/v1/` are one upstream and one key, and a Gemini root never gets a `/v1` glued on.
pub fn normalize_url(url: &str) -> Cow<'_, str> {
    let url = url.trim().trim_end_matches('/');
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    if authority.contains('/') {
        Cow::Borrowed(url)
    } else {
        Cow::Owned(format!("{url}/v1"))
    }
}

/// A key's public identity: its name or fingerprint. Safe to log, label and show.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(Arc<str>);

#[cfg(feature = "serde")]
impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl KeyId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_secret_and_url() {
        let a = KeySpec::new(Secret::new("sk-a"), "https://api.openai.com/v1");
        let b = KeySpec::new(Secret::new("sk-a"), "https://api.openai.com/v1/").with_name("x");
        let c = KeySpec::new(Secret::new("sk-a"), "https://other.example/v1");
        let d = KeySpec::new(Secret::new("sk-a"), "https://api.openai.com");
        assert!(a.same_key(&b));
        assert!(a.same_key(&d));
        assert!(!a.same_key(&c));
    }

    #[test]
    fn a_root_is_kept_and_a_bare_host_means_v1() {
        let cases = [
            ("https://api.openai.com", "https://api.openai.com/v1"),
            ("https://api.openai.com/", "https://api.openai.com/v1"),
            (" https://api.openai.com/v1/ ", "https://api.openai.com/v1"),
            (
                "https://res.openai.azure.com/openai/v1/",
                "https://res.openai.azure.com/openai/v1",
            ),
            (
                "https://generativelanguage.googleapis.com/v1beta/openai/",
                "https://generativelanguage.googleapis.com/v1beta/openai",
            ),
            (
                "https://openrouter.ai/api/v1",
                "https://openrouter.ai/api/v1",
            ),
            ("http://127.0.0.1:11434", "http://127.0.0.1:11434/v1"),
            ("http://h/prefix", "http://h/prefix"),
        ];
        for (url, root) in cases {
            assert_eq!(normalize_url(url), root, "{url}");
        }
    }

    #[test]
    fn a_model_maps_to_its_deployment_or_its_own_name() {
        let key = KeySpec::new(Secret::new("k"), "https://res.openai.azure.com")
            .azure()
            .with_deployments("2024-10-21", [("gpt-4o", "prod-4o")]);
        assert_eq!(key.kind, KeyKind::Azure);
        assert_eq!(key.deployment("gpt-4o"), "prod-4o");
        assert_eq!(key.deployment("gpt-4o-mini"), "gpt-4o-mini");
        assert_eq!(key.api_version.as_deref(), Some("2024-10-21"));
    }

    #[test]
    fn id_is_name_or_fingerprint_never_secret() {
        let a = KeySpec::new(Secret::new("sk-secret-value"), "https://h");
        assert!(a.id().as_str().starts_with("key-"));
        assert!(!format!("{:?}", a).contains("sk-secret-value"));
        assert_eq!(a.with_name("team-a").id().as_str(), "team-a");
    }

    #[test]
    fn an_id_shows_itself_in_debug_and_display() {
        let id = KeySpec::new(Secret::new("sk-x"), "https://h")
            .with_name("team-a")
            .id();
        assert_eq!(format!("{id:?}"), "KeyId(team-a)");
        assert_eq!(id.to_string(), "team-a");
    }
}
