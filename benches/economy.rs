//! The key economy through the real `kcp-server` binary: open-loop load over loopback against
//! the in-process mock provider's per-key buckets. Method, targets and figures:
//! `docs/key-economy.md`, section "Measured through the real server".
//!
//! ```text
//! cargo build --release -p kcp-server              # the server under test, first
//! cargo bench --bench economy                      # full run, about 90 s
//! cargo bench --bench economy -- --smoke           # 2 s per scenario
//! cargo bench --bench economy -- --scenario burst  # one of 80%, 150%, burst
//! ```
//!
//! Other flags: `--server PATH` runs that binary instead of `target/release/kcp-server` (which
//! is refused when a source of the server is newer); `--seed N` changes the arrival times. Everything
//! listens on 127.0.0.1 only; the server is killed on exit and logs at warn to a file in the
//! temp dir, whose path is printed.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, SystemTime};

use key_cycle_proxy::economy::{self, Plan, Pool};

/// Longest the server may take to answer its first `GET /health`.
const STARTUP: Duration = Duration::from_secs(20);

struct Options {
    smoke: bool,
    scenario: Option<String>,
    server: Option<PathBuf>,
    seed: Option<u64>,
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("economy: {message}");
            return ExitCode::from(2);
        }
    };
    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("economy: {message}");
            ExitCode::FAILURE
        }
    }
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        smoke: false,
        scenario: None,
        server: None,
        seed: None,
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo bench passes `--bench` to every bench binary.
            "--bench" => {}
            "--smoke" => options.smoke = true,
            "--scenario" => options.scenario = Some(args.next().ok_or("--scenario NAME")?),
            "--server" => options.server = Some(args.next().ok_or("--server PATH")?.into()),
            "--seed" => {
                let seed = args.next().ok_or("--seed N")?;
                options.seed = Some(seed.parse().map_err(|_| format!("bad seed {seed}"))?);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(options)
}

fn run(options: Options) -> Result<(), String> {
    let mut plan = if options.smoke {
        Plan::smoke()
    } else {
        Plan::full()
    };
    if let Some(name) = &options.scenario {
        plan = plan
            .only(name)
            .ok_or_else(|| format!("no scenario {name}: 80%, 150% or burst"))?;
    }
    if let Some(seed) = options.seed {
        plan.seed = seed;
    }
    let binary = match options.server {
        Some(path) => path,
        None => release_server()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(measure(&binary, &plan))
}

async fn measure(binary: &Path, plan: &Plan) -> Result<(), String> {
    let pool = Pool::start()
        .await
        .map_err(|e| format!("mock upstream: {e}"))?;
    let dir = std::env::temp_dir().join(format!("kcp-economy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let addr = free_port()?;
    let config = dir.join("config.toml");
    std::fs::write(&config, config_toml(&pool, addr, free_port()?))
        .map_err(|e| format!("{}: {e}", config.display()))?;
    let log = dir.join("kcp-server.log");
    let server = Server::spawn(binary, &config, &log)?;
    wait_healthy(addr).await?;
    eprintln!(
        "economy: kcp-server on {addr}, mock provider on {}, log {}",
        pool.url(),
        log.display()
    );
    let figures = economy::run(addr, &pool, plan).await;
    drop(server);
    println!(
        "Pool {} rpm ({:.0} requests in full buckets), mock latency {} ms, seed {}\n",
        pool.keys().iter().map(|k| k.rpm).sum::<u32>(),
        pool.buckets(),
        economy::MOCK_LATENCY.as_millis(),
        plan.seed
    );
    print!("{}", economy::table(&figures));
    Ok(())
}

/// `target/release/kcp-server`, refused if any source of the server is newer than it.
///
/// The bench does not run cargo itself: a cargo nested in `cargo bench` sees cargo's run-time
/// environment, which reruns build scripts and rebuilds both the binary and the bench.
fn release_server() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let binary = target.join("release").join("kcp-server");
    let build = "run `cargo build --release -p kcp-server` first";
    let built = modified(&binary).ok_or_else(|| format!("no {}: {build}", binary.display()))?;
    let sources = ["kcp-core", "kcp-upstream", "kcp-server"]
        .iter()
        .map(|krate| root.join("crates").join(krate))
        .chain([root.join("Cargo.lock")]);
    for source in sources {
        if let Some(newer) = newer_than(&source, built) {
            return Err(format!(
                "{} is newer than {}: {build}",
                newer.display(),
                binary.display()
            ));
        }
    }
    Ok(binary)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A file under `path` (or `path` itself) modified after `time`, skipping `target` dirs.
fn newer_than(path: &Path, time: SystemTime) -> Option<PathBuf> {
    if path.is_dir() {
        let entries = std::fs::read_dir(path).ok()?;
        return entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|child| !child.ends_with("target"))
            .find_map(|child| newer_than(&child, time));
    }
    (modified(path)? > time).then(|| path.to_owned())
}

/// A loopback port that was free a moment ago (bound, read, released).
fn free_port() -> Result<SocketAddr, String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("bind: {e}"))?;
    listener.local_addr().map_err(|e| format!("bind: {e}"))
}

/// The server's config: loopback, warn logs, the pool's keys, nothing about their limits.
fn config_toml(pool: &Pool, addr: SocketAddr, metrics: SocketAddr) -> String {
    let mut toml = format!(
        "[server]\nbind_addr = \"{addr}\"\n\n\
         [observability]\nmetrics_bind = \"{metrics}\"\ntracing_level = \"warn\"\n"
    );
    for key in pool.keys() {
        toml.push_str(&format!(
            "\n[[api_keys]]\nname = \"{}\"\nkey = \"{}\"\nurl = \"{}\"\n",
            key.name,
            key.key.expose(),
            pool.url()
        ));
    }
    toml
}

/// The server process; killed when dropped.
struct Server(Child);

impl Server {
    fn spawn(binary: &Path, config: &Path, log: &Path) -> Result<Server, String> {
        let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("log file: {e}"))?;
        let dir = config.parent().unwrap_or(Path::new("."));
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(config)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env_remove("OPENAI_KEYS")
            .env_remove("RUST_LOG");
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KCP_") {
                command.env_remove(name);
            }
        }
        let child = command
            .spawn()
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        Ok(Server(child))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `GET /health` until it answers 200, for at most [`STARTUP`].
async fn wait_healthy(addr: SocketAddr) -> Result<(), String> {
    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: http::Uri = format!("http://{addr}/health")
        .parse()
        .map_err(|e| format!("health uri: {e}"))?;
    let poll = async {
        loop {
            if let Ok(response) = client.get(uri.clone()).await {
                if response.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(STARTUP, poll)
        .await
        .map_err(|_| format!("kcp-server did not answer /health on {addr} within {STARTUP:?}"))
}
