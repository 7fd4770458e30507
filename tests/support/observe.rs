//! Named keys, metric scrapes and captured logs: what the observability tests look at.

use std::io;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use http_body_util::Full;
use key_cycle_proxy::core::Strategy;
use key_cycle_proxy::server::config::{Config, LoadedConfig, LogFormat};
use key_cycle_proxy::server::observe::{logging, metrics};
use serde_json::Value;

use super::proxy_harness::{Proxy, loaded_config, read, send_with};

/// A configuration of named keys `(name, secret, models)` at `url`, rotating in plain round
/// robin so the first request goes to the first key, then [`test_config`] changed by `tweak`.
///
/// [`test_config`]: super::proxy_harness::test_config
pub fn named_keys(
    url: &str,
    keys: &[(&str, &str, &[&str])],
    tweak: impl FnOnce(&mut Config),
) -> LoadedConfig {
    let specs = keys
        .iter()
        .map(|(_, secret, models)| (*secret, url.to_owned(), models.to_vec()))
        .collect();
    let mut loaded = loaded_config(specs, |config| {
        config.keys.rotation_strategy = Strategy::RoundRobin;
        tweak(config);
    });
    for (key, (name, _, _)) in loaded.keys.iter_mut().zip(keys) {
        key.name = Some((*name).to_owned());
    }
    loaded
}

/// `GET /metrics` on the proxy's metrics listener: the exposition text.
pub async fn scrape(proxy: &Proxy) -> String {
    let request = http::Request::get(proxy.metrics_url("/metrics"))
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    let reply = read(send_with(&proxy.client, request).await).await;
    assert_eq!(reply.status, http::StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some(metrics::CONTENT_TYPE));
    reply.text().to_owned()
}

/// The sample lines of `text` that start with `prefix`.
pub fn series<'t>(text: &'t str, prefix: &str) -> Vec<&'t str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
        .collect()
}

/// The value of the sample whose name and labels are exactly `selector`, if present.
pub fn value(text: &str, selector: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(selector)?.strip_prefix(' ')?;
        rest.parse().ok()
    })
}

/// The value of the sample `selector` (name and labels, exactly) in a fresh scrape; 0 when the
/// series is absent.
pub async fn metric(proxy: &Proxy, selector: &str) -> f64 {
    value(&scrape(proxy).await, selector).unwrap_or(0.0)
}

/// Polls [`metric`] until it equals `want`, bounded by the kit's `WAIT`; whether it did.
pub async fn wait_metric(proxy: &Proxy, selector: &str, want: f64) -> bool {
    tokio::time::timeout(super::proxy_harness::WAIT, async {
        while metric(proxy, selector).await != want {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok()
}

/// Every line logged in this test binary, as written.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// The captured text so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Every line, parsed; panics on a line that is not one JSON object.
    pub fn json_lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|line| {
                let value: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}"));
                assert!(value.is_object(), "not a JSON object: {line:?}");
                value
            })
            .collect()
    }

    /// The lines of the request `id`: those in its `request{id=...}` span.
    pub fn of_request(&self, id: &str) -> Vec<Value> {
        self.json_lines()
            .into_iter()
            .filter(|line| line["span"]["id"] == id)
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

/// Installs, once per test binary, the process-wide JSON subscriber at `filter` writing into
/// the returned buffer (`log` records included). Later calls return the same buffer and ignore
/// their filter.
pub fn capture_logs(filter: &str) -> Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let sink = logs.clone();
        let filter = logging::filter(filter).expect("valid test filter");
        logging::init_with(filter, LogFormat::Json, move || sink.clone())
            .expect("the first subscriber of this test binary");
        logs
    })
    .clone()
}
