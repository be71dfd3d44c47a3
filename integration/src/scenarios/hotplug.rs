//! Scenario 8, hot-plug: a DMA engine plugged in at one sync point and
//! unplugged while attached at the next; and the VMM's view of the run.

use vmm_iommu::wire::{Status, VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_UNMAP};

use super::checks::{path_checks, Check, Checks};
use super::RunOptions;
use crate::abi;
use crate::config::VmConfig;
use crate::vm::{dma_slots, HotplugPlan, RunOutcome, Vm, VmError, VmOptions};

/// The endpoint the hot-plug run plugs in (none of the shipped configs
/// uses it).
pub const HOTPLUG_ENDPOINT: u32 = 0x40;

/// The hot-plug run: scenario 8 with [`HOTPLUG_ENDPOINT`] plugged in and
/// out at its sync points.
pub fn run_hotplug(cfg: &VmConfig, opts: &RunOptions) -> (Result<RunOutcome, VmError>, Vec<Check>) {
    let vm_opts = VmOptions {
        scenario: abi::SCENARIO_HOTPLUG,
        bench_iterations: 0,
        fast_paths: opts.fast_paths,
        hotplug: Some(HotplugPlan {
            endpoint: HOTPLUG_ENDPOINT,
            plug_at: abi::HOTPLUG_PLUG_SYNC,
            unplug_at: abi::HOTPLUG_UNPLUG_SYNC,
        }),
    };
    let outcome = Vm::new(cfg, &vm_opts).and_then(|vm| vm.run(opts.timeout));
    let checks = match &outcome {
        Ok(o) => hotplug_checks(cfg, opts, o),
        Err(_) => Vec::new(),
    };
    (outcome, checks)
}

/// The VMM's view of scenario 8.
fn hotplug_checks(cfg: &VmConfig, opts: &RunOptions, o: &RunOutcome) -> Vec<Check> {
    let mut c = Checks::default();
    c.check(
        o.result == abi::RESULT_PASS,
        format!("guest result code {} (0 = pass)", o.result),
    );
    c.check(
        o.serial.contains("hotplug: PASS"),
        "guest printed \"hotplug: PASS\"",
    );
    c.check(o.faults_dropped == 0, "no fault record dropped");
    path_checks(&mut c, opts, o);
    let h = o.hotplug;
    c.check(
        (h.plugged, h.unplugged, h.ejected, h.bad_ejects) == (1, 1, 1, 0),
        format!(
            "one engine plugged, unplugged and ejected, got {}, {}, {} ({} bad ejects)",
            h.plugged, h.unplugged, h.ejected, h.bad_ejects
        ),
    );
    let cold = dma_slots(cfg).map_or(0, |v| v.len());
    let plugged = o.dma.get(cold).cloned().unwrap_or_default();
    c.check(
        plugged.ok == 1 && plugged.faults == 1,
        format!(
            "the plugged engine: 1 DMA done, 1 refused after the unplug, got {} and {}",
            plugged.ok, plugged.faults
        ),
    );
    let req = |t: u8| o.device.requests[usize::from(t)];
    let pairs = 2 * abi::HOTPLUG_BATCH_PAIRS as u64;
    c.check(
        req(VIRTIO_IOMMU_T_MAP) == 3 + pairs && req(VIRTIO_IOMMU_T_UNMAP) == 2 + pairs,
        format!(
            "{} MAPs and {} UNMAPs (the batches included), got {} and {}",
            3 + pairs,
            2 + pairs,
            req(VIRTIO_IOMMU_T_MAP),
            req(VIRTIO_IOMMU_T_UNMAP)
        ),
    );
    c.check(
        o.device.statuses[Status::NoEnt as usize] == 4,
        format!(
            "4 requests naming the unplugged endpoint or its domain were NOENT, got {}",
            o.device.statuses[Status::NoEnt as usize]
        ),
    );
    c.check(o.device.faults_delivered == 0, "no fault record delivered");
    c.check(
        o.final_mappings == 0 && o.final_domains == 0,
        "no domain left (the plugged engine's ended with it)",
    );
    c.0
}
