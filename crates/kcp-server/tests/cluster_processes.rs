//! `[cluster]` with real `kcp-server` processes, as operators run replicas: three binaries with
//! their own config files share one real `redis-server` and one mock upstream.
//!
//! - they count each other by heartbeat (`/health` says 3 replicas);
//! - a key that answers 429 through replica a is not called through replica b;
//! - replica c stopped by SIGTERM takes its heartbeat out of Redis before it exits;
//! - replica b killed without a goodbye (SIGKILL): its heartbeat expires and a counts 1.
//!
//! The workspace's end-to-end tests (`tests/cluster_*.rs`) run replicas in-process; this one
//! checks that the binary wires the same thing from a config file. It needs `redis-server`
//! (Debian's package, `.ci/run` installs it) and FAILS without it. Every wait is bounded by
//! [`BOUND`] of real time.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kcp_mock::{Behaviour, MockUpstream};

mod support;
use support::{BOUND, Running, TempDir};

const KEY_A: &str = "sk-test-cluster-alpha-00000000001";
const KEY_B: &str = "sk-test-cluster-bravo-00000000002";

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redis-server` on a free loopback port, no persistence; returns it and its url.
fn start_redis(dir: &Path) -> (Process, String) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (Debian package redis-server; .ci/run installs it)");
    (Process(child), format!("redis://127.0.0.1:{port}"))
}

/// A `kcp-server` replica named `name`; returns it and its proxy address (from its log).
fn start_replica(dir: &TempDir, name: &str, upstream: &str, redis: &str) -> (Running, SocketAddr) {
    let config = dir.write(
        &format!("{name}.toml"),
        &format!(
            r#"[server]
bind_addr = "127.0.0.1:0"

[observability]
metrics_bind = "127.0.0.1:0"

[cluster]
redis_url = "{redis}"
namespace = "kcp-processes"
replica_id = "{name}"

[[api_keys]]
key = "{KEY_A}"
url = "{upstream}"

[[api_keys]]
key = "{KEY_B}"
url = "{upstream}"
"#
        ),
    );
    let mut replica = Running::start(&dir.0, &config);
    let addr = replica.proxy_addr();
    (replica, addr)
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// `method path` on `addr` with `body`: the status and the body.
async fn call(client: &HttpClient, addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let method = if body.is_empty() { "GET" } else { "POST" };
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("valid request");
    let exchange = async {
        let response = client.request(request).await.expect("an answer");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.expect("a body");
        (
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        )
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .expect("answered in time")
}

async fn chat(client: &HttpClient, addr: SocketAddr) -> u16 {
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    call(client, addr, "/v1/chat/completions", body).await.0
}

async fn health(client: &HttpClient, addr: SocketAddr) -> serde_json::Value {
    let (status, body) = call(client, addr, "/health", "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON health")
}

/// Polls `/health` on `addr` every 50 ms until `check` holds; fails after [`BOUND`].
async fn until_health(
    client: &HttpClient,
    addr: SocketAddr,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    let polled = async {
        loop {
            if check(&health(client, addr).await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(BOUND, polled).await.is_err() {
        panic!(
            "timed out waiting until {what}: {}",
            health(client, addr).await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_processes_share_a_rest_leave_on_sigterm_and_expire_on_sigkill() {
    let dir = TempDir::new("cluster-processes");
    let (_redis, redis_url) = start_redis(&dir.0);
    let mock = MockUpstream::start().await;
    let (_a, a) = start_replica(&dir, "a", &mock.url(), &redis_url);
    let (b_process, b) = start_replica(&dir, "b", &mock.url(), &redis_url);
    let (mut c_process, c) = start_replica(&dir, "c", &mock.url(), &redis_url);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let three = |h: &serde_json::Value| {
        h["cluster"]["redis_connected"] == true && h["cluster"]["replicas"] == 3
    };
    for replica in [a, b, c] {
        until_health(&client, replica, "three replicas counted", three).await;
    }

    mock.set(KEY_A, Behaviour::rate_limited_secs(30));
    for _ in 0..8 {
        assert_eq!(chat(&client, a).await, 200);
        if mock.calls_for(KEY_A) == 1 {
            break;
        }
    }
    assert_eq!(mock.calls_for(KEY_A), 1, "a met key A's 429");
    until_health(&client, b, "b sees key A resting", |h| {
        h["keys"]["cooling"] == 1
    })
    .await;
    let before_b = mock.calls_for(KEY_B);
    for _ in 0..4 {
        assert_eq!(chat(&client, b).await, 200);
    }
    assert_eq!(mock.calls_for(KEY_A), 1, "b never calls the resting key");
    assert_eq!(mock.calls_for(KEY_B), before_b + 4);

    // SIGTERM: c drains, leaves and exits; its heartbeat is gone by then, not 3 s later.
    let mut redis = redis::Client::open(redis_url.as_str())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let c_key = "kcp-processes:replica:c";
    let exists = |redis: &mut redis::aio::MultiplexedConnection| {
        let mut redis = redis.clone();
        async move {
            redis::cmd("EXISTS")
                .arg(c_key)
                .query_async::<i64>(&mut redis)
                .await
                .expect("EXISTS")
        }
    };
    assert_eq!(exists(&mut redis).await, 1);
    c_process.signal("TERM");
    let exited = tokio::task::spawn_blocking(move || {
        let status = c_process.exit();
        (c_process, status)
    });
    let (_c_process, status) = tokio::time::timeout(BOUND, exited)
        .await
        .expect("c exits in time")
        .expect("wait task");
    assert!(status.success(), "c exits 0");
    assert_eq!(exists(&mut redis).await, 0, "c left before exiting");

    // SIGKILL: no clean shutdown, so b's heartbeat stays until its TTL runs out.
    drop(b_process);
    until_health(&client, a, "a counts itself alone", |h| {
        h["cluster"]["replicas"] == 1
    })
    .await;
}
