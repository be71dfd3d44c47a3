//! SMMUv3 nested flows (table passthrough) over the recording host:
//! vIOMMU and vDEVICE setup, bind with STE words, CMDQ invalidation bursts
//! in one call, partial handling, vEVENTQ faults.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vfio_passthrough::host::{Handle, Op};
use vfio_passthrough::recording::{FakeIommu, RecordingHost};
use vfio_passthrough::IommufdBackend;
use vmm_iommu::backend::{BackendError, IommuBackend, TableBinding};
use vmm_iommu::invalidation::{
    coalesce, Caches, Invalidation, Scope, VaRange, WIDEN_THRESHOLD_PAGES,
};
use vmm_iommu::wire::{Status, TableDesc, VIRTIO_IOMMU_FAULT_R_MAPPING};

const DEV: &str = "/sys/bus/pci/devices/0000:00:04.0";
const EP: u32 = 0x20;
const CD_TABLE: u64 = 0x30_0000;

fn fixture(ril: bool) -> (Arc<RecordingHost>, IommufdBackend) {
    fixture_with_cd_tg0(ril, 0)
}

/// A fixture whose CD table holds a valid CD for SubstreamID 1 with
/// granule `tg0` (CD dword 0 bits 7:6: 0 = 4 KiB, 1 = 64 KiB, 2 = 16 KiB).
fn fixture_with_cd_tg0(ril: bool, tg0: u64) -> (Arc<RecordingHost>, IommufdBackend) {
    use vm_memory::{Bytes, GuestAddress};
    let (rec, host, mem, ram) = setup(RecordingHost::new(FakeIommu::smmuv3(ril)));
    // SMMUv3 §5.4, hand-encoded: T0SZ 25 (bits 5:0), TG0 (7:6), EPD1 (30),
    // V (31), IPS 48-bit (34:32), AA64 (41), ASID 0x42 (63:48); TTB0.
    let w0 = 25 | tg0 << 6 | 1 << 30 | 1 << 31 | 5 << 32 | 1 << 41 | 0x42 << 48;
    mem.write_obj(w0, GuestAddress(CD_TABLE + 64)).unwrap();
    mem.write_obj(0x40_0000u64, GuestAddress(CD_TABLE + 64 + 8))
        .unwrap();
    let b = IommufdBackend::new(host, ram).expect("backend");
    b.add_endpoint(EP, Path::new(DEV)).expect("add");
    (rec, b)
}

fn cd(s1cdmax: u32) -> TableDesc {
    TableDesc::ArmSmmuV3 {
        s1fmt: 0,
        s1dss: 1,
        s1contextptr: CD_TABLE,
        s1cdmax,
    }
}

fn bind(b: &IommufdBackend) -> Result<(), BackendError> {
    b.bind_table(
        EP,
        &TableBinding {
            domain: 7,
            table: cd(4),
        },
    )
}

fn viommu_id(rec: &RecordingHost) -> u32 {
    le32(&rec.calls_of(Op::ViommuAlloc)[0].out, 20)
}

fn page(addr: u64) -> Invalidation {
    Invalidation {
        caches: Caches::IOTLB,
        scope: Scope::Range(VaRange {
            pasid: Some(1),
            addr,
            granule_log2: 12,
            pages: 1,
            leaf_only: true,
        }),
        archid: Some(0x42),
    }
}

fn burst() -> Vec<Invalidation> {
    let mut b: Vec<Invalidation> = (0..512u64)
        .rev()
        .map(|i| page(0x4000_0000 + i * 4096))
        .collect();
    coalesce(&mut b, WIDEN_THRESHOLD_PAGES);
    b
}

#[test]
fn add_allocates_viommu_vdevice_with_the_endpoint_as_vsid() {
    let (rec, b) = fixture(false);
    let parent = &rec.calls_of(Op::HwptAlloc)[0];
    assert_eq!(le32(&parent.arg, 4), 1); // NEST_PARENT only
    let parent_id = le32(&parent.out, 16);
    let v = &rec.calls_of(Op::ViommuAlloc)[0];
    // size 40, flags 0, type ARM_SMMUV3 (1), dev_id 1, hwpt_id parent.
    assert_eq!(
        (
            le32(&v.arg, 0),
            le32(&v.arg, 8),
            le32(&v.arg, 12),
            le32(&v.arg, 16)
        ),
        (40, 1, 1, parent_id)
    );
    let d = &rec.calls_of(Op::VdeviceAlloc)[0];
    assert_eq!(le32(&d.arg, 4), viommu_id(&rec));
    assert_eq!(le64(&d.arg, 16), u64::from(EP));
    let q = &rec.calls_of(Op::VeventqAlloc)[0];
    assert_eq!((le32(&q.arg, 12), le32(&q.arg, 16)), (1, 64));
    let c = b.caps(EP);
    assert_eq!(c.pasid_bits, 20);
    assert!(!c.page_requests);
}

#[test]
fn bind_allocates_a_nested_hwpt_from_the_ste_words() {
    let (rec, b) = fixture(false);
    bind(&b).unwrap();
    let h = rec.calls_of(Op::HwptAlloc).pop().unwrap();
    assert_eq!(le32(&h.arg, 4), 0);
    assert_eq!(le32(&h.arg, 12), viommu_id(&rec));
    assert_eq!(le32(&h.arg, 24), 2); // IOMMU_HWPT_DATA_ARM_SMMUV3
    assert_eq!(le32(&h.arg, 28), 16);
    // STE word 0: V | Cfg=S1 (5) | S1Fmt 0 | S1ContextPtr | S1CDMax 4;
    // word 1: S1DSS bypass | S1CIR/S1COR WBRA | S1CSH ISH.
    assert_eq!(le64(&h.payload, 0), 1 | 5 << 1 | CD_TABLE | 4 << 59);
    assert_eq!(le64(&h.payload, 8), 1 | 1 << 2 | 1 << 4 | 3 << 6);
    let dev = b.device_of(EP).unwrap();
    assert_eq!(rec.attached(dev, 0), Some(le32(&h.out, 16)));
}

#[test]
fn burst_is_one_invalidate_on_the_viommu() {
    let (rec, b) = fixture(false);
    bind(&b).unwrap();
    b.invalidate(7, &burst()).unwrap();
    let calls = rec.calls_of(Op::HwptInvalidate);
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    // hwpt_id = vIOMMU; data_type ARM_SMMUV3 (1); entry_len 16; 512 commands
    // (no RIL: one TLBI_NH_VA per page).
    assert_eq!(le32(&c.arg, 4), viommu_id(&rec));
    assert_eq!(le32(&c.arg, 16), 1);
    assert_eq!(le32(&c.arg, 20), 16);
    assert_eq!(le32(&c.arg, 24), 512);
    assert_eq!(c.payload.len(), 512 * 16);
    assert_eq!(le64(&c.payload, 0), 0x12 | 0x42 << 48);
    assert_eq!(le64(&c.payload, 8), 0x4000_0000 | 1);
    assert_eq!(
        le64(&c.payload, 16 * 511 + 8),
        (0x4000_0000 + 511 * 4096) | 1
    );
}

#[test]
fn with_range_invalidation_the_burst_is_one_command() {
    let (rec, b) = fixture(true);
    bind(&b).unwrap();
    b.invalidate(7, &burst()).unwrap();
    let c = &rec.calls_of(Op::HwptInvalidate)[0];
    assert_eq!(le32(&c.arg, 24), 1);
    // NUM 0, SCALE 9 (512 pages); TG 4K (1) from the CD, TTL 0, LEAF.
    assert_eq!(le64(&c.payload, 0), 0x12 | 0x42 << 48 | 9 << 20);
    assert_eq!(le64(&c.payload, 8), 0x4000_0000 | 1 | 1 << 10);
}

#[test]
fn issue10_tlbi_tg_comes_from_the_bound_cds_granule_and_ttl_is_zero() {
    // The SMMU need only invalidate entries whose granule matches TG (and,
    // with TTL != 0, whose level matches TTL): TG is the CD's TG0, whatever
    // granule the guest counted its range in, and TTL stays 0.
    let (rec, b) = fixture_with_cd_tg0(true, 1); // 64 KiB tables
    bind(&b).unwrap();
    // 16 pages of 4 KiB at 0x4000_0000: one 64 KiB page of the table.
    let mut inv = page(0x4000_0000);
    if let Scope::Range(v) = &mut inv.scope {
        v.pages = 16;
    }
    b.invalidate(7, &[inv]).unwrap();
    let c = &rec.calls_of(Op::HwptInvalidate)[0];
    let cmds = le32(&c.arg, 24) as usize;
    for i in 0..cmds {
        let w1 = le64(&c.payload, 16 * i + 8);
        assert_eq!(w1 >> 10 & 3, 3, "TG 64 KiB, command {i}");
        assert_eq!(w1 >> 8 & 3, 0, "TTL 0, command {i}");
    }
    // The 64 KiB page (NUM 0 SCALE 1: bumped past the reserved 1-page
    // TTL-0 encoding) at 0x4000_0000.
    assert_eq!(le64(&c.payload, 0), 0x12 | 0x42 << 48 | 1 << 20);
    assert_eq!(le64(&c.payload, 8), 0x4000_0000 | 1 | 3 << 10);
    // A CD the backend cannot read (SubstreamID 2 is invalid): TG 0.
    let mut inv = page(0x4000_0000);
    if let Scope::Range(v) = &mut inv.scope {
        v.pasid = Some(2);
    }
    b.invalidate(7, &[inv]).unwrap();
    let c = &rec.calls_of(Op::HwptInvalidate)[1];
    assert_eq!(le64(&c.payload, 8) >> 8 & 0xf, 0);
}

#[test]
fn short_invalidate_resends_the_rest_once() {
    let (rec, b) = fixture(false);
    bind(&b).unwrap();
    rec.partial_nth(0, 100, libc::EIO);
    b.invalidate(7, &burst()).unwrap();
    let calls = rec.calls_of(Op::HwptInvalidate);
    assert_eq!(calls.len(), 2);
    assert_eq!(le32(&calls[1].arg, 24), 412);
    assert_eq!(calls[1].payload[..], calls[0].payload[100 * 16..]);
    rec.partial_nth(2, 10, libc::EIO);
    rec.partial_nth(3, 10, libc::EIO);
    let e = b.invalidate(7, &burst()).unwrap_err();
    assert!(
        matches!(
            e,
            BackendError::Partial {
                op: "IOMMU_HWPT_INVALIDATE",
                index: 20,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn ids_beyond_the_host_are_refused_before_any_ioctl() {
    let (rec, b) = fixture(false);
    bind(&b).unwrap();
    let n = rec.len();
    let mut bad_asid = page(0);
    bad_asid.archid = Some(1 << 16);
    assert_eq!(
        b.invalidate(7, &[page(0), bad_asid]).unwrap_err().status(),
        Status::Range
    );
    // SSIDs beyond S1CDMax (4 bits here).
    let bad_ssid = Invalidation {
        caches: Caches::PASID,
        scope: Scope::Pasid(16),
        archid: None,
    };
    assert_eq!(
        b.invalidate(7, &[bad_ssid]).unwrap_err().status(),
        Status::Range
    );
    assert_eq!(rec.len(), n);
}

#[test]
fn bad_ste_fields_are_refused_before_any_ioctl() {
    let (rec, b) = fixture(false);
    let n = rec.len();
    for (t, s) in [
        (
            // Beyond the 2-bit field (0b11 is accepted as 0b00).
            TableDesc::ArmSmmuV3 {
                s1fmt: 4,
                s1dss: 0,
                s1contextptr: CD_TABLE,
                s1cdmax: 0,
            },
            Status::Inval,
        ),
        (
            TableDesc::ArmSmmuV3 {
                s1fmt: 0,
                s1dss: 0,
                s1contextptr: CD_TABLE + 4,
                s1cdmax: 0,
            },
            Status::Inval,
        ),
        (
            TableDesc::ArmSmmuV3 {
                s1fmt: 0,
                s1dss: 0,
                s1contextptr: 0x7000_0000,
                s1cdmax: 0,
            },
            Status::Range,
        ),
        (
            TableDesc::ArmSmmuV3 {
                s1fmt: 0,
                s1dss: 0,
                s1contextptr: CD_TABLE,
                s1cdmax: 21,
            },
            Status::Range,
        ),
        (
            TableDesc::IntelVtd {
                pasid_bits: 4,
                pasid_dir_ptr: CD_TABLE,
            },
            Status::Unsupp,
        ),
    ] {
        let e = b
            .bind_table(
                EP,
                &TableBinding {
                    domain: 7,
                    table: t,
                },
            )
            .unwrap_err();
        assert_eq!(e.status(), s, "{t:?}");
    }
    assert_eq!(rec.len(), n);
}

#[test]
fn rebind_replaces_the_hwpt_and_a_failed_attach_keeps_the_old_one() {
    let (rec, b) = fixture(false);
    bind(&b).unwrap();
    let dev = b.device_of(EP).unwrap();
    let first = rec.attached(dev, 0).unwrap();
    let live = rec.live_objects();
    // The next attach (after the reserved-region probe and the bind).
    rec.fail_nth(Op::AttachPt, rec.count(Op::AttachPt), libc::EINVAL);
    assert!(b
        .bind_table(
            EP,
            &TableBinding {
                domain: 7,
                table: cd(2)
            }
        )
        .is_err());
    assert_eq!(rec.attached(dev, 0), Some(first));
    assert_eq!(rec.live_objects(), live);
    b.bind_table(
        EP,
        &TableBinding {
            domain: 7,
            table: cd(2),
        },
    )
    .unwrap();
    assert_ne!(rec.attached(dev, 0), Some(first));
    assert!(!rec.is_live(first));
    assert_eq!(rec.live_objects(), live);
}

#[test]
fn veventq_records_become_faults() {
    let (rec, b) = fixture(false);
    bind(&b).unwrap();
    let q = Handle(le32(&rec.calls_of(Op::VeventqAlloc)[0].out, 24) as i32);
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    // F_TRANSLATION for vSID EP, SSID 3, write, at 0xdead000.
    for w in [
        0x10u64 | 1 << 11 | 3 << 12 | u64::from(EP) << 32,
        0,
        0xdead000,
        0,
    ] {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    rec.push_read(q, bytes);
    let mut out = Vec::new();
    b.drain_faults(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].endpoint, EP);
    assert_eq!(out[0].pasid, Some(3));
    assert_eq!(out[0].address, 0xdead000);
    assert_eq!(out[0].reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
    assert_eq!(out[0].page_request, None);
}
