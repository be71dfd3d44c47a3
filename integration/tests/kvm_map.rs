//! Scenario 1 in a real KVM guest: PROBE reports the configured MSI region,
//! ATTACH and MAP, DMA copies through IOVAs verified byte for byte by the
//! guest (one window across the two RAM regions), UNMAP, DMA blocked with
//! a MAPPING fault the guest reads from the event queue — and the VMM's own
//! view of the same run: requests by type, mappings, faults delivered.

use std::path::Path;

use integration::kvm_check::kvm_or_skip;
use integration::scenarios::{run_scenario, RunOptions};
use vmm_iommu::config::{Scenario, VmConfig};
use vmm_iommu::wire::{
    VIRTIO_IOMMU_T_ATTACH, VIRTIO_IOMMU_T_DETACH, VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_PROBE,
    VIRTIO_IOMMU_T_UNMAP,
};

const BENCH: u64 = 200;

fn config(name: &str) -> VmConfig {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    VmConfig::from_file(&repo.join("resources").join(name)).unwrap()
}

#[test]
fn map_mode_dma_through_iovas_then_unmap_blocks_it_with_a_fault_on_the_eventq() {
    if !kvm_or_skip("map_mode_dma_through_iovas") {
        return;
    }
    let opts = RunOptions {
        bench_iterations: BENCH,
        ..RunOptions::default()
    };

    let run = run_scenario(&config("vm.json"), Scenario::Map, &opts);

    let o = run.outcome.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let serial = &o.serial;
    // The guest's side.
    assert_eq!(o.result, 0, "guest failed:\n{serial}");
    for line in [
        "map: PROBE reports the MSI region [0xfee00000, 0xfeefffff]",
        "map: DMA copy of 12411 bytes through IOVAs verified",
        "map: DMA across the low/high RAM boundary verified",
        "eventq: fault reason=2 endpoint=8 address=0x10000000 flags=0x102",
        "eventq: fault reason=2 endpoint=8 address=0x10100000 flags=0x102",
        "map: DMA after UNMAP blocked, MAPPING fault read from the eventq",
        "eventq: fault reason=1 endpoint=8 address=0x10000000 flags=0x101",
        "map: PASS",
    ] {
        assert!(serial.contains(line), "missing {line:?} in:\n{serial}");
    }
    // The VMM's side.
    let failed: Vec<_> = run.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "{failed:?}\n{serial}");
    let req = |t: u8| o.device.requests[usize::from(t)];
    assert_eq!(req(VIRTIO_IOMMU_T_PROBE), 2);
    assert_eq!(req(VIRTIO_IOMMU_T_ATTACH), 1);
    assert_eq!(req(VIRTIO_IOMMU_T_MAP), 4 + BENCH);
    assert_eq!(req(VIRTIO_IOMMU_T_UNMAP), 2 + BENCH);
    assert_eq!(req(VIRTIO_IOMMU_T_DETACH), 1);
    assert_eq!(o.device.unmapped, 4 + BENCH, "mappings removed by UNMAP");
    assert_eq!(o.peak_mappings, 4);
    assert_eq!((o.final_mappings, o.final_domains), (0, 0));
    // Read-only write, DMA after UNMAP, DMA after DETACH.
    assert_eq!(o.device.faults_delivered, 3);
    assert_eq!((o.dma[0].ok, o.dma[0].faults), (5, 3));
    assert_eq!(
        o.dma[1],
        Default::default(),
        "the second engine stayed idle"
    );
    assert_eq!(o.transport.needs_reset, 0);
    let cycles = run.cycles_per_map_unmap().expect("benchmark line");
    assert!(cycles > 0);
    assert!(o.boot_to_first_request.is_some_and(|t| t < o.run_time));
}
