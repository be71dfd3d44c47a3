//! Scenario 1 in a real KVM guest: PROBE reports the configured MSI region,
//! ATTACH and MAP, DMA copies through IOVAs verified byte for byte by the
//! guest (one window across the two RAM regions), UNMAP, DMA blocked with
//! a MAPPING fault the guest reads from the event queue — and the VMM's own
//! view of the same run: requests by type, mappings, faults delivered.
//!
//! On both transport paths: the fast one (ioeventfds served by the device
//! worker, interrupts through an irqfd into the in-kernel irqchip) where
//! KVM offers it, and the fallback (notifications on the MMIO exit, no
//! interrupt line) forced; each test checks the path that actually ran
//! and the evidence that it did.

use std::path::Path;

use integration::config::{Scenario, VmConfig};
use integration::kvm_check::{fast_paths_offered, kvm_or_skip};
use integration::scenarios::{run_scenario, RunOptions, ScenarioRun};
use integration::vm::irq::InterruptPath;
use integration::vm::worker::NotifyPath;
use integration::vm::{FastPaths, RunOutcome};
use vmm_iommu::wire::{
    VIRTIO_IOMMU_T_ATTACH, VIRTIO_IOMMU_T_DETACH, VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_PROBE,
    VIRTIO_IOMMU_T_UNMAP,
};

const BENCH: u64 = 200;

fn config(name: &str) -> VmConfig {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    VmConfig::from_file(&repo.join("resources").join(name)).unwrap()
}

/// Scenario 1 with `fast_paths` allowed, checked as the guest and the VMM
/// see it.
fn run_map(fast_paths: FastPaths) -> ScenarioRun {
    let opts = RunOptions {
        bench_iterations: BENCH,
        fast_paths,
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
        "eventq: fault reason=MAPPING endpoint=8 address=0x10000000 flags=WRITE|ADDRESS",
        "eventq: fault reason=MAPPING endpoint=8 address=0x10100000 flags=WRITE|ADDRESS",
        "map: DMA after UNMAP blocked, MAPPING fault read from the eventq",
        "eventq: fault reason=DOMAIN endpoint=8 address=0x10000000 flags=READ|ADDRESS",
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
    run
}

/// Requests the guest sent: each one a QueueNotify write.
fn requests(o: &RunOutcome) -> u64 {
    o.device.requests.iter().sum()
}

/// The evidence that the notification path `o` reports is the one that
/// ran.
fn assert_notify_path_ran(o: &RunOutcome) {
    match &o.paths.notify {
        NotifyPath::Ioeventfd => {
            let w = o.worker.as_ref().expect("worker counters");
            assert!(w.stopped && w.error.is_none(), "{w:?}");
            assert!(w.kicks[0] > 0 && w.kicks[1] > 0, "{w:?}");
            // The notifications never exited: fewer MMIO exits than
            // requests (each request is one QueueNotify write).
            assert!(
                o.exits.mmio < requests(o),
                "{} MMIO exits for {} requests",
                o.exits.mmio,
                requests(o)
            );
        }
        NotifyPath::MmioExit { .. } => {
            assert!(o.worker.is_none(), "a worker ran on the exit path");
            assert!(o.exits.mmio >= requests(o));
            assert!(o.transport.notifications[0] >= requests(o));
        }
    }
}

/// The evidence that the interrupt path `o` reports is the one that ran.
fn assert_interrupt_path_ran(o: &RunOutcome) {
    match &o.paths.interrupts {
        InterruptPath::Irqfd { gsi } => {
            assert_eq!(*gsi, 5);
            // At most one per queue pass (a pass may complete several
            // requests), and at least one.
            assert!(o.transport.interrupts > 0, "{:?}", o.transport);
            assert_eq!(o.transport.interrupt_errors, 0);
            assert_eq!(o.line_latched, Some(true), "the PIC latched the line");
        }
        InterruptPath::Polled { .. } => {
            assert_eq!(o.transport.interrupts, 0);
            assert_eq!(o.line_latched, None);
        }
    }
}

#[test]
fn map_mode_dma_through_iovas_then_unmap_blocks_it_with_a_fault_on_the_eventq() {
    if !kvm_or_skip("map_mode_dma_through_iovas") {
        return;
    }
    let offered = fast_paths_offered();

    let run = run_map(FastPaths::ALL);

    let o = run.outcome.as_ref().unwrap();
    // Every fast path KVM offers ran (on this machine kind: both).
    assert_eq!(
        o.paths.notify == NotifyPath::Ioeventfd,
        offered.ioeventfd,
        "{}",
        o.paths
    );
    assert_eq!(
        matches!(o.paths.interrupts, InterruptPath::Irqfd { .. }),
        offered.irqfd,
        "{}",
        o.paths
    );
    assert_notify_path_ran(o);
    assert_interrupt_path_ran(o);
}

#[test]
fn map_mode_passes_on_the_fallback_path_of_mmio_exits_and_no_interrupt_line() {
    if !kvm_or_skip("map_mode_on_the_fallback_path") {
        return;
    }

    let run = run_map(FastPaths::NONE);

    let o = run.outcome.as_ref().unwrap();
    assert_eq!(o.paths.to_string(), "notify=mmio-exit; interrupts=polled");
    assert_eq!(
        o.paths.notify.fallback_reason(),
        Some("ioeventfd turned off by the VMM options")
    );
    assert_eq!(
        o.paths.interrupts.fallback_reason(),
        Some("irqfd turned off by the VMM options")
    );
    assert_notify_path_ran(o);
    assert_interrupt_path_ran(o);
}

#[test]
fn each_fast_path_falls_back_on_its_own() {
    if !kvm_or_skip("each_fast_path_falls_back_on_its_own") {
        return;
    }
    let offered = fast_paths_offered();
    for allowed in [
        FastPaths {
            ioeventfd: true,
            irqfd: false,
        },
        FastPaths {
            ioeventfd: false,
            irqfd: true,
        },
    ] {
        let run = run_map(allowed);

        let o = run.outcome.as_ref().unwrap();
        let ran = |on: bool, fast: &str, fallback: &str| {
            if on {
                fast.to_string()
            } else {
                fallback.to_string()
            }
        };
        let want = format!(
            "notify={}; interrupts={}",
            ran(
                allowed.ioeventfd && offered.ioeventfd,
                "ioeventfd(worker thread)",
                "mmio-exit"
            ),
            ran(
                allowed.irqfd && offered.irqfd,
                "irqfd(gsi 5, in-kernel irqchip)",
                "polled"
            )
        );
        assert_eq!(o.paths.to_string(), want, "allowed {allowed:?}");
        assert_notify_path_ran(o);
        assert_interrupt_path_ran(o);
    }
}
