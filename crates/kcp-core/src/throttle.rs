//! Account-wide throttles: when switching keys cannot help.
//!
//! Keys that share a url and an organization share the organization's limits. Only keys
//! whose organization is known (configured as `organization`, or learned from the provider's
//! `openai-organization` answer header) are grouped: keys of unknown accounts may belong to
//! as many accounts as there are keys, and grouping them would make independent 429s look
//! like a shared throttle. When most keys of such a group get a 429 within [`WINDOW`], the limit is the
//! group's, not the keys': trying the next key only burns another call. The whole group
//! then rests together for the longest `Retry-After` seen, and a single probe request is
//! let through when the rest ends (a [`Gate`] trial); its success lifts the throttle, its
//! 429 renews it. A group needs at least [`MIN_GROUP`] keys for this: in a pair, "most"
//! is both, which two independently busy keys produce as often as a shared limit does, and
//! each key's own rest already stops the pair from burning calls.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::gate::Gate;
use crate::routing::KeyIndex;
use crate::time::Time;

/// How close together the 429s of a group must be to count as one throttle.
pub const WINDOW: Duration = Duration::from_secs(5);
/// Shortest group rest, when no 429 said how long.
pub const MIN_REST: Duration = Duration::from_secs(1);
/// Fewest keys a group needs before their 429s count as a shared limit.
pub const MIN_GROUP: usize = 3;

/// One group of keys sharing url and organization.
#[derive(Debug)]
pub struct ThrottleGroup {
    /// Closed while the group rests.
    pub gate: Gate,
    url: String,
    organization: String,
    members: Mutex<Vec<KeyIndex>>,
    recent: Mutex<Vec<Recent>>,
}

#[derive(Debug, Clone, Copy)]
struct Recent {
    at: Time,
    key: KeyIndex,
    rest: Duration,
}

impl ThrottleGroup {
    /// An empty group for `url` and `organization`.
    pub fn new(url: &str, organization: &str) -> Self {
        ThrottleGroup {
            gate: Gate::default(),
            url: url.to_owned(),
            organization: organization.to_owned(),
            members: Mutex::new(Vec::new()),
            recent: Mutex::new(Vec::new()),
        }
    }

    /// Whether this group is the one for `url` and `organization`.
    pub fn is_for(&self, url: &str, organization: &str) -> bool {
        self.url == url && self.organization == organization
    }

    /// Replaces the member list (on pool build).
    pub fn set_members(&self, members: Vec<KeyIndex>) {
        *lock(&self.members) = members;
        lock(&self.recent).clear();
    }

    /// `key` joins the group (its organization was learned).
    pub fn add_member(&self, key: KeyIndex) {
        let mut members = lock(&self.members);
        if !members.contains(&key) {
            members.push(key);
        }
    }

    /// Number of member keys.
    pub fn size(&self) -> usize {
        lock(&self.members).len()
    }

    /// A member got a rate-limit 429 at `now`, asking to rest `rest`. Returns the group's
    /// rest deadline when this 429 makes (or, for a probe, keeps) the whole group throttled.
    pub fn rate_limited(
        &self,
        key: KeyIndex,
        rest: Duration,
        now: Time,
        probe: bool,
    ) -> Option<Time> {
        let mut recent = lock(&self.recent);
        recent.retain(|r| now.saturating_since(r.at) <= WINDOW);
        recent.push(Recent { at: now, key, rest });
        let mut keys: Vec<KeyIndex> = recent.iter().map(|r| r.key).collect();
        keys.sort_unstable();
        keys.dedup();
        let size = self.size();
        if !probe && (size < MIN_GROUP || keys.len() * 2 <= size) {
            return None;
        }
        let longest = recent
            .iter()
            .map(|r| r.rest)
            .max()
            .unwrap_or(MIN_REST)
            .max(MIN_REST);
        recent.clear();
        let until = now + longest;
        self.gate.set(Some(until), true);
        Some(until)
    }

    /// The group's probe succeeded: the throttle is over.
    pub fn recovered(&self) {
        self.gate.set(None, false);
    }
}

/// The throttle groups of one pool, which grow as organizations are learned.
#[derive(Debug, Default)]
pub struct Groups(Mutex<Vec<Arc<ThrottleGroup>>>);

impl Groups {
    /// The group of `url` and `organization` (created if there is none yet), which `key`
    /// joins.
    pub fn join(&self, url: &str, organization: &str, key: KeyIndex) -> Arc<ThrottleGroup> {
        self.join_or_adopt(url, organization, key, None)
    }

    /// Like [`Groups::join`], but a group new to this registry is taken over from
    /// `previous` (the registry of the pool before a reload) when that has one, so that a
    /// running throttle survives the reload.
    pub fn join_or_adopt(
        &self,
        url: &str,
        organization: &str,
        key: KeyIndex,
        previous: Option<&Groups>,
    ) -> Arc<ThrottleGroup> {
        let mut groups = lock(&self.0);
        let group = match groups.iter().find(|g| g.is_for(url, organization)) {
            Some(group) => group.clone(),
            None => {
                let group = match previous.and_then(|p| p.find(url, organization)) {
                    Some(group) => {
                        group.set_members(Vec::new());
                        group
                    }
                    None => Arc::new(ThrottleGroup::new(url, organization)),
                };
                groups.push(group.clone());
                group
            }
        };
        group.add_member(key);
        group
    }

    /// Every group.
    pub fn all(&self) -> Vec<Arc<ThrottleGroup>> {
        lock(&self.0).clone()
    }

    /// The group of `url` and `organization`, if there is one.
    pub fn find(&self, url: &str, organization: &str) -> Option<Arc<ThrottleGroup>> {
        lock(&self.0)
            .iter()
            .find(|g| g.is_for(url, organization))
            .cloned()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the plain data inconsistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::Pass;

    fn group(n: u32) -> ThrottleGroup {
        let g = ThrottleGroup::new("https://api.openai.com/v1", "org-a");
        g.set_members((0..n).collect());
        g
    }

    #[test]
    fn most_keys_limited_together_throttles_the_group() {
        let g = group(4);
        let t = Time::from_secs(10);
        assert_eq!(g.rate_limited(0, Duration::from_secs(3), t, false), None);
        assert_eq!(g.rate_limited(1, Duration::from_secs(7), t, false), None);
        // The same key twice does not count twice.
        assert_eq!(g.rate_limited(1, Duration::from_secs(7), t, false), None);
        let until = g
            .rate_limited(2, Duration::from_secs(2), t, false)
            .expect("3 of 4");
        assert_eq!(until, t + Duration::from_secs(7), "longest rest wins");
        assert!(matches!(g.gate.check(t), Pass::Until(_)));
        assert!(matches!(g.gate.check(until), Pass::Trial(_)));
        g.recovered();
        assert_eq!(g.gate.check(until), Pass::Open);
    }

    #[test]
    fn spread_out_429s_are_key_problems() {
        let g = group(4);
        assert_eq!(
            g.rate_limited(0, Duration::from_secs(1), Time::from_secs(0), false),
            None
        );
        assert_eq!(
            g.rate_limited(1, Duration::from_secs(1), Time::from_secs(10), false),
            None
        );
        assert_eq!(
            g.rate_limited(2, Duration::from_secs(1), Time::from_secs(20), false),
            None
        );
    }

    #[test]
    fn single_key_groups_never_throttle_and_a_failed_probe_renews() {
        let g = group(1);
        assert_eq!(
            g.rate_limited(0, Duration::from_secs(1), Time::ZERO, false),
            None
        );
        let pair = group(2);
        assert_eq!(
            pair.rate_limited(0, Duration::from_secs(30), Time::ZERO, false),
            None
        );
        assert_eq!(
            pair.rate_limited(1, Duration::from_secs(7), Time::ZERO, false),
            None,
            "a pair limited together is two busy keys"
        );
        let registry = Groups::default();
        let a = registry.join("https://h", "org-a", 0);
        registry.join("https://h", "org-a", 1);
        registry.join("https://h", "org-b", 2);
        assert_eq!(a.size(), 2, "keys of one organization share a group");
        assert_eq!(registry.all().len(), 2);
        let g = group(3);
        let until = g
            .rate_limited(0, Duration::from_secs(4), Time::ZERO, true)
            .expect("probe 429 renews");
        assert_eq!(until, Time::from_secs(4));
    }

    #[test]
    fn a_group_is_for_one_url_and_organization() {
        let url = "https://api.openai.com/v1";
        let g = ThrottleGroup::new(url, "org-a");
        assert!(g.is_for(url, "org-a"));
        assert!(!g.is_for(url, "org-b"));
        assert!(!g.is_for("https://other.example/v1", "org-a"));
    }

    #[test]
    fn limits_within_the_window_count_together_and_more_than_half_is_most() {
        let g = group(6);
        let t = Time::from_secs(10);
        let rest = Duration::from_secs(2);
        for key in 0..3 {
            assert_eq!(
                g.rate_limited(key, rest, t, false),
                None,
                "half is not most"
            );
        }
        // Exactly WINDOW after the first: all four count.
        let until = g.rate_limited(3, rest, t + WINDOW, false);
        assert_eq!(until, Some(t + WINDOW + rest), "4 of 6");

        let g = group(3);
        assert_eq!(g.rate_limited(0, rest, t, false), None);
        assert_eq!(
            g.rate_limited(1, rest, t, false),
            Some(t + rest),
            "2 of 3: the smallest group that counts"
        );

        let g = group(4);
        assert_eq!(g.rate_limited(0, rest, t, false), None);
        assert_eq!(g.rate_limited(1, rest, t, false), None);
        let late = t + WINDOW + Duration::from_nanos(1);
        assert_eq!(
            g.rate_limited(2, rest, late, false),
            None,
            "the first two are out of the window"
        );
    }
}
