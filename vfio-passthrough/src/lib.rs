//! VFIO type1 and iommufd backends for devices assigned to the guest behind
//! the vmm-iommu device.
//!
//! Not implemented yet: this crate is a placeholder in the workspace so the
//! layout is stable. It exports nothing, so nothing can mistake it for a
//! working backend. The backend trait it will implement, and the lowering of
//! invalidations to vendor entries, arrive with the nested-translation work.
