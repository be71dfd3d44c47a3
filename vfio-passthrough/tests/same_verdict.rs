//! Issue 11, one decoder per guest table format: the same guest VT-d
//! PASID directory and PASID entry, fed to the software nested IOMMU
//! (`vmm_iommu::emulated`) and to the iommufd backend over the recording
//! host, get the same verdict — accepted, not present (DMA with the PASID
//! blocked), reserved bits (INVAL), not implemented (UNSUPP) or outside
//! guest RAM (RANGE) — both when the table is bound (ATTACH_TABLE) and when
//! an entry is re-read after a PASID-cache invalidation.
//!
//! The software IOMMU gives its verdict at DMA time (a fault record), the
//! iommufd backend when it shadows the table (a status): the test compares
//! the class of the software IOMMU's fault on a DMA with the PASID with the
//! class of the backend's status (`docs/wire.md`, "One verdict per guest
//! table"). Entries are hand-encoded from the VT-d spec (§9.5 directory
//! entry, §9.6 scalable-mode PASID entry, SDM 4.5 IA-32e entries), not
//! with the crate's builders.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use vfio_passthrough::recording::RecordingHost;
use vfio_passthrough::IommufdBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::backend::{BackendError, IommuBackend, TableBinding};
use vmm_iommu::emulated::{EmulatedIommu, NestedError};
use vmm_iommu::invalidation::{Caches, Invalidation, Scope};
use vmm_iommu::nested::{Access, FaultClass};
use vmm_iommu::wire::{Status, TableDesc};
use vmm_iommu::FaultQueue;

const DEV: &str = "/sys/bus/pci/devices/0000:65:00.0";
const EP: u32 = 16;
const DOMAIN: u32 = 1;
const PASID: u32 = 5;
/// The IOVA the software IOMMU translates; the hand-built tables map it.
const VA: u64 = 0x1000;
const DATA: u64 = 0x50_0000;
/// Outside every RAM region of `common::guest_memory`.
const OUTSIDE: u64 = 0x8000_0000;

/// The verdict on one PASID, as both backends can state it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// The PASID translates through the guest's first-stage table.
    Accepted,
    /// DMA with the PASID is blocked; nothing was refused.
    NotPresent,
    /// Refused: reserved bits (INVAL).
    Reserved,
    /// Refused: not implemented (UNSUPP).
    Unsupported,
    /// Refused: outside guest RAM (RANGE).
    OutOfRange,
}

fn from_status(e: &BackendError) -> Verdict {
    match e.status() {
        Status::Inval => Verdict::Reserved,
        Status::Unsupp => Verdict::Unsupported,
        Status::Range => Verdict::OutOfRange,
        s => panic!("unexpected status {s:?}: {e}"),
    }
}

fn from_class(c: FaultClass) -> Verdict {
    match c {
        // A fault of the page tables themselves says the PASID context was
        // accepted: the walk got past the PASID entry.
        FaultClass::Translation => Verdict::Accepted,
        FaultClass::NotPresent => Verdict::NotPresent,
        FaultClass::Reserved => Verdict::Reserved,
        FaultClass::Unsupported => Verdict::Unsupported,
        FaultClass::OutOfRange => Verdict::OutOfRange,
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    rec: Arc<RecordingHost>,
    vfio: IommufdBackend,
    emu: EmulatedIommu<GuestMemoryMmap>,
}

fn rig() -> Rig {
    let (rec, host, mem, ram) = setup(RecordingHost::default());
    let vfio = IommufdBackend::new(host, ram).expect("backend");
    vfio.add_endpoint(EP, Path::new(DEV)).expect("add");
    let faults = Arc::new(FaultQueue::new(1024).expect("fault queue"));
    let emu = EmulatedIommu::new(mem.clone(), faults, 20, &[]);
    // 4-level IA-32e tables at ROOT_A mapping VA → DATA (SDM 4.5: P 0,
    // R/W 1, U/S 2; address bits 51:12).
    let f = 0b111u64;
    let w = |at: u64, v: u64| mem.write_obj(v, GuestAddress(at)).expect("table");
    w(ROOT_A, (ROOT_A + 0x1000) | f);
    w(ROOT_A + 0x1000, (ROOT_A + 0x2000) | f);
    w(ROOT_A + 0x2000, (ROOT_A + 0x3000) | f);
    w(ROOT_A + 0x3000 + 8, DATA | f);
    Rig {
        mem,
        rec,
        vfio,
        emu,
    }
}

fn table() -> TableDesc {
    TableDesc::IntelVtd {
        pasid_bits: 6,
        pasid_dir_ptr: PASID_DIR,
    }
}

/// Writes directory entry 0 (PASIDs 0..63) and the entry of `PASID`.
fn write(r: &Rig, pde: u64, entry: &[u64; 8]) {
    r.mem
        .write_obj(pde, GuestAddress(PASID_DIR))
        .expect("directory entry");
    let mut b = [0u8; 64];
    for (i, w) in entry.iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    r.mem
        .write_slice(&b, GuestAddress(PASID_TABLE + u64::from(PASID) * 64))
        .expect("PASID entry");
}

/// The software IOMMU's verdict: a read DMA with the PASID.
fn software(r: &Rig) -> Verdict {
    match r.emu.translate(EP, Some(PASID), VA, Access::READ) {
        Ok(t) => {
            assert_eq!(t.gpa, DATA, "the hand-built tables map VA to DATA");
            Verdict::Accepted
        }
        Err(NestedError::Fault(f)) => from_class(f.class()),
        Err(e) => panic!("unexpected {e:?}"),
    }
}

/// The iommufd backend's verdict after a call that read the entry.
fn vfio(r: &Rig, result: Result<(), BackendError>) -> Verdict {
    match result {
        Err(e) => from_status(&e),
        Ok(()) => {
            let dev = r.vfio.device_of(EP).expect("device");
            if r.rec.attached(dev, PASID).is_some() {
                Verdict::Accepted
            } else {
                Verdict::NotPresent
            }
        }
    }
}

/// Binds the table in both; returns (software, iommufd) verdicts.
fn bind_both(r: &Rig) -> (Verdict, Verdict) {
    let b = TableBinding {
        domain: DOMAIN,
        table: table(),
    };
    r.emu
        .bind_table(EP, &b)
        .expect("the software IOMMU binds any table");
    let v = vfio(r, r.vfio.bind_table(EP, &b));
    (software(r), v)
}

/// A PASID-cache invalidation of `PASID` in both; returns the verdicts.
fn refresh_both(r: &Rig) -> (Verdict, Verdict) {
    let inv = [Invalidation {
        caches: Caches::PASID.union(Caches::IOTLB),
        scope: Scope::Pasid(PASID),
        archid: None,
    }];
    r.emu
        .invalidate(DOMAIN, &inv)
        .expect("software invalidation");
    let v = vfio(r, r.vfio.invalidate(DOMAIN, &inv));
    (software(r), v)
}

// Hand-encoded fields (VT-d §9.5, §9.6).
const PDE_P: u64 = 1;
const P: u64 = 1;
const fn pgtt(t: u64) -> u64 {
    t << 6
}
const FIRST_STAGE: u64 = P | pgtt(1);

fn good() -> [u64; 8] {
    [FIRST_STAGE, 7, ROOT_A, 0, 0, 0, 0, 0]
}

fn with(word: usize, v: u64) -> [u64; 8] {
    let mut e = good();
    e[word] = v;
    e
}

#[test]
fn issue11_named_vtd_tables_get_one_verdict_from_both_backends() {
    use Verdict::*;
    let pde = PASID_TABLE | PDE_P;
    let cases: Vec<(&str, u64, [u64; 8], Verdict)> = vec![
        ("first stage, 4-level", pde, good(), Accepted),
        (
            "first stage, SRE WPE EAFE",
            pde,
            with(2, ROOT_A | 1 | 1 << 4 | 1 << 7),
            Accepted,
        ),
        (
            "first stage, 5-level",
            pde,
            with(2, ROOT_A | 1 << 2),
            Accepted,
        ),
        (
            "root in high RAM (empty table)",
            pde,
            with(2, 0x1_0000_0000),
            Accepted,
        ),
        ("entry not present", pde, [0; 8], NotPresent),
        ("entry not present, garbage", pde, [!1; 8], NotPresent),
        (
            "directory entry not present",
            PASID_TABLE,
            good(),
            NotPresent,
        ),
        (
            "pass-through (PGTT 4)",
            pde,
            with(0, P | pgtt(4)),
            Unsupported,
        ),
        (
            "second stage (PGTT 2)",
            pde,
            with(0, P | pgtt(2)),
            Unsupported,
        ),
        ("nested (PGTT 3)", pde, with(0, P | pgtt(3)), Unsupported),
        ("reserved PGTT 0", pde, with(0, P), Unsupported),
        ("reserved PGTT 7", pde, with(0, P | pgtt(7)), Unsupported),
        (
            "reserved FSPM 2",
            pde,
            with(2, ROOT_A | 2 << 2),
            Unsupported,
        ),
        (
            "qword 0 bit 10",
            pde,
            with(0, FIRST_STAGE | 1 << 10),
            Reserved,
        ),
        ("qword 1 bit 16", pde, with(1, 7 | 1 << 16), Reserved),
        ("qword 2 bit 8", pde, with(2, ROOT_A | 1 << 8), Reserved),
        (
            "FSPTPTR above 52 bits",
            pde,
            with(2, ROOT_A | 1 << 60),
            Reserved,
        ),
        ("qword 4", pde, with(4, 1), Reserved),
        ("directory entry bit 2", pde | 1 << 2, good(), Reserved),
        ("root outside RAM", pde, with(2, OUTSIDE), OutOfRange),
        (
            "PASID table outside RAM",
            OUTSIDE | PDE_P,
            good(),
            OutOfRange,
        ),
    ];
    for (name, pde, entry, want) in cases {
        let r = rig();
        write(&r, pde, &entry);
        assert_eq!(bind_both(&r), (want, want), "bind: {name}");
        // The same entry reached by a PASID-cache invalidation after a
        // good binding.
        let r = rig();
        write(&r, PASID_TABLE | PDE_P, &good());
        assert_eq!(
            bind_both(&r),
            (Accepted, Accepted),
            "good bind before {name}"
        );
        write(&r, pde, &entry);
        assert_eq!(refresh_both(&r), (want, want), "refresh: {name}");
    }
}

fn any_pde() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(PASID_TABLE | PDE_P),
        Just(PASID_TABLE),
        Just(OUTSIDE | PDE_P),
        (2u32..12).prop_map(|b| PASID_TABLE | PDE_P | 1 << b),
        any::<u64>().prop_map(|v| (v & 0xffc) | PASID_TABLE | (v & 1)),
    ]
}

fn any_entry() -> impl Strategy<Value = [u64; 8]> {
    let root = prop_oneof![
        Just(ROOT_A),
        Just(0x1_0000_0000u64),
        Just(OUTSIDE),
        Just(0xff_f000u64),
        any::<u64>(),
    ];
    (
        proptest::array::uniform8(any::<u64>()),
        any::<bool>(),
        0u64..8,
        any::<bool>(),
        root,
    )
        .prop_map(|(mut w, present, t, clean, root)| {
            w[0] = (w[0] & !0x1c1) | u64::from(present) | pgtt(t);
            // FSPTPTR from the chosen root; the low bits stay random.
            w[2] = (w[2] & 0xfff) | (root & !0xfff);
            if clean {
                // Clear what the spec reserves, so the other fields decide.
                w[0] &= !0xc00;
                w[1] &= !0x007f_0000;
                w[2] &= !0xf00;
                w[3..].fill(0);
            }
            w
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any directory entry and PASID entry: the software IOMMU and the
    /// iommufd backend agree on accept / block / refuse and the reason
    /// class, at bind time and after a PASID-cache invalidation.
    #[test]
    fn issue11_random_vtd_entries_get_one_verdict_from_both_backends(
        pde in any_pde(),
        entry in any_entry(),
    ) {
        let r = rig();
        write(&r, pde, &entry);
        let (soft, host) = bind_both(&r);
        prop_assert_eq!(soft, host, "bind: pde {:#x} entry {:x?}", pde, entry);

        let r = rig();
        write(&r, PASID_TABLE | PDE_P, &good());
        prop_assert_eq!(bind_both(&r), (Verdict::Accepted, Verdict::Accepted));
        write(&r, pde, &entry);
        let (soft, host) = refresh_both(&r);
        prop_assert_eq!(soft, host, "refresh: pde {:#x} entry {:x?}", pde, entry);
    }
}
