//! The request queue's used ring, written a batch at a time.
//!
//! virtio-queue's `add_used` writes one used element and then stores the
//! used index, for every chain. A driver that polls that index while it
//! waits (Linux's virtio-iommu driver does, and so does the bench's) holds
//! its cache line, so every one of those stores first takes the line back
//! from the driver's core. Here a batch's elements are written first and
//! the index is stored once (virtio 1.3, 2.7.8.2: the device writes the
//! used elements, then updates the index, with a barrier in between).
//!
//! Since `add_used` is not called, virtio-queue's own count of chains
//! added since the last notification check stays at zero, and its
//! `needs_notification` would miss an `used_event` inside the batch:
//! [`UsedRing::needs_notification`] makes the same decision from this
//! module's count.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Error as QueueError, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Bytes before the first used element: `flags` and `idx` (virtio 1.3,
/// 2.7.8).
const USED_HEADER: u64 = 4;
/// One used element: `id` and `len`.
const USED_ELEM: u64 = 8;
/// Bytes before the avail ring's entries: `flags` and `idx`.
const AVAIL_HEADER: u64 = 4;

/// What the device knows of the request queue's used ring beyond the
/// `Queue`: chains published since the last notification check. A new
/// queue starts from `Default` (as virtio-queue's count does).
#[derive(Debug, Default)]
pub(super) struct UsedRing {
    unchecked: Wrapping<u16>,
}

impl UsedRing {
    /// Puts `chains` (`(head, used length)`) in the used ring in order, then
    /// stores the used index once. On an error, the chains before it are
    /// published and the rest are not.
    pub(super) fn publish<M: GuestMemory>(
        &mut self,
        mem: &M,
        q: &mut Queue,
        chains: &[(u16, u32)],
    ) -> Result<(), QueueError> {
        let size = q.size();
        let ring = GuestAddress(q.used_ring());
        let first = Wrapping(q.next_used());
        let mut next = first;
        let mut res = Ok(());
        for &(head, len) in chains {
            if head >= size {
                res = Err(QueueError::InvalidDescriptorIndex);
                break;
            }
            let at = ring
                .0
                .checked_add(USED_HEADER + u64::from(next.0 % size) * USED_ELEM);
            let Some(at) = at else {
                res = Err(QueueError::AddressOverflow);
                break;
            };
            // `struct virtq_used_elem { le32 id; le32 len; }`.
            let elem = (u64::from(len) << 32 | u64::from(head)).to_le();
            if super::guest_bytes::store(mem, GuestAddress(at), elem).is_err() {
                res = Err(QueueError::GuestMemory(
                    GuestMemoryError::InvalidGuestAddress(GuestAddress(at)),
                ));
                break;
            }
            next += 1;
        }
        if next != first {
            // Release: the elements (and the statuses before them) are
            // visible before the index that announces them.
            let idx_at = ring.0.checked_add(2).ok_or(QueueError::AddressOverflow)?;
            mem.store(next.0.to_le(), GuestAddress(idx_at), Ordering::Release)
                .map_err(QueueError::GuestMemory)?;
            q.set_next_used(next.0);
            self.unchecked += next - first;
        }
        res
    }

    /// Whether the driver wants an interrupt for what was published since
    /// the last call, as virtio-queue's `needs_notification` decides it:
    /// with EVENT_IDX, whether `used_event` lies among those chains
    /// (virtio 1.3, 2.7.10); without it, always.
    pub(super) fn needs_notification<M: GuestMemory>(
        &mut self,
        mem: &M,
        q: &Queue,
    ) -> Result<bool, QueueError> {
        let used_idx = Wrapping(q.next_used());
        let added = std::mem::take(&mut self.unchecked);
        if !q.event_idx_enabled() {
            return Ok(true);
        }
        // The index stored before the driver's `used_event` is read (the
        // driver stores `used_event`, then reads the index: without the
        // fence both sides could miss the other's store).
        fence(Ordering::SeqCst);
        let at = q
            .avail_ring()
            .checked_add(AVAIL_HEADER + 2 * u64::from(q.size()))
            .ok_or(QueueError::AddressOverflow)?;
        let used_event: u16 = mem
            .load(GuestAddress(at), Ordering::Relaxed)
            .map_err(QueueError::GuestMemory)?;
        let used_event = Wrapping(u16::from_le(used_event));
        Ok(used_idx - used_event - Wrapping(1) < added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const SIZE: u16 = 16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap()
    }

    /// Publishes `chains` on both queues, each its own way, and checks the
    /// used rings and indexes are the same bytes; then that both make the
    /// same notification decision for every `used_event`.
    fn same_as_add_used(start: u16, chains: &[(u16, u32)], event_idx: bool) {
        let (m1, m2) = (mem(), mem());
        let (v1, v2) = (
            MockSplitQueue::new(&m1, SIZE),
            MockSplitQueue::new(&m2, SIZE),
        );
        for used_event in 0..=u16::MAX {
            if used_event % 97 != 0 && used_event.wrapping_sub(start) > 2 * SIZE {
                continue;
            }
            let mut r1: Queue = v1.create_queue().unwrap();
            let mut r2: Queue = v2.create_queue().unwrap();
            for q in [&mut r1, &mut r2] {
                q.set_event_idx(event_idx);
                q.set_next_used(start);
            }
            let at = GuestAddress(r1.avail_ring() + AVAIL_HEADER + 2 * u64::from(SIZE));
            m1.write_obj(used_event.to_le(), at).unwrap();
            m2.write_obj(used_event.to_le(), at).unwrap();
            for &(head, len) in chains {
                r1.add_used(&m1, head, len).unwrap();
            }
            let mut used = UsedRing::default();
            used.publish(&m2, &mut r2, chains).unwrap();
            assert_eq!(r1.next_used(), r2.next_used());
            let ring = GuestAddress(r1.used_ring());
            let bytes = 4 + 8 * usize::from(SIZE);
            let (mut b1, mut b2) = (vec![0u8; bytes], vec![0u8; bytes]);
            m1.read_slice(&mut b1, ring).unwrap();
            m2.read_slice(&mut b2, ring).unwrap();
            assert_eq!(
                b1,
                b2,
                "used ring after {} chains from {start}",
                chains.len()
            );
            assert_eq!(
                r1.needs_notification(&m1).unwrap(),
                used.needs_notification(&m2, &r2).unwrap(),
                "notify? used_event {used_event}, from {start}, {} chains",
                chains.len()
            );
            // Checked: nothing new, so no interrupt is owed with EVENT_IDX.
            assert_eq!(
                r1.needs_notification(&m1).unwrap(),
                used.needs_notification(&m2, &r2).unwrap()
            );
        }
    }

    #[test]
    fn a_batch_writes_what_add_used_writes_and_notifies_when_it_would() {
        let chains: Vec<(u16, u32)> = (0..5).map(|i| (i * 3 % SIZE, 4 + u32::from(i))).collect();
        for event_idx in [false, true] {
            for start in [0, 3, SIZE - 2, u16::MAX - 1, u16::MAX] {
                same_as_add_used(start, &chains, event_idx);
                same_as_add_used(start, &chains[..1], event_idx);
                same_as_add_used(start, &[], event_idx);
            }
        }
    }

    #[test]
    fn a_bad_head_publishes_the_chains_before_it_only() {
        let m = mem();
        let v = MockSplitQueue::new(&m, SIZE);
        let mut q: Queue = v.create_queue().unwrap();
        let mut used = UsedRing::default();
        let res = used.publish(&m, &mut q, &[(1, 4), (SIZE, 4), (2, 4)]);
        assert!(matches!(res, Err(QueueError::InvalidDescriptorIndex)));
        assert_eq!(q.next_used(), 1);
        let idx: u16 = m.read_obj(GuestAddress(q.used_ring() + 2)).unwrap();
        assert_eq!(u16::from_le(idx), 1);
        let elem: [u32; 2] = m.read_obj(GuestAddress(q.used_ring() + 4)).unwrap();
        assert_eq!(elem, [1, 4]);
    }
}
