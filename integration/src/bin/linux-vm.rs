//! Boots a stock Linux kernel on the test VMM with the virtio-iommu and the
//! virtio devices of a config behind it (see `integration::linux`), copies
//! the guest's console to stdout, and prints what the VMM saw: how the
//! guest ended, the virtio-iommu's requests and statuses, the IOVA range
//! it mapped, faults delivered, and each device's I/O. Exits 0 only when
//! the guest powered off.
//!
//! Usage: `linux-vm --kernel BZIMAGE [--initrd INITRD] [--append "CMDLINE"]
//! [--timeout SECS] [--quiet] CONFIG.json`
//!
//! The machine it runs on needs a `/dev/kvm` that runs guest kernel code
//! (VMX or SVM); `scripts/linux-guest.sh` provides one inside a QEMU L1
//! where the host has none.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use integration::linux::config::LinuxVmConfig;
use integration::linux::vm::{run_linux, DeviceCounters, LinuxEnd, LinuxOutcome, LinuxRunOptions};
use vmm_iommu::wire::Status;

/// Request types by their wire number.
const T_ATTACH: usize = 1;
const T_DETACH: usize = 2;
const T_MAP: usize = 3;
const T_UNMAP: usize = 4;
const T_PROBE: usize = 5;

fn parse_args() -> Result<(LinuxRunOptions, PathBuf)> {
    let mut opts = LinuxRunOptions {
        kernel: PathBuf::new(),
        initrd: None,
        append: String::new(),
        timeout: Duration::from_secs(300),
        echo_console: true,
    };
    let mut config = None;
    let mut kernel = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value("--kernel")?)),
            "--initrd" => opts.initrd = Some(PathBuf::from(value("--initrd")?)),
            "--append" => opts.append = value("--append")?,
            "--timeout" => {
                let v = value("--timeout")?;
                let secs: u64 = v
                    .parse()
                    .with_context(|| format!("--timeout {v}: not a number of seconds"))?;
                opts.timeout = Duration::from_secs(secs);
            }
            "--quiet" => opts.echo_console = false,
            "-h" | "--help" => {
                println!(
                    "usage: linux-vm --kernel BZIMAGE [--initrd INITRD] [--append CMDLINE] \
                     [--timeout SECS] [--quiet] CONFIG.json"
                );
                std::process::exit(0);
            }
            s if s.starts_with('-') => bail!("unknown option {s}"),
            s => {
                if config.replace(PathBuf::from(s)).is_some() {
                    bail!("more than one config file given");
                }
            }
        }
    }
    opts.kernel = kernel.context("--kernel is required")?;
    let config = config.context("a CONFIG.json is required")?;
    Ok((opts, config))
}

fn report(o: &LinuxOutcome) {
    let s = &o.iommu;
    let ok = s.statuses[Status::Ok as usize];
    let err: u64 = s.statuses.iter().sum::<u64>() - ok;
    let (lo, hi) = if s.mapped_iova_lowest <= s.mapped_iova_highest {
        (s.mapped_iova_lowest, s.mapped_iova_highest)
    } else {
        (0, 0)
    };
    if let LinuxEnd::Stopped(why) = &o.end {
        println!("linux-vm: vCPU stopped: {why}");
    }
    println!(
        "linux-vm: end={} wall_ms={} exits={} unclaimed={}",
        o.end.as_str(),
        o.wall.as_millis(),
        o.exits,
        o.unclaimed_accesses
    );
    println!(
        "linux-vm: viommu attach={} detach={} map={} unmap={} probe={} ok={ok} err={err} \
         faults_delivered={} bypass_attach={} iova_lo={lo:#x} iova_hi={hi:#x} features={:#x} test_hook={} kicks={}",
        s.requests[T_ATTACH],
        s.requests[T_DETACH],
        s.requests[T_MAP],
        s.requests[T_UNMAP],
        s.requests[T_PROBE],
        s.faults_delivered,
        s.bypass_attaches,
        o.iommu_features,
        o.test_hook_dmas,
        s.notifications,
    );
    // Where the VMM's time went (figures only): the vIOMMU's requests, and
    // each device's notifications with its DMA through the vIOMMU.
    let (n, ns) = o.iommu_notify_time;
    println!(
        "linux-vm: time iommu_notifies={n} iommu_us={} iommu_ns_per_request={}",
        ns / 1000,
        ns / s.requests.iter().sum::<u64>().max(1)
    );
    for d in &o.devices {
        let (n, ns) = d.notify_time;
        let head = format!(
            "linux-vm: device {} type={} endpoint={} iommu={} access_platform={} notifies={n} notify_us={}",
            d.id,
            d.kind.as_str(),
            d.endpoint,
            d.behind_iommu,
            d.access_platform,
            ns / 1000
        );
        match &d.counters {
            DeviceCounters::Blk(b) => println!(
                "{head} reads={} writes={} flushes={} bytes_read={} bytes_written={} errors={} dma_refused={}",
                b.reads, b.writes, b.flushes, b.bytes_read, b.bytes_written, b.errors, b.dma_refused
            ),
            DeviceCounters::Rng(r) => println!(
                "{head} requests={} bytes={} dma_refused={}",
                r.requests, r.bytes, r.dma_refused
            ),
        }
    }
}

fn main() -> ExitCode {
    env_logger_lite();
    let run = || -> Result<LinuxOutcome> {
        let (opts, config) = parse_args()?;
        let cfg = LinuxVmConfig::from_file(&config)
            .with_context(|| format!("config {}", config.display()))?;
        Ok(run_linux(&cfg, &opts)?)
    };
    match run() {
        Ok(o) => {
            report(&o);
            if o.end == LinuxEnd::PowerOff {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            // The console was already copied to stdout as it arrived.
            let msg = format!("{e:#}");
            let first = msg.lines().next().unwrap_or_default();
            println!("linux-vm: end=error wall_ms=0 reason={first}");
            eprintln!("linux-vm: {first}");
            ExitCode::FAILURE
        }
    }
}

/// No logger crate: `log` records at info and above go to stderr when
/// `LINUX_VM_LOG` is set.
fn env_logger_lite() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            m.level() <= log::Level::Info
        }
        fn log(&self, r: &log::Record<'_>) {
            if self.enabled(r.metadata()) {
                eprintln!("[{}] {}", r.level(), r.args());
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: Stderr = Stderr;
    if std::env::var_os("LINUX_VM_LOG").is_some() && log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}
