//! The shared handle of one vIOMMU: the state model behind a lock, the
//! translation generation that invalidates every cached translation, and
//! the fault queue.
//!
//! The request queue applies requests here; emulated devices translate
//! here (through [`crate::translate`]) from their own threads. The handle
//! owns no thread: the VMM owns them all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::config::IommuConfig;
use crate::fault::FaultQueue;
use crate::state::{FaultReason, IommuState, RequestError, Translation, ACCESS_READ, ACCESS_WRITE};
use crate::translate::{EndpointIommu, Translator};
use crate::wire::{
    FaultRecord, Request, VIRTIO_IOMMU_FAULT_F_ADDRESS, VIRTIO_IOMMU_FAULT_F_READ,
    VIRTIO_IOMMU_FAULT_F_WRITE, VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_R_MAPPING,
    VIRTIO_IOMMU_FAULT_R_UNKNOWN,
};

/// One vIOMMU, shared between the device (request processing) and the
/// translators of the emulated devices behind it.
#[derive(Debug)]
pub struct Viommu {
    state: RwLock<IommuState>,
    /// Bumped (under the state's write lock) whenever an access that was
    /// allowed may no longer be: UNMAP that removed something, DETACH,
    /// ATTACH, reset, bypass turned off. Translators compare it with the
    /// generation their cache was filled under.
    generation: AtomicU64,
    faults: FaultQueue,
}

/// What applying a request did, beyond succeeding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// ATTACH, DETACH or MAP applied.
    Done,
    /// UNMAP applied; this many mappings were removed.
    Unmapped(usize),
}

impl Viommu {
    /// A vIOMMU for `endpoints` over guest RAM made of the inclusive ranges
    /// `ram`. Fails only if the fault eventfd cannot be created.
    pub fn new(cfg: &IommuConfig, endpoints: &[u32], ram: &[(u64, u64)]) -> std::io::Result<Self> {
        Ok(Viommu {
            state: RwLock::new(IommuState::new(cfg, endpoints, ram)),
            generation: AtomicU64::new(0),
            faults: FaultQueue::new(cfg.limits.max_pending_faults as usize)?,
        })
    }

    /// Read access to the state model.
    pub fn state(&self) -> RwLockReadGuard<'_, IommuState> {
        // The state is only mutated through methods that keep it valid even
        // if a panic unwinds mid-way, so a poisoned lock is still usable.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn state_mut(&self) -> RwLockWriteGuard<'_, IommuState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The current translation generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Applies ATTACH, DETACH, MAP or UNMAP. PROBE does not change state;
    /// the device answers it from [`IommuState::probe`]. On return, every
    /// access the request revoked is refused by every translator.
    pub fn apply(&self, req: &Request) -> Result<Applied, RequestError> {
        let mut st = self.state_mut();
        let res = match req {
            Request::Attach(r) => st.attach(r).map(|changed| {
                if changed {
                    self.bump();
                }
                Applied::Done
            }),
            Request::Detach(r) => st.detach(r).map(|()| {
                self.bump();
                Applied::Done
            }),
            Request::Map(r) => st.map(r).map(|()| Applied::Done),
            Request::Unmap(r) => st.unmap(r).map(|n| {
                if n > 0 {
                    self.bump();
                }
                Applied::Unmapped(n)
            }),
            Request::Probe(r) => st.probe(r).map(|_| Applied::Done),
            Request::AttachTable(_) | Request::Invalidate(_) | Request::PageResp(_) => {
                Err(RequestError::FeatureNotNegotiated {
                    request: "nested request",
                    feature: crate::wire::VIRTIO_IOMMU_F_ATTACH_TABLE,
                })
            }
        };
        drop(st);
        res
    }

    /// Sets whether unattached endpoints bypass translation.
    pub fn set_unattached_bypass(&self, bypass: bool) {
        let mut st = self.state_mut();
        if st.unattached_bypass() != bypass {
            st.set_unattached_bypass(bypass);
            self.bump();
        }
    }

    /// Records the features the driver accepted.
    pub fn set_acked_features(&self, acked: u64) {
        self.state_mut().set_acked_features(acked);
    }

    /// Device reset: every endpoint detached, every domain gone, pending
    /// faults dropped.
    pub fn reset(&self) {
        let mut st = self.state_mut();
        st.reset();
        self.bump();
        drop(st);
        self.faults.clear();
    }

    /// Translates one address (slow path: takes the state's read lock).
    pub fn translate(&self, ep: u32, iova: u64, access: u32) -> Result<Translation, FaultReason> {
        self.state().translate(ep, iova, access)
    }

    /// Queues a fault record for the driver. Faults of an endpoint this
    /// vIOMMU does not manage are not queued: spec 5.13.6.8.2 "The device
    /// SHOULD write a valid endpoint ID in endpoint".
    pub fn report_fault(&self, ep: u32, iova: u64, access: u32, reason: FaultReason) {
        if self.state().endpoint(ep).is_none() {
            log::debug!("virtio-iommu: fault of unmanaged endpoint {ep} at {iova:#x} not reported");
            return;
        }
        let mut flags = VIRTIO_IOMMU_FAULT_F_ADDRESS;
        if access & ACCESS_READ != 0 {
            flags |= VIRTIO_IOMMU_FAULT_F_READ;
        }
        if access & ACCESS_WRITE != 0 {
            flags |= VIRTIO_IOMMU_FAULT_F_WRITE;
        }
        let reason = match reason {
            FaultReason::Unknown => VIRTIO_IOMMU_FAULT_R_UNKNOWN,
            FaultReason::Domain => VIRTIO_IOMMU_FAULT_R_DOMAIN,
            FaultReason::Mapping => VIRTIO_IOMMU_FAULT_R_MAPPING,
        };
        self.faults.push(FaultRecord {
            reason,
            flags,
            endpoint: ep,
            address: iova,
        });
    }

    /// The fault queue.
    pub fn faults(&self) -> &FaultQueue {
        &self.faults
    }

    /// A fast translator with its own IOTLB for endpoint `ep`, for one
    /// emulated device thread.
    pub fn translator(self: &Arc<Self>, ep: u32) -> Translator {
        Translator::new(Arc::clone(self), ep)
    }

    /// A vm-memory [`vm_memory::Iommu`] for endpoint `ep`, to wrap guest
    /// memory in an `IommuMemory` for an emulated device.
    pub fn endpoint_iommu(self: &Arc<Self>, ep: u32) -> EndpointIommu {
        EndpointIommu::new(Arc::clone(self), ep)
    }
}
