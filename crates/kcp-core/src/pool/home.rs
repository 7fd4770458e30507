//! The home key of stateful requests.

use crate::lease::Lease;
use crate::pool::admission::{Check, PENDING_WAIT, Why};
use crate::pool::{Demand, KeyPool, NoKey};
use crate::time::Time;

impl KeyPool {
    /// Chooses the request's stable "home" key: the first key (in config order) that serves
    /// it and is not disabled. Objects created through one key (files, batches, threads)
    /// live in its account, so stateful endpoints must keep going there.
    pub fn select_home(&self, demand: &Demand<'_>, now: Time) -> Result<Lease, NoKey> {
        let demand = &demand.bounded();
        let route = self.routes.lookup(demand.model);
        if route.is_empty() {
            return Err(NoKey::NoRoute);
        }
        let mut why = Why::default();
        let home = route.tiers().into_iter().flat_map(|t| {
            let c = t;
            t.keys.iter().copied().filter(move |&k| c.admits(k))
        });
        for index in home {
            let key = &self.keys[index as usize];
            let check = self.check(key, demand, now);
            why.note(&check, index);
            match check {
                Check::Disabled
                | Check::Excluded
                | Check::Refused
                | Check::TooSmall
                | Check::Recheck => continue,
                Check::Blocked(_) | Check::Paced(_) | Check::Unreachable(_) => break,
                Check::Ok {
                    key_trial,
                    group_trial,
                } => {
                    if let Err(until) = self.global.try_acquire(now) {
                        return Err(NoKey::Busy { until });
                    }
                    if let Some(lease) = self.take(key, demand, now, key_trial, group_trial) {
                        return Ok(lease);
                    }
                    self.global.refund();
                    why.note(&Check::Blocked(now + PENDING_WAIT), index);
                    break;
                }
            }
        }
        Err(why.verdict())
    }
}
