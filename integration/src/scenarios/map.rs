//! The VMM's view of scenario 1, MAP mode, which the hostile scenario
//! also ends with.

use vmm_iommu::wire::{
    VIRTIO_IOMMU_T_ATTACH, VIRTIO_IOMMU_T_DETACH, VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_PROBE,
    VIRTIO_IOMMU_T_UNMAP,
};

use super::checks::{serial_metric, Checks};
use crate::vm::dma_device::DmaStats;
use crate::vm::RunOutcome;

/// Scenario 1 run alone (`n` benchmark round trips): what
/// [`map_checks`] expects, the `map_faults` refused DMAs and their fault
/// records, and a transport the driver never upset.
pub(super) fn map_scenario_checks(
    c: &mut Checks,
    o: &RunOutcome,
    n: u64,
    map_faults: u64,
    dma: &DmaStats,
) {
    map_checks(c, o, n);
    c.check(
        o.device.faults_delivered == map_faults,
        format!(
            "{map_faults} fault records delivered on the eventq, got {}",
            o.device.faults_delivered
        ),
    );
    c.check(
        dma.faults == map_faults,
        format!("{map_faults} DMAs refused, got {}", dma.faults),
    );
    c.check(
        o.transport.needs_reset == 0 && o.transport.ignored == 0,
        "the driver never upset the transport",
    );
}

/// The VMM's view of scenario 1.
pub(super) fn map_checks(c: &mut Checks, o: &RunOutcome, n: u64) {
    let req = |t: u8| o.device.requests[usize::from(t)];
    c.check(
        req(VIRTIO_IOMMU_T_PROBE) >= 2 && req(VIRTIO_IOMMU_T_ATTACH) >= 1,
        "PROBE and ATTACH reached the device",
    );
    c.check(
        req(VIRTIO_IOMMU_T_MAP) >= 4 + n && req(VIRTIO_IOMMU_T_UNMAP) >= 2 + n,
        format!(
            "MAP {} and UNMAP {} requests (4 + {n} and 2 + {n} expected at least)",
            req(VIRTIO_IOMMU_T_MAP),
            req(VIRTIO_IOMMU_T_UNMAP)
        ),
    );
    c.check(req(VIRTIO_IOMMU_T_DETACH) >= 1, "DETACH reached the device");
    c.check(
        o.peak_mappings >= 4,
        format!("4 mappings alive at once, saw {}", o.peak_mappings),
    );
    c.check(
        o.final_mappings == 0 && o.final_domains == 0,
        "DETACH ended the domain and its mappings",
    );
    c.check(
        o.device.unmapped >= 3 + n,
        format!("UNMAP removed {} mappings", o.device.unmapped),
    );
    if n > 0 {
        c.check(
            serial_metric(&o.serial, "cycles_per_map_unmap").is_some(),
            "guest reported cycles per MAP+UNMAP",
        );
    }
    c.check(o.boot_to_first_request.is_some(), "the guest sent requests");
}
