//! The virtio-iommu device as a [`VirtioDevice`] of the virtio-mmio
//! transport: queue 0 is the request queue, queue 1 the event queue, and
//! pending fault records are delivered whenever the VMM asks for pending
//! work (after each DMA).

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_iommu::wire::{EVENT_QUEUE, REQUEST_QUEUE};
use vmm_iommu::{DeviceError, VirtioInterrupt, VirtioIommu};

use super::virtio_mmio::VirtioDevice;

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
