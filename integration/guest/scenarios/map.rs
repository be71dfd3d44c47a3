//! Scenario 1, MAP mode: PROBE (the configured MSI region comes back as a
//! RESV_MEM property), ATTACH, MAP, DMA copy / compare / fill through IOVAs
//! (one window across the two RAM regions), a write to a read-only
//! mapping, UNMAP, DMA after UNMAP (refused, with its fault record read
//! from the event queue), the MAP+UNMAP round-trip benchmark, DETACH.

use super::{all_bytes, expect_fault, expect_no_fault, pattern, same_bytes, Ctx};
use crate::abi;
use crate::iommu::{self, status, Iommu, MAP_F_READ, MAP_F_WRITE};
use crate::rt::{self, peek16, peek64, peek8};

const PAGE: u64 = 4096;
const DOMAIN: u32 = abi::MAP_DOMAIN;
/// Source buffer (low RAM), mapped read-only.
const IOVA_SRC: u64 = abi::IOVA_WINDOW_START;
/// Destination buffer (high RAM), mapped read-write.
const IOVA_DST: u64 = abi::IOVA_WINDOW_START + 0x10_0000;
/// Two pages, the first in low RAM, the second in high RAM.
const IOVA_CROSS: u64 = abi::IOVA_WINDOW_START + 0x20_0000;
/// The benchmark's page.
const IOVA_BENCH: u64 = abi::IOVA_WINDOW_START + 0x30_0000;
/// Bytes copied: several pages and a ragged end.
const LEN: u64 = 3 * PAGE + 123;

/// Runs the scenario on a fresh device.
pub fn run(ctx: &mut Ctx) {
    let mut dev = ctx.iommu();
    run_on(ctx, &mut dev);
}

/// Runs the scenario on `dev`, which is up (DRIVER_OK) and has no domain.
pub fn run_on(ctx: &mut Ctx, dev: &mut Iommu) {
    println!("map: start (features {:#x})", dev.features);
    let (dma, ep) = ctx.dma();

    probe(ctx, dev, ep);

    check_eq!(dev.attach(DOMAIN, ep, 0), status::OK, "ATTACH");

    let src = ctx.low.pages(4);
    let dst = ctx.high.pages(4);
    let cross_lo = ctx.low.pages(1);
    let cross_hi = ctx.high.pages(1);
    pattern(src, 4 * PAGE, 7);
    let rw = MAP_F_READ | MAP_F_WRITE;
    check_eq!(
        dev.map(DOMAIN, IOVA_SRC, IOVA_SRC + 4 * PAGE - 1, src, MAP_F_READ),
        status::OK,
        "MAP src"
    );
    check_eq!(
        dev.map(DOMAIN, IOVA_DST, IOVA_DST + 4 * PAGE - 1, dst, rw),
        status::OK,
        "MAP dst"
    );
    check_eq!(
        dev.map(DOMAIN, IOVA_CROSS, IOVA_CROSS + PAGE - 1, cross_lo, rw),
        status::OK,
        "MAP cross low"
    );
    check_eq!(
        dev.map(
            DOMAIN,
            IOVA_CROSS + PAGE,
            IOVA_CROSS + 2 * PAGE - 1,
            cross_hi,
            rw
        ),
        status::OK,
        "MAP cross high"
    );
    println!(
        "map: 4 mappings (src {src:#x} low, dst {dst:#x} high, cross {cross_lo:#x}+{cross_hi:#x})"
    );

    // Copy through IOVAs, checked byte by byte at the guest-physical pages.
    check_eq!(
        dma.copy(IOVA_SRC, IOVA_DST, LEN as u32),
        abi::DMA_STATUS_OK,
        "DMA copy"
    );
    check!(same_bytes(src, dst, LEN), "copied bytes differ");
    check!(
        all_bytes(dst + LEN, 4 * PAGE - LEN, 0),
        "copy wrote past its length"
    );
    println!("map: DMA copy of {LEN} bytes through IOVAs verified");

    let c = dma.compare(IOVA_SRC, IOVA_DST, LEN as u32);
    check_eq!(c.status, abi::DMA_STATUS_OK, "DMA compare");
    check_eq!(c.cmp, 0, "compare of equal buffers");
    rt::poke8(dst + 100, !rt::peek8(dst + 100));
    let c = dma.compare(IOVA_SRC, IOVA_DST, LEN as u32);
    check_eq!(c.cmp, 101, "compare finds the first difference");

    check_eq!(
        dma.fill(IOVA_DST + PAGE - 8, 0x5a, 16),
        abi::DMA_STATUS_OK,
        "DMA fill"
    );
    check!(all_bytes(dst + PAGE - 8, 16, 0x5a), "fill across a page");

    // One IOVA window over low and high RAM: the engine splits the access.
    check_eq!(
        dma.copy(IOVA_SRC, IOVA_CROSS + PAGE - 256, 512),
        abi::DMA_STATUS_OK,
        "DMA copy across regions"
    );
    check!(
        same_bytes(src, cross_lo + PAGE - 256, 256),
        "low half of the cross copy"
    );
    check!(
        same_bytes(src + 256, cross_hi, 256),
        "high half of the cross copy"
    );
    println!("map: DMA across the low/high RAM boundary verified");

    // A write to a read-only mapping is refused and reported.
    expect_no_fault(dev);
    check_eq!(
        dma.fill(IOVA_SRC, 0, 64),
        abi::DMA_STATUS_FAULT,
        "DMA write to a read-only mapping"
    );
    check!(peek8(src) == 7, "a refused write changed memory");
    expect_fault(
        dev,
        iommu::FAULT_R_MAPPING,
        ep,
        IOVA_SRC,
        iommu::FAULT_F_WRITE,
    );

    // UNMAP takes effect before its status: the next DMA is refused.
    check_eq!(
        dev.unmap(DOMAIN, IOVA_DST, IOVA_DST + 4 * PAGE - 1),
        status::OK,
        "UNMAP dst"
    );
    rt::zero(dst, 4 * PAGE);
    check_eq!(
        dma.copy(IOVA_SRC, IOVA_DST, LEN as u32),
        abi::DMA_STATUS_FAULT,
        "DMA after UNMAP"
    );
    check!(all_bytes(dst, 4 * PAGE, 0), "a refused DMA changed memory");
    expect_fault(
        dev,
        iommu::FAULT_R_MAPPING,
        ep,
        IOVA_DST,
        iommu::FAULT_F_WRITE,
    );
    expect_no_fault(dev);
    println!("map: DMA after UNMAP blocked, MAPPING fault read from the eventq");

    bench(ctx, dev);

    check_eq!(
        dev.unmap(DOMAIN, IOVA_SRC, IOVA_CROSS + 2 * PAGE - 1),
        status::OK,
        "UNMAP the rest"
    );
    check_eq!(dev.detach(DOMAIN, ep), status::OK, "DETACH");
    // Unattached and not in bypass, the endpoint reaches nothing.
    if dev.bypass() == 0 {
        check_eq!(
            dma.copy(IOVA_SRC, IOVA_DST, 16),
            abi::DMA_STATUS_FAULT,
            "DMA after DETACH"
        );
        expect_fault(
            dev,
            iommu::FAULT_R_DOMAIN,
            ep,
            IOVA_SRC,
            iommu::FAULT_F_READ,
        );
    }
    expect_no_fault(dev);
    println!("map: PASS");
}

/// PROBE the endpoint: one RESV_MEM MSI property for the configured
/// region, zeroes after the last property; a PROBE of an endpoint that
/// does not exist is NOENT.
fn probe(ctx: &Ctx, dev: &mut Iommu, ep: u32) {
    check!(
        dev.features & iommu::features::PROBE != 0,
        "PROBE not offered"
    );
    check_eq!(dev.probe(ep), status::OK, "PROBE");
    let props = dev.resp_buf;
    let end = props + u64::from(dev.probe_size);
    let mut at = props;
    let mut msi = None;
    while at + 4 <= end {
        let ty = peek16(at) & 0xfff;
        let len = u64::from(peek16(at + 2));
        if ty == 0 {
            break;
        }
        check!(at + 4 + len <= end, "property overruns probe_size");
        if ty == iommu::PROBE_T_RESV_MEM && len >= 20 && peek8(at + 4) == iommu::RESV_MEM_T_MSI {
            msi = Some((peek64(at + 8), peek64(at + 16)));
        }
        at += 4 + len;
    }
    check!(
        all_bytes(at, end - at, 0),
        "bytes after the last property are not zero"
    );
    let want = (ctx.info.msi_end != abi::NO_MSI_REGION || ctx.info.msi_start != 0)
        .then_some((ctx.info.msi_start, ctx.info.msi_end));
    match (msi, want) {
        (Some(got), Some(want)) => {
            check!(got == want, "MSI region {got:#x?}, config says {want:#x?}");
            println!(
                "map: PROBE reports the MSI region [{:#x}, {:#x}]",
                got.0, got.1
            );
        }
        (None, None) => println!("map: PROBE reports no MSI region, as configured"),
        (got, want) => {
            println!("FAIL: MSI region {got:#x?}, config says {want:#x?}");
            rt::exit(line!());
        }
    }
    check_eq!(
        dev.probe(0xffff_fff0),
        status::NOENT,
        "PROBE of an unknown endpoint"
    );
}

/// Cycles per MAP+UNMAP round trip, each request one notification (an
/// exit, or an ioeventfd kick the device worker serves).
fn bench(ctx: &mut Ctx, dev: &mut Iommu) {
    let n = ctx.info.bench_iterations;
    if n == 0 {
        return;
    }
    let page = ctx.low.pages(1);
    let t0 = rt::rdtsc();
    for _ in 0..n {
        let a = dev.map(DOMAIN, IOVA_BENCH, IOVA_BENCH + PAGE - 1, page, MAP_F_READ);
        let b = dev.unmap(DOMAIN, IOVA_BENCH, IOVA_BENCH + PAGE - 1);
        if a != status::OK || b != status::OK {
            println!("FAIL: benchmark MAP {a} / UNMAP {b}");
            rt::exit(line!());
        }
    }
    let cycles = (rt::rdtsc() - t0) / n;
    println!("bench: map_unmap_round_trips={n} cycles_per_map_unmap={cycles}");
}
