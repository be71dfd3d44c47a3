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

use std::cell::Cell;
use std::iter::FusedIterator;

use vm_memory::bitmap::{BS, MS};
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    GuestMemoryResult, MemoryRegionAddress, Permissions, VolatileSlice,
};

use crate::slices::until_error;

/// A `GuestMemory` view of the backend `mem`, accessed without
/// translation (what the backend's own blanket `GuestMemory` does).
///
/// It remembers the region the last access fell in: a pass's accesses
/// (rings, descriptors, requests, statuses) nearly all fall in one region,
/// and the backend's lookup is a search over a list of shared pointers
/// that cost a tenth of a MAP+UNMAP pair's time.
pub(super) struct Ram<'m, B: GuestMemoryBackend + ?Sized> {
    mem: &'m B,
    hot: Cell<Hot<'m, B::R>>,
}

/// The region of the last access: its guest start, its length, itself.
struct Hot<'m, R> {
    base: u64,
    len: u64,
    region: Option<&'m R>,
}

impl<R> Clone for Hot<'_, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<R> Copy for Hot<'_, R> {}

impl<'m, B: GuestMemoryBackend + ?Sized> Ram<'m, B> {
    pub(super) fn new(mem: &'m B) -> Self {
        Ram {
            mem,
            hot: Cell::new(Hot {
                base: 0,
                len: 0,
                region: None,
            }),
        }
    }

    /// The region holding `addr`, `addr`'s offset in it, and the bytes
    /// from there to the region's end (never 0).
    #[inline(always)]
    fn region_of(&self, addr: GuestAddress) -> Option<(&'m B::R, MemoryRegionAddress, u64)> {
        let hot = self.hot.get();
        let offset = addr.0.wrapping_sub(hot.base);
        match hot.region {
            Some(region) if offset < hot.len => {
                Some((region, MemoryRegionAddress(offset), hot.len - offset))
            }
            _ => self.region_of_cold(addr),
        }
    }

    #[inline(never)]
    fn region_of_cold(&self, addr: GuestAddress) -> Option<(&'m B::R, MemoryRegionAddress, u64)> {
        let (region, offset) = self.mem.to_region_addr(addr)?;
        let len = region.len();
        self.hot.set(Hot {
            base: region.start_addr().0,
            len,
            region: Some(region),
        });
        Some((region, offset, len.checked_sub(offset.0)?))
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
            ram: self,
            addr,
            count,
        })
    }

    fn physical_memory(&self) -> Option<&B> {
        Some(self.mem)
    }
}

/// The slices of `count` bytes at `addr`, one per region crossed.
struct RamSlices<'a, 'm, B: GuestMemoryBackend + ?Sized> {
    ram: &'a Ram<'m, B>,
    addr: GuestAddress,
    count: usize,
}

impl<'a, B: GuestMemoryBackend + ?Sized> Iterator for RamSlices<'a, '_, B> {
    type Item = GuestMemoryResult<VolatileSlice<'a, MS<'a, B>>>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.count == 0 {
            return None;
        }
        let Some((region, start, cap)) = self.ram.region_of(self.addr) else {
            self.count = 0;
            return Some(Err(GuestMemoryError::InvalidGuestAddress(self.addr)));
        };
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

impl<B: GuestMemoryBackend + ?Sized> FusedIterator for RamSlices<'_, '_, B> {}

impl<'a, B: GuestMemoryBackend + ?Sized> GuestMemorySliceIterator<'a, MS<'a, B>>
    for RamSlices<'a, '_, B>
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

    #[test]
    fn the_remembered_region_never_answers_for_an_address_outside_it() {
        let mem = mem();
        for (i, b) in [(0u64, 0x11u8), (0x1000, 0x22), (0x4000, 0x44)] {
            mem.write_slice(&[b; 0x1000], GuestAddress(i)).unwrap();
        }
        let ram = Ram::new(&mem);
        let byte_at = |a: u64| {
            let mut b = [0u8; 1];
            <Ram<'_, _> as Bytes<GuestAddress>>::read_slice(&ram, &mut b, GuestAddress(a))
                .map(|()| b[0])
                .ok()
        };
        // Each access remembers its region; the next one lands just past
        // it (a touching region, a hole, the region before), or wraps.
        let walk = [
            (0xfff, Some(0x11)),
            (0x1000, Some(0x22)),
            (0x1fff, Some(0x22)),
            (0x2000, None),
            (0x0, Some(0x11)),
            (0x4000, Some(0x44)),
            (0x3fff, None),
            (0x5000, None),
            (0x4fff, Some(0x44)),
            (u64::MAX - 1, Some(0)),
            (u64::MAX, None),
            (0x0, Some(0x11)),
            (u64::MAX - 0x1000, Some(0)),
            (u64::MAX - 0x1001, None),
        ];
        for (a, want) in walk {
            assert_eq!(byte_at(a), want, "byte at {a:#x}");
        }
        // A copy that starts in the remembered region and runs past it
        // continues in the next region, as the backend's own does.
        let mut two = [0u8; 2];
        <Ram<'_, _> as Bytes<GuestAddress>>::read_slice(&ram, &mut two, GuestAddress(0xfff))
            .unwrap();
        assert_eq!(two, [0x11, 0x22]);
        assert!(<Ram<'_, _> as Bytes<GuestAddress>>::read_slice(
            &ram,
            &mut two,
            GuestAddress(0x1fff)
        )
        .is_err());
    }
}
