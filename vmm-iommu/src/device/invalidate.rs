//! INVALIDATE batching: the INVALIDATEs of one notification wait, go to
//! the router as one batch per domain, and are answered together before
//! any later request of the queue is applied (the nested extension).

use log::debug;
use vm_memory::{Address, GuestAddress, GuestMemory};

use super::VirtioIommu;
use crate::invalidation::Invalidation;
use crate::wire::{Status, TAIL_SIZE};

/// An INVALIDATE whose status waits for the batch.
#[derive(Clone, Copy, Debug)]
pub(super) struct DeferredInvalidate {
    pub(super) head: u16,
    pub(super) used_len: u32,
    /// Where the four tail bytes go (a tail may straddle descriptors).
    pub(super) tail: [(GuestAddress, u8); TAIL_SIZE],
    pub(super) tail_pieces: u8,
    pub(super) domain: u32,
    pub(super) inv: Invalidation,
}

impl VirtioIommu {
    /// Answers the deferred INVALIDATEs: one generic batch per domain goes
    /// to the router, then every request gets its domain's status and
    /// joins the served chains the pass publishes next, after those served
    /// before it.
    pub(super) fn flush_invalidations<M: GuestMemory>(&mut self, mem: &M) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let mut domains: Vec<(u32, Status)> = Vec::new();
        let mut batch: Vec<Invalidation> = Vec::with_capacity(pending.len());
        for d in &pending {
            if domains.iter().any(|(dom, _)| *dom == d.domain) {
                continue;
            }
            batch.clear();
            batch.extend(
                pending
                    .iter()
                    .filter(|p| p.domain == d.domain)
                    .map(|p| p.inv),
            );
            let status = match self.viommu.invalidate(d.domain, &mut batch) {
                Ok(()) => Status::Ok,
                Err(e) => {
                    debug!("virtio-iommu: {e}");
                    e.status()
                }
            };
            domains.push((d.domain, status));
        }
        for d in &pending {
            let status = domains
                .iter()
                .find(|(dom, _)| *dom == d.domain)
                .map_or(Status::DevErr, |&(_, s)| s);
            let tail = status.to_tail();
            let mut at = 0usize;
            let mut ok = true;
            for &(addr, n) in &d.tail[..usize::from(d.tail_pieces)] {
                let n = usize::from(n);
                ok &= super::guest_bytes::write(mem, addr, &tail[at..at + n]).is_ok();
                at += n;
            }
            let len = if ok {
                self.stats.statuses[status as usize] += 1;
                d.used_len
            } else {
                0
            };
            self.completed.push((d.head, len));
        }
        self.pending = pending;
        self.pending.clear();
    }

    /// The guest addresses of the four tail bytes of the current chain.
    pub(super) fn tail_pieces(
        &self,
        tail_at: u64,
    ) -> Option<([(GuestAddress, u8); TAIL_SIZE], u8)> {
        let mut out = [(GuestAddress(0), 0u8); TAIL_SIZE];
        let mut count = 0u8;
        let mut skip = tail_at;
        let mut need = TAIL_SIZE as u64;
        for &(addr, len) in &self.writable {
            if need == 0 {
                break;
            }
            let len = u64::from(len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(need);
            out[usize::from(count)] = (addr.checked_add(skip)?, n as u8);
            count += 1;
            need -= n;
            skip = 0;
        }
        (need == 0).then_some((out, count))
    }
}
