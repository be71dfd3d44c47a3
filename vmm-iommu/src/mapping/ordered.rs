//! The ordered part of a domain's mapping table: non-overlapping IOVA
//! ranges, each made by one MAP request, kept sorted for O(log n) lookup
//! and O(log n + k) removal. The mappings of the last few MAPs wait in
//! front of it (see [`super::MappingTable`]) and come here once newer ones
//! push them out.
//!
//! It owns ordering, packing and the lookup index only. It never checks the
//! spec's rules (alignment, input range, reserved regions): the state model
//! does that before it calls in, and the table's own invariant (no overlap)
//! is the one rule it enforces.
//!
//! Layout: mappings live in chunks of at most [`CHUNK_CAPACITY`] 24-byte
//! entries, sorted, each chunk a fixed-size slot of a slab (blocks of 64
//! slots, so a slot is reached by two array indexings and no pointer of its
//! own). Two indexes lead to a chunk:
//! - a B-tree from each chunk's first IOVA (its key) to its slot: the
//!   authoritative order, which every change goes through;
//! - a directory for random lookups: every chunk key in leaves of 4 with
//!   their slots and the next leaf's first key (one cache line each), under
//!   a few levels of 16-key groups small enough to stay in cache. A lookup
//!   is a count over a group per level, then over the leaf and the chunk:
//!   two dependent reads from memory (the leaf, the chunk), where a B-tree
//!   of mappings takes about seven.
//!
//! Each slot also records the key of the chunk after it. A directory answer
//! is then checked in place (the slot's key at or below the address, the
//! next key above it), so MAP and UNMAP find their chunk without a B-tree
//! descent wherever the directory is right, and ask the B-tree elsewhere.
//! The same check lets MAP and UNMAP try the slot the last change used
//! before any search, and lets a jump table over the leaves (one bucket
//! per leaf, its guess checked against the leaf's own first key and the
//! next leaf's) stand in for the levels above them on most random lookups.
//!
//! The directory is rebuilt lazily: chunks appended at the top are added as
//! they come, other changes (splits, merges, keys that move) leave it stale
//! until enough of them pile up, counting the MAPs and UNMAPs it sent
//! to the wrong chunk. A stale directory can only lead a lookup to
//! the wrong chunk, never to a wrong answer: every entry of every live slot
//! is a current mapping, and a mapping that contains the address is the
//! answer wherever it was found (mappings are disjoint). A lookup that finds
//! nothing there asks the B-tree.
//!
//! A small table (at most [`CHUNK_CAPACITY`] mappings) keeps them in one
//! chunk inline, with no slab, B-tree or directory: most domains a guest
//! uses hold a few rings and the buffers in flight, and a MAP+UNMAP pair
//! on such a domain is then a count over one chunk and a shift, where the
//! chunked form creates and files a chunk and takes it out again. A table
//! that grows past the chunk moves into the chunked form; one that
//! shrinks to [`SMALL_BACK`] mappings or fewer moves back (a gap between
//! the two, so a table at the edge does not move at every change).
//!
//! Memory: a full chunk is 320 bytes (five cache lines) for 13 mappings
//! (24 bytes each, and the next chunk's key), and the B-tree and directory
//! add about three bytes per mapping; a plain
//! `BTreeMap<u64, Mapping>` costs about 48. Chunks stay at least a quarter
//! full except between two full ones (see `CHUNK_MIN`). A run of MAPs in
//! IOVA order fills each chunk it makes, except in a table past the
//! caches, where it leaves one entry free so that a MAP between two of
//! them does not split the chunk (see `OrderedTable::run_fill`).

use std::collections::BTreeMap;
use std::ops::Bound;

use super::{Mapping, SplitError};
use crate::prefetch::{prefetch, prefetch_lines};

/// Most entries one chunk holds; a full chunk splits in two. Thirteen
/// entries and the next key fill five cache lines: a MAP+UNMAP pair in a
/// table past the caches waits for the lines of one chunk, and five
/// measured faster than the six of sixteen entries (with the next key in
/// an array of its own, a seventh).
pub const CHUNK_CAPACITY: usize = 13;
/// A chunk that falls below this many entries merges with a neighbour
/// when they fit together, so that hostile unmap patterns cannot leave one
/// 320-byte slot per mapping.
const CHUNK_MIN: usize = CHUNK_CAPACITY / 4;
/// Chunk slots per slab block: a block is one allocation of 20 KiB once
/// full (the first grows from a few slots, so a small table stays small).
const BLOCK_SLOTS: usize = 64;
/// Keys per directory group above the bottom level: two cache lines of
/// keys, counted without branches.
const GROUP: usize = 16;
/// Keys per bottom directory group: with their slots and the next group's
/// first key, one cache line, so that a warmed lookup waits for one line
/// of directory where sixteen keys took three (MAP+UNMAP pairs on the
/// device path over 1,000,000 mappings measured about 10% faster, and a
/// lookup under the read lock over 10,000 mappings 64 ns -> 37 ns).
const LEAF: usize = 4;
/// A chunked table that shrinks to this many mappings or fewer moves back
/// inline.
const SMALL_BACK: usize = CHUNK_CAPACITY / 2;
/// Chunks a table holds before lookups are worth warming ahead
/// ([`OrderedTable::warm_directory`]): below it (about 4 MiB of chunks) the
/// table stays in this machine kind's caches and warming only costs.
const WARM_MIN_CHUNKS: usize = 10_000;
/// Fewest mappings a table of [`WARM_MIN_CHUNKS`] holds (chunks stay a
/// quarter full): below it no table is worth warming.
pub(crate) const WARM_MIN_MAPPINGS: usize = WARM_MIN_CHUNKS * CHUNK_MIN;
/// Leaves a directory holds before it keeps a jump table (below, its
/// levels are few and in cache).
const JUMP_MIN_LEAVES: usize = 64;
/// First keys a jump-table guess may be short of the answer by before the
/// levels are searched instead.
const JUMP_STEPS: usize = 4;
/// Flag bits packed into the low bits of the stored physical address.
pub(super) const FLAG_BITS: u64 = 0x7;

#[derive(Clone, Copy, Debug)]
struct Entry {
    start: u64,
    end: u64,
    /// Physical address with the flags in its low three bits: the state
    /// model only inserts mappings whose physical address is aligned to the
    /// granule, which is at least 4 KiB.
    phys_flags: u64,
}

/// An unused entry of a chunk: it never counts below an address other
/// than `u64::MAX`, and contains none (its end is below its start).
const VACANT: Entry = Entry {
    start: u64::MAX,
    end: 0,
    phys_flags: 0,
};

impl Entry {
    fn mapping(&self) -> Mapping {
        Mapping {
            start: self.start,
            end: self.end,
            phys: self.phys_flags & !FLAG_BITS,
            flags: (self.phys_flags & FLAG_BITS) as u32,
        }
    }

    #[inline(always)]
    fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr <= self.end
    }
}

/// One chunk slot: the next chunk's key, its entries in order, then
/// [`VACANT`] ones. Entries
/// whole (not starts apart from the rest): a lookup then loads all of the
/// slot's lines at once and needs nothing after its count, one dependent
/// memory access fewer, which measured faster than reading fewer lines.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Chunk {
    /// The key of the next chunk in the B-tree's order (`u64::MAX` past
    /// the last one, for a free slot, and inline). With it a directory
    /// answer is checked in place: the slot holds the greatest key at or
    /// below `addr` exactly when its key is at or below `addr` and the
    /// next key above it. MAP and UNMAP then find their chunk without a
    /// B-tree descent wherever the directory is right. In the chunk's own
    /// first line, where the check reads its key too (kept in an array of
    /// its own, it was one more cache miss per lookup in a large table).
    next_key: u64,
    entries: [Entry; CHUNK_CAPACITY],
}

const EMPTY_CHUNK: Chunk = Chunk {
    next_key: u64::MAX,
    entries: [VACANT; CHUNK_CAPACITY],
};

impl Default for Chunk {
    fn default() -> Self {
        EMPTY_CHUNK
    }
}

impl Chunk {
    fn entry(&self, i: usize) -> Entry {
        self.entries[i]
    }

    fn set(&mut self, i: usize, e: Entry) {
        self.entries[i] = e;
    }

    fn vacate(&mut self, r: std::ops::Range<usize>) {
        self.entries[r].fill(VACANT);
    }

    /// Moves the entries `lo..hi` of the first `len` to `removed`; returns
    /// how many are left.
    #[inline(always)]
    fn drain(&mut self, len: usize, lo: usize, hi: usize, removed: &mut Vec<Mapping>) -> usize {
        let len = len.min(CHUNK_CAPACITY);
        let hi = hi.min(len);
        let lo = lo.min(hi);
        removed.extend(self.entries[lo..hi].iter().map(Entry::mapping));
        // Entry by entry rather than `copy_within` and `fill`: a chunk is
        // at most 13 entries, and the `memmove` call those make was most of
        // an UNMAP on a small table.
        let left = len - (hi - lo);
        for i in lo..left {
            self.entries[i] = self.entries[i + (hi - lo)];
        }
        for e in &mut self.entries[left..len] {
            *e = VACANT;
        }
        left
    }
}

/// The chunk in `slot` of a slab's `blocks`, if the slot exists.
fn slot_mut(blocks: &mut [Vec<Chunk>], slot: u32) -> Option<&mut Chunk> {
    let s = slot as usize;
    blocks.get_mut(s / BLOCK_SLOTS)?.get_mut(s % BLOCK_SLOTS)
}

/// The entries in use of one chunk, read-only.
#[derive(Clone, Copy)]
struct View<'a> {
    chunk: &'a Chunk,
    len: usize,
}

impl<'a> View<'a> {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, i: usize) -> Option<Entry> {
        (i < self.len).then(|| self.chunk.entry(i))
    }

    fn first_start(&self) -> Option<u64> {
        (self.len > 0).then(|| self.chunk.entries[0].start)
    }

    /// The number of entries whose start satisfies `pred`, which holds
    /// for a prefix of them (they are sorted).
    fn partition_point(&self, mut pred: impl FnMut(&u64) -> bool) -> usize {
        self.chunk.entries[..self.len].partition_point(|e| pred(&e.start))
    }

    /// The entries `[lo, hi)` that `[start, end]` covers, when every
    /// mapping it affects lies in this view: the mapping that would be
    /// cut in two otherwise. `lo - 1` holds the last start below `start`,
    /// `hi - 1` the last start within the range.
    #[inline(always)]
    fn covered(&self, start: u64, end: u64) -> Result<(usize, usize), SplitError> {
        let lo = self.partition_point(|&s| s < start);
        // The usual UNMAP names one mapping exactly: it is then the only
        // one affected (mappings are disjoint), and none is split.
        if let Some(e) = self.get(lo) {
            if e.start == start && e.end == end {
                return Ok((lo, lo + 1));
            }
        }
        let hi = self.partition_point(|&s| s <= end);
        let cut = |e: Entry| {
            Err(SplitError {
                mapping: e.mapping(),
            })
        };
        if let Some(e) = lo.checked_sub(1).and_then(|i| self.get(i)) {
            if e.end >= start {
                return cut(e);
            }
        }
        if let Some(e) = hi.checked_sub(1).and_then(|i| self.get(i)) {
            if hi > lo && e.end > end {
                return cut(e);
            }
        }
        Ok((lo, hi))
    }

    fn iter(self) -> impl Iterator<Item = Entry> + 'a {
        (0..self.len).map(move |i| self.chunk.entry(i))
    }
}

/// How many entries of `chunk` (vacant ones included) start at or below
/// `addr`, without a branch per entry.
#[inline(always)]
fn count_starts_le(chunk: &Chunk, addr: u64) -> usize {
    chunk
        .entries
        .iter()
        .fold(0usize, |n, e| n + usize::from(e.start <= addr))
}

/// How many of `keys` are at or below `addr`, without a branch per key.
#[inline(always)]
fn count_le<const N: usize>(keys: &[u64; N], addr: u64) -> usize {
    keys.iter().fold(0usize, |n, &k| n + usize::from(k <= addr))
}

/// The bottom level of the directory: [`LEAF`] chunk keys and their
/// slots, and the first key of the next leaf, in one cache line.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Leaf {
    keys: [u64; LEAF],
    slots: [u32; LEAF],
    /// The next leaf's first key (`u64::MAX` for the last leaf): whether
    /// this leaf is the one for an address is then known from its own
    /// line, with no look at the levels above.
    fence: u64,
}

const EMPTY_LEAF: Leaf = Leaf {
    keys: [u64::MAX; LEAF],
    slots: [0; LEAF],
    fence: u64::MAX,
};

/// The lookup directory (see the module documentation). Unused key
/// positions hold `u64::MAX`.
#[derive(Clone, Debug, Default)]
struct Directory {
    /// Every chunk key known to the directory, in order, with its slot.
    leaves: Vec<Leaf>,
    /// `upper[0]` groups the first key of each leaf, `upper[i + 1]` the
    /// first key of each group of `upper[i]`; the last level is one group.
    /// Empty while there is at most one leaf.
    upper: Vec<Vec<[u64; GROUP]>>,
    /// Keys in `leaves`.
    len: usize,
    /// Changes since the last rebuild that the directory does not show.
    stale: usize,
    /// A jump table into the leaves for random lookups: `jump[b]` is the
    /// last leaf whose first key is at or below `jump_lo + (b <<
    /// jump_shift)`, as the leaves were when it was built. Only a guess:
    /// each answer is checked against the leaf's own first key and fence
    /// and the levels are searched where it is wrong or far off. Empty
    /// below [`JUMP_MIN_LEAVES`] leaves.
    jump: Vec<u32>,
    jump_lo: u64,
    jump_shift: u32,
}

impl Directory {
    /// The slot of the chunk whose key is the greatest at or below `addr`,
    /// as the directory last saw the table.
    #[inline(always)]
    fn search(&self, addr: u64) -> Option<u32> {
        let (_, leaf) = self.leaf_of(addr)?;
        let c = count_le(&leaf.keys, addr);
        leaf.slots.get(c.checked_sub(1)?).copied()
    }

    /// The bottom group [`Directory::search`] reads for `addr`, and its
    /// number, found through the jump table or the levels above it.
    #[inline(always)]
    fn leaf_of(&self, addr: u64) -> Option<(usize, &Leaf)> {
        let g = match self.jump_to(addr) {
            Some(g) => g,
            None => self.leaf_by_levels(addr)?,
        };
        self.leaves.get(g).map(|l| (g, l))
    }

    /// The number of the leaf [`Directory::leaf_of`] answers, through the
    /// levels alone.
    #[inline(always)]
    fn leaf_by_levels(&self, addr: u64) -> Option<usize> {
        let mut g = 0usize;
        for level in self.upper.iter().rev() {
            let c = count_le(level.get(g)?, addr);
            g = (g * GROUP + c).checked_sub(1)?;
        }
        Some(g)
    }

    /// The leaf whose first key is the greatest at or below `addr`, from
    /// the jump table and at most [`JUMP_STEPS`] leaves after its guess;
    /// `None` to search the levels instead. Exact whatever the jump table
    /// holds: the answer is checked against the leaf's first key and
    /// fence.
    #[inline(always)]
    fn jump_to(&self, addr: u64) -> Option<usize> {
        self.settle(self.jump_guess(addr)?, addr)
    }

    /// The jump table's guess for `addr`, unchecked (the leaves are not
    /// read: see [`OrderedTable::warm_directory`]).
    #[inline(always)]
    fn jump_guess(&self, addr: u64) -> Option<usize> {
        // Unused key positions hold u64::MAX and would count at the top
        // address: it is left to the levels, which leave it to the B-tree.
        if addr == u64::MAX {
            return None;
        }
        // Past the table's range (keys appended since it was built) the
        // levels know better.
        let b = addr.checked_sub(self.jump_lo)? >> self.jump_shift;
        let guess = *self.jump.get(usize::try_from(b).ok()?)?;
        Some(guess as usize)
    }

    /// The leaf for `addr` from a guess: settled from it, else searched
    /// for through the levels.
    #[inline(always)]
    fn settle_or_search(&self, guess: usize, addr: u64) -> Option<usize> {
        self.settle(guess, addr)
            .or_else(|| self.leaf_by_levels(addr))
    }

    /// From leaf `guess` on, the leaf that covers `addr`, if it is one of
    /// the next [`JUMP_STEPS`] leaves and `guess` starts at or below it.
    #[inline(always)]
    fn settle(&self, guess: usize, addr: u64) -> Option<usize> {
        if self.leaves.get(guess)?.keys[0] > addr {
            return None;
        }
        // Fences only grow from leaf to leaf, and the last is u64::MAX
        // (never reached: `addr` is below it), so the first leaf whose
        // fence is above `addr` is the answer.
        (guess..(guess + JUMP_STEPS).min(self.leaves.len())).find(|&g| self.leaves[g].fence > addr)
    }

    /// Builds the jump table over the leaves as they are (see `jump`):
    /// as many buckets as leaves, rounded up to a power of two, spread
    /// evenly from the first leaf's first key to the last's.
    fn build_jump(&mut self) {
        self.jump.clear();
        let n = self.leaves.len();
        if n < JUMP_MIN_LEAVES {
            return;
        }
        let first = |i: usize| self.leaves[i].keys[0];
        let (lo, hi) = (first(0), first(n - 1));
        let buckets = n.next_power_of_two();
        let span = hi.saturating_sub(lo);
        let mut shift = 0u32;
        while shift < 63 && (span >> shift) >= buckets as u64 {
            shift += 1;
        }
        let mut g = 0usize;
        let mut jump = std::mem::take(&mut self.jump);
        for b in 0..buckets {
            let start = u128::from(lo) + ((b as u128) << shift);
            while g + 1 < n && u128::from(first(g + 1)) <= start {
                g += 1;
            }
            jump.push(g as u32);
        }
        self.jump = jump;
        self.jump_lo = lo;
        self.jump_shift = shift;
    }

    /// The last key, if any.
    fn last_key(&self) -> Option<u64> {
        let i = self.len.checked_sub(1)?;
        self.leaves.get(i / LEAF).map(|l| l.keys[i % LEAF])
    }

    /// Adds a chunk above every key the directory holds.
    fn push(&mut self, key: u64, slot: u32) {
        let i = self.len % LEAF;
        if i == 0 {
            if let Some(prev) = self.leaves.last_mut() {
                prev.fence = key;
            }
            if self.leaves.len() == self.leaves.capacity() {
                // By an eighth, not double: a table filled in IOVA order
                // grows its directory here, and doubling left up to half
                // of it unused (about a byte per mapping at 1,000,000).
                let n = self.leaves.len();
                self.leaves.reserve_exact((n / 8).max(4));
            }
            self.leaves.push(EMPTY_LEAF);
        }
        if let Some(leaf) = self.leaves.last_mut() {
            leaf.keys[i] = key;
            leaf.slots[i] = slot;
        }
        self.len += 1;
        if i == 0 {
            // A new leaf: its key goes into the levels above.
            self.push_upper(key);
            // The jump table at every doubling: O(1) amortized too, and
            // keys above its range meanwhile take the levels.
            if self.leaves.len().is_power_of_two() {
                self.build_jump();
            }
        }
    }

    /// Rebuilds the directory from the chunks in key order.
    fn rebuild(&mut self, chunks: impl Iterator<Item = (u64, u32)>) {
        self.leaves.clear();
        self.len = 0;
        for (i, (key, slot)) in chunks.enumerate() {
            if i % LEAF == 0 {
                if let Some(prev) = self.leaves.last_mut() {
                    prev.fence = key;
                }
                self.leaves.push(EMPTY_LEAF);
            }
            if let Some(leaf) = self.leaves.last_mut() {
                leaf.keys[i % LEAF] = key;
                leaf.slots[i % LEAF] = slot;
            }
            self.len = i + 1;
        }
        self.rebuild_upper();
        self.build_jump();
        self.stale = 0;
    }

    /// Files the first key of the leaf just appended in the levels above:
    /// at the end of each level, a level at a time while it starts a new
    /// group there, so O(levels) (a rebuild of the levels for every new
    /// leaf made filling a large table in IOVA order quadratic).
    fn push_upper(&mut self, key: u64) {
        let n = self.leaves.len();
        if self.upper.is_empty() {
            // No levels while there was one leaf: the first two keys.
            self.rebuild_upper();
            return;
        }
        // The new key's index in the level it goes into.
        let mut i = n - 1;
        let mut level = 0;
        while let Some(groups) = self.upper.get_mut(level) {
            if i % GROUP != 0 {
                if let Some(g) = groups.get_mut(i / GROUP) {
                    g[i % GROUP] = key;
                }
                return;
            }
            let mut g = [u64::MAX; GROUP];
            g[0] = key;
            groups.push(g);
            i = groups.len() - 1;
            let first = groups[0][0];
            if level + 1 == self.upper.len() {
                // The top level had one group and has two: a level above
                // them, of their first keys.
                let mut top = [u64::MAX; GROUP];
                top[0] = first;
                top[1] = key;
                self.upper.push(vec![top]);
                return;
            }
            level += 1;
        }
    }

    /// Rebuilds the levels above the leaves in place: called for every
    /// rebuild and a table's second leaf, so it reuses the levels' buffers and
    /// allocates nothing once they are grown (a table that keeps emptying
    /// and refilling one chunk, as MAP+UNMAP pairs on an empty domain do,
    /// must not pay an allocation per pair).
    fn rebuild_upper(&mut self) {
        let mut level = 0;
        let mut n = self.leaves.len();
        while n > 1 {
            if self.upper.len() <= level {
                self.upper.push(Vec::new());
            }
            let (below, rest) = self.upper.split_at_mut(level);
            let groups = &mut rest[0];
            groups.clear();
            for c in 0..n.div_ceil(GROUP) {
                let mut g = [u64::MAX; GROUP];
                for (j, k) in g.iter_mut().enumerate().take(n - c * GROUP) {
                    let i = c * GROUP + j;
                    *k = match below.last() {
                        None => self.leaves[i].keys[0],
                        Some(prev) => prev[i][0],
                    };
                }
                groups.push(g);
            }
            n = groups.len();
            level += 1;
        }
        self.upper.truncate(level);
    }

    fn bytes(&self) -> usize {
        self.leaves.capacity() * size_of::<Leaf>()
            + self
                .upper
                .iter()
                .map(|l| l.capacity() * size_of::<[u64; GROUP]>())
                .sum::<usize>()
            + self.jump.capacity() * size_of::<u32>()
    }
}

/// The sorted, non-overlapping mappings of one domain.
#[derive(Clone, Default)]
pub(crate) struct OrderedTable {
    /// While the table is small (`!chunked`): its mappings, in order, then
    /// vacant entries. All vacant in the chunked form.
    small: Chunk,
    /// Whether the mappings live in the chunked form below (else in
    /// `small`, and the chunked form is empty).
    chunked: bool,
    /// Chunk key (the first start in the chunk) → slot: the authoritative
    /// order.
    index: BTreeMap<u64, u32>,
    /// The chunk slots, [`BLOCK_SLOTS`] per block.
    blocks: Vec<Vec<Chunk>>,
    /// Entries in use per slot (0 for a free slot).
    lens: Vec<u8>,
    /// Slots no chunk uses.
    free: Vec<u32>,
    /// The slot the last MAP or UNMAP found its chunk in (a hint, checked
    /// before use: see `chunk_at_recent`).
    recent: u32,
    dir: Directory,
    len: usize,
}

impl std::fmt::Debug for OrderedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderedTable")
            .field("len", &self.len)
            .field("chunked", &self.chunked)
            .field("chunks", &self.index.len())
            .field("slots", &self.lens.len())
            .field("directory_stale", &self.dir.stale)
            .finish_non_exhaustive()
    }
}

impl OrderedTable {
    /// An empty table.
    #[cfg(test)]
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no mapping.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline(always)]
    fn chunk(&self, slot: u32) -> Option<&Chunk> {
        let s = slot as usize;
        self.blocks.get(s / BLOCK_SLOTS)?.get(s % BLOCK_SLOTS)
    }

    fn slot_len(&self, slot: u32) -> usize {
        self.lens.get(slot as usize).map_or(0, |&n| usize::from(n))
    }

    /// The entries in use of `slot`, in order.
    fn entries(&self, slot: u32) -> View<'_> {
        View {
            chunk: self.chunk(slot).unwrap_or(&EMPTY_CHUNK),
            len: self.slot_len(slot),
        }
    }

    /// The inline mappings (none in the chunked form).
    fn small_entries(&self) -> View<'_> {
        View {
            chunk: &self.small,
            len: if self.chunked { 0 } else { self.len },
        }
    }

    /// A slot's chunk and length, for changes. Slots come from the table's
    /// own index, so they are in range.
    fn parts(&mut self, slot: u32) -> (&mut Chunk, &mut u8) {
        let s = slot as usize;
        (
            &mut self.blocks[s / BLOCK_SLOTS][s % BLOCK_SLOTS],
            &mut self.lens[s],
        )
    }

    /// The chunk whose key is the greatest at or below `addr`, as `(key,
    /// slot)`: the directory's answer where the next key confirms it,
    /// else the B-tree's.
    #[inline]
    fn chunk_at(&self, addr: u64) -> Option<(u64, u32)> {
        if let Some(slot) = self.dir.search(addr) {
            if let Some(key) = self.confirm(slot, addr) {
                return Some((key, slot));
            }
        }
        self.index.range(..=addr).next_back().map(|(&k, &s)| (k, s))
    }

    /// [`Self::chunk_at`] for a change, trying first the slot the last
    /// change worked in: an UNMAP of what was just mapped, or a driver's
    /// IOVA allocator handing out neighbouring addresses, then needs no
    /// directory search.
    #[inline]
    fn chunk_at_recent(&mut self, addr: u64) -> Option<(u64, u32)> {
        let recent = self.recent;
        if let Some(key) = self.confirm(recent, addr) {
            return Some((key, recent));
        }
        let direct = self
            .dir
            .search(addr)
            .and_then(|slot| Some((self.confirm(slot, addr)?, slot)));
        let found = direct.or_else(|| {
            // The directory did not know (or the address lies below every
            // chunk). A directory left stale by changes that then stopped
            // coming would send every such change to the B-tree for good:
            // each of them counts as a change it does not show, so that
            // once they have cost about as much as a rebuild, it is
            // rebuilt (which moves no slot).
            self.dir.stale += 1;
            let found = self.index.range(..=addr).next_back().map(|(&k, &s)| (k, s));
            self.maybe_rebuild();
            found
        });
        if let Some((_, slot)) = found {
            self.recent = slot;
        }
        found
    }

    /// The key of the chunk in `slot` if it is the chunk [`Self::chunk_at`]
    /// looks for: its key at or below `addr` and the next key above it.
    /// Exact for any slot number, so a stale directory answer or a stale
    /// recent slot is only a miss: a free slot holds no entries, and
    /// `u64::MAX` as the next key also stands for "none", so `addr ==
    /// u64::MAX` is left to the B-tree.
    #[inline(always)]
    fn confirm(&self, slot: u32, addr: u64) -> Option<u64> {
        let s = slot as usize;
        let (&n, c) = (self.lens.get(s)?, self.chunk(slot)?);
        let key = c.entries[0].start;
        (n > 0 && key <= addr && addr < c.next_key).then_some(key)
    }

    /// The next key of `slot` (`u64::MAX` for none).
    fn next_key_of(&self, slot: u32) -> u64 {
        self.chunk(slot).map_or(u64::MAX, |c| c.next_key)
    }

    fn set_next_key(&mut self, slot: u32, key: u64) {
        if let Some(c) = slot_mut(&mut self.blocks, slot) {
            c.next_key = key;
        }
    }

    /// Tells the chunk before `key` in the order that the next key is now
    /// `next` (after the chunk at `key` moved, came or went).
    fn relink_before(&mut self, key: u64, next: u64) {
        if let Some((_, &p)) = self.index.range(..key).next_back() {
            self.set_next_key(p, next);
        }
    }

    /// Rebuilds every next key from the B-tree (after slots were
    /// renumbered).
    fn relink_all(&mut self) {
        let (index, blocks) = (&self.index, &mut self.blocks);
        for c in blocks.iter_mut().flatten() {
            c.next_key = u64::MAX;
        }
        for ((_, &s), (&next, _)) in index.iter().zip(index.iter().skip(1)) {
            if let Some(c) = slot_mut(blocks, s) {
                c.next_key = next;
            }
        }
    }

    /// The first of two rounds that warm lookups of many addresses at once
    /// (see [`OrderedTable::warm_chunk`]): starts loading the directory
    /// leaf a lookup of `addr` likely reads (the jump table's guess, or the
    /// levels' answer), and returns its number for round two, which
    /// settles it. `None` for a table small enough to stay in cache.
    ///
    /// A lookup in a large table waits for two misses in turn (the leaf,
    /// then the slot's length and chunk), and a pass of requests
    /// served one after another waits for each request's in turn. Round
    /// one for every address of the pass, then round two, lets the memory
    /// system serve all of one round's misses together.
    pub fn warm_directory(&self, addr: u64) -> Option<u32> {
        if !self.chunked || self.index.len() < WARM_MIN_CHUNKS {
            return None;
        }
        // The jump table's guess, unchecked: checking it would wait for
        // the leaf this round only starts to load.
        let g = match self.dir.jump_guess(addr) {
            Some(g) => g,
            None => self.dir.leaf_by_levels(addr)?,
        };
        prefetch(self.dir.leaves.get(g)?);
        u32::try_from(g).ok()
    }

    /// The second round, once [`OrderedTable::warm_directory`] has
    /// returned `leaf` for `addr` (with no change to the table in
    /// between): starts loading the chunk a lookup of `addr` reads, every
    /// line of it (its next key in the first), and its slot's length. A
    /// `leaf` from elsewhere is only a useless hint. Returns the slot it
    /// warmed, for [`OrderedTable::hint_slot`].
    pub fn warm_chunk(&self, addr: u64, leaf: u32) -> Option<u32> {
        // Round one's leaf was a guess; the leaf's fence says whether it,
        // or one of the next few, is the one.
        let l = self
            .dir
            .settle_or_search(leaf as usize, addr)
            .and_then(|g| self.dir.leaves.get(g))?;
        let slot = *count_le(&l.keys, addr)
            .checked_sub(1)
            .and_then(|i| l.slots.get(i))?;
        if let Some(l) = self.lens.get(slot as usize) {
            prefetch(l);
        }
        if let Some(c) = self.chunk(slot) {
            prefetch_lines(c);
        }
        Some(slot)
    }

    /// Takes `slot` (from [`OrderedTable::warm_chunk`]) as the slot the
    /// next MAP or UNMAP tries first, before any directory search. Only a
    /// hint: it is checked as the last change's slot is.
    pub fn hint_slot(&mut self, slot: u32) {
        self.recent = slot;
    }

    /// The entry with the greatest start at or below `addr`.
    fn last_at_or_below(&self, addr: u64) -> Option<Entry> {
        let entries = if self.chunked {
            let (_, slot) = self.chunk_at(addr)?;
            self.entries(slot)
        } else {
            self.small_entries()
        };
        // A chunk's first start, its key, is <= addr, so this is >= 1 in
        // the chunked form; inline it may be 0.
        let n = entries.partition_point(|&s| s <= addr);
        entries.get(n.checked_sub(1)?)
    }

    /// The mapping containing `addr` in the chunk the directory points to,
    /// if there is one there.
    #[inline(always)]
    fn find_direct(&self, addr: u64) -> Option<Entry> {
        let chunk = self.chunk(self.dir.search(addr)?)?;
        // A branch-free count over the whole slot issues all of its cache
        // line loads at once, where a binary search waits for one miss
        // before it knows the next line to load. Vacant entries count only
        // at `u64::MAX`, where the pick is then vacant and the B-tree
        // answers.
        let n = count_starts_le(chunk, addr);
        let i = n.checked_sub(1)?;
        let e = chunk.entry(i.min(CHUNK_CAPACITY - 1));
        e.contains(addr).then_some(e)
    }

    /// The mapping that contains `addr`.
    #[inline]
    pub fn find(&self, addr: u64) -> Option<Mapping> {
        if !self.chunked {
            // The count over the whole chunk, as `find_direct`; vacant
            // entries count only at `u64::MAX`, hence the cap at `len`.
            let n = count_starts_le(&self.small, addr).min(self.len);
            let e = self.small.entry(n.checked_sub(1)?);
            return e.contains(addr).then(|| e.mapping());
        }
        if let Some(e) = self.find_direct(addr) {
            return Some(e.mapping());
        }
        // Unmapped, or the directory is stale here.
        let e = self.last_at_or_below(addr)?;
        (addr <= e.end).then(|| e.mapping())
    }

    /// The free IOVA around `[start, end]`, as `(lo, hi)`: no mapping
    /// intersects `[lo, hi]`, which contains `[start, end]` and reaches
    /// the mappings on either side (or the ends of the address space).
    /// `None` if a mapping intersects `[start, end]`. Requires `start <=
    /// end`. One search, as [`Self::try_insert`]'s, which it spares a
    /// MAP whose mapping waits in front of the table.
    #[inline]
    pub fn free_around(&mut self, start: u64, end: u64) -> Option<(u64, u64)> {
        if self.chunked {
            return self.free_around_chunked(start, end);
        }
        Self::free_in(self.small_entries(), u64::MAX, start, end)
    }

    /// [`Self::free_around`] on the chunked form (apart for the same
    /// reason as [`Self::remove_range_chunked`]).
    #[inline(never)]
    fn free_around_chunked(&mut self, start: u64, end: u64) -> Option<(u64, u64)> {
        match self.chunk_at_recent(end) {
            // Below every chunk: the first one bounds it.
            None => {
                let next = self.index.first_key_value().map_or(u64::MAX, |(&k, _)| k);
                Some((0, next.wrapping_sub(1).max(end)))
            }
            // The chunk's first mapping starts inside the range.
            Some((key, _)) if key > start => None,
            Some((_, slot)) => {
                Self::free_in(self.entries(slot), self.next_key_of(slot), start, end)
            }
        }
    }

    /// [`Self::free_around`] within `entries`, whose last mapping the one
    /// starting at `next_after` follows.
    #[inline(always)]
    fn free_in(entries: View<'_>, next_after: u64, start: u64, end: u64) -> Option<(u64, u64)> {
        let pos = entries.partition_point(|&s| s <= end);
        let lo = match pos.checked_sub(1).and_then(|i| entries.get(i)) {
            Some(e) if e.end >= start => return None,
            Some(e) => e.end + 1,
            None => 0,
        };
        // `u64::MAX` is both "no next mapping" and a mapping of the last
        // byte; taken as the latter, the gap is at worst a byte short.
        // Any next start lies above `end`.
        let next = entries.get(pos).map_or(next_after, |e| e.start);
        Some((lo, next.wrapping_sub(1).max(end)))
    }

    /// Whether any mapping intersects `[start, end]`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        // Mappings are disjoint and sorted, so the one with the greatest
        // start <= end is the only candidate that can reach back to `start`.
        self.last_at_or_below(end).is_some_and(|e| e.end >= start)
    }

    /// Inserts `e` at `pos` of a slot with room.
    fn insert_at(&mut self, slot: u32, pos: usize, e: Entry) {
        let (c, n) = self.parts(slot);
        let len = usize::from(*n).min(CHUNK_CAPACITY - 1);
        // Entry by entry, as in the inline form's insert: at most 15
        // entries move, and a `memmove` call was a tenth of a MAP+UNMAP
        // pair on a 10,000-mapping table.
        for i in (pos..len).rev() {
            c.entries[i + 1] = c.entries[i];
        }
        c.set(pos, e);
        *n += 1;
    }

    /// Moves the entries `lo..hi` of `slot` to `removed`.
    fn drain(&mut self, slot: u32, lo: usize, hi: usize, removed: &mut Vec<Mapping>) {
        let (c, n) = self.parts(slot);
        *n = c.drain(usize::from(*n), lo, hi, removed) as u8;
    }

    /// A free slot (a reused one, or a new one at the end of the slab).
    fn alloc_slot(&mut self) -> u32 {
        if let Some(s) = self.free.pop() {
            return s;
        }
        let s = self.lens.len();
        if s % BLOCK_SLOTS == 0 {
            self.blocks.push(Vec::new());
            if s > 0 {
                // A block at a time, as the slab grows.
                self.lens.reserve_exact(BLOCK_SLOTS);
            }
        }
        if let Some(b) = self.blocks.last_mut() {
            // Grows 4, 8, .. 64 slots: one block at most.
            b.push(EMPTY_CHUNK);
        }
        self.lens.push(0);
        s as u32
    }

    /// Returns `slot` to the free list, vacant, so that a stale directory
    /// entry pointing at it finds nothing.
    /// The caller has taken it out of the B-tree and relinked its
    /// predecessor.
    fn free_slot(&mut self, slot: u32) {
        let (c, n) = self.parts(slot);
        *c = EMPTY_CHUNK;
        *n = 0;
        self.free.push(slot);
    }

    /// A new chunk holding `e`, keyed `e.start`.
    fn new_chunk(&mut self, e: Entry) {
        let s = self.alloc_slot();
        self.insert_at(s, 0, e);
        self.index.insert(e.start, s);
        let next = self
            .index
            .range((Bound::Excluded(e.start), Bound::Unbounded))
            .next()
            .map_or(u64::MAX, |(&k, _)| k);
        self.set_next_key(s, next);
        self.relink_before(e.start, e.start);
        // Appended above every other chunk (ascending MAPs): the directory
        // takes it as it comes. Anywhere else it is stale until rebuilt.
        let last = self
            .index
            .last_key_value()
            .is_some_and(|(&k, _)| k == e.start);
        if last && self.dir.last_key().is_none_or(|k| k < e.start) {
            self.dir.push(e.start, s);
        } else {
            self.dir.stale += 1;
        }
    }

    /// Puts `e` first in the chunk keyed `key` (which has room), re-keying
    /// it by `e.start`.
    fn prepend(&mut self, key: u64, slot: u32, e: Entry) {
        self.insert_at(slot, 0, e);
        self.index.remove(&key);
        self.index.insert(e.start, slot);
        self.relink_before(e.start, e.start);
        self.dir.stale += 1;
    }

    /// Most mappings an ascending or descending run of MAPs puts in a
    /// chunk before it starts a new one: all it holds while the table
    /// stays in cache, one fewer past that ([`WARM_MIN_CHUNKS`]).
    ///
    /// Why a free entry: a later MAP between two mappings of a full chunk
    /// splits it into two half-full ones, and MAP+UNMAP pairs at random
    /// over a table filled in order end with every chunk split, the table
    /// spread over twice the lines and pages. Past the caches a pair pays
    /// for those (1,000,000 mappings: 340 → 295 ns a pair once every chunk
    /// was split, and no split to pay for on the way there), where in
    /// cache it pays rather for the entries each MAP and UNMAP moves
    /// (10,000 and 100,000 mappings ran 10-15% slower with fuller chunks).
    fn run_fill(&self) -> usize {
        if self.index.len() < WARM_MIN_CHUNKS {
            CHUNK_CAPACITY
        } else {
            CHUNK_CAPACITY - 1
        }
    }

    /// Rebuilds the directory once enough changes have left it stale:
    /// every sixteenth chunk changed costs one rebuild, O(1) per change
    /// amortized.
    fn maybe_rebuild(&mut self) {
        if self.dir.stale > 4 + self.index.len() / 16 {
            self.dir.rebuild(self.index.iter().map(|(&k, &s)| (k, s)));
        }
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
        if !self.chunked {
            let entries = self.small_entries();
            let pos = entries.partition_point(|&s| s <= m.end);
            // The last mapping starting at or below m.end: it intersects
            // m exactly when it reaches m.start.
            if pos
                .checked_sub(1)
                .and_then(|i| entries.get(i))
                .is_some_and(|e| e.end >= m.start)
            {
                return false;
            }
            if self.len < CHUNK_CAPACITY {
                let n = self.len;
                // Entry by entry, and the new one field by field from
                // registers: a `memmove` call and a 16-byte reload of the
                // entry from the stack (which stalls on store forwarding)
                // were most of an inline MAP's time.
                for i in (pos..n).rev() {
                    self.small.entries[i + 1] = self.small.entries[i];
                }
                let slot = &mut self.small.entries[pos];
                slot.start = m.start;
                slot.end = m.end;
                slot.phys_flags = entry.phys_flags;
                self.len += 1;
                return true;
            }
            self.move_into_chunks();
        }
        self.try_insert_chunked(m, entry)
    }

    /// [`Self::try_insert`] on the chunked form (apart for the same reason
    /// as [`Self::remove_range_chunked`]).
    #[inline(never)]
    fn try_insert_chunked(&mut self, m: Mapping, entry: Entry) -> bool {
        // The chunk holding the last start <= m.end. If its key lies above
        // m.start, its first mapping starts inside [start, end]: overlap.
        // Otherwise it is also the chunk m belongs in.
        let Some((key, slot)) = self.chunk_at_recent(m.end) else {
            // Below every chunk (or empty): first in the first chunk, whose
            // key moves down, or a new chunk.
            match self.index.first_key_value().map(|(&k, &s)| (k, s)) {
                Some((k, s)) if self.slot_len(s) < self.run_fill() => self.prepend(k, s, entry),
                _ => self.new_chunk(entry),
            }
            self.len += 1;
            self.maybe_rebuild();
            return true;
        };
        if key > m.start {
            return false;
        }
        let entries = self.entries(slot);
        let n = entries.len();
        let pos = entries.partition_point(|&s| s <= m.end);
        // `pos >= 1`: the chunk's first start is its key, <= m.start.
        let before = pos.checked_sub(1).and_then(|i| entries.get(i));
        if before.is_none_or(|e| e.end >= m.start) {
            return false;
        }
        self.len += 1;
        // Past the last chunk's last mapping (ascending MAPs), a new chunk
        // once this one holds what an ascending run leaves in it.
        let appended = pos == n && n >= self.run_fill() && self.next_key_of(slot) == u64::MAX;
        if n < CHUNK_CAPACITY && !appended {
            self.insert_at(slot, pos, entry);
            return true;
        }
        if pos == n {
            // Past the end of a full chunk: first in the next chunk if it
            // has room (its key moves down to m.start, which is still above
            // this chunk's last mapping), else a new chunk, so that
            // ascending inserts leave full chunks and no run of inserts
            // leaves one small chunk per mapping.
            let next = self
                .index
                .range((Bound::Excluded(key), Bound::Unbounded))
                .next()
                .map(|(&k, &s)| (k, s));
            match next {
                Some((k, s)) if self.slot_len(s) < CHUNK_CAPACITY => self.prepend(k, s, entry),
                _ => self.new_chunk(entry),
            }
            self.maybe_rebuild();
            return true;
        }
        // Split in two halves, then insert.
        const HALF: usize = CHUNK_CAPACITY / 2;
        let right = self.alloc_slot();
        let upper = {
            let (c, len) = self.parts(slot);
            let upper = *c;
            c.vacate(HALF..CHUNK_CAPACITY);
            *len = HALF as u8;
            upper
        };
        {
            let (c, len) = self.parts(right);
            c.entries[..CHUNK_CAPACITY - HALF].copy_from_slice(&upper.entries[HALF..]);
            *len = (CHUNK_CAPACITY - HALF) as u8;
        }
        if pos <= HALF {
            self.insert_at(slot, pos, entry);
        } else {
            self.insert_at(right, pos - HALF, entry);
        }
        let right_key = self.entries(right).first_start().unwrap_or(m.start);
        self.index.insert(right_key, right);
        self.set_next_key(right, self.next_key_of(slot));
        self.set_next_key(slot, right_key);
        self.dir.stale += 1;
        self.maybe_rebuild();
        true
    }

    /// `MappingTable::remove_range` on the ordered mappings: all or
    /// nothing, the removed ones appended in ascending order.
    pub fn remove_range(
        &mut self,
        start: u64,
        end: u64,
        removed: &mut Vec<Mapping>,
    ) -> Result<(), SplitError> {
        if !self.chunked {
            return self.remove_range_small(start, end, removed);
        }
        self.remove_range_chunked(start, end, removed)
    }

    /// [`Self::remove_range`] on the chunked form. Apart, so that the
    /// inline form's UNMAP (most domains') does not set up the stack frame
    /// of everything inlined here.
    #[inline(never)]
    fn remove_range_chunked(
        &mut self,
        start: u64,
        end: u64,
        removed: &mut Vec<Mapping>,
    ) -> Result<(), SplitError> {
        let r = self.remove_range_inner(start, end, removed);
        self.maybe_compact();
        self.maybe_rebuild();
        // (Compaction may have emptied it into the inline form already.)
        if self.chunked && self.len <= SMALL_BACK {
            self.move_inline();
        }
        r
    }

    /// [`Self::remove_range`] on the inline mappings.
    fn remove_range_small(
        &mut self,
        start: u64,
        end: u64,
        removed: &mut Vec<Mapping>,
    ) -> Result<(), SplitError> {
        let (lo, hi) = self.small_entries().covered(start, end)?;
        if lo < hi {
            self.len = self.small.drain(self.len, lo, hi, removed);
        }
        Ok(())
    }

    /// Moves the inline mappings (a full chunk of them) into the chunked
    /// form: one chunk, filed and shown by the directory.
    fn move_into_chunks(&mut self) {
        debug_assert!(!self.chunked && self.index.is_empty());
        self.chunked = true;
        if self.len == 0 {
            return;
        }
        let slot = self.alloc_slot();
        let (small, len) = (self.small, self.len as u8);
        let (c, n) = self.parts(slot);
        *c = small;
        *n = len;
        self.index.insert(self.small.entry(0).start, slot);
        self.small = EMPTY_CHUNK;
        self.dir.rebuild(self.index.iter().map(|(&k, &s)| (k, s)));
    }

    /// Moves the mappings (at most a chunk of them) back inline and lets
    /// the chunked form's memory go.
    fn move_inline(&mut self) {
        debug_assert!(self.chunked && self.len <= CHUNK_CAPACITY);
        let mut small = EMPTY_CHUNK;
        for (i, e) in self
            .index
            .values()
            .flat_map(|&s| self.entries(s).iter())
            .enumerate()
        {
            small.set(i, e);
        }
        let len = self.len;
        *self = OrderedTable {
            small,
            len,
            ..OrderedTable::default()
        };
    }

    fn remove_range_inner(
        &mut self,
        start: u64,
        end: u64,
        removed: &mut Vec<Mapping>,
    ) -> Result<(), SplitError> {
        // Fast path: every affected mapping lies in the chunk that holds
        // `start` and the range ends before that chunk does. One descent.
        if let Some((key, slot)) = self.chunk_at_recent(start) {
            let chunk = self.entries(slot);
            // The range ends in this chunk when an entry of it starts past
            // `end`, or when no later chunk starts at or before `end` (the
            // usual UNMAP of the chunk's last mapping; the B-tree is asked
            // only when the next key does not say so).
            let ends_here = chunk.partition_point(|&s| s <= end) < chunk.len()
                || self.next_key_of(slot) > end
                || self
                    .index
                    .range((Bound::Excluded(key), Bound::Included(end)))
                    .next()
                    .is_none();
            if ends_here {
                let (lo, hi) = chunk.covered(start, end)?;
                if lo < hi {
                    self.drain(slot, lo, hi, removed);
                    self.len -= hi - lo;
                    if lo == 0 || self.slot_len(slot) < CHUNK_MIN {
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
        let first_key = match self.index.range(..=start).next_back() {
            Some((&k, &slot)) => {
                let chunk = self.entries(slot);
                let i = chunk.partition_point(|&s| s <= start);
                if let Some(e) = i.checked_sub(1).and_then(|i| chunk.get(i)) {
                    if e.start < start && e.end >= start {
                        return Err(SplitError {
                            mapping: e.mapping(),
                        });
                    }
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
        let touched: Vec<(u64, u32)> = self
            .index
            .range(first_key..=end)
            .map(|(&k, &s)| (k, s))
            .collect();
        let mut rekey: Vec<u64> = Vec::new();
        for (key, slot) in touched {
            let chunk = self.entries(slot);
            let lo = chunk.partition_point(|&s| s < start);
            let hi = chunk.partition_point(|&s| s <= end);
            if lo < hi {
                self.drain(slot, lo, hi, removed);
                if lo == 0 || self.slot_len(slot) < CHUNK_MIN {
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

    /// Re-files the chunk keyed `key` after removals: freed if empty,
    /// re-keyed by its new first start, merged if underfull.
    fn rekey(&mut self, key: u64) {
        let Some(slot) = self.index.remove(&key) else {
            return;
        };
        let Some(first) = self.entries(slot).first_start() else {
            let next = self.next_key_of(slot);
            self.relink_before(key, next);
            self.free_slot(slot);
            if self.index.is_empty() {
                // The table is empty: so is the directory, with no rebuild
                // (MAP+UNMAP pairs on an empty domain come here every pair).
                self.dir.leaves.clear();
                self.dir.len = 0;
                self.dir.stale = 0;
                self.dir.rebuild_upper();
            } else {
                self.dir.stale += 1;
            }
            return;
        };
        self.index.insert(first, slot);
        if first != key {
            self.relink_before(first, first);
            self.dir.stale += 1;
        }
        self.merge_small_at(first);
    }

    /// Appends the entries of `src` to `dst` (which has room) and frees
    /// `src`.
    fn merge_slots(&mut self, dst: u32, src: u32) {
        let n = self.slot_len(src);
        let moved = self.chunk(src).copied().unwrap_or(EMPTY_CHUNK);
        let (c, len) = self.parts(dst);
        let at = usize::from(*len);
        c.entries[at..at + n].copy_from_slice(&moved.entries[..n]);
        *len += n as u8;
        // `dst` comes right before `src` (both callers merge neighbours).
        self.set_next_key(dst, self.next_key_of(src));
        self.free_slot(src);
        self.dir.stale += 1;
    }

    /// Merges the chunk keyed `key` with its successor when either is
    /// underfull and both fit in one, or else into its predecessor when it
    /// is underfull and fits, bounding the number of chunks by about
    /// `len / CHUNK_MIN`.
    fn merge_small_at(&mut self, key: u64) {
        let Some(&slot) = self.index.get(&key) else {
            return;
        };
        let ll = self.slot_len(slot);
        let right = self
            .index
            .range((Bound::Excluded(key), Bound::Unbounded))
            .next()
            .map(|(&k, &s)| (k, s));
        if let Some((rk, rs)) = right {
            let rl = self.slot_len(rs);
            if (ll < CHUNK_MIN || rl < CHUNK_MIN) && ll + rl <= CHUNK_CAPACITY {
                self.index.remove(&rk);
                self.merge_slots(slot, rs);
                return;
            }
        }
        if ll < CHUNK_MIN {
            let left = self.index.range(..key).next_back().map(|(_, &s)| s);
            if let Some(ls) = left {
                if self.slot_len(ls) + ll <= CHUNK_CAPACITY {
                    self.index.remove(&key);
                    self.merge_slots(ls, slot);
                }
            }
        }
    }

    /// Gives back the slab's free tail once most slots are free: the
    /// chunks in the upper slots move down into free ones, so that a table
    /// that grew and then shrank holds memory for what it holds now.
    fn maybe_compact(&mut self) {
        let total = self.lens.len();
        if self.free.len() < BLOCK_SLOTS || self.free.len() * 2 < total {
            return;
        }
        let live = self.index.len();
        if live == 0 {
            self.clear();
            return;
        }
        let mut low: Vec<u32> = self
            .free
            .iter()
            .copied()
            .filter(|&s| (s as usize) < live)
            .collect();
        for slot in self.index.values_mut() {
            let from = *slot as usize;
            if from < live {
                continue;
            }
            // As many used slots lie at or above `live` as free ones below.
            let Some(to) = low.pop() else { break };
            let to_u = to as usize;
            let chunk = self.blocks[from / BLOCK_SLOTS][from % BLOCK_SLOTS];
            self.blocks[to_u / BLOCK_SLOTS][to_u % BLOCK_SLOTS] = chunk;
            self.lens[to_u] = self.lens[from];
            *slot = to;
        }
        self.lens.truncate(live);
        self.lens.shrink_to_fit();
        self.blocks.truncate(live.div_ceil(BLOCK_SLOTS));
        if let Some(b) = self.blocks.last_mut() {
            b.truncate(live - (live - 1) / BLOCK_SLOTS * BLOCK_SLOTS);
            b.shrink_to_fit();
        }
        self.blocks.shrink_to_fit();
        self.free = Vec::new();
        // Every moved chunk changed slot.
        self.relink_all();
        self.dir.rebuild(self.index.iter().map(|(&k, &s)| (k, s)));
    }

    /// Removes every mapping.
    pub fn clear(&mut self) {
        *self = OrderedTable::default();
    }

    /// All mappings in ascending IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = Mapping> + '_ {
        // One of the two is empty.
        self.small_entries()
            .iter()
            .chain(self.index.values().flat_map(|&s| self.entries(s).iter()))
            .map(|e| e.mapping())
    }

    /// Heap bytes held by the table's arrays: the chunk slab (used and
    /// free slots) and the directory. The B-tree's nodes (about one byte
    /// per mapping) are not counted; a counting allocator sees them.
    pub fn chunk_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.capacity() * size_of::<Chunk>())
            .sum::<usize>()
            + self.blocks.capacity() * size_of::<Vec<Chunk>>()
            + self.lens.capacity()
            + self.free.capacity() * size_of::<u32>()
            + self.dir.bytes()
    }

    /// Chunks in the table and how many changes the directory does not
    /// show yet (for tests and benchmarks).
    #[cfg(any(test, feature = "test-utils"))]
    pub fn chunk_stats(&self) -> (usize, usize) {
        (self.index.len(), self.dir.stale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    impl OrderedTable {
        fn insert(&mut self, m: Mapping) {
            assert!(self.try_insert(m), "insert of an overlapping mapping");
        }

        /// Panics unless every chunk is keyed by its first start and knows
        /// the next key in the B-tree's order, and free slots are empty.
        fn check_links(&self) {
            let order: Vec<(u64, u32)> = self.index.iter().map(|(&k, &s)| (k, s)).collect();
            for (i, &(k, s)) in order.iter().enumerate() {
                assert_eq!(
                    self.entries(s).first_start(),
                    Some(k),
                    "slot {s} keyed by its first start"
                );
                let next = order.get(i + 1).map_or(u64::MAX, |&(nk, _)| nk);
                assert_eq!(self.next_key_of(s), next, "next key of slot {s}");
            }
            // Stale or not, the directory's leaves are fenced by the
            // next leaf's first key, the last by u64::MAX.
            let leaves = &self.dir.leaves;
            for (g, l) in leaves.iter().enumerate() {
                let next = leaves.get(g + 1).map_or(u64::MAX, |n| n.keys[0]);
                assert_eq!(l.fence, next, "fence of leaf {g}");
            }
            for &f in &self.free {
                assert_eq!(self.slot_len(f), 0, "free slot {f} is empty");
                assert_eq!(self.next_key_of(f), u64::MAX, "free slot {f} has no next");
            }
        }
    }

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
        let mut t = OrderedTable::new();
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
        let mut t = OrderedTable::new();
        t.insert(m(0, 0x9fff));
        let mut out = vec![];
        assert!(t.remove_range(0, 0x4fff, &mut out).is_err());
        assert!(t.remove_range(0x1000, 0x9fff, &mut out).is_err());
        assert_eq!(t.len(), 1);
        assert!(out.is_empty());
    }

    #[test]
    fn ascending_inserts_fill_chunks() {
        let mut t = OrderedTable::new();
        for i in 0..(CHUNK_CAPACITY as u64 * 10) {
            t.insert(m(i * 0x2000, i * 0x2000 + 0xfff));
        }
        assert_eq!(t.index.len(), 10);
        assert!(t.index.values().all(|&s| t.slot_len(s) == CHUNK_CAPACITY));
    }

    /// Per chunk in key order, how many mappings it holds.
    fn fills(t: &OrderedTable) -> Vec<usize> {
        t.index.values().map(|&s| t.slot_len(s)).collect()
    }

    #[test]
    fn runs_of_maps_past_the_caches_leave_a_free_entry_so_a_map_between_does_not_split() {
        let page = |i: u64| m(i * 0x2000, i * 0x2000 + 0xfff);
        let between = |i: u64| m(i * 0x2000 + 0x1000, i * 0x2000 + 0x1fff);
        let past = 200 * CHUNK_CAPACITY as u64;
        let n = (WARM_MIN_CHUNKS * CHUNK_CAPACITY) as u64 + past;
        // Ascending: full chunks while the table stays in cache, one free
        // entry in each after that.
        let mut t = OrderedTable::new();
        for i in 0..n {
            t.insert(page(i));
        }
        // The chunk that reaches the bound is the first left short.
        let full = WARM_MIN_CHUNKS - 1;
        let f = fills(&t);
        let (last, f) = f.split_last().unwrap();
        assert!(f[..full].iter().all(|&k| k == CHUNK_CAPACITY));
        assert!(f[full..].iter().all(|&k| k == CHUNK_CAPACITY - 1));
        assert!(*last < CHUNK_CAPACITY);
        // A MAP between two mappings of each such chunk fills it: no split.
        let chunks = t.index.len();
        let firsts: Vec<u64> = t.index.keys().skip(full).copied().collect();
        for &k in &firsts {
            assert!(t.try_insert(between(k / 0x2000)));
        }
        assert_eq!(t.index.len(), chunks, "no chunk split");
        let f = fills(&t);
        assert!(f[full..chunks - 1].iter().all(|&k| k == CHUNK_CAPACITY));
        // And a chunk of the in-cache part splits as before.
        assert!(t.try_insert(between(0)));
        assert_eq!(t.index.len(), chunks + 1);
        t.check_links();
        // Descending: the same at the bottom of the table.
        let mut t = OrderedTable::new();
        for i in (0..n).rev() {
            t.insert(page(i));
        }
        let f = fills(&t);
        let (low, high) = f.split_at(f.len() - full);
        assert!(high.iter().all(|&k| k == CHUNK_CAPACITY));
        assert!(low[1..].iter().all(|&k| k == CHUNK_CAPACITY - 1));
        assert!(low[0] < CHUNK_CAPACITY);
        t.check_links();
        assert_eq!(t.len(), n as usize);
    }

    #[test]
    fn hostile_unmap_pattern_keeps_chunk_count_bounded() {
        let mut t = OrderedTable::new();
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
        assert!(t.index.len() <= 128 / 2 + 1, "{} chunks", t.index.len());
        t.check_links();
    }

    /// Every address of `[0, pages * 0x1000)` (at a few offsets per page)
    /// finds what the model holds.
    fn check_find(t: &OrderedTable, model: &BTreeMap<u64, Mapping>, pages: u64) {
        for p in 0..pages {
            for off in [0u64, 0x7ff, 0xfff] {
                let a = p * 0x1000 + off;
                let expect = model
                    .range(..=a)
                    .next_back()
                    .map(|(_, m)| *m)
                    .filter(|m| a <= m.end);
                assert_eq!(t.find(a), expect, "find({a:#x})");
            }
        }
    }

    #[test]
    fn ascending_inserts_keep_the_directory_fresh_and_the_table_small() {
        let mut t = OrderedTable::new();
        let n = 100_000u64;
        for i in 0..n {
            t.insert(m(i * 0x2000, i * 0x2000 + 0xfff));
        }
        let (chunks, stale) = t.chunk_stats();
        assert_eq!(chunks, (n as usize).div_ceil(CHUNK_CAPACITY));
        assert_eq!(stale, 0);
        // 24 bytes per mapping in full chunks, plus the directory.
        assert!(
            t.chunk_bytes() as u64 <= n * 27,
            "{} bytes",
            t.chunk_bytes()
        );
        for i in (0..n).step_by(97) {
            let a = i * 0x2000 + 0x800;
            assert_eq!(
                t.find_direct(a).map(|e| e.mapping()),
                Some(m(i * 0x2000, i * 0x2000 + 0xfff))
            );
            assert!(t.find_direct(a + 0x1000).is_none());
            assert_eq!(t.find(a + 0x1000), None);
        }
    }

    #[test]
    fn stale_directory_still_finds_every_mapping() {
        // Ascending, then a MAP between every pair: every chunk splits,
        // keys move, and lookups go wherever the directory leads.
        let mut t = OrderedTable::new();
        let mut model = BTreeMap::new();
        let n = 2_000u64;
        for i in 0..n {
            let x = m(i * 0x2000, i * 0x2000 + 0xfff);
            t.insert(x);
            model.insert(x.start, x);
        }
        for i in (0..n).rev().step_by(3) {
            let x = m(i * 0x2000 + 0x1000, i * 0x2000 + 0x1fff);
            t.insert(x);
            model.insert(x.start, x);
        }
        let mut out = vec![];
        for i in (0..n).step_by(5) {
            t.remove_range(i * 0x2000, i * 0x2000 + 0xfff, &mut out)
                .unwrap();
            model.remove(&(i * 0x2000));
        }
        t.check_links();
        check_find(&t, &model, 2 * n + 2);
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            model.values().copied().collect::<Vec<_>>()
        );
    }

    #[test]
    fn appended_leaves_file_their_keys_in_the_levels_as_a_rebuild_does() {
        let mut d = Directory::default();
        // Past 16 * 16 leaves: three levels, each grown at its end.
        for k in 0..(LEAF * GROUP * GROUP * 2 + 3) as u64 {
            d.push(k * 0x1000, k as u32);
            let mut fresh = d.clone();
            fresh.rebuild_upper();
            assert_eq!(d.upper, fresh.upper, "after {} keys", k + 1);
        }
        assert_eq!(d.upper.len(), 3);
    }

    #[test]
    fn a_directory_left_stale_is_rebuilt_once_changes_pay_for_its_misses() {
        let page = |i: u64| m(i * 0x2000, i * 0x2000 + 0xfff);
        let between = |i: u64| m(i * 0x2000 + 0x1000, i * 0x2000 + 0x1fff);
        let mut t = OrderedTable::new();
        let n = 20_000u64;
        for i in 0..n {
            t.insert(page(i));
        }
        let (chunks, stale) = t.chunk_stats();
        assert_eq!((chunks, stale), ((n as usize).div_ceil(CHUNK_CAPACITY), 0));
        // Twenty splits: too few for a rebuild, so the directory does not
        // know the twenty right halves.
        let cap = CHUNK_CAPACITY as u64;
        for c in 0..20 {
            assert!(t.try_insert(between(c * 10 * cap)));
        }
        assert_eq!(t.chunk_stats(), (chunks + 20, 20));
        // MAP+UNMAP pairs in those right halves: each MAP asks the B-tree
        // and counts, until a rebuild; after it the directory is right.
        let mut out = vec![];
        let mut rebuilt_after = None;
        for round in 0..100u64 {
            let c = round % 20;
            let i = c * 10 * cap + cap - 2;
            assert!(t.try_insert(between(i)));
            t.remove_range(i * 0x2000 + 0x1000, i * 0x2000 + 0x1fff, &mut out)
                .unwrap();
            if t.chunk_stats().1 == 0 && rebuilt_after.is_none() {
                rebuilt_after = Some(round + 1);
            }
        }
        // A rebuild past 4 + chunks / 16 changes the directory does not
        // show: 20 splits, then one a pair.
        let due = 4 + (chunks as u64 + 20) / 16 + 1;
        assert_eq!(rebuilt_after, Some(due - 20));
        assert_eq!(t.chunk_stats(), (chunks + 20, 0), "no miss once rebuilt");
        for c in 0..20 {
            let i = c * 10 * cap + cap - 2;
            assert_eq!(
                t.find_direct(i * 0x2000 + 8).map(|e| e.mapping()),
                Some(page(i))
            );
        }
        t.check_links();
        assert_eq!(t.len(), n as usize + 20);
    }

    #[test]
    fn warming_skips_a_table_that_stays_in_cache_and_names_the_leaf_a_lookup_settles_on() {
        let mut t = OrderedTable::new();
        for i in 0..1_000u64 {
            t.insert(m(i * 0x2000, i * 0x2000 + 0xfff));
        }
        assert_eq!(
            t.warm_directory(0x2000),
            None,
            "a small table is not warmed"
        );
        // Ascending inserts: full chunks and a fresh directory.
        let n = (WARM_MIN_CHUNKS * CHUNK_CAPACITY) as u64;
        for i in 1_000..n {
            t.insert(m(i * 0x2000, i * 0x2000 + 0xfff));
        }
        assert!(t.index.len() >= WARM_MIN_CHUNKS);
        let before: Vec<Mapping> = t.iter().collect();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut addrs = vec![0, 0xfff, 0x1000, u64::MAX, (n - 1) * 0x2000, n * 0x2000];
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            addrs.push(x % (n * 0x2000 + 0x10_0000));
        }
        for a in addrs {
            let Some(leaf) = t.warm_directory(a) else {
                // Unused directory positions hold u64::MAX: the top address
                // is left to the B-tree, warmed or not.
                assert_eq!(a, u64::MAX, "a large table is warmed at {a:#x}");
                continue;
            };
            // Round one names the leaf holding the slot of the chunk a
            // lookup finds, or one a few leaves short of it that round two
            // settles from.
            let (_, slot) = t.chunk_at(a).expect("every address is above the first key");
            let settled = t
                .dir
                .settle_or_search(leaf as usize, a)
                .expect("round two finds the leaf");
            assert!(
                t.dir.leaves[settled].slots.contains(&slot),
                "leaf {settled} (guess {leaf}) for {a:#x} holds slot {slot}"
            );
            t.warm_chunk(a, leaf);
            // A wrong or out-of-range leaf is only a useless hint.
            t.warm_chunk(a, 0);
            t.warm_chunk(a, u32::MAX);
        }
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            before,
            "warming changes nothing"
        );
        t.check_links();
    }

    #[test]
    fn the_jump_table_answers_as_the_levels_do_for_any_key_layout() {
        let layouts: Vec<(&str, Vec<u64>)> = vec![
            (
                "even",
                (0..5_000u64)
                    .map(|i| 0x1_0000_0000 + i * 0x20_000)
                    .collect(),
            ),
            (
                // Most keys packed at the bottom, a few spread to the top:
                // most buckets hold nothing, one holds nearly everything.
                "clustered",
                (0..4_000u64)
                    .map(|i| i * 0x1000)
                    .chain((1..64u64).map(|i| i << 57))
                    .collect(),
            ),
            (
                "top of the space",
                (0..3_000u64)
                    .map(|i| u64::MAX - (3_000 - i) * 0x1000)
                    .collect(),
            ),
        ];
        for (name, keys) in layouts {
            let mut d = Directory::default();
            d.rebuild(keys.iter().enumerate().map(|(i, &k)| (k, i as u32)));
            assert!(!d.jump.is_empty(), "{name}: a jump table");
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            let mut probes: Vec<u64> = vec![0, 1, u64::MAX, u64::MAX - 1];
            for &k in keys.iter().step_by(7) {
                probes.extend([k.wrapping_sub(1), k, k.saturating_add(1)]);
            }
            for _ in 0..20_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                probes.push(x);
                let span = (keys[keys.len() - 1] - keys[0]).saturating_add(0x10_0000);
                probes.push(keys[0].saturating_add(x % span));
            }
            let mut jumped = 0;
            for a in probes {
                if let Some(g) = d.jump_to(a) {
                    jumped += 1;
                    assert_eq!(Some(g), d.leaf_by_levels(a), "{name}: leaf for {a:#x}");
                }
                // Whichever way, the search finds the greatest key at or
                // below the address.
                let want = keys.partition_point(|&k| k <= a).checked_sub(1);
                if a != u64::MAX {
                    assert_eq!(
                        d.search(a),
                        want.map(|i| i as u32),
                        "{name}: search({a:#x})"
                    );
                }
            }
            assert!(jumped > 0, "{name}: the jump table answered some lookups");
        }
    }

    #[test]
    fn a_recent_slot_is_used_only_for_addresses_its_chunk_holds() {
        // Two full chunks: [0, 16) and [16, 32) in units of 0x2000.
        let mut t = OrderedTable::new();
        let mut model = BTreeMap::new();
        for i in 0..(2 * CHUNK_CAPACITY as u64) {
            let x = m(i * 0x2000, i * 0x2000 + 0xfff);
            t.insert(x);
            model.insert(x.start, x);
        }
        let mut out = vec![];
        // The low chunk becomes the recent one; then a MAP and an UNMAP
        // above its next key must go to the high chunk, not to it.
        t.remove_range(0x2000, 0x2fff, &mut out).unwrap();
        model.remove(&0x2000);
        let high = m(20 * 0x2000 + 0x1000, 20 * 0x2000 + 0x1fff);
        assert!(t.try_insert(high));
        model.insert(high.start, high);
        t.remove_range(24 * 0x2000, 24 * 0x2000 + 0xfff, &mut out)
            .unwrap();
        model.remove(&(24 * 0x2000));
        // Below the recent chunk's key (after it moved up): the B-tree or
        // the directory, not the recent slot.
        t.remove_range(0, 0xfff, &mut out).unwrap();
        model.remove(&0);
        let low = m(0, 0xfff);
        assert!(t.try_insert(low));
        model.insert(low.start, low);
        // Free the recent slot and let a new chunk take it.
        for i in 16..32u64 {
            let _ = t.remove_range(i * 0x2000, i * 0x2000 + 0x1fff, &mut out);
            model.remove(&(i * 0x2000));
            model.remove(&(i * 0x2000 + 0x1000));
        }
        for i in 40..(40 + 2 * CHUNK_CAPACITY as u64) {
            let x = m(i * 0x2000, i * 0x2000 + 0xfff);
            assert!(t.try_insert(x));
            model.insert(x.start, x);
        }
        t.check_links();
        check_find(&t, &model, 0x200);
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            model.values().copied().collect::<Vec<_>>()
        );
    }

    #[test]
    fn emptied_slab_is_given_back() {
        let mut t = OrderedTable::new();
        let n = 64 * CHUNK_CAPACITY as u64 * 4;
        for i in 0..n {
            t.insert(m(i * 0x1000, i * 0x1000 + 0xfff));
        }
        let full = t.chunk_bytes();
        let mut out = vec![];
        // Keep the first 100 mappings.
        t.remove_range(100 * 0x1000, n * 0x1000, &mut out).unwrap();
        assert_eq!(t.len(), 100);
        t.check_links();
        assert!(
            t.chunk_bytes() * 8 < full,
            "{} of {full} bytes",
            t.chunk_bytes()
        );
        for i in 0..n {
            let expect = (i < 100).then(|| m(i * 0x1000, i * 0x1000 + 0xfff));
            assert_eq!(t.find(i * 0x1000 + 1), expect);
        }
        t.remove_range(0, u64::MAX, &mut out).unwrap();
        assert!(t.is_empty());
        // At most one block stays, so that MAP/UNMAP pairs on an empty
        // table allocate nothing.
        assert!(
            t.chunk_bytes() <= BLOCK_SLOTS * size_of::<Chunk>() + 1024,
            "{} bytes",
            t.chunk_bytes()
        );
    }

    #[test]
    fn mapping_at_the_top_of_the_address_space_is_found() {
        let mut t = OrderedTable::new();
        t.insert(m(0x1000, 0x1fff));
        let top = Mapping {
            start: u64::MAX - 0xfff,
            end: u64::MAX,
            phys: 0x5000,
            flags: 1,
        };
        t.insert(top);
        assert_eq!(t.find(u64::MAX), Some(top));
        assert_eq!(t.find(u64::MAX - 0xfff), Some(top));
        assert!(t.overlaps(u64::MAX, u64::MAX));
        let mut out = vec![];
        t.remove_range(u64::MAX - 0xfff, u64::MAX, &mut out)
            .unwrap();
        assert_eq!(out, [top]);
        assert_eq!(t.find(u64::MAX), None);
    }

    proptest! {
        // Thousands of mappings in random order, random removals: the
        // directory goes stale and is rebuilt, the slab compacts, and every
        // lookup agrees with a plain map.
        #[test]
        fn large_random_table_matches_a_btreemap(
            inserts in proptest::collection::vec(0u64..4096, 500..3000),
            removes in proptest::collection::vec((0u64..4096, 1u64..64), 0..200),
        ) {
            let mut t = OrderedTable::new();
            let mut model: BTreeMap<u64, Mapping> = BTreeMap::new();
            for p in inserts {
                let x = m(p * 0x1000, p * 0x1000 + 0xfff);
                let fresh = !model.contains_key(&x.start);
                prop_assert_eq!(t.try_insert(x), fresh);
                model.insert(x.start, x);
            }
            t.check_links();
            let mut out = vec![];
            for (p, pages) in removes {
                let (s, e) = (p * 0x1000, (p + pages) * 0x1000 - 1);
                out.clear();
                t.remove_range(s, e, &mut out).unwrap();
                let gone: Vec<u64> = model.range(s..=e).map(|(&k, _)| k).collect();
                prop_assert_eq!(out.len(), gone.len());
                for k in gone {
                    model.remove(&k);
                }
            }
            prop_assert_eq!(t.len(), model.len());
            t.check_links();
            check_find(&t, &model, 4100);
        }
    }

    #[test]
    fn a_table_moves_into_chunks_past_one_chunk_and_back_at_half_of_one() {
        let mut t = OrderedTable::new();
        let mut out = vec![];
        for i in 0..CHUNK_CAPACITY as u64 {
            t.insert(m(i * 0x2000, i * 0x2000 + 0xfff));
        }
        assert!(!t.chunked);
        assert_eq!((t.chunk_stats(), t.chunk_bytes()), ((0, 0), 0));
        // One more: into chunks, every mapping still found.
        let extra = CHUNK_CAPACITY as u64;
        t.insert(m(extra * 0x2000, extra * 0x2000 + 0xfff));
        assert!(t.chunked);
        for i in 0..=extra {
            assert_eq!(
                t.find(i * 0x2000 + 5),
                Some(m(i * 0x2000, i * 0x2000 + 0xfff))
            );
            assert_eq!(t.find(i * 0x2000 + 0x1000), None);
        }
        // Down to SMALL_BACK + 1: still chunked; one fewer: inline again,
        // in order, with nothing of the chunked form left.
        let mut next = 0;
        while t.len() > SMALL_BACK + 1 {
            t.remove_range(next * 0x2000, next * 0x2000 + 0xfff, &mut out)
                .unwrap();
            next += 1;
        }
        assert!(t.chunked);
        t.remove_range(next * 0x2000, next * 0x2000 + 0xfff, &mut out)
            .unwrap();
        assert!(!t.chunked);
        assert_eq!(t.chunk_bytes(), 0);
        let left: Vec<Mapping> = ((next + 1)..=extra)
            .map(|i| m(i * 0x2000, i * 0x2000 + 0xfff))
            .collect();
        assert_eq!(t.iter().collect::<Vec<_>>(), left);
        assert_eq!(out.len() as u64, next + 1);
    }

    #[test]
    fn an_inline_table_finds_a_mapping_that_ends_at_the_top() {
        // Vacant entries count below u64::MAX only there: the count must
        // stop at the table's length.
        let mut t = OrderedTable::new();
        let at_top = |start: u64, end: u64| Mapping {
            start,
            end,
            phys: 0x5000,
            flags: 1,
        };
        let top = at_top(u64::MAX - 0xfff, u64::MAX);
        t.insert(m(0x1000, 0x1fff));
        t.insert(top);
        assert!(!t.chunked);
        assert_eq!(t.find(u64::MAX), Some(top));
        assert!(t.overlaps(u64::MAX, u64::MAX));
        assert!(!t.try_insert(at_top(u64::MAX - 0x1fff, u64::MAX - 0xfff)));
    }

    proptest! {
        // Around the inline form's edges (16 in, 8 back): random inserts
        // and removals, checked against a plain map after every step.
        #[test]
        fn inline_and_chunked_forms_agree_with_a_btreemap_across_moves(
            ops in proptest::collection::vec((any::<bool>(), 0u64..48, 1u64..4), 1..300),
        ) {
            let mut t = OrderedTable::new();
            let mut model: BTreeMap<u64, Mapping> = BTreeMap::new();
            let mut out = vec![];
            for (ins, page, pages) in ops {
                let (start, end) = (page * 0x1000, (page + pages) * 0x1000 - 1);
                if ins {
                    let free = model.values().all(|x| x.end < start || x.start > end);
                    prop_assert_eq!(t.try_insert(m(start, end)), free);
                    if free {
                        model.insert(start, m(start, end));
                    }
                } else {
                    out.clear();
                    let split = model.values().any(|x| {
                        (x.start < start && x.end >= start) || (x.start <= end && x.end > end)
                    });
                    prop_assert_eq!(t.remove_range(start, end, &mut out).is_err(), split);
                    if !split {
                        let gone: Vec<Mapping> = model.range(start..=end).map(|(_, x)| *x).collect();
                        prop_assert_eq!(&out, &gone);
                        for x in gone {
                            model.remove(&x.start);
                        }
                    }
                }
                prop_assert_eq!(t.len(), model.len());
                // Chunked only above SMALL_BACK, inline only up to a chunk.
                prop_assert!(!t.chunked || t.len() > SMALL_BACK);
                prop_assert!(t.chunked || t.len() <= CHUNK_CAPACITY);
                t.check_links();
                prop_assert_eq!(t.iter().collect::<Vec<_>>(), model.values().copied().collect::<Vec<_>>());
            }
            check_find(&t, &model, 52);
        }
    }

    /// Random inserts and removals of `[page * unit, (page + pages) * unit
    /// - 1]` against a naive list, the links checked after every step.
    fn check_against_naive_model(
        ops: Vec<(bool, u64, u64)>,
        unit: u64,
        mk: fn(u64, u64) -> Mapping,
        hints: &[u32],
    ) -> Result<(), TestCaseError> {
        let mut t = OrderedTable::new();
        let mut model: Vec<Mapping> = vec![];
        for (i, (ins, page, pages)) in ops.into_iter().enumerate() {
            // A slot hinted before the change (as warming does): any
            // slot, used, free or out of range, is only a hint.
            if let Some(&h) = hints.get(i % hints.len().max(1)) {
                t.hint_slot(h);
            }
            let start = page * unit;
            let end = start + pages * unit - 1;
            let overl = model.iter().any(|x| x.start <= end && x.end >= start);
            prop_assert_eq!(t.overlaps(start, end), overl);
            if ins {
                if !overl {
                    t.insert(mk(start, end));
                    model.push(mk(start, end));
                }
            } else {
                let split = model.iter().any(|x| {
                    (x.start < start && x.end >= start) || (x.end > end && x.start <= end)
                });
                let mut out = vec![];
                let r = t.remove_range(start, end, &mut out);
                prop_assert_eq!(r.is_err(), split);
                if !split {
                    let mut expect: Vec<Mapping> = model
                        .iter()
                        .copied()
                        .filter(|x| x.start >= start && x.end <= end)
                        .collect();
                    expect.sort_by_key(|x| x.start);
                    prop_assert_eq!(&out, &expect);
                    model.retain(|x| !(x.start >= start && x.end <= end));
                }
            }
            prop_assert_eq!(t.len(), model.len());
            t.check_links();
        }
        model.sort_by_key(|x| x.start);
        prop_assert_eq!(t.iter().collect::<Vec<_>>(), model.clone());
        let top = model.last().map_or(0, |x| x.end) + 2 * unit;
        for a in (0..top).step_by((unit / 2).max(1) as usize) {
            let expect = model.iter().copied().find(|x| x.start <= a && a <= x.end);
            prop_assert_eq!(t.find(a), expect);
        }
        Ok(())
    }

    proptest! {
        // The table agrees with a naive list under random inserts/removes.
        #[test]
        fn matches_naive_model(ops in proptest::collection::vec((any::<bool>(), 0u64..300, 1u64..6), 1..400)) {
            check_against_naive_model(ops, 0x1000, m, &[])?;
        }

        #[test]
        fn matches_naive_model_whatever_slot_is_hinted(
            ops in proptest::collection::vec((any::<bool>(), 0u64..300, 1u64..6), 1..400),
            hints in proptest::collection::vec(prop_oneof![0u32..40, any::<u32>()], 1..16),
        ) {
            check_against_naive_model(ops, 0x1000, m, &hints)?;
        }

        // The same a byte at a time: a range may end exactly where the
        // next chunk's first mapping starts (one byte long), which the
        // next-key shortcut of UNMAP must not take for "ends here".
        #[test]
        fn matches_naive_model_at_byte_granularity(ops in proptest::collection::vec((any::<bool>(), 0u64..200, 1u64..4), 1..500)) {
            fn mb(start: u64, end: u64) -> Mapping {
                Mapping { start, end, phys: 0x1000_0000 + start * 8, flags: 1 }
            }
            check_against_naive_model(ops, 1, mb, &[])?;
        }
    }
}
