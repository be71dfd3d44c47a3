//! The VMM's view of scenario 3, nested translation through a VT-d PASID
//! table.

use vmm_iommu::wire::{Status, VIRTIO_IOMMU_T_INVALIDATE};

use super::checks::{nested_common_checks, serial_metric, Checks};
use crate::abi;
use crate::vm::RunOutcome;

/// The VMM's view of scenario 3 (`n` benchmark INVALIDATEs).
pub(super) fn nested_vtd_checks(c: &mut Checks, o: &RunOutcome, n: u64) {
    nested_common_checks(c, o, 2);
    let req = |t: u8| o.device.requests[usize::from(t)];
    let batch = abi::NESTED_VTD_BATCH as u64;
    // One VA, one PASID, the batch, the benchmark.
    let invalidates = 2 + batch + n;
    c.check(
        req(VIRTIO_IOMMU_T_INVALIDATE) == invalidates && o.router.invalidations == invalidates,
        format!(
            "{invalidates} INVALIDATEs received, got {} requests and {} at the router",
            req(VIRTIO_IOMMU_T_INVALIDATE),
            o.router.invalidations
        ),
    );
    // One backend call per notification: the batch is one call.
    let calls = 3 + n;
    c.check(
        o.router.invalidate_calls == calls,
        format!(
            "{calls} backend invalidate calls (the batch of {batch} in one), got {}",
            o.router.invalidate_calls
        ),
    );
    c.check(
        o.router.invalidations_sent < o.router.invalidations,
        format!(
            "the batch of adjacent pages was coalesced ({} sent for {} received)",
            o.router.invalidations_sent, o.router.invalidations
        ),
    );
    c.check(
        o.device.statuses[Status::Range as usize] == 1,
        "the directory outside RAM was RANGE",
    );
    c.check(
        o.device.faults_delivered == 3,
        format!(
            "3 fault records delivered (read-only page, no RID_PASID entry, unmapped IOVA), got {}",
            o.device.faults_delivered
        ),
    );
    if let Some(e) = o.emulated {
        c.check(
            e.faults == 3 && e.page_requests == 0,
            format!(
                "3 faults, no page request, got {} and {}",
                e.faults, e.page_requests
            ),
        );
        c.check(
            e.iotlb_hits > 0 && e.context_reads >= 2,
            format!(
                "the IOTLB answered ({} hits) and the PASID entry was read again after its invalidation ({} reads)",
                e.iotlb_hits, e.context_reads
            ),
        );
    }
    let dma = &o.dma.first().cloned().unwrap_or_default();
    c.check(
        dma.ok == 7 && dma.faults == 3 && dma.bad_args == 1,
        format!(
            "7 DMAs done, 3 faulted, 1 without a translator, got {}, {} and {}",
            dma.ok, dma.faults, dma.bad_args
        ),
    );
    if n > 0 {
        c.check(
            serial_metric(&o.serial, "cycles_per_invalidate").is_some(),
            "guest reported cycles per INVALIDATE",
        );
    }
}
