//! One `/v1` request, top to bottom, in the order the README tells it: authenticate, read the
//! body, extract the model, run the attempts, stream back.
//!
//! Everything a request needs travels in one [`RequestCtx`], made when it arrives: the
//! [`Generation`] in force then (configuration, key pool and policies, so a reload midway
//! cannot mix old and new), its request id, its model once read, and the slot its [`Report`]
//! ends up in. The slot is shared with the request's [`Exchange`](crate::observe::Exchange),
//! so its access line and metrics name the model, key and attempts whether the request was
//! answered or abandoned by its client midway.

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, header};
use http_body::Body;
use kcp_core::estimate_tokens;

use crate::app::{App, Generation};
use crate::edge::body_limit::{self, BodyLimits};
use crate::edge::overload::InflightLimit;
use crate::edge::path::Target;
use crate::edge::request_id::RequestId;
use crate::observe::Unfinished;
use crate::proxy::attempts::{self, Outgoing};
use crate::proxy::model::{self, ModelName, RequestHead};
use crate::proxy::{ProxyBody, Report, endpoint, headers, stateful};

/// What one client request carries from its arrival to its last byte.
#[derive(Debug)]
pub struct RequestCtx {
    /// The configuration, pool and policies in force when it arrived.
    pub generation: Arc<Generation>,
    /// Its id (`x-kcp-request-id`, log lines).
    pub id: RequestId,
    /// The model its body names, once read.
    pub model: Option<ModelName>,
    /// Where the attempt loop's [`Report`] ends up, answered or abandoned.
    pub report: Unfinished,
}

impl RequestCtx {
    /// The context of a request with `headers` arriving now.
    pub fn arrive(app: &App, headers: &http::HeaderMap) -> RequestCtx {
        RequestCtx {
            generation: app.generation(),
            id: RequestId::from_headers(headers),
            model: None,
            report: Unfinished::default(),
        }
    }
}

/// Answers a `/v1` request to `target` (its normalized path).
pub async fn run<B>(
    app: &App,
    mut ctx: RequestCtx,
    target: &Target,
    request: Request<B>,
) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let (parts, body) = request.into_parts();
    let generation = Arc::clone(&ctx.generation);
    let config = &generation.config.config;

    // Authenticate, then take an in-flight slot: a client without a token holds none.
    if let Err(error) = generation.policies.auth.check(&parts.headers) {
        return error.into_response();
    }
    let Some(admitted) = app.inflight.try_enter() else {
        return InflightLimit::refusal().into_response();
    };

    // Read the body, bounded in size and time.
    let declared = match body_limit::content_length(&parts.headers) {
        Ok(declared) => declared,
        Err(error) => return error.into_response(),
    };
    let limits = BodyLimits::of(&config.server);
    let body = match body_limit::read_body(body, declared, &limits).await {
        Ok(body) => body,
        Err(error) => return error.into_openai().into_response(),
    };

    // Extract the model (a short copy: the body is dropped once the attempts are done).
    let stateful = stateful::is_stateful(&parts.method, target.path());
    let head = model::inspect(parts.headers.get(header::CONTENT_TYPE), &body);
    ctx.model = match head.model.as_deref().map(ModelName::new).transpose() {
        Ok(model) => model,
        Err(error) => return error.into_openai().into_response(),
    };

    // Run the attempts.
    let (response, report) = attempt(app, &ctx, target, parts, &body, &head, stateful).await;
    report.trace();
    ctx.report.keep(report);

    // Stream back: the slot is held until the response body ends.
    response.map(|body| body.holding(admitted))
}

/// Sends the request with as many keys as its error classes allow.
async fn attempt(
    app: &App,
    ctx: &RequestCtx,
    target: &Target,
    parts: Parts,
    body: &Bytes,
    head: &RequestHead<'_>,
    stateful: bool,
) -> (Response<ProxyBody>, Report) {
    let config = &ctx.generation.config.config;
    // Stateful endpoints go to the same home key whatever model they name.
    let routed = !stateful;
    let tokens = if head.json && routed {
        estimate_tokens(
            body.len(),
            head.max_completion,
            config.rate_limit.default_completion_tokens,
        )
    } else {
        0
    };
    let idempotency_key = parts.headers.contains_key("idempotency-key");
    let mut upstream_headers = parts.headers;
    headers::rewrite_request(&mut upstream_headers);
    let model = ctx.model.as_ref().filter(|_| routed).map(ModelName::as_str);
    let request = Outgoing {
        method: &parts.method,
        path_and_query: target.path_and_query(),
        headers: &upstream_headers,
        body,
        model,
        scope: model.or_else(|| Some(endpoint(target.path()))),
        tokens,
        stateful,
        idempotency_key,
    };
    let report = Report {
        model: ctx.model.clone(),
        ..Report::default()
    };
    let pool = Arc::clone(&ctx.generation.pool);
    attempts::forward(
        app,
        pool,
        config,
        &request,
        report,
        Some(ctx.report.clone()),
    )
    .await
}
