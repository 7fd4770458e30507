//! Where a request goes: the key's root joined with the client's path and query.
//!
//! A key url is the provider's OpenAI-compatible root, whatever it ends in: `/v1` (OpenAI,
//! Groq, Mistral, DeepSeek, vLLM, Ollama), `/openai/v1` (Azure), `/api/v1` (OpenRouter),
//! `/v1beta/openai` (Gemini); a bare host means its `/v1` (`kcp_core::normalize_url`, the rule
//! by which two key urls are one key). The client's path always starts with `/v1`: that prefix
//! is replaced by the root, so `/v1/X` lands on `<root>/X`, never on `/v1/v1/X`. The rest of
//! the client's path and its query are appended byte for byte.
//!
//! An Azure key with an `api_version` speaks Azure's classic form instead: a request with a
//! model goes to `<endpoint>/openai/deployments/<deployment>/<rest>?api-version=<v>` (the
//! deployment mapped from the model by the key), one without to `<endpoint>/openai/<rest>?
//! api-version=<v>`. The endpoint is the key url without `/v1` and `/openai`, so
//! `https://RES.openai.azure.com`, `.../openai` and `.../openai/v1` all name the resource.

use http::Uri;
use http::uri::InvalidUri;
use kcp_core::{KeyKind, KeySpec, normalize_url};

/// The client's API prefix, replaced by the key's root.
const CLIENT_PREFIX: &str = "/v1";

/// Azure's version parameter: the key's, never the client's.
const API_VERSION: &str = "api-version=";

/// The upstream URI for a client request target `path_and_query` (`/v1/...?...`) asking for
/// `model` on `spec`'s key. One allocation: the joined string becomes the URI without a copy.
pub fn join(spec: &KeySpec, path_and_query: &str, model: Option<&str>) -> Result<Uri, InvalidUri> {
    let root = normalize_url(&spec.url);
    let rest = path_and_query
        .strip_prefix(CLIENT_PREFIX)
        .filter(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
        .unwrap_or(path_and_query);
    match (&spec.kind, &spec.api_version) {
        (KeyKind::Azure, Some(version)) => Uri::try_from(azure_classic(
            &root,
            rest,
            version,
            model.map(|m| spec.deployment(m)),
        )),
        _ => {
            let mut target = String::with_capacity(root.len() + rest.len());
            target.push_str(&root);
            target.push_str(rest);
            Uri::try_from(target)
        }
    }
}

/// Azure's classic deployments form of `rest` (the client's path after `/v1`, with query).
fn azure_classic(root: &str, rest: &str, version: &str, deployment: Option<&str>) -> String {
    let endpoint = root.strip_suffix("/v1").unwrap_or(root);
    let endpoint = endpoint.strip_suffix("/openai").unwrap_or(endpoint);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut target = String::with_capacity(endpoint.len() + rest.len() + 64);
    target.push_str(endpoint);
    target.push_str("/openai");
    if let Some(deployment) = deployment {
        target.push_str("/deployments/");
        target.push_str(deployment);
    }
    target.push_str(path);
    target.push('?');
    for pair in query
        .split('&')
        .filter(|pair| !pair.is_empty() && !pair.starts_with(API_VERSION))
    {
        target.push_str(pair);
        target.push('&');
    }
    target.push_str(API_VERSION);
    target.push_str(version);
    target
}

#[cfg(test)]
mod tests {
    use super::*;
    use kcp_core::Secret;

    fn key(url: &str) -> KeySpec {
        KeySpec::new(Secret::new("k"), url)
    }

    fn upstream(url: &str, target: &str) -> String {
        join(&key(url), target, None).expect("valid").to_string()
    }

    #[test]
    fn azure_v1_is_a_root_like_any_other() {
        let spec = key("https://res.openai.azure.com/openai/v1/").azure();
        assert_eq!(
            join(&spec, "/v1/chat/completions", Some("gpt-4o"))
                .expect("valid")
                .to_string(),
            "https://res.openai.azure.com/openai/v1/chat/completions"
        );
    }

    #[test]
    fn azure_classic_maps_the_model_to_its_deployment_and_adds_the_version() {
        for url in [
            "https://res.openai.azure.com",
            "https://res.openai.azure.com/openai/",
            "https://res.openai.azure.com/openai/v1",
        ] {
            let spec = key(url)
                .azure()
                .with_deployments("2024-10-21", [("gpt-4o", "prod-4o")]);
            let at = |target: &str, model: Option<&str>| {
                join(&spec, target, model).expect("valid").to_string()
            };
            assert_eq!(
                at("/v1/chat/completions", Some("gpt-4o")),
                "https://res.openai.azure.com/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
                "{url}"
            );
            assert_eq!(
                at(
                    "/v1/embeddings?x=1&api-version=old",
                    Some("text-embedding-3-small")
                ),
                "https://res.openai.azure.com/openai/deployments/text-embedding-3-small/embeddings?x=1&api-version=2024-10-21",
                "an unmapped model is its own deployment; the key's version wins"
            );
            assert_eq!(
                at("/v1/models", None),
                "https://res.openai.azure.com/openai/models?api-version=2024-10-21"
            );
        }
    }

    #[test]
    fn never_doubles_v1() {
        let target = "/v1/chat/completions";
        for url in [
            "https://api.openai.com",
            "https://api.openai.com/",
            "https://api.openai.com/v1",
            "https://api.openai.com/v1/",
        ] {
            assert_eq!(
                upstream(url, target),
                "https://api.openai.com/v1/chat/completions",
                "{url}"
            );
        }
    }

    /// Each provider's documented OpenAI-compatible root, and where the client's
    /// `/v1/chat/completions` lands on it.
    #[test]
    fn providers_documented_roots() {
        let cases = [
            (
                "https://api.openai.com/v1",
                "https://api.openai.com/v1/chat/completions",
            ),
            (
                "https://my-resource.openai.azure.com/openai/v1/",
                "https://my-resource.openai.azure.com/openai/v1/chat/completions",
            ),
            (
                "https://generativelanguage.googleapis.com/v1beta/openai/",
                "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions",
            ),
            (
                "https://api.groq.com/openai/v1",
                "https://api.groq.com/openai/v1/chat/completions",
            ),
            (
                "https://openrouter.ai/api/v1",
                "https://openrouter.ai/api/v1/chat/completions",
            ),
            (
                "https://api.mistral.ai/v1",
                "https://api.mistral.ai/v1/chat/completions",
            ),
            (
                "https://api.deepseek.com",
                "https://api.deepseek.com/v1/chat/completions",
            ),
            (
                "https://api.deepseek.com/v1",
                "https://api.deepseek.com/v1/chat/completions",
            ),
            (
                "http://127.0.0.1:8000/v1",
                "http://127.0.0.1:8000/v1/chat/completions",
            ),
            (
                "http://127.0.0.1:11434/v1/",
                "http://127.0.0.1:11434/v1/chat/completions",
            ),
            (
                "http://127.0.0.1:9/prefix/v1",
                "http://127.0.0.1:9/prefix/v1/chat/completions",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(upstream(url, "/v1/chat/completions"), expected, "{url}");
        }
    }

    #[test]
    fn the_bare_prefix_and_a_query_map_onto_the_root() {
        let gemini = "https://generativelanguage.googleapis.com/v1beta/openai";
        assert_eq!(upstream(gemini, "/v1"), gemini);
        assert_eq!(
            upstream(gemini, "/v1?x=1"),
            format!("{gemini}?x=1"),
            "the query follows the root"
        );
        assert_eq!(
            upstream("http://h/prefix", "/v1/models"),
            "http://h/prefix/models",
            "a root with a path is taken as written"
        );
    }

    #[test]
    fn query_passes_byte_for_byte() {
        let target = "/v1/files/file-1?limit=2&after=a%2Fb&x=&y=%20+z";
        let uri = join(&key("https://h/v1"), target, None).expect("valid");
        assert_eq!(uri.path_and_query().map(|pq| pq.as_str()), Some(target));
        let uri = join(&key("https://h/v1beta/openai"), target, None).expect("valid");
        assert_eq!(
            uri.path_and_query().map(|pq| pq.as_str()),
            Some("/v1beta/openai/files/file-1?limit=2&after=a%2Fb&x=&y=%20+z")
        );
    }

    #[test]
    fn a_v1_inside_a_word_is_kept() {
        assert_eq!(
            upstream("https://h/apiv1", "/v1/models"),
            "https://h/apiv1/models"
        );
        assert_eq!(
            upstream("https://h", "/v1models"),
            "https://h/v1/v1models",
            "only a whole `/v1` segment is the client's prefix"
        );
    }
}
