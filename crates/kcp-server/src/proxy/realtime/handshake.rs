//! Opening the upstream WebSocket: kcp-core's [`Attempt`] picks the key for the session's
//! model, exactly as for an HTTP request, and this module performs each try.
//!
//! A try is one upstream WebSocket handshake (HTTP/1.1, `wss://` over the upstream client's
//! rustls trust roots, or `ws://` for a loopback provider) with the key's credentials. An
//! upstream that answers the handshake with a status instead of 101 is read as an
//! [`Answer`]: a 401 disables the key, a 429 rests it, and so on, and the attempt says whether
//! the next key is tried. The error body is what came with the answer's head (providers send
//! their small JSON errors in one piece). A key that opens the session keeps its lease for
//! the whole session, so it counts as in flight until the session ends.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use kcp_core::{
    Action, Answer, Attempt, ClientRequest, ErrorBody, GiveUp, KeyId, KeyKind, KeyPool, KeySpec,
    Lease, RateLimitHeaders, Replay, Reply, UpstreamFailure,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::app::App;
use crate::clock;
use crate::config::Config;
use crate::edge::openai_error::OpenAiError;
use crate::proxy::attempts::{log_changes, outcome_of, retry_policy};
use crate::proxy::reply::mask_keys;
use crate::proxy::{ProxyBody, Report, headers, target_url};

/// The upstream side of an open session.
pub type UpstreamSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The client's headers passed on to the upstream handshake (the rest is the handshake's own
/// or the key's).
const PASSED: [&str; 1] = ["openai-beta"];

/// The handshake's result.
#[derive(Debug)]
pub enum Opened {
    /// A key opened the session.
    Session(Upstream),
    /// No key opened it: the client's answer.
    Refused(Response<ProxyBody>),
}

/// The upstream side of a session a key opened; the key stays leased until the session ends.
#[derive(Debug)]
pub struct Upstream {
    /// The upstream socket.
    pub socket: Box<UpstreamSocket>,
    /// The key's lease.
    pub lease: Lease,
    /// Time to the upstream's 101.
    pub ttfb: Duration,
    /// The rate-limit headers of the upstream's 101.
    pub limits: RateLimitHeaders,
}

/// What the client asked for.
pub struct Wanted<'a> {
    /// `/v1/realtime?...` as the client sent it.
    pub path_and_query: &'a str,
    /// The `model` query parameter.
    pub model: &'a str,
    /// The client's request headers.
    pub headers: &'a HeaderMap,
}

/// Without the client's headers: they carry its token.
impl std::fmt::Debug for Wanted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wanted")
            .field("path_and_query", &self.path_and_query)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// Opens the upstream session with as many keys as the error classes allow.
pub async fn open(
    app: &App,
    pool: &Arc<KeyPool>,
    config: &Config,
    wanted: &Wanted<'_>,
    report: &mut Report,
) -> Opened {
    let mut attempt = Attempt::new(
        ClientRequest {
            model: Some(wanted.model),
            scope: Some(wanted.model),
            tokens: 0,
            replay: Replay::of("GET", false),
            home: false,
        },
        retry_policy(config),
    );
    let mut kept: Option<Refusal> = None;
    let mut tries = Tries {
        app,
        pool,
        config,
        wanted,
        retry: None,
    };
    let opened = loop {
        let now = clock::now();
        let next = clock::with_rng(|rng| attempt.next(pool, &app.queue, now, rng));
        match next {
            kcp_core::Next::Send(lease) => match tries.try_key(&mut attempt, lease, report).await {
                Tried::Opened(opened) => break opened,
                Tried::Answer(answer, Action::Deliver) => break Opened::Refused(answer.pass()),
                Tried::Answer(answer, Action::Keep) => kept = Some(answer),
                Tried::Answer(_, Action::Forget) => kept = None,
                Tried::Failed(refusal) => kept = Some(refusal),
                Tried::Unbuildable => {
                    break Opened::Refused(proxy_answer(
                        report,
                        OpenAiError::upstream_unavailable(
                            "the API key's configuration cannot form a request",
                        ),
                    ));
                }
            },
            kcp_core::Next::Sleep(delay) => tokio::time::sleep(delay).await,
            kcp_core::Next::Wait(wait) => {
                tokio::time::sleep_until(clock::to_instant(wait.until).into()).await;
                drop(wait.slot);
            }
            kcp_core::Next::GiveUp(why) => {
                break Opened::Refused(give_up(report, why, kept.take(), wanted.model));
            }
        }
    };
    let stats = attempt.stats();
    report.retries = stats.retries;
    report.key_failovers = stats.key_failovers;
    report.waited = stats.waited;
    report.backoff = stats.backoff;
    app.metrics.queue_wait(stats.waited);
    opened
}

/// One key's try.
enum Tried {
    Opened(Opened),
    /// The upstream answered with a status; the attempt's verdict on it.
    Answer(Refusal, Action),
    /// No answer (connect, TLS, protocol, timeout).
    Failed(Refusal),
    /// The key's configuration cannot form a request.
    Unbuildable,
}

/// An answer the client may get instead of a session.
#[derive(Debug)]
enum Refusal {
    /// The upstream's own answer to the handshake, its body already without keys
    /// ([`without_key`]).
    Upstream {
        status: StatusCode,
        body: Bytes,
        content_type: Option<HeaderValue>,
        key: KeyId,
    },
    /// kcp's answer for a failed exchange.
    Proxy(OpenAiError),
}

impl Refusal {
    fn pass(self) -> Response<ProxyBody> {
        match self {
            Refusal::Upstream {
                status,
                body,
                content_type,
                ..
            } => {
                let mut response = Response::new(ProxyBody::from(body));
                *response.status_mut() = status;
                if let Some(content_type) = content_type {
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, content_type);
                }
                response
            }
            Refusal::Proxy(error) => error.into_response(),
        }
    }
}

/// What every try of one session needs.
struct Tries<'a> {
    app: &'a App,
    pool: &'a KeyPool,
    config: &'a Config,
    wanted: &'a Wanted<'a>,
    /// Why the next try is a retry, if it is one (`kcp_retries_total`'s reason).
    retry: Option<&'static str>,
}

impl Tries<'_> {
    /// One upstream handshake with `lease`'s key, its answer recorded in `attempt`.
    async fn try_key(
        &mut self,
        attempt: &mut Attempt<'_>,
        lease: Lease,
        report: &mut Report,
    ) -> Tried {
        let Tries {
            app,
            config,
            wanted,
            ..
        } = *self;
        let key = lease.id().clone();
        let Some(request) = upstream_request(&lease, wanted) else {
            tracing::error!(
                key = key.as_str(),
                "cannot build the upstream realtime request"
            );
            return Tried::Unbuildable;
        };
        let connector = match tls(config) {
            Ok(connector) => connector,
            Err(error) => {
                tracing::error!(%error, "cannot set up TLS for the realtime upstream");
                return Tried::Unbuildable;
            }
        };
        if let Some(reason) = self.retry.take() {
            app.metrics.retry(reason);
        }
        report.attempts += 1;
        let started = clock::now();
        let connect =
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector));
        let connected = tokio::time::timeout(config.upstream.request_timeout(), connect).await;
        let now = clock::now();
        let ttfb = now.saturating_since(started);
        report.upstream_time += ttfb;
        let (answer, refusal) = match connected {
            Ok(Ok((socket, response))) => {
                app.metrics.upstream_attempt(
                    key.as_str(),
                    crate::observe::metrics::UpstreamOutcome::Success,
                    Some(ttfb),
                );
                report.key = Some(key);
                report.upstream_ttfb = Some(ttfb);
                report.status = StatusCode::SWITCHING_PROTOCOLS;
                return Tried::Opened(Opened::Session(Upstream {
                    socket: Box::new(socket),
                    lease,
                    ttfb,
                    limits: limits_of(response.headers()),
                }));
            }
            Ok(Err(WsError::Http(response))) => {
                let (parts, body) = response.into_parts();
                let body = Bytes::from(body.unwrap_or_default());
                let fields = ErrorFields::parse(&body);
                let body = without_key(&body, lease.spec().secret.expose());
                let limits = limits_of(&parts.headers);
                let organization = parts
                    .headers
                    .get("openai-organization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let reply = Reply {
                    status: parts.status.as_u16(),
                    limits,
                    error: fields.as_body(),
                    organization: organization.as_deref(),
                    latency: ttfb,
                };
                let verdict = attempt.on_answer(lease, &Answer::Reply(reply), now);
                self.retry = self.note(&key, &verdict, Some(ttfb), now);
                let refusal = Refusal::Upstream {
                    status: parts.status,
                    body,
                    content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
                    key,
                };
                return Tried::Answer(refusal, verdict.action);
            }
            Ok(Err(error)) => {
                tracing::warn!(key = key.as_str(), %error, "realtime upstream handshake failed");
                let failure = match error {
                    WsError::Io(_) | WsError::Tls(_) | WsError::Url(_) => UpstreamFailure::Connect,
                    _ => UpstreamFailure::Protocol,
                };
                let refusal = OpenAiError::upstream_unavailable(
                    "the WebSocket handshake with the provider failed",
                );
                (
                    Answer::Failed {
                        failure,
                        reached: false,
                    },
                    refusal,
                )
            }
            Err(_elapsed) => {
                tracing::warn!(key = key.as_str(), "realtime upstream handshake timed out");
                let answer = Answer::Failed {
                    failure: UpstreamFailure::Timeout,
                    reached: false,
                };
                (answer, OpenAiError::upstream_timeout())
            }
        };
        let verdict = attempt.on_answer(lease, &answer, now);
        self.retry = self.note(&key, &verdict, None, now);
        Tried::Failed(Refusal::Proxy(refusal))
    }

    /// One try's result in metrics, logs and the cluster; the reason the next try is a retry, if it is one.
    fn note(
        &self,
        key: &KeyId,
        verdict: &kcp_core::Verdict,
        ttfb: Option<Duration>,
        now: kcp_core::Time,
    ) -> Option<&'static str> {
        let outcome = outcome_of(verdict.class);
        self.app
            .metrics
            .upstream_attempt(key.as_str(), outcome, ttfb);
        log_changes(key, &verdict.changes, now);
        if let Some(cluster) = &self.app.cluster {
            cluster.share(self.pool, key, &verdict.changes, Some(self.wanted.model));
        }
        outcome.retry_reason()
    }
}

/// A refusal's body as a client may see it: without `sk-` keys ([`mask_keys`]) and without
/// the key it refused, whatever its form (an Azure key has no prefix), masked once read
/// so that neither the client nor a `Debug` of the refusal gets it.
fn without_key(body: &Bytes, secret: &str) -> Bytes {
    let masked = mask_keys(body);
    let secret = secret.as_bytes();
    if secret.is_empty() || !masked.windows(secret.len()).any(|w| w == secret) {
        return masked;
    }
    let mut out = Vec::with_capacity(masked.len());
    let mut rest = &masked[..];
    while !rest.is_empty() {
        if rest.starts_with(secret) {
            out.extend_from_slice(b"***");
            rest = &rest[secret.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    Bytes::from(out)
}

/// The rate-limit headers of a handshake's answer.
fn limits_of(headers: &HeaderMap) -> RateLimitHeaders {
    RateLimitHeaders::parse(
        headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
        clock::unix_now(),
    )
}

/// The client's answer when no key opened the session.
fn give_up(
    report: &mut Report,
    why: GiveUp,
    kept: Option<Refusal>,
    model: &str,
) -> Response<ProxyBody> {
    let error = match why {
        GiveUp::LastAnswer => match kept {
            Some(Refusal::Upstream {
                status,
                body,
                content_type,
                key,
            }) => {
                report.key = Some(key.clone());
                report.status = status;
                return Refusal::Upstream {
                    status,
                    body,
                    content_type,
                    key,
                }
                .pass();
            }
            Some(Refusal::Proxy(error)) => error,
            None => OpenAiError::no_available_keys(),
        },
        GiveUp::NoRoute => OpenAiError::model_not_found(model),
        GiveUp::Busy { retry_after } => OpenAiError::all_keys_busy(retry_after),
        GiveUp::NoKeys => OpenAiError::no_available_keys(),
        GiveUp::Unreachable { retry_after } => OpenAiError::provider_unreachable(retry_after),
        GiveUp::Refused => OpenAiError::refused_by_every_key(model),
        GiveUp::TooLarge => OpenAiError::too_large_for_every_key(),
    };
    proxy_answer(report, error)
}

/// kcp's own answer, noted in the report.
pub fn proxy_answer(report: &mut Report, error: OpenAiError) -> Response<ProxyBody> {
    report.proxy_error = Some(error.code);
    report.status = error.status;
    error.into_response()
}

/// The upstream handshake request with `lease`'s key; `None` if the key's url cannot form one.
fn upstream_request(lease: &Lease, wanted: &Wanted<'_>) -> Option<http::Request<()>> {
    let spec = lease.spec();
    let url = upstream_url(spec, wanted.path_and_query, wanted.model)?;
    let mut request = url.into_client_request().ok()?;
    let sent = request.headers_mut();
    for name in PASSED {
        if let Some(value) = wanted.headers.get(name) {
            sent.insert(name, value.clone());
        }
    }
    headers::add_key(sent, spec).ok()?;
    Some(request)
}

/// The upstream WebSocket url of a session on `spec`'s key: the key's root joined with the
/// client's `/v1/realtime?...` like any request, in `wss://` (`ws://` for an `http://` key).
/// Azure's classic form names the deployment in the query instead of the path:
/// `<resource>/openai/realtime?deployment=<deployment>&api-version=<v>`.
fn upstream_url(spec: &KeySpec, path_and_query: &str, model: &str) -> Option<String> {
    let uri = match (&spec.kind, &spec.api_version) {
        (KeyKind::Azure, Some(_)) => {
            let target = format!("{}?deployment={}", super::PATH, spec.deployment(model));
            target_url::join(spec, &target, None)
        }
        _ => target_url::join(spec, path_and_query, Some(model)),
    }
    .ok()?;
    let scheme = match uri.scheme_str() {
        Some("https") => "wss",
        Some("http") => "ws",
        _ => return None,
    };
    Some(format!(
        "{scheme}://{}{}",
        uri.authority()?,
        uri.path_and_query().map_or("/", |p| p.as_str())
    ))
}

/// The rustls client setup of `upstream.ca_file`, built once per distinct file (reading the
/// system's roots is too slow for every session).
fn tls(config: &Config) -> Result<Connector, kcp_upstream::BuildError> {
    static BUILT: Mutex<Option<(Option<PathBuf>, Arc<rustls::ClientConfig>)>> = Mutex::new(None);
    let ca_file = config.upstream.ca_file.clone();
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((file, tls)) = built.as_ref() {
        if *file == ca_file {
            return Ok(Connector::Rustls(Arc::clone(tls)));
        }
    }
    let tls = Arc::new(kcp_upstream::tls_client_config(ca_file.as_deref())?);
    *built = Some((ca_file, Arc::clone(&tls)));
    Ok(Connector::Rustls(tls))
}

/// The `error` object of an OpenAI-style error body.
#[derive(Debug, Default)]
struct ErrorFields {
    code: Option<String>,
    kind: Option<String>,
    message: Option<String>,
}

impl ErrorFields {
    fn parse(body: &[u8]) -> ErrorFields {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
            return ErrorFields::default();
        };
        let field = |name: &str| {
            value
                .get("error")
                .and_then(|error| error.get(name))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        ErrorFields {
            code: field("code"),
            kind: field("type"),
            message: field("message"),
        }
    }

    fn as_body(&self) -> ErrorBody<'_> {
        ErrorBody {
            code: self.code.as_deref(),
            kind: self.kind.as_deref(),
            message: self.message.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use kcp_core::Secret;

    use super::*;

    #[test]
    fn the_session_url_is_the_key_root_in_websocket_scheme() {
        let query = "/v1/realtime?model=gpt-4o-realtime-preview";
        let model = "gpt-4o-realtime-preview";
        let cases = [
            (
                KeySpec::new(Secret::new("k"), "https://api.openai.com/v1"),
                "wss://api.openai.com/v1/realtime?model=gpt-4o-realtime-preview",
            ),
            (
                KeySpec::new(Secret::new("k"), "http://127.0.0.1:8000/v1"),
                "ws://127.0.0.1:8000/v1/realtime?model=gpt-4o-realtime-preview",
            ),
            (
                KeySpec::new(Secret::new("k"), "https://res.openai.azure.com/openai/v1").azure(),
                "wss://res.openai.azure.com/openai/v1/realtime?model=gpt-4o-realtime-preview",
            ),
            (
                KeySpec::new(Secret::new("k"), "https://res.openai.azure.com")
                    .azure()
                    .with_deployments("2024-10-01-preview", [(model, "rt-prod")]),
                "wss://res.openai.azure.com/openai/realtime?deployment=rt-prod&api-version=2024-10-01-preview",
            ),
        ];
        for (spec, url) in cases {
            assert_eq!(upstream_url(&spec, query, model).as_deref(), Some(url));
        }
    }

    #[test]
    fn a_refusal_body_loses_the_refused_key_whatever_its_form() {
        let body = Bytes::from_static(
            br#"{"error":{"message":"Incorrect API key provided: 3f9a0c77e1. Also sk-proj-ab_12."}}"#,
        );
        assert_eq!(
            without_key(&body, "3f9a0c77e1"),
            Bytes::from_static(
                br#"{"error":{"message":"Incorrect API key provided: ***. Also sk-***."}}"#
            )
        );
        assert_eq!(without_key(&body, ""), mask_keys(&body));
        let twice = Bytes::from_static(b"k1k1-k1");
        assert_eq!(without_key(&twice, "k1"), Bytes::from_static(b"******-***"));
    }

    #[test]
    fn a_wanted_session_shows_no_client_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client-token-77"),
        );
        let wanted = Wanted {
            path_and_query: "/v1/realtime?model=m",
            model: "m",
            headers: &headers,
        };
        let shown = format!("{wanted:?}");
        assert!(!shown.contains("client-token-77"), "{shown}");
        assert!(shown.contains("/v1/realtime?model=m"), "{shown}");
    }

    #[test]
    fn error_fields_are_read_from_an_openai_body() {
        let body = br#"{"error":{"message":"Incorrect API key","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        let fields = ErrorFields::parse(body);
        let read = fields.as_body();
        assert_eq!(read.code, Some("invalid_api_key"));
        assert_eq!(read.kind, Some("invalid_request_error"));
        assert_eq!(read.message, Some("Incorrect API key"));
        assert_eq!(
            ErrorFields::parse(b"not json").as_body(),
            ErrorBody::default()
        );
    }
}
