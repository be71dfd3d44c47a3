//! The software IOMMU as an [`IommuBackend`]: the vIOMMU binds and
//! unbinds endpoints' tables, forwards invalidations and page responses,
//! saves and restores page requests, and hands over guest memory when RAM
//! is plugged or unplugged. MAP-mode and bypass domains need nothing here:
//! the vIOMMU state translates them.

use std::sync::atomic::Ordering;

use vm_memory::GuestMemory;

use super::{lock, EmulatedIommu};
use crate::backend::{
    BackendCaps, BackendError, BackendFault, DomainId, DomainView, EndpointId, IommuBackend,
    PageResponse, RamChange, SavedPageRequests, TableBinding,
};
use crate::invalidation::Invalidation;
use crate::mapping::Mapping;

impl<M: GuestMemory + Clone + Send + Sync + 'static> IommuBackend for EmulatedIommu<M> {
    fn name(&self) -> &str {
        "emulated"
    }

    fn caps(&self, ep: EndpointId) -> BackendCaps {
        let mut c = self.caps.clone();
        c.page_requests = self.page_request_endpoints.contains(&ep);
        c
    }

    fn attach(&self, ep: EndpointId, _dom: &DomainView<'_>) -> Result<(), BackendError> {
        // MAP-mode and bypass domains are translated by the vIOMMU state
        // (crate::translate); here the endpoint only stops using tables.
        self.unbind(ep);
        Ok(())
    }

    fn detach(&self, ep: EndpointId, _dom: DomainId) -> Result<(), BackendError> {
        self.unbind(ep);
        Ok(())
    }

    fn map(&self, _dom: DomainId, _m: &Mapping) -> Result<(), BackendError> {
        Ok(())
    }

    fn unmap(&self, _dom: DomainId, _removed: &[Mapping]) -> Result<(), BackendError> {
        Ok(())
    }

    fn bind_table(&self, ep: EndpointId, binding: &TableBinding) -> Result<(), BackendError> {
        let mut c = lock(&self.caches);
        let first = !c.bindings.iter().any(|(_, x)| x.domain == binding.domain);
        c.bindings.retain(|(e, _)| *e != ep);
        c.bindings.push((ep, *binding));
        if first {
            // A new binding starts with empty caches for its domain: a
            // domain ID reused by the guest must not see the old tables.
            c.pasid.retain(|k| k.domain != binding.domain);
            c.iotlb.retain(|k| k.domain != binding.domain);
            c.pwc.retain(|k| k.domain != binding.domain);
        }
        drop(c);
        self.bump();
        Ok(())
    }

    fn unbind_table(&self, ep: EndpointId, _dom: DomainId) -> Result<(), BackendError> {
        self.unbind(ep);
        Ok(())
    }

    fn invalidate(&self, dom: DomainId, batch: &[Invalidation]) -> Result<(), BackendError> {
        self.stats.invalidate_calls.fetch_add(1, Ordering::Relaxed);
        self.stats
            .invalidations
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut c = lock(&self.caches);
        for inv in batch {
            self.invalidate_one(&mut c, dom, inv);
        }
        drop(c);
        self.bump();
        Ok(())
    }

    fn page_response(&self, resp: &PageResponse) -> Result<(), BackendError> {
        self.answer_page_request(resp)
    }

    fn drain_faults(&self, _out: &mut Vec<BackendFault>) {
        // Faults go straight into the vIOMMU's queue.
    }

    fn save_page_requests(&self) -> Option<SavedPageRequests> {
        Some(self.page_request_table())
    }

    fn restore_page_requests(&self, saved: &SavedPageRequests) -> Result<(), BackendError> {
        self.restore_page_request_table(saved)
    }

    fn remove_endpoint(&self, ep: EndpointId) {
        self.unbind(ep);
        self.forget_page_requests(ep);
    }

    /// Guest tables in the plugged RAM are read from `change.memory` from
    /// now on. Nothing cached can be wrong: faults are never cached.
    fn add_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        let mem = memory_of::<M>(change)?;
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = mem;
        Ok(())
    }

    /// Tables are read from `change.memory`, without the range, from now
    /// on, and every cache is dropped: an entry read from (or pointing
    /// into) the unplugged RAM would outlive it, and no guest INVALIDATE
    /// will come for a change the guest did not make. Walks into the range
    /// then fault, as past RAM.
    fn remove_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        let mem = memory_of::<M>(change)?;
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = mem;
        let mut c = lock(&self.caches);
        c.pasid.retain(|_| false);
        c.pwc.retain(|_| false);
        c.iotlb.retain(|_| false);
        drop(c);
        self.bump();
        Ok(())
    }

    fn set_page_requests(&self, enabled: bool) {
        self.page_requests_on.store(enabled, Ordering::Release);
        if !enabled {
            self.fail_pending_page_requests();
        }
    }
}

/// The guest memory a RAM change hands over, as the software IOMMU's own
/// memory type.
fn memory_of<M: Clone + 'static>(change: &RamChange<'_>) -> Result<M, BackendError> {
    change.memory.downcast_ref::<M>().cloned().ok_or_else(|| {
        BackendError::Invalid(format!(
            "guest memory of RAM [{:#x}, {:#x}] is not a {}, the software IOMMU's memory type",
            change.start,
            change.end,
            std::any::type_name::<M>()
        ))
    })
}
