//! The host's IOVA holes become the endpoint's reserved regions, over the
//! recording host: a type1 container's `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`
//! gaps and an iommufd device's reserved regions (`IOMMU_IOAS_IOVA_RANGES`
//! of an IOAS it is attached to) are reported by PROBE as RESV_MEM RESERVED
//! for that endpoint, and a MAP into one is RANGE before the kernel hears
//! of it (virtio v1.3, "PROBE properties / RESV_MEM", device requirements:
//! "The device SHOULD reject a MAP request that overlaps a RESV_MEM
//! region.").

use std::path::Path;
use std::sync::Arc;

use vfio_passthrough::host::{HostIommu, Op};
use vfio_passthrough::recording::RecordingHost;
use vfio_passthrough::{GuestRam, IommufdBackend, Type1Backend};
use vmm_iommu::backend::IommuBackend;
use vmm_iommu::config::{IommuConfig, ReservedKind, ReservedRegion};
use vmm_iommu::testing::{driver_features, Harness};
use vmm_iommu::wire::*;
use vmm_iommu::Router;

const DEV: &str = "/sys/bus/pci/devices/0000:65:00.0";
const EP: u32 = 16;
const MSI: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);
/// A hole below 4 GiB besides the MSI window (an RMRR, say).
const HOLE: (u64, u64) = (0x8000_0000, 0x800f_ffff);
const PHYS: u64 = 0x20_0000;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The config names the MSI window itself, as an x86 VMM's does.
fn cfg() -> IommuConfig {
    IommuConfig {
        reserved_regions: vec![ReservedRegion {
            start: MSI.0,
            end: MSI.1,
            kind: ReservedKind::Msi,
        }],
        ..IommuConfig::default()
    }
}

/// A device whose endpoint EP is served by the backend `make` builds over
/// the harness's guest RAM.
fn harness<B: IommuBackend + 'static>(
    rec: &Arc<RecordingHost>,
    make: impl FnOnce(Arc<dyn HostIommu>, GuestRam) -> B,
) -> (Harness, Arc<B>) {
    let host: Arc<dyn HostIommu> = rec.clone();
    let mut out = None;
    let h = Harness::with_router(
        &cfg(),
        &[EP],
        16,
        &[],
        |mem, _| {
            let b = Arc::new(make(host, GuestRam::new(mem.clone()).unwrap()));
            out = Some(b.clone());
            let mut r = Router::new();
            r.add(b, &[EP]);
            r
        },
        driver_features,
    );
    (h, out.unwrap())
}

/// The exact PROBE properties: the RESV_MEM properties encoded in order,
/// zeroes after them.
fn expect_probe(h: &mut Harness, props: &[(u8, u64, u64)]) {
    let size = h.dev.config().probe_size;
    let (status, got) = h.probe(EP, size);
    assert_eq!(status, Status::Ok);
    let mut want = Vec::new();
    for &(subtype, start, end) in props {
        want.extend_from_slice(
            &ResvMemProperty {
                subtype,
                start,
                end,
            }
            .encode(),
        );
    }
    want.resize(size as usize, 0);
    assert_eq!(got, want);
}

fn attach(domain: u32) -> Request {
    Request::Attach(AttachReq {
        domain,
        endpoint: EP,
        ..Default::default()
    })
}

fn map(domain: u32, start: u64, end: u64) -> Request {
    Request::Map(MapReq {
        domain,
        virt_start: start,
        virt_end: end,
        phys_start: PHYS,
        flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
    })
}

const T_RESV: u8 = VIRTIO_IOMMU_RESV_MEM_T_RESERVED;
const T_MSI: u8 = VIRTIO_IOMMU_RESV_MEM_T_MSI;

#[test]
fn type1_iova_range_hole_is_probed_as_reserved_and_map_into_it_is_range() {
    let rec = Arc::new(RecordingHost::default());
    // Usable: below the hole, between the hole and the MSI window, above
    // the MSI window (x86's shape with one more hole).
    rec.set_type1_info(
        1 << 12 | 1 << 21 | 1 << 30,
        vec![
            (0, HOLE.0 - 1),
            (HOLE.1 + 1, MSI.0 - 1),
            (MSI.1 + 1, (1 << 48) - 1),
        ],
    );
    let (mut h, _b) = harness(&rec, |host, ram| {
        let b = Type1Backend::new(host, ram);
        b.add_endpoint(EP, Path::new(DEV)).unwrap();
        b
    });
    // The hole is RESERVED; the MSI window stays the config's MSI region.
    expect_probe(&mut h, &[(T_RESV, HOLE.0, HOLE.1), (T_MSI, MSI.0, MSI.1)]);
    assert_eq!(h.send(&attach(1)), Status::Ok);
    let maps = rec.count(Op::Type1MapDma);
    // spec: "The device SHOULD reject a MAP request that overlaps a
    // RESV_MEM region." Refused before VFIO_IOMMU_MAP_DMA, not DEVERR.
    assert_eq!(
        h.send(&map(1, HOLE.1 - 0xfff, HOLE.1 + 0x1000)),
        Status::Range
    );
    assert_eq!(rec.count(Op::Type1MapDma), maps);
    assert_eq!(h.send(&map(1, HOLE.1 + 1, HOLE.1 + 0x1000)), Status::Ok);
    assert_eq!(rec.count(Op::Type1MapDma), maps + 1);
}

#[test]
fn iommufd_device_reserved_regions_are_read_through_a_scratch_ioas() {
    let rec = Arc::new(RecordingHost::default());
    rec.set_device_reserved(vec![HOLE, MSI]);
    let host: Arc<dyn HostIommu> = rec.clone();
    let mem =
        vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
    let b = IommufdBackend::new(host, GuestRam::new(mem).unwrap()).unwrap();
    let from = rec.len();
    let live = rec.live_objects();
    b.add_endpoint(EP, Path::new(DEV)).unwrap();
    let calls = &rec.calls()[from..];
    let at = calls
        .iter()
        .position(|c| c.op == Op::IoasIovaRanges)
        .expect("IOMMU_IOAS_IOVA_RANGES");
    let ops: Vec<Op> = calls[at - 2..at + 3].iter().map(|c| c.op).collect();
    assert_eq!(
        ops,
        [
            Op::IoasAlloc,
            Op::AttachPt,
            Op::IoasIovaRanges,
            Op::DetachPt,
            Op::Destroy
        ]
    );
    let scratch = le32(&calls[at - 2].out, 8);
    // struct iommu_ioas_iova_ranges { size@0, ioas_id@4, num_iovas@8,
    // __reserved@12, allowed_iovas@16, out_iova_alignment@24 }: asked
    // with room for 8 ranges, the pointer left 0 in the recorded bytes.
    let q = &calls[at];
    assert_eq!(q.arg.len(), 32);
    assert_eq!(le32(&q.arg, 0), 32);
    assert_eq!(le32(&q.arg, 4), scratch);
    assert_eq!(le32(&q.arg, 8), 8);
    assert_eq!(le64(&q.arg, 16), 0);
    // The kernel answered three allowed ranges around the two holes.
    assert_eq!(le32(&q.out, 8), 3);
    // vfio_device_attach_iommufd_pt { argsz@0, flags@4, pt_id@8, pasid@12 }.
    assert_eq!(le32(&calls[at - 1].arg, 8), scratch, "attached to it");
    assert_eq!(le32(&calls[at + 2].arg, 4), scratch, "destroyed");
    let dev = b.device_of(EP).unwrap();
    assert_eq!(rec.attachments(dev), 0, "blocked, as it came");
    assert!(!rec.is_live(scratch));
    assert!(rec.live_objects() > live, "the nesting objects stay");
    assert_eq!(b.caps(EP).reserved_ranges, vec![HOLE, MSI]);
}

#[test]
fn iommufd_reserved_region_is_probed_and_map_into_it_is_range() {
    let rec = Arc::new(RecordingHost::default());
    rec.set_device_reserved(vec![HOLE, MSI]);
    let (mut h, _b) = harness(&rec, |host, ram| {
        let b = IommufdBackend::new(host, ram).unwrap();
        b.add_endpoint(EP, Path::new(DEV)).unwrap();
        b
    });
    expect_probe(&mut h, &[(T_RESV, HOLE.0, HOLE.1), (T_MSI, MSI.0, MSI.1)]);
    assert_eq!(h.send(&attach(1)), Status::Ok);
    let maps = rec.count(Op::IoasMap);
    assert_eq!(h.send(&map(1, HOLE.0, HOLE.0 + 0xfff)), Status::Range);
    assert_eq!(rec.count(Op::IoasMap), maps, "the kernel never hears of it");
    assert_eq!(h.send(&map(1, HOLE.0 - 0x1000, HOLE.0 - 1)), Status::Ok);
}

#[test]
fn iommufd_asks_again_when_the_kernel_has_more_ranges() {
    let rec = Arc::new(RecordingHost::default());
    // Ten holes: eleven allowed ranges, more than the first buffer's 8.
    let holes: Vec<(u64, u64)> = (1..=10u64).map(|i| (i << 30, (i << 30) + 0xfff)).collect();
    rec.set_device_reserved(holes.clone());
    let host: Arc<dyn HostIommu> = rec.clone();
    let mem =
        vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
    let b = IommufdBackend::new(host, GuestRam::new(mem).unwrap()).unwrap();
    b.add_endpoint(EP, Path::new(DEV)).unwrap();
    let q = rec.calls_of(Op::IoasIovaRanges);
    assert_eq!(q.len(), 2);
    assert_eq!(le32(&q[1].arg, 8), 11);
    assert_eq!(b.caps(EP).reserved_ranges, holes);
}

#[test]
fn iommufd_failed_reserved_query_leaves_no_holes_and_nothing_behind() {
    let rec = Arc::new(RecordingHost::default());
    rec.set_device_reserved(vec![HOLE]);
    rec.fail_nth(Op::IoasIovaRanges, 0, libc::ENOTTY);
    let host: Arc<dyn HostIommu> = rec.clone();
    let mem =
        vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
    let b = IommufdBackend::new(host, GuestRam::new(mem).unwrap()).unwrap();
    b.add_endpoint(EP, Path::new(DEV)).unwrap();
    let dev = b.device_of(EP).unwrap();
    assert_eq!(rec.attachments(dev), 0);
    assert_eq!(rec.count(Op::DetachPt), 1);
    let scratch = le32(&rec.calls_of(Op::IoasAlloc)[1].out, 8);
    assert!(!rec.is_live(scratch));
    assert!(b.caps(EP).reserved_ranges.is_empty());
}
