//! A short memory of each key's request rate, for the status page's chart.
//!
//! Counters only say how many requests a key served since it joined the pool; a chart needs
//! rates over the last minutes. The ops listener samples the pool every [`INTERVAL`] and keeps
//! the last [`CAPACITY`] rates per key in a ring. Sampling is cheap (one snapshot) and runs
//! whether or not anyone watches, so the chart has history the moment the page opens.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use kcp_core::KeySnapshot;
use serde::Serialize;

/// Time between two samples.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Samples kept per key: five minutes.
pub const CAPACITY: usize = 150;

/// Requests per second per key, oldest first.
#[derive(Debug, Default)]
pub struct RateHistory {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Requests counted at the previous sample, per key name.
    last: HashMap<String, u64>,
    rates: HashMap<String, VecDeque<f64>>,
}

/// The chart's data as `status.json` serves it.
#[derive(Debug, Serialize)]
pub struct HistoryView {
    pub interval_secs: u64,
    pub capacity: usize,
    /// Rates per key name, oldest first.
    pub keys: HashMap<String, Vec<f64>>,
}

impl RateHistory {
    /// Records one sample `elapsed` after the previous one. Keys that left the pool are
    /// forgotten; a key that joined starts at its current count.
    pub fn sample(&self, keys: &[KeySnapshot], elapsed: Duration) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let secs = elapsed.as_secs_f64().max(1e-3);
        let mut last = HashMap::with_capacity(keys.len());
        let mut rates = HashMap::with_capacity(keys.len());
        for key in keys {
            let now = requests(key);
            let before = inner.last.get(&key.name).copied().unwrap_or(now);
            let mut ring = inner.rates.remove(&key.name).unwrap_or_default();
            if ring.len() == CAPACITY {
                ring.pop_front();
            }
            ring.push_back(now.saturating_sub(before) as f64 / secs);
            last.insert(key.name.clone(), now);
            rates.insert(key.name.clone(), ring);
        }
        *inner = Inner { last, rates };
    }

    /// The rates kept so far.
    pub fn view(&self) -> HistoryView {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        HistoryView {
            interval_secs: INTERVAL.as_secs(),
            capacity: CAPACITY,
            keys: inner
                .rates
                .iter()
                .map(|(name, ring)| (name.clone(), ring.iter().copied().collect()))
                .collect(),
        }
    }
}

/// Every answered attempt of a key: what a "request" to it means on the page.
pub fn requests(key: &KeySnapshot) -> u64 {
    let o = &key.outcomes;
    o.success + o.rate_limited + o.rejected + o.upstream_error + o.request_error
}

#[cfg(test)]
mod tests {
    use kcp_core::{KeyPool, KeySpec, PoolConfig, Secret, Time};

    use super::*;

    fn snapshot(successes: u64) -> Vec<KeySnapshot> {
        let spec = KeySpec::new(
            Secret::new("sk-history-0123456789"),
            "https://api.openai.com/v1",
        )
        .with_name("alpha");
        let pool = KeyPool::new(vec![spec], PoolConfig::default()).expect("pool");
        let mut keys = pool.snapshot(Time::ZERO);
        keys[0].outcomes.success = successes;
        keys
    }

    #[test]
    fn rates_are_deltas_over_the_interval_in_a_bounded_ring() {
        let history = RateHistory::default();
        history.sample(&snapshot(10), INTERVAL);
        history.sample(&snapshot(30), INTERVAL);
        history.sample(&snapshot(31), Duration::from_secs(4));
        assert_eq!(history.view().keys["alpha"], vec![0.0, 10.0, 0.25]);
        for _ in 0..CAPACITY {
            history.sample(&snapshot(31), INTERVAL);
        }
        let view = history.view();
        assert_eq!(view.keys["alpha"].len(), CAPACITY);
        assert!(view.keys["alpha"].iter().all(|r| *r == 0.0));
        history.sample(&[], INTERVAL);
        assert!(history.view().keys.is_empty(), "a removed key is forgotten");
    }
}
