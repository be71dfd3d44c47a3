//! The three ways into the software nested IOMMU agree on every access:
//! [`EmulatedIommu::translate`], a [`NestedTranslator`] and a `NestedIommu`
//! (vm-memory's `Iommu`) behind an `IommuMemory`, including Arm top-byte
//! tagged addresses and the last page of the 64-bit address space. And no
//! guest input (table contents, regime fields, addresses) makes any of them
//! panic, in any build: the tests run with overflow checks on, which is
//! stricter than a release build.
//!
//! The oracle is the test's own list of mappings and the architecture's
//! rules for tags (TBI0 clears `VA[63:56]` when `VA[55]` = 0), not the
//! walkers.

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::backend::{IommuBackend, TableBinding};
use vmm_iommu::emulated::EmulatedIommu;
use vmm_iommu::nested::build::{ArmTableBuilder, TableAlloc, X86TableBuilder};
use vmm_iommu::nested::{arm, Access, Perm};
use vmm_iommu::wire::TableDesc;
use vmm_iommu::FaultQueue;

type Emu = EmulatedIommu<GuestMemoryMmap>;

const RAM: u64 = 16 << 20;
/// Data pages the tables map.
const DATA: u64 = 0x10_0000;
/// Table pages.
const TABLES: u64 = 0x80_0000;
const TABLES_END: u64 = 0xc0_0000;
const EP: u32 = 8;
/// The last 4 KiB page of the 64-bit address space.
const TOP_PAGE: u64 = 0xffff_ffff_ffff_f000;
/// TCR_EL1 for the direct Arm format: T0SZ = 16, TG0 = 4 KiB, EPD1,
/// IPS = 48 bits, TBI0 (bit 37).
const TCR_TBI0: u64 = 16 | (1 << 23) | (0b101 << 32) | (1 << 37);

fn ram() -> GuestMemoryMmap {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    // Every data byte distinct enough to tell pages apart.
    let pattern: Vec<u8> = (0..0x10_0000u32)
        .map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8)
        .collect();
    m.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    m
}

fn bind(mem: &GuestMemoryMmap, table: TableDesc) -> Arc<Emu> {
    let faults = Arc::new(FaultQueue::new(64).unwrap());
    let e = Arc::new(EmulatedIommu::new(mem.clone(), faults, 16, &[]));
    e.bind_table(EP, &TableBinding { domain: 1, table })
        .unwrap();
    e
}

/// 5-level IA-32e tables (direct x86-64 format) mapping `maps`
/// (va, pa, writable) with 4 KiB pages.
fn x86_tables(mem: &GuestMemoryMmap, maps: &[(u64, u64, bool)]) -> TableDesc {
    let mut a = TableAlloc::new(mem, TABLES, TABLES_END);
    let t = X86TableBuilder::new(&mut a, 5).unwrap();
    for &(va, pa, w) in maps {
        let perm = if w { Perm::RW_USER } else { Perm::RO_USER };
        t.map(&mut a, va, pa, 12, perm).unwrap();
    }
    TableDesc::X86_64 {
        levels: 5,
        root: t.root(),
    }
}

/// AArch64 tables (direct Arm format, TBI0 on) mapping `maps`.
fn arm_tables(mem: &GuestMemoryMmap, maps: &[(u64, u64, bool)]) -> TableDesc {
    let mut a = TableAlloc::new(mem, TABLES, TABLES_END);
    let t = ArmTableBuilder::new(&mut a, arm::Granule::K4, 16).unwrap();
    for &(va, pa, w) in maps {
        let perm = if w { Perm::RW_USER } else { Perm::RO_USER };
        t.map(&mut a, va, pa, 12, perm).unwrap();
    }
    TableDesc::ArmLpae {
        asid: 1,
        tcr: TCR_TBI0,
        ttbr0: t.root(),
        ttbr1: 0,
        mair: 0,
    }
}

fn dma(
    mem: &GuestMemoryMmap,
    emu: &Arc<Emu>,
) -> IommuMemory<GuestMemoryMmap, impl vm_memory::iommu::Iommu> {
    IommuMemory::new(mem.clone(), emu.endpoint_iommu(EP, None), true, ())
}

fn phys(mem: &GuestMemoryMmap, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
    b
}

#[test]
fn issue10_last_page_of_address_space_does_not_panic() {
    let mem = ram();
    let emu = bind(&mem, x86_tables(&mem, &[(TOP_PAGE, DATA + 0x3000, true)]));
    let dma = dma(&mem, &emu);
    // The whole page: its exclusive end is 2^64.
    let mut buf = vec![0u8; 0x1000];
    dma.read_slice(&mut buf, GuestAddress(TOP_PAGE)).unwrap();
    assert_eq!(buf, phys(&mem, DATA + 0x3000, 0x1000));
    // Twice: the second access is answered from the adaptor's IOTLB.
    dma.read_slice(&mut buf, GuestAddress(TOP_PAGE)).unwrap();
    assert_eq!(buf, phys(&mem, DATA + 0x3000, 0x1000));
    dma.write_slice(&[0x5a; 16], GuestAddress(u64::MAX - 15))
        .unwrap();
    assert_eq!(phys(&mem, DATA + 0x3ff0, 16), vec![0x5a; 16]);
}

#[test]
fn issue10_one_byte_access_at_the_last_address_translates_where_mapped() {
    let mem = ram();
    let emu = bind(&mem, x86_tables(&mem, &[(TOP_PAGE, DATA + 0x3000, true)]));
    let t = emu.translate(EP, None, u64::MAX, Access::READ).unwrap();
    assert_eq!(t.gpa, DATA + 0x3fff);
    let dma = dma(&mem, &emu);
    let b: u8 = dma.read_obj(GuestAddress(u64::MAX)).unwrap();
    assert_eq!(b, phys(&mem, DATA + 0x3fff, 1)[0]);
    dma.write_obj(0xa5u8, GuestAddress(u64::MAX)).unwrap();
    assert_eq!(phys(&mem, DATA + 0x3fff, 1)[0], 0xa5);
    // Unmapped: refused, not a panic.
    let emu = bind(&mem, x86_tables(&mem, &[(0x40_0000, DATA, true)]));
    let dma2 = IommuMemory::new(mem.clone(), emu.endpoint_iommu(EP, None), true, ());
    assert!(dma2.read_obj::<u8>(GuestAddress(u64::MAX)).is_err());
}

#[test]
fn issue10_tagged_iova_translates_through_the_vm_memory_adaptor() {
    let mem = ram();
    let emu = bind(
        &mem,
        arm_tables(
            &mem,
            &[(0x40_0000, DATA + 0x5000, true), (0x40_1000, DATA, true)],
        ),
    );
    let tagged = 0xab00_0000_0040_0123;
    let t = emu.translate(EP, None, tagged, Access::READ).unwrap();
    assert_eq!(t.gpa, DATA + 0x5123);
    // The page bounds are in the caller's (tagged) address space.
    assert_eq!(t.page_start, 0xab00_0000_0040_0000);
    assert_eq!(t.page_last, 0xab00_0000_0040_0fff);
    let dma = dma(&mem, &emu);
    let mut buf = [0u8; 0x20];
    dma.read_slice(&mut buf, GuestAddress(tagged)).unwrap();
    assert_eq!(buf.to_vec(), phys(&mem, DATA + 0x5123, 0x20));
    // Across the page boundary, with another tag.
    let mut buf = [0u8; 0x20];
    dma.read_slice(&mut buf, GuestAddress(0x1200_0000_0040_0ff0))
        .unwrap();
    let mut want = phys(&mem, DATA + 0x5ff0, 0x10);
    want.extend(phys(&mem, DATA, 0x10));
    assert_eq!(buf.to_vec(), want);
    // Nothing was refused, so no fault was queued.
    assert_eq!(emu.stats.snapshot().faults, 0);
}

/// The test's own model of one regime: 4 KiB pages → (gpa, writable),
/// keyed by the untagged page address, and how the format untags.
struct Model {
    pages: HashMap<u64, (u64, bool)>,
    tbi: bool,
}

impl Model {
    fn untag(&self, va: u64) -> u64 {
        // Arm ARM D8.8 (TBI): VA[63:56] is ignored for TTB0 addresses when
        // TBI0 = 1; VA[55] still selects the half.
        if self.tbi && va & (1 << 55) == 0 {
            va & 0x00ff_ffff_ffff_ffff
        } else {
            va
        }
    }

    fn gpa(&self, va: u64, write: bool) -> Option<u64> {
        let u = self.untag(va);
        let &(pa, w) = self.pages.get(&(u & !0xfff))?;
        (w || !write).then_some(pa + (u & 0xfff))
    }
}

/// Mapped pages: around the bottom, 0x40_0000, and (x86) the top of the
/// space or (Arm) the top of the 48-bit TTB0 range; one read-only page
/// in each cluster.
fn regime(arm: bool) -> Vec<(u64, u64, bool)> {
    let high = if arm {
        0x0000_ffff_ffff_e000
    } else {
        TOP_PAGE - 0x1000
    };
    let mut maps = Vec::new();
    for (i, base) in [0x40_0000u64, high].into_iter().enumerate() {
        for k in 0..2u64 {
            let pa = DATA + (i as u64 * 2 + k) * 0x3000;
            maps.push((base + k * 0x1000, pa, k == 0));
        }
    }
    maps
}

fn access() -> impl Strategy<Value = (u64, usize, bool)> {
    let base = prop_oneof![
        Just(0x40_0000u64),
        Just(TOP_PAGE - 0x1000),
        Just(0x0000_ffff_ffff_e000),
        Just(u64::MAX),
        any::<u64>(),
    ];
    (
        base,
        -0x2000i64..0x2000,
        any::<u8>(),
        1usize..0x2100,
        any::<bool>(),
    )
        .prop_map(|(b, off, tag, len, write)| {
            let mut a = b.wrapping_add(off as u64);
            if tag & 1 != 0 {
                a = (a & 0x00ff_ffff_ffff_ffff) | (u64::from(tag) << 56);
            }
            // The access may end exactly at 2^64, never past it. From
            // address 0 the room is all 2^64 bytes, which no u64 holds.
            let len = match (u64::MAX - a).checked_add(1) {
                Some(room) if (len as u64) > room => room as usize,
                _ => len,
            };
            (a, len.max(1), write)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `EmulatedIommu::translate`, `NestedTranslator` and `NestedIommu`
    /// through `IommuMemory` give the model's answer for every access,
    /// tagged and top-of-space ones included.
    #[test]
    fn every_entry_point_agrees_with_the_model_on_every_access(
        arm in any::<bool>(),
        accesses in proptest::collection::vec(access(), 1..24),
    ) {
        let mem = ram();
        let maps = regime(arm);
        let table = if arm { arm_tables(&mem, &maps) } else { x86_tables(&mem, &maps) };
        let emu = bind(&mem, table);
        let model = Model {
            pages: maps.iter().map(|&(va, pa, w)| (va, (pa, w))).collect(),
            tbi: arm,
        };
        let dma = dma(&mem, &emu);
        let mut front = emu.translator(EP, None);
        for (addr, len, write) in accesses {
            let last = addr + (len as u64 - 1);
            // Every page the access touches, in the caller's addresses.
            let mut want = Some(Vec::new());
            let mut cur = addr;
            loop {
                let chunk_last = (cur | 0xfff).min(last);
                let acc = if write { Access::WRITE } else { Access::READ };
                let expect = model.gpa(cur, write);
                let got = emu.translate(EP, None, cur, acc).ok().map(|t| t.gpa);
                prop_assert_eq!(got, expect, "EmulatedIommu at {:#x}", cur);
                let got = front.translate(cur, write).ok();
                prop_assert_eq!(got, expect, "NestedTranslator at {:#x}", cur);
                match (&mut want, expect) {
                    (Some(w), Some(g)) => w.push((g, (chunk_last - cur + 1) as usize)),
                    _ => want = None,
                }
                if chunk_last == last {
                    break;
                }
                cur = chunk_last + 1;
            }
            if write {
                let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ 0x3c).collect();
                let r = dma.write_slice(&data, GuestAddress(addr));
                prop_assert_eq!(r.is_ok(), want.is_some(), "write {:#x}+{:#x}: {:?}", addr, len, r);
                if let Some(w) = want {
                    let mut back = Vec::new();
                    for (g, n) in w {
                        back.extend(phys(&mem, g, n));
                    }
                    prop_assert_eq!(back, data);
                }
            } else {
                let mut buf = vec![0u8; len];
                let r = dma.read_slice(&mut buf, GuestAddress(addr));
                prop_assert_eq!(r.is_ok(), want.is_some(), "read {:#x}+{:#x}: {:?}", addr, len, r);
                if let Some(w) = want {
                    let mut expect = Vec::new();
                    for (g, n) in w {
                        expect.extend(phys(&mem, g, n));
                    }
                    prop_assert_eq!(buf, expect);
                }
            }
        }
    }

    /// Any table memory, any regime fields (unchecked: straight to the
    /// backend, as a buggy caller could), any address and length: every
    /// entry point answers, none panics.
    #[test]
    fn no_guest_input_panics_any_entry_point(
        words in proptest::collection::vec(any::<u64>(), 256),
        format in 0u8..4,
        f0 in any::<u64>(),
        f1 in any::<u64>(),
        accesses in proptest::collection::vec(access(), 1..16),
    ) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // Random words over a few pages, with their address bits pulled into
        // RAM half of the time so that walks go deep.
        for (i, w) in words.iter().enumerate() {
            let w = if w & 1 == 0 { (w & !0x000f_ffff_ffff_f000) | (w & 0x3000) } else { *w };
            let gpa = (i as u64 % 4) * 0x1000 + (w >> 3 & 0x1ff) * 8;
            mem.write_obj(w, GuestAddress(gpa)).unwrap();
        }
        let ptr = f1 & 0x3fc0;
        let table = match format {
            0 => TableDesc::X86_64 { levels: 4 + (f0 & 1) as u8, root: ptr },
            1 => TableDesc::ArmLpae { asid: f0 as u16, tcr: f0, ttbr0: f1, ttbr1: 0, mair: 0 },
            2 => TableDesc::ArmSmmuV3 {
                s1fmt: (f0 & 3) as u8,
                s1dss: (f0 >> 2 & 3) as u8,
                s1contextptr: ptr,
                s1cdmax: (f0 >> 4 & 31) as u32,
            },
            _ => TableDesc::IntelVtd { pasid_bits: (f0 % 21) as u8, pasid_dir_ptr: ptr },
        };
        let faults = Arc::new(FaultQueue::new(16).unwrap());
        let emu = Arc::new(EmulatedIommu::new(mem.clone(), faults, 20, &[]));
        emu.bind_table(EP, &TableBinding { domain: 1, table }).unwrap();
        for pasid in [None, Some((f0 >> 32) as u32 & 0xf)] {
            let dma = IommuMemory::new(mem.clone(), emu.endpoint_iommu(EP, pasid), true, ());
            let mut front = emu.translator(EP, pasid);
            for &(addr, len, write) in &accesses {
                let acc = if write { Access::WRITE } else { Access::READ };
                let _ = emu.translate(EP, pasid, addr, acc);
                let _ = front.translate(addr, write);
                let mut buf = vec![0u8; len];
                if write {
                    let _ = dma.write_slice(&buf, GuestAddress(addr));
                } else {
                    let _ = dma.read_slice(&mut buf, GuestAddress(addr));
                }
            }
        }
    }
}
