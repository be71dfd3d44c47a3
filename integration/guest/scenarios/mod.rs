//! The scenarios, and what they share: the boot info, memory to allocate
//! from in low and high RAM, and the DMA engine they drive.

pub mod bypass;
pub mod hostile;
pub mod map;

use crate::abi::{self, BootInfo};
use crate::dma::Dma;
use crate::iommu::{self, Iommu};
use crate::rt::Bump;

/// What every scenario starts from.
pub struct Ctx {
    /// What the VMM said.
    pub info: BootInfo,
    /// Free low RAM.
    pub low: Bump,
    /// Free high RAM.
    pub high: Bump,
}

impl Ctx {
    /// The context for `info`.
    pub fn new(info: BootInfo) -> Self {
        check!(info.high_ram_end > info.high_ram_start, "no high RAM");
        check!(info.low_ram_end > abi::FREE_LOW_START, "no free low RAM");
        Ctx {
            info,
            low: Bump::new(abi::FREE_LOW_START, info.low_ram_end),
            high: Bump::new(info.high_ram_start, info.high_ram_end),
        }
    }

    /// The DMA engine behind the vIOMMU and its endpoint.
    pub fn dma(&self) -> (Dma, u32) {
        let i = self.info.primary_dma;
        check!(i < self.info.dma_count, "no DMA engine behind the vIOMMU");
        let dma = Dma::new(abi::DMA_BASE + i * abi::MMIO_WINDOW_SIZE);
        let ep = dma.endpoint();
        check_eq!(
            u64::from(ep),
            self.info.dma_endpoints[i as usize],
            "DMA engine endpoint"
        );
        (dma, ep)
    }

    /// The virtio-iommu, initialised.
    pub fn iommu(&mut self) -> Iommu {
        Iommu::init(abi::VIRTIO_MMIO_BASE, &mut self.low)
    }
}

/// Fills `len` bytes at `addr` with a pattern that depends on `seed` and
/// the offset.
pub fn pattern(addr: u64, len: u64, seed: u8) {
    for i in 0..len {
        crate::rt::poke8(addr + i, (i as u8).wrapping_mul(31).wrapping_add(seed));
    }
}

/// Checks byte by byte that `len` bytes at `a` equal those at `b`.
pub fn same_bytes(a: u64, b: u64, len: u64) -> bool {
    let mut i = 0;
    while i < len {
        if crate::rt::peek8(a + i) != crate::rt::peek8(b + i) {
            println!(
                "  bytes differ at offset {i:#x}: {:#x} != {:#x}",
                crate::rt::peek8(a + i),
                crate::rt::peek8(b + i)
            );
            return false;
        }
        i += 1;
    }
    true
}

/// Checks that `len` bytes at `a` all equal `v`.
pub fn all_bytes(a: u64, len: u64, v: u8) -> bool {
    (0..len).all(|i| crate::rt::peek8(a + i) == v)
}

/// Checks the next fault record: its reason, endpoint, address and flags.
pub fn expect_fault(dev: &mut Iommu, reason: u8, endpoint: u32, address: u64, flags: u32) {
    let Some(f) = dev.next_fault() else {
        println!("FAIL: no fault record on the event queue");
        crate::rt::exit(line!());
    };
    println!(
        "  eventq: fault reason={} endpoint={} address={:#x} flags={:#x}",
        f.reason, f.endpoint, f.address, f.flags
    );
    check_eq!(f.reason, reason, "fault reason");
    check_eq!(f.endpoint, endpoint, "fault endpoint");
    check_eq!(f.flags, flags | iommu::FAULT_F_ADDRESS, "fault flags");
    check_eq!(f.address, address, "fault address");
}

/// Checks that no fault record waits.
pub fn expect_no_fault(dev: &mut Iommu) {
    if let Some(f) = dev.next_fault() {
        println!(
            "FAIL: unexpected fault record reason={} address={:#x}",
            f.reason, f.address
        );
        crate::rt::exit(line!());
    }
}
