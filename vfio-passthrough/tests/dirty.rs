//! Dirty tracking of assigned devices (issue 13), over the recording
//! host, byte for byte: iommufd enables it on the stage-2 nest parent
//! (`IOMMU_HWPT_ALLOC_DIRTY_TRACKING` at allocation where the IOMMU
//! offers it, `IOMMU_HWPT_SET_DIRTY_TRACKING`) and reads it with
//! `IOMMU_HWPT_GET_DIRTY_BITMAP` over guest RAM, region by region; type1
//! uses `VFIO_IOMMU_DIRTY_PAGES` where the host offers the migration
//! capability, per writable mapping, and turns IOVA pages into guest
//! pages. `take_dirty_pages` returns what was written since the last
//! call, and `DirtyPages::mark` puts it in the VMM's bitmap.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vfio_passthrough::dirty::DirtyPages;
use vfio_passthrough::host::Op;
use vfio_passthrough::recording::{FakeIommu, RecordingHost};
use vfio_passthrough::{IommufdBackend, Type1Backend};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_iommu::backend::{BackendError, DomainView, IommuBackend, TableBinding};
use vmm_iommu::wire::TableDesc;

const DEV: &str = "/sys/bus/pci/devices/0000:65:00.0";
const EP: u32 = 16;
/// `IOMMU_HW_CAP_DIRTY_TRACKING`.
const CAP_DIRTY: u64 = 1;

fn words32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes(w32: &[u32], w64: &[u64]) -> Vec<u8> {
    let mut b = words32(w32);
    for v in w64 {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

struct Iommufd {
    rec: Arc<RecordingHost>,
    b: IommufdBackend,
    parent: u32,
}

fn iommufd(caps: u64) -> Iommufd {
    let host = RecordingHost::new(FakeIommu::vtd_nesting());
    host.set_hw_capabilities(caps);
    let (rec, host, mem, ram) = setup(host);
    let b = IommufdBackend::new(host, ram).expect("backend");
    b.add_endpoint(EP, Path::new(DEV)).expect("add");
    write_pasid_dir(&mem);
    write_fl_entry(&mem, 0, Some(ROOT_A));
    let alloc = rec.calls_of(Op::HwptAlloc);
    let parent = le32(&alloc.last().expect("nest parent").out, 16);
    Iommufd { rec, b, parent }
}

fn bind(b: &IommufdBackend) {
    b.bind_table(
        EP,
        &TableBinding {
            domain: 1,
            table: TableDesc::IntelVtd {
                pasid_bits: 6,
                pasid_dir_ptr: PASID_DIR,
            },
        },
    )
    .expect("bind");
}

/// The VMM's guest memory with a dirty bitmap, same layout as the
/// backend's.
fn vmm_memory() -> GuestMemoryMmap<AtomicBitmap> {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x10_0000), 0x10_0000),
        (GuestAddress(0x20_0000), 0xe0_0000),
        (GuestAddress(0x1_0000_0000), 0x10_0000),
    ])
    .unwrap()
}

#[test]
fn iommufd_nest_parent_is_allocated_with_dirty_tracking_where_the_iommu_offers_it() {
    // flags: NEST_PARENT 1 | DIRTY_TRACKING 2 | PASID 8; data type NONE.
    let f = iommufd(CAP_DIRTY);
    let parent = &f.rec.calls_of(Op::HwptAlloc)[0];
    assert_eq!(
        parent.arg,
        bytes(&[48, 1 | 2 | 8, 1, 1, 0, 0, 0, 0], &[0, 0])
    );
    // Without the capability the parent is allocated as before.
    let g = iommufd(0);
    let parent = &g.rec.calls_of(Op::HwptAlloc)[0];
    assert_eq!(parent.arg, bytes(&[48, 1 | 8, 1, 1, 0, 0, 0, 0], &[0, 0]));
}

#[test]
fn iommufd_parent_that_refuses_dirty_tracking_is_allocated_without_it_and_untracked() {
    let host = RecordingHost::new(FakeIommu::vtd_nesting());
    host.set_hw_capabilities(CAP_DIRTY);
    host.fail_nth(Op::HwptAlloc, 0, libc::EOPNOTSUPP);
    let (rec, host, mem, ram) = setup(host);
    let b = IommufdBackend::new(host, ram).unwrap();
    b.add_endpoint(EP, Path::new(DEV)).unwrap();
    let allocs = rec.calls_of(Op::HwptAlloc);
    assert_eq!(le32(&allocs[0].arg, 4), 1 | 2 | 8);
    assert_eq!(le32(&allocs[1].arg, 4), 1 | 8);
    assert!(!b.caps(EP).table_formats.is_empty(), "it still nests");
    write_pasid_dir(&mem);
    write_fl_entry(&mem, 0, Some(ROOT_A));
    bind(&b);
    let started = b.start_dirty_tracking().unwrap();
    assert_eq!(started.untracked, [EP]);
    assert_eq!(rec.count(Op::HwptSetDirtyTracking), 0);
    assert_eq!(b.take_dirty_pages().unwrap().untracked, [EP]);
}

#[test]
fn iommufd_start_enables_tracking_on_the_parent_and_take_reads_every_ram_region() {
    let f = iommufd(CAP_DIRTY);
    bind(&f.b);
    let started = f.b.start_dirty_tracking().unwrap();
    assert_eq!(started, DirtyPages::default());
    let set = f.rec.calls_of(Op::HwptSetDirtyTracking);
    assert_eq!(set.len(), 1);
    // size@0 flags@4 (ENABLE) hwpt_id@8 __reserved@12.
    assert_eq!(set[0].arg, words32(&[16, 1, f.parent, 0]));
    assert!(f.rec.hwpt_tracking(f.parent));

    // The device writes through its nested translation; stage 2 is the
    // guest-physical address space, so these are guest pages.
    f.rec.device_write_hwpt(f.parent, 0x20_3800, 0x1000);
    f.rec.device_write_hwpt(f.parent, 0x1_0000_0000, 8);
    let from = f.rec.len();
    let d = f.b.take_dirty_pages().unwrap();
    assert_eq!(d.pages, [0x20_3000, 0x20_4000, 0x1_0000_0000]);
    assert!(d.untracked.is_empty());
    // One bitmap per RAM region: size@0 hwpt_id@4 flags@8 __reserved@12
    // iova@16 length@24 page_size@32 data@40 (filled by the host).
    let gets: Vec<_> = f.rec.calls()[from..].to_vec();
    let want = [
        (0u64, 0x10_0000u64),
        (0x10_0000, 0x10_0000),
        (0x20_0000, 0xe0_0000),
        (0x1_0000_0000, 0x10_0000),
    ];
    assert_eq!(gets.len(), want.len());
    for (c, (iova, len)) in gets.iter().zip(want) {
        assert_eq!(c.op, Op::HwptGetDirtyBitmap);
        assert_eq!(c.arg, bytes(&[48, f.parent, 0, 0], &[iova, len, 4096, 0]));
        // The bitmap handed over: one bit per page, zeroed.
        assert_eq!(c.payload.len() as u64, (len / 4096).div_ceil(64) * 8);
    }

    // Into the VMM's bitmap, where the migration loop reads it.
    let mem = vmm_memory();
    assert_eq!(d.mark(&mem), 3);
    assert_eq!(
        vmm_iommu::take_dirty_pages(&mem),
        [0x20_3000, 0x20_4000, 0x1_0000_0000]
    );

    // Read and cleared: nothing new since.
    assert!(f.b.take_dirty_pages().unwrap().pages.is_empty());
    f.rec.device_write_hwpt(f.parent, 0x5000, 1);
    assert_eq!(f.b.take_dirty_pages().unwrap().pages, [0x5000]);

    f.b.stop_dirty_tracking();
    let set = f.rec.calls_of(Op::HwptSetDirtyTracking);
    assert_eq!(set.last().unwrap().arg, words32(&[16, 0, f.parent, 0]));
    assert!(!f.rec.hwpt_tracking(f.parent));
    assert!(matches!(
        f.b.take_dirty_pages(),
        Err(BackendError::Invalid(_))
    ));
}

#[test]
fn iommufd_map_mode_endpoint_is_untracked_and_blocked_one_is_not() {
    let f = iommufd(CAP_DIRTY);
    assert!(f.b.start_dirty_tracking().unwrap().untracked.is_empty());
    f.b.attach(
        EP,
        &DomainView {
            id: 2,
            bypass: false,
            mappings: &[rw(0x8000_0000, 0x8000_ffff, 0x20_0000)],
            table: None,
        },
    )
    .unwrap();
    let d = f.b.take_dirty_pages().unwrap();
    assert_eq!(d.untracked, [EP], "MAP mode goes through an untracked HWPT");
    // Starting twice is refused; the parent keeps tracking.
    assert!(f.b.start_dirty_tracking().is_err());
    assert!(f.rec.hwpt_tracking(f.parent));
}

#[test]
fn iommufd_failed_start_leaves_tracking_off() {
    let f = iommufd(CAP_DIRTY);
    f.rec.fail_nth(Op::HwptSetDirtyTracking, 0, libc::EIO);
    assert!(f.b.start_dirty_tracking().is_err());
    assert!(!f.rec.hwpt_tracking(f.parent));
    assert!(f.b.take_dirty_pages().is_err());
    assert!(f.b.start_dirty_tracking().is_ok());
}

fn type1(migration: bool) -> (Arc<RecordingHost>, Type1Backend) {
    let host = RecordingHost::default();
    if migration {
        host.set_type1_migration(1 << 12 | 1 << 21 | 1 << 30, 256 << 20);
    }
    let (rec, host, _mem, ram) = setup(host);
    let b = Type1Backend::new(host, ram);
    b.add_endpoint(EP, Path::new(DEV)).expect("add");
    (rec, b)
}

fn attach(b: &Type1Backend, mappings: &[vmm_iommu::Mapping]) {
    b.attach(
        EP,
        &DomainView {
            id: 1,
            bypass: false,
            mappings,
            table: None,
        },
    )
    .unwrap();
}

#[test]
fn type1_without_the_migration_capability_is_untracked() {
    let (rec, b) = type1(false);
    attach(&b, &[rw(0x8000_0000, 0x8000_1fff, 0x20_0000)]);
    let started = b.start_dirty_tracking().unwrap();
    assert_eq!(started.untracked, [EP]);
    assert_eq!(rec.count(Op::Type1DirtyPages), 0);
    let d = b.take_dirty_pages().unwrap();
    assert_eq!((d.pages.len(), d.untracked), (0, vec![EP]));
}

#[test]
fn type1_start_take_stop_exact_bytes_and_guest_pages() {
    let (rec, b) = type1(true);
    let ro = vmm_iommu::Mapping {
        flags: vmm_iommu::wire::VIRTIO_IOMMU_MAP_F_READ,
        ..rw(0x9000_0000, 0x9000_0fff, 0x30_0000)
    };
    attach(&b, &[rw(0x8000_0000, 0x8000_1fff, 0x20_0000), ro]);
    let c = b.container_of(EP).unwrap();
    assert!(b.start_dirty_tracking().unwrap().untracked.is_empty());
    let dp = rec.calls_of(Op::Type1DirtyPages);
    // argsz 8, flags START.
    assert_eq!(dp[0].arg, words32(&[8, 1]));
    assert!(rec.type1_tracking(c));

    rec.device_write_type1(c, 0x8000_1010, 16);
    let from = rec.calls_of(Op::Type1DirtyPages).len();
    let d = b.take_dirty_pages().unwrap();
    assert_eq!(
        d.pages,
        [0x20_1000],
        "IOVA page 0x80001000 is guest page 0x201000"
    );
    let gets = rec.calls_of(Op::Type1DirtyPages)[from..].to_vec();
    assert_eq!(gets.len(), 1, "the read-only mapping is not read");
    // argsz 48, flags GET_BITMAP, iova, size, pgsize (the smallest), the
    // bitmap's bytes, data (filled by the host).
    assert_eq!(
        gets[0].arg,
        bytes(&[48, 4], &[0x8000_0000, 0x2000, 4096, 8, 0])
    );
    assert!(b.take_dirty_pages().unwrap().pages.is_empty());

    // An UNMAP while tracking takes the kernel's dirty bits with it:
    // every page of the writable mapping is reported.
    rec.device_write_type1(c, 0x8000_0000, 1);
    b.unmap(1, &[rw(0x8000_0000, 0x8000_1fff, 0x20_0000)])
        .unwrap();
    assert_eq!(b.take_dirty_pages().unwrap().pages, [0x20_0000, 0x20_1000]);
    assert!(b.take_dirty_pages().unwrap().pages.is_empty());

    b.stop_dirty_tracking();
    // argsz 8, flags STOP.
    assert_eq!(
        rec.calls_of(Op::Type1DirtyPages).last().unwrap().arg,
        words32(&[8, 2])
    );
    assert!(!rec.type1_tracking(c));
}

#[test]
fn type1_mapping_over_regions_is_read_per_container_mapping() {
    let (rec, b) = type1(true);
    // Three RAM regions: three container mappings, three bitmaps.
    attach(&b, &[rw(0x8000_0000, 0x8011_ffff, 0xf_0000)]);
    let c = b.container_of(EP).unwrap();
    b.start_dirty_tracking().unwrap();
    rec.device_write_type1(c, 0x8000_f000, 0x2000);
    let from = rec.calls_of(Op::Type1DirtyPages).len();
    let d = b.take_dirty_pages().unwrap();
    // IOVA 0x8000f000 is guest 0xff000 (region 0), 0x80010000 is guest
    // 0x100000 (region 1).
    assert_eq!(d.pages, [0xf_f000, 0x10_0000]);
    let gets = rec.calls_of(Op::Type1DirtyPages)[from..].to_vec();
    let ranges: Vec<(u64, u64)> = gets
        .iter()
        .map(|g| (le64(&g.arg, 8), le64(&g.arg, 16)))
        .collect();
    assert_eq!(
        ranges,
        [
            (0x8000_0000, 0x1_0000),
            (0x8001_0000, 0x10_0000),
            (0x8011_0000, 0x1_0000)
        ]
    );
}

#[test]
fn type1_endpoint_plugged_after_start_is_untracked_once_then_tracked() {
    let (rec, b) = type1(true);
    b.start_dirty_tracking().unwrap();
    b.add_endpoint(17, Path::new("/sys/bus/pci/devices/0000:66:00.0"))
        .unwrap();
    let d = b.take_dirty_pages().unwrap();
    assert_eq!(d.untracked, [17]);
    let c = b.container_of(17).unwrap();
    assert!(rec.type1_tracking(c));
    assert!(b.take_dirty_pages().unwrap().untracked.is_empty());
}
