//! The virtio-iommu device model: features, config space, and the request
//! and event queues over `virtio-queue` and `vm-memory`.
//!
//! Transport-agnostic: the VMM's MMIO or PCI transport forwards feature
//! negotiation, config-space accesses, queue set-up and notifications here.
//! A request goes one way: descriptors gathered once, decoded once by
//! [`crate::wire`], applied once by [`crate::viommu`], status written once.
//! Guest mistakes become statuses (and counters); only VMM-side faults
//! (queue memory the VMM never mapped) become [`DeviceError`]s.

use std::sync::Arc;

mod chain;
mod eventq;
mod guest_bytes;
mod invalidate;
mod lifecycle;
mod probe;
mod ram;
mod used;
mod warm;

use invalidate::DeferredInvalidate;

use log::debug;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::config::IommuConfig;
use crate::viommu::{Applied, RequestRun, Viommu};
use crate::wire::{
    self, ConfigSpace, DecodeError, Request, Status, CONFIG_BYPASS_OFFSET, EVENT_QUEUE,
    MAX_READABLE_SIZE, REQUEST_QUEUE, TAIL_SIZE, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
    VIRTIO_IOMMU_F_ATTACH_TABLE, VIRTIO_IOMMU_F_BYPASS, VIRTIO_IOMMU_F_BYPASS_CONFIG,
    VIRTIO_IOMMU_F_DOMAIN_RANGE, VIRTIO_IOMMU_F_INPUT_RANGE, VIRTIO_IOMMU_F_MAP_UNMAP,
    VIRTIO_IOMMU_F_MMIO, VIRTIO_IOMMU_F_PAGE_REQUEST, VIRTIO_IOMMU_F_PROBE,
    VIRTIO_IOMMU_T_ATTACH_TABLE, VIRTIO_IOMMU_T_INVALIDATE, VIRTIO_IOMMU_T_PAGE_RESP,
};

/// Ring feature: indirect descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Ring feature: used/avail event index suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Served chains a pass publishes to the used ring at a time: a driver
/// waiting on an early request of a long pass need not wait for the
/// whole pass.
const USED_BATCH: usize = 32;

/// Largest request queue the device accepts.
pub const REQUEST_QUEUE_SIZE: u16 = 1024;
/// Largest event queue the device accepts.
pub const EVENT_QUEUE_SIZE: u16 = 64;

/// Most device-writable descriptors one request may carry. The chain is
/// already bounded by the queue size; this bounds our scratch space even
/// for indirect tables.
const MAX_WRITABLE_SEGMENTS: usize = 1024;

/// Raises the interrupt of a queue (the transport's job: irqfd, MSI-X, or
/// an interrupt-status register).
pub trait VirtioInterrupt: Send + Sync {
    /// Signals that the used ring of `queue` has new entries.
    fn trigger(&self, queue: u16) -> std::io::Result<()>;
}

/// A fault of the VMM side, not of the guest.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A queue operation failed on memory the VMM gave us.
    #[error("queue {queue}: {source}")]
    Queue {
        /// The queue index.
        queue: u16,
        /// The virtio-queue error.
        #[source]
        source: virtio_queue::Error,
    },
    /// The interrupt could not be raised.
    #[error("queue {queue}: cannot raise interrupt: {source}")]
    Interrupt {
        /// The queue index.
        queue: u16,
        /// The error from the transport.
        #[source]
        source: std::io::Error,
    },
    /// A queue handed to `activate` is not valid in guest memory.
    #[error("queue {0} is not valid (size, alignment or rings outside guest memory)")]
    InvalidQueue(u16),
    /// The device is not activated.
    #[error("device is not activated")]
    NotActivated,
    /// The fault eventfd could not be created.
    #[error("cannot create the fault eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Counters of what the device has done, for the VMM and the demo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStats {
    /// Requests decoded, by type (index = type byte, 1..=8).
    pub requests: [u64; 9],
    /// Statuses written, by status code.
    pub statuses: [u64; 9],
    /// Chains returned unwritten because the type was unknown.
    pub unknown_type: u64,
    /// Chains returned unwritten because no tail fitted.
    pub no_tail: u64,
    /// Mappings removed by UNMAP.
    pub unmapped: u64,
    /// Fault records written to the event queue.
    pub faults_delivered: u64,
    /// Event buffers returned unused because they were too small.
    pub event_buffers_too_small: u64,
    /// Queue notifications processed.
    pub notifications: u64,
    /// Lowest IOVA of any MAP answered OK (`u64::MAX` before the first).
    pub mapped_iova_lowest: u64,
    /// Highest IOVA (inclusive end) of any MAP answered OK (0 before the first).
    pub mapped_iova_highest: u64,
    /// ATTACH requests with `VIRTIO_IOMMU_ATTACH_F_BYPASS` answered OK.
    pub bypass_attaches: u64,
}

impl Default for DeviceStats {
    fn default() -> Self {
        DeviceStats {
            requests: [0; 9],
            statuses: [0; 9],
            unknown_type: 0,
            no_tail: 0,
            unmapped: 0,
            faults_delivered: 0,
            event_buffers_too_small: 0,
            notifications: 0,
            mapped_iova_lowest: u64::MAX,
            mapped_iova_highest: 0,
            bypass_attaches: 0,
        }
    }
}

/// The virtio-iommu device.
///
/// The transport (virtio-mmio or virtio-pci) forwards feature negotiation,
/// config space, queue set-up and notifications here; the crate root lists
/// the calls, `examples/emulated_device.rs` shows a whole transport.
///
/// ```
/// use std::sync::Arc;
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
/// use vmm_iommu::config::IommuConfig;
/// use vmm_iommu::VIRTIO_RING_F_EVENT_IDX;
/// use vmm_iommu::{FaultReason, ACCESS_READ};
/// use vmm_iommu::testing::{CountingInterrupt, DriverQueue};
/// use vmm_iommu::wire::{AttachReq, Request, Status, REQUEST_QUEUE};
/// use vmm_iommu::VirtioIommu;
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)])?;
/// let mut dev = VirtioIommu::new(&IommuConfig::default(), &[8], &[(0, (16 << 20) - 1)])?;
/// assert_eq!(dev.device_type(), 23);
///
/// // FEATURES_OK: the features the driver accepted.
/// dev.set_acked_features(dev.avail_features() & !(1 << VIRTIO_RING_F_EVENT_IDX));
/// // DRIVER_OK: the queues the driver set up. `DriverQueue` plays the
/// // guest's side; a VMM builds each `virtio_queue::Queue` from the
/// // addresses the driver wrote into the transport's queue registers.
/// let mut requestq = DriverQueue::new(&mem, GuestAddress(0x1_0000), 16);
/// let eventq = DriverQueue::new(&mem, GuestAddress(0x2_0000), 8);
/// let irq = Arc::new(CountingInterrupt::default());
/// dev.activate(&mem, requestq.device_queue(), eventq.device_queue(), irq.clone())?;
///
/// // The guest queues an ATTACH (request at 0x3000, status at 0x3100) and
/// // notifies the request queue; the VMM serves the notification.
/// let req = Request::Attach(AttachReq { domain: 1, endpoint: 8, ..Default::default() });
/// let bytes = req.encode();
/// mem.write_slice(&bytes, GuestAddress(0x3000))?;
/// let chain = [
///     (GuestAddress(0x3000), bytes.len() as u32, false),
///     (GuestAddress(0x3100), 4, true),
/// ];
/// requestq.add_chain(&mem, &chain);
/// requestq.kick(&mem);
/// assert_eq!(dev.process_requestq(&mem)?, 1);
///
/// assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3100))?, Status::Ok as u8);
/// assert_eq!(irq.count(REQUEST_QUEUE), 1);
/// // Endpoint 8 is in domain 1 now: its DMA faults on the mapping, not the domain.
/// assert_eq!(dev.viommu().translate(8, 0, ACCESS_READ), Err(FaultReason::Mapping));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct VirtioIommu {
    viommu: Arc<Viommu>,
    config: ConfigSpace,
    initial_bypass: u8,
    avail_features: u64,
    acked_features: u64,
    requestq: Option<Queue>,
    eventq: Option<Queue>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    stats: DeviceStats,
    writable: Vec<(GuestAddress, u32)>,
    probe_buf: Vec<u8>,
    /// Chains a pass has served but not yet put in the used ring:
    /// `(head, used length)`, published together (see `publish_used`).
    completed: Vec<(u16, u32)>,
    /// The request queue's used ring beyond the `Queue` (reset with it).
    used: used::UsedRing,
    /// The (domain, IOVA) of the MAPs and UNMAPs a pass is about to serve,
    /// read ahead to warm their mapping-table lookups (kept to reuse its
    /// buffer; at most a queue's worth).
    table_hints: warm::TableHints,
    /// INVALIDATEs of the current notification, answered together once
    /// every backend applied them.
    pending: Vec<DeferredInvalidate>,
}

impl std::fmt::Debug for VirtioIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioIommu")
            .field("config", &self.config)
            .field("avail_features", &self.avail_features)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.requestq.is_some())
            .finish()
    }
}

/// Page sizes the software walker handles in a page-table format: 4K,
/// 2M, 1G for x86-64; 4K, 64K and their blocks (2M, 1G, 512M) for Arm.
fn walker_page_sizes(page_table_format: u16) -> u64 {
    match page_table_format {
        wire::VIRTIO_IOMMU_PGTF_X86_64 => (1 << 12) | (1 << 21) | (1 << 30),
        _ => (1 << 12) | (1 << 16) | (1 << 21) | (1 << 29) | (1 << 30),
    }
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

impl VirtioIommu {
    /// A device for `endpoints` (the endpoint IDs the VM config puts behind
    /// it) over guest RAM made of the inclusive ranges `ram`.
    pub fn new(
        cfg: &IommuConfig,
        endpoints: &[u32],
        ram: &[(u64, u64)],
    ) -> Result<Self, DeviceError> {
        let viommu = Arc::new(Viommu::new(cfg, endpoints, ram).map_err(DeviceError::EventFd)?);
        Ok(Self::with_viommu(viommu))
    }

    /// A device over an existing vIOMMU (one built with backends, see
    /// [`Viommu::with_router`]), offering what the vIOMMU's config says
    /// ([`Viommu::config`]: one source of truth). The nested extension is
    /// offered when the config enables it; page requests when a backend
    /// can send them.
    pub fn with_viommu(viommu: Arc<Viommu>) -> Self {
        let cfg = &viommu.config().clone();
        // F_MMIO is offered whether or not the VMM registered MMIO windows
        // (Viommu::add_mmio_window), for two reasons. Windows come and go
        // while the guest runs (a BAR is registered when the guest places
        // it), but features are fixed at FEATURES_OK. And Linux's driver
        // maps its software MSI doorbell with IOMMU_MMIO when PROBE reports
        // no MSI region (Arm); without F_MMIO its own viommu_map_pages
        // refuses that map (-EINVAL), with it the device answers per
        // window (RANGE outside them). x86 Linux never sets the flag.
        let mut avail = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_IOMMU_F_INPUT_RANGE)
            | bit(VIRTIO_IOMMU_F_DOMAIN_RANGE)
            | bit(VIRTIO_IOMMU_F_MAP_UNMAP)
            | bit(VIRTIO_IOMMU_F_PROBE)
            | bit(VIRTIO_IOMMU_F_MMIO);
        // spec 5.13.3.2: "New devices SHOULD NOT offer VIRTIO_IOMMU_F_BYPASS.
        // Devices SHOULD NOT offer both VIRTIO_IOMMU_F_BYPASS and
        // VIRTIO_IOMMU_F_BYPASS_CONFIG." Legacy BYPASS only on request.
        if !cfg.offer_bypass {
            // Neither: unattached endpoints are always blocked.
        } else if cfg.legacy_bypass {
            avail |= bit(VIRTIO_IOMMU_F_BYPASS);
        } else {
            avail |= bit(VIRTIO_IOMMU_F_BYPASS_CONFIG);
        }
        if cfg.access_platform {
            avail |= bit(VIRTIO_F_ACCESS_PLATFORM);
        }
        if cfg.nested.is_some() {
            avail |= bit(VIRTIO_IOMMU_F_ATTACH_TABLE);
            let router = viommu.router();
            let page_requests = viommu
                .state()
                .endpoint_ids()
                .any(|ep| router.caps(ep).is_some_and(|c| c.page_requests));
            if page_requests {
                avail |= bit(VIRTIO_IOMMU_F_PAGE_REQUEST);
            }
        }
        let bypass = u8::from(cfg.bypass && !cfg.legacy_bypass);
        let config = ConfigSpace {
            // spec 5.13.4.2: "The device MUST set at least one bit in
            // page_size_mask" — the config validation guarantees it.
            page_size_mask: viommu.page_size_mask(),
            input_start: viommu.input_range().0,
            input_end: viommu.input_range().1,
            domain_start: cfg.domain_range.start,
            domain_end: cfg.domain_range.end,
            probe_size: cfg.probe_size,
            bypass,
        };
        let dev = VirtioIommu {
            viommu,
            config,
            initial_bypass: bypass,
            avail_features: avail,
            acked_features: 0,
            requestq: None,
            eventq: None,
            interrupt: None,
            stats: DeviceStats::default(),
            writable: Vec::new(),
            completed: Vec::new(),
            used: used::UsedRing::default(),
            table_hints: warm::TableHints::default(),
            probe_buf: Vec::new(),
            pending: Vec::new(),
        };
        dev.update_bypass();
        dev
    }

    /// The virtio device type (23).
    pub fn device_type(&self) -> u32 {
        wire::VIRTIO_ID_IOMMU
    }

    /// Maximum sizes of the request queue and the event queue.
    pub fn queue_max_sizes(&self) -> [u16; 2] {
        [REQUEST_QUEUE_SIZE, EVENT_QUEUE_SIZE]
    }

    /// The shared vIOMMU (for translators and inspection).
    pub fn viommu(&self) -> &Arc<Viommu> {
        &self.viommu
    }

    /// Features the device offers.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records the driver's accepted features; bits the device did not
    /// offer are dropped.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
        self.viommu.set_acked_features(self.acked_features);
        let page_requests = self.negotiated(VIRTIO_IOMMU_F_PAGE_REQUEST);
        for b in self.viommu.router().all() {
            b.set_page_requests(page_requests);
        }
        self.update_bypass();
    }

    fn negotiated(&self, b: u32) -> bool {
        self.acked_features & bit(b) != 0
    }

    /// Applies the spec's bypass rules for endpoints attached to no domain
    /// (spec 5.13.6, "An endpoint is in bypass mode if").
    fn update_bypass(&self) {
        let on = if self.avail_features & bit(VIRTIO_IOMMU_F_BYPASS_CONFIG) != 0 {
            // "This applies even if the driver does not accept the
            // VIRTIO_IOMMU_F_BYPASS_CONFIG feature".
            self.config.bypass == 1
        } else {
            self.negotiated(VIRTIO_IOMMU_F_BYPASS)
        };
        self.viommu.set_unattached_bypass(on);
    }

    /// The config space as the driver sees it.
    pub fn config(&self) -> ConfigSpace {
        self.config
    }

    /// Reads `data.len()` bytes of config space at `offset`; bytes past the
    /// end read as zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.config.encode();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| bytes.get(o).copied())
                .unwrap_or(0);
        }
    }

    /// Writes config space. Only `bypass` is writable, only once
    /// BYPASS_CONFIG is negotiated, and only with 0 or 1; anything else is
    /// ignored (and counted in the log).
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        // spec 5.13.4.1: "When the VIRTIO_IOMMU_F_BYPASS_CONFIG feature is
        // negotiated, the driver MAY write to bypass. The driver MUST NOT
        // write to any other device configuration field."
        if offset != CONFIG_BYPASS_OFFSET as u64
            || data.len() != 1
            || !self.negotiated(VIRTIO_IOMMU_F_BYPASS_CONFIG)
        {
            debug!(
                "virtio-iommu: ignored config write at {offset} of {} bytes",
                data.len()
            );
            return;
        }
        // spec 5.13.4.2: "The device MUST NOT present a value different than
        // 0 or 1 in bypass."
        if data[0] > 1 {
            debug!("virtio-iommu: ignored bypass value {}", data[0]);
            return;
        }
        self.config.bypass = data[0];
        self.update_bypass();
    }

    /// Takes the queues the driver set up and starts serving them.
    pub fn activate<M: GuestMemory>(
        &mut self,
        mem: &M,
        mut requestq: Queue,
        mut eventq: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), DeviceError> {
        if !requestq.is_valid(mem) {
            return Err(DeviceError::InvalidQueue(REQUEST_QUEUE));
        }
        if !eventq.is_valid(mem) {
            return Err(DeviceError::InvalidQueue(EVENT_QUEUE));
        }
        let event_idx = self.negotiated(VIRTIO_RING_F_EVENT_IDX);
        requestq.set_event_idx(event_idx);
        eventq.set_event_idx(event_idx);
        self.requestq = Some(requestq);
        self.used = used::UsedRing::default();
        self.eventq = Some(eventq);
        self.interrupt = Some(interrupt);
        Ok(())
    }

    /// Whether `activate` has run since the last reset.
    pub fn is_activated(&self) -> bool {
        self.requestq.is_some()
    }

    /// Device reset: queues dropped, endpoints detached, domains and
    /// pending faults gone. `bypass` keeps its value: spec 5.13.4.2 "Field
    /// bypass SHOULD NOT change on device reset".
    pub fn reset(&mut self) {
        self.requestq = None;
        self.eventq = None;
        self.interrupt = None;
        self.acked_features = 0;
        self.pending.clear();
        self.completed.clear();
        self.used = used::UsedRing::default();
        for b in self.viommu.router().all() {
            b.set_page_requests(false);
        }
        self.viommu.reset();
        self.update_bypass();
    }

    /// System reset: a device reset that also restores `bypass` to its
    /// initial value (spec 5.13.4.2: "SHOULD be restored to its initial
    /// value on system reset").
    pub fn system_reset(&mut self) {
        self.config.bypass = self.initial_bypass;
        self.reset();
    }

    /// Counters.
    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    fn signal(&self, queue: u16) -> Result<(), DeviceError> {
        if let Some(i) = &self.interrupt {
            i.trigger(queue)
                .map_err(|source| DeviceError::Interrupt { queue, source })?;
        }
        Ok(())
    }

    /// Serves every available request (call on a request-queue
    /// notification). Returns the number of chains completed.
    pub fn process_requestq<M: GuestMemory>(&mut self, mem: &M) -> Result<usize, DeviceError> {
        self.serve_requestq(mem, false)
    }

    /// Serves every available request as [`Self::process_requestq`] does,
    /// but leaves the driver's notifications suppressed afterwards
    /// (`VIRTQ_USED_F_NO_NOTIFY`, or with `VIRTIO_F_EVENT_IDX` an avail
    /// event left behind): for a worker that polls the queue next, so that
    /// a driver publishing while it is watched need not notify (a VM exit
    /// saved per request; QEMU's IOThread polling does the same). When
    /// the worker stops polling it must call
    /// [`Self::resume_requestq_notifications`], and serve again if that
    /// returns true; [`Self::process_requestq`] also lets the driver notify
    /// again.
    pub fn process_requestq_polling<M: GuestMemory>(
        &mut self,
        mem: &M,
    ) -> Result<usize, DeviceError> {
        self.serve_requestq(mem, true)
    }

    /// Lets the driver notify the request queue again after
    /// [`Self::process_requestq_polling`]. Returns whether requests were
    /// published that no notification will announce (the driver saw them
    /// suppressed): the caller serves them. Ok(false) before activation.
    pub fn resume_requestq_notifications<M: GuestMemory>(
        &mut self,
        mem: &M,
    ) -> Result<bool, DeviceError> {
        let Some(q) = self.requestq.as_mut() else {
            return Ok(false);
        };
        q.enable_notification(mem)
            .map_err(|source| DeviceError::Queue {
                queue: REQUEST_QUEUE,
                source,
            })
    }

    fn serve_requestq<M: GuestMemory>(
        &mut self,
        mem: &M,
        polling: bool,
    ) -> Result<usize, DeviceError> {
        let mut q = self.requestq.take().ok_or(DeviceError::NotActivated)?;
        // Plain memory underneath (the usual case: this device's own
        // accesses are not translated): through `Ram`'s lean slices.
        let res = match mem.physical_memory() {
            Some(ram) => self.drain_requestq(&ram::Ram::new(ram), &mut q, polling),
            None => self.drain_requestq(mem, &mut q, polling),
        };
        self.requestq = Some(q);
        let (done, notify) = res?;
        if notify {
            self.signal(REQUEST_QUEUE)?;
        }
        Ok(done)
    }

    /// Whether the request queue holds requests the device has not taken
    /// yet: the cheap look a polling worker makes (one load of the
    /// driver's avail index) before it calls
    /// [`VirtioIommu::process_requestq`]. False before activation, and for
    /// an avail ring the device cannot read (the pass then reports it).
    pub fn requestq_pending<M: GuestMemory>(&self, mem: &M) -> bool {
        self.requestq.as_ref().is_some_and(|q| {
            q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != q.next_avail())
        })
    }

    /// Serves the request queue until it is empty; with `polling`, leaves
    /// the driver's notifications off at the end.
    fn drain_requestq<M: GuestMemory>(
        &mut self,
        mem: &M,
        q: &mut Queue,
        polling: bool,
    ) -> Result<(usize, bool), DeviceError> {
        let qerr = |source| DeviceError::Queue {
            queue: REQUEST_QUEUE,
            source,
        };
        self.stats.notifications += 1;
        let mut done = 0;
        loop {
            q.disable_notification(mem).map_err(qerr)?;
            self.table_hints.clear();
            let state = self.viommu.state();
            let wanted = state.warming_pays() && self.table_hints.wanted();
            warm::warm_pending(mem, q, wanted.then_some(&mut self.table_hints));
            if !self.table_hints.hints.is_empty() {
                let h = &mut self.table_hints;
                state.warm_mappings(&h.hints, &mut h.slots);
                h.warmed();
            }
            drop(state);
            // The pass position of the next chain taken, for the hints.
            let mut pos = 0u32;
            // One look at the avail index serves up to a used batch: the
            // index is the driver's hot line, read again only between
            // batches (and chains published meanwhile are found then).
            let viommu = Arc::clone(&self.viommu);
            // The descriptor table as one slice of RAM, for the chains'
            // walks (`chain::Descriptors`); the driver cannot move it while
            // the queue is ready.
            let (desc_table, queue_size) = (q.desc_table(), q.size());
            let table = mem.physical_memory().and_then(|ram| {
                let r = ram.find_region(GuestAddress(desc_table))?;
                let off = desc_table.checked_sub(r.start_addr().0)?;
                r.get_slice(MemoryRegionAddress(off), 16 * usize::from(queue_size))
                    .ok()
            });
            loop {
                let mut chains = match q.iter(mem) {
                    Ok(it) => it,
                    Err(e) => {
                        // What was served before stays served.
                        self.publish_used(mem, q)?;
                        return Err(qerr(e));
                    }
                };
                let mut took = false;
                // The batch's requests apply under one hold of the state's
                // lock, released before they are published. Not over
                // memory that translates: its misses may take the lock.
                let mut run = viommu.run();
                if mem.physical_memory().is_none() {
                    run = run.one_at_a_time();
                }
                for chain in chains.by_ref() {
                    took = true;
                    if self.table_hints.pending() {
                        if let Some((domain, slot)) = self.table_hints.slot_at(pos) {
                            run.state_mut().hint_slot(domain, slot);
                        }
                    }
                    pos = pos.wrapping_add(1);
                    let head = chain.head_index();
                    let descs = chain::Descriptors::new(
                        mem,
                        table.as_ref(),
                        GuestAddress(desc_table),
                        queue_size,
                        head,
                    );
                    if let Some(len) = self.handle_chain(mem, head, descs, &mut run) {
                        self.completed.push((head, len));
                        if self.completed.len() >= USED_BATCH {
                            break;
                        }
                    }
                }
                drop(run);
                if self.completed.len() >= USED_BATCH {
                    done += self.publish_used(mem, q)?;
                }
                if !took {
                    break;
                }
            }
            self.flush_invalidations(mem);
            done += self.publish_used(mem, q)?;
            // Polling: the worker looks at the queue next, and lets the
            // driver notify again when it stops.
            if polling || !q.enable_notification(mem).map_err(qerr)? {
                break;
            }
        }
        let notify = done > 0 && self.used.needs_notification(mem, q).map_err(qerr)?;
        Ok((done, notify))
    }

    /// Puts the served chains in the used ring, in the order they were
    /// served; returns how many.
    ///
    /// Together rather than one by one: each used entry also stores the
    /// used index, and a driver polling that index (Linux's does) takes
    /// its cache line back after every store, so a pass that published as
    /// it went waited for that line once per request. Every status is
    /// written before its chain gets here, and every request applied.
    fn publish_used<M: GuestMemory>(
        &mut self,
        mem: &M,
        q: &mut Queue,
    ) -> Result<usize, DeviceError> {
        let n = self.completed.len();
        let res = self.used.publish(mem, q, &self.completed);
        self.completed.clear();
        res.map_err(|source| DeviceError::Queue {
            queue: REQUEST_QUEUE,
            source,
        })?;
        Ok(n)
    }

    /// Writes `data` at byte `offset` of the chain's writable part.
    fn write_at<M: GuestMemory>(&self, mem: &M, offset: u64, data: &[u8]) -> Result<(), ()> {
        let mut skip = offset;
        let mut rest = data;
        for &(addr, len) in &self.writable {
            if rest.is_empty() {
                break;
            }
            let len = u64::from(len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(rest.len() as u64) as usize;
            let at = addr.checked_add(skip).ok_or(())?;
            guest_bytes::write(mem, at, &rest[..n])?;
            rest = &rest[n..];
            skip = 0;
        }
        if rest.is_empty() {
            Ok(())
        } else {
            Err(())
        }
    }

    /// Writes `status` as the request's tail at `offset` of the writable
    /// buffers: in one store when the tail lies in one buffer.
    fn write_tail<M: GuestMemory>(&self, mem: &M, offset: u64, status: Status) -> Result<(), ()> {
        let mut skip = offset;
        for &(addr, len) in &self.writable {
            let len = u64::from(len);
            if skip >= len {
                skip -= len;
                continue;
            }
            if len - skip >= TAIL_SIZE as u64 {
                let at = addr.checked_add(skip).ok_or(())?;
                // As a word in a register: its bytes in memory order.
                return guest_bytes::store(mem, at, u32::from_ne_bytes(status.to_tail()));
            }
            break;
        }
        self.write_at(mem, offset, &status.to_tail())
    }

    /// Whether request type `t` belongs to a feature the driver did not
    /// accept: such a request is as unknown as any other type.
    fn type_negotiated(&self, t: u8) -> bool {
        match t {
            VIRTIO_IOMMU_T_ATTACH_TABLE | VIRTIO_IOMMU_T_INVALIDATE => {
                self.negotiated(VIRTIO_IOMMU_F_ATTACH_TABLE)
            }
            VIRTIO_IOMMU_T_PAGE_RESP => self.negotiated(VIRTIO_IOMMU_F_PAGE_REQUEST),
            _ => true,
        }
    }

    /// Gathers, decodes, applies and answers one request chain; returns the
    /// used length, or `None` for an INVALIDATE answered with its batch.
    fn handle_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        head: u16,
        chain: impl Iterator<Item = Descriptor>,
        run: &mut RequestRun<'_>,
    ) -> Option<u32> {
        let mut rbuf = [0u8; MAX_READABLE_SIZE];
        let mut rlen = 0usize;
        let mut malformed = false;
        let mut wtotal: u64 = 0;
        self.writable.clear();
        // Device-readable descriptors come first, then device-writable ones
        // (virtio 1.3, 2.7.4.2); the tail is the last four writable bytes.
        for desc in chain {
            if desc.is_write_only() {
                if self.writable.len() >= MAX_WRITABLE_SEGMENTS {
                    malformed = true;
                    continue;
                }
                self.writable.push((desc.addr(), desc.len()));
                wtotal += u64::from(desc.len());
            } else if !self.writable.is_empty() {
                malformed = true;
            } else {
                let want = (desc.len() as usize).min(MAX_READABLE_SIZE - rlen);
                if want > 0 {
                    if guest_bytes::read(mem, desc.addr(), &mut rbuf[rlen..rlen + want]).is_err() {
                        malformed = true;
                    }
                    rlen += want;
                }
            }
        }
        // spec 5.13.6: "When the device fails to parse a request, for instance
        // if a request is too small for its type and the device cannot find
        // the tail, then it is unable to set status. In that case, it returns
        // the buffers without writing to them."
        if wtotal < TAIL_SIZE as u64 || wtotal > u64::from(u32::MAX) {
            self.stats.no_tail += 1;
            return Some(0);
        }
        let tail_at = wtotal - TAIL_SIZE as u64;
        let req = if malformed {
            Err(Status::IoErr)
        } else {
            match Request::decode(&rbuf[..rlen]) {
                Ok(r) if !self.type_negotiated(r.req_type()) => {
                    debug!("virtio-iommu: request type {} not negotiated", r.req_type());
                    self.stats.unknown_type += 1;
                    return Some(0);
                }
                Err(DecodeError::Truncated { req_type, .. }) if !self.type_negotiated(req_type) => {
                    self.stats.unknown_type += 1;
                    return Some(0);
                }
                Ok(r) => Ok(r),
                // spec 5.13.6.2: "If a request type is not recognized, the
                // device SHOULD NOT write the buffer and SHOULD set the used
                // length to zero."
                Err(DecodeError::UnknownType(t)) => {
                    debug!("virtio-iommu: unknown request type {t}");
                    self.stats.unknown_type += 1;
                    return Some(0);
                }
                Err(e) => {
                    debug!("virtio-iommu: malformed request: {e:?}");
                    Err(Status::IoErr)
                }
            }
        };
        let status = match req {
            Err(s) => s,
            Ok(req) => {
                self.stats.requests[usize::from(req.req_type())] += 1;
                if let Request::Invalidate(r) = &req {
                    run.pause();
                    let checked = self.viommu.state().invalidation(r);
                    match checked {
                        Ok(inv) => {
                            if let Some((tail, tail_pieces)) = self.tail_pieces(tail_at) {
                                self.pending.push(DeferredInvalidate {
                                    head,
                                    used_len: wtotal as u32,
                                    tail,
                                    tail_pieces,
                                    domain: r.domain,
                                    inv,
                                });
                                return None;
                            }
                            return Some(0);
                        }
                        Err(e) => {
                            debug!("virtio-iommu: {e}");
                            return Some(self.finish(mem, tail_at, wtotal, e.status()));
                        }
                    }
                }
                // Requests take effect in order: the INVALIDATEs before this
                // one are applied first.
                if !self.pending.is_empty() {
                    run.pause();
                    self.flush_invalidations(mem);
                }
                match req {
                    Request::Probe(p) => {
                        run.pause();
                        self.probe(mem, &p, tail_at)
                    }
                    _ => match run.apply(&req) {
                        Ok(applied) => {
                            if let Applied::Unmapped(n) = applied {
                                self.stats.unmapped += n as u64;
                            }
                            let s = &mut self.stats;
                            match &req {
                                Request::Map(m) => {
                                    s.mapped_iova_lowest = s.mapped_iova_lowest.min(m.virt_start);
                                    s.mapped_iova_highest = s.mapped_iova_highest.max(m.virt_end);
                                }
                                Request::Attach(a)
                                    if a.flags & wire::VIRTIO_IOMMU_ATTACH_F_BYPASS != 0 =>
                                {
                                    s.bypass_attaches += 1;
                                }
                                _ => {}
                            }
                            Status::Ok
                        }
                        Err(e) => {
                            debug!("virtio-iommu: {e}");
                            e.status()
                        }
                    },
                }
            }
        };
        Some(self.finish(mem, tail_at, wtotal, status))
    }

    /// Writes the status into the tail; returns the used length.
    fn finish<M: GuestMemory>(
        &mut self,
        mem: &M,
        tail_at: u64,
        wtotal: u64,
        status: Status,
    ) -> u32 {
        if self.write_tail(mem, tail_at, status).is_err() {
            return 0;
        }
        self.stats.statuses[status as usize] += 1;
        // `wtotal` fits u32: checked by the caller.
        wtotal as u32
    }
}

#[cfg(test)]
mod used_batch_tests {
    use super::USED_BATCH;
    use crate::config::IommuConfig;
    use crate::testing::Harness;
    use crate::wire::{AttachReq, MapReq, Request, UnmapReq, TAIL_SIZE, VIRTIO_IOMMU_MAP_F_READ};
    use vm_memory::Bytes;

    /// A pass longer than one batch of used entries (and not a multiple of
    /// it) puts every served chain in the used ring, in the order the
    /// driver offered them, each with its status written first.
    #[test]
    fn a_long_pass_publishes_every_chain_in_order() {
        let mut h = Harness::new(&IommuConfig::default(), &[1]);
        let attach = Request::Attach(AttachReq {
            domain: 1,
            endpoint: 1,
            ..Default::default()
        });
        assert_eq!(h.send_batch(&[attach]), [crate::wire::Status::Ok]);
        let n = 2 * USED_BATCH + 5;
        let mut offered = Vec::new();
        for i in 0..n as u64 {
            let iova = 0x10_0000 + (i / 2) * 0x1000;
            let r = if i % 2 == 0 {
                Request::Map(MapReq {
                    domain: 1,
                    virt_start: iova,
                    virt_end: iova + 0xfff,
                    phys_start: 0x1000,
                    flags: VIRTIO_IOMMU_MAP_F_READ,
                })
            } else {
                Request::Unmap(UnmapReq {
                    domain: 1,
                    virt_start: iova,
                    virt_end: iova + 0xfff,
                    reserved: [0; 4],
                })
            };
            let (head, tails) = h.queue_raw(&[&r.encode()], &[TAIL_SIZE as u32]);
            offered.push((head, tails[0]));
        }
        let used = h.notify();
        let heads: Vec<u16> = used.iter().map(|&(head, _)| head).collect();
        let expect: Vec<u16> = offered.iter().map(|&(head, _)| head).collect();
        assert_eq!(heads, expect);
        assert!(used.iter().all(|&(_, len)| len == TAIL_SIZE as u32));
        for (head, tail) in offered {
            let status: u8 = h.mem.read_obj(tail).unwrap();
            assert_eq!(status, 0, "status of chain {head}");
        }
        // Every pair undone; the odd last MAP stays.
        assert_eq!(h.dev.viommu().state().mapping_count(1), 1);
    }

    /// A request queue the device reads through a translating memory of
    /// its own vIOMMU (an endpoint in an identity-mapped domain): the
    /// memory's misses take the state's read lock, so the pass must not
    /// hold the write lock between requests. An ATTACH moves the topology,
    /// and the status write after it misses: with the lock still held
    /// this pass would never return.
    #[test]
    fn a_pass_over_memory_its_own_viommu_translates_releases_the_lock_between_requests() {
        use crate::wire::{Status, VIRTIO_IOMMU_MAP_F_WRITE};
        use crate::DmaMemory;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mut h = Harness::new(&IommuConfig::default(), &[1, 9]);
        let ram = h.mem.iter().map(|r| r.len()).sum::<u64>();
        let setup = [
            Request::Attach(AttachReq {
                domain: 2,
                endpoint: 9,
                ..Default::default()
            }),
            Request::Map(MapReq {
                domain: 2,
                virt_start: 0,
                virt_end: ram - 1,
                phys_start: 0,
                flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
            }),
        ];
        assert_eq!(h.send_batch(&setup), [Status::Ok, Status::Ok]);
        let dma = DmaMemory::new(h.dev.viommu().clone(), 9, h.mem.clone());
        let map = |domain| {
            Request::Map(MapReq {
                domain,
                virt_start: 0x10_0000,
                virt_end: 0x10_0fff,
                phys_start: 0x20_0000,
                flags: VIRTIO_IOMMU_MAP_F_READ,
            })
        };
        let attach = |domain| {
            Request::Attach(AttachReq {
                domain,
                endpoint: 1,
                ..Default::default()
            })
        };
        let reqs = [
            attach(1),
            map(1),
            Request::Unmap(UnmapReq {
                domain: 1,
                virt_start: 0x10_0000,
                virt_end: 0x10_0fff,
                ..Default::default()
            }),
            attach(3),
            map(3),
        ];
        let mut tails = Vec::new();
        for r in &reqs {
            let (_, w) = h.queue_raw(&[&r.encode()], &[TAIL_SIZE as u32]);
            tails.push(w[0]);
        }
        h.requestq.kick(&h.mem);
        assert_eq!(h.dev.process_requestq(&dma).unwrap(), reqs.len());
        for a in tails {
            let s: u8 = h.mem.read_obj(a).unwrap();
            assert_eq!(Status::from_u8(s), Some(Status::Ok));
        }
        assert_eq!(h.dev.viommu().state().mapping_count(3), 1);
    }
}
