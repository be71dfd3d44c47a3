//! The virtio-mmio transport, version 2 (virtio 1.3, 4.2.2), on the MMIO
//! exit path: registers, feature negotiation, queue set-up, the status
//! state machine with FEATURES_OK and reset, the config generation, and
//! the device's config space from offset 0x100.
//!
//! Notifications arrive one of two ways, and the transport serves both the
//! same: a QueueNotify write on the MMIO exit path ([`VirtioMmio::write`],
//! served before the write returns to the guest), or a kick the VMM read
//! from an ioeventfd on another thread ([`VirtioMmio::notify_kick`]). The
//! transport tells the VMM when the driver activated or reset the device
//! ([`Lifecycle`]) so that the VMM can wire ioeventfds only while the
//! device runs. Interrupts go through [`MmioInterrupt`]: it sets
//! InterruptStatus and, when the VMM gave it an irqfd, signals that too;
//! the guest may poll its used rings either way. A device error (for
//! instance a guest avail index the queue refuses) puts the device in
//! DEVICE_NEEDS_RESET until the driver resets it; the VMM keeps running.
//!
//! The transport is not shared by itself: a VMM that serves kicks on
//! another thread puts it behind a lock (see `super::iommu::SharedIommu`).
//!
//! Every guest access is checked: registers take aligned 32-bit accesses
//! only, queue registers only while the queue is not ready, features only
//! between DRIVER and FEATURES_OK; anything else is ignored and counted.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_iommu::{DeviceError, VirtioInterrupt};
use vmm_sys_util::eventfd::EventFd;

pub use crate::abi::virtio_mmio::{
    regs, MAGIC, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FAILED, STATUS_FEATURES_OK,
};

/// The modern transport.
pub const VERSION: u32 = 2;
/// Vendor ID reported to the guest ("VMMI").
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"VMMI");

/// The status bits a driver may set.
const DRIVER_STATUS_BITS: u32 =
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED;

/// InterruptStatus: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// InterruptStatus: the configuration (or the device status) changed.
pub const INT_CONFIG: u32 = 2;

/// `VIRTIO_F_VERSION_1`: the modern transport requires it.
const F_VERSION_1: u64 = 1 << 32;

/// A virtio device behind a transport: what the transport needs from it.
pub trait VirtioDevice: Send {
    /// The virtio device ID.
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The features the device offers.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of `features`).
    fn ack_features(&mut self, features: u64);
    /// Reads config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes config space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device on the queues the driver set up.
    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), DeviceError>;
    /// Serves a notification of `queue`.
    fn queue_notify(&mut self, mem: &GuestMemoryMmap, queue: u16) -> Result<(), DeviceError>;
    /// Whether `queue` holds buffers the device has not taken yet, for a
    /// worker that polls before it sleeps; a device whose queues are not
    /// worth polling says false.
    fn queue_pending(&self, _mem: &GuestMemoryMmap, _queue: u16) -> bool {
        false
    }
    /// Serves `queue` for a worker that polls it next: as a notification
    /// would, but a device that can leaves the driver's notifications of
    /// it off while it is watched.
    fn queue_poll_pass(&mut self, mem: &GuestMemoryMmap, queue: u16) -> Result<(), DeviceError> {
        self.queue_notify(mem, queue)
    }
    /// Lets the driver notify `queue` again when the worker stops polling
    /// it; true if buffers came meanwhile that no notification announced.
    fn resume_notifications(
        &mut self,
        _mem: &GuestMemoryMmap,
        _queue: u16,
    ) -> Result<bool, DeviceError> {
        Ok(false)
    }
    /// Does work that waits on something other than a notification (for
    /// the IOMMU: fault records waiting for event buffers).
    fn process_pending(&mut self, mem: &GuestMemoryMmap) -> Result<(), DeviceError>;
    /// Device reset.
    fn reset(&mut self);
}

/// The transport's interrupt: InterruptStatus, and the line behind it
/// when the VMM wired one (an irqfd into KVM's in-kernel irqchip).
///
/// The cause is recorded before the line is raised, so a driver that
/// takes the interrupt finds it in InterruptStatus. Without a line the
/// driver polls (its used rings, or InterruptStatus).
#[derive(Debug, Default)]
pub struct MmioInterrupt {
    status: AtomicU32,
    irqfd: Option<EventFd>,
    raised: AtomicU64,
    failed: AtomicU64,
}

impl MmioInterrupt {
    /// An interrupt with no line: causes are only recorded in
    /// InterruptStatus.
    pub fn polled() -> Self {
        Self::default()
    }

    /// An interrupt that also signals `irqfd` (registered by the VMM as
    /// the irqfd of the transport's GSI).
    pub fn with_irqfd(irqfd: EventFd) -> Self {
        MmioInterrupt {
            irqfd: Some(irqfd),
            ..Self::default()
        }
    }

    /// Records `cause` (`INT_VRING`, `INT_CONFIG`) and raises the line.
    fn raise(&self, cause: u32) -> std::io::Result<()> {
        self.status.fetch_or(cause, Ordering::AcqRel);
        let Some(fd) = &self.irqfd else {
            return Ok(());
        };
        match fd.write(1) {
            Ok(()) => {
                self.raised.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Times the line was raised (irqfd writes that succeeded).
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, _queue: u16) -> std::io::Result<()> {
        self.raise(INT_VRING)
    }
}

/// What a guest register write did to the device's life cycle: a VMM that
/// serves notifications outside the exit path wires them on activation
/// and unwires them on reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Nothing changed.
    Unchanged,
    /// The driver set DRIVER_OK and the device started on its queues.
    Activated,
    /// The driver reset the device (wrote 0 to Status).
    Reset,
}

/// What the transport saw, for the VMM's report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Queue notifications served, by queue (0 and 1; others counted in
    /// `ignored`). On the ioeventfd path one kick may stand for several
    /// QueueNotify writes (the eventfd counts them into one wake-up).
    pub notifications: [u64; 2],
    /// Guest accesses ignored (bad width, bad offset, wrong state).
    pub ignored: u64,
    /// Times the device entered DEVICE_NEEDS_RESET.
    pub needs_reset: u64,
    /// FEATURES_OK writes refused.
    pub features_refused: u64,
    /// Successful activations (DRIVER_OK).
    pub activations: u64,
    /// Device resets by the driver.
    pub resets: u64,
    /// Kicks (ioeventfd notifications) that arrived after the driver had
    /// reset the device: sent before the reset, dropped unserved.
    pub stale_kicks: u64,
    /// Interrupts raised on the line (irqfd writes); 0 without a line.
    pub interrupts: u64,
    /// Interrupts that could not be raised (irqfd write errors).
    pub interrupt_errors: u64,
    /// Passes the device worker ran because its polling found buffers
    /// the driver had not notified (not counted in `notifications`).
    pub polled_passes: u64,
}

/// One queue's registers as the driver wrote them (part of
/// [`TransportState`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRegs {
    /// QueueNumMax (the device's; checked on restore).
    pub max: u16,
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc.
    pub desc: u64,
    /// QueueDriver.
    pub driver: u64,
    /// QueueDevice.
    pub device: u64,
}

/// What the transport holds that the guest can observe, for a snapshot
/// (the device behind it has its own). Counters are not in it: they are
/// the VMM's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportState {
    /// The Status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Each queue's registers.
    pub queues: Vec<QueueRegs>,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
}

/// A transport snapshot that does not fit the transport it is restored
/// into.
#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    /// The queues differ in number or maximum size.
    #[error(
        "the snapshot's queues (maximum sizes {snapshot:?}) are not this device's ({device:?})"
    )]
    Queues {
        /// The snapshot's maximum sizes.
        snapshot: Vec<u16>,
        /// The device's.
        device: Vec<u16>,
    },
    /// The status has bits a driver cannot set.
    #[error("status {0:#x} has bits no driver sets")]
    Status(u32),
    /// The status says the device runs but the device was not activated
    /// (or the other way round).
    #[error("status {status:#x} says the device {}, the device's snapshot says otherwise", if *.running { "runs" } else { "does not run" })]
    Activation {
        /// The status.
        status: u32,
        /// Whether the status says the device runs.
        running: bool,
    },
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// A virtio-mmio window serving one device.
pub struct VirtioMmio<D: VirtioDevice> {
    dev: D,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    interrupt: Arc<MmioInterrupt>,
    config_generation: u32,
    first_notify: Option<Instant>,
    stats: TransportStats,
}

impl<D: VirtioDevice> std::fmt::Debug for VirtioMmio<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmio")
            .field("status", &self.status)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// A transport for `dev`, in reset state, without an interrupt line
    /// (the driver polls).
    pub fn new(dev: D) -> Self {
        Self::with_interrupt(dev, Arc::new(MmioInterrupt::polled()))
    }

    /// A transport for `dev`, in reset state, raising `interrupt`.
    pub fn with_interrupt(dev: D, interrupt: Arc<MmioInterrupt>) -> Self {
        let queues = dev
            .queue_max_sizes()
            .into_iter()
            .map(|max| QueueRegs {
                max,
                ..Default::default()
            })
            .collect();
        VirtioMmio {
            dev,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            interrupt,
            config_generation: 0,
            first_notify: None,
            stats: TransportStats::default(),
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The counters, with the interrupt line's.
    pub fn stats(&self) -> TransportStats {
        TransportStats {
            interrupts: self.interrupt.raised(),
            interrupt_errors: self.interrupt.failed.load(Ordering::Relaxed),
            ..self.stats.clone()
        }
    }

    /// When the first notification of queue 0 was served.
    pub fn first_notify(&self) -> Option<Instant> {
        self.first_notify
    }

    /// The device status byte.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// What a snapshot of the transport carries (with the VMM's vCPUs and
    /// device threads paused).
    pub fn state(&self) -> TransportState {
        TransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
            interrupt_status: self.interrupt.status.load(Ordering::Acquire),
            config_generation: self.config_generation,
        }
    }

    /// Restores `s` into this transport, freshly built for the same
    /// device, and the device behind it with `restore_dev` (given the
    /// device and the transport's interrupt; it says whether the device
    /// came back activated). Checked before anything changes: the queues
    /// must be this device's and the status one a driver could have set,
    /// running exactly when the device came back activated. On error the
    /// transport is as before (the device is as `restore_dev` left it).
    pub fn restore<E: From<TransportRestoreError>>(
        &mut self,
        s: &TransportState,
        restore_dev: impl FnOnce(&mut D, Arc<dyn VirtioInterrupt>) -> Result<bool, E>,
    ) -> Result<(), E> {
        let snapshot: Vec<u16> = s.queues.iter().map(|q| q.max).collect();
        let device: Vec<u16> = self.queues.iter().map(|q| q.max).collect();
        if snapshot != device {
            return Err(TransportRestoreError::Queues { snapshot, device }.into());
        }
        if s.status & !(DRIVER_STATUS_BITS | STATUS_DEVICE_NEEDS_RESET) != 0 {
            return Err(TransportRestoreError::Status(s.status).into());
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let activated = restore_dev(&mut self.dev, interrupt)?;
        // A device that needs a reset may have been activated before.
        let driver_ok = s.status & STATUS_DRIVER_OK != 0;
        let needs_reset = s.status & STATUS_DEVICE_NEEDS_RESET != 0;
        if (driver_ok && !needs_reset && !activated) || (activated && !driver_ok) {
            return Err(TransportRestoreError::Activation {
                status: s.status,
                running: driver_ok && !needs_reset,
            }
            .into());
        }
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.queues.clone_from(&s.queues);
        self.interrupt.status.store(
            s.interrupt_status & (INT_VRING | INT_CONFIG),
            Ordering::Release,
        );
        self.config_generation = s.config_generation;
        Ok(())
    }

    /// Whether the driver has the device running (DRIVER_OK, no
    /// DEVICE_NEEDS_RESET).
    pub fn is_running(&self) -> bool {
        self.running()
    }

    fn running(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_DEVICE_NEEDS_RESET == 0
    }

    fn ignore(&mut self, what: &str, offset: u64) {
        self.stats.ignored += 1;
        debug!("virtio-mmio: ignored {what} at {offset:#x}");
    }

    /// Puts the device in DEVICE_NEEDS_RESET and tells the driver (virtio
    /// 1.3 2.1.2: "the device SHOULD set DEVICE_NEEDS_RESET" and send a
    /// configuration change notification).
    fn fail(&mut self, err: &DeviceError) {
        warn!("virtio-mmio: device error, needs reset: {err}");
        if self.status & STATUS_DEVICE_NEEDS_RESET == 0 {
            self.stats.needs_reset += 1;
        }
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        // A line that cannot be raised is counted; the driver still finds
        // the cause in InterruptStatus and the status byte.
        if let Err(e) = self.interrupt.raise(INT_CONFIG) {
            warn!("virtio-mmio: cannot raise the configuration interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        self.dev.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs {
                max: q.max,
                ..Default::default()
            };
        }
        self.interrupt.status.store(0, Ordering::Release);
        self.stats.resets += 1;
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            self.dev.read_config(offset - regs::CONFIG, data);
            return;
        }
        data.fill(0);
        // virtio 1.3 4.2.2.2: "The driver MUST only use 32 bit wide and
        // aligned reads and writes to access the control registers".
        if data.len() != 4 || offset % 4 != 0 {
            self.ignore("register read of bad width", offset);
            return;
        }
        let sel = self.queues.get(self.queue_sel as usize).copied();
        let v: u32 = match offset {
            regs::MAGIC => MAGIC,
            regs::VERSION => VERSION,
            regs::DEVICE_ID => self.dev.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.dev.features() as u32,
                1 => (self.dev.features() >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => sel.map_or(0, |q| u32::from(q.max)),
            regs::QUEUE_READY => sel.map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status.load(Ordering::Acquire),
            regs::STATUS => self.status,
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH => u32::MAX,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                self.ignore("read of a write-only or unknown register", offset);
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of `data` at `offset` in the window; says whether it
    /// activated or reset the device.
    pub fn write(&mut self, mem: &GuestMemoryMmap, offset: u64, data: &[u8]) -> Lifecycle {
        if offset >= regs::CONFIG {
            // virtio 1.3 4.2.2.2 allows config writes of any width; the
            // device decides what is writable.
            self.dev.write_config(offset - regs::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return Lifecycle::Unchanged;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.ignore("register write of bad width", offset);
            return Lifecycle::Unchanged;
        };
        if offset % 4 != 0 {
            self.ignore("unaligned register write", offset);
            return Lifecycle::Unchanged;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES => self.write_driver_features(v, offset),
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH
            | regs::QUEUE_READY => self.write_queue_reg(offset, v),
            regs::QUEUE_NOTIFY => self.notify(mem, v),
            regs::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::AcqRel);
            }
            regs::STATUS => return self.write_status(mem, v),
            _ => self.ignore("write of a read-only or unknown register", offset),
        }
        Lifecycle::Unchanged
    }

    fn write_driver_features(&mut self, v: u32, offset: u64) {
        // virtio 1.3 3.1.1: features are written after DRIVER and before
        // FEATURES_OK; later writes would change what the device runs with.
        if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
            self.ignore("driver features outside negotiation", offset);
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, v),
            1 => set_high(&mut self.driver_features, v),
            _ => self.ignore("driver features with a bad selector", offset),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        // Queue registers mean nothing once the device runs (virtio 1.3
        // 4.2.2.2: the driver MUST NOT change them while the queue is
        // ready or after DRIVER_OK).
        let locked = self.status & STATUS_DRIVER_OK != 0;
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            self.ignore("queue register of a queue that does not exist", offset);
            return;
        };
        if locked || (q.ready && offset != regs::QUEUE_READY) {
            self.ignore("queue register of a ready queue", offset);
            return;
        }
        match offset {
            // Kept as written (truncated to 16 bits); virtio-queue refuses
            // a size that is zero, above the maximum or not a power of two,
            // so a bad size fails the activation.
            regs::QUEUE_NUM => q.size = v as u16,
            regs::QUEUE_DESC_LOW => set_low(&mut q.desc, v),
            regs::QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
            regs::QUEUE_DRIVER_LOW => set_low(&mut q.driver, v),
            regs::QUEUE_DRIVER_HIGH => set_high(&mut q.driver, v),
            regs::QUEUE_DEVICE_LOW => set_low(&mut q.device, v),
            regs::QUEUE_DEVICE_HIGH => set_high(&mut q.device, v),
            _ => q.ready = v == 1,
        }
    }

    fn notify(&mut self, mem: &GuestMemoryMmap, v: u32) {
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index.
        if !self.running() {
            self.ignore(
                "notification while the device is not running",
                regs::QUEUE_NOTIFY,
            );
            return;
        }
        let Some(queue) = u16::try_from(v)
            .ok()
            .filter(|&q| usize::from(q) < self.queues.len())
        else {
            self.ignore(
                "notification of a queue that does not exist",
                regs::QUEUE_NOTIFY,
            );
            return;
        };
        if queue == 0 && self.first_notify.is_none() {
            self.first_notify = Some(Instant::now());
        }
        if let Some(n) = self.stats.notifications.get_mut(usize::from(queue)) {
            *n += 1;
        }
        if let Err(e) = self.dev.queue_notify(mem, queue) {
            self.fail(&e);
        }
    }

    /// Serves a kick of `queue` that the VMM read from the queue's
    /// ioeventfd (KVM matched the QueueNotify write, so the value was
    /// `queue` and the access 32 bits wide). A kick that finds the device
    /// reset was sent before the reset and is dropped; otherwise it is
    /// served exactly like a QueueNotify write on the exit path (and, like
    /// one, ignored while the device needs a reset).
    pub fn notify_kick(&mut self, mem: &GuestMemoryMmap, queue: u16) {
        if self.status & STATUS_DRIVER_OK == 0 {
            self.stats.stale_kicks += 1;
            debug!("virtio-mmio: kick of queue {queue} after a reset dropped");
            return;
        }
        self.notify(mem, u32::from(queue));
    }

    /// Serves `queue` because the worker's polling found buffers in it:
    /// the same pass as a notification's (and, like one, nothing while the
    /// device is not running), counted apart, since the guest sent no
    /// notification for it.
    pub fn serve_polled(&mut self, mem: &GuestMemoryMmap, queue: u16) {
        if !self.running() || usize::from(queue) >= self.queues.len() {
            return;
        }
        self.stats.polled_passes += 1;
        if let Err(e) = self.dev.queue_poll_pass(mem, queue) {
            self.fail(&e);
        }
    }

    /// The worker stops polling `queue`: the driver notifies it again.
    /// Returns whether buffers came meanwhile that no notification
    /// announced (the worker serves them); false while the device is not
    /// running.
    pub fn end_polling(&mut self, mem: &GuestMemoryMmap, queue: u16) -> bool {
        if !self.running() || usize::from(queue) >= self.queues.len() {
            return false;
        }
        match self.dev.resume_notifications(mem, queue) {
            Ok(pending) => pending,
            Err(e) => {
                self.fail(&e);
                false
            }
        }
    }

    /// Whether `queue` holds buffers the device has not taken yet (false
    /// while the driver has not set the device running).
    pub fn queue_pending(&self, mem: &GuestMemoryMmap, queue: u16) -> bool {
        self.running() && self.dev.queue_pending(mem, queue)
    }

    /// Lets the device do pending work (fault delivery after a DMA); a
    /// no-op while the driver has not set it running.
    pub fn process_pending(&mut self, mem: &GuestMemoryMmap) {
        if !self.running() {
            return;
        }
        if let Err(e) = self.dev.process_pending(mem) {
            self.fail(&e);
        }
    }

    fn write_status(&mut self, mem: &GuestMemoryMmap, v: u32) -> Lifecycle {
        if v == 0 {
            self.reset();
            return Lifecycle::Reset;
        }
        // virtio 1.3 2.1.2: "The driver MUST NOT clear a device status
        // bit"; only a write of 0 (reset) goes back.
        if v & !DRIVER_STATUS_BITS != 0 || self.status & !v & DRIVER_STATUS_BITS != 0 {
            self.ignore("status write that clears or sets device bits", regs::STATUS);
            return Lifecycle::Unchanged;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            // virtio 1.3 3.1.1: the device refuses FEATURES_OK by leaving
            // it clear. It refuses features it did not offer, and a modern
            // transport without VERSION_1.
            let offered = self.dev.features();
            let f = self.driver_features;
            if self.status & STATUS_DRIVER == 0 || f & !offered != 0 || f & F_VERSION_1 == 0 {
                self.stats.features_refused += 1;
                debug!("virtio-mmio: refused driver features {f:#x} (offered {offered:#x})");
                self.status = v & !STATUS_FEATURES_OK;
                return Lifecycle::Unchanged;
            }
            self.dev.ack_features(f);
        }
        if new & STATUS_DRIVER_OK != 0 {
            if self.status & STATUS_FEATURES_OK == 0 && new & STATUS_FEATURES_OK == 0 {
                self.ignore("DRIVER_OK before FEATURES_OK", regs::STATUS);
                return Lifecycle::Unchanged;
            }
            let needs_reset = self.status & STATUS_DEVICE_NEEDS_RESET;
            self.status = v | needs_reset;
            if needs_reset == 0 && self.activate(mem) {
                return Lifecycle::Activated;
            }
            return Lifecycle::Unchanged;
        }
        self.status = v | (self.status & STATUS_DEVICE_NEEDS_RESET);
        Lifecycle::Unchanged
    }

    /// Starts the device; `false` (and DEVICE_NEEDS_RESET) if it cannot.
    fn activate(&mut self, mem: &GuestMemoryMmap) -> bool {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, r) in self.queues.iter().enumerate() {
            match Self::build_queue(r) {
                Ok(q) => queues.push(q),
                Err(source) => {
                    self.fail(&DeviceError::Queue {
                        queue: i as u16,
                        source,
                    });
                    return false;
                }
            }
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        match self.dev.activate(mem, queues, interrupt) {
            Ok(()) => {
                self.stats.activations += 1;
                true
            }
            Err(e) => {
                self.fail(&e);
                false
            }
        }
    }

    /// The device-side queue for what the driver wrote; a size or an
    /// alignment the split ring does not allow is an error, not silently
    /// replaced by the maximum.
    fn build_queue(r: &QueueRegs) -> Result<Queue, virtio_queue::Error> {
        let mut q = Queue::new(r.max)?;
        if r.ready {
            q.try_set_size(r.size)?;
            q.try_set_desc_table_address(GuestAddress(r.desc))?;
            q.try_set_avail_ring_address(GuestAddress(r.driver))?;
            q.try_set_used_ring_address(GuestAddress(r.device))?;
            q.set_ready(true);
        }
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;
    use vmm_iommu::config::IommuConfig;
    use vmm_iommu::VirtioIommu;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn device_and_memory() -> (VirtioIommu, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = VirtioIommu::new(&IommuConfig::default(), &[1], &[(0, (1 << 20) - 1)]).unwrap();
        (dev, mem)
    }

    fn setup() -> (VirtioMmio<VirtioIommu>, GuestMemoryMmap) {
        let (dev, mem) = device_and_memory();
        (VirtioMmio::new(dev), mem)
    }

    fn r(t: &mut VirtioMmio<VirtioIommu>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut VirtioMmio<VirtioIommu>, mem: &GuestMemoryMmap, off: u64, v: u32) {
        t.write(mem, off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut VirtioMmio<VirtioIommu>, mem: &GuestMemoryMmap, features: u64) {
        w(t, mem, regs::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, mem, regs::DRIVER_FEATURES_SEL, 0);
        w(t, mem, regs::DRIVER_FEATURES, features as u32);
        w(t, mem, regs::DRIVER_FEATURES_SEL, 1);
        w(t, mem, regs::DRIVER_FEATURES, (features >> 32) as u32);
        let s = r(t, regs::STATUS);
        w(t, mem, regs::STATUS, s | STATUS_FEATURES_OK);
    }

    #[test]
    fn identity_registers_read_as_a_modern_iommu() {
        let (mut t, _) = setup();
        assert_eq!(r(&mut t, regs::MAGIC), MAGIC);
        assert_eq!(r(&mut t, regs::VERSION), 2);
        assert_eq!(r(&mut t, regs::DEVICE_ID), 23);
        // QueueSel 0 is the request queue.
        assert!(r(&mut t, regs::QUEUE_NUM_MAX) >= 64);
        assert_eq!(r(&mut t, regs::SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn features_without_version_1_or_not_offered_are_refused() {
        let (mut t, mem) = setup();
        let offered = t.device().avail_features();
        negotiate(&mut t, &mem, offered & !F_VERSION_1);
        assert_eq!(r(&mut t, regs::STATUS) & STATUS_FEATURES_OK, 0);
        w(&mut t, &mem, regs::STATUS, 0);
        negotiate(&mut t, &mem, offered | (1 << 50));
        assert_eq!(r(&mut t, regs::STATUS) & STATUS_FEATURES_OK, 0);
        w(&mut t, &mem, regs::STATUS, 0);
        negotiate(&mut t, &mem, F_VERSION_1);
        assert_ne!(r(&mut t, regs::STATUS) & STATUS_FEATURES_OK, 0);
        assert_eq!(t.stats().features_refused, 2);
    }

    #[test]
    fn driver_ok_without_ready_queues_asks_for_a_reset() {
        let (mut t, mem) = setup();
        negotiate(&mut t, &mem, F_VERSION_1);
        let s = r(&mut t, regs::STATUS);
        w(&mut t, &mem, regs::STATUS, s | STATUS_DRIVER_OK);
        assert_ne!(r(&mut t, regs::STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, regs::INTERRUPT_STATUS) & INT_CONFIG, 0);
        // Notifications are ignored until the reset.
        w(&mut t, &mem, regs::QUEUE_NOTIFY, 0);
        assert_eq!(t.stats().notifications, [0, 0]);
        w(&mut t, &mem, regs::STATUS, 0);
        assert_eq!(r(&mut t, regs::STATUS), 0);
        assert_eq!(t.stats().needs_reset, 1);
    }

    #[test]
    fn bad_widths_cleared_status_bits_and_read_only_writes_are_ignored() {
        let (mut t, mem) = setup();
        let mut b = [0xffu8; 2];
        t.read(regs::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(&mem, regs::STATUS, &[1]);
        w(&mut t, &mem, regs::MAGIC, 0);
        w(
            &mut t,
            &mem,
            regs::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
        );
        w(&mut t, &mem, regs::STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(r(&mut t, regs::STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(r(&mut t, regs::MAGIC), MAGIC);
        assert_eq!(t.stats().ignored, 4);
    }

    /// Sets both queues up: 16 entries each, rings in the first pages.
    fn ready_queues(t: &mut VirtioMmio<VirtioIommu>, mem: &GuestMemoryMmap) {
        for (q, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            w(t, mem, regs::QUEUE_SEL, q);
            w(t, mem, regs::QUEUE_NUM, 16);
            w(t, mem, regs::QUEUE_DESC_LOW, base);
            w(t, mem, regs::QUEUE_DRIVER_LOW, base + 0x100);
            w(t, mem, regs::QUEUE_DEVICE_LOW, base + 0x200);
            w(t, mem, regs::QUEUE_READY, 1);
        }
    }

    fn set_status(t: &mut VirtioMmio<VirtioIommu>, mem: &GuestMemoryMmap, v: u32) -> Lifecycle {
        t.write(mem, regs::STATUS, &v.to_le_bytes())
    }

    /// A transport whose interrupt signals the returned eventfd.
    fn setup_with_line() -> (VirtioMmio<VirtioIommu>, GuestMemoryMmap, EventFd) {
        let (dev, mem) = device_and_memory();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let line = Arc::new(MmioInterrupt::with_irqfd(evt.try_clone().unwrap()));
        (VirtioMmio::with_interrupt(dev, line), mem, evt)
    }

    #[test]
    fn driver_ok_reports_activation_and_a_status_of_zero_reports_reset() {
        let (mut t, mem) = setup();
        negotiate(&mut t, &mem, F_VERSION_1);
        ready_queues(&mut t, &mem);
        let s = r(&mut t, regs::STATUS);
        assert_eq!(
            set_status(&mut t, &mem, s | STATUS_DRIVER_OK),
            Lifecycle::Activated
        );
        assert_eq!(
            t.write(&mem, regs::QUEUE_NOTIFY, &0u32.to_le_bytes()),
            Lifecycle::Unchanged
        );
        assert_eq!(set_status(&mut t, &mem, 0), Lifecycle::Reset);
        assert_eq!((t.stats().activations, t.stats().resets), (1, 1));
    }

    #[test]
    fn driver_ok_that_fails_to_activate_is_not_an_activation() {
        let (mut t, mem) = setup();
        negotiate(&mut t, &mem, F_VERSION_1);
        let s = r(&mut t, regs::STATUS);
        assert_eq!(
            set_status(&mut t, &mem, s | STATUS_DRIVER_OK),
            Lifecycle::Unchanged
        );
        assert_ne!(r(&mut t, regs::STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn kick_is_served_while_running_and_dropped_as_stale_after_a_reset() {
        let (mut t, mem) = setup();
        negotiate(&mut t, &mem, F_VERSION_1);
        ready_queues(&mut t, &mem);
        let s = r(&mut t, regs::STATUS);
        set_status(&mut t, &mem, s | STATUS_DRIVER_OK);
        t.notify_kick(&mem, 0);
        assert_eq!(t.stats().notifications, [1, 0]);
        set_status(&mut t, &mem, 0);
        t.notify_kick(&mem, 1);
        let st = t.stats();
        assert_eq!(
            (st.notifications, st.stale_kicks, st.ignored),
            ([1, 0], 1, 0)
        );
    }

    #[test]
    fn a_polled_pass_is_served_while_running_and_counted_apart_from_notifications() {
        use vm_memory::Bytes;
        use vmm_iommu::testing::DriverQueue;
        use vmm_iommu::wire::{AttachReq, Request};
        let (mut t, mem) = setup();
        // Before DRIVER_OK nothing is served or counted.
        t.serve_polled(&mem, 0);
        assert_eq!(t.stats().polled_passes, 0);
        assert!(!t.end_polling(&mem, 0));
        negotiate(&mut t, &mem, F_VERSION_1);
        ready_queues(&mut t, &mem);
        // The request queue where a driver's rings lie.
        let mut dq = DriverQueue::new(&mem, GuestAddress(0x8000), 16);
        let q = dq.device_queue();
        w(&mut t, &mem, regs::QUEUE_SEL, 0);
        w(&mut t, &mem, regs::QUEUE_READY, 0);
        w(&mut t, &mem, regs::QUEUE_DESC_LOW, q.desc_table() as u32);
        w(&mut t, &mem, regs::QUEUE_DRIVER_LOW, q.avail_ring() as u32);
        w(&mut t, &mem, regs::QUEUE_DEVICE_LOW, q.used_ring() as u32);
        w(&mut t, &mem, regs::QUEUE_READY, 1);
        let s = r(&mut t, regs::STATUS);
        set_status(&mut t, &mem, s | STATUS_DRIVER_OK);
        assert!(!t.queue_pending(&mem, 0), "nothing published");
        let req = Request::Attach(AttachReq {
            domain: 1,
            endpoint: 1,
            ..Default::default()
        })
        .encode();
        mem.write_slice(&req, GuestAddress(0x9000)).unwrap();
        dq.add_chain(
            &mem,
            &[
                (GuestAddress(0x9000), req.len() as u32, false),
                (GuestAddress(0x9100), 4, true),
            ],
        );
        dq.kick(&mem);
        assert!(t.queue_pending(&mem, 0), "a published request");
        t.serve_polled(&mem, 0);
        t.serve_polled(&mem, 7);
        assert!(!t.queue_pending(&mem, 0), "taken by the polled pass");
        assert_eq!(dq.pop_used(&mem).map(|(_, len)| len), Some(4));
        let ep = t.device().viommu().state().endpoint(1);
        assert_eq!(ep.and_then(|e| e.domain), Some(1), "the ATTACH was applied");
        let st = t.stats();
        assert_eq!(
            (st.polled_passes, st.notifications, st.ignored),
            (1, [0, 0], 0)
        );
        // The polled pass left the driver's notifications off; a request
        // published now comes unannounced, and ending the polling turns
        // them back on and reports it.
        let old = dq.avail_idx();
        dq.add_chain(
            &mem,
            &[
                (GuestAddress(0x9000), req.len() as u32, false),
                (GuestAddress(0x9100), 4, true),
            ],
        );
        dq.kick(&mem);
        assert!(!dq.device_wants_notification(&mem, old, false));
        assert!(t.end_polling(&mem, 0), "a request came unannounced");
        t.serve_polled(&mem, 0);
        assert_eq!(dq.pop_used(&mem).map(|(_, len)| len), Some(4));
        assert!(!t.end_polling(&mem, 0), "nothing came since");
        assert!(dq.device_wants_notification(&mem, old, false));
    }

    #[test]
    fn interrupt_with_an_irqfd_records_the_cause_then_signals_the_line() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let line = MmioInterrupt::with_irqfd(evt.try_clone().unwrap());
        line.trigger(0).unwrap();
        line.trigger(1).unwrap();
        assert_eq!(line.status.load(Ordering::Acquire), INT_VRING);
        assert_eq!(evt.read().unwrap(), 2);
        assert_eq!(line.raised(), 2);
        let polled = MmioInterrupt::polled();
        polled.trigger(0).unwrap();
        assert_eq!(polled.status.load(Ordering::Acquire), INT_VRING);
        assert_eq!(polled.raised(), 0);
    }

    #[test]
    fn device_error_raises_the_configuration_interrupt_on_the_line() {
        let (mut t, mem, evt) = setup_with_line();
        negotiate(&mut t, &mem, F_VERSION_1);
        let s = r(&mut t, regs::STATUS);
        set_status(&mut t, &mem, s | STATUS_DRIVER_OK);
        assert_eq!(r(&mut t, regs::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(t.stats().interrupts, 1);
    }

    #[test]
    fn queue_registers_of_a_missing_queue_are_ignored() {
        let (mut t, mem) = setup();
        w(&mut t, &mem, regs::QUEUE_SEL, 7);
        w(&mut t, &mem, regs::QUEUE_NUM, 8);
        assert_eq!(r(&mut t, regs::QUEUE_NUM_MAX), 0);
        assert_eq!(t.stats().ignored, 1);
    }
}
