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
/// use vmm_iommu::RamUpdate;
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
        self.change_ram(update, true)
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
        self.change_ram(update, false)
    }

    /// A plug (`plug`) or an unplug of `update`'s range: the state's rule
    /// first, then every backend or none; the state is put back if one
    /// refuses. The host memory of the range comes from the object that
    /// maps it (`after` for a plug, `before` for an unplug); undoing a
    /// backend's change is the opposite call with the memory before it.
    fn change_ram<M: GuestMemoryBackend + 'static>(
        &self,
        update: &RamUpdate<'_, M>,
        plug: bool,
    ) -> Result<(), MemoryMapError> {
        let end = inclusive("RAM", update.start, update.len)?;
        let mut st = self.state_mut();
        let units = st.ram_units().to_vec();
        let mapped_by = if plug {
            st.add_ram(update.start, end)?;
            update.after
        } else {
            st.remove_ram(update.start, end)?;
            update.before
        };
        let host = match host_ranges(mapped_by, update.start, end) {
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
        let res = if plug {
            self.router.all_or_none(
                "a RAM plug",
                |b| b.add_ram(&change),
                |b| b.remove_ram(&undo),
            )
        } else {
            self.router.all_or_none(
                "a RAM unplug",
                |b| b.remove_ram(&change),
                |b| b.add_ram(&undo),
            )
        };
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{GuestMemoryMmap, GuestRegionMmap};

    use super::*;
    use crate::backend::{BackendCaps, IommuBackend};
    use crate::config::IommuConfig;
    use crate::fault::FaultQueue;
    use crate::router::Router;
    use crate::testing::{BackendCall, RecordingBackend};
    use crate::wire::{
        AttachReq, AttachTableReq, MapReq, Request, TableDesc, VIRTIO_IOMMU_F_ATTACH_TABLE,
        VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_IOMMU_F_MMIO, VIRTIO_IOMMU_MAP_F_MMIO,
        VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE,
    };

    const MIB: u64 = 1 << 20;
    /// Where the DIMM of the tests is plugged.
    const DIMM: u64 = 1 << 32;

    fn boot_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    /// The DIMM's plug from `before` to `after` (its unplug: the two
    /// swapped).
    fn dimm<'a>(
        before: &'a GuestMemoryMmap,
        after: &'a GuestMemoryMmap,
    ) -> RamUpdate<'a, GuestMemoryMmap> {
        RamUpdate {
            start: DIMM,
            len: 2 * MIB,
            before,
            after,
        }
    }

    fn with_dimm(mem: &GuestMemoryMmap) -> GuestMemoryMmap {
        let r = GuestRegionMmap::from_range(GuestAddress(DIMM), 2 << 20, None).unwrap();
        mem.insert_region(Arc::new(r)).unwrap()
    }

    /// A nested vIOMMU over 16 MiB of RAM, endpoint 8 served by `a` and
    /// 9 by `b`.
    fn viommu(a: &Arc<RecordingBackend>, b: &Arc<RecordingBackend>) -> Viommu {
        let cfg = IommuConfig {
            nested: Some(crate::config::NestedConfig {
                formats: vec![crate::config::TableFormat::IntelVtd],
                pasid_bits: 8,
            }),
            ..IommuConfig::default()
        };
        let mut router = Router::new();
        router.add(a.clone(), &[8]);
        router.add(b.clone(), &[9]);
        let faults = Arc::new(FaultQueue::new(16).unwrap());
        let v = Viommu::with_router(&cfg, &[8, 9], &[(0, 16 * MIB - 1)], faults, router);
        v.set_acked_features(
            1 << VIRTIO_IOMMU_F_MAP_UNMAP
                | 1 << VIRTIO_IOMMU_F_MMIO
                | 1 << VIRTIO_IOMMU_F_ATTACH_TABLE,
        );
        v
    }

    fn backends() -> (Arc<RecordingBackend>, Arc<RecordingBackend>) {
        (
            Arc::new(RecordingBackend::nested("a")),
            Arc::new(RecordingBackend::nested("b")),
        )
    }

    fn bind_vtd(
        v: &Viommu,
        dir: u64,
    ) -> Result<crate::viommu::Applied, crate::state::RequestError> {
        let t = TableDesc::IntelVtd {
            pasid_bits: 6,
            pasid_dir_ptr: dir,
        };
        v.apply(&Request::AttachTable(AttachTableReq::new(1, 8, &t)))
    }

    #[test]
    fn plugged_ram_reaches_every_backend_with_its_host_memory() {
        let (a, b) = backends();
        let v = viommu(&a, &b);
        let before = boot_memory();
        let after = with_dimm(&before);
        let u = dimm(&before, &after);
        v.add_ram(&u).unwrap();
        assert_eq!(v.ram(), [(0, 16 * MIB - 1), (DIMM, DIMM + 2 * MIB - 1)]);
        for x in [&a, &b] {
            assert_eq!(x.calls(), [BackendCall::AddRam(DIMM, DIMM + 2 * MIB - 1)]);
        }
        // The host memory handed over is the DIMM's own mapping.
        let host = host_ranges(&after, DIMM, DIMM + 2 * MIB - 1).unwrap();
        let region = after.find_region(GuestAddress(DIMM)).unwrap();
        let hva = region.get_host_address(MemoryRegionAddress(0)).unwrap() as u64;
        assert_eq!(
            host,
            [HostRange {
                gpa: DIMM,
                len: 2 * MIB,
                hva
            }]
        );
    }

    #[test]
    fn a_table_in_plugged_ram_is_accepted_only_after_the_plug() {
        let (a, b) = backends();
        let v = viommu(&a, &b);
        assert_eq!(
            bind_vtd(&v, DIMM).unwrap_err().status(),
            crate::wire::Status::Range
        );
        let before = boot_memory();
        let after = with_dimm(&before);
        v.add_ram(&dimm(&before, &after)).unwrap();
        bind_vtd(&v, DIMM).unwrap();
    }

    #[test]
    fn a_backend_refusing_a_plug_undoes_the_others_and_the_state() {
        let (a, b) = backends();
        let v = viommu(&a, &b);
        let before = boot_memory();
        let after = with_dimm(&before);
        b.fail_next(0);
        let err = v.add_ram(&dimm(&before, &after)).unwrap_err();
        assert!(matches!(err, MemoryMapError::Backend { ref backend, .. } if backend == "b"));
        let range = (DIMM, DIMM + 2 * MIB - 1);
        assert_eq!(
            a.calls(),
            [
                BackendCall::AddRam(range.0, range.1),
                BackendCall::RemoveRam(range.0, range.1)
            ]
        );
        assert_eq!(v.ram(), [(0, 16 * MIB - 1)]);
        assert_eq!(v.state().ram_units(), [(0, 16 * MIB - 1)]);
        assert_eq!(v.router().stats.snapshot().rollbacks, 1);
        // Nothing is left half done: the same plug now succeeds.
        v.add_ram(&dimm(&before, &after)).unwrap();
    }

    #[test]
    fn a_backend_refusing_an_unplug_keeps_the_ram_as_it_was_declared() {
        let (a, b) = backends();
        let v = viommu(&a, &b);
        let before = boot_memory();
        let after = with_dimm(&before);
        // Plugged in two halves, adjacent: two units.
        for half in [DIMM, DIMM + MIB] {
            v.add_ram(&RamUpdate {
                start: half,
                len: MIB,
                before: &before,
                after: &after,
            })
            .unwrap();
        }
        let units = v.state().ram_units().to_vec();
        let n = a.calls().len();
        a.fail_next(0);
        let unplug = dimm(&after, &before);
        assert!(matches!(
            v.remove_ram(&unplug),
            Err(MemoryMapError::Backend { .. })
        ));
        assert_eq!(v.state().ram_units(), &units[..]);
        assert_eq!(a.calls().len(), n + 1);
        // Backend b was never reached.
        assert!(!b
            .calls()
            .iter()
            .any(|c| matches!(c, BackendCall::RemoveRam(..))));
        // Either half can still go on its own.
        v.remove_ram(&RamUpdate {
            start: DIMM + MIB,
            len: MIB,
            before: &after,
            after: &after,
        })
        .unwrap();
        assert_eq!(v.ram(), [(0, 16 * MIB - 1), (DIMM, DIMM + MIB - 1)]);
    }

    #[test]
    fn a_failed_unplug_is_undone_with_the_memory_before_it() {
        // The first backend is undone with add_ram of the same range and
        // the host memory it had.
        let (a, b) = backends();
        let v = viommu(&a, &b);
        let before = boot_memory();
        let after = with_dimm(&before);
        v.add_ram(&dimm(&before, &after)).unwrap();
        b.fail_next(0);
        let unplug = dimm(&after, &before);
        assert!(v.remove_ram(&unplug).is_err());
        let r = (DIMM, DIMM + 2 * MIB - 1);
        assert_eq!(
            a.calls(),
            [
                BackendCall::AddRam(r.0, r.1),
                BackendCall::RemoveRam(r.0, r.1),
                BackendCall::AddRam(r.0, r.1)
            ]
        );
        assert_eq!(v.ram()[1], r);
    }

    #[test]
    fn bad_ranges_are_refused_before_any_backend_hears() {
        let (a, b) = backends();
        let v = viommu(&a, &b);
        let before = boot_memory();
        let after = with_dimm(&before);
        fn at<'a>(
            start: u64,
            len: u64,
            before: &'a GuestMemoryMmap,
            m: &'a GuestMemoryMmap,
        ) -> RamUpdate<'a, GuestMemoryMmap> {
            RamUpdate {
                start,
                len,
                before,
                after: m,
            }
        }
        assert!(matches!(
            v.add_ram(&at(DIMM, 0, &before, &after)),
            Err(MemoryMapError::Empty { .. })
        ));
        assert!(matches!(
            v.add_ram(&at(u64::MAX - 0xfff, 0x2000, &before, &after)),
            Err(MemoryMapError::Wraps { .. })
        ));
        // Overlapping boot RAM.
        assert!(matches!(
            v.add_ram(&at(15 * MIB, 2 * MIB, &before, &after)),
            Err(MemoryMapError::Overlaps { .. })
        ));
        // Not in the memory handed over.
        assert!(matches!(
            v.add_ram(&at(DIMM, 2 * MIB, &before, &before)),
            Err(MemoryMapError::NotInMemory { .. })
        ));
        assert!(matches!(
            v.add_ram(&at(DIMM, 3 * MIB, &before, &after)),
            Err(MemoryMapError::NotInMemory { .. })
        ));
        // Part of boot RAM, and RAM that is not there.
        assert!(matches!(
            v.remove_ram(&at(0, MIB, &before, &before)),
            Err(MemoryMapError::NotWholeRam { .. })
        ));
        assert!(matches!(
            v.remove_ram(&at(DIMM, 2 * MIB, &before, &before)),
            Err(MemoryMapError::NotWholeRam { .. })
        ));
        assert!(a.calls().is_empty() && b.calls().is_empty());
        assert_eq!(v.ram(), [(0, 16 * MIB - 1)]);
    }

    #[test]
    fn unplug_needs_the_range_in_the_memory_before_it() {
        let (a, b) = backends();
        let v = viommu(&a, &b);
        let mem = boot_memory();
        // Boot RAM named by the state but not held by this object.
        let other = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            v.remove_ram(&RamUpdate {
                start: 0,
                len: 16 * MIB,
                before: &other,
                after: &mem,
            }),
            Err(MemoryMapError::NotInMemory { .. })
        ));
        assert_eq!(v.ram(), [(0, 16 * MIB - 1)]);
        assert!(a.calls().is_empty() && b.calls().is_empty());
    }

    fn map_mmio(
        v: &Viommu,
        phys: u64,
    ) -> Result<crate::viommu::Applied, crate::state::RequestError> {
        v.apply(&Request::Map(MapReq {
            domain: 2,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: phys,
            flags: VIRTIO_IOMMU_MAP_F_WRITE | VIRTIO_IOMMU_MAP_F_MMIO,
        }))
    }

    #[test]
    fn map_f_mmio_reaches_only_registered_windows_and_a_withdrawn_window_keeps_its_mappings() {
        let (a, b) = backends();
        let v = viommu(&a, &b);
        v.apply(&Request::Attach(AttachReq {
            domain: 2,
            endpoint: 9,
            ..Default::default()
        }))
        .unwrap();
        let w = MmioWindow {
            gpa: 0xd000_0000,
            len: 0x4000,
            hva: Some(0x7f00_0000_0000),
        };
        assert_eq!(
            map_mmio(&v, 0xd000_0000).unwrap_err().status(),
            crate::wire::Status::Range
        );
        v.add_mmio_window(w).unwrap();
        assert_eq!(v.mmio_windows(), [w]);
        for x in [&a, &b] {
            assert_eq!(x.calls().last(), Some(&BackendCall::AddMmioWindow(w)));
        }
        map_mmio(&v, 0xd000_3000).unwrap();
        v.remove_mmio_window(0xd000_0000, 0x4000).unwrap();
        assert_eq!(b.calls().last(), Some(&BackendCall::RemoveMmioWindow(w)));
        // The mapping stays in the guest's view; new ones are refused.
        assert_eq!(v.state().mapping_count(2), 1);
        v.apply(&Request::Unmap(crate::wire::UnmapReq {
            domain: 2,
            virt_start: 0,
            virt_end: u64::MAX,
            reserved: [0; 4],
        }))
        .unwrap();
        assert!(map_mmio(&v, 0xd000_3000).is_err());
        // A plain memory mapping there is still a MAP past RAM: accepted.
        v.apply(&Request::Map(MapReq {
            domain: 2,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0xd000_3000,
            flags: VIRTIO_IOMMU_MAP_F_READ,
        }))
        .unwrap();
    }

    #[test]
    fn a_backend_refusing_a_window_leaves_it_unregistered() {
        let (a, b) = backends();
        let v = viommu(&a, &b);
        let w = MmioWindow {
            gpa: 0xd000_0000,
            len: 0x1000,
            hva: None,
        };
        b.fail_next(0);
        assert!(matches!(
            v.add_mmio_window(w),
            Err(MemoryMapError::Backend { .. })
        ));
        assert!(v.mmio_windows().is_empty());
        assert_eq!(
            a.calls(),
            [
                BackendCall::AddMmioWindow(w),
                BackendCall::RemoveMmioWindow(w)
            ]
        );
        // And refusing a withdrawal keeps it registered.
        v.add_mmio_window(w).unwrap();
        a.fail_next(0);
        assert!(v.remove_mmio_window(w.gpa, w.len).is_err());
        assert_eq!(v.mmio_windows(), [w]);
        assert!(matches!(
            v.remove_mmio_window(w.gpa, 0x2000),
            Err(MemoryMapError::NoWindow { .. })
        ));
    }

    #[test]
    fn a_backend_plugged_later_hears_the_windows_registered_before() {
        let (a, b) = backends();
        let v = viommu(&a, &b);
        let w = MmioWindow {
            gpa: 0xd000_0000,
            len: 0x1000,
            hva: Some(0x7f00_0000_0000),
        };
        v.add_mmio_window(w).unwrap();
        let c = Arc::new(RecordingBackend::new(
            "c",
            BackendCaps::map_only(!0xfff, (0, u64::MAX)),
        ));
        v.add_endpoint(10, Some(c.clone() as Arc<dyn IommuBackend>))
            .unwrap();
        assert_eq!(c.calls(), [BackendCall::AddMmioWindow(w)]);
        // A backend already registered is not told again.
        let n = a.calls().len();
        v.add_endpoint(11, Some(a.clone() as Arc<dyn IommuBackend>))
            .unwrap();
        assert_eq!(a.calls().len(), n);
        // One that refuses is not plugged.
        let d = Arc::new(RecordingBackend::new(
            "d",
            BackendCaps::map_only(!0xfff, (0, u64::MAX)),
        ));
        d.fail_next(0);
        assert!(matches!(
            v.add_endpoint(12, Some(d as Arc<dyn IommuBackend>)),
            Err(crate::viommu::HotplugError::Windows { endpoint: 12, .. })
        ));
        assert!(v.state().endpoint(12).is_none());
    }
}
