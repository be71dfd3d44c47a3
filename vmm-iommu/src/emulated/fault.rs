//! What the guest hears of a failed walk: a fault record in the vIOMMU's
//! fault queue or, for a fault a page request can resolve on an endpoint
//! that may send them with page requests negotiated, a page request (its
//! group is kept in `page_request.rs`).

use std::sync::atomic::Ordering;

use vm_memory::GuestMemory;

use super::{EmulatedIommu, NestedError};
use crate::backend::EndpointId;
use crate::nested::{Access, WalkFault};
use crate::wire::{
    ExtFaultRecord, VIRTIO_IOMMU_FAULT_F_ADDRESS, VIRTIO_IOMMU_FAULT_F_EXEC,
    VIRTIO_IOMMU_FAULT_F_PASID, VIRTIO_IOMMU_FAULT_F_PRIV, VIRTIO_IOMMU_FAULT_F_READ,
    VIRTIO_IOMMU_FAULT_F_WRITE, VIRTIO_IOMMU_FLT_DMA_UNRECOV, VIRTIO_IOMMU_FLT_PAGE_REQ,
    VIRTIO_IOMMU_PR_F_LAST_PAGE,
};

/// Access flags of a fault record for `a`.
fn access_flags(a: Access) -> u32 {
    let mut f = if a.write {
        VIRTIO_IOMMU_FAULT_F_WRITE
    } else {
        VIRTIO_IOMMU_FAULT_F_READ
    };
    if a.exec {
        f |= VIRTIO_IOMMU_FAULT_F_EXEC;
    }
    if a.privileged {
        f |= VIRTIO_IOMMU_FAULT_F_PRIV;
    }
    f
}

impl<M: GuestMemory + Send + Sync> EmulatedIommu<M> {
    /// Queues the fault (or page request) for `f` and returns the error.
    pub(super) fn fault(
        &self,
        ep: EndpointId,
        pasid: Option<u32>,
        va: u64,
        access: Access,
        f: WalkFault,
    ) -> NestedError {
        let pr = f.page_request_eligible()
            && self.page_requests_on.load(Ordering::Acquire)
            && self.page_request_endpoints.contains(&ep);
        if pr {
            if let Some(grpid) = self.open_page_request(ep, pasid) {
                self.stats.page_requests.fetch_add(1, Ordering::Relaxed);
                self.push(ep, pasid, va, access, f.virtio_reason(), Some(grpid));
                return NestedError::PageRequest { grpid };
            }
        }
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        self.push(ep, pasid, va, access, f.virtio_reason(), None);
        NestedError::Fault(f)
    }

    fn push(
        &self,
        ep: EndpointId,
        pasid: Option<u32>,
        va: u64,
        access: Access,
        reason: u8,
        page_request: Option<u32>,
    ) {
        let mut flags = access_flags(access) | VIRTIO_IOMMU_FAULT_F_ADDRESS;
        if pasid.is_some() {
            flags |= VIRTIO_IOMMU_FAULT_F_PASID;
        }
        let (flt_type, pr_evt_flags, grpid) = match page_request {
            Some(g) => (VIRTIO_IOMMU_FLT_PAGE_REQ, VIRTIO_IOMMU_PR_F_LAST_PAGE, g),
            None => (VIRTIO_IOMMU_FLT_DMA_UNRECOV, 0, 0),
        };
        self.faults.push(ExtFaultRecord {
            reason,
            flt_type,
            flags,
            pr_evt_flags,
            endpoint: ep,
            pasid: pasid.unwrap_or(0),
            grpid,
            address: va,
        });
    }
}
