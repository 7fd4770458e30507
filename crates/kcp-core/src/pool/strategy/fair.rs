//! `round_robin_health_weighted`: start-time fair queueing over the keys.
//!
//! Each key is a flow whose share is weight × health × rate (Goyal, Vin & Cheng, 1996): every
//! lease advances its key's tag by `1 / share`, and the key with the smallest start tag
//! (`max(tag, virtual time)`) among a window of [`FAIR_WINDOW`] candidates wins. The key
//! furthest behind its share goes first; a key held back by its pace keeps its turn instead of
//! losing its share, but an idle key earns no credit.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::lease::Lease;
use crate::pool::admission::Why;
use crate::pool::{Demand, KeyPool, LANES, PoolKey};
use crate::routing::{Candidates, KeyIndex};
use crate::time::Time;

/// Candidates the fair rotation compares: all of them in pools of up to this many keys,
/// a rotating window of this many in larger ones, so selection stays O(1) in pool size
/// when keys are free.
pub const FAIR_WINDOW: usize = 16;

/// How many strides of the fastest key a tag may lead the virtual time by: keys up to 64
/// times slower than the fastest keep their exact share.
pub const MAX_LEAD: f64 = 64.0;

impl KeyPool {
    /// Start-time fair queueing over the candidates (see the module docs).
    ///
    /// Reading a key's tag is one atomic load, while checking whether it can take the
    /// request is a dozen; so the tags of a window of candidates are read first and only
    /// then are keys checked, smallest tag first, usually just one. When none in a window
    /// can take the request, the next window is tried.
    ///
    /// Start tags are compared as the bit patterns of their `f64`s: tags and the virtual time
    /// are finite and never negative, and such floats order like their bits.
    pub(in crate::pool) fn fair(
        &self,
        keys: &[KeyIndex],
        tier: &Candidates<'_>,
        demand: &Demand<'_>,
        now: Time,
        lane: usize,
        why: &mut Why,
    ) -> Option<Lease> {
        let n = keys.len();
        // Up to FAIR_WINDOW keys all fit one window. In a larger pool the windows slide
        // over the keys with a cursor, so that every key is looked at in turn: a key never
        // seen would fall behind the virtual time and lose its share. Each lane has its own
        // cursor and starts its rotation a `1/LANES` of the keys further on, so that callers
        // in different lanes look at different keys.
        let start = if n > FAIR_WINDOW {
            let lane = lane % LANES;
            let cursor = &self.cursors[lane];
            // A load and a store rather than a locked add: two threads that race here may
            // start from the same window, which costs nothing but that window's turn.
            let at = cursor.load(Ordering::Relaxed);
            cursor.store(at.wrapping_add(1), Ordering::Relaxed);
            // Below `2n`: one subtraction instead of a second division.
            let start = at % n + lane * (n / LANES);
            if start < n { start } else { start - n }
        } else {
            0
        };
        let vtime = self.fair.vtime.load(Ordering::Acquire);
        let limit = (f64::from_bits(vtime) + self.max_lead()).to_bits();
        // The common case in one pass and without a window: the first window's smallest
        // start tag (the first of equal ones) can take the request.
        let first = self.first_smallest(keys, tier, start, vtime, limit)?;
        if let Some(lease) = self.try_key(first, demand, now, why) {
            return Some(lease);
        }
        self.fair_windows(keys, tier, start, vtime, limit, first, demand, now, why)
    }

    /// The candidate with the smallest start tag in the first window (the first of equal
    /// ones), which is the one [`KeyPool::fair_windows`] checks first; `None` when no key of
    /// the tier is a candidate.
    fn first_smallest(
        &self,
        keys: &[KeyIndex],
        tier: &Candidates<'_>,
        start: usize,
        vtime: u64,
        limit: u64,
    ) -> Option<KeyIndex> {
        let n = keys.len();
        let mut best: Option<(u64, KeyIndex)> = None;
        let mut len = 0;
        let mut step = 0;
        while step < n && len < FAIR_WINDOW {
            // `start + step` is below `2n`: one subtraction instead of a division.
            let at = start + step;
            let index = keys[if at < n { at } else { at - n }];
            step += 1;
            if tier.admits(index) {
                let tag = self.tag(index, vtime, limit);
                if best.is_none_or(|(smallest, _)| tag < smallest) {
                    best = Some((tag, index));
                }
                len += 1;
            }
        }
        best.map(|(_, index)| index)
    }

    /// The windows in turn, smallest start tag first, after `tried` (the first window's
    /// smallest) could not take the request: it is not checked again, and every other
    /// candidate is, even if another thread moved the tags in between.
    #[allow(clippy::too_many_arguments)]
    fn fair_windows(
        &self,
        keys: &[KeyIndex],
        tier: &Candidates<'_>,
        start: usize,
        vtime: u64,
        limit: u64,
        tried: KeyIndex,
        demand: &Demand<'_>,
        now: Time,
        why: &mut Why,
    ) -> Option<Lease> {
        let n = keys.len();
        let mut window = [(0_u64, 0 as KeyIndex); FAIR_WINDOW];
        let mut step = 0;
        while step < n {
            let mut len = 0;
            while step < n && len < FAIR_WINDOW {
                let at = start + step;
                let index = keys[if at < n { at } else { at - n }];
                step += 1;
                if tier.admits(index) {
                    window[len] = (self.tag(index, vtime, limit), index);
                    len += 1;
                }
            }
            while len > 0 {
                // Smallest tag first; usually the first one checked takes the request.
                let mut first = 0;
                for i in 1..len {
                    if window[i].0 < window[first].0 {
                        first = i;
                    }
                }
                let index = window[first].1;
                len -= 1;
                window.swap(first, len);
                if index == tried {
                    continue;
                }
                if let Some(lease) = self.try_key(index, demand, now, why) {
                    return Some(lease);
                }
            }
        }
        None
    }

    /// A lease on `key` starts: its start tag is `max(tag, virtual time)`, which becomes the
    /// virtual time, and its tag moves on by `1 / share`.
    pub(in crate::pool) fn advance(&self, key: &PoolKey) {
        let vtime = f64::from_bits(self.fair.vtime.load(Ordering::Acquire));
        let lead = self.max_lead();
        let stride = self.stride(key);
        let mut start = vtime;
        // The closure always returns Some, so the update cannot fail.
        let _ = self.fair.tags[key.index as usize].fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |pass| {
                start = f64::from_bits(pass).clamp(vtime, vtime + lead);
                Some((start + stride).to_bits())
            },
        );
        // Non-negative floats order like their bit patterns. Most leases start at the
        // virtual time itself; only a later start needs the shared write.
        if start > vtime {
            self.fair.vtime.fetch_max(start.to_bits(), Ordering::AcqRel);
        }
    }

    /// A key's start tag if chosen now (f64 bits): its tag, at least the virtual time
    /// `vtime`. A tag further ahead than `limit` (the virtual time plus the lead) is pulled
    /// back to it for good (written back), so the key's turn comes once the others catch up
    /// instead of trailing the virtual time forever.
    fn tag(&self, index: KeyIndex, vtime: u64, limit: u64) -> u64 {
        let slot = &self.fair.tags[index as usize];
        let raw = slot.load(Ordering::Acquire);
        if raw > limit {
            // Losing this race to a concurrent advance is fine: that one moved the tag.
            let _ = slot.compare_exchange(raw, limit, Ordering::AcqRel, Ordering::Acquire);
            limit
        } else {
            raw.max(vtime)
        }
    }

    /// How far a key's tag may run ahead of the virtual time: [`MAX_LEAD`] strides of the
    /// fastest possible key. Shares change as limits are learned; a tag advanced by a
    /// stride from before (say, while no limit was known) must not bench the key for ages.
    /// Kept up to date by [`FairQueue::learn_rpm`] rather than divided out per selection.
    fn max_lead(&self) -> f64 {
        f64::from_bits(self.fair.lead.load(Ordering::Relaxed))
    }

    /// A key's share of the fair rotation: weight × health × requests per second (its pace;
    /// a key whose rate is not known yet counts as the fastest known one).
    fn share(&self, key: &PoolKey, rate: Option<f64>, health: u32) -> f64 {
        let rate =
            rate.unwrap_or_else(|| f64::from_bits(self.fair.max_rate.load(Ordering::Relaxed)));
        let health = f64::from(health) / f64::from(crate::health::MAX_HEALTH);
        (f64::from(key.spec.weight) * health * rate).max(f64::MIN_POSITIVE)
    }

    /// How far a lease moves the key's tag: `1 / share`. Most keys are fully healthy, of
    /// weight 1 and of a rate not known yet, which is the fastest known one: their stride
    /// is kept ready instead of divided out on every lease.
    fn stride(&self, key: &PoolKey) -> f64 {
        let state = &key.state;
        let rate = match (state.requests.limit(), state.pace.rate_per_sec()) {
            (Some(rpm), Some(rate)) if rate > 0.0 => {
                if rpm > self.fair.max_rpm.load(Ordering::Relaxed) {
                    self.fair.learn_rpm(rpm);
                }
                Some(rate)
            }
            _ => None,
        };
        let health = state.health.get();
        if rate.is_none() && health == crate::health::MAX_HEALTH && key.spec.weight == 1 {
            return f64::from_bits(self.fair.unit_stride.load(Ordering::Relaxed));
        }
        1.0 / self.share(key, rate, health)
    }
}

/// The fair queue's state: virtual time, tags and the scale of shares.
#[derive(Debug)]
pub(crate) struct FairQueue {
    /// Virtual time (f64 bits).
    vtime: AtomicU64,
    /// Each key's tag (f64 bits), side by side so a window of tags is two cache lines rather
    /// than sixteen scattered ones.
    tags: Box<[AtomicU64]>,
    /// The largest learned or configured requests-per-minute limit.
    max_rpm: AtomicU64,
    /// The same per second (f64 bits): the rate of a key whose own is not known.
    max_rate: AtomicU64,
    /// How far a tag may lead the virtual time (f64 bits), from `max_rpm` and `max_weight`.
    lead: AtomicU64,
    /// The stride of a fully healthy key of weight 1 at `max_rate` (f64 bits).
    unit_stride: AtomicU64,
    /// The largest configured weight.
    max_weight: f64,
}

impl FairQueue {
    /// A queue with these tags (f64 bits, in pool order) at virtual time `vtime`.
    pub(crate) fn new(tags: Vec<u64>, vtime: u64, max_weight: f64, max_rpm: u64) -> Self {
        FairQueue {
            vtime: AtomicU64::new(vtime),
            tags: tags.into_iter().map(AtomicU64::new).collect(),
            max_rpm: AtomicU64::new(max_rpm),
            max_rate: AtomicU64::new(per_sec(max_rpm).to_bits()),
            lead: AtomicU64::new(lead(max_rpm, max_weight).to_bits()),
            unit_stride: AtomicU64::new(unit_stride(max_rpm).to_bits()),
            max_weight,
        }
    }

    /// A key's requests-per-minute limit `rpm` is known, above the largest so far: the scale
    /// of shares follows. These figures only move one way (the rate up, the lead and the
    /// stride down), so racing updates settle on the largest limit.
    fn learn_rpm(&self, rpm: u64) {
        let max_rpm = self.max_rpm.fetch_max(rpm, Ordering::Relaxed).max(rpm);
        // Non-negative floats order like their bit patterns.
        self.max_rate
            .fetch_max(per_sec(max_rpm).to_bits(), Ordering::Relaxed);
        self.lead
            .fetch_min(lead(max_rpm, self.max_weight).to_bits(), Ordering::Relaxed);
        self.unit_stride
            .fetch_min(unit_stride(max_rpm).to_bits(), Ordering::Relaxed);
    }

    /// The virtual time, for a rebuilt pool to carry on from.
    pub(crate) fn vtime_bits(&self) -> u64 {
        self.vtime.load(Ordering::Relaxed)
    }

    /// A key's tag, for a rebuilt pool to carry on from.
    pub(crate) fn tag_bits(&self, index: KeyIndex) -> u64 {
        self.tags[index as usize].load(Ordering::Relaxed)
    }
}

/// A requests-per-minute limit per second.
fn per_sec(rpm: u64) -> f64 {
    rpm as f64 / 60.0
}

/// How far a key's tag may run ahead of the virtual time: [`MAX_LEAD`] strides of the fastest
/// possible key, of weight `max_weight` at `max_rpm`.
fn lead(max_rpm: u64, max_weight: f64) -> f64 {
    MAX_LEAD / (max_weight * per_sec(max_rpm.max(1)))
}

/// `1 / share` of a fully healthy key of weight 1 at the rate of `max_rpm`: the share is
/// `1 × 1 × rate`, exactly the rate.
fn unit_stride(max_rpm: u64) -> f64 {
    1.0 / per_sec(max_rpm).max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::{FairQueue, MAX_LEAD};
    use crate::{
        Demand, KeyPool, KeySpec, Outcome, PoolConfig, RateLimitHeaders, Secret, SplitMix64, Time,
    };

    fn pool(weights: &[u32]) -> KeyPool {
        let specs = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let mut spec = KeySpec::new(Secret::new(format!("sk-{i}")), "http://h")
                    .with_name(format!("k{i}"));
                spec.weight = w;
                spec
            })
            .collect();
        KeyPool::new(specs, PoolConfig::default()).expect("valid pool")
    }

    /// Selects and records a success at `now`; the chosen key's index.
    fn pick(p: &KeyPool, now: Time) -> u32 {
        let lease = p
            .select(&Demand::default(), now, &mut SplitMix64::new(1))
            .expect("a free key");
        let index = lease.index();
        lease.record(Outcome::Cancelled, now);
        index
    }

    /// The key selected with the keys of `exclude` refused (its lease is dropped: cancelled).
    fn pick_excluding(p: &KeyPool, exclude: &[u32]) -> u32 {
        let demand = Demand {
            exclude,
            ..Demand::default()
        };
        p.select(&demand, Time::ZERO, &mut SplitMix64::new(1))
            .expect("a free key")
            .index()
    }

    fn tag(p: &KeyPool, index: u32) -> f64 {
        f64::from_bits(p.fair.tag_bits(index))
    }

    #[test]
    fn a_pool_larger_than_a_window_is_visited_in_turn_round_after_round() {
        let p = pool(&[1; 40]);
        let picks: Vec<u32> = (0..120).map(|_| pick(&p, Time::ZERO)).collect();
        let expected: Vec<u32> = (0..120).map(|i| i % 40).collect();
        assert_eq!(picks, expected);
        let stride = f64::from_bits(p.fair.unit_stride.load(Ordering::Relaxed));
        assert_eq!(f64::from_bits(p.fair.vtime_bits()), 2.0 * stride);
        assert_eq!(tag(&p, 0), 3.0 * stride);
    }

    #[test]
    fn a_tag_far_ahead_is_pulled_back_to_the_lead_and_written_back() {
        let p = pool(&[1, 1, 1]);
        let lead = f64::from_bits(p.fair.lead.load(Ordering::Relaxed));
        p.fair.tags[0].store((10.0 * lead).to_bits(), Ordering::Relaxed);
        p.fair.tags[2].store((0.5 * lead).to_bits(), Ordering::Relaxed);
        assert_eq!(
            pick(&p, Time::ZERO),
            1,
            "the key at the virtual time goes first"
        );
        assert_eq!(
            tag(&p, 0),
            lead,
            "pulled back to the virtual time plus the lead"
        );
        assert_eq!(tag(&p, 2), 0.5 * lead, "a tag within the lead stays");
    }

    #[test]
    fn a_key_held_back_in_the_first_window_leaves_the_turn_to_the_next_smallest() {
        let p = pool(&[1; 20]);
        // Key 0 is tried first (the first of the smallest tags) and is refused for this
        // request, then key 3, the other smallest. Each key tried leaves its place in the
        // window to the window's last one, so key 15 now comes first of the equal rest.
        p.fair.tags[3].store(0.0_f64.to_bits(), Ordering::Relaxed);
        for i in [1, 2] {
            p.fair.tags[i].store(1.0_f64.to_bits(), Ordering::Relaxed);
        }
        for i in 4..20 {
            p.fair.tags[i].store(1.0_f64.to_bits(), Ordering::Relaxed);
        }
        let exclude = [0, 3];
        assert_eq!(pick_excluding(&p, &exclude), 15);
    }

    #[test]
    fn a_window_of_refusals_moves_on_to_the_next_window() {
        let p = pool(&[1; 40]);
        let exclude: Vec<u32> = (0..16).collect();
        assert_eq!(pick_excluding(&p, &exclude), 16);
    }

    #[test]
    fn the_first_window_holds_sixteen_candidates_and_no_more() {
        let p = pool(&[1; 20]);
        for i in 0..20 {
            p.fair.tags[i].store(1.0_f64.to_bits(), Ordering::Relaxed);
        }
        p.fair.tags[16].store(0.0_f64.to_bits(), Ordering::Relaxed);
        assert_eq!(pick(&p, Time::ZERO), 0, "key 16 is beyond the first window");
    }

    #[test]
    fn a_window_past_the_last_key_goes_on_from_the_first_one() {
        let p = pool(&[1; 40]);
        for i in 0..40 {
            p.fair.tags[i].store(1.0_f64.to_bits(), Ordering::Relaxed);
        }
        p.fair.tags[3].store(0.25_f64.to_bits(), Ordering::Relaxed);
        p.fair.tags[4].store(0.5_f64.to_bits(), Ordering::Relaxed);
        p.cursors[0].store(30, Ordering::Relaxed);
        // The window is keys 30..39 and 0..5: key 3 has the smallest tag.
        assert_eq!(pick(&p, Time::ZERO), 3);
        p.cursors[0].store(30, Ordering::Relaxed);
        p.fair.tags[3].store(0.25_f64.to_bits(), Ordering::Relaxed);
        // Again, with key 3 refused: the rest of the same window, smallest first.
        let exclude = [3];
        assert_eq!(pick_excluding(&p, &exclude), 4);
    }

    #[test]
    fn a_pool_of_one_window_always_starts_at_its_first_key() {
        let p = pool(&[1; 16]);
        pick(&p, Time::ZERO);
        for i in 0..16 {
            p.fair.tags[i].store(0.0_f64.to_bits(), Ordering::Relaxed);
        }
        assert_eq!(
            pick(&p, Time::ZERO),
            0,
            "equal tags: the first key, not the next"
        );
    }

    #[test]
    fn each_lane_rotates_on_its_own_from_its_own_quarter_of_the_keys() {
        let p = pool(&[1; 40]);
        let pick_in = |lane: usize| {
            let mut rng = SplitMix64::new(1).in_lane(lane);
            let lease = p
                .select(&Demand::default(), Time::ZERO, &mut rng)
                .expect("a free key");
            let index = lease.index();
            lease.record(Outcome::Cancelled, Time::ZERO);
            index
        };
        assert_eq!(pick_in(0), 0);
        assert_eq!(pick_in(1), 10, "lane 1 starts a quarter further on");
        assert_eq!(pick_in(0), 1, "lane 0's cursor moved on alone");
        assert_eq!(pick_in(3), 30);
        assert_eq!(pick_in(5), 11, "lanes beyond the last wrap around: lane 1");
        assert_eq!(p.cursors[1].load(Ordering::Relaxed), 2);
        assert_eq!(p.cursors[2].load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_lane_near_the_end_of_the_keys_wraps_to_the_start() {
        let p = pool(&[1; 40]);
        p.cursors[3].store(15, Ordering::Relaxed);
        // Lane 3 starts at 30 + 15 = 45, that is key 5.
        let mut rng = SplitMix64::new(1).in_lane(3);
        let lease = p
            .select(&Demand::default(), Time::ZERO, &mut rng)
            .expect("a free key");
        assert_eq!(lease.index(), 5);
    }

    #[test]
    fn weight_and_health_set_the_stride_and_a_plain_key_takes_the_ready_one() {
        let p = pool(&[1, 2, 1]);
        let rate = f64::from_bits(p.fair.max_rate.load(Ordering::Relaxed));
        assert_eq!(rate, 1.0 / 60.0, "no limit known: the fastest is 1 rpm");
        let keys = p.keys();
        assert_eq!(p.stride(&keys[0]), 60.0);
        assert_eq!(p.stride(&keys[1]), 30.0, "weight 2: half the stride");
        keys[2].state.health.penalize(5);
        let health = f64::from(keys[2].state.health.get()) / 1000.0;
        assert_eq!(p.stride(&keys[2]), 1.0 / (health * rate));
    }

    #[test]
    fn a_limit_learned_on_a_key_rescales_the_queue_at_its_next_lease() {
        let p = pool(&[1, 1]);
        assert_eq!(
            p.fair.max_rpm.load(Ordering::Relaxed),
            1,
            "no limit known yet"
        );
        let limits = RateLimitHeaders {
            limit_requests: Some(600),
            remaining_requests: Some(599),
            ..RateLimitHeaders::default()
        };
        let lease = p
            .select(&Demand::default(), Time::ZERO, &mut SplitMix64::new(1))
            .expect("a free key");
        let key = p.keys()[lease.index() as usize].clone();
        let latency = Duration::from_millis(100);
        lease.record(Outcome::Success { latency, limits }, Time::ZERO);
        p.advance(&key);
        assert_eq!(p.fair.max_rpm.load(Ordering::Relaxed), 600);
        let rate = f64::from_bits(p.fair.max_rate.load(Ordering::Relaxed));
        assert_eq!(rate, 10.0);
        assert_eq!(p.stride(&key), 0.1, "its own rate, 10 a second");
    }

    #[test]
    fn a_learned_limit_rescales_rate_lead_and_stride_only_upwards() {
        let q = FairQueue::new(vec![0; 2], 0, 2.0, 60);
        let read = |a: &std::sync::atomic::AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        assert_eq!(read(&q.max_rate), 1.0);
        assert_eq!(read(&q.lead), MAX_LEAD / 2.0);
        assert_eq!(read(&q.unit_stride), 1.0);
        q.learn_rpm(120);
        assert_eq!(q.max_rpm.load(Ordering::Relaxed), 120);
        assert_eq!(read(&q.max_rate), 2.0);
        assert_eq!(read(&q.lead), MAX_LEAD / 4.0);
        assert_eq!(read(&q.unit_stride), 0.5);
        q.learn_rpm(30);
        assert_eq!(q.max_rpm.load(Ordering::Relaxed), 120);
        assert_eq!(read(&q.max_rate), 2.0);
        assert_eq!(read(&q.lead), MAX_LEAD / 4.0);
        assert_eq!(read(&q.unit_stride), 0.5);
    }
}
