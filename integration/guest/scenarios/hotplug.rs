//! Scenario 8, hot-plug: the primary engine is attached and busy, with
//! `abi::HOTPLUG_BATCH_PAIRS` MAP+UNMAP pairs for it offered in one
//! notification around each platform event. At sync point
//! `abi::HOTPLUG_PLUG_SYNC` the VMM plugs a DMA engine into the next free
//! slot; the guest learns of it from the hot-plug port (as from a
//! platform's slot status register), PROBEs, ATTACHes and MAPs it and
//! checks its DMA byte for byte. At `abi::HOTPLUG_UNPLUG_SYNC` the VMM
//! unplugs it while it is attached: the port no longer lists it, its
//! domain ended with it, every request naming it is NOENT, and the DMA it
//! still does (its window stays until the guest ejects the slot) is
//! refused, changing nothing. Then the guest ejects the slot and the
//! window reads as all ones; the primary engine worked throughout.

use super::{all_bytes, expect_no_fault, pattern, same_bytes, Ctx};
use crate::abi::{self, dma_regs};
use crate::dma::Dma;
use crate::iommu::{req, status, Iommu, MAP_F_READ, MAP_F_WRITE};
use crate::rt;

const PAGE: u64 = 4096;
/// The primary engine's domain.
const PRIMARY: u32 = abi::MAP_DOMAIN;
/// The plugged engine's domain.
const PLUGGED: u32 = abi::HOTPLUG_DOMAIN;
/// The primary engine's buffers.
const IOVA_A: u64 = abi::IOVA_WINDOW_START;
/// The batches' pages (one per pair).
const IOVA_BATCH: u64 = abi::IOVA_WINDOW_START + 0x100_0000;
/// The plugged engine's source (read-only) and destination.
const IOVA_SRC: u64 = abi::IOVA_WINDOW_START + 0x40_0000;
const IOVA_DST: u64 = abi::IOVA_WINDOW_START + 0x50_0000;
const LEN: u64 = PAGE + 300;

/// Offers a batch of MAP+UNMAP pairs for the primary domain, runs
/// `during` (a sync point) while the device serves it, and checks every
/// status.
fn batch_around(dev: &mut Iommu, page: u64, during: impl FnOnce()) {
    const N: usize = abi::HOTPLUG_BATCH_PAIRS;
    let mut maps = [[0u8; 36]; N];
    let mut unmaps = [[0u8; 28]; N];
    for i in 0..N {
        let iova = IOVA_BATCH + i as u64 * PAGE;
        maps[i] = req::map(PRIMARY, iova, iova + PAGE - 1, page, MAP_F_READ);
        unmaps[i] = req::unmap(PRIMARY, iova, iova + PAGE - 1);
    }
    let mut reqs: [&[u8]; 2 * N] = [&[]; 2 * N];
    for i in 0..N {
        reqs[2 * i] = &maps[i];
        reqs[2 * i + 1] = &unmaps[i];
    }
    dev.post_batch(&reqs);
    during();
    let mut out = [0xffu8; 2 * N];
    dev.wait_batch(2 * N, &mut out);
    for (i, s) in out.iter().enumerate() {
        check_eq!(*s, status::OK, "batched request {i}");
    }
}

/// Checks the primary engine still moves bytes through its mapping.
fn primary_works(dma: &Dma, a: u64, fill: u8) {
    check_eq!(
        dma.fill(IOVA_A, fill, 256),
        abi::DMA_STATUS_OK,
        "primary engine DMA"
    );
    check!(all_bytes(a, 256, fill), "primary engine fill");
}

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) {
    let mut dev = ctx.iommu();
    let (dma, ep) = ctx.dma();
    println!("hotplug: start (features {:#x})", dev.features);
    let n = ctx.info.dma_count;
    let slot = n as u32;
    let cold = (1u32 << n) - 1;
    check_eq!(rt::inl(abi::HOTPLUG_PORT), cold, "slots present at boot");
    let window = abi::DMA_BASE + n * abi::MMIO_WINDOW_SIZE;
    check_eq!(
        rt::mmio_read32(window + dma_regs::ID),
        u32::MAX,
        "the empty slot's window"
    );

    check_eq!(dev.attach(PRIMARY, ep, 0), status::OK, "ATTACH primary");
    let a = ctx.high.pages(1);
    check_eq!(
        dev.map(PRIMARY, IOVA_A, IOVA_A + PAGE - 1, a, MAP_F_WRITE),
        status::OK,
        "MAP primary"
    );
    let batch_page = ctx.low.pages(1);
    primary_works(&dma, a, 0x11);

    // The platform plugs an engine in while a batch for the primary
    // engine is served.
    batch_around(&mut dev, batch_page, || rt::sync(abi::HOTPLUG_PLUG_SYNC));
    let present = rt::inl(abi::HOTPLUG_PORT);
    check_eq!(present, cold | (1 << slot), "slots present after the plug");
    let plugged = Dma::new(window);
    let pep = plugged.endpoint();
    println!(
        "hotplug: engine plugged in slot {slot}, endpoint {pep}, while {} MAP+UNMAP pairs ran",
        abi::HOTPLUG_BATCH_PAIRS
    );
    check_eq!(dev.probe(pep), status::OK, "PROBE the plugged endpoint");
    check_eq!(dev.attach(PLUGGED, pep, 0), status::OK, "ATTACH plugged");
    let src = ctx.low.pages(2);
    let dst = ctx.high.pages(2);
    pattern(src, 2 * PAGE, 23);
    check_eq!(
        dev.map(PLUGGED, IOVA_SRC, IOVA_SRC + 2 * PAGE - 1, src, MAP_F_READ),
        status::OK,
        "MAP plugged src"
    );
    check_eq!(
        dev.map(
            PLUGGED,
            IOVA_DST,
            IOVA_DST + 2 * PAGE - 1,
            dst,
            MAP_F_READ | MAP_F_WRITE
        ),
        status::OK,
        "MAP plugged dst"
    );
    check_eq!(
        plugged.copy(IOVA_SRC, IOVA_DST, LEN as u32),
        abi::DMA_STATUS_OK,
        "DMA by the plugged engine"
    );
    check!(same_bytes(src, dst, LEN), "plugged engine's copy");
    println!("hotplug: DMA copy of {LEN} bytes by the plugged engine verified");
    primary_works(&dma, a, 0x22);

    // The platform unplugs it while it is attached and a batch runs.
    batch_around(&mut dev, batch_page, || rt::sync(abi::HOTPLUG_UNPLUG_SYNC));
    check_eq!(
        rt::inl(abi::HOTPLUG_PORT),
        cold,
        "slots present after the unplug"
    );
    rt::zero(dst, 2 * PAGE);
    check_eq!(
        plugged.copy(IOVA_SRC, IOVA_DST, LEN as u32),
        abi::DMA_STATUS_FAULT,
        "DMA by the unplugged engine"
    );
    check!(all_bytes(dst, 2 * PAGE, 0), "a refused DMA changed memory");
    // Not an endpoint of this vIOMMU any more: no record (spec
    // 5.13.6.8.2, a record names a valid endpoint).
    expect_no_fault(&mut dev);
    check_eq!(dev.probe(pep), status::NOENT, "PROBE after the unplug");
    check_eq!(
        dev.attach(PLUGGED, pep, 0),
        status::NOENT,
        "ATTACH after the unplug"
    );
    check_eq!(
        dev.detach(PLUGGED, pep),
        status::NOENT,
        "DETACH after the unplug"
    );
    check_eq!(
        dev.unmap(PLUGGED, IOVA_SRC, IOVA_DST + 2 * PAGE - 1),
        status::NOENT,
        "UNMAP in the domain that ended with it"
    );
    println!("hotplug: unplugged while attached: DMA refused, its domain gone, requests NOENT");
    rt::outl(abi::HOTPLUG_PORT, 1 << slot);
    check_eq!(
        rt::mmio_read32(window + dma_regs::ID),
        u32::MAX,
        "the ejected slot's window"
    );
    primary_works(&dma, a, 0x33);

    check_eq!(
        dev.unmap(PRIMARY, IOVA_A, IOVA_A + PAGE - 1),
        status::OK,
        "UNMAP primary"
    );
    check_eq!(dev.detach(PRIMARY, ep), status::OK, "DETACH primary");
    expect_no_fault(&mut dev);
    println!("hotplug: PASS");
}
