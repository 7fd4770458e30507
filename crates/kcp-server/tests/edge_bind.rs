//! Secure defaults of the real `kcp-server` binary: an open proxy on a non-loopback address
//! refuses to start (exit 64, both fixes named) unless `allow_anonymous` says it is intended,
//! and the shipped example configs pass `--check-config`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_kcp-server");

/// A fresh, empty working directory for one run.
fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kcp-edge-bind-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Runs the binary with `args` in `dir`, with only `OPENAI_KEYS` set from the environment.
fn run(dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command.current_dir(dir).args(args).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    command
        .env("OPENAI_KEYS", "sk-edge-bind-test")
        .output()
        .expect("run kcp-server")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_original_open_config_is_refused_with_both_fixes() {
    let dir = workdir("open");
    // The original key-cycle-proxy: every interface, no client auth.
    std::fs::write(
        dir.join("config.toml"),
        "[server]\nbind_addr = \"0.0.0.0:8080\"\n",
    )
    .expect("write config");
    let output = run(&dir, &["--check-config"]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(64), "{text}");
    assert!(
        text.contains("0.0.0.0:8080 is not a loopback address"),
        "{text}"
    );
    assert!(
        text.contains("[auth] client_keys (or client_keys_env)"),
        "{text}"
    );
    assert!(text.contains("[auth] allow_anonymous = true"), "{text}");
    assert!(!text.contains("sk-edge-bind-test"), "{text}");

    let flagged = run(
        &workdir("flag"),
        &["--bind", "0.0.0.0:8080", "--check-config"],
    );
    assert_eq!(flagged.status.code(), Some(64), "{}", stderr(&flagged));
    assert!(stderr(&flagged).contains("--bind"), "{}", stderr(&flagged));
}

#[test]
fn allow_anonymous_or_client_keys_make_a_public_bind_start() {
    let dir = workdir("anonymous");
    std::fs::write(dir.join("config.toml"), "[auth]\nallow_anonymous = true\n")
        .expect("write config");
    let output = run(&dir, &["--bind", "0.0.0.0:8080", "--check-config"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rendered = String::from_utf8_lossy(&output.stdout);
    assert!(rendered.contains("0.0.0.0:8080"), "{rendered}");

    let dir = workdir("keys");
    std::fs::write(
        dir.join("config.toml"),
        "[auth]\nclient_keys = [\"kcp-token\"]\n",
    )
    .expect("write config");
    let output = run(&dir, &["--bind", "0.0.0.0:8080", "--check-config"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn shipped_example_configs_pass_check_config() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
    let dir = workdir("examples");
    let toml = examples.join("kcp.example.toml");
    let json = examples.join("config.example.json");
    let output = Command::new(BIN)
        .current_dir(&dir)
        .env_clear()
        .env("OPENAI_KEY_TEAM_B", "sk-example-team-b")
        .args(["--config", toml.to_str().expect("utf-8 path")])
        .args(["--keys-file", json.to_str().expect("utf-8 path")])
        .arg("--check-config")
        .output()
        .expect("run kcp-server");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rendered = String::from_utf8_lossy(&output.stdout);
    assert!(rendered.contains("127.0.0.1:8080"), "{rendered}");
}

#[test]
fn any_origin_with_anonymous_access_logs_a_startup_warning() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::Duration;

    let dir = workdir("cors-any");
    std::fs::write(
        dir.join("config.toml"),
        "[server]\nbind_addr = \"127.0.0.1:0\"\n[observability]\nmetrics_bind = \"127.0.0.1:0\"\n\
         [cors]\nallowed_origins = [\"*\"]\n",
    )
    .expect("write config");
    let mut child = Command::new(BIN)
        .current_dir(&dir)
        .env_clear()
        .env("OPENAI_KEYS", "sk-edge-bind-test")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kcp-server");
    let (lines, received) = mpsc::channel();
    for output in [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let mut seen = Vec::new();
    let warned = loop {
        match received.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line.contains("any web page can spend the API keys") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    child.kill().expect("stop kcp-server");
    let _ = child.wait();
    assert!(warned, "no warning; output:\n{}", seen.join("\n"));
}
