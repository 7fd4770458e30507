//! Reading real upstream answers (the mock provider through the upstream client): which bodies
//! are read and classified, the size bound, and what the client gets of each.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use kcp_core::{Answer, KeySpec, Secret};
use kcp_mock::{Behaviour, MockUpstream};

use super::{ERROR_BODY_LIMIT, Read, read};
use crate::app::App;
use crate::config::{Config, KeySources, LoadedConfig};

const KEY: &str = "sk-reply-test-aaaa";
/// Bound for anything that happens promptly on loopback.
const WAIT: Duration = Duration::from_secs(10);

/// The mock's answer to one chat request, read by [`read`].
async fn answer_of(behaviour: Behaviour) -> Read {
    let mock = MockUpstream::start().await;
    mock.set(KEY, behaviour);
    let app = App::new(LoadedConfig {
        config: Config::default(),
        keys: vec![KeySpec::new(Secret::new(KEY), mock.url().as_str())],
        client_keys: Vec::new(),
        sources: KeySources::default(),
    })
    .expect("valid test app");
    let request = Request::post(format!("{}/v1/chat/completions", mock.url()))
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(br#"{"model":"gpt-4o"}"#)))
        .expect("request");
    let response = tokio::time::timeout(WAIT, app.upstream.send(request))
        .await
        .expect("answered in time")
        .expect("answered");
    tokio::time::timeout(WAIT, read(response))
        .await
        .expect("read in time")
}

/// An error body of exactly `len` bytes with `code`.
fn error_body(code: &str, len: usize) -> String {
    let head = format!(r#"{{"error":{{"code":"{code}","type":"requests","message":""#);
    let tail = r#""}}"#;
    let pad = len - head.len() - tail.len();
    let body = format!("{head}{}{tail}", "x".repeat(pad));
    assert_eq!(body.len(), len);
    body
}

fn status(status: u16, body: String) -> Behaviour {
    Behaviour::Status {
        status,
        body,
        headers: vec![("openai-organization".into(), "org-test".into())],
    }
}

/// What the client gets of `read`: status, content-length and body.
async fn delivered(read: Read) -> (StatusCode, Option<String>, Bytes) {
    let response = read.into_response(
        KeySpec::new(Secret::new(KEY), "http://x")
            .with_name("k")
            .id(),
    );
    let (parts, body) = response.into_parts();
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .map(|v| v.to_str().expect("ascii").to_owned());
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (parts.status, length, body)
}

#[test]
fn the_error_body_limit_is_16_kib() {
    assert_eq!(ERROR_BODY_LIMIT, 16_384);
}

#[tokio::test]
async fn a_429_body_up_to_the_limit_is_read_and_classified() {
    let body = error_body("insufficient_quota", ERROR_BODY_LIMIT);
    let read = answer_of(status(429, body.clone())).await;
    assert_eq!(read.status(), 429);
    match read.answer(Duration::from_millis(7)) {
        Answer::Reply(reply) => {
            assert_eq!(reply.status, 429);
            assert_eq!(reply.error.code, Some("insufficient_quota"));
            assert_eq!(reply.error.kind, Some("requests"));
            assert_eq!(reply.organization, Some("org-test"));
            assert_eq!(reply.latency, Duration::from_millis(7));
        }
        Answer::Failed { .. } => panic!("a reply"),
    }
    let (status, length, delivered) = delivered(read).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(delivered, body.as_bytes(), "passed on from memory");
    assert_eq!(length, Some(body.len().to_string()));
}

#[tokio::test]
async fn a_429_body_past_the_limit_is_not_read_and_not_passed_on() {
    let read = answer_of(status(
        429,
        error_body("insufficient_quota", ERROR_BODY_LIMIT + 1),
    ))
    .await;
    assert_eq!(read.status(), 429);
    match read.answer(Duration::ZERO) {
        Answer::Reply(reply) => assert_eq!(reply.error.code, None, "not read"),
        Answer::Failed { .. } => panic!("a reply"),
    }
    let (status, length, delivered) = delivered(read).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(length, None, "no length for a body that is not there");
    assert!(delivered.is_empty());
}

#[tokio::test]
async fn a_quoted_key_in_a_403_is_masked_and_the_length_follows() {
    let body =
        r#"{"error":{"code":"model_not_found","message":"key sk-proj-abcdef has no access"}}"#;
    let read = answer_of(status(403, body.to_owned())).await;
    assert_eq!(read.status(), 403);
    let (status, length, delivered) = delivered(read).await;
    let masked = r#"{"error":{"code":"model_not_found","message":"key sk-*** has no access"}}"#;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(delivered, masked.as_bytes());
    assert_eq!(length, Some(masked.len().to_string()));
}

#[tokio::test]
async fn other_statuses_stream_unread() {
    let body = error_body("server_error", 100);
    let read = answer_of(status(500, body.clone())).await;
    assert_eq!(read.status(), 500);
    match read.answer(Duration::ZERO) {
        Answer::Reply(reply) => {
            assert_eq!(reply.status, 500);
            assert_eq!(reply.error.code, None, "a 500's body is not read");
        }
        Answer::Failed { .. } => panic!("a reply"),
    }
    let (status, _, delivered) = delivered(read).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(delivered, body.as_bytes(), "streamed through");
}
