//! The VMM's view of scenario 2, bypass.

use vmm_iommu::wire::{VIRTIO_IOMMU_T_ATTACH, VIRTIO_IOMMU_T_DETACH};

use super::checks::Checks;
use crate::vm::dma_device::DmaStats;
use crate::vm::RunOutcome;

/// The VMM's view of scenario 2: an ATTACH refused and one with
/// `ATTACH_F_BYPASS`, DOMAIN faults for the DMAs bypass off refused, no
/// mapping ever made.
pub(super) fn bypass_checks(c: &mut Checks, o: &RunOutcome, dma: &DmaStats) {
    let req = |t: u8| o.device.requests[usize::from(t)];
    c.check(
        req(VIRTIO_IOMMU_T_ATTACH) == 2 && req(VIRTIO_IOMMU_T_DETACH) == 1,
        "two ATTACHes (one refused) and a DETACH reached the device",
    );
    c.check(
        o.device.faults_delivered == 2,
        format!(
            "2 DOMAIN fault records delivered, got {}",
            o.device.faults_delivered
        ),
    );
    c.check(
        dma.faults == 3 && dma.ok == 3,
        format!(
            "3 DMAs done, 3 refused (two by the IOMMU, one by the hole), got {} and {}",
            dma.ok, dma.faults
        ),
    );
    c.check(o.final_domains == 0, "no domain left");
    c.check(o.peak_mappings == 0, "no mapping ever made");
}
