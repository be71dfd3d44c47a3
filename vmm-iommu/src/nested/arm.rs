//! AArch64 (VMSAv8-64) stage-1 translation of the TTB0 half, as an SMMUv3
//! CD ([`crate::nested::smmuv3`]) or the direct Arm LPAE format (TCR_EL1 +
//! TTBR0 + MAIR) describes it: 4 KiB, 16 KiB and 64 KiB granules, the start
//! level derived from T0SZ and the granule, table/block/page descriptors,
//! `AP[2:1]` and APTable, UXN/PXN and their table variants, PAN and WXN.
//!
//! Bit positions follow the Arm ARM (D8 "The AArch64 Virtual Memory System
//! Architecture") and the SMMUv3 spec §5.4, cross-checked against Linux
//! (`arch/arm64/include/asm/pgtable-hwdef.h`, `drivers/iommu/io-pgtable-arm.c`)
//! and QEMU (`hw/arm/smmu-internal.h`).
//!
//! What this device does not do, and what happens instead:
//! - Access flag: it behaves as HA = 0 — a leaf with AF = 0 raises an
//!   access-flag fault (unless AFFD = 1) and the device never sets AF or
//!   dirty state in the guest's tables. A walk is a pure read: it cannot
//!   race the guest's own updates of a descriptor, and the stale-cache
//!   behaviour stays deterministic. A CD asking for HTTU (HA/HD) is refused
//!   ([`Unsupported::Httu`]), as the SMMUv3 spec makes it ILLEGAL when
//!   SMMU_IDR0.HTTU = 0.
//! - The TTB1 half (`VA[55]` = 1): with EPD1 = 1 the architecture's
//!   translation fault ([`WalkFaultKind::WalkDisabled`]); with EPD1 = 0
//!   [`WalkFaultKind::Ttbr1Unsupported`]. IOVA spaces live in TTB0.
//! - 52-bit input addresses (LVA) and 52-bit output with the 4 KiB / 16 KiB
//!   granules (LPA2, TCR.DS): not implemented; DS = 1 is refused, and
//!   IPS = 52 bits means 48 with those granules, as without FEAT_LPA2.
//!   52-bit output with the 64 KiB granule (FEAT_LPA) is walked: descriptor
//!   bits 15:12 carry `OA[51:48]`, TTBR bits 5:2 `BADDR[51:48]`. The output
//!   size is capped at [`MAX_OA_BITS`], the OUTPUT_SIZE the software IOMMU
//!   advertises ([`super::OUTPUT_BITS`]).
//!
//! Translation table base (TTBR0 of the direct format, TTB0 of an SMMUv3
//! CD), one rule for both ([`Config::new`]): the base is aligned to the
//! size of the start-level table, at least 64 bytes (Arm ARM D8.2.3: "more
//! low-order TTBR_ELx bits are used to hold the translation table base
//! address" when the table is smaller than a granule); lower bits are not
//! address bits (RES0; the CONSTRAINED UNPREDICTABLE choice "treated as 0").
//! A base at or above the output size is an address-size fault at the start
//! level, and the direct format's ATTACH_TABLE refuses it with RANGE.
//! - Hierarchical permission disable (HPD/HAD): not implemented; the
//!   controls are ignored, as they are when the feature is absent.

use super::fault::{Denied, Unsupported, WalkFault, WalkFaultKind};
use super::memory::TableMemory;
use super::{Access, Leaf, Perm, TableStep, WalkStart};

/// Descriptor bit 0: valid.
// io-pgtable-arm.c: ARM_LPAE_PTE_VALID (1 << 0); pgtable-hwdef.h: PTE_VALID
pub const DESC_VALID: u64 = 1 << 0;
/// Descriptor bits 1:0 of a table (levels 0–2) or page (level 3) descriptor.
// io-pgtable-arm.c: ARM_LPAE_PTE_TYPE_TABLE 3, ARM_LPAE_PTE_TYPE_PAGE 3
pub const DESC_TYPE_TABLE: u64 = 0b11;
/// Descriptor bits 1:0 of a block descriptor.
// io-pgtable-arm.c: ARM_LPAE_PTE_TYPE_BLOCK 1
pub const DESC_TYPE_BLOCK: u64 = 0b01;
/// `AttrIndx[2:0]`, bits 4:2.
// io-pgtable-arm.c: ARM_LPAE_PTE_ATTRINDX_SHIFT 2
pub const DESC_ATTRINDX_SHIFT: u32 = 2;
/// `AP[1]`, bit 6: EL0 (unprivileged) access.
// pgtable-hwdef.h: PTE_USER (1 << 6) /* AP[1] */; io-pgtable-arm.c: ARM_LPAE_PTE_AP_UNPRIV
pub const DESC_AP_USER: u64 = 1 << 6;
/// `AP[2]`, bit 7: read-only.
// pgtable-hwdef.h: PTE_RDONLY (1 << 7) /* AP[2] */; io-pgtable-arm.c: ARM_LPAE_PTE_AP_RDONLY (2 << 6)
pub const DESC_AP_RDONLY: u64 = 1 << 7;
/// `SH[1:0]`, bits 9:8: inner shareable.
// pgtable-hwdef.h: PTE_SHARED (3 << 8); io-pgtable-arm.c: ARM_LPAE_PTE_SH_IS
pub const DESC_SH_INNER: u64 = 3 << 8;
/// Access flag, bit 10.
// pgtable-hwdef.h: PTE_AF (1 << 10); io-pgtable-arm.c: ARM_LPAE_PTE_AF; QEMU PTE_AF extract64(pte, 10, 1)
pub const DESC_AF: u64 = 1 << 10;
/// Not global, bit 11.
// pgtable-hwdef.h: PTE_NG (1 << 11)
pub const DESC_NG: u64 = 1 << 11;
/// Dirty bit modifier, bit 51 (only meaningful with HD = 1).
// pgtable-hwdef.h: PTE_DBM (1 << 51)
pub const DESC_DBM: u64 = 1 << 51;
/// Contiguous hint, bit 52 (a TLB hint; ignored here).
// pgtable-hwdef.h: PTE_CONT (1 << 52)
pub const DESC_CONT: u64 = 1 << 52;
/// Privileged execute-never, bit 53.
// pgtable-hwdef.h: PTE_PXN (1 << 53); io-pgtable-arm.c: ARM_LPAE_PTE_XN (3 << 53)
pub const DESC_PXN: u64 = 1 << 53;
/// Unprivileged execute-never, bit 54.
// pgtable-hwdef.h: PTE_UXN (1 << 54)
pub const DESC_UXN: u64 = 1 << 54;
/// Table descriptor PXNTable, bit 59.
// pgtable-hwdef.h: PMD_TABLE_PXN (1 << 59)
pub const TABLE_PXN: u64 = 1 << 59;
/// Table descriptor UXNTable (XNTable), bit 60.
// pgtable-hwdef.h: PMD_TABLE_UXN (1 << 60)
pub const TABLE_UXN: u64 = 1 << 60;
/// Table descriptor `APTable[0]`, bit 61: no EL0 access below.
// pgtable-hwdef.h: S1_TABLE_AP (3 << 61); QEMU PTE_APTABLE extract64(pte, 61, 2)
pub const TABLE_AP_NO_EL0: u64 = 1 << 61;
/// Table descriptor `APTable[1]`, bit 62: no write access below.
// pgtable-hwdef.h: S1_TABLE_AP (3 << 61); Arm ARM D8 "APTable[1]"
pub const TABLE_AP_RDONLY: u64 = 1 << 62;
/// Output/next-table address bits 47:12 (48-bit OA; the granule's low bits
/// are cleared per granule).
// io-pgtable-arm.c: ARM_LPAE_PTE_ADDR_MASK GENMASK_ULL(47,12)
pub const DESC_ADDR_MASK: u64 = 0x0000_ffff_ffff_f000;
/// Bits 49:48: `OA[49:48]` with FEAT_LPA2/DS, RES0 otherwise (and RES0 with
/// the 64 KiB granule). Non-zero means an address this walker cannot
/// output: address-size fault.
// pgtable-hwdef.h: PTE_ADDR_LOW covers bits 49:PAGE_SHIFT with 52-bit PA
pub const DESC_OA_HIGH_LPA2: u64 = 0x0003_0000_0000_0000;
/// 64 KiB granule, bits 15:12: `OA[51:48]` (FEAT_LPA); an output address
/// above the output size faults as any other.
// pgtable-hwdef.h: PTE_ADDR_HIGH (0xf << 12) for 64K pages; io-pgtable-arm.c: ARM_LPAE_PTE_ADDR_MASK with 52-bit PA
pub const DESC_OA_HIGH_64K: u64 = 0xf000;
/// Shift from descriptor bits 15:12 to `OA[51:48]`.
const OA_HIGH_64K_SHIFT: u32 = 36;
/// TTBR_ELx `BADDR[47:1]` (bit 0 is CnP; bits 63:48 the ASID, which the
/// direct format carries in its own field).
// Arm ARM D19 TTBR0_EL1: BADDR bits [47:1], CnP bit [0], ASID bits [63:48]
pub const TTBR_BADDR_MASK: u64 = 0x0000_ffff_ffff_fffe;
/// TTBR_ELx bits 5:2: `BADDR[51:48]` with the 64 KiB granule and a 52-bit
/// output size (FEAT_LPA).
// Arm ARM D8.2.3 / pgtable-hwdef.h: TTBR_BADDR_MASK_52 GENMASK_ULL(47, 2), phys_to_ttbr
pub const TTBR_BADDR_HIGH_52: u64 = 0x3c;

/// TCR_EL1.T0SZ, bits 5:0.
// pgtable-hwdef.h: TCR_T0SZ_OFFSET 0, TCR_TxSZ_WIDTH 6
pub const TCR_T0SZ_MASK: u64 = 0x3f;
/// TCR_EL1.EPD0, bit 7.
// pgtable-hwdef.h: TCR_EPD0_SHIFT 7
pub const TCR_EPD0: u64 = 1 << 7;
/// TCR_EL1.TG0, bits 15:14.
// pgtable-hwdef.h: TCR_TG0_SHIFT 14; io-pgtable-arm.c: ARM_LPAE_TCR_TG0_4K (0 << 14)
pub const TCR_TG0_SHIFT: u32 = 14;
/// TCR_EL1.EPD1, bit 23.
// pgtable-hwdef.h: TCR_EPD1_SHIFT 23; io-pgtable-arm.c: ARM_LPAE_TCR_EPD1 (1 << 23)
pub const TCR_EPD1: u64 = 1 << 23;
/// TCR_EL1.IPS, bits 34:32.
// pgtable-hwdef.h: TCR_IPS_SHIFT 32; io-pgtable-arm.c: ARM_LPAE_TCR_IPS_SHIFT 32
pub const TCR_IPS_SHIFT: u32 = 32;
/// TCR_EL1.TBI0, bit 37.
// pgtable-hwdef.h: TCR_TBI0 (1 << 37)
pub const TCR_TBI0: u64 = 1 << 37;
/// TCR_EL1.HA, bit 39.
// pgtable-hwdef.h: TCR_HA (1 << 39)
pub const TCR_HA: u64 = 1 << 39;
/// TCR_EL1.HD, bit 40.
// pgtable-hwdef.h: TCR_HD (1 << 40)
pub const TCR_HD: u64 = 1 << 40;
/// TCR_EL1.DS, bit 59.
// pgtable-hwdef.h: TCR_DS (1 << 59)
pub const TCR_DS: u64 = 1 << 59;

/// TG0 encoding of a 4 KiB granule.
// io-pgtable-arm.h: ARM_LPAE_TCR_TG0_4K 0; SMMUv3 CD.TG0 0b00
pub const TG0_4K: u8 = 0;
/// TG0 encoding of a 64 KiB granule.
// io-pgtable-arm.h: ARM_LPAE_TCR_TG0_64K 1; SMMUv3 CD.TG0 0b01
pub const TG0_64K: u8 = 1;
/// TG0 encoding of a 16 KiB granule.
// io-pgtable-arm.h: ARM_LPAE_TCR_TG0_16K 2; SMMUv3 CD.TG0 0b10
pub const TG0_16K: u8 = 2;

/// Largest output address this walker produces: the software IOMMU's
/// output size (52 bits, with the 64 KiB granule only).
pub const MAX_OA_BITS: u8 = super::OUTPUT_BITS;

/// Largest output address without FEAT_LPA2 for the 4 KiB and 16 KiB
/// granules.
const MAX_OA_BITS_SMALL_GRANULE: u8 = 48;

/// A translation granule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granule {
    /// 4 KiB pages, 9 bits per level.
    K4,
    /// 16 KiB pages, 11 bits per level.
    K16,
    /// 64 KiB pages, 13 bits per level.
    K64,
}

impl Granule {
    /// Log2 of the page size.
    pub const fn shift(self) -> u32 {
        match self {
            Granule::K4 => 12,
            Granule::K16 => 14,
            Granule::K64 => 16,
        }
    }

    /// Input bits each level resolves.
    pub const fn stride(self) -> u32 {
        self.shift() - 3
    }

    /// The granule a TG0 field (TCR_ELx / SMMUv3 CD) selects, `None` for the
    /// reserved encoding 0b11.
    pub const fn from_tg0(tg0: u8) -> Option<Granule> {
        match tg0 {
            TG0_4K => Some(Granule::K4),
            TG0_64K => Some(Granule::K64),
            TG0_16K => Some(Granule::K16),
            _ => None,
        }
    }

    /// The TG0 encoding of this granule.
    pub const fn tg0(self) -> u8 {
        match self {
            Granule::K4 => TG0_4K,
            Granule::K16 => TG0_16K,
            Granule::K64 => TG0_64K,
        }
    }

    /// Largest T0SZ the SMMUv3 allows with this granule (SMMU_IDR3.STT = 1):
    /// 48 for 4 KiB/16 KiB, 47 for 64 KiB.
    pub const fn max_t0sz(self) -> u8 {
        match self {
            Granule::K64 => 47,
            _ => 48,
        }
    }

    /// Whether `level` may hold a block descriptor without 52-bit features:
    /// levels 1 and 2 for 4 KiB, level 2 for 16 KiB and 64 KiB.
    const fn block_allowed(self, level: u8) -> bool {
        matches!((self, level), (Granule::K4, 1) | (_, 2))
    }
}

/// Output address width an IPS/PS field selects, capped at [`MAX_OA_BITS`]
/// (SMMUv3 CD.IPS: "eff_IPS = MIN(CD.IPS, SMMU_IDR5.OAS)"; this device's
/// OAS is [`MAX_OA_BITS`]). The reserved 0b111 is taken as the largest.
/// [`Config::with_ips`] further caps it at 48 bits for the 4 KiB and
/// 16 KiB granules.
// io-pgtable-arm.h: ARM_LPAE_TCR_PS_32_BIT 0 .. ARM_LPAE_TCR_PS_48_BIT 5, ARM_LPAE_TCR_PS_52_BIT 6
pub const fn ips_bits(ips: u8) -> u8 {
    match ips & 7 {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        _ => MAX_OA_BITS,
    }
}

/// The output size IPS selects with `granule`: without FEAT_LPA2 (TCR.DS)
/// a 52-bit IPS gives 48 bits with the 4 KiB and 16 KiB granules (Arm ARM
/// D8.2: "if the PA size is 52 bits and the 4KB or 16KB granule is used
/// with DS = 0, the PA size is 48 bits").
const fn effective_oa_bits(ips: u8, granule: Granule) -> u8 {
    let bits = ips_bits(ips);
    match granule {
        Granule::K64 => bits,
        _ if bits > MAX_OA_BITS_SMALL_GRANULE => MAX_OA_BITS_SMALL_GRANULE,
        _ => bits,
    }
}

/// One AArch64 stage-1 regime (the TTB0 half): table base, granule, input
/// and output sizes, controls, ASID and MAIR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    ttb0: u64,
    granule: Granule,
    t0sz: u8,
    ia_bits: u8,
    start_level: u8,
    ips: u8,
    oa_bits: u8,
    epd0: bool,
    epd1: bool,
    tbi0: bool,
    affd: bool,
    pan: bool,
    wxn: bool,
    asid: u16,
    mair: u64,
}

impl Config {
    /// The TTB0 regime with tables at `ttb0`, granule `granule` and input
    /// size `64 - t0sz`, where `t0sz` is 16..=48 (16..=47 for 64 KiB).
    /// Defaults: 48-bit output (IPS 0b101), EPD1 = 1 (no TTB1), TBI0, AFFD,
    /// PAN and WXN clear, ASID 0, MAIR 0.
    ///
    /// `ttb0` is the table base address (an SMMUv3 CD's TTB0, or what
    /// [`ttbr_baddr`] decodes from a TTBR): the one base rule of this
    /// module keeps it aligned to the size of the start-level table, at
    /// least 64 bytes, not to the granule (Arm ARM D8.2.3); lower bits are
    /// dropped.
    pub fn new(ttb0: u64, granule: Granule, t0sz: u8) -> Result<Self, WalkFault> {
        if !(16..=granule.max_t0sz()).contains(&t0sz) {
            return Err(WalkFault::new(WalkFaultKind::UnsupportedConfig(
                Unsupported::T0sz(t0sz),
            )));
        }
        let ia_bits = 64 - t0sz;
        let g = granule.shift();
        let stride = granule.stride();
        // Levels needed to resolve ia_bits - g bits, stride bits per level
        // (Arm ARM D8.2 "initial lookup level"); 1..=4 for the T0SZ range.
        let levels = (u32::from(ia_bits) - g).div_ceil(stride);
        let start_level = 4 - levels as u8;
        let mut c = Config {
            ttb0: 0,
            granule,
            t0sz,
            ia_bits,
            start_level,
            ips: 5,
            oa_bits: effective_oa_bits(5, granule),
            epd0: false,
            epd1: true,
            tbi0: false,
            affd: false,
            pan: false,
            wxn: false,
            asid: 0,
            mair: 0,
        };
        c.ttb0 = ttb0 & c.table_align_mask(start_level);
        Ok(c)
    }

    /// A regime from the direct Arm LPAE format's registers: `tcr` in the
    /// TCR_EL1 layout (T0SZ, EPD0, TG0, EPD1, IPS, TBI0, HA, HD, DS are
    /// used; TTB1 fields are only used to decide EPD1), `ttbr0` in the
    /// TTBR0_EL1 layout ([`ttbr_baddr`]: BADDR, with `BADDR[51:48]` in bits
    /// 5:2 for the 64 KiB granule with a 52-bit output size; CnP, the ASID
    /// bits and bits below the start table's alignment are not address
    /// bits), `ttbr1` (kept, never walked), `mair`, and the ASID the guest
    /// tags invalidations with.
    pub fn from_tcr(
        tcr: u64,
        ttbr0: u64,
        ttbr1: u64,
        mair: u64,
        asid: u16,
    ) -> Result<Self, WalkFault> {
        let _ = ttbr1;
        let unsupported = |u| Err(WalkFault::new(WalkFaultKind::UnsupportedConfig(u)));
        if tcr & (TCR_HA | TCR_HD) != 0 {
            return unsupported(Unsupported::Httu);
        }
        if tcr & TCR_DS != 0 {
            return unsupported(Unsupported::Lpa2);
        }
        let epd0 = tcr & TCR_EPD0 != 0;
        let tg0 = ((tcr >> TCR_TG0_SHIFT) & 3) as u8;
        let t0sz = (tcr & TCR_T0SZ_MASK) as u8;
        // With EPD0 = 1 the TTB0 fields are IGNORED: any value is accepted
        // and every TTB0 address faults.
        let (granule, t0sz) = match Granule::from_tg0(tg0) {
            Some(g) => (g, t0sz),
            None if epd0 => (Granule::K4, 16),
            None => return unsupported(Unsupported::Granule(tg0)),
        };
        let t0sz = if epd0 && !(16..=granule.max_t0sz()).contains(&t0sz) {
            16
        } else {
            t0sz
        };
        let ips = ((tcr >> TCR_IPS_SHIFT) & 7) as u8;
        let base = ttbr_baddr(ttbr0, granule, effective_oa_bits(ips, granule));
        Ok(Config::new(base, granule, t0sz)?
            .with_epd0(epd0)
            .with_epd1(tcr & TCR_EPD1 != 0)
            .with_ips(ips)
            .with_tbi0(tcr & TCR_TBI0 != 0)
            .with_mair(mair)
            .with_asid(asid))
    }

    /// The same regime with output size field IPS = `ips` (3 bits); the
    /// output size is what IPS selects for the regime's granule.
    pub fn with_ips(mut self, ips: u8) -> Self {
        self.ips = ips & 7;
        self.oa_bits = effective_oa_bits(ips, self.granule);
        self
    }

    /// The same regime with EPD0 = `epd0` (TTB0 walks disabled).
    pub fn with_epd0(mut self, epd0: bool) -> Self {
        self.epd0 = epd0;
        self
    }

    /// The same regime with EPD1 = `epd1` (TTB1 walks disabled).
    pub fn with_epd1(mut self, epd1: bool) -> Self {
        self.epd1 = epd1;
        self
    }

    /// The same regime with TBI0 = `tbi0` (top byte ignored for TTB0).
    pub fn with_tbi0(mut self, tbi0: bool) -> Self {
        self.tbi0 = tbi0;
        self
    }

    /// The same regime with AFFD = `affd` (AF = 0 never faults).
    pub fn with_affd(mut self, affd: bool) -> Self {
        self.affd = affd;
        self
    }

    /// The same regime with PAN = `pan`.
    pub fn with_pan(mut self, pan: bool) -> Self {
        self.pan = pan;
        self
    }

    /// The same regime with WXN = `wxn`.
    pub fn with_wxn(mut self, wxn: bool) -> Self {
        self.wxn = wxn;
        self
    }

    /// The same regime tagged with `asid`.
    pub fn with_asid(mut self, asid: u16) -> Self {
        self.asid = asid;
        self
    }

    /// The same regime with memory attributes `mair` (MAIR1:MAIR0).
    pub fn with_mair(mut self, mair: u64) -> Self {
        self.mair = mair;
        self
    }

    /// Guest-physical address of the start-level table.
    pub fn ttb0(&self) -> u64 {
        self.ttb0
    }

    /// The granule.
    pub fn granule(&self) -> Granule {
        self.granule
    }

    /// T0SZ.
    pub fn t0sz(&self) -> u8 {
        self.t0sz
    }

    /// Input address bits translated: `64 - T0SZ`.
    pub fn ia_bits(&self) -> u8 {
        self.ia_bits
    }

    /// The level the walk starts at (0..=3).
    pub fn start_level(&self) -> u8 {
        self.start_level
    }

    /// The IPS field.
    pub fn ips(&self) -> u8 {
        self.ips
    }

    /// Output address bits (IPS, capped at [`MAX_OA_BITS`], and at 48 for
    /// the 4 KiB and 16 KiB granules).
    pub fn oa_bits(&self) -> u8 {
        self.oa_bits
    }

    /// Bytes of the start-level table (at least the 64 of its alignment):
    /// what must be guest RAM at [`ttb0`](Self::ttb0).
    pub fn start_table_bytes(&self) -> u64 {
        let level = self.start_level;
        let bits = self.index_bits(level, self.level_shift(level)) + 3;
        1u64 << bits.max(6)
    }

    /// EPD0.
    pub fn epd0(&self) -> bool {
        self.epd0
    }

    /// EPD1.
    pub fn epd1(&self) -> bool {
        self.epd1
    }

    /// TBI0.
    pub fn tbi0(&self) -> bool {
        self.tbi0
    }

    /// AFFD.
    pub fn affd(&self) -> bool {
        self.affd
    }

    /// PAN.
    pub fn pan(&self) -> bool {
        self.pan
    }

    /// WXN.
    pub fn wxn(&self) -> bool {
        self.wxn
    }

    /// The ASID.
    pub fn asid(&self) -> u16 {
        self.asid
    }

    /// MAIR1:MAIR0.
    pub fn mair(&self) -> u64 {
        self.mair
    }

    /// Where a walk from the top starts.
    #[inline]
    pub fn root_start(&self) -> WalkStart {
        WalkStart {
            table: self.ttb0,
            level: self.start_level,
            perm: Perm::ALL,
        }
    }

    /// `va` with the tag byte cleared when TBI0 applies (`VA[55]` = 0).
    #[inline]
    pub fn untag(&self, va: u64) -> u64 {
        if self.tbi0 && va & (1 << 55) == 0 {
            va & 0x00ff_ffff_ffff_ffff
        } else {
            va
        }
    }

    /// Input bits resolved at `level`: `ia_bits - shift` at the start level,
    /// the stride below it.
    #[inline]
    fn index_bits(&self, level: u8, shift: u32) -> u32 {
        if level == self.start_level {
            u32::from(self.ia_bits) - shift
        } else {
            self.granule.stride()
        }
    }

    /// Input-address shift of `level`'s entries.
    #[inline]
    fn level_shift(&self, level: u8) -> u32 {
        self.granule.shift() + u32::from(3 - level) * self.granule.stride()
    }

    /// Mask aligning a table at `level` to its size (at least 64 bytes, the
    /// architecture's minimum table alignment).
    #[inline]
    fn table_align_mask(&self, level: u8) -> u64 {
        let bits = self.index_bits(level, self.level_shift(level)) + 3;
        !((1u64 << bits.max(6)) - 1)
    }

    /// The output (or next-table) address of descriptor `desc`, whose low
    /// `low_bits` are not address bits, checked against the output size:
    /// bits 47:low_bits, plus `OA[51:48]` from bits 15:12 with the 64 KiB
    /// granule (FEAT_LPA). Bits 49:48 (`OA[49:48]` only with FEAT_LPA2) or
    /// an address at or above the output size: address-size fault.
    #[inline]
    fn output_address(&self, desc: u64, low_bits: u32, level: u8) -> Result<u64, WalkFault> {
        let mut addr = desc & DESC_ADDR_MASK & !((1u64 << low_bits) - 1);
        if self.granule == Granule::K64 {
            addr |= (desc & DESC_OA_HIGH_64K) << OA_HIGH_64K_SHIFT;
        }
        let lpa2 = desc & DESC_OA_HIGH_LPA2;
        if lpa2 != 0 || addr >> self.oa_bits != 0 {
            return Err(WalkFault::at(
                WalkFaultKind::AddressSize { addr: addr | lpa2 },
                level,
            ));
        }
        Ok(addr)
    }

    /// Walks from `start` to the leaf mapping `va`. See [`super::Stage1::walk`].
    pub fn walk<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        start: WalkStart,
        on_table: &mut dyn FnMut(&TableStep),
    ) -> Result<Leaf, WalkFault> {
        let va = self.untag(va);
        // Arm ARM D8.1: VA[55] selects TTBR1 in a two-range regime.
        if va & (1 << 55) != 0 {
            let kind = if self.epd1 {
                WalkFaultKind::WalkDisabled
            } else {
                WalkFaultKind::Ttbr1Unsupported
            };
            return Err(WalkFault::new(kind));
        }
        // SMMUv3 CD.EPD0: "A TLB miss on an address that is translated using
        // TTB0 causes a Translation fault. No translation table walk is
        // performed."
        if self.epd0 {
            return Err(WalkFault::new(WalkFaultKind::WalkDisabled));
        }
        // Arm ARM D8.2: an address above the TTBR0 range (VA[63:IA] != 0)
        // is a translation fault at the start level.
        if va >> self.ia_bits != 0 {
            return Err(WalkFault::new(WalkFaultKind::InputOutOfRange { va }));
        }
        if start.level < self.start_level || start.level > 3 {
            return Err(WalkFault::new(WalkFaultKind::InvalidStart));
        }
        // Arm ARM D8.2.3 / SMMUv3 §5.4 TTB0: a table base above the output
        // size is an address-size fault at the level it would be read at.
        // (Next-table addresses were checked when read; this catches the
        // root.)
        if start.table >> self.oa_bits != 0 {
            return Err(WalkFault::at(
                WalkFaultKind::AddressSize { addr: start.table },
                start.level,
            ));
        }
        let mut table = start.table;
        let mut perm = start.perm;
        // Bounded: one descriptor per level, from start.level (≥ 0) to 3.
        for level in start.level..=3 {
            let shift = self.level_shift(level);
            let index = (va >> shift) & ((1u64 << self.index_bits(level, shift)) - 1);
            // Aligned to at least the table's size, so no carry.
            let gpa = (table & self.table_align_mask(level)) | (index << 3);
            let desc = mem
                .read_u64(gpa)
                .ok_or(WalkFault::at(WalkFaultKind::TableOutsideRam { gpa }, level))?;
            if desc & DESC_VALID == 0 {
                return Err(WalkFault::at(WalkFaultKind::NotPresent, level));
            }
            let kind = desc & 0b11;
            let page_mask = (1u64 << shift) - 1;
            if level < 3 && kind == DESC_TYPE_TABLE {
                let next = self.output_address(desc, self.granule.shift(), level)?;
                perm = perm.intersect(table_perm(desc));
                let step_next = WalkStart {
                    table: next,
                    level: level + 1,
                    perm,
                };
                on_table(&TableStep {
                    level,
                    va_prefix: va >> shift,
                    // shift ≤ 16 + 3 * 13 = 55
                    va_shift: shift as u8,
                    next: step_next,
                });
                table = next;
                continue;
            }
            // Level 3 type 0b01 is reserved; a block where the granule
            // allows none (e.g. level 0 with 4 KiB) is a translation fault.
            if (level == 3 && kind != DESC_TYPE_TABLE)
                || (level < 3 && !self.granule.block_allowed(level))
            {
                return Err(WalkFault::at(WalkFaultKind::BadDescriptor { desc }, level));
            }
            let oa = self.output_address(desc, shift, level)?;
            // SMMUv3 CD.AFFD: with HA = 0, "An Access flag fault occurs"
            // unless AFFD = 1 (then "The TTD.AF bit is considered to be always 1").
            if desc & DESC_AF == 0 && !self.affd {
                return Err(WalkFault::at(WalkFaultKind::AccessFlag, level));
            }
            return Ok(Leaf {
                va_base: va & !page_mask,
                page_log2: shift as u8,
                pa_base: oa,
                perm: perm.intersect(leaf_perm(desc)),
            });
        }
        // Unreachable: level 3 always returns above.
        Err(WalkFault::new(WalkFaultKind::InvalidStart))
    }

    /// Whether `perm` permits `access` under the EL1&0 stage-1 rules:
    /// - unprivileged: data accesses need `AP[1]` (and no `APTable[0]`);
    ///   writes need `AP[2]` clear (and no `APTable[1]`); instruction
    ///   fetches need UXN/UXNTable clear only, so execute-only pages
    ///   (`AP[2:1]` = 00 or 10) execute (Arm ARM Table D8-65), and are
    ///   refused from writable pages when WXN = 1;
    /// - privileged: writes need `AP[2]` clear; data accesses to a page EL0
    ///   can access are refused when PAN = 1; instruction fetches need
    ///   PXN/PXNTable clear and are refused from pages EL0 can write ("all
    ///   EL0-writable regions are treated as being PXN", SMMUv3 CD.UWXN
    ///   note) and, with WXN = 1, from writable pages.
    pub fn check(&self, perm: &Perm, access: Access) -> Result<(), WalkFault> {
        let deny = |d| Err(WalkFault::new(WalkFaultKind::Permission(d)));
        if access.privileged {
            if access.exec && (!perm.exec || (perm.user && perm.write) || (self.wxn && perm.write))
            {
                return deny(Denied::Execute);
            }
            let data = !access.exec || access.write;
            if data && self.pan && perm.user {
                return deny(Denied::PrivilegedAccessNever);
            }
            if access.write && !perm.write {
                return deny(Denied::Write);
            }
        } else {
            // Arm ARM Table D8-65: EL0 execute depends on UXN (and WXN)
            // alone; Table D8-64: APTable[0] removes EL0 read and write,
            // not execute. SMMUv3 §13.7: "A normal (non-ATS) transaction
            // for Exe == 1 will succeed to an XO translation."
            let data = !access.exec || access.write;
            if data && !perm.user {
                return deny(Denied::User);
            }
            if access.write && !perm.write {
                return deny(Denied::Write);
            }
            if access.exec && (!perm.user_exec || (self.wxn && perm.write)) {
                return deny(Denied::Execute);
            }
        }
        Ok(())
    }
}

/// The table base address a TTBR_ELx value holds (Arm ARM D8.2.3):
/// `BADDR[47:1]` in bits 47:1, and with the 64 KiB granule and a 52-bit
/// output size (`oa_bits`) `BADDR[51:48]` in bits 5:2 (the table is then
/// at least 64-byte aligned, so those bits are free). Bit 0 (CnP) and bits
/// 63:48 (the ASID) are not address bits. [`Config::new`] then aligns the
/// result to the start table's size.
pub fn ttbr_baddr(ttbr: u64, granule: Granule, oa_bits: u8) -> u64 {
    if granule == Granule::K64 && oa_bits > 48 {
        (ttbr & TTBR_BADDR_MASK & !0x3f) | ((ttbr & TTBR_BADDR_HIGH_52) << 46)
    } else {
        ttbr & TTBR_BADDR_MASK
    }
}

/// The permissions a table descriptor leaves for the levels below.
#[inline]
fn table_perm(desc: u64) -> Perm {
    Perm {
        read: true,
        write: desc & TABLE_AP_RDONLY == 0,
        exec: desc & TABLE_PXN == 0,
        user: desc & TABLE_AP_NO_EL0 == 0,
        user_exec: desc & TABLE_UXN == 0,
    }
}

/// The permissions a block or page descriptor grants.
#[inline]
fn leaf_perm(desc: u64) -> Perm {
    Perm {
        read: true,
        write: desc & DESC_AP_RDONLY == 0,
        exec: desc & DESC_PXN == 0,
        user: desc & DESC_AP_USER != 0,
        user_exec: desc & DESC_UXN == 0,
    }
}

/// Block/page attribute bits for `perm` as Linux's io-pgtable-arm writes a
/// stage-1 mapping: AF, inner shareable, nG, AttrIndx 0, `AP[1]` for `user`,
/// `AP[2]` unless `write`, PXN unless `exec`, UXN unless `user_exec`.
/// `perm.read` cannot be expressed and is ignored.
pub fn leaf_attrs(perm: Perm) -> u64 {
    let mut a = DESC_AF | DESC_SH_INNER | DESC_NG;
    if perm.user {
        a |= DESC_AP_USER;
    }
    if !perm.write {
        a |= DESC_AP_RDONLY;
    }
    if !perm.exec {
        a |= DESC_PXN;
    }
    if !perm.user_exec {
        a |= DESC_UXN;
    }
    a
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::nested::build::{ArmTableBuilder, TableAlloc};

    const RAM: u64 = 16 << 20;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn setup(
        m: &GuestMemoryMmap<()>,
        granule: Granule,
        t0sz: u8,
    ) -> (TableAlloc<'_, GuestMemoryMmap<()>>, ArmTableBuilder) {
        let mut a = TableAlloc::new(m, 0x10_0000, RAM);
        let b = ArmTableBuilder::new(&mut a, granule, t0sz).unwrap();
        (a, b)
    }

    fn walk(c: &Config, m: &GuestMemoryMmap<()>, va: u64) -> Result<Leaf, WalkFault> {
        c.walk(m, va, c.root_start(), &mut |_| {})
    }

    /// Writes hand-encoded descriptors (address, value) into `m`.
    fn poke(m: &GuestMemoryMmap<()>, words: &[(u64, u64)]) {
        use vm_memory::Bytes;
        for &(gpa, v) in words {
            m.write_obj(v, GuestAddress(gpa)).unwrap();
        }
    }

    // Descriptor encodings straight from the Arm ARM (D8.3), not from this
    // module's constants: bits 1:0 = 0b11 table/page, AF bit 10, AP[2:1]
    // bits 7:6, PXN 53, UXN 54, APTable 62:61.
    const HW_TABLE: u64 = 0b11;
    const HW_PAGE: u64 = 0b11 | (1 << 10);
    const HW_AP_EL0: u64 = 0b01 << 6;
    const HW_AP_RO: u64 = 0b10 << 6;
    const HW_PXN: u64 = 1 << 53;
    const HW_UXN: u64 = 1 << 54;
    const HW_APTABLE_NO_EL0: u64 = 0b01 << 61;
    /// TCR_EL1: EPD1 (bit 23), IPS (bits 34:32), TG0 (bits 15:14).
    const fn hw_tcr(t0sz: u64, tg0: u64, ips: u64) -> u64 {
        t0sz | (tg0 << 14) | (1 << 23) | (ips << 32)
    }

    #[test]
    fn issue10_lpae_ttbr0_small_top_table_uses_the_low_order_bits() {
        // Arm ARM D8.2.3: with T0SZ = 32 and a 4 KiB granule the walk
        // starts at level 1 with a 4-entry (32-byte) table, aligned to
        // 64 bytes, not 4 KiB: "more low-order TTBR_ELx bits are used to
        // hold the translation table base address".
        let m = mem();
        let va = 0x40_0123u64;
        poke(
            &m,
            &[
                // A decoy where a 4 KiB-rounded TTBR0 would point: an
                // invalid entry 0.
                (0x1_0000, 0),
                // The real top table, 0x40 into the page: entry 0.
                (0x1_0040, 0x1_1000 | HW_TABLE),
                // Level 2: index (va >> 21) & 511 = 2.
                (0x1_1000 + 2 * 8, 0x1_2000 | HW_TABLE),
                // Level 3: index (va >> 12) & 511 = 0.
                (0x1_2000, 0x30_0000 | HW_PAGE | HW_AP_EL0),
            ],
        );
        let c = Config::from_tcr(hw_tcr(32, 0, 5), 0x1_0040, 0, 0, 1).unwrap();
        assert_eq!(c.start_level(), 1);
        assert_eq!(c.ttb0(), 0x1_0040);
        assert_eq!(walk(&c, &m, va).unwrap().translate(va), Some(0x30_0123));
        // The same rule as the SMMUv3 CD's TTB0: one base, one walk.
        let cd = Config::new(0x1_0040, Granule::K4, 32).unwrap();
        assert_eq!(cd.ttb0(), c.ttb0());
        assert_eq!(walk(&cd, &m, va), walk(&c, &m, va));
        // Bits below the table's own alignment are not address bits.
        let c = Config::from_tcr(hw_tcr(32, 0, 5), 0x1_0058, 0, 0, 1).unwrap();
        assert_eq!(c.ttb0(), 0x1_0040);
        // CnP (bit 0) is not an address bit either.
        let c = Config::from_tcr(hw_tcr(32, 0, 5), 0x1_0041, 0, 0, 1).unwrap();
        assert_eq!(c.ttb0(), 0x1_0040);
    }

    #[test]
    fn issue10_table_base_beyond_the_output_size_is_an_address_size_fault() {
        // Arm ARM D8.2.3 / SMMUv3 §5.4 TTB0: a base address above the
        // output size faults at the start level, whichever path gave it.
        let m = mem();
        let c = Config::from_tcr(hw_tcr(25, 0, 2), 1 << 41, 0, 0, 1).unwrap();
        assert_eq!(
            walk(&c, &m, 0x1000),
            Err(WalkFault::at(
                WalkFaultKind::AddressSize { addr: 1 << 41 },
                c.start_level()
            ))
        );
        let cd = Config::new(1 << 41, Granule::K4, 25).unwrap().with_ips(2);
        assert_eq!(walk(&cd, &m, 0x1000), walk(&c, &m, 0x1000));
    }

    #[test]
    fn issue10_unprivileged_execute_of_execute_only_pages_is_permitted() {
        // Arm ARM Table D8-65: UXN = 0 with AP[2:1] = 00 or 10 gives EL0
        // execute without EL0 read or write (execute-only); Table D8-64:
        // APTable[0] removes EL0 read and write only; SMMUv3 §13.7: "A
        // normal (non-ATS) transaction for Exe == 1 will succeed to an XO
        // translation."
        let m = mem();
        let l1 = 0x1_0000u64;
        let l2 = 0x1_1000u64;
        let l3 = 0x1_2000u64;
        let l3_noel0 = 0x1_3000u64;
        poke(
            &m,
            &[
                // T0SZ 32: level 1, index (va >> 30) & 3.
                (l1, l2 | HW_TABLE),
                // va 0x0000_0000..: level 2 index 0 -> l3;
                (l2, l3 | HW_TABLE),
                // level 2 index 1 (va 0x20_0000..) -> l3_noel0 under APTable[0].
                (l2 + 8, l3_noel0 | HW_TABLE | HW_APTABLE_NO_EL0),
                // AP = 00, UXN = 0: EL0 execute-only.
                (l3, 0x30_0000 | HW_PAGE | HW_PXN),
                // AP = 10, UXN = 0: EL0 execute-only, EL1 read-only.
                (l3 + 8, 0x30_1000 | HW_PAGE | HW_AP_RO),
                // AP = 00, UXN = 1: no EL0 access at all.
                (l3 + 16, 0x30_2000 | HW_PAGE | HW_UXN),
                // AP = 01 (EL0 RW), UXN = 0, under APTable[0].
                (l3_noel0, 0x30_3000 | HW_PAGE | HW_AP_EL0 | HW_PXN),
            ],
        );
        let c = Config::from_tcr(hw_tcr(32, 0, 5), l1, 0, 0, 1).unwrap();
        let usr_x = Access {
            write: false,
            exec: true,
            privileged: false,
        };
        let verdict = |va: u64, a: Access| {
            let leaf = walk(&c, &m, va).unwrap();
            c.check(&leaf.perm, a).map_err(|f| f.kind)
        };
        let denied = |d| Err(WalkFaultKind::Permission(d));
        for va in [0x0, 0x1000, 0x20_0000] {
            assert_eq!(verdict(va, usr_x), Ok(()), "EL0 execute at {va:#x}");
            assert_eq!(verdict(va, Access::READ), denied(Denied::User), "{va:#x}");
            assert_eq!(verdict(va, Access::WRITE), denied(Denied::User), "{va:#x}");
        }
        assert_eq!(verdict(0x2000, usr_x), denied(Denied::Execute));
    }

    #[test]
    fn issue10_64k_granule_with_52_bit_ips_outputs_oa_51_48_from_bits_15_12() {
        // Arm ARM D8.3 (FEAT_LPA): with the 64 KiB granule and a 52-bit
        // output size, descriptor bits 15:12 hold OA[51:48], in table and
        // block/page descriptors alike.
        let m = mem();
        let va = 0x1_0000u64;
        let oa_low = 0x0000_1234_5678_0000u64; // OA[47:16]
        poke(
            &m,
            &[
                // T0SZ 16, 64 KiB: start level 1 (64 entries, shift 42).
                (0x1_0000, 0x2_0000 | HW_TABLE),
                // Level 2 (shift 29) index 0.
                (0x2_0000, 0x3_0000 | HW_TABLE),
                // Level 3 (shift 16) index 1: OA[51:48] = 0xa.
                (0x3_0008, oa_low | (0xa << 12) | HW_PAGE | HW_AP_EL0),
                // Level 3 index 2: a page at OA 0x1_0000 with OA[51:48] = 0.
                (0x3_0010, 0x1_0000 | HW_PAGE | HW_AP_EL0),
                // Level 2 index 1 (va 0x2000_0000): a next table above 2^48.
                (0x2_0008, 0x5_0000 | (0x3 << 12) | HW_TABLE),
            ],
        );
        let c52 = Config::from_tcr(hw_tcr(16, 1, 6), 0x1_0000, 0, 0, 1).unwrap();
        assert_eq!(c52.oa_bits(), 52);
        let leaf = walk(&c52, &m, va).unwrap();
        assert_eq!(leaf.pa_base, 0x000a_1234_5678_0000);
        assert_eq!(walk(&c52, &m, 0x2_0000).unwrap().pa_base, 0x1_0000);
        assert_eq!(
            walk(&c52, &m, 0x2000_0000),
            Err(WalkFault::at(
                WalkFaultKind::TableOutsideRam {
                    gpa: 0x0003_0000_0005_0000
                },
                3
            ))
        );
        // With a 48-bit output size the same bits are an address-size fault.
        let c48 = Config::from_tcr(hw_tcr(16, 1, 5), 0x1_0000, 0, 0, 1).unwrap();
        assert!(matches!(
            walk(&c48, &m, va),
            Err(WalkFault {
                kind: WalkFaultKind::AddressSize { .. },
                level: Some(3)
            })
        ));
        // 4 KiB / 16 KiB granules reach 52 bits only with DS (FEAT_LPA2),
        // which this device does not have: IPS = 52 means 48 there.
        let c4 = Config::from_tcr(hw_tcr(16, 0, 6), 0x1_0000, 0, 0, 1).unwrap();
        assert_eq!(c4.oa_bits(), 48);
    }

    #[test]
    fn issue10_52_bit_ttbr0_carries_baddr_51_48_in_bits_5_2() {
        // Arm ARM D8.2.3 (FEAT_LPA, 64 KiB granule, 52-bit output):
        // TTBR_ELx bits 5:2 hold BADDR[51:48].
        let c = Config::from_tcr(hw_tcr(16, 1, 6), 0x1_0000 | (0x5 << 2), 0, 0, 1).unwrap();
        assert_eq!(c.ttb0(), 0x0005_0000_0001_0000);
        let c = Config::from_tcr(hw_tcr(16, 1, 5), 0x1_0000 | (0x5 << 2), 0, 0, 1).unwrap();
        assert_eq!(c.ttb0(), 0x1_0000);
    }

    #[test]
    fn start_level_follows_t0sz_and_granule() {
        let cases = [
            (Granule::K4, 16, 0),
            (Granule::K4, 25, 1),
            (Granule::K4, 33, 1),
            (Granule::K4, 34, 2),
            (Granule::K4, 48, 3),
            (Granule::K16, 16, 0),
            (Granule::K16, 17, 1),
            (Granule::K16, 27, 1),
            (Granule::K16, 28, 2),
            (Granule::K64, 16, 1),
            (Granule::K64, 22, 2),
            (Granule::K64, 34, 2),
            (Granule::K64, 35, 3),
            (Granule::K64, 47, 3),
        ];
        for (g, t0sz, level) in cases {
            assert_eq!(
                Config::new(0, g, t0sz).unwrap().start_level(),
                level,
                "{g:?} {t0sz}"
            );
        }
    }

    #[test]
    fn t0sz_out_of_range_is_unsupported() {
        for (g, t0sz) in [
            (Granule::K4, 15),
            (Granule::K4, 49),
            (Granule::K64, 48),
            (Granule::K16, 0),
        ] {
            assert_eq!(
                Config::new(0, g, t0sz),
                Err(WalkFault::new(WalkFaultKind::UnsupportedConfig(
                    Unsupported::T0sz(t0sz)
                )))
            );
        }
    }

    #[test]
    fn granule_4k_four_levels_page_and_blocks_translate() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 16);
        b.map(&mut a, 0x7f_1234_5000, 0x6000, 12, Perm::RW_USER)
            .unwrap();
        b.map(&mut a, 0x40_0020_0000, 0x20_0000, 21, Perm::RW_USER)
            .unwrap();
        b.map(&mut a, 0x80_4000_0000, 0x4000_0000, 30, Perm::RW_USER)
            .unwrap();
        let c = b.config();
        assert_eq!(c.start_level(), 0);
        let p = walk(&c, &m, 0x7f_1234_5678).unwrap();
        assert_eq!(
            (p.page_log2, p.translate(0x7f_1234_5678)),
            (12, Some(0x6678))
        );
        let b2 = walk(&c, &m, 0x40_0021_0000).unwrap();
        assert_eq!(
            (b2.page_log2, b2.translate(0x40_0021_0000)),
            (21, Some(0x21_0000))
        );
        let b1 = walk(&c, &m, 0x80_7fff_0000).unwrap();
        assert_eq!((b1.page_log2, b1.pa_base), (30, 0x4000_0000));
    }

    #[test]
    fn granule_4k_three_levels_translates() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 25);
        b.map(&mut a, 0x7f_ffff_f000, 0x9000, 12, Perm::RW_USER)
            .unwrap();
        let c = b.config();
        assert_eq!(c.start_level(), 1);
        let mut steps = 0;
        let leaf = c
            .walk(&m, 0x7f_ffff_f008, c.root_start(), &mut |_| steps += 1)
            .unwrap();
        assert_eq!(steps, 2);
        assert_eq!(leaf.translate(0x7f_ffff_f008), Some(0x9008));
    }

    #[test]
    fn granule_64k_page_and_512m_block_translate() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K64, 16);
        b.map(&mut a, 0x1234_0001_0000, 0x3_0000, 16, Perm::RW_USER)
            .unwrap();
        b.map(&mut a, 0x2000_2000_0000, 0x2000_0000, 29, Perm::RW_USER)
            .unwrap();
        let c = b.config();
        assert_eq!(c.start_level(), 1);
        let p = walk(&c, &m, 0x1234_0001_fff0).unwrap();
        assert_eq!(
            (p.page_log2, p.translate(0x1234_0001_fff0)),
            (16, Some(0x3_fff0))
        );
        let blk = walk(&c, &m, 0x2000_3fff_0000).unwrap();
        assert_eq!((blk.page_log2, blk.pa_base), (29, 0x2000_0000));
    }

    #[test]
    fn granule_64k_two_levels_translates() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K64, 22);
        b.map(&mut a, 0x3ff_fff0_0000, 0x7_0000, 16, Perm::RW_USER)
            .unwrap();
        let c = b.config();
        assert_eq!(c.start_level(), 2);
        assert_eq!(walk(&c, &m, 0x3ff_fff0_0010).unwrap().pa_base, 0x7_0000);
    }

    #[test]
    fn granule_16k_page_and_32m_block_translate() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K16, 16);
        b.map(&mut a, 0xabc_def0_4000, 0x8000, 14, Perm::RW_USER)
            .unwrap();
        b.map(&mut a, 0x1_0200_0000, 0x200_0000, 25, Perm::RW_USER)
            .unwrap();
        let c = b.config();
        assert_eq!(
            walk(&c, &m, 0xabc_def0_4abc)
                .unwrap()
                .translate(0xabc_def0_4abc),
            Some(0x8abc)
        );
        assert_eq!(walk(&c, &m, 0x1_0300_0000).unwrap().page_log2, 25);
    }

    #[test]
    fn invalid_descriptor_is_not_present_at_its_level() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 16);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::RW_USER).unwrap();
        let c = b.config();
        for level in 0..=3u8 {
            let gpa = b.entry_gpa(&a, 0x1000, level).unwrap();
            let saved = a.read_u64(gpa).unwrap();
            a.write_u64(gpa, saved & !DESC_VALID).unwrap();
            let err = walk(&c, &m, 0x1000).unwrap_err();
            assert_eq!(err, WalkFault::at(WalkFaultKind::NotPresent, level));
            assert!(err.page_request_eligible());
            a.write_u64(gpa, saved).unwrap();
        }
    }

    #[test]
    fn reserved_level3_type_and_disallowed_blocks_are_bad_descriptors() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 16);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::RW_USER).unwrap();
        let c = b.config();
        let l3 = b.entry_gpa(&a, 0x1000, 3).unwrap();
        let e = a.read_u64(l3).unwrap();
        a.write_u64(l3, e & !0b10).unwrap();
        assert!(matches!(
            walk(&c, &m, 0x1000),
            Err(WalkFault {
                kind: WalkFaultKind::BadDescriptor { .. },
                level: Some(3)
            })
        ));
        // A level-0 block does not exist with a 4 KiB granule.
        let l0 = b.entry_gpa(&a, 0x1000, 0).unwrap();
        a.write_u64(l0, DESC_TYPE_BLOCK | DESC_AF).unwrap();
        assert_eq!(
            walk(&c, &m, 0x1000),
            Err(WalkFault::at(
                WalkFaultKind::BadDescriptor {
                    desc: DESC_TYPE_BLOCK | DESC_AF
                },
                0
            ))
        );
    }

    #[test]
    fn level1_block_with_64k_granule_is_a_bad_descriptor() {
        let m = mem();
        let (a, b) = setup(&m, Granule::K64, 16);
        let l1 = b.root() + 8;
        a.write_u64(l1, DESC_TYPE_BLOCK | DESC_AF).unwrap();
        assert!(matches!(
            walk(&b.config(), &m, 1 << 42),
            Err(WalkFault {
                kind: WalkFaultKind::BadDescriptor { .. },
                level: Some(1)
            })
        ));
    }

    #[test]
    fn access_flag_clear_faults_unless_affd() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 16);
        b.map_raw(
            &mut a,
            0x1000,
            0x1000,
            12,
            leaf_attrs(Perm::RW_USER) & !DESC_AF,
        )
        .unwrap();
        let c = b.config();
        let err = walk(&c, &m, 0x1000).unwrap_err();
        assert_eq!(err, WalkFault::at(WalkFaultKind::AccessFlag, 3));
        assert!(!err.page_request_eligible());
        assert!(walk(&c.with_affd(true), &m, 0x1000).is_ok());
    }

    #[test]
    fn input_beyond_t0sz_is_out_of_range() {
        let m = mem();
        let (_a, b) = setup(&m, Granule::K4, 25);
        let c = b.config();
        let va = 1u64 << 39;
        assert_eq!(
            walk(&c, &m, va),
            Err(WalkFault::new(WalkFaultKind::InputOutOfRange { va }))
        );
        let va = 0x0070_0000_0000_0000;
        assert_eq!(
            walk(&c, &m, va),
            Err(WalkFault::new(WalkFaultKind::InputOutOfRange { va }))
        );
    }

    #[test]
    fn epd0_disables_walks() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 16);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::RW_USER).unwrap();
        let c = b.config().with_epd0(true);
        let err = walk(&c, &m, 0x1000).unwrap_err();
        assert_eq!(err, WalkFault::new(WalkFaultKind::WalkDisabled));
        assert!(!err.page_request_eligible());
    }

    #[test]
    fn ttb1_half_faults_by_epd1() {
        let m = mem();
        let (_a, b) = setup(&m, Granule::K4, 16);
        let va = 0xffff_0000_0000_1000;
        assert_eq!(
            walk(&b.config(), &m, va),
            Err(WalkFault::new(WalkFaultKind::WalkDisabled))
        );
        assert_eq!(
            walk(&b.config().with_epd1(false), &m, va),
            Err(WalkFault::new(WalkFaultKind::Ttbr1Unsupported))
        );
    }

    #[test]
    fn tbi0_ignores_the_tag_byte() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 16);
        b.map(&mut a, 0x1000, 0x5000, 12, Perm::RW_USER).unwrap();
        let tagged = 0x5a00_0000_0000_1234;
        let c = b.config();
        assert_eq!(
            walk(&c, &m, tagged),
            Err(WalkFault::new(WalkFaultKind::InputOutOfRange {
                va: tagged
            }))
        );
        let c = c.with_tbi0(true);
        assert_eq!(c.untag(tagged), 0x1234);
        let leaf = walk(&c, &m, tagged).unwrap();
        assert_eq!(leaf.translate(c.untag(tagged)), Some(0x5234));
    }

    #[test]
    fn output_address_beyond_ips_is_an_address_size_fault() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 16);
        b.map(&mut a, 0x1000, 0x1_0000_0000, 12, Perm::RW_USER)
            .unwrap();
        let c = b.config();
        assert_eq!(walk(&c, &m, 0x1000).unwrap().pa_base, 0x1_0000_0000);
        assert_eq!(
            walk(&c.with_ips(0), &m, 0x1000),
            Err(WalkFault::at(
                WalkFaultKind::AddressSize {
                    addr: 0x1_0000_0000
                },
                3
            ))
        );
    }

    #[test]
    fn table_address_beyond_ips_is_an_address_size_fault() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 16);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::RW_USER).unwrap();
        let l1 = b.entry_gpa(&a, 0x1000, 1).unwrap();
        a.write_u64(l1, (1 << 33) | DESC_TYPE_TABLE).unwrap();
        assert_eq!(
            walk(&b.config().with_ips(0), &m, 0x1000),
            Err(WalkFault::at(
                WalkFaultKind::AddressSize { addr: 1 << 33 },
                1
            ))
        );
    }

    #[test]
    fn oa_bits_above_48_are_an_address_size_fault() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 16);
        b.map_raw(
            &mut a,
            0x1000,
            0x1000,
            12,
            leaf_attrs(Perm::RW_USER) | (1 << 48),
        )
        .unwrap();
        assert!(matches!(
            walk(&b.config().with_ips(6), &m, 0x1000),
            Err(WalkFault {
                kind: WalkFaultKind::AddressSize { .. },
                level: Some(3)
            })
        ));
        let (mut a, b) = setup(&m, Granule::K64, 16);
        b.map_raw(
            &mut a,
            0x1_0000,
            0x1_0000,
            16,
            leaf_attrs(Perm::RW_USER) | 0x1000,
        )
        .unwrap();
        assert!(matches!(
            walk(&b.config(), &m, 0x1_0000),
            Err(WalkFault {
                kind: WalkFaultKind::AddressSize { .. },
                level: Some(3)
            })
        ));
    }

    #[test]
    fn table_outside_ram_faults_with_the_address() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 16);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::RW_USER).unwrap();
        let l2 = b.entry_gpa(&a, 0x1000, 2).unwrap();
        a.write_u64(l2, (1 << 40) | DESC_TYPE_TABLE).unwrap();
        assert_eq!(
            walk(&b.config(), &m, 0x1000),
            Err(WalkFault::at(
                WalkFaultKind::TableOutsideRam { gpa: (1 << 40) + 8 },
                3
            ))
        );
    }

    fn check(c: &Config, perm: Perm, access: Access) -> Result<(), Denied> {
        c.check(&perm, access).map_err(|f| match f.kind {
            WalkFaultKind::Permission(d) => d,
            other => panic!("unexpected {other:?}"),
        })
    }

    const PRIV: Access = Access {
        write: false,
        exec: false,
        privileged: true,
    };
    const PRIV_W: Access = Access {
        write: true,
        exec: false,
        privileged: true,
    };
    const PRIV_X: Access = Access {
        write: false,
        exec: true,
        privileged: true,
    };
    const USR_X: Access = Access {
        write: false,
        exec: true,
        privileged: false,
    };

    fn leaf_perm_of(attrs: u64) -> Perm {
        leaf_perm(attrs)
    }

    #[test]
    fn ap_bits_grant_privileged_and_unprivileged_access() {
        let c = Config::new(0, Granule::K4, 16).unwrap();
        // AP[2:1] = 00: privileged RW, no EL0 access.
        let p = leaf_perm_of(0);
        assert_eq!(check(&c, p, PRIV_W), Ok(()));
        assert_eq!(check(&c, p, Access::READ), Err(Denied::User));
        // 01: RW at both.
        let p = leaf_perm_of(DESC_AP_USER);
        assert_eq!(check(&c, p, Access::WRITE), Ok(()));
        // 10: privileged RO.
        let p = leaf_perm_of(DESC_AP_RDONLY);
        assert_eq!(check(&c, p, PRIV), Ok(()));
        assert_eq!(check(&c, p, PRIV_W), Err(Denied::Write));
        assert_eq!(check(&c, p, Access::READ), Err(Denied::User));
        // 11: RO at both.
        let p = leaf_perm_of(DESC_AP_USER | DESC_AP_RDONLY);
        assert_eq!(check(&c, p, Access::READ), Ok(()));
        assert_eq!(check(&c, p, Access::WRITE), Err(Denied::Write));
    }

    #[test]
    fn uxn_and_pxn_refuse_instruction_fetches() {
        let c = Config::new(0, Granule::K4, 16).unwrap();
        let ro = DESC_AP_USER | DESC_AP_RDONLY;
        assert_eq!(check(&c, leaf_perm_of(ro), USR_X), Ok(()));
        assert_eq!(check(&c, leaf_perm_of(ro), PRIV_X), Ok(()));
        assert_eq!(
            check(&c, leaf_perm_of(ro | DESC_UXN), USR_X),
            Err(Denied::Execute)
        );
        assert_eq!(check(&c, leaf_perm_of(ro | DESC_UXN), PRIV_X), Ok(()));
        assert_eq!(
            check(&c, leaf_perm_of(ro | DESC_PXN), PRIV_X),
            Err(Denied::Execute)
        );
        assert_eq!(check(&c, leaf_perm_of(ro | DESC_PXN), USR_X), Ok(()));
    }

    #[test]
    fn el0_writable_pages_are_implicitly_pxn() {
        let c = Config::new(0, Granule::K4, 16).unwrap();
        assert_eq!(
            check(&c, leaf_perm_of(DESC_AP_USER), PRIV_X),
            Err(Denied::Execute)
        );
        assert_eq!(check(&c, leaf_perm_of(0), PRIV_X), Ok(()));
    }

    #[test]
    fn wxn_makes_writable_pages_execute_never() {
        let c = Config::new(0, Granule::K4, 16).unwrap().with_wxn(true);
        assert_eq!(
            check(&c, leaf_perm_of(DESC_AP_USER), USR_X),
            Err(Denied::Execute)
        );
        assert_eq!(check(&c, leaf_perm_of(0), PRIV_X), Err(Denied::Execute));
        assert_eq!(check(&c, leaf_perm_of(DESC_AP_RDONLY), PRIV_X), Ok(()));
    }

    #[test]
    fn pan_refuses_privileged_data_access_to_user_pages() {
        let c = Config::new(0, Granule::K4, 16).unwrap().with_pan(true);
        let user_ro = leaf_perm_of(DESC_AP_USER | DESC_AP_RDONLY);
        assert_eq!(check(&c, user_ro, PRIV), Err(Denied::PrivilegedAccessNever));
        assert_eq!(check(&c, user_ro, PRIV_X), Ok(()));
        assert_eq!(check(&c, leaf_perm_of(0), PRIV_W), Ok(()));
        assert_eq!(check(&c, user_ro, Access::READ), Ok(()));
    }

    #[test]
    fn table_attributes_restrict_the_levels_below() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 16);
        b.map(&mut a, 0x1000, 0x1000, 12, Perm::ALL).unwrap();
        let c = b.config();
        let l1 = b.entry_gpa(&a, 0x1000, 1).unwrap();
        let e = a.read_u64(l1).unwrap();
        for (bit, expect) in [
            (
                TABLE_AP_NO_EL0,
                Perm {
                    user: false,
                    ..Perm::ALL
                },
            ),
            (
                TABLE_AP_RDONLY,
                Perm {
                    write: false,
                    ..Perm::ALL
                },
            ),
            (
                TABLE_PXN,
                Perm {
                    exec: false,
                    ..Perm::ALL
                },
            ),
            (
                TABLE_UXN,
                Perm {
                    user_exec: false,
                    ..Perm::ALL
                },
            ),
        ] {
            a.write_u64(l1, e | bit).unwrap();
            assert_eq!(walk(&c, &m, 0x1000).unwrap().perm, expect, "bit {bit:#x}");
        }
        a.write_u64(l1, e | TABLE_AP_NO_EL0).unwrap();
        let leaf = walk(&c, &m, 0x1000).unwrap();
        assert_eq!(
            c.check(&leaf.perm, Access::READ).unwrap_err().kind,
            WalkFaultKind::Permission(Denied::User)
        );
    }

    #[test]
    fn walk_reports_steps_and_resumes_from_each() {
        let m = mem();
        let (mut a, b) = setup(&m, Granule::K4, 16);
        let va = 0xab_cdef_1000;
        b.map(&mut a, va, 0x2000, 12, Perm::RW_USER).unwrap();
        let c = b.config();
        let mut steps = Vec::new();
        let full = c
            .walk(&m, va, c.root_start(), &mut |s| steps.push(*s))
            .unwrap();
        let levels: Vec<u8> = steps.iter().map(|s| s.level).collect();
        assert_eq!(levels, [0, 1, 2]);
        let shifts: Vec<u8> = steps.iter().map(|s| s.va_shift).collect();
        assert_eq!(shifts, [39, 30, 21]);
        for s in &steps {
            assert_eq!(s.va_prefix, va >> s.va_shift);
            assert_eq!(s.next.level, s.level + 1);
            assert_eq!(c.walk(&m, va, s.next, &mut |_| {}), Ok(full));
        }
        let bad = WalkStart {
            table: c.ttb0(),
            level: 4,
            perm: Perm::ALL,
        };
        assert_eq!(
            c.walk(&m, va, bad, &mut |_| {}),
            Err(WalkFault::new(WalkFaultKind::InvalidStart))
        );
    }

    #[test]
    fn from_tcr_decodes_the_ttb0_fields() {
        // T0SZ 25, EPD0 0, TG0 64K, EPD1 1, IPS 40-bit, TBI0.
        let tcr =
            25 | (u64::from(TG0_64K) << TCR_TG0_SHIFT) | TCR_EPD1 | (2 << TCR_IPS_SHIFT) | TCR_TBI0;
        let c = Config::from_tcr(tcr, 0x4_0001, 0, 0x44ff, 7).unwrap();
        assert_eq!(c.t0sz(), 25);
        assert_eq!(c.granule(), Granule::K64);
        assert_eq!(c.oa_bits(), 40);
        assert!(c.epd1() && !c.epd0() && c.tbi0());
        assert_eq!(c.asid(), 7);
        assert_eq!(c.mair(), 0x44ff);
        assert_eq!(c.ttb0(), 0x4_0000); // CnP and alignment bits dropped
    }

    #[test]
    fn from_tcr_refuses_what_it_cannot_do() {
        let base = 16u64;
        for (tcr, what) in [
            (base | TCR_HA, Unsupported::Httu),
            (base | TCR_HD, Unsupported::Httu),
            (base | TCR_DS, Unsupported::Lpa2),
            (base | (3 << TCR_TG0_SHIFT), Unsupported::Granule(3)),
            (60, Unsupported::T0sz(60)),
        ] {
            assert_eq!(
                Config::from_tcr(tcr, 0, 0, 0, 0),
                Err(WalkFault::new(WalkFaultKind::UnsupportedConfig(what))),
                "{tcr:#x}"
            );
        }
        // With EPD0 = 1 the TTB0 fields are ignored.
        let c = Config::from_tcr(60 | TCR_EPD0 | (3 << TCR_TG0_SHIFT), 0, 0, 0, 0).unwrap();
        assert!(c.epd0());
    }

    #[test]
    fn leaf_attrs_match_linux_io_pgtable() {
        // arm_lpae_prot_to_pte for IOMMU_READ|IOMMU_WRITE|IOMMU_NOEXEC, plus
        // arm_lpae_init_pte's AF | SH_IS.
        assert_eq!(
            leaf_attrs(Perm::RW_USER),
            DESC_AF | DESC_SH_INNER | DESC_NG | DESC_AP_USER | DESC_PXN | DESC_UXN
        );
        assert_eq!(
            leaf_attrs(Perm::RO_USER),
            DESC_AF | DESC_SH_INNER | DESC_NG | DESC_AP_USER | DESC_AP_RDONLY | DESC_PXN | DESC_UXN
        );
    }
}
