//! The DMA engine's driver: program source, destination, length, PASID and
//! operation, ring the doorbell, read the status. The engine finishes the
//! operation (and any fault report) before the doorbell write returns.

use crate::abi::{self, dma_regs};
use crate::rt;

/// One DMA engine's register window.
#[derive(Clone, Copy)]
pub struct Dma {
    base: u64,
}

/// What one operation ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `abi::DMA_STATUS_*`.
    pub status: u32,
    /// `CMP_RESULT` after the operation.
    pub cmp: u32,
}

impl Dma {
    /// The engine at `base`; checks its ID register.
    pub fn new(base: u64) -> Self {
        let d = Dma { base };
        check_eq!(
            rt::mmio_read32(base + dma_regs::ID),
            abi::DMA_ID,
            "DMA engine ID at {base:#x}"
        );
        d
    }

    /// The endpoint ID the engine says it has.
    pub fn endpoint(&self) -> u32 {
        rt::mmio_read32(self.base + dma_regs::ENDPOINT)
    }

    /// Tags the next operations with `pasid`, or with none.
    pub fn set_pasid(&self, pasid: Option<u32>) {
        rt::mmio_write32(self.base + dma_regs::PASID, pasid.unwrap_or(0));
        let flags = if pasid.is_some() {
            abi::DMA_FLAGS_PASID_VALID
        } else {
            0
        };
        rt::mmio_write32(self.base + dma_regs::FLAGS, flags);
    }

    /// Runs `op` with the given registers.
    pub fn run(&self, op: u32, src: u64, dst: u64, len: u32, fill: u8) -> Outcome {
        rt::mmio_write64(self.base + dma_regs::SRC, src);
        // The destination as two 32-bit halves: the engine takes both forms.
        rt::mmio_write32(self.base + dma_regs::DST, dst as u32);
        rt::mmio_write32(self.base + dma_regs::DST + 4, (dst >> 32) as u32);
        rt::mmio_write32(self.base + dma_regs::LEN, len);
        rt::mmio_write32(self.base + dma_regs::FILL, u32::from(fill));
        rt::mmio_write32(self.base + dma_regs::OP, op);
        rt::mmio_write32(self.base + dma_regs::DOORBELL, 1);
        Outcome {
            status: rt::mmio_read32(self.base + dma_regs::STATUS),
            cmp: rt::mmio_read32(self.base + dma_regs::CMP_RESULT),
        }
    }

    /// The status register (`abi::DMA_STATUS_*`).
    pub fn status(&self) -> u32 {
        rt::mmio_read32(self.base + dma_regs::STATUS)
    }

    /// Copies `len` bytes from `src` to `dst`; returns the status.
    pub fn copy(&self, src: u64, dst: u64, len: u32) -> u32 {
        self.run(abi::DMA_OP_COPY, src, dst, len, 0).status
    }

    /// Fills `len` bytes at `dst` with `byte`; returns the status.
    pub fn fill(&self, dst: u64, byte: u8, len: u32) -> u32 {
        self.run(abi::DMA_OP_FILL, 0, dst, len, byte).status
    }

    /// Compares `len` bytes at `src` and `dst`.
    pub fn compare(&self, src: u64, dst: u64, len: u32) -> Outcome {
        self.run(abi::DMA_OP_COMPARE, src, dst, len, 0)
    }
}
