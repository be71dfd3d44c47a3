//! The driver's side of the device, for tests, benchmarks and the demo:
//! split virtqueues laid out in guest memory, requests written into guest
//! buffers, statuses read back from the used ring.
//!
//! Everything here goes through guest memory exactly as a guest driver
//! would; nothing calls the device's request handlers directly. It is not
//! a production driver: it panics on its own misuse (a full queue), never
//! on anything the device does.

/// The state's mapping table alone, for benchmarks that compare it with
/// other containers (a VMM never needs it: the state owns its tables).
pub use crate::mapping::{MappingTable, CHUNK_CAPACITY};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::backend::{
    BackendCaps, BackendError, BackendFault, DomainId, DomainView, EndpointId, IommuBackend,
    MmioWindow, PageResponse, RamChange, TableBinding,
};
use crate::config::IommuConfig;
use crate::device::{VirtioInterrupt, VirtioIommu, VIRTIO_RING_F_EVENT_IDX};
use crate::fault::FaultQueue;
use crate::invalidation::Invalidation;
use crate::mapping::Mapping;
use crate::router::Router;
use crate::viommu::Viommu;
use crate::wire::{self, FaultRecord, Request, Status, TAIL_SIZE};

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// A split virtqueue, driver side, in guest memory.
#[derive(Clone, Debug)]
pub struct DriverQueue {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    avail_idx: u16,
    last_used: u16,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
}

impl DriverQueue {
    /// Bytes of guest memory a queue of `size` entries occupies.
    pub fn footprint(size: u16) -> u64 {
        let s = u64::from(size);
        let used_off = (16 * s + 6 + 2 * s).next_multiple_of(4);
        used_off + 6 + 8 * s
    }

    /// Lays out a zeroed queue of `size` entries at `base` (16-aligned).
    pub fn new<M: GuestMemory>(mem: &M, base: GuestAddress, size: u16) -> Self {
        let s = u64::from(size);
        let avail = base.unchecked_add(16 * s);
        let used = GuestAddress((avail.0 + 6 + 2 * s).next_multiple_of(4));
        let zero = vec![0u8; Self::footprint(size) as usize];
        mem.write_slice(&zero, base).expect("queue memory");
        DriverQueue {
            size,
            desc: base,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
        }
    }

    /// The device-side `Queue` for this layout, ready.
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc.0 as u32), Some((self.desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some((self.avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Writes a chain of `(addr, len, device_writable)` descriptors and puts
    /// its head in the avail ring (not yet published: see [`Self::kick`]).
    pub fn add_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        segs: &[(GuestAddress, u32, bool)],
    ) -> u16 {
        assert!(
            !segs.is_empty() && segs.len() <= self.free.len(),
            "queue full"
        );
        let idx: Vec<u16> = (0..segs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, &(addr, len, write)) in segs.iter().enumerate() {
            let mut flags = if write { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < segs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
                idx[i + 1]
            } else {
                0
            };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.0.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&d, self.desc.unchecked_add(16 * u64::from(idx[i])))
                .unwrap();
        }
        let head = idx[0];
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, self.avail.unchecked_add(4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.chains.insert(head, idx);
        head
    }

    /// Writes `segs` as an indirect descriptor table at `table` (16 bytes a
    /// descriptor, chained with NEXT) and puts one descriptor with
    /// `VIRTQ_DESC_F_INDIRECT` pointing at it in the avail ring (not yet
    /// published: see [`Self::kick`]).
    pub fn add_indirect_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        table: GuestAddress,
        segs: &[(GuestAddress, u32, bool)],
    ) -> u16 {
        assert!(!segs.is_empty() && !self.free.is_empty(), "queue full");
        for (i, &(addr, len, write)) in segs.iter().enumerate() {
            let mut flags = if write { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < segs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
                i as u16 + 1
            } else {
                0
            };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.0.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&d, table.unchecked_add(16 * i as u64))
                .unwrap();
        }
        let head = self.free.pop().unwrap();
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&table.0.to_le_bytes());
        d[8..12].copy_from_slice(&(16 * segs.len() as u32).to_le_bytes());
        d[12..14].copy_from_slice(&VIRTQ_DESC_F_INDIRECT.to_le_bytes());
        mem.write_slice(&d, self.desc.unchecked_add(16 * u64::from(head)))
            .unwrap();
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, self.avail.unchecked_add(4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.chains.insert(head, vec![head]);
        head
    }

    /// Publishes the avail index (the notification itself is the caller's).
    pub fn kick<M: GuestMemory>(&self, mem: &M) {
        std::sync::atomic::fence(Ordering::Release);
        mem.write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .unwrap();
    }

    /// Whether the device asks for a notification of the chains published
    /// since avail index `old` (up to the current one), as a driver decides
    /// after publishing: with `event_idx`, whether the avail event the
    /// device wrote lies among them (virtio 1.3, 2.7.10); without, whether
    /// the used ring's flags lack `VIRTQ_USED_F_NO_NOTIFY`.
    pub fn device_wants_notification<M: GuestMemory>(
        &self,
        mem: &M,
        old: u16,
        event_idx: bool,
    ) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        if event_idx {
            let at = self.used.unchecked_add(4 + 8 * u64::from(self.size));
            let event: u16 = mem.read_obj(at).unwrap();
            self.avail_idx.wrapping_sub(event).wrapping_sub(1) < self.avail_idx.wrapping_sub(old)
        } else {
            let flags: u16 = mem.read_obj(self.used).unwrap();
            flags & 1 == 0
        }
    }

    /// The avail index the driver has reached (published or not).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Takes the next used element: `(head, used length)`.
    pub fn pop_used<M: GuestMemory>(&mut self, mem: &M) -> Option<(u16, u32)> {
        let used_idx: u16 = mem.read_obj(self.used.unchecked_add(2)).unwrap();
        if used_idx == self.last_used {
            return None;
        }
        std::sync::atomic::fence(Ordering::Acquire);
        let slot = u64::from(self.last_used % self.size);
        let elem = self.used.unchecked_add(4 + 8 * slot);
        let id: u32 = mem.read_obj(elem).unwrap();
        let len: u32 = mem.read_obj(elem.unchecked_add(4)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        let head = id as u16;
        if let Some(descs) = self.chains.remove(&head) {
            self.free.extend(descs);
        }
        Some((head, len))
    }
}

/// Counts interrupts per queue.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    counts: [AtomicU64; 2],
}

impl CountingInterrupt {
    /// Interrupts raised for `queue`.
    pub fn count(&self, queue: u16) -> u64 {
        self.counts[usize::from(queue) & 1].load(Ordering::Relaxed)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, queue: u16) -> std::io::Result<()> {
        self.counts[usize::from(queue) & 1].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Where the harness puts things in guest memory.
pub mod layout {
    /// Request queue.
    pub const REQUEST_QUEUE: u64 = 0x1_0000;
    /// Event queue.
    pub const EVENT_QUEUE: u64 = 0x2_0000;
    /// Event buffers (24 bytes each, 64 of them).
    pub const EVENT_BUFFERS: u64 = 0x3_0000;
    /// Request buffers: 256 slots of 8 KiB.
    pub const REQUEST_BUFFERS: u64 = 0x10_0000;
    /// Size of one request buffer slot.
    pub const SLOT_SIZE: u64 = 0x2000;
    /// Request slots 256..1024 (a batch bigger than 256 requests): small
    /// slots, for small requests.
    pub const REQUEST_BUFFERS_HIGH: u64 = 0xb0_0000;
    /// Size of a high slot.
    pub const HIGH_SLOT_SIZE: u64 = 0x800;
    /// First byte free for the test's own data.
    pub const FREE: u64 = 0x40_0000;
}

/// A device with a driver in front of it, over real guest memory.
pub struct Harness {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The device.
    pub dev: VirtioIommu,
    /// Driver side of the request queue.
    pub requestq: DriverQueue,
    /// Driver side of the event queue.
    pub eventq: DriverQueue,
    /// Interrupt counter.
    pub irq: Arc<CountingInterrupt>,
    next_slot: u64,
    next_event: u64,
    event_bufs: HashMap<u16, GuestAddress>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness").field("dev", &self.dev).finish()
    }
}

/// The features a driver accepts: everything the device offers except
/// EVENT_IDX, because [`DriverQueue`] publishes no `used_event` and reads
/// every used entry after each notification.
pub fn driver_features(dev: &VirtioIommu) -> u64 {
    dev.avail_features() & !(1 << VIRTIO_RING_F_EVENT_IDX)
}

impl Harness {
    /// Guest RAM of `mem_mib` MiB at 0, a device for `endpoints`, features
    /// negotiated as `features(&dev)` decides, queues set up and activated.
    pub fn with_features(
        cfg: &IommuConfig,
        endpoints: &[u32],
        mem_mib: u64,
        features: impl FnOnce(&VirtioIommu) -> u64,
    ) -> Self {
        Self::with_ram(cfg, endpoints, mem_mib, &[], features)
    }

    /// As [`Self::with_features`], with `extra_ram` (inclusive
    /// `[start, end]` ranges) also declared as guest RAM to the device's
    /// state model but not backed by host memory. For benchmarks that MAP
    /// far more guest-physical memory than the harness can afford to back:
    /// MAP only checks that the range is RAM and never touches it, so the
    /// request path is the same. Any access through such a mapping (a
    /// translated read or write) fails: only the first `mem_mib` MiB exist.
    pub fn with_ram(
        cfg: &IommuConfig,
        endpoints: &[u32],
        mem_mib: u64,
        extra_ram: &[(u64, u64)],
        features: impl FnOnce(&VirtioIommu) -> u64,
    ) -> Self {
        Self::with_router(
            cfg,
            endpoints,
            mem_mib,
            extra_ram,
            |_, _| Router::new(),
            features,
        )
    }

    /// A harness whose vIOMMU routes endpoints to the backends `router`
    /// builds (given the guest memory and the vIOMMU's fault queue).
    pub fn with_router(
        cfg: &IommuConfig,
        endpoints: &[u32],
        mem_mib: u64,
        extra_ram: &[(u64, u64)],
        router: impl FnOnce(&GuestMemoryMmap, Arc<FaultQueue>) -> Router,
        features: impl FnOnce(&VirtioIommu) -> u64,
    ) -> Self {
        Self::with_queue_size(
            cfg,
            endpoints,
            mem_mib,
            extra_ram,
            crate::device::REQUEST_QUEUE_SIZE,
            router,
            features,
        )
    }

    /// As [`Self::with_router`], with a request queue of `queue_size`
    /// entries (a power of two, at most
    /// [`crate::device::REQUEST_QUEUE_SIZE`]) instead of the largest the
    /// device accepts: drivers pick their own size (Linux's virtio-iommu
    /// and the benchmark stream use 256).
    pub fn with_queue_size(
        cfg: &IommuConfig,
        endpoints: &[u32],
        mem_mib: u64,
        extra_ram: &[(u64, u64)],
        queue_size: u16,
        router: impl FnOnce(&GuestMemoryMmap, Arc<FaultQueue>) -> Router,
        features: impl FnOnce(&VirtioIommu) -> u64,
    ) -> Self {
        let size = mem_mib << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .expect("guest memory");
        let mut ram = vec![(0, size - 1)];
        ram.extend_from_slice(extra_ram);
        let faults =
            Arc::new(FaultQueue::new(cfg.limits.max_pending_faults as usize).expect("fault queue"));
        let router = router(&mem, faults.clone());
        let viommu = Arc::new(Viommu::with_router(cfg, endpoints, &ram, faults, router));
        let mut dev = VirtioIommu::with_viommu(viommu);
        let f = features(&dev);
        dev.set_acked_features(f);
        let requestq = DriverQueue::new(&mem, GuestAddress(layout::REQUEST_QUEUE), queue_size);
        let eventq = DriverQueue::new(&mem, GuestAddress(layout::EVENT_QUEUE), 64);
        let irq = Arc::new(CountingInterrupt::default());
        dev.activate(
            &mem,
            requestq.device_queue(),
            eventq.device_queue(),
            irq.clone(),
        )
        .expect("activate");
        Harness {
            mem,
            dev,
            requestq,
            eventq,
            irq,
            next_slot: 0,
            next_event: 0,
            event_bufs: HashMap::new(),
        }
    }

    /// A copy of this harness whose device is restored from `snap`
    /// instead of activated: guest memory copied byte for byte, the
    /// driver's queues as they are, and a device built for `endpoints`
    /// with the backends `router` builds, as [`Self::with_router`] builds
    /// it (`extra_ram` as given there). Both harnesses then run on their
    /// own.
    pub fn restored_copy(
        &self,
        cfg: &IommuConfig,
        endpoints: &[u32],
        extra_ram: &[(u64, u64)],
        router: impl FnOnce(&GuestMemoryMmap, Arc<FaultQueue>) -> Router,
        snap: &crate::snapshot::DeviceSnapshot,
    ) -> Result<Self, crate::snapshot::SnapshotError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let size: u64 = self.mem.iter().map(|r| r.len()).sum();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .expect("guest memory");
        let mut bytes = vec![0u8; size as usize];
        self.mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        mem.write_slice(&bytes, GuestAddress(0)).unwrap();
        let mut ram = vec![(0, size - 1)];
        ram.extend_from_slice(extra_ram);
        let faults =
            Arc::new(FaultQueue::new(cfg.limits.max_pending_faults as usize).expect("fault queue"));
        let router = router(&mem, faults.clone());
        let viommu = Arc::new(Viommu::with_router(cfg, endpoints, &ram, faults, router));
        let mut dev = VirtioIommu::with_viommu(viommu);
        let irq = Arc::new(CountingInterrupt::default());
        dev.restore(snap, &mem, irq.clone())?;
        Ok(Harness {
            mem,
            dev,
            requestq: self.requestq.clone(),
            eventq: self.eventq.clone(),
            irq,
            next_slot: self.next_slot,
            next_event: self.next_event,
            event_bufs: self.event_bufs.clone(),
        })
    }

    /// As [`Self::with_features`], accepting what a driver would.
    pub fn new(cfg: &IommuConfig, endpoints: &[u32]) -> Self {
        Self::with_features(cfg, endpoints, 16, driver_features)
    }

    fn slot(&mut self) -> GuestAddress {
        let i = self.next_slot % u64::from(crate::device::REQUEST_QUEUE_SIZE);
        self.next_slot += 1;
        let a = if i < 256 {
            layout::REQUEST_BUFFERS + i * layout::SLOT_SIZE
        } else {
            layout::REQUEST_BUFFERS_HIGH + (i - 256) * layout::HIGH_SLOT_SIZE
        };
        GuestAddress(a)
    }

    /// Queues a chain built from raw bytes: `readable` pieces (each its own
    /// descriptor) and `writable` lengths (each its own descriptor). Returns
    /// the head and the addresses of the writable buffers.
    pub fn queue_raw(&mut self, readable: &[&[u8]], writable: &[u32]) -> (u16, Vec<GuestAddress>) {
        let base = self.slot();
        let mut at = base;
        let mut segs = Vec::new();
        for r in readable {
            self.mem.write_slice(r, at).unwrap();
            segs.push((at, r.len() as u32, false));
            at = at.unchecked_add((r.len() as u64).next_multiple_of(8));
        }
        let mut wbufs = Vec::new();
        for &w in writable {
            // Poison the writable area so tests see what the device wrote.
            self.mem.write_slice(&vec![0xa5; w as usize], at).unwrap();
            segs.push((at, w, true));
            wbufs.push(at);
            at = at.unchecked_add(u64::from(w).next_multiple_of(8));
        }
        let slot_size = if base.0 >= layout::REQUEST_BUFFERS_HIGH {
            layout::HIGH_SLOT_SIZE
        } else {
            layout::SLOT_SIZE
        };
        assert!(at.0 - base.0 <= slot_size, "request too big for a slot");
        let head = self.requestq.add_chain(&self.mem, &segs);
        (head, wbufs)
    }

    /// Sends one chain of any shape: `pieces` in order, each a readable
    /// descriptor holding its bytes (`Ok`) or a writable descriptor of that
    /// many bytes (`Err`), readable and writable in any order, either as
    /// direct descriptors or through one indirect table. Writable bytes are
    /// poisoned with 0xa5 first. Returns the used length and the writable
    /// bytes, concatenated in chain order, as the device left them.
    pub fn send_chain(&mut self, pieces: &[Result<&[u8], u32>], indirect: bool) -> (u32, Vec<u8>) {
        let base = self.slot();
        let slot_size = if base.0 >= layout::REQUEST_BUFFERS_HIGH {
            layout::HIGH_SLOT_SIZE
        } else {
            layout::SLOT_SIZE
        };
        // The indirect table first, then the buffers.
        let mut at = if indirect {
            base.unchecked_add((16 * pieces.len() as u64).next_multiple_of(8))
        } else {
            base
        };
        let mut segs = Vec::new();
        let mut wbufs = Vec::new();
        for p in pieces {
            match *p {
                Ok(r) => {
                    self.mem.write_slice(r, at).unwrap();
                    segs.push((at, r.len() as u32, false));
                    at = at.unchecked_add((r.len() as u64).next_multiple_of(8));
                }
                Err(w) => {
                    self.mem.write_slice(&vec![0xa5; w as usize], at).unwrap();
                    segs.push((at, w, true));
                    wbufs.push((at, w));
                    at = at.unchecked_add(u64::from(w).next_multiple_of(8));
                }
            }
        }
        assert!(at.0 - base.0 <= slot_size, "request too big for a slot");
        let head = if indirect {
            self.requestq.add_indirect_chain(&self.mem, base, &segs)
        } else {
            self.requestq.add_chain(&self.mem, &segs)
        };
        let used = self.notify();
        assert_eq!(used.len(), 1, "one chain in, one out");
        assert_eq!(used[0].0, head);
        let mut bytes = Vec::new();
        for (a, w) in wbufs {
            let mut b = vec![0u8; w as usize];
            self.mem.read_slice(&mut b, a).unwrap();
            bytes.extend(b);
        }
        (used[0].1, bytes)
    }

    /// Notifies the device and collects `(head, used len)` of every chain
    /// it returned.
    pub fn notify(&mut self) -> Vec<(u16, u32)> {
        self.requestq.kick(&self.mem);
        self.dev.process_requestq(&self.mem).expect("process");
        let mut out = Vec::new();
        while let Some(u) = self.requestq.pop_used(&self.mem) {
            out.push(u);
        }
        out
    }

    /// Sends raw pieces as one chain and returns the used length and the
    /// bytes of the writable part as the device left them.
    pub fn send_raw(&mut self, readable: &[&[u8]], writable: &[u32]) -> (u32, Vec<u8>) {
        let (head, wbufs) = self.queue_raw(readable, writable);
        let used = self.notify();
        assert_eq!(used.len(), 1, "one chain in, one out");
        assert_eq!(used[0].0, head);
        let mut bytes = Vec::new();
        for (a, &w) in wbufs.iter().zip(writable) {
            let mut b = vec![0u8; w as usize];
            self.mem.read_slice(&mut b, *a).unwrap();
            bytes.extend(b);
        }
        (used[0].1, bytes)
    }

    /// Sends a request the way Linux's driver does (one readable
    /// descriptor, one 4-byte writable tail) and returns the status.
    pub fn send(&mut self, req: &Request) -> Status {
        let bytes = req.encode();
        let (len, tail) = self.send_raw(&[&bytes], &[TAIL_SIZE as u32]);
        assert_eq!(
            len, TAIL_SIZE as u32,
            "used length of a request with a tail"
        );
        Status::from_u8(tail[0]).expect("valid status")
    }

    /// Sends many requests in one notification; statuses in order.
    pub fn send_batch(&mut self, reqs: &[Request]) -> Vec<Status> {
        let mut heads = Vec::new();
        for r in reqs {
            let bytes = r.encode();
            let (head, wbufs) = self.queue_raw(&[&bytes], &[TAIL_SIZE as u32]);
            heads.push((head, wbufs[0]));
        }
        let used = self.notify();
        assert_eq!(used.len(), reqs.len());
        heads
            .iter()
            .map(|&(_, a)| {
                let s: u8 = self.mem.read_obj(a).unwrap();
                Status::from_u8(s).expect("valid status")
            })
            .collect()
    }

    /// Sends PROBE with `props_len` bytes of properties; returns the status
    /// and the properties as written.
    pub fn probe(&mut self, endpoint: u32, props_len: u32) -> (Status, Vec<u8>) {
        let bytes = Request::Probe(wire::ProbeReq { endpoint }).encode();
        let (_, w) = self.send_raw(&[&bytes], &[props_len + TAIL_SIZE as u32]);
        let status = Status::from_u8(w[props_len as usize]).expect("valid status");
        (status, w[..props_len as usize].to_vec())
    }

    /// Offers `n` event buffers of `len` bytes (at most 64) to the device.
    pub fn add_event_buffers(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let a = GuestAddress(layout::EVENT_BUFFERS + (self.next_event % 64) * 64);
            self.next_event += 1;
            let head = self.eventq.add_chain(&self.mem, &[(a, len.min(64), true)]);
            self.event_bufs.insert(head, a);
        }
        self.eventq.kick(&self.mem);
    }

    /// Lets the device fill event buffers and returns, per buffer it used,
    /// the used length and the record read back from it.
    pub fn collect_faults(&mut self) -> Vec<(u32, Option<FaultRecord>)> {
        self.dev.process_eventq(&self.mem).expect("process eventq");
        let mut out = Vec::new();
        while let Some((head, len)) = self.eventq.pop_used(&self.mem) {
            let rec = self.event_bufs.remove(&head).and_then(|a| {
                let mut b = [0u8; wire::FAULT_SIZE];
                self.mem.read_slice(&mut b, a).ok()?;
                FaultRecord::decode(&b)
            });
            out.push((
                len,
                if len as usize >= wire::FAULT_SIZE {
                    rec
                } else {
                    None
                },
            ));
        }
        out
    }

    /// Delivers waiting records and returns the extended ones (for a
    /// driver that negotiated the nested extension).
    pub fn collect_ext_faults(&mut self) -> Vec<wire::ExtFaultRecord> {
        self.dev.process_eventq(&self.mem).expect("process eventq");
        let mut out = Vec::new();
        while let Some((head, len)) = self.eventq.pop_used(&self.mem) {
            let Some(a) = self.event_bufs.remove(&head) else {
                continue;
            };
            if (len as usize) < wire::EXT_FAULT_SIZE {
                continue;
            }
            let mut b = [0u8; wire::EXT_FAULT_SIZE];
            if self.mem.read_slice(&mut b, a).is_ok() {
                out.extend(wire::ExtFaultRecord::decode(&b));
            }
        }
        out
    }
}

/// One call a [`RecordingBackend`] received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendCall {
    /// `attach(ep, domain)` with the number of mappings replayed.
    Attach(EndpointId, DomainId, usize),
    /// `detach(ep, domain)`.
    Detach(EndpointId, DomainId),
    /// `map(domain, mapping)`.
    Map(DomainId, Mapping),
    /// `unmap(domain, removed)`.
    Unmap(DomainId, Vec<Mapping>),
    /// `bind_table(ep, binding)`.
    BindTable(EndpointId, TableBinding),
    /// `unbind_table(ep, domain)`.
    UnbindTable(EndpointId, DomainId),
    /// `invalidate(domain, batch)`.
    Invalidate(DomainId, Vec<Invalidation>),
    /// `page_response(resp)`.
    PageResponse(PageResponse),
    /// `remove_endpoint(ep)` (hot-unplug).
    RemoveEndpoint(EndpointId),
    /// `restore_page_requests(saved)` with the number of groups.
    RestorePageRequests(usize),
    /// `add_ram(change)`: first and last address.
    AddRam(u64, u64),
    /// `remove_ram(change)`: first and last address.
    RemoveRam(u64, u64),
    /// `add_mmio_window(window)`.
    AddMmioWindow(MmioWindow),
    /// `remove_mmio_window(window)`.
    RemoveMmioWindow(MmioWindow),
}

/// A backend that records every call and fails the calls a test names:
/// for router, rollback and batching tests.
#[derive(Debug)]
pub struct RecordingBackend {
    name: String,
    caps: BackendCaps,
    /// Every call, in order.
    pub calls: Mutex<Vec<BackendCall>>,
    /// Calls whose 0-based index (counted over all calls) fail.
    pub fail_at: Mutex<Vec<usize>>,
    /// Faults `drain_faults` hands out.
    pub faults: Mutex<Vec<BackendFault>>,
}

impl RecordingBackend {
    /// A backend named `name` offering `caps`.
    pub fn new(name: &str, caps: BackendCaps) -> Self {
        RecordingBackend {
            name: name.to_string(),
            caps,
            calls: Mutex::new(Vec::new()),
            fail_at: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
        }
    }

    /// A backend offering every table format, 20-bit PASIDs and page
    /// requests.
    pub fn nested(name: &str) -> Self {
        Self::new(
            name,
            BackendCaps {
                page_size_mask: !0xfff,
                input_range: (0, u64::MAX),
                output_bits: 48,
                pasid_bits: 20,
                table_formats: vec![1, 2, 3, 4],
                page_requests: true,
                reserved_ranges: Vec::new(),
            },
        )
    }

    /// Makes the next call with index `n` counted from now fail.
    pub fn fail_next(&self, n: usize) {
        let at = self.calls().len() + n;
        self.fail_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(at);
    }

    /// A copy of the calls so far.
    pub fn calls(&self) -> Vec<BackendCall> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, c: BackendCall) -> Result<(), BackendError> {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let idx = calls.len();
        calls.push(c);
        if self
            .fail_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&idx)
        {
            return Err(BackendError::Host {
                op: "recorded call",
                source: std::io::Error::from_raw_os_error(5),
            });
        }
        Ok(())
    }
}

impl IommuBackend for RecordingBackend {
    fn name(&self) -> &str {
        &self.name
    }
    fn caps(&self, _ep: EndpointId) -> BackendCaps {
        self.caps.clone()
    }
    fn attach(&self, ep: EndpointId, dom: &DomainView<'_>) -> Result<(), BackendError> {
        self.record(BackendCall::Attach(ep, dom.id, dom.mappings.len()))
    }
    fn detach(&self, ep: EndpointId, dom: DomainId) -> Result<(), BackendError> {
        self.record(BackendCall::Detach(ep, dom))
    }
    fn map(&self, dom: DomainId, m: &Mapping) -> Result<(), BackendError> {
        self.record(BackendCall::Map(dom, *m))
    }
    fn unmap(&self, dom: DomainId, removed: &[Mapping]) -> Result<(), BackendError> {
        self.record(BackendCall::Unmap(dom, removed.to_vec()))
    }
    fn bind_table(&self, ep: EndpointId, binding: &TableBinding) -> Result<(), BackendError> {
        self.record(BackendCall::BindTable(ep, *binding))
    }
    fn unbind_table(&self, ep: EndpointId, dom: DomainId) -> Result<(), BackendError> {
        self.record(BackendCall::UnbindTable(ep, dom))
    }
    fn invalidate(&self, dom: DomainId, batch: &[Invalidation]) -> Result<(), BackendError> {
        self.record(BackendCall::Invalidate(dom, batch.to_vec()))
    }
    fn page_response(&self, resp: &PageResponse) -> Result<(), BackendError> {
        self.record(BackendCall::PageResponse(*resp))
    }
    fn drain_faults(&self, out: &mut Vec<BackendFault>) {
        out.append(&mut self.faults.lock().unwrap_or_else(|p| p.into_inner()));
    }
    fn restore_page_requests(
        &self,
        saved: &crate::backend::SavedPageRequests,
    ) -> Result<(), BackendError> {
        self.record(BackendCall::RestorePageRequests(saved.groups.len()))
    }
    fn remove_endpoint(&self, ep: EndpointId) {
        let _ = self.record(BackendCall::RemoveEndpoint(ep));
    }
    fn add_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        self.record(BackendCall::AddRam(change.start, change.end))
    }
    fn remove_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        self.record(BackendCall::RemoveRam(change.start, change.end))
    }
    fn add_mmio_window(&self, window: &MmioWindow) -> Result<(), BackendError> {
        self.record(BackendCall::AddMmioWindow(*window))
    }
    fn remove_mmio_window(&self, window: &MmioWindow) -> Result<(), BackendError> {
        self.record(BackendCall::RemoveMmioWindow(*window))
    }
}
