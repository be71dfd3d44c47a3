//! A lock-free IOVA index of one MAP-mode domain, for the translators of
//! emulated devices on other threads: a radix tree of 512-entry nodes (a
//! page table, with block entries where a mapping covers an aligned 2 MiB,
//! 1 GiB, ... block) whose every word is an atomic, read under a sequence
//! counter (a seqlock written in safe Rust).
//!
//! It owns the tree only. The state model stays the truth: the index is
//! built from a domain's mappings under the state's read lock and then
//! follows every MAP and UNMAP of that domain under the state's write lock
//! ([`crate::viommu`] keeps it); anything else that changes the domain
//! drops it. A reader never blocks the writer and never takes a lock: it
//! reads the counter, walks, reads the counter again, and tries again (or
//! takes the locked path) if the writer was at work meanwhile. Nodes are
//! recycled under the counter too, so a reader that wandered into a node
//! being reused can only be told to retry: every read is an atomic load
//! of a word that exists, never undefined behaviour, never a panic.
//!
//! Memory is bounded: a domain whose index would need more than
//! [`MAX_NODES`] nodes (a guest that scatters small mappings over the
//! whole input range) gets none, and its translators take the locked path.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::mapping::Mapping;
use crate::padded::Padded;
use crate::state::{FaultReason, ACCESS_READ, ACCESS_WRITE};

/// Bits of IOVA each level resolves.
const BITS: u32 = 9;
/// Entries per node.
const FANOUT: usize = 1 << BITS;
const PAGE_SHIFT: u32 = 12;
/// Nodes per arena segment (one allocation of 64 KiB).
const SEG_NODES: usize = 16;
/// Most nodes one index may use (64 MiB): bounds what a guest that
/// scatters 4 KiB mappings one per 2 MiB can make the host allocate.
pub const MAX_NODES: usize = 16 * 1024;
const SEGMENTS: usize = MAX_NODES / SEG_NODES;

/// Entry bits. An entry is 0 (nothing), a table (`TABLE`, the node number
/// above bit 12) or a leaf (`LEAF`, the guest-physical address of the
/// block's first byte above bit 12, and the permitted accesses).
const TABLE: u64 = 1 << 0;
const PERM_READ: u64 = 1 << 1;
const PERM_WRITE: u64 = 1 << 2;
const LEAF: u64 = 1 << 3;
const ADDR_MASK: u64 = !((1 << PAGE_SHIFT) - 1);

/// UNMAPs an index remembers, so that a translator that fell behind by
/// at most this many drops only what they removed, not its whole IOTLB.
pub(crate) const UNMAP_LOG: usize = 64;

/// How many walks a reader attempts while the writer keeps changing the
/// tree before it takes the locked path instead.
const READ_ATTEMPTS: usize = 4;

/// The answer of a lock-free lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The guest-physical address of the looked-up byte, the permitted
    /// accesses (`ACCESS_*` bits) and the last IOVA of the index entry
    /// (a 4 KiB page, or a 2 MiB, 1 GiB ... block) that translates it:
    /// every byte up to it translates linearly alike.
    Page { phys: u64, perm: u32, last: u64 },
    /// Nothing is mapped there.
    Unmapped,
    /// The writer kept changing the tree: ask the state.
    Busy,
}

impl Lookup {
    /// What the answer says of an access of `access` bits: the `Page`'s
    /// address, permissions and last IOVA where it permits the access; a
    /// mapping fault where nothing is mapped or it does not (the state
    /// says the same for both); `None` to ask the state (`Busy`). One rule
    /// for every reader of the index.
    #[inline]
    pub(crate) fn for_access(self, access: u32) -> Option<Result<(u64, u32, u64), FaultReason>> {
        match self {
            Lookup::Page { phys, perm, last } if access & !perm == 0 => {
                Some(Ok((phys, perm, last)))
            }
            Lookup::Page { .. } | Lookup::Unmapped => Some(Err(FaultReason::Mapping)),
            Lookup::Busy => None,
        }
    }
}

/// Why an index could not be built or kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TooBig;

/// The shared, lock-free part: what readers see.
pub(crate) struct PageIndex {
    /// Even while the tree is consistent, odd while the writer changes it.
    seq: Padded<AtomicU64>,
    /// Moves on every UNMAP that removed something: translators drop
    /// their IOTLB when it does.
    generation: Padded<AtomicU64>,
    /// The IOVA pages `[first, last]` of the last [`UNMAP_LOG`] UNMAPs:
    /// slot `g % UNMAP_LOG` holds the one that moved the generation from
    /// `g` to `g + 1`. Stored with release before that move (and read
    /// with acquire), so a reader that sees a slot rewritten also sees the
    /// generation that rewrote it.
    unmapped: Box<[[AtomicU64; 2]]>,
    /// Levels below the root: the root's entries cover
    /// `1 << (12 + 9 * levels)` bytes each.
    levels: u32,
    /// Highest IOVA the tree can hold; above it nothing is mapped.
    max: u64,
    segments: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl std::fmt::Debug for PageIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the nodes: a million mappings make megabytes of them.
        f.debug_struct("PageIndex")
            .field("levels", &(self.levels + 1))
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .field(
                "segments",
                &self.segments.iter().filter(|s| s.get().is_some()).count(),
            )
            .finish_non_exhaustive()
    }
}

/// The writer's bookkeeping, kept apart from the shared part (only the
/// thread holding the state's write lock touches it).
#[derive(Default)]
pub(crate) struct IndexWriter {
    /// Entries in use per node.
    counts: Vec<u16>,
    /// Nodes no table uses.
    free: Vec<u32>,
}

impl std::fmt::Debug for IndexWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexWriter")
            .field("nodes", &self.counts.len())
            .field("free", &self.free.len())
            .finish()
    }
}

/// Bytes one entry at `level` covers.
fn span(level: u32) -> u64 {
    1u64 << (PAGE_SHIFT + BITS * level)
}

impl PageIndex {
    /// An empty index for IOVAs up to `input_end`, with its writer.
    pub(crate) fn new(input_end: u64) -> (Self, IndexWriter) {
        // The fewest levels under a root of 512 entries that reach
        // input_end.
        let bits = 64 - input_end.leading_zeros();
        let levels = bits
            .saturating_sub(PAGE_SHIFT)
            .div_ceil(BITS)
            .saturating_sub(1);
        let max = match PAGE_SHIFT + BITS * (levels + 1) {
            b if b >= 64 => u64::MAX,
            b => (1u64 << b) - 1,
        };
        let ix = PageIndex {
            seq: Padded(AtomicU64::new(0)),
            generation: Padded(AtomicU64::new(0)),
            unmapped: (0..UNMAP_LOG)
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
            levels,
            max,
            segments: (0..SEGMENTS).map(|_| OnceLock::new()).collect(),
        };
        let mut w = IndexWriter::default();
        // Node 0 is the root.
        ix.segment(0);
        w.counts.push(0);
        (ix, w)
    }

    /// An index holding `mappings`, or `TooBig`.
    pub(crate) fn build(
        input_end: u64,
        mappings: impl Iterator<Item = Mapping>,
    ) -> Result<(Self, IndexWriter), TooBig> {
        let (ix, mut w) = Self::new(input_end);
        for m in mappings {
            ix.map(&mut w, &m)?;
        }
        Ok((ix, w))
    }

    /// The generation: moves whenever an UNMAP removed something.
    #[inline(always)]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn segment(&self, seg: usize) -> Option<&[AtomicU64]> {
        let s = self.segments.get(seg)?;
        Some(s.get_or_init(|| (0..SEG_NODES * FANOUT).map(|_| AtomicU64::new(0)).collect()))
    }

    /// Entry `i` of `node`, for readers: `None` if the node was never
    /// allocated (a reader following garbage).
    #[inline(always)]
    fn word(&self, node: u64, i: usize) -> Option<&AtomicU64> {
        let node = usize::try_from(node).ok()?;
        let seg = self.segments.get(node / SEG_NODES)?.get()?;
        seg.get((node % SEG_NODES) * FANOUT + i)
    }

    /// Looks `iova` up without a lock.
    #[inline]
    pub(crate) fn lookup(&self, iova: u64) -> Lookup {
        if iova > self.max {
            return Lookup::Unmapped;
        }
        for _ in 0..READ_ATTEMPTS {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 != 0 {
                std::hint::spin_loop();
                continue;
            }
            let found = self.walk(iova);
            // Orders the walk's loads before the second read of the
            // counter (the reader's half of the seqlock).
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return found;
            }
        }
        Lookup::Busy
    }

    #[inline(always)]
    fn walk(&self, iova: u64) -> Lookup {
        let mut node = 0u64;
        let mut level = self.levels;
        loop {
            let i = ((iova >> (PAGE_SHIFT + BITS * level)) as usize) & (FANOUT - 1);
            let Some(w) = self.word(node, i) else {
                return Lookup::Busy;
            };
            let e = w.load(Ordering::Relaxed);
            if e & LEAF != 0 {
                let off = iova & (span(level) - 1);
                let mut perm = 0;
                if e & PERM_READ != 0 {
                    perm |= ACCESS_READ;
                }
                if e & PERM_WRITE != 0 {
                    perm |= ACCESS_WRITE;
                }
                return Lookup::Page {
                    phys: (e & ADDR_MASK).wrapping_add(off),
                    perm,
                    last: iova | (span(level) - 1),
                };
            }
            if e & TABLE == 0 || level == 0 {
                // Empty, or a table where no table can be: garbage of a
                // node being reused, which the counter check rejects.
                return Lookup::Unmapped;
            }
            node = e >> PAGE_SHIFT;
            level -= 1;
        }
    }

    /// Opens a write section: readers that overlap it retry.
    fn begin(&self) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        // The writer's half of the seqlock: no store below may be seen
        // before the odd counter.
        fence(Ordering::Release);
    }

    fn end(&self) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Release);
    }

    /// Adds `m` (already in the state, so disjoint from every mapping the
    /// index holds). On `TooBig` the index is incomplete: drop it.
    pub(crate) fn map(&self, w: &mut IndexWriter, m: &Mapping) -> Result<(), TooBig> {
        let perm = m.flags & (ACCESS_READ | ACCESS_WRITE);
        if m.start > self.max || m.end > self.max {
            // Beyond what MAP allows here.
            return Ok(());
        }
        let mut bits = LEAF;
        if perm & ACCESS_READ != 0 {
            bits |= PERM_READ;
        }
        if perm & ACCESS_WRITE != 0 {
            bits |= PERM_WRITE;
        }
        self.begin();
        let r = self.set_range(w, 0, self.levels, 0, m.start, m.end, Some((m, bits)));
        self.end();
        r
    }

    /// Removes `m` (just removed from the state), and moves the
    /// generation so that translators drop what they cached of it. On
    /// `TooBig` (the tree disagreed with the state) drop the index.
    pub(crate) fn unmap(&self, w: &mut IndexWriter, m: &Mapping) -> Result<(), TooBig> {
        if m.start > self.max || m.end > self.max {
            return Ok(());
        }
        self.begin();
        let r = self.set_range(w, 0, self.levels, 0, m.start, m.end, None);
        let g = self.generation.load(Ordering::Relaxed);
        let slot = &self.unmapped[(g % UNMAP_LOG as u64) as usize];
        slot[0].store(m.start >> PAGE_SHIFT, Ordering::Release);
        slot[1].store(m.end >> PAGE_SHIFT, Ordering::Release);
        self.generation.fetch_add(1, Ordering::Release);
        self.end();
        r
    }

    /// The IOVA pages each UNMAP from generation `from` to `to` removed,
    /// oldest first; `None` when the log no longer holds all of them (more
    /// than [`UNMAP_LOG`] UNMAPs since `from`, also while reading), so the
    /// caller must drop everything. `to` is a generation the caller loaded
    /// (with acquire) before, at most the current one.
    pub(crate) fn unmapped_since(
        &self,
        from: u64,
        to: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> Option<()> {
        out.clear();
        let n = to.wrapping_sub(from);
        if n > UNMAP_LOG as u64 {
            return None;
        }
        for g in from..from.wrapping_add(n) {
            let slot = &self.unmapped[(g % UNMAP_LOG as u64) as usize];
            out.push((
                slot[0].load(Ordering::Acquire),
                slot[1].load(Ordering::Acquire),
            ));
        }
        // Slot `from % UNMAP_LOG` is rewritten only once the generation
        // reaches `from + UNMAP_LOG`; a slot read above that was rewritten
        // makes this load see at least that (release/acquire on the slot).
        let now = self.generation.load(Ordering::Acquire);
        (now.wrapping_sub(from) < UNMAP_LOG as u64).then_some(())
    }

    /// Sets (or with `None` clears) the entries of `node` at `level`
    /// (which covers IOVAs from `base`) for `[lo, hi]`: a leaf where an
    /// entry's whole block lies in the range, a table below otherwise.
    /// `TooBig` when the nodes ran out, or when the tree disagrees with
    /// what the state says (a leaf where a table should be): either way
    /// the caller drops the index.
    #[allow(clippy::too_many_arguments)]
    fn set_range(
        &self,
        w: &mut IndexWriter,
        node: u32,
        level: u32,
        base: u64,
        lo: u64,
        hi: u64,
        leaf: Option<(&Mapping, u64)>,
    ) -> Result<(), TooBig> {
        let sz = span(level);
        let first = ((lo - base) >> (PAGE_SHIFT + BITS * level)) as usize;
        let last = ((hi - base) >> (PAGE_SHIFT + BITS * level)) as usize;
        for i in first..=last.min(FANOUT - 1) {
            let b = base + i as u64 * sz;
            let b_end = b + (sz - 1);
            let (a, z) = (lo.max(b), hi.min(b_end));
            let word = self.own_word(node, i);
            let e = word.load(Ordering::Relaxed);
            if a == b && z == b_end {
                // The whole block: one leaf (or nothing).
                match leaf {
                    Some((m, bits)) => {
                        if e == 0 {
                            w.counts[node as usize] += 1;
                        }
                        let phys = m.phys.wrapping_add(b - m.start);
                        word.store((phys & ADDR_MASK) | bits, Ordering::Relaxed);
                    }
                    None if e != 0 => {
                        if e & LEAF == 0 && level > 0 {
                            // A table under a block the range covers whole:
                            // only if mappings were split, which UNMAP
                            // never does; free it all the same.
                            self.free_tree(w, (e >> PAGE_SHIFT) as u32, level - 1);
                        }
                        word.store(0, Ordering::Relaxed);
                        w.counts[node as usize] -= 1;
                    }
                    None => {}
                }
                continue;
            }
            // Part of the block: a table below. (Mappings are disjoint and
            // UNMAP removes whole ones, so a block leaf is never cut.)
            let child = if e & LEAF != 0 || level == 0 {
                return Err(TooBig);
            } else if e & TABLE != 0 {
                (e >> PAGE_SHIFT) as u32
            } else if leaf.is_none() {
                continue;
            } else {
                let c = self.alloc(w)?;
                w.counts[node as usize] += 1;
                word.store((u64::from(c) << PAGE_SHIFT) | TABLE, Ordering::Relaxed);
                c
            };
            self.set_range(w, child, level - 1, b, a, z, leaf)?;
            if w.counts[child as usize] == 0 {
                word.store(0, Ordering::Relaxed);
                w.counts[node as usize] -= 1;
                w.free.push(child);
            }
        }
        Ok(())
    }

    /// Frees the table `node` at `level` and every table below it.
    fn free_tree(&self, w: &mut IndexWriter, node: u32, level: u32) {
        for i in 0..FANOUT {
            let word = self.own_word(node, i);
            let e = word.load(Ordering::Relaxed);
            if e & TABLE != 0 && e & LEAF == 0 && level > 0 {
                self.free_tree(w, (e >> PAGE_SHIFT) as u32, level - 1);
            }
            word.store(0, Ordering::Relaxed);
        }
        w.counts[node as usize] = 0;
        w.free.push(node);
    }

    /// Entry `i` of a node the writer allocated (which exists).
    fn own_word(&self, node: u32, i: usize) -> &AtomicU64 {
        let n = node as usize;
        let seg = self
            .segment(n / SEG_NODES)
            .expect("the writer's nodes are allocated");
        &seg[(n % SEG_NODES) * FANOUT + i]
    }

    /// A cleared node: a recycled one, or the next new one.
    fn alloc(&self, w: &mut IndexWriter) -> Result<u32, TooBig> {
        if let Some(n) = w.free.pop() {
            return Ok(n);
        }
        let n = w.counts.len();
        if n >= MAX_NODES {
            return Err(TooBig);
        }
        self.segment(n / SEG_NODES).ok_or(TooBig)?;
        w.counts.push(0);
        Ok(n as u32)
    }

    /// Nodes in use.
    #[cfg(test)]
    fn nodes(&self, w: &IndexWriter) -> usize {
        w.counts.len() - w.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(start: u64, end: u64, phys: u64, flags: u32) -> Mapping {
        Mapping {
            start,
            end,
            phys,
            flags,
        }
    }

    const RW: u32 = ACCESS_READ | ACCESS_WRITE;

    #[test]
    fn lookup_returns_the_page_of_a_small_mapping() {
        let (ix, mut w) = PageIndex::new(0xffff_ffff_ffff);
        ix.map(&mut w, &m(0x1_0000, 0x1_2fff, 0x40_0000, RW))
            .unwrap();
        assert_eq!(
            ix.lookup(0x1_1abc),
            Lookup::Page {
                phys: 0x40_1abc,
                perm: RW,
                last: 0x1_1fff,
            }
        );
        assert_eq!(ix.lookup(0x1_3000), Lookup::Unmapped);
        assert_eq!(ix.lookup(0xffff), Lookup::Unmapped);
    }

    #[test]
    fn block_entries_translate_every_page_of_an_unaligned_large_mapping() {
        let (ix, mut w) = PageIndex::new(0xffff_ffff_ffff);
        // 4 KiB below a 1 GiB boundary to 2 MiB + 4 KiB above it.
        let (start, end) = ((1 << 30) - 0x1000, (1 << 30) + 0x20_0fff);
        ix.map(&mut w, &m(start, end, 0x8000_0000, ACCESS_READ))
            .unwrap();
        for iova in (start..=end).step_by(0x1000) {
            assert_eq!(
                ix.lookup(iova),
                Lookup::Page {
                    phys: 0x8000_0000 + (iova - start),
                    perm: ACCESS_READ,
                    // The 2 MiB-aligned middle is one block entry.
                    last: if iova >> 21 == (1 << 30) >> 21 {
                        (1 << 30) + 0x1f_ffff
                    } else {
                        iova | 0xfff
                    },
                },
                "{iova:#x}"
            );
        }
        assert_eq!(ix.lookup(end + 1), Lookup::Unmapped);
        assert_eq!(ix.lookup(start - 1), Lookup::Unmapped);
        ix.unmap(&mut w, &m(start, end, 0x8000_0000, ACCESS_READ))
            .unwrap();
        assert_eq!(ix.lookup(start), Lookup::Unmapped);
        assert_eq!(ix.lookup(1 << 30), Lookup::Unmapped);
        // Every table went back: only the root is in use.
        assert_eq!(ix.nodes(&w), 1);
    }

    #[test]
    fn unmap_moves_the_generation_and_frees_tables() {
        let (ix, mut w) = PageIndex::new(0xffff_ffff_ffff);
        let a = m(0x1000, 0x1fff, 0x2000, RW);
        ix.map(&mut w, &a).unwrap();
        assert_eq!(ix.nodes(&w), 4);
        let g = ix.generation();
        ix.unmap(&mut w, &a).unwrap();
        assert!(ix.generation() > g);
        assert_eq!(ix.lookup(0x1000), Lookup::Unmapped);
        assert_eq!(ix.nodes(&w), 1);
    }

    #[test]
    fn the_top_of_a_64_bit_space_is_indexed() {
        let (ix, mut w) = PageIndex::new(u64::MAX);
        let top = m(u64::MAX - 0xfff, u64::MAX, 0x1000, RW);
        ix.map(&mut w, &top).unwrap();
        assert_eq!(
            ix.lookup(u64::MAX),
            Lookup::Page {
                phys: 0x1fff,
                perm: RW,
                last: u64::MAX,
            }
        );
        let all = m(0, u64::MAX, 0, RW);
        ix.unmap(&mut w, &top).unwrap();
        ix.map(&mut w, &all).unwrap();
        assert_eq!(
            ix.lookup(0x1234_5678_9000),
            Lookup::Page {
                phys: 0x1234_5678_9000,
                perm: RW,
                // One entry of the root covers 2^48 bytes here (levels
                // for a 64-bit space).
                last: 0x1234_5678_9000 | ((1 << 57) - 1),
            }
        );
    }

    #[test]
    fn mappings_without_access_are_found_with_no_permission() {
        let (ix, mut w) = PageIndex::new(0xffff_ffff_ffff);
        ix.map(&mut w, &m(0x1000, 0x1fff, 0x2000, 0)).unwrap();
        assert_eq!(
            ix.lookup(0x1000),
            Lookup::Page {
                phys: 0x2000,
                perm: 0,
                last: 0x1fff,
            }
        );
    }

    #[test]
    fn scattered_mappings_past_the_node_bound_are_refused() {
        let (ix, mut w) = PageIndex::new(0xffff_ffff_ffff);
        // One 4 KiB mapping per 2 MiB: a leaf node each.
        let r = (0..MAX_NODES as u64)
            .try_for_each(|i| ix.map(&mut w, &m(i << 21, (i << 21) + 0xfff, 0x1000, RW)));
        assert_eq!(r, Err(TooBig));
    }
}
