//! Which 4 KiB pages of IOVA the ordered part's mappings touch: a bit a
//! page, in blocks of 512 pages (2 MiB of IOVA, one cache line of bits)
//! found through a hash of the block's number.
//!
//! It answers one question cheaply: "does any ordered mapping touch
//! `[start, end]`?" with "no" (every page's bit is clear) or "maybe". A
//! MAP into free IOVA then learns that the ordered part holds nothing
//! there from one line of bits, where a search of a large ordered part
//! reads its directory and a whole chunk, most of them cache misses.
//!
//! A clear bit is always true: every page an ordered mapping touches is
//! marked before the mapping is in the ordered part. A set bit may be
//! stale (the owner clears a page only when no mapping is left in it), and
//! then only costs the search it would have saved.

use crate::idhash::IdMap;

const PAGE_SHIFT: u32 = 12;
/// Pages per block, as a shift: 512 pages, 64 bytes of bits.
const BLOCK_SHIFT: u32 = 9;
const BLOCK_MASK: u64 = (1 << BLOCK_SHIFT) - 1;
/// Most pages [`Occupancy::is_clear`] checks; a longer range is left to
/// the ordered search, which costs the same at any length.
const CHECK_PAGES: u64 = 4096;

type Bits = [u64; 8];

/// The page bits of one domain's ordered mappings.
#[derive(Clone, Debug, Default)]
pub(super) struct Occupancy {
    blocks: IdMap<u64, Bits>,
}

/// Calls `f(block, first, last)` for each block `[first_page, last_page]`
/// meets, with the first and last bit it covers there.
fn for_each_block(first_page: u64, last_page: u64, mut f: impl FnMut(u64, u32, u32)) {
    let mut p = first_page;
    loop {
        let block = p >> BLOCK_SHIFT;
        let last = last_page.min(p | BLOCK_MASK);
        f(block, (p & BLOCK_MASK) as u32, (last & BLOCK_MASK) as u32);
        if last == last_page {
            return;
        }
        p = last + 1;
    }
}

/// Calls `f(word, mask)` for each word of a block's bits that `[first,
/// last]` (bit numbers, `first <= last < 512`) meets.
fn for_each_word(first: u32, last: u32, mut f: impl FnMut(usize, u64)) {
    for w in first / 64..=last / 64 {
        let lo = first.max(w * 64) - w * 64;
        let hi = last.min(w * 64 + 63) - w * 64;
        f(w as usize, (u64::MAX >> (63 - hi)) & (u64::MAX << lo));
    }
}

impl Occupancy {
    /// Whether no page of `[start, end]` is marked: `Some(true)` means no
    /// ordered mapping touches those pages. `None` for a range too long to
    /// check here.
    #[inline]
    pub(super) fn is_clear(&self, start: u64, end: u64) -> Option<bool> {
        let (first, last) = (start >> PAGE_SHIFT, end >> PAGE_SHIFT);
        if last - first >= CHECK_PAGES {
            return None;
        }
        let mut clear = true;
        for_each_block(first, last, |block, a, b| {
            if let Some(bits) = self.blocks.get(&block) {
                for_each_word(a, b, |w, mask| clear &= bits[w] & mask == 0);
            }
        });
        Some(clear)
    }

    /// Marks every page `[start, end]` touches, unless that could take
    /// the blocks held past `max_blocks` (counting every block the range
    /// spans as new): then marks nothing and returns
    /// `false` (a guest's MAP of a whole address space must not make the
    /// host allocate a block per 2 MiB of it).
    #[must_use]
    pub(super) fn mark(&mut self, start: u64, end: u64, max_blocks: usize) -> bool {
        let (first, last) = (start >> PAGE_SHIFT, end >> PAGE_SHIFT);
        let spanned = (last >> BLOCK_SHIFT) - (first >> BLOCK_SHIFT) + 1;
        if spanned > (max_blocks.saturating_sub(self.blocks.len())) as u64 {
            return false;
        }
        for_each_block(first, last, |block, a, b| {
            let bits = self.blocks.entry(block).or_insert([0; 8]);
            for_each_word(a, b, |w, mask| bits[w] |= mask);
        });
        true
    }

    /// Clears the pages `first_page..=last_page` (the caller knows no
    /// ordered mapping is left in them), and lets blocks left empty go.
    /// Visits the blocks held instead of those the range spans when they
    /// are fewer (the range of a large mapping).
    pub(super) fn clear_pages(&mut self, first_page: u64, last_page: u64) {
        let (first_block, last_block) = (first_page >> BLOCK_SHIFT, last_page >> BLOCK_SHIFT);
        let clear = |block: u64, bits: &mut Bits| {
            let a = if block == first_block {
                first_page & BLOCK_MASK
            } else {
                0
            };
            let b = if block == last_block {
                last_page & BLOCK_MASK
            } else {
                BLOCK_MASK
            };
            for_each_word(a as u32, b as u32, |w, mask| bits[w] &= !mask);
            *bits != [0; 8]
        };
        if last_block - first_block >= self.blocks.len() as u64 {
            self.blocks.retain(|&block, bits| {
                !(first_block..=last_block).contains(&block) || clear(block, bits)
            });
            return;
        }
        for block in first_block..=last_block {
            if let Some(bits) = self.blocks.get_mut(&block) {
                if !clear(block, bits) {
                    self.blocks.remove(&block);
                }
            }
        }
    }

    /// Blocks of bits held.
    pub(super) fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Heap bytes held (the hash table's slots and control bytes).
    pub(super) fn bytes(&self) -> usize {
        self.blocks.capacity() * (size_of::<(u64, Bits)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_pages_and_only_those_are_not_clear() {
        let mut o = Occupancy::default();
        // Pages 511 and 512: the last of block 0, the first of block 1.
        assert!(o.mark(511 << 12, (512 << 12) + 5, 2));
        assert_eq!(o.blocks(), 2);
        assert_eq!(o.is_clear(0, (511 << 12) - 1), Some(true));
        assert_eq!(
            o.is_clear((511 << 12) + 0xfff, 511 << 12 | 0xfff),
            Some(false)
        );
        assert_eq!(o.is_clear(512 << 12, 512 << 12), Some(false));
        assert_eq!(o.is_clear(513 << 12, (2000 << 12) - 1), Some(true));
        // Any byte of a marked page counts.
        assert_eq!(
            o.is_clear((512 << 12) + 0xffe, (512 << 12) + 0xfff),
            Some(false)
        );
        o.clear_pages(511, 511);
        assert_eq!(o.blocks(), 1, "block 0 emptied and let go");
        assert_eq!(o.is_clear(0, (512 << 12) - 1), Some(true));
        assert_eq!(o.is_clear(0, 512 << 12), Some(false));
        o.clear_pages(512, 512);
        assert_eq!((o.blocks(), o.bytes() > 0), (0, true));
    }

    #[test]
    fn a_range_too_long_to_check_is_left_to_the_search() {
        let o = Occupancy::default();
        assert_eq!(o.is_clear(0, CHECK_PAGES << 12), None);
        assert_eq!(o.is_clear(0, (CHECK_PAGES << 12) - 1), Some(true));
        assert_eq!(o.is_clear(0, u64::MAX), None);
    }

    #[test]
    fn the_top_of_the_address_space_is_a_page_like_any_other() {
        let mut o = Occupancy::default();
        assert!(o.mark(u64::MAX, u64::MAX, 1));
        assert_eq!(o.is_clear(u64::MAX - 0xfff, u64::MAX - 0xfff), Some(false));
        assert_eq!(o.is_clear(0, 0xfff), Some(true));
        o.clear_pages(u64::MAX >> 12, u64::MAX >> 12);
        assert_eq!(o.blocks(), 0);
    }

    #[test]
    fn a_mapping_of_the_whole_address_space_is_refused_not_allocated() {
        let mut o = Occupancy::default();
        assert!(o.mark(0x5000, 0x5fff, 16));
        assert!(!o.mark(0, u64::MAX, 1 << 20));
        assert!(
            !o.mark(1 << 21, (17 << 21) - 1, 16),
            "16 more blocks than one left"
        );
        assert!(o.mark(1 << 21, (16 << 21) - 1, 16));
        assert_eq!(o.blocks(), 16);
        // Clearing a range far larger than what is held visits what is held.
        o.clear_pages(0, u64::MAX >> 12);
        assert_eq!(o.blocks(), 0);
        assert!(o.mark(0x5000, 0x5fff, 16));
        assert!(o.mark(0x7000, 0x7fff, 16));
        o.clear_pages(6, (1 << 40) + 3);
        assert_eq!(
            (o.is_clear(0x5000, 0x5000), o.is_clear(0x7000, 0x7000)),
            (Some(false), Some(true))
        );
    }

    #[test]
    fn every_bit_of_a_block_is_its_own_page() {
        let mut o = Occupancy::default();
        for p in (0..512u64).step_by(3) {
            assert!(o.mark(p << 12, p << 12, 2));
        }
        for p in 0..512u64 {
            assert_eq!(
                o.is_clear(p << 12, (p << 12) | 0xfff),
                Some(p % 3 != 0),
                "page {p}"
            );
        }
        assert!(o.mark(0, (512 << 12) - 1, 2));
        o.clear_pages(1, 510);
        for p in 0..512u64 {
            assert_eq!(
                o.is_clear(p << 12, p << 12),
                Some(p != 0 && p != 511),
                "page {p}"
            );
        }
    }
}
