//! The attempt driver against the in-process mock provider, without the HTTP front: what it
//! sends with each key, the answer the client gets, and what it reports, records and logs.
//! (The end-to-end tests in the root package cover the same paths through the whole server;
//! these run with `cargo test -p kcp-server --lib`, which mutation testing relies on.)

use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use kcp_core::{KeySpec, Secret};
use kcp_mock::{Behaviour, MockUpstream};

use super::{Outgoing, forward};
use crate::app::App;
use crate::config::{Config, KeySources, LoadedConfig, LogFormat};
use crate::observe::Unfinished;
use crate::observe::logging::capture::Captured;
use crate::observe::metrics::render;
use crate::proxy::Report;

const KEY_A: &str = "sk-driver-test-aaaa";
const KEY_B: &str = "sk-driver-test-bbbb";
const CHAT: &[u8] = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
/// Bound for anything that happens promptly on loopback.
const WAIT: Duration = Duration::from_secs(10);

/// Settings with quick retries, so that a retry's backoff costs nothing here.
fn config(tweak: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config::default();
    config.upstream.retry_initial_backoff_ms = 1;
    config.upstream.retry_max_backoff_ms = 2;
    tweak(&mut config);
    config
}

/// An app whose keys are `(name, secret, url, models)`.
fn app(keys: &[(&str, &str, String, &[&str])], config: Config) -> App {
    let keys = keys
        .iter()
        .map(|(name, secret, url, models)| {
            KeySpec::new(Secret::new(*secret), url.as_str())
                .with_name(*name)
                .with_models(models.iter().copied())
        })
        .collect();
    App::new(LoadedConfig {
        config,
        keys,
        client_keys: Vec::new(),
        sources: KeySources::default(),
    })
    .expect("valid test app")
}

/// What the client got.
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    report: Report,
}

impl Got {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

fn json_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers
}

fn chat<'a>(model: Option<&'a str>, headers: &'a HeaderMap) -> Outgoing<'a> {
    Outgoing {
        method: &POST,
        path_and_query: "/v1/chat/completions",
        headers,
        body: &CHAT_BODY,
        model,
        scope: model,
        tokens: 10,
        stateful: false,
        idempotency_key: false,
    }
}

static CHAT_BODY: Bytes = Bytes::from_static(CHAT);
static POST: Method = Method::POST;

/// The configured name of a key's secret.
fn name_of(secret: Option<&str>) -> Option<&'static str> {
    match secret? {
        KEY_A => Some("a"),
        KEY_B => Some("b"),
        _ => None,
    }
}

/// Forwards `request` with `app`'s pool and `config`, and reads the whole answer.
async fn send(app: &App, config: &Config, request: &Outgoing<'_>) -> Got {
    let (response, report) = tokio::time::timeout(
        WAIT,
        forward(app, app.pool(), config, request, Report::default(), None),
    )
    .await
    .expect("answered in time");
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
        report,
    }
}

/// The lines of `name` in the app's metrics.
fn series(app: &App, name: &str) -> Vec<String> {
    render(&app.registry)
        .expect("metrics render")
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(str::to_owned)
        .collect()
}

/// A loopback port nobody listens on.
fn closed_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    listener.local_addr().expect("addr").port()
}

#[tokio::test]
async fn a_served_request_goes_out_with_the_key_and_is_reported() {
    let mock = MockUpstream::start().await;
    let config = config(|_| {});
    let app = app(&[("a", KEY_A, mock.url(), &["gpt-4o"])], config.clone());
    let headers = json_headers();
    let got = send(&app, &config, &chat(Some("gpt-4o"), &headers)).await;

    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.json()["model"],
        "gpt-4o",
        "the mock echoes the request's model"
    );
    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].key.as_deref(),
        Some(KEY_A),
        "sent with the lease's key"
    );
    assert_eq!(calls[0].method, "POST");
    assert_eq!(calls[0].path_and_query, "/v1/chat/completions");
    assert_eq!(calls[0].body, CHAT_BODY, "the client's body, unchanged");
    assert_eq!(calls[0].headers[header::CONTENT_TYPE], "application/json");

    let report = &got.report;
    assert_eq!(report.status, StatusCode::OK);
    assert_eq!(report.key.as_ref().map(|k| k.as_str()), Some("a"));
    assert_eq!(report.attempts, 1);
    assert_eq!(report.retries, 0);
    assert_eq!(report.proxy_error, None);
    let length: u64 = got.headers[header::CONTENT_LENGTH]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert_eq!(length, got.body.len() as u64);
    assert_eq!(report.bytes_out, Some(length));
    let ttfb = report.upstream_ttfb.expect("time to the answer's head");
    assert!(ttfb > Duration::ZERO);
    assert!(report.upstream_time >= ttfb, "{report:?}");
    assert_eq!(
        series(&app, "kcp_upstream_requests_total"),
        [r#"kcp_upstream_requests_total{key="a",outcome="success"} 1"#]
    );
}

#[tokio::test]
async fn a_5xx_on_every_key_is_retried_then_the_last_answer_is_passed_on() {
    let mock = MockUpstream::start().await;
    mock.set_default(Behaviour::status(503));
    let config = config(|c| c.upstream.max_retries = 1);
    let app = app(
        &[
            ("a", KEY_A, mock.url(), &["gpt-4o"]),
            ("b", KEY_B, mock.url(), &["gpt-4o"]),
        ],
        config.clone(),
    );
    let headers = json_headers();
    let got = send(&app, &config, &chat(Some("gpt-4o"), &headers)).await;

    assert_eq!(
        got.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the provider's own answer"
    );
    assert_eq!(got.json()["error"]["type"], "server_error");
    let calls = mock.calls();
    assert_eq!(calls.len(), 2, "one retry: max_retries = 1");
    assert_ne!(
        calls[0].key, calls[1].key,
        "the retry goes to the other key"
    );
    let report = &got.report;
    assert_eq!(report.attempts, 2);
    assert_eq!(report.retries, 1);
    assert_eq!(report.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        report.proxy_error, None,
        "passed on, not the proxy's answer"
    );
    assert_eq!(
        report.key.as_ref().map(|k| k.as_str()),
        name_of(calls[1].key.as_deref()),
        "the answer passed on is the last key's"
    );
    assert_eq!(
        series(&app, "kcp_retries_total"),
        [r#"kcp_retries_total{reason="server_error"} 1"#]
    );
    assert_eq!(
        series(&app, "kcp_upstream_requests_total"),
        [
            r#"kcp_upstream_requests_total{key="a",outcome="server_error"} 1"#,
            r#"kcp_upstream_requests_total{key="b",outcome="server_error"} 1"#,
        ]
    );
}

#[tokio::test]
async fn a_refused_connection_gives_up_with_502_in_plain_words() {
    let config = config(|c| c.upstream.max_retries = 0);
    let url = format!("http://127.0.0.1:{}", closed_port());
    let app = app(&[("a", KEY_A, url, &["gpt-4o"])], config.clone());
    let headers = json_headers();
    let got = send(&app, &config, &chat(Some("gpt-4o"), &headers)).await;

    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    let error = &got.json()["error"];
    assert_eq!(error["code"], "upstream_unavailable");
    assert_eq!(
        error["message"],
        "The upstream API could not serve the request: the connection to the provider failed."
    );
    let report = &got.report;
    assert_eq!(report.status, StatusCode::BAD_GATEWAY);
    assert_eq!(report.proxy_error, Some("upstream_unavailable"));
    assert_eq!(report.bytes_out, Some(got.body.len() as u64));
    assert_eq!(report.key, None, "the proxy answered");
    assert_eq!(report.attempts, 1);
    assert_eq!(
        series(&app, "kcp_upstream_requests_total"),
        [r#"kcp_upstream_requests_total{key="a",outcome="connect_error"} 1"#]
    );
}

#[tokio::test]
async fn a_model_no_key_serves_is_404_without_a_call() {
    let mock = MockUpstream::start().await;
    let config = config(|_| {});
    let app = app(&[("a", KEY_A, mock.url(), &["gpt-4o"])], config.clone());
    let headers = json_headers();
    let got = send(&app, &config, &chat(Some("o3"), &headers)).await;

    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(got.json()["error"]["code"], "model_not_found");
    assert!(
        got.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("`o3`")),
        "{}",
        got.json()
    );
    assert_eq!(got.report.proxy_error, Some("model_not_found"));
    assert_eq!(got.report.attempts, 0);
    assert!(mock.calls().is_empty());
}

#[tokio::test]
async fn a_pool_resting_past_the_wait_answers_429_with_its_budget() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::rate_limited_secs(60));
    let config = config(|_| {});
    let app = app(&[("a", KEY_A, mock.url(), &["gpt-4o"])], config.clone());
    let headers = json_headers();
    let got = send(&app, &config, &chat(Some("gpt-4o"), &headers)).await;

    assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(got.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        mock.calls().len(),
        1,
        "the key rests 60 s: longer than max_wait"
    );
    for name in [
        "retry-after",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
    ] {
        assert!(got.headers.contains_key(name), "{name}: {:?}", got.headers);
    }
    assert_eq!(got.headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(got.report.proxy_error, Some("rate_limit_exceeded"));
    assert_eq!(got.report.attempts, 1);
    assert_eq!(
        got.report.key_failovers, 1,
        "the rate-limited key was given up on"
    );
    assert_eq!(got.report.upstream_ttfb, None, "the proxy answered");
    // The 429's body is read after its head: both count as time on the upstream.
    let ttfb: f64 = series(&app, "kcp_upstream_ttfb_seconds_sum")
        .first()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("the attempt's ttfb is recorded");
    assert!(ttfb > 0.0);
    assert!(
        got.report.upstream_time.as_secs_f64() > ttfb,
        "head and body: {:?} against a head of {ttfb} s",
        got.report.upstream_time
    );
    assert_eq!(
        series(&app, "kcp_upstream_requests_total"),
        [r#"kcp_upstream_requests_total{key="a",outcome="rate_limited"} 1"#]
    );
}

#[test]
fn a_key_state_change_is_logged_as_a_warning() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (got, logs) = Captured::run("warn", LogFormat::Json, || {
        runtime.block_on(async {
            let mock = MockUpstream::start().await;
            mock.set(KEY_A, Behaviour::Unauthorized);
            let config = config(|_| {});
            let app = app(
                &[
                    ("a", KEY_A, mock.url(), &["gpt-4o"]),
                    ("b", KEY_B, mock.url(), &["gpt-4o"]),
                ],
                config.clone(),
            );
            let headers = json_headers();
            let mut statuses = Vec::new();
            // Until the rotation has come to a (at most once round both keys).
            while mock.calls_for(KEY_A) == 0 && statuses.len() < 2 {
                statuses.push(
                    send(&app, &config, &chat(Some("gpt-4o"), &headers))
                        .await
                        .status,
                );
            }
            (
                statuses,
                mock.calls_for(KEY_A),
                series(&app, "kcp_retries_total"),
            )
        })
    });
    let (statuses, calls_for_a, retries) = got;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "b serves: {statuses:?}"
    );
    assert_eq!(calls_for_a, 1, "a is asked once, then disabled");
    assert_eq!(retries, [r#"kcp_retries_total{reason="key_rejected"} 1"#]);
    let disabled: Vec<_> = logs
        .json_lines()
        .into_iter()
        .filter(|l| l["state"] == "disabled")
        .collect();
    assert_eq!(disabled.len(), 1, "{}", logs.text());
    assert_eq!(disabled[0]["key"], "a");
    assert_eq!(disabled[0]["reason"], "unauthorized");
    assert_eq!(disabled[0]["level"], "WARN");
}

#[tokio::test]
async fn an_abandoned_request_leaves_its_report_behind() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Hang);
    let config = config(|_| {});
    let app = app(&[("a", KEY_A, mock.url(), &["gpt-4o"])], config.clone());
    let headers = json_headers();
    let request = chat(Some("gpt-4o"), &headers);
    let unfinished = Unfinished::default();
    let forwarding = forward(
        &app,
        app.pool(),
        &config,
        &request,
        Report::default(),
        Some(unfinished.clone()),
    );
    tokio::select! {
        _ = forwarding => panic!("a hanging upstream never answers"),
        reached = mock.wait_calls(1, WAIT) => assert!(reached, "the request reached the mock"),
    }
    // The forwarding future is dropped: the client left.
    let left = format!("{unfinished:?}");
    assert!(left.contains("Some(Report"), "{left}");
    assert!(left.contains("attempts: 1"), "{left}");
    assert!(
        mock.wait_cancelled(1, WAIT).await,
        "the upstream call is dropped with the request"
    );
}

#[test]
fn every_retry_setting_comes_from_the_config() {
    let config = config(|c| {
        c.upstream.retry_initial_backoff_ms = 7;
        c.upstream.retry_max_backoff_ms = 70;
        c.rate_limit.max_wait_ms = 1_234;
    });
    let policy = super::retry_policy(&config);
    assert_eq!(policy.backoff.initial, Duration::from_millis(7));
    assert_eq!(policy.backoff.max, Duration::from_millis(70));
    assert_eq!(policy.max_wait, Duration::from_millis(1_234));
    assert_eq!(
        policy.max_unavailable_rest,
        Duration::from_millis(70),
        "a provider's rest is capped like a backoff"
    );
}
