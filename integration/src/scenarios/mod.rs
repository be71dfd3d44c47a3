//! The guest scenarios on the host side: which ones a config allows, one
//! VM per scenario, and the checks the VMM makes on what it observed
//! (device counters, DMA outcomes, mappings, faults delivered) beside the
//! guest's own verdict on serial and the done port.
//!
//! [`plan()`] says what a config can run; [`run_scenario`], [`run_snapshot`]
//! and [`run_hotplug`] boot the VMs; the module of each scenario holds the
//! VMM's view of it, and `checks` what every run is checked for.

mod bypass;
mod checks;
mod hostile;
mod hotplug;
mod map;
mod nested_smmuv3;
mod nested_vtd;
mod page_request;
mod plan;
mod run;
mod snapshot;

use std::time::Duration;

use crate::vm::FastPaths;

pub use checks::{serial_metric, Check};
pub use hotplug::{run_hotplug, HOTPLUG_ENDPOINT};
pub use plan::{plan, unmet_requirement, Plan};
pub use run::{run_scenario, scenario_id, ScenarioRun};
pub use snapshot::{run_snapshot, SnapshotRun};

/// How long one scenario may run before the watchdog ends it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// MAP+UNMAP round trips the guest times by default.
pub const DEFAULT_BENCH_ITERATIONS: u64 = 1000;

/// How to run scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// Deadline of each scenario.
    pub timeout: Duration,
    /// MAP+UNMAP round trips the guest times (0 to skip).
    pub bench_iterations: u64,
    /// The fast paths the VMM may take (all that KVM offers by default).
    pub fast_paths: FastPaths,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: DEFAULT_TIMEOUT,
            bench_iterations: DEFAULT_BENCH_ITERATIONS,
            fast_paths: FastPaths::ALL,
        }
    }
}

/// Configs the scenarios' tests share.
#[cfg(test)]
mod test_configs {
    use crate::config::VmConfig;

    /// A config that must be valid.
    pub(super) fn cfg(json: &str) -> VmConfig {
        VmConfig::from_json_str(json).unwrap()
    }

    /// One DMA engine behind the vIOMMU, as a `devices` member.
    pub(super) const DMA: &str =
        r#""devices": [{"id": "d", "kind": "emulated-dma", "endpoint": 8, "iommu": true}]"#;

    /// The nested extension with both PASID table formats, as an `iommu` member.
    pub(super) const NESTED: &str =
        r#""nested": {"formats": ["intel-vtd", "arm-smmuv3"], "pasid_bits": 16}"#;
}
