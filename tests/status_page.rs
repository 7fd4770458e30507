//! The status page over HTTP: who may see it, what it serves, and that no secret is on it.

mod support;

use std::num::NonZeroU32;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use key_cycle_proxy::core::Secret;
use support::mock_upstream::RateLimit;
use support::proxy_harness::{Proxy, Reply, loaded_config, read, send_with, start_loaded};
use support::{Behaviour, MockUpstream};

const TOKEN: &str = "status-admin-token-9c41d2e7";
const KEYS: [&str; 3] = [
    "sk-status-alpha-7f3a9c1e2b4d6f80",
    "sk-status-busy-1a2b3c4d5e6f7a8b",
    "sk-status-gone-0f9e8d7c6b5a4b3c",
];

async fn start(admin_token: Option<&str>) -> (MockUpstream, Proxy) {
    let mock = MockUpstream::start().await;
    let url = format!("{}/v1", mock.url());
    let mut loaded = loaded_config(
        KEYS.iter()
            .map(|k| (*k, url.clone(), vec!["others"]))
            .collect(),
        |config| config.observability.admin_token = admin_token.map(Secret::new),
    );
    for (key, name) in loaded.keys.iter_mut().zip(["alpha", "busy", "gone"]) {
        key.name = Some(name.to_owned());
    }
    mock.limit(
        KEYS[1],
        RateLimit::per_minute(NonZeroU32::new(6).expect("6")),
    );
    mock.set(KEYS[2], Behaviour::Unauthorized);
    (mock, start_loaded(loaded).await)
}

async fn get(proxy: &Proxy, path: &str, authorization: Option<String>) -> Reply {
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(proxy.metrics_url(path));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let request = request.body(Full::new(Bytes::new())).expect("request");
    read(send_with(&proxy.client, request).await).await
}

fn basic(user: &str, password: &str) -> Option<String> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    Some(format!("Basic {encoded}"))
}

#[tokio::test]
async fn with_an_admin_token_the_page_and_its_json_need_it() {
    let (_mock, proxy) = start(Some(TOKEN)).await;
    for path in ["/", "/status.json"] {
        let denied = get(&proxy, path, None).await;
        assert_eq!(denied.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(denied.error_code(), "invalid_admin_token");
        assert_eq!(
            denied.header("www-authenticate"),
            Some("Basic realm=\"kcp status\", charset=\"UTF-8\"")
        );
        let wrong = get(&proxy, path, basic("admin", "not-the-token")).await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{path}");
        for good in [
            basic("admin", TOKEN),
            basic("", TOKEN),
            Some(format!("Bearer {TOKEN}")),
        ] {
            assert_eq!(
                get(&proxy, path, good).await.status,
                StatusCode::OK,
                "{path}"
            );
        }
    }
    let status = get(&proxy, "/status.json", basic("x", TOKEN)).await.json();
    assert_eq!(status["admin"], true, "buttons are shown");
}

#[tokio::test]
async fn without_a_token_the_page_is_open_and_has_no_buttons() {
    let (_mock, proxy) = start(None).await;
    let page = get(&proxy, "/", None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.text().contains("<canvas id=\"chart\""));
    let status = get(&proxy, "/status.json", None).await.json();
    assert_eq!(status["admin"], false);
    let names: Vec<&str> = status["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["alpha", "busy", "gone"]);
    assert_eq!(status["totals"]["keys"]["total"], 3);
    let post = proxy
        .call(
            Request::post(proxy.metrics_url("/status.json"))
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn the_json_shows_states_counts_and_limits_and_never_a_secret() {
    let (mock, proxy) = start(Some(TOKEN)).await;
    // `busy` holds one request (6 RPM) and says so in its headers: the proxy learns that and
    // holds it back rather than spend a 429. `gone` answers 401 and is disabled.
    for _ in 0..6 {
        proxy.chat("gpt-4o-mini").await;
    }
    assert_eq!(mock.calls_for(KEYS[1]), 1, "a spent key is not asked again");
    assert_eq!(
        mock.calls_for(KEYS[2]),
        1,
        "a disabled key gets no second request"
    );
    let status = get(&proxy, "/status.json", basic("x", TOKEN)).await;
    let json = status.json();
    let key = |name: &str| {
        json["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .find(|k| k["name"] == name)
            .cloned()
            .expect("key present")
    };
    assert_eq!(key("gone")["status"], "disabled");
    assert_eq!(key("gone")["disabled_reason"], "unauthorized");
    assert_eq!(key("busy")["status"], "limited");
    assert_eq!(key("busy")["limits"]["limit_requests"], 6);
    assert_eq!(key("busy")["limits"]["remaining_requests"], 0);
    assert_eq!(key("busy")["requests"], 1);
    assert_eq!(key("alpha")["status"], "available");
    assert_eq!(key("alpha")["requests"], 5);
    assert_eq!(json["totals"]["keys"]["disabled"], 1);
    assert_eq!(json["totals"]["keys"]["limited"], 1);
    assert_eq!(json["totals"]["requests"], 7);
    assert_eq!(json["totals"]["errors"], 1);
    let page = get(&proxy, "/", basic("x", TOKEN)).await;
    for secret in KEYS.iter().copied().chain([TOKEN]) {
        for text in [status.text(), page.text()] {
            assert!(!text.contains(secret), "a secret is on the status page");
            assert!(
                !text.contains(&secret[3..15]),
                "part of a secret is on the page"
            );
        }
    }
}
