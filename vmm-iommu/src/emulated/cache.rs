//! A direct-mapped cache, the shape of a hardware IOTLB: a fixed array,
//! one slot per key hash, a new entry evicts whatever held its slot.
//!
//! No allocation after construction and a constant number of probes per
//! lookup, whatever the guest does. A guest that makes its own entries
//! collide only evicts its own translations early, which is always safe:
//! an evicted entry is re-read from the guest's tables.

/// What an entry is cached under: (domain, PASID key, log2 of the size it
/// covers, address >> that log2). The PASID cache uses `shift = 0` and
/// `index = 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub domain: u32,
    pub pasid: u32,
    pub shift: u8,
    pub index: u64,
}

#[inline]
fn mix(k: &Key) -> u64 {
    // Multiply-xorshift (a SplitMix64 finaliser) over the fields: spreads
    // consecutive page numbers across the array.
    let mut h = (u64::from(k.domain) << 32 | u64::from(k.pasid))
        ^ k.index.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (u64::from(k.shift) << 56);
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A direct-mapped cache of `V` under [`Key`]s.
#[derive(Debug)]
pub(crate) struct DirectMapped<V> {
    slots: Box<[Option<(Key, V)>]>,
    mask: usize,
}

impl<V: Copy> DirectMapped<V> {
    /// A cache of `entries` slots (rounded up to a power of two).
    pub fn new(entries: usize) -> Self {
        let n = entries.max(1).next_power_of_two();
        DirectMapped {
            slots: vec![None; n].into_boxed_slice(),
            mask: n - 1,
        }
    }

    #[inline]
    fn slot(&self, k: &Key) -> usize {
        (mix(k) as usize) & self.mask
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    pub fn get(&self, k: &Key) -> Option<&V> {
        match &self.slots[self.slot(k)] {
            Some((key, v)) if key == k => Some(v),
            _ => None,
        }
    }

    /// Caches `v` under `k`, evicting what held the slot.
    #[inline]
    pub fn insert(&mut self, k: Key, v: V) {
        let i = self.slot(&k);
        self.slots[i] = Some((k, v));
    }

    #[inline]
    pub fn remove(&mut self, k: &Key) {
        let i = self.slot(k);
        if matches!(&self.slots[i], Some((key, _)) if key == k) {
            self.slots[i] = None;
        }
    }

    /// Keeps the entries `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&Key) -> bool) {
        for s in self.slots.iter_mut() {
            if matches!(s, Some((k, _)) if !keep(k)) {
                *s = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(index: u64) -> Key {
        Key {
            domain: 1,
            pasid: 2,
            shift: 12,
            index,
        }
    }

    #[test]
    fn get_insert_remove_retain() {
        let mut c = DirectMapped::new(100);
        assert_eq!(c.capacity(), 128);
        c.insert(key(5), 50u32);
        assert_eq!(c.get(&key(5)), Some(&50));
        assert_eq!(c.get(&key(6)), None);
        c.insert(key(5), 51);
        assert_eq!(c.get(&key(5)), Some(&51));
        c.remove(&key(6));
        assert_eq!(c.get(&key(5)), Some(&51));
        c.insert(key(7), 70);
        c.retain(|k| k.index != 5);
        assert_eq!(c.get(&key(5)), None);
        assert_eq!(c.get(&key(7)), Some(&70));
    }

    #[test]
    fn a_colliding_insert_evicts_and_never_aliases() {
        let mut c = DirectMapped::new(4);
        for i in 0..64 {
            c.insert(key(i), i);
        }
        let mut held = 0;
        for i in 0..64 {
            if let Some(v) = c.get(&key(i)) {
                assert_eq!(*v, i, "a lookup returns only its own key's value");
                held += 1;
            }
        }
        assert!(held <= 4);
    }
}
