//! Fault records waiting for the driver's event queue.
//!
//! Translators push here from whatever thread an emulated device runs on;
//! the device drains the queue into eventq buffers. The queue is bounded:
//! while the driver supplies no buffer a guest could otherwise make us hold
//! one record per failed DMA without limit, so past the bound new records
//! are dropped and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::padded::Padded;
use crate::wire::ExtFaultRecord as FaultRecord;

/// Drop counters of a queue. Each reporter (a `Translator`, a
/// `DmaMemory`) counts on one of them, alone on its lines: device threads
/// faulting at once against a full queue would otherwise take turns on
/// one line, and a storm on two threads cost each a cross-core miss per
/// fault.
const DROP_SHARDS: usize = 8;

/// A bounded FIFO of fault records with a drop counter and an eventfd the
/// VMM polls to learn that records wait.
#[derive(Debug)]
pub struct FaultQueue {
    records: Mutex<VecDeque<FaultRecord>>,
    /// `records.len()`, stored under the lock at every change, so that a
    /// push to a full queue is refused without taking the lock (see
    /// [`FaultQueue::is_full`]).
    waiting: AtomicUsize,
    capacity: usize,
    dropped: [Padded<AtomicU64>; DROP_SHARDS],
    /// The next reporter's drop counter (see [`FaultQueue::drop_shard`]).
    next_shard: AtomicUsize,
    evt: EventFd,
}

impl FaultQueue {
    /// A queue holding at most `capacity` records.
    pub fn new(capacity: usize) -> std::io::Result<Self> {
        Ok(FaultQueue {
            records: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            waiting: AtomicUsize::new(0),
            capacity,
            dropped: std::array::from_fn(|_| Padded(AtomicU64::new(0))),
            next_shard: AtomicUsize::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<FaultRecord>> {
        // A panic while holding this lock cannot leave the deque invalid.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the records under the lock and notes how many wait
    /// after it.
    fn with_records<R>(&self, f: impl FnOnce(&mut VecDeque<FaultRecord>) -> R) -> R {
        let mut q = self.lock();
        let r = f(&mut q);
        self.waiting.store(q.len(), Ordering::Relaxed);
        r
    }

    /// Whether the queue was full when last changed: read without the
    /// lock, so a fault storm against a full queue (a guest that makes a
    /// device fault and supplies no event buffer) costs each faulting
    /// thread a load and the drop count, and no lock the others wait on.
    /// A record popped meanwhile is seen at the next push.
    pub fn is_full(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) >= self.capacity
    }

    /// The drop counter for a new reporter: handed out in turn, so that
    /// the first reporters each count on their own.
    pub fn drop_shard(&self) -> usize {
        self.next_shard.fetch_add(1, Ordering::Relaxed) % DROP_SHARDS
    }

    /// Counts one record dropped for a full queue (see [`Self::is_full`])
    /// on the reporter's counter `shard` (from [`Self::drop_shard`]; any
    /// value is accepted).
    pub fn count_drop(&self, shard: usize) {
        self.dropped[shard % DROP_SHARDS].fetch_add(1, Ordering::Relaxed);
    }

    /// Queues a record; returns `false` (and counts a drop) when full.
    pub fn push(&self, rec: FaultRecord) -> bool {
        self.push_in(0, rec)
    }

    /// [`Self::push`], counting a drop on `shard`.
    pub(crate) fn push_in(&self, shard: usize, rec: FaultRecord) -> bool {
        if self.is_full() {
            self.count_drop(shard);
            return false;
        }
        let queued = self.with_records(|q| {
            if q.len() >= self.capacity {
                return false;
            }
            q.push_back(rec);
            true
        });
        if !queued {
            self.count_drop(shard);
            return false;
        }
        // The counter saturates rather than fails; a failed write only
        // delays delivery to the next notification.
        let _ = self.evt.write(1);
        true
    }

    /// Takes the oldest record.
    pub fn pop(&self) -> Option<FaultRecord> {
        self.with_records(VecDeque::pop_front)
    }

    /// Puts a record back at the head (a buffer turned out unusable).
    pub fn unpop(&self, rec: FaultRecord) {
        self.with_records(|q| q.push_front(rec));
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
        self.dropped
            .iter()
            .fold(0u64, |n, d| n.wrapping_add(d.load(Ordering::Relaxed)))
    }

    /// Drops every waiting record (device reset).
    pub fn clear(&self) {
        self.with_records(VecDeque::clear);
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
        self.with_records(|q| q.retain(keep));
    }

    /// Sets the drop counter (restore of a snapshot).
    pub fn set_dropped(&self, dropped: u64) {
        for (i, d) in self.dropped.iter().enumerate() {
            d.store(if i == 0 { dropped } else { 0 }, Ordering::Relaxed);
        }
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

    #[test]
    fn fullness_is_known_without_the_lock_and_follows_every_change() {
        let q = FaultQueue::new(2).unwrap();
        let r = FaultRecord::default();
        let full = |q: &FaultQueue| (q.is_full(), q.len());
        assert_eq!(full(&q), (false, 0));
        q.push(r);
        q.push(r);
        assert_eq!(full(&q), (true, 2));
        assert!(!q.push(r));
        assert_eq!(q.dropped(), 1);
        q.pop();
        assert_eq!(full(&q), (false, 1));
        assert!(q.push(r));
        q.retain(|_| false);
        assert_eq!(full(&q), (false, 0));
        q.push(r);
        q.unpop(r);
        assert_eq!(full(&q), (true, 2));
        q.clear();
        assert_eq!(full(&q), (false, 0));
        q.count_drop(0);
        assert_eq!(q.dropped(), 2);
    }

    #[test]
    fn drops_counted_by_many_reporters_add_up_and_a_restore_sets_the_total() {
        let q = FaultQueue::new(0).unwrap();
        let shards: Vec<usize> = (0..DROP_SHARDS).map(|_| q.drop_shard()).collect();
        let mut distinct = shards.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            DROP_SHARDS,
            "the first reporters count apart"
        );
        for (n, &s) in shards.iter().enumerate() {
            for _ in 0..=n {
                q.count_drop(s);
            }
        }
        // Any shard value is accepted, wrapped onto a counter.
        q.count_drop(usize::MAX);
        assert!(!q.push(FaultRecord::default()));
        let counted = (DROP_SHARDS * (DROP_SHARDS + 1) / 2 + 2) as u64;
        assert_eq!(q.dropped(), counted);
        q.set_dropped(5);
        assert_eq!(q.dropped(), 5);
        q.count_drop(shards[3]);
        assert_eq!(q.dropped(), 6);
    }
}
