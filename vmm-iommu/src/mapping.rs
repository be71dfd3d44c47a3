//! The mapping table of one domain: non-overlapping IOVA ranges, each made
//! by one MAP request.
//!
//! It owns where mappings are kept and how they are found. It never checks
//! the spec's rules (alignment, input range, reserved regions): the state
//! model does that before it calls in, and the table's own invariant (no
//! overlap) is the one rule it enforces.
//!
//! Two parts, and bits beside the second:
//! - the mappings of the last [`RECENT`] MAPs, in arrival order, each with
//!   the free IOVA around it in the ordered part (its *gap*);
//! - the ordered part ([`ordered::OrderedTable`]): every older mapping,
//!   sorted, in chunks under a B-tree and a directory;
//! - once the ordered part is large, a bit per 4 KiB page its mappings
//!   touch ([`occupancy::Occupancy`]).
//!
//! Why: a driver in strict mode maps a buffer, lets the device use it and
//! unmaps it, so most UNMAPs name one of the last few MAPs. Such a mapping
//! never enters the ordered part. Its MAP searches the ordered part only
//! to read (the overlap check, which also gives the gap), and its UNMAP
//! does not search it at all: a range inside a recent mapping's gap
//! holds no ordered mapping, so the recent mappings alone answer it. Where
//! the ordered part holds a million mappings, inserting into a chunk and
//! taking out of it again (entries moved, keys, the directory) was most of
//! what a MAP+UNMAP pair paid over a pair on an empty domain.
//!
//! A MAP into pages whose bits are clear needs no search at all: those
//! pages are its gap. In a table of a million mappings the search reads
//! a directory leaf and a chunk, six cache misses, where the bits are one
//! line that stays in cache (a fraction of a byte per mapping when an IOVA
//! allocator packs them; bounded, and dropped for mappings spread thin).
//!
//! A MAP that finds the recent part full first files the oldest recent
//! mapping into the ordered part, and narrows the gap of every other one
//! that mapping lay in. Removals from the ordered part only widen the free
//! IOVA, so a recorded gap stays true: no ordered mapping ever lies in it.

mod occupancy;
mod ordered;

use occupancy::Occupancy;

#[cfg(any(test, feature = "test-utils"))]
pub use ordered::CHUNK_CAPACITY;
pub(crate) use ordered::WARM_MIN_MAPPINGS;
use ordered::{OrderedTable, FLAG_BITS};

/// Mappings the recent part holds: enough for the buffers a few requests
/// keep mapped at once, few enough that scanning them all on every MAP,
/// UNMAP and lookup costs a few cycles (six cache lines, in the table).
pub const RECENT: usize = 8;
/// Ordered mappings a table holds before it keeps their pages' bits
/// ([`Occupancy`]): below it, searching the ordered part costs a few cache
/// hits. It lets the bits go again at half of this.
const OCCUPANCY_MIN: usize = 1024;
const PAGE_SHIFT: u32 = 12;
const PAGE_MASK: u64 = (1 << PAGE_SHIFT) - 1;

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

impl Mapping {
    fn intersects(&self, start: u64, end: u64) -> bool {
        self.start <= end && self.end >= start
    }
}

/// Why an UNMAP range cannot be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitError {
    /// The mapping the range would cut in two.
    pub mapping: Mapping,
}

/// A recent mapping and its gap: `[lo, hi]` contains the mapping and
/// no mapping of the ordered part.
#[derive(Clone, Copy, Debug)]
struct Recent {
    mapping: Mapping,
    lo: u64,
    hi: u64,
}

impl Recent {
    const NONE: Recent = Recent {
        mapping: Mapping {
            start: u64::MAX,
            end: 0,
            phys: 0,
            flags: 0,
        },
        lo: 1,
        hi: 0,
    };

    /// Narrows the gap after `m`, which does not intersect this mapping,
    /// went into the ordered part.
    fn exclude(&mut self, m: &Mapping) {
        (self.lo, self.hi) = narrowed((self.lo, self.hi), self.mapping.start, m);
    }
}

/// The gap `(lo, hi)` of the mapping starting at `start`, once `m` (which
/// does not intersect that mapping) is in the ordered part.
fn narrowed((lo, hi): (u64, u64), start: u64, m: &Mapping) -> (u64, u64) {
    if !m.intersects(lo, hi) {
        (lo, hi)
    } else if m.end < start {
        (m.end + 1, hi)
    } else {
        (lo, m.start - 1)
    }
}

/// The free IOVA around `[start, end]` in `ordered`, as its
/// `free_around`; but where the occupancy bits show that no ordered
/// mapping touches the pages of `[start, end]`, those pages: a gap as good
/// as a search's, for one line of bits. Apart, so that a MAP on a table
/// without bits stays small.
#[inline(never)]
fn gap_by_bits(
    o: &Occupancy,
    ordered: &mut OrderedTable,
    start: u64,
    end: u64,
) -> Option<(u64, u64)> {
    if o.is_clear(start, end) == Some(true) {
        return Some((start & !PAGE_MASK, end | PAGE_MASK));
    }
    ordered.free_around(start, end)
}

/// The sorted, non-overlapping mappings of one domain.
#[derive(Clone)]
pub struct MappingTable {
    /// The last MAPs' mappings, oldest first; `recent[len_recent..]` unused.
    recent: [Recent; RECENT],
    len_recent: usize,
    ordered: OrderedTable,
    /// The ordered mappings' pages, in a table large enough for it.
    occupancy: Option<Occupancy>,
    /// Set when the ordered mappings are spread so thin that their bits
    /// would cost more memory than [`Self::occupancy_bound`] allows: no
    /// bits again until the table shrinks below `OCCUPANCY_MIN / 2`.
    occupancy_off: bool,
}

impl Default for MappingTable {
    fn default() -> Self {
        Self {
            recent: [Recent::NONE; RECENT],
            len_recent: 0,
            ordered: OrderedTable::default(),
            occupancy: None,
            occupancy_off: false,
        }
    }
}

impl std::fmt::Debug for MappingTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappingTable")
            .field("recent", &self.recent())
            .field("ordered", &self.ordered)
            .finish()
    }
}

impl MappingTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn recent(&self) -> &[Recent] {
        &self.recent[..self.len_recent]
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.len_recent + self.ordered.len()
    }

    /// Whether the table holds no mapping.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mapping that contains `addr`.
    #[inline]
    pub fn find(&self, addr: u64) -> Option<Mapping> {
        for r in self.recent() {
            if r.mapping.intersects(addr, addr) {
                return Some(r.mapping);
            }
        }
        self.ordered.find(addr)
    }

    /// Whether any mapping intersects `[start, end]`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.recent()
            .iter()
            .any(|r| r.mapping.intersects(start, end))
            || self.ordered.overlaps(start, end)
    }

    /// Inserts `m` unless it intersects an existing mapping. Requires
    /// `m.start <= m.end` and `m.phys` aligned to at least 8 bytes (flags
    /// other than the three the spec defines are not kept). Returns
    /// `false` (and changes nothing) on overlap.
    pub fn try_insert(&mut self, m: Mapping) -> bool {
        debug_assert!(m.start <= m.end);
        debug_assert_eq!(m.phys & FLAG_BITS, 0);
        let (start, end) = (m.start, m.end);
        if self
            .recent()
            .iter()
            .any(|r| r.mapping.intersects(start, end))
        {
            return false;
        }
        let gap = match &self.occupancy {
            None => self.ordered.free_around(start, end),
            Some(o) => gap_by_bits(o, &mut self.ordered, start, end),
        };
        let Some(mut gap) = gap else {
            return false;
        };
        if self.len_recent == RECENT {
            let oldest = self.file_oldest();
            gap = narrowed(gap, start, &oldest);
        }
        // Field by field: a whole `Recent` built on the stack and copied
        // in 16-byte moves was read back across the narrower stores that
        // built it, which stalls store forwarding (a MAP+UNMAP pair on
        // the state alone took a fifth longer).
        let r = &mut self.recent[self.len_recent];
        r.mapping.start = start;
        r.mapping.end = end;
        r.mapping.phys = m.phys;
        r.mapping.flags = m.flags & FLAG_BITS as u32;
        r.lo = gap.0;
        r.hi = gap.1;
        self.len_recent += 1;
        true
    }

    /// Files the oldest recent mapping into the ordered part, to make room
    /// for a new one, and narrows the gaps it lay in; returns it. Apart, so
    /// that a MAP with room does not set up the stack frame of all this.
    #[cold]
    #[inline(never)]
    fn file_oldest(&mut self) -> Mapping {
        let oldest = self.recent[0].mapping;
        self.recent.copy_within(1.., 0);
        self.len_recent -= 1;
        self.file(oldest);
        for r in &mut self.recent[..self.len_recent] {
            r.exclude(&oldest);
        }
        oldest
    }

    /// Moves a recent mapping into the ordered part.
    fn file(&mut self, m: Mapping) {
        // Marked first: a clear bit must never hide an ordered mapping.
        let bound = self.occupancy_bound() + 1;
        if let Some(o) = &mut self.occupancy {
            if !o.mark(m.start, m.end, bound) {
                self.occupancy = None;
                self.occupancy_off = true;
            }
        }
        // It intersects no ordered mapping (its gap says so) and no
        // recent one (each MAP checked against those before it).
        let filed = self.ordered.try_insert(m);
        debug_assert!(filed, "a recent mapping overlapped the ordered part");
        self.fit_occupancy();
    }

    /// Most blocks of bits the ordered part's size pays for: about ten
    /// bytes per mapping at worst, a fraction of one for mappings packed
    /// the way an IOVA allocator packs them.
    fn occupancy_bound(&self) -> usize {
        self.ordered.len() / 8 + 16
    }

    /// Builds, keeps or lets go the occupancy bits for the ordered part's
    /// size and spread.
    fn fit_occupancy(&mut self) {
        let n = self.ordered.len();
        if n < OCCUPANCY_MIN / 2 {
            self.occupancy = None;
            self.occupancy_off = false;
            return;
        }
        let bound = self.occupancy_bound();
        match &self.occupancy {
            Some(o) if o.blocks() > bound => {
                self.occupancy = None;
                self.occupancy_off = true;
            }
            None if !self.occupancy_off && n >= OCCUPANCY_MIN => {
                let mut o = Occupancy::default();
                for m in self.ordered.iter() {
                    if !o.mark(m.start, m.end, bound) {
                        self.occupancy_off = true;
                        return;
                    }
                }
                self.occupancy = Some(o);
            }
            _ => {}
        }
    }

    /// Clears the bits of the pages `m`, just removed from the ordered
    /// part, leaves without an ordered mapping.
    fn unmark(&mut self, m: &Mapping) {
        let Some(o) = &mut self.occupancy else {
            return;
        };
        let (mut first, mut last) = (m.start >> PAGE_SHIFT, m.end >> PAGE_SHIFT);
        // A page `m` covers only in part may hold another mapping too.
        let ordered = &self.ordered;
        let shared = |p: u64| ordered.overlaps(p << PAGE_SHIFT, (p << PAGE_SHIFT) | PAGE_MASK);
        if m.start & PAGE_MASK != 0 && shared(first) {
            first += 1;
        }
        if m.end & PAGE_MASK != PAGE_MASK && shared(last) {
            let Some(l) = last.checked_sub(1) else {
                return;
            };
            last = l;
        }
        if first <= last {
            o.clear_pages(first, last);
        }
    }

    /// Inserts a mapping the caller has checked does not overlap any other.
    #[cfg(any(test, feature = "test-utils"))]
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
        // The usual UNMAP names the last MAP's mapping exactly: mappings
        // are disjoint, so no other one meets the range, and its gap holds
        // no ordered mapping.
        if let Some(last) = self.len_recent.checked_sub(1) {
            let r = &self.recent[last];
            if r.mapping.start == start && r.mapping.end == end {
                let (phys, flags) = (r.mapping.phys, r.mapping.flags);
                removed.push(Mapping {
                    start,
                    end,
                    phys,
                    flags,
                });
                self.len_recent = last;
                return Ok(());
            }
        }
        // The recent mappings the range takes (a bit each), whether it
        // would split one, and whether some gap shows that the ordered
        // part holds nothing in it.
        let mut taken = 0u32;
        let mut ordered_clear = false;
        for (i, r) in self.recent().iter().enumerate() {
            let m = &r.mapping;
            if m.intersects(start, end) {
                if m.start < start || m.end > end {
                    return Err(SplitError { mapping: *m });
                }
                taken |= 1 << i;
            }
            ordered_clear |= r.lo <= start && end <= r.hi;
        }
        let before = removed.len();
        if !ordered_clear {
            self.ordered.remove_range(start, end, removed)?;
            for m in &removed[before..] {
                self.unmark(m);
            }
            self.fit_occupancy();
        }
        if taken == 0 {
            return Ok(());
        }
        let from_ordered = removed.len() > before;
        if taken.is_power_of_two() {
            // The usual UNMAP: one mapping, most often the newest.
            let i = taken.trailing_zeros() as usize;
            removed.push(self.recent[i].mapping);
            // Entry by entry: at most seven move, and a `memmove` call
            // costs more than the rest of such an UNMAP.
            for j in i + 1..self.len_recent {
                self.recent[j - 1] = self.recent[j];
            }
            self.len_recent -= 1;
            if from_ordered {
                removed[before..].sort_unstable_by_key(|m| m.start);
            }
            return Ok(());
        }
        let mut kept = 0;
        for i in 0..self.len_recent {
            let r = self.recent[i];
            if taken & (1 << i) != 0 {
                removed.push(r.mapping);
            } else {
                self.recent[kept] = r;
                kept += 1;
            }
        }

        self.len_recent = kept;
        if from_ordered || taken.count_ones() > 1 {
            removed[before..].sort_unstable_by_key(|m| m.start);
        }
        Ok(())
    }

    /// All mappings in ascending IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = Mapping> + '_ {
        let mut recent = [Recent::NONE.mapping; RECENT];
        for (to, r) in recent.iter_mut().zip(self.recent()) {
            *to = r.mapping;
        }
        recent[..self.len_recent].sort_unstable_by_key(|m| m.start);
        let mut recent = recent.into_iter().take(self.len_recent).peekable();
        let mut ordered = self.ordered.iter().peekable();
        std::iter::from_fn(move || match (recent.peek(), ordered.peek()) {
            (Some(r), Some(o)) if o.start < r.start => ordered.next(),
            (Some(_), _) => recent.next(),
            (None, _) => ordered.next(),
        })
    }

    /// The first of two rounds that warm the ordered part's lookup of
    /// `addr` (see `OrderedTable::warm_directory`).
    /// `None` also where the occupancy bits show that no ordered mapping
    /// is there: a MAP there will not search.
    pub fn warm_directory(&self, addr: u64) -> Option<u32> {
        let o = self.occupancy.as_ref();
        if o.is_some_and(|o| o.is_clear(addr, addr) == Some(true)) {
            return None;
        }
        self.ordered.warm_directory(addr)
    }

    /// The second round (see `OrderedTable::warm_chunk`).
    pub fn warm_chunk(&self, addr: u64, leaf: u32) -> Option<u32> {
        self.ordered.warm_chunk(addr, leaf)
    }

    /// Takes `slot` (from [`MappingTable::warm_chunk`]) as the slot the
    /// ordered part's next search tries first. Only a hint.
    pub fn hint_slot(&mut self, slot: u32) {
        self.ordered.hint_slot(slot);
    }

    /// Heap bytes held by the ordered part's arrays (see
    /// `OrderedTable::chunk_bytes`) and its occupancy bits; the recent
    /// part lives in the table itself.
    pub fn chunk_bytes(&self) -> usize {
        self.ordered.chunk_bytes() + self.occupancy.as_ref().map_or(0, Occupancy::bytes)
    }

    /// The ordered part's chunk count and how stale its directory is.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn chunk_stats(&self) -> (usize, usize) {
        self.ordered.chunk_stats()
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

    fn page(i: u64) -> Mapping {
        m(i << 12, (i << 12) + 0xfff)
    }

    /// A table of `n` page mappings at even pages, `RECENT` of them still
    /// recent.
    fn populated(n: u64) -> MappingTable {
        let mut t = MappingTable::new();
        for i in 0..n {
            t.insert(page(2 * i));
        }
        t
    }

    impl MappingTable {
        /// Panics unless every recent mapping lies in its gap and no
        /// ordered mapping does, and every page an ordered mapping touches
        /// is marked in the occupancy bits (when there are bits).
        fn check_gaps(&self) {
            for r in self.recent() {
                assert!(r.lo <= r.mapping.start && r.mapping.end <= r.hi, "{r:?}");
                assert!(
                    !self.ordered.overlaps(r.lo, r.hi),
                    "{r:?} holds an ordered mapping"
                );
            }
            if let Some(o) = &self.occupancy {
                for m in self.ordered.iter() {
                    for p in (m.start >> 12)..=(m.end >> 12) {
                        assert_eq!(o.is_clear(p << 12, p << 12), Some(false), "{m:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_map_then_unmap_of_the_same_range_leaves_the_ordered_part_alone() {
        let mut t = populated(1000);
        assert_eq!(t.ordered.len(), 1000 - RECENT);
        // The first MAP finds the recent part full and files one.
        let mut out = vec![];
        assert!(t.try_insert(page(1)));
        t.remove_range(page(1).start, page(1).end, &mut out)
            .unwrap();
        assert_eq!(t.ordered.len(), 1000 - RECENT + 1);
        let before = t.ordered.chunk_stats();
        out.clear();
        for i in 0..500 {
            assert!(t.try_insert(page(2 * i + 1)));
            t.remove_range(page(2 * i + 1).start, page(2 * i + 1).end, &mut out)
                .unwrap();
        }
        assert_eq!(out, (0..500).map(|i| page(2 * i + 1)).collect::<Vec<_>>());
        assert_eq!(t.ordered.len(), 1000 - RECENT + 1);
        assert_eq!(t.ordered.chunk_stats(), before);
        assert_eq!(t.len(), 1000);
    }

    #[test]
    fn a_full_recent_part_files_its_oldest_mapping_first() {
        let mut t = MappingTable::new();
        for i in 0..RECENT as u64 {
            t.insert(page(i));
        }
        assert_eq!(t.ordered.len(), 0);
        t.insert(page(100));
        assert_eq!(t.ordered.len(), 1);
        assert_eq!(t.ordered.find(0), Some(page(0)));
        assert_eq!(t.recent().last().map(|r| r.mapping), Some(page(100)));
        t.check_gaps();
    }

    #[test]
    fn a_filed_mapping_narrows_the_gaps_it_lay_in() {
        // page(10) goes in first; every later one's gap spanned it until it
        // was filed. An UNMAP over both must then find it in the ordered
        // part, not take the later mapping's gap as proof of nothing there.
        let mut t = MappingTable::new();
        t.insert(page(10));
        t.insert(page(20));
        for i in 0..RECENT as u64 - 1 {
            t.insert(page(30 + i));
        }
        assert_eq!(t.ordered.find(page(10).start), Some(page(10)));
        t.check_gaps();
        let mut out = vec![];
        t.remove_range(0, page(25).end, &mut out).unwrap();
        assert_eq!(out, vec![page(10), page(20)]);
        assert_eq!(t.find(page(10).start), None);
        assert_eq!(t.len(), RECENT - 1);
    }

    #[test]
    fn an_unmap_that_would_split_a_recent_mapping_removes_nothing() {
        let mut t = populated(100);
        let mut out = vec![];
        // The last mapping is recent, the one before it too; the range
        // takes one whole and cuts the other.
        let (a, b) = (page(198), page(196));
        let e = t.remove_range(b.start, a.start + 0x7ff, &mut out);
        assert_eq!(e, Err(SplitError { mapping: a }));
        assert!(out.is_empty());
        assert_eq!(t.find(b.start), Some(b));
        // Cutting an ordered mapping while taking recent ones: nothing
        // goes either.
        let e = t.remove_range(page(2).start + 1, page(198).end, &mut out);
        assert_eq!(e, Err(SplitError { mapping: page(2) }));
        assert!(out.is_empty());
        assert_eq!(t.len(), 100);
    }

    #[test]
    fn an_unmap_across_both_parts_returns_their_mappings_in_order() {
        let mut t = populated(100);
        let mut out = vec![];
        t.remove_range(page(150).start, u64::MAX, &mut out).unwrap();
        assert_eq!(out, (75..100).map(|i| page(2 * i)).collect::<Vec<_>>());
        assert_eq!(t.len(), 75);
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            (0..75).map(|i| page(2 * i)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn flags_outside_the_three_defined_are_not_kept() {
        let mut t = MappingTable::new();
        t.insert(Mapping {
            flags: 0xffff_fff1,
            ..page(1)
        });
        assert_eq!(t.find(page(1).start).map(|m| m.flags), Some(1));
    }

    #[test]
    fn a_mapping_of_the_last_byte_and_one_of_the_first() {
        let mut t = MappingTable::new();
        let top = Mapping {
            start: u64::MAX,
            end: u64::MAX,
            phys: 0,
            flags: 1,
        };
        let bottom = Mapping {
            start: 0,
            end: 0,
            phys: 0,
            flags: 1,
        };
        assert!(t.try_insert(top));
        assert!(t.try_insert(bottom));
        assert!(!t.try_insert(Mapping {
            start: u64::MAX - 0xfff,
            ..top
        }));
        for i in 0..RECENT as u64 {
            t.insert(page(1 + i));
        }
        t.check_gaps();
        assert_eq!(t.find(u64::MAX), Some(top));
        assert_eq!(t.find(0), Some(bottom));
        let mut out = vec![];
        t.remove_range(1, u64::MAX - 1, &mut out).unwrap();
        assert_eq!(out.len(), RECENT);
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![bottom, top]);
    }

    #[test]
    fn occupancy_bits_come_with_a_large_table_and_go_at_half_its_size() {
        let n = (OCCUPANCY_MIN + RECENT) as u64;
        let mut t = populated(n - 1);
        assert!(t.occupancy.is_none());
        t.insert(page(2 * n));
        assert_eq!(t.ordered.len(), OCCUPANCY_MIN);
        assert!(t.occupancy.is_some());
        t.check_gaps();
        // A MAP into a marked page is refused as before; one next to it
        // is taken, with the page as its gap.
        assert!(!t.try_insert(m(0x800, 0x17ff)));
        assert!(t.try_insert(page(1)));
        assert_eq!(
            t.recent().last().map(|r| (r.lo, r.hi)),
            Some((0x1000, 0x1fff))
        );
        let mut out = vec![];
        t.remove_range(0, page(OCCUPANCY_MIN as u64 + 2).end, &mut out)
            .unwrap();
        assert_eq!(out.len(), OCCUPANCY_MIN / 2 + 3);
        t.check_gaps();
        assert!(t.occupancy.is_none(), "{} ordered", t.ordered.len());
        assert!(t.find(page(0).start).is_none());
        assert_eq!(t.find(page(2 * n).start), Some(page(2 * n)));
    }

    #[test]
    fn mappings_spread_thin_keep_no_bits_and_are_all_found() {
        // One page per 2 MiB block: a block of bits per mapping.
        let mut t = MappingTable::new();
        for i in 0..2 * OCCUPANCY_MIN as u64 {
            t.insert(page(i << 9));
        }
        assert!(t.occupancy.is_none());
        assert!(t.occupancy_off);
        assert_eq!(t.find(page(7 << 9).start), Some(page(7 << 9)));
        assert!(!t.try_insert(page(7 << 9)));
        assert!(t.try_insert(page((7 << 9) + 1)));
    }

    #[test]
    fn a_huge_mapping_filed_into_a_large_table_turns_the_bits_off_at_once() {
        let mut t = populated((OCCUPANCY_MIN + RECENT) as u64);
        assert!(t.occupancy.is_some());
        let huge = m(1 << 40, u64::MAX - 0xfff);
        t.insert(huge);
        for i in 0..RECENT as u64 {
            t.insert(page(2 * i + 1));
        }
        assert_eq!(t.ordered.find(u64::MAX - 0x1000), Some(huge));
        assert!(t.occupancy.is_none() && t.occupancy_off);
        assert!(!t.try_insert(page(1 << 30)));
        let mut out = vec![];
        t.remove_range(1 << 40, u64::MAX, &mut out).unwrap();
        assert_eq!(out, vec![huge]);
        assert!(t.try_insert(page(1 << 30)));
    }

    #[test]
    fn a_page_two_mappings_share_stays_marked_until_both_are_gone() {
        let mut t = MappingTable::new();
        for i in 0..(OCCUPANCY_MIN + RECENT) as u64 {
            t.insert(page(2 * i + 100));
        }
        assert!(t.occupancy.is_some());
        // Two halves of page 0, and page 1, filed into the ordered part.
        t.insert(m(0, 0x7ff));
        t.insert(m(0x800, 0xfff));
        t.insert(page(1));
        for i in 0..RECENT as u64 {
            t.insert(page(50 + 2 * i));
        }
        assert_eq!(t.ordered.find(0x900), Some(m(0x800, 0xfff)));
        let mut out = vec![];
        t.remove_range(0, 0x7ff, &mut out).unwrap();
        t.check_gaps();
        assert!(
            !t.try_insert(m(0x900, 0x9ff)),
            "the other half is still there"
        );
        assert!(t.try_insert(m(0x100, 0x1ff)));
        t.remove_range(0x800, 0x1fff, &mut out).unwrap();
        t.check_gaps();
        assert_eq!(out, vec![m(0, 0x7ff), m(0x800, 0xfff), page(1)]);
    }

    /// One MAP (`insert`) or UNMAP of `[start, end]` on `t` and on the
    /// naive `model`, their answers compared; whether a mapping went in.
    fn step(
        t: &mut MappingTable,
        model: &mut Vec<Mapping>,
        insert: bool,
        start: u64,
        end: u64,
    ) -> Result<bool, TestCaseError> {
        let overl = model.iter().any(|x| x.intersects(start, end));
        prop_assert_eq!(t.overlaps(start, end), overl);
        let mut inserted = false;
        if insert {
            inserted = t.try_insert(m(start, end));
            prop_assert_eq!(inserted, !overl);
            if inserted {
                model.push(m(start, end));
            }
        } else {
            let split = model
                .iter()
                .any(|x| (x.start < start && x.end >= start) || (x.end > end && x.start <= end));
            let mut out = vec![];
            prop_assert_eq!(t.remove_range(start, end, &mut out).is_err(), split);
            let mut expect: Vec<Mapping> = model
                .iter()
                .copied()
                .filter(|x| !split && x.start >= start && x.end <= end)
                .collect();
            expect.sort_by_key(|x| x.start);
            prop_assert_eq!(&out, &expect);
            model.retain(|x| split || !(x.start >= start && x.end <= end));
        }
        prop_assert_eq!(t.len(), model.len());
        Ok(inserted)
    }

    /// `t` holds what `model` does, in order, and finds it at every
    /// `stride` bytes below `top`.
    fn check_all(
        t: &MappingTable,
        mut model: Vec<Mapping>,
        top: u64,
        stride: usize,
    ) -> Result<(), TestCaseError> {
        model.sort_by_key(|x| x.start);
        prop_assert_eq!(t.iter().collect::<Vec<_>>(), model.clone());
        for a in (0..top).step_by(stride) {
            let expect = model.iter().copied().find(|x| x.start <= a && a <= x.end);
            prop_assert_eq!(t.find(a), expect);
        }
        Ok(())
    }

    proptest! {
        // Each case builds a table of over a thousand mappings.
        #![proptest_config(ProptestConfig::with_cases(48))]

        // A table past the occupancy threshold, with mappings of half a
        // page that share pages, under random MAPs and UNMAPs.
        #[test]
        fn a_large_table_with_shared_pages_matches_naive_model(
            base in proptest::collection::btree_set(0u64..6000, OCCUPANCY_MIN + 200..OCCUPANCY_MIN + 400),
            ops in proptest::collection::vec((any::<bool>(), 0u64..6000, 1u64..5), 1..300),
        ) {
            const HALF: u64 = 0x800;
            let mut t = MappingTable::new();
            let mut model: Vec<Mapping> = vec![];
            for &b in &base {
                t.insert(m(b * HALF, b * HALF + HALF - 1));
                model.push(m(b * HALF, b * HALF + HALF - 1));
            }
            prop_assert!(t.occupancy.is_some());
            for (ins, at, n) in ops {
                step(&mut t, &mut model, ins, at * HALF, (at + n) * HALF - 1)?;
            }
            t.check_gaps();
            check_all(&t, model, 6010 * HALF, 0x400)?;
        }
    }

    proptest! {
        // Random MAPs and UNMAPs (many of them of what was just mapped, as
        // a driver in strict mode does) against a naive list.
        #[test]
        fn matches_naive_model(
            ops in proptest::collection::vec((0u8..3, 0u64..300, 1u64..6), 1..600),
        ) {
            let mut t = MappingTable::new();
            let mut model: Vec<Mapping> = vec![];
            let mut last = None;
            for (op, pg, pages) in ops {
                let (start, end) = match (op, last) {
                    (2, Some(r)) => r,
                    _ => (pg << 12, ((pg + pages) << 12) - 1),
                };
                if step(&mut t, &mut model, op == 0, start, end)? {
                    last = Some((start, end));
                }
                t.check_gaps();
            }
            check_all(&t, model, 310 << 12, 0x800)?;
        }
    }
}
