//! Scenario 5 in a real KVM guest: with page requests negotiated, a PASID
//! DMA to not-present pages waits while the device sends a page request
//! per page (40-byte records, flt_type PAGE_REQ); the guest maps each page
//! and answers PAGE_RESP SUCCESS, and the DMA completes with the right
//! data; PAGE_RESP FAILURE ends a DMA with a fault status; answers for
//! groups not pending are NOENT — and what the VMM saw.

use std::path::Path;

use integration::config::{Scenario, VmConfig};
use integration::kvm_check::kvm_or_skip;
use integration::scenarios::{run_scenario, RunOptions};
use vmm_iommu::wire::{Status, VIRTIO_IOMMU_T_ATTACH_TABLE, VIRTIO_IOMMU_T_PAGE_RESP};

fn config(name: &str) -> VmConfig {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    VmConfig::from_file(&repo.join("resources").join(name)).unwrap()
}

#[test]
fn dma_to_missing_pages_waits_for_page_resp_then_completes_or_faults() {
    if !kvm_or_skip("dma_to_missing_pages_waits") {
        return;
    }

    let run = run_scenario(
        &config("vm-nested.json"),
        Scenario::PageRequest,
        &RunOptions::default(),
    );

    let o = run.outcome.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let serial = &o.serial;
    assert_eq!(o.result, 0, "guest failed:\n{serial}");
    for line in [
        "page-request: start (features 0x300000100000077)",
        "page-request: DMA to 2 not-present pages waits for a page",
        "eventq: page request reason=MAPPING endpoint=8 pasid=0x77 grpid=0 address=0x555500400000 flags=WRITE|ADDRESS|PASID pr_flags=0x1 len=40",
        "eventq: page request reason=MAPPING endpoint=8 pasid=0x77 grpid=1 address=0x555500401000 flags=WRITE|ADDRESS|PASID pr_flags=0x1 len=40",
        "page-request: 2 page requests answered SUCCESS, the DMA completed and the data is right",
        "eventq: page request reason=MAPPING endpoint=8 pasid=0x77 grpid=2 address=0x555500800000 flags=WRITE|ADDRESS|PASID pr_flags=0x1 len=40",
        "page-request: PAGE_RESP FAILURE ends the DMA with a fault status",
        "page-request: PAGE_RESP for groups not pending: NOENT",
        "page-request: PASS",
    ] {
        assert!(serial.contains(line), "missing {line:?} in:\n{serial}");
    }
    let failed: Vec<_> = run.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "{failed:?}\n{serial}");
    let req = |t: u8| o.device.requests[usize::from(t)];
    assert_eq!(req(VIRTIO_IOMMU_T_ATTACH_TABLE), 1);
    assert_eq!(req(VIRTIO_IOMMU_T_PAGE_RESP), 5);
    assert_eq!(o.device.statuses[Status::NoEnt as usize], 2);
    let e = o.emulated.expect("the software nested IOMMU");
    assert_eq!((e.page_requests, e.faults), (3, 0));
    // Every page request reached the guest; none was an unrecoverable fault.
    assert_eq!(o.device.faults_delivered, 3);
    assert_eq!(o.faults_dropped, 0);
    let dma = &o.dma[0];
    assert_eq!(
        (
            dma.page_waits,
            dma.retries,
            dma.ok,
            dma.faults,
            dma.abandoned
        ),
        (3, 2, 2, 1, 0)
    );
    assert_eq!(o.final_domains, 0);
}
