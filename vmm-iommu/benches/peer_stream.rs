//! The "peer stream" of `docs/BENCH.md`: the request stream
//! the cloud-hypervisor and crosvm figures were measured with, driven the
//! same way, so that our figures sit beside theirs as ratios.
//!
//! - device: MAP+UNMAP pairs through a real 256-entry split queue in 16 MiB
//!   of guest memory (2-descriptor chains, statuses checked);
//! - state: the same pairs applied to the state model directly;
//! - translate: 64-byte lookups through the IOTLB translator, the slow
//!   path and vm-memory's `IommuMemory`;
//! - memory: heap bytes and RSS per mapping after 1,000,000 MAPs through
//!   the queue (a counting global allocator);
//! - dma: an emulated device's memory access through the vIOMMU
//!   (`DmaMemory`, `IommuMemory`) beside plain memory and the Translator
//!   alone, runs alternating, as ratios (issue 14 part 1);
//! - index: random translation over 1,000,000 mappings beside a plain
//!   `BTreeMap` lookup over the same mappings (issue 14 part 2).
//!
//! Usage: `scripts/bench.sh [--quick] [--runs N] [--secs S] [SECTION...]`,
//! SECTION among `memory`, `device`, `state`, `translate`, `dma`, `index`
//! (default: all).
//! Each figure is the median of `--runs` runs (7) of at least `--secs`
//! seconds (1) of timed work; `--quick` is 3 runs of 0.2 s.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::iommu::IommuMemory;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_iommu::config::IommuConfig;
use vmm_iommu::testing::{driver_features, layout, CountingInterrupt, Harness};
use vmm_iommu::wire::{
    AttachReq, MapReq, Request, Status, UnmapReq, VIRTIO_F_VERSION_1, VIRTIO_IOMMU_F_MAP_UNMAP,
    VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE,
};
use vmm_iommu::AdaptivePoll;
use vmm_iommu::Applied;
use vmm_iommu::Router;
use vmm_iommu::Viommu;
use vmm_iommu::VirtioIommu;
use vmm_iommu::{IommuState, ACCESS_READ};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// ---------------------------------------------------------------------------
// Counting allocator: live heap bytes = allocated − freed.

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged and returns its result unchanged, so this allocator meets the
// `GlobalAlloc` contract exactly when `System` does; the counter only
// observes sizes and never touches the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: our caller upholds `GlobalAlloc::alloc`'s contract (`l` has
        // non-zero size), which is the whole of `System.alloc`'s contract.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`: the caller guarantees `l` has non-zero size,
        // all that `System.alloc_zeroed` requires.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: every block this allocator hands out comes from `System`
        // with the same layout, and the caller guarantees `p` is such a block
        // allocated with `l`; so this is a valid `System.dealloc`.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `p` was allocated by `System` with layout `l` (all our blocks
        // are), and the caller guarantees `new_size` is non-zero and does not
        // overflow when rounded to `l.align()`: `System.realloc`'s contract.
        let q = unsafe { System.realloc(p, l, new_size) };
        if !q.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live_heap() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// VmRSS of this process in bytes.
fn vm_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

// ---------------------------------------------------------------------------
// The stream (BENCH.md, "The request stream").

const PAGE: u64 = 4096;
const IOVA_BASE: u64 = 0x1_0000_0000;
const PHYS_BASE: u64 = 0x4000_0000;
const DOMAIN: u32 = 1;
const EP: u32 = 1;
const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const PAIR_SEED: u64 = 0x9E37_79B9_7F4A_7C15;
const LOOKUP_SEED: u64 = 0x1234_5678_9abc_def1;
/// `span` of the pair stream when N = 0.
const SPAN_N0: u64 = 1 << 20;
/// Guest-physical memory the stream names (`PHYS_BASE + k·4096`, k < 2^20,
/// N ≤ 2^20), declared as RAM to the device but not backed: MAP never
/// touches the memory it maps.
const STREAM_RAM: (u64, u64) = (PHYS_BASE, PHYS_BASE + SPAN_N0 * PAGE - 1);
/// Pairs per round (= 128 chains = 256 descriptors, the whole queue).
const ROUND_PAIRS: usize = 64;
/// Lookups per translation run.
const LOOKUPS: usize = 1_000_000;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// The i-th populate MAP.
fn populate_map(i: u64) -> MapReq {
    let iova = IOVA_BASE + 2 * i * PAGE;
    MapReq {
        domain: DOMAIN,
        virt_start: iova,
        virt_end: iova + PAGE - 1,
        phys_start: PHYS_BASE + i * PAGE,
        flags: RW,
    }
}

/// The pair for `k`: MAP of the odd page `2k+1`, then its UNMAP.
fn pair(k: u64) -> (MapReq, UnmapReq) {
    let iova = IOVA_BASE + (2 * k + 1) * PAGE;
    let map = MapReq {
        domain: DOMAIN,
        virt_start: iova,
        virt_end: iova + PAGE - 1,
        phys_start: PHYS_BASE + k * PAGE,
        flags: RW,
    };
    let unmap = UnmapReq {
        domain: DOMAIN,
        virt_start: iova,
        virt_end: iova + PAGE - 1,
        reserved: [0; 4],
    };
    (map, unmap)
}

/// The `k`s of the timed pairs for a domain of `n` populated mappings.
struct PairStream {
    rng: XorShift,
    span: u64,
}

impl PairStream {
    fn new(n: u64) -> Self {
        PairStream {
            rng: XorShift(PAIR_SEED ^ n),
            span: if n == 0 { SPAN_N0 } else { n },
        }
    }

    fn next_k(&mut self) -> u64 {
        self.rng.next() % self.span
    }
}

#[derive(Clone, Copy)]
struct Lookup {
    iova: u64,
    gpa: u64,
}

/// `LOOKUPS` lookups over `n` mappings: a random populated page, then a
/// random 64-byte-aligned offset in it (two draws of the generator).
fn lookups(n: u64) -> Vec<Lookup> {
    let mut rng = XorShift(LOOKUP_SEED ^ n);
    (0..LOOKUPS)
        .map(|_| {
            let i = rng.next() % n;
            let off = (rng.next() % (PAGE / 64)) * 64;
            Lookup {
                iova: IOVA_BASE + 2 * i * PAGE + off,
                gpa: PHYS_BASE + i * PAGE + off,
            }
        })
        .collect()
}

fn attach() -> AttachReq {
    AttachReq {
        domain: DOMAIN,
        endpoint: EP,
        flags: 0,
        reserved: [0; 4],
    }
}

fn acked() -> u64 {
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_IOMMU_F_MAP_UNMAP)
}

// ---------------------------------------------------------------------------
// Device level.

/// A slot of guest memory per chain of a round: request at +0, tail at +48.
const SLOT_SIZE: u64 = 64;
const TAIL_OFF: u64 = 48;
/// Entries of the request queue, as the stream specifies (and as Linux's
/// virtio-iommu driver sets it up): 128 two-descriptor chains, one round.
const QUEUE_SIZE: u16 = 256;

/// Writes `r`'s head and body into `buf`; returns the length.
fn encode_into(r: &Request, buf: &mut [u8]) -> usize {
    buf[..4].copy_from_slice(&[r.req_type(), 0, 0, 0]);
    let body: &[u8] = match r {
        Request::Map(m) => &m.encode(),
        Request::Unmap(u) => &u.encode(),
        _ => unreachable!("the stream sends MAP and UNMAP only"),
    };
    buf[4..4 + body.len()].copy_from_slice(body);
    4 + body.len()
}

/// How the request queue's notification reaches the device.
#[derive(Clone, Copy, PartialEq)]
enum Notify {
    /// An eventfd kick served by a device thread that waits on it with
    /// epoll, as a VMM's ioeventfd worker does
    /// (`integration/src/vm/worker.rs`); the driver then polls for the
    /// interrupt as Linux's driver polls its used ring. What the stream
    /// specifies.
    /// The thread polls the queue adaptively for at most this long before
    /// it sleeps ([`AdaptivePoll`]; zero: it sleeps at once).
    Thread(Duration),
    /// `process_requestq` called on the driver's own thread: no
    /// notification cost (for the breakdown only).
    Inline,
}

/// The device's side of [`Notify::Thread`]: the thread, its kick and stop
/// eventfds, and its interrupt.
struct DeviceThread {
    kick: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl DeviceThread {
    /// Stops the thread; returns its polls and those that found requests.
    fn stop(&mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Release);
        let _ = self.kick.write(1);
        self.handle.take().map_or((0, 0), |h| h.join().unwrap())
    }

    /// Serves `dev` over `mem`: epoll on the kick, then
    /// `process_requestq` passes under the device's lock for as long as
    /// [`AdaptivePoll`] finds requests, as the test VMM's worker does.
    fn spawn(dev: Arc<Mutex<VirtioIommu>>, mem: GuestMemoryMmap, max_poll: Duration) -> Self {
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let (k, st) = (Arc::clone(&kick), Arc::clone(&stop));
        let handle = std::thread::Builder::new()
            .name("viommu-device".into())
            .spawn(move || {
                let epoll = Epoll::new().unwrap();
                epoll
                    .ctl(
                        ControlOperation::Add,
                        k.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, 0),
                    )
                    .unwrap();
                let mut events = [EpollEvent::default(); 1];
                let mut poll = AdaptivePoll::new(max_poll);
                loop {
                    match epoll.wait(-1, &mut events) {
                        Ok(0) => continue,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => panic!("epoll_wait: {e}"),
                    }
                    poll.woke();
                    let _ = k.read();
                    loop {
                        if st.load(Ordering::Acquire) {
                            return poll.counts();
                        }
                        // The driver need not notify while the thread
                        // polls; when it stops, it lets the driver notify
                        // again and serves what came unannounced.
                        dev.lock().unwrap().process_requestq_polling(&mem).unwrap();
                        if !poll.poll(|| {
                            st.load(Ordering::Relaxed) || dev.lock().unwrap().requestq_pending(&mem)
                        }) && !dev
                            .lock()
                            .unwrap()
                            .resume_requestq_notifications(&mem)
                            .unwrap()
                        {
                            break;
                        }
                    }
                }
            })
            .unwrap();
        DeviceThread {
            kick,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The device behind its request queue, ATTACHed (domain 1, endpoint 1).
///
/// After the ATTACH the bench drives the queue as a driver that keeps the
/// whole ring busy does: chain `j` of a round is always descriptors `2j`
/// (the request in slot `j`) and `2j + 1` (its 4-byte tail), so a round
/// only rewrites the request bytes, the tails, the two descriptors and its
/// avail entries, all through one `VolatileSlice` over the queue and the
/// slots. The driver's work between rounds is then a few µs, as a real
/// driver's, not the harness's general bookkeeping (which would leave the
/// device thread idle long enough to stop polling).
struct DeviceBench {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<VirtioIommu>>,
    irq: Arc<CountingInterrupt>,
    thread: Option<DeviceThread>,
    /// The driver's own `avail.idx` and the last `used.idx` it consumed.
    avail_next: u16,
    used_seen: u16,
    reqs: Vec<Request>,
    /// The request length each chain's descriptors were last written with
    /// (0: not written yet).
    desc_lens: Vec<u32>,
    /// Times the driver published chains, and times it notified (it
    /// does not while the device asks for no notification).
    publications: u64,
    notifications: u64,
}

/// The request queue's rings and the chains' slots, in one slice.
fn area(mem: &GuestMemoryMmap) -> vm_memory::VolatileSlice<'_, vm_memory::bitmap::BS<'_, ()>> {
    let at = GuestAddress(layout::REQUEST_QUEUE);
    let r = mem.find_region(at).expect("the queue lies in guest memory");
    r.get_slice(MemoryRegionAddress(at.0 - r.start_addr().0), AREA_LEN)
        .expect("the queue and the slots lie in one region")
}

/// Descriptor flags (virtio 1.3 2.7.5).
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// The used ring's flag by which the device asks for no notification.
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Offsets in the driver's area (from the descriptor table on).
const DESC_OFF: usize = 0;
const AVAIL_OFF: usize = 16 * QUEUE_SIZE as usize;
const USED_OFF: usize = (AVAIL_OFF + 6 + 2 * QUEUE_SIZE as usize).next_multiple_of(4);
const SLOTS_OFF: usize = (layout::FREE - layout::REQUEST_QUEUE) as usize;
const AREA_LEN: usize = SLOTS_OFF + 128 * SLOT_SIZE as usize;

impl DeviceBench {
    fn new(notify: Notify) -> Self {
        let cfg = IommuConfig::default();
        let mut h = Harness::with_queue_size(
            &cfg,
            &[EP],
            16,
            &[STREAM_RAM],
            QUEUE_SIZE,
            |_, _| Router::new(),
            driver_features,
        );
        assert_eq!(h.requestq.free_descriptors(), usize::from(QUEUE_SIZE));
        assert_eq!(h.send(&Request::Attach(attach())), Status::Ok);
        let Harness { mem, dev, irq, .. } = h;
        let dev = Arc::new(Mutex::new(dev));
        let thread = match notify {
            Notify::Thread(max_poll) => {
                Some(DeviceThread::spawn(dev.clone(), mem.clone(), max_poll))
            }
            Notify::Inline => None,
        };
        let mut b = DeviceBench {
            mem,
            dev,
            irq,
            thread,
            avail_next: 0,
            used_seen: 0,
            reqs: Vec::with_capacity(2 * ROUND_PAIRS),
            desc_lens: Vec::new(),
            publications: 0,
            notifications: 0,
        };
        let area = area(&b.mem);
        b.avail_next = area.load(AVAIL_OFF + 2, Ordering::Acquire).unwrap();
        b.used_seen = area.load(USED_OFF + 2, Ordering::Acquire).unwrap();
        assert_eq!(b.avail_next, b.used_seen, "the ATTACH came back");
        b
    }

    fn viommu(&self) -> Arc<Viommu> {
        self.dev.lock().unwrap().viommu().clone()
    }

    /// Writes `self.reqs` (≤ 128) as 2-descriptor chains (readable request,
    /// writable 4-byte tail) in the avail ring, unpublished; then, timed,
    /// publishes them `per_notify` at a time, each followed by the
    /// notification (unless the device asked for none: its thread polls
    /// the queue) and a wait for the used index (pop, parse, apply, status,
    /// used, interrupt). Then checks that every chain came back, in order,
    /// with status OK. Returns the timed duration.
    fn round(&mut self, per_notify: usize) -> Duration {
        let n = self.reqs.len();
        assert!(n <= usize::from(QUEUE_SIZE) / 2 && per_notify > 0);
        let base = self.avail_next;
        let area = area(&self.mem);
        {
            let q = usize::from(QUEUE_SIZE);
            // Chain j always uses slot j and descriptors 2j, 2j+1: they are
            // written again only when the request's length changes, and
            // the request and its tail go in one copy. The driver's work
            // between rounds stays a few µs, so the device thread is
            // still polling when the round is published (a slower
            // driver measured the device's sleep and wake-up instead).
            self.desc_lens.resize(n, 0);
            for (j, r) in self.reqs.iter().enumerate() {
                let mut buf = [0u8; SLOT_SIZE as usize];
                let len = encode_into(r, &mut buf[..TAIL_OFF as usize]);
                buf[TAIL_OFF as usize..TAIL_OFF as usize + 4]
                    .copy_from_slice(&u32::MAX.to_le_bytes());
                let at = SLOTS_OFF + j * SLOT_SIZE as usize;
                area.write_slice(&buf, at).unwrap();
                let head = 2 * j as u16;
                if self.desc_lens[j] != len as u32 {
                    self.desc_lens[j] = len as u32;
                    let gpa = layout::REQUEST_QUEUE + at as u64;
                    let desc = [
                        (gpa, len as u32, VIRTQ_DESC_F_NEXT, head + 1),
                        (gpa + TAIL_OFF, 4, VIRTQ_DESC_F_WRITE, 0),
                    ];
                    for (i, (addr, dlen, flags, next)) in desc.into_iter().enumerate() {
                        let d = DESC_OFF + 16 * (usize::from(head) + i);
                        area.write_obj(addr, d).unwrap();
                        area.write_obj(dlen, d + 8).unwrap();
                        area.write_obj(flags, d + 12).unwrap();
                        area.write_obj(next, d + 14).unwrap();
                    }
                }
                let slot = usize::from(base.wrapping_add(j as u16)) % q;
                area.write_obj(head, AVAIL_OFF + 4 + 2 * slot).unwrap();
            }
        }
        let irq0 = self.irq.count(0);
        let mut published = 0;
        let t0 = Instant::now();
        while published < n {
            published = (published + per_notify).min(n);
            let idx = base.wrapping_add(published as u16);
            area.store(idx, AVAIL_OFF + 2, Ordering::Release).unwrap();
            self.publications += 1;
            match &self.thread {
                Some(t) => {
                    // As Linux's virtqueue_kick_prepare: after the index,
                    // a full barrier, then the device's NO_NOTIFY flag.
                    std::sync::atomic::fence(Ordering::SeqCst);
                    let flags: u16 = area.load(USED_OFF, Ordering::Relaxed).unwrap();
                    if flags & VIRTQ_USED_F_NO_NOTIFY == 0 {
                        t.kick.write(1).unwrap();
                        self.notifications += 1;
                    }
                    // The driver polls the used index it waits for
                    // (acquire: the statuses before it), as Linux's
                    // virtio-iommu driver does.
                    while area.load::<u16>(USED_OFF + 2, Ordering::Acquire).unwrap() != idx {
                        std::hint::spin_loop();
                    }
                }
                None => {
                    self.dev
                        .lock()
                        .unwrap()
                        .process_requestq(&self.mem)
                        .unwrap();
                }
            }
        }
        let dt = t0.elapsed();
        // The device raises the interrupt after it publishes the used
        // index, so it may come just after the driver saw the index.
        let t_irq = Instant::now();
        while self.irq.count(0) == irq0 {
            assert!(
                t_irq.elapsed() < Duration::from_secs(10),
                "no interrupt for the round"
            );
            std::hint::spin_loop();
        }
        let q = usize::from(QUEUE_SIZE);
        for (j, r) in self.reqs.iter().enumerate() {
            let e = USED_OFF + 4 + 8 * (usize::from(self.used_seen.wrapping_add(j as u16)) % q);
            let id: u32 = area.read_obj(e).unwrap();
            let len: u32 = area.read_obj(e + 4).unwrap();
            assert_eq!((id, len), (2 * j as u32, 4), "used element of {r:?}");
            let tail: u32 = area
                .read_obj(SLOTS_OFF + j * SLOT_SIZE as usize + TAIL_OFF as usize)
                .unwrap();
            assert_eq!(tail, 0, "status of {r:?}");
        }
        let used_now: u16 = area.load(USED_OFF + 2, Ordering::Acquire).unwrap();
        self.avail_next = base.wrapping_add(n as u16);
        self.used_seen = self.used_seen.wrapping_add(n as u16);
        assert_eq!(
            used_now, self.used_seen,
            "no more used elements than chains"
        );
        dt
    }

    /// N populate MAPs, 128 per notification.
    fn populate(&mut self, n: u64) {
        let mut i = 0;
        while i < n {
            self.reqs.clear();
            while i < n && self.reqs.len() < 128 {
                self.reqs.push(Request::Map(populate_map(i)));
                i += 1;
            }
            self.round(128);
        }
        let v = self.viommu();
        assert_eq!(v.state().mapping_count(DOMAIN) as u64, n);
    }

    /// One round of 64 pairs, `pairs_per_notify` pairs per notification.
    fn pairs(&mut self, s: &mut PairStream, pairs_per_notify: usize) -> (Duration, u64) {
        self.reqs.clear();
        for _ in 0..ROUND_PAIRS {
            let (m, u) = pair(s.next_k());
            self.reqs.push(Request::Map(m));
            self.reqs.push(Request::Unmap(u));
        }
        (self.round(2 * pairs_per_notify), ROUND_PAIRS as u64)
    }
}

// ---------------------------------------------------------------------------
// State level.

/// A vIOMMU over the stream's memory, ATTACHed and populated with `n`
/// mappings through `apply`.
fn state_viommu(n: u64) -> Arc<Viommu> {
    let v = Arc::new(Viommu::new(&IommuConfig::default(), &[EP], &[STREAM_RAM]).unwrap());
    v.set_acked_features(acked());
    assert_eq!(v.apply(&Request::Attach(attach())), Ok(Applied::Done));
    for i in 0..n {
        assert_eq!(v.apply(&Request::Map(populate_map(i))), Ok(Applied::Done));
    }
    v
}

/// A bare state model, ATTACHed and populated with `n` mappings.
fn bare_state(n: u64) -> IommuState {
    let mut st = IommuState::new(&IommuConfig::default(), &[EP], &[STREAM_RAM]);
    st.set_acked_features(acked());
    st.attach(&attach()).unwrap();
    for i in 0..n {
        st.map(&populate_map(i)).unwrap();
    }
    st
}

/// Pairs per timed batch at state level (`k`s drawn before the timer).
const STATE_BATCH: usize = 4096;

fn draw(s: &mut PairStream, ks: &mut Vec<u64>) {
    ks.clear();
    ks.extend((0..STATE_BATCH).map(|_| s.next_k()));
}

// ---------------------------------------------------------------------------
// Measurement and reporting.

struct Opts {
    runs: usize,
    run_time: Duration,
    sections: Vec<String>,
}

impl Opts {
    fn parse() -> Self {
        let mut o = Opts {
            runs: 7,
            run_time: Duration::from_secs(1),
            sections: Vec::new(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                // cargo bench passes --bench to harness = false benches.
                "--bench" => {}
                "--quick" => {
                    o.runs = 3;
                    o.run_time = Duration::from_millis(200);
                }
                "--runs" => o.runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(0),
                "--secs" => {
                    o.run_time = args
                        .next()
                        .and_then(|v| v.parse::<f64>().ok())
                        .and_then(|s| Duration::try_from_secs_f64(s).ok())
                        .unwrap_or_default()
                }
                s @ ("memory" | "device" | "state" | "translate" | "threads" | "dma" | "index") => {
                    o.sections.push(s.into())
                }
                // A fixed amount of device-path work for an instruction
                // profiler (`valgrind --tool=callgrind`): `profile N R`, N
                // resident mappings, then R rounds (64) of 64 pairs served
                // inline; the pairs' share is a run's count minus that of
                // the same N with R = 0. `profile-state N R`: R batches of
                // 4,096 pairs on the bare state model, as `state` does;
                // `profile-apply N R` the same through `Viommu::apply`.
                // `profile-copy plain|dma|dma-ahead|dma-bytes R`: R rounds
                // of the `dma` section's 4 KiB copies of 64 hot pages
                // (`dma-ahead`: each next page prefetched; `dma-bytes`:
                // through the `Bytes` trait).
                "profile-copy" => {
                    let how = args.next().unwrap_or_default();
                    let rounds = args.next().unwrap_or_default();
                    o.sections.push(format!("profile-copy {how} {rounds}"));
                }
                kind @ ("profile" | "profile-state" | "profile-apply") => {
                    let n: u64 = args.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    let rounds: u64 = args.next().and_then(|v| v.parse().ok()).unwrap_or(64);
                    o.sections.push(format!("{kind} {n} {rounds}"));
                }
                _ => {
                    eprintln!(
                        "usage: peer_stream [--quick] [--runs N] [--secs S] \
                         [memory|device|state|translate|threads|dma|index]..."
                    );
                    std::process::exit(2);
                }
            }
        }
        if o.runs == 0 || o.run_time.is_zero() {
            eprintln!("--runs and --secs must be positive");
            std::process::exit(2);
        }
        o
    }

    fn wants(&self, section: &str) -> bool {
        self.sections.is_empty() || self.sections.iter().any(|s| s == section)
    }
}

/// Median ops/s over the runs, and the spread (max − min) / median.
struct Stats {
    median: f64,
    spread: f64,
}

/// Runs `step` (which returns its timed duration and op count) until each
/// run holds `run_time` of timed work; one short warm-up run first.
fn measure(o: &Opts, mut step: impl FnMut() -> (Duration, u64)) -> Stats {
    let mut run = |target: Duration| {
        let (mut t, mut n) = (Duration::ZERO, 0u64);
        while t < target {
            let (d, k) = step();
            t += d;
            n += k;
        }
        n as f64 / t.as_secs_f64()
    };
    run(o.run_time / 5);
    let mut rates: Vec<f64> = (0..o.runs).map(|_| run(o.run_time)).collect();
    rates.sort_by(f64::total_cmp);
    let m = rates.len();
    let median = if m % 2 == 1 {
        rates[m / 2]
    } else {
        (rates[m / 2 - 1] + rates[m / 2]) / 2.0
    };
    Stats {
        median,
        spread: (rates[m - 1] - rates[0]) / median,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Operations per second, higher is better.
    Rate,
    /// Nanoseconds per operation, lower is better.
    Latency,
    /// Bytes per mapping, lower is better.
    Bytes,
}

struct Fig<'a> {
    name: &'a str,
    kind: Kind,
    /// ops/s, ns or bytes, by `kind`.
    value: f64,
    spread: Option<f64>,
    ch: Option<f64>,
    crosvm: Option<f64>,
    target: Option<(f64, &'a str)>,
}

fn group(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn show(kind: Kind, v: f64) -> String {
    match kind {
        Kind::Rate if v >= 1e6 => format!("{}/s ({:.0} ns)", group(v), 1e9 / v),
        Kind::Rate => format!("{}/s ({:.2} µs)", group(v), 1e6 / v),
        Kind::Latency => format!("{v:.1} ns"),
        Kind::Bytes => format!("{v:.1} B"),
    }
}

/// How many times better we are than `peer` (> 1: better).
fn better(kind: Kind, ours: f64, peer: f64) -> f64 {
    match kind {
        Kind::Rate => ours / peer,
        Kind::Latency | Kind::Bytes => peer / ours,
    }
}

fn header() {
    println!(
        "{:<54} {:>24} {:>6} | {:>22} {:>7} | {:>22} {:>7} | {:<30}",
        "figure",
        "ours (median)",
        "spread",
        "cloud-hypervisor",
        "x CH",
        "crosvm",
        "x crosvm",
        "target"
    );
    println!(
        "{}",
        "-".repeat(54 + 25 + 7 + 3 + 23 + 8 + 3 + 23 + 8 + 3 + 30)
    );
}

fn print(f: &Fig) {
    let peer = |p: Option<f64>| match p {
        Some(p) => (
            show(f.kind, p),
            format!("{:.2}", better(f.kind, f.value, p)),
        ),
        None => ("-".into(), "-".into()),
    };
    let (ch, xch) = peer(f.ch);
    let (cv, xcv) = peer(f.crosvm);
    let target = match f.target {
        Some((t, note)) => {
            let ok = match f.kind {
                Kind::Rate => f.value >= t,
                Kind::Latency | Kind::Bytes => f.value <= t,
            };
            let cmp = if f.kind == Kind::Rate { ">=" } else { "<=" };
            let t = match f.kind {
                Kind::Rate => format!("{}/s", group(t)),
                _ => show(f.kind, t),
            };
            format!("{cmp} {t}{note} {}", if ok { "MET" } else { "MISSED" })
        }
        None => "-".into(),
    };
    let spread = f
        .spread
        .map_or("-".into(), |s| format!("{:.0}%", s * 100.0));
    println!(
        "{:<54} {:>24} {:>6} | {:>22} {:>7} | {:>22} {:>7} | {}",
        f.name,
        show(f.kind, f.value),
        spread,
        ch,
        xch,
        cv,
        xcv,
        target
    );
    let _ = std::io::stdout().flush();
}

fn row<'a>(name: &'a str, kind: Kind, s: &Stats) -> Fig<'a> {
    Fig {
        name,
        kind,
        value: if kind == Kind::Latency {
            1e9 / s.median
        } else {
            s.median
        },
        spread: Some(s.spread),
        ch: None,
        crosvm: None,
        target: None,
    }
}

// ---------------------------------------------------------------------------
// Sections.

/// Where and when the peers' figures were measured (docs/BENCH.md, "The
/// peers' figures").
const PEER_NOTE: &str = "peers measured on this machine kind (AMD EPYC Zen 4, 2 vCPUs, \
rustc 1.95, release): cloud-hypervisor's device path side by side with ours on 2026-12-06 \
(built from its source, its own eventfd-kicked device thread, medians of 3 runs of 7); \
crosvm's mapper alone (no queue), from the project's shared notes";

/// Peer pairs/s per N: (N, cloud-hypervisor device path side by side on
/// 2026-12-06, crosvm mapper from the shared notes). Not measured at
/// N = 1,000,000 (cloud-hypervisor's UNMAP scans the domain twice).
const PEER_PAIRS: [(u64, Option<f64>, Option<f64>); 4] = [
    (0, Some(645_000.0), Some(17_700_000.0)),
    (10_000, Some(23_000.0), Some(3_550_000.0)),
    (100_000, Some(2_200.0), Some(2_640_000.0)),
    (1_000_000, None, None),
];

/// The device-path target (pairs/s at every N) and its flatness
/// (N = 1,000,000 / N = 0).
const DEVICE_TARGET: f64 = 3_000_000.0;
const FLATNESS_TARGET: f64 = 0.8;

fn memory_section() {
    const N: u64 = 1_000_000;
    let mut b = DeviceBench::new(Notify::Thread(Duration::ZERO));
    let (heap0, rss0) = (live_heap(), vm_rss());
    let t0 = Instant::now();
    b.populate(N);
    let dt = t0.elapsed();
    let (heap1, rss1) = (live_heap(), vm_rss());
    let table = b.viommu().state().mapping_bytes();
    let per = |a: usize, z: usize| (a as f64 - z as f64) / N as f64;
    print(&Fig {
        name: "heap per mapping, N=1,000,000 (live bytes, device path)",
        kind: Kind::Bytes,
        value: per(heap1, heap0),
        spread: None,
        ch: Some(49.0),
        crosvm: Some(78.0),
        target: Some((32.0, "")),
    });
    print(&Fig {
        name: "  mapping table arrays only (state.mapping_bytes)",
        kind: Kind::Bytes,
        value: table as f64 / N as f64,
        spread: None,
        ch: None,
        crosvm: None,
        target: None,
    });
    print(&Fig {
        name: "  RSS growth per mapping (VmRSS)",
        kind: Kind::Bytes,
        value: per(rss1 as usize, rss0 as usize),
        spread: None,
        ch: None,
        crosvm: None,
        target: None,
    });
    println!(
        "  (populate of {} MAPs through the queue: {:.2} s, {}/s; VmRSS {:.1} -> {:.1} MiB)",
        group(N as f64),
        dt.as_secs_f64(),
        group(N as f64 / dt.as_secs_f64()),
        rss0 as f64 / (1 << 20) as f64,
        rss1 as f64 / (1 << 20) as f64
    );
}

fn device_section(o: &Opts) {
    println!("  ({PEER_NOTE})");
    // VMM_IOMMU_BENCH_POLL_US: another most for the worker's polling.
    let poll = std::env::var("VMM_IOMMU_BENCH_POLL_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(AdaptivePoll::DEFAULT_MAX, Duration::from_micros);
    println!(
        "  (device path: {QUEUE_SIZE}-entry request queue, each notification an eventfd kick \
         served by a device thread (epoll) that polls the queue adaptively for at most {} µs \
         before it sleeps (vmm_iommu::AdaptivePoll, QEMU's poll-max-ns default), the driver \
         polling for the interrupt)",
        poll.as_micros()
    );
    let mut at_zero = 0.0;
    for (n, ch, _) in PEER_PAIRS {
        let mut b = DeviceBench::new(Notify::Thread(poll));
        b.populate(n);
        let mut s = PairStream::new(n);
        let st = measure(o, || b.pairs(&mut s, ROUND_PAIRS));
        let name = format!(
            "device MAP+UNMAP pairs, N={}, 64 pairs/notification",
            group(n as f64)
        );
        if n == 0 {
            at_zero = st.median;
        }
        print(&Fig {
            ch,
            target: Some((DEVICE_TARGET, "")),
            ..row(&name, Kind::Rate, &st)
        });
        if let Some((polls, hits)) = b.thread.as_mut().map(DeviceThread::stop) {
            println!(
                "  (the device thread's polls found requests {hits} times in {polls}: \
                 {:.0}% of its passes began without a wake-up; the driver notified {} times \
                 in {} publications)",
                100.0 * hits as f64 / polls.max(1) as f64,
                b.notifications,
                b.publications
            );
        }
        if n == 1_000_000 && at_zero > 0.0 {
            print_ratio(
                "flatness: device pairs/s N=1,000,000 / N=0",
                st.median / at_zero,
                FLATNESS_TARGET,
                false,
            );
        }
    }
    // The breakdown: the thread sleeping at once after each pass (every
    // notification a wake-up), and the stream served on the driver's
    // thread, no notification at all.
    let mut b = DeviceBench::new(Notify::Thread(Duration::ZERO));
    let mut s = PairStream::new(0);
    let st = measure(o, || b.pairs(&mut s, ROUND_PAIRS));
    print(&row(
        "  same, N=0, the thread sleeps at once (no polling)",
        Kind::Rate,
        &st,
    ));
    let mut b = DeviceBench::new(Notify::Inline);
    let mut s = PairStream::new(0);
    let st = measure(o, || b.pairs(&mut s, ROUND_PAIRS));
    print(&row(
        "  same, N=0, served inline (no kick, no device thread)",
        Kind::Rate,
        &st,
    ));
    for (max, label) in [(poll, "polling"), (Duration::ZERO, "no polling")] {
        let mut b = DeviceBench::new(Notify::Thread(max));
        let mut s = PairStream::new(0);
        let st = measure(o, || b.pairs(&mut s, 1));
        print(&Fig {
            ch: Some(300_000.0),
            ..row(
                &format!("device MAP+UNMAP pairs, N=0, 1 pair/notification, {label}"),
                Kind::Rate,
                &st,
            )
        });
        println!(
            "  (the driver notified {} times in {} publications)",
            b.notifications, b.publications
        );
    }
}

fn state_section(o: &Opts) {
    println!("  ({PEER_NOTE})");
    state_rows(o, "Viommu::apply", state_viommu, |v, m, u| {
        assert!(matches!(v.apply(&Request::Map(m)), Ok(Applied::Done)));
        assert!(matches!(
            v.apply(&Request::Unmap(u)),
            Ok(Applied::Unmapped(1))
        ));
    });
    state_rows(o, "IommuState (no lock)", bare_state, |st, m, u| {
        assert!(matches!(st.map(&m), Ok(())));
        assert!(matches!(st.unmap(&u), Ok(1)));
    });
}

/// The same-run baseline of the state level: a plain `BTreeMap` mapper
/// that does only the map and the unmap (no spec checks, no limits, no
/// lock), as a minimal VMM would: MAP inserts by start, UNMAP removes
/// every mapping that starts in the range.
#[derive(Default)]
struct PlainMapper(std::collections::BTreeMap<u64, (u64, u64, u32)>);

impl PlainMapper {
    fn new(n: u64) -> Self {
        let mut p = PlainMapper::default();
        for i in 0..n {
            p.map(&populate_map(i));
        }
        p
    }

    fn map(&mut self, m: &MapReq) {
        self.0
            .insert(m.virt_start, (m.virt_end, m.phys_start, m.flags));
    }

    fn unmap(&mut self, u: &UnmapReq) -> usize {
        let mut n = 0;
        while let Some((&s, _)) = self.0.range(u.virt_start..=u.virt_end).next() {
            self.0.remove(&s);
            n += 1;
        }
        n
    }
}

/// One row per N: the pair stream applied by `apply` to the state
/// `make(n)` builds, every status checked inside the timed loop, runs
/// alternating with the plain `BTreeMap` mapper over the same stream.
fn state_rows<S>(
    o: &Opts,
    label: &str,
    make: impl Fn(u64) -> S,
    apply: impl Fn(&mut S, MapReq, UnmapReq),
) {
    for (n, _, crosvm) in PEER_PAIRS {
        let mut state = make(n);
        let mut plain = PlainMapper::new(n);
        let (mut s, mut sp) = (PairStream::new(n), PairStream::new(n));
        let (mut ks, mut kp) = (
            Vec::with_capacity(STATE_BATCH),
            Vec::with_capacity(STATE_BATCH),
        );
        let (b, st, r) = measure_vs(
            o,
            || {
                draw(&mut sp, &mut kp);
                let t0 = Instant::now();
                let mut bad = 0;
                for &k in &kp {
                    let (m, u) = pair(k);
                    plain.map(&m);
                    bad += usize::from(plain.unmap(&u) != 1);
                }
                let dt = t0.elapsed();
                assert_eq!(bad, 0);
                (dt, kp.len() as u64)
            },
            || {
                draw(&mut s, &mut ks);
                let t0 = Instant::now();
                for &k in &ks {
                    let (m, u) = pair(k);
                    apply(&mut state, m, u);
                }
                (t0.elapsed(), ks.len() as u64)
            },
        );
        let nn = group(n as f64);
        print(&row(
            &format!("state MAP+UNMAP pairs, N={nn}, plain BTreeMap mapper"),
            Kind::Rate,
            &b,
        ));
        print(&Fig {
            crosvm,
            ..row(
                &format!("state MAP+UNMAP pairs, N={nn}, {label}"),
                Kind::Rate,
                &st,
            )
        });
        if n == 0 {
            print_ratio(&format!("{label} / plain BTreeMap, N=0"), r, 1.0, false);
        } else {
            println!("  {label} / plain BTreeMap, N={nn} = {r:.2} (information)");
        }
    }
}

/// Translator over `lk`, independent lookups: ops and timed duration.
fn translate_independent(tr: &mut vmm_iommu::Translator, lk: &[Lookup]) -> (Duration, u64) {
    let mut bad = 0u64;
    let t0 = Instant::now();
    for l in lk {
        match tr.translate(l.iova, ACCESS_READ) {
            Ok((gpa, len)) => bad += u64::from(gpa != l.gpa || len < 64),
            Err(_) => bad += 1,
        }
    }
    let dt = t0.elapsed();
    assert_eq!(bad, 0, "mistranslations");
    (dt, lk.len() as u64)
}

/// Translator over `lk`, each address depending on the previous result
/// (`iova_j + (gpa_{j-1} − expected_{j-1})`, zero when right).
fn translate_dependent(tr: &mut vmm_iommu::Translator, lk: &[Lookup]) -> (Duration, u64) {
    let mut bad = 0u64;
    let mut carry = 0u64;
    let t0 = Instant::now();
    for l in lk {
        let (gpa, _) = tr
            .translate(l.iova.wrapping_add(carry), ACCESS_READ)
            .expect("mapped");
        carry = gpa.wrapping_sub(l.gpa);
        bad += u64::from(carry != 0);
    }
    let dt = t0.elapsed();
    assert_eq!(bad, 0, "mistranslations");
    (dt, lk.len() as u64)
}

fn with_peers<'a>(f: Fig<'a>, ch: f64, crosvm: f64, target: Option<(f64, &'a str)>) -> Fig<'a> {
    Fig {
        ch: Some(ch),
        crosvm: Some(crosvm),
        target,
        ..f
    }
}

fn translate_section(o: &Opts) {
    const HIT_TARGET: Option<(f64, &str)> = Some((10.0, ""));
    // IOTLB hits, over the N = 10,000 domain.
    let v = state_viommu(10_000);
    let mut tr = v.translator(EP);
    let one = lookups(10_000)[0];
    let st = measure(o, || {
        let mut bad = 0u64;
        let t0 = Instant::now();
        for _ in 0..LOOKUPS {
            let (gpa, _) = tr.translate(black_box(one.iova), ACCESS_READ).unwrap();
            bad += u64::from(gpa != one.gpa);
        }
        let dt = t0.elapsed();
        assert_eq!(bad, 0);
        (dt, LOOKUPS as u64)
    });
    print(&Fig {
        target: HIT_TARGET,
        ..row(
            "translate 64 B, IOTLB hit, same address",
            Kind::Latency,
            &st,
        )
    });
    // 64 pages occupy 64 distinct slots of the direct-mapped IOTLB.
    let hot = lookups(64);
    let st = measure(o, || translate_independent(&mut tr, &hot));
    print(&Fig {
        target: HIT_TARGET,
        ..row(
            "translate 64 B, IOTLB hit, 64 hot pages",
            Kind::Latency,
            &st,
        )
    });
    let st = measure(o, || translate_dependent(&mut tr, &hot));
    print(&Fig {
        target: HIT_TARGET,
        ..row(
            "translate 64 B, IOTLB hit, 64 hot pages, dependent",
            Kind::Latency,
            &st,
        )
    });
    drop(tr);

    for (n, ch, crosvm, target) in [
        (10_000u64, 126.0, 82.0, None),
        (1_000_000, 477.0, 489.0, Some((250.0, ""))),
    ] {
        let v = if n == 10_000 {
            Arc::clone(&v)
        } else {
            state_viommu(n)
        };
        let lk = lookups(n);
        let mut tr = v.translator(EP);
        let peers = |f| with_peers(f, ch, crosvm, target);
        let st = measure(o, || translate_independent(&mut tr, &lk));
        let name = format!("translate 64 B, random, N={}, Translator", group(n as f64));
        print(&peers(row(&name, Kind::Latency, &st)));
        let st = measure(o, || translate_dependent(&mut tr, &lk));
        let name = format!(
            "translate 64 B, random, N={}, Translator, dependent",
            group(n as f64)
        );
        print(&peers(row(&name, Kind::Latency, &st)));
        let (hits, misses) = tr.hit_miss();
        println!(
            "  (IOTLB hit rate at N={}: {:.1}%)",
            group(n as f64),
            100.0 * hits as f64 / (hits + misses).max(1) as f64
        );
        let st = measure(o, || {
            let mut bad = 0u64;
            let t0 = Instant::now();
            for l in &lk {
                match v.translate(EP, l.iova, ACCESS_READ) {
                    Ok(t) => bad += u64::from(t.gpa(l.iova) != l.gpa),
                    Err(_) => bad += 1,
                }
            }
            let dt = t0.elapsed();
            assert_eq!(bad, 0);
            (dt, lk.len() as u64)
        });
        let name = format!(
            "translate 64 B, random, N={}, slow path (read lock)",
            group(n as f64)
        );
        // The locked path, for comparison: the target is the Translator's.
        print(&with_peers(
            row(&name, Kind::Latency, &st),
            ch,
            crosvm,
            None,
        ));
    }
}

/// Pairs the writer applies per burst in the `threads` section, and the
/// pause between bursts: a guest's DMA API at ~60,000 MAP+UNMAP pairs/s
/// (a busy strict-mode Linux guest), which leaves the translators most
/// of both cores.
const WRITER_BURST: u64 = 64;
/// Lookups between two after-UNMAP checks of a translator thread.
const CHECK_EVERY: u64 = 1024;
const WRITER_PAUSE: Duration = Duration::from_millis(1);

/// One run of the `threads` section: `translators` threads translating
/// the lookups `lk` (every result checked) for `dur`, beside a writer
/// that applies MAP+UNMAP pairs of the stream in bursts (if `writer`).
/// Each translator also translates, between lookups, the IOVA of the
/// last pair whose UNMAP returned, and fails the run if that succeeds
/// while no later MAP has started. `locked`: translate through
/// `Viommu::translate` (the state's read lock) instead of a
/// `Translator`. Returns translations/s (all threads), writer pairs/s
/// the number of after-UNMAP checks made, and the share of a core the
/// writer used (if the kernel reports thread CPU time).
fn threads_run(
    v: &Arc<Viommu>,
    lk: &[Lookup],
    translators: usize,
    writer: bool,
    locked: bool,
    dur: Duration,
) -> (f64, f64, u64, Option<f64>) {
    // (pair counter << 20) | k of the last pair whose UNMAP returned; 0
    // while the writer is between a MAP's start and its UNMAP's status.
    let last = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let barrier = std::sync::Barrier::new(translators + usize::from(writer) + 1);
    let n = v.state().mapping_count(DOMAIN) as u64;
    std::thread::scope(|sc| {
        let w = writer.then(|| {
            sc.spawn(|| {
                let mut s = PairStream::new(n ^ 0x5eed);
                let mut count = 0u64;
                barrier.wait();
                let t0 = Instant::now();
                let cpu0 = thread_cpu_ns();
                while !stop.load(Ordering::Acquire) {
                    for _ in 0..WRITER_BURST {
                        let k = s.next_k();
                        let (m, u) = pair(k);
                        last.store(0, Ordering::Release);
                        assert!(matches!(v.apply(&Request::Map(m)), Ok(Applied::Done)));
                        assert!(matches!(
                            v.apply(&Request::Unmap(u)),
                            Ok(Applied::Unmapped(1))
                        ));
                        count += 1;
                        last.store((count << 20) | k, Ordering::Release);
                    }
                    std::thread::sleep(WRITER_PAUSE);
                }
                let wall = t0.elapsed().as_secs_f64();
                let cpu = thread_cpu_ns()
                    .zip(cpu0)
                    .map(|(b, a)| (b - a) as f64 / 1e9 / wall);
                (count as f64 / wall, cpu)
            })
        });
        let ts: Vec<_> = (0..translators)
            .map(|t| {
                let (last, stop, barrier) = (&last, &stop, &barrier);
                sc.spawn(move || {
                    let mut tr = v.translator(EP);
                    assert!(tr.is_lock_free());
                    let mut translate = |iova: u64| -> Option<u64> {
                        if locked {
                            v.translate(EP, iova, ACCESS_READ).ok().map(|t| t.gpa(iova))
                        } else {
                            tr.translate(iova, ACCESS_READ).ok().map(|(gpa, _)| gpa)
                        }
                    };
                    let (mut ops, mut checks, mut bad) = (0u64, 0u64, 0u64);
                    // Each thread starts at its own place in the lookups.
                    let mut i = t * lk.len() / translators.max(1);
                    barrier.wait();
                    let t0 = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        // The after-UNMAP check below is a refused
                        // translation, and a refusal queues a fault record
                        // (the state's read lock, the fault queue's lock):
                        // every 64 lookups it cost more than the lookups
                        // and made the two threads share those locks'
                        // lines. Every CHECK_EVERY it still runs ~100,000
                        // times a second per thread.
                        for _ in 0..CHECK_EVERY {
                            let l = lk[i];
                            // Not `% lk.len()`: a division per lookup
                            // would cost more than a hot translation.
                            i += 1;
                            if i == lk.len() {
                                i = 0;
                            }
                            bad += u64::from(translate(black_box(l.iova)) != Some(l.gpa));
                        }
                        ops += CHECK_EVERY;
                        let gone = last.load(Ordering::Acquire);
                        if gone != 0 {
                            let iova = IOVA_BASE + (2 * (gone & 0xf_ffff) + 1) * PAGE;
                            let r = translate(iova);
                            assert!(
                                r.is_none() || last.load(Ordering::Acquire) != gone,
                                "IOVA {iova:#x} translated to {r:x?} after its UNMAP returned"
                            );
                            checks += 1;
                        }
                    }
                    let dt = t0.elapsed();
                    assert_eq!(bad, 0, "mistranslations");
                    (ops as f64 / dt.as_secs_f64(), checks)
                })
            })
            .collect();
        barrier.wait();
        std::thread::sleep(dur);
        stop.store(true, Ordering::Release);
        let (mut rate, mut checks) = (0.0, 0);
        for t in ts {
            let (r, c) = t.join().unwrap();
            rate += r;
            checks += c;
        }
        let (wrate, wcpu) = w.map_or((0.0, None), |w| w.join().unwrap());
        (rate, wrate, checks, wcpu)
    })
}

/// Nanoseconds the calling thread has run on a CPU
/// (`/proc/thread-self/schedstat`), if the kernel reports it.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// The machine's own two-thread scaling, measured beside the translators:
/// `threads` threads of dependent arithmetic (no memory, nothing shared)
/// for `dur`; returns their aggregate steps/s. On a shared machine a
/// second core is not always there, and this says how much of one was.
fn spin_run(threads: usize, dur: Duration) -> f64 {
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let ts: Vec<_> = (0..threads)
            .map(|t| {
                let stop = &stop;
                sc.spawn(move || {
                    let (mut x, mut n) = (t as u64 + 1, 0u64);
                    let t0 = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..1024 {
                            x = (x ^ (x >> 7)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        }
                        n += 1024;
                    }
                    black_box(x);
                    n as f64 / t0.elapsed().as_secs_f64()
                })
            })
            .collect();
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
        ts.into_iter().map(|t| t.join().unwrap()).sum()
    })
}

/// Translators on two cores while a third thread applies MAP+UNMAP pairs
/// (issue 14 part 3): aggregate translations/s of two translator threads
/// against one, runs alternating, for the `Translator` (lock-free misses)
/// and for the state's read lock (what every miss took before), over
/// N = 10,000 mappings at random (mostly IOTLB misses) and over 64 hot
/// pages (IOTLB hits).
fn threads_section(o: &Opts) {
    const N: u64 = 10_000;
    let v = state_viommu(N);
    let random = lookups(N);
    // The 64 hot lookups, 16 times round: 16 KiB that stay in each
    // translator's L1, as a device's ring does. (A 1 MiB cycle of the same
    // 64 made the row measure two cores streaming their inputs.)
    let hot: Vec<Lookup> = random[..64].iter().cycle().take(64 * 16).copied().collect();
    println!(
        "  (writer: {WRITER_BURST} MAP+UNMAP pairs per burst, {} ms pauses; every translation \
         checked, and after each UNMAP's return its IOVA must not translate)",
        WRITER_PAUSE.as_millis()
    );
    for (what, lk, locked) in [
        ("random, N=10,000, Translator", &random, false),
        ("random, N=10,000, state read lock", &random, true),
        ("64 hot pages, Translator", &hot, false),
    ] {
        let (mut one, mut two, mut ratios, mut wr, mut checks) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
        let (mut machine, mut wcpu) = (Vec::new(), Vec::new());
        threads_run(&v, lk, 1, true, locked, o.run_time / 5);
        for _ in 0..o.runs {
            let (a, w1, c1, _) = threads_run(&v, lk, 1, true, locked, o.run_time);
            let (b, w2, c2, cpu) = threads_run(&v, lk, 2, true, locked, o.run_time);
            wcpu.extend(cpu);
            let m1 = spin_run(1, o.run_time / 4);
            let m2 = spin_run(2, o.run_time / 4);
            one.push(a);
            two.push(b);
            ratios.push(b / a);
            machine.push(m2 / m1);
            wr.push((w1 + w2) / 2.0);
            checks += c1 + c2;
        }
        let machine = {
            machine.sort_by(f64::total_cmp);
            machine[machine.len() / 2]
        };
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let m = v.len();
            let median = if m % 2 == 1 {
                v[m / 2]
            } else {
                (v[m / 2 - 1] + v[m / 2]) / 2.0
            };
            Stats {
                median,
                spread: (v[m - 1] - v[0]) / median,
            }
        };
        let (one, two, ratio, wr) = (med(one), med(two), med(ratios).median, med(wr).median);
        print(&row(
            &format!("translate 64 B, {what}, 1 thread + writer"),
            Kind::Rate,
            &one,
        ));
        print(&row(
            &format!("translate 64 B, {what}, 2 threads + writer"),
            Kind::Rate,
            &two,
        ));
        let label = format!("2 threads / 1 thread, {what}");
        if locked {
            println!("  {label} = {ratio:.2} (the locked path, for comparison)");
        } else {
            print_ratio(&label, ratio, 1.9, false);
        }
        println!(
            "  (the machine meanwhile: 2 / 1 threads of plain arithmetic = {machine:.2}; \
             translators / machine = {:.2})",
            ratio / machine
        );
        println!(
            "  (writer {}/s pairs; {} after-UNMAP checks, none translated)",
            group(wr),
            group(checks as f64)
        );
        // With two cores, the writer's time beside two translators comes
        // out of theirs: two cores less the writer's share is what they
        // can have, against one whole core for the one translator.
        if !wcpu.is_empty() {
            let share = med(wcpu).median;
            println!(
                "  (the writer used {:.1}% of a core beside two translators; \
                 2 / 1 threads against the {:.2} cores left to them = {:.2})",
                share * 100.0,
                2.0 - share,
                ratio / (2.0 - share)
            );
        }
    }
}

/// Like [`measure`] for two workloads that are compared: their runs
/// alternate (`base`, `ours`, `base`, ...) so that both see the same
/// machine, and the ratio is the median of the per-run ratios of
/// ops/s (`ours / base`).
fn measure_vs(
    o: &Opts,
    mut base: impl FnMut() -> (Duration, u64),
    mut ours: impl FnMut() -> (Duration, u64),
) -> (Stats, Stats, f64) {
    fn run(step: &mut impl FnMut() -> (Duration, u64), target: Duration) -> f64 {
        let (mut t, mut n) = (Duration::ZERO, 0u64);
        while t < target {
            let (d, k) = step();
            t += d;
            n += k;
        }
        n as f64 / t.as_secs_f64()
    }
    run(&mut base, o.run_time / 5);
    run(&mut ours, o.run_time / 5);
    let (mut b, mut u, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.runs {
        let x = run(&mut base, o.run_time);
        let y = run(&mut ours, o.run_time);
        b.push(x);
        u.push(y);
        r.push(y / x);
    }
    let stats = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let m = v.len();
        let median = if m % 2 == 1 {
            v[m / 2]
        } else {
            (v[m / 2 - 1] + v[m / 2]) / 2.0
        };
        Stats {
            median,
            spread: (v[m - 1] - v[0]) / median,
        }
    };
    let ratio = stats(r).median;
    (stats(b), stats(u), ratio)
}

/// Prints a same-run ratio and whether it meets `target` (`<=` for
/// costs, `>=` for bandwidth).
fn print_ratio(what: &str, ratio: f64, target: f64, at_most: bool) {
    let ok = if at_most {
        ratio <= target
    } else {
        ratio >= target
    };
    println!(
        "  {what} = {ratio:.2} (target {} {target:.2}) {}",
        if at_most { "<=" } else { ">=" },
        if ok { "MET" } else { "MISSED" }
    );
    let _ = std::io::stdout().flush();
}

/// `reps` reads of a `u64` by `read` at each address of `at`; every value
/// read is checked against the guest-physical address the slot holds.
fn read_u64s<E>(
    read: impl Fn(GuestAddress) -> Result<u64, E>,
    at: &[(u64, u64)],
    reps: usize,
) -> (Duration, u64) {
    let mut bad = 0u64;
    let t0 = Instant::now();
    for _ in 0..reps {
        for &(a, expect) in at {
            match read(GuestAddress(black_box(a))) {
                Ok(x) => bad += u64::from(x != expect),
                Err(_) => bad += 1,
            }
        }
    }
    let dt = t0.elapsed();
    assert_eq!(bad, 0, "wrong bytes read");
    (dt, (at.len() * reps) as u64)
}

/// `reps` rounds of 4 KiB copies by `copy` from each page of `at` into a
/// buffer; the first `u64` of each copy is checked. Counts bytes.
fn copy_pages<E>(
    copy: impl Fn(&mut [u8], GuestAddress) -> Result<(), E>,
    hint: impl Fn(GuestAddress),
    at: &[(u64, u64)],
    reps: usize,
) -> (Duration, u64) {
    let mut buf = vec![0u8; PAGE as usize];
    let mut bad = 0u64;
    let t0 = Instant::now();
    for _ in 0..reps {
        for (i, &(a, expect)) in at.iter().enumerate() {
            // The next page, as a device that has read its descriptor
            // chain knows it (the round's first page after its last).
            hint(GuestAddress(at[(i + 1) % at.len()].0));
            match copy(&mut buf, GuestAddress(black_box(a))) {
                Ok(()) => {
                    let first = u64::from_le_bytes(buf[..8].try_into().unwrap());
                    bad += u64::from(first != expect);
                }
                Err(_) => bad += 1,
            }
        }
    }
    let dt = t0.elapsed();
    assert_eq!(bad, 0, "wrong bytes copied");
    (dt, (at.len() * reps) as u64 * PAGE)
}

/// One 4 KiB-copy comparison: `plain` over the guest-physical pages `pp`
/// against `ours` over the same pages by IOVA (`vp`), runs alternating.
#[allow(clippy::too_many_arguments)]
fn copy_rows<E1, E2>(
    o: &Opts,
    label: &str,
    how: &str,
    pp: &[(u64, u64)],
    vp: &[(u64, u64)],
    reps: usize,
    plain: impl Fn(&mut [u8], GuestAddress) -> Result<(), E1> + Copy,
    ours: impl Fn(&mut [u8], GuestAddress) -> Result<(), E2> + Copy,
    hint: impl Fn(GuestAddress) + Copy,
) {
    let gbps = |s: &Stats| format!("{:.2} GB/s", s.median / 1e9);
    let (b, d, r) = measure_vs(
        o,
        || copy_pages(plain, |_| (), pp, reps),
        || copy_pages(ours, hint, vp, reps),
    );
    println!(
        "{:<54} {:>24} {:>5.0}%",
        format!("copy 4 KiB, {label}, plain GuestMemoryMmap"),
        gbps(&b),
        b.spread * 100.0
    );
    println!(
        "{:<54} {:>24} {:>5.0}%",
        format!("copy 4 KiB, {label}, {how}"),
        gbps(&d),
        d.spread * 100.0
    );
    print_ratio(&format!("{how} / plain bandwidth, {label}"), r, 0.9, false);
}

/// An `Iommu` that does no work of its own: one window, fixed, in an
/// `Iotlb` read without a lock. It measures what vm-memory's `IommuMemory`
/// costs by itself (the `Iotlb` lookup and the slice iterators), which no
/// `Iommu` implementation can go below.
#[derive(Debug)]
struct FloorIommu(vm_memory::iommu::Iotlb);

impl FloorIommu {
    /// The page holding `iova`, mapped read-write to the page holding `gpa`.
    fn new(iova: u64, gpa: u64) -> Self {
        let mut tlb = vm_memory::iommu::Iotlb::new();
        tlb.set_mapping(
            GuestAddress(iova & !(PAGE - 1)),
            GuestAddress(gpa & !(PAGE - 1)),
            PAGE as usize,
            vm_memory::Permissions::ReadWrite,
        )
        .expect("one window");
        FloorIommu(tlb)
    }
}

impl vm_memory::iommu::Iommu for FloorIommu {
    type IotlbGuard<'a> = &'a vm_memory::iommu::Iotlb;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: vm_memory::Permissions,
    ) -> Result<vm_memory::iommu::IotlbIterator<&vm_memory::iommu::Iotlb>, vm_memory::iommu::Error>
    {
        vm_memory::iommu::Iotlb::lookup(&self.0, iova, length, access).map_err(|_| {
            vm_memory::iommu::Error::CannotResolve {
                iova_range: vm_memory::iommu::IovaRange { base: iova, length },
                reason: "outside the one window".to_string(),
            }
        })
    }
}

/// Mappings of the `dma` section (and `profile-copy`).
const DMA_MAPPINGS: u64 = 10_000;

/// The `dma` section's vIOMMU with [`DMA_MAPPINGS`] mappings, and real
/// memory at the mapped guest-physical pages, every 64-byte slot holding
/// its own guest-physical address.
fn dma_setup() -> (Arc<Viommu>, GuestMemoryMmap) {
    let n = DMA_MAPPINGS;
    let v = state_viommu(n);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(PHYS_BASE), (n * PAGE) as usize)])
        .expect("guest memory");
    for a in (PHYS_BASE..PHYS_BASE + n * PAGE).step_by(64) {
        mem.write_obj(a, GuestAddress(a)).unwrap();
    }
    (v, mem)
}

/// The emulated device's memory access through the vIOMMU (issue 14,
/// part 1), each figure beside its same-run baseline: plain
/// `GuestMemoryMmap` at the guest-physical address, the `Translator`
/// alone, [`vmm_iommu::DmaMemory`] and vm-memory's
/// `IommuMemory` over `EndpointIommu`.
fn dma_section(o: &Opts) {
    use vmm_iommu::DmaMemory;
    const N: u64 = DMA_MAPPINGS;
    let (v, mem) = dma_setup();
    let dma: DmaMemory<GuestMemoryMmap> = v.dma_memory(EP, mem.clone());
    let im = IommuMemory::new(mem.clone(), v.endpoint_iommu(EP), true, ());
    let lk = lookups(N);
    let phys: Vec<(u64, u64)> = lk.iter().map(|l| (l.gpa, l.gpa)).collect();
    let virt: Vec<(u64, u64)> = lk.iter().map(|l| (l.iova, l.gpa)).collect();
    let lat = |name: &str, st: &Stats| print(&row(name, Kind::Latency, st));
    // The three ways a device model reads: plain memory at the
    // guest-physical address (the baseline), DmaMemory's own methods, and
    // the generic `Bytes` trait (what virtio-queue and generic device code
    // use) over DmaMemory and over IommuMemory.
    let plain = |a: GuestAddress| mem.read_obj::<u64>(a);
    let own = |a: GuestAddress| dma.read_obj::<u64>(a);
    let generic = |a: GuestAddress| <DmaMemory<_> as Bytes<GuestAddress>>::read_obj::<u64>(&dma, a);
    let iommu_mem = |a: GuestAddress| im.read_obj::<u64>(a);

    // IOTLB hit: one hot address, repeated.
    const REPS: usize = 100_000;
    let one_p = [phys[0]];
    let one_v = [virt[0]];
    for (label, f) in [
        ("DmaMemory::read_obj", &own as &dyn Fn(GuestAddress) -> _),
        ("DmaMemory via Bytes trait", &generic),
    ] {
        let (b, d, r) = measure_vs(
            o,
            || read_u64s(plain, &one_p, REPS),
            || read_u64s(f, &one_v, REPS),
        );
        lat("read_obj u64, hot, plain GuestMemoryMmap", &b);
        lat(&format!("read_obj u64, hot (IOTLB hit), {label}"), &d);
        print_ratio(&format!("{label} / plain, hot"), 1.0 / r, 2.0, true);
    }
    let (b, d, r) = measure_vs(
        o,
        || read_u64s(plain, &one_p, REPS),
        || read_u64s(iommu_mem, &one_v, REPS),
    );
    lat("read_obj u64, hot, plain GuestMemoryMmap", &b);
    lat("read_obj u64, hot, IommuMemory+EndpointIommu", &d);
    print_ratio("IommuMemory / plain, hot", 1.0 / r, 2.0, true);
    // vm-memory's own floor: `IommuMemory` over an `Iommu` that does no
    // work of its own (one window, no lock, nothing to check), so what is
    // left is `IommuMemory`'s path and its `Iotlb` lookup alone.
    let floor = IommuMemory::new(
        mem.clone(),
        FloorIommu::new(lk[0].iova, lk[0].gpa),
        true,
        (),
    );
    let (b, d, r) = measure_vs(
        o,
        || read_u64s(plain, &one_p, REPS),
        || read_u64s(|a| floor.read_obj::<u64>(a), &one_v, REPS),
    );
    lat("read_obj u64, hot, plain GuestMemoryMmap", &b);
    lat(
        "read_obj u64, hot, IommuMemory+lock-free 1-window Iommu",
        &d,
    );
    println!(
        "  vm-memory's floor: IommuMemory over an Iommu doing nothing / plain, hot = {:.2} (information)",
        1.0 / r
    );

    // Random over the 10,000 mappings: against the Translator alone.
    let mut tr = v.translator(EP);
    for (label, f) in [
        ("DmaMemory::read_obj", &own as &dyn Fn(GuestAddress) -> _),
        ("DmaMemory via Bytes trait", &generic),
    ] {
        let (b, d, r) = measure_vs(
            o,
            || translate_independent(&mut tr, &lk),
            || read_u64s(f, &virt, 1),
        );
        lat("translate 64 B, random, N=10,000, Translator", &b);
        lat(&format!("read_obj u64, random, N=10,000, {label}"), &d);
        print_ratio(&format!("{label} / Translator, random"), 1.0 / r, 1.3, true);
    }
    let (hits, misses) = dma.hit_miss();
    println!(
        "  (DmaMemory IOTLB: {} entries, hit rate over all the above {:.1}%)",
        vmm_iommu::DMA_TLB_ENTRIES,
        100.0 * hits as f64 / (hits + misses).max(1) as f64
    );
    let (b, d, r) = measure_vs(
        o,
        || translate_independent(&mut tr, &lk),
        || read_u64s(iommu_mem, &virt, 1),
    );
    lat("translate 64 B, random, N=10,000, Translator", &b);
    print(&Fig {
        ch: Some(126.0),
        crosvm: Some(82.0),
        ..row(
            "read_obj u64, random, N=10,000, IommuMemory+EndpointIommu",
            Kind::Latency,
            &d,
        )
    });
    print_ratio("IommuMemory / Translator, random", 1.0 / r, 1.3, true);
    let (b, d, r) = measure_vs(
        o,
        || read_u64s(plain, &phys, 1),
        || read_u64s(own, &virt, 1),
    );
    lat("read_obj u64, random, N=10,000, plain GuestMemoryMmap", &b);
    lat("read_obj u64, random, N=10,000, DmaMemory::read_obj", &d);
    println!("  DmaMemory / plain, random = {:.2} (information)", 1.0 / r);
    // What the random target's baseline leaves to an access: the plain
    // read alone, no translation at all, against the Translator alone.
    let (b, d, r) = measure_vs(
        o,
        || translate_independent(&mut tr, &lk),
        || read_u64s(plain, &phys, 1),
    );
    lat("translate 64 B, random, N=10,000, Translator", &b);
    lat("read_obj u64, random, N=10,000, plain GuestMemoryMmap", &d);
    println!(
        "  plain read alone / Translator, random = {:.2} (information: above 1.3, no access that reads guest memory can meet the random target as worded)",
        1.0 / r
    );
    // The random target compares a whole access with a
    // translation alone; the access that a device using the Translator
    // makes (translate, then the plain read at the guest-physical address:
    // what cloud-hypervisor's devices do) is the like-for-like baseline.
    let tr_cell = std::cell::RefCell::new(v.translator(EP));
    let translate_then_read = |a: GuestAddress| -> Result<u64, ()> {
        let (gpa, _) = tr_cell
            .borrow_mut()
            .translate(a.0, ACCESS_READ)
            .map_err(|_| ())?;
        mem.read_obj::<u64>(GuestAddress(gpa)).map_err(|_| ())
    };
    let (b, d, r) = measure_vs(
        o,
        || read_u64s(translate_then_read, &virt, 1),
        || read_u64s(own, &virt, 1),
    );
    lat(
        "read_obj u64, random, N=10,000, Translator + plain read",
        &b,
    );
    lat("read_obj u64, random, N=10,000, DmaMemory::read_obj", &d);
    print_ratio(
        "DmaMemory::read_obj / (Translator + plain read), random",
        1.0 / r,
        1.3,
        true,
    );

    // 4 KiB copies: 64 hot pages, then pages at random over the 10,000
    // mappings.
    let page = |x: &(u64, u64)| (x.0 & !(PAGE - 1), x.1 & !(PAGE - 1));
    let plain_copy = |b: &mut [u8], a: GuestAddress| mem.read_slice(b, a);
    let own_copy = |b: &mut [u8], a: GuestAddress| dma.read_slice(b, a);
    let generic_copy = |b: &mut [u8], a: GuestAddress| {
        <DmaMemory<_> as Bytes<GuestAddress>>::read_slice(&dma, b, a)
    };
    for (label, count) in [
        ("64 hot pages", 64usize),
        ("random, N=10,000", lk.len() / 4),
    ] {
        let pp: Vec<(u64, u64)> = phys[..count].iter().map(page).collect();
        let vp: Vec<(u64, u64)> = virt[..count].iter().map(page).collect();
        let reps = (lk.len() / 4 / count).max(1);
        // Each side a closure of its own type, so both are inlined alike
        // (a `dyn Fn` on one side only costs it a call per page).
        copy_rows(
            o,
            label,
            "DmaMemory::read_slice",
            &pp,
            &vp,
            reps,
            plain_copy,
            own_copy,
            |_| (),
        );
        copy_rows(
            o,
            label,
            "DmaMemory via Bytes trait",
            &pp,
            &vp,
            reps,
            plain_copy,
            generic_copy,
            |_| (),
        );
        // A device that has read its descriptor chain knows its next
        // buffer and says so (`DmaMemory::prefetch`).
        copy_rows(
            o,
            label,
            "DmaMemory + prefetch(next)",
            &pp,
            &vp,
            reps,
            plain_copy,
            own_copy,
            |a| dma.prefetch(a),
        );
    }
}

/// `profile-copy plain|dma|dma-ahead R`: the `dma` section's hot 4 KiB
/// copies, plain or through `DmaMemory::read_slice` (`dma-ahead`: with
/// each next page prefetched), R rounds of 64 pages, for a profiler.
fn profile_copy(args: &str) {
    use vmm_iommu::DmaMemory;
    let mut it = args.split(' ');
    let how = it.next().unwrap_or("dma");
    let rounds: usize = it.next().and_then(|r| r.parse().ok()).unwrap_or(1000);
    let (v, mem) = dma_setup();
    let dma: DmaMemory<GuestMemoryMmap> = v.dma_memory(EP, mem.clone());
    let page = |x: &(u64, u64)| (x.0 & !(PAGE - 1), x.1 & !(PAGE - 1));
    let lk = lookups(DMA_MAPPINGS);
    let (t, bytes) = if how == "plain" {
        let pp: Vec<(u64, u64)> = lk[..64].iter().map(|l| page(&(l.gpa, l.gpa))).collect();
        copy_pages(|b, a| mem.read_slice(b, a), |_| (), &pp, rounds)
    } else {
        let vp: Vec<(u64, u64)> = lk[..64].iter().map(|l| page(&(l.iova, l.gpa))).collect();
        if how == "dma-ahead" {
            copy_pages(
                |b, a| dma.read_slice(b, a),
                |a| dma.prefetch(a),
                &vp,
                rounds,
            )
        } else if how == "dma-bytes" {
            copy_pages(
                |b, a| <DmaMemory<_> as Bytes<GuestAddress>>::read_slice(&dma, b, a),
                |_| (),
                &vp,
                rounds,
            )
        } else {
            copy_pages(|b, a| dma.read_slice(b, a), |_| (), &vp, rounds)
        }
    };
    println!(
        "profile-copy {how}: {:.2} GB/s over {rounds} rounds of 64 hot pages",
        bytes as f64 / t.as_secs_f64() / 1e9
    );
}

/// Random translation over 1,000,000 mappings (issue 14, part 2) beside
/// a plain `BTreeMap<u64, _>` lookup over the same mappings, runs
/// alternating: the `Translator` (every lookup misses its IOTLB and takes
/// the slow path) and the mapping table alone.
fn index_section(o: &Opts) {
    use std::collections::BTreeMap;
    use vmm_iommu::testing::MappingTable;
    use vmm_iommu::Mapping;
    const N: u64 = 1_000_000;
    let v = state_viommu(N);
    let lk = lookups(N);
    let mut plain: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for i in 0..N {
        let m = populate_map(i);
        plain.insert(m.virt_start, (m.virt_end, m.phys_start));
    }
    // The table alone, built the way the stream's MAPs build it, its live
    // heap counted by the allocator (B-tree nodes, slab and directory).
    let heap0 = live_heap();
    let mut table = MappingTable::new();
    for i in 0..N {
        let m = populate_map(i);
        table.insert(Mapping {
            start: m.virt_start,
            end: m.virt_end,
            phys: m.phys_start,
            flags: m.flags,
        });
    }
    let table_heap = live_heap().saturating_sub(heap0);
    let btree = || {
        let mut bad = 0u64;
        let t0 = Instant::now();
        for l in &lk {
            match plain.range(..=black_box(l.iova)).next_back() {
                Some((&s, &(e, p))) if l.iova <= e => bad += u64::from(p + (l.iova - s) != l.gpa),
                _ => bad += 1,
            }
        }
        let dt = t0.elapsed();
        assert_eq!(bad, 0);
        (dt, lk.len() as u64)
    };
    // The translator builds the domain's lock-free index: its heap is the
    // price of lock-free misses, paid while translators exist.
    let heap0 = live_heap();
    let mut tr = v.translator(EP);
    let index_heap = live_heap().saturating_sub(heap0);
    assert!(tr.is_lock_free());
    let (b, t, r) = measure_vs(o, btree, || translate_independent(&mut tr, &lk));
    print(&row(
        "lookup 64 B, random, N=1,000,000, plain BTreeMap<u64,_>",
        Kind::Latency,
        &b,
    ));
    print(&with_peers(
        row(
            "translate 64 B, random, N=1,000,000, Translator",
            Kind::Latency,
            &t,
        ),
        477.0,
        489.0,
        Some((250.0, "")),
    ));
    print_ratio("Translator / BTreeMap, random", 1.0 / r, 0.6, true);
    let (b, t, r) = measure_vs(o, btree, || {
        let mut bad = 0u64;
        let t0 = Instant::now();
        for l in &lk {
            match table.find(black_box(l.iova)) {
                Some(m) => bad += u64::from(m.phys + (l.iova - m.start) != l.gpa),
                None => bad += 1,
            }
        }
        let dt = t0.elapsed();
        assert_eq!(bad, 0);
        (dt, lk.len() as u64)
    });
    print(&row(
        "lookup 64 B, random, N=1,000,000, plain BTreeMap<u64,_>",
        Kind::Latency,
        &b,
    ));
    print(&row(
        "lookup 64 B, random, N=1,000,000, MappingTable::find",
        Kind::Latency,
        &t,
    ));
    print_ratio("MappingTable / BTreeMap, random", 1.0 / r, 0.6, true);
    let (chunks, stale) = table.chunk_stats();
    println!("  (MappingTable: {chunks} chunks, directory stale for {stale})");
    print(&Fig {
        name: "heap per mapping, N=1,000,000, MappingTable (live bytes)",
        kind: Kind::Bytes,
        value: table_heap as f64 / N as f64,
        spread: None,
        ch: Some(49.0),
        crosvm: Some(78.0),
        target: Some((32.0, "")),
    });
    print(&row(
        "  lock-free index per mapping (while translators exist)",
        Kind::Bytes,
        &Stats {
            median: index_heap as f64 / N as f64,
            spread: 0.0,
        },
    ));
    print(&Fig {
        ..row(
            "  table arrays per mapping (state.mapping_bytes)",
            Kind::Bytes,
            &Stats {
                median: v.state().mapping_bytes() as f64 / N as f64,
                spread: 0.0,
            },
        )
    });
}

/// The CPU's model name, from `/proc/cpuinfo`.
fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

fn main() {
    let o = Opts::parse();
    println!(
        "peer stream (docs/BENCH.md): medians of {} runs of >= {:.1} s; \
         'x peer' = times better than the peer (> 1: better)",
        o.runs,
        o.run_time.as_secs_f64()
    );
    // The machine kind is not always the same CPU: figures from two runs
    // compare only where this line does.
    println!(
        "  (this run: {}, {} CPUs)",
        cpu_model().as_deref().unwrap_or("CPU model unknown"),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    header();
    // First, while the heap is fresh, so that RSS growth means something.
    if o.wants("memory") {
        memory_section();
    }
    if o.wants("device") {
        device_section(&o);
    }
    if o.wants("state") {
        state_section(&o);
    }
    if o.wants("translate") {
        translate_section(&o);
    }
    if o.wants("threads") {
        threads_section(&o);
    }
    if o.wants("dma") {
        dma_section(&o);
    }
    if o.wants("index") {
        index_section(&o);
    }
    for p in &o.sections {
        if let Some((kind, args)) = p
            .strip_prefix("profile-state ")
            .map(|a| ("profile-state", a))
            .or_else(|| {
                p.strip_prefix("profile-apply ")
                    .map(|a| ("profile-apply", a))
            })
        {
            // The state level alone, as the `state` section drives it:
            // the bare model, or `Viommu::apply` (lock, index, generation).
            let mut it = args.split(' ').filter_map(|a| a.parse::<u64>().ok());
            let (n, rounds) = (it.next().unwrap_or(0), it.next().unwrap_or(64));
            let (mut s, mut ks) = (PairStream::new(n), Vec::with_capacity(STATE_BATCH));
            let mut batches = |mut apply: Box<dyn FnMut(MapReq, UnmapReq)>| {
                let mut t = Duration::ZERO;
                for _ in 0..rounds {
                    draw(&mut s, &mut ks);
                    let t0 = Instant::now();
                    for &k in &ks {
                        let (m, u) = pair(k);
                        apply(m, u);
                    }
                    t += t0.elapsed();
                }
                t
            };
            let t = if kind == "profile-state" {
                let mut st = bare_state(n);
                batches(Box::new(move |m, u| {
                    assert!(matches!(st.map(&m), Ok(())));
                    assert!(matches!(st.unmap(&u), Ok(1)));
                }))
            } else {
                let v = state_viommu(n);
                batches(Box::new(move |m, u| {
                    assert!(matches!(v.apply(&Request::Map(m)), Ok(Applied::Done)));
                    assert!(matches!(
                        v.apply(&Request::Unmap(u)),
                        Ok(Applied::Unmapped(1))
                    ));
                }))
            };
            println!(
                "{kind}: N={n}, {} pairs in {t:?}",
                rounds * STATE_BATCH as u64
            );
            continue;
        }
        if let Some(args) = p.strip_prefix("profile-copy ") {
            profile_copy(args);
            continue;
        }
        let Some(args) = p.strip_prefix("profile ") else {
            continue;
        };
        let mut it = args.split(' ').filter_map(|a| a.parse::<u64>().ok());
        let (n, rounds) = (it.next().unwrap_or(0), it.next().unwrap_or(64));
        let mut b = DeviceBench::new(Notify::Inline);
        b.populate(n);
        let mut s = PairStream::new(n);
        let t: Duration = (0..rounds).map(|_| b.pairs(&mut s, ROUND_PAIRS).0).sum();
        println!(
            "profile: N={n}, {} pairs inline in {t:?} (subtract a run of 0 rounds)",
            rounds * ROUND_PAIRS as u64
        );
    }
}
