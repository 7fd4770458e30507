//! End-to-end: the drain on shutdown, seen from outside while it runs, and hot reload through
//! `POST /admin/reload` after the config file changed on disk. SIGHUP reloads are in
//! `ops_sighup.rs`, alone in their process.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;
use support::config_file::{ADMIN_TOKEN, ConfigFile, config_toml};
use support::mock_upstream::sse_events;
use support::proxy_harness::{Proxy, WAIT, read, start_app, start_proxy, stopped};
use support::{Behaviour, KEY_A, KEY_B, KEY_C, MockUpstream, one_key};

/// `GET /admin/keys`, by key name.
async fn key_states(proxy: &Proxy) -> Vec<(String, Value)> {
    let reply = proxy
        .admin(Method::GET, "/admin/keys", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let keys = reply.json()["keys"].as_array().expect("a key list").clone();
    keys.into_iter()
        .map(|k| (k["name"].as_str().expect("a name").to_owned(), k))
        .collect()
}

fn status_of<'a>(keys: &'a [(String, Value)], name: &str) -> &'a str {
    keys.iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, k)| k["status"].as_str())
        .unwrap_or_else(|| panic!("no key {name} in {keys:?}"))
}

#[tokio::test]
async fn during_the_drain_new_connections_are_refused_and_ready_is_503() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 40,
            interval: Duration::from_millis(30),
        },
    );
    let mut proxy = one_key(&mock).await;
    assert_eq!(
        proxy
            .call(proxy.request(Method::GET, "/ready", &[], Bytes::new()))
            .await
            .status,
        StatusCode::OK
    );
    let response = proxy.send(proxy.stream_request("gpt-4o")).await;
    assert_eq!(response.status(), StatusCode::OK);

    let run = proxy.begin_shutdown();
    tokio::time::timeout(WAIT, proxy.app.drain_begun())
        .await
        .expect("the drain begins");
    assert!(
        tokio::net::TcpStream::connect(proxy.addr).await.is_err(),
        "a new connection is refused while the stream drains"
    );
    let ready = proxy.get_url(&proxy.metrics_url("/ready")).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        ready.json()["reason"],
        "draining: the proxy is shutting down",
        "{}",
        ready.text()
    );
    assert!(!run.is_finished(), "the stream is still in flight");

    let reply = read(response).await;
    assert_eq!(
        reply.body,
        Bytes::from(sse_events("gpt-4o", 40).concat()),
        "the stream in flight completes"
    );
    let result = stopped(run).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        tokio::net::TcpStream::connect(proxy.metrics_addr)
            .await
            .is_err(),
        "the metrics listener closes when the drain ends"
    );
}

#[tokio::test]
async fn admin_reload_keeps_key_state_adds_keys_and_refuses_a_bad_file() {
    let mock = MockUpstream::start().await;
    let file = ConfigFile::new(&config_toml(
        &mock.url(),
        &[("alpha", KEY_A), ("beta", KEY_B)],
        "",
    ));
    let proxy = start_app(file.app()).await;

    // alpha cools down after a 429, beta is taken out by the operator.
    mock.set(KEY_A, Behaviour::rate_limited_secs(600));
    for _ in 0..2 {
        assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    }
    assert_eq!(mock.calls_for(KEY_A), 1, "round robin tried alpha once");
    let disabled = proxy
        .admin(Method::POST, "/admin/keys/beta/disable", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(disabled.status, StatusCode::OK, "{}", disabled.text());
    let before = key_states(&proxy).await;
    assert_eq!(status_of(&before, "alpha"), "cooling");
    assert_eq!(status_of(&before, "beta"), "disabled");

    // No key can serve now.
    assert_ne!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    let calls = mock.calls().len();

    file.write(&config_toml(
        &mock.url(),
        &[("alpha", KEY_A), ("beta", KEY_B), ("gamma", KEY_C)],
        "",
    ));
    let reloaded = proxy
        .admin(Method::POST, "/admin/reload", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(reloaded.status, StatusCode::OK, "{}", reloaded.text());
    assert_eq!(reloaded.json()["keys"], 3);
    let after = key_states(&proxy).await;
    assert_eq!(
        status_of(&after, "alpha"),
        "cooling",
        "the cooldown survives"
    );
    assert_eq!(
        status_of(&after, "beta"),
        "disabled",
        "the operator's disable survives"
    );
    assert_eq!(status_of(&after, "gamma"), "available");
    let alpha = &after.iter().find(|(n, _)| n == "alpha").expect("alpha").1;
    assert_eq!(alpha["outcomes"]["rate_limited"], 1, "the counters survive");

    for _ in 0..3 {
        assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    }
    assert_eq!(mock.calls_for(KEY_C), 3, "only the new key serves");
    assert_eq!(mock.calls().len(), calls + 3);

    file.write("[server]\nbind_addr = 8080\nno_such_setting = true\n");
    let refused = proxy
        .admin(Method::POST, "/admin/reload", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.error_code(), "reload_failed");
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no_such_setting")),
        "the error says what is wrong: {}",
        refused.text()
    );
    assert_eq!(proxy.app.pool().len(), 3, "the old pool stays");
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    assert_eq!(mock.calls_for(KEY_C), 4, "and keeps serving");
    assert_eq!(status_of(&key_states(&proxy).await, "beta"), "disabled");
}

#[tokio::test]
async fn a_request_in_flight_finishes_on_a_key_that_a_reload_removes() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 10,
            interval: Duration::from_millis(30),
        },
    );
    let file = ConfigFile::new(&config_toml(&mock.url(), &[("alpha", KEY_A)], ""));
    let proxy = start_app(file.app()).await;
    let response = proxy.send(proxy.stream_request("gpt-4o")).await;
    assert_eq!(response.status(), StatusCode::OK);

    file.write(&config_toml(&mock.url(), &[("gamma", KEY_C)], ""));
    assert_eq!(proxy.app.reload().expect("valid config"), 1);
    let reply = read(response).await;
    assert_eq!(reply.body, Bytes::from(sse_events("gpt-4o", 10).concat()));

    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    assert_eq!(mock.calls_for(KEY_A), 1);
    assert_eq!(mock.calls_for(KEY_C), 1, "new requests use the new pool");
}

#[tokio::test]
async fn a_reload_applies_new_client_keys_cors_and_limits() {
    let mock = MockUpstream::start().await;
    let file = ConfigFile::new(&config_toml(&mock.url(), &[("alpha", KEY_A)], ""));
    let proxy = start_app(file.app()).await;
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);

    let extra = r#"
[auth]
client_keys = ["kcp-client-reloaded-1"]

[cors]
allowed_origins = ["https://app.example.com"]
"#;
    let mut toml = config_toml(&mock.url(), &[("alpha", KEY_A)], extra);
    toml = toml.replace(
        "graceful_shutdown_seconds = 5",
        "graceful_shutdown_seconds = 5\nrequest_body_limit_bytes = 64",
    );
    file.write(&toml);
    let reloaded = proxy
        .admin(Method::POST, "/admin/reload", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(reloaded.status, StatusCode::OK, "{}", reloaded.text());

    let anonymous = proxy.chat("gpt-4o").await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let body = r#"{"model":"gpt-4o"}"#;
    let headers = [
        ("authorization", "Bearer kcp-client-reloaded-1"),
        ("origin", "https://app.example.com"),
    ];
    let allowed = proxy
        .call(proxy.request(Method::POST, "/v1/chat/completions", &headers, body))
        .await;
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let too_big = proxy
        .call(proxy.request(
            Method::POST,
            "/v1/chat/completions",
            &headers,
            format!(r#"{{"model":"gpt-4o","x":"{}"}}"#, "a".repeat(100)),
        ))
        .await;
    assert_eq!(too_big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(mock.calls().len(), 2);
}

#[tokio::test]
async fn a_server_built_in_code_refuses_to_reload() {
    let mock = MockUpstream::start().await;
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.observability.admin_token = Some(key_cycle_proxy::core::Secret::new(ADMIN_TOKEN));
    })
    .await;
    let refused = proxy
        .admin(Method::POST, "/admin/reload", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.error_code(), "reload_failed");
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
}
