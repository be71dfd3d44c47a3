//! The VMM's view of scenario 5, page requests and PAGE_RESP.

use vmm_iommu::wire::{Status, VIRTIO_IOMMU_T_PAGE_RESP};

use super::checks::{nested_common_checks, Checks};
use crate::vm::RunOutcome;

/// The VMM's view of scenario 5.
pub(super) fn page_request_checks(c: &mut Checks, o: &RunOutcome) {
    nested_common_checks(c, o, 1);
    let req = |t: u8| o.device.requests[usize::from(t)];
    c.check(
        req(VIRTIO_IOMMU_T_PAGE_RESP) == 5,
        format!(
            "5 PAGE_RESPs (2 SUCCESS, 1 FAILURE, 2 for no pending group), got {}",
            req(VIRTIO_IOMMU_T_PAGE_RESP)
        ),
    );
    c.check(
        o.device.statuses[Status::NoEnt as usize] == 2,
        "the 2 PAGE_RESPs for no pending group were NOENT",
    );
    c.check(
        o.device.faults_delivered == 3,
        format!(
            "3 page requests delivered on the eventq, got {}",
            o.device.faults_delivered
        ),
    );
    if let Some(e) = o.emulated {
        c.check(
            e.page_requests == 3 && e.faults == 0,
            format!(
                "3 page requests, no unrecoverable fault, got {} and {}",
                e.page_requests, e.faults
            ),
        );
    }
    let dma = &o.dma.first().cloned().unwrap_or_default();
    c.check(
        dma.page_waits == 3 && dma.retries == 2 && dma.ok == 2 && dma.faults == 1,
        format!(
            "3 waits for a page, 2 retries, 2 DMAs done, 1 failed, got {}, {}, {} and {}",
            dma.page_waits, dma.retries, dma.ok, dma.faults
        ),
    );
}
