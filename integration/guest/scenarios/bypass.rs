//! Scenario 2, bypass: config-space `bypass` on lets an unattached
//! endpoint's DMA reach guest-physical addresses (in both RAM regions, not
//! the hole); off, the same DMA is refused with a DOMAIN fault; ATTACH with
//! `ATTACH_F_BYPASS` gives identity DMA whatever `bypass` says, and the
//! bypass domain refuses MAP.

use super::{all_bytes, expect_fault, expect_no_fault, pattern, same_bytes, Ctx};
use crate::abi;
use crate::iommu::{self, features, status, ATTACH_F_BYPASS, MAP_F_READ};
use crate::rt;

const PAGE: u64 = 4096;
const DOMAIN: u32 = abi::BYPASS_DOMAIN;

/// Runs the scenario.
pub fn run(ctx: &mut Ctx) {
    let mut dev = ctx.iommu();
    println!("bypass: start (features {:#x})", dev.features);
    check!(
        dev.features & features::BYPASS_CONFIG != 0,
        "BYPASS_CONFIG not offered"
    );
    let (dma, ep) = ctx.dma();
    check_eq!(
        u64::from(dev.bypass()),
        ctx.info.bypass_initial,
        "initial config-space bypass"
    );

    let src = ctx.low.pages(1);
    let dst = ctx.low.pages(1);
    let hdst = ctx.high.pages(1);
    pattern(src, PAGE, 3);

    // bypass = 1: an unattached endpoint's addresses are guest-physical.
    dev.set_bypass(1);
    check_eq!(dev.bypass(), 1, "bypass after writing 1");
    check_eq!(
        dma.copy(src, dst, PAGE as u32),
        abi::DMA_STATUS_OK,
        "bypass DMA copy"
    );
    check!(same_bytes(src, dst, PAGE), "bypass copy within low RAM");
    check_eq!(
        dma.copy(src, hdst, PAGE as u32),
        abi::DMA_STATUS_OK,
        "bypass DMA copy to high RAM"
    );
    check!(same_bytes(src, hdst, PAGE), "bypass copy to high RAM");
    // Identity does not make the hole memory: refused by guest memory,
    // not by the IOMMU, so no fault record.
    let edge = ctx.info.low_ram_end - 16;
    check_eq!(
        dma.fill(edge, 0xee, 32),
        abi::DMA_STATUS_FAULT,
        "bypass DMA into the hole"
    );
    expect_no_fault(&mut dev);
    // Values other than 0 and 1 are ignored.
    dev.set_bypass(2);
    check_eq!(dev.bypass(), 1, "bypass after writing 2");
    println!("bypass: on, unattached endpoint {ep} reaches guest-physical memory");

    // bypass = 0: the same DMA is refused with a DOMAIN fault.
    dev.set_bypass(0);
    check_eq!(dev.bypass(), 0, "bypass after writing 0");
    rt::zero(dst, PAGE);
    check_eq!(
        dma.copy(src, dst, 64),
        abi::DMA_STATUS_FAULT,
        "DMA with bypass off"
    );
    check!(all_bytes(dst, PAGE, 0), "a refused DMA changed memory");
    expect_fault(
        &mut dev,
        iommu::FAULT_R_DOMAIN,
        ep,
        src,
        iommu::FAULT_F_READ,
    );
    println!("bypass: off, unattached endpoint {ep} refused (DOMAIN fault)");

    // ATTACH_F_BYPASS: identity for the endpoint, bypass off or not.
    check_eq!(
        dev.attach(DOMAIN, ep, ATTACH_F_BYPASS),
        status::OK,
        "ATTACH bypass domain"
    );
    check_eq!(
        dma.copy(src, dst, PAGE as u32),
        abi::DMA_STATUS_OK,
        "DMA in a bypass domain"
    );
    check!(same_bytes(src, dst, PAGE), "bypass-domain copy");
    check_eq!(
        dev.map(
            DOMAIN,
            abi::IOVA_WINDOW_START,
            abi::IOVA_WINDOW_START + PAGE - 1,
            src,
            MAP_F_READ
        ),
        status::INVAL,
        "MAP on a bypass domain"
    );
    check_eq!(
        dev.attach(DOMAIN, ep, 0),
        status::INVAL,
        "ATTACH without the bypass flag to a bypass domain"
    );
    println!("bypass: ATTACH_F_BYPASS gives identity DMA; MAP on it is INVAL");

    // DETACH: back to unattached with bypass off.
    check_eq!(dev.detach(DOMAIN, ep), status::OK, "DETACH");
    check_eq!(
        dma.copy(src, dst, 64),
        abi::DMA_STATUS_FAULT,
        "DMA after DETACH"
    );
    expect_fault(
        &mut dev,
        iommu::FAULT_R_DOMAIN,
        ep,
        src,
        iommu::FAULT_F_READ,
    );
    expect_no_fault(&mut dev);

    dev.set_bypass(ctx.info.bypass_initial as u8);
    check_eq!(
        u64::from(dev.bypass()),
        ctx.info.bypass_initial,
        "bypass restored"
    );
    println!("bypass: PASS");
}
