//! End-to-end: request ids, JSON log lines, the access line and key state-change lines.
//!
//! This binary installs one process-wide JSON subscriber at `info` that captures every line;
//! tests run in parallel, so each one picks out its own lines by request id.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use key_cycle_proxy::server::observe::access_log;
use serde_json::Value;
use support::mock_upstream::sse_events;
use support::observe::{Captured, capture_logs, named_keys};
use support::proxy_harness::{Proxy, Reply, WAIT, read, start_loaded};
use support::{Behaviour, KEY_A, KEY_B, MockUpstream};

const GPT_4O: &[&str] = &["gpt-4o"];
const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

fn logs() -> Captured {
    capture_logs("info")
}

async fn two_keys(mock: &MockUpstream) -> Proxy {
    start_loaded(named_keys(
        &mock.url(),
        &[("a", KEY_A, GPT_4O), ("b", KEY_B, GPT_4O)],
        |_| {},
    ))
    .await
}

async fn chat_with_id(proxy: &Proxy, id: Option<&str>) -> Reply {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(id.map(|id| ("x-request-id", id)));
    let request = proxy.request(Method::POST, "/v1/chat/completions", &headers, CHAT);
    proxy.call(request).await
}

/// The request's access line: exactly one.
fn access_line(logs: &Captured, id: &str) -> Value {
    let mut lines: Vec<Value> = logs
        .of_request(id)
        .into_iter()
        .filter(|l| l["target"] == access_log::TARGET)
        .collect();
    assert_eq!(lines.len(), 1, "one access line for {id}: {}", logs.text());
    lines.remove(0)
}

#[tokio::test]
async fn the_client_request_id_is_echoed_and_tags_the_json_access_line() {
    let logs = logs();
    let mock = MockUpstream::start().await;
    let proxy = two_keys(&mock).await;
    let id = "client-req-echo-7f3a";
    let reply = chat_with_id(&proxy, Some(id)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-kcp-request-id"), Some(id));
    let upstream_id = reply
        .header("x-request-id")
        .expect("the upstream's request id");
    assert!(upstream_id.starts_with("req_mock_"), "{upstream_id}");

    let line = access_line(&logs, id);
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["message"], "request finished");
    assert_eq!(line["request_id"], id);
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/v1/chat/completions");
    assert_eq!(line["model"], "gpt-4o");
    assert_eq!(line["status"], 200);
    assert_eq!(line["key"], "a");
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["bytes_out"], reply.body.len());
    assert_eq!(line["body"], "complete");
    assert!(line["upstream_ttfb_ms"].as_f64().is_some_and(|ms| ms > 0.0));
    let total = line["total_ms"].as_f64().expect("total_ms");
    assert!(total >= line["upstream_ttfb_ms"].as_f64().unwrap_or_default());
    assert!(line["timestamp"].is_string());
    logs.json_lines();
}

#[tokio::test]
async fn a_request_id_is_generated_when_the_client_sends_none_or_an_odd_one() {
    let logs = logs();
    let mock = MockUpstream::start().await;
    let proxy = two_keys(&mock).await;
    for sent in [None, Some("has space"), Some(&*"x".repeat(200))] {
        let reply = chat_with_id(&proxy, sent).await;
        assert_eq!(reply.status, StatusCode::OK);
        let id = reply.header("x-kcp-request-id").expect("an id");
        let hex = id.strip_prefix("kcp-").expect("a generated id");
        assert!(
            hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        assert_eq!(access_line(&logs, id)["request_id"], id);
    }
}

#[tokio::test]
async fn errors_and_unknown_paths_get_an_id_and_an_access_line() {
    let logs = logs();
    let mock = MockUpstream::start().await;
    let proxy = two_keys(&mock).await;
    let request = proxy.request(
        Method::GET,
        "/nope?token=abc",
        &[("x-request-id", "req-404")],
        "",
    );
    let reply = proxy.call(request).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.header("x-kcp-request-id"), Some("req-404"));
    let line = access_line(&logs, "req-404");
    assert_eq!(line["status"], 404);
    assert_eq!(line["path"], "/nope");
    assert_eq!(line["attempts"], 0);
    assert!(line.get("key").is_none() && line.get("model").is_none());
}

#[tokio::test]
async fn key_state_changes_are_warnings_in_the_request_that_caused_them() {
    let logs = logs();
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::rate_limited_secs(30));
    let proxy = two_keys(&mock).await;
    let id = "req-cooling-1";
    assert_eq!(chat_with_id(&proxy, Some(id)).await.status, StatusCode::OK);

    let lines = logs.of_request(id);
    let change = lines
        .iter()
        .find(|l| l["target"] == access_log::STATE_TARGET)
        .unwrap_or_else(|| panic!("a state change line: {lines:?}"));
    assert_eq!(change["level"], "WARN");
    assert_eq!(change["key"], "a");
    assert_eq!(change["state"], "cooling");
    assert_eq!(change["reason"], "rate_limited");
    let secs = change["for_secs"].as_f64().expect("for_secs");
    assert!((25.0..=30.0).contains(&secs), "{secs}");
    assert!(change["until"].as_str().is_some_and(|u| u.ends_with("GMT")));
    let access = access_line(&logs, id);
    assert_eq!(access["key"], "b");
    assert_eq!(access["attempts"], 2);
}

#[tokio::test]
async fn a_disabled_key_says_why() {
    let logs = logs();
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Unauthorized);
    let proxy = two_keys(&mock).await;
    let id = "req-disabled-1";
    assert_eq!(chat_with_id(&proxy, Some(id)).await.status, StatusCode::OK);
    let disabled: Vec<Value> = logs
        .of_request(id)
        .into_iter()
        .filter(|l| l["target"] == access_log::STATE_TARGET)
        .collect();
    assert_eq!(disabled.len(), 1, "{disabled:?}");
    assert_eq!(disabled[0]["level"], "WARN");
    assert_eq!(disabled[0]["key"], "a");
    assert_eq!(disabled[0]["state"], "disabled");
    assert_eq!(disabled[0]["reason"], "unauthorized");
}

#[tokio::test]
async fn a_stream_is_logged_when_it_ends_with_its_bytes() {
    let logs = logs();
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 4,
            interval: Duration::from_millis(10),
        },
    );
    let proxy = start_loaded(named_keys(&mock.url(), &[("a", KEY_A, GPT_4O)], |_| {})).await;
    let request = proxy.request(
        Method::POST,
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "req-stream-1"),
        ],
        r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
    );
    let reply = read(proxy.send(request).await).await;
    assert_eq!(reply.body, sse_events("gpt-4o", 4).concat());
    let line = access_line(&logs, "req-stream-1");
    assert_eq!(line["body"], "complete");
    assert_eq!(line["bytes_out"], reply.body.len());
    assert!(
        line["total_ms"].as_f64().is_some_and(|ms| ms >= 30.0),
        "{line}"
    );
}

#[tokio::test]
async fn a_stream_cut_upstream_is_logged_as_failed() {
    let logs = logs();
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::StreamThenReset { chunks: 3 });
    let proxy = start_loaded(named_keys(&mock.url(), &[("a", KEY_A, GPT_4O)], |_| {})).await;
    let request = proxy.request(
        Method::POST,
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "req-cut-1"),
        ],
        r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
    );
    let mut body = proxy.send(request).await.into_body();
    let mut received = 0;
    while let Some(frame) = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("in time")
    {
        match frame {
            Ok(frame) => received += frame.into_data().map_or(0, |d| d.len()),
            Err(_) => break,
        }
    }
    let lines = logs.of_request("req-cut-1");
    let line = access_line(&logs, "req-cut-1");
    assert_eq!(line["body"], "failed");
    assert!(
        line["bytes_out"]
            .as_u64()
            .is_some_and(|n| n >= received as u64)
    );
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"
            && l["key"] == "a"
            && l["target"] != access_log::STATE_TARGET),
        "the mid-stream failure is logged in the request: {lines:?}"
    );
}

#[tokio::test]
async fn a_client_leaving_before_the_answer_is_logged_with_what_was_tried() {
    let logs = logs();
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::Hang);
    let proxy = start_loaded(named_keys(&mock.url(), &[("a", KEY_A, GPT_4O)], |_| {})).await;
    let request = proxy.request(
        Method::POST,
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "req-gone-1"),
        ],
        CHAT,
    );
    let client = proxy.client.clone();
    let pending = tokio::spawn(async move { client.request(request).await });
    assert!(mock.wait_calls(1, WAIT).await);
    pending.abort();
    assert!(mock.wait_cancelled(1, WAIT).await);
    let deadline = tokio::time::Instant::now() + WAIT;
    let line = loop {
        let found = logs
            .of_request("req-gone-1")
            .into_iter()
            .find(|l| l["target"] == access_log::TARGET);
        if let Some(line) = found {
            break line;
        }
        assert!(tokio::time::Instant::now() < deadline, "no access line");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(line["status"], 499);
    assert_eq!(line["body"], "cancelled");
    assert_eq!(line["model"], "gpt-4o");
    assert_eq!(line["attempts"], 1);
}
