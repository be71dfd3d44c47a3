//! Lowering a 4,096-entry invalidation burst to vendor entries: VT-d
//! `iommu_hwpt_vtd_s1_invalidate` and SMMUv3 CMDQ commands, in ns per
//! generic entry (target: at most 50 ns), and the number of kernel calls a
//! burst takes through the backend (target: one per batch).
//!
//! The burst: 4,096 single-page, leaf-only IOTLB invalidations of one
//! PASID and ASID, at scattered addresses so that coalescing cannot merge
//! them (the worst case for the lowering: one vendor entry per generic
//! one), lowered as they come. The call count is measured separately on
//! the whole path (coalesce, lower, `IOMMU_HWPT_INVALIDATE`) over the
//! recording host.
//!
//! `cargo bench -p vfio-passthrough --bench lowering` (about 10 s).

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vfio_passthrough::host::{HostIommu, Op};
use vfio_passthrough::recording::{FakeIommu, RecordingHost};
use vfio_passthrough::smmuv3::{lower_smmuv3, SmmuInvTarget};
use vfio_passthrough::vtd::lower_vtd;
use vfio_passthrough::{GuestRam, IommufdBackend};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::backend::{IommuBackend, TableBinding};
use vmm_iommu::invalidation::{
    coalesce, Caches, Invalidation, Scope, VaRange, WIDEN_THRESHOLD_PAGES,
};
use vmm_iommu::wire::TableDesc;

const BURST: u64 = 4096;

/// `n` single-page invalidations, `stride` pages apart (1: contiguous).
fn burst(n: u64, stride: u64) -> Vec<Invalidation> {
    (0..n)
        .map(|i| {
            let page = i * stride;
            Invalidation {
                caches: Caches::IOTLB,
                scope: Scope::Range(VaRange {
                    pasid: Some(1),
                    addr: 0x4000_0000 + page * 0x1000,
                    granule_log2: 12,
                    pages: 1,
                    leaf_only: true,
                }),
                archid: Some(5),
            }
        })
        .collect()
}

fn lowering(c: &mut Criterion) {
    let batch = burst(BURST, 7);
    let mut g = c.benchmark_group("lower_4096_entry_burst");
    g.throughput(Throughput::Elements(BURST));
    g.measurement_time(Duration::from_secs(2));
    g.warm_up_time(Duration::from_millis(500));
    g.sample_size(30);
    let (mut vtd, mut refresh) = (Vec::with_capacity(BURST as usize), Vec::new());
    g.bench_function("vtd", |b| {
        b.iter(|| {
            lower_vtd(black_box(&batch), &mut vtd, &mut refresh);
            black_box(vtd.len())
        })
    });
    let t = SmmuInvTarget {
        vsid: 16,
        asid_bits: 16,
        ssid_bits: 20,
        range_inv: false,
        ats: false,
    };
    let mut cmds = Vec::with_capacity(BURST as usize);
    g.bench_function("smmuv3", |b| {
        b.iter(|| {
            cmds.clear();
            let r = lower_smmuv3(black_box(&batch), &t, &mut cmds);
            black_box((r.is_ok(), cmds.len()))
        })
    });
    g.finish();
}

/// Kernel calls one burst takes through each backend.
fn calls_per_burst() {
    for (name, hw, table) in [
        (
            "VT-d",
            FakeIommu::vtd_nesting(),
            TableDesc::IntelVtd {
                pasid_bits: 6,
                pasid_dir_ptr: 0x10_0000,
            },
        ),
        (
            "SMMUv3",
            FakeIommu::smmuv3(false),
            TableDesc::ArmSmmuV3 {
                s1fmt: 0,
                s1dss: 0,
                s1contextptr: 0x10_0000,
                s1cdmax: 4,
            },
        ),
    ] {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("memory");
        // PASID directory at 1 MiB -> table at 1 MiB + 4 KiB; PASID 1 first stage.
        mem.write_obj(0x10_1000u64 | 1, GuestAddress(0x10_0000))
            .expect("dir");
        let mut e = [0u8; 64];
        e[0..8].copy_from_slice(&(1u64 | 1 << 6).to_le_bytes());
        e[16..24].copy_from_slice(&0x20_0000u64.to_le_bytes());
        mem.write_slice(&e, GuestAddress(0x10_1000 + 64))
            .expect("entry");
        let rec = Arc::new(RecordingHost::new(hw));
        let host: Arc<dyn HostIommu> = rec.clone();
        let b = IommufdBackend::new(host, GuestRam::new(mem).expect("ram")).expect("backend");
        b.add_endpoint(16, Path::new("/sys/bus/pci/devices/0000:00:01.0"))
            .expect("add");
        b.bind_table(16, &TableBinding { domain: 1, table })
            .expect("bind");
        for (what, n, stride, coalesced) in [
            (
                "4096 scattered pages, coalesced (widened to the PASID)",
                BURST,
                7,
                true,
            ),
            ("512 contiguous pages, coalesced", 512, 1, true),
            ("500 scattered pages, coalesced", 500, 7, true),
            ("4096 scattered pages, not coalesced", BURST, 7, false),
        ] {
            let mut batch = burst(n, stride);
            if coalesced {
                coalesce(&mut batch, WIDEN_THRESHOLD_PAGES);
            }
            let before = rec.count(Op::HwptInvalidate);
            b.invalidate(1, &batch).expect("invalidate");
            let last = rec
                .calls_of(Op::HwptInvalidate)
                .pop()
                .map(|c| c.arg)
                .unwrap_or_default();
            let entries = last
                .get(24..28)
                .map_or(0, |x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]));
            println!(
                "{name}: {what}: {} generic -> {} IOMMU_HWPT_INVALIDATE call(s), {entries} vendor entries",
                batch.len(),
                rec.count(Op::HwptInvalidate) - before,
            );
        }
    }
}

fn all(c: &mut Criterion) {
    calls_per_burst();
    lowering(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
