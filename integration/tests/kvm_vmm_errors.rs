//! The VMM against guests that misbehave outside the device: a guest that
//! never ends, faults, runs a privileged instruction, writes the VMM's
//! page tables or panics. Each ends the run with a typed error (or a
//! failing result code) carrying the serial log; nothing panics. And
//! configs the KVM VMM cannot build are refused naming the JSON path.

use std::time::{Duration, Instant};

use integration::abi;
use integration::config::VmConfig;
use integration::kvm_check::kvm_or_skip;
use integration::vm::{RunOutcome, Vm, VmError, VmOptions};

fn config() -> VmConfig {
    VmConfig::from_json_str(
        r#"{"memory": {"size_mib": 32},
            "devices": [{"id": "d", "kind": "emulated-dma", "endpoint": 3, "iommu": true}]}"#,
    )
    .unwrap()
}

fn run(scenario: u64, timeout: Duration) -> Result<RunOutcome, VmError> {
    let opts = VmOptions {
        scenario,
        ..VmOptions::default()
    };
    Vm::new(&config(), &opts)?.run(timeout)
}

#[test]
fn guest_that_never_ends_is_stopped_by_the_watchdog_with_its_serial_log() {
    if !kvm_or_skip("guest_that_never_ends") {
        return;
    }
    let start = Instant::now();
    let e = run(abi::SELFTEST_SPIN, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, VmError::Timeout { .. }), "{e}");
    assert!(e.serial().unwrap().contains("selftest: 0x100"), "{e}");
    assert!(e.to_string().contains("guest serial log"), "{e}");
    // The watchdog ended it: reaching here is the check (no time bound,
    // a busy host only makes the kick later); it cannot end early.
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[test]
fn guest_page_fault_is_a_typed_error_with_the_faulting_address() {
    if !kvm_or_skip("guest_page_fault") {
        return;
    }
    let e = run(abi::SELFTEST_PAGE_FAULT, Duration::from_secs(10)).unwrap_err();
    match &e {
        VmError::GuestException {
            vector, cr2, rip, ..
        } => {
            assert_eq!((*vector, *cr2), (14, 0), "{e}");
            assert!(
                (abi::GUEST_LOAD_ADDR..abi::GUEST_LOAD_END).contains(rip),
                "{e}"
            );
        }
        _ => panic!("expected a page fault, got {e}"),
    }
    assert!(e.serial().unwrap().contains("selftest: 0x101"));
}

#[test]
fn privileged_instruction_at_cpl3_is_a_general_protection_fault() {
    if !kvm_or_skip("privileged_instruction") {
        return;
    }
    let e = run(abi::SELFTEST_PRIVILEGED, Duration::from_secs(10)).unwrap_err();
    assert!(
        matches!(e, VmError::GuestException { vector: 13, .. }),
        "{e}"
    );
}

#[test]
fn guest_cannot_write_the_vmm_page_tables() {
    if !kvm_or_skip("guest_cannot_write_page_tables") {
        return;
    }
    let e = run(abi::SELFTEST_WRITE_PAGE_TABLES, Duration::from_secs(10)).unwrap_err();
    match &e {
        // A user-mode write to a present supervisor page: P | W | U.
        VmError::GuestException {
            vector: 14,
            cr2,
            error_code,
            ..
        } => {
            assert_eq!(*cr2, abi::PAGE_TABLES_ADDR, "{e}");
            assert_eq!(*error_code & 7, 7, "{e}");
        }
        _ => panic!("expected a page fault, got {e}"),
    }
}

#[test]
fn guest_panic_ends_with_the_panic_result_code_and_message() {
    if !kvm_or_skip("guest_panic") {
        return;
    }
    let o = run(abi::SELFTEST_PANIC, Duration::from_secs(10)).unwrap();
    assert_eq!(o.result, abi::RESULT_PANIC);
    assert!(o.serial.contains("PANIC: "), "{}", o.serial);
    assert!(o.serial.contains("selftest panic"), "{}", o.serial);
}

#[test]
fn unknown_scenario_number_fails_in_the_guest_not_the_vmm() {
    if !kvm_or_skip("unknown_scenario_number") {
        return;
    }
    let o = run(77, Duration::from_secs(10)).unwrap();
    assert_ne!(o.result, abi::RESULT_PASS);
    assert!(o.serial.contains("unknown scenario 77"), "{}", o.serial);
}

#[test]
fn configs_the_kvm_vmm_cannot_build_are_refused_naming_the_json_path() {
    // No KVM needed: these fail before /dev/kvm is opened.
    let opts = VmOptions {
        scenario: abi::SCENARIO_MAP,
        ..VmOptions::default()
    };
    let small = VmConfig::from_json_str(r#"{"memory": {"size_mib": 8}}"#).unwrap();
    let e = Vm::new(&small, &opts).unwrap_err().to_string();
    assert!(e.starts_with("memory.size_mib: "), "{e}");
    let vfio = VmConfig::from_json_str(
        r#"{"devices": [{"id": "n", "kind": "vfio", "endpoint": 1, "path": "/dev/vfio/1", "backend": "iommufd"}]}"#,
    )
    .unwrap();
    let e = Vm::new(&vfio, &opts).unwrap_err().to_string();
    assert!(e.starts_with("devices[0].kind: "), "{e}");
}
