//! End to end: the README's main job — `viommu-vm` boots KVM guests on the
//! shipped config and reports every scenario — a failing scenario making it
//! exit non-zero, bad configs rejected with the JSON path of the mistake,
//! and the host-side driver session kept for hosts without KVM.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use integration::config::VmConfig;
use integration::demo::run_demo;
use integration::kvm_check::{fast_paths_offered, kvm_or_skip};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn viommu_vm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_viommu-vm"))
        .args(args)
        .output()
        .unwrap()
}

fn temp_config(name: &str, json: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("viommu-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vm.json");
    std::fs::write(&path, json).unwrap();
    path
}

#[test]
fn viommu_vm_boots_guests_runs_every_scenario_and_reports() {
    if !kvm_or_skip("viommu_vm_boots_guests") {
        return;
    }
    let config = repo().join("resources/vm.json");
    let out = viommu_vm(&["--bench", "100", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The paths that ran: every fast path this host's KVM offers.
    let offered = fast_paths_offered();
    let transport = format!(
        "transport: notify={}; interrupts={}",
        if offered.ioeventfd {
            "ioeventfd(worker thread)"
        } else {
            "mmio-exit"
        },
        if offered.irqfd {
            "irqfd(gsi 5, in-kernel irqchip)"
        } else {
            "polled"
        }
    );
    for line in [
        &transport,
        "scenarios: map, bypass, nested-vtd, nested-smmuv3, page-request, hostile",
        "== map: PASS",
        "== bypass: PASS",
        "== nested-vtd: PASS",
        "== nested-smmuv3: PASS",
        "== page-request: PASS",
        "== hostile: PASS",
        "requests: ATTACH 1, DETACH 1, MAP 104, UNMAP 102, PROBE 2",
        "requests: DETACH 1, PROBE 1, ATTACH_TABLE 2, INVALIDATE 106",
        "router: 106 invalidations received, 103 backend invalidate calls carrying 103",
        "requests: DETACH 1, ATTACH_TABLE 1, PAGE_RESP 5",
        "faults delivered on the eventq: 3 (dropped 0)",
        "boot to first request: ",
        "MAP+UNMAP round trip (guest rdtsc, notifications included): ",
        "INVALIDATE round trip (guest rdtsc, notification and backend call included): ",
        "scenarios: 6 of 6 passed",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

#[test]
fn viommu_vm_fallback_flag_runs_on_mmio_exits_without_an_interrupt_line() {
    if !kvm_or_skip("viommu_vm_fallback_flag") {
        return;
    }
    let config = temp_config(
        "fallback",
        r#"{"devices": [{"id": "d", "kind": "emulated-dma", "endpoint": 8, "iommu": true}],
            "scenarios": ["map"]}"#,
    );
    let out = viommu_vm(&["--fallback", "--bench", "10", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for line in [
        "transport paths: notify by MMIO exit (forced); interrupts by none (polled) (forced)",
        "   transport: notify=mmio-exit; interrupts=polled",
        "      notify fallback: ioeventfd turned off by the VMM options",
        "transport: notify=mmio-exit; interrupts=polled",
        "scenarios: 1 of 1 passed",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("device worker:"), "{stdout}");
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
}

#[test]
fn viommu_vm_exits_non_zero_when_a_scenario_fails() {
    if !kvm_or_skip("viommu_vm_exits_non_zero") {
        return;
    }
    // A benchmark far longer than the deadline: the watchdog ends the guest.
    let config = temp_config(
        "slow",
        r#"{"devices": [{"id": "d", "kind": "emulated-dma", "endpoint": 8, "iommu": true}],
            "scenarios": ["map"]}"#,
    );
    let out = viommu_vm(&[
        "--bench",
        "100000000",
        "--timeout",
        "1",
        config.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("== map: FAIL"), "{stdout}");
    assert!(
        stdout.contains("guest did not finish within 1s"),
        "{stdout}"
    );
    assert!(stdout.contains("scenarios: 0 of 1 passed"), "{stdout}");
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
}

#[test]
fn viommu_vm_rejects_a_bad_config_naming_the_json_path() {
    let bad = temp_config(
        "bad",
        r#"{ "iommu": { "input_range": { "start": "0x2000", "end": "0x1000" } } }"#,
    );
    let out = viommu_vm(&[bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("iommu.input_range"), "{stderr}");
    let _ = std::fs::remove_dir_all(bad.parent().unwrap());
}

#[test]
fn viommu_vm_rejects_an_unknown_scenario_naming_its_index() {
    let bad = temp_config("scenario", r#"{ "scenarios": ["map", "warp"] }"#);
    let out = viommu_vm(&[bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("scenarios[1]: unknown variant `warp`"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(bad.parent().unwrap());
}

#[test]
fn viommu_vm_rejects_a_scenario_the_config_cannot_run_naming_its_index() {
    if !kvm_or_skip("viommu_vm_rejects_a_scenario") {
        return;
    }
    let bad = temp_config(
        "legacy",
        r#"{ "iommu": { "legacy_bypass": true },
             "devices": [{"id": "d", "kind": "emulated-dma", "endpoint": 8, "iommu": true}],
             "scenarios": ["map", "bypass"] }"#,
    );
    let out = viommu_vm(&[bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("scenarios[1]: scenario \"bypass\" needs VIRTIO_IOMMU_F_BYPASS_CONFIG"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(bad.parent().unwrap());
}

#[test]
fn host_driver_session_passes_every_check_on_every_shipped_config() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("resources")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let cfg = VmConfig::from_file(&path).unwrap();
        let mut out = Vec::new();
        let report = run_demo(&cfg, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            report.checks > 10,
            "{}: too few checks\n{text}",
            path.display()
        );
        assert_eq!(report.failed, 0, "{}:\n{text}", path.display());
        seen += 1;
    }
    assert!(seen >= 2, "expected the shipped configs in resources/");
}

#[test]
fn viommu_vm_host_driver_flag_runs_the_scripted_session() {
    let out = viommu_vm(&[
        "--host-driver",
        repo().join("resources/vm.json").to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("mode: host-side scripted driver session"),
        "{stdout}"
    );
    assert!(stdout.contains("ATTACH endpoint=8 domain=1"), "{stdout}");
    assert!(stdout.contains("eventq: fault reason=MAPPING"), "{stdout}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
