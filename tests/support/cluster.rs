//! Replicas sharing one real `redis-server` (`[cluster]`).
//!
//! [`Redis`] is a server of one test: loopback, free port, no persistence, temporary
//! directory, killed on drop. Tests using it FAIL when the binary is missing (`.ci/run`
//! installs Debian's `redis-server`): they never skip.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use key_cycle_proxy::core::Secret;
use key_cycle_proxy::server::cluster::ClusterSection;
use key_cycle_proxy::server::config::Config;

use super::proxy_harness::{Proxy, WAIT};

/// A `redis-server` of one test.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// `--requirepass`, if the server asks for one.
    password: Option<String>,
}

impl Redis {
    pub async fn start() -> Redis {
        Redis::start_with(None).await
    }

    /// A server that asks clients for `password` (`--requirepass`).
    pub async fn start_with_password(password: &str) -> Redis {
        Redis::start_with(Some(password.to_owned())).await
    }

    async fn start_with(password: Option<String>) -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("kcp-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut redis = Redis {
            port,
            dir,
            child: None,
            password,
        };
        redis.restart().await;
        redis
    }

    /// Starts the server (again) on its port and waits until it answers PING.
    pub async fn restart(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir);
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (Debian package redis-server; .ci/run installs it)");
        self.child = Some(child);
        let port = self.port;
        let (ping, pong) = match &self.password {
            None => ("PING\r\n".to_owned(), b"+PONG\r\n".to_vec()),
            Some(password) => (
                format!("AUTH {password}\r\nPING\r\n"),
                b"+OK\r\n+PONG\r\n".to_vec(),
            ),
        };
        let ready = async move {
            loop {
                if let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let mut answer = vec![0u8; pong.len()];
                    if tcp.write_all(ping.as_bytes()).await.is_ok()
                        && tcp.read_exact(&mut answer).await.is_ok()
                        && answer == pong
                    {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(WAIT, ready)
            .await
            .expect("redis-server answers PING");
    }

    /// The raw reply (RESP) to one inline `command`, e.g. `HKEYS some-key`.
    pub async fn query(&self, command: &str) -> String {
        let exchange = async {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .expect("redis answers");
            tcp.write_all(format!("{command}\r\n").as_bytes())
                .await
                .expect("command sent");
            let mut reply = vec![0u8; 16 * 1024];
            let n = tcp.read(&mut reply).await.expect("reply read");
            String::from_utf8_lossy(&reply[..n]).into_owned()
        };
        tokio::time::timeout(WAIT, exchange)
            .await
            .expect("redis replies in time")
    }

    /// The namespace [`section`] gives replicas on this Redis.
    pub fn namespace(&self) -> String {
        format!("kcp-test-{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The url without credentials (a password-protected server refuses its clients).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The url with `password` in it: `redis://:password@127.0.0.1:port`.
    pub fn url_with_password(&self, password: &str) -> String {
        format!("redis://:{password}@127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `[cluster]` on `redis` for the replica `replica` (one namespace per Redis).
pub fn section(redis: &Redis, replica: &str) -> ClusterSection {
    ClusterSection {
        redis_url: Secret::new(redis.url()),
        namespace: redis.namespace(),
        replica_id: Some(replica.to_owned()),
        ..ClusterSection::default()
    }
}

/// Sets `config.cluster` to [`section`].
pub fn join(config: &mut Config, redis: &Redis, replica: &str) {
    config.cluster = Some(section(redis, replica));
}

/// Polls `check` every 10 ms until it holds; fails the test after [`WAIT`].
pub async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let polled = async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(WAIT, polled).await.is_err() {
        panic!("timed out waiting until {what}");
    }
}

/// Whether `proxy` reaches its cluster's Redis now.
pub fn connected(proxy: &Proxy) -> bool {
    proxy.app.cluster.as_ref().is_some_and(|c| c.is_connected())
}

/// The live replicas `proxy` counts (0 without `[cluster]`).
pub fn replicas(proxy: &Proxy) -> i64 {
    proxy.app.cluster.as_ref().map_or(0, |c| c.replicas())
}
