//! The real proxy on `127.0.0.1:0`, configured in code, and a client to talk to it.
//!
//! [`start_proxy`] builds a [`LoadedConfig`] directly (no files, no environment), with short
//! retry backoffs so failure tests stay fast, binds the server and runs it in a task until
//! [`Proxy::stop`] (or drop).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use key_cycle_proxy::core::{DisableReason, KeySpec, KeyStatus, Secret};
use key_cycle_proxy::server::app::App;
use key_cycle_proxy::server::clock;
use key_cycle_proxy::server::config::{Config, KeySources, LoadedConfig};
use key_cycle_proxy::server::ops::serve::{ServeError, Server};
use key_cycle_proxy::server::ops::workers::Workers;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound for anything that should happen promptly on loopback.
pub const WAIT: Duration = Duration::from_secs(10);

/// The HTTP client of the tests.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The metrics and admin listener.
    pub metrics_addr: SocketAddr,
    pub app: Arc<App>,
    pub client: HttpClient,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServeError>>>,
}

/// The settings every test starts from: loopback, fast retries, bounded timeouts.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.server.bind_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.observability.metrics_bind = SocketAddr::from(([127, 0, 0, 1], 0));
    config.server.graceful_shutdown_seconds = 5;
    config.upstream.connect_timeout_ms = 2_000;
    config.upstream.request_timeout_ms = 5_000;
    config.upstream.stream_idle_timeout_ms = 5_000;
    config.upstream.retry_initial_backoff_ms = 5;
    config.upstream.retry_max_backoff_ms = 50;
    config
}

/// A key as the config loader would resolve it: no name, weight 1.
pub fn resolved_key(key: &str, url: &str, models: &[&str]) -> KeySpec {
    KeySpec::new(Secret::new(key), url).with_models(models.iter().copied())
}

/// A loaded configuration of `keys` (key, url, models) and [`test_config`] after `tweak`.
pub fn loaded_config(
    keys: Vec<(&str, String, Vec<&str>)>,
    tweak: impl FnOnce(&mut Config),
) -> LoadedConfig {
    let mut config = test_config();
    tweak(&mut config);
    LoadedConfig {
        config,
        keys: keys
            .iter()
            .map(|(key, url, models)| resolved_key(key, url, models))
            .collect(),
        client_keys: Vec::new(),
        sources: KeySources::default(),
    }
}

/// Starts the proxy with `keys` (key, url, models) and [`test_config`] changed by `tweak`.
pub async fn start_proxy(
    keys: Vec<(&str, String, Vec<&str>)>,
    tweak: impl FnOnce(&mut Config),
) -> Proxy {
    start_loaded(loaded_config(keys, tweak)).await
}

/// Starts the proxy with a configuration built by the test.
pub async fn start_loaded(loaded: LoadedConfig) -> Proxy {
    start_app(App::new(loaded).expect("valid proxy config")).await
}

/// Starts the proxy around an [`App`] built by the test (one that can reload, say).
pub async fn start_app(app: App) -> Proxy {
    run_server(Server::bind_app(app).await.expect("proxy starts"))
}

/// Starts the proxy serving its connections on `workers` worker threads, as the binary does
/// (real time only: the workers' runtimes are not the test's).
pub async fn start_on_workers(loaded: LoadedConfig, workers: usize) -> Proxy {
    let app = App::new(loaded).expect("valid proxy config");
    let server = Server::bind_app(app).await.expect("proxy starts");
    run_server(server.with_workers(Workers::start(workers).expect("worker threads start")))
}

fn run_server(server: Server) -> Proxy {
    let addr = server.local_addr();
    let metrics_addr = server.metrics_addr();
    let app = server.app();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Proxy {
        addr,
        metrics_addr,
        app,
        client: client(),
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

/// A pooling HTTP/1.1 client.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An h2 (prior knowledge) client.
pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("JSON body ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("ASCII"))
    }

    /// OpenAI's `error.code` of a proxy or provider error.
    pub fn error_code(&self) -> Value {
        self.json()["error"]["code"].clone()
    }
}

impl Proxy {
    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://127.0.0.1:METRICS_PORT{path}`: the metrics and admin listener.
    pub fn metrics_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.metrics_addr)
    }

    /// A request to `path` with `headers` and `body`.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Request<Full<Bytes>> {
        let mut request = Request::builder().method(method).uri(self.url(path));
        for (name, value) in headers {
            request = request.header(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        request.body(Full::new(body.into())).expect("valid request")
    }

    /// Sends `request` and waits for the response head.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Response<Incoming> {
        send_with(&self.client, request).await
    }

    /// Sends `request` and reads the whole response.
    pub async fn call(&self, request: Request<Full<Bytes>>) -> Reply {
        read(self.send(request).await).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, json: &str) -> Reply {
        let headers = [("content-type", "application/json")];
        let request = self.request(Method::POST, path, &headers, json.to_owned());
        self.call(request).await
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Reply {
        let request = self.request(Method::GET, path, &[], Bytes::new());
        self.call(request).await
    }

    /// A chat completion for `model`.
    pub async fn chat(&self, model: &str) -> Reply {
        self.call(self.chat_request(model)).await
    }

    /// Sends `request` in a task of its own: for tests that move paused time while it runs.
    pub fn spawn(&self, request: Request<Full<Bytes>>) -> JoinHandle<Reply> {
        let client = self.client.clone();
        tokio::spawn(async move { read(send_with(&client, request).await).await })
    }

    /// A chat completion request for `model`.
    pub fn chat_request(&self, model: &str) -> Request<Full<Bytes>> {
        let body =
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let headers = [("content-type", "application/json")];
        self.request(Method::POST, "/v1/chat/completions", &headers, body)
    }

    /// A streamed chat completion request for `model`.
    pub fn stream_request(&self, model: &str) -> Request<Full<Bytes>> {
        let body = format!(r#"{{"model":"{model}","stream":true,"messages":[]}}"#);
        let headers = [("content-type", "application/json")];
        self.request(Method::POST, "/v1/chat/completions", &headers, body)
    }

    /// `GET url` (any listener).
    pub async fn get_url(&self, url: &str) -> Reply {
        let request = Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("valid request");
        self.call(request).await
    }

    /// `method path` on the metrics and admin listener, with `token` as the bearer token.
    pub async fn admin(&self, method: Method, path: &str, token: Option<&str>) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(self.metrics_url(path));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        self.call(
            request
                .body(Full::new(Bytes::new()))
                .expect("valid request"),
        )
        .await
    }

    /// The status of `key` in the pool now, and why it is disabled if it is.
    pub fn key_status(&self, key: &str) -> (KeyStatus, Option<DisableReason>) {
        let fingerprint = Secret::new(key).fingerprint();
        let key = self
            .app
            .pool()
            .snapshot(clock::now())
            .into_iter()
            .find(|k| k.fingerprint == fingerprint)
            .expect("key in pool");
        (key.status, key.disabled_reason)
    }

    /// A chat completion for `model` in a task of its own (see [`Proxy::spawn`]).
    pub fn spawn_chat(&self, model: &str) -> JoinHandle<Reply> {
        self.spawn(self.chat_request(model))
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("run returns within the grace period")
            .expect("run does not panic")
    }

    /// Triggers shutdown without waiting; the returned handle resolves when `run` returns.
    pub fn begin_shutdown(&mut self) -> JoinHandle<Result<(), ServeError>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.take().expect("running")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// Waits (within [`WAIT`]) for `run` to return after [`Proxy::begin_shutdown`].
pub async fn stopped(run: JoinHandle<Result<(), ServeError>>) -> Result<(), ServeError> {
    tokio::time::timeout(WAIT, run)
        .await
        .expect("run returns in time")
        .expect("run does not panic")
}

/// Sends `request` with `client` and waits for the response head.
pub async fn send_with(client: &HttpClient, request: Request<Full<Bytes>>) -> Response<Incoming> {
    tokio::time::timeout(WAIT, client.request(request))
        .await
        .expect("response head in time")
        .expect("response head")
}

/// Reads a whole response.
pub async fn read(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body in time")
        .expect("complete body")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A port on loopback where nothing listens (bound, then released).
pub async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{addr}")
}
