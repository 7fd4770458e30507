//! End-to-end proof that a Realtime session (WebSocket) leaks no secret: at `trace` level,
//! with every line of this test binary captured (tungstenite's own lines through the `log`
//! bridge included), a session that opens after a key is refused with a 401 quoting it, a
//! session refused by the provider with a body quoting a key of no known form, and a client
//! with a wrong token leave no pool key, client token or admin token in the logs, the
//! metrics, `/health`, the admin API, the bytes a client receives (handshake answers and
//! frames), or the `Debug` output of the running state.

mod support;

use std::fmt::Write as _;

use bytes::Bytes;
use futures_util::SinkExt;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Full;
use key_cycle_proxy::core::{DisableReason, KeyStatus, Secret};
use key_cycle_proxy::server::proxy::realtime::handshake::Wanted;
use support::observe::{capture_logs, scrape};
use support::proxy_harness::{Proxy, loaded_config, read, send_with, start_loaded};
use support::realtime::{GREETING, MODEL, Opening, RealtimeUpstream, connect, header, next, until};
use support::secrets::{assert_absent, record, secret};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// kcp with `keys` on `upstream` (in this order), `client` as its client token and `admin` as
/// its admin token.
async fn start(upstream: &RealtimeUpstream, keys: &[&str], client: &str, admin: &str) -> Proxy {
    let keys = keys
        .iter()
        .map(|key| (*key, upstream.url(), vec![MODEL]))
        .collect();
    let mut loaded = loaded_config(keys, |config| {
        config.keys.rotation_strategy = key_cycle_proxy::core::Strategy::RoundRobin;
        config.observability.admin_token = Some(Secret::new(admin));
    });
    loaded.client_keys = vec![Secret::new(client)];
    start_loaded(loaded).await
}

/// A handshake's answer as the client received it: status, headers and body.
fn answer(into: &mut String, opening: &Opening) {
    match opening {
        Ok((_, response)) => {
            let _ = writeln!(into, "{} {:?}", response.status(), response.headers());
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            let _ = writeln!(
                into,
                "{} {:?}\n{}",
                response.status(),
                response.headers(),
                String::from_utf8_lossy(&body)
            );
        }
        Err(other) => panic!("the handshake failed below HTTP: {other}"),
    }
}

async fn get(proxy: &Proxy, url: String, token: Option<&str>) -> support::proxy_harness::Reply {
    let mut request = Request::get(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    read(send_with(&proxy.client, request).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_of_a_realtime_session_reaches_a_log_a_metric_or_a_client() {
    let logs = capture_logs("trace");
    let client_token = secret("sk-client", "realtime");
    let admin_token = secret("admin", "realtime");
    let revoked = secret("sk-live", "rt-revoked");
    let ok = secret("sk-live", "rt-ok");
    // No `sk-` prefix: a provider quoting it cannot be caught by its form.
    let plain = secret("rtkey", "rt-plain");
    let wrong_token = secret("sk-wrong", "realtime");
    let secrets = vec![
        client_token.clone(),
        admin_token.clone(),
        revoked.clone(),
        ok.clone(),
        plain.clone(),
        wrong_token.clone(),
    ];
    let mut client_bytes = String::new();
    let mut other = String::new();

    let upstream = RealtimeUpstream::start().await;
    upstream.refuse(&revoked, 401);
    upstream.refuse(&plain, 400);
    let proxy = start(&upstream, &[&revoked, &ok], &client_token, &admin_token).await;

    // A session that opens on the second key, the first refused with a 401 quoting it.
    let query = format!("?model={MODEL}");
    let opening = connect(&proxy, &query, Some(&client_token)).await;
    answer(&mut client_bytes, &opening);
    let (mut client, response) = opening.expect("the session opens");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(header(response.headers(), "x-kcp-request-id").is_some());
    let tried: Vec<_> = upstream
        .handshakes()
        .iter()
        .map(|(_, h)| header(h, "authorization").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(tried, [format!("Bearer {revoked}"), format!("Bearer {ok}")]);
    assert_eq!(
        proxy.key_status(&revoked),
        (KeyStatus::Disabled, Some(DisableReason::Unauthorized))
    );
    let greeting = next(&mut client).await;
    assert_eq!(greeting, Message::text(GREETING));
    let _ = writeln!(client_bytes, "{greeting:?}");
    let text = Message::text(r#"{"type":"response.create"}"#);
    client.send(text.clone()).await.expect("send");
    let echoed = next(&mut client).await;
    assert_eq!(echoed, text);
    let _ = writeln!(client_bytes, "{echoed:?}");
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    };
    client.close(Some(bye)).await.expect("close");
    let closed = next(&mut client).await;
    assert!(matches!(closed, Message::Close(Some(_))), "{closed:?}");
    let _ = writeln!(client_bytes, "{closed:?}");
    until(|| proxy.app.realtime.count() == 0).await;

    // A wrong client token, and a pool key, are refused without being echoed.
    for token in [&wrong_token, &ok] {
        let opening = connect(&proxy, &query, Some(token)).await;
        answer(&mut client_bytes, &opening);
        match opening {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            }
            _ => panic!("a wrong client token opened a session"),
        }
    }

    // A provider refusal passed to the client (a 400 is the client's own problem) quoting
    // a key that has no `sk-` form.
    let refusing = start(&upstream, &[&plain], &client_token, &admin_token).await;
    let opening = connect(&refusing, &query, Some(&client_token)).await;
    answer(&mut client_bytes, &opening);
    match &opening {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned();
            assert!(
                body.contains("Incorrect API key provided: ***."),
                "the provider's body, the key masked: {body}"
            );
        }
        _ => panic!("the provider's refusal was not passed on"),
    }

    // What else could carry a secret: metrics, health, admin, Debug output.
    let mut metrics = String::new();
    for each in [&proxy, &refusing] {
        metrics.push_str(&scrape(each).await);
        record(
            &mut client_bytes,
            &get(each, each.url("/health"), None).await,
        );
        record(
            &mut client_bytes,
            &get(each, each.metrics_url("/health"), None).await,
        );
        let keys = get(each, each.metrics_url("/admin/keys"), Some(&admin_token)).await;
        assert_eq!(keys.status, StatusCode::OK, "{}", keys.text());
        record(&mut other, &keys);
        let _ = writeln!(other, "{:?}", each.app);
        let _ = writeln!(other, "{:?}", each.app.pool());
    }
    assert!(
        metrics.contains("kcp_upstream_requests_total{"),
        "a scrape with the sessions' upstream attempts"
    );
    let mut headers = HeaderMap::new();
    let bearer = format!("Bearer {client_token}");
    headers.insert("authorization", bearer.parse().expect("header value"));
    let wanted = Wanted {
        path_and_query: "/v1/realtime?model=m",
        model: "m",
        headers: &headers,
    };
    let _ = writeln!(other, "{wanted:?}");

    drop(refusing.stop().await);
    drop(proxy.stop().await);

    let text = logs.text();
    let lines = logs.json_lines();
    let from = |target: &str| {
        lines
            .iter()
            .any(|l| l["target"].as_str().is_some_and(|t| t.starts_with(target)))
    };
    assert!(from("tungstenite"), "tungstenite's lines are captured");
    assert!(
        from("kcp::access") && from("kcp::keys"),
        "kcp's lines are captured"
    );
    assert!(lines.iter().any(|l| l["level"] == "TRACE"));
    for (place, text) in [
        ("logs", text.as_str()),
        ("client bytes", client_bytes.as_str()),
        ("metrics", metrics.as_str()),
        ("admin answers and Debug output", other.as_str()),
    ] {
        assert_absent(place, text, &secrets);
    }
}
