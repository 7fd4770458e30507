//! The Realtime API over WebSocket: `GET /v1/realtime?model=...` with `Upgrade: websocket`.
//!
//! The client's request meets the same edge as any `/v1` request: client auth, then a
//! `max_inflight` slot, held for the whole session. The `model` query parameter routes it:
//! kcp-core's attempt picks a key that serves the model and kcp opens the upstream WebSocket
//! with that key ([`handshake`]); a key refused during the handshake (401, 403, 429, ...) is
//! classified as for HTTP and the next key is tried. Only once the upstream has switched
//! protocols does kcp complete the client's upgrade (101); otherwise the client gets the
//! provider's refusal or kcp's own error, in OpenAI's error shape, and no upgrade. Then
//! frames flow both ways until either side closes ([`relay`]); the drain closes open sessions
//! with close frames to both sides and a bounded wait ([`sessions`]).
//!
//! The client never sees the key: the 101 carries only the handshake's own headers, and
//! frames are copied as they are. The session's access line is written when it ends, with
//! the bytes sent to the client; the key's lease is recorded then too.

pub mod handshake;
pub mod relay;
pub mod sessions;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::Instrument;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use kcp_core::{Answer, Reply};

use self::handshake::{Opened, Upstream, Wanted};
use self::relay::{Ending, Relay, Relayed};
use self::sessions::Session;
pub use self::sessions::Sessions;
use crate::app::App;
use crate::clock;
use crate::edge::openai_error::OpenAiError;
use crate::edge::overload::{InflightGuard, InflightLimit};
use crate::edge::path::Target;
use crate::observe::SessionEnd;
use crate::pipeline::RequestCtx;
use crate::proxy::attempts::log_changes;
use crate::proxy::{ModelName, ProxyBody, Report};

/// The realtime endpoint.
pub const PATH: &str = "/v1/realtime";

/// How long a side gets to finish closing once the other side or the drain closed, at most
/// (never longer than `server.graceful_shutdown_seconds`).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Whether `request` asks to open a realtime session: a `GET` on [`PATH`] with
/// `Upgrade: websocket`. Any other request to the path is proxied as plain HTTP.
pub fn is_upgrade<B>(request: &Request<B>, target: &Target) -> bool {
    request.method() == Method::GET
        && target.path() == PATH
        && request
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Answers a realtime upgrade request: 101 with the session running, or an error.
pub async fn run<B>(
    app: &Arc<App>,
    mut ctx: RequestCtx,
    target: &Target,
    mut request: Request<B>,
) -> Response<ProxyBody> {
    let generation = Arc::clone(&ctx.generation);
    if let Err(error) = generation.policies.auth.check(request.headers()) {
        return error.into_response();
    }
    let Some(admitted) = app.inflight.try_enter() else {
        return InflightLimit::refusal().into_response();
    };
    let accept = match accept_key(request.headers()) {
        Ok(accept) => accept,
        Err(error) => return error.into_response(),
    };
    let model = match model_of(target) {
        Ok(model) => model,
        Err(error) => return error.into_response(),
    };
    ctx.model = Some(model.clone());
    let mut report = Report {
        model: Some(model.clone()),
        ..Report::default()
    };
    let wanted = Wanted {
        path_and_query: target.path_and_query(),
        model: model.as_str(),
        headers: request.headers(),
    };
    let config = &generation.config.config;
    let opened = handshake::open(app, &generation.pool, config, &wanted, &mut report).await;
    let upstream = match opened {
        Opened::Refused(response) => {
            report.status = response.status();
            report.trace();
            ctx.report.keep(report);
            return response.map(|body| body.holding(admitted));
        }
        Opened::Session(upstream) => upstream,
    };
    report.trace();
    ctx.report.keep(report);
    let relay = Relay {
        close_wait: CLOSE_WAIT.min(config.server.graceful_shutdown()),
    };
    let client = hyper::upgrade::on(&mut request);
    let (ended, end) = watch::channel(None);
    let held = Held {
        _admitted: admitted,
        _session: app.realtime.open(),
    };
    let session = session(Arc::clone(app), client, upstream, relay, ended, held);
    tokio::spawn(session.in_current_span());
    let mut response = switching_protocols(accept);
    response.extensions_mut().insert(SessionEnd(end));
    response
}

/// What a session holds until it ends: its `max_inflight` slot and its place among the open
/// sessions the drain waits for.
struct Held {
    _admitted: InflightGuard,
    _session: Session,
}

/// Runs one session once the client's upgrade completes: relays frames until it ends, then
/// records the key's lease and sends what was relayed to the access line.
async fn session(
    app: Arc<App>,
    client: OnUpgrade,
    upstream: Upstream,
    relay: Relay,
    ended: watch::Sender<Option<Relayed>>,
    _held: Held,
) {
    let Upstream {
        mut socket,
        lease,
        ttfb,
        limits,
    } = upstream;
    let client = match client.await {
        Ok(upgraded) => TokioIo::new(upgraded),
        Err(error) => {
            tracing::debug!(%error, "the client's upgrade did not complete");
            let _ = tokio::time::timeout(relay.close_wait, socket.close(None)).await;
            return;
        }
    };
    let client = WebSocketStream::from_raw_socket(client, Role::Server, None).await;
    let relayed = relay.run(client, *socket, app.drain_begun()).await;
    if relayed.ending == Ending::Cut {
        tracing::debug!("a realtime session was cut after the close wait");
    }
    let answer = Answer::Reply(Reply {
        status: StatusCode::SWITCHING_PROTOCOLS.as_u16(),
        limits,
        latency: ttfb,
        ..Reply::default()
    });
    let key = lease.id().clone();
    let now = clock::now();
    log_changes(&key, &lease.record_answer(&answer, now), now);
    ended.send_replace(Some(relayed));
}

/// The `Sec-WebSocket-Accept` for the client's handshake, or why it is not a valid one.
fn accept_key(headers: &HeaderMap) -> Result<HeaderValue, OpenAiError> {
    let version = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok());
    if version != Some("13") {
        return Err(OpenAiError::bad_request(
            "a realtime session needs a WebSocket handshake with Sec-WebSocket-Version: 13",
        ));
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or_else(|| {
        OpenAiError::bad_request("the WebSocket handshake has no Sec-WebSocket-Key")
    })?;
    HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .map_err(|_| OpenAiError::bad_request("the Sec-WebSocket-Key is not valid"))
}

/// The `model` query parameter, which routes the session.
fn model_of(target: &Target) -> Result<ModelName, OpenAiError> {
    let query = target
        .path_and_query()
        .split_once('?')
        .map_or("", |(_, query)| query);
    let model = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("model="))
        .filter(|model| !model.is_empty())
        .ok_or_else(|| {
            OpenAiError::bad_request("a realtime session needs a `model` query parameter")
        })?;
    ModelName::new(model).map_err(|error| error.into_openai())
}

/// The client's 101: the handshake's own headers and nothing from the upstream.
fn switching_protocols(accept: HeaderValue) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::from(bytes::Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}
