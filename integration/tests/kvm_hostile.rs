//! Scenario 6 in a real KVM guest: a hostile driver sends malformed
//! requests and chains, breaks its queues, misuses the transport and the
//! DMA engine. The device answers with the spec's statuses, returns what
//! it cannot answer unwritten, or asks for a reset; the VMM survives; and
//! then scenario 1 passes in the same VM.

use std::path::Path;

use integration::kvm_check::kvm_or_skip;
use integration::scenarios::{run_scenario, RunOptions};
use vmm_iommu::config::{Scenario, VmConfig};
use vmm_iommu::wire::Status;

#[test]
fn hostile_driver_gets_spec_statuses_the_vmm_survives_and_map_mode_still_passes() {
    if !kvm_or_skip("hostile_driver") {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cfg = VmConfig::from_file(&repo.join("resources/vm.json")).unwrap();
    let opts = RunOptions {
        bench_iterations: 100,
        ..RunOptions::default()
    };

    let run = run_scenario(&cfg, Scenario::Hostile, &opts);

    let o = run.outcome.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let serial = &o.serial;
    assert_eq!(o.result, 0, "guest failed:\n{serial}");
    for line in [
        "hostile: ATTACH cut short: ok",
        "hostile: unknown request type 0x42: ok",
        "hostile: ATTACH with reserved bytes set: ok",
        "hostile: ATTACH to a domain outside domain_range: ok",
        "hostile: MAP of the hole between the RAM regions: ok",
        "hostile: MAP past the end of high RAM: ok",
        "hostile: MAP over the reserved MSI region: ok",
        "hostile: request in a device-writable descriptor: ok",
        "hostile: tail in a device-readable descriptor: ok",
        "hostile: readable descriptor outside guest RAM: ok",
        "hostile: readable descriptor on the device's own MMIO: ok",
        "hostile: writable descriptor outside guest RAM: ok",
        "hostile: chain longer than 4 GiB: ok",
        "hostile: descriptor chained to itself: ok",
        "hostile: head index beyond the queue: DEVICE_NEEDS_RESET",
        "hostile: avail index 500 entries ahead: DEVICE_NEEDS_RESET",
        "hostile: FEATURES_OK without VERSION_1: refused",
        "hostile: DRIVER_OK with a descriptor table outside guest RAM: DEVICE_NEEDS_RESET",
        "hostile: DRIVER_OK with a queue size that is not a power of two: DEVICE_NEEDS_RESET",
        "hostile: ignored register accesses: ok",
        "hostile: DMA tagged with PASID 5: bad args",
        "hostile: device reset, running scenario 1 in the same VM",
        "map: PASS",
        "hostile: PASS",
    ] {
        assert!(serial.contains(line), "missing {line:?} in:\n{serial}");
    }
    let failed: Vec<_> = run.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "{failed:?}\n{serial}");

    // Exactly what the device answered: the hostile cases plus scenario 1.
    let st = |s: Status| o.device.statuses[s as usize];
    assert_eq!(
        st(Status::IoErr),
        8,
        "truncated, headless, misframed, unreadable"
    );
    assert_eq!(
        st(Status::Inval),
        8,
        "reserved bits, unknown flags, overlaps"
    );
    assert_eq!(
        st(Status::Range),
        10,
        "outside RAM, domain_range, input_range, MSI"
    );
    assert_eq!(st(Status::NoEnt), 8, "unknown endpoints and domains");
    assert_eq!(st(Status::DevErr), 0);
    assert_eq!(o.device.unknown_type, 2);
    assert_eq!(o.device.no_tail, 6);
    assert_eq!(o.transport.needs_reset, 4);
    assert_eq!(o.transport.features_refused, 2);
    assert_eq!(o.dma[0].bad_args, 5);
    assert_eq!(o.dma[0].pasid_tagged, 1);
    assert_eq!((o.final_mappings, o.final_domains), (0, 0));
    assert_eq!(o.device.faults_delivered, 3);
}
