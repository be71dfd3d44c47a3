//! One test per normative rule of the virtio-iommu spec (virtio v1.3,
//! device-types/iommu/description.tex) that the device implements.
//!
//! Every request travels through a real split virtqueue in guest memory
//! (`vmm_iommu::testing::Harness`); state is inspected through the state
//! model's getters and translations through the vIOMMU's translators and
//! vm-memory's `IommuMemory`. Each test carries the spec sentence it checks.
//!
//! The spec's examples use byte addresses; with a 4 KiB granule the tests
//! use page numbers instead (`pages(a, b)` is pages a..=b).

use vm_memory::iommu::IommuMemory;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::config::{IommuConfig, ReservedKind, ReservedRegion};
use vmm_iommu::testing::{driver_features, layout, Harness};
use vmm_iommu::wire::*;
use vmm_iommu::EndpointIommu;
use vmm_iommu::{FaultReason, ACCESS_READ, ACCESS_WRITE};

const EP: u32 = 8;
const EP2: u32 = 9;
const EP3: u32 = 10;
const UNKNOWN_EP: u32 = 99;
const PAGE: u64 = 0x1000;
/// Guest-physical base the tests map to (inside the harness's 16 MiB RAM,
/// above everything the harness itself uses).
const PHYS: u64 = 0x50_0000;
const RAM_SIZE: u64 = 16 << 20;
const RESV_START: u64 = 0x8000_0000;
const RESV_END: u64 = 0x8000_ffff;
const MSI_START: u64 = 0xfee0_0000;
const MSI_END: u64 = 0xfeef_ffff;
const R: u32 = VIRTIO_IOMMU_MAP_F_READ;
const W: u32 = VIRTIO_IOMMU_MAP_F_WRITE;
const RW: u32 = R | W;

fn cfg() -> IommuConfig {
    IommuConfig {
        reserved_regions: vec![
            ReservedRegion {
                start: RESV_START,
                end: RESV_END,
                kind: ReservedKind::Reserved,
            },
            ReservedRegion {
                start: MSI_START,
                end: MSI_END,
                kind: ReservedKind::Msi,
            },
        ],
        ..IommuConfig::default()
    }
}

fn harness() -> Harness {
    Harness::new(&cfg(), &[EP, EP2, EP3])
}

fn harness_with(cfg: &IommuConfig, features: impl FnOnce(u64) -> u64) -> Harness {
    Harness::with_features(cfg, &[EP, EP2, EP3], 16, |d| features(driver_features(d)))
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

fn attach(domain: u32, endpoint: u32) -> Request {
    attach_f(domain, endpoint, 0)
}

fn attach_f(domain: u32, endpoint: u32, flags: u32) -> Request {
    Request::Attach(AttachReq {
        domain,
        endpoint,
        flags,
        reserved: [0; 4],
    })
}

fn detach(domain: u32, endpoint: u32) -> Request {
    Request::Detach(DetachReq { domain, endpoint })
}

fn map(domain: u32, virt_start: u64, virt_end: u64, phys_start: u64, flags: u32) -> Request {
    Request::Map(MapReq {
        domain,
        virt_start,
        virt_end,
        phys_start,
        flags,
    })
}

fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> Request {
    Request::Unmap(UnmapReq {
        domain,
        virt_start,
        virt_end,
        reserved: [0; 4],
    })
}

/// `[first byte of page a, last byte of page b]`.
fn pages(a: u64, b: u64) -> (u64, u64) {
    (a * PAGE, (b + 1) * PAGE - 1)
}

/// MAP of pages a..=b onto `PHYS + a * PAGE`, read-write.
fn map_pages(domain: u32, a: u64, b: u64) -> Request {
    let (s, e) = pages(a, b);
    map(domain, s, e, PHYS + s, RW)
}

fn unmap_pages(domain: u32, a: u64, b: u64) -> Request {
    let (s, e) = pages(a, b);
    unmap(domain, s, e)
}

/// The (start, end) of every mapping of `domain`.
fn ranges(h: &Harness, domain: u32) -> Vec<(u64, u64)> {
    h.dev
        .viommu()
        .state()
        .mappings(domain)
        .iter()
        .map(|m| (m.start, m.end))
        .collect()
}

fn domain_of(h: &Harness, ep: u32) -> Option<u32> {
    h.dev.viommu().state().endpoint(ep).and_then(|e| e.domain)
}

/// The guest-physical address `ep` reaches at `iova`, or why not.
fn xlate(h: &Harness, ep: u32, iova: u64, access: u32) -> Result<u64, FaultReason> {
    h.dev
        .viommu()
        .translate(ep, iova, access)
        .map(|t| t.gpa(iova))
}

/// Guest memory as an emulated device behind endpoint `ep` sees it.
fn dma(h: &Harness, ep: u32) -> IommuMemory<GuestMemoryMmap, EndpointIommu> {
    IommuMemory::new(h.mem.clone(), h.dev.viommu().endpoint_iommu(ep), true, ())
}

fn read_config(h: &Harness) -> ConfigSpace {
    let mut b = [0u8; CONFIG_SIZE];
    h.dev.read_config(0, &mut b);
    ConfigSpace::decode(&b).unwrap()
}

// ---------------------------------------------------------------------------
// ATTACH
// ---------------------------------------------------------------------------

#[test]
fn attach_creates_domain_that_does_not_exist() {
    // "If the domain doesn't exist in the device, it is created."
    let mut h = harness();
    assert_eq!(h.dev.viommu().state().domain_count(), 0);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    let st = h.dev.viommu().state();
    assert_eq!(st.domain_count(), 1);
    assert_eq!(st.domain_endpoints(1), &[EP]);
    assert_eq!(st.is_bypass_domain(1), Some(false));
    assert_eq!(st.endpoint(EP).unwrap().domain, Some(1));
}

#[test]
fn attach_second_endpoint_to_domain_shares_its_mappings() {
    // "Multiple endpoints can be attached to the same domain."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 4, 4)), Status::Ok);
    assert_eq!(h.send(&attach(1, EP2)), Status::Ok);
    assert_eq!(h.dev.viommu().state().domain_endpoints(1), &[EP, EP2]);
    assert_eq!(
        xlate(&h, EP2, 4 * PAGE + 8, ACCESS_READ),
        Ok(PHYS + 4 * PAGE + 8)
    );
}

#[test]
fn attach_same_endpoint_same_domain_again_succeeds_and_keeps_mappings() {
    // "A device that does not reject the request MUST attach the endpoint."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 1, 1)), Status::Ok);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(domain_of(&h, EP), Some(1));
    assert_eq!(ranges(&h, 1), vec![pages(1, 1)]);
}

#[test]
fn attach_to_other_domain_detaches_from_old_domain_first() {
    // "the device SHOULD behave as if the driver issued a DETACH request with this endpoint, followed by the ATTACH request."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 2, 2)), Status::Ok);
    let mut t = h.dev.viommu().translator(EP);
    assert!(t.translate(2 * PAGE, ACCESS_READ).is_ok());
    assert_eq!(h.send(&attach(2, EP)), Status::Ok);
    // Domain 1 lost its last endpoint: it ceased to exist, mappings and all.
    let st = h.dev.viommu().state();
    assert_eq!(st.is_bypass_domain(1), None);
    assert_eq!(st.domain_count(), 1);
    assert_eq!(st.total_mappings(), 0);
    assert_eq!(st.endpoint(EP).unwrap().domain, Some(2));
    drop(st);
    // The old domain's mapping is no longer reachable, even from a cache.
    assert_eq!(
        t.translate(2 * PAGE, ACCESS_READ).unwrap_err().reason,
        FaultReason::Mapping
    );
    // Its ID can be reused, even for a different kind of domain.
    assert_eq!(
        h.send(&attach_f(1, EP2, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Ok
    );
}

#[test]
fn attach_to_other_domain_keeps_old_domain_with_remaining_endpoints() {
    // "the device SHOULD behave as if the driver issued a DETACH request with this endpoint, followed by the ATTACH request."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&attach(1, EP2)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 2, 2)), Status::Ok);
    assert_eq!(h.send(&attach(2, EP)), Status::Ok);
    assert_eq!(h.dev.viommu().state().domain_endpoints(1), &[EP2]);
    assert_eq!(ranges(&h, 1), vec![pages(2, 2)]);
    assert_eq!(xlate(&h, EP2, 2 * PAGE, ACCESS_READ), Ok(PHYS + 2 * PAGE));
    assert_eq!(
        xlate(&h, EP, 2 * PAGE, ACCESS_READ),
        Err(FaultReason::Mapping)
    );
}

#[test]
fn attach_endpoints_in_different_domains_are_isolated() {
    // "Endpoints attached to different domains are isolated from each other."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&attach(2, EP2)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 3, 3)), Status::Ok);
    assert_eq!(xlate(&h, EP, 3 * PAGE, ACCESS_READ), Ok(PHYS + 3 * PAGE));
    assert_eq!(
        xlate(&h, EP2, 3 * PAGE, ACCESS_READ),
        Err(FaultReason::Mapping)
    );
}

#[test]
fn attach_reserved_nonzero_returns_inval() {
    // "If the reserved field of an ATTACH request is not zero, the device MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    let mut h = harness();
    for i in 0..4 {
        let mut reserved = [0u8; 4];
        reserved[i] = 0x80;
        let r = Request::Attach(AttachReq {
            domain: 1,
            endpoint: EP,
            flags: 0,
            reserved,
        });
        assert_eq!(h.send(&r), Status::Inval);
    }
    assert_eq!(domain_of(&h, EP), None);
    assert_eq!(h.dev.viommu().state().domain_count(), 0);
}

#[test]
fn attach_unknown_flag_returns_inval() {
    // "If the device does not recognize a flags bit, it MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    let mut h = harness();
    for flags in [
        1 << 1,
        1 << 31,
        0xffff_fffe,
        VIRTIO_IOMMU_ATTACH_F_BYPASS | 4,
    ] {
        assert_eq!(h.send(&attach_f(1, EP, flags)), Status::Inval, "{flags:#x}");
    }
    assert_eq!(h.dev.viommu().state().domain_count(), 0);
}

#[test]
fn attach_bypass_flag_without_bypass_config_negotiated_returns_inval() {
    // "When the VIRTIO_IOMMU_F_BYPASS_CONFIG is negotiated, the driver can set the VIRTIO_IOMMU_ATTACH_F_BYPASS flag" — without it the bit is unrecognized: "it MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    let mut h = harness_with(&cfg(), |f| f & !bit(VIRTIO_IOMMU_F_BYPASS_CONFIG));
    assert_eq!(
        h.send(&attach_f(1, EP, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Inval
    );
    assert_eq!(h.dev.viommu().state().domain_count(), 0);
    // Legacy device: the flag is unknown as well.
    let legacy = IommuConfig {
        legacy_bypass: true,
        ..cfg()
    };
    let mut h = harness_with(&legacy, |f| f);
    assert_eq!(
        h.send(&attach_f(1, EP, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Inval
    );
}

#[test]
fn attach_bypass_flag_creates_bypass_domain_with_identity_translation() {
    // "the driver can set the VIRTIO_IOMMU_ATTACH_F_BYPASS flag to create a bypass domain. Endpoints attached to this domain are in bypass mode."
    let mut h = harness();
    assert_eq!(
        h.send(&attach_f(3, EP, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Ok
    );
    assert_eq!(h.dev.viommu().state().is_bypass_domain(3), Some(true));
    // "All accesses from an endpoint in bypass mode are allowed and translated by the IOMMU using the identity function."
    assert_eq!(xlate(&h, EP, 0x12_3456, ACCESS_WRITE), Ok(0x12_3456));
    h.mem.write_obj(0xfeed_u64, GuestAddress(PHYS)).unwrap();
    assert_eq!(
        dma(&h, EP).read_obj::<u64>(GuestAddress(PHYS)).unwrap(),
        0xfeed
    );
}

#[test]
fn attach_bypass_flag_to_existing_mapped_domain_returns_inval() {
    // "If the domain already exists and the VIRTIO_IOMMU_ATTACH_F_BYPASS flag is not consistent with that domain, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(
        h.send(&attach_f(1, EP2, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Inval
    );
    assert_eq!(domain_of(&h, EP2), None);
    // Also for the endpoint already attached to it.
    assert_eq!(
        h.send(&attach_f(1, EP, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Inval
    );
    assert_eq!(h.dev.viommu().state().is_bypass_domain(1), Some(false));
}

#[test]
fn attach_without_bypass_flag_to_existing_bypass_domain_returns_inval() {
    // "If the domain already exists and the VIRTIO_IOMMU_ATTACH_F_BYPASS flag is not consistent with that domain, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    let mut h = harness();
    assert_eq!(
        h.send(&attach_f(1, EP, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Ok
    );
    assert_eq!(h.send(&attach(1, EP2)), Status::Inval);
    assert_eq!(domain_of(&h, EP2), None);
    // A failed re-attach leaves the endpoint where it was.
    assert_eq!(h.send(&attach(2, EP2)), Status::Ok);
    assert_eq!(h.send(&attach(1, EP2)), Status::Inval);
    assert_eq!(domain_of(&h, EP2), Some(2));
}

#[test]
fn attach_unknown_endpoint_returns_noent() {
    // "If the endpoint identified by endpoint doesn't exist, the device MUST reject the request and set status to VIRTIO_IOMMU_S_NOENT."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, UNKNOWN_EP)), Status::NoEnt);
    assert_eq!(h.dev.viommu().state().domain_count(), 0);
}

#[test]
fn attach_domain_outside_domain_range_returns_range() {
    // "If the VIRTIO_IOMMU_F_DOMAIN_RANGE feature is offered, domain_range describes the values supported in a domain field."
    let c = IommuConfig {
        domain_range: vmm_iommu::config::DomainRange { start: 4, end: 10 },
        ..cfg()
    };
    let mut h = harness_with(&c, |f| f);
    for d in [0, 3, 11, u32::MAX] {
        assert_eq!(h.send(&attach(d, EP)), Status::Range, "domain {d}");
    }
    assert_eq!(h.send(&attach(4, EP)), Status::Ok);
    assert_eq!(h.send(&attach(10, EP2)), Status::Ok);
}

// ---------------------------------------------------------------------------
// DETACH
// ---------------------------------------------------------------------------

#[test]
fn detach_unknown_endpoint_returns_noent() {
    // "If the endpoint identified by endpoint doesn't exist, then the device MUST reject the request and set status to VIRTIO_IOMMU_S_NOENT."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&detach(1, UNKNOWN_EP)), Status::NoEnt);
    assert_eq!(h.dev.viommu().state().domain_endpoints(1), &[EP]);
}

#[test]
fn detach_not_attached_to_domain_returns_inval() {
    // "If the domain identified by domain doesn't exist, or if the endpoint identified by endpoint isn't attached to this domain, then the device MAY set the request status to VIRTIO_IOMMU_S_INVAL."
    let mut h = harness();
    // Endpoint attached nowhere, domain does not exist.
    assert_eq!(h.send(&detach(1, EP)), Status::Inval);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&attach(2, EP2)), Status::Ok);
    // Domain exists but the endpoint is attached elsewhere.
    assert_eq!(h.send(&detach(2, EP)), Status::Inval);
    // Domain does not exist.
    assert_eq!(h.send(&detach(7, EP)), Status::Inval);
    // Outside domain_range: this device answers INVAL too (the spec only
    // forbids the driver from sending it).
    assert_eq!(h.send(&detach(0, EP)), Status::Inval);
    assert_eq!(domain_of(&h, EP), Some(1));
    assert_eq!(domain_of(&h, EP2), Some(2));
}

#[test]
fn detach_ignores_reserved_bytes() {
    // "The device MUST ignore reserved."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    let mut bytes = detach(1, EP).encode();
    assert_eq!(bytes.len(), 20);
    bytes[12..20].fill(0xff);
    let (len, tail) = h.send_raw(&[&bytes], &[4]);
    assert_eq!((len, tail), (4, vec![0, 0, 0, 0]));
    assert_eq!(domain_of(&h, EP), None);
}

#[test]
fn detach_last_endpoint_ends_domain_and_frees_its_id() {
    // "After all endpoints have been successfully detached from a domain, it ceases to exist and its ID can be reused by the driver for another domain."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&attach(1, EP2)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 0, 3)), Status::Ok);
    assert_eq!(h.send(&detach(1, EP)), Status::Ok);
    assert_eq!(h.dev.viommu().state().domain_count(), 1);
    assert_eq!(h.send(&detach(1, EP2)), Status::Ok);
    let st = h.dev.viommu().state();
    assert_eq!(st.domain_count(), 0);
    assert_eq!(st.total_mappings(), 0);
    drop(st);
    // The domain is gone: MAP on it is NOENT.
    assert_eq!(h.send(&map_pages(1, 0, 3)), Status::NoEnt);
    // The ID is reused for a new, empty domain of another kind.
    assert_eq!(
        h.send(&attach_f(1, EP3, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Ok
    );
    assert_eq!(h.dev.viommu().state().is_bypass_domain(1), Some(true));
    assert_eq!(h.send(&detach(1, EP3)), Status::Ok);
    assert_eq!(h.send(&attach(1, EP3)), Status::Ok);
    assert_eq!(ranges(&h, 1), vec![]);
}

#[test]
fn detach_endpoint_cannot_access_domain_mappings() {
    // "The device MUST ensure that after being detached from a domain, the endpoint cannot access any mapping from that domain."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&attach(1, EP2)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 5, 5)), Status::Ok);
    h.mem
        .write_obj(0x1234_u32, GuestAddress(PHYS + 5 * PAGE))
        .unwrap();
    // Warm every cache first.
    let mut t = h.dev.viommu().translator(EP);
    let m = dma(&h, EP);
    assert!(t.translate(5 * PAGE, ACCESS_READ).is_ok());
    assert_eq!(m.read_obj::<u32>(GuestAddress(5 * PAGE)).unwrap(), 0x1234);
    assert_eq!(h.send(&detach(1, EP)), Status::Ok);
    assert_eq!(
        t.translate(5 * PAGE, ACCESS_READ).unwrap_err().reason,
        FaultReason::Domain
    );
    assert!(m.read_obj::<u32>(GuestAddress(5 * PAGE)).is_err());
    // The other endpoint of the domain still reaches it.
    assert_eq!(
        dma(&h, EP2)
            .read_obj::<u32>(GuestAddress(5 * PAGE))
            .unwrap(),
        0x1234
    );
}

#[test]
fn detach_then_bypass_when_config_bypass_is_one() {
    // "However the endpoint may then be in bypass mode and access the guest-physical address space."
    let c = IommuConfig {
        bypass: true,
        ..cfg()
    };
    let mut h = harness_with(&c, |f| f);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 5, 5)), Status::Ok);
    assert_eq!(xlate(&h, EP, 5 * PAGE, ACCESS_READ), Ok(PHYS + 5 * PAGE));
    assert_eq!(h.send(&detach(1, EP)), Status::Ok);
    assert_eq!(xlate(&h, EP, 5 * PAGE, ACCESS_READ), Ok(5 * PAGE));
}

// ---------------------------------------------------------------------------
// MAP
// ---------------------------------------------------------------------------

#[test]
fn map_translates_pa_as_va_minus_virt_start_plus_phys_start() {
    // "if an endpoint accesses address VA in [virt_start; virt_end], the device (or the physical IOMMU) translates the address: PA = VA - virt_start + phys_start."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x10_0000, 0x10_2fff, PHYS, RW)), Status::Ok);
    for va in [0x10_0000, 0x10_0008, 0x10_1ff8, 0x10_2ff8] {
        assert_eq!(xlate(&h, EP, va, ACCESS_READ), Ok(va - 0x10_0000 + PHYS));
    }
    assert_eq!(
        xlate(&h, EP, 0x10_3000, ACCESS_READ),
        Err(FaultReason::Mapping)
    );
    assert_eq!(
        xlate(&h, EP, 0xf_fff8, ACCESS_READ),
        Err(FaultReason::Mapping)
    );
    // Through vm-memory, a write lands at PA and a read across pages works.
    let m = dma(&h, EP);
    m.write_obj(0xabcd_u64, GuestAddress(0x10_1ff8)).unwrap();
    assert_eq!(
        h.mem.read_obj::<u64>(GuestAddress(PHYS + 0x1ff8)).unwrap(),
        0xabcd
    );
    let buf = [7u8; 32];
    m.write_slice(&buf, GuestAddress(0x10_0ff0)).unwrap();
    let mut back = [0u8; 32];
    h.mem
        .read_slice(&mut back, GuestAddress(PHYS + 0xff0))
        .unwrap();
    assert_eq!(back, buf);
}

#[test]
fn map_unaligned_virt_start_returns_range() {
    // "If virt_start, phys_start or (virt_end + 1) is not aligned on the page granularity, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_RANGE."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x1001, 0x1fff, PHYS, RW)), Status::Range);
    assert_eq!(h.send(&map(1, 0x1800, 0x2fff, PHYS, RW)), Status::Range);
    assert_eq!(h.dev.viommu().state().mapping_count(1), 0);
}

#[test]
fn map_unaligned_phys_start_returns_range() {
    // "If virt_start, phys_start or (virt_end + 1) is not aligned on the page granularity, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_RANGE."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x1000, 0x1fff, PHYS + 8, RW)), Status::Range);
    assert_eq!(
        h.send(&map(1, 0x1000, 0x1fff, PHYS + 0x800, RW)),
        Status::Range
    );
    assert_eq!(h.dev.viommu().state().mapping_count(1), 0);
}

#[test]
fn map_unaligned_virt_end_plus_one_returns_range() {
    // "If virt_start, phys_start or (virt_end + 1) is not aligned on the page granularity, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_RANGE."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x1000, 0x2000, PHYS, RW)), Status::Range);
    assert_eq!(h.send(&map(1, 0x1000, 0x1ffe, PHYS, RW)), Status::Range);
    assert_eq!(h.send(&map(1, 0x1000, 0x17ff, PHYS, RW)), Status::Range);
    assert_eq!(h.dev.viommu().state().mapping_count(1), 0);
}

#[test]
fn map_overlapping_existing_mapping_returns_inval() {
    // "If a mapping already exists in the requested range, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 4, 7)), Status::Ok);
    for (a, b) in [(4, 7), (2, 4), (7, 9), (5, 6), (0, 20), (6, 6)] {
        assert_eq!(
            h.send(&map_pages(1, a, b)),
            Status::Inval,
            "pages {a}..={b}"
        );
    }
    // Adjacent ranges do not overlap.
    assert_eq!(h.send(&map_pages(1, 3, 3)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 8, 8)), Status::Ok);
    assert_eq!(ranges(&h, 1), vec![pages(3, 3), pages(4, 7), pages(8, 8)]);
}

#[test]
fn map_unknown_flag_returns_inval() {
    // "If the device doesn't recognize a flags bit, it MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    for flags in [1 << 3, 1 << 31, RW | 0x10, 0xffff_fff8] {
        assert_eq!(
            h.send(&map(1, 0x1000, 0x1fff, PHYS, flags)),
            Status::Inval,
            "{flags:#x}"
        );
    }
    assert_eq!(h.dev.viommu().state().mapping_count(1), 0);
}

#[test]
fn map_mmio_flag_accepted_when_f_mmio_negotiated_inside_a_vmm_window() {
    // "The VIRTIO_IOMMU_MAP_F_MMIO flag ... is only available when the VIRTIO_IOMMU_F_MMIO feature has been negotiated."
    let mut h = harness();
    assert_ne!(h.dev.acked_features() & bit(VIRTIO_IOMMU_F_MMIO), 0);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    // An MMIO doorbell above RAM, which the VMM serves as a DMA target.
    let mmio = 0xd000_0000;
    h.dev
        .viommu()
        .add_mmio_window(vmm_iommu::backend::MmioWindow {
            gpa: mmio,
            len: 0x1000,
            hva: None,
        })
        .unwrap();
    let f = W | VIRTIO_IOMMU_MAP_F_MMIO;
    assert_eq!(h.send(&map(1, 0x1000, 0x1fff, mmio, f)), Status::Ok);
    let m = h.dev.viommu().state().mappings(1)[0];
    assert_eq!(m.flags, f);
    assert_eq!(xlate(&h, EP, 0x1004, ACCESS_WRITE), Ok(mmio + 4));
    // RAM is no MMIO window: the device refuses the memory type it
    // cannot honour (RANGE, docs/wire.md).
    assert_eq!(h.send(&map(1, 0x2000, 0x2fff, PHYS, f | R)), Status::Range);
}

#[test]
fn map_mmio_flag_without_f_mmio_negotiated_returns_inval() {
    // "If the VIRTIO_IOMMU_F_MMIO feature isn't negotiated, the driver MUST NOT use the VIRTIO_IOMMU_MAP_F_MMIO flag." — the bit is then unknown: "it MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    let mut h = harness_with(&cfg(), |f| f & !bit(VIRTIO_IOMMU_F_MMIO));
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    let f = RW | VIRTIO_IOMMU_MAP_F_MMIO;
    assert_eq!(h.send(&map(1, 0x1000, 0x1fff, PHYS, f)), Status::Inval);
    assert_eq!(
        h.send(&map(1, 0x1000, 0x1fff, 0xd000_0000, f)),
        Status::Inval
    );
    assert_eq!(h.dev.viommu().state().mapping_count(1), 0);
}

#[test]
fn map_overlapping_reserved_region_returns_range() {
    // "The device SHOULD reject a MAP request that overlaps a RESV_MEM region."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    let cases = [
        (RESV_START, RESV_END),
        (RESV_START - PAGE, RESV_START + PAGE - 1),
        (RESV_END + 1 - PAGE, RESV_END + PAGE),
        (RESV_START - PAGE, RESV_END + PAGE),
        (RESV_START + PAGE, RESV_START + 2 * PAGE - 1),
        (MSI_START, MSI_START + PAGE - 1),
        (MSI_END + 1 - PAGE, MSI_END),
        (0, 0xffff_ffff),
    ];
    for (s, e) in cases {
        assert_eq!(
            h.send(&map(1, s, e, 0, RW)),
            Status::Range,
            "[{s:#x}, {e:#x}]"
        );
    }
    assert_eq!(h.dev.viommu().state().mapping_count(1), 0);
    // Right next to the regions is fine.
    assert_eq!(
        h.send(&map(1, RESV_START - PAGE, RESV_START - 1, PHYS, RW)),
        Status::Ok
    );
    assert_eq!(
        h.send(&map(1, RESV_END + 1, RESV_END + PAGE, PHYS, RW)),
        Status::Ok
    );
    assert_eq!(
        h.send(&map(1, MSI_END + 1, MSI_END + PAGE, PHYS, RW)),
        Status::Ok
    );
}

#[test]
fn map_outside_input_range_returns_range() {
    // "If the VIRTIO_IOMMU_F_INPUT_RANGE feature is offered, input_range contains the virtual address range that the IOMMU is able to translate. Any mapping request to virtual addresses outside of this range fails."
    let c = IommuConfig {
        input_range: vmm_iommu::config::AddrRange {
            start: 0x10_0000,
            end: 0xffff_ffff,
        },
        ..cfg()
    };
    let mut h = harness_with(&c, |f| f);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, 0, 0xfff, PHYS, RW)), Status::Range);
    assert_eq!(
        h.send(&map(1, 0xf_f000, 0x10_0fff, PHYS, RW)),
        Status::Range
    );
    assert_eq!(
        h.send(&map(1, 0xffff_f000, 0x1_0000_0fff, PHYS, RW)),
        Status::Range
    );
    assert_eq!(
        h.send(&map(1, 0x1_0000_0000, 0x1_0000_0fff, PHYS, RW)),
        Status::Range
    );
    assert_eq!(h.send(&map(1, 0x10_0000, 0x10_0fff, PHYS, RW)), Status::Ok);
    assert_eq!(
        h.send(&map(1, 0xffff_f000, 0xffff_ffff, PHYS, RW)),
        Status::Ok
    );
    // The default range ends at 2^48 - 1.
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    let top = 0xffff_ffff_ffff_u64;
    assert_eq!(
        h.send(&map(1, top + 1, top + PAGE, PHYS, RW)),
        Status::Range
    );
    assert_eq!(h.send(&map(1, top + 1 - PAGE, top, PHYS, RW)), Status::Ok);
}

#[test]
fn map_domain_outside_domain_range_returns_range() {
    // "If the VIRTIO_IOMMU_F_DOMAIN_RANGE feature is offered, domain_range describes the values supported in a domain field."
    let mut h = harness();
    assert_eq!(h.send(&map(0, 0x1000, 0x1fff, PHYS, RW)), Status::Range);
    assert_eq!(h.send(&map(65536, 0x1000, 0x1fff, PHYS, RW)), Status::Range);
    assert_eq!(h.send(&unmap(0, 0x1000, 0x1fff)), Status::Range);
}

#[test]
fn map_unknown_domain_returns_noent() {
    // "If domain does not exist, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_NOENT."
    let mut h = harness();
    assert_eq!(h.send(&map(1, 0x1000, 0x1fff, PHYS, RW)), Status::NoEnt);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(2, 0x1000, 0x1fff, PHYS, RW)), Status::NoEnt);
    assert_eq!(h.dev.viommu().state().domain_count(), 1);
}

#[test]
fn map_on_bypass_domain_returns_inval() {
    // "If the domain is a bypass domain, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    let mut h = harness();
    assert_eq!(
        h.send(&attach_f(1, EP, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Ok
    );
    assert_eq!(h.send(&map(1, 0x1000, 0x1fff, PHYS, RW)), Status::Inval);
    assert_eq!(h.dev.viommu().state().total_mappings(), 0);
    assert_eq!(xlate(&h, EP, 0x1000, ACCESS_READ), Ok(0x1000));
}

#[test]
fn map_virt_end_not_above_virt_start_returns_inval() {
    // "virt_end MUST be strictly greater than virt_start."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x2000, 0x1fff, PHYS, RW)), Status::Inval);
    assert_eq!(h.send(&map(1, 0x2000, 0x2000, PHYS, RW)), Status::Inval);
    assert_eq!(h.send(&map(1, u64::MAX, 0, PHYS, RW)), Status::Inval);
    assert_eq!(h.dev.viommu().state().mapping_count(1), 0);
}

#[test]
fn map_phys_range_beyond_guest_ram_is_accepted_and_dma_there_fails() {
    // "the range defined by phys_start and phys_end should be within the guest-physical address space." — a rule for the driver; Linux's identity domains (no bypass feature) map the whole input range one to one, so the device accepts memory mappings past RAM and a DMA that reaches them fails on the bus, with nothing read or written.
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    // Straddling the end of RAM: the first page is RAM, the second is not.
    assert_eq!(
        h.send(&map(1, 0x1000, 0x2fff, RAM_SIZE - PAGE, RW)),
        Status::Ok
    );
    h.mem
        .write_obj(0x5a5a_u32, GuestAddress(RAM_SIZE - PAGE))
        .unwrap();
    let d = dma(&h, EP);
    assert_eq!(d.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x5a5a);
    assert!(d.read_obj::<u32>(GuestAddress(0x2000)).is_err());
    assert!(d.write_obj(1u32, GuestAddress(0x2000)).is_err());
    // Entirely above RAM.
    assert_eq!(
        h.send(&map(1, 0x10_0000, 0x10_0fff, 1 << 40, RW)),
        Status::Ok
    );
    assert!(d.read_obj::<u32>(GuestAddress(0x10_0000)).is_err());
}

#[test]
fn map_phys_range_that_wraps_returns_range() {
    // phys_end = phys_start + virt_end - virt_start must exist: no guest-physical address space ends past 2^64.
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(
        h.send(&map(1, 0x1000, 0x2fff, u64::MAX - PAGE + 1, RW)),
        Status::Range
    );
    assert_eq!(h.dev.viommu().state().mapping_count(1), 0);
}

#[test]
fn map_and_unmap_at_top_of_address_space_do_not_wrap() {
    // "Any mapping request to virtual addresses outside of this range fails." — with input_range reaching 0xffffffffffffffff, virt_end + 1 wraps to 0.
    let c = IommuConfig {
        input_range: vmm_iommu::config::AddrRange {
            start: 0,
            end: u64::MAX,
        },
        ..cfg()
    };
    let mut h = harness_with(&c, |f| f);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    let top = u64::MAX - PAGE + 1;
    assert_eq!(h.send(&map(1, top, u64::MAX, PHYS, RW)), Status::Ok);
    assert_eq!(xlate(&h, EP, u64::MAX, ACCESS_READ), Ok(PHYS + PAGE - 1));
    let mut t = h.dev.viommu().translator(EP);
    assert_eq!(
        t.translate(u64::MAX - 7, ACCESS_READ).unwrap().0,
        PHYS + PAGE - 8
    );
    h.mem
        .write_obj(0x55_u64, GuestAddress(PHYS + PAGE - 16))
        .unwrap();
    assert_eq!(
        dma(&h, EP)
            .read_obj::<u64>(GuestAddress(u64::MAX - 15))
            .unwrap(),
        0x55
    );
    // A vm-memory access running past 2^64 is refused, not wrapped.
    assert!(dma(&h, EP)
        .read_obj::<u64>(GuestAddress(u64::MAX - 3))
        .is_err());
    // Unaligned end at the top, overlap at the top, span of 2^64.
    assert_eq!(h.send(&map(1, top, u64::MAX - 1, PHYS, RW)), Status::Range);
    assert_eq!(
        h.send(&map(1, top - PAGE, u64::MAX, PHYS, RW)),
        Status::Inval
    );
    assert_eq!(h.send(&map(1, 0, u64::MAX, 0, RW)), Status::Range);
    // Split at the top is refused; the whole space unmaps everything.
    assert_eq!(h.send(&unmap(1, u64::MAX - 1, u64::MAX)), Status::Range);
    assert_eq!(h.send(&map(1, 0, PAGE - 1, PHYS, RW)), Status::Ok);
    assert_eq!(h.send(&unmap(1, 0, u64::MAX)), Status::Ok);
    assert_eq!(h.dev.viommu().state().mapping_count(1), 0);
    assert!(t.translate(u64::MAX - 7, ACCESS_READ).is_err());
}

#[test]
fn map_unmap_without_map_unmap_negotiated_returns_unsupp() {
    // "This request is only available when VIRTIO_IOMMU_F_MAP_UNMAP has been negotiated."
    let mut h = harness_with(&cfg(), |f| f & !bit(VIRTIO_IOMMU_F_MAP_UNMAP));
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x1000, 0x1fff, PHYS, RW)), Status::Unsupp);
    assert_eq!(h.send(&unmap(1, 0x1000, 0x1fff)), Status::Unsupp);
    assert_eq!(h.dev.viommu().state().mapping_count(1), 0);
}

#[test]
fn map_without_write_flag_refuses_writes() {
    // "The device MUST NOT allow writes to a range mapped without the VIRTIO_IOMMU_MAP_F_WRITE flag."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x1000, 0x1fff, PHYS, R)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x2000, 0x2fff, PHYS + PAGE, 0)), Status::Ok);
    h.mem.write_obj(0x77_u64, GuestAddress(PHYS)).unwrap();
    let m = dma(&h, EP);
    assert_eq!(m.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0x77);
    assert!(m.write_obj(0x88_u64, GuestAddress(0x1000)).is_err());
    assert!(m.write_obj(0x88_u64, GuestAddress(0x2000)).is_err());
    assert_eq!(h.mem.read_obj::<u64>(GuestAddress(PHYS)).unwrap(), 0x77);
    // A translator that cached the page for reads still refuses the write.
    let mut t = h.dev.viommu().translator(EP);
    assert!(t.translate(0x1000, ACCESS_READ).is_ok());
    let e = t.translate(0x1008, ACCESS_WRITE).unwrap_err();
    assert_eq!(e.reason, FaultReason::Mapping);
    assert_eq!(
        xlate(&h, EP, 0x1000, ACCESS_READ | ACCESS_WRITE),
        Err(FaultReason::Mapping)
    );
}

#[test]
fn map_write_only_refuses_reads() {
    // "if the underlying architecture does not support write-only mappings, the device MAY allow reads to a range mapped with VIRTIO_IOMMU_MAP_F_WRITE but not VIRTIO_IOMMU_MAP_F_READ." — this device supports write-only mappings and refuses reads.
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x1000, 0x1fff, PHYS, W)), Status::Ok);
    let m = dma(&h, EP);
    m.write_obj(0x99_u64, GuestAddress(0x1010)).unwrap();
    assert_eq!(
        h.mem.read_obj::<u64>(GuestAddress(PHYS + 0x10)).unwrap(),
        0x99
    );
    assert!(m.read_obj::<u64>(GuestAddress(0x1010)).is_err());
    assert_eq!(
        xlate(&h, EP, 0x1010, ACCESS_READ),
        Err(FaultReason::Mapping)
    );
    assert_eq!(xlate(&h, EP, 0x1010, ACCESS_WRITE), Ok(PHYS + 0x10));
}

// ---------------------------------------------------------------------------
// UNMAP: the spec's seven examples and the device rules
// ---------------------------------------------------------------------------

/// A harness with EP attached to domain 1 and the given page ranges mapped.
fn with_mappings(maps: &[(u64, u64)]) -> Harness {
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    for &(a, b) in maps {
        assert_eq!(h.send(&map_pages(1, a, b)), Status::Ok);
    }
    h
}

#[test]
fn unmap_example_1_empty_range_succeeds_and_unmaps_nothing() {
    // "(1) unmap(virt_start=0, virt_end=4) -> succeeds, doesn't unmap anything"
    let mut h = with_mappings(&[]);
    assert_eq!(h.send(&unmap_pages(1, 0, 4)), Status::Ok);
    assert_eq!(ranges(&h, 1), vec![]);
    assert_eq!(h.dev.stats().unmapped, 0);
}

#[test]
fn unmap_example_2_exact_range_unmaps_mapping() {
    // "(2) a = map(virt_start=0, virt_end=9); unmap(0, 9) -> succeeds, unmaps a"
    let mut h = with_mappings(&[(0, 9)]);
    assert_eq!(h.send(&unmap_pages(1, 0, 9)), Status::Ok);
    assert_eq!(ranges(&h, 1), vec![]);
    assert_eq!(h.dev.stats().unmapped, 1);
}

#[test]
fn unmap_example_3_range_covering_two_mappings_unmaps_both() {
    // "(3) a = map(0, 4); b = map(5, 9); unmap(0, 9) -> succeeds, unmaps a and b"
    let mut h = with_mappings(&[(0, 4), (5, 9)]);
    assert_eq!(h.send(&unmap_pages(1, 0, 9)), Status::Ok);
    assert_eq!(ranges(&h, 1), vec![]);
    assert_eq!(h.dev.stats().unmapped, 2);
}

#[test]
fn unmap_example_4_split_fails_and_removes_nothing() {
    // "(4) a = map(0, 9); unmap(0, 4) -> fails, doesn't unmap anything"
    let mut h = with_mappings(&[(0, 9)]);
    // "If a mapping affected by the range is not covered in its entirety by the range (the UNMAP request would split the mapping), then the device SHOULD set the request status to VIRTIO_IOMMU_S_RANGE, and SHOULD NOT remove any mapping."
    assert_eq!(h.send(&unmap_pages(1, 0, 4)), Status::Range);
    assert_eq!(ranges(&h, 1), vec![pages(0, 9)]);
    assert_eq!(xlate(&h, EP, 0, ACCESS_READ), Ok(PHYS));
}

#[test]
fn unmap_example_5_range_covering_first_of_two_unmaps_only_it() {
    // "(5) a = map(0, 4); b = map(5, 9); unmap(0, 4) -> succeeds, unmaps a"
    let mut h = with_mappings(&[(0, 4), (5, 9)]);
    assert_eq!(h.send(&unmap_pages(1, 0, 4)), Status::Ok);
    assert_eq!(ranges(&h, 1), vec![pages(5, 9)]);
}

#[test]
fn unmap_example_6_range_larger_than_mapping_unmaps_it() {
    // "(6) a = map(0, 4); unmap(0, 9) -> succeeds, unmaps a"
    let mut h = with_mappings(&[(0, 4)]);
    assert_eq!(h.send(&unmap_pages(1, 0, 9)), Status::Ok);
    assert_eq!(ranges(&h, 1), vec![]);
}

#[test]
fn unmap_example_7_range_with_hole_unmaps_both_mappings() {
    // "(7) a = map(0, 4); b = map(10, 14); unmap(0, 14) -> succeeds, unmaps a and b"
    let mut h = with_mappings(&[(0, 4), (10, 14)]);
    assert_eq!(h.send(&unmap_pages(1, 0, 14)), Status::Ok);
    assert_eq!(ranges(&h, 1), vec![]);
}

#[test]
fn unmap_split_at_either_end_returns_range_and_removes_nothing() {
    // "If a mapping affected by the range is not covered in its entirety by the range (the UNMAP request would split the mapping), then the device SHOULD set the request status to VIRTIO_IOMMU_S_RANGE, and SHOULD NOT remove any mapping."
    let mut h = with_mappings(&[(0, 4), (6, 7), (10, 14)]);
    // The range covers (6, 7) fully but cuts (10, 14) at its end.
    assert_eq!(h.send(&unmap_pages(1, 5, 12)), Status::Range);
    // The range covers (6, 7) fully but cuts (0, 4) at its start.
    assert_eq!(h.send(&unmap_pages(1, 2, 8)), Status::Range);
    // The range lies inside one mapping.
    assert_eq!(h.send(&unmap_pages(1, 11, 12)), Status::Range);
    // Unaligned ends inside a mapping are splits too.
    assert_eq!(h.send(&unmap(1, 0, 5 * PAGE - 2)), Status::Range);
    assert_eq!(ranges(&h, 1), vec![pages(0, 4), pages(6, 7), pages(10, 14)]);
}

#[test]
fn unmap_range_spilling_over_unmapped_addresses_succeeds() {
    // "If part of the range or the full range is not covered by an existing mapping, then the device SHOULD remove all mappings affected by the range and set the request status to VIRTIO_IOMMU_S_OK."
    let mut h = with_mappings(&[(2, 3), (6, 7), (10, 14)]);
    // Unaligned bounds outside every mapping are fine.
    assert_eq!(h.send(&unmap(1, PAGE + 5, 8 * PAGE + 7)), Status::Ok);
    assert_eq!(ranges(&h, 1), vec![pages(10, 14)]);
}

#[test]
fn unmap_reserved_nonzero_returns_inval_and_keeps_mappings() {
    // "If the reserved field of an UNMAP request is not zero, the device MAY set the request status to VIRTIO_IOMMU_S_INVAL, in which case the device MAY perform the UNMAP operation." — this device does not.
    let mut h = with_mappings(&[(0, 4)]);
    let (s, e) = pages(0, 4);
    let r = Request::Unmap(UnmapReq {
        domain: 1,
        virt_start: s,
        virt_end: e,
        reserved: [0, 0, 1, 0],
    });
    assert_eq!(h.send(&r), Status::Inval);
    assert_eq!(ranges(&h, 1), vec![pages(0, 4)]);
}

#[test]
fn unmap_unknown_domain_returns_noent() {
    // "If domain does not exist, the device SHOULD set the request status to VIRTIO_IOMMU_S_NOENT."
    let mut h = with_mappings(&[(0, 4)]);
    assert_eq!(h.send(&unmap_pages(2, 0, 4)), Status::NoEnt);
    assert_eq!(ranges(&h, 1), vec![pages(0, 4)]);
}

#[test]
fn unmap_on_bypass_domain_returns_inval() {
    // "If the domain is a bypass domain, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    let mut h = harness();
    assert_eq!(
        h.send(&attach_f(1, EP, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Ok
    );
    assert_eq!(h.send(&unmap_pages(1, 0, 4)), Status::Inval);
}

#[test]
fn unmap_end_below_start_returns_inval() {
    // The range is "[virt_start; virt_end] (inclusive)"; an empty (reversed) range is invalid parameters for this device.
    let mut h = with_mappings(&[(0, 4)]);
    assert_eq!(h.send(&unmap(1, 0x2000, 0x1fff)), Status::Inval);
    assert_eq!(ranges(&h, 1), vec![pages(0, 4)]);
}

#[test]
fn unmap_takes_effect_before_ok_is_returned() {
    // "unmap(domain = 1, virt_start = 0x1000, virt_end = 0x1fff) Any access to addresses 0x1000-0x1fff by endpoint 0x8 would now be rejected."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x1000, 0x1fff, PHYS, R)), Status::Ok);
    let mut t = h.dev.viommu().translator(EP);
    let m = dma(&h, EP);
    assert!(t.translate(0x1000, ACCESS_READ).is_ok());
    assert!(t.translate(0x1008, ACCESS_READ).is_ok());
    assert_eq!(t.hit_miss(), (1, 1), "the second access hit the IOTLB");
    assert!(m.read_obj::<u64>(GuestAddress(0x1000)).is_ok());
    assert_eq!(h.send(&unmap(1, 0x1000, 0x1fff)), Status::Ok);
    assert_eq!(
        t.translate(0x1008, ACCESS_READ).unwrap_err().reason,
        FaultReason::Mapping
    );
    assert!(m.read_obj::<u64>(GuestAddress(0x1000)).is_err());
}

// ---------------------------------------------------------------------------
// PROBE
// ---------------------------------------------------------------------------

#[test]
fn probe_writes_resv_mem_properties_and_zero_fills_the_rest() {
    // "The device MUST write the size of a property without the struct virtio_iommu_probe_property header, in bytes, into length."
    // "When two properties follow each other, the device MUST put the second property exactly (length + 4) bytes after the beginning of the first one."
    // "If the device doesn't fill all probe_size bytes with properties, it SHOULD fill the remaining bytes of properties with zeroes."
    let mut h = harness();
    let probe_size = read_config(&h).probe_size;
    assert_eq!(probe_size, 512);
    let (status, props) = h.probe(EP, probe_size);
    assert_eq!(status, Status::Ok);
    assert_eq!(props.len(), 512);
    // First property at 0: RESV_MEM, reserved bits of type zero, length 20.
    assert_eq!(
        u16::from_le_bytes([props[0], props[1]]),
        VIRTIO_IOMMU_PROBE_T_RESV_MEM
    );
    let len = u16::from_le_bytes([props[2], props[3]]) as usize;
    assert_eq!(len, 20);
    let first = ResvMemProperty::decode(&props[..24]).unwrap();
    assert_eq!(
        first,
        ResvMemProperty {
            subtype: VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
            start: RESV_START,
            end: RESV_END
        }
    );
    // "The device SHOULD set reserved to zero."
    assert_eq!(&props[5..8], &[0, 0, 0]);
    // The second property at length + 4.
    let next = len + 4;
    assert_eq!(next, 24);
    let second = ResvMemProperty::decode(&props[next..next + 24]).unwrap();
    assert_eq!(
        second,
        ResvMemProperty {
            subtype: VIRTIO_IOMMU_RESV_MEM_T_MSI,
            start: MSI_START,
            end: MSI_END
        }
    );
    assert_eq!(&props[next + 5..next + 8], &[0, 0, 0]);
    // The rest, including the empty property that ends the list, is zero.
    assert!(props[48..].iter().all(|&b| b == 0));
}

#[test]
fn probe_without_reserved_regions_writes_only_zeroes() {
    // "If the device doesn't fill all probe_size bytes with properties, it SHOULD fill the remaining bytes of properties with zeroes."
    let mut h = Harness::new(&IommuConfig::default(), &[EP]);
    let (status, props) = h.probe(EP, 512);
    assert_eq!(status, Status::Ok);
    assert!(props.iter().all(|&b| b == 0));
}

#[test]
fn config_allows_at_most_one_msi_region_per_endpoint() {
    // "The device SHOULD NOT present more than one VIRTIO_IOMMU_RESV_MEM_T_MSI property per endpoint."
    let mut c = cfg();
    assert!(c.validate().is_ok());
    c.reserved_regions.push(ReservedRegion {
        start: 0x9000_0000,
        end: 0x9000_0fff,
        kind: ReservedKind::Msi,
    });
    let e = c.validate().unwrap_err().to_string();
    assert!(e.starts_with("iommu.reserved_regions[2]:"), "{e}");
    assert!(e.contains("reserved_regions[1]"), "{e}");
}

#[test]
fn config_rejects_overlapping_reserved_regions() {
    // "The device SHOULD NOT present multiple RESV_MEM properties that overlap each other for the same endpoint."
    let mut c = cfg();
    c.reserved_regions.push(ReservedRegion {
        start: RESV_END,
        end: RESV_END + PAGE,
        kind: ReservedKind::Reserved,
    });
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("overlaps reserved_regions[0]"), "{e}");
}

#[test]
fn probe_properties_smaller_than_probe_size_returns_inval_and_writes_nothing() {
    // "If the properties list is smaller than probe_size, the device SHOULD NOT write any property. It SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
    let mut h = harness();
    for len in [0, 24, 64, 508] {
        let (status, props) = h.probe(EP, len);
        assert_eq!(status, Status::Inval, "{len} bytes");
        assert!(
            props.iter().all(|&b| b == 0xa5),
            "{len} bytes: properties written"
        );
    }
}

#[test]
fn probe_unknown_endpoint_returns_noent() {
    // "If the endpoint identified by endpoint doesn't exist, then the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_NOENT."
    let mut h = harness();
    let (status, props) = h.probe(UNKNOWN_EP, 512);
    assert_eq!(status, Status::NoEnt);
    assert!(props.iter().all(|&b| b == 0xa5));
}

#[test]
fn probe_ignores_reserved_bytes() {
    // "The device MUST ignore field reserved of a PROBE request."
    let mut h = harness();
    let mut bytes = Request::Probe(ProbeReq { endpoint: EP }).encode();
    bytes[8..].fill(0xee);
    let (len, w) = h.send_raw(&[&bytes], &[512 + 4]);
    assert_eq!(len, 516);
    assert_eq!(&w[512..], &[0, 0, 0, 0]);
    assert_eq!(ResvMemProperty::decode(&w[..24]).unwrap().start, RESV_START);
}

// ---------------------------------------------------------------------------
// Bypass
// ---------------------------------------------------------------------------

fn bypass_cfg() -> IommuConfig {
    IommuConfig {
        bypass: true,
        ..cfg()
    }
}

#[test]
fn bypass_config_one_unattached_endpoint_translates_identity() {
    // "An endpoint is in bypass mode if: the VIRTIO_IOMMU_F_BYPASS_CONFIG feature is offered and: config field bypass is 1 and the endpoint is not attached to a domain."
    let h = harness_with(&bypass_cfg(), |f| f);
    assert_ne!(
        h.dev.acked_features() & bit(VIRTIO_IOMMU_F_BYPASS_CONFIG),
        0
    );
    assert_eq!(read_config(&h).bypass, 1);
    assert_eq!(
        xlate(&h, EP, 0x4_5678, ACCESS_READ | ACCESS_WRITE),
        Ok(0x4_5678)
    );
    h.mem.write_obj(0x4242_u32, GuestAddress(PHYS)).unwrap();
    assert_eq!(
        dma(&h, EP).read_obj::<u32>(GuestAddress(PHYS)).unwrap(),
        0x4242
    );
}

#[test]
fn bypass_config_one_applies_even_when_driver_does_not_accept_bypass_config() {
    // "This applies even if the driver does not accept the VIRTIO_IOMMU_F_BYPASS_CONFIG feature and the device initializes field bypass to 1."
    let h = harness_with(&bypass_cfg(), |f| f & !bit(VIRTIO_IOMMU_F_BYPASS_CONFIG));
    assert_eq!(
        h.dev.acked_features() & bit(VIRTIO_IOMMU_F_BYPASS_CONFIG),
        0
    );
    assert_eq!(xlate(&h, EP, 0x4_5678, ACCESS_WRITE), Ok(0x4_5678));
}

#[test]
fn bypass_config_zero_unattached_endpoint_gets_domain_fault() {
    // "The device SHOULD NOT let unattached endpoints that are not in bypass mode access the guest-physical address space."
    let h = harness();
    assert_eq!(read_config(&h).bypass, 0);
    assert_eq!(xlate(&h, EP, PHYS, ACCESS_READ), Err(FaultReason::Domain));
    assert!(dma(&h, EP).read_obj::<u32>(GuestAddress(PHYS)).is_err());
    let mut t = h.dev.viommu().translator(EP);
    assert_eq!(
        t.translate(PHYS, ACCESS_WRITE).unwrap_err().reason,
        FaultReason::Domain
    );
}

#[test]
fn no_bypass_feature_offered_unattached_endpoints_are_blocked() {
    // "An endpoint is in bypass mode if: [...] the VIRTIO_IOMMU_F_BYPASS_CONFIG feature is not offered and: the VIRTIO_IOMMU_F_BYPASS feature is negotiated [...]": with neither offered ("offer_bypass": false) no endpoint is ever in bypass mode.
    let c = IommuConfig {
        offer_bypass: false,
        ..cfg()
    };
    let h = harness_with(&c, |f| f);
    let offered = h.dev.avail_features();
    assert_eq!(offered & bit(VIRTIO_IOMMU_F_BYPASS_CONFIG), 0);
    assert_eq!(offered & bit(VIRTIO_IOMMU_F_BYPASS), 0);
    assert_eq!(xlate(&h, EP, PHYS, ACCESS_READ), Err(FaultReason::Domain));
    // The config refuses asking for bypass without a feature to carry it.
    let both = IommuConfig { bypass: true, ..c };
    assert!(both
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("iommu.bypass:"));
}

#[test]
fn device_stats_record_the_mapped_iova_range_and_bypass_attaches() {
    let mut h = harness_with(&cfg(), |f| f);
    assert_eq!(h.dev.stats().mapped_iova_lowest, u64::MAX);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x10_0000, 0x10_ffff, PHYS, RW)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x4000, 0x4fff, PHYS, RW)), Status::Ok);
    assert_eq!(
        h.send(&attach_f(2, EP2, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Ok
    );
    let s = h.dev.stats();
    assert_eq!(
        (s.mapped_iova_lowest, s.mapped_iova_highest),
        (0x4000, 0x10_ffff)
    );
    assert_eq!(s.bypass_attaches, 1);
}

#[test]
fn config_bypass_write_needs_bypass_config_negotiated() {
    // "When the VIRTIO_IOMMU_F_BYPASS_CONFIG feature is negotiated, the driver MAY write to bypass."
    let mut h = harness_with(&cfg(), |f| f & !bit(VIRTIO_IOMMU_F_BYPASS_CONFIG));
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    assert_eq!(read_config(&h).bypass, 0);
    assert_eq!(xlate(&h, EP, PHYS, ACCESS_READ), Err(FaultReason::Domain));
    // Negotiated: the write takes effect, both ways, for cached translations too.
    let mut h = harness();
    let mut t = h.dev.viommu().translator(EP);
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    assert_eq!(read_config(&h).bypass, 1);
    assert_eq!(t.translate(PHYS, ACCESS_READ).unwrap().0, PHYS);
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]);
    assert_eq!(read_config(&h).bypass, 0);
    assert_eq!(
        t.translate(PHYS, ACCESS_READ).unwrap_err().reason,
        FaultReason::Domain
    );
}

#[test]
fn config_bypass_values_above_one_are_ignored() {
    // "The device MUST NOT present a value different than 0 or 1 in bypass."
    let mut h = harness();
    for v in [2u8, 3, 0x80, 0xff] {
        h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[v]);
        assert_eq!(read_config(&h).bypass, 0, "value {v}");
    }
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0xfe]);
    assert_eq!(read_config(&h).bypass, 1);
    assert_eq!(xlate(&h, EP, PHYS, ACCESS_READ), Ok(PHYS));
}

#[test]
fn config_writes_to_other_fields_are_ignored() {
    // "The driver MUST NOT write to any other device configuration field."
    let mut h = harness();
    let before = h.dev.config();
    h.dev.write_config(0, &[0xff; 8]);
    h.dev.write_config(24, &0u32.to_le_bytes());
    h.dev.write_config(32, &[0; 4]);
    // A wider write that covers bypass is not a bypass write either.
    h.dev
        .write_config(CONFIG_BYPASS_OFFSET as u64, &[1, 0, 0, 0]);
    h.dev.write_config(37, &[1]);
    assert_eq!(h.dev.config(), before);
    assert_eq!(read_config(&h), before);
}

#[test]
fn config_bypass_kept_on_device_reset_and_restored_on_system_reset() {
    // "Field bypass SHOULD NOT change on device reset, but SHOULD be restored to its initial value on system reset."
    let mut h = harness();
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[1]);
    h.dev.reset();
    assert_eq!(read_config(&h).bypass, 1);
    assert_eq!(xlate(&h, EP, PHYS, ACCESS_READ), Ok(PHYS));
    h.dev.system_reset();
    assert_eq!(read_config(&h).bypass, 0);
    assert_eq!(xlate(&h, EP, PHYS, ACCESS_READ), Err(FaultReason::Domain));
    // And the other way round, from an initial value of 1.
    let mut h = harness_with(&bypass_cfg(), |f| f);
    h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]);
    h.dev.reset();
    assert_eq!(read_config(&h).bypass, 0);
    h.dev.system_reset();
    assert_eq!(read_config(&h).bypass, 1);
    assert_eq!(xlate(&h, EP, PHYS, ACCESS_READ), Ok(PHYS));
}

#[test]
fn legacy_bypass_is_offered_instead_of_bypass_config() {
    // "New devices SHOULD NOT offer VIRTIO_IOMMU_F_BYPASS. Devices SHOULD NOT offer both VIRTIO_IOMMU_F_BYPASS and VIRTIO_IOMMU_F_BYPASS_CONFIG."
    let legacy = IommuConfig {
        legacy_bypass: true,
        bypass: true,
        ..cfg()
    };
    let h = harness_with(&legacy, |f| f);
    let avail = h.dev.avail_features();
    assert_ne!(avail & bit(VIRTIO_IOMMU_F_BYPASS), 0);
    assert_eq!(avail & bit(VIRTIO_IOMMU_F_BYPASS_CONFIG), 0);
    // Without BYPASS_CONFIG the config field stays 0 and is not writable.
    assert_eq!(read_config(&h).bypass, 0);
}

#[test]
fn legacy_bypass_unattached_endpoints_bypass_only_when_negotiated() {
    // "An endpoint is in bypass mode if: ... the VIRTIO_IOMMU_F_BYPASS feature is negotiated and the endpoint is not attached to a domain."
    let legacy = IommuConfig {
        legacy_bypass: true,
        ..cfg()
    };
    let mut h = harness_with(&legacy, |f| f);
    assert_ne!(h.dev.acked_features() & bit(VIRTIO_IOMMU_F_BYPASS), 0);
    assert_eq!(xlate(&h, EP, PHYS, ACCESS_WRITE), Ok(PHYS));
    // Attached: translated through the domain; detached: bypass again.
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(xlate(&h, EP, PHYS, ACCESS_WRITE), Err(FaultReason::Mapping));
    assert_eq!(h.send(&detach(1, EP)), Status::Ok);
    assert_eq!(xlate(&h, EP, PHYS, ACCESS_WRITE), Ok(PHYS));
    // Not negotiated: no bypass.
    let h = harness_with(&legacy, |f| f & !bit(VIRTIO_IOMMU_F_BYPASS));
    assert_eq!(xlate(&h, EP, PHYS, ACCESS_WRITE), Err(FaultReason::Domain));
}

#[test]
fn device_reset_detaches_every_endpoint() {
    // "When the device is reset, endpoints are not attached to any domain."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&attach(1, EP2)), Status::Ok);
    assert_eq!(
        h.send(&attach_f(2, EP3, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Ok
    );
    assert_eq!(h.send(&map_pages(1, 0, 3)), Status::Ok);
    let mut t = h.dev.viommu().translator(EP);
    assert!(t.translate(0, ACCESS_READ).is_ok());
    h.dev.reset();
    let st = h.dev.viommu().state();
    for ep in [EP, EP2, EP3] {
        assert_eq!(st.endpoint(ep).unwrap().domain, None);
    }
    assert_eq!(st.domain_count(), 0);
    assert_eq!(st.total_mappings(), 0);
    drop(st);
    assert_eq!(h.dev.acked_features(), 0);
    assert!(!h.dev.is_activated());
    assert_eq!(
        t.translate(0, ACCESS_READ).unwrap_err().reason,
        FaultReason::Domain
    );
    assert_eq!(xlate(&h, EP3, PHYS, ACCESS_READ), Err(FaultReason::Domain));
}

// ---------------------------------------------------------------------------
// Features and config space
// ---------------------------------------------------------------------------

#[test]
fn features_offer_version_1_and_map_unmap() {
    // "The device SHOULD offer feature bit VIRTIO_IOMMU_F_MAP_UNMAP." (and a virtio 1.x device offers VIRTIO_F_VERSION_1)
    let h = harness();
    let avail = h.dev.avail_features();
    for b in [
        VIRTIO_F_VERSION_1,
        VIRTIO_IOMMU_F_MAP_UNMAP,
        VIRTIO_IOMMU_F_INPUT_RANGE,
        VIRTIO_IOMMU_F_DOMAIN_RANGE,
        VIRTIO_IOMMU_F_PROBE,
    ] {
        assert_ne!(avail & bit(b), 0, "feature bit {b}");
    }
    assert_eq!(h.dev.device_type(), 23);
}

#[test]
fn features_never_offer_both_bypass_and_bypass_config() {
    // "Devices SHOULD NOT offer both VIRTIO_IOMMU_F_BYPASS and VIRTIO_IOMMU_F_BYPASS_CONFIG."
    for legacy in [false, true] {
        for bypass in [false, true] {
            let c = IommuConfig {
                legacy_bypass: legacy,
                bypass,
                ..cfg()
            };
            let h = harness_with(&c, |f| f);
            let avail = h.dev.avail_features();
            let both = bit(VIRTIO_IOMMU_F_BYPASS) | bit(VIRTIO_IOMMU_F_BYPASS_CONFIG);
            assert_ne!(avail & both, both, "legacy {legacy} bypass {bypass}");
            assert_ne!(avail & both, 0);
        }
    }
}

#[test]
fn acked_features_not_offered_are_dropped() {
    // A driver can only accept what the device offers; the legacy BYPASS bit acked against a BYPASS_CONFIG device has no effect.
    let mut h = harness();
    h.dev.set_acked_features(u64::MAX);
    assert_eq!(h.dev.acked_features(), h.dev.avail_features());
    assert_eq!(h.dev.acked_features() & bit(VIRTIO_IOMMU_F_BYPASS), 0);
    let h = harness_with(&cfg(), |f| f | bit(VIRTIO_IOMMU_F_BYPASS) | bit(50));
    assert_eq!(
        h.dev.acked_features() & (bit(VIRTIO_IOMMU_F_BYPASS) | bit(50)),
        0
    );
    assert_eq!(xlate(&h, EP, PHYS, ACCESS_READ), Err(FaultReason::Domain));
}

#[test]
fn config_space_matches_configuration() {
    // "The device MUST set at least one bit in page_size_mask, describing the page granularity."
    let c = IommuConfig {
        input_range: vmm_iommu::config::AddrRange {
            start: 0x20_0000,
            end: 0xff_ffff_ffff,
        },
        domain_range: vmm_iommu::config::DomainRange { start: 2, end: 300 },
        probe_size: 128,
        ..cfg()
    };
    let h = harness_with(&c, |f| f);
    let got = read_config(&h);
    assert_ne!(got.page_size_mask, 0);
    assert_eq!(got.page_size_mask, c.page_size_mask);
    assert_eq!(got.page_size_mask.trailing_zeros(), 12);
    assert_eq!(
        (got.input_start, got.input_end),
        (0x20_0000, 0xff_ffff_ffff)
    );
    assert_eq!((got.domain_start, got.domain_end), (2, 300));
    assert_eq!(got.probe_size, 128);
    assert_eq!(got.bypass, 0);
    // Byte-wise reads at the spec's offsets, and zeroes past the end.
    let mut b = [0u8; 4];
    h.dev.read_config(24, &mut b);
    assert_eq!(u32::from_le_bytes(b), 2);
    h.dev.read_config(32, &mut b);
    assert_eq!(u32::from_le_bytes(b), 128);
    let mut past = [0xffu8; 8];
    h.dev.read_config(CONFIG_SIZE as u64 - 2, &mut past);
    assert_eq!(past, [0; 8]);
}

// ---------------------------------------------------------------------------
// Request framing
// ---------------------------------------------------------------------------

#[test]
fn unknown_request_type_returns_used_len_zero_and_buffer_untouched() {
    // "If a request type is not recognized, the device SHOULD NOT write the buffer and SHOULD set the used length to zero."
    let mut h = harness();
    for t in [0u8, 6, 0x42, 0xff] {
        let mut bytes = vec![0u8; 36];
        bytes[0] = t;
        let (len, w) = h.send_raw(&[&bytes], &[4]);
        assert_eq!(len, 0, "type {t}");
        assert_eq!(w, vec![0xa5; 4], "type {t}");
    }
    assert_eq!(h.dev.stats().unknown_type, 4);
}

#[test]
fn chain_without_room_for_tail_returns_used_len_zero_and_writes_nothing() {
    // "When the device fails to parse a request, for instance if a request is too small for its type and the device cannot find the tail, then it is unable to set status. In that case, it returns the buffers without writing to them."
    let mut h = harness();
    let bytes = attach(1, EP).encode();
    for w in [&[][..], &[3][..], &[1, 1, 1][..]] {
        let (len, got) = h.send_raw(&[&bytes], w);
        assert_eq!(len, 0, "writable {w:?}");
        assert!(got.iter().all(|&b| b == 0xa5));
    }
    assert_eq!(domain_of(&h, EP), None);
}

#[test]
fn request_split_across_many_descriptors_is_served() {
    // "All requests are split in two parts: one device-readable, one device-writable." — each part may use any number of descriptors.
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    let bytes = map(1, 0x1000, 0x1fff, PHYS, RW).encode();
    let pieces: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(pieces.len(), 36);
    let (len, w) = h.send_raw(&pieces, &[2, 2]);
    assert_eq!(len, 4);
    assert_eq!(w, vec![0, 0, 0, 0]);
    assert_eq!(ranges(&h, 1), vec![(0x1000, 0x1fff)]);
    // PROBE with the properties spread over three descriptors, the tail
    // straddling the last two.
    let bytes = Request::Probe(ProbeReq { endpoint: EP }).encode();
    let (first, rest) = bytes.split_at(5);
    let (len, w) = h.send_raw(&[first, rest], &[100, 410, 6]);
    assert_eq!(len, 516);
    assert_eq!(&w[512..], &[0, 0, 0, 0]);
    assert_eq!(
        ResvMemProperty::decode(&w[24..48]).unwrap().start,
        MSI_START
    );
    assert!(w[48..512].iter().all(|&b| b == 0));
}

#[test]
fn truncated_request_body_returns_ioerr() {
    // "VIRTIO_IOMMU_S_IOERR: Virtio communication error" — the tail is found but the body is short.
    let mut h = harness();
    for r in [
        attach(1, EP),
        map(1, 0x1000, 0x1fff, PHYS, RW),
        unmap(1, 0, 1),
    ] {
        let bytes = r.encode();
        for cut in [4, bytes.len() - 1] {
            let (len, w) = h.send_raw(&[&bytes[..cut]], &[4]);
            assert_eq!((len, w[0]), (4, Status::IoErr as u8), "{r:?} cut at {cut}");
            assert_eq!(&w[1..], &[0, 0, 0]);
        }
    }
    // Fewer than four bytes: no head at all.
    let (len, w) = h.send_raw(&[&[1, 0]], &[4]);
    assert_eq!((len, w[0]), (4, Status::IoErr as u8));
    assert_eq!(h.dev.viommu().state().domain_count(), 0);
}

#[test]
fn readable_descriptor_outside_guest_memory_returns_ioerr() {
    // "VIRTIO_IOMMU_S_IOERR: Virtio communication error"
    let mut h = harness();
    let tail = GuestAddress(layout::FREE);
    h.mem.write_slice(&[0xa5; 4], tail).unwrap();
    let head = h.requestq.add_chain(
        &h.mem,
        &[(GuestAddress(0x10_0000_0000), 24, false), (tail, 4, true)],
    );
    let used = h.notify();
    assert_eq!(used, vec![(head, 4)]);
    let mut w = [0u8; 4];
    h.mem.read_slice(&mut w, tail).unwrap();
    assert_eq!(w, [Status::IoErr as u8, 0, 0, 0]);
    // At the very top of the address space, too.
    h.mem.write_slice(&[0xa5; 4], tail).unwrap();
    h.requestq.add_chain(
        &h.mem,
        &[(GuestAddress(u64::MAX - 3), 24, false), (tail, 4, true)],
    );
    assert_eq!(h.notify().len(), 1);
    h.mem.read_slice(&mut w, tail).unwrap();
    assert_eq!(w[0], Status::IoErr as u8);
}

#[test]
fn writable_descriptor_before_readable_returns_ioerr() {
    // Virtio: device-readable descriptors come before device-writable ones; a chain that breaks this is a communication error.
    let mut h = harness();
    let bytes = attach(1, EP).encode();
    let at = GuestAddress(layout::FREE);
    let tail = GuestAddress(layout::FREE + 0x100);
    h.mem.write_slice(&bytes, at).unwrap();
    h.mem.write_slice(&[0xa5; 4], tail).unwrap();
    h.requestq.add_chain(
        &h.mem,
        &[
            (at, 4, false),
            (tail, 4, true),
            (at.unchecked_add(4), 16, false),
        ],
    );
    assert_eq!(h.notify().len(), 1);
    let mut w = [0u8; 4];
    h.mem.read_slice(&mut w, tail).unwrap();
    assert_eq!(w[0], Status::IoErr as u8);
    assert_eq!(domain_of(&h, EP), None);
}

#[test]
fn malformed_request_does_not_stop_the_next_one() {
    // "When the device fails to parse a request ... it returns the buffers without writing to them." — and goes on with the next request.
    let mut h = harness();
    let good = attach(1, EP).encode();
    let unknown = [0x42u8, 0, 0, 0, 1, 0, 0, 0];
    let short = &good[..10];
    let (h1, w1) = h.queue_raw(&[&unknown], &[4]);
    let (h2, w2) = h.queue_raw(&[short], &[4]);
    let (h3, w3) = h.queue_raw(&[&good], &[2]);
    let (h4, w4) = h.queue_raw(&[&good], &[4]);
    let used = h.notify();
    assert_eq!(used, vec![(h1, 0), (h2, 4), (h3, 0), (h4, 4)]);
    let read = |h: &Harness, a: GuestAddress| {
        let mut b = [0u8; 4];
        h.mem.read_slice(&mut b, a).unwrap();
        b
    };
    assert_eq!(read(&h, w1[0]), [0xa5; 4]);
    assert_eq!(read(&h, w2[0]), [Status::IoErr as u8, 0, 0, 0]);
    assert_eq!(read(&h, w4[0]), [0, 0, 0, 0]);
    let mut b = [0u8; 2];
    h.mem.read_slice(&mut b, w3[0]).unwrap();
    assert_eq!(b, [0xa5; 2]);
    assert_eq!(domain_of(&h, EP), Some(1));
}

#[test]
fn head_reserved_bytes_are_ignored() {
    // "The device MUST ignore field reserved of struct virtio_iommu_req_head"
    let mut h = harness();
    let mut bytes = attach(1, EP).encode();
    bytes[1..4].copy_from_slice(&[0xff, 0x12, 0x80]);
    let (len, w) = h.send_raw(&[&bytes], &[4]);
    assert_eq!((len, w), (4, vec![0, 0, 0, 0]));
    assert_eq!(domain_of(&h, EP), Some(1));
}

#[test]
fn tail_reserved_bytes_are_written_as_zero() {
    // "The device ... SHOULD set field reserved of struct virtio_iommu_req_tail to zero."
    let mut h = harness();
    let cases = [
        (attach(1, EP), Status::Ok),
        (attach(1, UNKNOWN_EP), Status::NoEnt),
        (map(1, 0x1001, 0x1fff, PHYS, RW), Status::Range),
        (map(1, 0x1000, 0x1fff, PHYS, 1 << 9), Status::Inval),
    ];
    for (r, s) in cases {
        let (len, w) = h.send_raw(&[&r.encode()], &[4]);
        assert_eq!((len, w), (4, vec![s as u8, 0, 0, 0]), "{r:?}");
    }
    // With a larger writable part, the tail is its last four bytes.
    let (len, w) = h.send_raw(&[&detach(1, EP).encode()], &[12]);
    assert_eq!(len, 12);
    assert_eq!(&w[8..], &[0, 0, 0, 0]);
    assert_eq!(&w[..8], &[0xa5; 8]);
}

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

fn limited(max_domains: u32, per_domain: u64, total: u64) -> Harness {
    let mut c = cfg();
    c.limits.max_domains = max_domains;
    c.limits.max_mappings_per_domain = per_domain;
    c.limits.max_mappings = total;
    harness_with(&c, |f| f)
}

#[test]
fn max_domains_reached_returns_nomem() {
    // "VIRTIO_IOMMU_S_NOMEM: Insufficient resources"
    let mut h = limited(2, 8, 16);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&attach(2, EP2)), Status::Ok);
    assert_eq!(h.send(&attach(3, EP3)), Status::NoMem);
    assert_eq!(domain_of(&h, EP3), None);
    // Joining an existing domain needs no new one.
    assert_eq!(h.send(&attach(2, EP3)), Status::Ok);
    // Moving the sole endpoint of a domain to a new one ends the old one
    // first, so it fits.
    assert_eq!(h.send(&attach(4, EP)), Status::Ok);
    assert_eq!(h.dev.viommu().state().domain_count(), 2);
    // Moving an endpoint that shares its domain does not.
    assert_eq!(h.send(&attach(5, EP3)), Status::NoMem);
    assert_eq!(domain_of(&h, EP3), Some(2));
}

#[test]
fn max_mappings_per_domain_reached_returns_nomem() {
    // "VIRTIO_IOMMU_S_NOMEM: Insufficient resources"
    let mut h = limited(4, 3, 100);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&attach(2, EP2)), Status::Ok);
    for p in 0..3 {
        assert_eq!(h.send(&map_pages(1, p, p)), Status::Ok);
    }
    assert_eq!(h.send(&map_pages(1, 10, 10)), Status::NoMem);
    // Other domains have their own budget; freeing one makes room again.
    assert_eq!(h.send(&map_pages(2, 10, 10)), Status::Ok);
    assert_eq!(h.send(&unmap_pages(1, 0, 0)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 10, 10)), Status::Ok);
    assert_eq!(h.dev.viommu().state().mapping_count(1), 3);
}

#[test]
fn max_mappings_reached_returns_nomem() {
    // "VIRTIO_IOMMU_S_NOMEM: Insufficient resources"
    let mut h = limited(4, 8, 3);
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&attach(2, EP2)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 0, 0)), Status::Ok);
    assert_eq!(h.send(&map_pages(1, 1, 1)), Status::Ok);
    assert_eq!(h.send(&map_pages(2, 0, 0)), Status::Ok);
    assert_eq!(h.send(&map_pages(2, 1, 1)), Status::NoMem);
    // Ending domain 1 gives its mappings back.
    assert_eq!(h.send(&detach(1, EP)), Status::Ok);
    assert_eq!(h.dev.viommu().state().total_mappings(), 1);
    assert_eq!(h.send(&map_pages(2, 1, 1)), Status::Ok);
    assert_eq!(h.send(&map_pages(2, 2, 2)), Status::Ok);
    assert_eq!(h.send(&map_pages(2, 3, 3)), Status::NoMem);
}

// ---------------------------------------------------------------------------
// Fault reporting on the event queue
// ---------------------------------------------------------------------------

#[test]
fn fault_on_unattached_endpoint_reports_reason_domain() {
    // "VIRTIO_IOMMU_FAULT_R_DOMAIN (1) The endpoint attempted to access address without being attached to a domain."
    let mut h = harness();
    h.add_event_buffers(2, 24);
    let mut t = h.dev.viommu().translator(EP2);
    assert!(t.translate(0x1234, ACCESS_READ).is_err());
    let got = h.collect_faults();
    assert_eq!(
        got,
        vec![(
            24,
            Some(FaultRecord {
                reason: VIRTIO_IOMMU_FAULT_R_DOMAIN,
                flags: VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                endpoint: EP2,
                address: 0x1234,
            })
        )]
    );
    assert_eq!(h.dev.stats().faults_delivered, 1);
}

#[test]
fn fault_on_unmapped_address_reports_reason_mapping() {
    // "VIRTIO_IOMMU_FAULT_R_MAPPING (2) The endpoint attempted to access address, which wasn't mapped in the domain"
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    h.add_event_buffers(1, 24);
    assert!(dma(&h, EP).write_obj(1u32, GuestAddress(0x7000)).is_err());
    let got = h.collect_faults();
    assert_eq!(
        got,
        vec![(
            24,
            Some(FaultRecord {
                reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
                flags: VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                endpoint: EP,
                address: 0x7000,
            })
        )]
    );
}

#[test]
fn fault_on_permission_reports_reason_mapping() {
    // "VIRTIO_IOMMU_FAULT_R_MAPPING (2) The endpoint attempted to access address, which ... didn't have the correct protection flags."
    let mut h = harness();
    assert_eq!(h.send(&attach(1, EP)), Status::Ok);
    assert_eq!(h.send(&map(1, 0x3000, 0x3fff, PHYS, R)), Status::Ok);
    h.add_event_buffers(1, 24);
    let mut t = h.dev.viommu().translator(EP);
    assert!(t.translate(0x3010, ACCESS_WRITE).is_err());
    let (len, rec) = h.collect_faults()[0];
    assert_eq!(len, 24);
    let rec = rec.unwrap();
    assert_eq!(rec.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
    assert_eq!(
        rec.flags,
        VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS
    );
    assert_eq!((rec.endpoint, rec.address), (EP, 0x3010));
}

#[test]
fn fault_record_reserved_fields_and_undefined_flags_are_zero() {
    // "The device SHOULD set reserved and reserved1 to zero." / "The device SHOULD set undefined flags to zero."
    let mut h = harness();
    h.mem
        .write_slice(&[0xa5; 64], GuestAddress(layout::EVENT_BUFFERS))
        .unwrap();
    h.add_event_buffers(1, 64);
    let mut t = h.dev.viommu().translator(EP);
    assert!(t.translate(0xabc0, ACCESS_READ | ACCESS_WRITE).is_err());
    assert_eq!(h.collect_faults()[0].0, 24);
    let mut b = [0u8; 32];
    h.mem
        .read_slice(&mut b, GuestAddress(layout::EVENT_BUFFERS))
        .unwrap();
    assert_eq!(b[0], VIRTIO_IOMMU_FAULT_R_DOMAIN);
    assert_eq!(&b[1..4], &[0, 0, 0]);
    let flags = u32::from_le_bytes(b[4..8].try_into().unwrap());
    assert_eq!(
        flags,
        VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS
    );
    assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), EP);
    assert_eq!(&b[12..16], &[0, 0, 0, 0]);
    assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 0xabc0);
    // Bytes past the record are untouched.
    assert_eq!(&b[24..], &[0xa5; 8]);
}

#[test]
fn fault_for_unknown_endpoint_is_not_reported() {
    // "The device SHOULD write a valid endpoint ID in endpoint." — a translator for an endpoint the vIOMMU does not manage gets an error but queues no record.
    let mut h = harness();
    h.add_event_buffers(1, 24);
    let mut t = h.dev.viommu().translator(UNKNOWN_EP);
    assert_eq!(
        t.translate(0x1000, ACCESS_READ).unwrap_err().reason,
        FaultReason::Unknown
    );
    assert!(dma(&h, UNKNOWN_EP)
        .read_obj::<u32>(GuestAddress(0x1000))
        .is_err());
    assert!(h.dev.viommu().faults().is_empty());
    assert_eq!(h.collect_faults(), vec![]);
}

#[test]
fn faults_wait_for_event_buffers_in_a_bounded_queue() {
    // "If no buffer is available, the device can either wait for one to be consumed, or drop the event."
    let mut c = cfg();
    c.limits.max_pending_faults = 4;
    let mut h = harness_with(&c, |f| f);
    let mut t = h.dev.viommu().translator(EP);
    for i in 0..6u64 {
        assert!(t.translate(i * PAGE, ACCESS_READ).is_err());
    }
    let faults = h.dev.viommu().faults();
    assert_eq!(faults.len(), 4);
    assert_eq!(faults.dropped(), 2);
    assert_eq!(h.collect_faults(), vec![]);
    h.add_event_buffers(8, 24);
    let got = h.collect_faults();
    assert_eq!(got.len(), 4);
    for (i, (len, rec)) in got.iter().enumerate() {
        assert_eq!(*len, 24);
        assert_eq!(rec.unwrap().address, i as u64 * PAGE, "oldest first");
    }
    assert!(h.dev.viommu().faults().is_empty());
    // The four unused buffers serve later faults.
    assert!(t.translate(0x9000, ACCESS_WRITE).is_err());
    let got = h.collect_faults();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.unwrap().address, 0x9000);
}

#[test]
fn too_small_event_buffer_is_returned_unused_and_record_goes_to_next_buffer() {
    // "If a buffer is too small to contain the fault report, the device SHOULD NOT use multiple buffers to describe it."
    let mut h = harness();
    h.add_event_buffers(1, 8);
    h.add_event_buffers(1, 23);
    let mut t = h.dev.viommu().translator(EP);
    assert!(t.translate(0x5000, ACCESS_READ).is_err());
    let got = h.collect_faults();
    assert_eq!(got, vec![(0, None), (0, None)]);
    assert_eq!(h.dev.viommu().faults().len(), 1);
    assert_eq!(h.dev.stats().event_buffers_too_small, 2);
    h.add_event_buffers(1, 24);
    let got = h.collect_faults();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 24);
    assert_eq!(got[0].1.unwrap().address, 0x5000);
}
