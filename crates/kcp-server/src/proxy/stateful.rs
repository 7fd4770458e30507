//! Endpoints whose objects live in one key's account.
//!
//! Files, uploads, batches, assistants, threads, vector stores, fine-tuning jobs, videos,
//! stored responses and chat completions and the like are visible only to the account whose
//! key created them: a file uploaded through key A is "not found" through key B. Such
//! requests go to one stable home key (`KeyPool::select_home`, the first usable key in config
//! order) and fail over only when it is disabled, so what is created through kcp can be read
//! back through kcp.
//!
//! The decision is by method and path. Creating requests that name a model (`POST
//! /v1/responses`, `POST /v1/chat/completions`, even with `store: true`) are still spread
//! over keys: only the requests that address stored objects are pinned (one object and what
//! is below it, or the list of them), so `GET /v1/responses/{id}` finds a response only if
//! it was created on the home key. Videos are pinned from their creation on: a video job is
//! always fetched afterwards, and only from the account that started it.

use http::Method;

/// Path prefixes of endpoints whose objects all belong to one account, whatever the method.
const STATEFUL: [&str; 13] = [
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
    "/v1/videos",
    "/v1/chatkit",
];

/// Collections where `POST` to the collection creates with a model (spread over keys) while
/// its stored objects, below it, and their list (any other method on the collection) are
/// one account's; with the sub-paths that compute rather than address an object.
const CREATED_WITH_A_MODEL: [(&str, &[&str]); 2] = [
    ("/v1/chat/completions", &[]),
    ("/v1/responses", &["input_tokens", "compact"]),
];

/// Whether a `method` request to `path` must go to the home key.
pub fn is_stateful(method: &Method, path: &str) -> bool {
    for (collection, computed) in CREATED_WITH_A_MODEL {
        let Some(rest) = path.strip_prefix(collection) else {
            continue;
        };
        if rest.is_empty() {
            return method != Method::POST;
        }
        if let Some(below) = rest.strip_prefix('/') {
            let id = below.split('/').next().unwrap_or("");
            return !id.is_empty() && !computed.contains(&id);
        }
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
        for (method, path) in [
            (Method::GET, "/v1/files"),
            (Method::POST, "/v1/files"),
            (Method::GET, "/v1/files/file-abc/content"),
            (Method::POST, "/v1/uploads/upload_1/parts"),
            (Method::GET, "/v1/batches"),
            (Method::GET, "/v1/assistants/asst_1"),
            (Method::POST, "/v1/threads/thread_1/runs"),
            (Method::GET, "/v1/vector_stores"),
            (Method::GET, "/v1/fine_tuning/jobs"),
            (Method::GET, "/v1/responses/resp_123"),
            (Method::DELETE, "/v1/responses/resp_123"),
            (Method::POST, "/v1/responses/resp_123/cancel"),
            (Method::GET, "/v1/responses/resp_123/input_items"),
            (Method::GET, "/v1/chat/completions"),
            (Method::GET, "/v1/chat/completions/chatcmpl-1"),
            (Method::POST, "/v1/chat/completions/chatcmpl-1"),
            (Method::DELETE, "/v1/chat/completions/chatcmpl-1"),
            (Method::GET, "/v1/chat/completions/chatcmpl-1/messages"),
            (Method::POST, "/v1/videos"),
            (Method::GET, "/v1/videos"),
            (Method::GET, "/v1/videos/video_1"),
            (Method::GET, "/v1/videos/video_1/content"),
            (Method::POST, "/v1/videos/video_1/remix"),
            (Method::GET, "/v1/chatkit/threads"),
        ] {
            assert!(is_stateful(&method, path), "{method} {path}");
        }
    }

    #[test]
    fn model_endpoints_are_not() {
        for (method, path) in [
            (Method::POST, "/v1/chat/completions"),
            (Method::POST, "/v1/chat/completions/"),
            (Method::POST, "/v1/chat/completionsx"),
            (Method::POST, "/v1/responses"),
            (Method::POST, "/v1/responses/"),
            (Method::POST, "/v1/responses/input_tokens"),
            (Method::POST, "/v1/responses/compact"),
            (Method::POST, "/v1/embeddings"),
            (Method::POST, "/v1/completions"),
            (Method::GET, "/v1/models"),
            (Method::GET, "/v1/filesystem"),
            (Method::POST, "/v1/audio/transcriptions"),
            (Method::POST, "/v1/images/generations"),
        ] {
            assert!(!is_stateful(&method, path), "{method} {path}");
        }
    }
}
