//! The virtio-iommu device as a [`VirtioDevice`] of the virtio-mmio
//! transport: queue 0 is the request queue, queue 1 the event queue, and
//! pending fault records are delivered whenever the VMM asks for pending
//! work (after each DMA, and when the fault eventfd fires). And the
//! transport with its device as the vCPU thread and the device worker
//! share it ([`SharedIommu`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_iommu::wire::{EVENT_QUEUE, REQUEST_QUEUE};
use vmm_iommu::{DeviceError, VirtioInterrupt, VirtioIommu};

use super::virtio_mmio::{VirtioDevice, VirtioMmio};

/// The virtio-iommu's transport behind one lock, shared by the vCPU thread
/// (register accesses, fault delivery after a DMA) and the device worker
/// (ioeventfd kicks, the fault eventfd). Whoever holds the lock serves one
/// register access or one queue pass to the end, so the transport's state
/// machine sees the accesses in some order, each whole; the DMA engines
/// are not behind it and run without it.
#[derive(Debug)]
pub struct SharedIommu {
    transport: Mutex<VirtioMmio<VirtioIommu>>,
    peak_mappings: AtomicU64,
}

impl SharedIommu {
    /// Shares `transport`.
    pub fn new(transport: VirtioMmio<VirtioIommu>) -> Self {
        SharedIommu {
            transport: Mutex::new(transport),
            peak_mappings: AtomicU64::new(0),
        }
    }

    /// Locks the transport.
    pub fn lock(&self) -> MutexGuard<'_, VirtioMmio<VirtioIommu>> {
        // Nothing the guest does panics while holding the lock; if a bug
        // did, the transport's state is still memory-safe and the run ends
        // with that panic's thread, so the other side may go on to report.
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Samples the number of live mappings (after a request-queue pass).
    pub fn sample_mappings(&self, t: &VirtioMmio<VirtioIommu>) {
        let n = t.device().viommu().state().total_mappings();
        self.peak_mappings.fetch_max(n, Ordering::Relaxed);
    }

    /// Most mappings alive at once, as sampled.
    pub fn peak_mappings(&self) -> u64 {
        self.peak_mappings.load(Ordering::Relaxed)
    }
}

impl VirtioDevice for VirtioIommu {
    fn device_type(&self) -> u32 {
        VirtioIommu::device_type(self)
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        VirtioIommu::queue_max_sizes(self).to_vec()
    }

    fn features(&self) -> u64 {
        self.avail_features()
    }

    fn ack_features(&mut self, features: u64) {
        self.set_acked_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        VirtioIommu::read_config(self, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        VirtioIommu::write_config(self, offset, data);
    }

    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), DeviceError> {
        let mut it = queues.into_iter();
        let (Some(requestq), Some(eventq)) = (it.next(), it.next()) else {
            return Err(DeviceError::InvalidQueue(EVENT_QUEUE));
        };
        VirtioIommu::activate(self, mem, requestq, eventq, interrupt)
    }

    fn queue_notify(&mut self, mem: &GuestMemoryMmap, queue: u16) -> Result<(), DeviceError> {
        match queue {
            REQUEST_QUEUE => self.process_requestq(mem).map(|_| ()),
            EVENT_QUEUE => self.process_eventq(mem).map(|_| ()),
            _ => Ok(()),
        }
    }

    fn queue_pending(&self, mem: &GuestMemoryMmap, queue: u16) -> bool {
        queue == REQUEST_QUEUE && self.requestq_pending(mem)
    }

    fn queue_poll_pass(&mut self, mem: &GuestMemoryMmap, queue: u16) -> Result<(), DeviceError> {
        match queue {
            REQUEST_QUEUE => self.process_requestq_polling(mem).map(|_| ()),
            _ => self.queue_notify(mem, queue),
        }
    }

    fn resume_notifications(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: u16,
    ) -> Result<bool, DeviceError> {
        match queue {
            REQUEST_QUEUE => self.resume_requestq_notifications(mem),
            _ => Ok(false),
        }
    }

    fn process_pending(&mut self, mem: &GuestMemoryMmap) -> Result<(), DeviceError> {
        if self.viommu().faults().is_empty() {
            return Ok(());
        }
        self.process_eventq(mem).map(|_| ())
    }

    fn reset(&mut self) {
        VirtioIommu::reset(self);
    }
}
