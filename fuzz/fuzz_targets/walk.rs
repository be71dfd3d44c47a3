//! Any table contents, any regime parameters: the VT-d PASID-table and
//! SMMUv3 CD-table readers and the IA-32e / AArch64 walkers never panic and
//! never read more than `MAX_WALK_READS` page-table entries per walk; and
//! the same table, bound to the software nested IOMMU, answers through all
//! three entry points (`EmulatedIommu::translate`, `NestedTranslator`, the
//! vm-memory adaptor) at the input address, its Arm top-byte tagged form
//! and the top of the address space, without panicking.
//!
//! Checked (issue 11): a walk that finds a leaf finds one that covers the
//! address, of at least 4 KiB, below the 52-bit output size; a permission
//! check that passes was granted by the leaf's accumulated permissions
//! (a write needs `write`, an unprivileged access `user`, an instruction
//! fetch `exec` / `user_exec`); and the software nested IOMMU, bound to the
//! same table with empty caches, translates the address exactly as the
//! regime's walk and check do (same refusal, or the same address and
//! writability); for the VT-d and direct IA-32e formats, with an
//! unprivileged read or write, it also translates exactly as the spec
//! oracle of the tests (`vmm-iommu/tests/oracle`, written apart from
//! `vmm_iommu::nested`) does.

#![no_main]

use std::cell::Cell;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::backend::{IommuBackend, TableBinding};
use vmm_iommu::emulated::EmulatedIommu;
use vmm_iommu::nested::{
    arm, smmuv3, vtd, x86, Access, Stage1, TableMemory, MAX_WALK_READS, OUTPUT_BITS,
};
use vmm_iommu::wire::TableDesc;
use vmm_iommu::FaultQueue;

#[path = "../../vmm-iommu/tests/oracle/mod.rs"]
mod oracle;

struct Counting<'a> {
    mem: &'a GuestMemoryMmap,
    reads: Cell<usize>,
}

impl TableMemory for Counting<'_> {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        self.reads.set(self.reads.get() + 1);
        self.mem.read_u64(gpa)
    }
    fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Option<()> {
        self.mem.read_bytes(gpa, buf)
    }
}

fn u64_at(d: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, x) in b.iter_mut().enumerate() {
        *x = d.get(i + k).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 32 {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    mem.write_slice(&data[32..data.len().min(32 + (1 << 20))], GuestAddress(0))
        .unwrap();
    let (p0, p1, va, sel) = (
        u64_at(data, 0),
        u64_at(data, 8),
        u64_at(data, 16),
        u64_at(data, 24),
    );
    let m = Counting {
        mem: &mem,
        reads: Cell::new(0),
    };
    let access = Access {
        write: sel & 1 != 0,
        exec: sel & 2 != 0,
        privileged: sel & 4 != 0,
    };
    let pasid = (sel & (1 << 6) != 0).then_some((p1 >> 9) as u32 & 0xffff);
    // The regime, as the software IOMMU resolves the binding below: the
    // PASID entry or CD of `pasid` (VT-d RID_PASID 0 without one), the
    // table itself for the direct formats.
    let stage1: Result<Option<Stage1>, ()> = match sel >> 3 & 3 {
        0 => x86::Config::new(p0 & 0xf_f000, 4 + (sel >> 5 & 1) as u8)
            .map(|c| Some(Stage1::X86(c)))
            .map_err(drop),
        1 => arm::Config::from_tcr(p0, p1 & 0xf_ffff, 0, p1, sel as u16)
            .map(|c| Some(Stage1::Arm(c)))
            .map_err(drop),
        2 => vtd::PasidTable::new(p0 & 0xf_f000, (p1 % 21) as u8)
            .and_then(|t| t.stage1(&m, pasid.unwrap_or(0)))
            .map(Some)
            .map_err(drop),
        _ => smmuv3::CdTable::new(
            p0 & 0xf_ffc0,
            (p1 & 3) as u8,
            (p1 >> 2 & 31) as u32,
            (p1 >> 7 & 3) as u8,
        )
        .and_then(|t| match t.resolve_ssid(pasid)? {
            smmuv3::Substream::Ssid(s) => t.stage1(&m, s).map(Some),
            smmuv3::Substream::Bypass => Ok(None),
        })
        .map_err(drop),
    };
    // What a whole translation of `va` gives: `Some((gpa, writable))`.
    let mut expected: Option<(u64, bool)> = None;
    match &stage1 {
        Ok(Some(s1)) => {
            m.reads.set(0);
            let mut steps = 0;
            let r = s1.walk(&m, va, s1.root(), &mut |_| steps += 1);
            assert!(m.reads.get() <= MAX_WALK_READS);
            assert!(steps <= MAX_WALK_READS);
            let uva = s1.untag(va);
            let r2 = s1.translate(&m, uva, access);
            if let Ok(leaf) = r {
                assert!(leaf.contains(uva), "leaf {leaf:x?} does not cover {uva:#x}");
                assert!(leaf.page_log2 >= 12, "page below 4 KiB: {leaf:x?}");
                let gpa = leaf
                    .translate(uva)
                    .expect("a leaf translates what it covers");
                assert!(
                    gpa >> OUTPUT_BITS == 0,
                    "output {gpa:#x} beyond {OUTPUT_BITS} bits"
                );
                if s1.check(&leaf, access).is_ok() {
                    let p = leaf.perm;
                    assert!(p.read);
                    assert!(!access.write || p.write, "write granted by {p:?}");
                    // An unprivileged data access needs `user`; an
                    // unprivileged fetch needs `user_exec` only (AArch64
                    // EL0 execute-only pages: AP[1] = 0, UXN = 0).
                    assert!(
                        access.privileged || access.exec || p.user,
                        "user access granted by {p:?}"
                    );
                    if access.exec {
                        assert!(
                            if access.privileged {
                                p.exec
                            } else {
                                p.user_exec
                            },
                            "fetch granted by {p:?}"
                        );
                    }
                    let w = s1
                        .check(
                            &leaf,
                            Access {
                                write: true,
                                ..access
                            },
                        )
                        .is_ok();
                    expected = Some((gpa, w));
                    assert_eq!(r2.map(|l| l.translate(uva)), Ok(Some(gpa)));
                } else {
                    assert!(r2.is_err());
                }
            } else {
                assert!(r2.is_err());
            }
        }
        Ok(None) => expected = Some((va, true)), // S1DSS bypass
        Err(()) => {}
    }
    // The same parameters as a binding of the software nested IOMMU
    // (unchecked, as a buggy caller could bind them).
    let table = match sel >> 3 & 3 {
        0 => TableDesc::X86_64 {
            levels: 4 + (sel >> 5 & 1) as u8,
            root: p0 & 0xf_f000,
        },
        1 => TableDesc::ArmLpae {
            asid: sel as u16,
            tcr: p0,
            ttbr0: p1 & 0xf_ffff,
            ttbr1: 0,
            mair: p1,
        },
        2 => TableDesc::IntelVtd {
            pasid_bits: (p1 % 21) as u8,
            pasid_dir_ptr: p0 & 0xf_f000,
        },
        _ => TableDesc::ArmSmmuV3 {
            s1fmt: (p1 & 3) as u8,
            s1dss: (p1 >> 7 & 3) as u8,
            s1contextptr: p0 & 0xf_ffc0,
            s1cdmax: (p1 >> 2 & 31) as u32,
        },
    };
    let faults = Arc::new(FaultQueue::new(16).unwrap());
    let emu = Arc::new(EmulatedIommu::new(mem.clone(), faults, 20, &[]));
    if emu
        .bind_table(8, &TableBinding { domain: 1, table })
        .is_err()
    {
        return;
    }
    // Differential: a fresh software IOMMU (no cache yet) agrees with the
    // walk and check above, except for the direct formats, which refuse
    // PASID traffic before any walk.
    let direct = matches!(table, TableDesc::X86_64 { .. } | TableDesc::ArmLpae { .. });
    let got = emu
        .translate(8, pasid, va, access)
        .map(|t| (t.gpa, t.writable))
        .ok();
    if direct && pasid.is_some() {
        assert_eq!(got, None, "PASID traffic on a direct table");
    } else {
        assert_eq!(
            got, expected,
            "emulated IOMMU vs walk of {table:x?} at {va:#x}"
        );
    }
    // The spec oracle, for the formats it models: unprivileged data
    // accesses through VT-d PASID tables or direct IA-32e tables.
    if !access.exec && !access.privileged {
        let want =
            match table {
                TableDesc::IntelVtd {
                    pasid_bits,
                    pasid_dir_ptr,
                } => Some(oracle::vtd_translate(
                    &mem,
                    pasid_dir_ptr,
                    pasid_bits,
                    pasid.unwrap_or(0),
                    va,
                    access.write,
                )),
                TableDesc::X86_64 { levels, root } if pasid.is_none() => Some(
                    oracle::ia32e_translate(&mem, root, u32::from(levels), va, access.write),
                ),
                _ => None,
            };
        if let Some(want) = want {
            assert_eq!(
                got.map(|g| g.0),
                want,
                "emulated IOMMU vs spec oracle: {table:x?} at {va:#x}"
            );
        }
    }
    let tagged = (va & 0x00ff_ffff_ffff_ffff) | ((sel >> 8) << 56);
    let top = u64::MAX - (sel >> 16 & 0x1fff);
    let dma = IommuMemory::new(mem.clone(), emu.endpoint_iommu(8, pasid), true, ());
    let mut front = emu.translator(8, pasid);
    for addr in [va, tagged, top] {
        let _ = emu.translate(8, pasid, addr, access);
        let _ = front.translate(addr, access.write);
        // Up to two pages, never past 2^64 (an access may end exactly there).
        let room = (u64::MAX - addr).checked_add(1).unwrap_or(u64::MAX);
        let len = ((sel >> 32 & 0x1fff) + 1).min(room) as usize;
        let mut buf = vec![0u8; len];
        if access.write {
            let _ = dma.write_slice(&buf, GuestAddress(addr));
        } else {
            let _ = dma.read_slice(&mut buf, GuestAddress(addr));
        }
    }
});
