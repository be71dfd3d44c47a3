//! The integration side of vmm-iommu: a small KVM test VMM that boots guest
//! test programs against the virtio-iommu and a DMA engine behind it
//! ([`vm`], [`scenarios`]) from its VM config file ([`config`]), the emulated
//! DMA that reaches guest memory only through the vIOMMU ([`dma`]), and the
//! host-side scripted driver session kept as a fallback for hosts without KVM
//! ([`demo`]).
//!
//! The guest programs are built from `guest/` by `build.rs` with the same
//! compiler, and embedded as [`GUEST_ELF`].

#![deny(missing_docs)]

#[path = "../guest/abi.rs"]
pub mod abi;
pub mod config;
pub mod demo;
pub mod dma;
pub mod kvm_check;
pub mod linux;
pub mod scenarios;
pub mod vm;

/// The guest program (a static x86-64 ELF built by `build.rs` from
/// `guest/main.rs`); the VMM tells it which scenario to run.
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));
