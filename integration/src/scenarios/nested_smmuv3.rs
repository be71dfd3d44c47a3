//! The VMM's view of scenario 4, nested translation through an SMMUv3 CD
//! table.

use vmm_iommu::wire::VIRTIO_IOMMU_T_INVALIDATE;

use super::checks::{nested_common_checks, Checks};
use crate::vm::RunOutcome;

/// The VMM's view of scenario 4.
pub(super) fn nested_smmuv3_checks(c: &mut Checks, o: &RunOutcome) {
    nested_common_checks(c, o, 1);
    let req = |t: u8| o.device.requests[usize::from(t)];
    c.check(
        req(VIRTIO_IOMMU_T_INVALIDATE) == 2
            && o.router.invalidations == 2
            && o.router.invalidate_calls == 2,
        format!(
            "2 INVALIDATEs, 2 backend calls, got {} requests, {} received, {} calls",
            req(VIRTIO_IOMMU_T_INVALIDATE),
            o.router.invalidations,
            o.router.invalidate_calls
        ),
    );
    c.check(
        o.device.faults_delivered == 2,
        format!(
            "2 fault records delivered (read-only page, no SubstreamID), got {}",
            o.device.faults_delivered
        ),
    );
    let dma = &o.dma.first().cloned().unwrap_or_default();
    c.check(
        dma.ok == 6 && dma.faults == 2,
        format!("6 DMAs done, 2 faulted, got {} and {}", dma.ok, dma.faults),
    );
}
