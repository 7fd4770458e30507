//! Where a request goes: the key's root joined with the client's path and query.
//!
//! A key url is the provider's OpenAI-compatible root, whatever it ends in: `/v1` (OpenAI,
//! Groq, Mistral, DeepSeek, vLLM, Ollama), `/openai/v1` (Azure), `/api/v1` (OpenRouter),
//! `/v1beta/openai` (Gemini); a bare host means its `/v1` (`kcp_core::normalize_url`, the rule
//! by which two key urls are one key). The client's path always starts with `/v1`: that prefix
//! is replaced by the root, so `/v1/X` lands on `<root>/X`, never on `/v1/v1/X`. The rest of
//! the client's path and its query are appended byte for byte.

use http::Uri;
use http::uri::InvalidUri;
use kcp_core::normalize_url;

/// The client's API prefix, replaced by the key's root.
const CLIENT_PREFIX: &str = "/v1";

/// The upstream URI for a client request target `path_and_query` (`/v1/...?...`) on a key
/// whose url is `url`. One allocation: the joined string becomes the URI without a copy.
pub fn join(url: &str, path_and_query: &str) -> Result<Uri, InvalidUri> {
    let root = normalize_url(url);
    let rest = path_and_query
        .strip_prefix(CLIENT_PREFIX)
        .filter(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
        .unwrap_or(path_and_query);
    let mut target = String::with_capacity(root.len() + rest.len());
    target.push_str(&root);
    target.push_str(rest);
    Uri::try_from(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str, target: &str) -> String {
        join(url, target).expect("valid").to_string()
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
        let uri = join("https://h/v1", target).expect("valid");
        assert_eq!(uri.path_and_query().map(|pq| pq.as_str()), Some(target));
        let uri = join("https://h/v1beta/openai", target).expect("valid");
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
