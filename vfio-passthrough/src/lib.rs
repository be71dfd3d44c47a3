//! VFIO type1 and iommufd backends for devices assigned to the guest
//! behind the vmm-iommu device.
//!
//! Two implementations of [`vmm_iommu::backend::IommuBackend`]:
//!
//! - [`Type1Backend`]: MAP mode through a VFIO type1 container per
//!   endpoint (`VFIO_IOMMU_MAP_DMA` of the host addresses of guest pages).
//! - [`IommufdBackend`]: iommufd, with MAP mode through one IOAS per
//!   domain and nested mode over a stage-2 IOAS holding all guest RAM:
//!   per-PASID shadowing for Intel VT-d (one nested HWPT per bound PASID)
//!   and table passthrough for Arm SMMUv3 (vIOMMU, vDEVICE, nested STE).
//!
//! Everything the kernel sees is built by pure functions ([`dma`],
//! [`vtd`], [`smmuv3`], [`args`], [`caps`], [`fault`]) that check every
//! guest-provided value first, and crosses one narrow trait,
//! [`host::HostIommu`]: [`sys::VfioHost`] is the real one (over
//! `vfio-ioctls` and `iommufd-ioctls`), [`recording::RecordingHost`]
//! records the bytes and plays a scriptable kernel for tests.
//!
//! [`kvm_vfio`] registers the groups and cdevs the host opens with the
//! VM's KVM-VFIO device.
//!
//! `docs/vfio.md` has the lowering tables and the ioctl sequence of
//! every flow.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod args;
pub mod caps;
pub mod dirty;
pub mod dma;
pub mod fault;
pub mod host;
pub mod iommufd;
pub mod kvm_vfio;
pub mod ram;
pub mod recording;
pub mod smmuv3;
pub mod sys;
pub mod type1;
pub mod vtd;

pub use iommufd::IommufdBackend;
pub use ram::GuestRam;
pub use type1::Type1Backend;
