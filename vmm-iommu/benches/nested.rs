//! The software nested IOMMU (`vmm_iommu::emulated`) and the invalidation
//! path, in criterion benchmarks (issue 3's figures):
//!
//! - `translate/front_tlb_hit`: a device thread's [`NestedTranslator`] hit
//!   (target ≤ 10 ns);
//! - `translate/iotlb_hit`: `EmulatedIommu::translate` answered by the
//!   shared IOTLB;
//! - `translate/warm_walk`: an IOTLB miss with the PASID cache and the
//!   paging-structure cache warm: 65,536 4 KiB pages (256 MiB of guest RAM
//!   behind 4-level VT-d first-stage tables) visited in order, 16 times the
//!   IOTLB's capacity (target ≤ 150 ns);
//! - `translate/cold_walk`: PASID directory + PASID entry + 4-level walk
//!   with no cache at all, over the same pages;
//! - `invalidate/pages_N`: a guest burst of N = 1, 64, 4,096 single-page
//!   INVALIDATEs in one queue notification, through the virtqueue, the
//!   router and the emulated backend: time per invalidation. A notification
//!   carries at most 512 requests (the 1,024-entry queue holds 512
//!   two-descriptor chains), so a 4,096 burst is 8 notifications. Before the
//!   timings, the number of backend `invalidate()` calls each burst took is
//!   printed, and a 512-contiguous-page batch is checked to be one call.
//!
//! `cargo bench -p vmm-iommu --bench nested` (add `-- --quick` for a fast
//! pass).

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vm_memory::GuestMemoryMmap;
use vmm_iommu::config::{IommuConfig, NestedConfig, TableFormat};
use vmm_iommu::emulated::EmulatedIommu;
use vmm_iommu::invalidation::{Caches, Invalidation, Scope, VaRange};
use vmm_iommu::nested::build::{TableAlloc, VtdPasidTableBuilder, X86TableBuilder};
use vmm_iommu::nested::{vtd, x86, Access, Perm};
use vmm_iommu::testing::{driver_features, Harness};
use vmm_iommu::wire::{AttachTableReq, Request, Status, TableDesc};
use vmm_iommu::Router;

const EP: u32 = 8;
const PASID: u32 = 1;
const PAGES: u64 = 65_536;
const VA: u64 = 0x1_0000_0000;
const TABLES: u64 = 0x100_0000;
const DATA: u64 = 0x1000_0000;
const RAM_MIB: u64 = 512;

type Emu = EmulatedIommu<GuestMemoryMmap>;

fn cfg() -> IommuConfig {
    IommuConfig {
        nested: Some(NestedConfig {
            formats: vec![TableFormat::IntelVtd],
            pasid_bits: 16,
        }),
        ..IommuConfig::default()
    }
}

/// A device whose endpoint EP is bound to VT-d tables mapping PAGES pages
/// at VA onto DATA.
fn setup() -> (Harness, Arc<Emu>, u64) {
    let slot: Arc<Mutex<Option<Arc<Emu>>>> = Arc::default();
    let s2 = slot.clone();
    let mut h = Harness::with_router(
        &cfg(),
        &[EP],
        RAM_MIB,
        &[],
        move |mem, faults| {
            let emu = Arc::new(EmulatedIommu::new(mem.clone(), faults, 16, &[]));
            *s2.lock().unwrap() = Some(emu.clone());
            let mut r = Router::new();
            r.add(emu, &[EP]);
            r
        },
        |d| driver_features(d) | (1 << 56),
    );
    let emu = slot.lock().unwrap().take().unwrap();
    let mem = h.mem.clone();
    let mut a = TableAlloc::new(&mem, TABLES, DATA);
    let dir = VtdPasidTableBuilder::new(&mut a, 16).unwrap();
    let t = X86TableBuilder::new(&mut a, 4).unwrap();
    for p in 0..PAGES {
        t.map(&mut a, VA + (p << 12), DATA + (p << 12), 12, Perm::RW_USER)
            .unwrap();
    }
    dir.set_first_stage(&mut a, PASID, t.root(), 4, 1, x86::Flags::default())
        .unwrap();
    let desc = TableDesc::IntelVtd {
        pasid_bits: 16,
        pasid_dir_ptr: dir.dir_ptr(),
    };
    let st = h.send(&Request::AttachTable(AttachTableReq::new(1, EP, &desc)));
    assert_eq!(st, Status::Ok);
    (h, emu, dir.dir_ptr())
}

fn page_inv(page: u64) -> Request {
    let inv = Invalidation {
        caches: Caches::IOTLB,
        scope: Scope::Range(VaRange {
            pasid: Some(PASID),
            addr: VA + (page << 12),
            granule_log2: 12,
            pages: 1,
            leaf_only: true,
        }),
        archid: None,
    };
    Request::Invalidate(inv.to_request(1))
}

/// A burst of `n` single-page invalidations; `stride` pages apart.
fn burst(n: u64, stride: u64) -> Vec<Request> {
    (0..n).map(|i| page_inv((i * stride) % PAGES)).collect()
}

/// Most requests one notification carries: the 1,024-entry request queue
/// holds 512 two-descriptor chains.
const PER_NOTIFICATION: usize = 512;

/// Sends `reqs` as a guest would: as many per notification as the queue
/// holds.
fn send_burst(h: &mut Harness, reqs: &[Request]) {
    for chunk in reqs.chunks(PER_NOTIFICATION) {
        let st = h.send_batch(chunk);
        // Checked in release too: an INVALIDATE that fails fast would
        // otherwise improve the figure.
        assert!(
            st.iter().all(|s| *s == Status::Ok),
            "every INVALIDATE of the burst is applied: {st:?}"
        );
        black_box(st);
    }
}

fn report_calls(h: &mut Harness) {
    for (n, stride) in [
        (1u64, 1u64),
        (64, 1),
        (64, 3),
        (512, 1),
        (4096, 1),
        (4096, 7),
    ] {
        let before = h.dev.viommu().router().stats.snapshot();
        send_burst(h, &burst(n, stride));
        let after = h.dev.viommu().router().stats.snapshot();
        let calls = after.invalidate_calls - before.invalidate_calls;
        let sent = after.invalidations_sent - before.invalidations_sent;
        let notifications = (n as usize).div_ceil(PER_NOTIFICATION);
        println!(
            "invalidate burst: {n:>5} pages, stride {stride}, {notifications} notification(s): {calls} backend call(s) carrying {sent} invalidation(s)"
        );
        if n == 512 && stride == 1 {
            assert_eq!(
                (calls, sent),
                (1, 1),
                "512 contiguous pages must be one call"
            );
        }
    }
}

fn benches(c: &mut Criterion) {
    let (mut h, emu, dir) = setup();
    report_calls(&mut h);
    let mem = h.mem.clone();

    let mut g = c.benchmark_group("translate");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(2));
    let mut tr = emu.translator(EP, Some(PASID));
    g.bench_function("front_tlb_hit", |b| {
        b.iter(|| {
            let gpa = black_box(tr.translate(black_box(VA + 0x18), false));
            assert_eq!(gpa, Ok(DATA + 0x18));
        })
    });
    g.bench_function("iotlb_hit", |b| {
        b.iter(|| {
            let t = black_box(emu.translate(EP, Some(PASID), black_box(VA + 0x28), Access::READ));
            assert_eq!(t.map(|t| t.gpa), Ok(DATA + 0x28));
        })
    });
    let mut p = 0u64;
    g.bench_function("warm_walk", |b| {
        b.iter(|| {
            p = (p + 1) % PAGES;
            let t = black_box(emu.translate(EP, Some(PASID), VA + (p << 12), Access::READ));
            assert_eq!(t.map(|t| t.gpa), Ok(DATA + (p << 12)));
        })
    });
    let table = vtd::PasidTable::new(dir, 16).unwrap();
    let mut q = 0u64;
    g.bench_function("cold_walk", |b| {
        b.iter(|| {
            q = (q + 97) % PAGES;
            let s1 = table.stage1(&mem, PASID).unwrap();
            let va = VA + (q << 12);
            let leaf = black_box(s1.translate(&mem, va, Access::READ)).unwrap();
            assert_eq!(leaf.translate(va), Some(DATA + (q << 12)));
        })
    });
    g.finish();
    let s = &emu.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "emulated IOMMU: {} IOTLB hits, {} walks of which {} resumed from the paging-structure cache",
        load(&s.iotlb_hits),
        load(&s.walks),
        load(&s.pwc_hits)
    );

    let mut g = c.benchmark_group("invalidate");
    g.measurement_time(Duration::from_secs(2));
    g.sample_size(20);
    for n in [1u64, 64, 4096] {
        g.throughput(Throughput::Elements(n));
        // Scattered pages (stride 7): the ranges do not merge, so the
        // backend really receives n invalidations (or one widened one).
        let reqs = burst(n, 7);
        g.bench_function(format!("pages_{n}"), |b| {
            b.iter(|| send_burst(&mut h, &reqs))
        });
    }
    g.finish();
}

criterion_group!(nested, benches);
criterion_main!(nested);
