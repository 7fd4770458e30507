//! Models (or endpoints) a key may not serve.
//!
//! A 403 or 404 that is about the model or the endpoint (`model_not_found`, "does not have
//! access to model", missing scopes, a region the project may not use) says nothing about
//! the key for other models: disabling the key would let any client take the pool out of
//! service with one request for a forbidden model. So the key only stops being a candidate
//! for that one scope (model name, or endpoint for requests that name no model), for
//! [`FIRST_REST`] doubling to [`MAX_REST`]. When the mark runs out, the next request for the
//! scope is the re-check: refused again within a rest of the mark's end, the rest doubles;
//! later, it starts again at [`FIRST_REST`].
//!
//! A key keeps at most [`MAX_SCOPES`] marks (clients can name any model): when full, the mark
//! that ends first makes room. The list is behind a flag so that a key with no marks costs
//! selection one atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::time::Time;

/// First rest of a key for a scope it refused.
pub const FIRST_REST: Duration = Duration::from_secs(60);
/// Longest rest of a key for a scope.
pub const MAX_REST: Duration = Duration::from_secs(3600);
/// Most scopes one key keeps marks for.
pub const MAX_SCOPES: usize = 64;

#[derive(Debug, Clone)]
pub(crate) struct Mark {
    pub(crate) scope: Box<str>,
    pub(crate) until: Time,
    pub(crate) rest: Duration,
}

/// The scopes one key refused, and until when.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    pub(crate) any: AtomicBool,
    marks: Mutex<Vec<Mark>>,
}

impl Refusals {
    pub(crate) fn marks(&self) -> MutexGuard<'_, Vec<Mark>> {
        // A mark list is consistent after every step; a poisoned lock is still usable.
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Until when the key refuses `scope`, if it does at `now`.
    pub(crate) fn refuses(&self, scope: &str, now: Time) -> Option<Time> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.marks()
            .iter()
            .find(|m| &*m.scope == scope)
            .map(|m| m.until)
            .filter(|&until| until > now)
    }

    /// The key refused `scope` at `now`; returns the end of the mark.
    pub(crate) fn refused(&self, scope: &str, now: Time) -> Time {
        let mut marks = self.marks();
        // Marks whose relapse window is over say nothing any more.
        marks.retain(|m| now.saturating_since(m.until) <= m.rest);
        let until = match marks.iter_mut().find(|m| &*m.scope == scope) {
            Some(mark) => {
                if mark.until <= now {
                    // The re-check (the first request after the mark) was refused again.
                    mark.rest = (mark.rest * 2).min(MAX_REST);
                    mark.until = now + mark.rest;
                }
                mark.until
            }
            None => {
                if marks.len() >= MAX_SCOPES {
                    if let Some(first) = (0..marks.len()).min_by_key(|&i| marks[i].until) {
                        marks.swap_remove(first);
                    }
                }
                let until = now + FIRST_REST;
                marks.push(Mark {
                    scope: scope.into(),
                    until,
                    rest: FIRST_REST,
                });
                until
            }
        };
        self.any.store(true, Ordering::Release);
        until
    }

    /// The scopes refused at `now`, for snapshots.
    pub(crate) fn active(&self, now: Time) -> Vec<(String, Time)> {
        if !self.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.marks()
            .iter()
            .filter(|m| m.until > now)
            .map(|m| (m.scope.to_string(), m.until))
            .collect()
    }

    /// An operator re-enabled the key: every mark goes.
    pub(crate) fn clear(&self) {
        self.marks().clear();
        self.any.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_marks_only_its_scope_for_a_minute() {
        let r = Refusals::default();
        let t = Time::from_secs(100);
        assert_eq!(r.refuses("gpt-4o", t), None);
        assert_eq!(r.refused("gpt-4o", t), t + FIRST_REST);
        assert_eq!(r.refuses("gpt-4o", t), Some(t + FIRST_REST));
        assert_eq!(r.refuses("gpt-4o-mini", t), None);
        assert_eq!(r.refuses("gpt-4o", t + FIRST_REST), None, "re-check due");
        let just_before = t + FIRST_REST - Duration::from_nanos(1);
        assert_eq!(
            r.active(just_before),
            vec![("gpt-4o".to_owned(), t + FIRST_REST)]
        );
        assert!(r.active(t + FIRST_REST).is_empty(), "over at its end");
    }

    #[test]
    fn a_refused_recheck_doubles_the_rest_and_a_late_one_starts_over() {
        let r = Refusals::default();
        let mut now = Time::ZERO;
        let mut rests = Vec::new();
        for _ in 0..8 {
            let until = r.refused("m", now);
            rests.push(until.saturating_since(now).as_secs());
            now = until;
        }
        assert_eq!(rests, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        // Refused again long after the last mark ended: a fresh minute.
        let later = now + MAX_REST + MAX_REST;
        assert_eq!(r.refused("m", later), later + FIRST_REST);
    }

    #[test]
    fn a_second_refusal_within_the_mark_does_not_double() {
        let r = Refusals::default();
        r.refused("m", Time::ZERO);
        assert_eq!(r.refused("m", Time::from_secs(10)), Time::from_secs(60));
    }

    #[test]
    fn marks_are_bounded_and_cleared_by_an_operator() {
        let r = Refusals::default();
        for i in 0..(MAX_SCOPES as u64 + 10) {
            r.refused(&format!("model-{i}"), Time::from_millis(i));
        }
        let active = r.active(Time::from_secs(1));
        assert_eq!(active.len(), MAX_SCOPES);
        assert!(
            active.iter().all(|(s, _)| s != "model-0"),
            "the first to end made room"
        );
        r.clear();
        assert_eq!(r.refuses("model-70", Time::ZERO), None);
        assert!(r.active(Time::ZERO).is_empty());
    }
}
