//! Fault records waiting for the driver's event queue.
//!
//! Translators push here from whatever thread an emulated device runs on;
//! the device drains the queue into eventq buffers. The queue is bounded:
//! while the driver supplies no buffer a guest could otherwise make us hold
//! one record per failed DMA without limit, so past the bound new records
//! are dropped and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::wire::ExtFaultRecord as FaultRecord;

/// A bounded FIFO of fault records with a drop counter and an eventfd the
/// VMM polls to learn that records wait.
#[derive(Debug)]
pub struct FaultQueue {
    records: Mutex<VecDeque<FaultRecord>>,
    capacity: usize,
    dropped: AtomicU64,
    evt: EventFd,
}

impl FaultQueue {
    /// A queue holding at most `capacity` records.
    pub fn new(capacity: usize) -> std::io::Result<Self> {
        Ok(FaultQueue {
            records: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity,
            dropped: AtomicU64::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<FaultRecord>> {
        // A panic while holding this lock cannot leave the deque invalid.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a record; returns `false` (and counts a drop) when full.
    pub fn push(&self, rec: FaultRecord) -> bool {
        let mut q = self.lock();
        if q.len() >= self.capacity {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        q.push_back(rec);
        drop(q);
        // The counter saturates rather than fails; a failed write only
        // delays delivery to the next notification.
        let _ = self.evt.write(1);
        true
    }

    /// Takes the oldest record.
    pub fn pop(&self) -> Option<FaultRecord> {
        self.lock().pop_front()
    }

    /// Puts a record back at the head (a buffer turned out unusable).
    pub fn unpop(&self, rec: FaultRecord) {
        self.lock().push_front(rec);
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no record waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Drops every waiting record (device reset).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The most records the queue holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A copy of the waiting records, oldest first (for a snapshot).
    pub fn records(&self) -> Vec<FaultRecord> {
        self.lock().iter().copied().collect()
    }

    /// Drops the waiting records `keep` refuses (an unplugged endpoint's).
    pub fn retain(&self, keep: impl FnMut(&FaultRecord) -> bool) {
        self.lock().retain(keep);
    }

    /// Sets the drop counter (restore of a snapshot).
    pub fn set_dropped(&self, dropped: u64) {
        self.dropped.store(dropped, Ordering::Relaxed);
    }

    /// Readable when records were queued; the VMM then calls
    /// `VirtioIommu::process_eventq`.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queue_drops_and_counts() {
        let q = FaultQueue::new(2).unwrap();
        let r = FaultRecord::default();
        assert!(q.push(r));
        assert!(q.push(r));
        assert!(!q.push(r));
        assert_eq!(q.len(), 2);
        assert_eq!(q.dropped(), 1);
        assert_eq!(q.eventfd().read().unwrap(), 2);
    }
}
