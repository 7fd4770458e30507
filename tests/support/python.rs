//! The official OpenAI Python SDK, run as a child process: the venv `.ci/run tools` creates
//! (`OPENAI_SDK_PYTHON`, else `target/python-sdk-venv/bin/python`) and the scripts in
//! `tests/python/`. A test that needs it fails, naming the setup, when it is missing.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// Bound on one script run (Python's start-up included).
pub const SDK_WAIT: Duration = Duration::from_secs(120);

/// The venv's interpreter: `OPENAI_SDK_PYTHON`, else the venv `.ci/run tools` creates.
pub fn python() -> PathBuf {
    let python = std::env::var_os("OPENAI_SDK_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/python-sdk-venv/bin/python"),
        PathBuf::from,
    );
    assert!(
        python.exists(),
        "no Python with the OpenAI SDK at {}: run `bash .ci/run tools` (or see docs/testing.md), \
         or point OPENAI_SDK_PYTHON at a python that has `openai[realtime]` installed",
        python.display()
    );
    python
}

/// Runs `tests/python/<script>` with `args` against kcp at `base_url` with the client
/// `token`; the one JSON object it prints. Panics with its stderr if it fails.
pub async fn run(script: &str, args: &[&str], base_url: &str, token: &str) -> Value {
    let python = python();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .args(args)
        .env("KCP_BASE_URL", base_url)
        .env("KCP_CLIENT_TOKEN", token)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SDK_WAIT, run)
        .await
        .expect("the SDK script finishes in time")
        .expect("python runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed:\n{stderr}",
        script.display()
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{} printed no JSON ({e}):\n{}",
            script.display(),
            String::from_utf8_lossy(&output.stdout)
        )
    })
}
