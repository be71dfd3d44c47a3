//! Scenario 4, nested SMMUv3: the x86 guest writes, as plain data, what an
//! Arm guest's SMMUv3 driver writes — a linear Context Descriptor table and
//! AArch64 4 KiB-granule stage-1 tables — binds them with ATTACH_TABLE
//! (PSTF_ARM_SMMU_V3), and DMAs tagged with a SubstreamID (the PASID
//! register) through them. Then the caches, as on hardware: a page
//! descriptor repointed without invalidation still reaches the old page
//! until a page-selective INVALIDATE naming the ASID; a CD switched to
//! other tables is still used until a PASID-selective INVALIDATE of the CD
//! cache and TLB.

use super::{all_bytes, same_bytes};
use super::{expect_ext_fault, expect_no_fault, pattern, probe_nested, Ctx};
use crate::abi;
use crate::iommu::{self, nested as n, req, status};
use crate::pgtable::{arm, ArmTables, CdTable};
use crate::rt::{self, poke64};

const PAGE: u64 = 4096;
const DOMAIN: u32 = abi::NESTED_SMMUV3_DOMAIN;
/// Log2 of the number of CDs in the linear table.
const S1CDMAX: u32 = abi::NESTED_SMMUV3_S1CDMAX;
/// S1DSS = 0b00: traffic without a SubstreamID is terminated.
const S1DSS_TERMINATE: u8 = 0;
/// S1Fmt = 0b00: a linear CD table.
const S1FMT_LINEAR: u8 = 0;
/// The SubstreamID the DMA carries.
const SSID: u32 = 3;
/// The ASID of CD `SSID`.
const ASID: u16 = 0x5a;
/// IOVAs with a non-zero index at every level of the 4-level walk.
const IOVA_SRC: u64 = 0x0000_7f12_3450_0000;
const IOVA_DST: u64 = IOVA_SRC + 0x10_0000;
/// The page the cache tests repoint.
const IOVA_X: u64 = IOVA_SRC + 0x20_0000;
/// Bytes copied.
const LEN: u64 = 2 * PAGE + 77;

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) {
    let mut dev = ctx.nested_iommu(false);
    println!("nested-smmuv3: start (features {:#x})", dev.features);
    let (dma, ep) = ctx.dma();

    let p = probe_nested(&mut dev, ep, n::PSTF_ARM_SMMU_V3, n::PGTF_ARM_LPAE);
    let Some(sizes) = p.table_page_sizes else {
        println!("FAIL: PROBE does not offer PSTF_ARM_SMMU_V3 over PGTF_ARM_LPAE");
        rt::exit(line!());
    };
    check!(sizes & PAGE != 0, "4 KiB stage-1 pages not walked");
    check!(
        u32::from(p.pasid_bits) >= S1CDMAX,
        "PASID_SIZE {}",
        p.pasid_bits
    );
    println!(
        "nested-smmuv3: PROBE: PASID_SIZE {}, PASID_TABLE_FMT arm-smmuv3 over arm-lpae (page sizes {sizes:#x})",
        p.pasid_bits
    );

    // CD table -> CD[SSID] -> TTB0 (level 0) -> ... -> level 3 pages.
    let tt = ArmTables::new(&mut ctx.low);
    let src = ctx.low.pages(3);
    let dst = ctx.high.pages(3);
    let page_a = ctx.low.pages(1);
    let page_b = ctx.high.pages(1);
    let page_c = ctx.low.pages(1);
    pattern(src, 3 * PAGE, 9);
    for i in 0..3 {
        tt.map(
            &mut ctx.low,
            IOVA_SRC + i * PAGE,
            src + i * PAGE,
            arm::PAGE_RO,
        );
        tt.map(
            &mut ctx.high,
            IOVA_DST + i * PAGE,
            dst + i * PAGE,
            arm::PAGE_RW,
        );
    }
    tt.map(&mut ctx.low, IOVA_X, page_a, arm::PAGE_RW);
    let cds = CdTable::new(&mut ctx.low, S1CDMAX);
    cds.set_cd(SSID, tt.ttb0, ASID);
    println!(
        "nested-smmuv3: linear CD table {:#x} (S1CDMax {S1CDMAX}), CD {SSID} ASID {ASID:#x} -> TTB0 {:#x}",
        cds.ptr, tt.ttb0
    );

    check_eq!(
        dev.attach_table(&req::attach_table_smmuv3(
            DOMAIN,
            ep,
            S1FMT_LINEAR,
            S1DSS_TERMINATE,
            cds.ptr,
            S1CDMAX
        )),
        status::OK,
        "ATTACH_TABLE arm-smmuv3"
    );

    dma.set_pasid(Some(SSID));
    check_eq!(
        dma.copy(IOVA_SRC, IOVA_DST, LEN as u32),
        abi::DMA_STATUS_OK,
        "SSID DMA copy"
    );
    check!(same_bytes(src, dst, LEN), "copied bytes differ");
    check!(
        all_bytes(dst + LEN, 3 * PAGE - LEN, 0),
        "copy wrote past its length"
    );
    println!("nested-smmuv3: DMA copy of {LEN} bytes with SSID {SSID} through the AArch64 tables verified");

    // AP[2] = 1: read-only for the device.
    expect_no_fault(&mut dev);
    check_eq!(
        dma.fill(IOVA_SRC + PAGE, 0, 8),
        abi::DMA_STATUS_FAULT,
        "DMA write to a read-only page"
    );
    expect_ext_fault(
        &mut dev,
        n::FLT_DMA_UNRECOV,
        iommu::FAULT_R_MAPPING,
        ep,
        Some(SSID),
        IOVA_SRC + PAGE,
        iommu::FAULT_F_WRITE,
    );
    // S1DSS = terminate: no SubstreamID, no translation.
    dma.set_pasid(None);
    check_eq!(
        dma.compare(IOVA_SRC, IOVA_DST, 8).status,
        abi::DMA_STATUS_FAULT,
        "DMA without a SubstreamID"
    );
    expect_ext_fault(
        &mut dev,
        n::FLT_DMA_UNRECOV,
        iommu::FAULT_R_DOMAIN,
        ep,
        None,
        IOVA_SRC,
        iommu::FAULT_F_READ,
    );
    dma.set_pasid(Some(SSID));
    println!(
        "nested-smmuv3: read-only page and traffic without SubstreamID (S1DSS terminate) refused"
    );

    // Stale TLB after a page descriptor changes.
    check_eq!(dma.fill(IOVA_X, 0x11, 64), abi::DMA_STATUS_OK, "fill X");
    check!(all_bytes(page_a, 64, 0x11), "fill X reached page A");
    poke64(tt.leaf_slot(&mut ctx.low, IOVA_X), page_b | arm::PAGE_RW);
    check_eq!(
        dma.fill(IOVA_X, 0x22, 64),
        abi::DMA_STATUS_OK,
        "fill X, stale"
    );
    check!(
        all_bytes(page_a, 64, 0x22) && all_bytes(page_b, PAGE, 0),
        "without INVALIDATE the DMA must still reach the old page"
    );
    println!("nested-smmuv3: page descriptor repointed without INVALIDATE: DMA still reaches the old page");
    check_eq!(
        dev.invalidate(&req::Invalidate {
            gran: n::INV_G_VA,
            types: n::INV_T_IOTLB,
            flags: n::INV_F_PASID | n::INV_F_ARCHID | n::INV_F_LEAF,
            domain: DOMAIN,
            pasid: SSID,
            archid: u64::from(ASID),
            virt_start: IOVA_X,
            nr_pages: 1,
            granule: 12,
        }),
        status::OK,
        "INVALIDATE VA, IOTLB, PASID + ARCHID, LEAF"
    );
    check_eq!(
        dma.fill(IOVA_X, 0x33, 64),
        abi::DMA_STATUS_OK,
        "fill X, fresh"
    );
    check!(
        all_bytes(page_b, 64, 0x33) && all_bytes(page_a, 64, 0x22),
        "after INVALIDATE the DMA must reach the new page"
    );
    println!("nested-smmuv3: after INVALIDATE (VA, IOTLB, SSID + ASID, LEAF) the DMA reaches the new page");

    // Stale CD cache after the CD switches to other tables.
    let tt2 = ArmTables::new(&mut ctx.low);
    tt2.map(&mut ctx.low, IOVA_X, page_c, arm::PAGE_RW);
    cds.set_ttb0(SSID, tt2.ttb0);
    check_eq!(
        dma.fill(IOVA_X, 0x44, 64),
        abi::DMA_STATUS_OK,
        "fill X, old CD"
    );
    check!(
        all_bytes(page_b, 64, 0x44) && all_bytes(page_c, PAGE, 0),
        "without INVALIDATE the old CD must still be used"
    );
    check_eq!(
        dev.invalidate(&req::Invalidate {
            gran: n::INV_G_PASID,
            types: n::INV_T_PASID | n::INV_T_IOTLB,
            flags: n::INV_F_PASID,
            domain: DOMAIN,
            pasid: SSID,
            ..Default::default()
        }),
        status::OK,
        "INVALIDATE PASID, CD cache + TLB"
    );
    check_eq!(
        dma.fill(IOVA_X, 0x55, 64),
        abi::DMA_STATUS_OK,
        "fill X, new CD"
    );
    check!(
        all_bytes(page_c, 64, 0x55) && all_bytes(page_b, 64, 0x44),
        "after INVALIDATE the new CD must be used"
    );
    println!("nested-smmuv3: CD switched to TTB0 {:#x}: stale until INVALIDATE (PASID, CD cache + TLB), then used", tt2.ttb0);

    check_eq!(dev.detach(DOMAIN, ep), status::OK, "DETACH");
    dma.set_pasid(None);
    expect_no_fault(&mut dev);
    println!("nested-smmuv3: PASS");
}
