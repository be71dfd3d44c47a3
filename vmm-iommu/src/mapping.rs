//! The mapping table of one domain: non-overlapping IOVA ranges, each made
//! by one MAP request, kept sorted for O(log n) lookup and O(log n + k)
//! removal.
//!
//! It owns ordering and packing only. It never checks the spec's rules
//! (alignment, input range, reserved regions): the state model does that
//! before it calls in, and the table's own invariant (no overlap) is the one
//! rule it enforces.
//!
//! Layout: a B-tree of chunks keyed by the first IOVA in the chunk, each
//! chunk a sorted vector of at most [`CHUNK_CAPACITY`] 24-byte entries. A
//! plain `BTreeMap<u64, Mapping>` costs about 48 bytes per mapping; the
//! chunks bring that to about 26, and keep a lookup to a short tree descent
//! plus a branch-free count over one cache-friendly array.

use std::collections::BTreeMap;

/// Most entries one chunk holds; a full chunk splits in two.
pub const CHUNK_CAPACITY: usize = 32;
/// A chunk that falls below this many entries merges with its successor
/// when they fit together, so that hostile unmap patterns cannot leave one
/// heap allocation per mapping.
const CHUNK_MIN: usize = CHUNK_CAPACITY / 4;
/// Flag bits packed into the low bits of the stored physical address.
const FLAG_BITS: u64 = 0x7;

/// One mapping: `[start, end]` (inclusive) of IOVA onto guest-physical
/// memory from `phys`, with `VIRTIO_IOMMU_MAP_F_*` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub end: u64,
    /// Guest-physical address of `start`.
    pub phys: u64,
    /// `VIRTIO_IOMMU_MAP_F_*` flags (READ, WRITE, MMIO).
    pub flags: u32,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    start: u64,
    end: u64,
    /// Physical address with the flags in its low three bits: the state
    /// model only inserts mappings whose physical address is aligned to the
    /// granule, which is at least 4 KiB.
    phys_flags: u64,
}

impl Entry {
    fn mapping(&self) -> Mapping {
        Mapping {
            start: self.start,
            end: self.end,
            phys: self.phys_flags & !FLAG_BITS,
            flags: (self.phys_flags & FLAG_BITS) as u32,
        }
    }
}

/// Why an UNMAP range cannot be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitError {
    /// The mapping the range would cut in two.
    pub mapping: Mapping,
}

/// The sorted, non-overlapping mappings of one domain.
#[derive(Clone, Debug, Default)]
pub struct MappingTable {
    chunks: BTreeMap<u64, Vec<Entry>>,
    len: usize,
    /// The array of the last chunk that emptied, reused by the next new one.
    spare: Option<Vec<Entry>>,
}

impl MappingTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no mapping.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk whose first entry starts at or below `addr`.
    fn chunk_at_or_below(&self, addr: u64) -> Option<(&u64, &Vec<Entry>)> {
        self.chunks.range(..=addr).next_back()
    }

    /// The entry with the greatest start at or below `addr`, if any.
    fn last_at_or_below(&self, addr: u64) -> Option<&Entry> {
        let (_, chunk) = self.chunk_at_or_below(addr)?;
        // Count the starts <= addr (the chunk's first start, its key, is
        // <= addr, so the count is >= 1). A branch-free count over the whole
        // chunk issues all of its cache-line loads at once, where a binary
        // search waits for one miss before it knows the next line to load:
        // over a table that does not fit in cache that is one memory
        // latency per chunk instead of four or five.
        let n = chunk
            .iter()
            .fold(0usize, |n, e| n + usize::from(e.start <= addr));
        chunk.get(n.checked_sub(1)?)
    }

    /// The mapping that contains `addr`.
    pub fn find(&self, addr: u64) -> Option<Mapping> {
        let e = self.last_at_or_below(addr)?;
        (addr <= e.end).then(|| e.mapping())
    }

    /// Whether any mapping intersects `[start, end]`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        // Mappings are disjoint and sorted, so the one with the greatest
        // start <= end is the only candidate that can reach back to `start`.
        self.last_at_or_below(end).is_some_and(|e| e.end >= start)
    }

    /// Inserts `m` unless it intersects an existing mapping, in one descent
    /// of the tree. Requires `m.start <= m.end` and `m.phys` aligned to at
    /// least 8 bytes. Returns `false` (and changes nothing) on overlap.
    pub fn try_insert(&mut self, m: Mapping) -> bool {
        debug_assert!(m.start <= m.end);
        debug_assert_eq!(m.phys & FLAG_BITS, 0);
        let entry = Entry {
            start: m.start,
            end: m.end,
            phys_flags: m.phys | (u64::from(m.flags) & FLAG_BITS),
        };
        // The chunk holding the last start <= m.end. If its key lies above
        // m.start, its first mapping starts inside [start, end]: overlap.
        // Otherwise it is also the chunk m belongs in.
        let Some((&key, chunk)) = self.chunks.range_mut(..=m.end).next_back() else {
            // Below every chunk (or empty): prepend to the first chunk, whose
            // key changes, or start a new one.
            self.len += 1;
            match self.chunks.pop_first() {
                Some((_, mut first)) if first.len() < CHUNK_CAPACITY => {
                    first.insert(0, entry);
                    self.chunks.insert(m.start, first);
                }
                Some((k, first)) => {
                    self.chunks.insert(k, first);
                    let c = self.new_chunk(entry);
                    self.chunks.insert(m.start, c);
                }
                None => {
                    let c = self.new_chunk(entry);
                    self.chunks.insert(m.start, c);
                }
            }
            return true;
        };
        if key > m.start {
            return false;
        }
        let pos = chunk.partition_point(|e| e.start <= m.end);
        // `pos >= 1`: the chunk's first start is its key, <= m.start.
        if chunk[pos - 1].end >= m.start {
            return false;
        }
        self.len += 1;
        if chunk.len() < CHUNK_CAPACITY {
            chunk.insert(pos, entry);
            return true;
        }
        if pos == chunk.len() {
            // Appending past a full chunk: start a new one instead of
            // splitting, so that ascending inserts leave full chunks.
            let c = self.new_chunk(entry);
            self.chunks.insert(m.start, c);
            return true;
        }
        let mut right = chunk.split_off(CHUNK_CAPACITY / 2);
        if pos <= CHUNK_CAPACITY / 2 {
            chunk.insert(pos, entry);
        } else {
            right.insert(pos - CHUNK_CAPACITY / 2, entry);
        }
        self.chunks.insert(right[0].start, right);
        true
    }

    /// Inserts a mapping the caller has checked does not overlap any other.
    pub fn insert(&mut self, m: Mapping) {
        let inserted = self.try_insert(m);
        debug_assert!(inserted, "insert of an overlapping mapping");
    }

    /// Removes every mapping inside `[start, end]`, all or nothing: if a
    /// mapping straddles either end of the range, nothing is removed.
    /// Returns the removed mappings through `removed`, in ascending order.
    pub fn remove_range(
        &mut self,
        start: u64,
        end: u64,
        removed: &mut Vec<Mapping>,
    ) -> Result<(), SplitError> {
        // Fast path: every affected mapping lies in the chunk that holds
        // `start` and the range ends before that chunk does. One descent.
        if let Some((&key, chunk)) = self.chunks.range_mut(..=start).next_back() {
            let lo = chunk.partition_point(|e| e.start < start);
            let hi = chunk.partition_point(|e| e.start <= end);
            if hi < chunk.len() {
                // `lo - 1` holds the last start below `start`; `hi - 1` the
                // last start within the range.
                if lo > 0 && chunk[lo - 1].end >= start {
                    return Err(SplitError {
                        mapping: chunk[lo - 1].mapping(),
                    });
                }
                if hi > lo && chunk[hi - 1].end > end {
                    return Err(SplitError {
                        mapping: chunk[hi - 1].mapping(),
                    });
                }
                if lo < hi {
                    removed.extend(chunk.drain(lo..hi).map(|e| e.mapping()));
                    self.len -= hi - lo;
                    if lo == 0 || chunk.len() < CHUNK_MIN {
                        self.rekey(key);
                    }
                }
                return Ok(());
            }
        }
        // Pass 1, read-only: the split checks. The mappings the range
        // affects are the one containing `start` (if it starts below) and
        // those starting in [start, end]; only the first and the last can
        // straddle an end of the range.
        let first_key = match self.chunk_at_or_below(start) {
            Some((&k, chunk)) => {
                let i = chunk.partition_point(|e| e.start <= start);
                let e = &chunk[i - 1];
                if e.start < start && e.end >= start {
                    return Err(SplitError {
                        mapping: e.mapping(),
                    });
                }
                k
            }
            None => start,
        };
        if let Some(e) = self.last_at_or_below(end) {
            if e.end > end && e.start <= end && e.start >= start {
                return Err(SplitError {
                    mapping: e.mapping(),
                });
            }
        }
        // Pass 2: drain. Chunks whose first entry goes change key and are
        // re-keyed after the walk; the common case (a mapping inside one
        // chunk) touches one chunk in place.
        let before = removed.len();
        let mut rekey: Vec<u64> = Vec::new();
        for (&key, chunk) in self.chunks.range_mut(first_key..=end) {
            let lo = chunk.partition_point(|e| e.start < start);
            let hi = chunk.partition_point(|e| e.start <= end);
            if lo < hi {
                removed.extend(chunk.drain(lo..hi).map(|e| e.mapping()));
                if lo == 0 || chunk.len() < CHUNK_MIN {
                    rekey.push(key);
                }
            }
        }
        self.len -= removed.len() - before;
        for key in rekey {
            self.rekey(key);
        }
        Ok(())
    }

    /// Re-files the chunk keyed `key` after removals: dropped if empty
    /// (its array kept as the spare), shrunk if mostly unused, re-keyed by
    /// its new first start, merged if underfull.
    fn rekey(&mut self, key: u64) {
        let Some(mut chunk) = self.chunks.remove(&key) else {
            return;
        };
        if chunk.is_empty() {
            if chunk.capacity() <= CHUNK_CAPACITY {
                self.spare = Some(chunk);
            }
            return;
        }
        if chunk.len() * 4 < chunk.capacity() {
            chunk.shrink_to(chunk.len() * 2);
        }
        let k = chunk[0].start;
        self.chunks.insert(k, chunk);
        self.merge_small_at(k);
    }

    /// A one-entry chunk, reusing the spare array when there is one (a
    /// MAP/UNMAP pair on an otherwise empty region allocates nothing).
    fn new_chunk(&mut self, entry: Entry) -> Vec<Entry> {
        let mut v = self.spare.take().unwrap_or_default();
        v.push(entry);
        v
    }

    /// Merges the chunk keyed `key` with its successor when either is
    /// underfull and both fit in one, bounding the number of chunks by
    /// about `len / CHUNK_MIN`.
    fn merge_small_at(&mut self, key: u64) {
        let Some(ll) = self.chunks.get(&key).map(Vec::len) else {
            return;
        };
        let right = self
            .chunks
            .range(key.saturating_add(1)..)
            .next()
            .map(|(&k, c)| (k, c.len()));
        let Some((right, rl)) = right else { return };
        if right <= key {
            return;
        }
        if (ll < CHUNK_MIN || rl < CHUNK_MIN) && ll + rl <= CHUNK_CAPACITY {
            if let Some(mut r) = self.chunks.remove(&right) {
                if let Some(l) = self.chunks.get_mut(&key) {
                    l.append(&mut r);
                }
            }
        } else if ll < CHUNK_MIN {
            // Try the predecessor instead.
            let left = self
                .chunks
                .range(..key)
                .next_back()
                .map(|(&k, c)| (k, c.len()));
            if let Some((left, lsz)) = left {
                if lsz + ll <= CHUNK_CAPACITY {
                    if let Some(mut c) = self.chunks.remove(&key) {
                        if let Some(l) = self.chunks.get_mut(&left) {
                            l.append(&mut c);
                        }
                    }
                }
            }
        }
    }

    /// Removes every mapping.
    pub fn clear(&mut self) {
        self.spare = None;
        self.chunks.clear();
        self.len = 0;
    }

    /// All mappings in ascending IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.chunks.values().flatten().map(Entry::mapping)
    }

    /// Heap bytes held by the chunks' arrays (for memory accounting).
    pub fn chunk_bytes(&self) -> usize {
        self.chunks
            .values()
            .map(|c| c.capacity() * std::mem::size_of::<Entry>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(start: u64, end: u64) -> Mapping {
        Mapping {
            start,
            end,
            phys: start + 0x1000_0000,
            flags: 3,
        }
    }

    #[test]
    fn find_returns_the_containing_mapping() {
        let mut t = MappingTable::new();
        t.insert(m(0x1000, 0x1fff));
        t.insert(m(0x3000, 0x4fff));
        assert_eq!(t.find(0x1800), Some(m(0x1000, 0x1fff)));
        assert_eq!(t.find(0x2000), None);
        assert_eq!(t.find(0x4fff), Some(m(0x3000, 0x4fff)));
        assert_eq!(t.find(0), None);
        assert!(t.overlaps(0x2000, 0x3000));
        assert!(!t.overlaps(0x2000, 0x2fff));
    }

    #[test]
    fn remove_range_refuses_to_split_and_removes_nothing() {
        let mut t = MappingTable::new();
        t.insert(m(0, 0x9fff));
        let mut out = vec![];
        assert!(t.remove_range(0, 0x4fff, &mut out).is_err());
        assert!(t.remove_range(0x1000, 0x9fff, &mut out).is_err());
        assert_eq!(t.len(), 1);
        assert!(out.is_empty());
    }

    #[test]
    fn ascending_inserts_fill_chunks() {
        let mut t = MappingTable::new();
        for i in 0..(CHUNK_CAPACITY as u64 * 10) {
            t.insert(m(i * 0x2000, i * 0x2000 + 0xfff));
        }
        assert_eq!(t.chunks.len(), 10);
        assert!(t.chunks.values().all(|c| c.len() == CHUNK_CAPACITY));
    }

    #[test]
    fn hostile_unmap_pattern_keeps_chunk_count_bounded() {
        let mut t = MappingTable::new();
        let n = 64 * 64u64;
        for i in 0..n {
            t.insert(m(i * 0x1000, i * 0x1000 + 0xfff));
        }
        let mut out = vec![];
        // Leave one mapping in every 32: 128 survivors.
        for i in 0..n {
            if i % 32 != 0 {
                t.remove_range(i * 0x1000, i * 0x1000 + 0xfff, &mut out)
                    .unwrap();
            }
        }
        assert_eq!(t.len(), 128);
        assert!(t.chunks.len() <= 128 / 2 + 1, "{} chunks", t.chunks.len());
    }

    proptest! {
        // The table agrees with a naive list under random inserts/removes.
        #[test]
        fn matches_naive_model(ops in proptest::collection::vec((any::<bool>(), 0u64..300, 1u64..6), 1..400)) {
            let mut t = MappingTable::new();
            let mut model: Vec<Mapping> = vec![];
            for (ins, page, pages) in ops {
                let start = page * 0x1000;
                let end = start + pages * 0x1000 - 1;
                let overl = model.iter().any(|x| x.start <= end && x.end >= start);
                prop_assert_eq!(t.overlaps(start, end), overl);
                if ins {
                    if !overl {
                        t.insert(m(start, end));
                        model.push(m(start, end));
                    }
                } else {
                    let split = model.iter().any(|x| (x.start < start && x.end >= start) || (x.end > end && x.start <= end));
                    let mut out = vec![];
                    let r = t.remove_range(start, end, &mut out);
                    prop_assert_eq!(r.is_err(), split);
                    if !split {
                        let mut expect: Vec<Mapping> = model.iter().copied().filter(|x| x.start >= start && x.end <= end).collect();
                        expect.sort_by_key(|x| x.start);
                        prop_assert_eq!(&out, &expect);
                        model.retain(|x| !(x.start >= start && x.end <= end));
                    }
                }
                prop_assert_eq!(t.len(), model.len());
            }
            model.sort_by_key(|x| x.start);
            prop_assert_eq!(t.iter().collect::<Vec<_>>(), model.clone());
            for a in (0..310u64 * 0x1000).step_by(0x800) {
                let expect = model.iter().copied().find(|x| x.start <= a && a <= x.end);
                prop_assert_eq!(t.find(a), expect);
            }
        }
    }
}
