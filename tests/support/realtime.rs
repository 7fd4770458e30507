//! The Realtime API's side of the test kit: an in-process WebSocket upstream on
//! `127.0.0.1:0` (plain or TLS) that records each handshake's headers, can refuse a key's
//! handshake with an HTTP status, greets every session with a `session.created` event and
//! echoes the client's text and binary frames; and a tokio-tungstenite client, as an
//! application would use it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, StatusCode};
use key_cycle_proxy::core::{Secret, Strategy};
use key_cycle_proxy::server::config::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::proxy_harness::{Proxy, loaded_config, start_loaded};

pub const CLIENT_TOKEN: &str = "kcp-client-5d1e7a93";
pub const MODEL: &str = "gpt-4o-realtime-preview";
/// Bound on every wait of these tests.
pub const WAIT: Duration = Duration::from_secs(10);
pub const GREETING: &str = r#"{"type":"session.created"}"#;

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;
/// A client handshake's result.
pub type Opening = Result<(Client, http::Response<Option<Vec<u8>>>), WsError>;

/// What the realtime upstream saw.
#[derive(Default)]
pub struct Seen {
    /// Each handshake's path and headers, in order.
    pub handshakes: Vec<(String, HeaderMap)>,
    /// The close frames sessions received.
    pub closes: Vec<Option<CloseFrame>>,
}

/// A WebSocket upstream that echoes frames, refusing the handshakes of some keys.
#[derive(Clone)]
pub struct RealtimeUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    /// Key → the status its handshake is refused with.
    refuse: Arc<Mutex<HashMap<String, u16>>>,
}

impl RealtimeUpstream {
    pub async fn start() -> RealtimeUpstream {
        RealtimeUpstream::serve(None).await
    }

    /// Over TLS (`wss://`), with a certificate signed by a fresh CA, written to a file.
    pub async fn start_tls() -> (RealtimeUpstream, CaFile) {
        let (acceptor, pem) = super::mock_upstream::tls_server();
        let upstream = RealtimeUpstream::serve(Some(acceptor)).await;
        let ca = CaFile::write(&pem, upstream.addr.port());
        (upstream, ca)
    }

    async fn serve(tls: Option<TlsAcceptor>) -> RealtimeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = RealtimeUpstream {
            addr: listener.local_addr().expect("addr"),
            seen: Arc::default(),
            refuse: Arc::default(),
        };
        let serving = upstream.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let serving = serving.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serving.session(tcp).await,
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(tcp).await {
                                serving.session(stream).await;
                            }
                        }
                    }
                });
            }
        });
        upstream
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn refuse(&self, key: &str, status: u16) {
        self.refuse
            .lock()
            .expect("lock")
            .insert(key.to_owned(), status);
    }

    pub fn handshakes(&self) -> Vec<(String, HeaderMap)> {
        self.seen.lock().expect("lock").handshakes.clone()
    }

    pub fn closes(&self) -> Vec<Option<CloseFrame>> {
        self.seen.lock().expect("lock").closes.clone()
    }

    // `ErrorResponse` is tungstenite's type for a refused handshake.
    #[allow(clippy::result_large_err)]
    async fn session<S>(self, tcp: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let check = |request: &Request, response: Response| {
            let mut seen = self.seen.lock().expect("lock");
            let path = request.uri().path_and_query().map_or("", |p| p.as_str());
            seen.handshakes
                .push((path.to_owned(), request.headers().clone()));
            let headers = request.headers();
            let bearer = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let azure = headers.get("api-key").and_then(|v| v.to_str().ok());
            let key = bearer.or(azure).unwrap_or_default();
            match self.refuse.lock().expect("lock").get(key) {
                Some(&status) => Err(refusal(status, key)),
                None => Ok(response),
            }
        };
        let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
            return;
        };
        if socket.send(Message::text(GREETING)).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = socket.next().await {
            match message {
                Message::Text(_) | Message::Binary(_) => {
                    let echoed = socket.send(message).await;
                    if echoed.is_err() {
                        return;
                    }
                }
                Message::Close(frame) => {
                    self.seen.lock().expect("lock").closes.push(frame);
                }
                _ => {}
            }
        }
    }
}

/// The TLS upstream's CA in a file, for `upstream.ca_file`; removed on drop.
pub struct CaFile(pub std::path::PathBuf);

impl CaFile {
    pub fn write(pem: &str, port: u16) -> CaFile {
        let name = format!("kcp-realtime-ca-{}-{port}.pem", std::process::id());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, pem).expect("write the CA file");
        CaFile(path)
    }
}

impl Drop for CaFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// OpenAI's answer to a handshake: a 429 rate limit, else a revoked key (quoting the key, as
/// OpenAI does, to check that it never reaches the client).
pub fn refusal(status: u16, key: &str) -> ErrorResponse {
    let (message, kind, code) = match status {
        429 => (
            "Rate limit reached for requests.".to_owned(),
            "requests",
            "rate_limit_exceeded",
        ),
        _ => (
            format!("Incorrect API key provided: {key}."),
            "invalid_request_error",
            "invalid_api_key",
        ),
    };
    let body = format!(
        r#"{{"error":{{"message":"{message}","type":"{kind}","param":null,"code":"{code}"}}}}"#
    );
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Some(body))
        .expect("a valid response")
}

/// kcp with `keys` on the realtime upstream, in fixed rotation order, and a client token.
pub async fn proxy(upstream: &RealtimeUpstream, keys: &[&'static str]) -> Proxy {
    proxy_with(upstream, keys, |_| {}).await
}

pub async fn proxy_with(
    upstream: &RealtimeUpstream,
    keys: &[&'static str],
    tweak: impl FnOnce(&mut Config),
) -> Proxy {
    let keys = keys
        .iter()
        .map(|key| (*key, upstream.url(), vec![MODEL]))
        .collect();
    let mut loaded = loaded_config(keys, |config| {
        config.keys.rotation_strategy = Strategy::RoundRobin;
        config.server.graceful_shutdown_seconds = 3;
        tweak(config);
    });
    loaded.client_keys = vec![Secret::new(CLIENT_TOKEN)];
    start_loaded(loaded).await
}

/// Opens a session through `proxy` with `token` for `query`.
pub async fn connect(proxy: &Proxy, query: &str, token: Option<&str>) -> Opening {
    let url = format!("ws://{}/v1/realtime{query}", proxy.addr);
    let mut request = url.into_client_request().expect("request");
    request
        .headers_mut()
        .insert("openai-beta", "realtime=v1".parse().expect("value"));
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("value");
        request.headers_mut().insert("authorization", value);
    }
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
}

pub async fn open(proxy: &Proxy) -> (Client, http::Response<Option<Vec<u8>>>) {
    connect(proxy, &format!("?model={MODEL}"), Some(CLIENT_TOKEN))
        .await
        .expect("the session opens")
}

/// The next data or close frame.
pub async fn next(client: &mut Client) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("a frame in time")
            .expect("the session is open")
            .expect("a valid frame");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

/// The drain's ending, seen from the client: a close frame "going away", then the end of
/// the session once the client has answered it (tungstenite does so on its next read).
pub async fn closed_going_away(client: &mut Client) {
    match next(client).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a close frame, got {other:?}"),
    }
    let end = tokio::time::timeout(WAIT, client.next())
        .await
        .expect("in time");
    assert!(end.is_none(), "the session ends: {end:?}");
}

/// The status and body of a refused handshake.
pub fn refused(result: Opening) -> (StatusCode, serde_json::Value) {
    match result {
        Err(WsError::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            let json = serde_json::from_slice(&body)
                .unwrap_or_else(|_| panic!("a JSON body: {}", String::from_utf8_lossy(&body)));
            (response.status(), json)
        }
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, the session opened"),
    }
}

pub fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Waits (bounded) until `done` holds.
pub async fn until(done: impl Fn() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("in time");
}
