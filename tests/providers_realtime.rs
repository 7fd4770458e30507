//! End-to-end: the Realtime API over WebSocket through kcp, against the WebSocket echo
//! upstream of `support::realtime`. (A real SIGTERM during a session is in
//! `providers_realtime_sigterm.rs`, alone in its binary.)

mod support;

use futures_util::SinkExt;
use http::StatusCode;
use key_cycle_proxy::core::{DisableReason, KeyStatus, Secret};
use support::observe::capture_logs;
use support::proxy_harness::{loaded_config, resolved_key, start_loaded};
use support::realtime::*;
use support::time::freeze;
use support::{KEY_A, KEY_B};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn frames_flow_both_ways_on_the_pool_key_and_the_client_never_sees_it() {
    let logs = capture_logs("info");
    let upstream = RealtimeUpstream::start().await;
    let proxy = proxy(&upstream, &[KEY_A]).await;
    let (mut client, response) = open(&proxy).await;

    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let id = header(response.headers(), "x-kcp-request-id")
        .expect("a request id")
        .to_owned();
    let finished = || {
        logs.of_request(&id)
            .into_iter()
            .filter(|line| line["message"] == "request finished")
            .collect::<Vec<_>>()
    };
    assert!(
        finished().is_empty(),
        "no access line while the session is open"
    );
    for (name, value) in response.headers() {
        let value = value.to_str().unwrap_or_default();
        assert!(!value.contains(KEY_A), "{name} carries the key");
        assert_ne!(name, "authorization");
    }
    let handshakes = upstream.handshakes();
    assert_eq!(handshakes.len(), 1, "one upstream handshake");
    let (path, headers) = &handshakes[0];
    assert_eq!(path, &format!("/v1/realtime?model={MODEL}"));
    assert_eq!(
        header(headers, "authorization"),
        Some(&*format!("Bearer {KEY_A}"))
    );
    assert_eq!(header(headers, "openai-beta"), Some("realtime=v1"));
    assert_eq!(proxy.app.realtime.count(), 1);

    // The upstream speaks first; then the client's text and binary frames come back.
    assert_eq!(next(&mut client).await, Message::text(GREETING));
    let text = Message::text(r#"{"type":"response.create"}"#);
    client.send(text.clone()).await.expect("send text");
    assert_eq!(next(&mut client).await, text);
    let binary = Message::binary(vec![0u8, 1, 2, 250, 255]);
    client.send(binary.clone()).await.expect("send binary");
    assert_eq!(next(&mut client).await, binary);

    // The client's close goes upstream, and the upstream's answer comes back.
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    };
    client.close(Some(bye.clone())).await.expect("close");
    match next(&mut client).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the close answer, got {other:?}"),
    }
    until(|| upstream.closes().len() == 1).await;
    assert_eq!(upstream.closes(), vec![Some(bye)]);
    until(|| proxy.app.realtime.count() == 0).await;
    assert_eq!(
        proxy.app.inflight.current(),
        0,
        "the session's slot is freed"
    );
    assert_eq!(upstream.handshakes().len(), 1);

    // One access line, when the session ended.
    until(|| !finished().is_empty()).await;
    let lines = finished();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["status"], 101);
    assert_eq!(line["path"], "/v1/realtime");
    assert_eq!(line["model"], MODEL);
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["body"], "complete");
    // The greeting, the two echoes and the close answer's reason.
    let relayed = GREETING.len() + r#"{"type":"response.create"}"#.len() + 5 + "done".len();
    assert_eq!(line["bytes_out"], relayed as u64, "{line}");
    assert!(!logs.text().contains(KEY_A), "the key is never logged");
}

#[tokio::test]
async fn a_key_refused_in_the_handshake_is_disabled_and_the_next_key_opens_the_session() {
    let upstream = RealtimeUpstream::start().await;
    upstream.refuse(KEY_A, 401);
    let proxy = proxy(&upstream, &[KEY_A, KEY_B]).await;
    let (mut client, response) = open(&proxy).await;

    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let keys: Vec<_> = upstream
        .handshakes()
        .iter()
        .map(|(_, headers)| {
            header(headers, "authorization")
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(keys, [format!("Bearer {KEY_A}"), format!("Bearer {KEY_B}")]);
    assert_eq!(
        proxy.key_status(KEY_A),
        (KeyStatus::Disabled, Some(DisableReason::Unauthorized))
    );
    assert_eq!(next(&mut client).await, Message::text(GREETING));
}

#[tokio::test]
async fn every_key_refused_means_an_openai_error_and_no_upgrade() {
    let upstream = RealtimeUpstream::start().await;
    upstream.refuse(KEY_A, 401);
    upstream.refuse(KEY_B, 401);
    let proxy = proxy(&upstream, &[KEY_A, KEY_B]).await;

    let (status, body) =
        refused(connect(&proxy, &format!("?model={MODEL}"), Some(CLIENT_TOKEN)).await);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "no_available_keys");
    assert!(!body.to_string().contains(KEY_A) && !body.to_string().contains(KEY_B));
    assert_eq!(upstream.handshakes().len(), 2, "each key tried once");
    assert_eq!(proxy.app.realtime.count(), 0);
}

#[tokio::test]
async fn the_client_must_authenticate_and_name_a_model() {
    let upstream = RealtimeUpstream::start().await;
    let proxy = proxy(&upstream, &[KEY_A]).await;
    let query = format!("?model={MODEL}");

    let (status, body) = refused(connect(&proxy, &query, None).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, _) = refused(connect(&proxy, &query, Some("kcp-client-wrong")).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = refused(connect(&proxy, "", Some(CLIENT_TOKEN)).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("model"),
        "{body}"
    );
    assert_eq!(
        upstream.handshakes().len(),
        0,
        "nothing reached the upstream"
    );
}

/// In paused, frozen time: the session closes at once, not after a timeout of the drain.
#[tokio::test(start_paused = true)]
async fn the_drain_closes_an_open_session_on_both_sides() {
    let _frozen = freeze();
    let upstream = RealtimeUpstream::start().await;
    let mut proxy = proxy(&upstream, &[KEY_A]).await;
    let (mut client, _) = open(&proxy).await;
    assert_eq!(next(&mut client).await, Message::text(GREETING));

    let started = tokio::time::Instant::now();
    let stopped = proxy.begin_shutdown();
    closed_going_away(&mut client).await;
    let result = tokio::time::timeout(WAIT, stopped)
        .await
        .expect("run returns in time")
        .expect("no panic");
    assert!(
        result.is_ok(),
        "drained within the grace period: {result:?}"
    );
    assert_eq!(
        tokio::time::Instant::now(),
        started,
        "closed without waiting out a timer"
    );
    let closes = upstream.closes();
    assert_eq!(closes.len(), 1);
    assert_eq!(closes[0].as_ref().map(|f| f.code), Some(CloseCode::Away));
    assert_eq!(proxy.app.realtime.count(), 0);
}

#[tokio::test]
async fn a_session_holds_its_max_inflight_slot_until_it_ends() {
    let upstream = RealtimeUpstream::start().await;
    let proxy = proxy_with(&upstream, &[KEY_A], |config| config.server.max_inflight = 1).await;
    let (mut client, _) = open(&proxy).await;
    assert_eq!(next(&mut client).await, Message::text(GREETING));

    let query = format!("?model={MODEL}");
    let (status, body) = refused(connect(&proxy, &query, Some(CLIENT_TOKEN)).await);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert_eq!(
        upstream.handshakes().len(),
        1,
        "the refused one never went upstream"
    );

    client.close(None).await.expect("close");
    until(|| proxy.app.inflight.current() == 0).await;
    let (mut again, _) = open(&proxy).await;
    assert_eq!(next(&mut again).await, Message::text(GREETING));
}

#[tokio::test]
async fn a_rate_limited_key_rests_and_the_next_key_opens_the_session() {
    let upstream = RealtimeUpstream::start().await;
    upstream.refuse(KEY_A, 429);
    let proxy = proxy(&upstream, &[KEY_A, KEY_B]).await;
    let (mut client, _) = open(&proxy).await;
    assert_eq!(next(&mut client).await, Message::text(GREETING));

    assert_eq!(upstream.handshakes().len(), 2);
    assert_eq!(proxy.key_status(KEY_A).0, KeyStatus::Cooling);
    // The next session goes straight to the key that is not resting.
    let (mut second, _) = open(&proxy).await;
    assert_eq!(next(&mut second).await, Message::text(GREETING));
    let handshakes = upstream.handshakes();
    assert_eq!(handshakes.len(), 3);
    assert_eq!(
        header(&handshakes[2].1, "authorization"),
        Some(&*format!("Bearer {KEY_B}"))
    );
}

#[tokio::test]
async fn an_azure_key_opens_the_session_with_api_key_and_no_authorization() {
    let upstream = RealtimeUpstream::start().await;
    let mut loaded = loaded_config(vec![], |_| {});
    loaded.keys = vec![
        resolved_key(
            KEY_A,
            &format!("http://{}/openai/v1", upstream.addr),
            &[MODEL],
        )
        .azure(),
    ];
    loaded.client_keys = vec![Secret::new(CLIENT_TOKEN)];
    let proxy = start_loaded(loaded).await;
    let (mut client, _) = open(&proxy).await;
    assert_eq!(next(&mut client).await, Message::text(GREETING));

    let handshakes = upstream.handshakes();
    assert_eq!(handshakes.len(), 1);
    let (path, headers) = &handshakes[0];
    assert_eq!(path, &format!("/openai/v1/realtime?model={MODEL}"));
    assert_eq!(header(headers, "api-key"), Some(KEY_A));
    assert_eq!(
        header(headers, "authorization"),
        None,
        "the client's token stays at kcp"
    );
}

#[tokio::test]
async fn a_wss_upstream_is_verified_with_the_configured_ca() {
    let (upstream, ca) = RealtimeUpstream::start_tls().await;
    let url = format!("https://127.0.0.1:{}/v1", upstream.addr.port());

    // Without the CA, the provider's certificate is not trusted: no session, kcp's 502.
    let mut untrusting = loaded_config(vec![(KEY_A, url.clone(), vec![MODEL])], |_| {});
    untrusting.client_keys = vec![Secret::new(CLIENT_TOKEN)];
    let proxy = start_loaded(untrusting).await;
    let query = format!("?model={MODEL}");
    let (status, body) = refused(connect(&proxy, &query, Some(CLIENT_TOKEN)).await);
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    assert!(
        upstream.handshakes().is_empty(),
        "no handshake over an untrusted TLS"
    );
    drop(proxy);

    let mut loaded = loaded_config(vec![(KEY_A, url, vec![MODEL])], |config| {
        config.upstream.ca_file = Some(ca.0.clone());
    });
    loaded.client_keys = vec![Secret::new(CLIENT_TOKEN)];
    let proxy = start_loaded(loaded).await;
    let (mut client, _) = open(&proxy).await;
    assert_eq!(next(&mut client).await, Message::text(GREETING));
    let echo = Message::text("over tls");
    client.send(echo.clone()).await.expect("send");
    assert_eq!(next(&mut client).await, echo);
    let handshakes = upstream.handshakes();
    assert_eq!(handshakes.len(), 1);
    assert_eq!(
        header(&handshakes[0].1, "authorization"),
        Some(&*format!("Bearer {KEY_A}"))
    );
}

/// The official OpenAI Python SDK's Realtime client (`openai[realtime]`) through kcp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_opens_a_realtime_session() {
    let upstream = RealtimeUpstream::start().await;
    let proxy = proxy(&upstream, &[KEY_A]).await;
    let base = format!("http://{}/v1", proxy.addr);
    let result = support::python::run("realtime.py", &[MODEL], &base, CLIENT_TOKEN).await;

    assert_eq!(result["first"], "session.created", "{result}");
    assert_eq!(
        result["echo"],
        serde_json::json!({"type": "response.create"})
    );
    let handshakes = upstream.handshakes();
    assert_eq!(handshakes.len(), 1);
    let (path, headers) = &handshakes[0];
    assert_eq!(path, &format!("/v1/realtime?model={MODEL}"));
    assert_eq!(
        header(headers, "authorization"),
        Some(&*format!("Bearer {KEY_A}"))
    );
    let sent = format!("{headers:?}");
    assert!(
        !sent.contains(CLIENT_TOKEN),
        "the client token stays at kcp"
    );
    until(|| proxy.app.realtime.count() == 0).await;
}
