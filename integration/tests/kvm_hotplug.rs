//! Endpoint hot-plug in a KVM guest (issue 13): scenario 8. At a sync
//! point the VMM plugs a DMA engine in (`Viommu::add_endpoint`, a new
//! engine in the next slot) while a batch of MAP+UNMAP pairs for the
//! primary engine is being served; the guest learns of it on the hot-plug
//! port, PROBEs, ATTACHes and MAPs it, and its DMA is checked byte for
//! byte. At the next sync point the VMM unplugs it while it is attached
//! (`Viommu::remove_endpoint`): the guest sees the slot gone, its domain
//! ended, requests naming it NOENT, and DMA it still does refused without
//! a byte moved; then it ejects the slot. The primary engine works
//! throughout.

use std::path::Path;

use integration::config::VmConfig;
use integration::kvm_check::kvm_or_skip;
use integration::scenarios::{run_hotplug, RunOptions, HOTPLUG_ENDPOINT};
use integration::vm::{FastPaths, HotplugPlan, Vm, VmError, VmOptions};

fn config(name: &str) -> VmConfig {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    VmConfig::from_file(&repo.join("resources").join(name)).unwrap()
}

fn check(cfg: &VmConfig, fast_paths: FastPaths) {
    let opts = RunOptions {
        fast_paths,
        ..RunOptions::default()
    };
    let (outcome, checks) = run_hotplug(cfg, &opts);
    let o = outcome.unwrap_or_else(|e| panic!("{e}"));
    let serial = &o.serial;
    assert_eq!(o.result, 0, "guest failed:\n{serial}");
    let slot = cfg.devices.len();
    for line in [
        format!(
            "hotplug: engine plugged in slot {slot}, endpoint {HOTPLUG_ENDPOINT}, while 16 MAP+UNMAP pairs ran"
        ),
        "hotplug: DMA copy of 4396 bytes by the plugged engine verified".into(),
        "hotplug: unplugged while attached: DMA refused, its domain gone, requests NOENT".into(),
        "hotplug: PASS".into(),
    ] {
        assert!(serial.contains(&line), "missing {line:?} in:\n{serial}");
    }
    let failed: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "{failed:?}\n{serial}");
    eprintln!(
        "FIGURES kvm hotplug ({} engines cold, {fast_paths:?}): add_endpoint + remove_endpoint {:?} in the VMM",
        slot, o.hotplug.vmm_time
    );
}

#[test]
fn kvm_hotplug_engine_plugged_attached_and_unplugged_while_attached() {
    if !kvm_or_skip("kvm_hotplug_engine_plugged_attached_and_unplugged_while_attached") {
        return;
    }
    check(&config("vm.json"), FastPaths::ALL);
}

#[test]
fn kvm_hotplug_on_the_exit_path_and_without_the_nested_extension() {
    if !kvm_or_skip("kvm_hotplug_on_the_exit_path_and_without_the_nested_extension") {
        return;
    }
    check(&config("vm.json"), FastPaths::NONE);
    check(&config("vm-bypass.json"), FastPaths::ALL);
}

#[test]
fn hotplug_of_an_endpoint_the_config_has_is_refused_naming_it() {
    // No KVM needed: refused before /dev/kvm is opened.
    let opts = VmOptions {
        hotplug: Some(HotplugPlan {
            endpoint: 8,
            plug_at: 1,
            unplug_at: 2,
        }),
        ..VmOptions::default()
    };
    let e = Vm::new(&config("vm.json"), &opts).unwrap_err();
    assert!(matches!(e, VmError::Config { .. }), "{e}");
    assert!(e.to_string().contains("endpoint 8 is the config's"), "{e}");
}
