//! `linux-vm` as a user meets it before any kernel runs: arguments, the
//! config and the kernel image are checked with errors that say what is
//! wrong, and nothing is left half-built. (The Linux boots themselves run
//! in `scripts/linux-guest.sh`: this machine's KVM cannot run guest kernel
//! code, so they need the QEMU L1 that script provides.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use integration::kvm_check::kvm_or_skip;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn linux_vm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_linux-vm"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("linux-vm runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("linux-vm-test-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn missing_kernel_and_config_are_usage_errors() {
    let o = linux_vm(&["resources/linux/strict.json"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--kernel is required"), "{}", text(&o));
    let o = linux_vm(&["--kernel", "/nonexistent"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("a CONFIG.json is required"),
        "{}",
        text(&o)
    );
    let o = linux_vm(&["--bogus"]);
    assert!(text(&o).contains("unknown option --bogus"), "{}", text(&o));
}

#[test]
fn a_bad_config_names_the_json_path() {
    let cfg = temp_file(
        "bad.json",
        br#"{"devices": [{"id": "a", "kind": "virtio-rng", "endpoint": 8, "disk_mib": 4}]}"#,
    );
    let o = linux_vm(&["--kernel", "/nonexistent", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("devices[0].disk_mib: only a virtio-blk device has a disk"),
        "{}",
        text(&o)
    );
    std::fs::remove_file(cfg).unwrap();
}

#[test]
fn every_shipped_linux_config_parses() {
    for e in std::fs::read_dir(repo().join("resources/linux")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            integration::linux::config::LinuxVmConfig::from_file(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
}

#[test]
fn a_file_that_is_not_a_bzimage_is_refused_before_the_vcpu_runs() {
    if !kvm_or_skip("a_file_that_is_not_a_bzimage_is_refused_before_the_vcpu_runs") {
        return;
    }
    let kernel = temp_file("notbz", &[0u8; 8192]);
    let o = linux_vm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--timeout",
        "5",
        "resources/linux/strict.json",
    ]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("cannot load the kernel"), "{t}");
    assert!(t.contains("linux-vm: end=error"), "{t}");
    std::fs::remove_file(kernel).unwrap();
}
