//! Re-checks of disabled keys, and an operator's disable and enable.

use crate::keystate::Trial;
use crate::lease::{Changes, Lease};
use crate::pool::KeyPool;
use crate::routing::KeyIndex;
use crate::time::Time;

impl KeyPool {
    /// Disabled keys whose re-check is due at `now`.
    pub fn due_probes(&self, now: Time) -> Vec<KeyIndex> {
        self.keys
            .iter()
            .filter(|k| k.state.probe_due(now))
            .map(|k| k.index)
            .collect()
    }

    /// Starts the re-check of a disabled key: a lease whose success re-enables it. `None`
    /// when the key is not disabled, not due, or already being re-checked.
    pub fn probe(&self, index: KeyIndex, now: Time) -> Option<Lease> {
        let key = self.keys.get(index as usize)?;
        key.state.start_probe(now).then(|| {
            Lease::new(
                key.clone(),
                0,
                Trial::Probe,
                None,
                self.config.unhealthy_penalty,
                now,
            )
        })
    }

    /// An operator disables or re-enables the key with this id; `None` if there is none.
    pub fn set_disabled(&self, id: &str, disabled: bool, now: Time) -> Option<Changes> {
        let key = self.keys.iter().find(|k| k.id.as_str() == id)?;
        let change = key.state.set_manual(disabled, now);
        Some(Changes::from_key(change))
    }

    /// An operator wants the key with this id re-checked now: `Some(true)` when its re-check
    /// is due from `now` on, `Some(false)` when it is not disabled or was disabled by an
    /// operator (nothing to re-check), `None` when there is no such key.
    pub fn recheck_now(&self, id: &str, now: Time) -> Option<bool> {
        let key = self.keys.iter().find(|k| k.id.as_str() == id)?;
        Some(key.state.probe_now(now))
    }
}

#[cfg(test)]
mod tests {
    use crate::outcome::{DisableReason, Outcome};
    use crate::{Demand, KeyPool, KeySpec, PoolConfig, Secret, SplitMix64, Time};

    #[test]
    fn an_operator_asks_for_a_recheck_of_a_provider_disabled_key_only() {
        let specs = ["a", "b", "c"]
            .iter()
            .map(|n| KeySpec::new(Secret::new(format!("sk-{n}")), "http://h").with_name(*n))
            .collect();
        let p = KeyPool::new(specs, PoolConfig::default()).expect("valid pool");
        let t = Time::from_secs(100);
        // "a" is rejected by the provider, "b" disabled by an operator, "c" fine.
        let mut rng = SplitMix64::new(1);
        let mut exclude = Vec::new();
        for _ in 0..3 {
            let demand = Demand {
                exclude: &exclude,
                ..Demand::default()
            };
            let lease = p.select(&demand, t, &mut rng).expect("a free key");
            exclude.push(lease.index());
            if lease.id().as_str() == "a" {
                lease.record(
                    Outcome::KeyRejected {
                        reason: DisableReason::Unauthorized,
                    },
                    t,
                );
            } else {
                lease.record(Outcome::Cancelled, t);
            }
        }
        assert!(p.set_disabled("b", true, t).is_some());
        assert!(p.due_probes(t).is_empty(), "a's re-check is a minute away");
        assert_eq!(p.recheck_now("a", t), Some(true));
        assert_eq!(p.due_probes(t), vec![0]);
        assert_eq!(p.recheck_now("b", t), Some(false), "an operator's disable");
        assert_eq!(p.recheck_now("c", t), Some(false), "not disabled");
        assert_eq!(p.recheck_now("nope", t), None);
    }
}
