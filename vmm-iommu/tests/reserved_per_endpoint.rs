//! Reserved regions per endpoint: the device-wide ones of the config, the
//! VMM's own for one endpoint (the VM config's `devices[i].reserved_regions`,
//! `Viommu::set_endpoint_reserved_regions`) and the IOVA holes of an
//! endpoint's host IOMMU (`BackendCaps::reserved_ranges`).
//!
//! The rules, from virtio v1.3, device-types/iommu/description.tex,
//! "PROBE properties / RESV_MEM", device requirements:
//! - "The device SHOULD reject a MAP request that overlaps a RESV_MEM
//!   region." The regions are the endpoint's: a MAP into a domain is
//!   checked against the regions of every endpoint in it, and an endpoint
//!   joining a domain that already maps over one of its regions is refused
//!   with RANGE (the domain could not honour the region).
//! - "The device SHOULD NOT present multiple RESV_MEM properties that
//!   overlap each other for the same endpoint." The VMM's regions win over
//!   host holes; the rest of a hole is RESERVED.
//! - "The device SHOULD NOT present more than one
//!   VIRTIO_IOMMU_RESV_MEM_T_MSI property per endpoint."
//!
//! Every request goes through the request queue of a real device
//! (`vmm_iommu::testing::Harness`).

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_iommu::backend::BackendCaps;
use vmm_iommu::config::{IommuConfig, ReservedKind, ReservedRegion};
use vmm_iommu::snapshot::SnapshotError;
use vmm_iommu::testing::{driver_features, CountingInterrupt, Harness, RecordingBackend};
use vmm_iommu::wire::*;
use vmm_iommu::FaultQueue;
use vmm_iommu::Router;
use vmm_iommu::{RequestError, ReservedRegionError};
use vmm_iommu::{Viommu, VirtioIommu};

/// An endpoint with its own regions.
const EP: u32 = 8;
/// An endpoint with the device-wide regions only.
const EP2: u32 = 9;
/// An endpoint served by a backend with host holes.
const EP_HOST: u32 = 16;
const PHYS: u64 = 0x50_0000;
const RAM_MIB: u64 = 16;
const MSI: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);
/// EP's own region.
const OWN: (u64, u64) = (0x4000_0000, 0x4000_ffff);
/// The host's holes for EP_HOST: one that covers the MSI region and
/// spills past it on both sides, and one on its own.
const HOLES: [(u64, u64); 2] = [(0xfed0_0000, 0xfeff_ffff), (0x8000_0000, 0x8000_ffff)];

fn region(r: (u64, u64), kind: ReservedKind) -> ReservedRegion {
    ReservedRegion {
        start: r.0,
        end: r.1,
        kind,
    }
}

fn cfg() -> IommuConfig {
    IommuConfig {
        reserved_regions: vec![region(MSI, ReservedKind::Msi)],
        ..IommuConfig::default()
    }
}

fn host_backend() -> Arc<RecordingBackend> {
    let mut caps = BackendCaps::map_only(!0xfff, (0, (1 << 48) - 1));
    caps.reserved_ranges = HOLES.to_vec();
    Arc::new(RecordingBackend::new("host", caps))
}

fn router_with(
    rec: Arc<RecordingBackend>,
) -> impl FnOnce(&GuestMemoryMmap, Arc<FaultQueue>) -> Router {
    move |_, _| {
        let mut r = Router::new();
        r.add(rec, &[EP_HOST]);
        r
    }
}

/// A device for EP, EP2 and EP_HOST (behind `host_backend`), with EP's
/// own region set as a VMM does from its config.
fn harness() -> (Harness, Arc<RecordingBackend>) {
    let rec = host_backend();
    let h = Harness::with_router(
        &cfg(),
        &[EP, EP2, EP_HOST],
        RAM_MIB,
        &[],
        router_with(rec.clone()),
        driver_features,
    );
    h.dev
        .viommu()
        .set_endpoint_reserved_regions(EP, &[region(OWN, ReservedKind::Reserved)])
        .unwrap();
    (h, rec)
}

fn attach(domain: u32, endpoint: u32) -> Request {
    Request::Attach(AttachReq {
        domain,
        endpoint,
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

/// The RESV_MEM properties of a PROBE of `ep`, as (subtype, start, end).
fn probed(h: &mut Harness, ep: u32) -> Vec<(u8, u64, u64)> {
    let size = h.dev.config().probe_size;
    let (status, props) = h.probe(ep, size);
    assert_eq!(status, Status::Ok);
    props
        .chunks(RESV_MEM_PROPERTY_SIZE)
        .map_while(ResvMemProperty::decode)
        .map(|p| (p.subtype, p.start, p.end))
        .collect()
}

const T_MSI: u8 = VIRTIO_IOMMU_RESV_MEM_T_MSI;
const T_RESV: u8 = VIRTIO_IOMMU_RESV_MEM_T_RESERVED;

#[test]
fn probe_reports_each_endpoints_own_regions() {
    let (mut h, _) = harness();
    assert_eq!(
        probed(&mut h, EP),
        [(T_RESV, OWN.0, OWN.1), (T_MSI, MSI.0, MSI.1)]
    );
    assert_eq!(probed(&mut h, EP2), [(T_MSI, MSI.0, MSI.1)]);
}

#[test]
fn probe_reports_host_holes_as_reserved_around_the_configs_msi_region() {
    // "The device SHOULD NOT present multiple RESV_MEM properties that
    // overlap each other for the same endpoint": the hole over the MSI
    // region is cut around it, and the MSI region stays MSI.
    let (mut h, _) = harness();
    assert_eq!(
        probed(&mut h, EP_HOST),
        [
            (T_RESV, 0x8000_0000, 0x8000_ffff),
            (T_RESV, 0xfed0_0000, MSI.0 - 1),
            (T_MSI, MSI.0, MSI.1),
            (T_RESV, MSI.1 + 1, 0xfeff_ffff),
        ]
    );
    assert_eq!(
        h.dev.viommu().endpoint_reserved_regions(EP_HOST).len(),
        4,
        "the vIOMMU reports what PROBE does"
    );
}

#[test]
fn map_overlapping_an_endpoints_own_region_returns_range() {
    // "The device SHOULD reject a MAP request that overlaps a RESV_MEM region."
    let (mut h, _) = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(
        h.send(&map(1, OWN.0 + 0x1000, OWN.0 + 0x1fff)),
        Status::Range
    );
    assert_eq!(h.dev.viommu().state().mapping_count(1), 0);
}

#[test]
fn map_over_another_endpoints_region_is_accepted_in_a_domain_without_it() {
    let (mut h, _) = harness();
    assert_eq!(h.send(&attach(2, EP2)), Status::Ok);
    assert_eq!(h.send(&map(2, OWN.0, OWN.1)), Status::Ok);
    // The device-wide region binds every endpoint.
    assert_eq!(h.send(&map(2, MSI.0, MSI.0 + 0xfff)), Status::Range);
}

#[test]
fn map_in_a_shared_domain_honours_every_endpoints_regions() {
    let (mut h, _) = harness();
    assert_eq!(h.send(&attach(1, EP2)), Status::Ok);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, OWN.1 - 0xfff, OWN.1)), Status::Range);
    // Once EP leaves, the domain no longer carries EP's region.
    assert_eq!(h.send(&attach(3, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, OWN.1 - 0xfff, OWN.1)), Status::Ok);
}

#[test]
fn map_into_a_host_hole_returns_range_and_never_reaches_the_backend() {
    let (mut h, rec) = harness();
    assert_eq!(h.send(&attach(1, EP_HOST)), Status::Ok);
    let calls = rec.calls().len();
    assert_eq!(h.send(&map(1, 0x8000_8000, 0x8000_8fff)), Status::Range);
    assert_eq!(h.send(&map(1, 0xfef0_0000, 0xfef0_0fff)), Status::Range);
    assert_eq!(rec.calls().len(), calls, "the backend never hears of them");
    assert_eq!(h.send(&map(1, 0x8001_0000, 0x8001_0fff)), Status::Ok);
}

#[test]
fn attach_to_a_domain_mapping_over_the_endpoints_region_returns_range() {
    // A domain that maps over the joining endpoint's reserved region could
    // not honour it: the ATTACH is refused as that MAP would be, and the
    // endpoint stays where it was.
    let (mut h, _) = harness();
    assert_eq!(h.send(&attach(1, EP2)), Status::Ok);
    assert_eq!(h.send(&map(1, OWN.0, OWN.0 + 0xfff)), Status::Ok);
    assert_eq!(h.send(&attach(2, EP)), Status::Ok);
    assert_eq!(h.send(&attach(1, EP)), Status::Range);
    let st = h.dev.viommu().state();
    assert_eq!(st.endpoint(EP).unwrap().domain, Some(2));
    assert_eq!(st.domain_endpoints(1), [EP2]);
}

#[test]
fn attach_of_a_host_endpoint_to_a_domain_mapping_a_hole_returns_range() {
    let (mut h, rec) = harness();
    assert_eq!(h.send(&attach(1, EP2)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x8000_0000, 0x8000_0fff)), Status::Ok);
    let calls = rec.calls().len();
    assert_eq!(h.send(&attach(1, EP_HOST)), Status::Range);
    assert_eq!(rec.calls().len(), calls, "the backend never hears of it");
    assert_eq!(
        h.dev.viommu().state().endpoint(EP_HOST).unwrap().domain,
        None
    );
}

#[test]
fn attach_error_names_the_endpoint_and_region() {
    let (h, _) = harness();
    let v = h.dev.viommu();
    v.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
    v.apply(&attach(1, EP2)).unwrap();
    v.apply(&map(1, OWN.0, OWN.0 + 0xfff)).unwrap();
    let e = v.apply(&attach(1, EP)).unwrap_err();
    assert_eq!(
        e,
        RequestError::AttachOverlapsReserved {
            endpoint: EP,
            domain: 1,
            resv_start: OWN.0,
            resv_end: OWN.1
        }
    );
    assert_eq!(e.status(), Status::Range);
}

#[test]
fn reset_keeps_each_endpoints_regions() {
    // They come from the VMM and the host, not from the driver.
    let (mut h, _) = harness();
    h.dev.viommu().reset();
    h.dev.viommu().set_acked_features(driver_features(&h.dev));
    assert_eq!(probed(&mut h, EP).len(), 2);
    assert_eq!(probed(&mut h, EP_HOST).len(), 4);
}

#[test]
fn the_vmms_regions_are_checked_before_they_are_taken() {
    let (h, _) = harness();
    let v = h.dev.viommu();
    let resv = |s, e| region((s, e), ReservedKind::Reserved);
    assert_eq!(
        v.set_endpoint_reserved_regions(99, &[]),
        Err(ReservedRegionError::UnknownEndpoint(99))
    );
    assert!(matches!(
        v.set_endpoint_reserved_regions(EP2, &[resv(0x2000, 0x1fff)]),
        Err(ReservedRegionError::Inverted { .. })
    ));
    // "SHOULD NOT present multiple RESV_MEM properties that overlap each
    // other for the same endpoint"
    assert!(matches!(
        v.set_endpoint_reserved_regions(EP2, &[resv(MSI.1, MSI.1 + 0x1000)]),
        Err(ReservedRegionError::Overlap { .. })
    ));
    // "SHOULD NOT present more than one VIRTIO_IOMMU_RESV_MEM_T_MSI
    // property per endpoint"
    assert_eq!(
        v.set_endpoint_reserved_regions(EP2, &[region((0x1000, 0x1fff), ReservedKind::Msi)]),
        Err(ReservedRegionError::SecondMsi(EP2))
    );
    // 512 bytes hold 21 RESV_MEM properties; with the MSI region, 21 more
    // do not fit.
    let many: Vec<ReservedRegion> = (0..21).map(|i| resv(i << 20, (i << 20) + 0xfff)).collect();
    assert!(matches!(
        v.set_endpoint_reserved_regions(EP2, &many),
        Err(ReservedRegionError::ProbeSize { regions: 22, .. })
    ));
    assert_eq!(v.endpoint_reserved_regions(EP2).len(), 1, "nothing changed");
    // A domain that already maps over a new region cannot honour it.
    v.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
    v.apply(&attach(1, EP2)).unwrap();
    v.apply(&map(1, 0x1000_0000, 0x1000_0fff)).unwrap();
    assert!(matches!(
        v.set_endpoint_reserved_regions(EP2, &[resv(0x1000_0000, 0x1000_0fff)]),
        Err(ReservedRegionError::Mapped { domain: 1, .. })
    ));
    // An empty list drops an endpoint's own regions.
    v.set_endpoint_reserved_regions(EP, &[]).unwrap();
    assert_eq!(
        v.endpoint_reserved_regions(EP),
        [region(MSI, ReservedKind::Msi)]
    );
}

#[test]
fn hot_plugged_endpoint_reports_its_backends_holes() {
    let (mut h, _) = harness();
    const PLUGGED: u32 = 20;
    let mut caps = BackendCaps::map_only(!0xfff, (0, (1 << 48) - 1));
    caps.reserved_ranges = vec![(0x9000_0000, 0x9000_ffff)];
    let b = Arc::new(RecordingBackend::new("plugged", caps));
    h.dev.viommu().add_endpoint(PLUGGED, Some(b)).unwrap();
    assert_eq!(
        probed(&mut h, PLUGGED),
        [(T_RESV, 0x9000_0000, 0x9000_ffff), (T_MSI, MSI.0, MSI.1)]
    );
    assert_eq!(h.send(&attach(4, PLUGGED)), Status::Ok);
    assert_eq!(h.send(&map(4, 0x9000_0000, 0x9000_0fff)), Status::Range);
}

#[test]
fn host_holes_outside_the_input_range_are_not_reported() {
    let cfg = IommuConfig {
        input_range: vmm_iommu::config::AddrRange {
            start: 0,
            end: 0xffff_ffff,
        },
        ..IommuConfig::default()
    };
    let mut caps = BackendCaps::map_only(!0xfff, (0, (1 << 48) - 1));
    caps.reserved_ranges = vec![(0xffff_0000, 0x1_0000_ffff), (0x2_0000_0000, 0x2_ffff_ffff)];
    let rec = Arc::new(RecordingBackend::new("host", caps));
    let mut h = Harness::with_router(
        &cfg,
        &[EP_HOST],
        RAM_MIB,
        &[],
        router_with(rec),
        driver_features,
    );
    assert_eq!(
        probed(&mut h, EP_HOST),
        [(T_RESV, 0xffff_0000, 0xffff_ffff)]
    );
}

#[test]
fn restore_of_a_snapshot_mapping_over_an_endpoints_region_is_refused() {
    // The regions come from the VMM and the host, so a snapshot does not
    // carry them: the restoring device has its own, and a snapshot whose
    // mappings it could not honour is refused by the MAP / ATTACH rules.
    let (mut h, _) = harness();
    assert_eq!(h.send(&attach(1, EP2)), Status::Ok);
    assert_eq!(h.send(&map(1, OWN.0, OWN.0 + 0xfff)), Status::Ok);
    assert_eq!(h.send(&attach(1, EP)), Status::Range);
    // A device where EP has no own region: EP joins domain 1 there.
    let mut plain = Harness::with_router(
        &cfg(),
        &[EP, EP2, EP_HOST],
        RAM_MIB,
        &[],
        router_with(host_backend()),
        driver_features,
    );
    assert_eq!(plain.send(&attach(1, EP2)), Status::Ok);
    assert_eq!(plain.send(&map(1, OWN.0, OWN.0 + 0xfff)), Status::Ok);
    assert_eq!(plain.send(&attach(1, EP)), Status::Ok);
    let snap = plain.dev.snapshot().unwrap();

    // Restored where EP has its own region over the mapping: refused.
    let faults = Arc::new(FaultQueue::new(128).unwrap());
    let mut r = Router::new();
    r.add(host_backend(), &[EP_HOST]);
    let viommu = Arc::new(Viommu::with_router(
        &cfg(),
        &[EP, EP2, EP_HOST],
        &[(0, (RAM_MIB << 20) - 1)],
        faults,
        r,
    ));
    viommu
        .set_endpoint_reserved_regions(EP, &[region(OWN, ReservedKind::Reserved)])
        .unwrap();
    let mut dev = VirtioIommu::with_viommu(viommu.clone());
    let err = dev
        .restore(&snap, &plain.mem, Arc::new(CountingInterrupt::default()))
        .unwrap_err();
    match &err {
        SnapshotError::Refused { what, source } => {
            assert!(what.contains("ATTACH of endpoint 8"), "{what}");
            assert_eq!(source.status(), Status::Range, "{source}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(viommu.state().is_pristine(), "nothing of it is kept");

    // Restored where the host leaves a hole under a mapping: refused at
    // the MAP (domain 1's first endpoint is EP_HOST).
    assert_eq!(plain.send(&attach(2, EP_HOST)), Status::Ok);
    assert_eq!(plain.send(&map(2, 0x8000_0000, 0x8000_0fff)), Status::Range);
    let mut other = Harness::with_router(
        &cfg(),
        &[EP, EP2, EP_HOST],
        RAM_MIB,
        &[],
        // No holes on this host.
        |_, _| {
            let mut r = Router::new();
            r.add(
                Arc::new(RecordingBackend::new(
                    "plain",
                    BackendCaps::map_only(!0xfff, (0, (1 << 48) - 1)),
                )),
                &[EP_HOST],
            );
            r
        },
        driver_features,
    );
    assert_eq!(other.send(&attach(2, EP_HOST)), Status::Ok);
    assert_eq!(other.send(&map(2, 0x8000_0000, 0x8000_0fff)), Status::Ok);
    let snap = other.dev.snapshot().unwrap();
    let err = other
        .restored_copy(
            &cfg(),
            &[EP, EP2, EP_HOST],
            &[],
            router_with(host_backend()),
            &snap,
        )
        .map(|_| ())
        .unwrap_err();
    match &err {
        SnapshotError::Refused { what, source } => {
            assert!(what.contains("mapping [0x80000000, 0x80000fff]"), "{what}");
            assert_eq!(source.status(), Status::Range, "{source}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
}
