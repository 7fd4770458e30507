//! `round_robin`: plain rotation over the keys that can take the request.

use std::sync::atomic::Ordering;

use crate::lease::Lease;
use crate::pool::admission::Why;
use crate::pool::{Demand, KeyPool};
use crate::routing::{Candidates, KeyIndex};
use crate::time::Time;

impl KeyPool {
    /// The first key that can take the request, starting one further along each time.
    pub(in crate::pool) fn rotate(
        &self,
        keys: &[KeyIndex],
        tier: &Candidates<'_>,
        demand: &Demand<'_>,
        now: Time,
        why: &mut Why,
    ) -> Option<Lease> {
        let n = keys.len();
        let start = self.cursors[0].fetch_add(1, Ordering::Relaxed) % n;
        for step in 0..n {
            // `start + step` is below `2n`: one subtraction instead of a division.
            let at = start + step;
            let index = keys[if at < n { at } else { at - n }];
            if !tier.admits(index) {
                continue;
            }
            if let Some(lease) = self.try_key(index, demand, now, why) {
                return Some(lease);
            }
        }
        None
    }
}
