//! Scenario 3 in a real KVM guest: the guest builds a VT-d scalable-mode
//! PASID directory, PASID table and 4-level first-stage tables, binds them
//! with ATTACH_TABLE and DMAs with a PASID through them; a repointed leaf
//! stays stale until a page-selective INVALIDATE, a switched PASID entry
//! until a PASID-cache INVALIDATE — and the VMM's view of the same run:
//! requests by type, invalidations received and backend calls made (a
//! batch coalesced into one), the software IOMMU's caches and faults.

use std::path::Path;

use integration::config::{Scenario, VmConfig};
use integration::kvm_check::kvm_or_skip;
use integration::scenarios::{run_scenario, RunOptions};
use vmm_iommu::wire::{
    Status, VIRTIO_IOMMU_T_ATTACH_TABLE, VIRTIO_IOMMU_T_DETACH, VIRTIO_IOMMU_T_INVALIDATE,
    VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_PROBE,
};

/// INVALIDATEs the guest times.
const BENCH: u64 = 50;

fn config(name: &str) -> VmConfig {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    VmConfig::from_file(&repo.join("resources").join(name)).unwrap()
}

#[test]
fn vtd_pasid_table_dma_then_stale_iotlb_and_pasid_cache_until_invalidate() {
    if !kvm_or_skip("vtd_pasid_table_dma") {
        return;
    }
    let opts = RunOptions {
        bench_iterations: BENCH,
        ..RunOptions::default()
    };

    let run = run_scenario(&config("vm-nested.json"), Scenario::NestedVtd, &opts);

    let o = run.outcome.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let serial = &o.serial;
    // The guest's side.
    assert_eq!(o.result, 0, "guest failed:\n{serial}");
    for line in [
        "nested-vtd: PROBE: PASID_SIZE 16, OUTPUT_SIZE 52, PASID_TABLE_FMT intel-vtd over x86-64",
        "nested-vtd: DMA copy of 8513 bytes with PASID 0x1234 through the guest's tables verified",
        "eventq: fault reason=MAPPING endpoint=8 pasid=0x1234 grpid=0 address=0x7f1234500000 flags=WRITE|ADDRESS|PASID pr_flags=0x0 len=40",
        "eventq: fault reason=DOMAIN endpoint=8 pasid=0x0 grpid=0 address=0x7f1234500000 flags=READ|ADDRESS pr_flags=0x0 len=40",
        "nested-vtd: leaf repointed without INVALIDATE: DMA still reaches the old page (stale IOTLB)",
        "nested-vtd: after INVALIDATE (VA, IOTLB, PASID, LEAF) the DMA reaches the new page",
        "old tables still used (stale PASID cache)",
        "nested-vtd: after INVALIDATE (PASID, PASID cache + IOTLB) the new tables are used",
        "nested-vtd: 4 INVALIDATEs of adjacent pages in one notification: all OK",
        "bench: invalidations=50 cycles_per_invalidate=",
        "nested-vtd: PASS",
    ] {
        assert!(serial.contains(line), "missing {line:?} in:\n{serial}");
    }
    // The VMM's side.
    let failed: Vec<_> = run.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "{failed:?}\n{serial}");
    let req = |t: u8| o.device.requests[usize::from(t)];
    assert_eq!(req(VIRTIO_IOMMU_T_PROBE), 1);
    assert_eq!(req(VIRTIO_IOMMU_T_ATTACH_TABLE), 2, "one RANGE, one OK");
    assert_eq!(req(VIRTIO_IOMMU_T_INVALIDATE), 6 + BENCH);
    assert_eq!(req(VIRTIO_IOMMU_T_DETACH), 1);
    assert_eq!(req(VIRTIO_IOMMU_T_MAP), 0, "no MAP in a table domain");
    assert_eq!(o.device.statuses[Status::Range as usize], 1);
    // Every INVALIDATE reached the router; the batch of 4 adjacent pages
    // became one backend call carrying one merged range.
    assert_eq!(o.router.invalidations, 6 + BENCH);
    assert_eq!(o.router.invalidate_calls, 3 + BENCH);
    assert_eq!(o.router.invalidations_sent, 3 + BENCH);
    assert_eq!(o.router.rollbacks, 0);
    let e = o.emulated.expect("the software nested IOMMU");
    assert_eq!(e.invalidate_calls, 3 + BENCH);
    assert_eq!(e.invalidations, 3 + BENCH);
    assert!(
        e.iotlb_hits >= 1,
        "the stale translation came from the IOTLB"
    );
    assert!(
        e.context_reads >= 2,
        "PASID entry read again after its INVALIDATE"
    );
    assert_eq!((e.faults, e.page_requests), (3, 0));
    // Read-only write, DMA without PASID, DMA through the new tables.
    assert_eq!(o.device.faults_delivered, 3);
    assert_eq!(o.faults_dropped, 0);
    let dma = &o.dma[0];
    assert_eq!((dma.ok, dma.faults, dma.bad_args), (7, 3, 1));
    assert_eq!(dma.pasid_tagged, 10, "all but the DMA without PASID");
    assert_eq!(o.final_domains, 0);
    let cycles = run.cycles_per_invalidate().expect("benchmark line");
    assert!(cycles > 0);
    assert!(o.boot_to_first_request.is_some_and(|t| t < o.run_time));
}
