//! The real `kcp-server` binary as an operator runs it: `--check-config` (its output and exit
//! codes) and SIGINT (drain the request in flight, refuse new connections, exit 0).
//! How the binary is started and waited for: the `support` kit.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;

use kcp_core::Secret;

mod support;
use support::{BOUND, Running, TempDir, kcp_server};

const KEY: &str = "sk-test-binary-alpha-0000000001";
const ADMIN_TOKEN: &str = "admin-token-binary-5e1f0c9a77";
const EX_USAGE: i32 = 64;

fn config_toml(upstream: &str) -> String {
    format!(
        r#"[server]
bind_addr = "127.0.0.1:0"
graceful_shutdown_seconds = 30

[upstream]
base_url = "{upstream}"
max_retries = 0

[observability]
metrics_bind = "127.0.0.1:0"
admin_token = "{ADMIN_TOKEN}"

[[api_keys]]
name = "alpha"
key = "{KEY}"
"#
    )
}

/// Runs `command` to its end, within [`BOUND`].
fn run(mut command: Command) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kcp-server");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(BOUND)
        .expect("kcp-server exits within the bound")
        .expect("kcp-server output")
}

#[test]
fn check_config_prints_the_effective_config_without_a_secret() {
    let dir = TempDir::new("binary");
    let config = dir.write("kcp.toml", &config_toml("http://127.0.0.1:9"));
    let output = run(kcp_server(
        &dir.0,
        &[
            "--check-config",
            "--config",
            config.to_str().expect("UTF-8 path"),
        ],
    ));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "nothing on stderr: {stderr}");
    let effective: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is one JSON document ({e}):\n{stdout}"));
    assert_eq!(effective["config"]["server"]["bind_addr"], "127.0.0.1:0");
    assert_eq!(effective["config"]["upstream"]["max_retries"], 0);
    assert_eq!(
        effective["config"]["observability"]["admin_token"],
        "[redacted]"
    );
    let keys = effective["api_keys"].as_array().expect("api_keys");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["name"], "alpha");
    assert_eq!(keys[0]["fingerprint"], Secret::new(KEY).fingerprint());
    assert_eq!(
        keys[0]["url"], "http://127.0.0.1:9/v1",
        "the effective root"
    );
    assert_eq!(keys[0]["kind"], "openai");
    for secret in [KEY, ADMIN_TOKEN, &KEY[3..]] {
        assert!(
            !stdout.contains(secret),
            "a secret in the output:\n{stdout}"
        );
    }
}

#[test]
fn an_invalid_config_exits_64_naming_the_fault() {
    let dir = TempDir::new("binary");
    let config = dir.write(
        "kcp.toml",
        &config_toml("http://127.0.0.1:9").replace("max_retries = 0", "max_retrys = 0"),
    );
    let path = config.to_str().expect("UTF-8 path");
    for args in [
        vec!["--check-config", "--config", path],
        vec!["--config", path],
    ] {
        let output = run(kcp_server(&dir.0, &args));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(EX_USAGE), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}: nothing on stdout");
        assert!(
            stderr.starts_with("kcp-server: invalid configuration:"),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains("max_retrys"),
            "{args:?}: names the field: {stderr}"
        );
        assert!(!stderr.contains(KEY), "{args:?}: no secret: {stderr}");
    }
    let missing = run(kcp_server(&dir.0, &["--config", "nowhere.toml"]));
    assert_eq!(missing.status.code(), Some(EX_USAGE));
}

/// A one-request upstream on loopback: it reads one request, reports it, and answers only
/// when released.
struct HeldUpstream {
    addr: SocketAddr,
    received: mpsc::Receiver<String>,
    release: mpsc::Sender<()>,
}

impl HeldUpstream {
    fn start() -> HeldUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let (seen, received) = mpsc::channel();
        let (release, held) = mpsc::channel::<()>();
        thread::spawn(move || {
            let (mut tcp, _) = listener.accept().expect("accept");
            let head = read_head(&mut tcp);
            let _ = seen.send(head);
            if held.recv_timeout(BOUND).is_ok() {
                let body = r#"{"id":"chatcmpl-held","object":"chat.completion","choices":[]}"#;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(response.as_bytes());
            }
        });
        HeldUpstream {
            addr,
            received,
            release,
        }
    }
}

/// Reads up to the end of an HTTP head (the tests' requests are small).
fn read_head(tcp: &mut TcpStream) -> String {
    tcp.set_read_timeout(Some(BOUND)).expect("read timeout");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[test]
fn sigint_drains_the_request_in_flight_then_exits_0() {
    let upstream = HeldUpstream::start();
    let dir = TempDir::new("binary");
    let config = dir.write(
        "kcp.toml",
        &config_toml(&format!("http://{}", upstream.addr)),
    );
    let mut server = Running::start(&dir.0, &config);
    let addr = server.proxy_addr();

    let mut client = TcpStream::connect(addr).expect("connect");
    let body = r#"{"model":"gpt-4o","messages":[]}"#;
    write!(
        client,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: kcp\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let forwarded = upstream
        .received
        .recv_timeout(BOUND)
        .expect("the request reaches the upstream");
    assert!(
        forwarded.starts_with("POST /v1/chat/completions "),
        "{forwarded}"
    );
    assert!(
        forwarded.contains(&format!("Bearer {KEY}")),
        "sent with the pool key"
    );

    server.signal("INT");
    server.line_with("drain");
    assert!(
        TcpStream::connect(addr).is_err(),
        "no new connection while draining"
    );
    assert!(server.is_running(), "still running: a request is in flight");

    upstream.release.send(()).expect("upstream waiting");
    client.set_read_timeout(Some(BOUND)).expect("read timeout");
    let mut response = String::new();
    client
        .read_to_string(&mut response)
        .expect("the answer arrives");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with(r#""choices":[]}"#), "{response}");

    let status = server.exit();
    assert_eq!(status.code(), Some(0), "a drained shutdown exits 0");
    server.line_with("stopped");
}
