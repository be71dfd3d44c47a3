//! Guest memory that changes while the guest runs: RAM plugged and
//! unplugged (memory hot-plug, virtio-mem blocks), and the MMIO windows a
//! VMM serves as peer-to-peer DMA targets for `VIRTIO_IOMMU_MAP_F_MMIO`
//! mappings.
//!
//! Each change takes the state's write lock, like a request: it happens
//! between two requests, never inside one. The state's rule comes first
//! (no overlap, unplug whole ranges, withdraw whole windows), then every
//! backend hears of it; if one refuses, those before it are undone and the
//! state is put back, so the guest-visible state never changes on failure.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::Viommu;
use crate::backend::{HostRange, MmioWindow, RamChange};
use crate::state::{inclusive, MemoryMapError};

/// Guest RAM changing while the guest runs, as the VMM hands it to
/// [`Viommu::add_ram`] and [`Viommu::remove_ram`]: the range, and the
/// guest memory object before and after the change. Backends that read
/// guest memory (the software nested IOMMU walks guest tables in it, the
/// VFIO backends read PASID and CD tables) switch to `after`, and back to
/// `before` if the change is undone. For a virtio-mem block, whose region
/// the memory object holds all along, both are the same object.
///
/// ```
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
/// use vmm_iommu::config::IommuConfig;
/// use vmm_iommu::viommu::RamUpdate;
/// use vmm_iommu::Viommu;
///
/// let before = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)])?;
/// let viommu = Viommu::new(&IommuConfig::default(), &[8], &[(0, (16 << 20) - 1)])?;
///
/// // A DIMM of 16 MiB at 4 GiB: the VMM maps it, then tells the vIOMMU.
/// let dimm = vm_memory::GuestRegionMmap::from_range(GuestAddress(1 << 32), 16 << 20, None)?;
/// let after = before.insert_region(std::sync::Arc::new(dimm))?;
/// let dimm = RamUpdate { start: 1 << 32, len: 16 << 20, before: &before, after: &after };
/// viommu.add_ram(&dimm)?;
/// assert_eq!(viommu.ram(), [(0, (16 << 20) - 1), (1 << 32, (1 << 32) + (16 << 20) - 1)]);
///
/// // Unplug: the vIOMMU first, while the memory is still mapped.
/// let unplug = RamUpdate { start: 1 << 32, len: 16 << 20, before: &after, after: &before };
/// viommu.remove_ram(&unplug)?;
/// assert_eq!(viommu.ram(), [(0, (16 << 20) - 1)]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct RamUpdate<'a, M> {
    /// First guest-physical address of the range.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Guest memory before the change (for an unplug: it still maps the
    /// range).
    pub before: &'a M,
    /// Guest memory after the change (for a plug: it maps the range).
    pub after: &'a M,
}

/// The host memory behind `[start, end]` in `mem`, region by region.
pub fn host_ranges<M: GuestMemoryBackend>(
    mem: &M,
    start: u64,
    end: u64,
) -> Result<Vec<HostRange>, MemoryMapError> {
    let mut out = Vec::new();
    let mut at = start;
    loop {
        let region = mem
            .find_region(GuestAddress(at))
            .ok_or(MemoryMapError::NotInMemory { start, end })?;
        let base = region.start_addr().0;
        let hva = region
            .get_host_address(MemoryRegionAddress(at - base))
            .map_err(|_| MemoryMapError::NoHostAddress { gpa: base })?;
        // The region holds `at`, so its last address is at least `at`.
        let last = region.last_addr().0.min(end);
        out.push(HostRange {
            gpa: at,
            len: last - at + 1,
            hva: hva as u64,
        });
        if last == end {
            return Ok(out);
        }
        at = last + 1;
    }
}

impl Viommu {
    /// Guest RAM now: sorted, merged, inclusive `[start, end]` ranges.
    pub fn ram(&self) -> Vec<(u64, u64)> {
        self.state().ram().to_vec()
    }

    /// The MMIO windows `MAP_F_MMIO` mappings may point into now, sorted.
    pub fn mmio_windows(&self) -> Vec<MmioWindow> {
        self.state().mmio_windows().to_vec()
    }

    /// Guest RAM `[update.start, update.start + update.len)` was plugged:
    /// the VMM mapped it, `update.after` holds it. It becomes RAM for the
    /// state (ATTACH_TABLE pointers into it are accepted) and every
    /// backend maps it where its endpoints' state asks (bypass and stage 2
    /// at its GPA, the parts of MAP-mode mappings that reach into it) and
    /// reads guest tables from `update.after`. Refused, with nothing
    /// changed, when the range is empty, wraps, overlaps RAM or an MMIO
    /// window, is not all in `update.after` with a host mapping, or a
    /// backend fails (those before it are undone). Emulated devices' own
    /// memory views ([`crate::dma_memory::DmaMemory::set_memory`],
    /// `IommuMemory`) are the VMM's to update.
    pub fn add_ram<M: GuestMemoryBackend + 'static>(
        &self,
        update: &RamUpdate<'_, M>,
    ) -> Result<(), MemoryMapError> {
        let end = inclusive("RAM", update.start, update.len)?;
        let host = host_ranges(update.after, update.start, end)?;
        let mut st = self.state_mut();
        let units = st.ram_units().to_vec();
        st.add_ram(update.start, end)?;
        let change = RamChange {
            start: update.start,
            end,
            host: &host,
            memory: update.after,
        };
        let undo = RamChange {
            memory: update.before,
            ..change
        };
        let res = self.router.all_or_none(
            "a RAM plug",
            |b| b.add_ram(&change),
            |b| b.remove_ram(&undo),
        );
        if let Err((backend, source)) = res {
            st.set_ram_units(units);
            return Err(MemoryMapError::Backend { backend, source });
        }
        Ok(())
    }

    /// Guest RAM `[update.start, update.start + update.len)` is to be
    /// unplugged. Call it **before** unmapping the memory (`update.before`
    /// still maps it): when it returns, no backend has a host mapping into
    /// the range any more (a VFIO container or IOAS that pinned it has
    /// unpinned it) and every backend reads guest tables from
    /// `update.after`. The range must be whole RAM ranges as they were
    /// declared (at construction or by [`Self::add_ram`]; adjacent ones
    /// may go together). The guest's mappings and bound tables stay as the
    /// guest made them: DMA and table walks into the range fault from now
    /// on, as past RAM. Refused, with nothing changed, when the range is
    /// not such RAM, is not all in `update.before`, or a backend fails
    /// (those before it are undone).
    pub fn remove_ram<M: GuestMemoryBackend + 'static>(
        &self,
        update: &RamUpdate<'_, M>,
    ) -> Result<(), MemoryMapError> {
        let end = inclusive("RAM", update.start, update.len)?;
        let mut st = self.state_mut();
        let units = st.ram_units().to_vec();
        st.remove_ram(update.start, end)?;
        let host = match host_ranges(update.before, update.start, end) {
            Ok(h) => h,
            Err(e) => {
                st.set_ram_units(units);
                return Err(e);
            }
        };
        let change = RamChange {
            start: update.start,
            end,
            host: &host,
            memory: update.after,
        };
        let undo = RamChange {
            memory: update.before,
            ..change
        };
        let res = self.router.all_or_none(
            "a RAM unplug",
            |b| b.remove_ram(&change),
            |b| b.add_ram(&undo),
        );
        if let Err((backend, source)) = res {
            st.set_ram_units(units);
            return Err(MemoryMapError::Backend { backend, source });
        }
        Ok(())
    }

    /// Registers `window` as device MMIO the VMM serves as a DMA target: a
    /// `VIRTIO_IOMMU_MAP_F_MMIO` mapping must lie in such windows (a MAP
    /// that does not is RANGE). With a host address (the VMM's mmap of a
    /// VFIO BAR), the VFIO type1 backend maps MMIO mappings into it with
    /// `VFIO_IOMMU_MAP_DMA` of that address, so assigned devices reach it
    /// peer to peer; without one (MMIO only the VMM's bus serves, such as
    /// the irqchip's MSI doorbell), emulated devices reach it through the
    /// VMM and assigned devices fault. Register a BAR when the guest
    /// enables it and withdraw it ([`Self::remove_mmio_window`]) before it
    /// moves or goes. Refused, with nothing changed, when the window is
    /// empty, wraps, overlaps RAM or another window, or a backend fails.
    pub fn add_mmio_window(&self, window: MmioWindow) -> Result<(), MemoryMapError> {
        let mut st = self.state_mut();
        st.add_mmio_window(window)?;
        let res = self.router.all_or_none(
            "an MMIO window",
            |b| b.add_mmio_window(&window),
            |b| b.remove_mmio_window(&window),
        );
        if let Err((backend, source)) = res {
            // Registered just above: this finds it.
            let _ = st.remove_mmio_window(window.gpa, window.last());
            return Err(MemoryMapError::Backend { backend, source });
        }
        Ok(())
    }

    /// Withdraws the window registered at exactly `[gpa, gpa + len)` and
    /// returns it. Call it before unmapping the region: when it returns,
    /// no backend maps into it. MMIO mappings into it stay in the guest's
    /// view (their DMA faults from now on); a new MAP into it is RANGE.
    /// Refused, with nothing changed, when no such window is registered or
    /// a backend fails.
    pub fn remove_mmio_window(&self, gpa: u64, len: u64) -> Result<MmioWindow, MemoryMapError> {
        let end = inclusive("MMIO window", gpa, len)?;
        let mut st = self.state_mut();
        let window = st.remove_mmio_window(gpa, end)?;
        let res = self.router.all_or_none(
            "an MMIO window's withdrawal",
            |b| b.remove_mmio_window(&window),
            |b| b.add_mmio_window(&window),
        );
        if let Err((backend, source)) = res {
            // It was registered a moment ago, so nothing overlaps it.
            let _ = st.add_mmio_window(window);
            return Err(MemoryMapError::Backend { backend, source });
        }
        Ok(window)
    }
}
