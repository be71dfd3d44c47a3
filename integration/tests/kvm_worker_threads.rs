//! The device worker thread (ioeventfd path) ends with its VM, however the
//! run ends: the guest passing, the watchdog stopping a guest in the
//! middle of a benchmark the worker is serving, a guest exception, a
//! hostile driver that breaks its queues. No thread outlives its run.
//!
//! One test in this file, so that no other test's VMM threads come and go
//! while it looks at this process's threads.

use std::path::Path;
use std::time::Duration;

use integration::abi;
use integration::config::{Scenario, VmConfig};
use integration::kvm_check::{fast_paths_offered, kvm_or_skip};
use integration::scenarios::{run_scenario, RunOptions};
use integration::vm::worker::NotifyPath;
use integration::vm::{Vm, VmError, VmOptions};

/// This process's threads that the VMM started: the device worker
/// ("viommu-worker") and the watchdog ("viommu-watchdog"). Threads KVM
/// itself attaches to the process (such as its NX huge page recovery
/// task, which the kernel reaps on its own time after the VM is closed)
/// are not the VMM's to join.
fn vmm_threads() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("viommu-"))
        .collect()
}

#[test]
fn the_worker_stops_and_is_joined_however_the_run_ends() {
    if !kvm_or_skip("the_worker_stops_and_is_joined") {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cfg = VmConfig::from_file(&repo.join("resources/vm.json")).unwrap();
    assert_eq!(vmm_threads(), Vec::<String>::new(), "before any run");

    // The guest passes (and its hostile driver breaks the queues twice on
    // the way): the worker served it and stopped when told.
    let opts = RunOptions {
        bench_iterations: 10,
        ..RunOptions::default()
    };
    let run = run_scenario(&cfg, Scenario::Hostile, &opts);
    let o = run.outcome.as_ref().unwrap_or_else(|e| panic!("{e}"));
    assert!(run.passed(), "{:?}", run.checks);
    if fast_paths_offered().ioeventfd {
        assert_eq!(o.paths.notify, NotifyPath::Ioeventfd);
        let w = o.worker.as_ref().unwrap();
        assert!(w.stopped && w.error.is_none() && w.kicks[0] > 0, "{w:?}");
    }
    assert_eq!(vmm_threads(), Vec::<String>::new(), "after a passing run");

    // The watchdog ends a benchmark far longer than the deadline while the
    // worker serves its requests.
    let opts = RunOptions {
        bench_iterations: 100_000_000,
        timeout: Duration::from_millis(200),
        ..RunOptions::default()
    };
    let run = run_scenario(&cfg, Scenario::Map, &opts);
    let e = run.outcome.as_ref().unwrap_err();
    assert!(matches!(e, VmError::Timeout { .. }), "{e}");
    assert!(e.serial().unwrap().contains("map: "), "{e}");
    assert_eq!(
        vmm_threads(),
        Vec::<String>::new(),
        "after a watchdog timeout"
    );

    // A guest exception, with the worker waiting for kicks.
    let vm = Vm::new(
        &cfg,
        &VmOptions {
            scenario: abi::SELFTEST_PAGE_FAULT,
            ..VmOptions::default()
        },
    )
    .unwrap();
    let e = vm.run(Duration::from_secs(10)).unwrap_err();
    assert!(
        matches!(e, VmError::GuestException { vector: 14, .. }),
        "{e}"
    );
    assert_eq!(
        vmm_threads(),
        Vec::<String>::new(),
        "after a guest exception"
    );

    // A VM built and never run starts no thread.
    let vm = Vm::new(&cfg, &VmOptions::default()).unwrap();
    drop(vm);
    assert_eq!(
        vmm_threads(),
        Vec::<String>::new(),
        "after a VM that never ran"
    );
}
