//! The proxy path: from a client's `/v1/*` request to the upstream answer it gets.
//!
//! One module per concept: [`model`] reads the model from the body, [`stateful`] tells which
//! endpoints stick to a home key, [`headers`] and [`target_url`] shape the upstream request,
//! [`attempts`] performs what kcp-core's attempt policy decides (reading each answer with
//! [`reply`]), [`body`] streams the answer back, [`report`] sums up what happened, and
//! [`probe`] re-checks disabled keys in the background.

pub mod attempts;
pub mod body;
pub mod headers;
pub mod model;
pub mod probe;
pub mod reply;
pub mod report;
pub mod stateful;
pub mod target_url;

use std::borrow::Cow;

use bytes::Bytes;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Response, header};
use kcp_core::estimate_tokens;

pub use body::ProxyBody;
pub use model::ModelName;
pub use report::Report;

use crate::app::App;
use crate::observe::Unfinished;

/// Forwards one `/v1/*` request whose body was read into `body`.
pub async fn forward(app: &App, parts: Parts, body: Bytes) -> (Response<ProxyBody>, Report) {
    let config = app.config();
    let stateful = stateful::is_stateful(&parts.method, parts.uri.path());
    let head = model::inspect(parts.headers.get(header::CONTENT_TYPE), &body);
    // Stateful endpoints go to the same home key whatever model they name.
    let routed = !stateful;
    let tokens = if head.json && routed {
        estimate_tokens(
            body.len(),
            head.max_completion,
            config.config.rate_limit.default_completion_tokens,
        )
    } else {
        0
    };
    let model = head.model.map(|name| match name {
        Cow::Borrowed(name) => ModelName::within(&body, name),
        Cow::Owned(name) => ModelName::from(name),
    });
    let idempotency_key = parts.headers.contains_key("idempotency-key");
    let mut headers = parts.headers;
    headers::rewrite_request(&mut headers);
    let request = attempts::Outgoing {
        method: &parts.method,
        path_and_query: parts.uri.path_and_query().map_or("/", PathAndQuery::as_str),
        headers: &headers,
        body: &body,
        model: model.as_ref().filter(|_| routed).map(ModelName::as_str),
        scope: model
            .as_ref()
            .filter(|_| routed)
            .map(ModelName::as_str)
            .or_else(|| Some(endpoint(parts.uri.path()))),
        tokens,
        stateful,
        idempotency_key,
    };
    let report = Report {
        model: model.clone(),
        ..Report::default()
    };
    let unfinished = parts.extensions.get::<Unfinished>().cloned();
    attempts::forward(app, &config.config, &request, report, unfinished).await
}

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
