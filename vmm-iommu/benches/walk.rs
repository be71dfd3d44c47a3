//! Stage-1 walk latency (`vmm_iommu::nested`): the slow path of the
//! software IOMMU, from the root and from a paging-structure-cache resume
//! point, for IA-32e (4- and 5-level) and AArch64 (4 KiB and 64 KiB
//! granules) tables built in guest memory.
//!
//! Each figure is ns per walk (plus the permission check), the median of
//! `--runs` runs (7) of at least `--secs` seconds (1) over 4096 mapped 4 KiB
//! pages spread over 64 GiB of IOVA space (so the upper levels are shared
//! and the leaf tables are not), visited in a pre-generated random order;
//! every result is checked. `--quick` is 3 runs of 0.2 s.
//!
//! Usage: `cargo bench -p vmm-iommu --bench walk -- [--quick] [--runs N] [--secs S]`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_iommu::nested::build::{ArmTableBuilder, TableAlloc, X86TableBuilder};
use vmm_iommu::nested::{arm, Access, Perm, Stage1, WalkStart};

const PAGES: u64 = 4096;
const RAM: u64 = 64 << 20;

struct Opts {
    runs: usize,
    run_time: Duration,
}

fn opts() -> Opts {
    let mut o = Opts {
        runs: 7,
        run_time: Duration::from_secs(1),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => {
                o.runs = 3;
                o.run_time = Duration::from_millis(200);
            }
            "--runs" => o.runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(7),
            "--secs" => {
                if let Some(s) = args.next().and_then(|v| v.parse::<f64>().ok()) {
                    o.run_time = Duration::from_secs_f64(s.max(0.01));
                }
            }
            // cargo bench passes --bench; ignore what we do not know.
            _ => {}
        }
    }
    o.runs = o.runs.max(1);
    o
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// One case: a regime, the addresses to translate, what they map to, and
/// for each the resume point of its leaf table.
struct Case {
    name: &'static str,
    s1: Stage1,
    lookups: Vec<(u64, u64, WalkStart)>,
}

enum Builder {
    X86(X86TableBuilder),
    Arm(ArmTableBuilder),
}

fn build(mem: &GuestMemoryMmap<()>, which: usize) -> Case {
    let mut alloc = TableAlloc::new(mem, 0x10_0000, RAM);
    let (name, b, page) = match which {
        0 => (
            "x86 4-level",
            Builder::X86(X86TableBuilder::new(&mut alloc, 4).unwrap()),
            12,
        ),
        1 => (
            "x86 5-level",
            Builder::X86(X86TableBuilder::new(&mut alloc, 5).unwrap()),
            12,
        ),
        2 => (
            "arm 4K 4-level",
            Builder::Arm(ArmTableBuilder::new(&mut alloc, arm::Granule::K4, 16).unwrap()),
            12,
        ),
        _ => (
            "arm 64K 3-level",
            Builder::Arm(ArmTableBuilder::new(&mut alloc, arm::Granule::K64, 16).unwrap()),
            16,
        ),
    };
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ which as u64;
    let mut mapped = Vec::new();
    for i in 0..PAGES {
        let va = (xorshift(&mut seed) % (64 << 30)) & !((1u64 << page) - 1);
        let pa = (i << page) + (1 << 32);
        // A random VA may repeat; every new one must map (checked in
        // release too: a failed map would shrink the work measured).
        if mapped.iter().any(|&(v, _)| v == va) {
            continue;
        }
        let ok = match &b {
            Builder::X86(b) => b.map(&mut alloc, va, pa, page, Perm::RW_USER),
            Builder::Arm(b) => b.map(&mut alloc, va, pa, page, Perm::RW_USER),
        };
        assert!(ok.is_ok(), "{name}: map {va:#x} -> {pa:#x}: {ok:?}");
        mapped.push((va, pa));
    }
    let s1 = match b {
        Builder::X86(b) => Stage1::X86(b.config()),
        Builder::Arm(b) => Stage1::Arm(b.config()),
    };
    let mut lookups = Vec::new();
    for &(va, pa) in &mapped {
        let probe = va + 0x40;
        let mut last = s1.root();
        s1.walk(mem, probe, s1.root(), &mut |s| last = s.next)
            .unwrap();
        lookups.push((probe, pa + 0x40, last));
    }
    // Visit in a random order.
    for i in (1..lookups.len()).rev() {
        let j = (xorshift(&mut seed) % (i as u64 + 1)) as usize;
        lookups.swap(i, j);
    }
    Case { name, s1, lookups }
}

/// Median ns per translation over `o.runs` runs.
fn measure(o: &Opts, mem: &GuestMemoryMmap<()>, case: &Case, resume: bool) -> f64 {
    let mut per_run = Vec::with_capacity(o.runs);
    for _ in 0..o.runs {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < o.run_time {
            for &(va, pa, resume_at) in &case.lookups {
                let from = if resume { resume_at } else { case.s1.root() };
                let leaf = case
                    .s1
                    .walk(mem, black_box(va), from, &mut |_| {})
                    .expect("mapped");
                case.s1.check(&leaf, Access::WRITE).expect("writable");
                assert_eq!(black_box(leaf.translate(va)), Some(pa));
            }
            n += case.lookups.len() as u64;
        }
        per_run.push(start.elapsed().as_nanos() as f64 / n as f64);
    }
    per_run.sort_by(|a, b| a.total_cmp(b));
    per_run[per_run.len() / 2]
}

fn main() {
    let o = opts();
    println!(
        "stage-1 walk + check, ns per translation (median of {} runs of {:.1} s, {} pages)",
        o.runs,
        o.run_time.as_secs_f64(),
        PAGES
    );
    println!(
        "{:<18} {:>12} {:>14}",
        "regime", "from root", "from leaf PWC"
    );
    for which in 0..4 {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let case = build(&mem, which);
        let full = measure(&o, &mem, &case, false);
        let warm = measure(&o, &mem, &case, true);
        println!("{:<18} {:>12.1} {:>14.1}", case.name, full, warm);
    }
}
