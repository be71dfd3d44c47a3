//! Warming a request-queue pass: every published request's first line,
//! and the used elements the pass will write, are asked for before the
//! first request is served.
//!
//! The driver writes its requests on another CPU, so each request line the
//! device reads first is a cache miss served from that CPU's cache. Served
//! one after another, each request's processing (hundreds of instructions)
//! sits between two misses and the core cannot look far enough ahead to
//! overlap them: a pass of 128 requests waits for 128 misses in turn.
//! Asking for every published request's line first, in a short loop whose
//! steps do not depend on each other, lets the core wait for them
//! together. The lines are asked for writing (PREFETCHW): the device
//! writes each request's status into its tail, in the same line when the
//! driver keeps request and tail together (Linux does, in one buffer), and
//! a line fetched for reading would cost a second trip to the driver's CPU
//! at that store (kicked pairs: +7-10% at every N). So are the used
//! elements, which the driver read the last time round. Only hints:
//! nothing read here decides anything, and the pass itself reads
//! everything again through `virtio-queue`.
//!
//! Where a domain's mapping table outgrows the caches, the same loop also
//! notes each MAP's and UNMAP's domain and IOVA, for the pass to warm
//! their table lookups the same way (`IommuState::warm_mappings`).

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::wire::{VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_UNMAP};

/// The mapping-table lookups of one pass's MAPs and UNMAPs: noted by
/// [`warm_pending`], warmed by `IommuState::warm_mappings`, and each
/// one's slot handed to its request's table just before it is served
/// (`IommuState::hint_slot`), so that the MAP starts at its chunk.
#[derive(Debug, Default)]
pub(super) struct TableHints {
    /// (domain, first IOVA) of each MAP and UNMAP, in pass order.
    pub(super) hints: Vec<(u32, u64)>,
    /// The position in the pass (0: the first chain it takes) of each
    /// hint's request.
    at: Vec<u32>,
    /// The slot warming found for each hint.
    pub(super) slots: Vec<Option<u32>>,
    /// The first hint whose request the pass has not reached.
    next: usize,
    /// Passes left that note no hints (see [`TableHints::wanted`]).
    rest: u32,
}

/// Passes that skip warming after one whose warming found nothing to warm.
const REST_PASSES: u32 = 8;

impl TableHints {
    /// Whether this pass should note hints: not for [`REST_PASSES`] passes
    /// after one whose every hint warmed nothing (MAPs into IOVA the
    /// table's occupancy bits show free, UNMAPs of what a MAP of the same
    /// pass mapped), where the noting and the lookups would only cost.
    /// The pass after those tries again.
    pub(super) fn wanted(&mut self) -> bool {
        if self.rest == 0 {
            return true;
        }
        self.rest -= 1;
        false
    }

    /// Called after a pass's warming: rests when none of its hints found
    /// a slot to warm.
    pub(super) fn warmed(&mut self) {
        if self.slots.iter().all(Option::is_none) {
            self.rest = REST_PASSES;
        }
    }

    /// Forgets the last pass.
    pub(super) fn clear(&mut self) {
        self.hints.clear();
        self.at.clear();
        self.slots.clear();
        self.next = 0;
    }

    /// Notes the lookup of the request at pass position `at`, unless it
    /// repeats the last one (an UNMAP of what the MAP before it mapped, a
    /// driver unmapping a buffer at once, needs no second warming: it
    /// finds the MAP's slot as the last one changed).
    fn push(&mut self, hint: (u32, u64), at: u32) {
        if self.hints.last() != Some(&hint) {
            self.hints.push(hint);
            self.at.push(at);
            self.slots.push(None);
        }
    }

    /// Whether some noted request is still ahead of the pass.
    #[inline]
    pub(super) fn pending(&self) -> bool {
        self.next < self.at.len()
    }

    /// The (domain, slot) warmed for the request at pass position `pos`,
    /// if it is the next one noted; positions come in order.
    pub(super) fn slot_at(&mut self, pos: u32) -> Option<(u32, u32)> {
        while self.at.get(self.next).is_some_and(|&a| a < pos) {
            self.next += 1;
        }
        if self.at.get(self.next) != Some(&pos) {
            return None;
        }
        let i = self.next;
        self.next += 1;
        Some((self.hints.get(i)?.0, (*self.slots.get(i)?)?))
    }
}

/// Asks for the first line of the first buffer of every chain the driver
/// has published and the device has not taken (at most a queue's worth),
/// and for the used elements they will take; returns how many buffers it
/// asked for. Skips whatever is not guest RAM: rings or
/// buffers outside it (the pass reports those), heads out of range, and
/// memory behind a translation.
///
/// With `hints`, the domain and first IOVA of every MAP and UNMAP among
/// them go there, for the pass to warm the mapping-table lookups those
/// will make (`IommuState::warm_mappings`). Read once here and never
/// trusted: the pass decodes and checks each request again.
pub(super) fn warm_pending<M: GuestMemory>(
    mem: &M,
    q: &Queue,
    mut hints: Option<&mut TableHints>,
) -> usize {
    let Some(ram) = mem.physical_memory() else {
        return 0;
    };
    let size = usize::from(q.size());
    if size == 0 {
        return 0;
    }
    let slice = |addr: u64, len: usize| {
        let r = ram.find_region(GuestAddress(addr))?;
        let off = addr.checked_sub(r.start_addr().0)?;
        r.get_slice(MemoryRegionAddress(off), len).ok()
    };
    let (Some(avail), Some(descs)) = (
        slice(q.avail_ring(), 4 + 2 * size),
        slice(q.desc_table(), 16 * size),
    ) else {
        return 0;
    };
    let Ok(idx) = avail.load::<u16>(2, Ordering::Acquire) else {
        return 0;
    };
    let mut next = q.next_avail();
    let pending = usize::from(idx.wrapping_sub(next)).min(size);
    // The used elements these chains will take: the driver read them
    // last time round, so they are lines to take back for writing.
    if let Some(used) = slice(q.used_ring(), 4 + 8 * size) {
        let first = usize::from(q.next_used());
        let base = used.ptr_guard().as_ptr();
        for i in (0..pending).step_by(8).chain(pending.checked_sub(1)) {
            let at = 4 + 8 * ((first + i) % size);
            crate::prefetch::prefetch_write(base.wrapping_add(at));
        }
    }
    // The region the last buffer was in: requests come from one pool.
    let mut region: Option<(u64, u64, _)> = None;
    let mut warmed = 0;
    for pos in 0..pending as u32 {
        let at = 4 + 2 * (usize::from(next) % size);
        next = next.wrapping_add(1);
        let Ok(head) = avail.load::<u16>(at, Ordering::Relaxed) else {
            break;
        };
        let head = usize::from(head);
        if head >= size {
            continue;
        }
        let Ok(addr) = descs.load::<u64>(16 * head, Ordering::Relaxed) else {
            break;
        };
        let inside = |&(start, len, _): &(u64, u64, _)| addr.wrapping_sub(start) < len;
        if !region.as_ref().is_some_and(inside) {
            region = ram.find_region(GuestAddress(addr)).and_then(|r| {
                let s = r.as_volatile_slice().ok()?;
                Some((r.start_addr().0, r.len(), s))
            });
        }
        if let Some((start, _, s)) = region.as_ref().filter(|r| inside(r)) {
            let off = (addr - start) as usize;
            if off >= s.len() {
                continue;
            }
            crate::prefetch::prefetch_write(s.ptr_guard().as_ptr().wrapping_add(off));
            warmed += 1;
            if let Some(hints) = hints.as_deref_mut() {
                let words = (
                    s.load::<u64>(off, Ordering::Relaxed),
                    s.load::<u64>(off.wrapping_add(8), Ordering::Relaxed),
                );
                if let Some(h) = table_hint(words) {
                    hints.push(h, pos);
                }
            }
        }
    }
    warmed
}

/// The (domain, first IOVA) of a MAP or UNMAP whose first 16 bytes,
/// as two little-endian words, are `words`: the request head (its type
/// in the first byte) and `domain`, then `virt_start`, in both.
fn table_hint<E>(words: (Result<u64, E>, Result<u64, E>)) -> Option<(u32, u64)> {
    let (w0, w1) = (u64::from_le(words.0.ok()?), u64::from_le(words.1.ok()?));
    let t = w0 as u8;
    (t == VIRTIO_IOMMU_T_MAP || t == VIRTIO_IOMMU_T_UNMAP).then_some(((w0 >> 32) as u32, w1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::DriverQueue;
    use vm_memory::{Address, GuestMemoryMmap};

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x1000),
        ])
        .unwrap()
    }

    #[test]
    fn warms_each_published_request_in_ram_and_skips_the_rest() {
        let mem = ram();
        let mut dq = DriverQueue::new(&mem, GuestAddress(0x1000), 16);
        let q = dq.device_queue();
        let buf = |a: u64| {
            [
                (GuestAddress(a), 16, false),
                (GuestAddress(a + 16), 4, true),
            ]
        };
        // Two regions, a buffer outside RAM, and one chain not published.
        dq.add_chain(&mem, &buf(0x8000));
        dq.add_chain(&mem, &buf(0x20_0000));
        dq.add_chain(&mem, &buf(0x4000_0000));
        dq.add_chain(&mem, &buf(0x9000));
        let avail_idx = GuestAddress(q.avail_ring()).unchecked_add(2);
        mem.write_obj(3u16, avail_idx).unwrap();
        assert_eq!(warm_pending(&mem, &q, None), 2);
        dq.kick(&mem);
        assert_eq!(warm_pending(&mem, &q, None), 3);
    }

    #[test]
    fn hints_name_the_domain_and_iova_of_each_map_and_unmap() {
        use crate::wire::VIRTIO_IOMMU_T_ATTACH;
        let mem = ram();
        let mut dq = DriverQueue::new(&mem, GuestAddress(0x1000), 16);
        let q = dq.device_queue();
        let mut req = |at: u64, t: u8, domain: u32, start: u64| {
            let mut b = [0u8; 24];
            b[0] = t;
            b[4..8].copy_from_slice(&domain.to_le_bytes());
            b[8..16].copy_from_slice(&start.to_le_bytes());
            mem.write_slice(&b, GuestAddress(at)).unwrap();
            dq.add_chain(
                &mem,
                &[
                    (GuestAddress(at), 24, false),
                    (GuestAddress(at + 0x80), 4, true),
                ],
            );
        };
        req(0x8000, VIRTIO_IOMMU_T_MAP, 1, 0x10_0000);
        // The UNMAP of what the MAP before it mapped: no second hint.
        req(0x8100, VIRTIO_IOMMU_T_UNMAP, 1, 0x10_0000);
        req(0x8200, VIRTIO_IOMMU_T_UNMAP, 0xffff_fffe, u64::MAX);
        // Not a MAP or an UNMAP.
        req(0x8300, VIRTIO_IOMMU_T_ATTACH, 1, 0x30_0000);
        // A request the words cannot be loaded from whole: warmed only.
        req(0x8403, VIRTIO_IOMMU_T_MAP, 1, 0x40_0000);
        dq.kick(&mem);
        let mut hints = TableHints::default();
        assert_eq!(warm_pending(&mem, &q, Some(&mut hints)), 5);
        assert_eq!(hints.hints, [(1, 0x10_0000), (0xffff_fffe, u64::MAX)]);
        assert_eq!(hints.at, [0, 2], "each hint's position in the pass");
        // Without a buffer for hints, the same loads and none kept.
        assert_eq!(warm_pending(&mem, &q, None), 5);
    }

    #[test]
    fn each_request_gets_the_slot_warmed_for_it_and_no_other() {
        let mut h = TableHints::default();
        h.push((1, 0x1000), 0);
        // The UNMAP of the same IOVA right after: no hint of its own.
        h.push((1, 0x1000), 1);
        h.push((2, 0x5000), 3);
        h.push((1, 0x9000), 6);
        h.slots.copy_from_slice(&[Some(7), None, Some(9)]);
        assert_eq!(h.slot_at(0), Some((1, 7)));
        assert_eq!(h.slot_at(1), None);
        assert_eq!(h.slot_at(2), None);
        // Warming found no slot for position 3's lookup.
        assert_eq!(h.slot_at(3), None);
        // Position 6 reached without asking at 4 and 5.
        assert_eq!(h.slot_at(6), Some((1, 9)));
        assert_eq!(h.slot_at(7), None);
        assert_eq!(h.slot_at(u32::MAX), None);
        assert!(!h.pending(), "every noted request reached");
        h.clear();
        assert_eq!(h.slot_at(0), None);
    }

    #[test]
    fn a_pass_that_warms_nothing_rests_warming_for_a_few_passes() {
        let mut h = TableHints::default();
        assert!(h.wanted());
        h.push((1, 0x1000), 0);
        h.push((1, 0x3000), 1);
        h.slots[1] = Some(7);
        h.warmed();
        assert!(h.wanted(), "a pass that warmed a slot keeps warming");
        h.clear();
        h.push((1, 0x5000), 0);
        h.warmed();
        for _ in 0..REST_PASSES {
            assert!(!h.wanted());
        }
        assert!(h.wanted(), "then it tries again");
    }

    #[test]
    fn a_hostile_ring_is_bounded_and_skipped() {
        let mem = ram();
        let dq = DriverQueue::new(&mem, GuestAddress(0x1000), 16);
        let q = dq.device_queue();
        let (avail, desc) = (GuestAddress(q.avail_ring()), GuestAddress(q.desc_table()));
        // Heads out of range, at a buffer at u64::MAX, at one in RAM; and
        // an avail index 60,000 ahead: one queue's worth is looked at, and
        // only the four buffers in RAM among it are loaded.
        for slot in 0..16u64 {
            let head: u16 = match slot % 4 {
                0 | 2 => 0xffff,
                1 => 3,
                _ => 5,
            };
            mem.write_obj(head, avail.unchecked_add(4 + 2 * slot))
                .unwrap();
        }
        mem.write_obj(0x8000u64, desc.unchecked_add(16 * 3))
            .unwrap();
        mem.write_obj(u64::MAX, desc.unchecked_add(16 * 5)).unwrap();
        mem.write_obj(60_000u16, avail.unchecked_add(2)).unwrap();
        assert_eq!(warm_pending(&mem, &q, None), 4);
        // Rings outside RAM: nothing.
        let mut far = Queue::new(16).unwrap();
        far.set_avail_ring_address(Some(0), Some(1));
        far.set_desc_table_address(Some(0), Some(1));
        assert_eq!(warm_pending(&mem, &far, None), 0);
    }
}
