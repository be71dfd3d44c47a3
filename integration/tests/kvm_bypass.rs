//! Scenario 2 in a real KVM guest: config-space `bypass` on lets an
//! unattached endpoint's DMA reach guest-physical memory, off refuses it
//! with a DOMAIN fault, and ATTACH with `ATTACH_F_BYPASS` gives identity
//! DMA — from either initial value of `bypass` in the config.

use std::path::Path;

use integration::config::{Scenario, VmConfig};
use integration::kvm_check::kvm_or_skip;
use integration::scenarios::{run_scenario, RunOptions, ScenarioRun};
use vmm_iommu::wire::Status;

fn run(config: &str) -> ScenarioRun {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cfg = VmConfig::from_file(&repo.join("resources").join(config)).unwrap();
    run_scenario(&cfg, Scenario::Bypass, &RunOptions::default())
}

fn assert_bypass_run(run: &ScenarioRun) {
    let o = run.outcome.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let serial = &o.serial;
    assert_eq!(o.result, 0, "guest failed:\n{serial}");
    for line in [
        "bypass: on, unattached endpoint 8 reaches guest-physical memory",
        "bypass: off, unattached endpoint 8 refused (DOMAIN fault)",
        "bypass: ATTACH_F_BYPASS gives identity DMA; MAP on it is INVAL",
        "bypass: PASS",
    ] {
        assert!(serial.contains(line), "missing {line:?} in:\n{serial}");
    }
    let failed: Vec<_> = run.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "{failed:?}\n{serial}");
    // Bypass off (unattached), and after DETACH: two DOMAIN faults.
    assert_eq!(o.device.faults_delivered, 2);
    // The DMA into the hole is refused by guest memory, not the IOMMU.
    assert_eq!((o.dma[0].ok, o.dma[0].faults), (3, 3));
    // MAP on the bypass domain, ATTACH without the flag to it.
    assert_eq!(o.device.statuses[Status::Inval as usize], 2);
    assert_eq!(o.peak_mappings, 0);
    assert_eq!(o.final_domains, 0);
}

#[test]
fn bypass_config_and_attach_bypass_starting_from_bypass_off() {
    if !kvm_or_skip("bypass_starting_from_bypass_off") {
        return;
    }
    assert_bypass_run(&run("vm.json"));
}

#[test]
fn bypass_config_and_attach_bypass_starting_from_bypass_on() {
    if !kvm_or_skip("bypass_starting_from_bypass_on") {
        return;
    }
    let run = run("vm-bypass.json");
    assert_bypass_run(&run);
    let serial = run.serial();
    assert!(serial.contains("guest: scenario 2 starting"), "{serial}");
}
