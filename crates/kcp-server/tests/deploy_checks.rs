//! The deployment files, checked by the tools that will read them, against the real binary.
//!
//! - `promtool` checks `deploy/prometheus/` (rules, their unit tests, the scrape config) and a
//!   live `/metrics` scrape of `kcp-server` serving traffic from the mock upstream.
//! - Every metric that `deploy/grafana/kcp.json` or the alerts query exists in that scrape, so
//!   a renamed metric breaks this test instead of a dashboard.
//! - `kcp-server healthcheck` (the image's `HEALTHCHECK`) passes against the running server and
//!   fails against a closed port.
//! - Every file in `config/` passes `--check-config` as shipped; an invalid one exits 64.
//!
//! The tools are required: a missing `promtool` fails the test (`.ci/run` installs Debian's
//! `prometheus`). Every child process is killed on drop and every wait is bounded.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kcp_mock::{Behaviour, MockUpstream};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

/// The binary under test.
const KCP: &str = env!("CARGO_BIN_EXE_kcp-server");
/// Longest any one child process (promtool, `--check-config`, healthcheck) may run.
const CHILD_LIMIT: Duration = Duration::from_secs(30);
/// Longest the server may take to answer `/health` after it was spawned.
const START_LIMIT: Duration = Duration::from_secs(30);
/// Longest one HTTP exchange with the server may take.
const HTTP_LIMIT: Duration = Duration::from_secs(10);

const STEADY_KEY: &str = "sk-deploy-steady";
const BUSY_KEY: &str = "sk-deploy-busy";

// ---------------------------------------------------------------------------------------------
// The checks

#[tokio::test]
async fn prometheus_files_pass_promtool() {
    let dir = repo_root().join("deploy/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts.test.yml"],
        vec!["check", "config", "prometheus.yml"],
    ] {
        let output = run(promtool().args(&args).current_dir(&dir), None).await;
        assert_success(&output, &format!("promtool {}", args.join(" ")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_scrape_passes_promtool_and_has_every_metric_the_deploy_files_query() {
    let mock = MockUpstream::start().await;
    // The steady key teaches learned limits; the busy key's first call is a 429, so a retry,
    // a cooldown and a rate_limited outcome reach the metrics.
    mock.set(
        STEADY_KEY,
        Behaviour::OkWithLimits {
            limit_requests: 500,
            remaining_requests: 499,
            reset_requests: "120ms".into(),
            limit_tokens: 30_000,
            remaining_tokens: 29_900,
            reset_tokens: "200ms".into(),
        },
    );
    mock.script(BUSY_KEY, vec![Behaviour::rate_limited_secs(60)]);
    let server = KcpProcess::start(&mock).await;

    for n in 0..4 {
        let (status, body) = server.chat().await;
        assert_eq!(status, StatusCode::OK, "request {n}: {body}");
    }
    assert_eq!(mock.calls_for(BUSY_KEY), 1, "the busy key is resting");
    assert_eq!(mock.calls_for(STEADY_KEY), 4);

    let scrape = server.scrape().await;
    let output = run(
        promtool().args(["check", "metrics"]),
        Some(scrape.as_bytes()),
    )
    .await;
    assert_success(&output, "promtool check metrics < /metrics");

    let exposed = sample_names(&scrape);
    let queried = deploy_queried_names();
    for expected in [
        "kcp_key_state",
        "kcp_upstream_requests_total",
        "kcp_overhead_seconds_bucket",
        "kcp_queue_wait_seconds_bucket",
        "kcp_key_cooldown_seconds",
        "kcp_key_remaining_requests",
        "kcp_key_remaining_tokens",
        "kcp_retries_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            queried.contains(expected),
            "the dashboard and alerts should query {expected}; they query {queried:?}"
        );
    }
    let missing: Vec<_> = queried.difference(&exposed).collect();
    assert!(
        missing.is_empty(),
        "queried by deploy/ but absent from a live scrape: {missing:?}\nscrape:\n{scrape}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_passes_against_the_server_and_fails_against_a_closed_port() {
    let mock = MockUpstream::start().await;
    let server = KcpProcess::start(&mock).await;
    let addr = server.client_addr.to_string();
    let output = run(
        Command::new(KCP).args(["healthcheck", "--addr", &addr]),
        None,
    )
    .await;
    assert_success(&output, "kcp-server healthcheck against the running server");

    let closed = free_addr().to_string();
    let output = run(
        Command::new(KCP).args(["healthcheck", "--addr", &closed]),
        None,
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&closed),
        "stderr names the address: {stderr}"
    );
    server.stop().await;
}

#[tokio::test]
async fn every_shipped_config_passes_check_config() {
    let dir = repo_root().join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("config/ is readable")
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 2, "config/ holds the examples: {files:?}");
    let scratch = Scratch::new("check-config");
    for file in &files {
        let flag = match file.extension().and_then(|e| e.to_str()) {
            Some("toml") => "--config",
            Some("json") => "--keys-file",
            other => panic!("{}: no flag reads a .{other:?} file", file.display()),
        };
        let output = run(
            check_config(&scratch)
                .arg(flag)
                .arg(file)
                .arg("--check-config"),
            None,
        )
        .await;
        assert_success(
            &output,
            &format!("--check-config {flag} {}", file.display()),
        );
        let effective: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("--check-config prints JSON");
        let keys = effective["api_keys"].as_array().map_or(0, Vec::len);
        assert!(keys > 0, "{} configures keys: {effective}", file.display());
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(!printed.contains("sk-your"), "a key was printed: {printed}");
    }
}

#[tokio::test]
async fn the_container_config_passes_check_config_with_its_environment() {
    let scratch = Scratch::new("container-config");
    let file = repo_root().join("deploy/kcp/config.toml");
    let output = run(
        check_config(&scratch)
            .env("OPENAI_KEYS", "sk-container-a,sk-container-b")
            .env("KCP_AUTH__CLIENT_KEYS", "client-token-1")
            .arg("--config")
            .arg(&file)
            .arg("--check-config"),
        None,
    )
    .await;
    assert_success(&output, "--check-config deploy/kcp/config.toml");
    let effective: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("--check-config prints JSON");
    assert_eq!(effective["config"]["server"]["bind_addr"], "0.0.0.0:8080");
    assert_eq!(
        effective["config"]["observability"]["metrics_bind"],
        "0.0.0.0:9090"
    );
    assert_eq!(effective["client_keys"], 1);
    assert_eq!(effective["api_keys"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn an_invalid_config_exits_64_and_says_why() {
    let scratch = Scratch::new("invalid-config");
    let file = scratch.write(
        "config.toml",
        "[upstream]\nconnect_timeout_ms = 0\n\n[[api_keys]]\nkey = \"sk-invalid-test\"\n",
    );
    let output = run(
        check_config(&scratch)
            .arg("--config")
            .arg(&file)
            .arg("--check-config"),
        None,
    )
    .await;
    assert_eq!(output.status.code(), Some(64), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid configuration") && stderr.contains("connect_timeout_ms"),
        "stderr: {stderr}"
    );
    assert!(output.stdout.is_empty(), "nothing on stdout: {output:?}");
}

// ---------------------------------------------------------------------------------------------
// Metric names: what the deploy files query, what a scrape exposes

#[test]
fn query_names_skip_labels_strings_functions_and_variables() {
    let names = |expr: &str| metric_names(expr).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, key) (rate(kcp_overhead_seconds_bucket{instance=~"$instance",kcp_label="kcp_not_a_metric"}[$__rate_interval])))"#
        ),
        ["kcp_overhead_seconds_bucket"]
    );
    assert_eq!(
        names("sum(kcp_key_state{state=\"disabled\"}) == count(kcp_key_state)"),
        ["kcp_key_state"]
    );
    assert_eq!(
        names("label_values(kcp_inflight_requests, instance)"),
        ["kcp_inflight_requests"]
    );
    assert_eq!(
        names("rate(process_cpu_seconds_total[5m])/kcp_x_count"),
        ["kcp_x_count", "process_cpu_seconds_total"]
    );
    assert!(names("up{job='kcp_job'} and other_metric").is_empty());
}

#[test]
fn alert_expressions_are_read_inline_and_as_blocks() {
    let yaml = "rules:\n  - alert: A\n    expr: kcp_a > 1\n    for: 1m\n  - alert: B\n    expr: |\n      sum(kcp_b)\n        / sum(kcp_c)\n    labels:\n      kcp_d: x\n";
    assert_eq!(yaml_exprs(yaml), ["kcp_a > 1", "sum(kcp_b)\n/ sum(kcp_c)"]);
}

#[test]
fn sample_names_are_the_series_names_of_the_exposition() {
    let text = "# HELP kcp_h x\n# TYPE kcp_h histogram\nkcp_h_bucket{le=\"1\"} 0\nkcp_h_sum 0\nkcp_h_count 0\nkcp_g 3\n";
    assert_eq!(
        sample_names(text).into_iter().collect::<Vec<_>>(),
        ["kcp_g", "kcp_h_bucket", "kcp_h_count", "kcp_h_sum"]
    );
}

/// Every metric that the Grafana dashboard and the alerts query.
fn deploy_queried_names() -> BTreeSet<String> {
    let root = repo_root();
    let dashboard = read(&root.join("deploy/grafana/kcp.json"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&dashboard).expect("deploy/grafana/kcp.json is JSON");
    let mut queries = Vec::new();
    json_queries(&dashboard, &mut queries);
    assert!(
        queries.len() >= 10,
        "the dashboard has queries: {queries:?}"
    );
    let alerts = yaml_exprs(&read(&root.join("deploy/prometheus/alerts.yml")));
    assert_eq!(alerts.len(), 4, "four alerts: {alerts:?}");
    queries
        .iter()
        .chain(&alerts)
        .flat_map(|query| metric_names(query))
        .collect()
}

/// PromQL in a Grafana dashboard: panel `expr`s and template variable queries.
fn json_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query" | "definition", serde_json::Value::String(query)) => {
                        out.push(query.clone());
                    }
                    _ => json_queries(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| json_queries(item, out)),
        _ => {}
    }
}

/// The `expr:` values of a Prometheus rules file: inline, or a `|`/`>` block whose lines are
/// indented deeper than the key (joined by newlines, indentation removed).
fn yaml_exprs(yaml: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if !value.starts_with(['|', '>']) {
            exprs.push(value.to_owned());
            continue;
        }
        let indent = line.len() - trimmed.len();
        let mut block = Vec::new();
        while let Some(next) = lines.peek() {
            let next_trimmed = next.trim_start();
            if !next_trimmed.is_empty() && next.len() - next_trimmed.len() <= indent {
                break;
            }
            block.push(next_trimmed);
            lines.next();
        }
        exprs.push(block.join("\n").trim().to_owned());
    }
    exprs
}

/// Metric names in a PromQL expression: identifiers starting with `kcp_` or `process_`
/// outside label matchers (`{...}`), string literals and `$variables`. A name is kept as
/// written (`_bucket`, `_sum` and `_count` included), since that is the series PromQL selects.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut braces = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i]))
                {
                    i += 1;
                }
                let ident: String = chars[start..i].iter().collect();
                let variable = start > 0 && chars[start - 1] == '$';
                let metric = ident.starts_with("kcp_") || ident.starts_with("process_");
                if braces == 0 && !variable && metric {
                    names.insert(ident);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// Index of the closing quote of the string literal opened at `open`.
fn skip_string(chars: &[char], open: usize) -> usize {
    let quote = chars[open];
    let mut i = open + 1;
    while i < chars.len() && chars[i] != quote {
        i += if chars[i] == '\\' && quote != '`' {
            2
        } else {
            1
        };
    }
    i
}

/// Series names of a Prometheus text exposition.
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The real binary

/// `kcp-server` serving on free loopback ports against `mock`; killed on drop.
struct KcpProcess {
    child: Child,
    client_addr: SocketAddr,
    metrics_addr: SocketAddr,
    http: Client<HttpConnector, Full<Bytes>>,
    scratch: Scratch,
}

impl KcpProcess {
    async fn start(mock: &MockUpstream) -> KcpProcess {
        let scratch = Scratch::new("server");
        let config = scratch.write(
            "config.toml",
            &format!(
                "[upstream]\nbase_url = \"{url}\"\nrequest_timeout_ms = 5000\n\
                 retry_initial_backoff_ms = 5\nretry_max_backoff_ms = 50\n\n\
                 [keys]\nrotation_strategy = \"round_robin\"\n\n\
                 [[api_keys]]\nname = \"busy\"\nkey = \"{BUSY_KEY}\"\n\n\
                 [[api_keys]]\nname = \"steady\"\nkey = \"{STEADY_KEY}\"\n",
                url = mock.url()
            ),
        );
        let (client_addr, metrics_addr) = (free_addr(), free_addr());
        let log = std::fs::File::create(scratch.path("server.log")).expect("create the log file");
        let child = Command::new(KCP)
            .env_clear()
            .current_dir(&scratch.dir)
            .arg("--config")
            .arg(&config)
            .args(["--bind", &client_addr.to_string()])
            .args(["--metrics-bind", &metrics_addr.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn kcp-server");
        let http = Client::builder(TokioExecutor::new()).build_http();
        let mut server = KcpProcess {
            child,
            client_addr,
            metrics_addr,
            http,
            scratch,
        };
        server.wait_healthy().await;
        server
    }

    /// Polls `GET /health` until it answers 200; the process has no readiness signal of its own.
    async fn wait_healthy(&mut self) {
        let uri = format!("http://{}/health", self.client_addr);
        let ready = tokio::time::timeout(START_LIMIT, async {
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    return Err(status);
                }
                if let Ok((StatusCode::OK, _)) = self.get(&uri).await {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(status)) => panic!("kcp-server exited with {status}:\n{}", self.log()),
            Err(_) => panic!(
                "kcp-server not healthy within {START_LIMIT:?}:\n{}",
                self.log()
            ),
        }
    }

    /// One chat completion through the proxy.
    async fn chat(&self) -> (StatusCode, String) {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/v1/chat/completions", self.client_addr))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::from(
                r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
            ))
            .expect("valid request");
        self.send(request)
            .await
            .unwrap_or_else(|error| panic!("chat completion failed: {error}\n{}", self.log()))
    }

    /// The `/metrics` text of the ops listener.
    async fn scrape(&self) -> String {
        let uri = format!("http://{}/metrics", self.metrics_addr);
        match self.get(&uri).await {
            Ok((StatusCode::OK, body)) => body,
            other => panic!("GET /metrics: {other:?}\n{}", self.log()),
        }
    }

    async fn get(&self, uri: &str) -> Result<(StatusCode, String), String> {
        let request = Request::get(uri)
            .body(Full::default())
            .expect("valid request");
        self.send(request).await
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<(StatusCode, String), String> {
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(HTTP_LIMIT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {HTTP_LIMIT:?}")))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.path("server.log")).unwrap_or_default()
    }

    /// Kills the process and waits for it, bounded.
    async fn stop(mut self) {
        self.child.start_kill().expect("kill kcp-server");
        tokio::time::timeout(CHILD_LIMIT, self.child.wait())
            .await
            .expect("kcp-server exits after SIGKILL")
            .expect("wait for kcp-server");
    }
}

/// `kcp-server` for `--check-config` in `scratch` (no `./config.toml` to pick up) with an
/// empty environment (no `OPENAI_KEYS` or `KCP_*` of the developer's).
fn check_config(scratch: &Scratch) -> Command {
    let mut command = Command::new(KCP);
    command.env_clear().current_dir(&scratch.dir);
    command
}

/// `promtool`, which must be installed.
fn promtool() -> Command {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("promtool").is_file()));
    assert!(
        found,
        "promtool is not on PATH: install Debian's `prometheus` package (.ci/run tools does)"
    );
    Command::new("promtool")
}

/// Runs `command` to completion within [`CHILD_LIMIT`], feeding it `stdin`; killed on drop.
async fn run(command: &mut Command, stdin: Option<&[u8]>) -> Output {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("spawn the child process");
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let write = async {
            pipe.write_all(input).await?;
            pipe.shutdown().await
        };
        tokio::time::timeout(CHILD_LIMIT, write)
            .await
            .expect("stdin written in time")
            .expect("write stdin");
    }
    tokio::time::timeout(CHILD_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{command:?} did not finish within {CHILD_LIMIT:?}"))
        .expect("wait for the child process")
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed:\n{}",
        describe(output)
    );
}

fn describe(output: &Output) -> String {
    let status: ExitStatus = output.status;
    format!(
        "{status}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A loopback address whose port was free a moment ago: bound, read, released.
fn free_addr() -> SocketAddr {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A fresh directory under the system temp dir, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(purpose: &str) -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "kcp-deploy-checks-{}-{purpose}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write a scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
