//! The event queue: fault records (and page requests) delivered into the
//! buffers the driver posts.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use super::{DeviceError, VirtioIommu, MAX_WRITABLE_SEGMENTS};
use crate::wire::{
    EVENT_QUEUE, EXT_FAULT_SIZE, FAULT_SIZE, VIRTIO_IOMMU_F_ATTACH_TABLE,
    VIRTIO_IOMMU_F_PAGE_REQUEST,
};

impl VirtioIommu {
    /// Delivers waiting fault records into the driver's event buffers (call
    /// on an event-queue notification and when [`Self::fault_eventfd`] is
    /// readable). Returns the number of records delivered.
    pub fn process_eventq<M: GuestMemory>(&mut self, mem: &M) -> Result<usize, DeviceError> {
        let mut q = self.eventq.take().ok_or(DeviceError::NotActivated)?;
        let res = self.drain_eventq(mem, &mut q);
        self.eventq = Some(q);
        let (done, notify) = res?;
        if notify {
            self.signal(EVENT_QUEUE)?;
        }
        Ok(done)
    }

    fn drain_eventq<M: GuestMemory>(
        &mut self,
        mem: &M,
        q: &mut Queue,
    ) -> Result<(usize, bool), DeviceError> {
        let qerr = |source| DeviceError::Queue {
            queue: EVENT_QUEUE,
            source,
        };
        // Clear the eventfd's count; the queue itself is the truth.
        let _ = self.viommu.faults().eventfd().read();
        self.viommu.collect_backend_faults();
        // A driver that knows the nested extension gets the extended record
        // (with the PASID and the page-request group); others the spec's.
        let extended = self.negotiated(VIRTIO_IOMMU_F_ATTACH_TABLE)
            || self.negotiated(VIRTIO_IOMMU_F_PAGE_REQUEST);
        let rec_size = if extended { EXT_FAULT_SIZE } else { FAULT_SIZE };
        let mut done = 0;
        let mut used = 0;
        while !self.viommu.faults().is_empty() {
            let Some(chain) = q.iter(mem).map_err(qerr)?.next() else {
                break;
            };
            let head = chain.head_index();
            self.writable.clear();
            let mut wtotal = 0u64;
            for desc in chain {
                if desc.is_write_only() && self.writable.len() < MAX_WRITABLE_SEGMENTS {
                    self.writable.push((desc.addr(), desc.len()));
                    wtotal += u64::from(desc.len());
                }
            }
            used += 1;
            // spec 5.13.6.8.2: "If a buffer is too small to contain the fault
            // report, the device SHOULD NOT use multiple buffers to describe
            // it." The record stays queued for the next buffer.
            if wtotal < rec_size as u64 {
                self.stats.event_buffers_too_small += 1;
                q.add_used(mem, head, 0).map_err(qerr)?;
                continue;
            }
            let Some(rec) = self.viommu.faults().pop() else {
                q.add_used(mem, head, 0).map_err(qerr)?;
                break;
            };
            let written = if extended {
                self.write_at(mem, 0, &rec.encode())
            } else {
                self.write_at(mem, 0, &rec.to_classic().encode())
            };
            if written.is_err() {
                self.viommu.faults().unpop(rec);
                q.add_used(mem, head, 0).map_err(qerr)?;
                continue;
            }
            q.add_used(mem, head, rec_size as u32).map_err(qerr)?;
            self.stats.faults_delivered += 1;
            done += 1;
        }
        let notify = used > 0 && q.needs_notification(mem).map_err(qerr)?;
        Ok((done, notify))
    }

    /// Readable when fault records wait for the event queue.
    pub fn fault_eventfd(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.viommu.faults().eventfd()
    }
}
