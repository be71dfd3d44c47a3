//! The guest scenarios on the host side: which ones a config allows, one
//! VM per scenario, and the checks the VMM makes on what it observed
//! (device counters, DMA outcomes, mappings, faults delivered) beside the
//! guest's own verdict on serial and the done port.

use std::time::{Duration, Instant};

use vmm_iommu::config::{ReservedKind, Scenario, TableFormat, VmConfig};
use vmm_iommu::wire::{
    Status, VIRTIO_IOMMU_T_ATTACH, VIRTIO_IOMMU_T_ATTACH_TABLE, VIRTIO_IOMMU_T_DETACH,
    VIRTIO_IOMMU_T_INVALIDATE, VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_PAGE_RESP, VIRTIO_IOMMU_T_PROBE,
    VIRTIO_IOMMU_T_UNMAP,
};

use crate::abi;
use crate::vm::dma_device::DmaStats;
use crate::vm::irq::InterruptPath;
use crate::vm::snapshot::{SnapshotError, SnapshotSize};
use crate::vm::worker::NotifyPath;
use crate::vm::{dma_slots, FastPaths, HotplugPlan, RunEnd, RunOutcome, Vm, VmError, VmOptions};

/// How long one scenario may run before the watchdog ends it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// MAP+UNMAP round trips the guest times by default.
pub const DEFAULT_BENCH_ITERATIONS: u64 = 1000;

/// How to run scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// Deadline of each scenario.
    pub timeout: Duration,
    /// MAP+UNMAP round trips the guest times (0 to skip).
    pub bench_iterations: u64,
    /// The fast paths the VMM may take (all that KVM offers by default).
    pub fast_paths: FastPaths,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: DEFAULT_TIMEOUT,
            bench_iterations: DEFAULT_BENCH_ITERATIONS,
            fast_paths: FastPaths::ALL,
        }
    }
}

/// The scenario number the guest program knows.
pub fn scenario_id(s: Scenario) -> u64 {
    match s {
        Scenario::Map => abi::SCENARIO_MAP,
        Scenario::Bypass => abi::SCENARIO_BYPASS,
        Scenario::NestedVtd => abi::SCENARIO_NESTED_VTD,
        Scenario::NestedSmmuV3 => abi::SCENARIO_NESTED_SMMUV3,
        Scenario::PageRequest => abi::SCENARIO_PAGE_REQUEST,
        Scenario::Hostile => abi::SCENARIO_HOSTILE,
    }
}

/// The table format, the PASID width and the domain a nested scenario
/// needs; `None` for the others.
fn nested_needs(s: Scenario) -> Option<(TableFormat, u8, u32)> {
    match s {
        Scenario::NestedVtd => Some((
            TableFormat::IntelVtd,
            abi::NESTED_PASID_BITS,
            abi::NESTED_VTD_DOMAIN,
        )),
        Scenario::NestedSmmuV3 => Some((
            TableFormat::ArmSmmuV3,
            // s1cdmax ≤ PASID_SIZE; the value is at most 20.
            abi::NESTED_SMMUV3_S1CDMAX as u8,
            abi::NESTED_SMMUV3_DOMAIN,
        )),
        Scenario::PageRequest => Some((
            TableFormat::IntelVtd,
            abi::NESTED_PASID_BITS,
            abi::PAGE_REQUEST_DOMAIN,
        )),
        Scenario::Map | Scenario::Bypass | Scenario::Hostile => None,
    }
}

/// Why `cfg` cannot run scenario `s`, if it cannot: the guest programs
/// use 4 KiB pages, domains 1 to 4 and IOVAs in
/// `abi::IOVA_WINDOW_START..=abi::IOVA_WINDOW_END`, and drive a DMA engine
/// behind the vIOMMU; the nested ones also need `iommu.nested` with their
/// table format, a wide enough PASID and their own domain (5, 6 or 7).
pub fn unmet_requirement(cfg: &VmConfig, s: Scenario) -> Option<String> {
    let i = &cfg.iommu;
    let dma = match dma_slots(cfg) {
        Ok(slots) => slots,
        Err(e) => return Some(e.to_string()),
    };
    if !dma.iter().any(|d| d.behind_iommu) {
        return Some("needs an \"emulated-dma\" device with \"iommu\": true".into());
    }
    if i.page_size_mask & 0x1000 == 0 {
        return Some("needs 4 KiB pages in iommu.page_size_mask".into());
    }
    let domains = abi::MAP_DOMAIN..=abi::HOSTILE_DOMAIN + 1;
    if i.domain_range.start > *domains.start() || i.domain_range.end < *domains.end() {
        return Some(format!(
            "needs domains {}..={} inside iommu.domain_range",
            domains.start(),
            domains.end()
        ));
    }
    let (lo, hi) = (abi::IOVA_WINDOW_START, abi::IOVA_WINDOW_END);
    if i.input_range.start > lo || i.input_range.end < hi {
        return Some(format!(
            "needs IOVAs {lo:#x}..={hi:#x} inside iommu.input_range"
        ));
    }
    if let Some((n, r)) = i
        .reserved_regions
        .iter()
        .enumerate()
        .find(|(_, r)| r.start <= hi && lo <= r.end)
    {
        return Some(format!(
            "needs IOVAs {lo:#x}..={hi:#x} free of reserved regions, but \
             iommu.reserved_regions[{n}] ({:#x}..={:#x}) overlaps them: move the region",
            r.start, r.end
        ));
    }
    // A device's own regions bind every domain it joins, as the
    // device-wide ones do.
    for (d, dev) in cfg.devices.iter().enumerate() {
        if let Some((n, r)) = dev
            .reserved_regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.start <= hi && lo <= r.end)
        {
            return Some(format!(
                "needs IOVAs {lo:#x}..={hi:#x} free of reserved regions, but \
                 devices[{d}].reserved_regions[{n}] ({:#x}..={:#x}) overlaps them: move the region",
                r.start, r.end
            ));
        }
    }
    if s == Scenario::Bypass && i.legacy_bypass {
        return Some(
            "needs VIRTIO_IOMMU_F_BYPASS_CONFIG, which \"legacy_bypass\": true turns off".into(),
        );
    }
    if let Some((format, pasid_bits, domain)) = nested_needs(s) {
        let Some(n) = &i.nested else {
            return Some(format!(
                "needs the nested extension: add iommu.nested with \"{}\" in its formats",
                format.as_str()
            ));
        };
        if !n.formats.contains(&format) {
            return Some(format!(
                "needs \"{}\" in iommu.nested.formats",
                format.as_str()
            ));
        }
        if n.pasid_bits < pasid_bits {
            return Some(format!(
                "needs iommu.nested.pasid_bits of at least {pasid_bits}, got {}",
                n.pasid_bits
            ));
        }
        if !(i.domain_range.start..=i.domain_range.end).contains(&domain) {
            return Some(format!("needs domain {domain} inside iommu.domain_range"));
        }
    }
    None
}

/// The scenarios to run for a config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// To run, in order.
    pub run: Vec<Scenario>,
    /// Left out (the config named none and cannot run these), with why.
    pub skipped: Vec<(Scenario, String)>,
}

/// What to run for `cfg`: the scenarios it names (each must be
/// runnable; the error names `scenarios[i]`), or every runnable scenario,
/// with the reasons the others are skipped.
pub fn plan(cfg: &VmConfig) -> Result<Plan, VmError> {
    match &cfg.scenarios {
        Some(list) => {
            for (idx, &s) in list.iter().enumerate() {
                if let Some(why) = unmet_requirement(cfg, s) {
                    return Err(VmError::Config {
                        path: format!("scenarios[{idx}]"),
                        rule: format!("scenario \"{}\" {why}", s.as_str()),
                    });
                }
            }
            Ok(Plan {
                run: list.clone(),
                skipped: Vec::new(),
            })
        }
        None => {
            let mut run = Vec::new();
            let mut skipped = Vec::new();
            for s in Scenario::ALL {
                match unmet_requirement(cfg, s) {
                    None => run.push(s),
                    Some(why) => skipped.push((s, why)),
                }
            }
            Ok(Plan { run, skipped })
        }
    }
}

/// One check the VMM made on what it observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub what: String,
    /// Whether it held.
    pub ok: bool,
}

/// A scenario's run: the VM's outcome and the VMM's checks on it.
#[derive(Debug)]
pub struct ScenarioRun {
    /// The scenario.
    pub scenario: Scenario,
    /// What the VM did.
    pub outcome: Result<RunOutcome, VmError>,
    /// How long building the VM took (KVM set-up, memory, program load).
    pub build_time: Duration,
    /// The VMM's checks (empty if the VM failed).
    pub checks: Vec<Check>,
}

impl ScenarioRun {
    /// Whether the guest passed and every VMM check held.
    pub fn passed(&self) -> bool {
        self.outcome.is_ok() && self.checks.iter().all(|c| c.ok)
    }

    /// The guest's serial log, whatever the outcome.
    pub fn serial(&self) -> &str {
        match &self.outcome {
            Ok(o) => &o.serial,
            Err(e) => e.serial().unwrap_or(""),
        }
    }

    /// The guest's measurement of TSC cycles per MAP+UNMAP round trip.
    pub fn cycles_per_map_unmap(&self) -> Option<u64> {
        serial_metric(self.serial(), "cycles_per_map_unmap")
    }

    /// The guest's measurement of TSC cycles per INVALIDATE (request,
    /// notification, backend call, status).
    pub fn cycles_per_invalidate(&self) -> Option<u64> {
        serial_metric(self.serial(), "cycles_per_invalidate")
    }
}

/// The number after `key=` on the guest's serial log, if it printed one.
pub fn serial_metric(serial: &str, key: &str) -> Option<u64> {
    let at = serial.find(&format!("{key}="))? + key.len() + 1;
    let digits: String = serial[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Boots a VM for `s` and checks what it did.
pub fn run_scenario(cfg: &VmConfig, s: Scenario, opts: &RunOptions) -> ScenarioRun {
    let vm_opts = VmOptions {
        scenario: scenario_id(s),
        bench_iterations: opts.bench_iterations,
        fast_paths: opts.fast_paths,
        hotplug: None,
    };
    let start = Instant::now();
    let vm = Vm::new(cfg, &vm_opts);
    let build_time = start.elapsed();
    let outcome = vm.and_then(|vm| vm.run(opts.timeout));
    let checks = match &outcome {
        Ok(o) => host_checks(cfg, s, opts, o),
        Err(_) => Vec::new(),
    };
    ScenarioRun {
        scenario: s,
        outcome,
        build_time,
        checks,
    }
}

/// The endpoint the hot-plug run plugs in (none of the shipped configs
/// uses it).
pub const HOTPLUG_ENDPOINT: u32 = 0x40;

/// A snapshot run: scenario 7 booted, paused at its sync point,
/// snapshotted, restored into a new VM and run to the end there.
#[derive(Debug)]
pub struct SnapshotRun {
    /// The restored VM's run (its counters start at the restore), or why
    /// the run, the snapshot or the restore failed.
    pub outcome: Result<RunOutcome, VmError>,
    /// The snapshot's size, part by part.
    pub size: Option<SnapshotSize>,
    /// From the vCPU's stop at the sync point to the snapshot in hand.
    pub snapshot_time: Duration,
    /// Building the new VM and restoring the snapshot into it.
    pub restore_time: Duration,
    /// From the vCPU's stop at the sync point to the new VM about to run.
    pub pause_to_resume: Duration,
    /// The VMM's checks (empty if the VM failed).
    pub checks: Vec<Check>,
}

impl SnapshotRun {
    /// Whether the guest passed and every VMM check held.
    pub fn passed(&self) -> bool {
        self.outcome.is_ok() && self.checks.iter().all(|c| c.ok)
    }
}

/// Boots scenario 7, pauses it at `abi::SNAPSHOT_SYNC`, snapshots the VM,
/// drops it, restores the snapshot into a new VM built from `cfg`, runs
/// that to the end and checks what it did.
pub fn run_snapshot(cfg: &VmConfig, opts: &RunOptions) -> SnapshotRun {
    let vm_opts = VmOptions {
        scenario: abi::SCENARIO_SNAPSHOT,
        bench_iterations: 0,
        fast_paths: opts.fast_paths,
        hotplug: None,
    };
    let mut run = SnapshotRun {
        outcome: Err(VmError::Snapshot(SnapshotError::NotPaused)),
        size: None,
        snapshot_time: Duration::ZERO,
        restore_time: Duration::ZERO,
        pause_to_resume: Duration::ZERO,
        checks: Vec::new(),
    };
    let paused = Vm::new(cfg, &vm_opts).and_then(|mut vm| {
        match vm.run_until_pause(opts.timeout, abi::SNAPSHOT_SYNC)? {
            RunEnd::Paused(_) => Ok(Some(vm)),
            RunEnd::Done(o) => {
                run.checks.push(Check {
                    what: format!("the guest paused at sync point {}", abi::SNAPSHOT_SYNC),
                    ok: false,
                });
                run.outcome = Ok(*o);
                Ok(None)
            }
        }
    });
    let mut vm = match paused {
        Ok(Some(vm)) => vm,
        Ok(None) => return run,
        Err(e) => {
            run.outcome = Err(e);
            return run;
        }
    };
    let stopped = Instant::now();
    let snap = match vm.snapshot() {
        Ok(s) => s,
        Err(e) => {
            run.outcome = Err(e.into());
            return run;
        }
    };
    run.snapshot_time = stopped.elapsed();
    let start = Instant::now();
    let restored = Vm::restore(cfg, &vm_opts, &snap);
    run.restore_time = start.elapsed();
    run.pause_to_resume = stopped.elapsed();
    // The old VM is gone before the new one runs: nothing is shared.
    drop(vm);
    run.size = Some(snap.size());
    drop(snap);
    run.outcome = restored.and_then(|vm| vm.run(opts.timeout));
    if let Ok(o) = &run.outcome {
        run.checks = snapshot_checks(cfg, opts, o);
    }
    run
}

/// The VMM's view of scenario 7 after the restore: the guest's requests
/// there (one MAP, two UNMAPs, a DETACH, nothing re-attached or
/// re-activated), its DMA through the restored mappings, the two faults
/// on the restored event queue.
fn snapshot_checks(cfg: &VmConfig, opts: &RunOptions, o: &RunOutcome) -> Vec<Check> {
    let mut c = Checks::default();
    c.check(
        o.result == abi::RESULT_PASS,
        format!("guest result code {} (0 = pass)", o.result),
    );
    c.check(
        o.serial.contains("snapshot: PASS"),
        "guest printed \"snapshot: PASS\"",
    );
    c.check(
        o.restores == 1,
        format!("the VM was restored once, got {}", o.restores),
    );
    c.check(o.faults_dropped == 0, "no fault record dropped");
    path_checks(&mut c, opts, o);
    let req = |t: u8| o.device.requests[usize::from(t)];
    c.check(
        req(VIRTIO_IOMMU_T_ATTACH) == 0
            && req(VIRTIO_IOMMU_T_MAP) == 1
            && req(VIRTIO_IOMMU_T_UNMAP) == 2
            && req(VIRTIO_IOMMU_T_DETACH) == 1,
        format!(
            "after the restore: 0 ATTACH, 1 MAP, 2 UNMAP, 1 DETACH, got {}, {}, {}, {}",
            req(VIRTIO_IOMMU_T_ATTACH),
            req(VIRTIO_IOMMU_T_MAP),
            req(VIRTIO_IOMMU_T_UNMAP),
            req(VIRTIO_IOMMU_T_DETACH)
        ),
    );
    c.check(
        o.transport.activations == 0 && o.transport.needs_reset == 0 && o.transport.ignored == 0,
        format!(
            "the restored transport ran on: {} activations, {} device errors, {} ignored",
            o.transport.activations, o.transport.needs_reset, o.transport.ignored
        ),
    );
    c.check(
        o.device.faults_delivered == 2,
        format!(
            "2 fault records on the restored event queue, got {}",
            o.device.faults_delivered
        ),
    );
    let primary = dma_slots(cfg)
        .ok()
        .and_then(|v| v.iter().position(|d| d.behind_iommu));
    let dma = primary
        .and_then(|i| o.dma.get(i))
        .cloned()
        .unwrap_or_default();
    c.check(
        dma.ok == 2 && dma.faults == 2,
        format!(
            "2 DMAs through restored or new mappings, 2 refused, got {} and {}",
            dma.ok, dma.faults
        ),
    );
    c.check(
        o.final_mappings == 0 && o.final_domains == 0,
        "DETACH ended the restored domain",
    );
    c.0
}

/// The hot-plug run: scenario 8 with [`HOTPLUG_ENDPOINT`] plugged in and
/// out at its sync points.
pub fn run_hotplug(cfg: &VmConfig, opts: &RunOptions) -> (Result<RunOutcome, VmError>, Vec<Check>) {
    let vm_opts = VmOptions {
        scenario: abi::SCENARIO_HOTPLUG,
        bench_iterations: 0,
        fast_paths: opts.fast_paths,
        hotplug: Some(HotplugPlan {
            endpoint: HOTPLUG_ENDPOINT,
            plug_at: abi::HOTPLUG_PLUG_SYNC,
            unplug_at: abi::HOTPLUG_UNPLUG_SYNC,
        }),
    };
    let outcome = Vm::new(cfg, &vm_opts).and_then(|vm| vm.run(opts.timeout));
    let checks = match &outcome {
        Ok(o) => hotplug_checks(cfg, opts, o),
        Err(_) => Vec::new(),
    };
    (outcome, checks)
}

/// The VMM's view of scenario 8.
fn hotplug_checks(cfg: &VmConfig, opts: &RunOptions, o: &RunOutcome) -> Vec<Check> {
    let mut c = Checks::default();
    c.check(
        o.result == abi::RESULT_PASS,
        format!("guest result code {} (0 = pass)", o.result),
    );
    c.check(
        o.serial.contains("hotplug: PASS"),
        "guest printed \"hotplug: PASS\"",
    );
    c.check(o.faults_dropped == 0, "no fault record dropped");
    path_checks(&mut c, opts, o);
    let h = o.hotplug;
    c.check(
        (h.plugged, h.unplugged, h.ejected, h.bad_ejects) == (1, 1, 1, 0),
        format!(
            "one engine plugged, unplugged and ejected, got {}, {}, {} ({} bad ejects)",
            h.plugged, h.unplugged, h.ejected, h.bad_ejects
        ),
    );
    let cold = dma_slots(cfg).map_or(0, |v| v.len());
    let plugged = o.dma.get(cold).cloned().unwrap_or_default();
    c.check(
        plugged.ok == 1 && plugged.faults == 1,
        format!(
            "the plugged engine: 1 DMA done, 1 refused after the unplug, got {} and {}",
            plugged.ok, plugged.faults
        ),
    );
    let req = |t: u8| o.device.requests[usize::from(t)];
    let pairs = 2 * abi::HOTPLUG_BATCH_PAIRS as u64;
    c.check(
        req(VIRTIO_IOMMU_T_MAP) == 3 + pairs && req(VIRTIO_IOMMU_T_UNMAP) == 2 + pairs,
        format!(
            "{} MAPs and {} UNMAPs (the batches included), got {} and {}",
            3 + pairs,
            2 + pairs,
            req(VIRTIO_IOMMU_T_MAP),
            req(VIRTIO_IOMMU_T_UNMAP)
        ),
    );
    c.check(
        o.device.statuses[Status::NoEnt as usize] == 4,
        format!(
            "4 requests naming the unplugged endpoint or its domain were NOENT, got {}",
            o.device.statuses[Status::NoEnt as usize]
        ),
    );
    c.check(o.device.faults_delivered == 0, "no fault record delivered");
    c.check(
        o.final_mappings == 0 && o.final_domains == 0,
        "no domain left (the plugged engine's ended with it)",
    );
    c.0
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        self.0.push(Check {
            what: what.into(),
            ok,
        });
    }
}

/// What the VMM expects to have seen for each scenario, beyond the guest's
/// PASS.
fn host_checks(cfg: &VmConfig, s: Scenario, opts: &RunOptions, o: &RunOutcome) -> Vec<Check> {
    let mut c = Checks::default();
    c.check(
        o.result == abi::RESULT_PASS,
        format!("guest result code {} (0 = pass)", o.result),
    );
    c.check(
        o.serial.contains(&format!("{}: PASS", s.as_str())),
        format!("guest printed \"{}: PASS\"", s.as_str()),
    );
    c.check(o.faults_dropped == 0, "no fault record dropped");
    path_checks(&mut c, opts, o);
    let primary = dma_slots(cfg)
        .ok()
        .and_then(|v| v.iter().position(|d| d.behind_iommu));
    let dma = primary
        .and_then(|i| o.dma.get(i))
        .cloned()
        .unwrap_or_default();
    let req = |t: u8| o.device.requests[usize::from(t)];
    let n = opts.bench_iterations;
    let bypass_initial = cfg.iommu.bypass && !cfg.iommu.legacy_bypass;
    let map_faults = if bypass_initial { 2 } else { 3 };
    match s {
        Scenario::Map => {
            map_checks(&mut c, o, n);
            c.check(
                o.device.faults_delivered == map_faults,
                format!(
                    "{map_faults} fault records delivered on the eventq, got {}",
                    o.device.faults_delivered
                ),
            );
            c.check(
                dma.faults == map_faults,
                format!("{map_faults} DMAs refused, got {}", dma.faults),
            );
            c.check(
                o.transport.needs_reset == 0 && o.transport.ignored == 0,
                "the driver never upset the transport",
            );
        }
        Scenario::Bypass => {
            c.check(
                req(VIRTIO_IOMMU_T_ATTACH) == 2 && req(VIRTIO_IOMMU_T_DETACH) == 1,
                "two ATTACHes (one refused) and a DETACH reached the device",
            );
            c.check(
                o.device.faults_delivered == 2,
                format!(
                    "2 DOMAIN fault records delivered, got {}",
                    o.device.faults_delivered
                ),
            );
            c.check(
                dma.faults == 3 && dma.ok == 3,
                format!(
                    "3 DMAs done, 3 refused (two by the IOMMU, one by the hole), got {} and {}",
                    dma.ok, dma.faults
                ),
            );
            c.check(o.final_domains == 0, "no domain left");
            c.check(o.peak_mappings == 0, "no mapping ever made");
        }
        Scenario::NestedVtd => nested_vtd_checks(&mut c, o, n),
        Scenario::NestedSmmuV3 => nested_smmuv3_checks(&mut c, o),
        Scenario::PageRequest => page_request_checks(&mut c, o),
        Scenario::Hostile => hostile_checks(&mut c, cfg, o, n, map_faults, &dma),
    }
    c.0
}

/// The VMM's view of scenario 6: the spec's statuses for the hostile
/// requests, chains returned unwritten, exactly the four device errors the
/// broken queues and DRIVER_OK cause (nothing the nested part does may add
/// one: its errors are request-level), refused DMAs — then, when the config
/// enables the nested extension, what its part adds ([`HostileMin`]), and
/// scenarios 3 and 1 run after it in the same VM.
fn hostile_checks(
    c: &mut Checks,
    cfg: &VmConfig,
    o: &RunOutcome,
    n: u64,
    map_faults: u64,
    dma: &DmaStats,
) {
    map_checks(c, o, n);
    let st = |s: Status| o.device.statuses[s as usize];
    c.check(
        o.device.unknown_type >= 2,
        format!(
            "unknown types returned unwritten: {}",
            o.device.unknown_type
        ),
    );
    c.check(
        o.device.no_tail >= 5,
        format!(
            "chains without a tail returned unwritten: {}",
            o.device.no_tail
        ),
    );
    c.check(
        o.transport.needs_reset == 4 && o.transport.features_refused == 2,
        format!(
            "4 device errors (DEVICE_NEEDS_RESET) and 2 refused FEATURES_OK, got {} and {}",
            o.transport.needs_reset, o.transport.features_refused
        ),
    );
    c.check(
        o.transport.ignored >= 6,
        format!("misused registers ignored: {}", o.transport.ignored),
    );
    c.check(
        st(Status::DevErr) == 0 && st(Status::NoMem) == 0,
        format!(
            "no DEVERR or NOMEM answered, got {} and {}",
            st(Status::DevErr),
            st(Status::NoMem)
        ),
    );
    let got_statuses = [
        st(Status::IoErr),
        st(Status::Unsupp),
        st(Status::Inval),
        st(Status::Range),
        st(Status::NoEnt),
    ];
    let spec = HostileMin::spec_part(cfg);
    // Without the extension: the spec's part, then scenario 1.
    let Some(nested) = &cfg.iommu.nested else {
        c.check(
            got_statuses.iter().zip(spec.statuses).all(|(g, w)| *g >= w),
            format!(
                "hostile requests answered IOERR, UNSUPP, INVAL, RANGE, NOENT {got_statuses:?}, at least {:?}",
                spec.statuses
            ),
        );
        c.check(
            dma.bad_args == 5 && dma.pasid_tagged == 1,
            format!(
                "5 DMAs refused for their arguments (one PASID-tagged), got {} ({})",
                dma.bad_args, dma.pasid_tagged
            ),
        );
        c.check(
            o.device.faults_delivered == map_faults,
            format!(
                "{map_faults} fault records delivered, got {}",
                o.device.faults_delivered
            ),
        );
        return;
    };

    // With it: at least what each part the config allows adds to the
    // spec's part, status by status and request type by type.
    let has = |f: TableFormat| nested.formats.contains(&f);
    let vtd = has(TableFormat::IntelVtd);
    let replay = unmet_requirement(cfg, Scenario::NestedVtd).is_none();
    let mut want = spec;
    for (on, part) in [
        (vtd, HostileMin::INTEL_VTD),
        (has(TableFormat::X86_64), HostileMin::X86_64),
        (has(TableFormat::ArmSmmuV3), HostileMin::ARM_SMMU_V3),
        (has(TableFormat::ArmLpae), HostileMin::ARM_LPAE),
        // The engines of this VMM can all wait for a page, so page
        // requests come with the extension.
        (vtd, HostileMin::PAGE_RESP),
        (replay, HostileMin::nested_vtd(n)),
    ] {
        if on {
            want = want.plus(part);
        }
    }
    c.check(
        got_statuses.iter().zip(want.statuses).all(|(g, w)| *g >= w),
        format!(
            "hostile requests answered IOERR, UNSUPP, INVAL, RANGE, NOENT {got_statuses:?}, at least {:?}",
            want.statuses
        ),
    );
    let req = |t: u8| o.device.requests[usize::from(t)];
    let got_requests = [
        req(VIRTIO_IOMMU_T_ATTACH_TABLE),
        req(VIRTIO_IOMMU_T_INVALIDATE),
        req(VIRTIO_IOMMU_T_PAGE_RESP),
    ];
    c.check(
        got_requests.iter().zip(want.requests).all(|(g, w)| *g >= w),
        format!(
            "ATTACH_TABLE, INVALIDATE, PAGE_RESP requests {got_requests:?}, at least {:?}",
            want.requests
        ),
    );
    c.check(
        o.device.faults_delivered >= map_faults + want.records,
        format!(
            "at least {} fault records delivered, got {}",
            map_faults + want.records,
            o.device.faults_delivered
        ),
    );
    c.check(
        dma.faults >= map_faults + want.dma_faults,
        format!(
            "at least {} DMAs ended with a fault status, got {}",
            map_faults + want.dma_faults,
            dma.faults
        ),
    );
    let bad_args = 5 + u64::from(replay);
    c.check(
        dma.bad_args == bad_args,
        format!(
            "{bad_args} DMAs refused for their arguments, got {}",
            dma.bad_args
        ),
    );
    let page_requests = if vtd { HostileMin::PAGE_REQUESTS } else { 0 };
    c.check(
        dma.page_waits == page_requests && dma.retries == 0,
        format!(
            "{page_requests} DMAs waited for a page and none was retried, got {} and {}",
            dma.page_waits, dma.retries
        ),
    );
    let Some(e) = o.emulated else {
        c.check(false, "the VM has the software nested IOMMU");
        return;
    };
    // Every record of the nested part came from the software IOMMU; the
    // rest are scenario 1's.
    c.check(
        o.device.faults_delivered == map_faults + e.faults + e.page_requests,
        format!(
            "fault records delivered = {map_faults} of MAP mode + {} faults and {} page requests of the software IOMMU, got {}",
            e.faults, e.page_requests, o.device.faults_delivered
        ),
    );
    c.check(
        e.page_requests == page_requests,
        format!(
            "{page_requests} page requests sent, got {}",
            e.page_requests
        ),
    );
    c.check(
        e.invalidate_calls == o.router.invalidate_calls
            && e.invalidations == o.router.invalidations_sent
            && o.router.rollbacks == 0,
        format!(
            "the software IOMMU got every invalidate call the router made ({} and {}, router {} and {}), no rollback ({})",
            e.invalidate_calls,
            e.invalidations,
            o.router.invalidate_calls,
            o.router.invalidations_sent,
            o.router.rollbacks
        ),
    );
}

/// The least one part of the hostile scenario adds to the device's and the
/// DMA engine's counters. The guest runs a nested part only for a format
/// its endpoint advertises, and skips a few cases of a part that need a
/// wide PASID, a second endpoint, bypass or a `domain_range` that leaves
/// room below or above it; those come on top.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct HostileMin {
    /// Statuses IOERR, UNSUPP, INVAL, RANGE, NOENT.
    statuses: [u64; 5],
    /// ATTACH_TABLE, INVALIDATE and PAGE_RESP requests decoded (a
    /// truncated one is not: it gets IOERR before it has a type).
    requests: [u64; 3],
    /// Fault records and page requests delivered on the event queue.
    records: u64,
    /// DMAs that ended with a fault status.
    dma_faults: u64,
}

impl HostileMin {
    /// The spec's part (the scenario without the extension): 8 IOERR, 8
    /// INVAL, 8 NOENT, and 3 RANGE plus one for each of ATTACH outside
    /// `domain_range`, MAP over the MSI region and MAP past the end of
    /// `input_range`, which `cfg` may leave no room for.
    fn spec_part(cfg: &VmConfig) -> HostileMin {
        let i = &cfg.iommu;
        let outside_domains = i.domain_range.start > 0 || i.domain_range.end < u32::MAX;
        let msi = i
            .reserved_regions
            .iter()
            .any(|r| r.kind == ReservedKind::Msi);
        let below_input_end = i.input_range.end < u64::MAX - 2 * 4096;
        let range = 3 + [outside_domains, msi, below_input_end]
            .iter()
            .map(|&b| u64::from(b))
            .sum::<u64>();
        HostileMin {
            statuses: [8, 0, 8, range, 8],
            requests: [0; 3],
            records: 0,
            dma_faults: 0,
        }
    }

    /// intel-vtd: 22 ATTACH_TABLEs (UNSUPP formats, INVAL fields, RANGE
    /// pointers, NOENT endpoints, onto a MAP domain, 4 garbage binds), 53
    /// INVALIDATEs (31 checked one by one, 4 with reserved bytes, one of
    /// 2^40 pages, a batch of 16), MAP and UNMAP in a table domain, and 8
    /// DMAs through garbage directories.
    const INTEL_VTD: HostileMin = HostileMin {
        statuses: [4, 3, 43, 7, 6],
        requests: [22, 53, 0],
        records: 8,
        dma_faults: 8,
    };
    /// x86-64: 8 refused ATTACH_TABLEs and 4 garbage binds, 2
    /// INVALIDATEs, 4 DMAs with fault records and 2 at leaves outside RAM
    /// (a fault status, no record).
    const X86_64: HostileMin = HostileMin {
        statuses: [0, 0, 6, 3, 0],
        requests: [12, 2, 0],
        records: 4,
        dma_faults: 6,
    };
    /// arm-smmuv3: 10 refused ATTACH_TABLEs and 3 garbage binds, an
    /// INVALIDATE of an SSID beyond s1cdmax, 8 DMAs.
    const ARM_SMMU_V3: HostileMin = HostileMin {
        statuses: [0, 0, 7, 4, 0],
        requests: [13, 1, 0],
        records: 8,
        dma_faults: 8,
    };
    /// arm-lpae: 3 refused ATTACH_TABLEs and 3 garbage binds, 3 DMAs.
    const ARM_LPAE: HostileMin = HostileMin {
        statuses: [0, 0, 2, 1, 0],
        requests: [6, 0, 0],
        records: 3,
        dma_faults: 3,
    };
    /// Page requests the PAGE_RESP part makes the engine send.
    const PAGE_REQUESTS: u64 = 2;
    /// PAGE_RESP (intel-vtd tables): 17 PAGE_RESPs (and a truncated one),
    /// 2 page requests, one answered FAILURE, one failed by a reset.
    const PAGE_RESP: HostileMin = HostileMin {
        statuses: [1, 0, 7, 0, 9],
        requests: [1, 0, 17],
        records: Self::PAGE_REQUESTS,
        dma_faults: 2,
    };

    /// Scenario 3 run after the nested part, with `n` benchmark
    /// INVALIDATEs.
    const fn nested_vtd(n: u64) -> HostileMin {
        HostileMin {
            statuses: [0, 0, 0, 1, 0],
            requests: [2, 6 + n, 0],
            records: 3,
            dma_faults: 3,
        }
    }

    /// Both parts.
    fn plus(self, o: HostileMin) -> HostileMin {
        let mut r = self;
        for (a, b) in r.statuses.iter_mut().zip(o.statuses) {
            *a += b;
        }
        for (a, b) in r.requests.iter_mut().zip(o.requests) {
            *a += b;
        }
        r.records += o.records;
        r.dma_faults += o.dma_faults;
        r
    }
}

/// Whatever the scenario: the paths that ran are the ones allowed, and
/// each ran as it should — the worker served the notifications and
/// stopped when told, interrupts were raised on the line and reached the
/// in-kernel irqchip; without a line none were raised.
fn path_checks(c: &mut Checks, opts: &RunOptions, o: &RunOutcome) {
    let p = &o.paths;
    c.check(
        opts.fast_paths.ioeventfd || p.notify != NotifyPath::Ioeventfd,
        format!("notify path {} was allowed", p.notify),
    );
    c.check(
        opts.fast_paths.irqfd || !matches!(p.interrupts, InterruptPath::Irqfd { .. }),
        format!("interrupt path {} was allowed", p.interrupts),
    );
    match (&p.notify, &o.worker) {
        (NotifyPath::Ioeventfd, Some(w)) => {
            c.check(
                w.stopped && w.error.is_none(),
                format!("the device worker stopped when told (error: {:?})", w.error),
            );
            c.check(
                w.kicks[0] > 0,
                format!(
                    "the device worker served the request queue ({} kicks)",
                    w.kicks[0]
                ),
            );
        }
        (NotifyPath::Ioeventfd, None) => c.check(false, "the ioeventfd path had a worker"),
        // A worker may have run before a registration failed.
        (NotifyPath::MmioExit { .. }, _) => {}
    }
    c.check(
        o.transport.interrupt_errors == 0,
        format!(
            "every interrupt raised ({} errors)",
            o.transport.interrupt_errors
        ),
    );
    match p.interrupts {
        InterruptPath::Irqfd { .. } => {
            c.check(
                o.transport.interrupts > 0,
                format!(
                    "interrupts raised through the irqfd: {}",
                    o.transport.interrupts
                ),
            );
            c.check(
                o.line_latched != Some(false),
                "the in-kernel irqchip latched the line",
            );
        }
        InterruptPath::Polled { .. } => c.check(
            o.transport.interrupts == 0,
            format!("no line, no interrupt raised ({})", o.transport.interrupts),
        ),
    }
}

/// What every nested scenario leaves behind: requests of the extension
/// reached the device, the software IOMMU saw what the router sent it,
/// nothing dropped, no domain left.
fn nested_common_checks(c: &mut Checks, o: &RunOutcome, attach_tables: u64) {
    let req = |t: u8| o.device.requests[usize::from(t)];
    c.check(
        req(VIRTIO_IOMMU_T_ATTACH_TABLE) == attach_tables,
        format!(
            "{attach_tables} ATTACH_TABLE requests, got {}",
            req(VIRTIO_IOMMU_T_ATTACH_TABLE)
        ),
    );
    let Some(e) = o.emulated else {
        c.check(false, "the VM has the software nested IOMMU");
        return;
    };
    c.check(
        e.invalidate_calls == o.router.invalidate_calls
            && e.invalidations == o.router.invalidations_sent,
        format!(
            "the software IOMMU got every invalidate call the router made ({} calls, {} invalidations; router {} and {})",
            e.invalidate_calls,
            e.invalidations,
            o.router.invalidate_calls,
            o.router.invalidations_sent
        ),
    );
    c.check(o.router.rollbacks == 0, "no backend call rolled back");
    c.check(o.final_domains == 0, "DETACH ended the table domain");
    c.check(
        e.walks > 0,
        format!("the guest's tables were walked ({} walks)", e.walks),
    );
}

/// The VMM's view of scenario 3 (`n` benchmark INVALIDATEs).
fn nested_vtd_checks(c: &mut Checks, o: &RunOutcome, n: u64) {
    nested_common_checks(c, o, 2);
    let req = |t: u8| o.device.requests[usize::from(t)];
    let batch = abi::NESTED_VTD_BATCH as u64;
    // One VA, one PASID, the batch, the benchmark.
    let invalidates = 2 + batch + n;
    c.check(
        req(VIRTIO_IOMMU_T_INVALIDATE) == invalidates && o.router.invalidations == invalidates,
        format!(
            "{invalidates} INVALIDATEs received, got {} requests and {} at the router",
            req(VIRTIO_IOMMU_T_INVALIDATE),
            o.router.invalidations
        ),
    );
    // One backend call per notification: the batch is one call.
    let calls = 3 + n;
    c.check(
        o.router.invalidate_calls == calls,
        format!(
            "{calls} backend invalidate calls (the batch of {batch} in one), got {}",
            o.router.invalidate_calls
        ),
    );
    c.check(
        o.router.invalidations_sent < o.router.invalidations,
        format!(
            "the batch of adjacent pages was coalesced ({} sent for {} received)",
            o.router.invalidations_sent, o.router.invalidations
        ),
    );
    c.check(
        o.device.statuses[Status::Range as usize] == 1,
        "the directory outside RAM was RANGE",
    );
    c.check(
        o.device.faults_delivered == 3,
        format!(
            "3 fault records delivered (read-only page, no RID_PASID entry, unmapped IOVA), got {}",
            o.device.faults_delivered
        ),
    );
    if let Some(e) = o.emulated {
        c.check(
            e.faults == 3 && e.page_requests == 0,
            format!(
                "3 faults, no page request, got {} and {}",
                e.faults, e.page_requests
            ),
        );
        c.check(
            e.iotlb_hits > 0 && e.context_reads >= 2,
            format!(
                "the IOTLB answered ({} hits) and the PASID entry was read again after its invalidation ({} reads)",
                e.iotlb_hits, e.context_reads
            ),
        );
    }
    let dma = &o.dma.first().cloned().unwrap_or_default();
    c.check(
        dma.ok == 7 && dma.faults == 3 && dma.bad_args == 1,
        format!(
            "7 DMAs done, 3 faulted, 1 without a translator, got {}, {} and {}",
            dma.ok, dma.faults, dma.bad_args
        ),
    );
    if n > 0 {
        c.check(
            serial_metric(&o.serial, "cycles_per_invalidate").is_some(),
            "guest reported cycles per INVALIDATE",
        );
    }
}

/// The VMM's view of scenario 4.
fn nested_smmuv3_checks(c: &mut Checks, o: &RunOutcome) {
    nested_common_checks(c, o, 1);
    let req = |t: u8| o.device.requests[usize::from(t)];
    c.check(
        req(VIRTIO_IOMMU_T_INVALIDATE) == 2
            && o.router.invalidations == 2
            && o.router.invalidate_calls == 2,
        format!(
            "2 INVALIDATEs, 2 backend calls, got {} requests, {} received, {} calls",
            req(VIRTIO_IOMMU_T_INVALIDATE),
            o.router.invalidations,
            o.router.invalidate_calls
        ),
    );
    c.check(
        o.device.faults_delivered == 2,
        format!(
            "2 fault records delivered (read-only page, no SubstreamID), got {}",
            o.device.faults_delivered
        ),
    );
    let dma = &o.dma.first().cloned().unwrap_or_default();
    c.check(
        dma.ok == 6 && dma.faults == 2,
        format!("6 DMAs done, 2 faulted, got {} and {}", dma.ok, dma.faults),
    );
}

/// The VMM's view of scenario 5.
fn page_request_checks(c: &mut Checks, o: &RunOutcome) {
    nested_common_checks(c, o, 1);
    let req = |t: u8| o.device.requests[usize::from(t)];
    c.check(
        req(VIRTIO_IOMMU_T_PAGE_RESP) == 5,
        format!(
            "5 PAGE_RESPs (2 SUCCESS, 1 FAILURE, 2 for no pending group), got {}",
            req(VIRTIO_IOMMU_T_PAGE_RESP)
        ),
    );
    c.check(
        o.device.statuses[Status::NoEnt as usize] == 2,
        "the 2 PAGE_RESPs for no pending group were NOENT",
    );
    c.check(
        o.device.faults_delivered == 3,
        format!(
            "3 page requests delivered on the eventq, got {}",
            o.device.faults_delivered
        ),
    );
    if let Some(e) = o.emulated {
        c.check(
            e.page_requests == 3 && e.faults == 0,
            format!(
                "3 page requests, no unrecoverable fault, got {} and {}",
                e.page_requests, e.faults
            ),
        );
    }
    let dma = &o.dma.first().cloned().unwrap_or_default();
    c.check(
        dma.page_waits == 3 && dma.retries == 2 && dma.ok == 2 && dma.faults == 1,
        format!(
            "3 waits for a page, 2 retries, 2 DMAs done, 1 failed, got {}, {}, {} and {}",
            dma.page_waits, dma.retries, dma.ok, dma.faults
        ),
    );
}

/// The VMM's view of scenario 1.
fn map_checks(c: &mut Checks, o: &RunOutcome, n: u64) {
    let req = |t: u8| o.device.requests[usize::from(t)];
    c.check(
        req(VIRTIO_IOMMU_T_PROBE) >= 2 && req(VIRTIO_IOMMU_T_ATTACH) >= 1,
        "PROBE and ATTACH reached the device",
    );
    c.check(
        req(VIRTIO_IOMMU_T_MAP) >= 4 + n && req(VIRTIO_IOMMU_T_UNMAP) >= 2 + n,
        format!(
            "MAP {} and UNMAP {} requests (4 + {n} and 2 + {n} expected at least)",
            req(VIRTIO_IOMMU_T_MAP),
            req(VIRTIO_IOMMU_T_UNMAP)
        ),
    );
    c.check(req(VIRTIO_IOMMU_T_DETACH) >= 1, "DETACH reached the device");
    c.check(
        o.peak_mappings >= 4,
        format!("4 mappings alive at once, saw {}", o.peak_mappings),
    );
    c.check(
        o.final_mappings == 0 && o.final_domains == 0,
        "DETACH ended the domain and its mappings",
    );
    c.check(
        o.device.unmapped >= 3 + n,
        format!("UNMAP removed {} mappings", o.device.unmapped),
    );
    if n > 0 {
        c.check(
            serial_metric(&o.serial, "cycles_per_map_unmap").is_some(),
            "guest reported cycles per MAP+UNMAP",
        );
    }
    c.check(o.boot_to_first_request.is_some(), "the guest sent requests");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> VmConfig {
        VmConfig::from_json_str(json).unwrap()
    }

    const DMA: &str =
        r#""devices": [{"id": "d", "kind": "emulated-dma", "endpoint": 8, "iommu": true}]"#;

    const NESTED: &str = r#""nested": {"formats": ["intel-vtd", "arm-smmuv3"], "pasid_bits": 16}"#;

    #[test]
    fn every_scenario_runs_by_default_when_the_config_allows() {
        let p = plan(&cfg(&format!("{{\"iommu\": {{{NESTED}}}, {DMA}}}"))).unwrap();
        assert_eq!(p.run, Scenario::ALL);
        assert!(p.skipped.is_empty());
    }

    #[test]
    fn without_the_nested_extension_the_nested_scenarios_are_skipped() {
        let p = plan(&cfg(&format!("{{{DMA}}}"))).unwrap();
        assert_eq!(p.run, [Scenario::Map, Scenario::Bypass, Scenario::Hostile]);
        let skipped: Vec<Scenario> = p.skipped.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            skipped,
            [
                Scenario::NestedVtd,
                Scenario::NestedSmmuV3,
                Scenario::PageRequest
            ]
        );
        assert!(p.skipped[0].1.contains("iommu.nested"), "{:?}", p.skipped);
    }

    #[test]
    fn without_a_dma_engine_behind_the_iommu_nothing_runs() {
        let p = plan(&cfg("{}")).unwrap();
        assert!(p.run.is_empty());
        assert_eq!(p.skipped.len(), Scenario::ALL.len());
    }

    #[test]
    fn legacy_bypass_skips_the_bypass_scenario() {
        let c = cfg(&format!(
            r#"{{"iommu": {{"legacy_bypass": true, {NESTED}}}, {DMA}}}"#
        ));
        let p = plan(&c).unwrap();
        assert_eq!(
            p.run,
            [
                Scenario::Map,
                Scenario::NestedVtd,
                Scenario::NestedSmmuV3,
                Scenario::PageRequest,
                Scenario::Hostile
            ]
        );
        assert_eq!(p.skipped[0].0, Scenario::Bypass);
    }

    #[test]
    fn a_nested_scenario_needs_its_format_and_pasid_width() {
        let only_vtd = cfg(&format!(
            r#"{{"iommu": {{"nested": {{"formats": ["intel-vtd"], "pasid_bits": 8}}}}, {DMA}}}"#
        ));
        let why = unmet_requirement(&only_vtd, Scenario::NestedSmmuV3).unwrap();
        assert!(
            why.contains("\"arm-smmuv3\" in iommu.nested.formats"),
            "{why}"
        );
        let why = unmet_requirement(&only_vtd, Scenario::NestedVtd).unwrap();
        assert!(why.contains("pasid_bits of at least 13, got 8"), "{why}");
        let c = cfg(&format!(
            r#"{{"iommu": {{{NESTED}}}, {DMA}, "scenarios": ["map", "page-request"]}}"#
        ));
        assert_eq!(
            plan(&c).unwrap().run,
            [Scenario::Map, Scenario::PageRequest]
        );
    }

    #[test]
    fn hostile_spec_part_expects_range_only_where_the_config_leaves_room() {
        let no_room = cfg(&format!(
            r#"{{"iommu": {{"domain_range": {{"start": 0, "end": 4294967295}},
                "input_range": {{"start": "0x0", "end": "0xffffffffffffffff"}}}}, {DMA}}}"#
        ));
        assert_eq!(HostileMin::spec_part(&no_room).statuses, [8, 0, 8, 3, 8]);
        let room = cfg(&format!(
            r#"{{"iommu": {{"input_range": {{"start": "0x0", "end": "0xffffffffffff"}},
                "reserved_regions": [{{"start": "0xfee00000", "end": "0xfeefffff", "kind": "msi"}}]}},
                {DMA}}}"#
        ));
        assert_eq!(HostileMin::spec_part(&room).statuses, [8, 0, 8, 6, 8]);
    }

    #[test]
    fn serial_metric_reads_cycles_per_invalidate() {
        let s = "bench: invalidations=50 cycles_per_invalidate=777\n";
        assert_eq!(serial_metric(s, "cycles_per_invalidate"), Some(777));
    }

    #[test]
    fn a_named_scenario_the_config_cannot_run_is_an_error_naming_its_index() {
        let c = cfg(&format!(
            r#"{{"iommu": {{"legacy_bypass": true}}, {DMA}, "scenarios": ["map", "bypass"]}}"#
        ));
        let e = plan(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("scenarios[1]: scenario \"bypass\" needs"),
            "{e}"
        );
    }

    #[test]
    fn reserved_region_over_the_iova_window_is_reported() {
        let c = cfg(&format!(
            r#"{{"iommu": {{"reserved_regions": [{{"start": "0x10000000", "end": "0x10000fff", "kind": "reserved"}}]}}, {DMA}}}"#
        ));
        let why = unmet_requirement(&c, Scenario::Map).unwrap();
        assert!(
            why.contains("iommu.reserved_regions[0] (0x10000000..=0x10000fff) overlaps"),
            "{why}"
        );
    }

    #[test]
    fn device_reserved_region_over_the_iova_window_is_reported() {
        let c = cfg(
            r#"{"devices": [{"id": "dma0", "kind": "emulated-dma", "endpoint": 1, "iommu": true,
                "reserved_regions": [{"start": "0x1fff0000", "end": "0x1fffffff", "kind": "reserved"}]}]}"#,
        );
        let why = unmet_requirement(&c, Scenario::Map).unwrap();
        assert!(
            why.contains("devices[0].reserved_regions[0] (0x1fff0000..=0x1fffffff) overlaps"),
            "{why}"
        );
    }

    #[test]
    fn serial_metric_reads_the_number_after_the_key() {
        let s = "x\nbench: map_unmap_round_trips=10 cycles_per_map_unmap=12345\n";
        assert_eq!(serial_metric(s, "cycles_per_map_unmap"), Some(12345));
        assert_eq!(serial_metric(s, "map_unmap_round_trips"), Some(10));
        assert_eq!(serial_metric(s, "missing"), None);
    }
}
