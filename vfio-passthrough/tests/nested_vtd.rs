//! VT-d nested flows (per-PASID shadowing) over the recording host:
//! attach → bind → invalidate burst → PASID-cache refresh → detach, with
//! failures injected and the rollback checked against the fake kernel.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vfio_passthrough::host::Op;
use vfio_passthrough::recording::{FakeIommu, RecordingHost};
use vfio_passthrough::IommufdBackend;
use vmm_iommu::backend::{BackendError, DomainView, IommuBackend, TableBinding};
use vmm_iommu::invalidation::{
    coalesce, Caches, Invalidation, Scope, VaRange, WIDEN_THRESHOLD_PAGES,
};
use vmm_iommu::wire::{Status, TableDesc, VIRTIO_IOMMU_PSTF_INTEL_VTD};

const DEV: &str = "/sys/bus/pci/devices/0000:65:00.0";
const EP: u32 = 16;

struct Fixture {
    rec: Arc<RecordingHost>,
    mem: vm_memory::GuestMemoryMmap,
    b: IommufdBackend,
}

fn fixture(rec: RecordingHost) -> Fixture {
    let (rec, host, mem, ram) = setup(rec);
    let b = IommufdBackend::new(host, ram).expect("backend");
    b.add_endpoint(EP, Path::new(DEV)).expect("add");
    write_pasid_dir(&mem);
    Fixture { rec, mem, b }
}

fn table(bits: u8) -> TableDesc {
    TableDesc::IntelVtd {
        pasid_bits: bits,
        pasid_dir_ptr: PASID_DIR,
    }
}

fn bind(f: &Fixture) -> Result<(), BackendError> {
    f.b.bind_table(
        EP,
        &TableBinding {
            domain: 1,
            table: table(6),
        },
    )
}

/// The out_hwpt_id of each successful HWPT_ALLOC since call `from`.
fn allocated_hwpts(rec: &RecordingHost, from: usize) -> Vec<u32> {
    rec.calls()[from..]
        .iter()
        .filter(|c| c.op == Op::HwptAlloc && c.result.is_ok())
        .map(|c| le32(&c.out, 16))
        .collect()
}

fn range(pasid: u32, addr: u64, pages: u64) -> Invalidation {
    Invalidation {
        caches: Caches::IOTLB,
        scope: Scope::Range(VaRange {
            pasid: Some(pasid),
            addr,
            granule_log2: 12,
            pages,
            leaf_only: true,
        }),
        archid: None,
    }
}

#[test]
fn construction_maps_all_ram_and_add_sets_up_nesting() {
    let f = fixture(RecordingHost::default());
    let ops = f.rec.ops();
    assert_eq!(
        &ops[..8],
        &[
            Op::OpenIommufd,
            Op::IoasAlloc,
            Op::IoasMap,
            Op::IoasMap,
            Op::IoasMap,
            Op::IoasMap,
            Op::OpenCdev,
            Op::GetHwInfo
        ]
    );
    // The nest parent on the GPA IOAS: flags NEST_PARENT | ALLOC_PASID.
    let parent = &f.rec.calls_of(Op::HwptAlloc)[0];
    assert_eq!(le32(&parent.arg, 4), 1 | 8);
    assert_eq!(le32(&parent.arg, 12), f.b.gpa_ioas());
    assert_eq!(le32(&parent.arg, 24), 0); // IOMMU_HWPT_DATA_NONE
    assert_eq!(f.rec.count(Op::FaultQueueAlloc), 1);
    assert_eq!(f.rec.ioas_mappings(f.b.gpa_ioas()).len(), 4);
    let c = f.b.caps(EP);
    assert_eq!(c.table_formats, vec![VIRTIO_IOMMU_PSTF_INTEL_VTD]);
    assert_eq!(c.pasid_bits, 20);
    assert!(c.page_requests);
    assert_eq!(c.page_size_mask, 1 << 12 | 1 << 21 | 1 << 30);
}

#[test]
fn bind_shadows_each_present_pasid_entry() {
    let f = fixture(RecordingHost::default());
    write_fl_entry(&f.mem, 0, Some(ROOT_A));
    write_fl_entry(&f.mem, 5, Some(ROOT_B));
    write_fl_entry(&f.mem, 6, Some(ROOT_A));
    let from = f.rec.len();
    bind(&f).unwrap();
    // Two distinct first-stage tables: two nested HWPTs (PASID 6 shares A).
    let allocs: Vec<_> = f.rec.calls()[from..]
        .iter()
        .filter(|c| c.op == Op::HwptAlloc)
        .cloned()
        .collect();
    assert_eq!(allocs.len(), 2);
    let parent = le32(&f.rec.calls_of(Op::HwptAlloc)[0].out, 16);
    let fault_id = le32(&f.rec.calls_of(Op::FaultQueueAlloc)[0].out, 8);
    for (c, root) in allocs.iter().zip([ROOT_A, ROOT_B]) {
        // flags: ALLOC_PASID | FAULT_ID_VALID; dev_id 1; pt_id parent;
        // data_type VTD_S1 (1); data_len 24; data_uptr 0 (filled by host);
        // fault_id.
        assert_eq!(le32(&c.arg, 0), 48);
        assert_eq!(le32(&c.arg, 4), 8 | 4);
        assert_eq!(le32(&c.arg, 8), 1);
        assert_eq!(le32(&c.arg, 12), parent);
        assert_eq!(le32(&c.arg, 24), 1);
        assert_eq!(le32(&c.arg, 28), 24);
        assert_eq!(le64(&c.arg, 32), 0);
        assert_eq!(le32(&c.arg, 40), fault_id);
        // iommu_hwpt_vtd_s1 { flags 0, pgtbl_addr, addr_width 48 }.
        let mut want = 0u64.to_le_bytes().to_vec();
        want.extend_from_slice(&root.to_le_bytes());
        want.extend_from_slice(&48u32.to_le_bytes());
        want.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(c.payload, want);
    }
    let [a, b] = allocated_hwpts(&f.rec, from)[..] else {
        panic!("two HWPTs")
    };
    let dev = f.b.device_of(EP).unwrap();
    assert_eq!(f.rec.attached(dev, 0), Some(a));
    assert_eq!(f.rec.attached(dev, 5), Some(b));
    assert_eq!(f.rec.attached(dev, 6), Some(a));
    assert_eq!(f.rec.attached(dev, 7), None);
    // The device itself first (no PASID flag), then the PASIDs.
    let attaches: Vec<_> = f.rec.calls()[from..]
        .iter()
        .filter(|c| c.op == Op::AttachPt)
        .cloned()
        .collect();
    assert_eq!(le32(&attaches[0].arg, 4), 0);
    assert!(attaches[1..].iter().all(|c| le32(&c.arg, 4) == 1));
}

#[test]
fn burst_of_512_pages_is_one_hwpt_invalidate() {
    let f = fixture(RecordingHost::default());
    write_fl_entry(&f.mem, 5, Some(ROOT_B));
    let from = f.rec.len();
    bind(&f).unwrap();
    let hwpt = allocated_hwpts(&f.rec, from)[0];
    // 512 single-page invalidations, out of order, as a guest sends them.
    let mut batch: Vec<Invalidation> = (0..512u64)
        .map(|i| range(5, 0x100_0000 + ((i * 37) % 512) * 4096, 1))
        .collect();
    coalesce(&mut batch, WIDEN_THRESHOLD_PAGES);
    let before = f.rec.count(Op::HwptInvalidate);
    f.b.invalidate(1, &batch).unwrap();
    let calls = f.rec.calls_of(Op::HwptInvalidate);
    assert_eq!(calls.len() - before, 1);
    let c = calls.last().unwrap();
    // size@0 hwpt_id@4 data_uptr@8 data_type@16 (VTD_S1 = 0) entry_len@20
    // entry_num@24.
    assert_eq!(le32(&c.arg, 4), hwpt);
    assert_eq!(le32(&c.arg, 16), 0);
    assert_eq!(le32(&c.arg, 20), 24);
    assert_eq!(le32(&c.arg, 24), 1);
    assert_eq!(le64(&c.payload, 0), 0x100_0000);
    assert_eq!(le64(&c.payload, 8), 512);
    assert_eq!(le32(&c.payload, 16), 1); // IOMMU_VTD_INV_FLAGS_LEAF
}

#[test]
fn domain_wide_invalidation_goes_to_each_distinct_hwpt_once() {
    let f = fixture(RecordingHost::default());
    write_fl_entry(&f.mem, 0, Some(ROOT_A));
    write_fl_entry(&f.mem, 1, Some(ROOT_A));
    write_fl_entry(&f.mem, 2, Some(ROOT_B));
    bind(&f).unwrap();
    let dom = Invalidation {
        caches: Caches::IOTLB,
        scope: Scope::Domain,
        archid: Some(3),
    };
    let before = f.rec.count(Op::HwptInvalidate);
    f.b.invalidate(1, &[dom, range(2, 0x1000, 1)]).unwrap();
    let calls = f.rec.calls_of(Op::HwptInvalidate);
    assert_eq!(calls.len() - before, 2);
    // Invalidate-all entry: addr 0, npages U64_MAX.
    assert_eq!(le64(&calls[before].payload, 8), u64::MAX);
}

#[test]
fn pasid_cache_invalidation_replaces_then_detaches() {
    let f = fixture(RecordingHost::default());
    write_fl_entry(&f.mem, 0, Some(ROOT_A));
    write_fl_entry(&f.mem, 5, Some(ROOT_B));
    let from = f.rec.len();
    bind(&f).unwrap();
    let [a, b] = allocated_hwpts(&f.rec, from)[..] else {
        panic!()
    };
    let dev = f.b.device_of(EP).unwrap();
    // The guest points PASID 5 at table A and invalidates its PASID cache.
    write_fl_entry(&f.mem, 5, Some(ROOT_A));
    let pc = Invalidation {
        caches: Caches::PASID,
        scope: Scope::Pasid(5),
        archid: None,
    };
    f.b.invalidate(1, &[pc]).unwrap();
    assert_eq!(f.rec.attached(dev, 5), Some(a));
    assert!(!f.rec.is_live(b), "HWPT B is unused and destroyed");
    // Then clears it.
    write_fl_entry(&f.mem, 5, None);
    f.b.invalidate(1, &[pc]).unwrap();
    assert_eq!(f.rec.attached(dev, 5), None);
    assert_eq!(f.rec.attached(dev, 0), Some(a));
    // And a new entry appears with a domain-wide PASID-cache invalidation.
    write_fl_entry(&f.mem, 9, Some(ROOT_B));
    let all = Invalidation {
        caches: Caches::PASID,
        scope: Scope::Domain,
        archid: None,
    };
    f.b.invalidate(1, &[all]).unwrap();
    assert!(f.rec.attached(dev, 9).is_some());
}

#[test]
fn short_invalidate_is_retried_once_then_partial() {
    let f = fixture(RecordingHost::default());
    write_fl_entry(&f.mem, 5, Some(ROOT_B));
    bind(&f).unwrap();
    let batch = [
        range(5, 0x1000, 1),
        range(5, 0x10000, 1),
        range(5, 0x20000, 1),
    ];
    // First attempt handles 1, the retry handles the other 2: success.
    let n = f.rec.count(Op::HwptInvalidate);
    f.rec.partial_nth(n, 1, libc::EAGAIN);
    f.b.invalidate(1, &batch).unwrap();
    let calls = f.rec.calls_of(Op::HwptInvalidate);
    assert_eq!(calls.len(), n + 2);
    assert_eq!(le32(&calls[n + 1].arg, 24), 2);
    assert_eq!(le64(&calls[n + 1].payload, 0), 0x10000);
    // Both attempts short: PARTIAL at the first entry never handled.
    f.rec.partial_nth(n + 2, 1, libc::EINVAL);
    f.rec.partial_nth(n + 3, 0, libc::EINVAL);
    let e = f.b.invalidate(1, &batch).unwrap_err();
    assert!(matches!(e, BackendError::Partial { index: 1, .. }), "{e:?}");
    assert_eq!(e.status(), Status::DevErr);
    assert_eq!(f.rec.count(Op::HwptInvalidate), n + 4);
}

#[test]
fn failed_hwpt_alloc_during_bind_leaves_nothing_behind() {
    let f = fixture(RecordingHost::default());
    write_fl_entry(&f.mem, 0, Some(ROOT_A));
    write_fl_entry(&f.mem, 5, Some(ROOT_B));
    let live = f.rec.live_objects();
    // HWPT_ALLOC #0 was the nest parent; #1 is A, #2 is B.
    f.rec.fail_nth(Op::HwptAlloc, 2, libc::ENOMEM);
    assert_eq!(bind(&f).unwrap_err().status(), Status::DevErr);
    assert_eq!(f.rec.live_objects(), live);
    assert_eq!(f.rec.attachments(f.b.device_of(EP).unwrap()), 0);
    // As before: the same bind now works.
    bind(&f).unwrap();
}

#[test]
fn failed_pasid_attach_rolls_back_to_the_previous_binding() {
    let f = fixture(RecordingHost::default());
    write_fl_entry(&f.mem, 0, Some(ROOT_A));
    bind(&f).unwrap();
    let dev = f.b.device_of(EP).unwrap();
    let before = f.b.attachments(EP);
    let live = f.rec.live_objects();
    // The guest rebinds with a second table: PASID 0 moves to B, PASIDs 5
    // and 6 join; the attach of PASID 6 fails.
    write_fl_entry(&f.mem, 0, Some(ROOT_B));
    write_fl_entry(&f.mem, 5, Some(ROOT_A));
    write_fl_entry(&f.mem, 6, Some(ROOT_B));
    let n = f.rec.count(Op::AttachPt);
    f.rec.fail_nth(Op::AttachPt, n + 2, libc::EBUSY);
    let e =
        f.b.bind_table(
            EP,
            &TableBinding {
                domain: 2,
                table: table(6),
            },
        )
        .unwrap_err();
    assert_eq!(e.status(), Status::DevErr);
    assert_eq!(f.b.attachments(EP), before);
    assert_eq!(f.rec.attachments(dev), 1);
    assert_eq!(f.rec.attached(dev, 0), before.get(&0).copied());
    assert_eq!(f.rec.live_objects(), live);
    // Invalidations of the old domain still reach the old HWPT.
    f.b.invalidate(1, &[range(0, 0x1000, 1)]).unwrap();
}

#[test]
fn bad_guest_tables_are_refused_before_any_ioctl() {
    let f = fixture(RecordingHost::default());
    let n = f.rec.len();
    let bad_dir = TableDesc::IntelVtd {
        pasid_bits: 6,
        pasid_dir_ptr: 0x200_0000,
    };
    let unaligned = TableDesc::IntelVtd {
        pasid_bits: 6,
        pasid_dir_ptr: PASID_DIR + 8,
    };
    let wide = TableDesc::IntelVtd {
        pasid_bits: 21,
        pasid_dir_ptr: PASID_DIR,
    };
    for (t, s) in [
        (bad_dir, Status::Range),
        (unaligned, Status::Inval),
        (wide, Status::Range),
    ] {
        let e =
            f.b.bind_table(
                EP,
                &TableBinding {
                    domain: 1,
                    table: t,
                },
            )
            .unwrap_err();
        assert_eq!(e.status(), s, "{t:?}");
    }
    // A first-stage root outside guest RAM.
    write_fl_entry(&f.mem, 3, Some(0x8000_0000));
    assert_eq!(bind(&f).unwrap_err().status(), Status::Range);
    // A table format the endpoint does not offer.
    let smmu = TableDesc::ArmSmmuV3 {
        s1fmt: 0,
        s1dss: 0,
        s1contextptr: 0x30_0000,
        s1cdmax: 0,
    };
    assert_eq!(
        f.b.bind_table(
            EP,
            &TableBinding {
                domain: 1,
                table: smmu
            }
        )
        .unwrap_err()
        .status(),
        Status::Unsupp
    );
    assert_eq!(f.rec.len(), n);
}

#[test]
fn issue11_a_pass_through_entry_is_refused_unsupp_before_any_ioctl() {
    // One decoder with the software IOMMU: PGTT 4 (pass-through) is not a
    // first-stage table, so the binding is refused as a whole, UNSUPP.
    let f = fixture(RecordingHost::default());
    write_fl_entry(&f.mem, 0, Some(ROOT_A));
    write_pt_entry(&f.mem, 7);
    let n = f.rec.len();
    assert_eq!(bind(&f).unwrap_err().status(), Status::Unsupp);
    assert_eq!(f.rec.len(), n);
}

#[test]
fn unbind_and_detach_release_everything_of_the_binding() {
    let f = fixture(RecordingHost::default());
    let live = f.rec.live_objects();
    write_fl_entry(&f.mem, 0, Some(ROOT_A));
    write_fl_entry(&f.mem, 5, Some(ROOT_B));
    bind(&f).unwrap();
    assert_eq!(f.rec.live_objects(), live + 2);
    f.b.unbind_table(EP, 1).unwrap();
    assert_eq!(f.rec.attachments(f.b.device_of(EP).unwrap()), 0);
    assert_eq!(f.rec.live_objects(), live);
    // Through attach with a table and detach too.
    let t = table(6);
    f.b.attach(
        EP,
        &DomainView {
            id: 3,
            bypass: false,
            mappings: &[],
            table: Some(&t),
        },
    )
    .unwrap();
    assert_eq!(f.rec.live_objects(), live + 2);
    f.b.detach(EP, 3).unwrap();
    assert_eq!(f.rec.live_objects(), live);
    let dev = f.b.device_of(EP).unwrap();
    f.b.remove_endpoint(EP).unwrap();
    assert_eq!(f.rec.attachments(dev), 0);
    assert!(f.b.device_of(EP).is_none());
}

#[test]
fn host_without_nesting_offers_map_mode_only() {
    let rec = RecordingHost::new(FakeIommu::IntelVtd {
        cap: 47 << 16,
        ecap: 0,
    });
    let f = fixture(rec);
    assert!(f.b.caps(EP).table_formats.is_empty());
    assert_eq!(f.rec.count(Op::HwptAlloc), 0);
    assert_eq!(bind(&f).unwrap_err().status(), Status::Unsupp);
}

#[test]
fn nest_parent_failure_degrades_to_map_mode() {
    let rec = RecordingHost::default();
    rec.fail_nth(Op::HwptAlloc, 0, libc::EOPNOTSUPP);
    let f = fixture(rec);
    assert!(f.b.caps(EP).table_formats.is_empty());
    assert!(!f.b.caps(EP).page_requests);
}
