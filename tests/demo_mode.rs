//! `kcp-server demo` end to end, in process: a request through the demo proxy succeeds, and
//! under its own traffic the revoked key is disabled, as the status JSON shows; a re-check
//! requested through the admin API runs and fails again, doubling the wait.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use key_cycle_proxy::server::demo::{ADMIN_TOKEN, Demo, DemoOptions};
use serde_json::Value;
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(20);

async fn send(method: Method, url: &str, body: Option<&'static str>) -> (StatusCode, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("demo:{ADMIN_TOKEN}"));
    let request = Request::builder()
        .method(method)
        .uri(url)
        .header(header::AUTHORIZATION, format!("Basic {basic}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(body.unwrap_or("").as_bytes())))
        .expect("request");
    let response = tokio::time::timeout(WAIT, client.request(request))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, serde_json::from_slice(&bytes).expect("JSON"))
}

fn key<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["name"] == name)
        .unwrap_or_else(|| panic!("no key {name} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_and_its_traffic_disables_the_revoked_key() {
    let demo = Demo::start(DemoOptions {
        port: 0,
        traffic: Some(25),
    })
    .await
    .expect("demo starts");
    let proxy = demo.proxy_addr;
    let ops = demo.status_addr;
    let banner = demo.banner();
    assert!(banner.contains(&format!("http://{proxy}/v1")), "{banner}");
    assert!(banner.contains(&format!("http://{ops}/")), "{banner}");
    assert!(
        banner.contains("curl ") && banner.contains("base_url=") && banner.contains("baseURL:")
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(demo.run(async move {
        let _ = stopped.await;
    }));

    let (status, body) = send(
        Method::POST,
        &format!("http://{proxy}/v1/chat/completions"),
        Some(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from the mock upstream."
    );

    let status_url = format!("http://{ops}/status.json");
    let disabled = tokio::time::timeout(WAIT, async {
        loop {
            let (code, status) = send(Method::GET, &status_url, None).await;
            assert_eq!(code, StatusCode::OK);
            if key(&status, "revoked")["status"] == "disabled" {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the revoked key is disabled under the demo's traffic");
    let revoked = key(&disabled, "revoked");
    assert_eq!(revoked["disabled_reason"], "unauthorized");
    let first_wait = revoked["next_probe_secs"]
        .as_f64()
        .expect("re-check scheduled");
    assert!(
        first_wait <= 60.0,
        "first re-check within a minute: {first_wait}"
    );
    for healthy in ["tier5-main", "tier1-spare"] {
        assert_ne!(key(&disabled, healthy)["status"], "disabled");
    }

    let (code, _) = send(
        Method::POST,
        &format!("http://{ops}/admin/keys/revoked/recheck"),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    // The re-check runs within the probe task's second and fails again: the wait doubles.
    tokio::time::timeout(WAIT, async {
        loop {
            let (_, status) = send(Method::GET, &status_url, None).await;
            let revoked = key(&status, "revoked");
            if revoked["next_probe_secs"]
                .as_f64()
                .is_some_and(|s| s > 60.0)
            {
                assert_eq!(revoked["status"], "disabled");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the requested re-check ran and backed off to two minutes");

    stop.send(()).expect("demo still running");
    tokio::time::timeout(WAIT, running)
        .await
        .expect("demo stops in time")
        .expect("task")
        .expect("clean stop");
}
