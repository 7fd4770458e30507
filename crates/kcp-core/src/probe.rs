//! Disabled keys and their re-checks.
//!
//! A key the provider rejects (401, 402, 403, exhausted quota) is taken out of rotation and
//! re-checked later, because revoked keys get restored and quotas get topped up. The first
//! re-check is due after [`FIRST_PROBE`], each failed one doubles the wait up to
//! [`MAX_PROBE`]. The pool only says which keys are due; the caller sends the probe (for
//! example `GET /v1/models`) and reports its outcome like any other attempt. A key disabled
//! by an operator is never probed: only the operator brings it back.

use std::time::Duration;

use crate::outcome::DisableReason;
use crate::time::Time;

/// Wait before the first re-check.
pub const FIRST_PROBE: Duration = Duration::from_secs(60);
/// Longest wait between re-checks.
pub const MAX_PROBE: Duration = Duration::from_secs(3600);

/// Why and since when a key is out, and when to look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disabled {
    /// Why.
    pub reason: DisableReason,
    /// Since when.
    pub since: Time,
    /// When the next re-check is due (`Time::NEVER` for a manual disable).
    pub probe_at: Time,
    backoff: Duration,
}

impl Disabled {
    /// A key disabled at `now`.
    pub fn new(reason: DisableReason, now: Time) -> Self {
        let probe_at = match reason {
            DisableReason::Manual => Time::NEVER,
            _ => now + FIRST_PROBE,
        };
        Disabled {
            reason,
            since: now,
            probe_at,
            backoff: FIRST_PROBE,
        }
    }

    /// A key that a re-check brought back at some point was rejected again soon after:
    /// the re-check was fooled (a free endpoint answers for a key whose quota is spent), so
    /// the wait doubles from the one before instead of starting again at a minute.
    pub fn relapse(reason: DisableReason, now: Time, previous_backoff: Duration) -> Self {
        let backoff = (previous_backoff * 2).clamp(FIRST_PROBE, MAX_PROBE);
        Disabled {
            reason,
            since: now,
            probe_at: now + backoff,
            backoff,
        }
    }

    /// The wait before the next re-check.
    pub fn backoff(&self) -> Duration {
        self.backoff
    }

    /// A re-check started at `now` failed again: wait twice as long.
    pub fn probe_failed(&mut self, reason: DisableReason, now: Time) {
        self.reason = reason;
        self.backoff = (self.backoff * 2).min(MAX_PROBE);
        self.probe_at = now + self.backoff;
    }

    /// Whether a re-check is due at `now`.
    pub fn probe_due(&self, now: Time) -> bool {
        now >= self.probe_at
    }

    /// A re-check is under way: no other until it reports (or the backoff passes again).
    pub fn probe_started(&mut self, now: Time) {
        self.probe_at = now + self.backoff;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_back_off_from_a_minute_to_an_hour() {
        let mut d = Disabled::new(DisableReason::Unauthorized, Time::ZERO);
        assert!(!d.probe_due(Time::from_secs(59)));
        assert!(d.probe_due(Time::from_secs(60)));
        let mut waits = Vec::new();
        let mut now = Time::from_secs(60);
        for _ in 0..8 {
            d.probe_failed(DisableReason::Unauthorized, now);
            waits.push(d.probe_at.saturating_since(now).as_secs());
            now = d.probe_at;
        }
        assert_eq!(waits, vec![120, 240, 480, 960, 1920, 3600, 3600, 3600]);
    }

    #[test]
    fn a_relapse_doubles_the_previous_wait() {
        let d = Disabled::relapse(DisableReason::QuotaExhausted, Time::ZERO, FIRST_PROBE);
        assert_eq!(d.probe_at, Time::from_secs(120));
        let d = Disabled::relapse(DisableReason::QuotaExhausted, Time::ZERO, MAX_PROBE);
        assert_eq!(d.backoff(), MAX_PROBE);
    }

    #[test]
    fn manual_disable_is_never_probed() {
        let d = Disabled::new(DisableReason::Manual, Time::ZERO);
        assert!(!d.probe_due(Time::from_secs(1_000_000)));
    }
}
