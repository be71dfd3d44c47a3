//! An emulated virtio device behind the virtio-iommu, written the way a VMM
//! wires it up.
//!
//! The VMM here has two devices: the virtio-iommu and a small entropy
//! device (virtio-rng's shape: one queue of device-writable buffers) as
//! endpoint 8 behind it. It
//!
//! 1. builds the vIOMMU from the JSON `iommu` section of its VM config;
//! 2. serves the virtio-iommu's config space and feature negotiation, and
//!    builds its request and event queues from what the driver wrote into
//!    the transport's queue registers (`activate` on DRIVER_OK);
//! 3. serves the two queues on a worker thread: one kick eventfd per queue
//!    (what KVM's ioeventfd signals on a QueueNotify write), the vIOMMU's
//!    fault eventfd (readable when a refused DMA left a fault record for
//!    the driver) and a stop eventfd; interrupts are eventfds too (what an
//!    irqfd would inject);
//! 4. runs the entropy device's DMA through the vIOMMU: its rings and
//!    buffers are IOVAs, reached through vm-memory's `IommuMemory` over
//!    `Viommu::endpoint_iommu`, or through `Viommu::dma_memory` (the faster
//!    view with a per-thread IOTLB). Both are a `vm_memory::GuestMemory`,
//!    so virtio-queue takes them as they are.
//!
//! There is no guest, so the example also plays the guest's driver, with
//! `vmm_iommu::testing::DriverQueue`: PROBE, ATTACH, MAP, entropy requests
//! that succeed, UNMAP, an entropy request whose DMA is refused, and the
//! fault record read from the event queue. Everything marked "GUEST" is
//! that side, which your VMM does not have.
//!
//! ```text
//! cargo run -p vmm-iommu --example emulated_device
//! ```
//!
//! It prints each step and exits 0 only if everything behaved.

use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use virtio_queue::{Queue, QueueT};
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_iommu::config::IommuConfig;
use vmm_iommu::testing::DriverQueue;
use vmm_iommu::wire::{
    AttachReq, ConfigSpace, FaultRecord, MapReq, ProbeReq, Request, ResvMemProperty, Status,
    UnmapReq, CONFIG_SIZE, EVENT_QUEUE, FAULT_SIZE, REQUEST_QUEUE, TAIL_SIZE,
    VIRTIO_IOMMU_FAULT_F_ADDRESS, VIRTIO_IOMMU_FAULT_F_WRITE, VIRTIO_IOMMU_FAULT_R_MAPPING,
    VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE, VIRTIO_IOMMU_PROBE_T_RESV_MEM,
    VIRTIO_IOMMU_RESV_MEM_T_MSI,
};
use vmm_iommu::{AdaptivePoll, VirtioIommu};
use vmm_iommu::{VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The `iommu` section of the VM config (docs/config.md has every field).
const IOMMU_JSON: &str = r#"{
    "page_size_mask": ["4K", "2M", "1G"],
    "input_range": { "start": "0x0", "end": "0xffffffffffff" },
    "domain_range": { "start": 1, "end": 65535 },
    "reserved_regions": [ { "start": "0xfee00000", "end": "0xfeefffff", "kind": "msi" } ]
}"#;

/// The entropy device's endpoint ID (for PCI, its requester ID).
const RNG_ENDPOINT: u32 = 8;
/// Guest RAM: 64 MiB at 0.
const RAM_SIZE: u64 = 64 << 20;
/// Queue sizes this VMM's transport offers for the entropy device.
const RNG_QUEUE_MAX: u16 = 16;

// ---------------------------------------------------------------------------
// VMM side: what your VMM has.
// ---------------------------------------------------------------------------

/// What a driver wrote to one queue's transport registers: virtio-mmio's
/// QueueNum, QueueDesc{Low,High}, QueueDriver{Low,High},
/// QueueDevice{Low,High} and QueueReady (virtio-pci's common config has
/// the same fields).
#[derive(Clone, Copy, Debug, Default)]
struct QueueRegisters {
    num: u16,
    desc: [u32; 2],
    driver: [u32; 2],
    device: [u32; 2],
    ready: bool,
}

/// The device-side queue the registers describe; the device checks it
/// against guest memory when it is activated.
fn queue_from_registers(r: &QueueRegisters, max_size: u16) -> Result<Queue> {
    let mut q = Queue::new(max_size)?;
    q.set_size(r.num);
    q.set_desc_table_address(Some(r.desc[0]), Some(r.desc[1]));
    q.set_avail_ring_address(Some(r.driver[0]), Some(r.driver[1]));
    q.set_used_ring_address(Some(r.device[0]), Some(r.device[1]));
    q.set_ready(r.ready);
    Ok(q)
}

/// Interrupts as eventfds, one per queue (what an irqfd or an MSI-X
/// vector's eventfd would be).
struct EventFdInterrupt {
    fds: [EventFd; 2],
}

impl VirtioInterrupt for EventFdInterrupt {
    fn trigger(&self, queue: u16) -> std::io::Result<()> {
        self.fds[usize::from(queue)].write(1)
    }
}

const TOKEN_REQUESTQ: u64 = 0;
const TOKEN_EVENTQ: u64 = 1;
const TOKEN_FAULTS: u64 = 2;
const TOKEN_STOP: u64 = 3;

/// The device behind its lock.
fn dev_lock(dev: &Mutex<VirtioIommu>) -> Result<std::sync::MutexGuard<'_, VirtioIommu>> {
    Ok(dev.lock().map_err(|_| "device lock")?)
}

/// The virtio-iommu's worker thread: waits on the two kicks, the fault
/// eventfd and `stop`, and runs one pass of the queue that needs it; after
/// a request-queue pass it polls that queue for a short adaptive window
/// before it sleeps again.
/// Returns how many requests it completed and fault records it delivered.
fn spawn_worker(
    dev: Arc<Mutex<VirtioIommu>>,
    mem: GuestMemoryMmap,
    kicks: [EventFd; 2],
    stop: EventFd,
) -> Result<JoinHandle<Result<(usize, usize)>>> {
    let epoll = Epoll::new()?;
    let fault_fd = dev
        .lock()
        .map_err(|_| "device lock")?
        .fault_eventfd()
        .as_raw_fd();
    let watch = [
        (
            kicks[usize::from(REQUEST_QUEUE)].as_raw_fd(),
            TOKEN_REQUESTQ,
        ),
        (kicks[usize::from(EVENT_QUEUE)].as_raw_fd(), TOKEN_EVENTQ),
        // The fault eventfd lives as long as the device, which the thread
        // keeps alive.
        (fault_fd, TOKEN_FAULTS),
        (stop.as_raw_fd(), TOKEN_STOP),
    ];
    for (fd, token) in watch {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    Ok(thread::spawn(move || {
        let (mut requests, mut faults) = (0, 0);
        let mut events = [EpollEvent::default(); 4];
        let mut poll = AdaptivePoll::default();
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            poll.woke();
            for ev in &events[..n] {
                // One pass per wake-up; the device lock is held for that
                // pass only, so the transport (config space, resets) is
                // never kept waiting long.
                let mut guard = dev_lock(&dev)?;
                match ev.data() {
                    TOKEN_REQUESTQ => {
                        // Non-blocking: several kicks may make one read.
                        let _ = kicks[usize::from(REQUEST_QUEUE)].read();
                        // Polling passes: the driver need not notify
                        // while the thread watches the queue.
                        requests += guard.process_requestq_polling(&mem)?;
                        drop(guard);
                        // Look at the queue a little longer before the
                        // next sleep: a driver that sends its next request
                        // soon finds the thread awake (see AdaptivePoll).
                        // Then let it notify again, serving whatever it
                        // published unannounced in between.
                        loop {
                            while poll
                                .poll(|| dev_lock(&dev).is_ok_and(|d| d.requestq_pending(&mem)))
                            {
                                requests += dev_lock(&dev)?.process_requestq_polling(&mem)?;
                            }
                            let mut d = dev_lock(&dev)?;
                            if !d.resume_requestq_notifications(&mem)? {
                                break;
                            }
                            requests += d.process_requestq_polling(&mem)?;
                        }
                    }
                    TOKEN_EVENTQ => {
                        let _ = kicks[usize::from(EVENT_QUEUE)].read();
                        faults += guard.process_eventq(&mem)?;
                    }
                    // process_eventq clears the fault eventfd itself.
                    TOKEN_FAULTS => faults += guard.process_eventq(&mem)?,
                    _ => return Ok((requests, faults)),
                }
            }
        }
    }))
}

/// The entropy device model: fills every buffer the driver offers with
/// bytes from `next`, and completes the chain. `mem` is whatever view of
/// guest memory the device is given; behind a vIOMMU it translates IOVAs.
/// A buffer it cannot write is completed with used length 0 (the refused
/// DMA has already become a fault record for the driver).
fn serve_entropy<M: GuestMemory>(q: &mut Queue, mem: &M, next: &mut u8) -> Result<Vec<u32>> {
    let mut done = Vec::new();
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut written = 0u32;
        for desc in chain.writable() {
            let bytes: Vec<u8> = (0..desc.len())
                .map(|_| {
                    *next = next.wrapping_add(1);
                    *next
                })
                .collect();
            match mem.write_slice(&bytes, desc.addr()) {
                Ok(()) => written += desc.len(),
                Err(e) => {
                    println!(
                        "  vmm: entropy DMA to IOVA {:#x} refused: {e}",
                        desc.addr().0
                    );
                    written = 0;
                    break;
                }
            }
        }
        q.add_used(mem, head, written)?;
        done.push(written);
    }
    Ok(done)
}

// ---------------------------------------------------------------------------
// GUEST side: the guest's driver, which your VMM does not have. It is here
// only because an example has no guest.
// ---------------------------------------------------------------------------

/// Guest-physical layout of the guest driver's structures.
mod guest_layout {
    pub const IOMMU_REQUESTQ: u64 = 0x1_0000;
    pub const IOMMU_EVENTQ: u64 = 0x2_0000;
    pub const IOMMU_REQUEST_BUF: u64 = 0x3_0000;
    pub const IOMMU_EVENT_BUFS: u64 = 0x4_0000;
    /// The entropy device's rings (guest-physical) ...
    pub const RNG_RINGS_GPA: u64 = 0x80_0000;
    /// ... and the IOVA the guest maps them at for the device.
    pub const RNG_RINGS_IOVA: u64 = 0x4000_0000;
    /// The entropy buffer (guest-physical) ...
    pub const RNG_BUF_GPA: u64 = 0x90_0000;
    /// ... and its IOVA.
    pub const RNG_BUF_IOVA: u64 = 0x5000_0000;
    pub const RNG_BUF_LEN: u32 = 256;
}
use guest_layout::*;

/// The registers a driver writes for a queue it laid out at `q`, with
/// `to_bus` turning its guest-physical addresses into the addresses the
/// device must use (IOVAs behind an IOMMU).
fn guest_queue_registers(q: &DriverQueue, to_bus: impl Fn(u64) -> u64) -> QueueRegisters {
    let layout = q.device_queue();
    let split = |a: u64| [a as u32, (a >> 32) as u32];
    QueueRegisters {
        num: layout.size(),
        desc: split(to_bus(layout.desc_table())),
        driver: split(to_bus(layout.avail_ring())),
        device: split(to_bus(layout.used_ring())),
        ready: true,
    }
}

/// Waits (at most 5 s) for the device to raise `irq`.
fn guest_wait_irq(irq: &EventFd) -> Result<()> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        irq.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 0),
    )?;
    let mut ev = [EpollEvent::default()];
    if epoll.wait(5000, &mut ev)? == 0 {
        return Err("no interrupt from the device within 5 s".into());
    }
    irq.read()?;
    Ok(())
}

/// The guest's virtio-iommu driver: one request at a time.
struct GuestIommuDriver {
    mem: GuestMemoryMmap,
    requestq: DriverQueue,
    eventq: DriverQueue,
    /// Writing it is the guest's QueueNotify write (KVM turns that into a
    /// kick of the VMM's eventfd).
    notify: [EventFd; 2],
    irq: [EventFd; 2],
    probe_size: u32,
}

impl GuestIommuDriver {
    /// Sends `req` with `props` bytes of device-writable room before the
    /// tail (PROBE's properties); returns the status and those bytes.
    fn send(&mut self, req: &Request, props: u32) -> Result<(Status, Vec<u8>)> {
        let bytes = req.encode();
        let out = GuestAddress(IOMMU_REQUEST_BUF);
        let back = GuestAddress(IOMMU_REQUEST_BUF + 0x1000);
        self.mem.write_slice(&bytes, out)?;
        let wlen = props + TAIL_SIZE as u32;
        self.requestq.add_chain(
            &self.mem,
            &[(out, bytes.len() as u32, false), (back, wlen, true)],
        );
        self.requestq.kick(&self.mem);
        self.notify[usize::from(REQUEST_QUEUE)].write(1)?;
        let (_, used) = loop {
            if let Some(u) = self.requestq.pop_used(&self.mem) {
                break u;
            }
            guest_wait_irq(&self.irq[usize::from(REQUEST_QUEUE)])?;
        };
        if used != wlen {
            return Err(format!("used length {used}, expected {wlen}").into());
        }
        let mut w = vec![0u8; wlen as usize];
        self.mem.read_slice(&mut w, back)?;
        let status = Status::from_u8(w[props as usize]).ok_or("unknown status byte")?;
        w.truncate(props as usize);
        Ok((status, w))
    }

    fn expect_ok(&mut self, what: &str, req: Request) -> Result<()> {
        match self.send(&req, 0)?.0 {
            Status::Ok => {
                println!("  guest: {what}: OK");
                Ok(())
            }
            s => Err(format!("{what}: status {s:?}").into()),
        }
    }

    /// PROBE: the endpoint's reserved regions.
    fn probe(&mut self, endpoint: u32) -> Result<Vec<ResvMemProperty>> {
        let (status, props) = self.send(&Request::Probe(ProbeReq { endpoint }), self.probe_size)?;
        if status != Status::Ok {
            return Err(format!("PROBE: status {status:?}").into());
        }
        let mut regions = Vec::new();
        let mut at = 0;
        // Properties: le16 type (low 12 bits), le16 length, value; type 0
        // ends the list.
        while at + 4 <= props.len() {
            let ty = u16::from_le_bytes([props[at], props[at + 1]]) & 0xfff;
            let len = usize::from(u16::from_le_bytes([props[at + 2], props[at + 3]]));
            if ty == 0 {
                break;
            }
            let end = (at + 4 + len).min(props.len());
            if ty == VIRTIO_IOMMU_PROBE_T_RESV_MEM {
                regions.extend(ResvMemProperty::decode(&props[at..end]));
            }
            at = end;
        }
        Ok(regions)
    }

    /// Offers `n` buffers of one fault record each to the event queue.
    fn add_event_buffers(&mut self, n: u64) -> Result<()> {
        for i in 0..n {
            let buf = GuestAddress(IOMMU_EVENT_BUFS + i * 64);
            self.eventq
                .add_chain(&self.mem, &[(buf, FAULT_SIZE as u32, true)]);
        }
        self.eventq.kick(&self.mem);
        self.notify[usize::from(EVENT_QUEUE)].write(1)?;
        Ok(())
    }

    /// Waits for `n` fault records and decodes them.
    fn read_faults(&mut self, n: usize) -> Result<Vec<FaultRecord>> {
        let mut out = Vec::new();
        while out.len() < n {
            while let Some((head, len)) = self.eventq.pop_used(&self.mem) {
                if len as usize != FAULT_SIZE {
                    return Err(format!("event buffer returned with {len} bytes").into());
                }
                // Buffers were put in order, one descriptor each, so the
                // head names the buffer.
                let mut b = [0u8; FAULT_SIZE];
                self.mem.read_slice(
                    &mut b,
                    GuestAddress(IOMMU_EVENT_BUFS + u64::from(head) * 64),
                )?;
                out.push(FaultRecord::decode(&b).ok_or("short fault record")?);
            }
            if out.len() < n {
                guest_wait_irq(&self.irq[usize::from(EVENT_QUEUE)])?;
            }
        }
        Ok(out)
    }
}

/// The guest's entropy driver: its queue lives at guest-physical
/// `RNG_RINGS_GPA`, the device sees it at `RNG_RINGS_IOVA`.
struct GuestRngDriver {
    q: DriverQueue,
}

impl GuestRngDriver {
    fn to_iova(gpa: u64) -> u64 {
        gpa - RNG_RINGS_GPA + RNG_RINGS_IOVA
    }

    /// Offers the entropy buffer (by IOVA, as the DMA API hands it out).
    fn request(&mut self, mem: &GuestMemoryMmap) {
        let seg = (GuestAddress(RNG_BUF_IOVA), RNG_BUF_LEN, true);
        self.q.add_chain(mem, &[seg]);
        self.q.kick(mem);
    }

    fn used(&mut self, mem: &GuestMemoryMmap) -> Option<u32> {
        self.q.pop_used(mem).map(|(_, len)| len)
    }
}

fn ensure(ok: bool, what: &str) -> Result<()> {
    if ok {
        println!("  check: {what}");
        Ok(())
    } else {
        Err(format!("check failed: {what}").into())
    }
}

fn run() -> Result<()> {
    // ---- VMM: guest RAM and the device, from the config. ----
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)])?;
    let cfg = IommuConfig::from_json_str(IOMMU_JSON)?;
    // The endpoints behind the vIOMMU, and guest RAM as inclusive ranges.
    let dev = VirtioIommu::new(&cfg, &[RNG_ENDPOINT], &[(0, RAM_SIZE - 1)])?;
    let viommu = Arc::clone(dev.viommu());
    println!(
        "vmm: virtio-iommu (device type {}), queues {:?}, features {:#x}",
        dev.device_type(),
        dev.queue_max_sizes(),
        dev.avail_features()
    );
    let dev = Arc::new(Mutex::new(dev));
    let lock = || dev.lock().map_err(|_| "device lock poisoned");

    // ---- GUEST: reads config space and features, accepts features. ----
    let mut raw = [0u8; CONFIG_SIZE];
    lock()?.read_config(0, &mut raw); // the transport's config-space read
    let config = ConfigSpace::decode(&raw).ok_or("config space")?;
    println!(
        "  guest: page_size_mask {:#x}, input range {:#x}..={:#x}",
        config.page_size_mask, config.input_start, config.input_end
    );
    // DriverQueue publishes no used_event: the guest declines EVENT_IDX.
    let offered = lock()?.avail_features();
    let accepted = offered & !(1 << VIRTIO_RING_F_EVENT_IDX);

    // ---- VMM: FEATURES_OK. ----
    lock()?.set_acked_features(accepted);

    // ---- GUEST: lays out its queues and writes the queue registers. ----
    let requestq = DriverQueue::new(&mem, GuestAddress(IOMMU_REQUESTQ), 64);
    let eventq = DriverQueue::new(&mem, GuestAddress(IOMMU_EVENTQ), 8);
    // The virtio-iommu itself is not behind an IOMMU: bus address = GPA.
    let regs = [
        guest_queue_registers(&requestq, |a| a),
        guest_queue_registers(&eventq, |a| a),
    ];

    // ---- VMM: DRIVER_OK: queues from the registers, activate, worker. ----
    let [max_req, max_evt] = lock()?.queue_max_sizes();
    let irq = EventFdInterrupt {
        fds: [EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?],
    };
    let guest_irq = [irq.fds[0].try_clone()?, irq.fds[1].try_clone()?];
    lock()?.activate(
        &mem,
        queue_from_registers(&regs[0], max_req)?,
        queue_from_registers(&regs[1], max_evt)?,
        Arc::new(irq),
    )?;
    let kicks = [EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?];
    let guest_notify = [kicks[0].try_clone()?, kicks[1].try_clone()?];
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let worker = spawn_worker(Arc::clone(&dev), mem.clone(), kicks, stop.try_clone()?)?;
    println!("vmm: virtio-iommu activated, worker thread serving its queues");

    let mut guest = GuestIommuDriver {
        mem: mem.clone(),
        requestq,
        eventq,
        notify: guest_notify,
        irq: guest_irq,
        probe_size: config.probe_size,
    };
    let outcome = drive(&mut guest, &mem, &viommu);

    // ---- VMM: shut the worker down and report. ----
    stop.write(1)?;
    let (requests, delivered) = worker.join().map_err(|_| "worker panicked")??;
    println!("vmm: worker completed {requests} requests, delivered {delivered} fault records");
    outcome?;
    ensure(requests == 5, "the worker completed all 5 requests")?;
    ensure(delivered == 2, "the worker delivered both fault records")?;
    let stats = lock()?.stats().clone();
    println!("vmm: device stats: {stats:?}");
    Ok(())
}

/// The guest's session and the entropy device's DMA.
fn drive(
    guest: &mut GuestIommuDriver,
    mem: &GuestMemoryMmap,
    viommu: &Arc<vmm_iommu::Viommu>,
) -> Result<()> {
    // GUEST: PROBE finds the MSI doorbell region it must not map over.
    let regions = guest.probe(RNG_ENDPOINT)?;
    println!("  guest: PROBE endpoint {RNG_ENDPOINT}: reserved regions {regions:x?}");
    ensure(
        regions.iter().any(|r| {
            r.subtype == VIRTIO_IOMMU_RESV_MEM_T_MSI
                && r.start == 0xfee0_0000
                && r.end == 0xfeef_ffff
        }),
        "PROBE reports the MSI region of the config",
    )?;

    // GUEST: a DMA domain for the entropy device, its rings and its buffer
    // mapped.
    guest.expect_ok(
        "ATTACH endpoint 8 to domain 1",
        Request::Attach(AttachReq {
            domain: 1,
            endpoint: RNG_ENDPOINT,
            ..Default::default()
        }),
    )?;
    let rw = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
    guest.expect_ok(
        "MAP rings IOVA 0x40000000 -> GPA 0x800000 (64 KiB)",
        Request::Map(MapReq {
            domain: 1,
            virt_start: RNG_RINGS_IOVA,
            virt_end: RNG_RINGS_IOVA + 0xffff,
            phys_start: RNG_RINGS_GPA,
            flags: rw,
        }),
    )?;
    guest.expect_ok(
        "MAP buffer IOVA 0x50000000 -> GPA 0x900000 (4 KiB)",
        Request::Map(MapReq {
            domain: 1,
            virt_start: RNG_BUF_IOVA,
            virt_end: RNG_BUF_IOVA + 0xfff,
            phys_start: RNG_BUF_GPA,
            flags: rw,
        }),
    )?;
    // GUEST: the entropy device's queue, handed over by IOVA.
    let mut rng = GuestRngDriver {
        q: DriverQueue::new(mem, GuestAddress(RNG_RINGS_GPA), 16),
    };
    let rng_regs = guest_queue_registers(&rng.q, GuestRngDriver::to_iova);

    // VMM: the entropy device's DRIVER_OK. Its queue is checked through
    // the device's own view of memory: IOVAs, translated by the vIOMMU.
    let iommu_mem = IommuMemory::new(mem.clone(), viommu.endpoint_iommu(RNG_ENDPOINT), true, ());
    let dma_mem = viommu.dma_memory(RNG_ENDPOINT, mem.clone());
    let mut rng_queue = queue_from_registers(&rng_regs, RNG_QUEUE_MAX)?;
    ensure(
        rng_queue.is_valid(&iommu_mem),
        "the entropy queue's rings are valid at their IOVAs",
    )?;
    ensure(
        !rng_queue.is_valid(mem),
        "... and are not at those addresses in guest-physical memory",
    )?;
    let mut next = 0u8;

    // GUEST asks for entropy; VMM serves it through IommuMemory.
    rng.request(mem);
    let done = serve_entropy(&mut rng_queue, &iommu_mem, &mut next)?;
    println!("vmm: entropy request served through IommuMemory: used lengths {done:?}");
    let mut got = vec![0u8; RNG_BUF_LEN as usize];
    mem.read_slice(&mut got, GuestAddress(RNG_BUF_GPA))?;
    let expect: Vec<u8> = (1..=RNG_BUF_LEN).map(|i| i as u8).collect();
    ensure(
        rng.used(mem) == Some(RNG_BUF_LEN) && got == expect,
        "IommuMemory DMA landed at GPA 0x900000, byte for byte",
    )?;

    // Again, through the faster DmaMemory view.
    rng.request(mem);
    let done = serve_entropy(&mut rng_queue, &dma_mem, &mut next)?;
    println!("vmm: entropy request served through DmaMemory: used lengths {done:?}");
    mem.read_slice(&mut got, GuestAddress(RNG_BUF_GPA))?;
    let expect: Vec<u8> = (RNG_BUF_LEN + 1..=2 * RNG_BUF_LEN)
        .map(|i| i as u8)
        .collect();
    ensure(
        rng.used(mem) == Some(RNG_BUF_LEN) && got == expect,
        "DmaMemory DMA landed at GPA 0x900000, byte for byte",
    )?;
    ensure(viommu.faults().is_empty(), "no fault so far")?;

    // GUEST: event buffers for fault records, then takes the buffer away.
    guest.add_event_buffers(4)?;
    guest.expect_ok(
        "UNMAP the buffer",
        Request::Unmap(UnmapReq {
            domain: 1,
            virt_start: RNG_BUF_IOVA,
            virt_end: RNG_BUF_IOVA + 0xfff,
            ..Default::default()
        }),
    )?;
    mem.write_slice(&[0u8; 4096], GuestAddress(RNG_BUF_GPA))?;

    // GUEST asks for entropy into the unmapped buffer, once per view. The
    // device model's DMA is refused either way (the queue's rings are
    // still mapped), and each refusal queues a fault record, which wakes
    // the worker through the fault eventfd to deliver it.
    rng.request(mem);
    let by_dma_memory = serve_entropy(&mut rng_queue, &dma_mem, &mut next)?;
    rng.request(mem);
    let by_iommu_memory = serve_entropy(&mut rng_queue, &iommu_mem, &mut next)?;
    ensure(
        by_dma_memory == [0] && by_iommu_memory == [0],
        "after UNMAP both views refuse the DMA; the chains complete empty",
    )?;
    ensure(
        rng.used(mem) == Some(0) && rng.used(mem) == Some(0),
        "the guest sees both entropy requests completed with nothing written",
    )?;
    mem.read_slice(&mut got, GuestAddress(RNG_BUF_GPA))?;
    ensure(
        got.iter().all(|&b| b == 0),
        "nothing reached GPA 0x900000 after the UNMAP",
    )?;

    // GUEST: the fault records, from the event queue.
    let faults = guest.read_faults(2)?;
    for f in &faults {
        println!(
            "  guest: fault record: reason {}, flags {:#x}, endpoint {}, address {:#x}",
            f.reason, f.flags, f.endpoint, f.address
        );
    }
    ensure(
        faults.iter().all(|f| {
            f.reason == VIRTIO_IOMMU_FAULT_R_MAPPING
                && f.flags == VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS
                && f.endpoint == RNG_ENDPOINT
                && f.address == RNG_BUF_IOVA
        }),
        "two MAPPING faults: a write by endpoint 8 at IOVA 0x50000000",
    )?;
    let (hits, misses) = dma_mem.hit_miss();
    println!("vmm: DmaMemory IOTLB: {hits} hits, {misses} misses");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("emulated_device: every check passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("emulated_device: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
