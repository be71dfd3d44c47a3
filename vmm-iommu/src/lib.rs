//! vmm-iommu: a virtio-iommu device (virtio spec v1.3, device 23) for Rust
//! VMMs, with a state model that holds every normative rule of the spec and
//! translation for emulated devices behind it.
//!
//! Layout: [`wire`] knows bytes, [`config`] knows the VM config, [`mapping`]
//! and [`state`] know the spec's rules, [`viommu`] shares the state with
//! translators, [`translate`] and [`dma_memory`] know caches, [`device`]
//! knows queues.
//! [`testing`] is a driver-side helper for tests, benchmarks and the demo.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod config;
pub mod device;
pub mod dma_memory;
pub mod emulated;
pub mod fault;
pub mod invalidation;
pub mod mapping;
pub mod nested;
pub mod router;
pub mod snapshot;
pub mod state;
pub mod testing;
pub mod translate;
pub mod viommu;
#[cfg(feature = "acpi")]
pub mod viot;
pub mod wire;

pub use device::{DeviceError, DeviceStats, VirtioInterrupt, VirtioIommu};
pub use viommu::Viommu;
