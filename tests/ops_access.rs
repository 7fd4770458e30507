//! End-to-end: who may use the proxy and how much. Client authentication, CORS, the
//! `max_inflight` load shedding, and the admin API on the metrics listener.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use key_cycle_proxy::core::Secret;
use key_cycle_proxy::core::Strategy;
use key_cycle_proxy::server::config::Config;
use serde_json::Value;
use support::proxy_harness::{Proxy, Reply, loaded_config, read, start_loaded, start_proxy};
use support::{Behaviour, KEY_A, KEY_B, MockUpstream, one_key};

const CLIENT_KEY: &str = "kcp-client-key-7d2e91f0c4";
const OTHER_CLIENT_KEY: &str = "kcp-client-key-other-3a8b";
const ADMIN_TOKEN: &str = "admin-token-access-0f4c2b7e91";
const APP: &str = "https://app.example.com";

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

async fn with_client_keys(mock: &MockUpstream, tweak: impl FnOnce(&mut Config)) -> Proxy {
    let mut loaded = loaded_config(vec![(KEY_A, mock.url(), vec!["others"])], tweak);
    loaded.client_keys = vec![Secret::new(CLIENT_KEY), Secret::new(OTHER_CLIENT_KEY)];
    start_loaded(loaded).await
}

async fn chat_with(proxy: &Proxy, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    proxy
        .call(proxy.request(Method::POST, "/v1/chat/completions", &all, CHAT))
        .await
}

async fn two_named_keys(mock: &MockUpstream, token: Option<&str>) -> Proxy {
    let mut loaded = loaded_config(
        vec![
            (KEY_A, mock.url(), vec!["others"]),
            (KEY_B, mock.url(), vec!["others"]),
        ],
        |config| {
            config.keys.rotation_strategy = Strategy::RoundRobin;
            config.observability.admin_token = token.map(Secret::new);
        },
    );
    loaded.keys[0].name = Some("alpha".to_owned());
    loaded.keys[1].name = Some("beta".to_owned());
    start_loaded(loaded).await
}

fn assert_no_secret(text: &str) {
    for secret in [KEY_A, KEY_B, CLIENT_KEY, OTHER_CLIENT_KEY, ADMIN_TOKEN] {
        assert!(!text.contains(secret), "a secret leaked: {text}");
    }
}

#[tokio::test]
async fn requests_without_a_valid_client_key_are_401_and_never_reach_upstream() {
    let mock = MockUpstream::start().await;
    let proxy = with_client_keys(&mock, |_| {}).await;
    let wrong = format!("{CLIENT_KEY}x");
    let rejected: [&[(&str, &str)]; 7] = [
        &[],
        &[("authorization", "Bearer kcp-client-key-wrong")],
        &[("authorization", &format!("Bearer {}", &CLIENT_KEY[1..]))],
        &[("authorization", &format!("Basic {CLIENT_KEY}"))],
        &[("authorization", CLIENT_KEY)],
        &[("api-key", &wrong)],
        &[("x-api-key", CLIENT_KEY)],
    ];
    for headers in rejected {
        let reply = chat_with(&proxy, headers).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(reply.error_code(), "invalid_api_key");
        assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
        assert_no_secret(reply.text());
    }
    let models = proxy.get("/v1/models").await;
    assert_eq!(models.status, StatusCode::UNAUTHORIZED, "every /v1 route");
    assert_eq!(mock.calls().len(), 0, "no rejected request was forwarded");
    assert_eq!(
        proxy.get("/health").await.status,
        StatusCode::OK,
        "probes stay open"
    );
    assert_eq!(proxy.get("/ready").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_valid_client_key_in_either_header_is_accepted_and_never_forwarded() {
    let mock = MockUpstream::start().await;
    let proxy = with_client_keys(&mock, |_| {}).await;
    let bearer = format!("Bearer {CLIENT_KEY}");
    let accepted: [&[(&str, &str)]; 3] = [
        &[("authorization", &bearer)],
        &[("api-key", OTHER_CLIENT_KEY)],
        &[
            ("authorization", "Bearer not-mine"),
            ("api-key", CLIENT_KEY),
        ],
    ];
    for headers in accepted {
        let reply = chat_with(&proxy, headers).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{headers:?}: {}",
            reply.text()
        );
    }
    let calls = mock.calls();
    assert_eq!(calls.len(), 3);
    for call in &calls {
        assert_eq!(
            call.key.as_deref(),
            Some(KEY_A),
            "authenticated as the pool key"
        );
        assert!(call.headers.get("api-key").is_none());
        let authorizations: Vec<_> = call.headers.get_all("authorization").iter().collect();
        assert_eq!(authorizations, [format!("Bearer {KEY_A}").as_str()]);
        for (name, value) in &call.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            for client_key in [CLIENT_KEY, OTHER_CLIENT_KEY, "not-mine"] {
                assert!(
                    !value.contains(client_key),
                    "{name} carried a client key upstream"
                );
            }
        }
    }
}

#[tokio::test]
async fn preflights_are_answered_by_the_proxy_for_allowed_origins_only() {
    let mock = MockUpstream::start().await;
    let proxy = with_client_keys(&mock, |config| {
        config.cors.allowed_origins = vec![APP.to_owned()];
    })
    .await;
    let preflight = |origin: &str| {
        proxy.request(
            Method::OPTIONS,
            "/v1/chat/completions",
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type, x-stainless-os, x-stainless-retry-count, openai-beta",
                ),
            ],
            Bytes::new(),
        )
    };
    let allowed = proxy.call(preflight(APP)).await;
    assert_eq!(
        allowed.status,
        StatusCode::NO_CONTENT,
        "no client key needed"
    );
    assert_eq!(allowed.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        allowed.header("access-control-allow-headers"),
        Some("authorization, content-type, x-stainless-os, x-stainless-retry-count, openai-beta")
    );
    assert!(
        allowed
            .header("access-control-allow-methods")
            .is_some_and(|m| m.contains("POST"))
    );
    assert!(allowed.header("access-control-max-age").is_some());

    let denied = proxy.call(preflight("https://evil.example.com")).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.error_code(), "origin_not_allowed");
    assert!(denied.header("access-control-allow-origin").is_none());
    assert_eq!(mock.calls().len(), 0, "preflights never reach the upstream");
}

#[tokio::test]
async fn responses_and_errors_carry_cors_headers_for_allowed_origins() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Status {
            status: 200,
            body: r#"{"ok":true}"#.to_owned(),
            headers: vec![
                ("access-control-allow-origin".to_owned(), "*".to_owned()),
                (
                    "access-control-allow-credentials".to_owned(),
                    "true".to_owned(),
                ),
            ],
        },
    );
    let proxy = with_client_keys(&mock, |config| {
        config.cors.allowed_origins = vec![APP.to_owned()];
    })
    .await;
    let bearer = format!("Bearer {CLIENT_KEY}");
    let ok = chat_with(&proxy, &[("authorization", &bearer), ("origin", APP)]).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.header("access-control-allow-origin"), Some(APP));
    assert!(
        ok.header("access-control-allow-credentials").is_none(),
        "upstream's CORS replaced"
    );
    assert!(ok.header("vary").is_some_and(|v| v.contains("Origin")));
    assert!(
        ok.header("access-control-expose-headers")
            .is_some_and(|h| h.contains("x-ratelimit-remaining-requests"))
    );

    let unauthorized = chat_with(&proxy, &[("origin", APP)]).await;
    assert_eq!(unauthorized.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        unauthorized.header("access-control-allow-origin"),
        Some(APP)
    );
    let missing = proxy
        .call(proxy.request(Method::GET, "/nowhere", &[("origin", APP)], Bytes::new()))
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.header("access-control-allow-origin"), Some(APP));

    let foreign = chat_with(
        &proxy,
        &[
            ("authorization", &bearer),
            ("origin", "https://evil.example.com"),
        ],
    )
    .await;
    assert_eq!(
        foreign.status,
        StatusCode::OK,
        "CORS is the browser's to enforce"
    );
    assert!(foreign.header("access-control-allow-origin").is_none());
    assert!(foreign.header("access-control-allow-credentials").is_none());

    let default = one_key(&mock).await;
    let any = default
        .call(default.request(
            Method::POST,
            "/v1/chat/completions",
            &[("origin", "https://anything.test")],
            CHAT,
        ))
        .await;
    assert_eq!(any.status, StatusCode::OK);
    assert!(
        any.header("access-control-allow-origin").is_none(),
        "default: CORS off"
    );
}

#[tokio::test]
async fn past_max_inflight_requests_get_503_overloaded_with_retry_after() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Hang);
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.server.max_inflight = 1;
    })
    .await;
    let client = proxy.client.clone();
    let hanging = proxy.request(Method::POST, "/v1/chat/completions", &[], CHAT);
    let pending = tokio::spawn(async move { client.request(hanging).await });
    assert!(mock.wait_calls(1, support::proxy_harness::WAIT).await);

    let refused = proxy.chat("gpt-4o").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.error_code(), "overloaded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        mock.calls().len(),
        1,
        "the refused request made no upstream call"
    );
    assert_eq!(
        proxy.get("/health").await.status,
        StatusCode::OK,
        "probes are not counted"
    );

    pending.abort();
    assert!(mock.wait_cancelled(1, support::proxy_harness::WAIT).await);
    mock.set(KEY_A, Behaviour::Ok);
    assert_eq!(
        proxy.chat("gpt-4o").await.status,
        StatusCode::OK,
        "the slot was freed"
    );
}

#[tokio::test]
async fn a_stream_holds_its_inflight_slot_until_its_last_byte() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 4,
            interval: Duration::from_millis(250),
        },
    );
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.server.max_inflight = 1;
    })
    .await;
    let stream = proxy
        .send(proxy.request(
            Method::POST,
            "/v1/chat/completions",
            &[],
            r#"{"model":"gpt-4o","stream":true}"#,
        ))
        .await;
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(
        proxy.chat("gpt-4o").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(read(stream).await.status, StatusCode::OK);
    mock.set(KEY_A, Behaviour::Ok);
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_admin_api_is_off_without_a_token_and_not_on_the_client_listener() {
    let mock = MockUpstream::start().await;
    let proxy = two_named_keys(&mock, None).await;
    let off = proxy
        .admin(Method::GET, "/admin/keys", Some("anything"))
        .await;
    assert_eq!(off.status, StatusCode::NOT_FOUND);
    assert!(!off.text().contains("alpha"), "{}", off.text());
    let reload = proxy.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(reload.status, StatusCode::NOT_FOUND);

    let with_token = two_named_keys(&mock, Some(ADMIN_TOKEN)).await;
    let request = with_token.request(
        Method::GET,
        "/admin/keys",
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        Bytes::new(),
    );
    let client_side = with_token.call(request).await;
    assert_eq!(
        client_side.status,
        StatusCode::NOT_FOUND,
        "the client listener has no admin API"
    );
    assert!(!client_side.text().contains("alpha"));
}

#[tokio::test]
async fn the_admin_api_needs_its_token() {
    let mock = MockUpstream::start().await;
    let proxy = two_named_keys(&mock, Some(ADMIN_TOKEN)).await;
    let wrong = format!("{ADMIN_TOKEN}0");
    for token in [
        None,
        Some("wrong"),
        Some(&ADMIN_TOKEN[1..]),
        Some(wrong.as_str()),
    ] {
        for (method, path) in [
            (Method::GET, "/admin/keys"),
            (Method::POST, "/admin/keys/alpha/disable"),
            (Method::POST, "/admin/reload"),
        ] {
            let reply = proxy.admin(method, path, token).await;
            assert_eq!(
                reply.status,
                StatusCode::UNAUTHORIZED,
                "{path} with {token:?}"
            );
            assert_eq!(reply.error_code(), "invalid_admin_token");
            assert_no_secret(reply.text());
        }
    }
    let keys = proxy
        .app
        .pool()
        .snapshot(key_cycle_proxy::server::clock::now());
    assert!(
        keys.iter().all(|k| k.status.as_str() == "available"),
        "nothing changed"
    );
}

#[tokio::test]
async fn the_admin_api_lists_keys_without_secrets_and_steers_routing() {
    let mock = MockUpstream::start().await;
    let proxy = two_named_keys(&mock, Some(ADMIN_TOKEN)).await;
    let listed = proxy
        .admin(Method::GET, "/admin/keys", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_no_secret(listed.text());
    let keys: Vec<Value> = listed.json()["keys"].as_array().expect("keys").clone();
    let names: Vec<&str> = keys.iter().filter_map(|k| k["name"].as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert_eq!(keys[0]["fingerprint"], Secret::new(KEY_A).fingerprint());
    assert_eq!(keys[1]["fingerprint"], Secret::new(KEY_B).fingerprint());

    let disabled = proxy
        .admin(Method::POST, "/admin/keys/alpha/disable", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(disabled.status, StatusCode::OK, "{}", disabled.text());
    assert_eq!(disabled.json()["status"], "disabled");
    for _ in 0..4 {
        assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    }
    assert_eq!(mock.calls_for(KEY_A), 0, "a disabled key gets no calls");
    assert_eq!(mock.calls_for(KEY_B), 4);

    let enabled = proxy
        .admin(Method::POST, "/admin/keys/alpha/enable", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(enabled.status, StatusCode::OK);
    assert_eq!(enabled.json()["status"], "available");
    for _ in 0..4 {
        assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    }
    assert_eq!(mock.calls_for(KEY_A), 2, "round robin again");

    let unknown = proxy
        .admin(Method::POST, "/admin/keys/gamma/disable", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.error_code(), "key_not_found");

    let metrics = proxy.admin(Method::GET, "/metrics", None).await;
    assert_eq!(metrics.status, StatusCode::OK, "metrics need no token");
    assert_no_secret(metrics.text());
}
