//! Snapshot and restore of a whole KVM guest (issue 13): scenario 7 makes
//! its MAPs and stops at a sync point; the VMM snapshots the VM — guest
//! memory, the vCPU's registers, special registers, FPU, MSRs and local
//! APIC, the in-kernel irqchip, the virtio-mmio transport, the
//! virtio-iommu (`VirtioIommu::snapshot`, through its JSON), the DMA
//! engines' registers — drops it, and restores it into a new VM (new KVM
//! VM fd, new memory with the contents copied, a device built from the
//! config and then restored). The guest carries on there and passes: its
//! DMA goes through the restored mappings, the restored read-only mapping
//! refuses a write with a fault on the restored event queue, an UNMAP
//! after the restore takes effect.
//!
//! On both transport paths, and with the nested extension's software
//! IOMMU behind the vIOMMU (vm.json) and without it (vm-bypass.json has
//! none). The figures (size, pause-to-resume time) are printed, not
//! asserted.

use std::path::Path;
use std::time::Duration;

use integration::abi;
use integration::config::VmConfig;
use integration::kvm_check::{fast_paths_offered, kvm_or_skip};
use integration::scenarios::{run_snapshot, RunOptions, SnapshotRun};
use integration::vm::snapshot::SnapshotError;
use integration::vm::{FastPaths, RunEnd, Vm, VmError, VmOptions};

fn config(name: &str) -> VmConfig {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    VmConfig::from_file(&repo.join("resources").join(name)).unwrap()
}

fn run(cfg: &VmConfig, fast_paths: FastPaths) -> SnapshotRun {
    let opts = RunOptions {
        fast_paths,
        ..RunOptions::default()
    };
    let run = run_snapshot(cfg, &opts);
    let o = run.outcome.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let serial = &o.serial;
    assert_eq!(o.result, 0, "guest failed:\n{serial}");
    for line in [
        "snapshot: 2 mappings made, pausing at sync point 1",
        "snapshot: resumed (restores 0 -> 1)",
        "snapshot: DMA copy of 8269 bytes through the restored mappings verified",
        "eventq: fault reason=MAPPING endpoint=8 address=0x10000000 flags=WRITE|ADDRESS",
        "eventq: fault reason=MAPPING endpoint=8 address=0x10100000 flags=WRITE|ADDRESS",
        "snapshot: UNMAP after the restore took effect",
        "snapshot: PASS",
    ] {
        assert!(serial.contains(line), "missing {line:?} in:\n{serial}");
    }
    let failed: Vec<_> = run.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "{failed:?}\n{serial}");
    // The serial log carried over: the lines before the pause are there
    // once, the guest's start line too.
    assert_eq!(serial.matches("snapshot: start").count(), 1, "{serial}");
    let size = run.size.expect("a snapshot was taken");
    assert!(size.memory >= 16 << 20 && size.device > 0 && size.cpu > 0);
    run
}

fn print_figures(what: &str, run: &SnapshotRun) {
    let s = run.size.unwrap();
    eprintln!(
        "FIGURES kvm snapshot ({what}): size {} bytes ({} MiB guest RAM, {} KiB of it in non-zero pages; \
         device JSON {} bytes; vCPU+irqchip {} bytes; transport+DMA+ports {} bytes); \
         sparse total {} bytes; snapshot {:?}, restore into a new VM {:?}, pause-to-resume {:?}",
        s.total(),
        s.memory >> 20,
        s.memory_nonzero >> 10,
        s.device,
        s.cpu,
        s.other,
        s.total_sparse(),
        run.snapshot_time,
        run.restore_time,
        run.pause_to_resume
    );
}

#[test]
fn kvm_snapshot_restores_into_a_new_vm_and_the_guest_passes_fast_paths() {
    if !kvm_or_skip("kvm_snapshot_restores_into_a_new_vm_and_the_guest_passes_fast_paths") {
        return;
    }
    let offered = fast_paths_offered();
    let run = run(&config("vm.json"), FastPaths::ALL);
    let o = run.outcome.as_ref().unwrap();
    if offered.irqfd {
        // The restored irqchip kept the line masked and latched it again.
        assert_eq!(o.line_latched, Some(true));
        assert!(o.transport.interrupts > 0);
    }
    if offered.ioeventfd {
        let w = o
            .worker
            .as_ref()
            .expect("the restored VM armed its ioeventfds");
        assert!(w.kicks[0] > 0, "{w:?}");
    }
    print_figures("vm.json, fast paths", &run);
}

#[test]
fn kvm_snapshot_restores_into_a_new_vm_on_the_exit_path() {
    if !kvm_or_skip("kvm_snapshot_restores_into_a_new_vm_on_the_exit_path") {
        return;
    }
    let run = run(&config("vm.json"), FastPaths::NONE);
    let o = run.outcome.as_ref().unwrap();
    assert!(o.worker.is_none());
    assert!(o.exits.mmio > 0);
    print_figures("vm.json, exit path", &run);
}

#[test]
fn kvm_snapshot_without_the_nested_extension() {
    if !kvm_or_skip("kvm_snapshot_without_the_nested_extension") {
        return;
    }
    let cfg = config("vm-bypass.json");
    let run = run(&cfg, FastPaths::ALL);
    print_figures("vm-bypass.json", &run);
}

#[test]
fn kvm_snapshot_refuses_a_vm_that_is_not_paused() {
    if !kvm_or_skip("kvm_snapshot_refuses_a_vm_that_is_not_paused") {
        return;
    }
    let opts = VmOptions {
        scenario: abi::SCENARIO_SNAPSHOT,
        ..VmOptions::default()
    };
    let mut vm = Vm::new(&config("vm.json"), &opts).unwrap();
    assert!(matches!(vm.snapshot(), Err(SnapshotError::NotPaused)));
}

#[test]
fn kvm_snapshot_restore_refuses_a_snapshot_of_another_layout_or_device() {
    if !kvm_or_skip("kvm_snapshot_restore_refuses_a_snapshot_of_another_layout_or_device") {
        return;
    }
    let cfg = config("vm.json");
    let opts = VmOptions {
        scenario: abi::SCENARIO_SNAPSHOT,
        ..VmOptions::default()
    };
    let mut vm = Vm::new(&cfg, &opts).unwrap();
    let end = vm
        .run_until_pause(Duration::from_secs(20), abi::SNAPSHOT_SYNC)
        .unwrap();
    assert!(matches!(end, RunEnd::Paused(p) if p.at == abi::SNAPSHOT_SYNC));
    let snap = vm.snapshot().unwrap();
    drop(vm);

    // Another memory size: refused before anything runs.
    let mut small = cfg.clone();
    small.memory.size_mib = 64;
    let e = Vm::restore(&small, &opts, &snap).unwrap_err();
    assert!(
        matches!(e, VmError::Snapshot(SnapshotError::Memory { .. })),
        "{e}"
    );

    // A device whose config differs (another input range): the vIOMMU's
    // restore refuses it, naming the field.
    let mut other = cfg.clone();
    other.iommu.input_range.end = 0x000f_ffff_ffff_ffff;
    let e = Vm::restore(&other, &opts, &snap).unwrap_err().to_string();
    assert!(e.contains("input_range"), "{e}");

    // A device snapshot that is not JSON.
    let mut broken = snap.clone();
    broken.device_json.truncate(10);
    let e = Vm::restore(&cfg, &opts, &broken).unwrap_err();
    assert!(
        matches!(e, VmError::Snapshot(SnapshotError::Device(_))),
        "{e}"
    );

    // A transport whose status no driver sets.
    let mut bad = snap.clone();
    bad.transport.status |= 0x100;
    let e = Vm::restore(&cfg, &opts, &bad).unwrap_err().to_string();
    assert!(e.contains("status 0x"), "{e}");

    // The untouched snapshot still restores, and the guest passes.
    let o = Vm::restore(&cfg, &opts, &snap)
        .unwrap()
        .run(Duration::from_secs(20))
        .unwrap();
    assert_eq!(o.result, 0, "{}", o.serial);
    assert_eq!(o.restores, 1);
}
