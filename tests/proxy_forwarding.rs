//! End-to-end: requests through the real proxy to the mock upstream, when everything works.
//! What is forwarded where, with which headers, and what comes back.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, Version};
use http_body_util::BodyExt;
use support::mock_upstream::{COMPLETION_TEXT, sse_events};
use support::proxy_harness::{WAIT, h2_client, read, send_with, start_proxy};
use support::time::{advance, freeze};
use support::{
    Behaviour, KEY_A, KEY_B, KEY_C, MockUpstream, one_key, routed_keys, three_keys, two_keys,
};

#[tokio::test]
async fn chat_completion_passes_through_with_one_call() {
    let mock = MockUpstream::start().await;
    let proxy = one_key(&mock).await;
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(body["model"], "gpt-4o");
    assert_eq!(body["choices"][0]["message"]["content"], COMPLETION_TEXT);
    assert_eq!(reply.header("x-request-id"), Some("req_mock_1"));
    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].key.as_deref(), Some(KEY_A));
    assert_eq!(calls[0].method, "POST");
    assert_eq!(calls[0].path_and_query, "/v1/chat/completions");
    assert_eq!(
        calls[0].json().expect("JSON")["messages"][0]["content"],
        "hi"
    );
}

#[tokio::test(start_paused = true)]
async fn streamed_chat_arrives_frame_by_frame() {
    let _frozen = freeze();
    let mock = MockUpstream::start().await;
    let interval = Duration::from_millis(150);
    mock.set(
        KEY_A,
        Behaviour::Stream {
            chunks: 5,
            interval,
        },
    );
    let proxy = one_key(&mock).await;
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    let headers = [("content-type", "application/json")];
    let request = proxy.request(Method::POST, "/v1/chat/completions", &headers, body);
    let response = proxy.send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let events = sse_events("gpt-4o", 5);
    let mut received = Vec::new();
    // The clock stands still between advances: event i arrives only once the upstream has
    // been given i intervals, and without waiting for the events after it (no buffering).
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            advance(interval).await;
        }
        let mut got = Vec::new();
        while got.len() < event.len() {
            let frame = tokio::time::timeout(WAIT, body.frame())
                .await
                .expect("frame in time")
                .expect("a frame before the end")
                .expect("clean stream");
            if let Ok(data) = frame.into_data() {
                got.extend_from_slice(&data);
            }
        }
        assert_eq!(got, event.as_ref(), "event {i} alone, whole");
        received.extend_from_slice(&got);
    }
    let end = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("end in time");
    assert!(end.is_none(), "nothing after the last event");
    assert_eq!(
        received,
        events.concat(),
        "every event, in order, byte for byte"
    );
}

#[tokio::test]
async fn embeddings_pass_through() {
    let mock = MockUpstream::start().await;
    let proxy = one_key(&mock).await;
    let reply = proxy
        .post(
            "/v1/embeddings",
            r#"{"model":"text-embedding-3-small","input":["a","b"]}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(mock.calls()[0].path(), "/v1/embeddings");
}

#[tokio::test]
async fn model_list_needs_no_model() {
    let mock = MockUpstream::start().await;
    // Keys that name models only: a request without a model may still use any of them.
    let proxy = routed_keys(&mock, |_| {}).await;
    let reply = proxy.get("/v1/models").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["object"], "list");
    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, "GET");
    assert!(calls[0].body.is_empty());
}

fn multipart(boundary: &str, model: &str, audio: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n\
             Content-Type: audio/mpeg\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(audio);
    body.extend_from_slice(
        format!(
            "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n\
             --{boundary}--\r\n"
        )
        .as_bytes(),
    );
    body
}

#[tokio::test]
async fn multipart_transcription_is_routed_by_its_form_model() {
    let mock = MockUpstream::start().await;
    let proxy = routed_keys(&mock, |_| {}).await;
    let audio: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
    let boundary = "----kcpBoundary7MA4YWxkTrZu0gW";
    let body = multipart(boundary, "whisper-1", &audio);
    let content_type = format!("multipart/form-data; boundary={boundary}");
    for _ in 0..3 {
        let headers = [("content-type", content_type.as_str())];
        let request = proxy.request(
            Method::POST,
            "/v1/audio/transcriptions",
            &headers,
            body.clone(),
        );
        let reply = proxy.call(request).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["text"], COMPLETION_TEXT);
    }
    assert_eq!(
        mock.calls_for(KEY_B),
        3,
        "only the whisper key serves whisper-1"
    );
    let call = &mock.calls()[0];
    assert_eq!(call.body, Bytes::from(body), "body forwarded byte for byte");
    assert_eq!(call.headers["content-type"], content_type.as_str());
}

#[tokio::test]
async fn file_requests_keep_their_query_byte_for_byte() {
    let mock = MockUpstream::start().await;
    let proxy = one_key(&mock).await;
    let target = "/v1/files/file-abc123?limit=2&after=file%2Fx&order=desc&empty=&sp=a+b%20c";
    let reply = proxy.get(target).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["id"], "file-abc123");
    let request = proxy.request(Method::DELETE, target, &[], Bytes::new());
    let reply = proxy.call(request).await;
    assert_eq!(reply.json()["deleted"], true);
    let calls = mock.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].method, "GET");
    assert_eq!(calls[1].method, "DELETE");
    for call in &calls {
        assert_eq!(call.path_and_query, target);
    }
}

#[tokio::test]
async fn key_urls_with_or_without_v1_never_double_it() {
    let mock = MockUpstream::start().await;
    let base = mock.url();
    let proxy = start_proxy(
        vec![
            (KEY_A, base.clone(), vec!["bare"]),
            (KEY_B, format!("{base}/v1/"), vec!["versioned"]),
            (KEY_C, format!("{base}/prefix/v1"), vec!["prefixed"]),
        ],
        |_| {},
    )
    .await;
    for model in ["bare", "versioned", "prefixed"] {
        assert_eq!(proxy.chat(model).await.status, StatusCode::OK);
    }
    let paths: Vec<String> = mock.calls().into_iter().map(|c| c.path_and_query).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/prefix/v1/chat/completions"
        ]
    );
}

#[tokio::test]
async fn headers_are_rewritten_for_the_key() {
    let mock = MockUpstream::start().await;
    let mut loaded = support::proxy_harness::loaded_config(vec![], |_| {});
    let mut key = support::proxy_harness::resolved_key(KEY_A, &mock.url(), &["others"]);
    key.organization = Some("org-kcp".to_owned());
    key.project = Some("proj_kcp".to_owned());
    loaded.keys.push(key);
    let proxy = support::proxy_harness::start_loaded(loaded).await;
    let headers = [
        ("content-type", "application/json"),
        ("authorization", "Bearer client-token-123"),
        ("api-key", "client-token-123"),
        ("connection", "keep-alive, x-hop-secret"),
        ("x-hop-secret", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("forwarded", "for=192.0.2.60"),
        ("x-forwarded-for", "192.0.2.60"),
        ("openai-organization", "org-client"),
        ("openai-beta", "assistants=v2"),
        ("idempotency-key", "idem-42"),
        ("user-agent", "OpenAI/Python 1.51.0"),
    ];
    let body = r#"{"model":"gpt-4o","messages":[]}"#;
    let request = proxy.request(Method::POST, "/v1/chat/completions", &headers, body);
    let reply = proxy.call(request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply
            .header("x-request-id")
            .is_some_and(|id| id.starts_with("req_mock_"))
    );

    let call = &mock.calls()[0];
    let sent = &call.headers;
    assert_eq!(sent["authorization"], format!("Bearer {KEY_A}").as_str());
    assert_eq!(sent.get_all("authorization").iter().count(), 1);
    assert_eq!(sent["openai-organization"], "org-kcp");
    assert_eq!(sent["openai-project"], "proj_kcp");
    assert_eq!(sent["host"], mock.addr().to_string().as_str());
    assert_eq!(sent["openai-beta"], "assistants=v2");
    assert_eq!(sent["idempotency-key"], "idem-42");
    assert_eq!(sent["user-agent"], "OpenAI/Python 1.51.0");
    assert_eq!(sent["content-type"], "application/json");
    for dropped in [
        "api-key",
        "x-hop-secret",
        "keep-alive",
        "proxy-authorization",
        "forwarded",
        "x-forwarded-for",
    ] {
        assert!(sent.get(dropped).is_none(), "{dropped} was forwarded");
    }
    let all: String = sent
        .iter()
        .map(|(n, v)| format!("{n}: {}\n", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    assert!(
        !all.contains("client-token-123"),
        "client credentials leaked:\n{all}"
    );
}

#[tokio::test]
async fn stateful_endpoints_stick_to_the_home_key() {
    let mock = MockUpstream::start().await;
    let proxy = three_keys(&mock).await;
    for _ in 0..6 {
        assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    }
    let served: Vec<usize> = [KEY_A, KEY_B, KEY_C]
        .iter()
        .map(|k| mock.calls_for(k))
        .collect();
    assert_eq!(
        served,
        [2, 2, 2],
        "model requests rotate over every key in turn"
    );

    let before = mock.calls().len();
    let created = proxy
        .post("/v1/files", r#"{"purpose":"batch"}"#)
        .await
        .json();
    let id = created["id"].as_str().expect("file id").to_owned();
    for _ in 0..3 {
        assert_eq!(
            proxy.get(&format!("/v1/files/{id}")).await.status,
            StatusCode::OK
        );
        assert_eq!(
            proxy.get("/v1/batches?limit=1").await.status,
            StatusCode::OK
        );
    }
    let request = proxy.request(
        Method::DELETE,
        &format!("/v1/files/{id}"),
        &[],
        Bytes::new(),
    );
    assert_eq!(proxy.call(request).await.json()["deleted"], true);
    let stateful: Vec<Option<String>> = mock.calls()[before..]
        .iter()
        .map(|c| c.key.clone())
        .collect();
    assert_eq!(stateful.len(), 8);
    assert!(
        stateful.iter().all(|k| k.as_deref() == Some(KEY_A)),
        "every stateful call on the home key: {stateful:?}"
    );

    // The home key is revoked: stateful requests move to the next key and stay there.
    mock.set(KEY_A, Behaviour::Unauthorized);
    for _ in 0..3 {
        assert_eq!(proxy.get("/v1/files").await.status, StatusCode::OK);
    }
    let moved: Vec<Option<String>> = mock.calls()[before + 8..]
        .iter()
        .map(|c| c.key.clone())
        .collect();
    assert_eq!(
        moved,
        [Some(KEY_A), Some(KEY_B), Some(KEY_B), Some(KEY_B)].map(|k| k.map(str::to_owned))
    );
}

#[tokio::test]
async fn the_upstream_is_asked_for_uncompressed_answers() {
    let mock = MockUpstream::start().await;
    let proxy = one_key(&mock).await;
    // httpx sends `gzip, deflate`, undici `gzip, deflate, br`: a compressed 429 body could
    // not be read to tell an exhausted quota from a rate limit.
    let headers = [
        ("content-type", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
    ];
    let body = r#"{"model":"gpt-4o","messages":[]}"#;
    let request = proxy.request(Method::POST, "/v1/chat/completions", &headers, body);
    assert_eq!(proxy.call(request).await.status, StatusCode::OK);
    let sent = &mock.calls()[0].headers;
    let encodings: Vec<&str> = sent
        .get_all("accept-encoding")
        .iter()
        .map(|v| v.to_str().expect("ASCII"))
        .collect();
    assert_eq!(encodings, ["identity"]);
}

#[tokio::test]
async fn organization_and_project_are_the_keys_in_both_directions() {
    let mock = MockUpstream::start().await;
    mock.set(
        KEY_A,
        Behaviour::Status {
            status: 200,
            body: r#"{"ok":true}"#.to_owned(),
            headers: vec![
                (
                    "openai-organization".to_owned(),
                    "org-pool-account".to_owned(),
                ),
                ("openai-project".to_owned(), "proj_pool_account".to_owned()),
                ("openai-processing-ms".to_owned(), "42".to_owned()),
            ],
        },
    );
    // The key's config names no organization or project.
    let proxy = one_key(&mock).await;
    let headers = [
        ("content-type", "application/json"),
        ("openai-organization", "org-chosen-by-client"),
        ("openai-project", "proj_chosen_by_client"),
    ];
    let body = r#"{"model":"gpt-4o","messages":[]}"#;
    let request = proxy.request(Method::POST, "/v1/chat/completions", &headers, body);
    let reply = proxy.call(request).await;
    assert_eq!(reply.status, StatusCode::OK);
    let sent = &mock.calls()[0].headers;
    assert!(sent.get("openai-organization").is_none(), "{sent:?}");
    assert!(sent.get("openai-project").is_none(), "{sent:?}");
    assert!(reply.header("openai-organization").is_none());
    assert!(reply.header("openai-project").is_none());
    assert_eq!(reply.header("openai-processing-ms"), Some("42"));
}

#[tokio::test]
async fn stored_chat_completions_stick_to_the_home_key() {
    let mock = MockUpstream::start().await;
    let proxy = three_keys(&mock).await;
    for _ in 0..4 {
        assert_eq!(
            proxy.get("/v1/chat/completions/chatcmpl-abc").await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        proxy.get("/v1/chat/completions?limit=5").await.status,
        StatusCode::OK
    );
    assert_eq!(
        proxy
            .get("/v1/chat/completions/chatcmpl-abc/messages")
            .await
            .status,
        StatusCode::OK
    );
    let update = r#"{"metadata":{"topic":"test"}}"#;
    assert_eq!(
        proxy
            .post("/v1/chat/completions/chatcmpl-abc", update)
            .await
            .status,
        StatusCode::OK
    );
    let delete = proxy.request(
        Method::DELETE,
        "/v1/chat/completions/chatcmpl-abc",
        &[],
        Bytes::new(),
    );
    assert_eq!(proxy.call(delete).await.status, StatusCode::OK);
    let keys: Vec<Option<String>> = mock.calls().iter().map(|c| c.key.clone()).collect();
    assert_eq!(keys.len(), 8);
    assert!(
        keys.iter().all(|k| k.as_deref() == Some(KEY_A)),
        "every stored-completion call on the home key: {keys:?}"
    );

    // Creating completions still rotates.
    for _ in 0..6 {
        assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
    }
    let created = &mock.calls()[8..];
    let served: Vec<usize> = [KEY_A, KEY_B, KEY_C]
        .iter()
        .map(|k| {
            created
                .iter()
                .filter(|c| c.key.as_deref() == Some(*k))
                .count()
        })
        .collect();
    assert_eq!(served, [2, 2, 2], "new completions rotate over every key");
}

#[tokio::test]
async fn two_hundred_concurrent_requests_all_succeed() {
    let mock = MockUpstream::start().await;
    let proxy = three_keys(&mock).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = proxy.client.clone();
        let body =
            format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{i}"}}]}}"#);
        let request = proxy.request(
            Method::POST,
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body,
        );
        tasks.spawn(async move { read(send_with(&client, request).await).await.status });
    }
    let mut ok = 0;
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("task"), StatusCode::OK);
        ok += 1;
    }
    assert_eq!(ok, 200);
    assert_eq!(mock.calls().len(), 200, "one upstream call each");
    assert_eq!(proxy.app.queue.len(), 0);
}

#[tokio::test]
async fn tls_upstream_is_trusted_through_ca_file() {
    let mock = MockUpstream::start_tls().await;
    let ca_file = mock.ca_file().expect("TLS mock has a CA").to_owned();
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.upstream.ca_file = Some(ca_file);
    })
    .await;
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["model"], "gpt-4o");
    let call = &mock.calls()[0];
    assert_eq!(call.version, Version::HTTP_2, "ALPN chose h2");
    assert_eq!(call.key.as_deref(), Some(KEY_A));
}

#[tokio::test]
async fn h2_clients_are_served() {
    let mock = MockUpstream::start().await;
    let proxy = one_key(&mock).await;
    let body = r#"{"model":"gpt-4o","messages":[]}"#;
    let request = proxy.request(
        Method::POST,
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        body,
    );
    let response = send_with(&h2_client(), request).await;
    assert_eq!(response.version(), Version::HTTP_2);
    let reply = read(response).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["model"], "gpt-4o");
}

#[tokio::test]
async fn odd_bodies_are_forwarded_for_the_upstream_to_judge() {
    let mock = MockUpstream::start().await;
    mock.set(KEY_A, Behaviour::status(400));
    let proxy = one_key(&mock).await;
    let bodies: Vec<Vec<u8>> = vec![
        Vec::new(),
        br#"{"model":"gpt-4o","messages":[{"role":"us"#.to_vec(),
        b"{\"model\":\"gpt-\xff\xfe\"}".to_vec(),
        br#"{"model":42}"#.to_vec(),
        br#"{"model":null,"max_tokens":"many"}"#.to_vec(),
        b"\x00\x01\x02 not json at all".to_vec(),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let request = proxy.request(
            Method::POST,
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body.clone(),
        );
        let reply = proxy.call(request).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "body #{i}");
        assert_eq!(
            reply.json()["error"]["message"],
            "Invalid request.",
            "body #{i}"
        );
        assert_eq!(mock.calls().len(), i + 1, "body #{i}: exactly one call");
        assert_eq!(
            mock.calls()[i].body.as_ref(),
            body.as_slice(),
            "body #{i} unchanged"
        );
    }
    assert_eq!(proxy.get("/health").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_huge_model_name_gets_a_short_400() {
    let mock = MockUpstream::start().await;
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["gpt-4o"])], |_| {}).await;
    let reply = proxy.chat(&"m".repeat(10_000)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "model_name_too_long");
    assert!(reply.body.len() < 1_000);
    assert_eq!(mock.calls().len(), 0);
}

#[tokio::test]
async fn oversized_bodies_are_refused_before_any_call() {
    let mock = MockUpstream::start().await;
    let proxy = start_proxy(vec![(KEY_A, mock.url(), vec!["others"])], |config| {
        config.server.request_body_limit_bytes = 1024;
    })
    .await;
    let reply = proxy
        .post(
            "/v1/chat/completions",
            &format!(r#"{{"model":"gpt-4o","x":"{}"}}"#, "a".repeat(2048)),
        )
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(mock.calls().len(), 0);
}

#[tokio::test]
async fn health_ready_and_unknown_paths() {
    let mock = MockUpstream::start().await;
    let proxy = two_keys(&mock, |_| {}).await;
    let health = proxy.get("/health").await;
    assert_eq!(health.status, StatusCode::OK);
    let counts = health.json();
    assert_eq!(counts["status"], "ok");
    assert_eq!(counts["keys"]["total"], 2);
    assert_eq!(counts["keys"]["available"], 2);
    assert_eq!(proxy.get("/ready").await.status, StatusCode::OK);

    let missing = proxy.get("/v2/chat/completions").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.error_code(), "unknown_url");
    assert_eq!(mock.calls().len(), 0, "health and 404s never call upstream");

    mock.set(KEY_A, Behaviour::Unauthorized);
    mock.set(KEY_B, Behaviour::Unauthorized);
    assert_eq!(
        proxy.chat("gpt-4o").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let health = proxy.get("/health").await;
    assert_eq!(
        health.status,
        StatusCode::OK,
        "liveness does not depend on keys"
    );
    assert_eq!(health.json()["keys"]["disabled"], 2);
    let ready = proxy.get("/ready").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready.json()["reason"]
            .as_str()
            .is_some_and(|r| r.contains("disabled"))
    );
}
