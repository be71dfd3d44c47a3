//! Scenario 4 in a real KVM guest: the x86 guest writes an SMMUv3 linear
//! CD table and AArch64 4 KiB-granule stage-1 tables as data, binds them
//! with ATTACH_TABLE (PSTF_ARM_SMMU_V3) and DMAs with a SubstreamID through
//! them; a repointed page descriptor stays stale until INVALIDATE, a
//! switched CD until a PASID-selective INVALIDATE — and what the VMM saw.

use std::path::Path;

use integration::config::{Scenario, VmConfig};
use integration::kvm_check::kvm_or_skip;
use integration::scenarios::{run_scenario, RunOptions};
use vmm_iommu::wire::{VIRTIO_IOMMU_T_ATTACH_TABLE, VIRTIO_IOMMU_T_INVALIDATE};

fn config(name: &str) -> VmConfig {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    VmConfig::from_file(&repo.join("resources").join(name)).unwrap()
}

#[test]
fn smmuv3_cd_table_dma_then_stale_tlb_until_invalidate() {
    if !kvm_or_skip("smmuv3_cd_table_dma") {
        return;
    }

    let run = run_scenario(
        &config("vm-nested.json"),
        Scenario::NestedSmmuV3,
        &RunOptions::default(),
    );

    let o = run.outcome.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let serial = &o.serial;
    assert_eq!(o.result, 0, "guest failed:\n{serial}");
    for line in [
        "nested-smmuv3: PROBE: PASID_SIZE 16, PASID_TABLE_FMT arm-smmuv3 over arm-lpae",
        "nested-smmuv3: DMA copy of 8269 bytes with SSID 3 through the AArch64 tables verified",
        "eventq: fault reason=MAPPING endpoint=8 pasid=0x3 grpid=0 address=0x7f1234501000 flags=WRITE|ADDRESS|PASID pr_flags=0x0 len=40",
        "eventq: fault reason=DOMAIN endpoint=8 pasid=0x0 grpid=0 address=0x7f1234500000 flags=READ|ADDRESS pr_flags=0x0 len=40",
        "nested-smmuv3: page descriptor repointed without INVALIDATE: DMA still reaches the old page",
        "nested-smmuv3: after INVALIDATE (VA, IOTLB, SSID + ASID, LEAF) the DMA reaches the new page",
        "stale until INVALIDATE (PASID, CD cache + TLB), then used",
        "nested-smmuv3: PASS",
    ] {
        assert!(serial.contains(line), "missing {line:?} in:\n{serial}");
    }
    let failed: Vec<_> = run.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "{failed:?}\n{serial}");
    let req = |t: u8| o.device.requests[usize::from(t)];
    assert_eq!(req(VIRTIO_IOMMU_T_ATTACH_TABLE), 1);
    assert_eq!(req(VIRTIO_IOMMU_T_INVALIDATE), 2);
    assert_eq!((o.router.invalidations, o.router.invalidate_calls), (2, 2));
    let e = o.emulated.expect("the software nested IOMMU");
    assert_eq!(e.invalidate_calls, 2);
    assert!(e.iotlb_hits >= 1 && e.context_reads >= 2, "{e:?}");
    assert_eq!((e.faults, e.page_requests), (2, 0));
    assert_eq!(o.device.faults_delivered, 2);
    assert_eq!((o.dma[0].ok, o.dma[0].faults), (6, 2));
    assert_eq!(o.final_domains, 0);
}
