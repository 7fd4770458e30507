//! End-to-end, the issue's "done when": the official OpenAI Python SDK (`openai`, run from the
//! venv `.ci/run tools` sets up) through one kcp in front of a mixed pool: an OpenAI-style
//! provider, an Azure OpenAI resource in the classic deployments form, and a local
//! OpenAI-compatible server, each a mock on `127.0.0.1:0`, routed by model. The pool is the
//! README's mixed-pool example.
//!
//! The SDK must be there: without it this test fails (it does not skip), naming the setup
//! command (docs/testing.md).

mod support;

use serde_json::json;
use support::config_file::{ConfigFile, config_toml};
use support::mock_upstream::COMPLETION_TEXT;
use support::proxy_harness::start_app;
use support::{Behaviour, Call, MockUpstream};

const OPENAI_KEY: &str = "sk-openai-3c9e1b27";
const AZURE_KEY: &str = "az-classic-58d20f6a";
const LOCAL_KEY: &str = "local-unused-71b4";
const CLIENT_TOKEN: &str = "kcp-sdk-client-0e6f";
/// Events of each mock's streamed completion (`tok0 tok1 tok2 `).
const CHUNKS: usize = 3;

/// The README's mixed pool (Providers), with the three mocks' addresses for the providers'.
fn mixed_pool(openai: &str, azure: &str, local: &str) -> String {
    let auth = format!("[auth]\nclient_keys = [\"{CLIENT_TOKEN}\"]\n");
    let mut toml = config_toml(openai, &[], &auth);
    toml.push_str(&format!(
        r#"
[[api_keys]]
name = "openai"
key = "{OPENAI_KEY}"
url = "{openai}/v1"
models = ["gpt-4o-mini", "o3*"]

[[api_keys]]
name = "azure-classic"
kind = "azure"
key = "{AZURE_KEY}"
url = "{azure}"
api_version = "2024-10-21"
deployments = {{ "gpt-4o" = "prod-gpt-4o" }}
models = ["gpt-4o"]

[[api_keys]]
name = "local"
key = "{LOCAL_KEY}"
url = "{local}/v1"
models = ["llama3.2", "others"]
"#
    ));
    toml
}

fn header<'c>(call: &'c Call, name: &str) -> Option<&'c str> {
    call.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The chat completion calls one mock got, as (path and query, streamed, model).
fn chats(mock: &MockUpstream) -> Vec<(String, bool, String)> {
    mock.calls()
        .iter()
        .filter(|call| call.method == "POST")
        .map(|call| {
            let body = call.json().expect("a JSON body");
            (
                call.path_and_query.clone(),
                body["stream"] == json!(true),
                body["model"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_is_served_by_a_mixed_pool() {
    let (openai, azure, local) = (
        MockUpstream::start().await,
        MockUpstream::start().await,
        MockUpstream::start().await,
    );
    for mock in [&openai, &azure, &local] {
        mock.set_default(Behaviour::Compatible { chunks: CHUNKS });
    }
    let file = ConfigFile::new(&mixed_pool(&openai.url(), &azure.url(), &local.url()));
    let proxy = start_app(file.app()).await;

    let models = ["gpt-4o-mini", "gpt-4o", "llama3.2"];
    let result =
        support::python::run("mixed_pool.py", &models, &proxy.url("/v1"), CLIENT_TOKEN).await;

    // What the SDK parsed: each model answered, whole and streamed.
    for model in models {
        let chat = &result["chat"][model];
        assert_eq!(chat["model"], model, "{result}");
        assert_eq!(chat["content"], COMPLETION_TEXT);
        assert_eq!(chat["finish_reason"], "stop");
        assert_eq!(result["stream"][model], "tok0 tok1 tok2 ", "{result}");
    }
    assert_eq!(
        result["models"],
        json!([
            "gpt-4o-mini",
            "gpt-4o",
            "text-embedding-3-small",
            "whisper-1"
        ])
    );

    // Which upstream got which call, with which credentials.
    let plain_and_streamed = |path: &str, model: &str| {
        vec![
            (path.to_owned(), false, model.to_owned()),
            (path.to_owned(), true, model.to_owned()),
        ]
    };
    assert_eq!(
        chats(&openai),
        plain_and_streamed("/v1/chat/completions", "gpt-4o-mini")
    );
    assert_eq!(
        chats(&azure),
        plain_and_streamed(
            "/openai/deployments/prod-gpt-4o/chat/completions?api-version=2024-10-21",
            "gpt-4o"
        )
    );
    assert_eq!(
        chats(&local),
        plain_and_streamed("/v1/chat/completions", "llama3.2")
    );
    for (mock, key) in [
        (&openai, OPENAI_KEY),
        (&azure, AZURE_KEY),
        (&local, LOCAL_KEY),
    ] {
        for call in mock.calls() {
            assert_eq!(call.key.as_deref(), Some(key), "{}", call.path_and_query);
            let sent = format!("{:?}", call.headers);
            assert!(
                !sent.contains(CLIENT_TOKEN),
                "the client token stays at kcp"
            );
        }
    }
    for call in azure.calls() {
        assert_eq!(header(&call, "api-key"), Some(AZURE_KEY));
        assert_eq!(
            header(&call, "authorization"),
            None,
            "Azure gets no Authorization"
        );
    }
    // The model list names no model: one key of the pool answers it, once.
    let lists: Vec<usize> = [&openai, &azure, &local]
        .iter()
        .map(|mock| mock.calls().iter().filter(|c| c.method == "GET").count())
        .collect();
    assert_eq!(
        lists.iter().sum::<usize>(),
        1,
        "one upstream model list: {lists:?}"
    );
}
