//! The real `kcp-server` binary as a child process, for the tests that run it as an operator
//! does (`lifecycle_binary.rs`, `cluster_processes.rs`).
//!
//! Each run starts in a temporary directory of its own with an empty environment, so no
//! `config.toml`, `config.json` or `KCP_*` variable of the machine leaks in. Every wait is
//! bounded by [`BOUND`] of real time: paused time cannot reach another process, so the tests
//! assert on events (a line logged, a connection refused, an exit), never on durations.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Bound on every wait for another process.
pub const BOUND: Duration = Duration::from_secs(20);

/// An empty directory of its own, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kcp-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create the temp dir");
        TempDir(path)
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
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

/// `kcp-server` with `args`, in `dir`, with nothing from this environment.
pub fn kcp_server(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kcp-server"));
    command.args(args).current_dir(dir).env_clear();
    command
}

/// The running binary, its log lines arriving on a channel (read as they come, so the
/// child never blocks on a full pipe); killed on drop.
pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    pub fn start(dir: &Path, config: &Path) -> Running {
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
    pub fn line_with(&mut self, needle: &str) -> String {
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

    /// The proxy's address, from its `listening` log line.
    pub fn proxy_addr(&mut self) -> SocketAddr {
        addr_in(&self.line_with("listening"))
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Whether it has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("status").is_none()
    }

    /// Waits for the exit, within [`BOUND`].
    pub fn exit(&mut self) -> ExitStatus {
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
pub fn addr_in(line: &str) -> SocketAddr {
    let rest = line
        .split(" addr=")
        .nth(1)
        .unwrap_or_else(|| panic!("no addr= in {line:?}"));
    let addr = rest.split_whitespace().next().unwrap_or_default();
    addr.parse()
        .unwrap_or_else(|e| panic!("addr {addr:?} in {line:?}: {e}"))
}
