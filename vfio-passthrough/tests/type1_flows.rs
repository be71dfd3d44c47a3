//! Type1 MAP-mode flows over the recording host: attach, map (split over
//! RAM regions), unmap, detach, with failures injected and the rollback
//! checked against what the fake kernel holds.

mod common;

use std::path::Path;

use common::*;
use vfio_bindings::bindings::vfio::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};
use vfio_passthrough::host::Op;
use vfio_passthrough::recording::RecordingHost;
use vfio_passthrough::Type1Backend;
use vmm_iommu::backend::{BackendError, DomainView, IommuBackend};
use vmm_iommu::wire::{Status, TableDesc, VIRTIO_IOMMU_MAP_F_READ};

const DEV: &str = "/sys/bus/pci/devices/0000:65:00.0";

fn backend() -> (std::sync::Arc<RecordingHost>, Type1Backend) {
    let (rec, b, _) = backend_and_ram();
    (rec, b)
}

fn backend_and_ram() -> (
    std::sync::Arc<RecordingHost>,
    Type1Backend,
    vfio_passthrough::GuestRam,
) {
    let (rec, host, _mem, ram) = setup(RecordingHost::default());
    let b = Type1Backend::new(host, ram.clone());
    b.add_endpoint(16, Path::new(DEV)).expect("add");
    (rec, b, ram)
}

fn view(id: u32, mappings: &[vmm_iommu::Mapping]) -> DomainView<'_> {
    DomainView {
        id,
        bypass: false,
        mappings,
        table: None,
    }
}

#[test]
fn get_info_becomes_caps() {
    let (rec, b) = backend();
    assert_eq!(rec.ops(), vec![Op::OpenType1, Op::Type1GetInfo]);
    let c = b.caps(16);
    assert_eq!(c.page_size_mask, 1 << 12 | 1 << 21 | 1 << 30);
    assert_eq!(c.input_range, (0, (1 << 48) - 1));
    assert!(c.table_formats.is_empty());
}

#[test]
fn mapping_over_three_regions_is_three_dma_maps_with_host_addresses() {
    let (rec, b, ram) = backend_and_ram();
    b.attach(16, &view(1, &[])).unwrap();
    let m = rw(0x8000_0000, 0x8011_ffff, 0xf_0000);
    b.map(1, &m).unwrap();
    let maps = rec.calls_of(Op::Type1MapDma);
    assert_eq!(maps.len(), 3);
    let regions: Vec<u64> = ram.regions().iter().map(|r| r.hva).collect();
    let expect = [
        (0x8000_0000u64, regions[0] + 0xf_0000, 0x1_0000u64),
        (0x8001_0000, regions[1], 0x10_0000),
        (0x8011_0000, regions[2], 0x1_0000),
    ];
    for (c, (iova, hva, size)) in maps.iter().zip(expect) {
        // argsz@0 flags@4 vaddr@8 iova@16 size@24
        assert_eq!(le32(&c.arg, 0), 32);
        assert_eq!(
            le32(&c.arg, 4),
            VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
        );
        assert_eq!(le64(&c.arg, 8), hva);
        assert_eq!(le64(&c.arg, 16), iova);
        assert_eq!(le64(&c.arg, 24), size);
    }
    let c = b.container_of(16).unwrap();
    assert_eq!(rec.type1_mappings(c).len(), 3);
}

#[test]
fn third_map_failing_rolls_back_the_first_two() {
    let (rec, b) = backend();
    b.attach(16, &view(1, &[])).unwrap();
    rec.fail_nth(Op::Type1MapDma, 2, libc::ENOMEM);
    let before = rec.len();
    let err = b
        .map(1, &rw(0x8000_0000, 0x8011_ffff, 0xf_0000))
        .unwrap_err();
    assert!(matches!(
        err,
        BackendError::Host {
            op: "VFIO_IOMMU_MAP_DMA",
            ..
        }
    ));
    assert_eq!(err.status(), Status::DevErr);
    let ops: Vec<Op> = rec.ops()[before..].to_vec();
    assert_eq!(
        ops,
        vec![
            Op::Type1MapDma,
            Op::Type1MapDma,
            Op::Type1MapDma,
            Op::Type1UnmapDma,
            Op::Type1UnmapDma
        ]
    );
    let c = b.container_of(16).unwrap();
    assert!(rec.type1_mappings(c).is_empty());
    assert!(b.mapped(16).is_empty());
    // The backend is as before: the same MAP now succeeds.
    b.map(1, &rw(0x8000_0000, 0x8011_ffff, 0xf_0000)).unwrap();
    assert_eq!(rec.type1_mappings(c).len(), 3);
}

#[test]
fn failure_on_the_second_endpoint_undoes_the_first() {
    let (rec, b) = backend();
    b.add_endpoint(17, Path::new("/sys/bus/pci/devices/0000:66:00.0"))
        .unwrap();
    b.attach(16, &view(1, &[])).unwrap();
    b.attach(17, &view(1, &[])).unwrap();
    rec.fail_nth(Op::Type1MapDma, 1, libc::EFAULT);
    assert!(b.map(1, &rw(0x1000, 0x1fff, 0x1000)).is_err());
    for ep in [16, 17] {
        assert!(rec.type1_mappings(b.container_of(ep).unwrap()).is_empty());
    }
}

#[test]
fn mapping_beyond_ram_pins_only_ram_and_a_wrap_is_refused_before_any_ioctl() {
    let (rec, b) = backend();
    b.attach(16, &view(1, &[])).unwrap();
    let c = b.container_of(16).unwrap();
    let before = rec.len();
    let e = b.map(1, &rw(0x1000, 0x2fff, u64::MAX - 0xfff)).unwrap_err();
    assert_eq!(e.status(), Status::Range);
    assert_eq!(rec.len(), before);
    // Entirely beyond RAM: accepted, nothing to pin.
    b.map(1, &rw(0, 0xfff, 0x2_0000_0000)).unwrap();
    assert_eq!(rec.len(), before);
    assert!(rec.type1_mappings(c).is_empty());
}

#[test]
fn attach_replays_and_detach_removes() {
    let (rec, b) = backend();
    let mut ro = rw(0x2000, 0x2fff, 0x5000);
    ro.flags = VIRTIO_IOMMU_MAP_F_READ;
    let maps = [rw(0x1000, 0x1fff, 0x3000), ro];
    b.attach(16, &view(4, &maps)).unwrap();
    let c = b.container_of(16).unwrap();
    assert_eq!(
        rec.type1_mappings(c),
        vec![(0x1000, 0x1000), (0x2000, 0x1000)]
    );
    let last = rec.calls_of(Op::Type1MapDma).pop().unwrap();
    assert_eq!(le32(&last.arg, 4), VFIO_DMA_MAP_FLAG_READ);
    b.unmap(4, &maps[..1]).unwrap();
    assert_eq!(rec.type1_mappings(c), vec![(0x2000, 0x1000)]);
    b.detach(16, 4).unwrap();
    assert!(rec.type1_mappings(c).is_empty());
    // Mapping into a domain without our endpoints is a no-op.
    let before = rec.len();
    b.map(4, &maps[0]).unwrap();
    assert_eq!(rec.len(), before);
}

#[test]
fn moving_to_another_domain_rolls_back_when_the_new_map_fails() {
    let (rec, b) = backend();
    let old = [rw(0x1000, 0x1fff, 0x3000)];
    b.attach(16, &view(1, &old)).unwrap();
    let c = b.container_of(16).unwrap();
    rec.fail_nth(Op::Type1MapDma, 2, libc::ENOSPC);
    let new = [rw(0x9000, 0x9fff, 0x4000), rw(0xa000, 0xafff, 0x5000)];
    assert!(b.attach(16, &view(2, &new)).is_err());
    // Back in domain 1 with its mapping.
    assert_eq!(rec.type1_mappings(c), vec![(0x1000, 0x1000)]);
    b.map(1, &rw(0x4000, 0x4fff, 0x6000)).unwrap();
    assert_eq!(rec.type1_mappings(c).len(), 2);
}

#[test]
fn detach_failure_remaps_what_was_unmapped() {
    let (rec, b) = backend();
    let maps = [rw(0x1000, 0x1fff, 0x3000), rw(0x2000, 0x2fff, 0x4000)];
    b.attach(16, &view(1, &maps)).unwrap();
    rec.fail_nth(Op::Type1UnmapDma, 1, libc::EIO);
    assert!(b.detach(16, 1).is_err());
    let c = b.container_of(16).unwrap();
    assert_eq!(rec.type1_mappings(c).len(), 2);
    b.detach(16, 1).unwrap();
    assert!(rec.type1_mappings(c).is_empty());
}

#[test]
fn bypass_maps_all_ram_at_its_gpa() {
    let (rec, b) = backend();
    b.attach(
        16,
        &DomainView {
            id: 9,
            bypass: true,
            mappings: &[],
            table: None,
        },
    )
    .unwrap();
    let c = b.container_of(16).unwrap();
    assert_eq!(
        rec.type1_mappings(c),
        vec![
            (0, 0x10_0000),
            (0x10_0000, 0x10_0000),
            (0x20_0000, 0xe0_0000),
            (0x1_0000_0000, 0x10_0000)
        ]
    );
}

#[test]
fn nested_is_unsupported_and_mmio_outside_bar_windows_pins_nothing() {
    let (rec, b) = backend();
    let t = TableDesc::X86_64 {
        levels: 4,
        root: 0x1000,
    };
    let binding = vmm_iommu::backend::TableBinding {
        domain: 1,
        table: t,
    };
    assert_eq!(
        b.bind_table(16, &binding).unwrap_err().status(),
        Status::Unsupp
    );
    assert_eq!(
        b.attach(
            16,
            &DomainView {
                id: 1,
                bypass: false,
                mappings: &[],
                table: Some(&t)
            }
        )
        .unwrap_err()
        .status(),
        Status::Unsupp
    );
    b.attach(16, &view(1, &[])).unwrap();
    // An MMIO mapping reaches only BAR windows the VMM registered with
    // host memory (tests/memory_hotplug.rs); the vIOMMU refuses the MAP
    // outside windows, and here there is nothing to pin.
    let mut m = rw(0, 0xfff, 0);
    m.flags |= vmm_iommu::wire::VIRTIO_IOMMU_MAP_F_MMIO;
    let before = rec.len();
    b.map(1, &m).unwrap();
    assert_eq!(rec.len(), before);
}

#[test]
fn misaligned_mapping_is_invalid_before_any_ioctl() {
    let (rec, b) = backend();
    b.attach(16, &view(1, &[])).unwrap();
    let before = rec.len();
    assert_eq!(
        b.map(1, &rw(0x1000, 0x17ff, 0x3000)).unwrap_err().status(),
        Status::Inval
    );
    assert_eq!(rec.len(), before);
}

#[test]
fn open_failure_leaves_nothing_open() {
    let rec = RecordingHost::default();
    rec.fail_nth(Op::Type1GetInfo, 0, libc::EPERM);
    let (rec, host, _mem, ram) = setup(rec);
    let b = Type1Backend::new(host, ram);
    assert!(b.add_endpoint(16, Path::new(DEV)).is_err());
    assert_eq!(rec.open_handles(), 0);
    drop(b);
}

#[test]
fn unattached_bypass_maps_all_ram_and_blocking_unmaps_it() {
    // Config-space bypass reaches the host: an unattached assigned device
    // gets guest-physical DMA to all RAM, and loses it when bypass ends.
    let (rec, b) = backend();
    let c = b.container_of(16).unwrap();
    assert!(rec.type1_mappings(c).is_empty());
    b.set_unattached_bypass(16, true).unwrap();
    assert_eq!(
        rec.type1_mappings(c),
        vec![
            (0, 0x10_0000),
            (0x10_0000, 0x10_0000),
            (0x20_0000, 0xe0_0000),
            (0x1_0000_0000, 0x10_0000)
        ]
    );
    // Attaching replaces the identity maps with the domain's.
    b.attach(16, &view(1, &[rw(0x1000, 0x1fff, 0x3000)]))
        .unwrap();
    assert_eq!(rec.type1_mappings(c), vec![(0x1000, 0x1000)]);
    // Bypass is for unattached endpoints only.
    assert!(b.set_unattached_bypass(16, true).is_err());
    b.detach(16, 1).unwrap();
    b.set_unattached_bypass(16, true).unwrap();
    assert_eq!(rec.type1_mappings(c).len(), 4);
    b.set_unattached_bypass(16, false).unwrap();
    assert!(rec.type1_mappings(c).is_empty());
    assert!(b.set_unattached_bypass(99, true).is_err());
}

#[test]
fn blocking_an_endpoint_whose_detach_failed_unmaps_everything() {
    let (rec, b) = backend();
    let c = b.container_of(16).unwrap();
    b.attach(16, &view(1, &[rw(0x1000, 0x1fff, 0x3000)]))
        .unwrap();
    rec.fail_nth(Op::Type1UnmapDma, rec.count(Op::Type1UnmapDma), libc::EIO);
    assert!(b.detach(16, 1).is_err());
    assert_eq!(rec.type1_mappings(c).len(), 1);
    b.set_unattached_bypass(16, false).unwrap();
    assert!(rec.type1_mappings(c).is_empty());
}

/// Hot-unplug end to end: `Viommu::remove_endpoint` of an attached
/// endpoint with a mapping detaches it (its DMA maps go) and, through
/// `IommuBackend::remove_endpoint`, closes its container.
#[test]
fn viommu_unplug_unmaps_and_closes_the_container() {
    use std::sync::Arc;
    use vmm_iommu::wire::{
        AttachReq, MapReq, Request, VIRTIO_F_VERSION_1, VIRTIO_IOMMU_F_MAP_UNMAP,
    };
    use vmm_iommu::{Router, Viommu};
    let (rec, b) = backend();
    let b = Arc::new(b);
    let mut router = Router::new();
    router.add(b.clone(), &[16]);
    let cfg = vmm_iommu::IommuConfig::default();
    let faults = Arc::new(vmm_iommu::FaultQueue::new(8).unwrap());
    let v = Viommu::with_router(&cfg, &[16], &[(0, 0xff_ffff)], faults, router);
    v.set_acked_features((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_IOMMU_F_MAP_UNMAP));
    let attach = AttachReq {
        domain: 1,
        endpoint: 16,
        ..Default::default()
    };
    v.apply(&Request::Attach(attach)).unwrap();
    let map = MapReq {
        domain: 1,
        virt_start: 0x10_0000,
        virt_end: 0x10_ffff,
        phys_start: 0x20_0000,
        flags: VIRTIO_IOMMU_MAP_F_READ,
    };
    v.apply(&Request::Map(map)).unwrap();
    let c = b.container_of(16).unwrap();
    assert_eq!(rec.type1_mappings(c).len(), 1);
    v.remove_endpoint(16).unwrap();
    assert!(rec.type1_mappings(c).is_empty(), "the DMA map went");
    assert_eq!(b.container_of(16), None, "the backend forgot it");
    assert!(rec.ops().contains(&Op::Close), "its container closed");
}
