//! Log setup: one `tracing` subscriber, text or JSON lines on stdout.
//!
//! The filter is `observability.tracing_level` unless `RUST_LOG` is set, which wins so an
//! operator can turn up one module without editing the config ([`effective_filter`]). Both take
//! `EnvFilter` directives (`info`, `kcp_server=debug,info`, `kcp::access=off`).
//!
//! In `json` format every line is one JSON object: the event's fields flattened to the top level
//! next to `timestamp`, `level`, `target` and `message`, plus `span` with the fields of the
//! current span, which inside a request is `request{id=...}` ([`crate::edge::request_id`]). Nothing
//! else is written to stdout or stderr, so log shippers can parse every line.
//!
//! [`init`] installs the subscriber process-wide, once. [`subscriber`] builds the same thing over
//! any [`MakeWriter`], so tests and embedders can capture lines without global state
//! (`tracing::subscriber::with_default`).

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::registry::{LookupSpan, Registry};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Filter used when neither the config nor `RUST_LOG` gives one.
pub const DEFAULT_FILTER: &str = "info";

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The filter (from the config or `RUST_LOG`) does not parse.
    #[error("invalid log filter `{filter}`: {source}")]
    Filter {
        /// The filter as given.
        filter: String,
        /// What is wrong with it.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber is already installed (`init` was called before).
    #[error("logging is already initialised")]
    AlreadyInitialized(#[source] tracing_subscriber::util::TryInitError),
}

/// Installs the process-wide subscriber: filter from `level`, or from `RUST_LOG` when that is
/// set (and valid Unicode), lines in `format` on stdout.
///
/// Fails, without touching the installed one, when called a second time.
pub fn init(level: &str, format: LogFormat) -> Result<(), LoggingError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = filter(&effective_filter(level, rust_log.as_deref()))?;
    let ansi = format == LogFormat::Text && std::io::stdout().is_terminal();
    install(filter, fmt_layer(format, std::io::stdout, ansi))
}

/// Installs the process-wide subscriber with `filter`, writing `format` lines to `writer`: what
/// [`init`] does, for embedders and tests that capture every line of the process. Records of
/// the `log` crate (rustls) are forwarded too.
///
/// Fails, without touching the installed one, when a global subscriber is already set.
pub fn init_with<W>(filter: EnvFilter, format: LogFormat, writer: W) -> Result<(), LoggingError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    install(filter, layer(format, writer))
}

fn install(
    filter: EnvFilter,
    layer: Box<dyn Layer<Layered<EnvFilter, Registry>> + Send + Sync + 'static>,
) -> Result<(), LoggingError> {
    tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init()
        .map_err(LoggingError::AlreadyInitialized)
}

/// Routes panics through the log instead of raw text on stderr, so that with `json` every
/// line the process writes stays one JSON object. Call once, after [`init`].
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(target: PANIC_TARGET, panic = %info, "panic");
    }));
}

/// Target of the line a panic is logged as.
pub const PANIC_TARGET: &str = "kcp::panic";

/// The filter directives in force: `RUST_LOG` when set and not blank, else the configured
/// level, else [`DEFAULT_FILTER`].
pub fn effective_filter(level: &str, rust_log: Option<&str>) -> String {
    [rust_log.unwrap_or_default(), level]
        .into_iter()
        .map(str::trim)
        .find(|f| !f.is_empty())
        .unwrap_or(DEFAULT_FILTER)
        .to_owned()
}

/// Targets capped below `trace` whatever the directives say, because their trace lines print
/// secrets: tungstenite's WebSocket client logs its whole handshake request, the pool key's
/// `Authorization` or `api-key` header included (the Realtime route's upstream handshake).
pub const CAPPED: [&str; 1] = ["tungstenite::handshake::client=debug"];

/// Parses filter directives, then applies [`CAPPED`] (which win over the directives given).
pub fn filter(directives: &str) -> Result<EnvFilter, LoggingError> {
    let mut filter =
        EnvFilter::builder()
            .parse(directives)
            .map_err(|source| LoggingError::Filter {
                filter: directives.to_owned(),
                source,
            })?;
    for cap in CAPPED {
        filter = filter.add_directive(cap.parse().expect("CAPPED directives parse"));
    }
    Ok(filter)
}

/// The formatting layer of `format`, writing to `writer`, without ANSI colours.
pub fn layer<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    fmt_layer(format, writer, false)
}

/// The subscriber [`init`] installs, with the given filter and writer, for scoped use.
pub fn subscriber<W>(
    filter: EnvFilter,
    format: LogFormat,
    writer: W,
) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        .with(filter)
        .with(layer(format, writer))
}

fn fmt_layer<S, W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let base = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => base.boxed(),
        LogFormat::Json => base
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
}

/// An in-memory log sink for tests in this crate.
#[cfg(test)]
pub(crate) mod capture {
    use std::io;
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing_subscriber::fmt::MakeWriter;

    use crate::config::LogFormat;

    /// Everything written through any clone of it.
    #[derive(Clone, Debug, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        /// Runs `f` with a subscriber at `filter` writing `format` lines here.
        pub(crate) fn run<T>(filter: &str, format: LogFormat, f: impl FnOnce() -> T) -> (T, Self) {
            let logs = Captured::default();
            let filter = super::filter(filter).expect("valid test filter");
            let subscriber = super::subscriber(filter, format, logs.clone());
            let out = tracing::subscriber::with_default(subscriber, f);
            (out, logs)
        }

        /// The captured text.
        pub(crate) fn text(&self) -> String {
            let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8(bytes.clone()).expect("log output is UTF-8")
        }

        /// Every line parsed as JSON.
        pub(crate) fn json_lines(&self) -> Vec<serde_json::Value> {
            self.text()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
                .collect()
        }
    }

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            bytes.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::capture::Captured;
    use super::*;
    use crate::edge::request_id::RequestId;

    #[test]
    fn rust_log_overrides_the_configured_level() {
        assert_eq!(effective_filter("info", None), "info");
        assert_eq!(
            effective_filter("info", Some("kcp_server=debug")),
            "kcp_server=debug"
        );
        assert_eq!(effective_filter("warn", Some("   ")), "warn");
        assert_eq!(effective_filter(" debug ", Some("")), "debug");
        assert_eq!(effective_filter("", None), DEFAULT_FILTER);
        assert_eq!(effective_filter(" ", Some(" ")), DEFAULT_FILTER);
    }

    #[test]
    fn filters_parse_or_say_why_not() {
        assert!(filter("info").is_ok());
        assert!(filter("kcp_server=debug,kcp::access=off,warn").is_ok());
        let err = filter("kcp_server=loud").expect_err("not a level");
        assert!(err.to_string().contains("kcp_server=loud"), "{err}");
    }

    #[test]
    fn the_websocket_client_handshake_never_logs_at_trace() {
        for directives in ["trace", "tungstenite::handshake::client=trace,info"] {
            let ((), logs) = Captured::run(directives, LogFormat::Json, || {
                tracing::trace!(target: "tungstenite::handshake::client", "Request: secret");
                tracing::debug!(target: "tungstenite::handshake::client", "done");
                tracing::trace!(target: "tungstenite::protocol", "frame");
            });
            let messages: Vec<_> = logs
                .json_lines()
                .into_iter()
                .map(|line| line["message"].clone())
                .collect();
            let expected: &[&str] = if directives == "trace" {
                &["done", "frame"]
            } else {
                &["done"]
            };
            assert_eq!(messages, expected, "{directives}");
        }
    }

    #[test]
    fn json_lines_parse_and_carry_the_request_id() {
        let id = RequestId::generate();
        let ((), logs) = Captured::run("info", LogFormat::Json, || {
            tracing::info!("before any request");
            let _request = id.span().entered();
            tracing::info!(model = "gpt-4o", attempts = 2u32, "first");
            tracing::debug!("filtered out");
            tracing::warn!("second");
        });
        let lines = logs.json_lines();
        assert_eq!(lines.len(), 3, "{}", logs.text());

        assert_eq!(lines[0]["message"], "before any request");
        assert!(lines[0].get("span").is_none());

        assert_eq!(lines[1]["message"], "first");
        assert_eq!(lines[1]["level"], "INFO");
        assert_eq!(lines[1]["model"], "gpt-4o");
        assert_eq!(lines[1]["attempts"], 2);
        assert!(lines[1].get("fields").is_none(), "fields are flattened");
        assert!(lines[1]["timestamp"].is_string());
        assert!(lines[1]["target"].is_string());
        for line in &lines[1..] {
            assert_eq!(line["span"]["name"], "request");
            assert_eq!(line["span"]["id"], id.as_str());
        }
        assert_eq!(lines[2]["level"], "WARN");
    }

    #[test]
    fn the_request_span_survives_a_strict_filter() {
        let id = RequestId::generate();
        let ((), logs) = Captured::run("warn", LogFormat::Json, || {
            let _request = id.span().entered();
            tracing::info!("filtered out");
            tracing::warn!("kept");
        });
        let lines = logs.json_lines();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["span"]["id"], id.as_str());
    }

    #[test]
    fn text_lines_name_the_request() {
        let id = RequestId::generate();
        let ((), logs) = Captured::run("info", LogFormat::Text, || {
            let _request = id.span().entered();
            tracing::info!(status = 200u16, "done");
        });
        let text = logs.text();
        assert_eq!(text.lines().count(), 1);
        assert!(text.contains(&format!("request{{id={id}}}")), "{text}");
        assert!(text.contains("status=200"), "{text}");
        assert!(!text.contains('\u{1b}'), "no ANSI escapes: {text:?}");
    }

    #[test]
    fn a_second_init_is_an_error_not_a_panic() {
        // The first call may already have been made by another test; either way the second fails.
        let _ = init("off", LogFormat::Text);
        assert!(matches!(
            init("off", LogFormat::Json),
            Err(LoggingError::AlreadyInitialized(_))
        ));
    }
}
