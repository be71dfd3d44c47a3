//! Scenario 7, MAP mode across a snapshot: ATTACH, MAP a read-only source
//! and a read-write destination, one DMA copy checked, then sync point
//! `abi::SNAPSHOT_SYNC`, where the VMM pauses the VM, snapshots it and
//! resumes it as a new VM. After it: the VMM says it restored the VM (the
//! sync port's count), a DMA copy goes through the restored mappings, a
//! write to the read-only one is refused with its fault record on the
//! restored event queue, an UNMAP takes effect (the next DMA to it is
//! refused), and a new MAP works; DETACH.

use super::{all_bytes, expect_fault, expect_no_fault, pattern, same_bytes, Ctx};
use crate::abi;
use crate::iommu::{self, status, MAP_F_READ, MAP_F_WRITE};
use crate::rt;

const PAGE: u64 = 4096;
const DOMAIN: u32 = abi::MAP_DOMAIN;
/// Source (low RAM), read-only.
const IOVA_SRC: u64 = abi::IOVA_WINDOW_START;
/// Destination (high RAM), read-write.
const IOVA_DST: u64 = abi::IOVA_WINDOW_START + 0x10_0000;
/// Mapped after the restore.
const IOVA_NEW: u64 = abi::IOVA_WINDOW_START + 0x20_0000;
/// Bytes copied: two pages and a ragged end.
const LEN: u64 = 2 * PAGE + 77;

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) {
    let mut dev = ctx.iommu();
    let (dma, ep) = ctx.dma();
    println!("snapshot: start (features {:#x})", dev.features);
    check_eq!(dev.attach(DOMAIN, ep, 0), status::OK, "ATTACH");
    let src = ctx.low.pages(4);
    let dst = ctx.high.pages(4);
    pattern(src, 4 * PAGE, 11);
    check_eq!(
        dev.map(DOMAIN, IOVA_SRC, IOVA_SRC + 4 * PAGE - 1, src, MAP_F_READ),
        status::OK,
        "MAP src"
    );
    check_eq!(
        dev.map(
            DOMAIN,
            IOVA_DST,
            IOVA_DST + 4 * PAGE - 1,
            dst,
            MAP_F_READ | MAP_F_WRITE
        ),
        status::OK,
        "MAP dst"
    );
    check_eq!(
        dma.copy(IOVA_SRC, IOVA_DST, LEN as u32),
        abi::DMA_STATUS_OK,
        "DMA copy before the snapshot"
    );
    check!(same_bytes(src, dst, LEN), "copied bytes differ");
    rt::zero(dst, 4 * PAGE);
    let before = rt::inl(abi::SYNC_PORT);
    println!(
        "snapshot: 2 mappings made, pausing at sync point {}",
        abi::SNAPSHOT_SYNC
    );

    rt::sync(abi::SNAPSHOT_SYNC);

    let restores = rt::inl(abi::SYNC_PORT);
    println!("snapshot: resumed (restores {before} -> {restores})");
    // The VM did not forget what it was doing: the allocator, the
    // driver's rings and the buffers are where they were.
    check!(
        all_bytes(dst, 4 * PAGE, 0),
        "destination changed in the pause"
    );
    check_eq!(
        dma.copy(IOVA_SRC, IOVA_DST, LEN as u32),
        abi::DMA_STATUS_OK,
        "DMA copy through the restored mappings"
    );
    check!(
        same_bytes(src, dst, LEN),
        "bytes copied after the restore differ"
    );
    check!(
        all_bytes(dst + LEN, 4 * PAGE - LEN, 0),
        "copy after the restore wrote past its length"
    );
    println!("snapshot: DMA copy of {LEN} bytes through the restored mappings verified");

    // The restored mapping keeps its permissions, and the restored event
    // queue carries the fault.
    expect_no_fault(&mut dev);
    check_eq!(
        dma.fill(IOVA_SRC, 0, 64),
        abi::DMA_STATUS_FAULT,
        "DMA write to the restored read-only mapping"
    );
    expect_fault(
        &mut dev,
        iommu::FAULT_R_MAPPING,
        ep,
        IOVA_SRC,
        iommu::FAULT_F_WRITE,
    );

    // UNMAP after the restore takes effect.
    check_eq!(
        dev.unmap(DOMAIN, IOVA_DST, IOVA_DST + 4 * PAGE - 1),
        status::OK,
        "UNMAP dst after the restore"
    );
    rt::zero(dst, 4 * PAGE);
    check_eq!(
        dma.copy(IOVA_SRC, IOVA_DST, 16),
        abi::DMA_STATUS_FAULT,
        "DMA after the UNMAP"
    );
    check!(all_bytes(dst, 4 * PAGE, 0), "a refused DMA changed memory");
    expect_fault(
        &mut dev,
        iommu::FAULT_R_MAPPING,
        ep,
        IOVA_DST,
        iommu::FAULT_F_WRITE,
    );
    println!("snapshot: UNMAP after the restore took effect");

    // New requests work on the restored domain.
    let page = ctx.high.pages(1);
    check_eq!(
        dev.map(DOMAIN, IOVA_NEW, IOVA_NEW + PAGE - 1, page, MAP_F_WRITE),
        status::OK,
        "MAP after the restore"
    );
    check_eq!(
        dma.fill(IOVA_NEW, 0x3c, PAGE as u32),
        abi::DMA_STATUS_OK,
        "DMA fill of the new mapping"
    );
    check!(all_bytes(page, PAGE, 0x3c), "fill of the new mapping");
    check_eq!(
        dev.unmap(DOMAIN, IOVA_SRC, IOVA_NEW + PAGE - 1),
        status::OK,
        "UNMAP the rest"
    );
    check_eq!(dev.detach(DOMAIN, ep), status::OK, "DETACH");
    expect_no_fault(&mut dev);
    println!("snapshot: PASS");
}
