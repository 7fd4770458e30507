//! End-to-end: a pool that mixes providers, configured as users write it in `config.toml`.
//!
//! One mock plays OpenAI, Azure OpenAI (v1 API and classic deployments form) and a
//! Gemini-style root at once; the recorded calls show which header and path each key's
//! request carried.

mod support;

use http::StatusCode;
use support::config_file::{ConfigFile, config_toml};
use support::proxy_harness::start_app;
use support::{Behaviour, Call, MockUpstream};

const OPENAI_KEY: &str = "sk-openai-9f3a61c2";
const AZURE_V1_KEY: &str = "az-v1-4be07d18";
const AZURE_CLASSIC_KEY: &str = "az-classic-77c1e502";
const GEMINI_KEY: &str = "gm-key-2d9b3f40";

/// `OpenAI` on the bare mock url, Azure v1 under `/openai/v1/`, Azure classic on the
/// resource endpoint, Gemini's root under `/v1beta/openai`, each routed by model.
fn mixed_pool(base: &str) -> String {
    let mut toml = config_toml(base, &[], "");
    toml.push_str(&format!(
        r#"
[[api_keys]]
name = "openai"
key = "{OPENAI_KEY}"
models = ["gpt-4o-mini"]

[[api_keys]]
name = "azure-v1"
kind = "azure"
key = "{AZURE_V1_KEY}"
url = "{base}/openai/v1/"
models = ["gpt-4.1"]

[[api_keys]]
name = "azure-classic"
kind = "azure"
key = "{AZURE_CLASSIC_KEY}"
url = "{base}"
api_version = "2024-10-21"
deployments = {{ "gpt-4o" = "prod-4o" }}
models = ["gpt-4o", "text-embedding-3-small"]

[[api_keys]]
name = "gemini"
key = "{GEMINI_KEY}"
url = "{base}/v1beta/openai/"
models = ["gemini-2.0-flash"]
"#
    ));
    toml
}

fn only_call(mock: &MockUpstream) -> Call {
    let calls = mock.calls();
    assert_eq!(calls.len(), 1, "one upstream call: {calls:?}");
    calls.into_iter().next().expect("one call")
}

fn header<'c>(call: &'c Call, name: &str) -> Option<&'c str> {
    call.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn each_provider_gets_its_header_and_path() {
    let mock = MockUpstream::start().await;
    let file = ConfigFile::new(&mixed_pool(&mock.url()));
    let proxy = start_app(file.app()).await;

    let cases = [
        ("gpt-4o-mini", OPENAI_KEY, "/v1/chat/completions", false),
        ("gpt-4.1", AZURE_V1_KEY, "/openai/v1/chat/completions", true),
        (
            "gpt-4o",
            AZURE_CLASSIC_KEY,
            "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
            true,
        ),
        (
            "gemini-2.0-flash",
            GEMINI_KEY,
            "/v1beta/openai/chat/completions",
            false,
        ),
    ];
    for (n, (model, key, path, azure)) in cases.into_iter().enumerate() {
        let reply = proxy.chat(model).await;
        assert_eq!(reply.status, StatusCode::OK, "{model}: {}", reply.text());
        assert_eq!(reply.json()["model"], model, "the mock answered as OpenAI");
        let calls = mock.calls();
        assert_eq!(calls.len(), n + 1, "one upstream call per request");
        let call = &calls[n];
        assert_eq!(call.path_and_query, path, "{model}");
        assert_eq!(call.key.as_deref(), Some(key), "{model}");
        if azure {
            assert_eq!(header(call, "api-key"), Some(key), "{model}");
            assert_eq!(
                header(call, "authorization"),
                None,
                "{model}: no Authorization"
            );
        } else {
            assert_eq!(
                header(call, "authorization"),
                Some(format!("Bearer {key}").as_str()),
                "{model}"
            );
            assert_eq!(header(call, "api-key"), None, "{model}");
        }
    }
}

#[tokio::test]
async fn azure_classic_maps_an_unlisted_model_to_its_own_deployment() {
    let mock = MockUpstream::start().await;
    let file = ConfigFile::new(&mixed_pool(&mock.url()));
    let proxy = start_app(file.app()).await;
    let reply = proxy
        .post(
            "/v1/embeddings?user=a",
            r#"{"model":"text-embedding-3-small","input":["x","y"]}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["data"].as_array().map(Vec::len), Some(2));
    let call = only_call(&mock);
    assert_eq!(
        call.path_and_query,
        "/openai/deployments/text-embedding-3-small/embeddings?user=a&api-version=2024-10-21"
    );
    assert_eq!(header(&call, "authorization"), None);
    assert_eq!(header(&call, "api-key"), Some(AZURE_CLASSIC_KEY));
}

#[tokio::test]
async fn a_client_api_key_header_never_reaches_an_upstream() {
    let mock = MockUpstream::start().await;
    let file = ConfigFile::new(&mixed_pool(&mock.url()));
    let proxy = start_app(file.app()).await;
    let request = proxy.request(
        http::Method::POST,
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("api-key", "client-own-key"),
        ],
        r#"{"model":"gpt-4o-mini","messages":[]}"#.to_owned(),
    );
    let reply = proxy.call(request).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let call = only_call(&mock);
    assert_eq!(call.key.as_deref(), Some(OPENAI_KEY));
    assert_eq!(header(&call, "api-key"), None);
}

/// Two Azure classic keys for `gpt-4o`; the first answers `first` (status, body).
async fn two_azure_keys(mock: &MockUpstream, first: (u16, &str)) -> support::proxy_harness::Proxy {
    let base = mock.url();
    let mut toml = config_toml(&base, &[], "");
    for (name, key) in [("az-a", AZURE_CLASSIC_KEY), ("az-b", AZURE_V1_KEY)] {
        toml.push_str(&format!(
            "\n[[api_keys]]\nname = \"{name}\"\nkind = \"azure\"\nkey = \"{key}\"\nurl = \"{base}\"\napi_version = \"2024-10-21\"\nmodels = [\"gpt-4o\"]\n"
        ));
    }
    mock.set(
        AZURE_CLASSIC_KEY,
        Behaviour::Status {
            status: first.0,
            body: first.1.to_owned(),
            headers: Vec::new(),
        },
    );
    let file = ConfigFile::new(&toml);
    let app = file.app();
    start_app(app).await
}

#[tokio::test]
async fn azure_content_filter_passes_through_after_one_call() {
    let mock = MockUpstream::start().await;
    let body = r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy.","type":null,"param":"prompt","code":"content_filter","status":400}}"#;
    let proxy = two_azure_keys(&mock, (400, body)).await;
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "content_filter");
    assert_eq!(mock.calls().len(), 1, "a request error is never retried");
}

#[tokio::test]
async fn azure_deployment_not_found_moves_to_the_next_key() {
    let mock = MockUpstream::start().await;
    let body = r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#;
    let proxy = two_azure_keys(&mock, (404, body)).await;
    let reply = proxy.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let keys: Vec<Option<String>> = mock.calls().into_iter().map(|c| c.key).collect();
    assert_eq!(
        keys,
        [
            Some(AZURE_CLASSIC_KEY.to_owned()),
            Some(AZURE_V1_KEY.to_owned())
        ]
    );
}
