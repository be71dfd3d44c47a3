//! Domains by ID: a slab, a hash index from ID to slot, and the slot of
//! the ID that [`DomainMap::get_mut`] found last.
//!
//! A guest's MAP and UNMAP requests come in runs on one domain (Linux
//! keeps one per device), so the request path asks for the same ID again
//! and again: the remembered slot answers that with one comparison, where
//! the hash index costs a multiply, a group probe and a key comparison,
//! twice per MAP+UNMAP pair (a tenth of a pair on an empty domain).

use crate::idhash::IdMap;

/// No remembered slot: never below the slab's length.
const NO_SLOT: u32 = u32::MAX;

/// Values keyed by `u32` IDs (see the module documentation).
#[derive(Clone, Debug)]
pub(crate) struct DomainMap<V> {
    index: IdMap<u32, u32>,
    slots: Vec<Option<V>>,
    free: Vec<u32>,
    /// The ID `get_mut` or `get_or_insert_with` found last and its slot,
    /// or a slot of `NO_SLOT`. Invariant: a slot below `slots.len()`
    /// holds that ID's value (`remove` and `clear` forget it).
    recent: (u32, u32),
}

impl<V> Default for DomainMap<V> {
    fn default() -> Self {
        DomainMap {
            index: IdMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            recent: (0, NO_SLOT),
        }
    }
}

impl<V> DomainMap<V> {
    /// The slot of `id`, through the remembered one first.
    #[inline(always)]
    fn slot(&self, id: u32) -> Option<usize> {
        let (rid, rslot) = self.recent;
        if rid == id && (rslot as usize) < self.slots.len() {
            return Some(rslot as usize);
        }
        self.index.get(&id).map(|&s| s as usize)
    }

    /// The value of `id`.
    #[inline]
    pub(crate) fn get(&self, id: &u32) -> Option<&V> {
        let s = self.slot(*id)?;
        self.slots.get(s)?.as_ref()
    }

    /// The value of `id`, mutable; `id`'s slot is remembered.
    #[inline]
    pub(crate) fn get_mut(&mut self, id: &u32) -> Option<&mut V> {
        let s = self.slot(*id)?;
        self.recent = (*id, s as u32);
        self.slots.get_mut(s)?.as_mut()
    }

    /// Whether `id` has a value.
    pub(crate) fn contains_key(&self, id: &u32) -> bool {
        self.index.contains_key(id)
    }

    /// The number of values.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there is no value.
    pub(crate) fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Drops every value and lets the slab's memory go.
    pub(crate) fn clear(&mut self) {
        self.index.clear();
        self.slots = Vec::new();
        self.free = Vec::new();
        self.recent = (0, NO_SLOT);
    }

    /// The IDs, in no particular order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &u32> {
        self.index.keys()
    }

    /// The values, in no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.slots.iter().flatten()
    }

    /// Sets the value of `id`; returns the one it replaces.
    pub(crate) fn insert(&mut self, id: u32, v: V) -> Option<V> {
        let s = self.slot_or_new(id);
        self.slots[s].replace(v)
    }

    /// The value of `id`, made by `make` if there is none; `id`'s slot is
    /// remembered.
    pub(crate) fn get_or_insert_with(&mut self, id: u32, make: impl FnOnce() -> V) -> &mut V {
        let s = self.slot_or_new(id);
        self.recent = (id, s as u32);
        self.slots[s].get_or_insert_with(make)
    }

    /// Takes the value of `id` out.
    pub(crate) fn remove(&mut self, id: &u32) -> Option<V> {
        let s = self.index.remove(id)?;
        if self.recent.0 == *id {
            self.recent = (0, NO_SLOT);
        }
        let v = self.slots.get_mut(s as usize).and_then(Option::take);
        self.free.push(s);
        v
    }

    /// The slot of `id`, or an empty one (a freed one, else a new one)
    /// now indexed as `id`'s.
    fn slot_or_new(&mut self, id: u32) -> usize {
        if let Some(s) = self.slot(id) {
            return s;
        }
        let s = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            (self.slots.len() - 1) as u32
        });
        self.index.insert(id, s);
        s as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn answers_as_a_hash_map_through_inserts_removals_and_slot_reuse() {
        let mut m: DomainMap<u64> = DomainMap::default();
        let mut model: HashMap<u32, u64> = HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Few IDs, so that removals free slots that others reuse.
            let id = (x % 24) as u32;
            match (x >> 8) % 5 {
                0 => assert_eq!(m.insert(id, step), model.insert(id, step)),
                1 => assert_eq!(m.remove(&id), model.remove(&id)),
                2 => {
                    let v = m.get_mut(&id).map(|v| {
                        *v += 1;
                        *v
                    });
                    assert_eq!(
                        v,
                        model.get_mut(&id).map(|v| {
                            *v += 1;
                            *v
                        })
                    );
                }
                3 => {
                    let v = *m.get_or_insert_with(id, || step);
                    assert_eq!(v, *model.entry(id).or_insert(step));
                }
                _ => assert_eq!(m.get(&id), model.get(&id)),
            }
            assert_eq!(m.len(), model.len());
            assert_eq!(m.contains_key(&id), model.contains_key(&id));
        }
        let mut keys: Vec<u32> = m.keys().copied().collect();
        let mut want: Vec<u32> = model.keys().copied().collect();
        keys.sort_unstable();
        want.sort_unstable();
        assert_eq!(keys, want);
        let mut values: Vec<u64> = m.values().copied().collect();
        let mut want: Vec<u64> = model.values().copied().collect();
        values.sort_unstable();
        want.sort_unstable();
        assert_eq!(values, want);
    }

    #[test]
    fn a_removed_id_is_not_answered_from_its_remembered_slot() {
        let mut m: DomainMap<&str> = DomainMap::default();
        m.insert(1, "one");
        assert_eq!(m.get_mut(&1).copied(), Some("one"));
        assert_eq!(m.remove(&1), Some("one"));
        // Another ID takes the freed slot; the old ID must not find it.
        m.insert(2, "two");
        assert_eq!(m.get(&1), None);
        assert_eq!(m.get_mut(&1), None);
        assert_eq!(m.get(&2), Some(&"two"));
        m.clear();
        assert!(m.is_empty());
        assert_eq!(m.get_mut(&2), None);
        assert_eq!(m.values().count(), 0);
    }
}
