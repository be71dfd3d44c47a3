//! One VM per scenario: boot it with the scenario's number, run it to the
//! end, and check what it did with the scenario's own checks.

use std::time::{Duration, Instant};

use super::checks::{path_checks, primary_dma, serial_metric, Check, Checks};
use super::{bypass, hostile, map, nested_smmuv3, nested_vtd, page_request, RunOptions};
use crate::abi;
use crate::config::{Scenario, VmConfig};
use crate::vm::{RunOutcome, Vm, VmError, VmOptions};

/// The scenario number the guest program knows.
pub fn scenario_id(s: Scenario) -> u64 {
    match s {
        Scenario::Map => abi::SCENARIO_MAP,
        Scenario::Bypass => abi::SCENARIO_BYPASS,
        Scenario::NestedVtd => abi::SCENARIO_NESTED_VTD,
        Scenario::NestedSmmuV3 => abi::SCENARIO_NESTED_SMMUV3,
        Scenario::PageRequest => abi::SCENARIO_PAGE_REQUEST,
        Scenario::Hostile => abi::SCENARIO_HOSTILE,
    }
}

/// A scenario's run: the VM's outcome and the VMM's checks on it.
#[derive(Debug)]
pub struct ScenarioRun {
    /// The scenario.
    pub scenario: Scenario,
    /// What the VM did.
    pub outcome: Result<RunOutcome, VmError>,
    /// How long building the VM took (KVM set-up, memory, program load).
    pub build_time: Duration,
    /// The VMM's checks (empty if the VM failed).
    pub checks: Vec<Check>,
}

impl ScenarioRun {
    /// Whether the guest passed and every VMM check held.
    pub fn passed(&self) -> bool {
        self.outcome.is_ok() && self.checks.iter().all(|c| c.ok)
    }

    /// The guest's serial log, whatever the outcome.
    pub fn serial(&self) -> &str {
        match &self.outcome {
            Ok(o) => &o.serial,
            Err(e) => e.serial().unwrap_or(""),
        }
    }

    /// The guest's measurement of TSC cycles per MAP+UNMAP round trip.
    pub fn cycles_per_map_unmap(&self) -> Option<u64> {
        serial_metric(self.serial(), "cycles_per_map_unmap")
    }

    /// The guest's measurement of TSC cycles per INVALIDATE (request,
    /// notification, backend call, status).
    pub fn cycles_per_invalidate(&self) -> Option<u64> {
        serial_metric(self.serial(), "cycles_per_invalidate")
    }
}

/// Boots a VM for `s` and checks what it did.
pub fn run_scenario(cfg: &VmConfig, s: Scenario, opts: &RunOptions) -> ScenarioRun {
    let vm_opts = VmOptions {
        scenario: scenario_id(s),
        bench_iterations: opts.bench_iterations,
        fast_paths: opts.fast_paths,
        hotplug: None,
    };
    let start = Instant::now();
    let vm = Vm::new(cfg, &vm_opts);
    let build_time = start.elapsed();
    let outcome = vm.and_then(|vm| vm.run(opts.timeout));
    let checks = match &outcome {
        Ok(o) => host_checks(cfg, s, opts, o),
        Err(_) => Vec::new(),
    };
    ScenarioRun {
        scenario: s,
        outcome,
        build_time,
        checks,
    }
}

/// What the VMM expects to have seen for each scenario, beyond the guest's
/// PASS.
fn host_checks(cfg: &VmConfig, s: Scenario, opts: &RunOptions, o: &RunOutcome) -> Vec<Check> {
    let mut c = Checks::default();
    c.check(
        o.result == abi::RESULT_PASS,
        format!("guest result code {} (0 = pass)", o.result),
    );
    c.check(
        o.serial.contains(&format!("{}: PASS", s.as_str())),
        format!("guest printed \"{}: PASS\"", s.as_str()),
    );
    c.check(o.faults_dropped == 0, "no fault record dropped");
    path_checks(&mut c, opts, o);
    let dma = primary_dma(cfg, o);
    let n = opts.bench_iterations;
    let bypass_initial = cfg.iommu.bypass && !cfg.iommu.legacy_bypass;
    let map_faults = if bypass_initial { 2 } else { 3 };
    match s {
        Scenario::Map => map::map_scenario_checks(&mut c, o, n, map_faults, &dma),
        Scenario::Bypass => bypass::bypass_checks(&mut c, o, &dma),
        Scenario::NestedVtd => nested_vtd::nested_vtd_checks(&mut c, o, n),
        Scenario::NestedSmmuV3 => nested_smmuv3::nested_smmuv3_checks(&mut c, o),
        Scenario::PageRequest => page_request::page_request_checks(&mut c, o),
        Scenario::Hostile => hostile::hostile_checks(&mut c, cfg, o, n, map_faults, &dma),
    }
    c.0
}
