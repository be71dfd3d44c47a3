//! Scenario 5, page requests: with VIRTIO_IOMMU_F_PAGE_REQUEST negotiated,
//! a PASID DMA to pages whose first-stage entries are not present waits
//! (the engine's status says so) while the device sends a page request on
//! the event queue; the guest maps the page and answers PAGE_RESP SUCCESS,
//! and the engine retries and completes — one request per missing page. A
//! PAGE_RESP FAILURE ends the DMA with a fault status instead. Answers for
//! groups that are not pending are NOENT.

use super::{all_bytes, same_bytes};
use super::{expect_ext_fault, expect_no_fault, pattern, Ctx};
use crate::abi;
use crate::dma::Dma;
use crate::iommu::{self, nested as n, status, Iommu};
use crate::pgtable::{x86, VtdPasidDir, X86Tables};
use crate::rt::{poke64, Bump};

const PAGE: u64 = 4096;
const DOMAIN: u32 = abi::PAGE_REQUEST_DOMAIN;
const PASID: u32 = 0x77;
const DID: u16 = 7;
const IOVA_SRC: u64 = 0x0000_5555_0000_0000;
/// Two pages whose entries the guest leaves not present.
const IOVA_DST: u64 = IOVA_SRC + 0x40_0000;
/// A page the guest refuses to map.
const IOVA_NOPE: u64 = IOVA_SRC + 0x80_0000;
/// Bytes copied: both destination pages.
const LEN: u64 = 2 * PAGE;

/// Serves page requests until the engine stops waiting: each one must name
/// the next page of `pages` (mapped then to `phys` + the same offset) and
/// is answered SUCCESS. Returns how many it served.
fn serve_page_requests(
    dev: &mut Iommu,
    dma: &Dma,
    ep: u32,
    fs: &X86Tables,
    alloc: &mut Bump,
    (va, phys, pages): (u64, u64, u64),
) -> u64 {
    let mut served = 0;
    while dma.status() == abi::DMA_STATUS_PAGE_WAIT {
        check!(served < pages, "more page requests than missing pages");
        let want = va + served * PAGE;
        let f = expect_ext_fault(
            dev,
            n::FLT_PAGE_REQ,
            iommu::FAULT_R_MAPPING,
            ep,
            Some(PASID),
            want,
            iommu::FAULT_F_WRITE,
        );
        // The fault handler: map the page, then answer. Not-present
        // entries are not cached, so no INVALIDATE is needed.
        fs.map(alloc, want, phys + served * PAGE, x86::LEAF_RW);
        check_eq!(
            dev.page_resp(ep, Some(PASID), f.grpid, n::PAGE_RESP_SUCCESS),
            status::OK,
            "PAGE_RESP SUCCESS"
        );
        served += 1;
    }
    served
}

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) {
    let mut dev = ctx.nested_iommu(true);
    println!("page-request: start (features {:#x})", dev.features);
    let (dma, ep) = ctx.dma();

    let fs = X86Tables::new(&mut ctx.low);
    let src = ctx.low.pages(2);
    let dst = ctx.high.pages(2);
    let nope = ctx.high.pages(1);
    pattern(src, LEN, 5);
    for i in 0..2 {
        fs.map(
            &mut ctx.low,
            IOVA_SRC + i * PAGE,
            src + i * PAGE,
            x86::LEAF_RO,
        );
        // The page table exists; the entries stay not present.
        fs.leaf_slot(&mut ctx.low, IOVA_DST + i * PAGE);
    }
    fs.leaf_slot(&mut ctx.low, IOVA_NOPE);
    let dir = VtdPasidDir::new(&mut ctx.low, abi::NESTED_PASID_BITS);
    dir.set_first_stage(&mut ctx.low, PASID, fs.root, DID);
    check_eq!(
        dev.attach_table(&crate::iommu::req::attach_table_vtd(
            DOMAIN, ep, dir.bits, dir.dir
        )),
        status::OK,
        "ATTACH_TABLE intel-vtd"
    );
    dma.set_pasid(Some(PASID));

    // SUCCESS: the DMA waits for each missing page, then completes.
    expect_no_fault(&mut dev);
    let s = dma.copy(IOVA_SRC, IOVA_DST, LEN as u32);
    check_eq!(
        s,
        abi::DMA_STATUS_PAGE_WAIT,
        "DMA to not-present pages waits"
    );
    check!(all_bytes(dst, LEN, 0), "a waiting DMA wrote memory");
    println!("page-request: DMA to 2 not-present pages waits for a page");
    let served = serve_page_requests(&mut dev, &dma, ep, &fs, &mut ctx.high, (IOVA_DST, dst, 2));
    check_eq!(served, 2, "page requests served");
    check_eq!(
        dma.status(),
        abi::DMA_STATUS_OK,
        "DMA after PAGE_RESP SUCCESS"
    );
    check!(same_bytes(src, dst, LEN), "copied bytes differ");
    println!("page-request: {served} page requests answered SUCCESS, the DMA completed and the data is right");

    // FAILURE: the DMA ends with a fault status, memory untouched.
    check_eq!(
        dma.fill(IOVA_NOPE, 0x77, 64),
        abi::DMA_STATUS_PAGE_WAIT,
        "DMA to a not-present page waits"
    );
    let f = expect_ext_fault(
        &mut dev,
        n::FLT_PAGE_REQ,
        iommu::FAULT_R_MAPPING,
        ep,
        Some(PASID),
        IOVA_NOPE,
        iommu::FAULT_F_WRITE,
    );
    check_eq!(
        dev.page_resp(ep, Some(PASID), f.grpid, n::PAGE_RESP_FAILURE),
        status::OK,
        "PAGE_RESP FAILURE"
    );
    check_eq!(
        dma.status(),
        abi::DMA_STATUS_FAULT,
        "DMA after PAGE_RESP FAILURE"
    );
    check!(all_bytes(nope, PAGE, 0), "a failed DMA wrote memory");
    println!("page-request: PAGE_RESP FAILURE ends the DMA with a fault status");

    // Answers to groups that are not pending.
    check_eq!(
        dev.page_resp(ep, Some(PASID), f.grpid, n::PAGE_RESP_SUCCESS),
        status::NOENT,
        "second PAGE_RESP for an answered group"
    );
    check_eq!(
        dev.page_resp(ep, Some(PASID), 0x1ff, n::PAGE_RESP_SUCCESS),
        status::NOENT,
        "PAGE_RESP for a group never sent"
    );
    println!("page-request: PAGE_RESP for groups not pending: NOENT");

    // The page can be mapped afterwards, and then the DMA just works.
    poke64(fs.leaf_slot(&mut ctx.low, IOVA_NOPE), nope | x86::LEAF_RW);
    check_eq!(
        dma.fill(IOVA_NOPE, 0x78, 64),
        abi::DMA_STATUS_OK,
        "DMA once mapped"
    );
    check!(all_bytes(nope, 64, 0x78), "fill once mapped");

    check_eq!(dev.detach(DOMAIN, ep), status::OK, "DETACH");
    dma.set_pasid(None);
    expect_no_fault(&mut dev);
    println!("page-request: PASS");
}
