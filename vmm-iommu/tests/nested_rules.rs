//! One test per rule of the project's nested extension (`docs/wire.md`,
//! "Nested extension"), through a real virtqueue, with a recording backend
//! behind the router so that what reaches a backend, and in how many
//! calls, is checked too. Each test names the rule it checks.

use std::sync::Arc;

use vmm_iommu::backend::{BackendFault, IommuBackend, TableBinding};
use vmm_iommu::config::{IommuConfig, NestedConfig, TableFormat};
use vmm_iommu::invalidation::{Caches, Invalidation, Scope, VaRange};
use vmm_iommu::testing::{driver_features, BackendCall, Harness, RecordingBackend};
use vmm_iommu::wire::*;
use vmm_iommu::Mapping;
use vmm_iommu::Router;

/// Endpoint served by backend A.
const EP: u32 = 8;
/// Second endpoint served by backend A.
const EP2: u32 = 9;
/// Endpoint served by backend B.
const EPB: u32 = 10;
/// Endpoint without a backend (MAP mode through the state only).
const EP_PLAIN: u32 = 11;
const DIR: u64 = 0x60_0000;
const ROOT: u64 = 0x70_0000;
const RAM_MIB: u64 = 16;

fn cfg() -> IommuConfig {
    IommuConfig {
        nested: Some(NestedConfig {
            formats: vec![
                TableFormat::IntelVtd,
                TableFormat::ArmSmmuV3,
                TableFormat::ArmLpae,
                TableFormat::X86_64,
            ],
            pasid_bits: 16,
        }),
        ..IommuConfig::default()
    }
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

struct Rig {
    h: Harness,
    a: Arc<RecordingBackend>,
    b: Arc<RecordingBackend>,
}

/// A harness with backend A serving EP, EP2 and backend B serving EPB;
/// the driver accepts everything offered.
fn rig_with(cfg: &IommuConfig, features: impl FnOnce(u64) -> u64) -> Rig {
    let a = Arc::new(RecordingBackend::nested("a"));
    let b = Arc::new(RecordingBackend::nested("b"));
    let (a2, b2) = (a.clone(), b.clone());
    let h = Harness::with_router(
        cfg,
        &[EP, EP2, EPB, EP_PLAIN],
        RAM_MIB,
        &[],
        move |_, _| {
            let mut r = Router::new();
            r.add(a2, &[EP, EP2]);
            r.add(b2, &[EPB]);
            r
        },
        |d| features(driver_features(d) | (d.avail_features() & (bit(56) | bit(57)))),
    );
    Rig { h, a, b }
}

fn rig() -> Rig {
    rig_with(&cfg(), |f| f)
}

fn vtd(dir: u64) -> TableDesc {
    TableDesc::IntelVtd {
        pasid_bits: 16,
        pasid_dir_ptr: dir,
    }
}

fn attach_table(domain: u32, endpoint: u32, t: &TableDesc) -> Request {
    Request::AttachTable(AttachTableReq::new(domain, endpoint, t))
}

fn inv(domain: u32, i: Invalidation) -> Request {
    Request::Invalidate(i.to_request(domain))
}

fn page_inv(pasid: Option<u32>, page: u64) -> Invalidation {
    Invalidation {
        caches: Caches::IOTLB,
        scope: Scope::Range(VaRange {
            pasid,
            addr: page << 12,
            granule_log2: 12,
            pages: 1,
            leaf_only: true,
        }),
        archid: None,
    }
}

fn map(domain: u32, start: u64, end: u64, phys: u64) -> Request {
    Request::Map(MapReq {
        domain,
        virt_start: start,
        virt_end: end,
        phys_start: phys,
        flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
    })
}

fn attach(domain: u32, endpoint: u32) -> Request {
    Request::Attach(AttachReq {
        domain,
        endpoint,
        flags: 0,
        reserved: [0; 4],
    })
}

fn invalidates(calls: &[BackendCall]) -> Vec<(u32, Vec<Invalidation>)> {
    calls
        .iter()
        .filter_map(|c| match c {
            BackendCall::Invalidate(d, b) => Some((*d, b.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn attach_table_feature_is_offered_only_when_the_config_enables_nesting() {
    let r = rig();
    assert_ne!(
        r.h.dev.avail_features() & bit(VIRTIO_IOMMU_F_ATTACH_TABLE),
        0
    );
    assert_ne!(
        r.h.dev.avail_features() & bit(VIRTIO_IOMMU_F_PAGE_REQUEST),
        0
    );
    let r = rig_with(&IommuConfig::default(), |f| f);
    assert_eq!(
        r.h.dev.avail_features() & bit(VIRTIO_IOMMU_F_ATTACH_TABLE),
        0
    );
    assert_eq!(
        r.h.dev.avail_features() & bit(VIRTIO_IOMMU_F_PAGE_REQUEST),
        0
    );
}

#[test]
fn nested_requests_without_the_feature_are_unknown_types() {
    // Without F_ATTACH_TABLE negotiated, types 6 and 7 are unrecognized:
    // spec 5.13.6.2 "the device SHOULD NOT write the buffer and SHOULD set
    // the used length to zero". Same for PAGE_RESP without F_PAGE_REQUEST.
    let mut r = rig_with(&cfg(), |f| f & !(bit(56) | bit(57)));
    let reqs = [
        attach_table(1, EP, &vtd(DIR)),
        inv(1, page_inv(None, 0)),
        Request::PageResp(PageRespReq::default()),
    ];
    for req in reqs {
        let (len, tail) = r.h.send_raw(&[&req.encode()], &[4]);
        assert_eq!(len, 0, "{req:?}");
        assert_eq!(tail, vec![0xa5; 4], "buffer untouched");
    }
    assert!(r.a.calls().is_empty());
}

#[test]
fn probe_reports_nested_properties_of_the_endpoint() {
    let mut r = rig();
    let (status, props) = r.h.probe(EP, 512);
    assert_eq!(status, Status::Ok);
    let mut found = Vec::new();
    let mut at = 0;
    while at + 4 <= props.len() {
        if props[at] == 0 && props[at + 1] == 0 {
            break;
        }
        match ExtProperty::decode(&props[at..]) {
            Some((p, n)) => {
                found.push(p);
                at += n;
            }
            None => {
                let len = u16::from_le_bytes([props[at + 2], props[at + 3]]) as usize;
                at += 4 + len;
            }
        }
    }
    assert!(found.contains(&ExtProperty::PasidSize(16)));
    assert!(found.contains(&ExtProperty::OutputSize(48)));
    assert!(found
        .iter()
        .any(|p| matches!(p, ExtProperty::PageSizeMask(m) if m & 0x1000 != 0)));
    assert!(found.contains(&ExtProperty::PasidTableFmt {
        format: VIRTIO_IOMMU_PSTF_INTEL_VTD,
        page_table_format: VIRTIO_IOMMU_PGTF_X86_64,
        page_size_mask: (1 << 12) | (1 << 21) | (1 << 30),
    }));
    assert!(found
        .iter()
        .any(|p| matches!(p, ExtProperty::PageTableFmt { format, .. } if *format == VIRTIO_IOMMU_PGTF_ARM_LPAE)));
    // An endpoint without a backend advertises no table format.
    let (_, props) = r.h.probe(EP_PLAIN, 512);
    let mut at = 0;
    while at + 4 <= props.len() && !(props[at] == 0 && props[at + 1] == 0) {
        if let Some((p, _)) = ExtProperty::decode(&props[at..]) {
            assert!(!matches!(
                p,
                ExtProperty::PageTableFmt { .. } | ExtProperty::PasidTableFmt { .. }
            ));
        }
        at += 4 + u16::from_le_bytes([props[at + 2], props[at + 3]]) as usize;
    }
}

#[test]
fn attach_table_attaches_the_endpoint_and_binds_the_table() {
    let mut r = rig();
    assert_eq!(r.h.send(&attach_table(1, EP, &vtd(DIR))), Status::Ok);
    let st = r.h.dev.viommu().state();
    assert_eq!(st.endpoint(EP).unwrap().domain, Some(1));
    assert_eq!(st.domain_table(1), Some(&vtd(DIR)));
    drop(st);
    assert_eq!(
        r.a.calls(),
        vec![BackendCall::BindTable(
            EP,
            TableBinding {
                domain: 1,
                table: vtd(DIR)
            }
        )]
    );
}

#[test]
fn map_and_unmap_on_a_table_domain_are_inval() {
    let mut r = rig();
    r.h.send(&attach_table(1, EP, &vtd(DIR)));
    assert_eq!(r.h.send(&map(1, 0, 0xfff, 0x10_0000)), Status::Inval);
    let unmap = Request::Unmap(UnmapReq {
        domain: 1,
        virt_start: 0,
        virt_end: 0xfff,
        reserved: [0; 4],
    });
    assert_eq!(r.h.send(&unmap), Status::Inval);
    // A plain ATTACH cannot join a table domain either.
    assert_eq!(r.h.send(&attach(1, EP2)), Status::Inval);
}

#[test]
fn a_second_endpoint_joins_only_with_a_compatible_table() {
    let mut r = rig();
    r.h.send(&attach_table(1, EP, &vtd(DIR)));
    assert_eq!(
        r.h.send(&attach_table(1, EP2, &vtd(DIR + 0x1000))),
        Status::Inval
    );
    let x86 = TableDesc::X86_64 {
        levels: 4,
        root: ROOT,
    };
    assert_eq!(r.h.send(&attach_table(1, EP2, &x86)), Status::Inval);
    assert_eq!(r.h.send(&attach_table(1, EP2, &vtd(DIR))), Status::Ok);
    assert_eq!(r.h.dev.viommu().state().domain_endpoints(1), &[EP, EP2]);
    // A MAP domain cannot become a table domain.
    r.h.send(&attach(2, EPB));
    assert_eq!(r.h.send(&attach_table(2, EP, &vtd(DIR))), Status::Inval);
}

#[test]
fn a_format_the_probe_did_not_advertise_is_unsupp() {
    let mut c = cfg();
    c.nested.as_mut().unwrap().formats = vec![TableFormat::ArmSmmuV3];
    let mut r = rig_with(&c, |f| f);
    assert_eq!(r.h.send(&attach_table(1, EP, &vtd(DIR))), Status::Unsupp);
    // An endpoint without a backend advertises nothing.
    let mut r = rig();
    assert_eq!(
        r.h.send(&attach_table(1, EP_PLAIN, &vtd(DIR))),
        Status::Unsupp
    );
    // An unknown format number.
    let mut req = AttachTableReq::new(1, EP, &vtd(DIR));
    req.format_bytes[0] = 0x42;
    assert_eq!(r.h.send(&Request::AttachTable(req)), Status::Unsupp);
}

#[test]
fn table_pointers_outside_guest_ram_or_misaligned_are_range() {
    let mut r = rig();
    let outside = RAM_MIB << 20;
    assert_eq!(r.h.send(&attach_table(1, EP, &vtd(outside))), Status::Range);
    assert_eq!(r.h.send(&attach_table(1, EP, &vtd(DIR + 8))), Status::Range);
    let x86 = |root| TableDesc::X86_64 { levels: 4, root };
    assert_eq!(
        r.h.send(&attach_table(1, EP, &x86(ROOT + 0x800))),
        Status::Range
    );
    assert_eq!(r.h.send(&attach_table(1, EP, &x86(!0xfff))), Status::Range);
    let cd = TableDesc::ArmSmmuV3 {
        s1fmt: 0,
        s1dss: 0,
        s1contextptr: DIR + 0x20,
        s1cdmax: 4,
    };
    assert_eq!(r.h.send(&attach_table(1, EP, &cd)), Status::Range);
    assert!(r.a.calls().is_empty());
    assert_eq!(r.h.dev.viommu().state().domain_count(), 0);
}

#[test]
fn issue10_lpae_ttbr0_is_checked_as_the_walker_uses_it_and_unusable_is_range() {
    // Arm ARM D8.2.3: the TTBR0 base is aligned to the start table's size
    // (at least 64 bytes), not to 4 KiB; a base beyond the output size
    // (IPS) or a start table outside guest RAM cannot be walked: RANGE.
    let mut r = rig();
    // TCR_EL1: TG0 4 KiB, EPD1 (bit 23), IPS (bits 34:32).
    let lpae = |t0sz: u64, ips: u64, ttbr0: u64| TableDesc::ArmLpae {
        asid: 1,
        tcr: t0sz | (1 << 23) | (ips << 32),
        ttbr0,
        ttbr1: 0,
        mair: 0,
    };
    // A 4-entry top table (T0SZ 32) 0x40 into a page.
    assert_eq!(
        r.h.send(&attach_table(1, EP, &lpae(32, 5, ROOT + 0x40))),
        Status::Ok
    );
    // Beyond a 40-bit IPS.
    assert_eq!(
        r.h.send(&attach_table(2, EP2, &lpae(32, 2, 1 << 41))),
        Status::Range
    );
    // A 512-entry top table (T0SZ 16) past the end of RAM.
    let end = RAM_MIB << 20;
    assert_eq!(
        r.h.send(&attach_table(2, EP2, &lpae(16, 5, end))),
        Status::Range
    );
    // 0x800 below the end: bits below the 4 KiB table's alignment are not
    // address bits, so the table is the last page of RAM.
    assert_eq!(
        r.h.send(&attach_table(2, EP2, &lpae(16, 5, end - 0x800))),
        Status::Ok
    );
}

#[test]
fn issue10_reserved_s1fmt_and_s1dss_0b11_are_accepted_and_behave_as_0b00() {
    // SMMUv3 §5.2: S1Fmt and S1DSS "0b11 Reserved (behaves as 0b00)":
    // ATTACH_TABLE takes them; the first table is checked as a linear CD
    // table (16 CDs of 64 bytes must be RAM, no two-level minimum).
    let mut r = rig();
    let cd = |s1fmt, s1dss, ptr| TableDesc::ArmSmmuV3 {
        s1fmt,
        s1dss,
        s1contextptr: ptr,
        s1cdmax: 4,
    };
    assert_eq!(r.h.send(&attach_table(1, EP, &cd(3, 3, DIR))), Status::Ok);
    let end = RAM_MIB << 20;
    assert_eq!(
        r.h.send(&attach_table(2, EP2, &cd(3, 0, end - 0x200))),
        Status::Range
    );
    assert_eq!(
        r.h.send(&attach_table(2, EP2, &cd(3, 0, end - 0x400))),
        Status::Ok
    );
}

#[test]
fn reserved_fields_and_bad_parameters_are_inval() {
    let mut r = rig();
    let mut req = AttachTableReq::new(1, EP, &vtd(DIR));
    req.format_bytes[40] = 1;
    assert_eq!(r.h.send(&Request::AttachTable(req)), Status::Inval);
    let bad = [
        TableDesc::X86_64 {
            levels: 3,
            root: ROOT,
        },
        TableDesc::IntelVtd {
            pasid_bits: 17,
            pasid_dir_ptr: DIR,
        },
        TableDesc::IntelVtd {
            pasid_bits: 0,
            pasid_dir_ptr: DIR,
        },
        TableDesc::ArmSmmuV3 {
            s1fmt: 4,
            s1dss: 0,
            s1contextptr: DIR,
            s1cdmax: 4,
        },
        TableDesc::ArmSmmuV3 {
            s1fmt: 0,
            s1dss: 4,
            s1contextptr: DIR,
            s1cdmax: 4,
        },
        TableDesc::ArmLpae {
            asid: 1,
            tcr: 0,
            ttbr0: ROOT,
            ttbr1: ROOT,
            mair: 0,
        },
    ];
    for t in bad {
        assert_eq!(r.h.send(&attach_table(1, EP, &t)), Status::Inval, "{t:?}");
    }
    assert_eq!(r.h.send(&attach_table(0, EP, &vtd(DIR))), Status::Range);
    assert_eq!(r.h.send(&attach_table(1, 99, &vtd(DIR))), Status::NoEnt);
}

#[test]
fn detach_of_the_last_endpoint_ends_the_binding() {
    let mut r = rig();
    r.h.send(&attach_table(1, EP, &vtd(DIR)));
    r.h.send(&attach_table(1, EP2, &vtd(DIR)));
    let detach = |ep| {
        Request::Detach(DetachReq {
            domain: 1,
            endpoint: ep,
        })
    };
    assert_eq!(r.h.send(&detach(EP)), Status::Ok);
    assert_eq!(r.h.dev.viommu().state().domain_table(1), Some(&vtd(DIR)));
    assert_eq!(r.h.send(&detach(EP2)), Status::Ok);
    assert_eq!(r.h.dev.viommu().state().domain_table(1), None);
    assert_eq!(r.h.dev.viommu().state().domain_count(), 0);
    let calls = r.a.calls();
    assert_eq!(calls[2], BackendCall::UnbindTable(EP, 1));
    assert_eq!(calls[3], BackendCall::UnbindTable(EP2, 1));
    // The domain ID is free for a new table.
    assert_eq!(
        r.h.send(&attach_table(1, EP, &vtd(DIR + 0x1000))),
        Status::Ok
    );
}

#[test]
fn invalidate_rules_noent_inval_range() {
    let mut r = rig();
    assert_eq!(r.h.send(&inv(1, page_inv(None, 0))), Status::NoEnt);
    r.h.send(&attach(2, EPB));
    assert_eq!(r.h.send(&inv(2, page_inv(None, 0))), Status::Inval);
    r.h.send(&attach_table(1, EP, &vtd(DIR)));
    // VA granularity on the PASID cache.
    let mut bad = page_inv(Some(1), 0).to_request(1);
    bad.cache_types = VIRTIO_IOMMU_INV_T_PASID;
    assert_eq!(r.h.send(&Request::Invalidate(bad)), Status::Inval);
    // A PASID beyond the table's width.
    let mut bad = page_inv(Some(1), 0).to_request(1);
    bad.pasid = 1 << 16;
    assert_eq!(r.h.send(&Request::Invalidate(bad)), Status::Range);
    // Reserved bytes.
    let mut bad = page_inv(Some(1), 0).to_request(1);
    bad.reserved_set = true;
    assert_eq!(r.h.send(&Request::Invalidate(bad)), Status::Inval);
    assert!(invalidates(&r.a.calls()).is_empty());
    assert_eq!(r.h.send(&inv(1, page_inv(Some(1), 0))), Status::Ok);
    assert_eq!(invalidates(&r.a.calls()).len(), 1);
}

#[test]
fn a_batch_of_512_contiguous_page_invalidations_reaches_the_backend_as_one_call() {
    let mut r = rig();
    r.h.send(&attach_table(1, EP, &vtd(DIR)));
    let reqs: Vec<Request> = (0..512).map(|p| inv(1, page_inv(Some(3), p))).collect();
    let st = r.h.send_batch(&reqs);
    assert!(st.iter().all(|s| *s == Status::Ok));
    let inv_calls = invalidates(&r.a.calls());
    assert_eq!(inv_calls.len(), 1);
    let (dom, batch) = &inv_calls[0];
    assert_eq!(*dom, 1);
    assert_eq!(
        batch,
        &vec![Invalidation {
            caches: Caches::IOTLB,
            scope: Scope::Range(VaRange {
                pasid: Some(3),
                addr: 0,
                granule_log2: 12,
                pages: 512,
                leaf_only: true
            }),
            archid: None
        }]
    );
    let counts = r.h.dev.viommu().router().stats.snapshot();
    assert_eq!(counts.invalidations, 512);
    assert_eq!(counts.invalidate_calls, 1);
}

#[test]
fn invalidations_of_one_notification_go_once_to_each_backend_of_each_domain() {
    let mut r = rig();
    r.h.send(&attach_table(1, EP, &vtd(DIR)));
    r.h.send(&attach_table(1, EPB, &vtd(DIR)));
    r.h.send(&attach_table(2, EP2, &vtd(DIR + 0x1000)));
    let reqs = vec![
        inv(1, page_inv(Some(1), 0)),
        inv(2, page_inv(Some(1), 7)),
        inv(1, page_inv(Some(1), 1)),
    ];
    assert!(r.h.send_batch(&reqs).iter().all(|s| *s == Status::Ok));
    let a = invalidates(&r.a.calls());
    let b = invalidates(&r.b.calls());
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(b.len(), 1);
    assert_eq!(a.iter().filter(|(d, _)| *d == 1).count(), 1);
    assert_eq!(b[0].1.len(), 1, "pages 0 and 1 merged");
}

#[test]
fn an_invalidate_completes_only_after_every_backend_applied_it() {
    // Backend B fails: the INVALIDATEs of that domain get DEVERR, and the
    // other backend still received the batch.
    let mut r = rig();
    r.h.send(&attach_table(1, EP, &vtd(DIR)));
    r.h.send(&attach_table(1, EPB, &vtd(DIR)));
    r.b.fail_next(0);
    let st =
        r.h.send_batch(&[inv(1, page_inv(None, 0)), inv(1, page_inv(None, 1))]);
    assert_eq!(st, vec![Status::DevErr, Status::DevErr]);
    assert_eq!(invalidates(&r.a.calls()).len(), 1);
    // A request after the INVALIDATEs sees them applied first.
    let reqs = vec![inv(1, page_inv(None, 4)), attach(5, EP2)];
    assert!(r.h.send_batch(&reqs).iter().all(|s| *s == Status::Ok));
    let calls = r.a.calls();
    let pos_inv = calls
        .iter()
        .rposition(|c| matches!(c, BackendCall::Invalidate(..)))
        .unwrap();
    let pos_att = calls
        .iter()
        .rposition(|c| matches!(c, BackendCall::Attach(..)))
        .unwrap();
    assert!(pos_inv < pos_att);
}

#[test]
fn page_resp_rules() {
    let mut r = rig();
    let ok = PageRespReq {
        endpoint: EP,
        flags: VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID,
        pasid: 2,
        grpid: 7,
        code: VIRTIO_IOMMU_PAGE_RESP_SUCCESS,
        reserved_set: false,
    };
    assert_eq!(r.h.send(&Request::PageResp(ok)), Status::Ok);
    assert!(r.a.calls().contains(&BackendCall::PageResponse(
        vmm_iommu::backend::PageResponse {
            endpoint: EP,
            pasid: Some(2),
            grpid: 7,
            code: 0
        }
    )));
    let bads = [
        (
            PageRespReq {
                reserved_set: true,
                ..ok
            },
            Status::Inval,
        ),
        (PageRespReq { code: 3, ..ok }, Status::Inval),
        (PageRespReq { flags: 2, ..ok }, Status::Inval),
        (PageRespReq { flags: 0, ..ok }, Status::Inval),
        (PageRespReq { endpoint: 99, ..ok }, Status::NoEnt),
        (
            PageRespReq {
                endpoint: EP_PLAIN,
                ..ok
            },
            Status::NoEnt,
        ),
    ];
    for (req, want) in bads {
        assert_eq!(r.h.send(&Request::PageResp(req)), want, "{req:?}");
    }
}

#[test]
fn a_failed_map_is_undone_on_every_backend_and_in_the_state() {
    let mut r = rig();
    r.h.send(&attach(1, EP));
    r.h.send(&attach(1, EPB));
    r.b.fail_next(0);
    assert_eq!(r.h.send(&map(1, 0x1000, 0x2fff, 0x10_0000)), Status::DevErr);
    assert_eq!(r.h.dev.viommu().state().mapping_count(1), 0);
    let m = Mapping {
        start: 0x1000,
        end: 0x2fff,
        phys: 0x10_0000,
        flags: 3,
    };
    let calls = r.a.calls();
    assert_eq!(
        &calls[calls.len() - 2..],
        &[BackendCall::Map(1, m), BackendCall::Unmap(1, vec![m])]
    );
    // The same MAP succeeds once the backend does.
    assert_eq!(r.h.send(&map(1, 0x1000, 0x2fff, 0x10_0000)), Status::Ok);
    assert_eq!(r.h.dev.viommu().state().mapping_count(1), 1);
}

#[test]
fn a_failed_unmap_puts_the_mappings_back() {
    let mut r = rig();
    r.h.send(&attach(1, EP));
    r.h.send(&attach(1, EPB));
    r.h.send(&map(1, 0x1000, 0x1fff, 0x10_0000));
    r.b.fail_next(0);
    let unmap = Request::Unmap(UnmapReq {
        domain: 1,
        virt_start: 0,
        virt_end: 0xffff,
        reserved: [0; 4],
    });
    assert_eq!(r.h.send(&unmap), Status::DevErr);
    assert_eq!(r.h.dev.viommu().state().mapping_count(1), 1);
    assert!(matches!(r.a.calls().last(), Some(BackendCall::Map(1, _))));
}

#[test]
fn a_failed_attach_leaves_the_endpoint_where_it_was() {
    let mut r = rig();
    r.h.send(&attach(1, EP));
    r.h.send(&map(1, 0x1000, 0x1fff, 0x10_0000));
    // detach from 1 is call n, attach to 2 is call n+1: fail the attach.
    r.a.fail_next(1);
    assert_eq!(r.h.send(&attach_table(2, EP, &vtd(DIR))), Status::DevErr);
    let st = r.h.dev.viommu().state();
    assert_eq!(st.endpoint(EP).unwrap().domain, Some(1));
    assert_eq!(st.mapping_count(1), 1, "domain 1 survived with its mapping");
    assert_eq!(st.domain_table(2), None);
    drop(st);
    let calls = r.a.calls();
    assert_eq!(
        calls.last(),
        Some(&BackendCall::Attach(EP, 1, 1)),
        "{calls:?}"
    );
    assert_eq!(r.h.dev.viommu().router().stats.snapshot().rollbacks, 1);
}

#[test]
fn backend_faults_reach_the_eventq_as_extended_records() {
    let mut r = rig();
    r.h.add_event_buffers(4, EXT_FAULT_SIZE as u32);
    r.a.faults.lock().unwrap().push(BackendFault {
        endpoint: EP,
        pasid: Some(5),
        address: 0xabc000,
        reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
        access_flags: VIRTIO_IOMMU_FAULT_F_WRITE,
        page_request: Some(3),
        last_page: true,
    });
    let recs = r.h.collect_ext_faults();
    assert_eq!(
        recs,
        vec![ExtFaultRecord {
            reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
            flt_type: VIRTIO_IOMMU_FLT_PAGE_REQ,
            flags: VIRTIO_IOMMU_FAULT_F_WRITE
                | VIRTIO_IOMMU_FAULT_F_ADDRESS
                | VIRTIO_IOMMU_FAULT_F_PASID,
            pr_evt_flags: VIRTIO_IOMMU_PR_F_LAST_PAGE,
            endpoint: EP,
            pasid: 5,
            grpid: 3,
            address: 0xabc000
        }]
    );
    let _: &dyn IommuBackend = r.a.as_ref();
}

#[test]
fn config_space_offers_only_what_every_backend_can_map() {
    // A host IOMMU with only 2 MiB pages and a 40-bit input range from 2 MiB
    // (as a VFIO container can report): the guest is told exactly that.
    let narrow = Arc::new(RecordingBackend::new(
        "host",
        vmm_iommu::backend::BackendCaps::map_only(1 << 21, (0x20_0000, (1 << 40) - 1)),
    ));
    let n2 = narrow.clone();
    let mut h = Harness::with_router(
        &IommuConfig::default(),
        &[EP, EP2],
        RAM_MIB,
        &[],
        move |_, _| {
            let mut r = Router::new();
            r.add(n2, &[EP]);
            r
        },
        driver_features,
    );
    let c = h.dev.config();
    assert_eq!(c.page_size_mask, 1 << 21);
    assert_eq!((c.input_start, c.input_end), (0x20_0000, (1 << 40) - 1));
    // And the state checks MAPs against the same limits.
    h.send(&attach(1, EP));
    assert_eq!(
        h.send(&map(1, 0x20_0000, 0x20_ffff, 0x20_0000)),
        Status::Range
    );
    assert_eq!(h.send(&map(1, 0, 0x1f_ffff, 0x20_0000)), Status::Range);
    assert_eq!(h.send(&map(1, 0x20_0000, 0x3f_ffff, 0x20_0000)), Status::Ok);
    assert_eq!(
        h.send(&map(1, 1 << 40, (1 << 40) + 0x1f_ffff, 0x20_0000)),
        Status::Range
    );
}

#[test]
fn only_the_last_page_request_of_a_group_carries_last_page() {
    let mut r = rig();
    r.h.add_event_buffers(4, EXT_FAULT_SIZE as u32);
    for (address, last_page) in [(0x1000, false), (0x2000, true)] {
        r.a.faults.lock().unwrap().push(BackendFault {
            endpoint: EP,
            pasid: None,
            address,
            reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
            access_flags: VIRTIO_IOMMU_FAULT_F_READ,
            page_request: Some(9),
            last_page,
        });
    }
    let recs = r.h.collect_ext_faults();
    let flags: Vec<(u64, u32, u32)> = recs
        .iter()
        .map(|f| (f.address, f.grpid, f.pr_evt_flags))
        .collect();
    assert_eq!(
        flags,
        vec![(0x1000, 9, 0), (0x2000, 9, VIRTIO_IOMMU_PR_F_LAST_PAGE)]
    );
    assert!(recs
        .iter()
        .all(|f| f.flags & VIRTIO_IOMMU_FAULT_F_PASID == 0));
}
