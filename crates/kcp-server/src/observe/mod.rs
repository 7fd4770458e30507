//! Observing the proxy: `GET /metrics` ([`render_metrics`]) and each client request from head to
//! last byte ([`Exchange`]).
//!
//! The request-path series are updated as requests run; the key-state gauges are copied from
//! `KeyPool::snapshot(now)` here, right before each scrape, so they are exact at scrape time and
//! cost nothing between scrapes ([`metrics`]). The listener on
//! `observability.metrics_bind` calls [`render_metrics`] and sends its answer as is, with
//! `Content-Type` [`metrics::CONTENT_TYPE`] on success.

pub mod access_log;
pub mod logging;
pub mod metrics;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode, Uri};
use kcp_core::KeyId;
use tokio::sync::watch;
use tracing::Span;

use self::access_log::{AccessRecord, BodyEnd};
use self::metrics::{InflightGauge, Metrics};
use crate::app::App;
use crate::clock;
use crate::edge::request_id::{self, RequestId};
use crate::pipeline::RequestCtx;
use crate::proxy::realtime::relay::{Ending, Relayed};
use crate::proxy::{ModelName, ProxyBody, Report};

/// Refreshes the key gauges from the pool in service and renders every metric of the app's
/// registry in Prometheus' text format: 200 with the exposition, or 500 with a plain-text reason
/// when the registry cannot be encoded.
pub fn render_metrics(app: &App) -> (StatusCode, String) {
    app.metrics.refresh_keys(&app.pool().snapshot(clock::now()));
    match metrics::render(&app.registry) {
        Ok(text) => (StatusCode::OK, text),
        Err(error) => {
            tracing::error!(%error, "cannot render the metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the metrics could not be encoded\n".to_owned(),
            )
        }
    }
}

/// One client request from its head to its response's last byte, for the access line and the
/// request metrics.
///
/// [`Exchange::begin`] takes the request id (the client's `x-request-id` when sane, else a
/// fresh one), counts the request in `kcp_inflight_requests` and opens the `request{id=...}`
/// span the service instruments the request with. [`Exchange::respond`] returns the id to the
/// client in `x-kcp-request-id` and moves the exchange into the response body, which ends it
/// when the body ends. Recording then, rather than at the response head, gives streams their
/// true duration and byte count: `kcp_requests_total` and `kcp_request_duration_seconds` count
/// a response, with the status of its head, once its body completed, failed mid-stream or was
/// abandoned by the client (the access line's `body` field says which). The in-flight gauge
/// likewise covers the whole stream. A request abandoned before its response head is recorded
/// with status 499 (nginx's "client closed request") and `body="cancelled"`.
///
/// `kcp_overhead_seconds` is measured at the head: its time minus the time the request spent
/// on the upstream, waiting for a key and in retry backoff ([`Report::elsewhere`]).
///
/// Liveness and readiness probes are `quiet`: they get an id but no access line and no request
/// metrics, since a load balancer polling every few seconds would drown the real traffic.
#[derive(Debug)]
pub struct Exchange {
    metrics: Metrics,
    id: RequestId,
    span: Span,
    method: Method,
    uri: Uri,
    started: Instant,
    quiet: bool,
    _inflight: InflightGauge,
    /// The response head's status and the proxy's overhead up to it, once answered.
    head: Option<(StatusCode, Duration)>,
    report: Option<Report>,
    unfinished: Unfinished,
    bytes_out: u64,
    body: BodyEnd,
}

/// Where a request's [`Report`] ends up: the pipeline keeps it here once the attempt loop
/// answers, and the attempt loop leaves it here when the request is abandoned before the
/// answer, so the access line and metrics of a client that gave up still name the model, the
/// key and the attempts. It lives in the request's [`RequestCtx`](crate::pipeline::RequestCtx),
/// which shares it with the [`Exchange`].
#[derive(Clone, Debug, Default)]
pub struct Unfinished(Arc<Mutex<Option<Report>>>);

impl Unfinished {
    /// Leaves `report` here.
    pub fn keep(&self, report: Report) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(report);
    }

    fn take(&self) -> Option<Report> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Set on a response whose exchange ends with a realtime session rather than with its body:
/// the session sends what it relayed when it ends.
#[derive(Debug, Clone)]
pub struct SessionEnd(pub watch::Receiver<Option<Relayed>>);

/// Status recorded for a request whose client left before the response head.
const CLIENT_CLOSED: u16 = 499;

impl Exchange {
    /// Starts observing `request` of `ctx`; `quiet` for health probes (no access line, no
    /// metrics).
    pub fn begin<B>(app: &App, ctx: &RequestCtx, request: &Request<B>, quiet: bool) -> Exchange {
        let id = ctx.id.clone();
        let span = id.span();
        let unfinished = ctx.report.clone();
        Exchange {
            _inflight: app.metrics.inflight(),
            metrics: app.metrics.clone(),
            id,
            span,
            method: request.method().clone(),
            uri: request.uri().clone(),
            started: Instant::now(),
            quiet,
            head: None,
            report: None,
            unfinished,
            bytes_out: 0,
            body: BodyEnd::Cancelled,
        }
    }

    /// The `request{id=...}` span: instrument the request's future with it.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The response with `x-kcp-request-id`, its body carrying this exchange to its end. Takes
    /// the request's [`Report`], if the pipeline made one.
    ///
    /// A response that carries a [`SessionEnd`] (a realtime session's 101) keeps the exchange
    /// open until the session ends instead: its access line then has the session's duration
    /// and the bytes it sent to the client.
    pub fn respond(mut self, mut response: Response<ProxyBody>) -> Response<ProxyBody> {
        self.report = self.unfinished.take();
        let elsewhere = self
            .report
            .as_ref()
            .map_or(Duration::ZERO, Report::elsewhere);
        let overhead = self.started.elapsed().saturating_sub(elsewhere);
        self.head = Some((response.status(), overhead));
        response
            .headers_mut()
            .insert(request_id::HEADER, self.id.header_value());
        if let Some(SessionEnd(end)) = response.extensions_mut().remove::<SessionEnd>() {
            tokio::spawn(self.outlive(end));
            return response;
        }
        response.map(|body| body.observed(Box::new(self)))
    }

    /// Ends the exchange with its session: complete when the session closed or was drained,
    /// cancelled when it was cut or never started.
    async fn outlive(mut self, mut end: watch::Receiver<Option<Relayed>>) {
        if let Ok(relayed) = end.wait_for(Option::is_some).await {
            if let Some(relayed) = *relayed {
                self.bytes_out = relayed.to_client;
                if relayed.ending != Ending::Cut {
                    self.body = BodyEnd::Complete;
                }
            }
        }
    }

    /// Counts `n` more body bytes handed to the connection.
    pub(crate) fn sent(&mut self, n: usize) {
        self.bytes_out += n as u64;
    }

    /// Ends the exchange with its body: records it (see [`Drop`]).
    pub(crate) fn end(mut self: Box<Self>, body: BodyEnd) {
        self.body = body;
    }

    /// Writes the request metrics and the access line.
    fn record(&mut self) {
        if self.quiet {
            return;
        }
        let total = self.started.elapsed();
        if self.report.is_none() {
            self.report = self.unfinished.take();
        }
        let report = self.report.as_ref();
        let model = report.and_then(|r| r.model.as_ref()).map(ModelName::as_str);
        let status = self
            .head
            .map_or(CLIENT_CLOSED, |(status, _)| status.as_u16());
        let overhead = self.head.map(|(_, overhead)| overhead);
        self.metrics
            .request_finished(model, status, total, overhead);
        let _request = self.span.enter();
        AccessRecord {
            request_id: &self.id,
            method: &self.method,
            path: self.uri.path(),
            model,
            status,
            key: report.and_then(|r| r.key.as_ref()).map(KeyId::as_str),
            attempts: report.map_or(0, |r| r.attempts),
            upstream_ttfb: report.and_then(|r| r.upstream_ttfb),
            total,
            bytes_out: self.bytes_out,
            body: self.body,
        }
        .emit();
    }
}

impl Drop for Exchange {
    /// Records the request however it ended: with its body, or abandoned before the head.
    fn drop(&mut self) {
        self.record();
    }
}
