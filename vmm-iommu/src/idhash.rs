//! The hasher of the maps the translation path looks endpoint and domain
//! IDs up in: a folded multiply (the product's two halves XORed) of the
//! 32-bit ID with a per-map random seed, a few cycles where std's SipHash
//! takes about fifteen nanoseconds, twice per IOTLB miss.
//!
//! Domain IDs are the guest's choice, so the seed is random (drawn from
//! std's `RandomState`): a guest that does not know it cannot pick IDs
//! that all land in one bucket of the map. It owns hashing only.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

/// A `HashMap` keyed by IDs, with [`IdHasher`].
pub(crate) type IdMap<K, V> = HashMap<K, V, BuildIdHasher>;

/// An odd constant with well-mixed bits (the golden ratio's).
const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

/// Builds [`IdHasher`]s with one random seed per map.
#[derive(Clone, Debug)]
pub(crate) struct BuildIdHasher {
    seed: u64,
}

impl Default for BuildIdHasher {
    fn default() -> Self {
        BuildIdHasher {
            seed: RandomState::new().hash_one(MULTIPLIER),
        }
    }
}

impl BuildHasher for BuildIdHasher {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher { state: self.seed }
    }
}

/// The hasher: each word written is XORed into the state and folded-
/// multiplied, so every input bit reaches both the bucket index (low bits)
/// and the control byte (high bits) of hashbrown's table.
#[derive(Clone, Debug)]
pub(crate) struct IdHasher {
    state: u64,
}

#[inline(always)]
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

impl Hasher for IdHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    #[inline(always)]
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }

    #[inline(always)]
    fn write_u64(&mut self, x: u64) {
        self.state = fold_mul(self.state ^ x, MULTIPLIER);
    }

    #[inline(always)]
    fn finish(&self) -> u64 {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_differ_only_in_high_bits_spread_over_low_bits() {
        // A guest choosing IDs 0, 2^16, 2^17, ... must not get one bucket.
        let b = BuildIdHasher::default();
        let mut low: Vec<u64> = (0..16u32).map(|i| b.hash_one(i << 16) & 0xff).collect();
        low.sort_unstable();
        low.dedup();
        assert!(low.len() > 8, "{low:?}");
    }

    #[test]
    fn map_finds_what_it_holds() {
        let mut m: IdMap<u32, u32> = IdMap::default();
        for i in 0..1000u32 {
            m.insert(i.wrapping_mul(0x1000_0001), i);
        }
        for i in 0..1000u32 {
            assert_eq!(m.get(&i.wrapping_mul(0x1000_0001)), Some(&i));
        }
    }
}
