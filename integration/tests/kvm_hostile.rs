//! Scenario 6 in a real KVM guest: a hostile driver sends malformed
//! requests and chains, breaks its queues, misuses the transport and the
//! DMA engine. The device answers with the spec's statuses, returns what
//! it cannot answer unwritten, or asks for a reset; the VMM survives. With
//! the nested extension, ATTACH_TABLE, INVALIDATE and PAGE_RESP are abused
//! too and DMAs go through tables full of garbage: the statuses are those
//! of docs/wire.md, every such DMA faults with its record, and no request
//! error asks for a reset. Then scenario 3 (with the extension) and
//! scenario 1 pass in the same VM.

use std::path::Path;

use integration::config::{Scenario, VmConfig};
use integration::kvm_check::kvm_or_skip;
use integration::scenarios::{run_scenario, RunOptions, ScenarioRun};
use vmm_iommu::wire::{
    Status, VIRTIO_IOMMU_T_ATTACH_TABLE, VIRTIO_IOMMU_T_INVALIDATE, VIRTIO_IOMMU_T_PAGE_RESP,
};

/// MAP+UNMAP round trips and INVALIDATEs the guest times.
const BENCH: u64 = 100;

fn run(config: &str) -> ScenarioRun {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cfg = VmConfig::from_file(&repo.join("resources").join(config)).unwrap();
    let opts = RunOptions {
        bench_iterations: BENCH,
        ..RunOptions::default()
    };
    run_scenario(&cfg, Scenario::Hostile, &opts)
}

/// Lines every hostile run prints: the spec's part, then scenario 1.
const SPEC_PART: &[&str] = &[
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
];

#[test]
fn hostile_driver_gets_documented_statuses_the_vmm_survives_and_nested_and_map_modes_still_pass() {
    if !kvm_or_skip("hostile_driver") {
        return;
    }

    let run = run("vm.json");

    let o = run.outcome.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let serial = &o.serial;
    assert_eq!(o.result, 0, "guest failed:\n{serial}");
    let nested_part = [
        "hostile: nested extension negotiated (features 0x100000100000077): PASID_SIZE 16, formats 0x1e, second endpoint Some(9)",
        "hostile: ATTACH_TABLE with unknown format 5: ok",
        "hostile: ATTACH_TABLE intel-vtd pasid_bits PASID_SIZE + 1: ok",
        "hostile: ATTACH_TABLE directory wrapping past 2^64: ok",
        "hostile: ATTACH_TABLE cut to 44 bytes: ok",
        "hostile: ATTACH_TABLE onto a MAP domain: ok",
        "hostile: ATTACH_TABLE of a second endpoint with another directory: ok",
        "hostile: INVALIDATE granule 43: ok",
        "hostile: INVALIDATE PASID beyond the directory's width: ok",
        "hostile: INVALIDATE of 2^40 pages answered OK: ok",
        "hostile: 16 INVALIDATEs in one notification, valid and invalid mixed, each with its status: ok",
        "hostile: untagged DMA through a self-referencing directory: ok",
        "hostile: PASID DMA write through a self-referencing read-only first-stage root: ok",
        "hostile: DMA through a leaf on the virtio-iommu's registers: ok",
        "hostile: ATTACH_TABLE arm-smmuv3 s1cdmax PASID_SIZE + 1: ok",
        "hostile: SSID DMA through a leaf CD table in the MMIO gap: ok",
        "hostile: DMA through an all-ones TCR: ok",
        "hostile: sentinel page and 24 tables unchanged after 35 faulted DMAs",
        "hostile: PAGE_RESP code 3: ok",
        "hostile: PAGE_RESP of the other endpoint for the group: ok",
        "hostile: device reset while a DMA waits for a page: the DMA faults: ok",
        "hostile: nested: 186 cases answered as documented, 37 DMAs through hostile tables faulted",
        "hostile: running scenario 3 in the same VM",
        "nested-vtd: PASS",
    ];
    for line in SPEC_PART.iter().chain(&nested_part) {
        assert!(serial.contains(line), "missing {line:?} in:\n{serial}");
    }
    let failed: Vec<_> = run.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "{failed:?}\n{serial}");

    // Exactly what the device answered: the spec's part, the nested part,
    // scenarios 3 and 1.
    let st = |s: Status| o.device.statuses[s as usize];
    assert_eq!(
        st(Status::IoErr),
        8 + 5,
        "truncated, headless, misframed, unreadable; truncated nested requests"
    );
    assert_eq!(st(Status::Unsupp), 3, "unknown table formats");
    assert_eq!(
        st(Status::Inval),
        8 + 68,
        "reserved bits, unknown flags, overlaps; bad table fields, INVALIDATE and PAGE_RESP fields, table and MAP domains mixed"
    );
    assert_eq!(
        st(Status::Range),
        6 + 19 + 1,
        "wraps, domain_range, input_range, MSI; table pointers, PASIDs beyond the width; scenario 3's directory outside RAM"
    );
    assert_eq!(
        st(Status::NoEnt),
        8 + 15,
        "unknown endpoints and domains; PAGE_RESP for groups not pending"
    );
    assert_eq!(st(Status::DevErr), 0);
    assert_eq!(st(Status::NoMem), 0);
    let req = |t: u8| o.device.requests[usize::from(t)];
    assert_eq!(req(VIRTIO_IOMMU_T_ATTACH_TABLE), 62 + 2);
    assert_eq!(req(VIRTIO_IOMMU_T_INVALIDATE), 56 + 6 + BENCH);
    assert_eq!(req(VIRTIO_IOMMU_T_PAGE_RESP), 17);
    assert_eq!(o.device.unknown_type, 2);
    assert_eq!(o.device.no_tail, 6);
    // No nested request error asked for a reset: only the spec part's 4.
    assert_eq!(o.transport.needs_reset, 4);
    assert_eq!(o.transport.features_refused, 2);
    // 33 faults of garbage tables, 2 page requests, 3 of scenario 3, 3 of
    // scenario 1; every one delivered.
    assert_eq!(o.device.faults_delivered, 33 + 2 + 3 + 3);
    assert_eq!(o.faults_dropped, 0);
    let e = o.emulated.expect("the software nested IOMMU");
    assert_eq!((e.faults, e.page_requests), (33 + 3, 2));
    assert_eq!(o.router.rollbacks, 0);
    let dma = &o.dma[0];
    // Faults: 33 with a record, 2 at leaves outside RAM, 2 page requests
    // failed (by PAGE_RESP FAILURE and by a reset), 3 of scenario 3, 3 of
    // scenario 1.
    assert_eq!(dma.faults, 33 + 2 + 2 + 3 + 3);
    assert_eq!((dma.bad_args, dma.page_waits, dma.retries), (5 + 1, 2, 0));
    assert_eq!((o.final_mappings, o.final_domains), (0, 0));
}

#[test]
fn without_the_nested_extension_the_hostile_driver_gets_the_spec_part_only() {
    if !kvm_or_skip("hostile_driver_without_nesting") {
        return;
    }

    let run = run("vm-bypass.json");

    let o = run.outcome.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let serial = &o.serial;
    assert_eq!(o.result, 0, "guest failed:\n{serial}");
    for line in SPEC_PART
        .iter()
        .chain(&["hostile: nested extension not offered: its cases skipped"])
    {
        assert!(serial.contains(line), "missing {line:?} in:\n{serial}");
    }
    assert!(!serial.contains("nested-vtd"), "{serial}");
    let failed: Vec<_> = run.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "{failed:?}\n{serial}");
    let st = |s: Status| o.device.statuses[s as usize];
    assert_eq!(
        [
            st(Status::IoErr),
            st(Status::Unsupp),
            st(Status::Inval),
            st(Status::Range),
            st(Status::NoEnt)
        ],
        [8, 0, 8, 6, 8]
    );
    assert_eq!(
        o.device.requests[usize::from(VIRTIO_IOMMU_T_ATTACH_TABLE)],
        0
    );
    assert_eq!(o.device.unknown_type, 2);
    assert_eq!(o.device.no_tail, 6);
    assert_eq!(o.transport.needs_reset, 4);
    assert_eq!((o.dma[0].bad_args, o.dma[0].pasid_tagged), (5, 1));
    assert!(o.emulated.is_none());
}
