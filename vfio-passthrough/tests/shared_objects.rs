//! iommufd objects shared per physical IOMMU (issue 12), over the
//! recording host, whose devices can sit behind different IOMMU instances
//! (`RecordingHost::set_device_iommu`: the fake kernel refuses a HWPT,
//! vIOMMU or vDEVICE of another instance with EINVAL, as Linux does).
//! Endpoints behind one IOMMU share one nest parent (and on SMMUv3 one
//! vIOMMU and vEVENTQ, each endpoint a vDEVICE on it), so a domain
//! invalidation is one `IOMMU_HWPT_INVALIDATE` per physical IOMMU; the
//! shared objects go with their last endpoint; a failure halfway leaves
//! the kernel as it was.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vfio_passthrough::host::{Handle, Op};
use vfio_passthrough::recording::{FakeIommu, RecordingHost};
use vfio_passthrough::IommufdBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::backend::{BackendError, IommuBackend, TableBinding};
use vmm_iommu::invalidation::{Caches, Invalidation, Scope, VaRange};
use vmm_iommu::wire::TableDesc;

const DEV_A: &str = "/sys/bus/pci/devices/0000:00:04.0";
const DEV_B: &str = "/sys/bus/pci/devices/0000:00:05.0";
const EP_A: u32 = 0x20;
const EP_B: u32 = 0x21;
const DOMAIN: u32 = 7;
const CD_TABLE: u64 = 0x30_0000;
/// `IOMMU_HW_CAP_DIRTY_TRACKING`.
const CAP_DIRTY: u64 = 1;

struct Fixture {
    rec: Arc<RecordingHost>,
    mem: GuestMemoryMmap,
    b: IommufdBackend,
}

/// A backend with endpoint A at `DEV_A` (instance 0) and B at `DEV_B`
/// behind instance `b_instance`, both added.
fn fixture(hw: FakeIommu, caps: u64, b_instance: u32) -> Fixture {
    let host = RecordingHost::new(hw);
    host.set_hw_capabilities(caps);
    host.set_device_iommu(Path::new(DEV_B), b_instance);
    let (rec, host, mem, ram) = setup(host);
    let b = IommufdBackend::new(host, ram).expect("backend");
    b.add_endpoint(EP_A, Path::new(DEV_A)).expect("add A");
    b.add_endpoint(EP_B, Path::new(DEV_B)).expect("add B");
    Fixture { rec, mem, b }
}

fn smmu(b_instance: u32) -> Fixture {
    let f = fixture(FakeIommu::smmuv3(false), 0, b_instance);
    // SMMUv3 §5.4, hand-encoded CD for SubstreamID 1: T0SZ 25, TG0 4 KiB,
    // EPD1, V, IPS 48-bit, AA64, ASID 0x42; TTB0.
    let w0: u64 = 25 | 1 << 30 | 1 << 31 | 5 << 32 | 1 << 41 | 0x42 << 48;
    f.mem.write_obj(w0, GuestAddress(CD_TABLE + 64)).unwrap();
    f.mem
        .write_obj(0x40_0000u64, GuestAddress(CD_TABLE + 64 + 8))
        .unwrap();
    f
}

fn vtd(b_instance: u32, caps: u64) -> Fixture {
    let f = fixture(FakeIommu::vtd_nesting(), caps, b_instance);
    write_pasid_dir(&f.mem);
    write_fl_entry(&f.mem, 0, Some(ROOT_A));
    f
}

fn bind(f: &Fixture, ep: u32) -> Result<(), BackendError> {
    let table = match f.b.caps(ep).table_formats.first() {
        Some(&vmm_iommu::wire::VIRTIO_IOMMU_PSTF_ARM_SMMU_V3) => TableDesc::ArmSmmuV3 {
            s1fmt: 0,
            s1dss: 1,
            s1contextptr: CD_TABLE,
            s1cdmax: 4,
        },
        _ => TableDesc::IntelVtd {
            pasid_bits: 6,
            pasid_dir_ptr: PASID_DIR,
        },
    };
    f.b.bind_table(
        ep,
        &TableBinding {
            domain: DOMAIN,
            table,
        },
    )
}

fn page(pasid: u32, addr: u64) -> Invalidation {
    Invalidation {
        caches: Caches::IOTLB,
        scope: Scope::Range(VaRange {
            pasid: Some(pasid),
            addr,
            granule_log2: 12,
            pages: 1,
            leaf_only: true,
        }),
        archid: Some(0x42),
    }
}

fn pasid_cache(pasid: u32) -> Invalidation {
    Invalidation {
        caches: Caches::PASID,
        scope: Scope::Pasid(pasid),
        archid: None,
    }
}

/// The 16-byte commands of an SMMUv3 invalidate call, as word pairs.
fn commands(payload: &[u8]) -> Vec<(u64, u64)> {
    (0..payload.len() / 16)
        .map(|i| (le64(payload, 16 * i), le64(payload, 16 * i + 8)))
        .collect()
}

/// CFGI_CD (0x05) for vSID `sid`, SubstreamID `ssid`, Leaf 0.
fn cfgi_cd(sid: u32, ssid: u64) -> (u64, u64) {
    (0x05 | ssid << 12 | u64::from(sid) << 32, 0)
}

/// TLBI_NH_VA (0x12) of ASID 0x42, one 4 KiB page, LEAF, TG 0.
fn tlbi_va(addr: u64) -> (u64, u64) {
    (0x12 | 0x42 << 48, addr | 1)
}

fn ids_out(rec: &RecordingHost, op: Op, at: usize) -> Vec<u32> {
    rec.calls_of(op)
        .iter()
        .filter(|c| c.result.is_ok())
        .map(|c| le32(&c.out, at))
        .collect()
}

fn destroyed(rec: &RecordingHost, from: usize) -> Vec<u32> {
    rec.calls()[from..]
        .iter()
        .filter(|c| c.op == Op::Destroy && c.result.is_ok())
        .map(|c| le32(&c.arg, 4))
        .collect()
}

#[test]
fn smmu_two_endpoints_on_one_iommu_share_parent_viommu_and_veventq() {
    let f = smmu(0);
    // One parent, one vIOMMU, one vEVENTQ; two vDEVICEs on that vIOMMU.
    assert_eq!(f.rec.count(Op::HwptAlloc), 1);
    assert_eq!(f.rec.count(Op::ViommuAlloc), 1);
    assert_eq!(f.rec.count(Op::VeventqAlloc), 1);
    let parent = ids_out(&f.rec, Op::HwptAlloc, 16)[0];
    let viommu = ids_out(&f.rec, Op::ViommuAlloc, 20)[0];
    let vdevs = f.rec.calls_of(Op::VdeviceAlloc);
    assert_eq!(vdevs.len(), 2);
    // viommu_id, dev_id, virt_id (the endpoint: the vSID).
    let seen: Vec<(u32, u32, u64)> = vdevs
        .iter()
        .map(|d| (le32(&d.arg, 4), le32(&d.arg, 8), le64(&d.arg, 16)))
        .collect();
    assert_eq!(
        seen,
        [(viommu, 1, u64::from(EP_A)), (viommu, 2, u64::from(EP_B))]
    );
    assert_eq!(f.b.nest_parent_of(EP_A), Some(parent));
    assert_eq!(f.b.nest_parent_of(EP_B), Some(parent));
    assert_eq!(f.b.parent_users(parent), [EP_A, EP_B]);
    // B was probed on A's parent (attach accepted, detached at once): it
    // is blocked, attached to nothing.
    let dev_b = f.b.device_of(EP_B).unwrap();
    let probe: Vec<(Op, u32)> = f
        .rec
        .calls()
        .iter()
        .filter(|c| c.target == dev_b && matches!(c.op, Op::AttachPt | Op::DetachPt))
        .map(|c| (c.op, le32(&c.arg, 8)))
        .take(2)
        .collect();
    assert_eq!(probe, [(Op::AttachPt, parent), (Op::DetachPt, 0)]);
    assert_eq!(f.rec.attachments(dev_b), 0);
    assert_eq!(f.rec.built_on(viommu).len(), 3); // two vDEVICEs, the vEVENTQ
}

#[test]
fn smmu_domain_invalidation_is_one_call_per_viommu_with_every_endpoints_commands() {
    let f = smmu(0);
    bind(&f, EP_A).unwrap();
    bind(&f, EP_B).unwrap();
    f.b.invalidate(DOMAIN, &[pasid_cache(1), page(1, 0x4000_0000)])
        .unwrap();
    let calls = f.rec.calls_of(Op::HwptInvalidate);
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    let viommu = ids_out(&f.rec, Op::ViommuAlloc, 20)[0];
    // hwpt_id = the shared vIOMMU, ARM_SMMUV3 data, 16-byte entries, 3.
    assert_eq!(
        (le32(&c.arg, 4), le32(&c.arg, 16), le32(&c.arg, 20)),
        (viommu, 1, 16)
    );
    // Each endpoint's CFGI_CD with its own vSID; the domain's TLBI once.
    assert_eq!(
        commands(&c.payload),
        [cfgi_cd(EP_A, 1), tlbi_va(0x4000_0000), cfgi_cd(EP_B, 1)]
    );
    assert_eq!(le32(&c.arg, 24), 3);
}

#[test]
fn smmu_two_iommus_give_two_parents_two_viommus_and_two_calls() {
    let f = smmu(1);
    let parents = ids_out(&f.rec, Op::HwptAlloc, 16);
    let viommus = ids_out(&f.rec, Op::ViommuAlloc, 20);
    assert_eq!(parents.len(), 2);
    assert_eq!(viommus.len(), 2);
    assert_eq!(f.rec.count(Op::VeventqAlloc), 2);
    // The kernel refused B on A's parent (another SMMU): EINVAL, then
    // B's own parent was allocated for B's device (dev_id 2).
    let dev_b = f.b.device_of(EP_B).unwrap();
    let refused: Vec<_> = f
        .rec
        .calls_of(Op::AttachPt)
        .into_iter()
        .filter(|c| c.target == dev_b && le32(&c.arg, 8) == parents[0])
        .map(|c| c.result)
        .collect();
    assert_eq!(refused, [Err(libc::EINVAL)]);
    assert_eq!(le32(&f.rec.calls_of(Op::HwptAlloc)[1].arg, 8), 2);
    assert_eq!(f.b.nest_parent_of(EP_B), Some(parents[1]));
    bind(&f, EP_A).unwrap();
    bind(&f, EP_B).unwrap();
    f.b.invalidate(DOMAIN, &[pasid_cache(1), page(1, 0x4000_0000)])
        .unwrap();
    let calls = f.rec.calls_of(Op::HwptInvalidate);
    let per_call: Vec<(u32, Vec<(u64, u64)>)> = calls
        .iter()
        .map(|c| (le32(&c.arg, 4), commands(&c.payload)))
        .collect();
    assert_eq!(
        per_call,
        [
            (viommus[0], vec![cfgi_cd(EP_A, 1), tlbi_va(0x4000_0000)]),
            (viommus[1], vec![cfgi_cd(EP_B, 1), tlbi_va(0x4000_0000)]),
        ]
    );
}

#[test]
fn smmu_shared_objects_are_destroyed_when_the_last_endpoint_goes() {
    let f = smmu(0);
    bind(&f, EP_A).unwrap();
    bind(&f, EP_B).unwrap();
    let parent = ids_out(&f.rec, Op::HwptAlloc, 16)[0];
    let viommu = ids_out(&f.rec, Op::ViommuAlloc, 20)[0];
    let queue = ids_out(&f.rec, Op::VeventqAlloc, 20)[0];
    let queue_fd = Handle(le32(&f.rec.calls_of(Op::VeventqAlloc)[0].out, 24) as i32);
    let vdevs = ids_out(&f.rec, Op::VdeviceAlloc, 12);
    let from = f.rec.len();
    f.b.remove_endpoint(EP_A).unwrap();
    // A's nested HWPT and vDEVICE go; the parent, vIOMMU and vEVENTQ stay
    // for B, whose DMA still translates through them.
    let gone = destroyed(&f.rec, from);
    assert_eq!(gone.len(), 2);
    assert_eq!(gone[1], vdevs[0]);
    for id in [parent, viommu, queue, vdevs[1]] {
        assert!(f.rec.is_live(id), "object {id}");
    }
    assert_eq!(f.b.parent_users(parent), [EP_B]);
    let dev_b = f.b.device_of(EP_B).unwrap();
    assert!(f.rec.attached(dev_b, 0).is_some());
    let from = f.rec.len();
    f.b.remove_endpoint(EP_B).unwrap();
    let gone = destroyed(&f.rec, from);
    // B's HWPT, then its vDEVICE, the vEVENTQ, the vIOMMU, the parent:
    // children first, as the kernel wants.
    assert_eq!(gone[1..], [vdevs[1], queue, viommu, parent]);
    assert!(f
        .rec
        .calls()
        .iter()
        .any(|c| c.op == Op::Close && c.target == queue_fd));
    // Only the guest-physical IOAS is left.
    assert_eq!(f.rec.live_objects(), 1);
    assert!(f.b.parent_users(parent).is_empty());
}

#[test]
fn smmu_failed_vdevice_on_a_shared_viommu_leaves_the_endpoint_map_only_and_the_rest_as_it_was() {
    let host = RecordingHost::new(FakeIommu::smmuv3(false));
    host.fail_nth(Op::VdeviceAlloc, 1, libc::ENOMEM);
    let (rec, host, _mem, ram) = setup(host);
    let b = IommufdBackend::new(host, ram).unwrap();
    b.add_endpoint(EP_A, Path::new(DEV_A)).unwrap();
    let live = rec.live_objects();
    b.add_endpoint(EP_B, Path::new(DEV_B)).unwrap();
    assert!(b.caps(EP_B).table_formats.is_empty());
    assert_eq!(b.nest_parent_of(EP_B), None);
    assert_eq!(rec.live_objects(), live);
    let parent = b.nest_parent_of(EP_A).unwrap();
    assert_eq!(b.parent_users(parent), [EP_A]);
    // B going does not touch A's parent; A going frees it.
    b.remove_endpoint(EP_B).unwrap();
    assert!(rec.is_live(parent));
    b.remove_endpoint(EP_A).unwrap();
    assert_eq!(rec.live_objects(), 1);
}

#[test]
fn smmu_failed_viommu_for_a_second_iommu_frees_the_new_parent() {
    let host = RecordingHost::new(FakeIommu::smmuv3(false));
    host.set_device_iommu(Path::new(DEV_B), 1);
    host.fail_nth(Op::ViommuAlloc, 1, libc::ENOMEM);
    let (rec, host, _mem, ram) = setup(host);
    let b = IommufdBackend::new(host, ram).unwrap();
    b.add_endpoint(EP_A, Path::new(DEV_A)).unwrap();
    let live = rec.live_objects();
    b.add_endpoint(EP_B, Path::new(DEV_B)).unwrap();
    assert!(b.caps(EP_B).table_formats.is_empty());
    let parents = ids_out(&rec, Op::HwptAlloc, 16);
    assert_eq!(parents.len(), 2);
    assert!(!rec.is_live(parents[1]));
    assert_eq!(rec.live_objects(), live);
}

#[test]
fn a_probe_attachment_that_cannot_be_undone_refuses_the_endpoint() {
    let host = RecordingHost::new(FakeIommu::smmuv3(false));
    // Detach 0 ends A's reserved-region probe; detach 1 would end B's
    // probe on A's parent.
    host.fail_nth(Op::DetachPt, 1, libc::EIO);
    let (rec, host, _mem, ram) = setup(host);
    let b = IommufdBackend::new(host, ram).unwrap();
    b.add_endpoint(EP_A, Path::new(DEV_A)).unwrap();
    let (handles, live) = (rec.open_handles(), rec.live_objects());
    let e = b.add_endpoint(EP_B, Path::new(DEV_B)).unwrap_err();
    assert!(
        matches!(
            e,
            BackendError::Host {
                op: "VFIO_DEVICE_DETACH_IOMMUFD_PT",
                ..
            }
        ),
        "{e:?}"
    );
    // B's cdev is closed (which detaches it), nothing was allocated, and
    // A's parent still has A alone.
    assert_eq!(rec.open_handles(), handles);
    assert_eq!(rec.live_objects(), live);
    assert_eq!(b.device_of(EP_B), None);
    let parent = b.nest_parent_of(EP_A).unwrap();
    assert_eq!(b.parent_users(parent), [EP_A]);
}

#[test]
fn vtd_equal_entries_of_two_endpoints_share_one_nested_hwpt_and_one_invalidate() {
    let f = vtd(0, 0);
    assert_eq!(f.rec.count(Op::HwptAlloc), 1); // one nest parent
    bind(&f, EP_A).unwrap();
    bind(&f, EP_B).unwrap();
    // PASID 0's entry is the same table for both: one nested HWPT.
    let hwpts = ids_out(&f.rec, Op::HwptAlloc, 16);
    assert_eq!(hwpts.len(), 2);
    let nested = hwpts[1];
    for ep in [EP_A, EP_B] {
        let dev = f.b.device_of(ep).unwrap();
        assert_eq!(f.rec.attached(dev, 0), Some(nested));
    }
    f.b.invalidate(DOMAIN, &[page(0, 0x7000)]).unwrap();
    let calls = f.rec.calls_of(Op::HwptInvalidate);
    assert_eq!(calls.len(), 1);
    // hwpt_id, VTD_S1 (0), entry_len 24, one entry {0x7000, 1 page, LEAF}.
    let c = &calls[0];
    assert_eq!(
        (
            le32(&c.arg, 4),
            le32(&c.arg, 16),
            le32(&c.arg, 20),
            le32(&c.arg, 24)
        ),
        (nested, 0, 24, 1)
    );
    assert_eq!(
        (
            le64(&c.payload, 0),
            le64(&c.payload, 8),
            le32(&c.payload, 16)
        ),
        (0x7000, 1, 1)
    );
    // The HWPT lives while one endpoint binds it.
    f.b.unbind_table(EP_A, DOMAIN).unwrap();
    assert!(f.rec.is_live(nested));
    f.b.invalidate(DOMAIN, &[page(0, 0x7000)]).unwrap();
    assert_eq!(f.rec.count(Op::HwptInvalidate), 2);
    f.b.unbind_table(EP_B, DOMAIN).unwrap();
    assert!(!f.rec.is_live(nested));
}

#[test]
fn vtd_rebinding_one_endpoint_leaves_the_other_on_the_shared_hwpt() {
    let f = vtd(0, 0);
    bind(&f, EP_A).unwrap();
    bind(&f, EP_B).unwrap();
    let shared = *ids_out(&f.rec, Op::HwptAlloc, 16).last().unwrap();
    // The guest points PASID 0 elsewhere and binds A again: A gets a
    // HWPT of its own, B keeps the shared one.
    write_fl_entry(&f.mem, 0, Some(ROOT_B));
    bind(&f, EP_A).unwrap();
    let a = f.rec.attached(f.b.device_of(EP_A).unwrap(), 0).unwrap();
    let b = f.rec.attached(f.b.device_of(EP_B).unwrap(), 0).unwrap();
    assert_ne!(a, shared);
    assert_eq!(b, shared);
    assert!(f.rec.is_live(shared));
    // Both in the domain: an invalidation reaches both HWPTs, one call
    // each.
    f.b.invalidate(DOMAIN, &[page(0, 0x7000)]).unwrap();
    let targets: Vec<u32> = f
        .rec
        .calls_of(Op::HwptInvalidate)
        .iter()
        .map(|c| le32(&c.arg, 4))
        .collect();
    let mut want = vec![shared, a];
    want.sort_unstable();
    assert_eq!(targets, want);
}

#[test]
fn vtd_two_iommus_give_two_parents_two_hwpts_and_two_calls() {
    let f = vtd(1, 0);
    let parents = ids_out(&f.rec, Op::HwptAlloc, 16);
    assert_eq!(parents.len(), 2);
    bind(&f, EP_A).unwrap();
    bind(&f, EP_B).unwrap();
    let all = ids_out(&f.rec, Op::HwptAlloc, 16);
    let nested = &all[2..];
    assert_eq!(nested.len(), 2);
    // Each nested HWPT is built on its endpoint's own parent.
    let on: Vec<u32> = f.rec.calls_of(Op::HwptAlloc)[2..]
        .iter()
        .map(|c| le32(&c.arg, 12))
        .collect();
    assert_eq!(on, parents);
    f.b.invalidate(DOMAIN, &[page(0, 0x7000)]).unwrap();
    let targets: Vec<u32> = f
        .rec
        .calls_of(Op::HwptInvalidate)
        .iter()
        .map(|c| le32(&c.arg, 4))
        .collect();
    assert_eq!(targets, nested);
}

#[test]
fn dirty_tracking_runs_once_per_shared_parent() {
    let f = vtd(0, CAP_DIRTY);
    let parent = f.b.nest_parent_of(EP_A).unwrap();
    assert_eq!(f.b.nest_parent_of(EP_B), Some(parent));
    bind(&f, EP_A).unwrap();
    bind(&f, EP_B).unwrap();
    let d = f.b.start_dirty_tracking().unwrap();
    assert!(d.untracked.is_empty());
    assert_eq!(f.rec.count(Op::HwptSetDirtyTracking), 1);
    f.rec.device_write_hwpt(parent, 0x5000, 0x1000);
    let from = f.rec.count(Op::HwptGetDirtyBitmap);
    let d = f.b.take_dirty_pages().unwrap();
    assert_eq!(d.pages, [0x5000]);
    // One read per RAM region (four), not one per endpoint.
    assert_eq!(f.rec.count(Op::HwptGetDirtyBitmap) - from, 4);
    // A going leaves the parent tracking for B.
    f.b.remove_endpoint(EP_A).unwrap();
    assert!(f.rec.hwpt_tracking(parent));
    f.b.stop_dirty_tracking();
    assert!(!f.rec.hwpt_tracking(parent));
}

#[test]
fn a_dirty_capable_endpoint_does_not_join_a_parent_that_cannot_track() {
    // A's parent is allocated without tracking (the kernel refuses the
    // flag once); B, on the same IOMMU but able to track, gets its own.
    let host = RecordingHost::new(FakeIommu::vtd_nesting());
    host.set_hw_capabilities(CAP_DIRTY);
    host.fail_nth(Op::HwptAlloc, 0, libc::EOPNOTSUPP);
    let (rec, host, _mem, ram) = setup(host);
    let b = IommufdBackend::new(host, ram).unwrap();
    b.add_endpoint(EP_A, Path::new(DEV_A)).unwrap();
    b.add_endpoint(EP_B, Path::new(DEV_B)).unwrap();
    let (pa, pb) = (
        b.nest_parent_of(EP_A).unwrap(),
        b.nest_parent_of(EP_B).unwrap(),
    );
    assert_ne!(pa, pb);
    let tracking = b.start_dirty_tracking().unwrap();
    assert!(rec.hwpt_tracking(pb));
    assert!(!rec.hwpt_tracking(pa));
    assert!(tracking.untracked.is_empty()); // nobody attached yet
}

#[test]
fn vtd_a_failed_bind_onto_a_shared_hwpt_keeps_it_for_its_owner() {
    let f = vtd(0, 0);
    bind(&f, EP_A).unwrap();
    let nested = *ids_out(&f.rec, Op::HwptAlloc, 16).last().unwrap();
    let live = f.rec.live_objects();
    // B's attach to the shared HWPT fails: B is as before (blocked), the
    // HWPT is A's still and was not counted for B.
    f.rec
        .fail_nth(Op::AttachPt, f.rec.count(Op::AttachPt), libc::EIO);
    assert!(bind(&f, EP_B).is_err());
    assert_eq!(f.rec.count(Op::HwptAlloc), 2); // no HWPT of B's own
    assert_eq!(f.rec.live_objects(), live);
    assert_eq!(f.rec.attachments(f.b.device_of(EP_B).unwrap()), 0);
    f.b.unbind_table(EP_A, DOMAIN).unwrap();
    assert!(!f.rec.is_live(nested));
}
