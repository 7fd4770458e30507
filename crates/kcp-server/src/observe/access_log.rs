//! The access log (one line per request) and the key state-change log.
//!
//! An access line is an `info` event with target [`TARGET`] (`kcp::access`), so it can be
//! filtered on its own (`kcp::access=off`). It names the key that served the request by its name
//! or fingerprint, never the secret, and logs the path without its query string, which may carry
//! tokens (`?api_key=...`). Durations are milliseconds with microsecond precision.
//!
//! Key state changes (a key cooling, disabled, re-enabled, its circuit opening or closing, an
//! account-wide throttle and its end) are `warn` events with target [`STATE_TARGET`]
//! (`kcp::keys`): rare, and exactly what an operator on call wants to see, recoveries included,
//! so that every "down" line has its "up" line at the same level. Each says why (`reason`) and,
//! for a rest, how long (`for_secs`) and until when (`until`, wall clock).

use std::time::{Duration, SystemTime};

use httpdate::HttpDate;
use kcp_core::{StateChange, Time};

use crate::edge::request_id::RequestId;

/// Target of access lines.
pub const TARGET: &str = "kcp::access";

/// Target of key state-change lines.
pub const STATE_TARGET: &str = "kcp::keys";

/// What one finished request looks like in the access log.
#[derive(Debug, Clone, Copy)]
pub struct AccessRecord<'a> {
    /// The request's id.
    pub request_id: &'a RequestId,
    /// HTTP method.
    pub method: &'a http::Method,
    /// Request path (`uri.path()`); anything from a `?` on is dropped anyway.
    pub path: &'a str,
    /// The model the client asked for, if any.
    pub model: Option<&'a str>,
    /// Status sent to the client.
    pub status: u16,
    /// Name or fingerprint of the key of the last upstream attempt, if there was one.
    pub key: Option<&'a str>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// Time to the last attempt's response headers.
    pub upstream_ttfb: Option<Duration>,
    /// From the request head to the last body byte sent.
    pub total: Duration,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// How the response body ended.
    pub body: BodyEnd,
}

/// How a response body ended, as the access line's `body` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Every byte was handed to the connection.
    Complete,
    /// The upstream failed mid-stream; the client's response was aborted.
    Failed,
    /// The client went away (or the connection was cut) before the end.
    Cancelled,
}

impl BodyEnd {
    /// The field value.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyEnd::Complete => "complete",
            BodyEnd::Failed => "failed",
            BodyEnd::Cancelled => "cancelled",
        }
    }
}

impl AccessRecord<'_> {
    /// Writes the access line.
    pub fn emit(&self) {
        tracing::info!(
            target: TARGET,
            request_id = %self.request_id,
            method = %self.method,
            path = path_only(self.path),
            model = self.model,
            status = self.status,
            key = self.key,
            attempts = self.attempts,
            upstream_ttfb_ms = self.upstream_ttfb.map(millis),
            total_ms = millis(self.total),
            bytes_out = self.bytes_out,
            body = self.body.as_str(),
            "request finished"
        );
    }
}

/// Logs a key's state change, as returned by `Lease::record`, at `now`.
pub fn log_state_change(key: &str, change: &StateChange, now: Time) {
    match *change {
        StateChange::Cooling { until } => tracing::warn!(
            target: STATE_TARGET,
            key,
            state = "cooling",
            reason = "rate_limited",
            for_secs = secs_until(until, now),
            until = wall_clock(until, now).map(tracing::field::display),
            "key rate limited: cooling"
        ),
        StateChange::Disabled { reason } => tracing::warn!(
            target: STATE_TARGET,
            key,
            state = "disabled",
            reason = reason.as_str(),
            "key disabled"
        ),
        StateChange::ModelRefused { until } => tracing::warn!(
            target: STATE_TARGET,
            key,
            state = "model_refused",
            reason = "model_or_endpoint_refused",
            for_secs = secs_until(until, now),
            "key refused the requested model or endpoint: other keys serve it until the re-check"
        ),
        StateChange::Enabled => tracing::warn!(
            target: STATE_TARGET,
            key,
            state = "enabled",
            "key re-enabled"
        ),
        StateChange::CircuitOpened { until } => tracing::warn!(
            target: STATE_TARGET,
            key,
            state = "circuit_open",
            reason = "upstream_failures",
            for_secs = secs_until(until, now),
            until = wall_clock(until, now).map(tracing::field::display),
            "key circuit opened after repeated upstream failures"
        ),
        StateChange::CircuitClosed => tracing::warn!(
            target: STATE_TARGET,
            key,
            state = "circuit_closed",
            "key circuit closed after a successful trial"
        ),
        StateChange::GroupThrottled { until } => tracing::warn!(
            target: STATE_TARGET,
            key,
            state = "throttled",
            reason = "account_rate_limited",
            for_secs = secs_until(until, now),
            until = wall_clock(until, now).map(tracing::field::display),
            "account-wide throttle: most keys of this upstream and organization were rate limited \
             together"
        ),
        StateChange::GroupRecovered => tracing::warn!(
            target: STATE_TARGET,
            key,
            state = "throttle_lifted",
            "account-wide throttle lifted"
        ),
    }
}

/// The wall-clock time of `until` (an HTTP date, to the second); `None` for a deadline that
/// never comes.
fn wall_clock(until: Time, now: Time) -> Option<HttpDate> {
    (until != Time::NEVER).then(|| HttpDate::from(SystemTime::now() + until.saturating_since(now)))
}

/// The path without its query string.
fn path_only(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// Milliseconds, to the microsecond.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

/// Seconds from `now` to `until`, to the millisecond; `None` for a deadline that never comes.
fn secs_until(until: Time, now: Time) -> Option<f64> {
    (until != Time::NEVER).then(|| until.saturating_since(now).as_millis() as f64 / 1e3)
}

#[cfg(test)]
mod tests {
    use kcp_core::DisableReason;
    use serde_json::Value;

    use super::*;
    use crate::config::LogFormat;
    use crate::observe::logging::capture::Captured;

    fn record<'a>(id: &'a RequestId, method: &'a http::Method, path: &'a str) -> AccessRecord<'a> {
        AccessRecord {
            request_id: id,
            method,
            path,
            model: Some("gpt-4o"),
            status: 200,
            key: Some("team-a"),
            attempts: 2,
            upstream_ttfb: Some(Duration::from_micros(181_250)),
            total: Duration::from_millis(1_234),
            bytes_out: 5_120,
            body: BodyEnd::Complete,
        }
    }

    #[test]
    fn an_access_line_carries_every_field() {
        let id = RequestId::generate();
        let method = http::Method::POST;
        let ((), logs) = Captured::run("info", LogFormat::Json, || {
            let _request = id.span().entered();
            record(&id, &method, "/v1/chat/completions").emit();
        });
        let lines = logs.json_lines();
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["target"], TARGET);
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "request finished");
        assert_eq!(line["request_id"], id.as_str());
        assert_eq!(line["span"]["id"], id.as_str());
        assert_eq!(line["method"], "POST");
        assert_eq!(line["path"], "/v1/chat/completions");
        assert_eq!(line["model"], "gpt-4o");
        assert_eq!(line["status"], 200);
        assert_eq!(line["key"], "team-a");
        assert_eq!(line["attempts"], 2);
        assert_eq!(line["upstream_ttfb_ms"], 181.25);
        assert_eq!(line["total_ms"], 1234.0);
        assert_eq!(line["bytes_out"], 5120);
        assert_eq!(line["body"], "complete");
    }

    #[test]
    fn absent_values_are_left_out() {
        let id = RequestId::generate();
        let method = http::Method::GET;
        let ((), logs) = Captured::run("info", LogFormat::Json, || {
            AccessRecord {
                model: None,
                key: None,
                upstream_ttfb: None,
                attempts: 0,
                status: 503,
                ..record(&id, &method, "/v1/models")
            }
            .emit();
        });
        let line = &logs.json_lines()[0];
        assert_eq!(line["status"], 503);
        assert_eq!(line["attempts"], 0);
        for absent in ["model", "key", "upstream_ttfb_ms"] {
            assert!(line.get(absent).is_none(), "{absent} in {line}");
        }
    }

    #[test]
    fn the_query_string_never_appears() {
        let id = RequestId::generate();
        let method = http::Method::GET;
        let path = "/v1/files?api_key=sk-secret-123&x=1";
        for format in [LogFormat::Json, LogFormat::Text] {
            let ((), logs) = Captured::run("info", format, || record(&id, &method, path).emit());
            let text = logs.text();
            assert!(text.contains("/v1/files"), "{text}");
            assert!(!text.contains('?'), "{text}");
            assert!(!text.contains("sk-secret-123"), "{text}");
            assert!(!text.contains("api_key"), "{text}");
        }
    }

    #[test]
    fn access_lines_can_be_filtered_out_on_their_own() {
        let id = RequestId::generate();
        let method = http::Method::GET;
        let ((), logs) = Captured::run("info,kcp::access=off", LogFormat::Json, || {
            record(&id, &method, "/").emit();
            tracing::info!("other");
        });
        let lines = logs.json_lines();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["message"], "other");
    }

    fn state_line(change: StateChange) -> Value {
        let now = Time::from_secs(100);
        let ((), logs) = Captured::run("info", LogFormat::Json, || {
            log_state_change("team-a", &change, now);
        });
        let mut lines = logs.json_lines();
        assert_eq!(lines.len(), 1, "{}", logs.text());
        let line = lines.remove(0);
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["target"], STATE_TARGET);
        assert_eq!(line["key"], "team-a");
        line
    }

    #[test]
    fn cooling_says_how_long_and_why() {
        let until = Time::from_secs(100) + Duration::from_millis(2_500);
        let line = state_line(StateChange::Cooling { until });
        assert_eq!(line["state"], "cooling");
        assert_eq!(line["reason"], "rate_limited");
        assert_eq!(line["for_secs"], 2.5);
        let until = line["until"].as_str().expect("a wall-clock deadline");
        assert!(
            httpdate::parse_http_date(until).is_ok(),
            "an HTTP date: {until}"
        );
    }

    #[test]
    fn disabled_says_why() {
        let line = state_line(StateChange::Disabled {
            reason: DisableReason::QuotaExhausted,
        });
        assert_eq!(line["state"], "disabled");
        assert_eq!(line["reason"], "quota_exhausted");
    }

    #[test]
    fn circuit_and_throttle_changes_are_logged() {
        let until = Time::from_secs(130);
        let open = state_line(StateChange::CircuitOpened { until });
        assert_eq!(open["state"], "circuit_open");
        assert_eq!(open["for_secs"], 30.0);
        let throttled = state_line(StateChange::GroupThrottled { until });
        assert_eq!(throttled["state"], "throttled");
        assert_eq!(throttled["for_secs"], 30.0);
        assert!(
            throttled["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("account-wide throttle"))
        );
        for (change, state) in [
            (StateChange::Enabled, "enabled"),
            (StateChange::CircuitClosed, "circuit_closed"),
            (StateChange::GroupRecovered, "throttle_lifted"),
        ] {
            assert_eq!(state_line(change)["state"], state);
        }
    }

    #[test]
    fn a_deadline_that_never_comes_has_no_duration() {
        let line = state_line(StateChange::Cooling { until: Time::NEVER });
        assert!(line.get("for_secs").is_none(), "{line}");
        assert!(line.get("until").is_none(), "{line}");
    }

    #[test]
    fn helpers() {
        assert_eq!(path_only("/a/b?c=d?e"), "/a/b");
        assert_eq!(path_only("/a/b"), "/a/b");
        assert_eq!(millis(Duration::from_nanos(1_500_999)), 1.5);
        assert_eq!(
            secs_until(Time::from_secs(1), Time::from_secs(2)),
            Some(0.0)
        );
    }
}
