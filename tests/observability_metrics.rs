//! End-to-end: the metrics on `/metrics` after scripted scenarios, with exact names, labels and
//! values.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use key_cycle_proxy::server::app::App;
use key_cycle_proxy::server::cli::Cli;
use key_cycle_proxy::server::config;
use support::observe::{named_keys, scrape, series, value};
use support::proxy_harness::{Proxy, WAIT, closed_port_url, read, start_app, start_loaded};
use support::{Behaviour, KEY_A, KEY_B, KEY_C, MockUpstream};

const GPT_4O: &[&str] = &["gpt-4o"];

async fn proxy_of(url: &str, keys: &[(&str, &str, &[&str])]) -> Proxy {
    start_loaded(named_keys(url, keys, |_| {})).await
}

/// Keys a, b and c on `mock` serving `gpt-4o`, in that order, after `tweak`.
fn abc(mock: &MockUpstream, tweak: impl FnOnce(&mut config::Config)) -> config::LoadedConfig {
    named_keys(
        &mock.url(),
        &[
            ("a", KEY_A, GPT_4O),
            ("b", KEY_B, GPT_4O),
            ("c", KEY_C, GPT_4O),
        ],
        tweak,
    )
}

#[tokio::test]
async fn a_rate_limited_failover_is_counted_exactly() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::rate_limited_secs(30));
    let proxy = proxy_of(&mock.url(), &[("a", KEY_A, GPT_4O), ("b", KEY_B, GPT_4O)]).await;

    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(mock.calls_for(KEY_A), 1);
    assert_eq!(mock.calls_for(KEY_B), 1);

    let text = scrape(&proxy).await;
    assert_eq!(
        series(&text, "kcp_upstream_requests_total"),
        [
            r#"kcp_upstream_requests_total{key="a",outcome="rate_limited"} 1"#,
            r#"kcp_upstream_requests_total{key="b",outcome="success"} 1"#,
        ]
    );
    assert_eq!(
        series(&text, "kcp_retries_total"),
        [r#"kcp_retries_total{reason="rate_limited"} 1"#]
    );
    assert_eq!(
        series(&text, "kcp_requests_total"),
        [r#"kcp_requests_total{model="gpt-4o",status="200"} 1"#]
    );
    for (selector, expected) in [
        (r#"kcp_request_duration_seconds_count{model="gpt-4o"}"#, 1.0),
        (r#"kcp_upstream_ttfb_seconds_count{key="a"}"#, 1.0),
        (r#"kcp_upstream_ttfb_seconds_count{key="b"}"#, 1.0),
        ("kcp_overhead_seconds_count", 1.0),
        ("kcp_queue_wait_seconds_count", 1.0),
        ("kcp_queue_wait_seconds_sum", 0.0),
        ("kcp_inflight_requests", 0.0),
        (r#"kcp_key_state{key="a",state="cooling"}"#, 1.0),
        (r#"kcp_key_state{key="a",state="available"}"#, 0.0),
        (r#"kcp_key_state{key="b",state="available"}"#, 1.0),
        (r#"kcp_key_cooldown_seconds{key="b"}"#, 0.0),
    ] {
        assert_eq!(
            value(&text, selector),
            Some(expected),
            "{selector} in\n{text}"
        );
    }
    let cooldown = value(&text, r#"kcp_key_cooldown_seconds{key="a"}"#).expect("a cools");
    assert!((25.0..=30.0).contains(&cooldown), "{cooldown}");
    let ones = series(&text, "kcp_key_state{")
        .into_iter()
        .filter(|l| l.ends_with(" 1"))
        .count();
    assert_eq!(ones, 2, "one state per key:\n{text}");
    let overhead = value(&text, "kcp_overhead_seconds_sum").expect("overhead");
    let total = value(&text, r#"kcp_request_duration_seconds_sum{model="gpt-4o"}"#).expect("total");
    assert!(overhead < total, "overhead {overhead} < total {total}");
    for name in ["process_resident_memory_bytes", "process_cpu_seconds_total"] {
        assert!(!series(&text, name).is_empty(), "missing {name}");
    }
    assert!(!text.contains(KEY_A) && !text.contains(KEY_B));
}

#[tokio::test]
async fn model_labels_are_bounded_to_configured_models() {
    let mock = MockUpstream::start().await;
    let models: &[&str] = &["gpt-4o", "others"];
    let proxy = proxy_of(&mock.url(), &[("a", KEY_A, models)]).await;
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    assert_eq!(proxy.chat("gpt-4o-2024-08-06").await.status, StatusCode::OK);
    assert_eq!(proxy.chat("made-up-model-123").await.status, StatusCode::OK);
    assert_eq!(proxy.get("/v1/models").await.status, StatusCode::OK);

    let text = scrape(&proxy).await;
    assert_eq!(
        series(&text, "kcp_requests_total"),
        [
            r#"kcp_requests_total{model="gpt-4o",status="200"} 1"#,
            r#"kcp_requests_total{model="none",status="200"} 1"#,
            r#"kcp_requests_total{model="other",status="200"} 2"#,
        ]
    );
    assert!(!text.contains("made-up-model-123"), "{text}");
}

#[tokio::test]
async fn a_model_no_key_serves_is_counted_as_other_without_upstream_calls() {
    let mock = MockUpstream::start().await;
    let proxy = proxy_of(&mock.url(), &[("a", KEY_A, GPT_4O)]).await;
    let reply = proxy.chat("made-up-model-123").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let text = scrape(&proxy).await;
    assert_eq!(
        series(&text, "kcp_requests_total"),
        [r#"kcp_requests_total{model="other",status="404"} 1"#]
    );
    assert!(series(&text, "kcp_upstream_requests_total").is_empty());
    assert!(series(&text, "kcp_retries_total").is_empty());
}

#[tokio::test]
async fn key_rejections_and_server_errors_are_counted_by_outcome_and_reason() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Unauthorized);
    mock.set(KEY_B, Behaviour::InsufficientQuota);
    let proxy = start_loaded(abc(&mock, |config| config.upstream.max_retries = 2)).await;
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    mock.script(KEY_C, vec![Behaviour::status(500), Behaviour::Ok]);
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);

    let text = scrape(&proxy).await;
    assert_eq!(
        series(&text, "kcp_upstream_requests_total"),
        [
            r#"kcp_upstream_requests_total{key="a",outcome="auth"} 1"#,
            r#"kcp_upstream_requests_total{key="b",outcome="quota"} 1"#,
            r#"kcp_upstream_requests_total{key="c",outcome="server_error"} 1"#,
            r#"kcp_upstream_requests_total{key="c",outcome="success"} 2"#,
        ]
    );
    assert_eq!(
        series(&text, "kcp_retries_total"),
        [
            r#"kcp_retries_total{reason="key_rejected"} 2"#,
            r#"kcp_retries_total{reason="server_error"} 1"#,
        ]
    );
    assert_eq!(
        series(&text, "kcp_requests_total"),
        [r#"kcp_requests_total{model="gpt-4o",status="200"} 2"#]
    );
    for key in ["a", "b"] {
        let selector = format!(r#"kcp_key_state{{key="{key}",state="disabled"}}"#);
        assert_eq!(value(&text, &selector), Some(1.0), "{selector}");
    }
    assert_eq!(
        value(&text, r#"kcp_key_state{key="c",state="available"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn connect_errors_are_retried_and_a_post_timeout_is_not() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_B, Behaviour::Hang);
    let closed = closed_port_url().await;
    let mut loaded = abc(&mock, |config| {
        config.upstream.max_retries = 2;
        config.upstream.request_timeout_ms = 300;
    });
    loaded.keys[0].url = closed;
    let proxy = start_loaded(loaded).await;
    // The POST that timed out on b may have been billed: it is not sent again.
    assert_eq!(
        proxy.chat("gpt-4o").await.status,
        StatusCode::GATEWAY_TIMEOUT
    );

    let text = scrape(&proxy).await;
    assert_eq!(
        series(&text, "kcp_upstream_requests_total"),
        [
            r#"kcp_upstream_requests_total{key="a",outcome="connect_error"} 1"#,
            r#"kcp_upstream_requests_total{key="b",outcome="timeout"} 1"#,
        ]
    );
    assert_eq!(
        series(&text, "kcp_retries_total"),
        [r#"kcp_retries_total{reason="connect_error"} 1"#]
    );
    assert!(
        series(&text, "kcp_upstream_ttfb_seconds_count").is_empty(),
        "no attempt was answered:\n{text}"
    );
}

#[tokio::test]
async fn a_stream_is_recorded_when_its_body_ends() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 5,
            interval: Duration::from_millis(40),
        },
    );
    let proxy = proxy_of(&mock.url(), &[("a", KEY_A, GPT_4O)]).await;
    let request = proxy.request(
        Method::POST,
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
    );
    let response = proxy.send(request).await;
    assert_eq!(response.status(), StatusCode::OK);

    let during = scrape(&proxy).await;
    assert_eq!(value(&during, "kcp_inflight_requests"), Some(1.0));
    assert!(series(&during, "kcp_requests_total").is_empty(), "{during}");
    assert_eq!(
        series(&during, "kcp_upstream_requests_total"),
        [r#"kcp_upstream_requests_total{key="a",outcome="success"} 1"#]
    );

    let reply = read(response).await;
    assert!(reply.text().ends_with("data: [DONE]\n\n"));
    let after = scrape(&proxy).await;
    assert_eq!(value(&after, "kcp_inflight_requests"), Some(0.0));
    assert_eq!(
        series(&after, "kcp_requests_total"),
        [r#"kcp_requests_total{model="gpt-4o",status="200"} 1"#]
    );
    let total = value(
        &after,
        r#"kcp_request_duration_seconds_sum{model="gpt-4o"}"#,
    )
    .expect("duration");
    assert!(total >= 0.15, "the duration covers the stream: {total}");
    let overhead = value(&after, "kcp_overhead_seconds_sum").expect("overhead");
    assert!(
        overhead < 0.15,
        "streaming time is not overhead: {overhead}"
    );
}

#[tokio::test]
async fn a_client_leaving_before_the_head_is_recorded_as_499() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Hang);
    let proxy = proxy_of(&mock.url(), &[("a", KEY_A, GPT_4O)]).await;
    let request = proxy.request(
        Method::POST,
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        r#"{"model":"gpt-4o","messages":[]}"#,
    );
    let client = proxy.client.clone();
    let pending = tokio::spawn(async move { client.request(request).await });
    assert!(mock.wait_calls(1, WAIT).await);
    pending.abort();
    assert!(mock.wait_cancelled(1, WAIT).await);

    let recorded = r#"kcp_requests_total{model="gpt-4o",status="499"} 1"#;
    let text = eventually(&proxy, |text| text.lines().any(|l| l == recorded)).await;
    assert_eq!(value(&text, "kcp_inflight_requests"), Some(0.0));
    assert_eq!(
        value(&text, "kcp_overhead_seconds_count"),
        Some(0.0),
        "no head, no overhead"
    );
}

#[tokio::test]
async fn a_client_leaving_mid_stream_ends_the_request() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 200,
            interval: Duration::from_millis(20),
        },
    );
    let proxy = proxy_of(&mock.url(), &[("a", KEY_A, GPT_4O)]).await;
    let request = proxy.request(
        Method::POST,
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
    );
    let response = proxy.send(request).await;
    let mut body = response.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("a frame");
    assert!(first.is_some_and(|f| f.is_ok()));
    drop(body);
    assert!(mock.wait_cancelled(1, WAIT).await);

    let recorded = r#"kcp_requests_total{model="gpt-4o",status="200"} 1"#;
    let text = eventually(&proxy, |text| text.lines().any(|l| l == recorded)).await;
    assert_eq!(value(&text, "kcp_inflight_requests"), Some(0.0));
}

#[tokio::test]
async fn probes_and_the_metrics_listener_are_not_counted() {
    let mock = MockUpstream::start().await;
    let proxy = proxy_of(&mock.url(), &[("a", KEY_A, GPT_4O)]).await;
    assert_eq!(proxy.get("/health").await.status, StatusCode::OK);
    assert_eq!(proxy.get("/ready").await.status, StatusCode::OK);
    let _ = scrape(&proxy).await;
    assert_eq!(proxy.get("/nope").await.status, StatusCode::NOT_FOUND);
    let text = scrape(&proxy).await;
    assert_eq!(
        series(&text, "kcp_requests_total"),
        [r#"kcp_requests_total{model="none",status="404"} 1"#]
    );
}

#[tokio::test]
async fn waiting_for_a_cooling_key_is_observed() {
    let mock = MockUpstream::start().await;
    mock.script(
        KEY_A,
        vec![
            Behaviour::RateLimited {
                retry_after: None,
                retry_after_ms: Some("150".to_owned()),
                reset_requests: None,
            },
            Behaviour::Ok,
        ],
    );
    let proxy = proxy_of(&mock.url(), &[("a", KEY_A, GPT_4O)]).await;
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    let text = scrape(&proxy).await;
    assert_eq!(
        series(&text, "kcp_upstream_requests_total"),
        [
            r#"kcp_upstream_requests_total{key="a",outcome="rate_limited"} 1"#,
            r#"kcp_upstream_requests_total{key="a",outcome="success"} 1"#,
        ]
    );
    assert_eq!(
        series(&text, "kcp_retries_total"),
        [r#"kcp_retries_total{reason="rate_limited"} 1"#]
    );
    assert_eq!(value(&text, "kcp_queue_wait_seconds_count"), Some(1.0));
    let waited = value(&text, "kcp_queue_wait_seconds_sum").expect("a wait");
    assert!((0.1..5.0).contains(&waited), "{waited}");
    let overhead = value(&text, "kcp_overhead_seconds_sum").expect("overhead");
    assert!(
        overhead < 0.1,
        "waiting for a key is not overhead: {overhead}"
    );
}

#[tokio::test]
async fn a_reload_replaces_model_labels_and_key_gauges() {
    let mock = MockUpstream::start().await;
    let dir = std::env::temp_dir().join(format!(
        "kcp-metrics-reload-{}-{}",
        std::process::id(),
        mock.addr().port()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("config.toml");
    let write = |keys: &[(&str, &str)], model: &str| {
        let mut toml = String::from(
            "[server]\nbind_addr = \"127.0.0.1:0\"\n[observability]\nmetrics_bind = \"127.0.0.1:0\"\n",
        );
        for (name, key) in keys {
            toml.push_str(&format!(
                "[[api_keys]]\nkey = \"{key}\"\nurl = \"{}\"\nmodels = [\"{model}\"]\nname = \"{name}\"\n",
                mock.url()
            ));
        }
        std::fs::write(&path, toml).expect("write config.toml");
    };
    write(&[("a", KEY_A), ("b", KEY_B)], "gpt-4o");
    let cli = Cli {
        config: Some(path.clone()),
        ..Cli::default()
    };
    let loaded = config::load(&cli).expect("valid config");
    let proxy = start_app(App::new(loaded).expect("valid").reloadable(cli)).await;
    for _ in 0..2 {
        assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    }
    let before = scrape(&proxy).await;
    assert_eq!(
        value(&before, r#"kcp_key_state{key="b",state="available"}"#),
        Some(1.0)
    );

    write(&[("a", KEY_A), ("c", KEY_C)], "o3");
    assert_eq!(proxy.app.reload().expect("valid reload"), 2);
    assert_eq!(proxy.chat("o3").await.status, StatusCode::OK);
    assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::NOT_FOUND);
    let after = scrape(&proxy).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        series(&after, "kcp_requests_total"),
        [
            r#"kcp_requests_total{model="gpt-4o",status="200"} 2"#,
            r#"kcp_requests_total{model="o3",status="200"} 1"#,
            r#"kcp_requests_total{model="other",status="404"} 1"#,
        ]
    );
    assert!(
        series(&after, r#"kcp_key_state{key="b""#).is_empty(),
        "{after}"
    );
    assert_eq!(
        value(&after, r#"kcp_key_state{key="c",state="available"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(
            &after,
            r#"kcp_upstream_requests_total{key="b",outcome="success"}"#
        ),
        Some(1.0),
        "counters of a removed key stay"
    );
}

/// Scrapes until `done` holds for the exposition (an effect of a dropped connection lands a
/// moment after the upstream sees it), or fails after [`WAIT`].
async fn eventually(proxy: &Proxy, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = scrape(proxy).await;
        if done(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {WAIT:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
