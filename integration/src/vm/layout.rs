//! Guest-physical layout: where RAM is, where the MMIO gap is, and the
//! guest memory that backs the RAM.
//!
//! RAM is always split in two around a hole: low RAM from 0, then nothing
//! up to the MMIO gap, then high RAM from 4 GiB. The split is deliberate
//! even for small guests, so that DMA, queues and MAP requests meet a
//! region boundary and a hole in every run.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::abi;

/// Smallest guest the test VMM builds: the fixed low area (tables, program,
/// stack) plus room for queues and buffers, twice (low and high).
pub const MIN_MEMORY_MIB: u64 = 16;

/// Low RAM never reaches into the MMIO gap.
const MAX_LOW_RAM: u64 = abi::MMIO_GAP_START;
/// RAM regions are multiples of the 2 MiB pages the page tables use.
const RAM_ALIGN: u64 = 2 << 20;

/// An error building the layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The configured memory is too small for the layout.
    #[error("memory.size_mib: the KVM test VMM needs at least {MIN_MEMORY_MIB} MiB, got {0}")]
    TooSmall(u64),
    /// The configured memory is not a multiple of 4 MiB, so it cannot be
    /// split into two 2 MiB-aligned halves.
    #[error("memory.size_mib: the KVM test VMM needs a multiple of 4 MiB, got {0}")]
    Unaligned(u64),
    /// The host refused the memory.
    #[error("cannot allocate {size_mib} MiB of guest memory: {source}")]
    Alloc {
        /// The size asked for.
        size_mib: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Where the guest's RAM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// End (exclusive) of low RAM, which starts at 0.
    pub low_end: u64,
    /// Start of high RAM.
    pub high_start: u64,
    /// End (exclusive) of high RAM.
    pub high_end: u64,
}

impl Layout {
    /// The layout of a guest with `size_mib` MiB of RAM: half low, half
    /// high (low capped below the MMIO gap).
    pub fn new(size_mib: u64) -> Result<Self, LayoutError> {
        if size_mib < MIN_MEMORY_MIB {
            return Err(LayoutError::TooSmall(size_mib));
        }
        if size_mib % 4 != 0 {
            return Err(LayoutError::Unaligned(size_mib));
        }
        // The config bounds size_mib (64 GiB), so this cannot overflow.
        let size = size_mib << 20;
        let low = (size / 2).min(MAX_LOW_RAM) & !(RAM_ALIGN - 1);
        let high_start = abi::MMIO_GAP_END;
        Ok(Layout {
            low_end: low,
            high_start,
            high_end: high_start + (size - low),
        })
    }

    /// RAM as `[start, end]` inclusive ranges, as `VirtioIommu::new` takes
    /// them.
    pub fn ram_inclusive(&self) -> [(u64, u64); 2] {
        [(0, self.low_end - 1), (self.high_start, self.high_end - 1)]
    }

    /// Whether `[addr, addr + len)` is inside one RAM region.
    pub fn in_ram(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        end <= self.low_end || (addr >= self.high_start && end <= self.high_end)
    }

    /// Guest memory backing both regions.
    pub fn guest_memory(&self) -> Result<GuestMemoryMmap, LayoutError> {
        let size_mib = (self.low_end + (self.high_end - self.high_start)) >> 20;
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), self.low_end as usize),
            (
                GuestAddress(self.high_start),
                (self.high_end - self.high_start) as usize,
            ),
        ])
        .map_err(|source| LayoutError::Alloc { size_mib, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_split_in_two_halves_around_the_gap() {
        let l = Layout::new(256).unwrap();
        assert_eq!(l.low_end, 128 << 20);
        assert_eq!(l.high_start, 1 << 32);
        assert_eq!(l.high_end, (1 << 32) + (128 << 20));
    }

    #[test]
    fn low_ram_never_reaches_the_mmio_gap() {
        let l = Layout::new(16 * 1024).unwrap();
        assert_eq!(l.low_end, abi::MMIO_GAP_START);
        assert_eq!(l.high_end - l.high_start, (16 << 30) - abi::MMIO_GAP_START);
    }

    #[test]
    fn too_small_or_odd_sizes_are_rejected_naming_the_field() {
        let e = Layout::new(8).unwrap_err().to_string();
        assert!(e.starts_with("memory.size_mib:"), "{e}");
        assert!(matches!(Layout::new(18), Err(LayoutError::Unaligned(18))));
    }

    #[test]
    fn in_ram_refuses_ranges_across_the_hole_or_wrapping() {
        let l = Layout::new(64).unwrap();
        assert!(l.in_ram(0, l.low_end));
        assert!(!l.in_ram(l.low_end - 1, 2));
        assert!(l.in_ram(l.high_start, 16));
        assert!(!l.in_ram(u64::MAX, 2));
    }
}
