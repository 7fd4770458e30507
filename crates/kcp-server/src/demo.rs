//! `kcp-server demo`: the proxy with an embedded mock provider, for a first look.
//!
//! A new user has no spare keys and maybe no network, yet wants to see what the proxy does.
//! The demo starts the tests' mock upstream (`kcp-mock`, the same code, not a copy) on
//! `127.0.0.1:0` with a small, varied pool: two healthy keys of different tiers, one that
//! hits its rate limit under load (OpenAI's refilling bucket), one revoked (401) and one
//! flaky (every fourth call a 503). The proxy runs on `127.0.0.1:<port>` with an ordinary
//! configuration built here, and its status page on the next port. With `--traffic RPS` it
//! sends its own load over loopback, so rotation, cooldowns, the revoked key being disabled
//! and its re-check (a minute later) can be watched on the status page.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kcp_core::{KeySpec, Secret};
use kcp_mock::{Behaviour, MockUpstream, RateLimit};
use tokio::sync::Semaphore;

use crate::app::App;
use crate::config::{Config, KeySources, LoadedConfig};
use crate::ops::serve::{ServeError, Server, StartError};

/// The status page's password in the demo (any user name). The demo listens on loopback only.
pub const ADMIN_TOKEN: &str = "kcp-demo";

/// Requests the self-load keeps in flight at most; ticks past it are skipped.
const MAX_TRAFFIC_IN_FLIGHT: usize = 64;

/// What the demo was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoOptions {
    /// Proxy port on 127.0.0.1 (0: any free port); the status page takes the next one.
    pub port: u16,
    /// Requests per second of self-load, if any.
    pub traffic: Option<u32>,
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the mock provider could not bind 127.0.0.1: {0}")]
    Mock(#[source] std::io::Error),
    #[error(transparent)]
    Start(#[from] StartError),
}

/// One demo key: name, the mock's behaviour for it, and what it shows.
struct DemoKey {
    name: &'static str,
    secret: &'static str,
    role: &'static str,
}

const KEYS: [DemoKey; 5] = [
    DemoKey {
        name: "tier5-main",
        secret: "sk-demo-tier5-main-000000000001",
        role: "healthy, high limits (10000 RPM)",
    },
    DemoKey {
        name: "tier1-spare",
        secret: "sk-demo-tier1-spare-00000000002",
        role: "healthy, low limits (500 RPM)",
    },
    DemoKey {
        name: "busy",
        secret: "sk-demo-busy-000000000000000003",
        role: "60 RPM: rate-limited (429) under load, then cools down",
    },
    DemoKey {
        name: "revoked",
        secret: "sk-demo-revoked-00000000000004",
        role: "revoked (401): disabled, re-checked after a minute",
    },
    DemoKey {
        name: "flaky",
        secret: "sk-demo-flaky-0000000000000005",
        role: "every 4th call a 503: retried on another key",
    },
];

/// A demo ready to run: mock provider up, proxy bound.
#[derive(Debug)]
pub struct Demo {
    /// The proxy's client listener.
    pub proxy_addr: SocketAddr,
    /// The ops listener: status page, metrics, admin API.
    pub status_addr: SocketAddr,
    traffic: Option<u32>,
    mock: MockUpstream,
    server: Server,
}

impl Demo {
    /// Starts the mock provider and binds the proxy (nothing is served until [`Demo::run`]).
    pub async fn start(options: DemoOptions) -> Result<Demo, DemoError> {
        let mock = MockUpstream::try_start().await.map_err(DemoError::Mock)?;
        mock.keep_calls(false);
        play(&mock);
        let app = App::new(config(&mock, options.port))?;
        let server = Server::bind_app(app).await?;
        Ok(Demo {
            proxy_addr: server.local_addr(),
            status_addr: server.metrics_addr(),
            traffic: options.traffic,
            mock,
            server,
        })
    }

    /// The running proxy's state.
    pub fn app(&self) -> Arc<App> {
        self.server.app()
    }

    /// What to try, printed at start.
    pub fn banner(&self) -> String {
        let base = format!("http://{}/v1", self.proxy_addr);
        let keys: String = KEYS
            .iter()
            .map(|k| format!("  {:<12} {}\n", k.name, k.role))
            .collect();
        let traffic = match self.traffic {
            Some(rps) => format!("Sending {rps} requests/s through the proxy (stops with it).\n"),
            None => "Add --traffic 20 to send load and watch keys cool down and get disabled.\n"
                .to_owned(),
        };
        format!(
            "kcp demo: the proxy serves {base} with 5 demo keys against an embedded mock provider \
             at {mock}.\n{keys}\n\
             Try it:\n  curl {base}/chat/completions -H 'content-type: application/json' \
             -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'\n\n\
             Python:  from openai import OpenAI\n         \
             client = OpenAI(base_url=\"{base}\", api_key=\"unused\")\n\
             Node:    import OpenAI from \"openai\";\n         \
             const client = new OpenAI({{ baseURL: \"{base}\", apiKey: \"unused\" }});\n\n\
             Status page: http://{status}/  (any user name, password: {ADMIN_TOKEN})\n\
             {traffic}Ctrl-C stops.\n",
            mock = self.mock.url(),
            status = self.status_addr,
        )
    }

    /// Serves (and sends the self-load, if asked) until `shutdown` resolves, then drains.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let traffic = self.traffic.map(|rps| {
            tokio::spawn(send_traffic(
                self.proxy_addr,
                NonZeroU32::new(rps).unwrap_or(NonZeroU32::MIN),
            ))
        });
        let served = self.server.run(shutdown).await;
        if let Some(traffic) = traffic {
            traffic.abort();
        }
        drop(self.mock);
        served
    }
}

/// The mock's part: what each demo key does.
fn play(mock: &MockUpstream) {
    let per_minute = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    let [tier5, tier1, busy, revoked, flaky] = &KEYS;
    mock.limit(
        tier5.secret,
        RateLimit::per_minute(per_minute(10_000)).with_tokens(per_minute(30_000_000)),
    );
    mock.limit(
        tier1.secret,
        RateLimit::per_minute(per_minute(500)).with_tokens(per_minute(200_000)),
    );
    mock.limit(busy.secret, RateLimit::per_minute(per_minute(60)));
    mock.set(revoked.secret, Behaviour::Unauthorized);
    mock.set(
        flaky.secret,
        Behaviour::Flaky {
            every: 4,
            status: 503,
        },
    );
}

/// An ordinary configuration: loopback listeners, the demo keys, the status page's token and
/// quick retries so failures show within a second.
fn config(mock: &MockUpstream, port: u16) -> LoadedConfig {
    let mut config = Config::default();
    config.server.bind_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let status_port = if port == 0 { 0 } else { port.saturating_add(1) };
    config.observability.metrics_bind = SocketAddr::from(([127, 0, 0, 1], status_port));
    config.observability.admin_token = Some(Secret::new(ADMIN_TOKEN));
    config.observability.tracing_level = "warn".to_owned();
    config.upstream.retry_initial_backoff_ms = 20;
    config.upstream.retry_max_backoff_ms = 200;
    config.server.graceful_shutdown_seconds = 2;
    let keys = KEYS
        .iter()
        .map(|key| {
            KeySpec::new(Secret::new(key.secret), format!("{}/v1", mock.url())).with_name(key.name)
        })
        .collect();
    LoadedConfig {
        config,
        keys,
        client_keys: Vec::new(),
        sources: KeySources::default(),
    }
}

/// Sends `rps` chat completions per second to the proxy until aborted, at most
/// [`MAX_TRAFFIC_IN_FLIGHT`] at once.
async fn send_traffic(proxy: SocketAddr, rps: NonZeroU32) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let in_flight = Arc::new(Semaphore::new(MAX_TRAFFIC_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps.get());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let body = Bytes::from_static(
        br#"{"model":"gpt-4o-mini","max_tokens":32,"messages":[{"role":"user","content":"Hello from the demo"}]}"#,
    );
    loop {
        tick.tick().await;
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            continue;
        };
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{proxy}/v1/chat/completions"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()));
        let Ok(request) = request else { return };
        let client = client.clone();
        tokio::spawn(async move {
            if let Ok(response) = client.request(request).await {
                let _ = response.into_body().collect().await;
            }
            drop(permit);
        });
    }
}
