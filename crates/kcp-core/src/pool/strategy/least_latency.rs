//! `least_latency`: power of two choices over peak-EWMA latency × (in-flight + 1), as tower's
//! p2c balancer: two random candidates, the cheaper one wins.

use crate::lease::Lease;
use crate::pool::admission::{Check, Why};
use crate::pool::{Demand, KeyPool, PoolKey};
use crate::rng::Random;
use crate::routing::{Candidates, KeyIndex};
use crate::time::Time;

impl KeyPool {
    /// The cheaper of two random candidates that can take the request; when neither can, any
    /// key that can, in rotation.
    pub(in crate::pool) fn two_choices<R: Random + ?Sized>(
        &self,
        keys: &[KeyIndex],
        tier: &Candidates<'_>,
        demand: &Demand<'_>,
        now: Time,
        rng: &mut R,
        why: &mut Why,
    ) -> Option<Lease> {
        let n = keys.len() as u64;
        let a = rng.below(n) as usize;
        let b = if n > 1 {
            (a + 1 + rng.below(n - 1) as usize) % n as usize
        } else {
            a
        };
        let mut best: Option<(f64, usize, Option<u64>, Option<u64>)> = None;
        for pick in [a, b] {
            let index = keys[pick];
            if !tier.admits(index) {
                continue;
            }
            let key = &self.keys[index as usize];
            if let Check::Ok {
                key_trial,
                group_trial,
            } = self.check(key, demand, now)
            {
                let cost = self.cost(key, now);
                if best.is_none_or(|(c, ..)| cost < c) {
                    best = Some((cost, index as usize, key_trial, group_trial));
                }
            }
        }
        if let Some((_, index, key_trial, group_trial)) = best {
            if let Some(lease) = self.take(&self.keys[index], demand, now, key_trial, group_trial) {
                return Some(lease);
            }
        }
        // Neither sample can take it: fall back to any key that can.
        self.rotate(keys, tier, demand, now, why)
    }

    /// Peak-EWMA latency × (in-flight + 1) / weight: lower is better.
    fn cost(&self, key: &PoolKey, now: Time) -> f64 {
        let in_flight = key.state.requests.pending() as f64;
        key.state.latency.cost_nanos(now) * (in_flight + 1.0) / f64::from(key.spec.weight)
    }
}
