//! The KVM test VMM: one vCPU in 64-bit mode at CPL3, guest RAM in two
//! regions around an MMIO gap, the virtio-iommu on a virtio-mmio window,
//! one DMA engine per emulated-dma device of the config, a serial port and
//! a done port.
//!
//! Ports, MMIO registers and the DMA engines are served on the vCPU thread
//! as exits. Queue notifications take the fast path where KVM offers it
//! and the options allow it: ioeventfds served by a device worker thread
//! ([`worker`]), and interrupts through an irqfd into KVM's in-kernel
//! irqchip ([`irq`]); otherwise, per feature, the exit path (a QueueNotify
//! write is served before it returns to the guest) and no line (the
//! device records causes in InterruptStatus). The guests poll their used
//! rings on every path. [`RunOutcome::paths`] says which paths ran.
//!
//! Threads: the vCPU thread, the watchdog (see [`watchdog`]) and, on the
//! ioeventfd path, the device worker. The transport and the virtio-iommu
//! live behind one lock ([`iommu::SharedIommu`]) that the vCPU thread
//! takes for register accesses and for fault delivery after a DMA, and the
//! worker for each queue pass. The DMA engines stay on the vCPU thread. A
//! DMA waiting for a page request is settled on the vCPU thread: right
//! after a QueueNotify exit (the exit path), and before any access to the
//! engine's registers (both paths) — the guest learns that its PAGE_RESP
//! completed from the used ring, which the worker publishes only after
//! the PAGE_RESP is applied, so the engine's next register access finds
//! it answered. The worker is stopped and joined when the run ends,
//! however it ends.
//!
//! With `iommu.nested` in the config the vIOMMU gets a router with the
//! software nested IOMMU ([`vmm_iommu::emulated::EmulatedIommu`]) serving
//! every emulated DMA engine behind it: ATTACH_TABLE binds the guest's
//! tables there, INVALIDATE reaches its caches, and the engines translate
//! through it while bound to a table domain. A DMA that waits for a page
//! request is retried after the request-queue notification that carried
//! the guest's PAGE_RESP. A guest that faults,
//! halts, shuts down, exits unexpectedly or outlives its deadline ends the
//! run with a [`VmError`] carrying its serial log; nothing the guest does
//! panics the VMM.
//!
//! Modules, one job each: [`layout`] (where RAM is), [`x86`] (the start
//! state), [`elf`] (loading the program), [`pio`] (ports), [`virtio_mmio`]
//! (the transport), [`iommu`] (the device behind it), [`worker`]
//! (ioeventfds and the thread serving them), [`irq`] (the interrupt
//! line), [`dma_device`] (the DMA engine's registers), [`watchdog`] (the
//! deadline).

pub mod dma_device;
pub mod elf;
pub mod iommu;
pub mod irq;
pub mod layout;
pub mod pio;
pub mod snapshot;
pub mod virtio_mmio;
pub mod watchdog;
pub mod worker;
pub mod x86;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_iommu::config::ReservedKind;
use vmm_iommu::emulated::EmulatedCounts;
use vmm_iommu::snapshot::DeviceSnapshot;
use vmm_iommu::FaultQueue;
use vmm_iommu::HotplugError;
use vmm_iommu::{DeviceError, DeviceStats, Viommu, VirtioIommu};
use vmm_iommu::{Router, RouterCounts};

use crate::abi::{self, BootInfo};
use crate::config::{DeviceKind, VmConfig};
use crate::dma::{
    DmaEngine, DmaRouter, DmaSpace, Emulated, EndpointRouter, NestedRouter, PhysicalDma,
};
use dma_device::{DmaDevice, DmaStats};
use elf::ElfError;
use iommu::SharedIommu;
use irq::InterruptPath;
use layout::{Layout, LayoutError};
use pio::{PortEvent, Ports};
use snapshot::{SnapshotError, VmSnapshot};
use virtio_mmio::{Lifecycle, MmioInterrupt, TransportStats, VirtioMmio};
use watchdog::Watch;
use worker::{Notifier, NotifyPath, Worker, WorkerStats};
use x86::CpuSetupError;

/// Which fast paths the VMM may take where KVM offers them; each one
/// turned off (or missing) falls back on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastPaths {
    /// Queue notifications through ioeventfds and a device worker thread
    /// (else on the MMIO exit).
    pub ioeventfd: bool,
    /// Interrupts through an irqfd into the in-kernel irqchip (else none:
    /// InterruptStatus only).
    pub irqfd: bool,
}

impl FastPaths {
    /// Both, where KVM offers them (the default).
    pub const ALL: FastPaths = FastPaths {
        ioeventfd: true,
        irqfd: true,
    };
    /// Neither: notifications on the MMIO exit, no interrupt line.
    pub const NONE: FastPaths = FastPaths {
        ioeventfd: false,
        irqfd: false,
    };
}

impl Default for FastPaths {
    fn default() -> Self {
        Self::ALL
    }
}

/// The notification and interrupt paths a run took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportPaths {
    /// How queue notifications reached the device.
    pub notify: NotifyPath,
    /// How the device's interrupts reached the guest.
    pub interrupts: InterruptPath,
}

impl fmt::Display for TransportPaths {
    /// `notify=ioeventfd(worker thread) | mmio-exit; interrupts=irqfd(gsi
    /// N, in-kernel irqchip) | polled`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "notify={}; interrupts={}", self.notify, self.interrupts)
    }
}

/// A DMA engine the VMM plugs in while the guest runs, as a platform
/// would (the guest learns of it on `abi::HOTPLUG_PORT`), and unplugs
/// again. It is translated in MAP mode by the vIOMMU itself, in the first
/// free engine slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotplugPlan {
    /// Its endpoint ID (not one of the config's).
    pub endpoint: u32,
    /// The sync point where it is plugged in.
    pub plug_at: u32,
    /// The sync point where it is unplugged (its endpoint leaves the
    /// vIOMMU; its window stays until the guest ejects the slot).
    pub unplug_at: u32,
}

/// What hot-plug did in a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HotplugStats {
    /// Engines plugged in.
    pub plugged: u64,
    /// Engines unplugged.
    pub unplugged: u64,
    /// Slots the guest ejected.
    pub ejected: u64,
    /// Eject requests for slots that were not announced removed (ignored).
    pub bad_ejects: u64,
    /// Time spent in `Viommu::add_endpoint` and `remove_endpoint`.
    pub vmm_time: Duration,
}

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmOptions {
    /// `abi::SCENARIO_*`, passed to the guest.
    pub scenario: u64,
    /// MAP+UNMAP round trips the guest benchmarks (0 to skip).
    pub bench_iterations: u64,
    /// The fast paths allowed.
    pub fast_paths: FastPaths,
    /// A DMA engine to plug in and out at sync points.
    pub hotplug: Option<HotplugPlan>,
}

impl Default for VmOptions {
    /// Scenario 0 (none), no benchmark, every fast path KVM offers, no
    /// hot-plug.
    fn default() -> Self {
        VmOptions {
            scenario: 0,
            bench_iterations: 0,
            fast_paths: FastPaths::ALL,
            hotplug: None,
        }
    }
}

/// A run that ended badly. Errors about the guest carry its serial log.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The config asks for something this VMM cannot build.
    #[error("{path}: {rule}")]
    Config {
        /// JSON path of the offending value.
        path: String,
        /// What is wrong with it.
        rule: String,
    },
    /// The memory layout cannot be built.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU cannot be set up.
    #[error(transparent)]
    Cpu(#[from] CpuSetupError),
    /// The guest program cannot be loaded.
    #[error("cannot load the guest program: {0}")]
    Elf(#[from] ElfError),
    /// The boot info cannot be written.
    #[error("cannot write the boot info: {0}")]
    Memory(#[from] GuestMemoryError),
    /// The virtio-iommu cannot be built.
    #[error("cannot create the virtio-iommu: {0}")]
    Device(#[from] DeviceError),
    /// The fault queue of the nested vIOMMU cannot be built.
    #[error("cannot create the vIOMMU fault queue: {0}")]
    FaultQueue(#[source] std::io::Error),
    /// The watchdog's signal cannot be installed or its thread started.
    #[error("cannot start the watchdog: {0}")]
    Watchdog(#[source] std::io::Error),
    /// The device worker thread (ioeventfd path) cannot be started.
    #[error("cannot start the device worker thread: {0}")]
    Worker(#[source] std::io::Error),
    /// The VM cannot be snapshotted or restored.
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The vIOMMU refused a hot-plug the VMM made.
    #[error("hot-plug: {source}{}", log(.serial))]
    Hotplug {
        /// The vIOMMU's error.
        #[source]
        source: HotplugError,
        /// The serial log.
        serial: String,
    },
    /// The guest did not end in time.
    #[error("guest did not finish within {timeout:?}{}", log(.serial))]
    Timeout {
        /// The deadline.
        timeout: Duration,
        /// The serial log.
        serial: String,
    },
    /// The guest took a CPU exception.
    #[error(
        "guest exception {vector} ({}) at rip {rip:#x}, error code {error_code:#x}, cr2 {cr2:#x}, rflags {rflags:#x}{}",
        exception_name(*.vector),
        log(.serial)
    )]
    GuestException {
        /// The vector.
        vector: u8,
        /// Where it happened.
        rip: u64,
        /// The error code (0 for vectors without one).
        error_code: u64,
        /// The faulting address of a page fault.
        cr2: u64,
        /// RFLAGS when it happened.
        rflags: u64,
        /// The serial log.
        serial: String,
    },
    /// The guest triple-faulted (or asked for a shutdown).
    #[error("guest shut down (triple fault){}", log(.serial))]
    Shutdown {
        /// The serial log.
        serial: String,
    },
    /// The guest halted instead of writing the done port.
    #[error("guest halted without writing the done port{}", log(.serial))]
    Halted {
        /// The serial log.
        serial: String,
    },
    /// KVM reported an exit the VMM does not serve.
    #[error("unexpected vCPU exit {exit}{}", log(.serial))]
    UnexpectedExit {
        /// The exit, as KVM described it.
        exit: String,
        /// The serial log.
        serial: String,
    },
}

fn log(serial: &str) -> String {
    if serial.is_empty() {
        "; the guest printed nothing".to_string()
    } else {
        format!("; guest serial log:\n{serial}")
    }
}

fn exception_name(vector: u8) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        _ => "reserved",
    }
}

impl VmError {
    /// The guest's serial log, for errors about the guest.
    pub fn serial(&self) -> Option<&str> {
        match self {
            VmError::Timeout { serial, .. }
            | VmError::GuestException { serial, .. }
            | VmError::Shutdown { serial }
            | VmError::Halted { serial }
            | VmError::Hotplug { serial, .. }
            | VmError::UnexpectedExit { serial, .. } => Some(serial),
            _ => None,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Exits the VMM served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port I/O exits.
    pub pio: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// `KVM_RUN` calls interrupted by a signal.
    pub interrupted: u64,
}

/// A run that ended with the guest writing the done port.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// The guest's result code (`abi::RESULT_PASS` when it passed).
    pub result: u32,
    /// The serial log.
    pub serial: String,
    /// From the first `KVM_RUN` to the first request-queue notification.
    pub boot_to_first_request: Option<Duration>,
    /// From the first `KVM_RUN` to the done port.
    pub run_time: Duration,
    /// The virtio-iommu's counters.
    pub device: DeviceStats,
    /// The transport's counters.
    pub transport: TransportStats,
    /// Each DMA engine's counters, in config order.
    pub dma: Vec<DmaStats>,
    /// Fault records dropped because the event queue had no buffer.
    pub faults_dropped: u64,
    /// Most mappings alive at once, sampled after each notification.
    pub peak_mappings: u64,
    /// Mappings alive at the end.
    pub final_mappings: u64,
    /// Domains alive at the end.
    pub final_domains: usize,
    /// Exits served.
    pub exits: ExitCounts,
    /// The guest TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
    /// The router's counters: invalidations received from the guest,
    /// backend calls made.
    pub router: RouterCounts,
    /// The software nested IOMMU's counters (`None` without
    /// `iommu.nested`).
    pub emulated: Option<EmulatedCounts>,
    /// The notification and interrupt paths that ran.
    pub paths: TransportPaths,
    /// The device worker's counters (`None` on the exit path).
    pub worker: Option<WorkerStats>,
    /// On the irqfd path, whether the in-kernel PIC latched an edge on
    /// the transport's line by the end (the irqfd reached KVM's irqchip);
    /// `None` on the polled path or if the irqchip could not be read.
    pub line_latched: Option<bool>,
    /// Times the VM was restored from a snapshot before this run ended.
    pub restores: u32,
    /// What hot-plug did (in this VM).
    pub hotplug: HotplugStats,
}

/// A run stopped at the sync point the VMM asked to pause at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paused {
    /// The sync point.
    pub at: u32,
    /// From the first `KVM_RUN` to the pause.
    pub run_time: Duration,
}

/// How [`Vm::run_until_pause`] ended.
#[derive(Debug)]
pub enum RunEnd {
    /// The guest wrote the done port.
    Done(Box<RunOutcome>),
    /// The guest reached the sync point; the VM can be snapshotted.
    Paused(Paused),
}

/// Why `plan` cannot run with `cfg`: its endpoint is the config's, or no
/// engine slot is left for it.
fn check_hotplug(cfg: &VmConfig, slots: &[DmaSlot], plan: &HotplugPlan) -> Result<(), VmError> {
    if cfg.endpoints().contains(&plan.endpoint) {
        return Err(VmError::Config {
            path: "devices".into(),
            rule: format!(
                "endpoint {} is the config's; a hot-plugged engine needs another",
                plan.endpoint
            ),
        });
    }
    if slots.len() >= abi::MAX_DMA_ENGINES {
        return Err(VmError::Config {
            path: "devices".into(),
            rule: format!(
                "every one of the {} DMA engine slots is taken; none is left to hot-plug",
                abi::MAX_DMA_ENGINES
            ),
        });
    }
    Ok(())
}

/// One DMA engine of the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaSlot {
    /// The engine's index (its window is `DMA_BASE + index * 0x1000`).
    pub index: usize,
    /// Its endpoint ID.
    pub endpoint: u32,
    /// Whether it sits behind the vIOMMU.
    pub behind_iommu: bool,
}

/// The DMA engines a config asks for, checked against what this VMM can
/// build.
pub fn dma_slots(cfg: &VmConfig) -> Result<Vec<DmaSlot>, VmError> {
    let mut slots = Vec::new();
    for (i, d) in cfg.devices.iter().enumerate() {
        match d.kind {
            DeviceKind::EmulatedDma => {
                if slots.len() == abi::MAX_DMA_ENGINES {
                    return Err(VmError::Config {
                        path: format!("devices[{i}]"),
                        rule: format!(
                            "the KVM test VMM builds at most {} emulated-dma devices",
                            abi::MAX_DMA_ENGINES
                        ),
                    });
                }
                slots.push(DmaSlot {
                    index: slots.len(),
                    endpoint: d.endpoint,
                    behind_iommu: d.iommu,
                });
            }
            DeviceKind::Vfio => {
                return Err(VmError::Config {
                    path: format!("devices[{i}].kind"),
                    rule: "\"vfio\" devices need a host device assigned through VFIO; the KVM \
                           test VMM runs \"emulated-dma\" devices only"
                        .into(),
                })
            }
        }
    }
    Ok(slots)
}

/// Devices on the MMIO and port buses.
struct Bus {
    mem: GuestMemoryMmap,
    iommu: Arc<SharedIommu>,
    /// The vIOMMU behind the transport, for hot-plug (which must not wait
    /// for the transport's lock: the worker may hold it for a queue pass).
    viommu: Arc<Viommu>,
    /// The queues' ioeventfds, on the ioeventfd path.
    notifier: Option<Notifier>,
    emulated: Option<Arc<Emulated>>,
    dmas: Vec<DmaDevice>,
    /// Whether engine `i`'s window answers (not before it is plugged in,
    /// not after the guest ejected it).
    live: Vec<bool>,
    /// Whether engine `i` was hot-plugged.
    hotplugged: Vec<bool>,
    hotplug: HotplugStats,
    ports: Ports,
    unhandled_mmio: u64,
    exits: ExitCounts,
}

impl Bus {
    fn window(addr: u64) -> Option<(usize, u64)> {
        let off = addr.checked_sub(abi::MMIO_GAP_START)?;
        let idx = usize::try_from(off / abi::MMIO_WINDOW_SIZE).ok()?;
        Some((idx, off % abi::MMIO_WINDOW_SIZE))
    }

    /// DMA engine `i`'s window index.
    fn dma_window(i: usize) -> usize {
        ((abi::DMA_BASE - abi::MMIO_GAP_START) / abi::MMIO_WINDOW_SIZE) as usize + i
    }

    /// The DMA engine of window `w`, if there is one.
    fn dma_index(&self, w: usize) -> Option<usize> {
        let i = w.checked_sub(Self::dma_window(0))?;
        self.live.get(i).copied().unwrap_or(false).then_some(i)
    }

    /// At sync point `n`, plugs `plan`'s engine in or unplugs it, as the
    /// plan says.
    fn hotplug_at(&mut self, plan: &HotplugPlan, n: u32) -> Result<(), HotplugError> {
        if n == plan.plug_at {
            let start = Instant::now();
            self.viommu.add_endpoint(plan.endpoint, None)?;
            self.hotplug.vmm_time += start.elapsed();
            let space = Box::new(DmaEngine::new(
                &self.viommu,
                plan.endpoint,
                self.mem.clone(),
            ));
            let router = Box::new(EndpointRouter::new(plan.endpoint, space));
            let i = self.dmas.len();
            self.dmas.push(DmaDevice::new(plan.endpoint, router));
            self.live.push(true);
            self.hotplugged.push(true);
            // check_hotplug left a slot: i < MAX_DMA_ENGINES ≤ 32.
            self.ports.present |= 1 << i;
            self.hotplug.plugged += 1;
        }
        if n == plan.unplug_at {
            let Some(i) = self
                .dmas
                .iter()
                .zip(&self.hotplugged)
                .position(|(d, &h)| h && d.endpoint() == plan.endpoint)
            else {
                return Err(HotplugError::NoEndpoint(plan.endpoint));
            };
            let start = Instant::now();
            self.viommu.remove_endpoint(plan.endpoint)?;
            self.hotplug.vmm_time += start.elapsed();
            self.ports.present &= !(1 << i);
            self.hotplug.unplugged += 1;
        }
        Ok(())
    }

    /// The guest ejects the slots of `bitmap`: those announced removed
    /// stop answering; others are ignored and counted.
    fn eject(&mut self, bitmap: u32) {
        for i in 0..self.live.len().min(32) {
            if bitmap & (1 << i) == 0 {
                continue;
            }
            if self.ports.present & (1 << i) == 0 && self.live[i] {
                self.live[i] = false;
                self.hotplug.ejected += 1;
            } else {
                self.hotplug.bad_ejects += 1;
            }
        }
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.exits.mmio += 1;
        match Self::window(addr) {
            Some((0, off)) => self.iommu.lock().read(off, data),
            Some((w, off)) => match self.dma_index(w) {
                Some(i) => {
                    self.settle_dma(i);
                    self.dmas[i].read(off, data);
                }
                None => self.unhandled_read(data),
            },
            None => self.unhandled_read(data),
        }
    }

    fn unhandled_read(&mut self, data: &mut [u8]) {
        self.unhandled_mmio += 1;
        data.fill(0xff);
    }

    fn mmio_write(&mut self, vm: &VmFd, addr: u64, data: &[u8]) {
        self.exits.mmio += 1;
        match Self::window(addr) {
            Some((0, off)) => self.iommu_write(vm, off, data),
            Some((w, off)) => match self.dma_index(w) {
                Some(i) => {
                    self.settle_dma(i);
                    // Fault records the operation raised go to the event
                    // queue before the doorbell write returns, so the
                    // guest finds them when it reads the status.
                    if self.dmas[i].write(off, data) {
                        self.iommu.lock().process_pending(&self.mem);
                    }
                }
                None => self.unhandled_mmio += 1,
            },
            None => self.unhandled_mmio += 1,
        }
    }

    /// A write to the virtio-mmio window; wires or unwires the
    /// ioeventfds when it activated or reset the device.
    fn iommu_write(&mut self, vm: &VmFd, off: u64, data: &[u8]) {
        let notify = off == virtio_mmio::regs::QUEUE_NOTIFY;
        let change = {
            let mut t = self.iommu.lock();
            let change = t.write(&self.mem, off, data);
            if notify {
                self.iommu.sample_mappings(&t);
            }
            change
        };
        if let Some(n) = &mut self.notifier {
            match change {
                Lifecycle::Activated => n.arm(vm),
                Lifecycle::Reset => n.disarm(vm),
                Lifecycle::Unchanged => {}
            }
        }
        if notify {
            // A notification served on this exit may have carried the
            // PAGE_RESP a waiting DMA needs: settle it now, as before the
            // write returns.
            for i in 0..self.dmas.len() {
                self.settle_dma(i);
            }
        }
    }

    /// Settles engine `i`'s operation waiting for a page request (retried
    /// or failed once the guest answered it) and delivers what the retry
    /// raised; nothing if it does not wait.
    fn settle_dma(&mut self, i: usize) {
        let Some(d) = self.dmas.get_mut(i) else {
            return;
        };
        if d.needs_poll() && d.poll_page_request() {
            self.iommu.lock().process_pending(&self.mem);
        }
    }
}

/// Why the vCPU loop stopped.
enum Stop {
    Done(u32),
    Pause(u32),
    Hotplug(HotplugError),
    Exception(u8),
    Shutdown,
    Halted,
    Timeout,
    Unexpected(String),
    Kvm(kvm_ioctls::Error),
}

/// A VM ready to run its guest program once.
pub struct Vm {
    // Declared first so they close before the guest memory they map is
    // unmapped (fields drop in declaration order).
    vcpu: VcpuFd,
    vm: VmFd,
    _kvm: Kvm,
    bus: Bus,
    tsc_khz: Option<u32>,
    paths: TransportPaths,
    hotplug_plan: Option<HotplugPlan>,
    /// The sync point to pause at, while `run_until_pause` runs.
    pause_at: Option<u32>,
    /// The sync point the VM is paused at, if it is.
    paused: Option<u32>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("iommu", &self.bus.iommu)
            .field("paths", &self.paths)
            .finish()
    }
}

fn boot_info_bytes(info: &BootInfo) -> Vec<u8> {
    let mut b = Vec::with_capacity(std::mem::size_of::<BootInfo>());
    for v in [
        info.magic,
        info.scenario,
        info.low_ram_end,
        info.high_ram_start,
        info.high_ram_end,
        info.msi_start,
        info.msi_end,
        info.bypass_initial,
        info.bench_iterations,
        info.dma_count,
        info.primary_dma,
    ]
    .iter()
    .chain(info.dma_endpoints.iter())
    {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// The virtio-iommu for `cfg`, and the software nested IOMMU behind it
/// when the config enables the nested extension: then every DMA engine
/// behind the vIOMMU is served by it (and may send page requests).
fn build_iommu(
    cfg: &VmConfig,
    slots: &[DmaSlot],
    layout: &Layout,
    mem: &GuestMemoryMmap,
) -> Result<(VirtioIommu, Option<Arc<Emulated>>), VmError> {
    let endpoints = cfg.endpoints();
    let ram = layout.ram_inclusive();
    let Some(nested) = &cfg.iommu.nested else {
        return Ok((VirtioIommu::new(&cfg.iommu, &endpoints, &ram)?, None));
    };
    let behind: Vec<u32> = slots
        .iter()
        .filter(|s| s.behind_iommu)
        .map(|s| s.endpoint)
        .collect();
    let faults = Arc::new(
        FaultQueue::new(cfg.iommu.limits.max_pending_faults as usize)
            .map_err(VmError::FaultQueue)?,
    );
    // The engines of this VMM can all wait for a page (PRI-capable).
    let emu = Arc::new(Emulated::new(
        mem.clone(),
        Arc::clone(&faults),
        nested.pasid_bits,
        &behind,
    ));
    let mut router = Router::new();
    router.add(emu.clone(), &behind);
    let viommu = Arc::new(Viommu::with_router(
        &cfg.iommu, &endpoints, &ram, faults, router,
    ));
    Ok((VirtioIommu::with_viommu(viommu), Some(emu)))
}

impl Vm {
    /// Builds the VM `cfg` describes, with the guest program loaded and the
    /// vCPU at its entry point.
    pub fn new(cfg: &VmConfig, opts: &VmOptions) -> Result<Self, VmError> {
        let (vm, layout, slots) = Self::build(cfg, opts)?;
        let mem = &vm.bus.mem;
        let entry = elf::load(mem, crate::GUEST_ELF)?;
        let msi = cfg
            .iommu
            .reserved_regions
            .iter()
            .find(|r| r.kind == ReservedKind::Msi);
        let bypass = vm.bus.iommu.lock().device().config().bypass;
        let mut info = BootInfo {
            magic: abi::BOOT_INFO_MAGIC,
            scenario: opts.scenario,
            low_ram_end: layout.low_end,
            high_ram_start: layout.high_start,
            high_ram_end: layout.high_end,
            msi_start: msi.map_or(0, |r| r.start),
            msi_end: msi.map_or(abi::NO_MSI_REGION, |r| r.end),
            bypass_initial: u64::from(bypass),
            bench_iterations: opts.bench_iterations,
            dma_count: slots.len() as u64,
            primary_dma: slots
                .iter()
                .find(|s| s.behind_iommu)
                .map_or(u64::MAX, |s| s.index as u64),
            dma_endpoints: [0; abi::MAX_DMA_ENGINES],
        };
        for s in &slots {
            info.dma_endpoints[s.index] = u64::from(s.endpoint);
        }
        mem.write_slice(&boot_info_bytes(&info), GuestAddress(abi::BOOT_INFO_ADDR))?;
        x86::setup_vcpu(&vm.vcpu, mem, layout.high_end, entry, opts.scenario)?;
        Ok(vm)
    }

    /// Builds a new VM for `cfg` and `opts` (new KVM VM, new guest memory,
    /// a virtio-iommu built from the config) and restores `snap` into it:
    /// the guest carries on from the sync point it was paused at, with
    /// the ports counting one more restore. Everything is checked against
    /// the VM built from the config first (see [`snapshot`]).
    pub fn restore(cfg: &VmConfig, opts: &VmOptions, snap: &VmSnapshot) -> Result<Self, VmError> {
        let (mut vm, _, _) = Self::build(cfg, opts)?;
        vm.restore_state(snap)?;
        Ok(vm)
    }

    fn restore_state(&mut self, snap: &VmSnapshot) -> Result<(), SnapshotError> {
        let mem = &self.bus.mem;
        let vm_regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let snap_regions: Vec<(u64, u64)> = snap
            .memory
            .iter()
            .map(|r| (r.start, r.bytes.len() as u64))
            .collect();
        if vm_regions != snap_regions {
            return Err(SnapshotError::Memory {
                snapshot: snap_regions,
                vm: vm_regions,
            });
        }
        if snap.dmas.len() != self.bus.dmas.len() {
            return Err(SnapshotError::DmaEngines {
                snapshot: snap.dmas.len(),
                vm: self.bus.dmas.len(),
            });
        }
        let has_irqchip = matches!(self.paths.interrupts, InterruptPath::Irqfd { .. });
        if snap.irqchip.is_some() != has_irqchip {
            return Err(SnapshotError::Irqchip {
                snapshot: snap.irqchip.is_some(),
                vm: has_irqchip,
            });
        }
        // Memory first: the device checks its queues against it.
        for r in &snap.memory {
            mem.write_slice(&r.bytes, GuestAddress(r.start))?;
        }
        let device = DeviceSnapshot::from_json(&snap.device_json)?;
        {
            let mut t = self.bus.iommu.lock();
            t.restore(&snap.transport, |dev, interrupt| {
                dev.restore(&device, mem, interrupt)?;
                Ok::<bool, SnapshotError>(dev.is_activated())
            })?;
        }
        snapshot::restore_vcpu(&self.vcpu, &snap.vcpu)?;
        if let Some(chips) = &snap.irqchip {
            snapshot::restore_irqchip(&self.vm, chips)?;
        }
        for (d, r) in self.bus.dmas.iter_mut().zip(&snap.dmas) {
            d.set_regs(r);
        }
        self.bus.ports = Ports::restored(&snap.ports);
        let mut t = self.bus.iommu.lock();
        if t.is_running() {
            if let Some(n) = &mut self.bus.notifier {
                n.arm(&self.vm);
            }
            // docs/snapshot.md: a notification may have been lost in the
            // pause, so both queues are served once.
            t.notify_kick(mem, vmm_iommu::wire::REQUEST_QUEUE);
            t.notify_kick(mem, vmm_iommu::wire::EVENT_QUEUE);
        }
        Ok(())
    }

    /// Snapshots this VM, paused at a sync point by
    /// [`Vm::run_until_pause`]: the vCPU, the device worker and the DMA
    /// engines are quiet. The VM may run on afterwards.
    pub fn snapshot(&mut self) -> Result<VmSnapshot, SnapshotError> {
        let Some(paused_at) = self.paused else {
            return Err(SnapshotError::NotPaused);
        };
        if let Some(i) = self.bus.hotplugged.iter().position(|&h| h) {
            return Err(SnapshotError::Hotplugged(i));
        }
        let dmas = self
            .bus
            .dmas
            .iter()
            .map(DmaDevice::regs)
            .collect::<Result<Vec<_>, _>>()?;
        snapshot::complete_pending_exit(&mut self.vcpu)?;
        let has_irqchip = matches!(self.paths.interrupts, InterruptPath::Irqfd { .. });
        let vcpu = snapshot::save_vcpu(&self.vcpu, has_irqchip)?;
        let irqchip = if has_irqchip {
            Some(snapshot::save_irqchip(&self.vm)?)
        } else {
            None
        };
        let (transport, device_json) = {
            let t = self.bus.iommu.lock();
            (t.state(), t.device().snapshot()?.to_json()?)
        };
        let mut memory = Vec::new();
        for region in self.bus.mem.iter() {
            let start = region.start_addr();
            let len = usize::try_from(region.len()).unwrap_or(usize::MAX);
            let mut bytes = vec![0u8; len];
            self.bus.mem.read_slice(&mut bytes, start)?;
            memory.push(snapshot::RegionSnapshot {
                start: start.0,
                bytes,
            });
        }
        Ok(VmSnapshot {
            paused_at,
            memory,
            vcpu,
            irqchip,
            transport,
            device_json,
            dmas,
            ports: self.bus.ports.state(),
        })
    }

    /// Everything of the VM but the guest program and the vCPU's start
    /// state: KVM VM and vCPU, guest memory, the virtio-iommu and its
    /// transport, the DMA engines, the notification and interrupt paths.
    fn build(cfg: &VmConfig, opts: &VmOptions) -> Result<(Self, Layout, Vec<DmaSlot>), VmError> {
        let layout = Layout::new(cfg.memory.size_mib)?;
        let slots = dma_slots(cfg)?;
        if let Some(h) = &opts.hotplug {
            check_hotplug(cfg, &slots, h)?;
        }
        let mem = layout.guest_memory()?;
        let (dev, emulated) = build_iommu(cfg, &slots, &layout, &mem)?;
        let viommu = Arc::clone(dev.viommu());
        // Each device's own reserved regions, beside the device-wide ones
        // (the config checked them; the vIOMMU checks them again).
        for (i, d) in cfg.devices.iter().enumerate() {
            if d.iommu && !d.reserved_regions.is_empty() {
                viommu
                    .set_endpoint_reserved_regions(d.endpoint, &d.reserved_regions)
                    .map_err(|e| VmError::Config {
                        path: format!("devices[{i}].reserved_regions"),
                        rule: e.to_string(),
                    })?;
            }
        }
        let dmas: Vec<DmaDevice> = slots
            .iter()
            .map(|s| {
                let router: Box<dyn DmaRouter> = if !s.behind_iommu {
                    let space = Box::new(PhysicalDma::new(mem.clone()));
                    Box::new(EndpointRouter::new(s.endpoint, space))
                } else {
                    let space: Box<dyn DmaSpace> =
                        Box::new(DmaEngine::new(dev.viommu(), s.endpoint, mem.clone()));
                    match &emulated {
                        Some(emu) => Box::new(NestedRouter::new(
                            s.endpoint,
                            space,
                            Arc::clone(emu),
                            mem.clone(),
                        )),
                        None => Box::new(EndpointRouter::new(s.endpoint, space)),
                    }
                };
                DmaDevice::new(s.endpoint, router)
            })
            .collect();

        let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: `userspace_addr..+memory_size` is a live anonymous
            // mapping of `region`, which `mem` keeps mapped (its regions
            // are reference-counted and `self.bus.mem` holds a clone); the
            // VmFd that refers to it is a field declared before `bus`, so
            // it is closed before the mapping can go away.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        // The irqchip must exist before the vCPU (its local APIC).
        let line = irq::setup(&kvm, &vm, opts.fast_paths.irqfd);
        let (notifier, notify_path) =
            match Notifier::new(&kvm, abi::VIRTIO_MMIO_BASE, opts.fast_paths.ioeventfd) {
                Ok(n) => (Some(n), NotifyPath::Ioeventfd),
                Err(fallback) => (None, fallback),
            };
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let tsc_khz = vcpu.get_tsc_khz().ok();

        let interrupt = Arc::new(match line.irqfd {
            Some(fd) => MmioInterrupt::with_irqfd(fd),
            None => MmioInterrupt::polled(),
        });
        let n = dmas.len();
        let mut ports = Ports::default();
        // At most MAX_DMA_ENGINES (8) engines: the shift fits.
        ports.present = (1u32 << n) - 1;
        let vm = Vm {
            vcpu,
            vm,
            _kvm: kvm,
            bus: Bus {
                mem,
                iommu: Arc::new(SharedIommu::new(VirtioMmio::with_interrupt(dev, interrupt))),
                viommu,
                notifier,
                emulated,
                dmas,
                live: vec![true; n],
                hotplugged: vec![false; n],
                hotplug: HotplugStats::default(),
                ports,
                unhandled_mmio: 0,
                exits: ExitCounts::default(),
            },
            tsc_khz,
            paths: TransportPaths {
                notify: notify_path,
                interrupts: line.path,
            },
            hotplug_plan: opts.hotplug,
            pause_at: None,
            paused: None,
        };
        Ok((vm, layout, slots))
    }

    /// The notification and interrupt paths this VM was built with (the
    /// notification path may still fall back if KVM refuses to register
    /// an ioeventfd; [`RunOutcome::paths`] says what ran).
    pub fn paths(&self) -> &TransportPaths {
        &self.paths
    }

    /// Starts the device worker on the ioeventfd path.
    fn start_worker(&self) -> Result<Option<Worker>, VmError> {
        let Some(n) = &self.bus.notifier else {
            return Ok(None);
        };
        let kicks = n.kicks().map_err(VmError::Worker)?;
        let faults = self
            .bus
            .iommu
            .lock()
            .device()
            .fault_eventfd()
            .try_clone()
            .map_err(VmError::Worker)?;
        let w = Worker::spawn(self.bus.iommu.clone(), self.bus.mem.clone(), kicks, faults)
            .map_err(VmError::Worker)?;
        Ok(Some(w))
    }

    /// Runs the guest until it writes the done port, fails, or `timeout`
    /// passes. The device worker (ioeventfd path) runs for as long as the
    /// guest does and is stopped and joined before this returns, whatever
    /// the outcome. Sync points go by without a pause.
    pub fn run(mut self, timeout: Duration) -> Result<RunOutcome, VmError> {
        self.pause_at = None;
        match self.run_some(timeout)? {
            RunEnd::Done(o) => Ok(*o),
            // Nothing asked for a pause, so none happens.
            RunEnd::Paused(p) => Err(VmError::UnexpectedExit {
                exit: format!("pause at sync point {} that nobody asked for", p.at),
                serial: self.bus.ports.serial(),
            }),
        }
    }

    /// Runs the guest like [`Vm::run`], but stops at sync point `at`
    /// (the guest's write to `abi::SYNC_PORT`), with the vCPU out of
    /// `KVM_RUN` and the device worker stopped, so that the VM can be
    /// snapshotted; a guest that ends first ends the run as `run` does.
    pub fn run_until_pause(&mut self, timeout: Duration, at: u32) -> Result<RunEnd, VmError> {
        self.pause_at = Some(at);
        let r = self.run_some(timeout);
        self.pause_at = None;
        r
    }

    fn run_some(&mut self, timeout: Duration) -> Result<RunEnd, VmError> {
        self.paused = None;
        let worker = self.start_worker()?;
        let start = Instant::now();
        let stop = watchdog::run_with_watchdog(timeout, |w| self.run_loop(w));
        let run_time = start.elapsed();
        // Stopped before anything is read, so that no queue pass runs
        // while the counters are collected (and none after the run). On
        // the error returns below, dropping `worker` does the same.
        let worker = worker.map(Worker::stop);
        let stop = stop.map_err(VmError::Watchdog)?;
        let serial = self.bus.ports.serial();
        let result = match stop {
            Stop::Done(code) => code,
            Stop::Pause(at) => {
                self.paused = Some(at);
                return Ok(RunEnd::Paused(Paused { at, run_time }));
            }
            Stop::Exception(vector) => return Err(self.exception(vector, serial)),
            Stop::Shutdown => return Err(VmError::Shutdown { serial }),
            Stop::Halted => return Err(VmError::Halted { serial }),
            Stop::Timeout => return Err(VmError::Timeout { timeout, serial }),
            Stop::Unexpected(exit) => return Err(VmError::UnexpectedExit { exit, serial }),
            Stop::Hotplug(source) => return Err(VmError::Hotplug { source, serial }),
            Stop::Kvm(source) => {
                return Err(VmError::Kvm {
                    what: "KVM_RUN",
                    source,
                })
            }
        };
        let mut paths = self.paths.clone();
        if let Some(n) = &self.bus.notifier {
            paths.notify = n.path();
        }
        let line_latched = match paths.interrupts {
            InterruptPath::Irqfd { gsi } => irq::line_latched(&self.vm, gsi),
            InterruptPath::Polled { .. } => None,
        };
        let t = self.bus.iommu.lock();
        let dev = t.device();
        let st = dev.viommu().state();
        Ok(RunEnd::Done(Box::new(RunOutcome {
            result,
            serial,
            boot_to_first_request: t.first_notify().map(|at| at - start),
            run_time,
            device: dev.stats().clone(),
            transport: t.stats(),
            dma: self.bus.dmas.iter().map(|d| d.stats().clone()).collect(),
            faults_dropped: dev.viommu().faults().dropped(),
            peak_mappings: self.bus.iommu.peak_mappings(),
            final_mappings: st.total_mappings(),
            final_domains: st.domain_count(),
            exits: self.bus.exits,
            tsc_khz: self.tsc_khz,
            router: dev.viommu().router().stats.snapshot(),
            emulated: self.bus.emulated.as_ref().map(|e| e.stats.snapshot()),
            paths,
            worker,
            line_latched,
            restores: self.bus.ports.restores,
            hotplug: self.bus.hotplug,
        })))
    }

    fn run_loop(&mut self, watch: &Watch) -> Stop {
        loop {
            if watch.expired() {
                return Stop::Timeout;
            }
            let (bus, vm) = (&mut self.bus, &self.vm);
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    bus.exits.pio += 1;
                    match bus.ports.write(port, data) {
                        PortEvent::Continue => {}
                        PortEvent::Done(code) => return Stop::Done(code),
                        PortEvent::Exception(v) => return Stop::Exception(v),
                        PortEvent::Eject(slots) => bus.eject(slots),
                        PortEvent::Sync(n) => {
                            if let Some(plan) = &self.hotplug_plan {
                                if let Err(e) = bus.hotplug_at(plan, n) {
                                    return Stop::Hotplug(e);
                                }
                            }
                            if self.pause_at == Some(n) {
                                return Stop::Pause(n);
                            }
                        }
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    bus.exits.pio += 1;
                    bus.ports.read(port, data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(vm, addr, data),
                Ok(VcpuExit::Hlt) => return Stop::Halted,
                Ok(VcpuExit::Shutdown) => return Stop::Shutdown,
                Ok(other) => return Stop::Unexpected(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    bus.exits.interrupted += 1;
                }
                Err(e) => return Stop::Kvm(e),
            }
        }
    }

    /// The error for an exception stub's report: where, and why.
    fn exception(&self, vector: u8, serial: String) -> VmError {
        let regs = self.vcpu.get_regs().unwrap_or_default();
        let cr2 = self.vcpu.get_sregs().map_or(0, |s| s.cr2);
        // The CPU pushed [error code,] RIP, CS, RFLAGS, RSP, SS on the
        // exception stack; the stub pushed nothing.
        let read = |at: u64| {
            self.bus
                .mem
                .read_obj::<u64>(GuestAddress(at))
                .unwrap_or(u64::MAX)
        };
        let (error_code, rip_at) = if x86::has_error_code(vector) {
            (read(regs.rsp), regs.rsp.wrapping_add(8))
        } else {
            (0, regs.rsp)
        };
        VmError::GuestException {
            vector,
            rip: read(rip_at),
            error_code,
            cr2,
            rflags: read(rip_at.wrapping_add(16)),
            serial,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_serialises_every_field() {
        let info = BootInfo {
            dma_endpoints: [7; abi::MAX_DMA_ENGINES],
            ..Default::default()
        };
        let b = boot_info_bytes(&info);
        assert_eq!(b.len(), std::mem::size_of::<BootInfo>());
        assert_eq!(b[b.len() - 8], 7);
    }

    #[test]
    fn vfio_devices_are_refused_naming_the_json_path() {
        let cfg = VmConfig::from_json_str(
            r#"{"devices": [{"id": "d", "kind": "emulated-dma", "endpoint": 1, "iommu": true},
                            {"id": "n", "kind": "vfio", "endpoint": 2, "path": "/dev/vfio/1", "backend": "type1"}]}"#,
        )
        .unwrap();
        let e = dma_slots(&cfg).unwrap_err().to_string();
        assert!(e.starts_with("devices[1].kind: "), "{e}");
    }

    #[test]
    fn windows_map_to_devices() {
        assert_eq!(Bus::window(abi::VIRTIO_MMIO_BASE + 0x70), Some((0, 0x70)));
        assert_eq!(
            Bus::window(abi::DMA_BASE + 0x1004),
            Some((Bus::dma_window(1), 4))
        );
        assert_eq!(Bus::window(0x1000), None);
    }
}
