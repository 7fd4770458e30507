//! Value checks on the merged [`Config`], run once before any port is bound.
//!
//! Types already reject what serde can (unknown fields, wrong types, unknown strategy or log
//! format); this module rejects values that parse but cannot work: zero timeouts, URLs without
//! a host, a burst of 0, the two listeners on one port. Every check runs, so one start
//! reports every problem. Each problem names the field and who set it (file, variable or
//! flag), looked up through [`Origins`].

use std::net::SocketAddr;

use http::Uri;
use kcp_core::Secret;

use super::error::Problem;
use super::load::Origins;
use super::sections::{
    Config, CorsSection, ObservabilitySection, RateLimitSection, ServerSection, UpstreamSection,
};

/// Levels `tracing_level` accepts as a single word.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks every value of `config`, appending what is wrong to `problems`.
pub(super) fn check(config: &Config, origins: &Origins<'_>, problems: &mut Vec<Problem>) {
    let mut check = Checker { origins, problems };
    server(&mut check, &config.server);
    check.listeners(config.server.bind_addr, config.observability.metrics_bind);
    upstream(&mut check, &config.upstream);
    rate_limit(&mut check, &config.rate_limit);
    observability(&mut check, &config.observability);
    cors(&mut check, &config.cors);
    for (path, message, fix) in config.cluster.iter().flat_map(|c| c.problems()) {
        check.fail(path, message, fix);
    }
}

/// An open proxy (no client keys) may listen on loopback only, unless `[auth] allow_anonymous`
/// says that is intended: anyone who reaches a public address could spend the key pool.
pub(super) fn open_bind(
    config: &Config,
    has_client_keys: bool,
    origins: &Origins<'_>,
    problems: &mut Vec<Problem>,
) {
    let bind = config.server.bind_addr;
    if has_client_keys || config.auth.allow_anonymous || bind.ip().to_canonical().is_loopback() {
        return;
    }
    problems.push(Problem::new(
        origins.of("server.bind_addr"),
        format!(
            "[server] bind_addr {bind} is not a loopback address and no client keys are set, \
             so anyone who can reach it could spend the API keys"
        ),
        "set [auth] client_keys (or client_keys_env) so clients must present a token, \
         or set [auth] allow_anonymous = true if an open proxy is intended",
    ));
}

fn server(check: &mut Checker<'_, '_>, server: &ServerSection) {
    let default = ServerSection::default();
    let sizes = [
        (
            "server.request_body_limit_bytes",
            server.request_body_limit_bytes,
            default.request_body_limit_bytes,
        ),
        (
            "server.max_inflight",
            server.max_inflight,
            default.max_inflight,
        ),
        (
            "server.max_connections",
            server.max_connections,
            default.max_connections,
        ),
    ];
    for (path, value, default) in sizes {
        check.positive(path, value as u64, default as u64, "");
    }
    let timeouts = [
        (
            "server.header_read_timeout_ms",
            server.header_read_timeout_ms,
            default.header_read_timeout_ms,
        ),
        (
            "server.body_read_timeout_ms",
            server.body_read_timeout_ms,
            default.body_read_timeout_ms,
        ),
        (
            "server.body_timeout_ms",
            server.body_timeout_ms,
            default.body_timeout_ms,
        ),
        (
            "server.response_write_timeout_ms",
            server.response_write_timeout_ms,
            default.response_write_timeout_ms,
        ),
        (
            "server.h2_keepalive_interval_ms",
            server.h2_keepalive_interval_ms,
            default.h2_keepalive_interval_ms,
        ),
        (
            "server.h2_keepalive_timeout_ms",
            server.h2_keepalive_timeout_ms,
            default.h2_keepalive_timeout_ms,
        ),
        (
            "server.idle_connection_timeout_ms",
            server.idle_connection_timeout_ms,
            default.idle_connection_timeout_ms,
        ),
    ];
    for (path, value, default) in timeouts {
        check.positive(path, value, default, " milliseconds");
    }
    if server.max_header_bytes < MIN_HEADER_BYTES {
        check.fail(
            "server.max_header_bytes",
            format!(
                "is {}; it must be at least {MIN_HEADER_BYTES} (hyper's smallest read buffer)",
                server.max_header_bytes
            ),
            format!(
                "set it to {MIN_HEADER_BYTES} or more (default {})",
                default.max_header_bytes
            ),
        );
    }
    if server.worker_threads > MAX_WORKER_THREADS {
        check.fail(
            "server.worker_threads",
            format!(
                "is {}; it must be at most {MAX_WORKER_THREADS}",
                server.worker_threads
            ),
            "set it to the number of CPU cores, or 0 for one per core (default 0)",
        );
    }
}

/// More worker threads than this is a typo, not a machine.
const MAX_WORKER_THREADS: usize = 1024;

fn upstream(check: &mut Checker<'_, '_>, upstream: &UpstreamSection) {
    let default = UpstreamSection::default();
    if let Err(reason) = http_url(&upstream.base_url) {
        check.fail(
            "upstream.base_url",
            reason,
            format!(
                "use an http(s) URL with a host (default {})",
                default.base_url
            ),
        );
    }
    let timeouts = [
        (
            "upstream.connect_timeout_ms",
            upstream.connect_timeout_ms,
            default.connect_timeout_ms,
        ),
        (
            "upstream.request_timeout_ms",
            upstream.request_timeout_ms,
            default.request_timeout_ms,
        ),
        (
            "upstream.stream_idle_timeout_ms",
            upstream.stream_idle_timeout_ms,
            default.stream_idle_timeout_ms,
        ),
    ];
    for (path, value, default) in timeouts {
        check.positive(path, value, default, " milliseconds");
    }
    if upstream.retry_initial_backoff_ms > upstream.retry_max_backoff_ms {
        check.fail(
            "upstream.retry_initial_backoff_ms",
            format!(
                "({}) is greater than [upstream] retry_max_backoff_ms ({})",
                upstream.retry_initial_backoff_ms, upstream.retry_max_backoff_ms
            ),
            "make retry_initial_backoff_ms at most retry_max_backoff_ms",
        );
    }
    if let Some(path) = upstream.ca_file.as_ref().filter(|path| !path.is_file()) {
        check.fail(
            "upstream.ca_file",
            format!("{} does not exist or is not a file", path.display()),
            "point ca_file at a PEM bundle, or remove it to trust only the built-in roots",
        );
    }
}

fn rate_limit(check: &mut Checker<'_, '_>, rate_limit: &RateLimitSection) {
    check.rate("rate_limit.per_key_rps", rate_limit.per_key_rps);
    check.rate("rate_limit.global_rps", rate_limit.global_rps);
    let default = RateLimitSection::default();
    check.positive(
        "rate_limit.burst",
        rate_limit.burst.into(),
        default.burst.into(),
        " requests",
    );
}

fn observability(check: &mut Checker<'_, '_>, observability: &ObservabilitySection) {
    if let Err(reason) = tracing_level(&observability.tracing_level) {
        check.fail(
            "observability.tracing_level",
            reason,
            "use trace, debug, info, warn, error or off, or directives like kcp_server=debug,info",
        );
    }
    if observability
        .admin_token
        .as_ref()
        .is_some_and(Secret::is_empty)
    {
        check.fail(
            "observability.admin_token",
            "is empty",
            "set a long random token, or remove admin_token to keep the admin API off",
        );
    }
}

fn cors(check: &mut Checker<'_, '_>, cors: &CorsSection) {
    for (index, origin) in cors.allowed_origins.iter().enumerate() {
        if let Err(reason) = cors_origin(origin) {
            check.fail_at(
                "cors.allowed_origins",
                format!("[cors] allowed_origins[{index}] {reason}"),
                "use \"*\" or an origin like https://app.example.com (scheme and host, no path)",
            );
        }
    }
}

/// Smallest request head limit: hyper refuses a read buffer below 8 KiB.
const MIN_HEADER_BYTES: usize = 8192;

/// Why `value` is not an `http(s)://host[...]` URL.
pub(super) fn http_url(value: &str) -> Result<(), String> {
    if !value.contains("://") {
        return Err("has no scheme; it must start with http:// or https://".to_owned());
    }
    let uri: Uri = value
        .trim()
        .parse()
        .map_err(|_| "is not a valid URL".to_owned())?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://".to_owned()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host".to_owned());
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("must not contain credentials (user:password@)".to_owned());
    }
    Ok(())
}

/// Why `value` is neither `*` nor a bare `scheme://host[:port]` origin.
fn cors_origin(value: &str) -> Result<(), String> {
    if value == "*" {
        return Ok(());
    }
    http_url(value)?;
    let uri: Uri = value
        .parse()
        .map_err(|_| "is not a valid origin".to_owned())?;
    let bare = uri.path_and_query().is_none_or(|p| p.as_str() == "/") && !value.ends_with('/');
    if bare {
        Ok(())
    } else {
        Err("is not a bare origin (browsers send scheme://host[:port] only)".to_owned())
    }
}

/// Why `value` is not a level or a list of `target=level` directives.
fn tracing_level(value: &str) -> Result<(), String> {
    let value = value.trim();
    if value.is_empty() {
        return Err("is empty".to_owned());
    }
    if value.contains(['=', ',']) {
        return tracing_subscriber::EnvFilter::builder()
            .parse(value)
            .map(drop)
            .map_err(|error| format!("is not a valid filter: {error}"));
    }
    if LEVELS.contains(&value.to_ascii_lowercase().as_str()) {
        Ok(())
    } else {
        Err(format!("`{value}` is not a log level"))
    }
}

/// Appends problems, naming the field and who set it.
struct Checker<'a, 'b> {
    origins: &'a Origins<'b>,
    problems: &'a mut Vec<Problem>,
}

impl Checker<'_, '_> {
    /// A problem with `path`'s field, e.g. `[upstream] connect_timeout_ms is 0`.
    fn fail(&mut self, path: &str, message: impl Into<String>, fix: impl Into<String>) {
        let message = format!("{} {}", field_name(path), message.into());
        self.fail_at(path, message, fix);
    }

    /// A problem whose message already names the field.
    fn fail_at(&mut self, path: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.problems
            .push(Problem::new(self.origins.of(path), message, fix));
    }

    /// `value` must not be 0; `unit` (with a leading space) is shown with the default.
    fn positive(&mut self, path: &str, value: u64, default: u64, unit: &str) {
        if value == 0 {
            self.fail(
                path,
                "is 0; it must be greater than 0",
                format!("set it to a positive number (default {default}{unit})"),
            );
        }
    }

    fn rate(&mut self, path: &str, value: Option<f64>) {
        if let Some(rps) = value {
            if !(rps.is_finite() && rps > 0.0) {
                self.fail(
                    path,
                    "must be a finite number greater than 0",
                    "set requests per second, e.g. 3.5, or remove it to turn the limit off",
                );
            }
        }
    }

    /// The client and metrics listeners cannot share a port on overlapping addresses.
    /// Port 0 (an ephemeral port, as tests use) never collides.
    fn listeners(&mut self, bind: SocketAddr, metrics: SocketAddr) {
        let overlap = bind.ip() == metrics.ip()
            || bind.ip().is_unspecified()
            || metrics.ip().is_unspecified();
        if bind.port() == 0 || bind.port() != metrics.port() || !overlap {
            return;
        }
        let sources: Vec<String> = ["server.bind_addr", "observability.metrics_bind"]
            .iter()
            .map(|path| {
                self.origins
                    .of(path)
                    .unwrap_or_else(|| "default".to_owned())
            })
            .collect();
        self.problems.push(Problem::new(
            Some(sources.join(" + ")),
            format!(
                "[server] bind_addr ({bind}) and [observability] metrics_bind ({metrics}) use the same port"
            ),
            "give the metrics listener its own port, e.g. metrics_bind = \"127.0.0.1:9090\"",
        ));
    }
}

/// `upstream.connect_timeout_ms` → `[upstream] connect_timeout_ms`.
fn field_name(path: &str) -> String {
    match path.split_once('.') {
        Some((section, field)) => format!("[{section}] {field}"),
        None => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_need_http_scheme_and_host() {
        assert!(http_url("https://api.openai.com/v1").is_ok());
        assert!(http_url("http://127.0.0.1:8080").is_ok());
        assert!(http_url("api.openai.com/v1").is_err());
        assert!(http_url("ftp://example.com").is_err());
        assert!(http_url("https://").is_err());
        assert!(http_url("not a url").is_err());
        assert!(http_url("https://user:pw@example.com/v1").is_err());
    }

    #[test]
    fn cors_origins_are_bare() {
        assert!(cors_origin("*").is_ok());
        assert!(cors_origin("https://app.example.com").is_ok());
        assert!(cors_origin("http://localhost:3000").is_ok());
        assert!(cors_origin("https://app.example.com/path").is_err());
        assert!(cors_origin("app.example.com").is_err());
    }

    #[test]
    fn levels_and_directives() {
        assert!(tracing_level("info").is_ok());
        assert!(tracing_level("DEBUG").is_ok());
        assert!(tracing_level("kcp_server=debug,info").is_ok());
        assert!(tracing_level("verbose").is_err());
        assert!(tracing_level("").is_err());
        assert!(tracing_level("kcp_server=loud").is_err());
    }
}
