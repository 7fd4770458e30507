//! The proxy path: from a client's `/v1/*` request to the upstream answer it gets.
//!
//! One module per concept: [`model`] reads the model from the body, [`stateful`] tells which
//! endpoints stick to a home key, [`headers`] and [`target_url`] shape the upstream request,
//! [`attempts`] runs the attempt loop by error class (with [`classify`], [`backoff`] and
//! [`wait`]), [`body`] streams the answer back, [`report`] sums up what happened, and
//! [`probe`] re-checks disabled keys in the background.

pub mod attempts;
pub mod backoff;
pub mod body;
pub mod classify;
pub mod headers;
pub mod model;
pub mod probe;
pub mod report;
pub mod stateful;
pub mod target_url;
pub mod wait;

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
    let mut headers = parts.headers;
    headers::rewrite_request(&mut headers);
    let request = attempts::Outgoing {
        method: &parts.method,
        path_and_query: parts.uri.path_and_query().map_or("/", PathAndQuery::as_str),
        headers: &headers,
        body: &body,
        model: model.as_ref().filter(|_| routed).map(ModelName::as_str),
        tokens,
        stateful,
    };
    let report = Report {
        model: model.clone(),
        ..Report::default()
    };
    let unfinished = parts.extensions.get::<Unfinished>().cloned();
    attempts::forward(app, &config.config, &request, report, unfinished).await
}
