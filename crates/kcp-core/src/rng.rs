//! Injected randomness.
//!
//! Selection draws random numbers (weighted acceptance, power-of-two choices, jitter). As in
//! tower's p2c balancer the source is passed in, so tests and the simulator are
//! reproducible from a seed, and the server can keep one cheap generator per thread.

/// A source of uniformly distributed 64-bit values.
pub trait Random {
    /// The next value.
    fn next_u64(&mut self) -> u64;

    /// A value in `0..bound` (`0` when `bound` is `0`), by Lemire's multiply-shift.
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// A value in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Which of a pool's rotations this source's caller walks (see
    /// [`crate::KeyPool::select`]): callers on different threads that name different lanes
    /// look at different keys at a time instead of contending for the same ones. Lane 0
    /// unless the source was given another.
    fn lane(&self) -> usize {
        0
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): tiny, fast, and good enough for load balancing.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
    lane: usize,
}

impl SplitMix64 {
    /// A generator that yields the same sequence for the same seed.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            lane: 0,
        }
    }

    /// The same generator, naming `lane` as its caller's rotation ([`Random::lane`]): one
    /// lane per thread, say.
    pub fn in_lane(self, lane: usize) -> Self {
        Self { lane, ..self }
    }
}

impl Random for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn lane(&self) -> usize {
        self.lane
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_bounds_hold() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            assert!(a.below(10) < 10);
            let u = b.unit();
            assert!((0.0..1.0).contains(&u));
        }
        assert_eq!(a.below(0), 0);
    }

    #[test]
    fn a_lane_is_named_without_changing_the_sequence() {
        let mut plain = SplitMix64::new(9);
        let mut laned = SplitMix64::new(9).in_lane(3);
        assert_eq!(plain.lane(), 0);
        assert_eq!(laned.lane(), 3);
        assert_eq!(plain.next_u64(), laned.next_u64());
    }

    #[test]
    fn the_sequence_is_splitmix64() {
        // Vigna's reference splitmix64.c from state 0.
        let mut r = SplitMix64::new(0);
        let first: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(
            first,
            [
                0xE220_A839_7B1D_CDAF,
                0x6E78_9E6A_A1B9_65F4,
                0x06C4_5D18_8009_454F
            ]
        );
    }
}
