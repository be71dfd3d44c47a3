//! The software IOMMU's counters: cache hits, walks, invalidations,
//! faults and page requests, for reports and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};

/// A plain copy of [`EmulatedStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmulatedCounts {
    /// Translations answered from the IOTLB.
    pub iotlb_hits: u64,
    /// Walks done (IOTLB misses).
    pub walks: u64,
    /// Walks that resumed from the paging-structure cache.
    pub pwc_hits: u64,
    /// PASID entries / CDs read from guest memory.
    pub context_reads: u64,
    /// `invalidate` calls received.
    pub invalidate_calls: u64,
    /// Generic invalidations received in them.
    pub invalidations: u64,
    /// Faults reported.
    pub faults: u64,
    /// Page requests sent.
    pub page_requests: u64,
}

impl EmulatedStats {
    /// A plain copy of the counters.
    pub fn snapshot(&self) -> EmulatedCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EmulatedCounts {
            iotlb_hits: l(&self.iotlb_hits),
            walks: l(&self.walks),
            pwc_hits: l(&self.pwc_hits),
            context_reads: l(&self.context_reads),
            invalidate_calls: l(&self.invalidate_calls),
            invalidations: l(&self.invalidations),
            faults: l(&self.faults),
            page_requests: l(&self.page_requests),
        }
    }
}

/// Counters, for reports and benchmarks.
#[derive(Debug, Default)]
pub struct EmulatedStats {
    /// Translations answered from the IOTLB.
    pub iotlb_hits: AtomicU64,
    /// Walks done (IOTLB misses).
    pub walks: AtomicU64,
    /// Walks that resumed from the paging-structure cache.
    pub pwc_hits: AtomicU64,
    /// PASID entries / CDs read from guest memory.
    pub context_reads: AtomicU64,
    /// `invalidate` calls received.
    pub invalidate_calls: AtomicU64,
    /// Generic invalidations received in them.
    pub invalidations: AtomicU64,
    /// Faults reported.
    pub faults: AtomicU64,
    /// Page requests sent.
    pub page_requests: AtomicU64,
}
