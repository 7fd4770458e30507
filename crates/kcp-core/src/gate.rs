//! A one-word, lock-free "not before" gate with an optional single trial.
//!
//! Selection must learn whether a key (or a throttled group of keys) can take a request
//! with one atomic load. The gate packs the answer into a `u64` of nanoseconds: `0` is open,
//! any other value is a deadline. The lowest bit marks a deadline after which exactly one
//! trial request may pass (a half-open circuit, a throttled group's probe): the request
//! that wins a compare-and-swap to [`Gate::PENDING`] is the trial, and everyone else waits
//! until its outcome reopens or re-closes the gate.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::time::Time;

const TRIAL: u64 = 1;

/// What the gate says at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Requests may pass.
    Open,
    /// Closed until this instant.
    Until(Time),
    /// The deadline passed and one trial may go; claim it with [`Gate::claim_trial`].
    Trial(u64),
}

/// The gate.
#[derive(Debug, Default)]
pub struct Gate(AtomicU64);

impl Gate {
    /// A trial is under way: closed with no known end.
    pub const PENDING: u64 = u64::MAX - 1;

    /// What the gate says at `now`.
    pub fn check(&self, now: Time) -> Pass {
        let raw = self.0.load(Ordering::Acquire);
        let deadline = raw & !TRIAL;
        if raw == 0 {
            Pass::Open
        } else if now.as_nanos() < deadline {
            Pass::Until(Time::from_nanos(deadline))
        } else if raw & TRIAL != 0 {
            Pass::Trial(raw)
        } else {
            Pass::Open
        }
    }

    /// Whether the gate is closed towards a trial (armed, or one under way): for a key, its
    /// circuit is open.
    pub fn holds_trial(&self) -> bool {
        let raw = self.0.load(Ordering::Acquire);
        raw & TRIAL != 0 || raw == Self::PENDING
    }

    /// Claims the trial seen as `seen`; `true` for exactly one caller.
    pub fn claim_trial(&self, seen: u64) -> bool {
        self.0
            .compare_exchange(seen, Self::PENDING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Gives back a claimed trial that was not used.
    pub fn release_trial(&self, seen: u64) {
        let _ = self
            .0
            .compare_exchange(Self::PENDING, seen, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Sets the gate: open when `until` is `None`, else closed until then, with a single
    /// trial afterwards when `trial`.
    pub fn set(&self, until: Option<Time>, trial: bool) {
        let raw = match until {
            None => 0,
            Some(t) if trial => (t.as_nanos() | TRIAL).min(Self::PENDING - 1) | TRIAL,
            Some(t) => t.as_nanos().clamp(2, Self::PENDING - 2) & !TRIAL,
        };
        self.0.store(raw, Ordering::Release);
    }

    /// Whether a trial is under way.
    pub fn trial_pending(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::PENDING
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_then_open() {
        let g = Gate::default();
        assert_eq!(g.check(Time::ZERO), Pass::Open);
        g.set(Some(Time::from_secs(5)), false);
        assert_eq!(g.check(Time::from_secs(4)), Pass::Until(Time::from_secs(5)));
        assert_eq!(g.check(Time::from_secs(5)), Pass::Open);
    }

    #[test]
    fn exactly_one_trial() {
        let g = Gate::default();
        g.set(Some(Time::from_secs(5)), true);
        assert!(matches!(g.check(Time::from_secs(4)), Pass::Until(_)));
        let Pass::Trial(seen) = g.check(Time::from_secs(6)) else {
            panic!("trial expected")
        };
        assert!(g.claim_trial(seen));
        assert!(!g.claim_trial(seen));
        assert!(matches!(g.check(Time::from_secs(7)), Pass::Until(_)));
        assert!(g.trial_pending());
        g.release_trial(seen);
        assert!(matches!(g.check(Time::from_secs(7)), Pass::Trial(_)));
    }

    #[test]
    fn deadlines_at_the_end_of_time_stay_deadlines() {
        let g = Gate::default();
        let late = Time::from_nanos((1 << 63) + 12);
        g.set(Some(Time::NEVER), false);
        assert!(
            matches!(g.check(late), Pass::Until(_)),
            "closed, never open"
        );
        assert!(!g.trial_pending());
        g.set(Some(Time::NEVER), true);
        assert!(
            !g.trial_pending(),
            "a trial deadline is not a trial under way"
        );
        let last = Time::from_nanos(u64::MAX - 2);
        let Pass::Trial(seen) = g.check(last) else {
            panic!("the trial is due at the last representable deadline")
        };
        assert!(g.claim_trial(seen));
        assert!(g.trial_pending());
    }

    #[test]
    fn one_trial_across_threads() {
        let g = std::sync::Arc::new(Gate::default());
        g.set(Some(Time::from_secs(1)), true);
        let wins: usize = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| match g.check(Time::from_secs(2)) {
                            Pass::Trial(seen) => g.claim_trial(seen),
                            _ => false,
                        })
                        .count()
                })
            })
            .map(|h| h.join().expect("thread"))
            .sum();
        assert_eq!(wins, 1);
    }
}
