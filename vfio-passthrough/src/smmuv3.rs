//! Arm SMMUv3 nesting, table passthrough: the guest's Context Descriptor
//! table is bound as is, through a nested HWPT whose data is the first two
//! words of a Stream Table Entry (`iommu_hwpt_arm_smmuv3`), and generic
//! invalidations become CMDQ commands (`iommu_viommu_arm_smmuv3_invalidate`)
//! sent to the vIOMMU.
//!
//! Pure functions; no ioctl. Field positions and opcodes are those of
//! drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.h (`STRTAB_STE_*`, `CMDQ_*`,
//! `EVTQ_*`, `IDR*`); which fields the kernel lets userspace set are
//! `STRTAB_STE_{0,1}_NESTING_ALLOWED` (arm-smmu-v3.h) and the per-opcode
//! checks of `arm_vsmmu_convert_user_cmd` (arm-smmu-v3-iommufd.c).

use iommufd_bindings::iommufd::{iommu_hwpt_arm_smmuv3, iommu_viommu_arm_smmuv3_invalidate};
use vmm_iommu::backend::BackendError;
use vmm_iommu::invalidation::{Caches, Invalidation, Scope, VaRange};
use vmm_iommu::nested::smmuv3::{S1Dss, S1Fmt};
use vmm_iommu::wire::TableDesc;

use crate::ram::GuestRam;

/// Builds a `GENMASK_ULL(h, l)`.
const fn genmask(h: u32, l: u32) -> u64 {
    (u64::MAX >> (63 - h)) & (u64::MAX << l)
}

/// Puts `v` into the field `mask` (`FIELD_PREP`).
#[inline]
const fn field_prep(mask: u64, v: u64) -> u64 {
    (v << mask.trailing_zeros()) & mask
}

/// `STRTAB_STE_0_V`.
pub const STE_0_V: u64 = 1 << 0;
/// `STRTAB_STE_0_CFG`, bits 3:1.
pub const STE_0_CFG: u64 = genmask(3, 1);
/// `STRTAB_STE_0_CFG_S1_TRANS`.
pub const STE_0_CFG_S1_TRANS: u64 = 5;
/// `STRTAB_STE_0_S1FMT`, bits 5:4.
pub const STE_0_S1FMT: u64 = genmask(5, 4);
/// `STRTAB_STE_0_S1CTXPTR_MASK`, bits 51:6.
pub const STE_0_S1CTXPTR_MASK: u64 = genmask(51, 6);
/// `STRTAB_STE_0_S1CDMAX`, bits 63:59.
pub const STE_0_S1CDMAX: u64 = genmask(63, 59);
/// `STRTAB_STE_1_S1DSS`, bits 1:0.
pub const STE_1_S1DSS: u64 = genmask(1, 0);
/// `STRTAB_STE_1_S1CIR`, bits 3:2.
pub const STE_1_S1CIR: u64 = genmask(3, 2);
/// `STRTAB_STE_1_S1COR`, bits 5:4.
pub const STE_1_S1COR: u64 = genmask(5, 4);
/// `STRTAB_STE_1_S1CSH`, bits 7:6.
pub const STE_1_S1CSH: u64 = genmask(7, 6);
/// `STRTAB_STE_1_S1C_CACHE_WBRA`: CD fetches write-back read-allocate.
pub const STE_1_S1C_CACHE_WBRA: u64 = 1;
/// `ARM_SMMU_SH_ISH`: inner shareable.
pub const SH_ISH: u64 = 3;
/// `STRTAB_STE_0_NESTING_ALLOWED`: V, Cfg, S1Fmt, S1ContextPtr, S1CDMax.
pub const STE_0_NESTING_ALLOWED: u64 =
    STE_0_V | STE_0_CFG | STE_0_S1FMT | STE_0_S1CTXPTR_MASK | STE_0_S1CDMAX;
/// `STRTAB_STE_1_NESTING_ALLOWED`: S1DSS, S1CIR, S1COR, S1CSH, S1STALLD
/// (bit 27), EATS (bits 29:28).
pub const STE_1_NESTING_ALLOWED: u64 =
    STE_1_S1DSS | STE_1_S1CIR | STE_1_S1COR | STE_1_S1CSH | 1 << 27 | genmask(29, 28);

/// `CMDQ_0_OP`, bits 7:0.
pub const CMDQ_0_OP: u64 = genmask(7, 0);
/// `CMDQ_0_SSV`: the command carries a SubstreamID.
pub const CMDQ_0_SSV: u64 = 1 << 11;
/// `CMDQ_OP_CFGI_CD`.
pub const CMDQ_OP_CFGI_CD: u64 = 0x05;
/// `CMDQ_OP_CFGI_CD_ALL`.
pub const CMDQ_OP_CFGI_CD_ALL: u64 = 0x06;
/// `CMDQ_OP_TLBI_NH_ALL`.
pub const CMDQ_OP_TLBI_NH_ALL: u64 = 0x10;
/// `CMDQ_OP_TLBI_NH_ASID`.
pub const CMDQ_OP_TLBI_NH_ASID: u64 = 0x11;
/// `CMDQ_OP_TLBI_NH_VA`.
pub const CMDQ_OP_TLBI_NH_VA: u64 = 0x12;
/// `CMDQ_OP_TLBI_NH_VAA`.
pub const CMDQ_OP_TLBI_NH_VAA: u64 = 0x13;
/// `CMDQ_OP_ATC_INV`.
pub const CMDQ_OP_ATC_INV: u64 = 0x40;
/// `CMDQ_CFGI_0_SSID`, bits 31:12.
pub const CMDQ_CFGI_0_SSID: u64 = genmask(31, 12);
/// `CMDQ_CFGI_0_SID`, bits 63:32.
pub const CMDQ_CFGI_0_SID: u64 = genmask(63, 32);
/// `CMDQ_CFGI_1_LEAF`.
pub const CMDQ_CFGI_1_LEAF: u64 = 1 << 0;
/// `CMDQ_TLBI_0_NUM`, bits 16:12.
pub const CMDQ_TLBI_0_NUM: u64 = genmask(16, 12);
/// `CMDQ_TLBI_0_SCALE`, bits 24:20.
pub const CMDQ_TLBI_0_SCALE: u64 = genmask(24, 20);
/// `CMDQ_TLBI_0_ASID`, bits 63:48.
pub const CMDQ_TLBI_0_ASID: u64 = genmask(63, 48);
/// `CMDQ_TLBI_1_LEAF`.
pub const CMDQ_TLBI_1_LEAF: u64 = 1 << 0;
/// `CMDQ_TLBI_1_TTL`, bits 9:8.
pub const CMDQ_TLBI_1_TTL: u64 = genmask(9, 8);
/// `CMDQ_TLBI_1_TG`, bits 11:10.
pub const CMDQ_TLBI_1_TG: u64 = genmask(11, 10);
/// `CMDQ_TLBI_1_VA_MASK`, bits 63:12.
pub const CMDQ_TLBI_1_VA_MASK: u64 = genmask(63, 12);
/// `CMDQ_TLBI_RANGE_NUM_MAX`: NUM is 5 bits.
pub const CMDQ_TLBI_RANGE_NUM_MAX: u64 = 31;
/// `CMDQ_ATC_0_SSID`, bits 31:12.
pub const CMDQ_ATC_0_SSID: u64 = genmask(31, 12);
/// `CMDQ_ATC_0_SID`, bits 63:32.
pub const CMDQ_ATC_0_SID: u64 = genmask(63, 32);
/// `CMDQ_ATC_0_GLOBAL`.
pub const CMDQ_ATC_0_GLOBAL: u64 = 1 << 9;
/// `CMDQ_ATC_1_SIZE`, bits 5:0.
pub const CMDQ_ATC_1_SIZE: u64 = genmask(5, 0);
/// `CMDQ_ATC_1_ADDR_MASK`, bits 63:12.
pub const CMDQ_ATC_1_ADDR_MASK: u64 = genmask(63, 12);
/// `ATC_INV_SIZE_ALL`: a size of 2^52 pages means everything.
pub const ATC_INV_SIZE_ALL: u64 = 52;

/// Past this many page-by-page TLBI commands for one range, one ASID-wide
/// (or VMID-wide) command is cheaper and bounds what one guest request can
/// queue: Linux's `CMDQ_MAX_TLBI_OPS` (`1 << (PAGE_SHIFT - 3)`, 512 with
/// 4 KiB pages) makes the same choice in `arm_smmu_tlb_inv_range_asid`.
pub const MAX_TLBI_OPS: u64 = 512;

/// What the host SMMU reports in `struct iommu_hw_info_arm_smmuv3`, only
/// the fields the uAPI says userspace may read (iommufd.h: `idr[0]` ST_LEVEL,
/// STALL_MODEL, TTENDIAN, CD2L, ASID16, TTF; `idr[1]` SIDSIZE, SSIDSIZE;
/// `idr[3]` BBML, RIL; `idr[5]` VAX, GRAN64K, GRAN16K, GRAN4K).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmmuHw {
    /// IDR0..IDR5.
    pub idr: [u32; 6],
}

impl SmmuHw {
    /// `IDR0_CD2L`: two-level CD tables.
    pub fn cd2l(&self) -> bool {
        self.idr[0] & 1 << 19 != 0
    }
    /// `IDR0_ASID16`: 16-bit ASIDs, else 8.
    pub fn asid_bits(&self) -> u8 {
        if self.idr[0] & 1 << 12 != 0 {
            16
        } else {
            8
        }
    }
    /// `IDR0_ATS`.
    pub fn ats(&self) -> bool {
        self.idr[0] & 1 << 10 != 0
    }
    /// `IDR1_SSIDSIZE`, bits 10:6.
    pub fn ssid_bits(&self) -> u8 {
        (self.idr[1] >> 6 & 0x1f) as u8
    }
    /// `IDR3_RIL`: range invalidation.
    pub fn ril(&self) -> bool {
        self.idr[3] & 1 << 10 != 0
    }
    /// Page sizes from `IDR5_GRAN4K/16K/64K` with the block sizes of each
    /// granule (as `arm_smmu_device_hw_probe` builds `pgsize_bitmap`).
    pub fn page_size_mask(&self) -> u64 {
        let mut m = 0;
        if self.idr[5] & 1 << 4 != 0 {
            m |= 1 << 12 | 1 << 21 | 1 << 30;
        }
        if self.idr[5] & 1 << 5 != 0 {
            m |= 1 << 14 | 1 << 25;
        }
        if self.idr[5] & 1 << 6 != 0 {
            m |= 1 << 16 | 1 << 29;
        }
        m
    }
    /// Input address bits: 52 with `IDR5_VAX_52_BIT`, else 48.
    pub fn ias_bits(&self) -> u8 {
        if self.idr[5] >> 10 & 0x3 == 1 {
            52
        } else {
            48
        }
    }
    /// Output address bits from `IDR5_OAS`.
    pub fn oas_bits(&self) -> u8 {
        match self.idr[5] & 0x7 {
            0 => 32,
            1 => 36,
            2 => 40,
            3 => 42,
            4 => 44,
            5 => 48,
            _ => 52,
        }
    }
}

/// Builds the STE words that bind a guest CD table (SMMUv3 5.2), after
/// checking every guest value: INVAL for an S1Fmt or S1DSS beyond its
/// 2-bit field (the reserved 0b11 is written as the 0b00 it behaves as) or
/// a misaligned pointer; UNSUPP for a two-level table the host cannot walk or
/// a table format this binding does not carry; RANGE for more CDs than the
/// host's SubstreamIDs or a table outside guest RAM. Only fields in
/// `STRTAB_STE_{0,1}_NESTING_ALLOWED` are set.
pub fn ste_for_table(
    desc: &TableDesc,
    hw: &SmmuHw,
    ram: &GuestRam,
) -> Result<iommu_hwpt_arm_smmuv3, BackendError> {
    let TableDesc::ArmSmmuV3 {
        s1fmt,
        s1dss,
        s1contextptr,
        s1cdmax,
    } = *desc
    else {
        return Err(BackendError::Unsupported(format!(
            "table format {} on an SMMUv3 endpoint",
            desc.format()
        )));
    };
    // STE.S1Fmt: 0 linear, 1 two-level with 4 KiB leaves (64 CDs), 2 with
    // 64 KiB leaves (1024 CDs); STE.S1DSS: 0 terminate, 1 bypass, 2 SSID 0.
    // SMMUv3 §5.2: the reserved 0b11 of both "behaves as 0b00". Decoded by
    // the software IOMMU's own decoder (one verdict for every backend),
    // and the STE carries the decoded encoding, so the host SMMU is handed
    // 0b00 and behaves exactly like the software IOMMU.
    let Some(fmt) = S1Fmt::from_raw(s1fmt) else {
        return Err(BackendError::Invalid(format!(
            "S1Fmt {s1fmt} does not fit the 2-bit field"
        )));
    };
    let Some(dss) = S1Dss::from_raw(s1dss) else {
        return Err(BackendError::Invalid(format!(
            "S1DSS {s1dss} does not fit the 2-bit field"
        )));
    };
    if fmt != S1Fmt::Linear && !hw.cd2l() {
        return Err(BackendError::Unsupported(
            "two-level CD table: the host SMMU lacks CD2L".into(),
        ));
    }
    if s1cdmax > u32::from(hw.ssid_bits()) {
        return Err(BackendError::Range(format!(
            "S1CDMax {s1cdmax} exceeds the host's {} SubstreamID bits",
            hw.ssid_bits()
        )));
    }
    if s1contextptr & !STE_0_S1CTXPTR_MASK & 0x3f != 0 {
        return Err(BackendError::Invalid(format!(
            "S1ContextPtr {s1contextptr:#x} is not 64-byte aligned"
        )));
    }
    if s1contextptr & !STE_0_S1CTXPTR_MASK != 0 {
        return Err(BackendError::Range(format!(
            "S1ContextPtr {s1contextptr:#x} is beyond 52 bits"
        )));
    }
    // The first table the SMMU fetches: 2^S1CDMax CDs of 64 bytes, or, for
    // two-level tables, 2^(S1CDMax - split) L1 descriptors of 8 bytes.
    let first_table_bytes: u64 = match fmt.split() {
        None => 64u64 << s1cdmax,
        Some(leaf_split) => 8u64 << s1cdmax.saturating_sub(leaf_split),
    };
    if !ram.covers(s1contextptr, first_table_bytes) {
        return Err(BackendError::Range(format!(
            "CD table {s1contextptr:#x} (+{first_table_bytes:#x}) is outside guest RAM"
        )));
    }
    let w0 = STE_0_V
        | field_prep(STE_0_CFG, STE_0_CFG_S1_TRANS)
        | field_prep(STE_0_S1FMT, u64::from(fmt.raw()))
        | (s1contextptr & STE_0_S1CTXPTR_MASK)
        | field_prep(STE_0_S1CDMAX, u64::from(s1cdmax));
    // CD fetches cacheable and inner shareable, as arm_smmu_make_cdtable_ste
    // does; EATS stays 0 (ATS off), S1STALLD 0.
    let w1 = field_prep(STE_1_S1DSS, u64::from(dss.raw()))
        | field_prep(STE_1_S1CIR, STE_1_S1C_CACHE_WBRA)
        | field_prep(STE_1_S1COR, STE_1_S1C_CACHE_WBRA)
        | field_prep(STE_1_S1CSH, SH_ISH);
    debug_assert_eq!(w0 & !STE_0_NESTING_ALLOWED, 0);
    debug_assert_eq!(w1 & !STE_1_NESTING_ALLOWED, 0);
    // `__le64 ste[2]`: little-endian whatever the host.
    Ok(iommu_hwpt_arm_smmuv3 {
        ste: [w0.to_le(), w1.to_le()],
    })
}

/// What the CMDQ lowering needs to know of the endpoint and the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuInvTarget {
    /// The virtual StreamID of the endpoint (its vDEVICE `virt_id`).
    pub vsid: u32,
    /// 8 or 16 (`IDR0_ASID16`).
    pub asid_bits: u8,
    /// `IDR1_SSIDSIZE`, capped by the CD table's S1CDMax.
    pub ssid_bits: u8,
    /// `IDR3_RIL`: TLBI range commands (TG/NUM/SCALE) are allowed.
    pub range_inv: bool,
    /// ATS is enabled for the endpoint, so ATC_INV commands are needed.
    pub ats: bool,
}

/// One 128-bit command, little-endian.
#[inline]
fn cmd(w0: u64, w1: u64) -> iommu_viommu_arm_smmuv3_invalidate {
    iommu_viommu_arm_smmuv3_invalidate {
        cmd: [w0.to_le(), w1.to_le()],
    }
}

/// Lowers a batch to CMDQ commands appended to `out`, not knowing the
/// granule of the guest's tables: every range becomes single-address
/// (TG = 0) commands, which are correct for any granule. See
/// [`lower_smmuv3_with`].
pub fn lower_smmuv3(
    batch: &[Invalidation],
    t: &SmmuInvTarget,
    out: &mut Vec<iommu_viommu_arm_smmuv3_invalidate>,
) -> Result<(), BackendError> {
    lower_smmuv3_with(batch, t, &|_| None, out)
}

/// Lowers a batch to CMDQ commands appended to `out`. `table_granule`
/// gives, for a range's PASID (`None`: traffic without one), log2 of the
/// translation granule of the bound CD's tables (its TG0: 12, 14 or 16),
/// or `None` when it is not known; range commands (TG, NUM, SCALE) are
/// only used with a known granule, since the SMMU need only invalidate
/// entries whose granule matches TG. The whole batch is checked before
/// anything is appended: RANGE for an ASID beyond the host's ASID bits or
/// a PASID beyond its SubstreamID bits, so a batch is sent whole or not at
/// all.
pub fn lower_smmuv3_with(
    batch: &[Invalidation],
    t: &SmmuInvTarget,
    table_granule: &dyn Fn(Option<u32>) -> Option<u8>,
    out: &mut Vec<iommu_viommu_arm_smmuv3_invalidate>,
) -> Result<(), BackendError> {
    for inv in batch {
        check_ids(inv, t)?;
    }
    out.reserve(batch.len());
    for inv in batch {
        let granule = match inv.scope {
            Scope::Range(v) => table_granule(v.pasid).filter(|g| matches!(g, 12 | 14 | 16)),
            _ => None,
        };
        lower_one(inv, t, granule, out);
    }
    Ok(())
}

fn check_ids(inv: &Invalidation, t: &SmmuInvTarget) -> Result<(), BackendError> {
    if let Some(a) = inv.archid {
        if a >> t.asid_bits != 0 {
            return Err(BackendError::Range(format!(
                "ASID {a:#x} is beyond the host's {} ASID bits",
                t.asid_bits
            )));
        }
    }
    let pasid = match inv.scope {
        Scope::Pasid(p) => Some(p),
        Scope::Range(v) => v.pasid,
        Scope::Domain => None,
    };
    if let Some(p) = pasid {
        if u64::from(p) >> t.ssid_bits != 0 {
            return Err(BackendError::Range(format!(
                "PASID {p:#x} is beyond the {} SubstreamID bits",
                t.ssid_bits
            )));
        }
    }
    Ok(())
}

/// TLBI_NH_ASID for a named ASID, TLBI_NH_ALL (the whole VMID: the kernel
/// forces the VM's VMID into every TLBI) otherwise.
#[inline]
fn tlbi_context(archid: Option<u64>, out: &mut Vec<iommu_viommu_arm_smmuv3_invalidate>) {
    match archid {
        Some(asid) => out.push(cmd(
            CMDQ_OP_TLBI_NH_ASID | field_prep(CMDQ_TLBI_0_ASID, asid),
            0,
        )),
        None => out.push(cmd(CMDQ_OP_TLBI_NH_ALL, 0)),
    }
}

fn lower_one(
    inv: &Invalidation,
    t: &SmmuInvTarget,
    table_granule: Option<u8>,
    out: &mut Vec<iommu_viommu_arm_smmuv3_invalidate>,
) {
    let sid = field_prep(CMDQ_CFGI_0_SID, u64::from(t.vsid));
    // CD cache first: a TLB refill after it must see the new CD.
    if inv.caches.contains(Caches::PASID) {
        match inv.scope {
            // Leaf 0: also forget cached L1 descriptors of a two-level table.
            Scope::Pasid(p) => out.push(cmd(
                CMDQ_OP_CFGI_CD | sid | field_prep(CMDQ_CFGI_0_SSID, u64::from(p)),
                0,
            )),
            Scope::Domain => out.push(cmd(CMDQ_OP_CFGI_CD_ALL | sid, 0)),
            // The decoder refuses VA granularity on the PASID cache.
            Scope::Range(_) => {}
        }
    }
    if inv.caches.contains(Caches::IOTLB) {
        match inv.scope {
            Scope::Domain => tlbi_context(inv.archid, out),
            // SMMU TLBs are tagged by ASID, not SubstreamID: without the
            // ASID of the PASID's CD, forget the whole VM's stage-1 entries.
            Scope::Pasid(_) => tlbi_context(inv.archid, out),
            Scope::Range(v) => tlbi_range(&v, inv.archid, t, table_granule, out),
        }
    }
    if inv.caches.contains(Caches::DEV_IOTLB) && t.ats {
        atc_inv(inv, sid, out);
    }
}

/// Most table-granule pages one range command covers: NUM + 1 ≤ 32 times
/// 2^SCALE with SCALE ≤ 31 (both 5-bit fields). Past it, one ASID- or
/// VMID-wide command.
pub const MAX_RANGE_PAGES: u64 = 32 << 31;

/// TLBI_NH_VA (with ASID) or TLBI_NH_VAA (all ASIDs) covering every byte
/// of a range, whatever the level and size of the guest's leaves there:
/// - with RIL and the table's granule known: range commands with TG = that
///   granule (the SMMU need only invalidate entries whose granule matches
///   TG, so the request's granule, which only says how the guest counts,
///   cannot be used) over the table-granule pages the range touches;
/// - otherwise one TG = 0 command per smallest possible leaf (the table's
///   granule, or 4 KiB when unknown) in the range, each forgetting every
///   entry that maps its address;
/// - past [`MAX_TLBI_OPS`] such commands, or [`MAX_RANGE_PAGES`] pages, one
///   ASID- or VMID-wide command.
///
/// TTL is always 0 (any level): a virtio INVALIDATE carries no leaf level,
/// and the request's granule is not one (a 4 KiB LEAF invalidation may
/// cover a 2 MiB block). Linux's `__arm_smmu_tlb_inv_range` makes the same
/// choices for non-leaf invalidations.
fn tlbi_range(
    v: &VaRange,
    archid: Option<u64>,
    t: &SmmuInvTarget,
    table_granule: Option<u8>,
    out: &mut Vec<iommu_viommu_arm_smmuv3_invalidate>,
) {
    let (op, asid) = match archid {
        Some(a) => (CMDQ_OP_TLBI_NH_VA, field_prep(CMDQ_TLBI_0_ASID, a)),
        None => (CMDQ_OP_TLBI_NH_VAA, 0),
    };
    let leaf = if v.leaf_only { CMDQ_TLBI_1_LEAF } else { 0 };
    // A range past 2^64 (the decoder refuses one, but this function is
    // public) or with a granule beyond 63: everything, rather than a wrap.
    let end = u128::from(v.addr) + (u128::from(v.pages) << v.granule_log2.min(64));
    if v.pages == 0 || v.granule_log2 > 63 || end > 1u128 << 64 {
        tlbi_context(archid, out);
        return;
    }
    // Table-granule pages the range touches (at least one; at most 2^52).
    let step = u32::from(table_granule.unwrap_or(12));
    let first = v.addr >> step;
    let last = v.last() >> step;
    let pages = last - first + 1;
    if let (true, Some(g)) = (t.range_inv, table_granule) {
        // TG: 1 = 4 KiB, 2 = 16 KiB, 3 = 64 KiB ("Convert page size of
        // 12,14,16 (log2) to 1,2,3").
        let tg = u64::from((g - 10) / 2);
        let mut num_pages = pages;
        // TTL 0 with NUM 0 and SCALE 0 (a lone 1-page chunk) is a reserved
        // encoding: cover one page more, as Linux does.
        if num_pages & CMDQ_TLBI_RANGE_NUM_MAX == 1 {
            num_pages += 1;
        }
        if num_pages > MAX_RANGE_PAGES {
            tlbi_context(archid, out);
            return;
        }
        let mut addr = first << step;
        while num_pages != 0 {
            // Each command covers (NUM + 1) << SCALE pages: the lowest set
            // bit of what is left gives SCALE, the next 5 bits NUM. SCALE
            // is a 5-bit field: past 31 the rest (at most 32 << 31 pages,
            // checked above) goes in one command of SCALE 31.
            let scale = num_pages.trailing_zeros().min(31);
            let num = if scale < 31 {
                (num_pages >> scale) & CMDQ_TLBI_RANGE_NUM_MAX
            } else {
                num_pages >> 31
            };
            out.push(cmd(
                op | asid
                    | field_prep(CMDQ_TLBI_0_NUM, num - 1)
                    | field_prep(CMDQ_TLBI_0_SCALE, u64::from(scale)),
                leaf | field_prep(CMDQ_TLBI_1_TG, tg) | (addr & CMDQ_TLBI_1_VA_MASK),
            ));
            num_pages -= num << scale;
            addr = addr.wrapping_add((num << scale) << step);
        }
        return;
    }
    if pages > MAX_TLBI_OPS {
        tlbi_context(archid, out);
        return;
    }
    // TG 0: no range, no level hint; each command forgets every entry that
    // maps that one address.
    for i in 0..pages {
        let addr = (first + i) << step;
        out.push(cmd(op | asid, leaf | (addr & CMDQ_TLBI_1_VA_MASK)));
    }
}

/// ATC_INV: the naturally aligned span of 4 KiB pages around a range
/// (Linux `arm_smmu_atc_inv_to_cmd`), or everything.
fn atc_inv(inv: &Invalidation, sid: u64, out: &mut Vec<iommu_viommu_arm_smmuv3_invalidate>) {
    let ssid = |p: u32| CMDQ_0_SSV | field_prep(CMDQ_ATC_0_SSID, u64::from(p));
    match inv.scope {
        // Every SubstreamID's translations: Global with SSV 0.
        Scope::Domain => out.push(cmd(
            CMDQ_OP_ATC_INV | sid | CMDQ_ATC_0_GLOBAL,
            field_prep(CMDQ_ATC_1_SIZE, ATC_INV_SIZE_ALL),
        )),
        Scope::Pasid(p) => out.push(cmd(
            CMDQ_OP_ATC_INV | sid | ssid(p),
            field_prep(CMDQ_ATC_1_SIZE, ATC_INV_SIZE_ALL),
        )),
        Scope::Range(v) => {
            let first = v.addr >> 12;
            let last = v.last() >> 12;
            let log2_span = 64 - (first ^ last).leading_zeros();
            let span_mask = (1u64 << log2_span) - 1;
            let w0 = CMDQ_OP_ATC_INV | sid | v.pasid.map_or(0, ssid);
            if u64::from(log2_span) >= ATC_INV_SIZE_ALL {
                out.push(cmd(w0, field_prep(CMDQ_ATC_1_SIZE, ATC_INV_SIZE_ALL)));
            } else {
                out.push(cmd(
                    w0,
                    field_prep(CMDQ_ATC_1_SIZE, u64::from(log2_span))
                        | ((first & !span_mask) << 12 & CMDQ_ATC_1_ADDR_MASK),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::bytes_of;
    use std::mem::size_of;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn ram() -> GuestRam {
        GuestRam::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap())
            .unwrap()
    }

    fn hw() -> SmmuHw {
        // IDR0: CD2L, ASID16, ATS; IDR1: SSIDSIZE 20; IDR3: RIL; IDR5:
        // GRAN4K|GRAN64K, OAS 48, VAX 52.
        SmmuHw {
            idr: [
                1 << 19 | 1 << 12 | 1 << 10,
                20 << 6,
                0,
                1 << 10,
                0,
                1 << 4 | 1 << 6 | 5 | 1 << 10,
            ],
        }
    }

    fn cd(s1fmt: u8, s1dss: u8, ptr: u64, cdmax: u32) -> TableDesc {
        TableDesc::ArmSmmuV3 {
            s1fmt,
            s1dss,
            s1contextptr: ptr,
            s1cdmax: cdmax,
        }
    }

    fn target() -> SmmuInvTarget {
        SmmuInvTarget {
            vsid: 0x10,
            asid_bits: 16,
            ssid_bits: 20,
            range_inv: false,
            ats: false,
        }
    }

    #[test]
    fn masks_match_the_kernel_values() {
        // Jason Gunthorpe, iommufd nesting review: "STRTAB_STE_0_NESTING_ALLOWED
        // = 0xf80fffffffffffff, STRTAB_STE_1_NESTING_ALLOWED = 0x380000ff".
        assert_eq!(STE_0_NESTING_ALLOWED, 0xf80f_ffff_ffff_ffff);
        assert_eq!(STE_1_NESTING_ALLOWED, 0x3800_00ff);
        assert_eq!(CMDQ_TLBI_1_VA_MASK, 0xffff_ffff_ffff_f000);
    }

    #[test]
    fn linear_cd_table_becomes_ste_words() {
        let ste = ste_for_table(&cd(0, 1, 0x4_0000, 4), &hw(), &ram()).unwrap();
        let w0 = 1 | 5 << 1 | 0x4_0000 | 4 << 59;
        let w1 = 1 | 1 << 2 | 1 << 4 | 3 << 6;
        assert_eq!(ste.ste, [w0, w1]);
        assert_eq!(ste.ste[0] & !STE_0_NESTING_ALLOWED, 0);
        assert_eq!(ste.ste[1] & !STE_1_NESTING_ALLOWED, 0);
        // `__le64 ste[2]`, 16 bytes.
        assert_eq!(size_of::<iommu_hwpt_arm_smmuv3>(), 16);
        let mut want = w0.to_le_bytes().to_vec();
        want.extend_from_slice(&w1.to_le_bytes());
        assert_eq!(bytes_of(&ste), &want[..]);
    }

    #[test]
    fn two_level_table_sets_s1fmt_and_checks_only_the_l1_table() {
        // 2^20 CDs with 1024-CD leaves: 1024 L1 descriptors, 8 KiB.
        let ste = ste_for_table(&cd(2, 2, 0xf_e000, 20), &hw(), &ram()).unwrap();
        assert_eq!(ste.ste[0] >> 4 & 3, 2);
        assert_eq!(ste.ste[1] & 3, 2);
        assert!(matches!(
            ste_for_table(&cd(2, 0, 0xf_f000, 20), &hw(), &ram()),
            Err(BackendError::Range(_))
        ));
    }

    #[test]
    fn bad_guest_values_are_refused_before_the_kernel() {
        type Check = fn(&BackendError) -> bool;
        let cases: [(TableDesc, Check); 7] = [
            (cd(4, 0, 0x4_0000, 0), |e| {
                matches!(e, BackendError::Invalid(_))
            }),
            (cd(0, 4, 0x4_0000, 0), |e| {
                matches!(e, BackendError::Invalid(_))
            }),
            (cd(0, 0, 0x4_0020, 0), |e| {
                matches!(e, BackendError::Invalid(_))
            }),
            (cd(0, 0, 1 << 52, 0), |e| {
                matches!(e, BackendError::Range(_))
            }),
            (cd(0, 0, 0x4_0000, 21), |e| {
                matches!(e, BackendError::Range(_))
            }),
            (cd(0, 0, 0x20_0000, 0), |e| {
                matches!(e, BackendError::Range(_))
            }),
            (TableDesc::X86_64 { levels: 4, root: 0 }, |e| {
                matches!(e, BackendError::Unsupported(_))
            }),
        ];
        for (d, ok) in cases {
            let e = ste_for_table(&d, &hw(), &ram()).unwrap_err();
            assert!(ok(&e), "{d:?}: {e:?}");
        }
        let no_cd2l = SmmuHw {
            idr: [0, 20 << 6, 0, 0, 0, 0],
        };
        assert!(matches!(
            ste_for_table(&cd(1, 0, 0x4_0000, 8), &no_cd2l, &ram()),
            Err(BackendError::Unsupported(_))
        ));
    }

    #[test]
    fn issue10_reserved_s1fmt_and_s1dss_0b11_bind_as_0b00_like_the_software_iommu() {
        // SMMUv3 §5.2: S1Fmt and S1DSS "0b11 Reserved (behaves as 0b00)".
        // The STE the host gets says 0b00, so the host SMMU does what the
        // software IOMMU does (CdTable decodes 0b11 the same way).
        let reserved = ste_for_table(&cd(3, 3, 0x4_0000, 4), &hw(), &ram()).unwrap();
        let plain = ste_for_table(&cd(0, 0, 0x4_0000, 4), &hw(), &ram()).unwrap();
        assert_eq!(reserved.ste, plain.ste);
        assert_eq!(reserved.ste[0] >> 4 & 3, 0);
        assert_eq!(reserved.ste[1] & 3, 0);
        let soft = vmm_iommu::nested::smmuv3::CdTable::new(0x4_0000, 3, 4, 3).unwrap();
        assert_eq!(soft.fmt().raw(), 0);
        assert_eq!(soft.s1dss().raw(), 0);
        // A linear table needs no CD2L, whatever the reserved encoding.
        let no_cd2l = SmmuHw {
            idr: [0, 20 << 6, 0, 0, 0, 0],
        };
        assert!(ste_for_table(&cd(3, 3, 0x4_0000, 4), &no_cd2l, &ram()).is_ok());
    }

    fn range(
        pasid: Option<u32>,
        addr: u64,
        g: u8,
        pages: u64,
        leaf: bool,
        asid: Option<u64>,
    ) -> Invalidation {
        Invalidation {
            caches: Caches::IOTLB,
            scope: Scope::Range(VaRange {
                pasid,
                addr,
                granule_log2: g,
                pages,
                leaf_only: leaf,
            }),
            archid: asid,
        }
    }

    fn lower(b: &[Invalidation], t: &SmmuInvTarget) -> Vec<[u64; 2]> {
        let mut out = Vec::new();
        lower_smmuv3(b, t, &mut out).unwrap();
        out.iter().map(|c| c.cmd).collect()
    }

    #[test]
    fn page_by_page_tlbi_nh_va_with_asid() {
        let got = lower(
            &[range(Some(1), 0x4000, 12, 2, true, Some(0x1234))],
            &target(),
        );
        let w0 = 0x12 | 0x1234 << 48;
        assert_eq!(got, vec![[w0, 0x4000 | 1], [w0, 0x5000 | 1]]);
    }

    /// `lower` with the bound CD's granule known (log2 `g`).
    fn lower_g(b: &[Invalidation], t: &SmmuInvTarget, g: u8) -> Vec<[u64; 2]> {
        let mut out = Vec::new();
        lower_smmuv3_with(b, t, &|_| Some(g), &mut out).unwrap();
        out.iter().map(|c| c.cmd).collect()
    }

    #[test]
    fn without_asid_tlbi_nh_vaa() {
        let got = lower(&[range(None, 0x20_0000, 12, 1, false, None)], &target());
        assert_eq!(got, vec![[0x13, 0x20_0000]]);
        // A 2 MiB page may be mapped by 4 KiB leaves: one command per
        // smallest possible leaf, the table's granule (4 KiB if unknown).
        let got = lower(&[range(None, 0x20_0000, 21, 1, false, None)], &target());
        assert_eq!(got.len(), 512);
        assert_eq!(got[511], [0x13, 0x3f_f000]);
        let got = lower_g(&[range(None, 0x20_0000, 21, 1, false, None)], &target(), 16);
        assert_eq!(got.len(), 32);
        assert_eq!(got[1], [0x13, 0x21_0000]);
    }

    #[test]
    fn range_commands_use_tg_num_scale() {
        let t = SmmuInvTarget {
            range_inv: true,
            ..target()
        };
        // 512 pages of 4 KiB over 4 KiB tables: NUM 0, SCALE 9 in one
        // command, TG 1, TTL 0.
        let got = lower_g(&[range(Some(1), 0x10_0000, 12, 512, true, Some(5))], &t, 12);
        let w0 = 0x12 | 5 << 48 | 9 << 20;
        let w1 = 1 | 1 << 10 | 0x10_0000;
        assert_eq!(got, vec![[w0, w1]]);
        // 35 pages of 64 KiB over 64 KiB tables: 0b100011 -> SCALE 0 NUM 2
        // (3 pages), then SCALE 5 NUM 0 (32 pages).
        let got = lower_g(&[range(None, 0, 16, 35, true, None)], &t, 16);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0][0], 0x13 | 2 << 12);
        assert_eq!(got[0][1], 1 | 3 << 10);
        assert_eq!(got[1][0], 0x13 | 5 << 20);
        assert_eq!(got[1][1], 1 | 3 << 10 | 3 << 16);
        // Without the table's granule, no range command.
        let got = lower(&[range(None, 0, 12, 3, true, None)], &t);
        assert!(got.iter().all(|c| c[1] >> 10 & 3 == 0), "{got:x?}");
    }

    #[test]
    fn non_leaf_single_page_range_avoids_the_reserved_encoding() {
        let t = SmmuInvTarget {
            range_inv: true,
            ..target()
        };
        let got = lower_g(&[range(None, 0x1000, 12, 1, false, None)], &t, 12);
        // Bumped to 2 pages: NUM 0, SCALE 1, TTL 0, TG 1.
        assert_eq!(got, vec![[0x13 | 1 << 20, 1 << 10 | 0x1000]]);
        for c in got {
            let (num, scale, ttl) = (c[0] >> 12 & 0x1f, c[0] >> 20 & 0x1f, c[1] >> 8 & 3);
            assert!(num != 0 || scale != 0 || ttl != 0);
        }
    }

    /// The byte ranges a lowered batch invalidates for an ASID-`asid`
    /// entry of table granule `tg_log2` at `level_log2`, decoded from the
    /// command bits as the SMMUv3 spec lays them out (§4.4: opcode 7:0,
    /// NUM 16:12, SCALE 24:20, ASID 63:48; TTL 9:8, TG 11:10, address
    /// 63:12), not with this module's constants.
    fn covers(
        cmds: &[[u64; 2]],
        asid: Option<u64>,
        tg_log2: u32,
        base: u64,
        size_log2: u32,
    ) -> bool {
        let end = base + (1u64 << size_log2); // exclusive, below 2^63 here
        cmds.iter().any(|c| {
            let op = c[0] & 0xff;
            let cmd_asid = c[0] >> 48;
            let asid_ok = |named: bool| !named || asid.is_none_or(|a| a == cmd_asid);
            match op {
                0x10 => true,
                0x11 => asid_ok(true),
                0x12 | 0x13 => {
                    if !asid_ok(op == 0x12) {
                        return false;
                    }
                    let addr = c[1] & !0xfff;
                    let tg = c[1] >> 10 & 3;
                    let ttl = c[1] >> 8 & 3;
                    if tg == 0 {
                        return (base..end).contains(&addr);
                    }
                    let g = 10 + 2 * tg as u32;
                    if g != tg_log2 {
                        return false;
                    }
                    // TTL 0 is any level; otherwise it must be this leaf's.
                    if ttl != 0 {
                        return false;
                    }
                    let num = (c[0] >> 12 & 0x1f) + 1;
                    let scale = c[0] >> 20 & 0x1f;
                    let len = (num << scale) << g;
                    addr < end && base < addr.saturating_add(len)
                }
                _ => false,
            }
        })
    }

    #[test]
    fn issue10_range_tlbi_scale_never_overflows_its_five_bit_field() {
        // 2^32 pages of 4 KiB: SCALE (5 bits) cannot say 32. The commands
        // must still forget the last page of the range.
        let t = SmmuInvTarget {
            range_inv: true,
            ..target()
        };
        let big = range(None, 0, 12, 1 << 32, true, Some(1));
        let last_page = (1u64 << 44) - 0x1000;
        for got in [lower(&[big], &t), lower_g(&[big], &t, 12)] {
            assert!(covers(&got, Some(1), 12, last_page, 12), "{got:x?}");
            assert!(covers(&got, Some(1), 12, 0, 12), "{got:x?}");
        }
        // With the granule known: one command, NUM 1, SCALE 31.
        let got = lower_g(&[big], &t, 12);
        assert_eq!(
            got,
            vec![[0x12 | 1 << 48 | 1 << 12 | 31 << 20, 1 | 1 << 10]]
        );
        // 2^36 pages (2^48 bytes): NUM 31, SCALE 31.
        let got = lower_g(&[range(None, 0, 12, 1 << 36, true, Some(1))], &t, 12);
        assert_eq!(
            got,
            vec![[0x12 | 1 << 48 | 31 << 12 | 31 << 20, 1 | 1 << 10]]
        );
        // More than a command can say: the whole ASID.
        let got = lower_g(&[range(None, 0, 12, (1 << 36) + 2, true, Some(1))], &t, 12);
        assert_eq!(got, vec![[0x11 | 1 << 48, 0]]);
    }

    #[test]
    fn issue10_ttl_is_zero_unless_the_leaf_level_is_known() {
        // A 4 KiB LEAF invalidation may cover a 2 MiB block: TTL 3 would
        // keep it. No virtio INVALIDATE tells the leaf level.
        let t = SmmuInvTarget {
            range_inv: true,
            ..target()
        };
        for g in [12u8, 14, 16] {
            let got = lower(&[range(Some(1), 0x20_0000, g, 4, true, Some(1))], &t);
            assert!(got.iter().all(|c| c[1] >> 8 & 3 == 0), "{got:x?}");
            let got = lower_g(&[range(Some(1), 0x20_0000, g, 4, true, Some(1))], &t, g);
            assert!(got.iter().all(|c| c[1] >> 8 & 3 == 0), "{got:x?}");
        }
        // The 2 MiB block behind a 4 KiB-granule leaf invalidation.
        let got = lower_g(&[range(Some(1), 0x20_1000, 12, 1, true, Some(1))], &t, 12);
        assert!(covers(&got, Some(1), 12, 0x20_0000, 21), "{got:x?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever the range, granules, RIL and ASID, every leaf entry of
        /// the guest's tables that overlaps the requested range (any level
        /// its granule allows) is invalidated by the commands.
        #[test]
        fn issue10_lowered_commands_always_cover_the_requested_range(
            addr_page in 0u64..(1 << 30),
            g in 12u8..=30,
            pages_log2 in 0u32..=36,
            pages_low in 0u64..64,
            leaf in proptest::prelude::any::<bool>(),
            asid in proptest::option::of(0u64..0x100),
            ril in proptest::prelude::any::<bool>(),
            table_g in proptest::option::of(proptest::sample::select(vec![12u8, 14, 16])),
            probe in proptest::prelude::any::<u64>(),
            level_sel in 0usize..3,
        ) {
            let pages = ((1u64 << pages_log2) | pages_low).max(1);
            let addr = (addr_page << g) & 0x0000_ffff_ffff_ffff & !((1u64 << g) - 1);
            proptest::prop_assume!(
                u128::from(addr) + (u128::from(pages) << g) < 1u128 << 63
            );
            let t = SmmuInvTarget { range_inv: ril, ..target() };
            let v = range(Some(1), addr, g, pages, leaf, asid);
            let mut out = Vec::new();
            lower_smmuv3_with(&[v], &t, &|_| table_g, &mut out).unwrap();
            let cmds: Vec<[u64; 2]> = out.iter().map(|c| c.cmd).collect();
            // Leaf sizes the table's granule allows (4 KiB: 4K/2M/1G;
            // 16 KiB: 16K/32M; 64 KiB: 64K/512M); unknown: any granule.
            let tg = u32::from(table_g.unwrap_or([12u8, 14, 16][level_sel]));
            let sizes: &[u32] = match tg { 12 => &[12, 21, 30], 14 => &[14, 25], _ => &[16, 29] };
            let size = sizes[level_sel % sizes.len()];
            let bytes = pages << g;
            let hit = addr + probe % bytes;
            let base = hit & !((1u64 << size) - 1);
            proptest::prop_assert!(
                covers(&cmds, asid, tg, base, size),
                "entry {:#x}/{} of granule {} not covered by {:x?}", base, size, tg, cmds
            );
            // Never the reserved TTL-0, NUM-0, SCALE-0 range encoding.
            for c in &cmds {
                let ranged = c[1] >> 10 & 3 != 0;
                proptest::prop_assert!(!(ranged && c[1] >> 8 & 3 == 0 && c[0] >> 12 & 0x1f == 0 && c[0] >> 20 & 0x1f == 0));
            }
        }
    }

    #[test]
    fn too_many_pages_widen_to_the_asid_or_all() {
        let got = lower(
            &[range(None, 0, 12, MAX_TLBI_OPS + 1, true, Some(3))],
            &target(),
        );
        assert_eq!(got, vec![[0x11 | 3 << 48, 0]]);
        let got = lower(
            &[range(None, 0, 12, MAX_TLBI_OPS + 1, true, None)],
            &target(),
        );
        assert_eq!(got, vec![[0x10, 0]]);
    }

    #[test]
    fn domain_and_pasid_scopes() {
        let all = Invalidation {
            caches: Caches::ALL,
            scope: Scope::Domain,
            archid: None,
        };
        let t = SmmuInvTarget {
            ats: true,
            ..target()
        };
        let got = lower(&[all], &t);
        assert_eq!(
            got,
            vec![
                [0x06 | 0x10 << 32, 0],
                [0x10, 0],
                [0x40 | 0x10 << 32 | 1 << 9, 52],
            ]
        );
        let p = Invalidation {
            caches: Caches::ALL,
            scope: Scope::Pasid(7),
            archid: Some(9),
        };
        let got = lower(&[p], &t);
        assert_eq!(
            got,
            vec![
                [0x05 | 0x10 << 32 | 7 << 12, 0],
                [0x11 | 9 << 48, 0],
                [0x40 | 0x10 << 32 | 7 << 12 | 1 << 11, 52],
            ]
        );
    }

    #[test]
    fn atc_inv_span_is_naturally_aligned() {
        let t = SmmuInvTarget {
            ats: true,
            ..target()
        };
        let mut inv = range(Some(2), 0x3000, 12, 2, true, None);
        inv.caches = Caches::DEV_IOTLB;
        // Pages 3 and 4: 3 ^ 4 = 7, span 2^3 pages from page 0.
        let got = lower(&[inv], &t);
        assert_eq!(got, vec![[0x40 | 0x10 << 32 | 2 << 12 | 1 << 11, 3]]);
        // Without ATS no ATC command is needed.
        assert!(lower(&[inv], &target()).is_empty());
    }

    #[test]
    fn ids_beyond_the_host_are_range_and_nothing_is_lowered() {
        let mut out = Vec::new();
        let t = SmmuInvTarget {
            asid_bits: 8,
            ..target()
        };
        let ok = range(None, 0, 12, 1, true, Some(1));
        let bad = range(None, 0, 12, 1, true, Some(0x100));
        assert!(matches!(
            lower_smmuv3(&[ok, bad], &t, &mut out),
            Err(BackendError::Range(_))
        ));
        assert!(out.is_empty());
        let t = SmmuInvTarget {
            ssid_bits: 4,
            ..target()
        };
        let bad = Invalidation {
            caches: Caches::PASID,
            scope: Scope::Pasid(16),
            archid: None,
        };
        assert!(matches!(
            lower_smmuv3(&[bad], &t, &mut out),
            Err(BackendError::Range(_))
        ));
    }

    #[test]
    fn cmd_bytes_are_little_endian_words() {
        assert_eq!(size_of::<iommu_viommu_arm_smmuv3_invalidate>(), 16);
        let c = cmd(0x0102, 0x0304);
        let b = bytes_of(&c);
        assert_eq!(&b[0..2], &[2, 1]);
        assert_eq!(&b[8..10], &[4, 3]);
    }

    #[test]
    fn hw_decoding() {
        let h = hw();
        assert!(h.cd2l() && h.ats() && h.ril());
        assert_eq!(h.asid_bits(), 16);
        assert_eq!(h.ssid_bits(), 20);
        assert_eq!(h.ias_bits(), 52);
        assert_eq!(h.oas_bits(), 48);
        assert_eq!(
            h.page_size_mask(),
            1 << 12 | 1 << 21 | 1 << 30 | 1 << 16 | 1 << 29
        );
    }
}
