//! A [`Translator`](super::Translator)'s IOTLB: IOVA page → guest-physical
//! page and permissions.
//!
//! Two ways. Way 0 is direct-mapped on the page number's low bits, as the
//! IOTLB was before: a run of consecutive pages never collides there, and a
//! hit in it costs what it did. A page that a fill pushes out of way 0 moves
//! to way 1, indexed by a multiplicative hash of its page number, and is
//! still a hit there. Why: a device's hot pages are wherever the guest's
//! IOVA allocator put them. Sixty-four of them at random over 10,000
//! mappings collided in 40% of their lookups in way 0 alone, and pages a
//! power of two apart share one way-0 slot; the hash sends them apart.

/// Entries in way 0 (a power of two).
pub const WAY0: usize = 256;
/// Entries in way 1 (a power of two).
pub const WAY1: usize = 256;
/// Entries in the IOTLB.
pub const ENTRIES: usize = WAY0 + WAY1;

const INVALID_TAG: u64 = u64::MAX;

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// IOVA page number, `INVALID_TAG` when empty.
    tag: u64,
    /// Guest-physical address of the page.
    phys: u64,
    /// Permitted accesses (`ACCESS_*` bits).
    perm: u32,
}

const EMPTY: Entry = Entry {
    tag: INVALID_TAG,
    phys: 0,
    perm: 0,
};

/// The IOTLB. It caches only: the owner decides when entries go stale.
#[derive(Debug)]
pub(crate) struct PageTlb {
    way0: Box<[Entry; WAY0]>,
    way1: Box<[Entry; WAY1]>,
}

#[inline(always)]
fn slot0(page: u64) -> usize {
    (page as usize) & (WAY0 - 1)
}

/// The top bits of a Fibonacci hash: pages that share a way-0 slot (a
/// multiple of `WAY0` apart) land apart.
#[inline(always)]
fn slot1(page: u64) -> usize {
    (page.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - WAY1.trailing_zeros())) as usize
}

impl PageTlb {
    pub(crate) fn new() -> Self {
        PageTlb {
            way0: Box::new([EMPTY; WAY0]),
            way1: Box::new([EMPTY; WAY1]),
        }
    }

    /// The guest-physical address of IOVA page `page` if way 0 holds it
    /// and it permits `access`: the hit path.
    #[inline(always)]
    pub(crate) fn lookup_way0(&self, page: u64, access: u32) -> Option<u64> {
        let e = &self.way0[slot0(page)];
        (e.tag == page && access & !e.perm == 0).then_some(e.phys)
    }

    /// The same in way 1, for a way-0 miss.
    #[inline(always)]
    pub(crate) fn lookup_way1(&self, page: u64, access: u32) -> Option<u64> {
        let e = &self.way1[slot1(page)];
        (e.tag == page && access & !e.perm == 0).then_some(e.phys)
    }

    /// The guest-physical address of IOVA page `page` if it is held and
    /// permits `access`.
    #[cfg(test)]
    fn lookup(&self, page: u64, access: u32) -> Option<u64> {
        self.lookup_way0(page, access)
            .or_else(|| self.lookup_way1(page, access))
    }

    /// Holds `page` → `phys` (page-aligned) with permissions `perm` in way
    /// 0; what it pushes out moves to way 1.
    pub(crate) fn insert(&mut self, page: u64, phys: u64, perm: u32) {
        let new = Entry {
            tag: page,
            phys,
            perm,
        };
        let old = std::mem::replace(&mut self.way0[slot0(page)], new);
        if old.tag == page {
            return;
        }
        // Never two entries of one page: a refill for a wider access drops
        // the narrower entry way 1 may hold.
        let held = &mut self.way1[slot1(page)];
        if held.tag == page {
            *held = EMPTY;
        }
        if old.tag != INVALID_TAG {
            self.way1[slot1(old.tag)] = old;
        }
    }

    /// Drops the pages `first..=last`.
    pub(crate) fn invalidate(&mut self, first: u64, last: u64) {
        if last - first < ENTRIES as u64 {
            for page in first..=last {
                for e in [&mut self.way0[slot0(page)], &mut self.way1[slot1(page)]] {
                    if e.tag == page {
                        *e = EMPTY;
                    }
                }
            }
        } else {
            for e in self.way0.iter_mut().chain(self.way1.iter_mut()) {
                if first <= e.tag && e.tag <= last {
                    *e = EMPTY;
                }
            }
        }
    }

    /// Drops everything.
    pub(crate) fn clear(&mut self) {
        self.way0.fill(EMPTY);
        self.way1.fill(EMPTY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ACCESS_READ, ACCESS_WRITE};

    const RW: u32 = ACCESS_READ | ACCESS_WRITE;

    fn held(t: &PageTlb, pages: &[u64]) -> usize {
        pages
            .iter()
            .filter(|&&p| t.lookup(p, ACCESS_READ) == Some(p << 12))
            .count()
    }

    fn fill(pages: &[u64]) -> PageTlb {
        let mut t = PageTlb::new();
        // Twice round, as a device's hot set comes round: a hit moves
        // nothing, a miss fills.
        for _ in 0..2 {
            for &p in pages {
                if t.lookup(p, ACCESS_READ).is_none() {
                    t.insert(p, p << 12, ACCESS_READ);
                }
            }
        }
        t
    }

    #[test]
    fn a_held_page_answers_only_the_accesses_it_permits() {
        let mut t = PageTlb::new();
        assert_eq!(t.lookup(5, ACCESS_READ), None);
        t.insert(5, 0x7000, ACCESS_READ);
        assert_eq!(t.lookup(5, ACCESS_READ), Some(0x7000));
        assert_eq!(t.lookup(5, ACCESS_WRITE), None);
        assert_eq!(t.lookup(5, RW), None);
        assert_eq!(t.lookup(6, ACCESS_READ), None);
        // Pushed to way 1 by a page of its way-0 slot, it still answers
        // only what it permits; the refill for a wider access leaves one
        // entry of the page.
        let other = 5 + WAY0 as u64;
        t.insert(other, 0x9000, RW);
        assert_eq!(t.lookup(5, ACCESS_READ), Some(0x7000));
        assert_eq!(t.lookup(5, RW), None);
        t.insert(5, 0x7000, RW);
        assert_eq!(t.lookup(5, RW), Some(0x7000));
        assert_eq!(t.lookup(other, RW), Some(0x9000));
        let entries = t.way0.iter().chain(t.way1.iter()).filter(|e| e.tag == 5);
        assert_eq!(entries.count(), 1, "one entry per page");
    }

    #[test]
    fn runs_of_pages_up_to_way_0_all_stay_held() {
        for (stride, n) in [(1u64, WAY0), (2, WAY0), (4, WAY0 / 2)] {
            let pages: Vec<u64> = (0..n as u64).map(|i| 0x8_0000 + i * stride).collect();
            assert_eq!(held(&fill(&pages), &pages), n, "stride {stride}");
        }
    }

    #[test]
    fn pages_of_one_way_0_slot_stay_held_in_way_1() {
        // 64 pages a multiple of way 0 apart: direct-mapped, one of them.
        let pages: Vec<u64> = (0..64u64).map(|k| 0x8_0000 + k * WAY0 as u64).collect();
        let n = held(&fill(&pages), &pages);
        assert!(n >= 60, "{n} of 64 held");
    }

    #[test]
    fn sixty_four_hot_pages_at_random_stay_held() {
        // The `threads` bench's hot set: 64 of 10,000 mappings at even
        // pages. Way 0 alone held about 40 of them.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..8 {
            let pages: Vec<u64> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    0x10_0000 + 2 * (x % 10_000)
                })
                .collect();
            let n = held(&fill(&pages), &pages);
            assert!(n >= 62, "{n} of 64 held");
        }
    }

    #[test]
    fn invalidation_drops_exactly_the_range_in_both_ways_and_at_any_size() {
        // Pages 50..250 and the same slots one way-0 size up: the first
        // run ends in way 1.
        let pages: Vec<u64> = (50..250u64)
            .chain(50 + WAY0 as u64..250 + WAY0 as u64)
            .collect();
        for (first, last) in [
            (100u64, 100u64),
            (90, 140),
            (100 + WAY0 as u64, 120 + WAY0 as u64),
            (0, ENTRIES as u64 * 4),
        ] {
            let mut t = fill(&pages);
            let before: Vec<bool> = pages
                .iter()
                .map(|&p| t.lookup(p, ACCESS_READ).is_some())
                .collect();
            t.invalidate(first, last);
            for (&p, was) in pages.iter().zip(before) {
                let gone = first <= p && p <= last;
                let now = t.lookup(p, ACCESS_READ).is_some();
                assert_eq!(
                    now,
                    was && !gone,
                    "page {p:#x}, range {first:#x}..={last:#x}"
                );
            }
        }
        let mut t = fill(&pages);
        t.clear();
        assert_eq!(held(&t, &pages), 0);
    }
}
