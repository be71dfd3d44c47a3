//! A Linux guest on the test VMM: a stock bzImage and initramfs booted with
//! the x86 64-bit boot protocol, ACPI tables (with a VIOT) describing the
//! virtio-iommu and the virtio-mmio devices behind it, a 16550 console,
//! and virtio-blk and virtio-rng whose every guest-memory access goes
//! through the vIOMMU when the driver negotiated `VIRTIO_F_ACCESS_PLATFORM`.

pub mod acpi;
pub mod blk;
pub mod boot;
pub mod config;
pub mod cpu;
pub mod dma;
pub mod layout;
pub mod rng;
pub mod serial;
pub mod vm;
