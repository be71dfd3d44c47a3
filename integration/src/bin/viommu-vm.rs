//! The main job: boots the KVM test VMM on a VM config — guest RAM in two
//! regions, the virtio-iommu on virtio-mmio, the config's DMA engines
//! behind it — runs the guest scenarios the config names (all it allows by
//! default), and prints a report: pass/fail per scenario, requests by type,
//! invalidations received and backend calls made, the software nested
//! IOMMU's work, faults delivered, boot-to-first-request time, the
//! notification and interrupt paths that ran, and the guest's cycles per
//! MAP+UNMAP round trip and per INVALIDATE. Exits non-zero if any scenario
//! fails.
//!
//! Notifications go through ioeventfds and a device worker thread, and
//! interrupts through an irqfd into KVM's in-kernel irqchip, where KVM
//! offers them; `--no-ioeventfd` / `--no-irqfd` (or `--fallback` for both)
//! force the fallbacks: the MMIO exit path, and no interrupt line.
//!
//! Without `/dev/kvm` it falls back, saying so, to the host-side scripted
//! driver session (no guest runs) and exits 3 even when that session
//! passes, unless `VMM_IOMMU_REQUIRE_KVM=1` (then it fails); a bad flag or
//! config exits 2 with the error chain.
//!
//! Usage: `viommu-vm [--host-driver] [--verbose] [--bench N] [--timeout SECS]
//! [--no-ioeventfd] [--no-irqfd] [--fallback] [CONFIG.json]`
//! (default config `resources/vm.json`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use integration::abi;
use integration::config::VmConfig;
use integration::demo::run_demo;
use integration::kvm_check::{kvm_available, kvm_required, REQUIRE_KVM_ENV};
use integration::scenarios::{plan, run_scenario, RunOptions, ScenarioRun};
use integration::vm::layout::Layout;
use integration::vm::{dma_slots, FastPaths, RunOutcome};
use vmm_iommu::wire::Status;

struct Args {
    config: PathBuf,
    host_driver: bool,
    verbose: bool,
    run: RunOptions,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        config: PathBuf::from("resources/vm.json"),
        host_driver: false,
        verbose: false,
        run: RunOptions::default(),
    };
    let mut it = std::env::args_os().skip(1);
    let mut config = None;
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--host-driver") => a.host_driver = true,
            Some("--no-ioeventfd") => a.run.fast_paths.ioeventfd = false,
            Some("--no-irqfd") => a.run.fast_paths.irqfd = false,
            Some("--fallback") => a.run.fast_paths = FastPaths::NONE,
            Some("--verbose" | "-v") => a.verbose = true,
            Some("--bench") => {
                let v = it.next().context("--bench needs a number of round trips")?;
                a.run.bench_iterations = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .context("--bench needs a number of round trips")?;
            }
            Some("--timeout") => {
                let v = it.next().context("--timeout needs seconds")?;
                let shown = v.to_string_lossy().into_owned();
                let secs: u64 = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .filter(|&s| s > 0)
                    .with_context(|| {
                        format!("--timeout {shown}: give a whole number of seconds, 1 or more")
                    })?;
                a.run.timeout = Duration::from_secs(secs);
            }
            Some("--help" | "-h") => {
                println!("usage: viommu-vm [--host-driver] [--verbose] [--bench N] [--timeout SECS] [--no-ioeventfd] [--no-irqfd] [--fallback] [CONFIG.json]");
                std::process::exit(0);
            }
            Some(s) if s.starts_with('-') => bail!("unknown option {s}"),
            _ => {
                if config.replace(PathBuf::from(arg)).is_some() {
                    bail!("more than one config file given");
                }
            }
        }
    }
    if let Some(c) = config {
        a.config = c;
    }
    Ok(a)
}

/// Exit status when no guest could run and the host-side session ran in
/// its place: it passed, but it is not the main job passing.
const EXIT_FELL_BACK: u8 = 3;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            // The error chain only: a backtrace helps nobody with a bad
            // flag or config.
            eprintln!("viommu-vm: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, each once: many errors already print their
/// source in their own message, and `{:#}` would repeat it.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if !out.contains(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
    }
    out
}

fn run() -> Result<ExitCode> {
    let args = parse_args()?;
    let cfg = VmConfig::from_file(&args.config)
        .with_context(|| format!("config {}", args.config.display()))?;
    println!("config: {}", args.config.display());
    if args.host_driver {
        return host_driver(&cfg);
    }
    if let Err(why) = kvm_available() {
        if kvm_required() {
            bail!("{REQUIRE_KVM_ENV}=1 but KVM is unusable: {why}");
        }
        println!("KVM: {why}");
        println!("FALLBACK: no guest can run here; running the host-side scripted driver session instead");
        host_driver(&cfg)?;
        println!(
            "FALLBACK: the host-side session passed, but no guest ran: exit status {EXIT_FELL_BACK} \
             (--host-driver asks for that session alone and exits 0)"
        );
        return Ok(ExitCode::from(EXIT_FELL_BACK));
    }
    let plan = plan(&cfg).with_context(|| format!("config {}", args.config.display()))?;
    let (scenarios, skipped) = (plan.run, plan.skipped);
    describe_vm(&cfg, args.run.fast_paths)?;
    // Every scenario builds its own VM of this size: a host that cannot
    // give the memory should say so once, not once per scenario.
    drop(
        Layout::new(cfg.memory.size_mib)?
            .guest_memory()
            .context("memory.size_mib: the host refused the guest memory")?,
    );
    for (s, why) in &skipped {
        println!("scenario {}: skipped, {why}", s.as_str());
    }
    if scenarios.is_empty() {
        bail!("the config allows no scenario: add an \"emulated-dma\" device with \"iommu\": true");
    }
    let names: Vec<&str> = scenarios.iter().map(|s| s.as_str()).collect();
    println!("scenarios: {}", names.join(", "));

    let mut runs = Vec::new();
    for s in scenarios {
        let run = run_scenario(&cfg, s, &args.run);
        print_run(&run, &cfg, args.verbose);
        runs.push(run);
    }
    print_summary(&runs);
    let failed = runs.iter().filter(|r| !r.passed()).count();
    println!(
        "scenarios: {} of {} passed",
        runs.len() - failed,
        runs.len()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The old session: a scripted driver on the host side of the queues.
fn host_driver(cfg: &VmConfig) -> Result<ExitCode> {
    println!("mode: host-side scripted driver session (no KVM guest)");
    let mut out = std::io::stdout().lock();
    let report = run_demo(cfg, &mut out)?;
    if report.failed > 0 {
        bail!("{} of {} checks failed", report.failed, report.checks);
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_vm(cfg: &VmConfig, fast: FastPaths) -> Result<()> {
    let l = Layout::new(cfg.memory.size_mib)?;
    println!(
        "VM: 1 vCPU (64-bit, guest at CPL3), {} MiB RAM as low [0, {:#x}) + high [{:#x}, {:#x}), MMIO gap [{:#x}, {:#x})",
        cfg.memory.size_mib,
        l.low_end,
        l.high_start,
        l.high_end,
        abi::MMIO_GAP_START,
        abi::MMIO_GAP_END
    );
    println!(
        "devices: virtio-iommu (virtio-mmio v2) at {:#x}, endpoints {:?}",
        abi::VIRTIO_MMIO_BASE,
        cfg.endpoints()
    );
    for s in dma_slots(cfg)? {
        println!(
            "         DMA engine endpoint {} at {:#x}{}",
            s.endpoint,
            abi::DMA_BASE + s.index as u64 * abi::MMIO_WINDOW_SIZE,
            if s.behind_iommu {
                " behind the vIOMMU"
            } else {
                " (no IOMMU)"
            }
        );
    }
    let allowed = |on: bool, what: &str, fallback: &str| {
        if on {
            format!("{what} where KVM offers it, else {fallback}")
        } else {
            format!("{fallback} (forced)")
        }
    };
    println!(
        "transport paths: notify by {}; interrupts by {}; the guest polls its used rings either way",
        allowed(fast.ioeventfd, "ioeventfd", "MMIO exit"),
        allowed(fast.irqfd, "irqfd", "none (polled)")
    );
    Ok(())
}

fn requests_line(o: &RunOutcome) -> String {
    let names = [
        "",
        "ATTACH",
        "DETACH",
        "MAP",
        "UNMAP",
        "PROBE",
        "ATTACH_TABLE",
        "INVALIDATE",
        "PAGE_RESP",
    ];
    let mut parts: Vec<String> = o
        .device
        .requests
        .iter()
        .enumerate()
        .filter(|&(_, &n)| n > 0)
        .map(|(t, n)| format!("{} {n}", names.get(t).copied().unwrap_or("?")))
        .collect();
    if o.device.unknown_type > 0 {
        parts.push(format!("unknown type {}", o.device.unknown_type));
    }
    if o.device.no_tail > 0 {
        parts.push(format!("no tail {}", o.device.no_tail));
    }
    parts.join(", ")
}

fn statuses_line(o: &RunOutcome) -> String {
    let all = [
        Status::Ok,
        Status::IoErr,
        Status::Unsupp,
        Status::DevErr,
        Status::Inval,
        Status::Range,
        Status::NoEnt,
        Status::Fault,
        Status::NoMem,
    ];
    all.iter()
        .filter_map(|&s| {
            let n = *o.device.statuses.get(s as usize)?;
            (n > 0).then(|| format!("{s:?} {n}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn cycles_line(c: Option<u64>, o: &RunOutcome) -> Option<String> {
    let c = c?;
    Some(match o.tsc_khz {
        Some(khz) if khz > 0 => format!(
            "{c} cycles ({:.1} µs at a {} MHz TSC)",
            c as f64 / f64::from(khz) * 1000.0,
            khz / 1000
        ),
        _ => format!("{c} cycles"),
    })
}

fn print_run(run: &ScenarioRun, cfg: &VmConfig, verbose: bool) {
    let name = run.scenario.as_str();
    println!();
    match &run.outcome {
        Err(e) => {
            println!("== {name}: FAIL");
            println!("   {e}");
        }
        Ok(o) => {
            println!(
                "== {name}: {}  (guest ran {:.2} s)",
                if run.passed() { "PASS" } else { "FAIL" },
                o.run_time.as_secs_f64()
            );
            let mut cases = 0;
            for line in o.serial.lines() {
                if !verbose && line.starts_with("hostile: ") && line.ends_with(": ok") {
                    cases += 1;
                    continue;
                }
                println!("   guest| {line}");
            }
            if cases > 0 {
                println!("   guest| ({cases} hostile cases answered as the spec and docs/wire.md ask; --verbose lists them)");
            }
            println!("   requests: {}", requests_line(o));
            println!("   statuses: {}", statuses_line(o));
            println!(
                "   faults delivered on the eventq: {} (dropped {})",
                o.device.faults_delivered, o.faults_dropped
            );
            let r = &o.router;
            if r.invalidations + r.invalidate_calls + r.other_calls > 0 {
                println!(
                    "   router: {} invalidations received, {} backend invalidate calls carrying {}, {} other backend calls, {} rollbacks",
                    r.invalidations, r.invalidate_calls, r.invalidations_sent, r.other_calls, r.rollbacks
                );
            }
            if let Some(e) = &o.emulated {
                if e.walks + e.iotlb_hits + e.invalidate_calls + e.page_requests > 0 {
                    println!(
                        "   software IOMMU: {} IOTLB hits, {} walks ({} resumed from the paging-structure cache), {} PASID entry/CD reads, {} invalidate calls, {} faults, {} page requests",
                        e.iotlb_hits,
                        e.walks,
                        e.pwc_hits,
                        e.context_reads,
                        e.invalidate_calls,
                        e.faults,
                        e.page_requests
                    );
                }
            }
            if let Ok(slots) = dma_slots(cfg) {
                for (s, st) in slots.iter().zip(&o.dma) {
                    if st.ok + st.faults + st.bad_args + st.page_waits > 0 {
                        let waits = if st.page_waits > 0 {
                            format!(
                                ", {} waits for a page ({} retried)",
                                st.page_waits, st.retries
                            )
                        } else {
                            String::new()
                        };
                        println!(
                            "   DMA endpoint {}: {} done, {} faulted, {} bad arguments{waits}, {} bytes",
                            s.endpoint, st.ok, st.faults, st.bad_args, st.bytes
                        );
                    }
                }
            }
            println!(
                "   mappings: peak {}, at exit {}; domains at exit {}",
                o.peak_mappings, o.final_mappings, o.final_domains
            );
            println!("   transport: {}", o.paths);
            if let Some(why) = o.paths.notify.fallback_reason() {
                println!("      notify fallback: {why}");
            }
            if let Some(why) = o.paths.interrupts.fallback_reason() {
                println!("      interrupt fallback: {why}");
            }
            println!(
                "   transport counters: {} activations, {} resets, {} DEVICE_NEEDS_RESET, {} FEATURES_OK refused, {} accesses ignored, {} interrupts raised{}",
                o.transport.activations,
                o.transport.resets,
                o.transport.needs_reset,
                o.transport.features_refused,
                o.transport.ignored,
                o.transport.interrupts,
                match o.line_latched {
                    Some(true) => " (latched by the in-kernel PIC)",
                    Some(false) => " (NOT latched by the in-kernel PIC)",
                    None => "",
                }
            );
            if let Some(w) = &o.worker {
                println!(
                    "   device worker: {} wakeups, {} requestq and {} eventq kicks, {} fault wakeups, {} request-queue polls ({} found requests), {} stale kicks dropped, {}",
                    w.wakeups,
                    w.kicks[0],
                    w.kicks[1],
                    w.fault_wakeups,
                    w.polls.0,
                    w.polls.1,
                    o.transport.stale_kicks,
                    match (&w.error, w.stopped) {
                        (Some(e), _) => format!("ended early: {e}"),
                        (None, true) => "stopped and joined".to_string(),
                        (None, false) => "did not stop".to_string(),
                    }
                );
            }
            println!("   exits: {} MMIO, {} port I/O", o.exits.mmio, o.exits.pio);
            if let Some(t) = o.boot_to_first_request {
                println!(
                    "   boot to first request: {:.3} ms from the first KVM_RUN (VM built in {:.3} ms before it)",
                    t.as_secs_f64() * 1000.0,
                    run.build_time.as_secs_f64() * 1000.0
                );
            }
            if let Some(c) = cycles_line(run.cycles_per_map_unmap(), o) {
                println!("   MAP+UNMAP round trip (guest rdtsc, notifications included): {c}");
            }
            if let Some(c) = cycles_line(run.cycles_per_invalidate(), o) {
                println!(
                    "   INVALIDATE round trip (guest rdtsc, notification and backend call included): {c}"
                );
            }
        }
    }
    for c in run.checks.iter().filter(|c| !c.ok) {
        println!("   VMM check FAILED: {}", c.what);
    }
    if !run.passed() && verbose {
        if let Err(e) = &run.outcome {
            if e.serial().is_none() {
                println!("   (no guest output)");
            }
        }
    }
}

fn print_summary(runs: &[ScenarioRun]) {
    println!();
    println!(
        "{:<14} {:<6} {:>13} {:>7} {:>13} {:>17} {:>17}",
        "scenario",
        "result",
        "boot→1st req",
        "faults",
        "inval/calls",
        "cycles/MAP+UNMAP",
        "cycles/INVALIDATE"
    );
    let dash = || "-".to_string();
    for r in runs {
        let (boot, faults, inval) = match &r.outcome {
            Ok(o) => (
                o.boot_to_first_request
                    .map_or_else(dash, |t| format!("{:.3} ms", t.as_secs_f64() * 1000.0)),
                o.device.faults_delivered.to_string(),
                if o.router.invalidations > 0 {
                    format!("{}/{}", o.router.invalidations, o.router.invalidate_calls)
                } else {
                    dash()
                },
            ),
            Err(_) => (dash(), dash(), dash()),
        };
        println!(
            "{:<14} {:<6} {:>13} {:>7} {:>13} {:>17} {:>17}",
            r.scenario.as_str(),
            if r.passed() { "PASS" } else { "FAIL" },
            boot,
            faults,
            inval,
            r.cycles_per_map_unmap()
                .map_or_else(dash, |c| c.to_string()),
            r.cycles_per_invalidate()
                .map_or_else(dash, |c| c.to_string())
        );
    }
    let mut paths: Vec<String> = runs
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok())
        .map(|o| o.paths.to_string())
        .collect();
    paths.sort();
    paths.dedup();
    match paths.as_slice() {
        [] => {}
        [one] => println!("transport: {one}"),
        _ => println!("transport: {} (differs by scenario)", paths.join(" / ")),
    }
}
