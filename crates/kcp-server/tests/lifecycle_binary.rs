//! The real `kcp-server` binary as an operator runs it: `--check-config` (its output and exit
//! codes) and SIGINT (drain the request in flight, refuse new connections, exit 0).
//!
//! Each test starts the binary in an empty temporary directory with an empty environment, so
//! no `config.toml`, `config.json` or `KCP_*` variable of the machine leaks in. Every wait is
//! bounded by [`BOUND`] of real time: these are separate processes, where paused time cannot
//! reach; the tests assert on events (a line logged, a connection refused, an exit), never
//! on durations.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kcp_core::Secret;

/// Bound on every wait for the other process.
const BOUND: Duration = Duration::from_secs(20);
const KEY: &str = "sk-test-binary-alpha-0000000001";
const ADMIN_TOKEN: &str = "admin-token-binary-5e1f0c9a77";
const EX_USAGE: i32 = 64;

/// An empty directory of its own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kcp-binary-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create the temp dir");
        TempDir(path)
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).expect("write the file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

/// `kcp-server` with `args`, in `dir`, with nothing from this environment.
fn kcp_server(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kcp-server"));
    command.args(args).current_dir(dir).env_clear();
    command
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
    let dir = TempDir::new();
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
    let dir = TempDir::new();
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

/// The running binary, its log lines arriving on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(dir: &Path, config: &Path) -> Running {
        let mut child = kcp_server(dir, &["--config", config.to_str().expect("UTF-8 path")])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start kcp-server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first log line (from now on) containing `needle`.
    fn line_with(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?} in:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Waits for the exit, within [`BOUND`].
    fn exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for kcp-server") {
                return status;
            }
            assert!(Instant::now() < deadline, "kcp-server still running");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `addr=` field of a text log line.
fn addr_in(line: &str) -> SocketAddr {
    let rest = line
        .split(" addr=")
        .nth(1)
        .unwrap_or_else(|| panic!("no addr= in {line:?}"));
    let addr = rest.split_whitespace().next().unwrap_or_default();
    addr.parse()
        .unwrap_or_else(|e| panic!("addr {addr:?} in {line:?}: {e}"))
}

#[test]
fn sigint_drains_the_request_in_flight_then_exits_0() {
    let upstream = HeldUpstream::start();
    let dir = TempDir::new();
    let config = dir.write(
        "kcp.toml",
        &config_toml(&format!("http://{}", upstream.addr)),
    );
    let mut server = Running::start(&dir.0, &config);
    let addr = addr_in(&server.line_with("listening"));

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
    assert!(
        server.child.try_wait().expect("status").is_none(),
        "still running: a request is in flight"
    );

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
