//! The integration side of vmm-iommu: the demo session behind `viommu-vm`
//! and an emulated DMA engine that reaches guest memory only through the
//! vIOMMU. (The KVM test VMM and guest programs come with a later change.)

#![deny(missing_docs)]

pub mod demo;
pub mod dma;
