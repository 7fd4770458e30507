//! End-to-end proof that no secret reaches a log, a metric, the admin API or a client.
//!
//! One scenario drives the proxy through everything that touches keys, at `trace` level with a
//! process-wide JSON subscriber that captures every line of this test binary (hyper, h2,
//! hyper-util, and rustls through the `log` bridge included): successes over TLS, a 401, an
//! exhausted quota, a 429, 5xx retries, a stream, a connect failure, client-auth refusals, the
//! admin API, reloads good and bad, `config::load` on broken files, and the `Debug` and
//! `Display` of the state and errors a panic or an error chain could print. Every secret is
//! distinctive (`sk-live-SECRET-<random>`), so a substring check is meaningful; at the end no
//! secret may appear in full anywhere that was collected.

mod support;

use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use key_cycle_proxy::core::Secret;
use key_cycle_proxy::server::app::App;
use key_cycle_proxy::server::cli::Cli;
use key_cycle_proxy::server::config;
use key_cycle_proxy::server::observe::logging;
use support::observe::{Captured, capture_logs, scrape};
use support::proxy_harness::{Proxy, Reply, closed_port_url, read, send_with, start_app};
use support::secrets::{assert_absent, chain, record, secret};
use support::{Behaviour, MockUpstream};

/// Every secret of the scenario, and everything a secret must never reach.
#[derive(Default)]
struct Evidence {
    secrets: Vec<String>,
    /// Secrets checked in error texts only (see the upstream-error step).
    in_errors_only: Vec<String>,
    /// Client-visible answers: status, headers and body of every response.
    client: String,
    /// Admin API answers.
    admin: String,
    /// `/metrics` scrapes.
    metrics: String,
    /// Error texts, `Debug` output and panic messages.
    errors: String,
}

impl Evidence {
    fn secret(&mut self, prefix: &str, tag: &str) -> String {
        let s = secret(prefix, tag);
        self.secrets.push(s.clone());
        s
    }

    fn client(&mut self, reply: &Reply) {
        record(&mut self.client, reply);
    }

    fn admin(&mut self, reply: &Reply) {
        record(&mut self.admin, reply);
    }

    fn error(&mut self, what: &str, text: impl std::fmt::Display) {
        let _ = writeln!(self.errors, "--- {what}\n{text}");
    }

    /// No secret in full anywhere.
    fn assert_clean(&self, logs: &str) {
        assert_absent(
            "errors and Debug output",
            &self.errors,
            &self.in_errors_only,
        );
        for (place, text) in [
            ("logs", logs),
            ("client responses", &self.client),
            ("admin responses", &self.admin),
            ("metrics", &self.metrics),
            ("errors and Debug output", &self.errors),
        ] {
            assert_absent(place, text, &self.secrets);
        }
    }
}

/// The scenario's keys and the config file that lists them.
struct Setup {
    dir: PathBuf,
    mock_url: String,
    ca_file: String,
    client_key: String,
    admin_token: String,
    ok: String,
    unauthorized: String,
    quota: String,
    rate_limited: String,
    server_error: String,
    streaming: String,
    added: String,
}

impl Setup {
    fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// The config file: every key of the first load, or (`reloaded`) without the quota key
    /// and with `added`.
    fn toml(&self, reloaded: bool) -> String {
        let mut keys = vec![
            (Some("ok"), &self.ok),
            (None, &self.unauthorized),
            (Some("limited"), &self.rate_limited),
            (Some("flaky"), &self.server_error),
            (Some("streamer"), &self.streaming),
        ];
        if reloaded {
            keys.push((Some("added"), &self.added));
        } else {
            keys.insert(2, (Some("quota"), &self.quota));
        }
        let mut toml = format!(
            r#"[server]
bind_addr = "127.0.0.1:0"
graceful_shutdown_seconds = 5

[upstream]
connect_timeout_ms = 2000
request_timeout_ms = 5000
retry_initial_backoff_ms = 5
retry_max_backoff_ms = 50
max_retries = 2
ca_file = "{ca}"

[keys]
rotation_strategy = "round_robin"

[observability]
metrics_bind = "127.0.0.1:0"
tracing_level = "trace"
log_format = "json"
admin_token = "{admin}"

[auth]
client_keys = ["{client}"]
"#,
            ca = self.ca_file,
            admin = self.admin_token,
            client = self.client_key,
        );
        for (name, key) in keys {
            let _ = write!(
                toml,
                "\n[[api_keys]]\nkey = \"{key}\"\nurl = \"{url}\"\nmodels = [\"gpt-4o\", \"others\"]\n",
                url = self.mock_url
            );
            if let Some(name) = name {
                let _ = writeln!(toml, "name = \"{name}\"");
            }
        }
        toml
    }

    fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("write config.toml");
    }

    fn cli(&self) -> Cli {
        Cli {
            config: Some(self.config_path()),
            ..Cli::default()
        }
    }
}

fn temp_dir() -> PathBuf {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let name = format!(
        "kcp-secrets-{}-{:016x}",
        std::process::id(),
        hasher.finish()
    );
    let dir = std::env::temp_dir().join(name);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Sends `method path` to `url_base` with `headers` and reads the whole answer.
async fn call(
    proxy: &Proxy,
    method: Method,
    url: String,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Reply {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("valid request");
    read(send_with(&proxy.client, request).await).await
}

async fn chat(proxy: &Proxy, bearer: &str, stream: bool) -> Reply {
    let body = if stream {
        r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
    } else {
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#
    };
    let auth = format!("Bearer {bearer}");
    call(
        proxy,
        Method::POST,
        proxy.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        body,
    )
    .await
}

async fn admin(proxy: &Proxy, method: Method, path: &str, token: &str) -> Reply {
    let auth = format!("Bearer {token}");
    call(
        proxy,
        method,
        proxy.metrics_url(path),
        &[("authorization", &auth)],
        "",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_a_metric_the_admin_api_or_a_client() {
    let logs = capture_logs("trace");
    let mut evidence = Evidence::default();
    let mock = MockUpstream::start_tls().await;
    let dir = temp_dir();
    let setup = Setup {
        mock_url: mock.url(),
        ca_file: mock
            .ca_file()
            .expect("TLS mock")
            .to_str()
            .expect("UTF-8 path")
            .to_owned(),
        client_key: evidence.secret("sk-client", "client"),
        admin_token: evidence.secret("admin", "token"),
        ok: evidence.secret("sk-live", "ok"),
        unauthorized: evidence.secret("sk-live", "unauthorized"),
        quota: evidence.secret("sk-live", "quota"),
        rate_limited: evidence.secret("sk-live", "limited"),
        server_error: evidence.secret("sk-live", "flaky"),
        streaming: evidence.secret("sk-live", "streamer"),
        added: evidence.secret("sk-live", "added"),
        dir,
    };
    mock.set(&setup.unauthorized, Behaviour::Unauthorized);
    mock.set(&setup.quota, Behaviour::InsufficientQuota);
    mock.set(&setup.rate_limited, Behaviour::rate_limited_secs(60));
    mock.set(&setup.server_error, Behaviour::status(500));
    mock.set(
        &setup.streaming,
        Behaviour::Stream {
            chunks: 3,
            interval: Duration::from_millis(5),
        },
    );
    setup.write_config(&setup.toml(false));
    let cli = setup.cli();
    let loaded = config::load(&cli).expect("the scenario's config is valid");
    let app = App::new(loaded)
        .expect("the proxy builds")
        .reloadable(cli.clone());
    let proxy = start_app(app).await;

    // Traffic: every key class, streams included, all with a valid client key.
    for i in 0..8 {
        let reply = chat(&proxy, &setup.client_key, i % 3 == 2).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        evidence.client(&reply);
    }
    for key in [
        &setup.ok,
        &setup.unauthorized,
        &setup.quota,
        &setup.rate_limited,
        &setup.server_error,
        &setup.streaming,
    ] {
        assert!(mock.calls_for(key) >= 1, "every key was tried");
    }
    let query = format!("/v1/models?api_key={}", setup.client_key);
    let auth = format!("Bearer {}", setup.client_key);
    let reply = call(
        &proxy,
        Method::GET,
        proxy.url(&query),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    evidence.client(&reply);

    // Client-auth refusals must not echo what was presented.
    let wrong = evidence.secret("sk-wrong", "client");
    let reply = chat(&proxy, &wrong, false).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    evidence.client(&reply);
    let reply = chat(&proxy, &setup.ok, false).await;
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "a pool key is no client key"
    );
    evidence.client(&reply);

    // The admin API, with and without the token.
    let wrong_admin = evidence.secret("admin-wrong", "token");
    let reply = admin(&proxy, Method::GET, "/admin/keys", &wrong_admin).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    evidence.admin(&reply);
    let reply = admin(&proxy, Method::GET, "/admin/keys", &setup.admin_token).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["keys"].as_array().map(Vec::len), Some(6));
    evidence.admin(&reply);
    for action in ["disable", "enable"] {
        let path = format!("/admin/keys/ok/{action}");
        let reply = admin(&proxy, Method::POST, &path, &setup.admin_token).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        evidence.admin(&reply);
    }
    evidence.metrics.push_str(&scrape(&proxy).await);

    // A reload that drops a key and adds one, then reloads that fail with a secret in the file.
    setup.write_config(&setup.toml(true));
    let reply = admin(&proxy, Method::POST, "/admin/reload", &setup.admin_token).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["keys"], 6);
    evidence.admin(&reply);
    for (what, broken) in broken_configs(&setup) {
        setup.write_config(&broken);
        let reply = admin(&proxy, Method::POST, "/admin/reload", &setup.admin_token).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{what}: {}",
            reply.text()
        );
        evidence.admin(&reply);
        match config::load(&cli) {
            Ok(_) => panic!("{what}: accepted"),
            Err(error) => {
                evidence.error(what, &error);
                evidence.error(what, format!("{error:?}"));
            }
        }
    }
    setup.write_config(&setup.toml(true));
    assert_eq!(proxy.app.reload().expect("valid again"), 6);
    mock.set(&setup.added, Behaviour::Ok);
    for _ in 0..6 {
        let reply = chat(&proxy, &setup.client_key, false).await;
        assert_eq!(reply.status, StatusCode::OK);
        evidence.client(&reply);
    }
    assert!(mock.calls_for(&setup.added) >= 1, "the added key serves");
    evidence.metrics.push_str(&scrape(&proxy).await);
    let reply = admin(&proxy, Method::GET, "/admin/keys", &setup.admin_token).await;
    evidence.admin(&reply);

    // A key pointing nowhere: the connect error is logged and answered.
    let mut loaded = proxy.app.generation().config.clone();
    loaded.keys.truncate(1);
    loaded.keys[0].url = closed_port_url().await;
    loaded.keys[0].name = None;
    let failing = start_app(App::new(loaded).expect("valid")).await;
    let reply = chat(&failing, &setup.client_key, false).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    evidence.client(&reply);

    // Legacy keys file with a syntax error next to a key.
    let legacy = setup.dir.join("config.json");
    let legacy_key = evidence.secret("sk-live", "legacy");
    std::fs::write(
        &legacy,
        format!(r#"{{"apiKeys": [{{"key": "{legacy_key}", "url": }}]}}"#),
    )
    .expect("write config.json");
    let legacy_cli = Cli {
        keys_file: Some(legacy.clone()),
        ..setup.cli()
    };
    let error = config::load(&legacy_cli).expect_err("broken JSON");
    evidence.error("legacy config.json", &error);
    evidence.error("legacy config.json", format!("{error:?}"));

    // Debug output of the running state and of start errors.
    evidence.error("App", format!("{:?}", proxy.app));
    evidence.error(
        "LoadedConfig",
        format!("{:?}", proxy.app.generation().config),
    );
    evidence.error("pool", format!("{:?}", proxy.app.pool()));
    let mut bad_header = proxy.app.generation().config.clone();
    let control_key = evidence.secret("sk-live", "control");
    bad_header.keys[0].secret = Secret::new(format!("{control_key}\u{7f}x"));
    let error = App::new(bad_header).expect_err("a key that is no header value");
    evidence.error("StartError", &error);
    evidence.error("StartError", format!("{error:?}"));
    evidence.error("StartError chain", chain(&error));

    // Upstream errors, with a key in the Authorization header and one in the URL's credentials.
    // Key urls cannot carry credentials (config validation refuses them, checked above), and
    // hyper-util's connection pool prints the URL authority at trace level, so the URL's secret
    // is checked in the error's texts only.
    let url_secret = secret("sk-live", "url");
    evidence.in_errors_only.push(url_secret.clone());
    let closed = closed_port_url().await;
    let in_url = closed.replace("http://", &format!("http://user:{url_secret}@"));
    let request = Request::get(format!("{in_url}/v1/models"))
        .header("authorization", format!("Bearer {}", setup.ok))
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    let error = proxy
        .app
        .upstream
        .send(request)
        .await
        .expect_err("nothing listens");
    evidence.error("UpstreamError", &error);
    evidence.error("UpstreamError", format!("{error:?}"));
    evidence.error("UpstreamError chain", chain(&error));

    // A panic, through the panic hook the binary installs.
    let previous = std::panic::take_hook();
    logging::log_panics();
    let config = proxy.app.generation();
    let panicked = std::panic::catch_unwind(|| panic!("state at the panic: {config:?}"));
    std::panic::set_hook(previous);
    let payload = panicked.expect_err("it panicked");
    let message = payload
        .downcast_ref::<String>()
        .expect("a formatted panic message");
    evidence.error("panic", message);

    let reply = call(&proxy, Method::GET, proxy.url("/health"), &[], "").await;
    evidence.client(&reply);
    drop(failing);
    drop(proxy.stop().await);
    let _ = std::fs::remove_dir_all(&setup.dir);

    let text = logs.text();
    assert_captured_everything(&logs);
    assert!(
        !evidence.client.contains("Incorrect API key"),
        "the provider's key rejection reached a client:\n{}",
        evidence.client
    );
    assert!(evidence.client.contains("x-kcp-request-id"));
    evidence.assert_clean(&text);
}

/// Config files that fail to load, each with a secret where an error message might quote it.
fn broken_configs(setup: &Setup) -> Vec<(&'static str, String)> {
    let good = setup.toml(true);
    let key = &setup.added;
    vec![
        (
            "unterminated string after a key",
            good.replacen(&format!("key = \"{key}\""), &format!("key = \"{key}"), 1),
        ),
        (
            "a key where a number belongs",
            format!("{good}weight = \"{key}\"\n"),
        ),
        (
            "a key in an unknown field",
            format!("{good}secret_key = \"{key}\"\n"),
        ),
        (
            "a key in a url's credentials",
            good.replacen(
                &setup.mock_url,
                &setup
                    .mock_url
                    .replace("https://", &format!("https://user:{key}@")),
                1,
            ),
        ),
        (
            "a client key where a list belongs",
            good.replacen(
                &format!("client_keys = [\"{}\"]", setup.client_key),
                &format!("client_keys = \"{}\"", setup.client_key),
                1,
            ),
        ),
        (
            "an admin token of the wrong type",
            good.replacen(
                &format!("admin_token = \"{}\"", setup.admin_token),
                &format!("admin_token = [\"{}\"]", setup.admin_token),
                1,
            ),
        ),
    ]
}

/// The capture is real: JSON lines at trace level from the proxy, the HTTP stack and rustls.
fn assert_captured_everything(logs: &Captured) {
    let lines = logs.json_lines();
    let targets: Vec<&str> = lines.iter().filter_map(|l| l["target"].as_str()).collect();
    for expected in [
        "kcp::access",
        "kcp::keys",
        "kcp::panic",
        "kcp_server",
        "h2",
        "rustls",
    ] {
        assert!(
            targets.iter().any(|t| t.starts_with(expected)),
            "no line from {expected}: {:?}",
            targets.iter().collect::<std::collections::BTreeSet<_>>()
        );
    }
    assert!(lines.iter().any(|l| l["level"] == "TRACE"));
}
