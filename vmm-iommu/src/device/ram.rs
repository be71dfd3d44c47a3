//! Guest RAM as the request queue's passes see it: the VMM's memory, with
//! no translation in between, behind a slice iterator of this crate's.
//!
//! virtio-queue reads the rings and descriptors, and writes the used ring,
//! through vm-memory's `Bytes` methods, which take every access through
//! the memory's slice iterator and its `stop_on_error`. For a plain
//! `GuestMemoryMmap` those are vm-memory's own, whose speed depends on what
//! the compiler inlines (see `crate::slices`): the same device path
//! measured 182 or 375 ns per MAP+UNMAP pair across build settings. A pass
//! over memory that has a plain backend underneath goes through [`Ram`]
//! instead, with the same slices, errors and bounds.

use std::iter::FusedIterator;

use vm_memory::bitmap::{BS, MS};
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    GuestMemoryResult, Permissions, VolatileSlice,
};

use crate::slices::until_error;

/// A `GuestMemory` view of the backend `mem`, accessed without
/// translation (what the backend's own blanket `GuestMemory` does).
pub(super) struct Ram<'m, B: GuestMemoryBackend + ?Sized> {
    mem: &'m B,
}

impl<'m, B: GuestMemoryBackend + ?Sized> Ram<'m, B> {
    pub(super) fn new(mem: &'m B) -> Self {
        Ram { mem }
    }
}

impl<B: GuestMemoryBackend + ?Sized> GuestMemory for Ram<'_, B> {
    type PhysicalMemory = B;
    type Bitmap = <B::R as GuestMemoryRegion>::B;

    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        self.mem.check_range(addr, count)
    }

    #[inline(always)]
    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, Self::Bitmap>>> {
        Ok(RamSlices {
            mem: self.mem,
            addr,
            count,
        })
    }

    fn physical_memory(&self) -> Option<&B> {
        Some(self.mem)
    }
}

/// The slices of one access: a region at a time, as vm-memory's own
/// iterator cuts them (including its treatment of an access that ends
/// exactly at the top of the address space).
struct RamSlices<'a, B: GuestMemoryBackend + ?Sized> {
    mem: &'a B,
    addr: GuestAddress,
    /// Bytes not yet returned; 0 also after an error.
    count: usize,
}

impl<'a, B: GuestMemoryBackend + ?Sized> Iterator for RamSlices<'a, B> {
    type Item = GuestMemoryResult<VolatileSlice<'a, MS<'a, B>>>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.count == 0 {
            return None;
        }
        let Some((region, start)) = self.mem.to_region_addr(self.addr) else {
            self.count = 0;
            return Some(Err(GuestMemoryError::InvalidGuestAddress(self.addr)));
        };
        // `start` lies inside the region.
        let cap = region.len() - start.0;
        let len = usize::try_from(cap).map_or(self.count, |cap| cap.min(self.count));
        self.count -= len;
        self.addr = match self.addr.0.overflowing_add(len as u64) {
            (next, false) | (next @ 0, true) => GuestAddress(next),
            (_, true) => {
                self.count = 0;
                return Some(Err(GuestMemoryError::GuestAddressOverflow));
            }
        };
        let s = region.get_slice(start, len);
        if s.is_err() {
            self.count = 0;
        }
        Some(s)
    }
}

/// Once it has returned `None` or an error, it returns `None`.
impl<B: GuestMemoryBackend + ?Sized> FusedIterator for RamSlices<'_, B> {}

impl<'a, B: GuestMemoryBackend + ?Sized> GuestMemorySliceIterator<'a, MS<'a, B>>
    for RamSlices<'a, B>
{
    #[inline(always)]
    fn stop_on_error(
        self,
    ) -> GuestMemoryResult<impl Iterator<Item = VolatileSlice<'a, MS<'a, B>>>> {
        until_error(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestMemoryMmap};

    /// Two regions that touch, a hole, and a region at the top of the
    /// address space.
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x4000), 0x1000),
            (GuestAddress(u64::MAX - 0x1000), 0x1000),
        ])
        .unwrap()
    }

    /// Every `Bytes` access answers through `Ram` as through vm-memory's
    /// own iterator: the same bytes, the same successes and failures.
    #[test]
    fn bytes_through_ram_answer_as_through_the_backend() {
        let plain = mem();
        let other = mem();
        let ram = Ram::new(&other);
        let addrs = [
            0u64,
            0x10,
            0xff8,
            0xffc,
            0x1ff0,
            0x2000,
            0x3ffc,
            0x4000,
            0x4ff8,
            u64::MAX - 0x1000,
            u64::MAX - 7,
            u64::MAX - 3,
            u64::MAX,
        ];
        for &a in &addrs {
            for len in [0usize, 1, 4, 8, 16, 40, 0x1000, 0x1800] {
                let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ (a as u8)).collect();
                let at = GuestAddress(a);
                let w1 = plain.write(&data, at).map_err(|e| e.to_string());
                let w2 = <Ram<'_, _> as Bytes<GuestAddress>>::write(&ram, &data, at)
                    .map_err(|e| e.to_string());
                assert_eq!(w1, w2, "write {len} at {a:#x}");
                let (mut b1, mut b2) = (vec![0u8; len], vec![0u8; len]);
                let r1 = plain.read_slice(&mut b1, at).map_err(|e| e.to_string());
                let r2 = <Ram<'_, _> as Bytes<GuestAddress>>::read_slice(&ram, &mut b2, at)
                    .map_err(|e| e.to_string());
                assert_eq!(r1, r2, "read_slice {len} at {a:#x}");
                assert_eq!(b1, b2, "bytes read at {a:#x}");
                let s1 = plain.write_slice(&data, at).map_err(|e| e.to_string());
                let s2 = <Ram<'_, _> as Bytes<GuestAddress>>::write_slice(&ram, &data, at)
                    .map_err(|e| e.to_string());
                assert_eq!(s1, s2, "write_slice {len} at {a:#x}");
            }
            let l1 = plain
                .load::<u32>(GuestAddress(a), Ordering::Acquire)
                .map_err(|e| e.to_string());
            let l2 = <Ram<'_, _> as Bytes<GuestAddress>>::load::<u32>(
                &ram,
                GuestAddress(a),
                Ordering::Acquire,
            )
            .map_err(|e| e.to_string());
            assert_eq!(l1, l2, "load at {a:#x}");
            let t1 = plain
                .store(7u16, GuestAddress(a), Ordering::Release)
                .map_err(|e| e.to_string());
            let t2 = <Ram<'_, _> as Bytes<GuestAddress>>::store(
                &ram,
                7u16,
                GuestAddress(a),
                Ordering::Release,
            )
            .map_err(|e| e.to_string());
            assert_eq!(t1, t2, "store at {a:#x}");
        }
        // And the memory ends up the same.
        for (r1, r2) in [
            (0u64, 0x2000usize),
            (0x4000, 0x1000),
            (u64::MAX - 0x1000, 0x1000),
        ] {
            let (mut b1, mut b2) = (vec![0u8; r2], vec![0u8; r2]);
            plain.read_slice(&mut b1, GuestAddress(r1)).unwrap();
            other.read_slice(&mut b2, GuestAddress(r1)).unwrap();
            assert_eq!(b1, b2, "contents at {r1:#x}");
        }
        assert!(ram.check_range(GuestAddress(0xff0), 0x20, Permissions::Read));
        assert!(!ram.check_range(GuestAddress(0x1ff0), 0x20, Permissions::Read));
    }
}
