//! Circuit breaker for upstream failures of one key.
//!
//! After [`FAILURES_TO_OPEN`] upstream failures in a row the circuit opens: the key takes no
//! traffic for a jittered backoff (5 s doubling per re-open up to 2 min, each drawn
//! uniformly from its upper half so that keys that failed together do not come back
//! together). Then exactly one trial request is let through (half-open): its success closes
//! the circuit, its failure opens it again for longer.

use std::time::Duration;

use crate::time::Time;

/// Consecutive upstream failures that open the circuit.
pub const FAILURES_TO_OPEN: u32 = 5;
/// First open period (before jitter).
pub const BASE_OPEN: Duration = Duration::from_secs(5);
/// Longest open period.
pub const MAX_OPEN: Duration = Duration::from_secs(120);

/// State of one key's circuit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Circuit {
    failures: u32,
    opens: u32,
    open_until: Option<Time>,
}

impl Circuit {
    /// An upstream failure of a request that was (`trial`) or was not the half-open
    /// circuit's single trial. `jitter` is uniform in `[0, 1)`. Returns the end of the open
    /// period when this failure opened (or re-opened) the circuit.
    ///
    /// While the circuit is open only the trial speaks for the key: requests sent before it
    /// opened report failures from then, which must not stretch the open period.
    pub fn failed(&mut self, now: Time, jitter: f64, trial: bool) -> Option<Time> {
        if self.open_until.is_some() {
            if !trial {
                return None;
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures < FAILURES_TO_OPEN {
                return None;
            }
        }
        let ceiling = (BASE_OPEN * 2u32.pow(self.opens.min(8))).min(MAX_OPEN);
        let open = ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        self.opens = self.opens.saturating_add(1);
        let until = now + open;
        self.open_until = Some(until);
        Some(until)
    }

    /// A success of a request that was (`trial`) or was not the trial. Closes the circuit,
    /// except for a late success while it is open: only the trial closes an open circuit.
    /// Returns whether it closed an open (or half-open) circuit.
    pub fn succeeded(&mut self, trial: bool) -> bool {
        let was_open = self.open_until.is_some();
        if was_open && !trial {
            return false;
        }
        *self = Circuit::default();
        was_open
    }

    /// Closes the circuit whatever its state (an operator re-enabled the key).
    pub fn reset(&mut self) {
        *self = Circuit::default();
    }

    /// The end of the open period, while the circuit is open or half-open.
    pub fn open_until(&self) -> Option<Time> {
        self.open_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_five_failures_and_reopens_longer() {
        let mut c = Circuit::default();
        let now = Time::from_secs(100);
        for _ in 0..4 {
            assert_eq!(c.failed(now, 0.0, false), None);
        }
        let first = c.failed(now, 0.999, false).expect("fifth failure opens");
        assert!(first > now + Duration::from_millis(4900) && first <= now + BASE_OPEN);
        // Late failures of requests sent before it opened change nothing.
        for _ in 0..10 {
            assert_eq!(c.failed(first, 0.999, false), None);
        }
        assert!(!c.succeeded(false), "only the trial closes an open circuit");
        // The single trial fails: open again, for longer.
        let second = c.failed(first, 0.999, true).expect("failed trial reopens");
        assert!(second.saturating_since(first) > Duration::from_secs(9));
        assert!(second.saturating_since(first) <= BASE_OPEN * 2);
        assert!(c.succeeded(true));
        assert_eq!(c.open_until(), None);
        assert_eq!(c.failed(now, 0.0, false), None, "success resets the count");
    }

    #[test]
    fn open_period_is_capped_and_jittered() {
        let mut c = Circuit::default();
        let mut now = Time::ZERO;
        for _ in 0..4 {
            c.failed(now, 0.0, false);
        }
        for i in 0..20 {
            let until = c.failed(now, 0.0, i > 0).expect("open");
            let open = until.saturating_since(now);
            assert!(open >= MAX_OPEN / 2 || open >= BASE_OPEN / 2);
            assert!(open <= MAX_OPEN);
            now = until;
        }
    }

    #[test]
    fn reset_closes_an_open_circuit_and_forgets_its_failures() {
        let mut c = Circuit::default();
        let now = Time::from_secs(100);
        for _ in 0..FAILURES_TO_OPEN {
            c.failed(now, 0.0, false);
        }
        assert!(c.open_until().is_some());
        c.reset();
        assert_eq!(c, Circuit::default());
        for _ in 1..FAILURES_TO_OPEN {
            assert_eq!(c.failed(now, 0.0, false), None, "counting starts again");
        }
        let reopened = c.failed(now, 0.999, false).expect("opens again");
        assert!(reopened <= now + BASE_OPEN, "for the first period again");
    }
}
