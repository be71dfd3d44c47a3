//! Every scenario on the fallback transport path — QueueNotify served on
//! its MMIO exit, no interrupt line — as on hosts whose KVM offers no
//! ioeventfd or irqchip: the guests poll their used rings either way, so
//! the same six scenarios pass with the same VMM checks. (The default,
//! fast path runs in each scenario's own test.)

use std::path::Path;

use integration::config::{Scenario, VmConfig};
use integration::kvm_check::kvm_or_skip;
use integration::scenarios::{run_scenario, RunOptions};
use integration::vm::FastPaths;

#[test]
fn every_scenario_passes_on_the_fallback_path() {
    if !kvm_or_skip("every_scenario_passes_on_the_fallback_path") {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cfg = VmConfig::from_file(&repo.join("resources/vm.json")).unwrap();
    let opts = RunOptions {
        bench_iterations: 50,
        fast_paths: FastPaths::NONE,
        ..RunOptions::default()
    };

    for s in Scenario::ALL {
        let run = run_scenario(&cfg, s, &opts);

        let o = run
            .outcome
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", s.as_str()));
        assert_eq!(
            o.paths.to_string(),
            "notify=mmio-exit; interrupts=polled",
            "{}",
            s.as_str()
        );
        assert!(o.worker.is_none(), "{}: a worker ran", s.as_str());
        let failed: Vec<_> = run.checks.iter().filter(|c| !c.ok).collect();
        assert!(run.passed(), "{}: {failed:?}\n{}", s.as_str(), o.serial);
    }
}
