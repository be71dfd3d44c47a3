//! Guest memory that changes while the guest runs, over the recording
//! host, byte for byte: RAM plugged and unplugged under type1 containers
//! and iommufd IOASes (bypass, MAP mode, stage 2), failures rolled back,
//! and MMIO windows: peer-to-peer `VFIO_IOMMU_MAP_DMA` of a BAR's mmap on
//! type1, UNSUPP on iommufd.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vfio_bindings::bindings::vfio::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};
use vfio_passthrough::host::Op;
use vfio_passthrough::recording::RecordingHost;
use vfio_passthrough::{IommufdBackend, Type1Backend};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_iommu::backend::{
    BackendError, DomainView, HostRange, IommuBackend, MmioWindow, RamChange, TableBinding,
};
use vmm_iommu::config::IommuConfig;
use vmm_iommu::wire::{
    AttachReq, MapReq, Request, Status, TableDesc, VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_IOMMU_F_MMIO,
    VIRTIO_IOMMU_MAP_F_MMIO, VIRTIO_IOMMU_MAP_F_WRITE,
};
use vmm_iommu::FaultQueue;
use vmm_iommu::Mapping;
use vmm_iommu::Router;
use vmm_iommu::Viommu;
use vmm_iommu::{host_ranges, RamUpdate};

const DEV: &str = "/sys/bus/pci/devices/0000:65:00.0";
const DEV2: &str = "/sys/bus/pci/devices/0000:66:00.0";
const EP: u32 = 16;
/// 1 MiB plugged right after the high RAM region (1 MiB at 4 GiB).
const DIMM: u64 = 0x1_0010_0000;
const DIMM_LEN: u64 = 0x10_0000;
const DIMM_END: u64 = DIMM + DIMM_LEN - 1;
/// A BAR the VMM mmapped, and where its mmap is.
const BAR: u64 = 0xe000_0000;
const BAR_HVA: u64 = 0x7e00_0000_0000;

fn with_dimm(mem: &GuestMemoryMmap) -> GuestMemoryMmap {
    let r = GuestRegionMmap::from_range(GuestAddress(DIMM), DIMM_LEN as usize, None).unwrap();
    mem.insert_region(Arc::new(r)).unwrap()
}

/// The plug of the DIMM (memory `after` holds it) and its unplug (memory
/// `before` does not), with the host memory behind it.
struct Dimm {
    before: GuestMemoryMmap,
    after: GuestMemoryMmap,
    host: Vec<HostRange>,
}

impl Dimm {
    fn new(mem: &GuestMemoryMmap) -> Self {
        let after = with_dimm(mem);
        let host = host_ranges(&after, DIMM, DIMM_END).unwrap();
        Dimm {
            before: mem.clone(),
            after,
            host,
        }
    }

    fn hva(&self) -> u64 {
        self.host[0].hva
    }

    fn plug(&self) -> RamChange<'_> {
        RamChange {
            start: DIMM,
            end: DIMM_END,
            host: &self.host,
            memory: &self.after,
        }
    }

    fn unplug(&self) -> RamChange<'_> {
        RamChange {
            memory: &self.before,
            ..self.plug()
        }
    }
}

fn view(id: u32, mappings: &[Mapping]) -> DomainView<'_> {
    DomainView {
        id,
        bypass: false,
        mappings,
        table: None,
    }
}

/// The (iova, vaddr, size, flags) of each `VFIO_IOMMU_MAP_DMA` since call
/// `from` (argsz@0 flags@4 vaddr@8 iova@16 size@24).
fn dma_maps(rec: &RecordingHost, from: usize) -> Vec<(u64, u64, u64, u32)> {
    rec.calls()[from..]
        .iter()
        .filter(|c| c.op == Op::Type1MapDma)
        .map(|c| {
            assert_eq!(le32(&c.arg, 0), 32);
            (
                le64(&c.arg, 16),
                le64(&c.arg, 8),
                le64(&c.arg, 24),
                le32(&c.arg, 4),
            )
        })
        .collect()
}

/// The (iova, size) of each `VFIO_IOMMU_UNMAP_DMA` since call `from`
/// (argsz@0 flags@4 iova@8 size@16).
fn dma_unmaps(rec: &RecordingHost, from: usize) -> Vec<(u64, u64)> {
    rec.calls()[from..]
        .iter()
        .filter(|c| c.op == Op::Type1UnmapDma)
        .map(|c| {
            assert_eq!((le32(&c.arg, 0), le32(&c.arg, 4)), (24, 0));
            (le64(&c.arg, 8), le64(&c.arg, 16))
        })
        .collect()
}

const RW: u32 = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;

fn type1() -> (Arc<RecordingHost>, Type1Backend, Dimm) {
    let (rec, host, mem, ram) = setup(RecordingHost::default());
    let b = Type1Backend::new(host, ram);
    b.add_endpoint(EP, Path::new(DEV)).unwrap();
    (rec, b, Dimm::new(&mem))
}

#[test]
fn type1_bypass_container_gains_plugged_ram_at_its_gpa_and_loses_it_on_unplug() {
    let (rec, b, dimm) = type1();
    b.set_unattached_bypass(EP, true).unwrap();
    let c = b.container_of(EP).unwrap();
    let from = rec.len();
    b.add_ram(&dimm.plug()).unwrap();
    assert_eq!(dma_maps(&rec, from), [(DIMM, dimm.hva(), DIMM_LEN, RW)]);
    assert_eq!(rec.len(), from + 1);
    assert_eq!(rec.type1_mappings(c).len(), 5);
    let from = rec.len();
    b.remove_ram(&dimm.unplug()).unwrap();
    assert_eq!(rec.ops()[from..], [Op::Type1UnmapDma]);
    assert_eq!(dma_unmaps(&rec, from), [(DIMM, DIMM_LEN)]);
    assert_eq!(rec.type1_mappings(c).len(), 4);
    // Bypass set after the plug covers the DIMM too.
    b.add_ram(&dimm.plug()).unwrap();
    b.set_unattached_bypass(EP, false).unwrap();
    b.set_unattached_bypass(EP, true).unwrap();
    assert!(rec.type1_mappings(c).contains(&(DIMM, DIMM_LEN)));
}

#[test]
fn type1_mapping_past_ram_is_pinned_on_plug_and_unpinned_on_unplug() {
    let (rec, b, dimm) = type1();
    // Starts in the last page of high RAM and runs into the DIMM's place;
    // another lies wholly there.
    let straddling = rw(0x8000_0000, 0x8000_1fff, DIMM - 0x1000);
    let beyond = rw(0x9000_0000, 0x9000_ffff, DIMM + 0x4000);
    b.attach(EP, &view(1, &[straddling, beyond])).unwrap();
    let c = b.container_of(EP).unwrap();
    assert_eq!(rec.type1_mappings(c), [(0x8000_0000, 0x1000)]);
    let from = rec.len();
    b.add_ram(&dimm.plug()).unwrap();
    assert_eq!(
        dma_maps(&rec, from),
        [
            (0x8000_1000, dimm.hva(), 0x1000, RW),
            (0x9000_0000, dimm.hva() + 0x4000, 0x1_0000, RW)
        ]
    );
    let from = rec.len();
    b.remove_ram(&dimm.unplug()).unwrap();
    assert_eq!(
        dma_unmaps(&rec, from),
        [(0x8000_1000, 0x1000), (0x9000_0000, 0x1_0000)]
    );
    assert_eq!(rec.type1_mappings(c), [(0x8000_0000, 0x1000)]);
    // The mappings stay the guest's: UNMAP takes what is pinned of them.
    let from = rec.len();
    b.unmap(1, &[straddling, beyond]).unwrap();
    assert_eq!(dma_unmaps(&rec, from), [(0x8000_0000, 0x1000)]);
    assert!(rec.type1_mappings(c).is_empty());
}

#[test]
fn type1_plug_failing_halfway_rolls_back_every_container() {
    let (rec, b, dimm) = type1();
    b.add_endpoint(17, Path::new(DEV2)).unwrap();
    b.set_unattached_bypass(EP, true).unwrap();
    b.set_unattached_bypass(17, true).unwrap();
    let before: Vec<_> = [EP, 17]
        .iter()
        .map(|&ep| rec.type1_mappings(b.container_of(ep).unwrap()))
        .collect();
    rec.fail_nth(
        Op::Type1MapDma,
        rec.count(Op::Type1MapDma) + 1,
        libc::ENOMEM,
    );
    let from = rec.len();
    let e = b.add_ram(&dimm.plug()).unwrap_err();
    assert!(matches!(
        e,
        BackendError::Host {
            op: "VFIO_IOMMU_MAP_DMA",
            ..
        }
    ));
    assert_eq!(
        rec.ops()[from..],
        [Op::Type1MapDma, Op::Type1MapDma, Op::Type1UnmapDma]
    );
    let after: Vec<_> = [EP, 17]
        .iter()
        .map(|&ep| rec.type1_mappings(b.container_of(ep).unwrap()))
        .collect();
    assert_eq!(after, before);
    // The backend kept its RAM: the same plug succeeds whole.
    b.add_ram(&dimm.plug()).unwrap();
    for ep in [EP, 17] {
        assert_eq!(rec.type1_mappings(b.container_of(ep).unwrap()).len(), 5);
    }
}

#[test]
fn type1_refuses_overlapping_plugs_partial_unplugs_and_foreign_memory_before_any_ioctl() {
    let (rec, b, dimm) = type1();
    b.set_unattached_bypass(EP, true).unwrap();
    let from = rec.len();
    // Part of a region.
    let half = RamChange {
        end: DIMM + DIMM_LEN / 2 - 1,
        ..dimm.unplug()
    };
    b.add_ram(&dimm.plug()).unwrap();
    let from2 = rec.len();
    assert_eq!(b.remove_ram(&half).unwrap_err().status(), Status::Inval);
    // Plugged twice.
    assert_eq!(b.add_ram(&dimm.plug()).unwrap_err().status(), Status::Inval);
    // Memory of a type it cannot read tables from.
    let foreign = RamChange {
        memory: &0u32,
        ..dimm.unplug()
    };
    assert_eq!(b.remove_ram(&foreign).unwrap_err().status(), Status::Inval);
    assert_eq!(rec.len(), from2);
    assert_eq!(rec.len(), from + 1);
}

#[test]
fn type1_lowers_an_mmio_mapping_in_a_bar_window_to_a_peer_to_peer_dma_map() {
    let (rec, b, _) = type1();
    let w = MmioWindow {
        gpa: BAR,
        len: 0x4000,
        hva: Some(BAR_HVA),
    };
    b.add_mmio_window(&w).unwrap();
    let mut doorbell = rw(0x7000_0000, 0x7000_0fff, BAR + 0x2000);
    doorbell.flags = VIRTIO_IOMMU_MAP_F_WRITE | VIRTIO_IOMMU_MAP_F_MMIO;
    b.attach(EP, &view(1, &[])).unwrap();
    let c = b.container_of(EP).unwrap();
    let from = rec.len();
    b.map(1, &doorbell).unwrap();
    assert_eq!(
        dma_maps(&rec, from),
        [(
            0x7000_0000,
            BAR_HVA + 0x2000,
            0x1000,
            VFIO_DMA_MAP_FLAG_WRITE
        )]
    );
    // The window goes before the BAR's mmap: the map goes with it, the
    // mapping stays, and comes back with the window.
    let from = rec.len();
    b.remove_mmio_window(&w).unwrap();
    assert_eq!(dma_unmaps(&rec, from), [(0x7000_0000, 0x1000)]);
    assert!(rec.type1_mappings(c).is_empty());
    b.add_mmio_window(&w).unwrap();
    assert_eq!(rec.type1_mappings(c), [(0x7000_0000, 0x1000)]);
    // Attaching another endpoint replays it there too.
    b.add_endpoint(17, Path::new(DEV2)).unwrap();
    b.attach(17, &view(1, &[doorbell])).unwrap();
    assert_eq!(
        rec.type1_mappings(b.container_of(17).unwrap()),
        [(0x7000_0000, 0x1000)]
    );
}

#[test]
fn type1_maps_nothing_for_a_window_without_host_memory() {
    let (rec, b, _) = type1();
    let w = MmioWindow {
        gpa: 0xfee0_0000,
        len: 0x1000,
        hva: None,
    };
    b.add_mmio_window(&w).unwrap();
    b.attach(EP, &view(1, &[])).unwrap();
    let mut msi = rw(0x800_0000, 0x800_0fff, 0xfee0_0000);
    msi.flags = VIRTIO_IOMMU_MAP_F_WRITE | VIRTIO_IOMMU_MAP_F_MMIO;
    let from = rec.len();
    b.map(1, &msi).unwrap();
    b.remove_mmio_window(&w).unwrap();
    assert_eq!(rec.len(), from);
}

/// A vIOMMU over a type1 backend serving EP.
fn viommu_over_type1() -> (
    Arc<RecordingHost>,
    Arc<Type1Backend>,
    Viommu,
    GuestMemoryMmap,
) {
    let (rec, host, mem, ram) = setup(RecordingHost::default());
    let b = Arc::new(Type1Backend::new(host, ram));
    b.add_endpoint(EP, Path::new(DEV)).unwrap();
    let mut router = Router::new();
    router.add(b.clone(), &[EP]);
    let cfg = IommuConfig::default();
    let faults = Arc::new(FaultQueue::new(16).unwrap());
    let ram: Vec<(u64, u64)> = [(0, 0xff_ffff), (0x1_0000_0000, 0x1_000f_ffff)].to_vec();
    let v = Viommu::with_router(&cfg, &[EP], &ram, faults, router);
    v.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP | 1 << VIRTIO_IOMMU_F_MMIO);
    v.apply(&Request::Attach(AttachReq {
        domain: 1,
        endpoint: EP,
        ..Default::default()
    }))
    .unwrap();
    (rec, b, v, mem)
}

#[test]
fn a_guest_map_f_mmio_into_a_registered_bar_reaches_the_container_and_outside_is_range() {
    let (rec, b, v, _) = viommu_over_type1();
    let map = |phys| {
        Request::Map(MapReq {
            domain: 1,
            virt_start: 0x7000_0000,
            virt_end: 0x7000_1fff,
            phys_start: phys,
            flags: VIRTIO_IOMMU_MAP_F_WRITE | VIRTIO_IOMMU_MAP_F_MMIO,
        })
    };
    let from = rec.len();
    assert_eq!(v.apply(&map(BAR)).unwrap_err().status(), Status::Range);
    assert_eq!(rec.len(), from);
    v.add_mmio_window(MmioWindow {
        gpa: BAR,
        len: 0x1_0000,
        hva: Some(BAR_HVA),
    })
    .unwrap();
    v.apply(&map(BAR + 0x4000)).unwrap();
    assert_eq!(
        dma_maps(&rec, from),
        [(
            0x7000_0000,
            BAR_HVA + 0x4000,
            0x2000,
            VFIO_DMA_MAP_FLAG_WRITE
        )]
    );
    let c = b.container_of(EP).unwrap();
    assert_eq!(rec.type1_mappings(c), [(0x7000_0000, 0x2000)]);
}

#[test]
fn a_guest_mapping_past_ram_follows_a_plug_and_unplug_through_the_viommu() {
    let (rec, b, v, mem) = viommu_over_type1();
    v.apply(&Request::Map(MapReq {
        domain: 1,
        virt_start: 0x9000_0000,
        virt_end: 0x9000_ffff,
        phys_start: DIMM,
        flags: VIRTIO_IOMMU_MAP_F_WRITE,
    }))
    .unwrap();
    let c = b.container_of(EP).unwrap();
    assert!(rec.type1_mappings(c).is_empty());
    let after = with_dimm(&mem);
    v.add_ram(&RamUpdate {
        start: DIMM,
        len: DIMM_LEN,
        before: &mem,
        after: &after,
    })
    .unwrap();
    assert_eq!(rec.type1_mappings(c), [(0x9000_0000, 0x1_0000)]);
    v.remove_ram(&RamUpdate {
        start: DIMM,
        len: DIMM_LEN,
        before: &after,
        after: &mem,
    })
    .unwrap();
    assert!(rec.type1_mappings(c).is_empty());
    assert_eq!(v.state().mapping_count(1), 1);
}

fn iommufd() -> (Arc<RecordingHost>, IommufdBackend, Dimm) {
    let (rec, host, mem, ram) = setup(RecordingHost::default());
    let b = IommufdBackend::new(host, ram).unwrap();
    b.add_endpoint(EP, Path::new(DEV)).unwrap();
    (rec, b, Dimm::new(&mem))
}

/// The (ioas, iova, user_va, length, flags) of each `IOMMU_IOAS_MAP` since
/// call `from` (size@0 flags@4 ioas_id@8 user_va@16 length@24 iova@32).
fn ioas_maps(rec: &RecordingHost, from: usize) -> Vec<(u32, u64, u64, u64, u32)> {
    rec.calls()[from..]
        .iter()
        .filter(|c| c.op == Op::IoasMap)
        .map(|c| {
            assert_eq!(le32(&c.arg, 0), 40);
            (
                le32(&c.arg, 8),
                le64(&c.arg, 32),
                le64(&c.arg, 16),
                le64(&c.arg, 24),
                le32(&c.arg, 4),
            )
        })
        .collect()
}

/// FIXED_IOVA | WRITEABLE | READABLE.
const IOAS_RW: u32 = 1 | 2 | 4;

#[test]
fn iommufd_stage2_ioas_gains_plugged_ram_at_its_gpa_and_loses_it_on_unplug() {
    let (rec, b, dimm) = iommufd();
    let s2 = b.gpa_ioas();
    let from = rec.len();
    b.add_ram(&dimm.plug()).unwrap();
    assert_eq!(
        ioas_maps(&rec, from),
        [(s2, DIMM, dimm.hva(), DIMM_LEN, IOAS_RW)]
    );
    assert_eq!(rec.len(), from + 1);
    assert!(rec.ioas_mappings(s2).contains(&(DIMM, DIMM_LEN)));
    let from = rec.len();
    b.remove_ram(&dimm.unplug()).unwrap();
    let unmap = &rec.calls()[from];
    // size@0 ioas_id@4 iova@8 length@16.
    assert_eq!(unmap.op, Op::IoasUnmap);
    assert_eq!(
        (
            le32(&unmap.arg, 0),
            le32(&unmap.arg, 4),
            le64(&unmap.arg, 8),
            le64(&unmap.arg, 16)
        ),
        (24, s2, DIMM, DIMM_LEN)
    );
    assert_eq!(rec.ioas_mappings(s2).len(), 4);
}

#[test]
fn iommufd_map_domain_pins_a_mapping_past_ram_on_plug_and_unpins_it_on_unplug() {
    let (rec, b, dimm) = iommufd();
    let straddling = rw(0x8000_0000, 0x8000_1fff, DIMM - 0x1000);
    b.attach(EP, &view(2, &[straddling])).unwrap();
    let ioas = le32(&rec.calls_of(Op::IoasAlloc).pop().unwrap().out, 8);
    assert_eq!(rec.ioas_mappings(ioas), [(0x8000_0000, 0x1000)]);
    let from = rec.len();
    b.add_ram(&dimm.plug()).unwrap();
    assert_eq!(
        ioas_maps(&rec, from),
        [
            (b.gpa_ioas(), DIMM, dimm.hva(), DIMM_LEN, IOAS_RW),
            (ioas, 0x8000_1000, dimm.hva(), 0x1000, IOAS_RW)
        ]
    );
    b.remove_ram(&dimm.unplug()).unwrap();
    assert_eq!(rec.ioas_mappings(ioas), [(0x8000_0000, 0x1000)]);
    // The guest's UNMAP takes what is left, and a plug after it maps
    // nothing for the gone mapping.
    b.unmap(2, &[straddling]).unwrap();
    assert!(rec.ioas_mappings(ioas).is_empty());
    b.add_ram(&dimm.plug()).unwrap();
    assert!(rec.ioas_mappings(ioas).is_empty());
}

#[test]
fn iommufd_plug_failing_halfway_rolls_back_stage2() {
    let (rec, b, dimm) = iommufd();
    b.attach(EP, &view(2, &[rw(0x8000_0000, 0x8000_1fff, DIMM - 0x1000)]))
        .unwrap();
    let ioas = le32(&rec.calls_of(Op::IoasAlloc).pop().unwrap().out, 8);
    let s2 = b.gpa_ioas();
    let (s2_before, dom_before) = (rec.ioas_mappings(s2), rec.ioas_mappings(ioas));
    // The domain IOAS's map (the second) fails.
    rec.fail_nth(Op::IoasMap, rec.count(Op::IoasMap) + 1, libc::ENOMEM);
    let from = rec.len();
    assert_eq!(
        b.add_ram(&dimm.plug()).unwrap_err().status(),
        Status::DevErr
    );
    assert_eq!(rec.ops()[from..], [Op::IoasMap, Op::IoasMap, Op::IoasUnmap]);
    assert_eq!(rec.ioas_mappings(s2), s2_before);
    assert_eq!(rec.ioas_mappings(ioas), dom_before);
    // Unplug failing halfway maps back what it had unmapped.
    b.add_ram(&dimm.plug()).unwrap();
    let (s2_before, dom_before) = (rec.ioas_mappings(s2), rec.ioas_mappings(ioas));
    rec.fail_nth(Op::IoasUnmap, rec.count(Op::IoasUnmap) + 1, libc::EIO);
    assert!(b.remove_ram(&dimm.unplug()).is_err());
    assert_eq!(rec.ioas_mappings(s2), s2_before);
    assert_eq!(rec.ioas_mappings(ioas), dom_before);
}

#[test]
fn iommufd_reads_a_pasid_table_in_plugged_ram_and_keeps_nested_bindings_on_stage2() {
    let (rec, b, dimm) = iommufd();
    // A PASID directory and table in the DIMM: PASID 0 → ROOT_A.
    let dir = DIMM;
    let table = DIMM + 0x1000;
    use vm_memory::Bytes;
    dimm.after.write_obj(table | 1, GuestAddress(dir)).unwrap();
    let mut e = [0u8; 64];
    e[0..8].copy_from_slice(&(1u64 | 1 << 6).to_le_bytes());
    e[16..24].copy_from_slice(&ROOT_A.to_le_bytes());
    dimm.after.write_slice(&e, GuestAddress(table)).unwrap();
    let binding = TableBinding {
        domain: 1,
        table: TableDesc::IntelVtd {
            pasid_bits: 6,
            pasid_dir_ptr: dir,
        },
    };
    assert_eq!(
        b.bind_table(EP, &binding).unwrap_err().status(),
        Status::Range
    );
    b.add_ram(&dimm.plug()).unwrap();
    b.bind_table(EP, &binding).unwrap();
    let dev = b.device_of(EP).unwrap();
    let attached = b.attachments(EP);
    assert!(rec.attached(dev, 0).is_some());
    // Unplug changes stage 2 only: the nested HWPTs stay attached.
    let from = rec.len();
    b.remove_ram(&dimm.unplug()).unwrap();
    assert_eq!(rec.ops()[from..], [Op::IoasUnmap]);
    assert_eq!(b.attachments(EP), attached);
}

#[test]
fn iommufd_refuses_mmio_mappings_with_unsupp_saying_why() {
    let (rec, b, _) = iommufd();
    b.add_mmio_window(&MmioWindow {
        gpa: BAR,
        len: 0x1000,
        hva: Some(BAR_HVA),
    })
    .unwrap();
    b.attach(EP, &view(2, &[])).unwrap();
    let mut m = rw(0x7000_0000, 0x7000_0fff, BAR);
    m.flags = VIRTIO_IOMMU_MAP_F_WRITE | VIRTIO_IOMMU_MAP_F_MMIO;
    let from = rec.len();
    let e = b.map(2, &m).unwrap_err();
    assert_eq!(e.status(), Status::Unsupp);
    assert!(e.to_string().contains("VM_PFNMAP"), "{e}");
    assert_eq!(rec.len(), from);
}

/// The VMM's own stage-2 IOAS (`IommufdBackend::with_stage2_ioas`): the
/// backend allocates and maps nothing at construction (guest RAM is
/// pinned once, by the VMM), bypass attaches the device to that IOAS, a
/// RAM plug leaves it to the VMM while MAP-mode IOASes still follow, and
/// an ID that is no IOAS is refused.
#[test]
fn iommufd_over_the_vmms_stage2_ioas_maps_nothing_of_its_own_there() {
    use vfio_passthrough::args;
    use vfio_passthrough::host::{HostIommu, Ioctl, Open};
    let (rec, host, mem, ram) = setup(RecordingHost::default());
    // The VMM's iommufd and its IOAS with guest RAM at its GPAs.
    let fd = rec.open(Open::Iommufd).unwrap().handle;
    let mut a = args::ioas_alloc();
    rec.ioctl(fd, Ioctl::IoasAlloc(&mut a)).unwrap();
    let vmm_ioas = a.out_ioas_id;
    let from = rec.len();
    let b = IommufdBackend::with_stage2_ioas(host.clone(), ram.clone(), vmm_ioas).unwrap();
    assert_eq!(
        rec.ops()[from..],
        [Op::OpenIommufd, Op::IoasIovaRanges],
        "no IOAS of its own, nothing mapped"
    );
    assert_eq!(b.gpa_ioas(), vmm_ioas);
    b.add_endpoint(EP, Path::new(DEV)).unwrap();
    b.attach(
        EP,
        &DomainView {
            id: 1,
            bypass: true,
            mappings: &[],
            table: None,
        },
    )
    .unwrap();
    assert_eq!(b.attachments(EP).get(&0), Some(&vmm_ioas));
    // A MAP-mode domain with a mapping reaching into the DIMM's range.
    b.detach(EP, 1).unwrap();
    b.attach(EP, &view(2, &[])).unwrap();
    let m = Mapping {
        start: 0x4000_0000,
        end: 0x4000_0fff,
        phys: DIMM,
        flags: VIRTIO_IOMMU_MAP_F_WRITE,
    };
    b.map(2, &m).unwrap();
    let dimm = Dimm::new(&mem);
    let from = rec.len();
    b.add_ram(&dimm.plug()).unwrap();
    let maps = ioas_maps(&rec, from);
    assert_eq!(maps.len(), 1, "only the MAP-mode piece: {maps:?}");
    assert_ne!(maps[0].0, vmm_ioas);
    assert_eq!((maps[0].1, maps[0].2), (0x4000_0000, dimm.hva()));
    // An ID that is no IOAS.
    let e = IommufdBackend::with_stage2_ioas(host, ram, 0xdead).unwrap_err();
    assert!(matches!(e, BackendError::Invalid(_)), "{e:?}");
}
