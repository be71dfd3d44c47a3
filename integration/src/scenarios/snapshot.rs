//! Scenario 7 across a snapshot: boot, pause at the sync point, snapshot,
//! restore into a new VM, run to the end there; and the VMM's view of what
//! the restored VM did.

use std::time::{Duration, Instant};

use vmm_iommu::wire::{
    VIRTIO_IOMMU_T_ATTACH, VIRTIO_IOMMU_T_DETACH, VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_UNMAP,
};

use super::checks::{path_checks, primary_dma, Check, Checks};
use super::RunOptions;
use crate::abi;
use crate::config::VmConfig;
use crate::vm::snapshot::{SnapshotError, SnapshotSize};
use crate::vm::{RunEnd, RunOutcome, Vm, VmError, VmOptions};

/// A snapshot run: scenario 7 booted, paused at its sync point,
/// snapshotted, restored into a new VM and run to the end there.
#[derive(Debug)]
pub struct SnapshotRun {
    /// The restored VM's run (its counters start at the restore), or why
    /// the run, the snapshot or the restore failed.
    pub outcome: Result<RunOutcome, VmError>,
    /// The snapshot's size, part by part.
    pub size: Option<SnapshotSize>,
    /// From the vCPU's stop at the sync point to the snapshot in hand.
    pub snapshot_time: Duration,
    /// Building the new VM and restoring the snapshot into it.
    pub restore_time: Duration,
    /// From the vCPU's stop at the sync point to the new VM about to run.
    pub pause_to_resume: Duration,
    /// The VMM's checks (empty if the VM failed).
    pub checks: Vec<Check>,
}

impl SnapshotRun {
    /// Whether the guest passed and every VMM check held.
    pub fn passed(&self) -> bool {
        self.outcome.is_ok() && self.checks.iter().all(|c| c.ok)
    }
}

/// Boots scenario 7, pauses it at `abi::SNAPSHOT_SYNC`, snapshots the VM,
/// drops it, restores the snapshot into a new VM built from `cfg`, runs
/// that to the end and checks what it did.
pub fn run_snapshot(cfg: &VmConfig, opts: &RunOptions) -> SnapshotRun {
    let vm_opts = VmOptions {
        scenario: abi::SCENARIO_SNAPSHOT,
        bench_iterations: 0,
        fast_paths: opts.fast_paths,
        hotplug: None,
    };
    let mut run = SnapshotRun {
        outcome: Err(VmError::Snapshot(SnapshotError::NotPaused)),
        size: None,
        snapshot_time: Duration::ZERO,
        restore_time: Duration::ZERO,
        pause_to_resume: Duration::ZERO,
        checks: Vec::new(),
    };
    let paused = Vm::new(cfg, &vm_opts).and_then(|mut vm| {
        match vm.run_until_pause(opts.timeout, abi::SNAPSHOT_SYNC)? {
            RunEnd::Paused(_) => Ok(Some(vm)),
            RunEnd::Done(o) => {
                run.checks.push(Check {
                    what: format!("the guest paused at sync point {}", abi::SNAPSHOT_SYNC),
                    ok: false,
                });
                run.outcome = Ok(*o);
                Ok(None)
            }
        }
    });
    let mut vm = match paused {
        Ok(Some(vm)) => vm,
        Ok(None) => return run,
        Err(e) => {
            run.outcome = Err(e);
            return run;
        }
    };
    let stopped = Instant::now();
    let snap = match vm.snapshot() {
        Ok(s) => s,
        Err(e) => {
            run.outcome = Err(e.into());
            return run;
        }
    };
    run.snapshot_time = stopped.elapsed();
    let start = Instant::now();
    let restored = Vm::restore(cfg, &vm_opts, &snap);
    run.restore_time = start.elapsed();
    run.pause_to_resume = stopped.elapsed();
    // The old VM is gone before the new one runs: nothing is shared.
    drop(vm);
    run.size = Some(snap.size());
    drop(snap);
    run.outcome = restored.and_then(|vm| vm.run(opts.timeout));
    if let Ok(o) = &run.outcome {
        run.checks = snapshot_checks(cfg, opts, o);
    }
    run
}

/// The VMM's view of scenario 7 after the restore: the guest's requests
/// there (one MAP, two UNMAPs, a DETACH, nothing re-attached or
/// re-activated), its DMA through the restored mappings, the two faults
/// on the restored event queue.
fn snapshot_checks(cfg: &VmConfig, opts: &RunOptions, o: &RunOutcome) -> Vec<Check> {
    let mut c = Checks::default();
    c.check(
        o.result == abi::RESULT_PASS,
        format!("guest result code {} (0 = pass)", o.result),
    );
    c.check(
        o.serial.contains("snapshot: PASS"),
        "guest printed \"snapshot: PASS\"",
    );
    c.check(
        o.restores == 1,
        format!("the VM was restored once, got {}", o.restores),
    );
    c.check(o.faults_dropped == 0, "no fault record dropped");
    path_checks(&mut c, opts, o);
    let req = |t: u8| o.device.requests[usize::from(t)];
    c.check(
        req(VIRTIO_IOMMU_T_ATTACH) == 0
            && req(VIRTIO_IOMMU_T_MAP) == 1
            && req(VIRTIO_IOMMU_T_UNMAP) == 2
            && req(VIRTIO_IOMMU_T_DETACH) == 1,
        format!(
            "after the restore: 0 ATTACH, 1 MAP, 2 UNMAP, 1 DETACH, got {}, {}, {}, {}",
            req(VIRTIO_IOMMU_T_ATTACH),
            req(VIRTIO_IOMMU_T_MAP),
            req(VIRTIO_IOMMU_T_UNMAP),
            req(VIRTIO_IOMMU_T_DETACH)
        ),
    );
    c.check(
        o.transport.activations == 0 && o.transport.needs_reset == 0 && o.transport.ignored == 0,
        format!(
            "the restored transport ran on: {} activations, {} device errors, {} ignored",
            o.transport.activations, o.transport.needs_reset, o.transport.ignored
        ),
    );
    c.check(
        o.device.faults_delivered == 2,
        format!(
            "2 fault records on the restored event queue, got {}",
            o.device.faults_delivered
        ),
    );
    let dma = primary_dma(cfg, o);
    c.check(
        dma.ok == 2 && dma.faults == 2,
        format!(
            "2 DMAs through restored or new mappings, 2 refused, got {} and {}",
            dma.ok, dma.faults
        ),
    );
    c.check(
        o.final_mappings == 0 && o.final_domains == 0,
        "DETACH ended the restored domain",
    );
    c.0
}
