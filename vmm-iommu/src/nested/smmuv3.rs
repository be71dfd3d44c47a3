//! Arm SMMUv3 Context Descriptor tables: the linear and 2-level CD tables
//! an STE's S1ContextPtr/S1Fmt/S1CDMax describe (here: an ATTACH_TABLE with
//! PSTF_ARM_SMMU_V3), the default-substream behaviour S1DSS selects for
//! traffic without a SubstreamID, and the 64-byte CD that names the TTB0
//! tables, their granule, sizes, controls and ASID.
//!
//! Layouts are from the SMMUv3 spec §5.2 (STE.S1Fmt, S1CDMax, S1DSS), §5.3
//! (L1CD) and §5.4 (CD), cross-checked against Linux
//! (`drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.h`: `CTXDESC_*`,
//! `STRTAB_STE_*`) and QEMU (`hw/arm/smmuv3-internal.h`: `CD_*`).
//!
//! This device implements SMMUv3.0-style stage 1 with: AArch64 tables only
//! (CD.AA64 = 0 is refused), little-endian tables only (ENDI = 1 refused),
//! 4 KiB/16 KiB/64 KiB granules, STT (T0SZ up to 48/47), a 52-bit OAS
//! (reached with the 64 KiB granule; 48 bits with the others, as without
//! LPA2), no HTTU (HA/HD refused), no E0PD, HAD, PBHA, MPAM, permission
//! indirection, 52-bit input addresses or DS. CD.TTB0 follows the table
//! base rule of [`arm::Config::new`]. Fields that depend on absent features are RES0 and a CD
//! that sets them is refused as having reserved bits; fields the spec makes
//! IGNORED without the feature (NSCFGx, HADx, HWUxx) are ignored.

use super::arm::{self, Granule};
use super::fault::{Unsupported, WalkFault, WalkFaultKind};
use super::memory::TableMemory;
use super::Stage1;

/// Bytes in a CD.
// arm-smmu-v3.h: CTXDESC_CD_DWORDS 8
pub const CD_SIZE: u64 = 64;
/// Bytes in an L1CD.
// arm-smmu-v3.h: struct arm_smmu_cdtab_l1 { __le64 l2ptr; }
pub const L1CD_SIZE: u64 = 8;
/// Largest S1CDMax: SubstreamIDs are 20 bits (SMMU_IDR1.SSIDSIZE ≤ 20).
// SMMUv3 §5.2 S1CDMax: "The allowable range is 0 to SMMU_IDR1.SSIDSIZE inclusive"; arm-smmu-v3.h: IDR1_SSIDSIZE GENMASK(10, 6)
pub const MAX_S1CDMAX: u32 = 20;
/// STE.S1ContextPtr bits 55:6.
// SMMUv3 §5.2 "S1ContextPtr, bits [55:6]"; arm-smmu-v3.h: STRTAB_STE_0_S1CTXPTR_MASK GENMASK_ULL(51, 6)
pub const S1CONTEXTPTR_MASK: u64 = 0x00ff_ffff_ffff_ffc0;

/// L1CD bit 0: valid.
// arm-smmu-v3.h: CTXDESC_L1_DESC_V (1UL << 0); SMMUv3 §5.3 "V, bit [0]"
pub const L1CD_V: u64 = 1 << 0;
/// L1CD bits 55:12: L2Ptr.
// SMMUv3 §5.3 "L2Ptr, bits [55:12]"; arm-smmu-v3.h: CTXDESC_L1_DESC_L2PTR_MASK GENMASK_ULL(51, 12)
pub const L1CD_L2PTR_MASK: u64 = 0x00ff_ffff_ffff_f000;
/// L1CD reserved bits 11:1 and 63:56.
// SMMUv3 §5.3 "Bits [11:1] Reserved, RES0", "Bits [63:56] Reserved, RES0"
pub const L1CD_RSVD: u64 = 0xff00_0000_0000_0ffe;
/// L1CD `L2Ptr[15:12]`, RES0 with 64 KiB leaf tables (S1Fmt = 0b10).
// SMMUv3 §5.2 S1Fmt 0b10: "L2 tables are 64KB-aligned: L1CD.L2Ptr[15:12] are RES0"
pub const L1CD_RSVD_64K: u64 = 0xf000;

/// CD dword 0 bits 5:0: T0SZ.
// arm-smmu-v3.h: CTXDESC_CD_0_TCR_T0SZ GENMASK_ULL(5, 0); QEMU CD_TSZ(x, 0) word[0] 0..6
pub const CD0_T0SZ_MASK: u64 = 0x3f;
/// CD dword 0 bits 7:6: TG0.
// arm-smmu-v3.h: CTXDESC_CD_0_TCR_TG0 GENMASK_ULL(7, 6)
pub const CD0_TG0_SHIFT: u32 = 6;
/// CD dword 0 bits 9:8: IRGN0.
// arm-smmu-v3.h: CTXDESC_CD_0_TCR_IRGN0 GENMASK_ULL(9, 8)
pub const CD0_IRGN0_SHIFT: u32 = 8;
/// CD dword 0 bits 11:10: ORGN0.
// arm-smmu-v3.h: CTXDESC_CD_0_TCR_ORGN0 GENMASK_ULL(11, 10)
pub const CD0_ORGN0_SHIFT: u32 = 10;
/// CD dword 0 bits 13:12: SH0.
// arm-smmu-v3.h: CTXDESC_CD_0_TCR_SH0 GENMASK_ULL(13, 12)
pub const CD0_SH0_SHIFT: u32 = 12;
/// CD dword 0 bit 14: EPD0.
// arm-smmu-v3.h: CTXDESC_CD_0_TCR_EPD0 (1ULL << 14); QEMU CD_EPD(x, 0) word[0] bit 14
pub const CD0_EPD0: u64 = 1 << 14;
/// CD dword 0 bit 15: ENDI.
// arm-smmu-v3.h: CTXDESC_CD_0_ENDI (1UL << 15); QEMU CD_ENDI word[0] bit 15
pub const CD0_ENDI: u64 = 1 << 15;
/// CD dword 0 bit 30: EPD1.
// arm-smmu-v3.h: CTXDESC_CD_0_TCR_EPD1 (1ULL << 30); QEMU CD_EPD(x, 1) word[0] bit 30
pub const CD0_EPD1: u64 = 1 << 30;
/// CD dword 0 bit 31: V.
// arm-smmu-v3.h: CTXDESC_CD_0_V (1UL << 31); QEMU CD_VALID word[0] bit 31
pub const CD0_V: u64 = 1 << 31;
/// CD dword 0 bits 34:32: IPS.
// arm-smmu-v3.h: CTXDESC_CD_0_TCR_IPS GENMASK_ULL(34, 32); QEMU CD_IPS word[1] 0..3
pub const CD0_IPS_SHIFT: u32 = 32;
/// CD dword 0 bit 35: AFFD.
// SMMUv3 §5.4 "AFFD, bit [35]"; QEMU CD_AFFD word[1] bit 3
pub const CD0_AFFD: u64 = 1 << 35;
/// CD dword 0 bit 36: WXN.
// SMMUv3 §5.4 "WXN, bit [36]"
pub const CD0_WXN: u64 = 1 << 36;
/// CD dword 0 bit 37: UWXN.
// SMMUv3 §5.4 "UWXN, bit [37]" (IGNORED with AArch64 tables)
pub const CD0_UWXN: u64 = 1 << 37;
/// CD dword 0 bit 38: TBI0.
// arm-smmu-v3.h: CTXDESC_CD_0_TCR_TBI0 (1ULL << 38); QEMU CD_TBI word[1] 6..8
pub const CD0_TBI0: u64 = 1 << 38;
/// CD dword 0 bit 39: TBI1.
// SMMUv3 §5.4 "TBI1, bit [39]"
pub const CD0_TBI1: u64 = 1 << 39;
/// CD dword 0 bit 40: PAN.
// SMMUv3 §5.4 "PAN, bit [40]"
pub const CD0_PAN: u64 = 1 << 40;
/// CD dword 0 bit 41: AA64.
// arm-smmu-v3.h: CTXDESC_CD_0_AA64 (1UL << 41); QEMU CD_AARCH64 word[1] bit 9
pub const CD0_AA64: u64 = 1 << 41;
/// CD dword 0 bit 42: HD.
// arm-smmu-v3.h: CTXDESC_CD_0_TCR_HD (1UL << 42); QEMU CD_HD word[1] bit 10
pub const CD0_HD: u64 = 1 << 42;
/// CD dword 0 bit 43: HA.
// arm-smmu-v3.h: CTXDESC_CD_0_TCR_HA (1UL << 43); QEMU CD_HA word[1] bit 11
pub const CD0_HA: u64 = 1 << 43;
/// CD dword 0 bit 44: S (stall).
// arm-smmu-v3.h: CTXDESC_CD_0_S (1UL << 44)
pub const CD0_S: u64 = 1 << 44;
/// CD dword 0 bit 45: R (record faults).
// arm-smmu-v3.h: CTXDESC_CD_0_R (1UL << 45)
pub const CD0_R: u64 = 1 << 45;
/// CD dword 0 bit 46: A (abort).
// arm-smmu-v3.h: CTXDESC_CD_0_A (1UL << 46)
pub const CD0_A: u64 = 1 << 46;
/// CD dword 0 bit 47: ASET.
// arm-smmu-v3.h: CTXDESC_CD_0_ASET (1UL << 47)
pub const CD0_ASET: u64 = 1 << 47;
/// CD dword 0 bits 63:48: ASID.
// arm-smmu-v3.h: CTXDESC_CD_0_ASID GENMASK_ULL(63, 48); QEMU CD_ASID word[1] 16..32
pub const CD0_ASID_SHIFT: u32 = 48;
/// CD dword 1 bits 51:4: TTB0.
// arm-smmu-v3.h: CTXDESC_CD_1_TTB0_MASK GENMASK_ULL(51, 4); SMMUv3 §5.4 "TTB0, bits [119:68]"
pub const CD1_TTB0_MASK: u64 = 0x000f_ffff_ffff_fff0;
/// CD dword 1 RES0 bits on this device: E0PD0 (2, no E0PD), HAFT (3, no
/// HTTU), 57:52 (TTB0 above bit 51 and bits 121:120), PnCH (58, no THE),
/// EPAN (59, no EPAN). NSCFG0 (0), HAD0 (1) and HWU0xx (63:60) are IGNORED.
// SMMUv3 §5.4: E0PD0 bit 66, HAFT 67, bits 121:116 RES0, PnCH 122, EPAN 123 (dword 1 bits 2, 3, 57:52, 58, 59)
pub const CD1_RSVD: u64 = 0x0ff0_0000_0000_000c;
/// CD dword 2 RES0 bits on this device: E0PD1 (2), AIE (3), 57:52 (TTB1
/// above bit 51 and bits 185:184), DS (58, no 52-bit), PIE (59).
// SMMUv3 §5.4: E0PD1 bit 130, AIE 131, bits 185:180 RES0, DS 186, PIE 187 (dword 2 bits 2, 3, 57:52, 58, 59)
pub const CD2_RSVD: u64 = 0x0ff0_0000_0000_000c;
/// CD dword 5 RES0 bits on this device: PARTID and PMG (63:32, no MPAM).
// SMMUv3 §5.4: PARTID bits 367:352, PMG above it (dword 5 bits 63:32), RES0 without MPAM
pub const CD5_RSVD: u64 = 0xffff_ffff_0000_0000;

/// TG0 encoding of a 4 KiB granule.
pub const TG0_4K: u8 = arm::TG0_4K;
/// TG0 encoding of a 64 KiB granule.
pub const TG0_64K: u8 = arm::TG0_64K;
/// TG0 encoding of a 16 KiB granule.
pub const TG0_16K: u8 = arm::TG0_16K;

/// STE.S1Fmt: the CD table layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum S1Fmt {
    /// 0b00: a linear array of `1 << S1CDMax` CDs.
    // arm-smmu-v3.h: STRTAB_STE_0_S1FMT_LINEAR 0
    Linear,
    /// 0b01: 2-level, 4 KiB leaf tables of 64 CDs (`SubstreamID[5:0]`).
    TwoLevel4K,
    /// 0b10: 2-level, 64 KiB leaf tables of 1024 CDs (`SubstreamID[9:0]`).
    // arm-smmu-v3.h: STRTAB_STE_0_S1FMT_64K_L2 2, CTXDESC_L2_ENTRIES 1024
    TwoLevel64K,
}

impl S1Fmt {
    /// The format an S1Fmt field selects, as the SMMU acts on it: the
    /// reserved 0b11 is linear (SMMUv3 §5.2 S1Fmt: "0b11 Reserved (behaves
    /// as 0b00)"); `None` for values that do not fit the 2-bit field. The
    /// software IOMMU, ATTACH_TABLE's check and the vfio SMMUv3 backend all
    /// decode through this, so every backend behaves alike.
    pub const fn from_raw(v: u8) -> Option<S1Fmt> {
        match v {
            0 | 3 => Some(S1Fmt::Linear),
            1 => Some(S1Fmt::TwoLevel4K),
            2 => Some(S1Fmt::TwoLevel64K),
            _ => None,
        }
    }

    /// The S1Fmt encoding.
    pub const fn raw(self) -> u8 {
        match self {
            S1Fmt::Linear => 0,
            S1Fmt::TwoLevel4K => 1,
            S1Fmt::TwoLevel64K => 2,
        }
    }

    /// SubstreamID bits a leaf table resolves (2-level formats only).
    pub const fn split(self) -> Option<u32> {
        match self {
            S1Fmt::Linear => None,
            S1Fmt::TwoLevel4K => Some(6),
            S1Fmt::TwoLevel64K => Some(10),
        }
    }
}

/// STE.S1DSS: what traffic without a SubstreamID does while substreams are
/// enabled (S1CDMax > 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum S1Dss {
    /// 0b00: terminated (F_STREAM_DISABLED).
    // arm-smmu-v3.h: STRTAB_STE_1_S1DSS_TERMINATE 0
    Terminate,
    /// 0b01: bypasses stage 1.
    // arm-smmu-v3.h: STRTAB_STE_1_S1DSS_BYPASS 1
    Bypass,
    /// 0b10: translated with CD 0; traffic that names SubstreamID 0 is
    /// terminated.
    // arm-smmu-v3.h: STRTAB_STE_1_S1DSS_SSID0 2
    Ssid0,
}

impl S1Dss {
    /// The behaviour an S1DSS field selects, as the SMMU acts on it: the
    /// reserved 0b11 terminates (SMMUv3 §5.2 S1DSS: "0b11 Reserved
    /// (behaves as 0b00)"); `None` for values that do not fit the 2-bit
    /// field.
    pub const fn from_raw(v: u8) -> Option<S1Dss> {
        match v {
            0 | 3 => Some(S1Dss::Terminate),
            1 => Some(S1Dss::Bypass),
            2 => Some(S1Dss::Ssid0),
            _ => None,
        }
    }

    /// The S1DSS encoding.
    pub const fn raw(self) -> u8 {
        match self {
            S1Dss::Terminate => 0,
            S1Dss::Bypass => 1,
            S1Dss::Ssid0 => 2,
        }
    }
}

/// A decoded Context Descriptor: the fields this device acts on or checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ContextDescriptor {
    /// V.
    pub valid: bool,
    /// T0SZ (6 bits): TTB0 covers `64 - T0SZ` input bits.
    pub t0sz: u8,
    /// TG0 (2 bits): 0 = 4 KiB, 1 = 64 KiB, 2 = 16 KiB.
    pub tg0: u8,
    /// IRGN0/ORGN0/SH0 as bits 13:8 of dword 0 (table-walk attributes;
    /// carried, not used).
    pub walk_attrs: u8,
    /// EPD0: TTB0 walks disabled.
    pub epd0: bool,
    /// EPD1: TTB1 walks disabled.
    pub epd1: bool,
    /// ENDI: big-endian tables.
    pub endi: bool,
    /// IPS (3 bits).
    pub ips: u8,
    /// AFFD: AF = 0 never faults.
    pub affd: bool,
    /// WXN.
    pub wxn: bool,
    /// UWXN (IGNORED with AArch64 tables).
    pub uwxn: bool,
    /// TBI0.
    pub tbi0: bool,
    /// TBI1.
    pub tbi1: bool,
    /// PAN.
    pub pan: bool,
    /// AA64: AArch64 (VMSAv8-64) tables.
    pub aa64: bool,
    /// HD: hardware dirty-state update.
    pub hd: bool,
    /// HA: hardware access-flag update.
    pub ha: bool,
    /// S: stall faults.
    pub s: bool,
    /// R: record faults.
    pub r: bool,
    /// A: abort faulting transactions.
    pub a: bool,
    /// ASET: ASID in the non-shared set.
    pub aset: bool,
    /// ASID.
    pub asid: u16,
    /// TTB0: guest-physical address of the TTB0 start table.
    pub ttb0: u64,
    /// MAIR1:MAIR0.
    pub mair: u64,
}

impl ContextDescriptor {
    /// A valid AArch64 CD for the TTB0 tables at `ttb0`, as Linux writes one
    /// for a DMA domain: EPD1, 48-bit IPS, R, A, ASET, inner-shareable
    /// write-back walks.
    pub fn new(ttb0: u64, t0sz: u8, tg0: u8, asid: u16, mair: u64) -> Self {
        ContextDescriptor {
            valid: true,
            t0sz,
            tg0,
            // IRGN0 = ORGN0 = write-back RA/WA (1), SH0 = inner (3).
            walk_attrs: 0b11_01_01,
            epd1: true,
            ips: 5,
            aa64: true,
            r: true,
            a: true,
            aset: true,
            asid,
            ttb0: ttb0 & CD1_TTB0_MASK,
            mair,
            ..ContextDescriptor::default()
        }
    }

    /// Decodes the eight little-endian dwords of a CD (no validation: see
    /// [`validate`](Self::validate)).
    pub fn decode(words: &[u64; 8]) -> Self {
        let w0 = words[0];
        let f = |m: u64| w0 & m != 0;
        ContextDescriptor {
            valid: f(CD0_V),
            t0sz: (w0 & CD0_T0SZ_MASK) as u8,
            tg0: ((w0 >> CD0_TG0_SHIFT) & 3) as u8,
            walk_attrs: ((w0 >> CD0_IRGN0_SHIFT) & 0x3f) as u8,
            epd0: f(CD0_EPD0),
            epd1: f(CD0_EPD1),
            endi: f(CD0_ENDI),
            ips: ((w0 >> CD0_IPS_SHIFT) & 7) as u8,
            affd: f(CD0_AFFD),
            wxn: f(CD0_WXN),
            uwxn: f(CD0_UWXN),
            tbi0: f(CD0_TBI0),
            tbi1: f(CD0_TBI1),
            pan: f(CD0_PAN),
            aa64: f(CD0_AA64),
            hd: f(CD0_HD),
            ha: f(CD0_HA),
            s: f(CD0_S),
            r: f(CD0_R),
            a: f(CD0_A),
            aset: f(CD0_ASET),
            asid: (w0 >> CD0_ASID_SHIFT) as u16,
            ttb0: words[1] & CD1_TTB0_MASK,
            mair: words[3],
        }
    }

    /// Encodes the CD as eight dwords (fields this type does not model are
    /// zero).
    pub fn encode(&self) -> [u64; 8] {
        let b = |on: bool, m: u64| if on { m } else { 0 };
        let w0 = (u64::from(self.t0sz) & CD0_T0SZ_MASK)
            | (u64::from(self.tg0 & 3) << CD0_TG0_SHIFT)
            | (u64::from(self.walk_attrs & 0x3f) << CD0_IRGN0_SHIFT)
            | b(self.epd0, CD0_EPD0)
            | b(self.endi, CD0_ENDI)
            | b(self.epd1, CD0_EPD1)
            | b(self.valid, CD0_V)
            | (u64::from(self.ips & 7) << CD0_IPS_SHIFT)
            | b(self.affd, CD0_AFFD)
            | b(self.wxn, CD0_WXN)
            | b(self.uwxn, CD0_UWXN)
            | b(self.tbi0, CD0_TBI0)
            | b(self.tbi1, CD0_TBI1)
            | b(self.pan, CD0_PAN)
            | b(self.aa64, CD0_AA64)
            | b(self.hd, CD0_HD)
            | b(self.ha, CD0_HA)
            | b(self.s, CD0_S)
            | b(self.r, CD0_R)
            | b(self.a, CD0_A)
            | b(self.aset, CD0_ASET)
            | (u64::from(self.asid) << CD0_ASID_SHIFT);
        [w0, self.ttb0 & CD1_TTB0_MASK, 0, self.mair, 0, 0, 0, 0]
    }

    /// Checks a raw CD fetched for SubstreamID `ssid`: valid, no reserved
    /// bit set, and nothing this device does not implement (AA64 = 0,
    /// ENDI = 1, HA/HD, a reserved TG0, T0SZ out of range).
    pub fn validate(ssid: u32, words: &[u64; 8]) -> Result<Self, WalkFault> {
        let cd = Self::decode(words);
        // SMMUv3 §5.4 "V": "If this field is 0, the entire rest of the
        // structure is IGNORED" and the transaction records C_BAD_CD.
        if !cd.valid {
            return Err(WalkFault::new(WalkFaultKind::CdInvalid { ssid }));
        }
        let rsvd = [
            (1u8, words[1] & CD1_RSVD),
            (2, words[2] & CD2_RSVD),
            (5, words[5] & CD5_RSVD),
            (6, words[6]),
            (7, words[7]),
        ];
        for (dword, bits) in rsvd {
            if bits != 0 {
                return Err(WalkFault::new(WalkFaultKind::CdReserved {
                    ssid,
                    dword,
                    bits,
                }));
            }
        }
        let unsupported = |what| Err(WalkFault::new(WalkFaultKind::UnsupportedCd { ssid, what }));
        // SMMUv3 §5.4 "AA64": 0 selects VMSAv8-32 LPAE (or VMSAv9-128).
        if !cd.aa64 {
            return unsupported(Unsupported::Aarch32);
        }
        // SMMUv3 §5.4 "ENDI": "If SMMU_IDR0.TTENDIAN == 0b10, it is ILLEGAL
        // to set this field to 1" (IGNORED when both EPDx are 1).
        if cd.endi && !(cd.epd0 && cd.epd1) {
            return unsupported(Unsupported::BigEndian);
        }
        // SMMUv3 §5.4 "HA": "It is ILLEGAL to set HA if SMMU_IDR0.HTTU == 0b00".
        if cd.ha || cd.hd {
            return unsupported(Unsupported::Httu);
        }
        // TG0 and T0SZ are IGNORED when EPD0 = 1.
        if !cd.epd0 {
            let Some(granule) = Granule::from_tg0(cd.tg0) else {
                return unsupported(Unsupported::Granule(cd.tg0));
            };
            // SMMUv3 §5.4 "T0SZ": minimum 16 without 52-bit VAs, maximum 48
            // (47 for 64 KiB) with STT; "a CD is treated as ILLEGAL if it
            // contains a TxSZ value outside the range".
            if !(16..=granule.max_t0sz()).contains(&cd.t0sz) {
                return unsupported(Unsupported::T0sz(cd.t0sz));
            }
        }
        Ok(cd)
    }

    /// The TTB0 regime this (validated) CD describes. `ssid` only labels
    /// faults.
    pub fn stage1(&self, ssid: u32) -> Result<Stage1, WalkFault> {
        let (granule, t0sz) = match Granule::from_tg0(self.tg0) {
            Some(g) if (16..=g.max_t0sz()).contains(&self.t0sz) => (g, self.t0sz),
            // Only reachable with EPD0 = 1 for a validated CD: the fields
            // are IGNORED and every TTB0 walk faults anyway.
            _ if self.epd0 => (Granule::K4, 16),
            Some(_) => {
                return Err(WalkFault::new(WalkFaultKind::UnsupportedCd {
                    ssid,
                    what: Unsupported::T0sz(self.t0sz),
                }))
            }
            None => {
                return Err(WalkFault::new(WalkFaultKind::UnsupportedCd {
                    ssid,
                    what: Unsupported::Granule(self.tg0),
                }))
            }
        };
        let c = arm::Config::new(self.ttb0, granule, t0sz)?
            .with_epd0(self.epd0)
            .with_epd1(self.epd1)
            .with_ips(self.ips)
            .with_tbi0(self.tbi0)
            .with_affd(self.affd)
            .with_pan(self.pan)
            .with_wxn(self.wxn)
            .with_asid(self.asid)
            .with_mair(self.mair);
        Ok(Stage1::Arm(c))
    }
}

/// Which CD a transaction's SubstreamID (or its absence) selects, before
/// any CD is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Substream {
    /// Bypass stage 1 (S1DSS = 0b01 for traffic without a SubstreamID).
    Bypass,
    /// Translate through the CD at this index.
    Ssid(u32),
}

/// What a transaction's SubstreamID (or its absence) resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CdResolution {
    /// Translate through the CD for `ssid` (0 for traffic without a
    /// SubstreamID under S1CDMax = 0 or S1DSS = SSID0).
    Translate {
        /// The CD's index.
        ssid: u32,
        /// The CD.
        cd: ContextDescriptor,
        /// Its TTB0 regime.
        stage1: Stage1,
    },
    /// Bypass stage 1 (S1DSS = 0b01 for traffic without a SubstreamID).
    Bypass,
}

/// A CD table as an STE (or ATTACH_TABLE PSTF_ARM_SMMU_V3) describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CdTable {
    fmt: S1Fmt,
    ptr: u64,
    s1cdmax: u8,
    s1dss: S1Dss,
}

impl CdTable {
    /// The table at `s1contextptr` in format `s1fmt`, with `1 << s1cdmax`
    /// CDs and default-substream behaviour `s1dss` (raw STE encodings).
    /// Pointer bits outside 55:6, and bits below the table's alignment, are
    /// taken as zero (one of the behaviours SMMUv3 §5.2 allows).
    pub fn new(s1contextptr: u64, s1fmt: u8, s1cdmax: u32, s1dss: u8) -> Result<Self, WalkFault> {
        let unsupported = |u| Err(WalkFault::new(WalkFaultKind::UnsupportedConfig(u)));
        let Some(fmt) = S1Fmt::from_raw(s1fmt) else {
            return unsupported(Unsupported::S1Fmt(s1fmt));
        };
        let Some(dss) = S1Dss::from_raw(s1dss) else {
            return unsupported(Unsupported::S1Dss(s1dss));
        };
        if s1cdmax > MAX_S1CDMAX {
            return unsupported(Unsupported::S1CdMax(s1cdmax));
        }
        // s1cdmax ≤ 20: fits.
        let s1cdmax = s1cdmax as u8;
        let mut t = CdTable {
            fmt,
            ptr: 0,
            s1cdmax,
            s1dss: dss,
        };
        t.ptr = s1contextptr & S1CONTEXTPTR_MASK & !(t.top_table_size() - 1);
        Ok(t)
    }

    /// Bytes of the table S1ContextPtr points at: the CD array (linear) or
    /// the L1 table (2-level), at least 64.
    fn top_table_size(&self) -> u64 {
        let bits = match self.fmt.split() {
            _ if self.s1cdmax == 0 => 6,
            None => u32::from(self.s1cdmax) + 6,
            // "If STE.S1CDMax <= split, only index #0 of the L1 table is used."
            Some(split) => u32::from(self.s1cdmax).saturating_sub(split) + 3,
        };
        1u64 << bits.max(6)
    }

    /// The same table with default-substream behaviour `dss`.
    pub fn with_s1dss(mut self, dss: S1Dss) -> Self {
        self.s1dss = dss;
        self
    }

    /// The format.
    pub fn fmt(&self) -> S1Fmt {
        self.fmt
    }

    /// Guest-physical address of the CD array or L1 table.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Log2 of the number of CDs.
    pub fn s1cdmax(&self) -> u8 {
        self.s1cdmax
    }

    /// The default-substream behaviour.
    pub fn s1dss(&self) -> S1Dss {
        self.s1dss
    }

    /// Guest-physical address of the L1CD for `ssid` (2-level formats).
    pub fn l1_gpa(&self, ssid: u32) -> Option<u64> {
        let split = self.fmt.split()?;
        self.ptr.checked_add(u64::from(ssid >> split) * L1CD_SIZE)
    }

    /// Guest-physical address of CD `ssid` (reading its L1CD for 2-level
    /// tables). `ssid` must be below `1 << S1CDMax` (0 when S1CDMax = 0).
    pub fn cd_gpa<M: TableMemory + ?Sized>(&self, mem: &M, ssid: u32) -> Result<u64, WalkFault> {
        if u64::from(ssid) >> self.s1cdmax != 0 {
            return Err(WalkFault::new(WalkFaultKind::CdOutOfRange { ssid }));
        }
        let outside = |gpa| WalkFault::new(WalkFaultKind::TableOutsideRam { gpa });
        // S1CDMax = 0: "STE.S1ContextPtr points at one CD" whatever S1Fmt says.
        let split = match self.fmt.split() {
            Some(split) if self.s1cdmax != 0 => split,
            _ => {
                return self
                    .ptr
                    .checked_add(u64::from(ssid) * CD_SIZE)
                    .ok_or(outside(self.ptr))
            }
        };
        let l1 = self.l1_gpa(ssid).ok_or(outside(self.ptr))?;
        let desc = mem.read_u64(l1).ok_or(outside(l1))?;
        // SMMUv3 §5.3.1: an L1CD with V == 0 terminates the transaction
        // with C_BAD_SUBSTREAMID.
        if desc & L1CD_V == 0 {
            return Err(WalkFault::new(WalkFaultKind::CdL1Invalid { ssid }));
        }
        let mut rsvd = L1CD_RSVD;
        if self.fmt == S1Fmt::TwoLevel64K {
            rsvd |= L1CD_RSVD_64K;
        }
        if desc & rsvd != 0 {
            return Err(WalkFault::new(WalkFaultKind::CdL1Reserved {
                ssid,
                bits: desc & rsvd,
            }));
        }
        let index = u64::from(ssid) & ((1u64 << split) - 1);
        let l2 = desc & L1CD_L2PTR_MASK;
        l2.checked_add(index * CD_SIZE).ok_or(outside(l2))
    }

    /// Reads and validates CD `ssid` (no S1DSS logic: the index as is).
    pub fn cd<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        ssid: u32,
    ) -> Result<ContextDescriptor, WalkFault> {
        let gpa = self.cd_gpa(mem, ssid)?;
        let mut bytes = [0u8; CD_SIZE as usize];
        mem.read_bytes(gpa, &mut bytes)
            .ok_or(WalkFault::new(WalkFaultKind::TableOutsideRam { gpa }))?;
        let mut words = [0u64; 8];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
        }
        ContextDescriptor::validate(ssid, &words)
    }

    /// Which CD a transaction with SubstreamID `ssid` (or none) uses, per
    /// SMMUv3 §5.2 S1CDMax and S1DSS, without reading memory:
    /// - S1CDMax = 0: no SubstreamID → CD 0; any SubstreamID →
    ///   C_BAD_SUBSTREAMID ([`WalkFaultKind::CdOutOfRange`]);
    /// - otherwise a SubstreamID below `1 << S1CDMax` selects its CD (except
    ///   0 under S1DSS = SSID0, which is terminated); none follows S1DSS:
    ///   terminate ([`WalkFaultKind::SubstreamRequired`]), bypass, or CD 0.
    pub fn resolve_ssid(&self, ssid: Option<u32>) -> Result<Substream, WalkFault> {
        let index = match ssid {
            None if self.s1cdmax == 0 => 0,
            None => match self.s1dss {
                S1Dss::Terminate => return Err(WalkFault::new(WalkFaultKind::SubstreamRequired)),
                S1Dss::Bypass => return Ok(Substream::Bypass),
                S1Dss::Ssid0 => 0,
            },
            Some(s) if self.s1cdmax == 0 => {
                return Err(WalkFault::new(WalkFaultKind::CdOutOfRange { ssid: s }))
            }
            // S1DSS = 0b10: "Transactions that include a substream and select
            // Substream 0 are terminated."
            Some(0) if self.s1dss == S1Dss::Ssid0 => {
                return Err(WalkFault::new(WalkFaultKind::CdOutOfRange { ssid: 0 }))
            }
            Some(s) if u64::from(s) >> self.s1cdmax != 0 => {
                return Err(WalkFault::new(WalkFaultKind::CdOutOfRange { ssid: s }))
            }
            Some(s) => s,
        };
        Ok(Substream::Ssid(index))
    }

    /// The TTB0 regime of CD `index` (read and validated now).
    pub fn stage1<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        index: u32,
    ) -> Result<Stage1, WalkFault> {
        self.cd(mem, index)?.stage1(index)
    }

    /// [`resolve_ssid`](Self::resolve_ssid), then the CD it selects.
    pub fn resolve<M: TableMemory + ?Sized>(
        &self,
        mem: &M,
        ssid: Option<u32>,
    ) -> Result<CdResolution, WalkFault> {
        let index = match self.resolve_ssid(ssid)? {
            Substream::Bypass => return Ok(CdResolution::Bypass),
            Substream::Ssid(index) => index,
        };
        let cd = self.cd(mem, index)?;
        let stage1 = cd.stage1(index)?;
        Ok(CdResolution::Translate {
            ssid: index,
            cd,
            stage1,
        })
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::nested::build::{ArmTableBuilder, CdTableBuilder, TableAlloc};
    use crate::nested::{Access, Perm};

    const RAM: u64 = 16 << 20;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    fn cd_for(ttb0: u64, asid: u16) -> ContextDescriptor {
        ContextDescriptor::new(ttb0, 16, TG0_4K, asid, 0x0000_0000_0044_ff04)
    }

    fn translate(r: CdResolution) -> (u32, Stage1) {
        match r {
            CdResolution::Translate { ssid, stage1, .. } => (ssid, stage1),
            CdResolution::Bypass => panic!("expected a translation"),
        }
    }

    fn err(kind: WalkFaultKind) -> Result<CdResolution, WalkFault> {
        Err(WalkFault::new(kind))
    }

    #[test]
    fn cd_encodes_at_linux_bit_positions() {
        let cd = cd_for(0x1234_5000, 0xabcd);
        let w = cd.encode();
        let expect0 = 16                       // T0SZ
            | (0b11_01_01 << 8)                // IRGN0, ORGN0, SH0
            | CD0_EPD1 | CD0_V
            | (5 << 32)                        // IPS 48-bit
            | CD0_AA64 | CD0_R | CD0_A | CD0_ASET
            | (0xabcd << 48);
        assert_eq!(w[0], expect0);
        assert_eq!(w[1], 0x1234_5000);
        assert_eq!(w[3], 0x0000_0000_0044_ff04);
        assert_eq!(ContextDescriptor::decode(&w), cd);
    }

    #[test]
    fn cd_decode_reads_every_modelled_field() {
        let mut cd = cd_for(0xf_ffff_ffff_fff0, 1);
        cd.epd0 = true;
        cd.affd = true;
        cd.wxn = true;
        cd.uwxn = true;
        cd.tbi0 = true;
        cd.tbi1 = true;
        cd.pan = true;
        cd.s = true;
        cd.tg0 = TG0_16K;
        cd.t0sz = 39;
        cd.ips = 2;
        assert_eq!(ContextDescriptor::decode(&cd.encode()), cd);
        // QEMU's view of the same words: CD_AFFD word[1] bit 3, CD_AARCH64 word[1] bit 9.
        let w = cd.encode();
        assert_eq!((w[0] >> 32) & (1 << 3), 1 << 3);
        assert_eq!((w[0] >> 32) & (1 << 9), 1 << 9);
    }

    #[test]
    fn linear_table_selects_the_cd_by_substream() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::linear(&mut a, 4).unwrap();
        for ssid in [1u32, 7, 15] {
            t.set_cd(
                &mut a,
                ssid,
                &cd_for(0x40_0000 + u64::from(ssid) * 0x1000, ssid as u16),
            )
            .unwrap();
        }
        for ssid in [1u32, 7, 15] {
            let (idx, s1) = translate(t.table().resolve(&m, Some(ssid)).unwrap());
            assert_eq!(idx, ssid);
            assert_eq!(s1.archid(), Some(u64::from(ssid)));
            assert_eq!(s1.root().table, 0x40_0000 + u64::from(ssid) * 0x1000);
        }
        assert_eq!(t.table().cd_gpa(&m, 7), Ok(t.table().ptr() + 7 * 64));
    }

    #[test]
    fn two_level_4k_table_splits_at_bit_6() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::two_level(&mut a, 12, S1Fmt::TwoLevel4K).unwrap();
        t.set_cd(&mut a, 0x3c5, &cd_for(0x50_0000, 5)).unwrap();
        let gpa = t.table().cd_gpa(&m, 0x3c5).unwrap();
        let l1 = m.read_u64(t.table().l1_gpa(0x3c5).unwrap()).unwrap();
        assert_eq!(
            t.table().l1_gpa(0x3c5),
            Some(t.table().ptr() + (0x3c5 >> 6) * 8)
        );
        assert_eq!(gpa, (l1 & L1CD_L2PTR_MASK) + (0x3c5 & 63) * 64);
        let (_, s1) = translate(t.table().resolve(&m, Some(0x3c5)).unwrap());
        assert_eq!(s1.archid(), Some(5));
    }

    #[test]
    fn two_level_64k_table_splits_at_bit_10() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::two_level(&mut a, 20, S1Fmt::TwoLevel64K).unwrap();
        t.set_cd(&mut a, 0xfffff, &cd_for(0x50_0000, 9)).unwrap();
        t.set_cd(&mut a, 0x400, &cd_for(0x60_0000, 10)).unwrap();
        assert_eq!(
            t.table().l1_gpa(0xfffff),
            Some(t.table().ptr() + (0xfffff >> 10) * 8)
        );
        let (_, s1) = translate(t.table().resolve(&m, Some(0xfffff)).unwrap());
        assert_eq!(s1.archid(), Some(9));
        let (_, s1) = translate(t.table().resolve(&m, Some(0x400)).unwrap());
        assert_eq!(s1.archid(), Some(10));
    }

    #[test]
    fn two_level_with_small_s1cdmax_uses_l1_index_0() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::two_level(&mut a, 3, S1Fmt::TwoLevel4K).unwrap();
        t.set_cd(&mut a, 5, &cd_for(0x50_0000, 5)).unwrap();
        assert_eq!(t.table().l1_gpa(5), Some(t.table().ptr()));
        assert!(t.table().resolve(&m, Some(5)).is_ok());
        assert_eq!(
            t.table().resolve(&m, Some(8)),
            err(WalkFaultKind::CdOutOfRange { ssid: 8 })
        );
    }

    #[test]
    fn substream_beyond_s1cdmax_is_out_of_range() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::linear(&mut a, 4).unwrap();
        for ssid in [16u32, 0x10_0000, u32::MAX] {
            assert_eq!(
                t.table().resolve(&m, Some(ssid)),
                err(WalkFaultKind::CdOutOfRange { ssid })
            );
        }
    }

    #[test]
    fn s1cdmax_zero_refuses_substreams_and_uses_cd_0_without() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::linear(&mut a, 0).unwrap();
        t.set_cd(&mut a, 0, &cd_for(0x50_0000, 3)).unwrap();
        assert_eq!(
            t.table().resolve(&m, Some(0)),
            err(WalkFaultKind::CdOutOfRange { ssid: 0 })
        );
        let (idx, s1) = translate(t.table().resolve(&m, None).unwrap());
        assert_eq!((idx, s1.archid()), (0, Some(3)));
    }

    #[test]
    fn s1dss_governs_traffic_without_a_substream() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::linear(&mut a, 2).unwrap();
        t.set_cd(&mut a, 0, &cd_for(0x50_0000, 1)).unwrap();
        t.set_cd(&mut a, 1, &cd_for(0x60_0000, 2)).unwrap();
        let term = t.with_s1dss(S1Dss::Terminate);
        assert_eq!(
            term.table().resolve(&m, None),
            err(WalkFaultKind::SubstreamRequired)
        );
        assert!(term.table().resolve(&m, Some(0)).is_ok());
        let bypass = t.with_s1dss(S1Dss::Bypass);
        assert_eq!(bypass.table().resolve(&m, None), Ok(CdResolution::Bypass));
        let ssid0 = t.with_s1dss(S1Dss::Ssid0);
        let (idx, s1) = translate(ssid0.table().resolve(&m, None).unwrap());
        assert_eq!((idx, s1.archid()), (0, Some(1)));
        assert_eq!(
            ssid0.table().resolve(&m, Some(0)),
            err(WalkFaultKind::CdOutOfRange { ssid: 0 })
        );
        assert!(ssid0.table().resolve(&m, Some(1)).is_ok());
    }

    #[test]
    fn l1_descriptor_invalid_or_reserved_faults() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::two_level(&mut a, 10, S1Fmt::TwoLevel4K).unwrap();
        assert_eq!(
            t.table().resolve(&m, Some(0x41)),
            err(WalkFaultKind::CdL1Invalid { ssid: 0x41 })
        );
        t.set_cd(&mut a, 0x41, &cd_for(0x50_0000, 1)).unwrap();
        let l1 = t.table().l1_gpa(0x41).unwrap();
        let d = m.read_u64(l1).unwrap();
        a.write_u64(l1, d | 0x2).unwrap();
        assert_eq!(
            t.table().resolve(&m, Some(0x41)),
            err(WalkFaultKind::CdL1Reserved {
                ssid: 0x41,
                bits: 0x2
            })
        );
        a.write_u64(l1, d | (1 << 60)).unwrap();
        assert_eq!(
            t.table().resolve(&m, Some(0x41)),
            err(WalkFaultKind::CdL1Reserved {
                ssid: 0x41,
                bits: 1 << 60
            })
        );
    }

    #[test]
    fn l1_pointer_with_64k_low_bits_is_reserved() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::two_level(&mut a, 12, S1Fmt::TwoLevel64K).unwrap();
        t.set_cd(&mut a, 1, &cd_for(0x50_0000, 1)).unwrap();
        let l1 = t.table().l1_gpa(1).unwrap();
        let d = m.read_u64(l1).unwrap();
        a.write_u64(l1, d | 0x1000).unwrap();
        assert_eq!(
            t.table().resolve(&m, Some(1)),
            err(WalkFaultKind::CdL1Reserved {
                ssid: 1,
                bits: 0x1000
            })
        );
    }

    #[test]
    fn cd_not_valid_faults() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::linear(&mut a, 2).unwrap();
        assert_eq!(
            t.table().resolve(&m, Some(2)),
            err(WalkFaultKind::CdInvalid { ssid: 2 })
        );
        t.set_cd(&mut a, 2, &cd_for(0x50_0000, 1)).unwrap();
        t.clear_cd(&mut a, 2).unwrap();
        assert_eq!(
            t.table().resolve(&m, Some(2)),
            err(WalkFaultKind::CdInvalid { ssid: 2 })
        );
    }

    #[test]
    fn unsupported_cd_settings_are_refused() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::linear(&mut a, 1).unwrap();
        let base = cd_for(0x50_0000, 1);
        type Edit = fn(&mut ContextDescriptor);
        let cases: [(Edit, Unsupported); 7] = [
            (|c| c.aa64 = false, Unsupported::Aarch32),
            (|c| c.endi = true, Unsupported::BigEndian),
            (|c| c.ha = true, Unsupported::Httu),
            (|c| c.hd = true, Unsupported::Httu),
            (|c| c.tg0 = 3, Unsupported::Granule(3)),
            (|c| c.t0sz = 60, Unsupported::T0sz(60)),
            (|c| c.t0sz = 12, Unsupported::T0sz(12)),
        ];
        for (edit, what) in cases {
            let mut cd = base;
            edit(&mut cd);
            t.set_cd(&mut a, 1, &cd).unwrap();
            assert_eq!(
                t.table().resolve(&m, Some(1)),
                err(WalkFaultKind::UnsupportedCd { ssid: 1, what }),
                "{what}"
            );
        }
        // 64 KiB tables allow at most T0SZ 47.
        let mut cd = base;
        cd.tg0 = TG0_64K;
        cd.t0sz = 48;
        t.set_cd(&mut a, 1, &cd).unwrap();
        assert_eq!(
            t.table().resolve(&m, Some(1)),
            err(WalkFaultKind::UnsupportedCd {
                ssid: 1,
                what: Unsupported::T0sz(48)
            })
        );
    }

    #[test]
    fn epd0_cd_ignores_ttb0_fields_and_disables_walks() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::linear(&mut a, 1).unwrap();
        let mut cd = cd_for(0x50_0000, 1);
        cd.epd0 = true;
        cd.tg0 = 3;
        cd.t0sz = 63;
        t.set_cd(&mut a, 1, &cd).unwrap();
        let (_, s1) = translate(t.table().resolve(&m, Some(1)).unwrap());
        assert_eq!(
            s1.walk_from_root(&m, 0x1000),
            Err(WalkFault::new(WalkFaultKind::WalkDisabled))
        );
    }

    #[test]
    fn cd_reserved_bits_fault_per_dword() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let t = CdTableBuilder::linear(&mut a, 1).unwrap();
        let good = cd_for(0x50_0000, 1).encode();
        for (dword, bit) in [
            (1usize, 1u64 << 2),
            (1, 1 << 55),
            (1, 1 << 59),
            (2, 1 << 58),
            (5, 1 << 40),
            (6, 1),
            (7, 1 << 63),
        ] {
            let mut w = good;
            w[dword] |= bit;
            t.write_raw_cd(&mut a, 1, &w).unwrap();
            assert_eq!(
                t.table().resolve(&m, Some(1)),
                err(WalkFaultKind::CdReserved {
                    ssid: 1,
                    dword: dword as u8,
                    bits: bit
                }),
                "dword {dword} bit {bit:#x}"
            );
        }
        // Bits the spec makes IGNORED without the feature are accepted.
        let mut w = good;
        w[1] |= 0b11 | (0xf << 60); // NSCFG0, HAD0, HWU0xx
        w[4] = 0xdead_beef; // AMAIR (IMPLEMENTATION DEFINED)
        t.write_raw_cd(&mut a, 1, &w).unwrap();
        assert!(t.table().resolve(&m, Some(1)).is_ok());
    }

    #[test]
    fn cd_table_outside_ram_faults_with_the_address() {
        let m = mem();
        let t = CdTable::new(RAM, 0, 4, 0).unwrap();
        assert_eq!(
            t.resolve(&m, Some(3)),
            err(WalkFaultKind::TableOutsideRam { gpa: RAM + 3 * 64 })
        );
        let t = CdTable::new(RAM, 1, 10, 0).unwrap();
        assert_eq!(
            t.resolve(&m, Some(0x41)),
            err(WalkFaultKind::TableOutsideRam { gpa: RAM + 8 })
        );
        let f = t.resolve(&m, Some(0x41)).unwrap_err();
        assert_eq!(f.virtio_reason(), crate::wire::VIRTIO_IOMMU_FAULT_R_DOMAIN);
    }

    #[test]
    fn table_config_refuses_reserved_encodings() {
        let cfg = |u| Err(WalkFault::new(WalkFaultKind::UnsupportedConfig(u)));
        assert_eq!(CdTable::new(0, 4, 4, 0), cfg(Unsupported::S1Fmt(4)));
        assert_eq!(CdTable::new(0, 0, 4, 4), cfg(Unsupported::S1Dss(4)));
        assert_eq!(CdTable::new(0, 0, 21, 0), cfg(Unsupported::S1CdMax(21)));
    }

    #[test]
    fn issue10_reserved_s1fmt_and_s1dss_0b11_behave_as_0b00() {
        // SMMUv3 §5.2: S1Fmt "0b11 Reserved (behaves as 0b00)", S1DSS
        // "0b11 Reserved (behaves as 0b00)".
        let reserved = CdTable::new(0x4_0000, 3, 4, 3).unwrap();
        assert_eq!(reserved, CdTable::new(0x4_0000, 0, 4, 0).unwrap());
        assert_eq!(reserved.fmt(), S1Fmt::Linear);
        assert_eq!(reserved.s1dss(), S1Dss::Terminate);
        assert_eq!(
            reserved.resolve_ssid(None),
            Err(WalkFault::new(WalkFaultKind::SubstreamRequired))
        );
        assert_eq!(reserved.resolve_ssid(Some(9)), Ok(Substream::Ssid(9)));
    }

    #[test]
    fn context_pointer_is_aligned_to_the_table() {
        let t = CdTable::new(0x1234_5678, 0, 4, 0).unwrap();
        assert_eq!(t.ptr(), 0x1234_5400); // 16 CDs: 1 KiB alignment
        let t = CdTable::new(0x1234_5678, 1, 20, 0).unwrap();
        assert_eq!(t.ptr(), 0x1234_0000); // 2^14 L1CDs: 128 KiB
        let t = CdTable::new(0xff12_3456_7890_abcd, 2, 0, 0).unwrap();
        assert_eq!(t.ptr(), 0x0012_3456_7890_abc0); // bits 55:6
    }

    #[test]
    fn translation_through_a_cd_honours_its_controls() {
        let m = mem();
        let mut a = TableAlloc::new(&m, 0x10_0000, RAM);
        let pt = ArmTableBuilder::new(&mut a, arm::Granule::K64, 20).unwrap();
        pt.map(&mut a, 0x10_0000, 0x20_0000, 16, Perm::RO_USER)
            .unwrap();
        let t = CdTableBuilder::linear(&mut a, 1).unwrap();
        let mut cd = ContextDescriptor::new(pt.root(), 20, TG0_64K, 77, 0);
        cd.pan = true;
        t.set_cd(&mut a, 1, &cd).unwrap();
        let (_, s1) = translate(t.table().resolve(&m, Some(1)).unwrap());
        let leaf = s1.translate(&m, 0x10_1234, Access::READ).unwrap();
        assert_eq!(leaf.translate(0x10_1234), Some(0x20_1234));
        let priv_read = Access {
            write: false,
            exec: false,
            privileged: true,
        };
        assert!(s1.check(&leaf, priv_read).is_err()); // PAN
        assert!(s1.check(&leaf, Access::WRITE).is_err());
    }
}
