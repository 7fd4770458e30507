//! In-process mock of the OpenAI API for end-to-end tests.
//!
//! The proxy under test is pointed at [`MockUpstream::url`]. Each API key (the bearer token the
//! proxy sends) gets a [`Behaviour`]: the default one, a per-key one set with
//! [`MockUpstream::set`], or the next step of a per-key [`MockUpstream::script`]. Every request is
//! recorded as a [`Call`], so a test can assert which key served what, with which headers, and how
//! often. Responses whose body is dropped before it was fully sent count as
//! [`MockUpstream::cancelled`]; this is how tests see that a client disconnect reached upstream.
//!
//! The server speaks HTTP/1.1 and h2 (prior knowledge in plain text, ALPN over TLS). The TLS
//! variant (cargo feature `tls`) uses a fresh CA per instance, written as PEM to
//! [`MockUpstream::ca_file`].
//!
//! A key can also be given OpenAI's rate limiting ([`MockUpstream::limit`], see [`rate_limit`]):
//! a refilling bucket checked before the key's behaviour. [`MockUpstream::set_latency`] makes
//! every answer but a rate-limit 429 take a fixed time, as a real model does; load benchmarks
//! subtract it to see what the proxy adds.
//!
//! It is a crate of its own, not a test module, so that `kcp-server demo` plays the very same
//! upstream the tests do.

pub mod providers;
pub mod rate_limit;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::io;
#[cfg(feature = "tls")]
use std::net::IpAddr;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
#[cfg(feature = "tls")]
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
#[cfg(feature = "tls")]
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Sleep;
#[cfg(feature = "tls")]
use tokio_rustls::TlsAcceptor;

pub use rate_limit::RateLimit;
use rate_limit::{Bucket, Exhausted, Verdict};

/// Without the `tls` feature no acceptor can exist.
#[cfg(not(feature = "tls"))]
#[derive(Clone, Debug)]
enum TlsAcceptor {}

/// Model named in responses when the request body names none.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";
/// Assistant text of a non-streaming chat completion.
pub const COMPLETION_TEXT: &str = "Hello from the mock upstream.";
/// `created` timestamp used in every response object.
const CREATED: u64 = 1_700_000_000;

/// What the mock does with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// 200 with an OpenAI-shaped JSON body chosen by method and path: chat completion echoing the
    /// request's model, embeddings, model list or object, transcription, file object or deletion,
    /// else `{"ok":true,"path":...}`.
    Ok,
    /// Like [`Behaviour::Ok`], plus OpenAI's `x-ratelimit-*` headers with these values.
    OkWithLimits {
        limit_requests: u64,
        remaining_requests: u64,
        reset_requests: String,
        limit_tokens: u64,
        remaining_tokens: u64,
        reset_tokens: String,
    },
    /// `text/event-stream`: [`sse_events`] sent one frame at a time, `interval` apart.
    Stream { chunks: usize, interval: Duration },
    /// As an OpenAI-compatible server answers an SDK: a chat completion whose body asks for
    /// `"stream": true` gets [`sse_events`] with `chunks` events at once, anything else what
    /// [`Behaviour::Ok`] answers.
    Compatible { chunks: usize },
    /// Sends `chunks` SSE events, then aborts the response: the client sees an error, never a
    /// clean end (HTTP/1.1: connection closed mid-body; h2: `RST_STREAM`).
    StreamThenReset { chunks: usize },
    /// 429 `rate_limit_exceeded`. Each header is sent only when given;
    /// `x-ratelimit-remaining-requests: 0` accompanies `reset_requests`.
    RateLimited {
        retry_after: Option<String>,
        retry_after_ms: Option<String>,
        reset_requests: Option<String>,
    },
    /// 429 `insufficient_quota`: the key's account is out of credit.
    InsufficientQuota,
    /// 401 `invalid_api_key`, quoting the received key masked as OpenAI does.
    Unauthorized,
    /// 403 with an OpenAI-style error body.
    Forbidden,
    /// Any status with a verbatim body and extra headers. `content-type` defaults to
    /// `application/json` unless given in `headers`.
    Status {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// Never answers; the request is held until the client goes away (then counts as cancelled).
    Hang,
    /// Like [`Behaviour::Ok`], except that every `every`-th call of the key (the `every`-th,
    /// the `2 * every`-th, ...) gets `status` with OpenAI's error body for it.
    Flaky { every: u64, status: u16 },
}

impl Behaviour {
    /// `status` with OpenAI's error body for it and no extra headers.
    pub fn status(status: u16) -> Self {
        let (message, kind) = match status {
            400 => ("Invalid request.", "invalid_request_error"),
            404 => ("Not found.", "invalid_request_error"),
            500 => (
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
            ),
            502 => ("Bad gateway.", "server_error"),
            503 => (
                "The engine is currently overloaded, please try again later.",
                "server_error",
            ),
            504 => ("Gateway timeout.", "server_error"),
            _ => ("Mock upstream error.", "server_error"),
        };
        Behaviour::Status {
            status,
            body: error_body(message, kind, Value::Null).to_string(),
            headers: Vec::new(),
        }
    }

    /// The behaviour for the `nth` call (from 1) of a key: [`Behaviour::Flaky`] resolved.
    fn for_call(self, nth: u64) -> Behaviour {
        match self {
            Behaviour::Flaky { every, status } if every > 0 && nth % every == 0 => {
                Behaviour::status(status)
            }
            Behaviour::Flaky { .. } => Behaviour::Ok,
            other => other,
        }
    }

    /// 429 with only `retry-after: <secs>`.
    pub fn rate_limited_secs(secs: u64) -> Self {
        Behaviour::RateLimited {
            retry_after: Some(secs.to_string()),
            retry_after_ms: None,
            reset_requests: None,
        }
    }
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Call {
    /// Bearer token from `Authorization`, else Azure's `api-key`, if any.
    pub key: Option<String>,
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: Version,
}

impl Call {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(path, _)| path)
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// The SSE frames of a streamed chat completion with `chunks` content events: chunk `i` carries
/// the content `"tok{i} "` (the first also `role`, the last `finish_reason: "stop"`), then
/// `data: [DONE]`. Identical for every request, so tests can compare bytes.
pub fn sse_events(model: &str, chunks: usize) -> Vec<Bytes> {
    let mut events: Vec<Bytes> = (0..chunks)
        .map(|i| {
            let mut delta = json!({ "content": format!("tok{i} ") });
            if i == 0 {
                delta["role"] = json!("assistant");
            }
            let finish = if i + 1 == chunks {
                json!("stop")
            } else {
                Value::Null
            };
            let chunk = json!({
                "id": "chatcmpl-mock-stream",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
            });
            Bytes::from(format!("data: {chunk}\n\n"))
        })
        .collect();
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// How OpenAI quotes a wrong key: first 5 characters, `***`, last 3. Keys of 8 characters or
/// fewer are masked entirely, so the mock never echoes a whole key.
pub fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "***".to_owned();
    }
    let head: String = chars[..5].iter().collect();
    let tail: String = chars[chars.len() - 3..].iter().collect();
    format!("{head}***{tail}")
}

/// A running mock; dropping it stops the server and closes its connections.
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    ca: Option<CaFile>,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

#[derive(Debug)]
struct CaFile {
    path: PathBuf,
    pem: String,
}

impl MockUpstream {
    /// Plain HTTP (HTTP/1.1 and h2 prior knowledge) on `127.0.0.1:0`.
    pub async fn start() -> MockUpstream {
        Self::try_start().await.expect("bind 127.0.0.1:0")
    }

    /// [`MockUpstream::start`], reporting a failure to bind instead of panicking.
    pub async fn try_start() -> io::Result<MockUpstream> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Self::launch(listener, None)
    }

    /// HTTPS (ALPN `h2`, `http/1.1`) with a fresh CA; the certificate covers `localhost` and
    /// `127.0.0.1`.
    #[cfg(feature = "tls")]
    pub async fn start_tls() -> MockUpstream {
        let (acceptor, pem) = tls_acceptor();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind 127.0.0.1:0");
        Self::launch(listener, Some((acceptor, pem))).expect("bound listener has an address")
    }

    fn launch(
        listener: TcpListener,
        tls: Option<(TlsAcceptor, String)>,
    ) -> io::Result<MockUpstream> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (acceptor, ca) = match tls {
            Some((acceptor, pem)) => (Some(acceptor), Some(CaFile::write(pem, addr.port()))),
            None => (None, None),
        };
        let server = tokio::spawn(serve(listener, acceptor, Arc::clone(&shared)));
        Ok(MockUpstream {
            addr,
            ca,
            shared,
            server,
        })
    }

    /// `http://127.0.0.1:PORT` or `https://localhost:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        match self.ca {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM file of the CA that signed the TLS variant's certificate; removed on drop.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_ref().map(|ca| ca.path.as_path())
    }

    /// PEM text of the CA, as in [`MockUpstream::ca_file`].
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca.as_ref().map(|ca| ca.pem.as_str())
    }

    /// Default behaviour for `key` once its script (if any) is used up.
    pub fn set(&self, key: &str, behaviour: Behaviour) {
        self.shared
            .state()
            .per_key
            .insert(key.to_owned(), behaviour);
    }

    /// One behaviour per call for `key`, in order, replacing any script left; then the key's
    /// default applies again.
    pub fn script(&self, key: &str, steps: Vec<Behaviour>) {
        self.shared
            .state()
            .scripts
            .insert(key.to_owned(), steps.into());
    }

    /// Meters `key` with OpenAI's rate limiting, buckets full from now: a request that finds
    /// them empty gets 429 `rate_limit_exceeded` (and its behaviour is not consulted), every
    /// other answer carries the `x-ratelimit-*` headers.
    pub fn limit(&self, key: &str, limit: RateLimit) {
        let bucket = Bucket::new(limit, tokio::time::Instant::now());
        self.shared.state().buckets.insert(key.to_owned(), bucket);
    }

    /// Holds every answer except a rate-limit 429 for `latency` before its head is sent
    /// (initially zero). The bucket is charged on arrival, as OpenAI's is; its refusals are
    /// answered at once, as OpenAI's are.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.state().latency = latency;
    }

    /// 429s answered so far because a key's bucket ([`MockUpstream::limit`]) was empty.
    pub fn rate_limited(&self) -> u64 {
        self.shared.rate_limited.load(Ordering::SeqCst)
    }

    /// Whether requests are kept for [`MockUpstream::calls`] (on by default). A long-running
    /// mock (the demo) turns it off so memory stays flat; counts per key are still kept.
    pub fn keep_calls(&self, keep: bool) {
        self.shared.state().keep_calls = keep;
    }

    /// Requests received for `key` so far, kept or not.
    pub fn seen(&self, key: &str) -> u64 {
        self.shared.state().seen.get(key).copied().unwrap_or(0)
    }

    /// Behaviour for keys with nothing set and requests without a key (initially `Ok`).
    pub fn set_default(&self, behaviour: Behaviour) {
        self.shared.state().default = behaviour;
    }

    /// Every request received so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.state().calls.clone()
    }

    pub fn calls_for(&self, key: &str) -> usize {
        self.shared
            .state()
            .calls
            .iter()
            .filter(|call| call.key.as_deref() == Some(key))
            .count()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Responses (or hung requests) dropped before their body was complete.
    pub fn cancelled(&self) -> usize {
        self.shared.cancelled.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` responses were cancelled; false if `within` passed first.
    pub async fn wait_cancelled(&self, n: usize, within: Duration) -> bool {
        self.wait_until(within, || self.cancelled() >= n).await
    }

    /// Waits until at least `n` requests were received; false if `within` passed first.
    pub async fn wait_calls(&self, n: usize, within: Duration) -> bool {
        self.wait_until(within, || self.shared.state().calls.len() >= n)
            .await
    }

    async fn wait_until(&self, within: Duration, done: impl Fn() -> bool) -> bool {
        let wait = async {
            loop {
                let changed = self.shared.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if done() {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.server.abort();
        if let Some(ca) = &self.ca {
            let _ = std::fs::remove_file(&ca.path);
        }
    }
}

impl CaFile {
    fn write(pem: String, port: u16) -> CaFile {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("kcp-mock-ca-{}-{port}-{n}.pem", std::process::id());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, &pem).expect("write the mock CA to the temp dir");
        CaFile { path, pem }
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    connections: AtomicUsize,
    cancelled: AtomicUsize,
    responses: AtomicU64,
    /// Refusals of an empty bucket.
    rate_limited: AtomicU64,
    /// Woken on every new call, connection and cancellation.
    changed: Notify,
}

#[derive(Debug)]
struct State {
    default: Behaviour,
    per_key: HashMap<String, Behaviour>,
    scripts: HashMap<String, VecDeque<Behaviour>>,
    buckets: HashMap<String, Bucket>,
    /// Requests per key, kept or not.
    seen: HashMap<String, u64>,
    keep_calls: bool,
    calls: Vec<Call>,
    /// Time every answer but a bucket's 429 is held.
    latency: Duration,
}

impl Default for State {
    fn default() -> Self {
        State {
            default: Behaviour::Ok,
            per_key: HashMap::new(),
            scripts: HashMap::new(),
            buckets: HashMap::new(),
            seen: HashMap::new(),
            keep_calls: true,
            calls: Vec::new(),
            latency: Duration::ZERO,
        }
    }
}

impl Shared {
    /// A panicking test thread must not hide the calls from the others.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `call` and picks its behaviour: the key's rate limit if it is spent, else
    /// script step, then key default, then default. Also the key's rate-limit verdict and how
    /// long to hold the answer.
    fn record(&self, call: Call, tokens: u64) -> (Behaviour, Option<Verdict>, Duration) {
        let mut state = self.state();
        let state = &mut *state;
        let mut nth = 0;
        let mut verdict = None;
        let mut behaviour = None;
        if let Some(key) = call.key.as_deref() {
            let seen = state.seen.entry(key.to_owned()).or_default();
            *seen += 1;
            nth = *seen;
            verdict = state
                .buckets
                .get_mut(key)
                .map(|bucket| bucket.take(tokens, tokio::time::Instant::now()));
            if !matches!(verdict, Some(Verdict::Exceeded { .. })) {
                let step = state.scripts.get_mut(key).and_then(VecDeque::pop_front);
                behaviour = step.or_else(|| state.per_key.get(key).cloned());
            }
        }
        let behaviour = behaviour
            .unwrap_or_else(|| state.default.clone())
            .for_call(nth);
        let latency = if matches!(verdict, Some(Verdict::Exceeded { .. })) {
            self.rate_limited.fetch_add(1, Ordering::SeqCst);
            Duration::ZERO
        } else {
            state.latency
        };
        if state.keep_calls {
            state.calls.push(call);
        }
        self.changed.notify_waiters();
        (behaviour, verdict, latency)
    }

    fn bump(&self, counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

/// Counts a response as cancelled if dropped before [`Completion::done`] was set.
#[derive(Debug)]
struct Completion {
    shared: Arc<Shared>,
    done: bool,
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.done {
            self.shared.bump(&self.shared.cancelled);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Clean,
    /// Yield once so the frames already written get flushed, then fail.
    Reset {
        flushed: bool,
    },
}

/// Response body: a fixed list of frames, optionally paced, ending cleanly or with an error.
#[derive(Debug)]
struct MockBody {
    frames: VecDeque<Bytes>,
    interval: Duration,
    delay: Option<Pin<Box<Sleep>>>,
    sent_any: bool,
    ending: Ending,
    completion: Completion,
}

impl MockBody {
    fn new(frames: Vec<Bytes>, interval: Duration, ending: Ending, shared: Arc<Shared>) -> Self {
        let frames: VecDeque<Bytes> = frames.into_iter().filter(|f| !f.is_empty()).collect();
        let done = frames.is_empty() && ending == Ending::Clean;
        MockBody {
            frames,
            interval,
            delay: None,
            sent_any: false,
            ending,
            completion: Completion { shared, done },
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.completion.done {
            return Poll::Ready(None);
        }
        if !this.frames.is_empty() {
            if this.sent_any && !this.interval.is_zero() {
                let interval = this.interval;
                let delay = this
                    .delay
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
                ready!(delay.as_mut().poll(cx));
                this.delay = None;
            }
            let frame = this.frames.pop_front().expect("checked non-empty");
            this.sent_any = true;
            if this.frames.is_empty() && this.ending == Ending::Clean {
                this.completion.done = true;
            }
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        match this.ending {
            Ending::Clean => {
                this.completion.done = true;
                Poll::Ready(None)
            }
            Ending::Reset { flushed: false } => {
                this.ending = Ending::Reset { flushed: true };
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Ending::Reset { flushed: true } => {
                this.completion.done = true;
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "mock upstream resets the stream",
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.completion.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.ending == Ending::Clean && self.interval.is_zero() {
            SizeHint::with_exact(self.frames.iter().map(|f| f.len() as u64).sum())
        } else {
            SizeHint::default()
        }
    }
}

async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    // Owned here so aborting the accept task also ends every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                shared.bump(&shared.connections);
                connections.spawn(serve_connection(tcp, tls.clone(), Arc::clone(&shared)));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(tcp: TcpStream, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(respond(shared, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    // Errors here are the client going away or a deliberate reset: nothing to report.
    match tls {
        None => {
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        }
        #[cfg(not(feature = "tls"))]
        Some(never) => match never {},
        #[cfg(feature = "tls")]
        Some(acceptor) => {
            if let Ok(stream) = acceptor.accept(tcp).await {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        }
    }
}

/// What a behaviour needs to know about the request.
struct Received {
    method: Method,
    path: String,
    key: Option<String>,
    json: Option<Value>,
}

impl Received {
    /// What a rate limiter charges the request: its prompt (about four bytes a token) plus
    /// the completion it may ask for (`max_tokens`, else 16).
    fn tokens(&self) -> u64 {
        let Some(body) = &self.json else { return 1 };
        let asked = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|field| body.get(field).and_then(Value::as_u64))
            .unwrap_or(16);
        let prompt = body.to_string().len() as u64 / 4;
        prompt.saturating_add(asked)
    }

    /// Whether the request is a chat completion asking to be streamed.
    fn wants_stream(&self) -> bool {
        self.method == Method::POST
            && self.path == "/v1/chat/completions"
            && self
                .json
                .as_ref()
                .and_then(|body| body.get("stream"))
                .and_then(Value::as_bool)
                .unwrap_or(false)
    }

    fn model(&self) -> &str {
        self.json
            .as_ref()
            .and_then(|body| body.get("model"))
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_MODEL)
    }
}

async fn respond(shared: Arc<Shared>, req: Request<Incoming>) -> Response<MockBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let received = Received {
        method: parts.method.clone(),
        path: providers::openai_path(parts.uri.path()),
        key: bearer(&parts.headers).or_else(|| azure_key(&parts.headers)),
        json: serde_json::from_slice(&body).ok(),
    };
    let call = Call {
        key: received.key.clone(),
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        headers: parts.headers,
        body,
        version: parts.version,
    };
    let (behaviour, verdict, latency) = shared.record(call, received.tokens());
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let n = shared.responses.fetch_add(1, Ordering::SeqCst) + 1;
    let mut response = match (behaviour, verdict) {
        (
            _,
            Some(Verdict::Exceeded {
                retry_after,
                limit,
                headers,
            }),
        ) => rate_limit_exceeded(&received, retry_after, limit, headers, shared),
        (Behaviour::Hang, _) => {
            let _completion = Completion {
                shared,
                done: false,
            };
            return std::future::pending().await;
        }
        (behaviour, Some(Verdict::Granted(headers))) => {
            let mut response = build(&behaviour, &received, n, shared);
            for (name, value) in headers {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        (behaviour, None) => build(&behaviour, &received, n, shared),
    };
    let request_id = HeaderValue::from_str(&format!("req_mock_{n}")).expect("ASCII request id");
    response.headers_mut().insert("x-request-id", request_id);
    response
}

fn build(behaviour: &Behaviour, req: &Received, n: u64, shared: Arc<Shared>) -> Response<MockBody> {
    match behaviour {
        // A flaky key's failing calls were resolved to a status by `Behaviour::for_call`.
        Behaviour::Ok | Behaviour::Flaky { .. } => {
            json_response(StatusCode::OK, &ok_body(req, n), &[], shared)
        }
        Behaviour::OkWithLimits {
            limit_requests,
            remaining_requests,
            reset_requests,
            limit_tokens,
            remaining_tokens,
            reset_tokens,
        } => {
            let headers = [
                ("x-ratelimit-limit-requests", limit_requests.to_string()),
                ("x-ratelimit-limit-tokens", limit_tokens.to_string()),
                (
                    "x-ratelimit-remaining-requests",
                    remaining_requests.to_string(),
                ),
                ("x-ratelimit-remaining-tokens", remaining_tokens.to_string()),
                ("x-ratelimit-reset-requests", reset_requests.clone()),
                ("x-ratelimit-reset-tokens", reset_tokens.clone()),
            ];
            json_response(StatusCode::OK, &ok_body(req, n), &headers, shared)
        }
        Behaviour::Stream { chunks, interval } => {
            let frames = sse_events(req.model(), *chunks);
            sse_response(MockBody::new(frames, *interval, Ending::Clean, shared))
        }
        Behaviour::Compatible { chunks } if req.wants_stream() => {
            let frames = sse_events(req.model(), *chunks);
            sse_response(MockBody::new(frames, Duration::ZERO, Ending::Clean, shared))
        }
        Behaviour::Compatible { .. } => {
            json_response(StatusCode::OK, &ok_body(req, n), &[], shared)
        }
        Behaviour::StreamThenReset { chunks } => {
            let mut frames = sse_events(req.model(), *chunks);
            frames.truncate(*chunks);
            let ending = Ending::Reset { flushed: false };
            sse_response(MockBody::new(frames, Duration::ZERO, ending, shared))
        }
        Behaviour::RateLimited {
            retry_after,
            retry_after_ms,
            reset_requests,
        } => {
            let wait = match (retry_after_ms, retry_after) {
                (Some(ms), _) => format!("{ms}ms"),
                (None, Some(secs)) => format!("{secs}s"),
                (None, None) => "20s".to_owned(),
            };
            let message = format!(
                "Rate limit reached for {} in organization org-mock on requests per min (RPM): \
                 Limit 3, Used 3, Requested 1. Please try again in {wait}. Visit \
                 https://platform.openai.com/account/rate-limits to learn more.",
                req.model()
            );
            let mut headers = Vec::new();
            if let Some(value) = retry_after {
                headers.push(("retry-after", value.clone()));
            }
            if let Some(value) = retry_after_ms {
                headers.push(("retry-after-ms", value.clone()));
            }
            if let Some(value) = reset_requests {
                headers.push(("x-ratelimit-remaining-requests", "0".to_owned()));
                headers.push(("x-ratelimit-reset-requests", value.clone()));
            }
            let body = error_body(&message, "requests", json!("rate_limit_exceeded"));
            json_response(StatusCode::TOO_MANY_REQUESTS, &body, &headers, shared)
        }
        Behaviour::InsufficientQuota => {
            let body = error_body(
                "You exceeded your current quota, please check your plan and billing details. \
                 For more information on this error, read the docs: \
                 https://platform.openai.com/docs/guides/error-codes/api-errors.",
                "insufficient_quota",
                json!("insufficient_quota"),
            );
            json_response(StatusCode::TOO_MANY_REQUESTS, &body, &[], shared)
        }
        Behaviour::Unauthorized => {
            let body = match &req.key {
                Some(key) => error_body(
                    &format!(
                        "Incorrect API key provided: {}. You can find your API key at \
                         https://platform.openai.com/account/api-keys.",
                        mask_key(key)
                    ),
                    "invalid_request_error",
                    json!("invalid_api_key"),
                ),
                None => error_body(
                    "You didn't provide an API key. You need to provide your API key in an \
                     Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). \
                     You can obtain an API key from https://platform.openai.com/account/api-keys.",
                    "invalid_request_error",
                    Value::Null,
                ),
            };
            json_response(StatusCode::UNAUTHORIZED, &body, &[], shared)
        }
        Behaviour::Forbidden => {
            let body = error_body(
                "Country, region, or territory not supported",
                "request_forbidden",
                json!("unsupported_country_region_territory"),
            );
            json_response(StatusCode::FORBIDDEN, &body, &[], shared)
        }
        Behaviour::Status {
            status,
            body,
            headers,
        } => {
            let status = StatusCode::from_u16(*status).expect("Behaviour::Status needs 100..=999");
            let body = MockBody::new(
                vec![Bytes::from(body.clone())],
                Duration::ZERO,
                Ending::Clean,
                shared,
            );
            let mut response = Response::new(body);
            *response.status_mut() = status;
            let extra = response.headers_mut();
            for (name, value) in headers {
                let name = HeaderName::from_bytes(name.as_bytes()).expect("valid header name");
                extra.append(
                    name,
                    HeaderValue::from_str(value).expect("valid header value"),
                );
            }
            if !extra.contains_key(CONTENT_TYPE) {
                extra.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            response
        }
        Behaviour::Hang => unreachable!("handled by respond"),
    }
}

/// 429 `rate_limit_exceeded` from a key's spent bucket, worded and headed as OpenAI does.
fn rate_limit_exceeded(
    req: &Received,
    retry_after: Duration,
    limit: Exhausted,
    mut headers: rate_limit::Headers,
    shared: Arc<Shared>,
) -> Response<MockBody> {
    let (per, kind) = match limit {
        Exhausted::Requests => ("requests per min (RPM)", "requests"),
        Exhausted::Tokens => ("tokens per min (TPM)", "tokens"),
    };
    let message = format!(
        "Rate limit reached for {} in organization org-mock on {per}. Please try again in {}. \
         Visit https://platform.openai.com/account/rate-limits to learn more.",
        req.model(),
        rate_limit::go_duration(retry_after)
    );
    let millis = retry_after.as_millis().max(1);
    headers.push(("retry-after-ms", millis.to_string()));
    headers.push(("retry-after", millis.div_ceil(1_000).to_string()));
    let body = error_body(&message, kind, json!("rate_limit_exceeded"));
    json_response(StatusCode::TOO_MANY_REQUESTS, &body, &headers, shared)
}

/// The 200 body for `req`: chat completion, embeddings, model list or object, transcription,
/// file object / deletion, or `{"ok":true,"path":...}` for anything else.
fn ok_body(req: &Received, n: u64) -> Value {
    let path = req.path.as_str();
    let model = req.model();
    let file_id = path
        .strip_prefix("/v1/files/")
        .and_then(|rest| rest.split('/').next());
    match (&req.method, path) {
        (&Method::POST, "/v1/chat/completions") => json!({
            "id": format!("chatcmpl-mock{n}"),
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": COMPLETION_TEXT, "refusal": null },
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": { "prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15 },
        }),
        (&Method::POST, "/v1/embeddings") => {
            let inputs = req
                .json
                .as_ref()
                .and_then(|body| body.get("input"))
                .and_then(Value::as_array)
                .map_or(1, Vec::len);
            let data: Vec<Value> = (0..inputs)
                .map(|index| {
                    json!({ "object": "embedding", "index": index, "embedding": [0.0023, -0.0093, 0.0157] })
                })
                .collect();
            json!({
                "object": "list",
                "data": data,
                "model": model,
                "usage": { "prompt_tokens": 8, "total_tokens": 8 },
            })
        }
        (&Method::GET, "/v1/models") => {
            let data: Vec<Value> = [
                "gpt-4o-mini",
                "gpt-4o",
                "text-embedding-3-small",
                "whisper-1",
            ]
            .into_iter()
            .map(model_object)
            .collect();
            json!({ "object": "list", "data": data })
        }
        (&Method::GET, _) if path.starts_with("/v1/models/") => {
            model_object(&path["/v1/models/".len()..])
        }
        (&Method::POST, "/v1/audio/transcriptions") => json!({ "text": COMPLETION_TEXT }),
        (&Method::POST, "/v1/files") => file_object(&format!("file-mock{n}")),
        (&Method::GET, _) if file_id.is_some() => file_object(file_id.unwrap_or_default()),
        (&Method::DELETE, _) if file_id.is_some() => json!({
            "id": file_id,
            "object": "file",
            "deleted": true,
        }),
        _ => json!({ "ok": true, "path": path }),
    }
}

fn model_object(id: &str) -> Value {
    json!({ "id": id, "object": "model", "created": CREATED, "owned_by": "openai" })
}

fn file_object(id: &str) -> Value {
    json!({
        "id": id,
        "object": "file",
        "bytes": 120,
        "created_at": CREATED,
        "filename": "mock.jsonl",
        "purpose": "fine-tune",
        "status": "processed",
    })
}

fn error_body(message: &str, kind: &str, code: Value) -> Value {
    json!({ "error": { "message": message, "type": kind, "param": null, "code": code } })
}

fn json_response(
    status: StatusCode,
    body: &Value,
    headers: &[(&'static str, String)],
    shared: Arc<Shared>,
) -> Response<MockBody> {
    let bytes = Bytes::from(body.to_string());
    let mut response = Response::new(MockBody::new(
        vec![bytes],
        Duration::ZERO,
        Ending::Clean,
        shared,
    ));
    *response.status_mut() = status;
    let map = response.headers_mut();
    map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in headers {
        map.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(value).expect("valid header value"),
        );
    }
    response
}

fn sse_response(body: MockBody) -> Response<MockBody> {
    let mut response = Response::new(body);
    let map = response.headers_mut();
    map.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    map.insert("cache-control", HeaderValue::from_static("no-cache"));
    response
}

fn azure_key(headers: &HeaderMap) -> Option<String> {
    Some(headers.get("api-key")?.to_str().ok()?.trim().to_owned())
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// A TLS acceptor for `localhost` / `127.0.0.1` with a certificate signed by a fresh CA, and
/// the CA's PEM: for a test upstream that speaks something else over TLS (the realtime
/// WebSocket upstream).
#[cfg(feature = "tls")]
pub fn tls_server() -> (TlsAcceptor, String) {
    tls_acceptor()
}

/// A fresh CA and a `localhost` / `127.0.0.1` server certificate it signed.
#[cfg(feature = "tls")]
fn tls_acceptor() -> (TlsAcceptor, String) {
    let ca_key = KeyPair::generate().expect("generate CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kcp mock upstream CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");

    let leaf_key = KeyPair::generate().expect("generate server key");
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_owned()]).expect("localhost is a DNS name");
    leaf_params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf_params
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .expect("sign server certificate");

    let chain: Vec<CertificateDer<'static>> = vec![leaf_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("certificate matches its key");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (TlsAcceptor::from(Arc::new(config)), ca_cert.pem())
}
