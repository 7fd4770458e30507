//! Endpoints whose objects live in one key's account.
//!
//! Files, uploads, batches, assistants, threads, vector stores, fine-tuning jobs, stored
//! responses and the like are visible only to the account whose key created them: a file
//! uploaded through key A is "not found" through key B. Such requests go to one stable home
//! key (`KeyPool::select_home`, the first usable key in config order) and fail over only
//! when it is disabled, so what is created through kcp can be read back through kcp.
//!
//! Creating requests that name a model (`POST /v1/responses`, chat completions with
//! `store: true`) are still spread over keys: only the endpoints that address stored objects
//! are pinned, so `GET /v1/responses/{id}` finds a response only if it was created on the
//! home key.

/// Path prefixes (below `/v1`) of endpoints whose objects belong to one account.
const STATEFUL: [&str; 11] = [
    "/v1/files",
    "/v1/uploads",
    "/v1/batches",
    "/v1/assistants",
    "/v1/threads",
    "/v1/vector_stores",
    "/v1/fine_tuning",
    "/v1/fine-tunes",
    "/v1/containers",
    "/v1/conversations",
    "/v1/evals",
];

/// Sub-paths of `/v1/responses/` that compute rather than address a stored response.
const STATELESS_RESPONSES: [&str; 1] = ["input_tokens"];

/// Whether requests to `path` must go to the home key.
pub fn is_stateful(path: &str) -> bool {
    if let Some(rest) = path.strip_prefix("/v1/responses/") {
        let id = rest.split('/').next().unwrap_or("");
        return !id.is_empty() && !STATELESS_RESPONSES.contains(&id);
    }
    STATEFUL.iter().any(|prefix| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_endpoints_are_stateful() {
        for path in [
            "/v1/files",
            "/v1/files/file-abc/content",
            "/v1/uploads/upload_1/parts",
            "/v1/batches",
            "/v1/assistants/asst_1",
            "/v1/threads/thread_1/runs",
            "/v1/vector_stores",
            "/v1/fine_tuning/jobs",
            "/v1/responses/resp_123",
            "/v1/responses/resp_123/input_items",
        ] {
            assert!(is_stateful(path), "{path}");
        }
    }

    #[test]
    fn model_endpoints_are_not() {
        for path in [
            "/v1/chat/completions",
            "/v1/responses",
            "/v1/responses/",
            "/v1/responses/input_tokens",
            "/v1/embeddings",
            "/v1/models",
            "/v1/filesystem",
            "/v1/audio/transcriptions",
        ] {
            assert!(!is_stateful(path), "{path}");
        }
    }
}
