//! Builders for the page and PASID tables of the nested extension
//! (ATTACH_TABLE): x86-64 first-stage tables, VT-d scalable-mode PASID
//! directories, SMMUv3 context descriptors, Arm LPAE tables.
//!
//! Empty for now: the nested scenarios (ATTACH_TABLE, INVALIDATE,
//! PAGE_RESP) come with the nested translation in vmm-iommu. They will
//! build their tables here, in guest RAM from a `rt::Bump`, and hand the
//! roots to `iommu` request builders of the same shape as `iommu::req`.
