//! The proxy path: from a client's `/v1/*` request to the upstream answer it gets; the steps
//! run in order in [`crate::pipeline`].
//!
//! One module per concept: [`model`] reads the model from the body, [`stateful`] tells which
//! endpoints stick to a home key, [`headers`] and [`target_url`] shape the upstream request,
//! [`attempts`] performs what kcp-core's attempt policy decides (reading each answer with
//! [`reply`]), [`body`] streams the answer back (merging frames that arrive together,
//! [`coalesce`]), [`report`] sums up what happened, [`probe`] re-checks disabled keys in the
//! background, and [`realtime`] relays WebSocket sessions.

pub mod attempts;
pub mod body;
pub mod coalesce;
pub mod headers;
pub mod model;
pub mod probe;
pub mod realtime;
pub mod reply;
pub mod report;
pub mod stateful;
pub mod target_url;

pub use body::ProxyBody;
pub use model::ModelName;
pub use report::Report;

/// The endpoint of a path, what a key's refusal is about when the request names no model:
/// `/v1/` and the next two segments (`/v1/audio/speech`, `/v1/models`), without ids beyond.
pub fn endpoint(path: &str) -> &str {
    let mut end = path.len();
    let mut slashes = 0;
    for (i, b) in path.bytes().enumerate() {
        if b == b'/' {
            slashes += 1;
            if slashes == 4 {
                end = i;
                break;
            }
        }
    }
    &path[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn endpoints_keep_two_segments_after_v1() {
        assert_eq!(super::endpoint("/v1/audio/speech"), "/v1/audio/speech");
        assert_eq!(super::endpoint("/v1/models"), "/v1/models");
        assert_eq!(super::endpoint("/v1/models/gpt-4o/x"), "/v1/models/gpt-4o");
        assert_eq!(super::endpoint("/"), "/");
    }
}
