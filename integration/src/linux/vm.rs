//! The Linux VM: KVM with its in-kernel irqchip and PIT, RAM from 0, one
//! vCPU entering the kernel through the 64-bit boot protocol, and the
//! devices on vm-device's buses: COM1, the ACPI sleep registers (power
//! off), the i8042 reset line (reboot), the fault test hook, and one
//! virtio-mmio window per virtio device, the virtio-iommu first.
//!
//! Every device is served on the vCPU thread as its exits arrive: a
//! QueueNotify write is processed before it returns to the guest, and
//! after every access to a device behind the vIOMMU the fault records its
//! DMA raised are delivered to the event queue. Interrupts go through
//! irqfds into the IOAPIC (edge-triggered, as the DSDT says). The run ends
//! when the guest powers off (ACPI S5) or resets, or when the watchdog's
//! deadline passes; nothing the guest does panics the VMM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use vm_device::bus::{
    MmioAddress, MmioAddressOffset, MmioRange, PioAddress, PioAddressOffset, PioRange,
};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{MutDeviceMmio, MutDevicePio};
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_iommu::{DeviceError, DeviceStats, Viommu, VirtioIommu};
use vmm_sys_util::eventfd::EventFd;

use super::acpi::{self, AcpiConfig, VirtioMmioNode};
use super::blk::{BlkStats, VirtioBlk};
use super::boot::{self, BootError, BootImages};
use super::config::{LinuxDeviceKind, LinuxVmConfig};
use super::cpu::{self, CpuError};
use super::layout;
use super::rng::{RngStats, VirtioRng};
use super::serial::{Console, ConsoleLog};
use crate::vm::virtio_mmio::regs::QUEUE_NOTIFY;
use crate::vm::virtio_mmio::{MmioInterrupt, VirtioDevice, VirtioMmio};
use crate::vm::watchdog::run_with_watchdog;

/// The command line every Linux guest gets; the caller's part follows.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";

/// Where KVM puts its TSS and identity-map pages (three pages below the
/// BIOS ROM's usual place, inside the MMIO gap, outside RAM).
const KVM_TSS_ADDR: u64 = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// How the run should go.
#[derive(Clone, Debug)]
pub struct LinuxRunOptions {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: Option<PathBuf>,
    /// Appended to [`BASE_CMDLINE`].
    pub append: String,
    /// The watchdog's deadline for the whole run.
    pub timeout: Duration,
    /// Copy the console to stdout as it arrives.
    pub echo_console: bool,
}

/// A run that could not start or did not end cleanly. Errors about the
/// guest carry its console log.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
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
    /// Guest RAM cannot be allocated.
    #[error("cannot allocate guest RAM: {0}")]
    Memory(#[source] vm_memory::mmap::FromRangesError),
    /// The kernel, initramfs or command line cannot be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The vCPU cannot be set up.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// The ACPI tables cannot be built.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The virtio-iommu cannot be built.
    #[error("cannot create the virtio-iommu: {0}")]
    Device(#[from] DeviceError),
    /// The config's per-device reserved regions are refused.
    #[error(transparent)]
    Config(#[from] super::config::LinuxConfigError),
    /// A virtio-blk disk cannot be built.
    #[error(transparent)]
    Blk(#[from] super::blk::BlkError),
    /// A virtio-rng cannot be built.
    #[error(transparent)]
    Rng(#[from] super::rng::RngError),
    /// An eventfd cannot be made.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A device cannot be put on a bus.
    #[error("cannot register {what} on the bus: {source:?}")]
    Bus {
        /// Which device.
        what: String,
        /// vm-device's error.
        source: vm_device::bus::Error,
    },
    /// The watchdog cannot be started.
    #[error("cannot start the watchdog: {0}")]
    Watchdog(#[source] std::io::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> LinuxError {
    move |source| LinuxError::Kvm { what, source }
}

/// How the guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinuxEnd {
    /// ACPI S5 through the sleep control register.
    PowerOff,
    /// The i8042 reset line, or a triple fault.
    Reset,
    /// The watchdog's deadline passed first.
    Timeout,
    /// The vCPU stopped: an exit the VMM does not serve, or `KVM_RUN`
    /// failed.
    Stopped(String),
}

impl LinuxEnd {
    /// `poweroff`, `reset`, `timeout` or `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            LinuxEnd::PowerOff => "poweroff",
            LinuxEnd::Reset => "reset",
            LinuxEnd::Timeout => "timeout",
            LinuxEnd::Stopped(_) => "error",
        }
    }
}

/// One virtio device's counters.
#[derive(Clone, Debug)]
pub enum DeviceCounters {
    /// virtio-blk.
    Blk(BlkStats),
    /// virtio-rng.
    Rng(RngStats),
}

/// One virtio device of the config, as it ended.
#[derive(Clone, Debug)]
pub struct DeviceReport {
    /// Its config id.
    pub id: String,
    /// Its kind.
    pub kind: LinuxDeviceKind,
    /// Its endpoint ID.
    pub endpoint: u32,
    /// Whether it sat behind the vIOMMU.
    pub behind_iommu: bool,
    /// Whether its driver negotiated `VIRTIO_F_ACCESS_PLATFORM`.
    pub access_platform: bool,
    /// Its counters.
    pub counters: DeviceCounters,
    /// Queue notifications the VMM served for it, and the nanoseconds
    /// they took (its DMA through the vIOMMU included).
    pub notify_time: (u64, u64),
}

/// A run that started: how it ended (a clean power-off, or not) and what
/// the VMM counted up to then.
#[derive(Clone, Debug)]
pub struct LinuxOutcome {
    /// How it ended.
    pub end: LinuxEnd,
    /// The console log.
    pub console: String,
    /// From the first `KVM_RUN` to the end.
    pub wall: Duration,
    /// The virtio-iommu's counters.
    pub iommu: DeviceStats,
    /// The virtio-iommu's features the driver accepted.
    pub iommu_features: u64,
    /// Request- and event-queue notifications the VMM served for the
    /// virtio-iommu, and the nanoseconds they took.
    pub iommu_notify_time: (u64, u64),
    /// The virtio devices, in config order.
    pub devices: Vec<DeviceReport>,
    /// Stray DMAs the test hook issued.
    pub test_hook_dmas: u64,
    /// Port and MMIO accesses no device claimed.
    pub unclaimed_accesses: u64,
    /// Exits served.
    pub exits: u64,
}

/// 0 running, then [`LinuxEnd`] as 1 + its index.
#[derive(Debug, Default)]
struct StopFlag(AtomicU8);

impl StopFlag {
    fn set(&self, end: LinuxEnd) {
        let v = match end {
            LinuxEnd::PowerOff => 1,
            _ => 2,
        };
        // The first end wins.
        let _ = self
            .0
            .compare_exchange(0, v, Ordering::AcqRel, Ordering::Acquire);
    }

    fn get(&self) -> Option<LinuxEnd> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(LinuxEnd::PowerOff),
            2 => Some(LinuxEnd::Reset),
            _ => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Devices keep their state consistent between accesses; a poisoned
    // lock can only come from a panic that already ends the run.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type IommuTransport = Arc<Mutex<VirtioMmio<VirtioIommu>>>;

/// Time the VMM spent serving one device's queue notifications, for the
/// breakdown of what a DMA costs (figures only, never asserted).
#[derive(Debug, Default)]
pub struct NotifyTime {
    count: AtomicU64,
    nanos: AtomicU64,
}

impl NotifyTime {
    fn add(&self, since: Instant) {
        let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.nanos.fetch_add(ns, Ordering::Relaxed);
    }

    /// Notifications served and the nanoseconds they took.
    pub fn get(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.nanos.load(Ordering::Relaxed),
        )
    }
}

/// A virtio-mmio window on the MMIO bus. After each write to a device
/// behind the vIOMMU, the fault records its DMA raised go to the event
/// queue before the write returns.
struct Window<D: VirtioDevice> {
    transport: VirtioMmio<D>,
    mem: GuestMemoryMmap,
    iommu: Option<IommuTransport>,
    time: Arc<NotifyTime>,
}

impl<D: VirtioDevice> MutDeviceMmio for Window<D> {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.transport.read(offset, data);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let start = Instant::now();
        self.transport.write(&self.mem, offset, data);
        if let Some(i) = &self.iommu {
            lock(i).process_pending(&self.mem);
        }
        if offset == QUEUE_NOTIFY {
            self.time.add(start);
        }
    }
}

/// The virtio-iommu's own window: its writes may carry a requestq or
/// eventq notification, served on the spot.
struct IommuWindow {
    transport: IommuTransport,
    mem: GuestMemoryMmap,
    time: Arc<NotifyTime>,
}

impl MutDeviceMmio for IommuWindow {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        lock(&self.transport).read(offset, data);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let start = Instant::now();
        let mut t = lock(&self.transport);
        t.write(&self.mem, offset, data);
        t.process_pending(&self.mem);
        if offset == QUEUE_NOTIFY {
            self.time.add(start);
        }
    }
}

/// The ACPI sleep control and status registers (FADT): S5 powers off.
struct SleepRegisters {
    stop: Arc<StopFlag>,
}

/// `SLP_EN` in the sleep control register.
const SLP_EN: u8 = 1 << 5;

impl MutDevicePio for SleepRegisters {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 && v & SLP_EN != 0 && (v >> 2) & 0x7 == layout::ACPI_S5_SLP_TYP {
            self.stop.set(LinuxEnd::PowerOff);
        }
    }
}

/// The i8042's status and command ports, enough for `reboot=k`: the
/// controller is always ready, and command 0xfe pulses the reset line.
struct ResetLine {
    stop: Arc<StopFlag>,
}

impl MutDevicePio for ResetLine {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        if data.first() == Some(&0xfe) {
            self.stop.set(LinuxEnd::Reset);
        }
    }
}

/// The fault test hook: a 4-byte write of an endpoint ID makes that
/// endpoint read [`layout::TEST_HOOK_IOVA`] through the vIOMMU, as a
/// buggy device would; the fault record goes to the event queue before
/// the write returns.
struct TestHook {
    viommu: Arc<Viommu>,
    endpoints: Vec<u32>,
    iommu: IommuTransport,
    mem: GuestMemoryMmap,
    dmas: Arc<AtomicU64>,
    latch: [u8; 4],
}

impl TestHook {
    fn fire(&mut self, ep: u32) {
        if !self.endpoints.contains(&ep) {
            log::info!("test hook: endpoint {ep} is not behind the vIOMMU");
            return;
        }
        let dma = IommuMemory::new(self.mem.clone(), self.viommu.endpoint_iommu(ep), true, ());
        let refused = dma
            .read_obj::<u32>(GuestAddress(layout::TEST_HOOK_IOVA))
            .is_err();
        self.dmas.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "test hook: endpoint {ep} read IOVA {:#x}: refused={refused}",
            layout::TEST_HOOK_IOVA
        );
        lock(&self.iommu).process_pending(&self.mem);
    }
}

impl MutDevicePio for TestHook {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    /// Bytes land in a 4-byte little-endian latch (the guest may write
    /// them one at a time, as `/dev/port` does); the write that fills its
    /// last byte fires the DMA.
    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let at = usize::from(offset);
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = self.latch.get_mut(at + i) {
                *slot = *b;
            }
        }
        if at + data.len() == self.latch.len() {
            let ep = u32::from_le_bytes(self.latch);
            self.latch = [0; 4];
            self.fire(ep);
        }
    }
}

/// A device of the config, kept for its report.
enum Slot {
    Blk(Arc<Mutex<Window<VirtioBlk>>>),
    Rng(Arc<Mutex<Window<VirtioRng>>>),
}

/// Runs `cfg` with the kernel and initramfs of `opts` until the guest
/// powers off or resets.
pub fn run_linux(cfg: &LinuxVmConfig, opts: &LinuxRunOptions) -> Result<LinuxOutcome, LinuxError> {
    let kvm = Kvm::new().map_err(LinuxError::KvmOpen)?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

    let ram_end = cfg.memory.size_mib << 20;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram_end as usize)])
        .map_err(LinuxError::Memory)?;
    map_memory(&vm, &mem)?;

    let stop = Arc::new(StopFlag::default());
    let console = ConsoleLog::default();
    let mut io = IoManager::new();

    // COM1.
    let serial_irq = irq_line(&vm, layout::SERIAL_GSI)?;
    let com1 = Console::new(serial_irq, console.clone(), opts.echo_console);
    register_pio(
        &mut io,
        "COM1",
        layout::SERIAL_PORT,
        8,
        Arc::new(Mutex::new(com1)),
    )?;
    register_pio(
        &mut io,
        "the ACPI sleep registers",
        layout::ACPI_SLEEP_CONTROL_PORT,
        2,
        Arc::new(Mutex::new(SleepRegisters { stop: stop.clone() })),
    )?;
    let reset = Arc::new(Mutex::new(ResetLine { stop: stop.clone() }));
    register_pio(&mut io, "the i8042 data port", 0x60, 1, reset.clone())?;
    register_pio(&mut io, "the i8042 command port", 0x64, 1, reset)?;

    // The virtio-iommu, window 0.
    let endpoints = cfg.endpoints();
    let dev = VirtioIommu::new(&cfg.iommu, &endpoints, &[(0, ram_end - 1)])?;
    let viommu = dev.viommu().clone();
    // Each device's own reserved regions, before the guest can probe.
    cfg.check_endpoint_regions(&viommu)?;
    let iommu_time = Arc::new(NotifyTime::default());
    let iommu: IommuTransport = Arc::new(Mutex::new(VirtioMmio::with_interrupt(
        dev,
        Arc::new(MmioInterrupt::with_irqfd(irq_line(
            &vm,
            layout::virtio_gsi(0),
        )?)),
    )));
    register_mmio(
        &mut io,
        "the virtio-iommu",
        layout::virtio_mmio_base(0),
        Arc::new(Mutex::new(IommuWindow {
            transport: iommu.clone(),
            mem: mem.clone(),
            time: iommu_time.clone(),
        })),
    )?;
    let mut nodes = vec![VirtioMmioNode {
        base: layout::virtio_mmio_base(0),
        size: layout::VIRTIO_MMIO_SIZE,
        gsi: layout::virtio_gsi(0),
        endpoint: None,
    }];

    // The virtio devices, windows 1.. in config order.
    let mut slots = Vec::new();
    let mut times = Vec::new();
    for (i, d) in cfg.devices.iter().enumerate() {
        let w = i + 1;
        let interrupt = Arc::new(MmioInterrupt::with_irqfd(irq_line(
            &vm,
            layout::virtio_gsi(w),
        )?));
        let ep_iommu = d.iommu.then(|| viommu.endpoint_iommu(d.endpoint));
        let behind = d.iommu.then(|| iommu.clone());
        let what = format!("{} ({})", d.id, d.kind.as_str());
        let base = layout::virtio_mmio_base(w);
        let time = Arc::new(NotifyTime::default());
        times.push(time.clone());
        match d.kind {
            LinuxDeviceKind::VirtioBlk => {
                let blk = VirtioBlk::new(d.disk_bytes(), ep_iommu)?;
                let win = Arc::new(Mutex::new(Window {
                    transport: VirtioMmio::with_interrupt(blk, interrupt),
                    mem: mem.clone(),
                    iommu: behind,
                    time: time.clone(),
                }));
                register_mmio(&mut io, &what, base, win.clone())?;
                slots.push(Slot::Blk(win));
            }
            LinuxDeviceKind::VirtioRng => {
                let rng = VirtioRng::new(ep_iommu)?;
                let win = Arc::new(Mutex::new(Window {
                    transport: VirtioMmio::with_interrupt(rng, interrupt),
                    mem: mem.clone(),
                    iommu: behind,
                    time: time.clone(),
                }));
                register_mmio(&mut io, &what, base, win.clone())?;
                slots.push(Slot::Rng(win));
            }
        }
        nodes.push(VirtioMmioNode {
            base,
            size: layout::VIRTIO_MMIO_SIZE,
            gsi: layout::virtio_gsi(w),
            endpoint: d.iommu.then_some(d.endpoint),
        });
    }

    let test_hook_dmas = Arc::new(AtomicU64::new(0));
    register_pio(
        &mut io,
        "the test hook",
        layout::TEST_HOOK_PORT,
        4,
        Arc::new(Mutex::new(TestHook {
            viommu: viommu.clone(),
            endpoints: endpoints.clone(),
            iommu: iommu.clone(),
            mem: mem.clone(),
            dmas: test_hook_dmas.clone(),
            latch: [0; 4],
        })),
    )?;

    let rsdp = acpi::write_acpi_tables(
        &mem,
        &AcpiConfig {
            vcpus: 1,
            iommu: Some(layout::virtio_mmio_base(0)),
            devices: nodes,
        },
    )?;
    let cmdline = if opts.append.is_empty() {
        BASE_CMDLINE.to_string()
    } else {
        format!("{BASE_CMDLINE} {}", opts.append)
    };
    let loaded = boot::load(
        &mem,
        ram_end,
        &BootImages {
            kernel: &opts.kernel,
            initrd: opts.initrd.as_deref(),
            cmdline: &cmdline,
        },
        rsdp.0,
    )?;
    cpu::write_boot_structures(&mem)?;
    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    cpu::setup_vcpu(&kvm, &vcpu, 0, loaded.entry)?;

    let start = Instant::now();
    let mut exits = 0u64;
    let mut unclaimed = 0u64;
    let end = run_with_watchdog(opts.timeout, |watch| -> LinuxEnd {
        loop {
            if let Some(end) = stop.get() {
                return end;
            }
            if watch.expired() {
                return LinuxEnd::Timeout;
            }
            let exit = vcpu.run();
            exits += 1;
            match exit {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if io.pio_write(PioAddress(port), data).is_err() {
                        unclaimed += 1;
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if io.pio_read(PioAddress(port), data).is_err() {
                        unclaimed += 1;
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if io.mmio_read(MmioAddress(addr), data).is_err() {
                        unclaimed += 1;
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if io.mmio_write(MmioAddress(addr), data).is_err() {
                        unclaimed += 1;
                    }
                }
                Ok(VcpuExit::Shutdown) => return LinuxEnd::Reset,
                Ok(VcpuExit::Hlt) => {
                    // With the in-kernel irqchip KVM waits in HLT itself;
                    // an exit here means interrupts are off for good.
                    return LinuxEnd::Stopped("the guest halted with interrupts off".into());
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return if kind == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN {
                        LinuxEnd::PowerOff
                    } else {
                        LinuxEnd::Reset
                    };
                }
                Ok(other) => return LinuxEnd::Stopped(format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    vcpu.set_kvm_immediate_exit(0);
                }
                Err(e) => return LinuxEnd::Stopped(format!("KVM_RUN failed: {e}")),
            }
        }
    })
    .map_err(LinuxError::Watchdog)?;
    let wall = start.elapsed();

    let (iommu_stats, iommu_features) = {
        let t = lock(&iommu);
        (t.device().stats().clone(), t.device().acked_features())
    };
    let devices = cfg
        .devices
        .iter()
        .zip(&slots)
        .zip(&times)
        .map(|((d, s), time)| {
            let (counters, access_platform) = match s {
                Slot::Blk(w) => {
                    let w = lock(w);
                    (
                        DeviceCounters::Blk(w.transport.device().stats()),
                        w.transport.device().access_platform(),
                    )
                }
                Slot::Rng(w) => {
                    let w = lock(w);
                    (
                        DeviceCounters::Rng(w.transport.device().stats()),
                        w.transport.device().access_platform(),
                    )
                }
            };
            DeviceReport {
                id: d.id.clone(),
                kind: d.kind,
                endpoint: d.endpoint,
                behind_iommu: d.iommu,
                access_platform,
                counters,
                notify_time: time.get(),
            }
        })
        .collect();
    Ok(LinuxOutcome {
        end,
        console: console.text(),
        wall,
        iommu: iommu_stats,
        iommu_features,
        iommu_notify_time: iommu_time.get(),
        devices,
        test_hook_dmas: test_hook_dmas.load(Ordering::Relaxed),
        unclaimed_accesses: unclaimed,
        exits,
    })
}

/// Hands guest RAM to KVM.
fn map_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), LinuxError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: `userspace_addr..+memory_size` is a live anonymous
        // mapping of `region`; `run_linux` keeps `mem` (and so the
        // mapping) alive until after the VM's last vCPU run, and the VmFd
        // is dropped no later than `mem`, both being locals of
        // `run_linux` that outlive every `KVM_RUN`.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// An eventfd registered as the irqfd of `gsi`.
fn irq_line(vm: &VmFd, gsi: u32) -> Result<EventFd, LinuxError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(LinuxError::EventFd)?;
    vm.register_irqfd(&fd, gsi).map_err(kvm_err("KVM_IRQFD"))?;
    Ok(fd)
}

fn register_pio<D: MutDevicePio + Send + 'static>(
    io: &mut IoManager,
    what: &str,
    port: u16,
    len: u16,
    dev: Arc<Mutex<D>>,
) -> Result<(), LinuxError> {
    let range = PioRange::new(PioAddress(port), len).map_err(|source| LinuxError::Bus {
        what: what.into(),
        source,
    })?;
    io.register_pio(range, dev)
        .map_err(|source| LinuxError::Bus {
            what: what.into(),
            source,
        })
}

fn register_mmio<D: MutDeviceMmio + Send + 'static>(
    io: &mut IoManager,
    what: &str,
    base: u64,
    dev: Arc<Mutex<D>>,
) -> Result<(), LinuxError> {
    let range = MmioRange::new(MmioAddress(base), layout::VIRTIO_MMIO_SIZE).map_err(|source| {
        LinuxError::Bus {
            what: what.into(),
            source,
        }
    })?;
    io.register_mmio(range, dev)
        .map_err(|source| LinuxError::Bus {
            what: what.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_iommu::config::IommuConfig;

    fn hook() -> TestHook {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = VirtioIommu::new(&IommuConfig::default(), &[8], &[(0, (1 << 20) - 1)]).unwrap();
        TestHook {
            viommu: dev.viommu().clone(),
            endpoints: vec![8],
            iommu: Arc::new(Mutex::new(VirtioMmio::new(dev))),
            mem,
            dmas: Arc::new(AtomicU64::new(0)),
            latch: [0; 4],
        }
    }

    #[test]
    fn test_hook_fires_on_the_byte_that_completes_the_endpoint_id() {
        let mut h = hook();
        let base = PioAddress(layout::TEST_HOOK_PORT);
        // One byte at a time, as /dev/port writes.
        for (i, b) in 8u32.to_le_bytes().iter().enumerate() {
            assert_eq!(h.dmas.load(Ordering::Relaxed), 0);
            h.pio_write(base, i as u16, &[*b]);
        }
        assert_eq!(h.dmas.load(Ordering::Relaxed), 1);
        // One 4-byte write.
        h.pio_write(base, 0, &8u32.to_le_bytes());
        assert_eq!(h.dmas.load(Ordering::Relaxed), 2);
        // The stray read was refused and left a fault record for endpoint 8.
        let f = h.viommu.faults().pop().expect("a fault record");
        assert_eq!((f.endpoint, f.address), (8, layout::TEST_HOOK_IOVA));
        // An endpoint not behind the vIOMMU does nothing.
        h.pio_write(base, 0, &9u32.to_le_bytes());
        assert_eq!(h.dmas.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn sleep_register_powers_off_on_s5_only() {
        let stop = Arc::new(StopFlag::default());
        let mut r = SleepRegisters { stop: stop.clone() };
        let base = PioAddress(layout::ACPI_SLEEP_CONTROL_PORT);
        r.pio_write(base, 0, &[3 << 2 | SLP_EN]); // S3: not ours
        r.pio_write(base, 0, &[layout::ACPI_S5_SLP_TYP << 2]); // no SLP_EN
        assert_eq!(stop.get(), None);
        r.pio_write(base, 0, &[layout::ACPI_S5_SLP_TYP << 2 | SLP_EN]);
        assert_eq!(stop.get(), Some(LinuxEnd::PowerOff));
        // The first end wins.
        stop.set(LinuxEnd::Reset);
        assert_eq!(stop.get(), Some(LinuxEnd::PowerOff));
    }
}
