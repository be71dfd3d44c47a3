//! How the walkers read guest memory: one narrow trait, so that a walk can
//! run over `vm-memory` guest RAM, a test double, or a wrapper that counts
//! reads, and so that "outside guest RAM" is an ordinary `None` the walker
//! turns into a typed fault instead of an error it could forget.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    VolatileMemory,
};

/// Read access to guest-physical memory for the table walkers.
pub trait TableMemory {
    /// Reads a little-endian u64 at guest-physical `gpa`; `None` if any byte
    /// is outside guest RAM.
    fn read_u64(&self, gpa: u64) -> Option<u64>;

    /// Reads `buf.len()` bytes at `gpa`; `None` if any byte is outside guest
    /// RAM.
    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Option<()>;
}

/// Every `vm-memory` guest memory reads tables. Give the walkers the
/// guest-physical view (e.g. `GuestMemoryMmap`): an `IommuMemory` would
/// translate the table pointers as IOVAs, which stage-1 pointers are not.
impl<M: GuestMemory + ?Sized> TableMemory for M {
    #[inline]
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        // The last byte must be addressable: a u64 at u64::MAX - 3 wraps.
        gpa.checked_add(7)?;
        // Fast path: an aligned entry in plain guest RAM is one region
        // lookup and one atomic 64-bit load, which is also what hardware
        // does (a page-table entry is read single-copy atomically, so a
        // guest updating it concurrently is seen before or after, never
        // torn). Acquire keeps the reads of the next level after the read
        // of the pointer to it. (`get_atomic_ref` + `load` measures about
        // half the cost of `Bytes::load` on the region.)
        if gpa & 7 == 0 {
            if let Some(phys) = self.physical_memory() {
                let addr = GuestAddress(gpa);
                let region = phys.find_region(addr)?;
                let offset = usize::try_from(region.to_region_addr(addr)?.raw_value()).ok()?;
                if let Ok(slice) = region.as_volatile_slice() {
                    if let Ok(word) = slice.get_atomic_ref::<AtomicU64>(offset) {
                        return Some(u64::from_le(word.load(Ordering::Acquire)));
                    }
                }
                // Not loadable in one piece (the region ends inside the
                // word, or is not plain memory): fall back to the byte
                // path, which can span regions.
            }
        }
        let mut b = [0u8; 8];
        self.read_slice(&mut b, GuestAddress(gpa)).ok()?;
        Some(u64::from_le_bytes(b))
    }

    #[inline]
    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Option<()> {
        let len = u64::try_from(buf.len()).ok()?;
        if len > 0 {
            gpa.checked_add(len - 1)?;
        }
        self.read_slice(buf, GuestAddress(gpa)).ok()
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x2000), 0x1000)])
            .unwrap()
    }

    #[test]
    fn read_u64_is_little_endian() {
        let m = mem();
        m.write_slice(&[1, 2, 3, 4, 5, 6, 7, 8], GuestAddress(0x100))
            .unwrap();
        assert_eq!(m.read_u64(0x100), Some(0x0807_0605_0403_0201));
    }

    #[test]
    fn read_u64_unaligned_reads_the_same_bytes() {
        let m = mem();
        m.write_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9], GuestAddress(0x100))
            .unwrap();
        assert_eq!(m.read_u64(0x101), Some(0x0908_0706_0504_0302));
    }

    #[test]
    fn read_u64_outside_ram_is_none() {
        let m = mem();
        assert_eq!(m.read_u64(0x3000), None);
        assert_eq!(m.read_u64(0x2ffc), None); // straddles the end of RAM
        assert_eq!(m.read_u64(u64::MAX - 3), None); // wraps
        assert_eq!(m.read_u64(!7), None);
    }

    #[test]
    fn read_u64_spanning_two_adjacent_regions_reads_both() {
        let m = mem();
        m.write_slice(&[0xaa; 4], GuestAddress(0x1ffc)).unwrap();
        m.write_slice(&[0xbb; 4], GuestAddress(0x2000)).unwrap();
        assert_eq!(m.read_u64(0x1ffc), Some(0xbbbb_bbbb_aaaa_aaaa));
    }

    #[test]
    fn read_bytes_checks_the_whole_range() {
        let m = mem();
        let mut buf = [0u8; 64];
        assert_eq!(m.read_bytes(0x2fc0, &mut buf), Some(()));
        assert_eq!(m.read_bytes(0x2fc8, &mut buf), None);
        assert_eq!(m.read_bytes(u64::MAX - 8, &mut buf), None);
        assert_eq!(m.read_bytes(u64::MAX, &mut []), Some(()));
    }
}
