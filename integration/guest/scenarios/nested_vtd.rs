//! Scenario 3, nested VT-d: the guest builds a scalable-mode PASID
//! directory, a PASID table and 4-level IA-32e first-stage tables in its
//! RAM, binds them with ATTACH_TABLE (PSTF_INTEL_VTD), and DMAs tagged with
//! a PASID through them. Then the caches, both ways, as on hardware: a leaf
//! repointed without invalidation still reaches the old page (stale IOTLB)
//! until a page-selective INVALIDATE; a PASID entry switched to other
//! tables still translates with the old ones (stale PASID cache) until a
//! PASID-selective INVALIDATE of the PASID cache and IOTLB. Then a batch
//! of INVALIDATEs in one notification, the INVALIDATE round-trip
//! benchmark, DETACH.

use super::{all_bytes, same_bytes};
use super::{bench_invalidate, expect_ext_fault, expect_no_fault, pattern, probe_nested, Ctx};
use crate::abi;
use crate::iommu::{self, nested as n, req, status, Iommu};
use crate::pgtable::{x86, VtdPasidDir, X86Tables};
use crate::rt::{self, poke64};

const PAGE: u64 = 4096;
const DOMAIN: u32 = abi::NESTED_VTD_DOMAIN;
/// A PASID in the directory's 73rd entry (PASID[19:6] = 0x48), slot 0x34
/// of its PASID table.
const PASID: u32 = 0x1234;
/// The domain ID the PASID entry tags its translations with.
const DID: u16 = 42;
/// IOVAs with a non-zero index at every level of the 4-level walk.
const IOVA_SRC: u64 = 0x0000_7f12_3450_0000;
const IOVA_DST: u64 = IOVA_SRC + 0x10_0000;
/// The page the cache tests repoint.
const IOVA_X: u64 = IOVA_SRC + 0x20_0000;
/// Bytes copied: across pages, with a ragged end.
const LEN: u64 = 2 * PAGE + 321;
/// INVALIDATEs sent in one notification.
const BATCH: usize = abi::NESTED_VTD_BATCH;

/// Page-selective IOTLB invalidation of `pages` pages at `va` for PASID.
fn inv_va(va: u64, pages: u64) -> req::Invalidate {
    req::Invalidate {
        gran: n::INV_G_VA,
        types: n::INV_T_IOTLB,
        flags: n::INV_F_PASID | n::INV_F_LEAF,
        domain: DOMAIN,
        pasid: PASID,
        virt_start: va,
        nr_pages: pages,
        granule: 12,
        ..Default::default()
    }
}

/// Runs the scenario on a fresh device.
pub fn run(ctx: &mut Ctx) {
    let mut dev = ctx.nested_iommu(false);
    run_on(ctx, &mut dev);
}

/// Runs the scenario on `dev`, which is up (DRIVER_OK) with
/// VIRTIO_IOMMU_F_ATTACH_TABLE and without VIRTIO_IOMMU_F_PAGE_REQUEST
/// negotiated, and has no domain.
pub fn run_on(ctx: &mut Ctx, dev: &mut Iommu) {
    check!(
        dev.features & iommu::features::ATTACH_TABLE != 0
            && dev.features & iommu::features::PAGE_REQUEST == 0,
        "nested-vtd needs ATTACH_TABLE without PAGE_REQUEST (features {:#x})",
        dev.features
    );
    println!("nested-vtd: start (features {:#x})", dev.features);
    let (dma, ep) = ctx.dma();

    let p = probe_nested(dev, ep, n::PSTF_INTEL_VTD, n::PGTF_X86_64);
    let Some(sizes) = p.table_page_sizes else {
        println!("FAIL: PROBE does not offer PSTF_INTEL_VTD over PGTF_X86_64");
        rt::exit(line!());
    };
    check!(sizes & PAGE != 0, "4 KiB first-stage pages not walked");
    check!(
        p.pasid_bits >= abi::NESTED_PASID_BITS,
        "PASID_SIZE {} below {}",
        p.pasid_bits,
        abi::NESTED_PASID_BITS
    );
    println!(
        "nested-vtd: PROBE: PASID_SIZE {}, OUTPUT_SIZE {}, PASID_TABLE_FMT intel-vtd over x86-64 (page sizes {sizes:#x})",
        p.pasid_bits, p.output_bits
    );

    // The guest's tables: PASID directory -> PASID table -> PML4 -> ... -> PT.
    let fs = X86Tables::new(&mut ctx.low);
    let src = ctx.low.pages(3);
    let dst = ctx.high.pages(3);
    let page_a = ctx.low.pages(1);
    let page_b = ctx.high.pages(1);
    let page_c = ctx.low.pages(1);
    pattern(src, 3 * PAGE, 3);
    for i in 0..3 {
        fs.map(
            &mut ctx.low,
            IOVA_SRC + i * PAGE,
            src + i * PAGE,
            x86::LEAF_RO,
        );
        fs.map(
            &mut ctx.high,
            IOVA_DST + i * PAGE,
            dst + i * PAGE,
            x86::LEAF_RW,
        );
    }
    fs.map(&mut ctx.low, IOVA_X, page_a, x86::LEAF_RW);
    let dir = VtdPasidDir::new(&mut ctx.low, abi::NESTED_PASID_BITS);
    dir.set_first_stage(&mut ctx.low, PASID, fs.root, DID);
    println!(
        "nested-vtd: PASID directory {:#x} ({} bits), PASID {PASID:#x} DID {DID} -> PML4 {:#x}",
        dir.dir, dir.bits, fs.root
    );

    // A directory outside guest RAM (the MMIO gap) is refused.
    check_eq!(
        dev.attach_table(&req::attach_table_vtd(
            DOMAIN,
            ep,
            dir.bits,
            abi::MMIO_GAP_START
        )),
        status::RANGE,
        "ATTACH_TABLE with a directory outside RAM"
    );
    check_eq!(
        dev.attach_table(&req::attach_table_vtd(DOMAIN, ep, dir.bits, dir.dir)),
        status::OK,
        "ATTACH_TABLE intel-vtd"
    );

    // DMA tagged with the PASID, through the guest's tables.
    dma.set_pasid(Some(PASID));
    check_eq!(
        dma.copy(IOVA_SRC, IOVA_DST, LEN as u32),
        abi::DMA_STATUS_OK,
        "PASID DMA copy"
    );
    check!(same_bytes(src, dst, LEN), "copied bytes differ");
    check!(
        all_bytes(dst + LEN, 3 * PAGE - LEN, 0),
        "copy wrote past its length"
    );
    let c = dma.compare(IOVA_SRC, IOVA_DST, LEN as u32);
    check!(c.status == abi::DMA_STATUS_OK && c.cmp == 0, "compare");
    println!("nested-vtd: DMA copy of {LEN} bytes with PASID {PASID:#x} through the guest's tables verified");

    // A write to a read-only first-stage page: refused, 40-byte record.
    expect_no_fault(dev);
    check_eq!(
        dma.fill(IOVA_SRC, 0, 8),
        abi::DMA_STATUS_FAULT,
        "DMA write to a read-only page"
    );
    expect_ext_fault(
        dev,
        n::FLT_DMA_UNRECOV,
        iommu::FAULT_R_MAPPING,
        ep,
        Some(PASID),
        IOVA_SRC,
        iommu::FAULT_F_WRITE,
    );
    // Without a PASID the request uses RID_PASID 0, which has no entry.
    dma.set_pasid(None);
    check_eq!(
        dma.compare(IOVA_SRC, IOVA_DST, 8).status,
        abi::DMA_STATUS_FAULT,
        "DMA without a PASID"
    );
    expect_ext_fault(
        dev,
        n::FLT_DMA_UNRECOV,
        iommu::FAULT_R_DOMAIN,
        ep,
        None,
        IOVA_SRC,
        iommu::FAULT_F_READ,
    );
    dma.set_pasid(Some(PASID));
    println!(
        "nested-vtd: read-only page and missing RID_PASID entry refused, extended records read"
    );

    // Stale IOTLB: the leaf changes, the IOMMU keeps the old translation.
    check_eq!(dma.fill(IOVA_X, 0x11, 64), abi::DMA_STATUS_OK, "fill X");
    check!(all_bytes(page_a, 64, 0x11), "fill X reached page A");
    poke64(fs.leaf_slot(&mut ctx.low, IOVA_X), page_b | x86::LEAF_RW);
    check_eq!(
        dma.fill(IOVA_X, 0x22, 64),
        abi::DMA_STATUS_OK,
        "fill X, stale"
    );
    check!(
        all_bytes(page_a, 64, 0x22) && all_bytes(page_b, PAGE, 0),
        "without INVALIDATE the DMA must still reach the old page"
    );
    println!("nested-vtd: leaf repointed without INVALIDATE: DMA still reaches the old page (stale IOTLB)");
    check_eq!(
        dev.invalidate(&inv_va(IOVA_X, 1)),
        status::OK,
        "INVALIDATE VA, IOTLB, PASID, LEAF"
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
    println!("nested-vtd: after INVALIDATE (VA, IOTLB, PASID, LEAF) the DMA reaches the new page");

    // Stale PASID cache: the PASID entry switches to other tables.
    let fs2 = X86Tables::new(&mut ctx.low);
    fs2.map(&mut ctx.low, IOVA_X, page_c, x86::LEAF_RW);
    dir.set_fsptptr(&mut ctx.low, PASID, fs2.root);
    check_eq!(
        dma.fill(IOVA_X, 0x44, 64),
        abi::DMA_STATUS_OK,
        "fill X, old entry"
    );
    check!(
        all_bytes(page_b, 64, 0x44) && all_bytes(page_c, PAGE, 0),
        "without INVALIDATE the old PASID entry must still be used"
    );
    println!("nested-vtd: PASID entry switched to PML4 {:#x} without INVALIDATE: old tables still used (stale PASID cache)", fs2.root);
    check_eq!(
        dev.invalidate(&req::Invalidate {
            gran: n::INV_G_PASID,
            types: n::INV_T_PASID | n::INV_T_IOTLB,
            flags: n::INV_F_PASID,
            domain: DOMAIN,
            pasid: PASID,
            ..Default::default()
        }),
        status::OK,
        "INVALIDATE PASID, PASID cache + IOTLB"
    );
    check_eq!(
        dma.fill(IOVA_X, 0x55, 64),
        abi::DMA_STATUS_OK,
        "fill X, new entry"
    );
    check!(
        all_bytes(page_c, 64, 0x55) && all_bytes(page_b, 64, 0x44),
        "after INVALIDATE the new PASID entry must be used"
    );
    // The new tables map nothing else.
    check_eq!(
        dma.compare(IOVA_SRC, IOVA_DST, 8).status,
        abi::DMA_STATUS_FAULT,
        "DMA through the new tables to an unmapped IOVA"
    );
    expect_ext_fault(
        dev,
        n::FLT_DMA_UNRECOV,
        iommu::FAULT_R_MAPPING,
        ep,
        Some(PASID),
        IOVA_SRC,
        iommu::FAULT_F_READ,
    );
    println!("nested-vtd: after INVALIDATE (PASID, PASID cache + IOTLB) the new tables are used");

    // Several INVALIDATEs in one notification: one backend call.
    let mut batch = [inv_va(0, 1); BATCH];
    for (i, b) in batch.iter_mut().enumerate() {
        b.virt_start = IOVA_X + i as u64 * PAGE;
    }
    let mut statuses = [0xffu8; BATCH];
    dev.invalidate_batch(&batch, &mut statuses);
    check!(
        statuses.iter().all(|&s| s == status::OK),
        "batched INVALIDATE statuses {statuses:?}"
    );
    println!("nested-vtd: {BATCH} INVALIDATEs of adjacent pages in one notification: all OK");

    bench_invalidate(dev, &inv_va(IOVA_X, 1), ctx.info.bench_iterations);

    check_eq!(dev.detach(DOMAIN, ep), status::OK, "DETACH");
    // Out of the table domain, PASID-tagged DMA has no translator.
    check_eq!(
        dma.fill(IOVA_X, 0x66, 64),
        abi::DMA_STATUS_BAD_ARGS,
        "PASID DMA after DETACH"
    );
    check!(all_bytes(page_c, 64, 0x55), "a refused DMA changed memory");
    dma.set_pasid(None);
    expect_no_fault(dev);
    println!("nested-vtd: PASS");
}
