//! Builders for the tables of the nested extension (ATTACH_TABLE), written
//! by the guest into its own RAM as a guest driver writes them: IA-32e
//! first-stage page tables under a VT-d scalable-mode PASID directory, and
//! AArch64 stage-1 tables under an SMMUv3 linear Context Descriptor table
//! (plain data to this x86 guest).
//!
//! Every bit position here is checked against the walkers the device uses
//! (`vmm-iommu/src/nested/{x86,vtd,arm,smmuv3}.rs`), which cite the VT-d
//! spec, the SDM, the SMMUv3 spec and the Arm ARM. Tables come zeroed from
//! a `rt::Bump`; entries are written with single aligned 64-bit stores, and
//! multi-word structures (PASID entries, CDs) last word first so that the
//! word holding the present/valid bit is written last.

use crate::rt::{peek64, poke64, Bump};

/// IA-32e paging entries (SDM vol. 3 4.5; VT-d 9.9 first-stage entries).
pub mod x86 {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Read/write.
    pub const RW: u64 = 1 << 1;
    /// User/supervisor: the DMA engine's requests are unprivileged, so every
    /// level must have it.
    pub const US: u64 = 1 << 2;
    /// Accessed (the device never sets it; Linux pre-sets it).
    pub const A: u64 = 1 << 5;
    /// Dirty (pre-set on writable leaves, as Linux does).
    pub const D: u64 = 1 << 6;
    /// Execute disable.
    pub const XD: u64 = 1 << 63;
    /// Address bits 51:12.
    pub const ADDR: u64 = 0x000f_ffff_ffff_f000;
    /// A non-leaf entry that takes no permission away.
    pub const TABLE: u64 = P | RW | US | A;
    /// A user data page, read-write.
    pub const LEAF_RW: u64 = P | RW | US | A | D | XD;
    /// A user data page, read-only.
    pub const LEAF_RO: u64 = P | US | A | XD;
}

/// A 4-level IA-32e table (VT-d first stage), 4 KiB pages only.
#[derive(Clone, Copy)]
pub struct X86Tables {
    /// Guest-physical address of the PML4.
    pub root: u64,
}

impl X86Tables {
    /// An empty PML4.
    pub fn new(alloc: &mut Bump) -> Self {
        X86Tables {
            root: alloc.pages(1),
        }
    }

    /// Guest-physical address of the 4 KiB leaf entry for `va`, creating
    /// the PDPT, PD and PT on its path as needed.
    pub fn leaf_slot(&self, alloc: &mut Bump, va: u64) -> u64 {
        let mut table = self.root;
        // Levels 4 (PML4), 3 (PDPT), 2 (PD): index = VA bits
        // [12 + 9 * level - 1 ..] (SDM 4.5).
        for level in (2..=4u32).rev() {
            let slot = table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
            let e = peek64(slot);
            if e & x86::P == 0 {
                let next = alloc.pages(1);
                poke64(slot, next | x86::TABLE);
                table = next;
            } else {
                table = e & x86::ADDR;
            }
        }
        table + ((va >> 12) & 0x1ff) * 8
    }

    /// Maps the 4 KiB page at `va` to `pa` with leaf `flags`.
    pub fn map(&self, alloc: &mut Bump, va: u64, pa: u64, flags: u64) {
        check!(va & 0xfff == 0 && pa & 0xfff == 0, "unaligned x86 mapping");
        poke64(self.leaf_slot(alloc, va), pa | flags);
    }
}

/// VT-d scalable-mode PASID structures (VT-d 9.5, 9.6; Linux
/// `drivers/iommu/intel/pasid.h`).
pub mod vtd {
    /// Directory entry: present.
    pub const PDE_P: u64 = 1 << 0;
    /// PASID entry qword 0: present.
    pub const PE0_P: u64 = 1 << 0;
    /// PASID entry qword 0 bits 8:6: PGTT.
    pub const PE0_PGTT_SHIFT: u32 = 6;
    /// PGTT 001b: first-stage translation only.
    pub const PGTT_FIRST_STAGE: u64 = 1;
    /// PASID entry qword 1 bits 15:0: domain ID.
    pub const PE1_DID_MASK: u64 = 0xffff;
    /// PASID entry qword 2 bits 3:2: FSPM, 0 = 4-level paging.
    pub const PE2_FSPM_4LEVEL: u64 = 0 << 2;
    /// PASID entry qword 2 bits 63:12: FSPTPTR.
    pub const PE2_FSPTPTR_MASK: u64 = !0xfff;
    /// Bytes of a PASID entry.
    pub const ENTRY_SIZE: u64 = 64;
}

/// A scalable-mode PASID directory for `bits`-wide PASIDs, with PASID
/// tables of 64 entries created as entries are set.
#[derive(Clone, Copy)]
pub struct VtdPasidDir {
    /// Guest-physical address of the directory (4 KiB aligned).
    pub dir: u64,
    /// PASID width.
    pub bits: u8,
}

impl VtdPasidDir {
    /// An empty directory: `1 << (bits - 6)` 8-byte entries, at least a
    /// page.
    pub fn new(alloc: &mut Bump, bits: u8) -> Self {
        check!((1..=20).contains(&bits), "PASID width {bits}");
        let entries = 1u64 << bits.saturating_sub(6);
        VtdPasidDir {
            dir: alloc.alloc((entries * 8).max(4096), 4096),
            bits,
        }
    }

    /// Guest-physical address of `pasid`'s 64-byte entry: directory entry
    /// PASID[19:6], then entry PASID[5:0] of its table (created if absent).
    pub fn entry_slot(&self, alloc: &mut Bump, pasid: u32) -> u64 {
        check!(
            u64::from(pasid) >> self.bits == 0,
            "PASID {pasid:#x} too wide"
        );
        let pde = self.dir + u64::from(pasid >> 6) * 8;
        let e = peek64(pde);
        let table = if e & vtd::PDE_P != 0 {
            e & !0xfff
        } else {
            let t = alloc.pages(1);
            poke64(pde, t | vtd::PDE_P);
            t
        };
        table + u64::from(pasid & 0x3f) * vtd::ENTRY_SIZE
    }

    /// Makes `pasid` translate with the 4-level first-stage tables at
    /// `fs_root`, tagged with domain ID `did`: P, PGTT = first stage,
    /// DID, FSPM = 4-level, FSPTPTR; SRE, WPE, ERE, SMEP clear (the DMA
    /// engine's requests are unprivileged data accesses).
    pub fn set_first_stage(&self, alloc: &mut Bump, pasid: u32, fs_root: u64, did: u16) {
        let slot = self.entry_slot(alloc, pasid);
        let w0 = vtd::PE0_P | (vtd::PGTT_FIRST_STAGE << vtd::PE0_PGTT_SHIFT);
        let w1 = u64::from(did) & vtd::PE1_DID_MASK;
        let w2 = (fs_root & vtd::PE2_FSPTPTR_MASK) | vtd::PE2_FSPM_4LEVEL;
        write_words(slot, &[w0, w1, w2, 0, 0, 0, 0, 0]);
    }

    /// Replaces only FSPTPTR of `pasid`'s (present) entry, as a driver
    /// switching the PASID to other tables does.
    pub fn set_fsptptr(&self, alloc: &mut Bump, pasid: u32, fs_root: u64) {
        let slot = self.entry_slot(alloc, pasid);
        let w2 = peek64(slot + 16);
        poke64(
            slot + 16,
            (w2 & !vtd::PE2_FSPTPTR_MASK) | (fs_root & vtd::PE2_FSPTPTR_MASK),
        );
    }
}

/// AArch64 VMSAv8-64 descriptors, 4 KiB granule (Arm ARM D8; Linux
/// `io-pgtable-arm.c`).
pub mod arm {
    /// Bits 1:0 of a table (levels 0-2) or page (level 3) descriptor.
    pub const TYPE_TABLE: u64 = 0b11;
    /// AttrIndx = 0 (bits 4:2): MAIR attribute 0.
    pub const ATTR_IDX0: u64 = 0;
    /// AP[1], bit 6: EL0 (unprivileged) access, which the DMA engine's
    /// requests are.
    pub const AP_USER: u64 = 1 << 6;
    /// AP[2], bit 7: read-only.
    pub const AP_RDONLY: u64 = 1 << 7;
    /// SH[1:0] = inner shareable, bits 9:8.
    pub const SH_INNER: u64 = 3 << 8;
    /// Access flag, bit 10: the device behaves as HA = 0, so it must be set.
    pub const AF: u64 = 1 << 10;
    /// Not global, bit 11.
    pub const NG: u64 = 1 << 11;
    /// PXN, bit 53.
    pub const PXN: u64 = 1 << 53;
    /// UXN, bit 54.
    pub const UXN: u64 = 1 << 54;
    /// Output address bits 47:12.
    pub const ADDR: u64 = 0x0000_ffff_ffff_f000;
    /// A read-write data page, as io-pgtable-arm writes a stage-1 leaf.
    pub const PAGE_RW: u64 = TYPE_TABLE | ATTR_IDX0 | AP_USER | SH_INNER | AF | NG | PXN | UXN;
    /// A read-only data page.
    pub const PAGE_RO: u64 = PAGE_RW | AP_RDONLY;
}

/// AArch64 TTB0 tables with a 4 KiB granule and T0SZ = 16 (48-bit input):
/// the walk starts at level 0 and ends at level 3 pages.
#[derive(Clone, Copy)]
pub struct ArmTables {
    /// Guest-physical address of the level-0 table (TTB0).
    pub ttb0: u64,
}

/// The T0SZ the [`ArmTables`] are built for.
pub const ARM_T0SZ: u64 = 16;

impl ArmTables {
    /// An empty level-0 table.
    pub fn new(alloc: &mut Bump) -> Self {
        ArmTables {
            ttb0: alloc.pages(1),
        }
    }

    /// Guest-physical address of the level-3 descriptor for `va`, creating
    /// the level-1..3 tables on its path as needed.
    pub fn leaf_slot(&self, alloc: &mut Bump, va: u64) -> u64 {
        check!(va >> (64 - ARM_T0SZ) == 0, "VA {va:#x} beyond T0SZ");
        let mut table = self.ttb0;
        // Level L resolves VA bits [12 + 9 (3 - L) + 8 : 12 + 9 (3 - L)].
        for level in 0..3u32 {
            let slot = table + ((va >> (12 + 9 * (3 - level))) & 0x1ff) * 8;
            let d = peek64(slot);
            if d & 0b11 != arm::TYPE_TABLE {
                let next = alloc.pages(1);
                poke64(slot, next | arm::TYPE_TABLE);
                table = next;
            } else {
                table = d & arm::ADDR;
            }
        }
        table + ((va >> 12) & 0x1ff) * 8
    }

    /// Maps the 4 KiB page at `va` to `pa` with page attributes `attrs`.
    pub fn map(&self, alloc: &mut Bump, va: u64, pa: u64, attrs: u64) {
        check!(va & 0xfff == 0 && pa & 0xfff == 0, "unaligned Arm mapping");
        poke64(self.leaf_slot(alloc, va), pa | attrs);
    }
}

/// SMMUv3 Context Descriptor fields (SMMUv3 5.4; Linux `arm-smmu-v3.h`
/// `CTXDESC_CD_*`).
pub mod cd {
    /// Dword 0 bits 5:0: T0SZ.
    pub const T0SZ_SHIFT: u32 = 0;
    /// Dword 0 bits 7:6: TG0, 0 = 4 KiB.
    pub const TG0_4K: u64 = 0 << 6;
    /// Dword 0 bits 9:8, 11:10, 13:12: IRGN0 = ORGN0 = write-back (1),
    /// SH0 = inner shareable (3).
    pub const WALK_ATTRS: u64 = (1 << 8) | (1 << 10) | (3 << 12);
    /// Dword 0 bit 30: EPD1, no TTB1 walks.
    pub const EPD1: u64 = 1 << 30;
    /// Dword 0 bit 31: V.
    pub const V: u64 = 1 << 31;
    /// Dword 0 bits 34:32: IPS, 5 = 48 bits.
    pub const IPS_48: u64 = 5 << 32;
    /// Dword 0 bit 41: AA64 (AArch64 tables).
    pub const AA64: u64 = 1 << 41;
    /// Dword 0 bit 45: R (record faults).
    pub const R: u64 = 1 << 45;
    /// Dword 0 bit 46: A (abort faulting transactions).
    pub const A: u64 = 1 << 46;
    /// Dword 0 bit 47: ASET.
    pub const ASET: u64 = 1 << 47;
    /// Dword 0 bits 63:48: ASID.
    pub const ASID_SHIFT: u32 = 48;
    /// Dword 1 bits 51:4: TTB0.
    pub const TTB0_MASK: u64 = 0x000f_ffff_ffff_fff0;
    /// MAIR attribute 0 normal write-back, 1 normal non-cacheable, 2 device
    /// nGnRE (io-pgtable-arm's MAIR_ATTR_IDX_CACHE/NC/DEV, reordered).
    pub const MAIR: u64 = 0x04_44_ff;
    /// Bytes of a CD.
    pub const SIZE: u64 = 64;
}

/// A linear CD table of `1 << s1cdmax` CDs (STE.S1Fmt = 0).
#[derive(Clone, Copy)]
pub struct CdTable {
    /// Guest-physical address of CD 0 (aligned to the table's size).
    pub ptr: u64,
    /// Log2 of the number of CDs.
    pub s1cdmax: u32,
}

impl CdTable {
    /// An empty (all CDs invalid) linear table.
    pub fn new(alloc: &mut Bump, s1cdmax: u32) -> Self {
        check!(s1cdmax <= 6, "linear CD table of 2^{s1cdmax} CDs");
        let size = cd::SIZE << s1cdmax;
        CdTable {
            ptr: alloc.alloc(size, size.max(4096)),
            s1cdmax,
        }
    }

    /// Guest-physical address of CD `ssid`.
    pub fn cd_slot(&self, ssid: u32) -> u64 {
        check!(
            u64::from(ssid) >> self.s1cdmax == 0,
            "SSID {ssid} outside the table"
        );
        self.ptr + u64::from(ssid) * cd::SIZE
    }

    /// Writes a valid CD `ssid` for the [`ArmTables`] at `ttb0`, as Linux
    /// writes one for a DMA domain: T0SZ 16, TG0 4 KiB, write-back
    /// inner-shareable walks, EPD1, V, IPS 48 bits, AA64, R, A, ASET,
    /// `asid`, TTB0, MAIR.
    pub fn set_cd(&self, ssid: u32, ttb0: u64, asid: u16) {
        let w0 = (ARM_T0SZ << cd::T0SZ_SHIFT)
            | cd::TG0_4K
            | cd::WALK_ATTRS
            | cd::EPD1
            | cd::V
            | cd::IPS_48
            | cd::AA64
            | cd::R
            | cd::A
            | cd::ASET
            | (u64::from(asid) << cd::ASID_SHIFT);
        let w1 = ttb0 & cd::TTB0_MASK;
        write_words(self.cd_slot(ssid), &[w0, w1, 0, cd::MAIR, 0, 0, 0, 0]);
    }

    /// Replaces only TTB0 of CD `ssid`.
    pub fn set_ttb0(&self, ssid: u32, ttb0: u64) {
        let at = self.cd_slot(ssid) + 8;
        poke64(at, (peek64(at) & !cd::TTB0_MASK) | (ttb0 & cd::TTB0_MASK));
    }
}

/// Writes `words` at `addr`, last word first.
fn write_words(addr: u64, words: &[u64]) {
    for (i, w) in words.iter().enumerate().rev() {
        poke64(addr + 8 * i as u64, *w);
    }
}
