//! Other providers' OpenAI-compatible paths, played by the same mock.
//!
//! A key url may be any provider's root (`/openai/v1` for Azure's v1 API, `/v1beta/openai` for
//! Gemini), or an Azure key may use the classic `/openai/deployments/{deployment}/...` form.
//! The mock answers each as the OpenAI path it stands for, while [`crate::Call`] keeps the
//! path exactly as received, so tests assert where the proxy sent a request.

/// Roots that stand for OpenAI's `/v1`, longest first.
const ROOTS: [&str; 3] = ["/openai/v1", "/v1beta/openai", "/openai"];

/// The OpenAI path `path` stands for: `/openai/v1/X`, `/v1beta/openai/X`,
/// `/openai/deployments/D/X` and `/openai/X` all mean `/v1/X`; anything else is itself.
pub fn openai_path(path: &str) -> String {
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        let rest = rest.find('/').map_or("", |slash| &rest[slash..]);
        return format!("/v1{rest}");
    }
    ROOTS
        .iter()
        .find_map(|root| {
            path.strip_prefix(root)
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        .map_or_else(|| path.to_owned(), |rest| format!("/v1{rest}"))
}

/// The Azure deployment a classic-form path names.
pub fn deployment(path: &str) -> Option<&str> {
    path.strip_prefix("/openai/deployments/")?.split('/').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_paths_stand_for_openai_ones() {
        for (path, openai) in [
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/openai/v1/chat/completions", "/v1/chat/completions"),
            ("/v1beta/openai/chat/completions", "/v1/chat/completions"),
            (
                "/openai/deployments/prod-4o/chat/completions",
                "/v1/chat/completions",
            ),
            ("/openai/models", "/v1/models"),
            ("/openaix/models", "/openaix/models"),
        ] {
            assert_eq!(openai_path(path), openai, "{path}");
        }
        assert_eq!(
            deployment("/openai/deployments/prod-4o/chat/completions"),
            Some("prod-4o")
        );
        assert_eq!(deployment("/openai/v1/chat/completions"), None);
    }
}
