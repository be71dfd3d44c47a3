//! Translation for emulated devices: IOVA → guest-physical through the
//! endpoint's domain, with an IOTLB in front.
//!
//! Two front ends share the slow path [`Viommu::translate`]:
//! - [`Translator`]: a per-thread, lock-free-on-hit IOTLB (direct-mapped,
//!   4 KiB pages) for device models that translate address by address;
//! - [`EndpointIommu`]: vm-memory's [`Iommu`] trait, so a device model can
//!   wrap guest memory in `IommuMemory` and use `Bytes` as usual.
//!
//! Both drop their cache when the vIOMMU's generation moves, so an UNMAP or
//! DETACH takes effect for every access that starts after its status is
//! written. Neither ever returns an address outside what the domain grants;
//! whether that address is guest RAM is checked by the memory access itself
//! (and MAP refuses non-MMIO ranges outside RAM in the first place).
//! A refused access queues a fault record for the driver.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vm_memory::iommu::{Error as IommuError, Iommu, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Permissions};

use crate::state::{FaultReason, Translation, ACCESS_READ, ACCESS_WRITE};
use crate::viommu::Viommu;

pub(crate) mod index;
mod iotlb;
use index::PageIndex;
use iotlb::PageTlb;

/// Entries in a [`Translator`]'s IOTLB (256 direct-mapped, 256 more for the
/// pages they push out).
pub const TLB_ENTRIES: usize = iotlb::ENTRIES;
const PAGE_SHIFT: u32 = 12;
const PAGE_MASK: u64 = (1 << PAGE_SHIFT) - 1;

/// `iova`'s guest-physical address in the page at `phys`, and the bytes
/// from it to the end of that page: a `Translator`'s answer.
#[inline(always)]
fn in_page(phys: u64, iova: u64) -> (u64, u64) {
    let off = iova & PAGE_MASK;
    (phys | off, (PAGE_MASK + 1) - off)
}

/// A failed translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("endpoint {endpoint}: access {access:#x} at IOVA {iova:#x} refused ({reason:?})")]
pub struct TranslateError {
    /// The endpoint.
    pub endpoint: u32,
    /// The address.
    pub iova: u64,
    /// The access bits (`ACCESS_READ` / `ACCESS_WRITE`).
    pub access: u32,
    /// Why, as the fault record reports it.
    pub reason: FaultReason,
}

/// A per-thread translator for one endpoint, with a direct-mapped IOTLB.
///
/// Get one from [`Viommu::translator`], one per device thread. A hit costs
/// two generation loads and one entry compare. A miss in a MAP-mode domain
/// walks the domain's lock-free index (no lock, nothing written that other
/// threads read: translators on other cores scale, and MAP and UNMAP go on
/// meanwhile); other misses (bypass, unattached, nested, an index the
/// writer keeps busy) take the vIOMMU's read lock. The IOTLB is dropped
/// when its endpoint moves (ATTACH, DETACH, reset, bypass) or its domain
/// loses a mapping (UNMAP), before that request's status is written. A
/// refusal queues a fault record for the driver.
///
/// ```
/// # use std::sync::Arc;
/// # use vmm_iommu::config::IommuConfig;
/// # use vmm_iommu::wire::{AttachReq, MapReq, Request, VIRTIO_IOMMU_F_MAP_UNMAP};
/// # use vmm_iommu::wire::{VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
/// # use vmm_iommu::Viommu;
/// # let viommu = Arc::new(Viommu::new(&IommuConfig::default(), &[8], &[(0, 0xff_ffff)])?);
/// # viommu.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
/// # viommu.apply(&Request::Attach(AttachReq { domain: 1, endpoint: 8, ..Default::default() }))?;
/// # let rw = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
/// # let map = MapReq { domain: 1, virt_start: 0x1000_0000, virt_end: 0x1000_ffff, phys_start: 0x20_0000, flags: rw };
/// # viommu.apply(&Request::Map(map))?;
/// use vmm_iommu::{FaultReason, ACCESS_READ};
///
/// // Endpoint 8 maps IOVA 0x1000_0000..=0x1000_ffff to GPA 0x20_0000.
/// let mut t = viommu.translator(8);
/// // The GPA, and how many bytes to the end of the 4 KiB page.
/// assert_eq!(t.translate(0x1000_0ff0, ACCESS_READ)?, (0x20_0ff0, 0x10));
/// assert_eq!(t.translate(0x1000_0000, ACCESS_READ)?, (0x20_0000, 0x1000)); // same page: a hit
/// assert_eq!(t.hit_miss(), (1, 1));
///
/// let refused = t.translate(0x2000_0000, ACCESS_READ).unwrap_err();
/// assert_eq!(refused.reason, FaultReason::Mapping);
/// assert_eq!(viommu.faults().len(), 1); // the record waits for the event queue
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Translator {
    viommu: Arc<Viommu>,
    endpoint: u32,
    /// The vIOMMU's topology generation `index` was resolved under.
    topology: u64,
    /// The lock-free index of the endpoint's MAP-mode domain; `None`: the
    /// locked path.
    index: Option<Arc<PageIndex>>,
    /// The generation the IOTLB was filled under: the index's, or without
    /// one the vIOMMU's.
    generation: u64,
    tlb: PageTlb,
    /// The fault queue's drop counter this translator counts on.
    drop_shard: usize,
    /// Scratch for the ranges the index's UNMAP log gives.
    unmapped: Vec<(u64, u64)>,
    hits: u64,
    misses: u64,
}

impl Translator {
    pub(crate) fn new(viommu: Arc<Viommu>, endpoint: u32) -> Self {
        let drop_shard = viommu.faults().drop_shard();
        let mut t = Translator {
            viommu,
            endpoint,
            topology: 0,
            index: None,
            generation: 0,
            tlb: PageTlb::new(),
            drop_shard,
            unmapped: Vec::new(),
            hits: 0,
            misses: 0,
        };
        let topology = t.viommu.topology();
        t.resolve(topology);
        t
    }

    /// Finds where misses go under `topology` (loaded before: a change
    /// after it is seen on the next translation) and empties the IOTLB.
    #[cold]
    fn resolve(&mut self, topology: u64) {
        self.topology = topology;
        self.index = self.viommu.translation_index(self.endpoint);
        let generation = self.current_generation();
        self.flush(generation);
    }

    #[inline(always)]
    fn current_generation(&self) -> u64 {
        match &self.index {
            Some(ix) => ix.generation(),
            None => self.viommu.generation(),
        }
    }

    /// Whether misses go to a lock-free index (for tests and benchmarks).
    pub fn is_lock_free(&self) -> bool {
        self.index.is_some()
    }

    /// The endpoint this translator serves.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// IOTLB hits and misses so far.
    pub fn hit_miss(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// Translates `iova` for `access` (`ACCESS_READ` and/or `ACCESS_WRITE`).
    /// Returns the guest-physical address and the number of bytes from
    /// `iova` to the end of its 4 KiB page, all translated alike. A refusal
    /// queues a fault record for the driver.
    #[inline]
    pub fn translate(&mut self, iova: u64, access: u32) -> Result<(u64, u64), TranslateError> {
        let topology = self.viommu.topology();
        if topology != self.topology {
            self.resolve(topology);
        }
        let generation = self.current_generation();
        if generation != self.generation {
            self.catch_up(generation);
        }
        let page = iova >> PAGE_SHIFT;
        if let Some(phys) = self.tlb.lookup_way0(page, access) {
            self.hits += 1;
            return Ok(in_page(phys, iova));
        }
        self.miss(iova, access)
    }

    #[cold]
    fn flush(&mut self, generation: u64) {
        self.tlb.clear();
        self.generation = generation;
    }

    /// The generation moved to `generation`: through an index whose UNMAP
    /// log still holds every UNMAP since, drop only the pages they
    /// removed (the rest of the IOTLB stays valid: MAP only adds); else
    /// drop everything.
    #[cold]
    fn catch_up(&mut self, generation: u64) {
        let logged = self
            .index
            .as_ref()
            .and_then(|ix| ix.unmapped_since(self.generation, generation, &mut self.unmapped));
        if logged.is_none() {
            self.flush(generation);
            return;
        }
        for &(first, last) in &self.unmapped {
            self.tlb.invalidate(first, last);
        }
        self.generation = generation;
    }

    #[inline(never)]
    fn miss(&mut self, iova: u64, access: u32) -> Result<(u64, u64), TranslateError> {
        let page = iova >> PAGE_SHIFT;
        if let Some(phys) = self.tlb.lookup_way1(page, access) {
            self.hits += 1;
            return Ok(in_page(phys, iova));
        }
        self.misses += 1;
        let found = match self
            .index
            .as_ref()
            .and_then(|ix| ix.lookup(iova).for_access(access))
        {
            Some(answer) => answer.map(|(phys, perm, _)| (phys & !PAGE_MASK, perm)),
            None => self
                .viommu
                .translate(self.endpoint, iova, access)
                .map(|t| (t.gpa(iova & !PAGE_MASK), t.perm)),
        };
        match found {
            Ok((phys, perm)) => {
                self.tlb.insert(page, phys, perm);
                Ok(in_page(phys, iova))
            }
            Err(reason) => {
                self.viommu
                    .report_fault_in(self.drop_shard, self.endpoint, iova, access, reason);
                Err(TranslateError {
                    endpoint: self.endpoint,
                    iova,
                    access,
                    reason,
                })
            }
        }
    }
}

/// Most ranges an [`EndpointIommu`]'s spill IOTLB (accesses that cross
/// mappings) holds before it starts over, so that a guest touching many
/// mappings cannot grow it without bound.
pub const ENDPOINT_IOTLB_MAX_RANGES: usize = 4096;
/// Shards of an [`EndpointIommu`]'s IOTLB (a power of two), each holding
/// the mapping window of the pages that hash to it.
pub const ENDPOINT_IOTLB_SHARDS: usize = 64;
/// Fills a translation may go through when other threads keep replacing
/// the shard it filled before it could read it back.
const FILL_ATTEMPTS: usize = 8;

/// One IOTLB under its own lock, with what it holds described beside it.
/// The description is written only under the write lock and read under the
/// read lock, so a reader sees it consistent with the IOTLB.
#[derive(Debug, Default)]
struct Shard {
    /// vIOMMU generation the contents were translated under, plus one
    /// (0: empty).
    generation: AtomicU64,
    /// First and last IOVA of the window held (window shards only).
    lo: AtomicU64,
    hi: AtomicU64,
    /// Permitted accesses of that window.
    perm: AtomicU32,
    /// Ranges held (spill shards only).
    ranges: AtomicUsize,
    tlb: RwLock<Iotlb>,
}

impl Shard {
    fn read(&self) -> RwLockReadGuard<'_, Iotlb> {
        self.tlb.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Iotlb> {
        self.tlb.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the window held translates all of `[iova, last]` for
    /// `access` under `generation`. Call with the lock held.
    #[inline(always)]
    fn covers(&self, generation: u64, iova: u64, last: u64, access: u32) -> bool {
        self.generation.load(Ordering::Relaxed) == generation
            && self.lo.load(Ordering::Relaxed) <= iova
            && last <= self.hi.load(Ordering::Relaxed)
            && access & !self.perm.load(Ordering::Relaxed) == 0
    }
}

/// vm-memory's [`Iommu`] for one endpoint: wrap guest memory as
/// `IommuMemory::new(mem, endpoint_iommu, true, ())` and every access of the
/// device model is translated and checked.
///
/// Its IOTLB is [`ENDPOINT_IOTLB_SHARDS`] vm-memory `Iotlb`s, each under
/// its own lock and holding one mapping window: an access that lies in one
/// mapping is answered from the shard its first page hashes to, after a
/// check of the window under the shard's read lock (a miss never builds
/// vm-memory's list of failed ranges). Nothing is ever flushed for being
/// full, and threads share no lock unless their pages share a shard. A
/// miss that one entry of the domain's lock-free index holds whole (a
/// 4 KiB page, or the 2 MiB or 1 GiB block a mapping covers) is answered
/// from it, as [`Translator`]'s and [`crate::DmaMemory`]'s misses are,
/// without the state's lock, which the request path holds while it
/// applies a batch; other misses take that lock and file the whole
/// mapping.
/// Accesses across mappings go to a spill `Iotlb`; accesses that end at
/// 2^64, which vm-memory's end-exclusive ranges cannot hold, to one whose
/// ranges are keyed one byte lower (so the last byte of the space
/// translates here as it does through [`Translator`]).
///
/// Get one from [`Viommu::endpoint_iommu`]. ([`Viommu::dma_memory`] is the
/// faster view of the same, for one device thread.)
///
/// ```
/// # use std::sync::Arc;
/// # use vmm_iommu::config::IommuConfig;
/// # use vmm_iommu::wire::{AttachReq, MapReq, Request, VIRTIO_IOMMU_F_MAP_UNMAP};
/// # use vmm_iommu::wire::{VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
/// # use vmm_iommu::Viommu;
/// # let viommu = Arc::new(Viommu::new(&IommuConfig::default(), &[8], &[(0, 0xff_ffff)])?);
/// # viommu.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
/// # viommu.apply(&Request::Attach(AttachReq { domain: 1, endpoint: 8, ..Default::default() }))?;
/// # let rw = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
/// # let map = MapReq { domain: 1, virt_start: 0x1000_0000, virt_end: 0x1000_ffff, phys_start: 0x20_0000, flags: rw };
/// # viommu.apply(&Request::Map(map))?;
/// use vm_memory::iommu::IommuMemory;
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
///
/// // Endpoint 8 maps IOVA 0x1000_0000..=0x1000_ffff to GPA 0x20_0000.
/// let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)])?;
/// let dma = IommuMemory::new(mem.clone(), viommu.endpoint_iommu(8), true, ());
///
/// dma.write_slice(b"hello", GuestAddress(0x1000_0ffe))?;
/// let mut back = [0u8; 5];
/// mem.read_slice(&mut back, GuestAddress(0x20_0ffe))?;
/// assert_eq!(&back, b"hello");
///
/// // Outside the mapping: refused, and a fault record is queued.
/// assert!(dma.write_slice(b"x", GuestAddress(0x1001_0000)).is_err());
/// assert_eq!(viommu.faults().len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct EndpointIommu {
    viommu: Arc<Viommu>,
    endpoint: u32,
    shards: Box<[Shard]>,
    /// Accesses across mapping windows.
    spill: Shard,
    /// Accesses ending at 2^64, keyed one byte lower.
    top: Shard,
    /// Where misses look first: the lock-free index of the endpoint's
    /// MAP-mode domain, resolved once per topology generation.
    route: RwLock<IndexRoute>,
    /// The fault queue's drop counter this view counts on.
    drop_shard: usize,
}

/// An [`EndpointIommu`]'s way to the lock-free index.
#[derive(Debug, Default)]
struct IndexRoute {
    /// The topology generation `index` was resolved under; `None`: never.
    topology: Option<u64>,
    /// `None`: no index (bypass, nested, or one refused as too big).
    index: Option<Arc<PageIndex>>,
}

fn access_bits(p: Permissions) -> u32 {
    match p {
        Permissions::No => 0,
        Permissions::Read => ACCESS_READ,
        Permissions::Write => ACCESS_WRITE,
        Permissions::ReadWrite => ACCESS_READ | ACCESS_WRITE,
    }
}

fn permissions(bits: u32) -> Permissions {
    match (bits & ACCESS_READ != 0, bits & ACCESS_WRITE != 0) {
        (false, false) => Permissions::No,
        (true, false) => Permissions::Read,
        (false, true) => Permissions::Write,
        (true, true) => Permissions::ReadWrite,
    }
}

/// Why a fill stopped: the refused address, or an IOTLB error.
enum FillError {
    Refused(u64, FaultReason),
    Iotlb(String),
}

impl EndpointIommu {
    pub(crate) fn new(viommu: Arc<Viommu>, endpoint: u32) -> Self {
        let drop_shard = viommu.faults().drop_shard();
        EndpointIommu {
            drop_shard,
            viommu,
            endpoint,
            shards: (0..ENDPOINT_IOTLB_SHARDS)
                .map(|_| Shard::default())
                .collect(),
            spill: Shard::default(),
            top: Shard::default(),
            route: RwLock::new(IndexRoute::default()),
        }
    }

    /// The endpoint this IOMMU view serves.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// A [`crate::DmaMemory`] for the same endpoint over `mem`: the fast
    /// path beside this vm-memory view, for a device model that keeps
    /// `IommuMemory` for its rings but copies its buffers directly (both
    /// translate alike and report the same faults).
    pub fn dma_memory<M: vm_memory::GuestMemoryBackend>(&self, mem: M) -> crate::DmaMemory<M> {
        self.viommu.dma_memory(self.endpoint, mem)
    }

    /// The shard of `iova`'s page: a multiplicative hash, so that strided
    /// layouts use every shard.
    #[inline(always)]
    fn shard(&self, iova: u64) -> &Shard {
        let h = (iova >> PAGE_SHIFT).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let i = (h >> (64 - ENDPOINT_IOTLB_SHARDS.trailing_zeros())) as usize;
        &self.shards[i % self.shards.len()]
    }

    /// The current generation plus one (0 marks an empty shard). Loaded
    /// before the state is read: a window is filed under a generation no
    /// newer than the state it was read from, so a window an UNMAP removed
    /// is filed under the old generation at the latest, and dead for every
    /// access that starts after the UNMAP's status is written.
    fn generation(&self) -> u64 {
        self.viommu.generation().wrapping_add(1)
    }

    /// The window of `iova`'s entry in the domain's lock-free index, read
    /// without the state's lock: `Some(Ok)` where the index answers and
    /// neither the topology nor the generation (`generation`, loaded
    /// before) moved meanwhile, `Some(Err)` for a refusal, `None` to ask
    /// the state. The same rule as [`crate::DmaMemory`]'s misses: an UNMAP
    /// takes its mappings out of the index before it moves the
    /// generation, so an answer that survives is one no revocation has
    /// overtaken.
    fn index_window(
        &self,
        iova: u64,
        access: u32,
        generation: u64,
    ) -> Option<Result<Translation, FaultReason>> {
        let topology = self.viommu.topology();
        let found = {
            let route = self.route.read().unwrap_or_else(|p| p.into_inner());
            if route.topology == Some(topology) {
                route.index.as_ref().map(|ix| ix.lookup(iova))
            } else {
                drop(route);
                let index = self.viommu.translation_index(self.endpoint);
                let found = index.as_ref().map(|ix| ix.lookup(iova));
                *self.route.write().unwrap_or_else(|p| p.into_inner()) = IndexRoute {
                    topology: Some(topology),
                    index,
                };
                found
            }
        }?;
        let unmoved = self.viommu.topology() == topology && self.generation() == generation;
        let (phys, perm, last) = match found.for_access(access).filter(|_| unmoved)? {
            Ok(page) => page,
            Err(reason) => return Some(Err(reason)),
        };
        // Mappings are granule-aligned (at least 4 KiB), so the page's
        // offset is the same on both sides; otherwise the state answers.
        let off = iova & PAGE_MASK;
        let phys_start = phys.checked_sub(off).filter(|_| phys & PAGE_MASK == off)?;
        Some(Ok(Translation {
            iova_start: iova - off,
            iova_last: last,
            phys_start,
            perm,
        }))
    }

    /// Puts the window `t` alone in `shard`.
    fn fill_window(&self, shard: &Shard, generation: u64, t: &Translation) -> Result<(), String> {
        // The IOTLB's ranges end exclusively, below 2^64: the last byte of
        // the space is the top shard's.
        let hi = t.iova_last.min(u64::MAX - 1);
        let len = usize::try_from(hi - t.iova_start + 1).map_err(|e| e.to_string())?;
        let mut tlb = shard.write();
        if shard.generation.load(Ordering::Relaxed) != 0 {
            let lo = shard.lo.load(Ordering::Relaxed);
            let old = shard.hi.load(Ordering::Relaxed) - lo + 1;
            // Removing the one range keeps the map's node for the next.
            match usize::try_from(old) {
                Ok(old) => tlb.invalidate_mapping(GuestAddress(lo), old),
                Err(_) => tlb.invalidate_all(),
            }
        }
        tlb.set_mapping(
            GuestAddress(t.iova_start),
            GuestAddress(t.phys_start),
            len,
            permissions(t.perm),
        )
        .map_err(|e| e.to_string())?;
        shard.lo.store(t.iova_start, Ordering::Relaxed);
        shard.hi.store(hi, Ordering::Relaxed);
        shard.perm.store(t.perm, Ordering::Relaxed);
        shard.generation.store(generation, Ordering::Relaxed);
        Ok(())
    }

    /// Adds every window up to `last` to a slow shard (the spill, or with
    /// `shift` 1 the top one, whose ranges sit one byte lower), starting
    /// with `first`, the window of the access's first byte.
    fn fill_windows(
        &self,
        shard: &Shard,
        shift: u64,
        generation: u64,
        first: Translation,
        last: u64,
        access: u32,
    ) -> Result<(), FillError> {
        let iotlb = |e: vm_memory::iommu::Error| FillError::Iotlb(e.to_string());
        let mut tlb = shard.write();
        if shard.generation.load(Ordering::Relaxed) != generation
            || shard.ranges.load(Ordering::Relaxed) >= ENDPOINT_IOTLB_MAX_RANGES
        {
            tlb.invalidate_all();
            shard.ranges.store(0, Ordering::Relaxed);
            shard.generation.store(generation, Ordering::Relaxed);
        }
        let mut t = first;
        loop {
            // The part of the window that can be stored: shifted down by
            // `shift` and ending below 2^64 once shifted.
            let lo = t.iova_start.max(shift);
            let hi = t.iova_last.min(u64::MAX - 1 + shift);
            if lo <= hi {
                let len =
                    usize::try_from(hi - lo + 1).map_err(|e| FillError::Iotlb(e.to_string()))?;
                tlb.set_mapping(
                    GuestAddress(lo - shift),
                    GuestAddress(t.gpa(lo)),
                    len,
                    permissions(t.perm),
                )
                .map_err(iotlb)?;
                shard.ranges.fetch_add(1, Ordering::Relaxed);
            }
            if t.iova_last >= last {
                return Ok(());
            }
            let cur = t.iova_last + 1;
            t = self
                .viommu
                .translate(self.endpoint, cur, access)
                .map_err(|r| FillError::Refused(cur, r))?;
        }
    }
}

impl Iommu for EndpointIommu {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        // `last` may be u64::MAX: an access may end exactly at 2^64, as it
        // may through `Translator`.
        let last = u64::try_from(length)
            .ok()
            .and_then(|l| l.checked_sub(1))
            .and_then(|l| iova.0.checked_add(l));
        let Some(last) = last else {
            return Err(cannot(iova, length, "empty range or range past 2^64"));
        };
        let bits = access_bits(access);
        if last != u64::MAX {
            let shard = self.shard(iova.0);
            let tlb = shard.read();
            if shard.covers(self.generation(), iova.0, last, bits) {
                if let Ok(it) = Iotlb::lookup(tlb, iova, length, access) {
                    return Ok(it);
                }
            }
        }
        self.miss(iova, length, last, access)
    }
}

fn cannot(iova: GuestAddress, length: usize, reason: &str) -> IommuError {
    IommuError::CannotResolve {
        iova_range: IovaRange { base: iova, length },
        reason: reason.to_string(),
    }
}

impl EndpointIommu {
    #[inline(never)]
    fn miss(
        &self,
        iova: GuestAddress,
        length: usize,
        last: u64,
        access: Permissions,
    ) -> Result<IotlbIterator<RwLockReadGuard<'_, Iotlb>>, IommuError> {
        let bits = access_bits(access);
        let refused = |addr: u64, reason: FaultReason| {
            self.viommu
                .report_fault_in(self.drop_shard, self.endpoint, addr, bits, reason);
            cannot(iova, length, &format!("{reason:?} fault at {addr:#x}"))
        };
        for _ in 0..FILL_ATTEMPTS {
            let generation = self.generation();
            // The index where its entry holds the whole access (no lock),
            // else the state (the whole mapping's window).
            let from_index = if last == u64::MAX {
                None
            } else {
                self.index_window(iova.0, bits, generation)
            };
            let t = match from_index {
                Some(Ok(t)) if t.iova_last >= last => t,
                Some(Err(r)) => return Err(refused(iova.0, r)),
                _ => self
                    .viommu
                    .translate(self.endpoint, iova.0, bits)
                    .map_err(|r| refused(iova.0, r))?,
            };
            if last != u64::MAX && t.iova_last >= last {
                // One window: into the page's shard, then read back (another
                // thread may have replaced it meanwhile: try again).
                let shard = self.shard(iova.0);
                self.fill_window(shard, generation, &t)
                    .map_err(|e| cannot(iova, length, &e))?;
                let tlb = shard.read();
                if shard.covers(generation, iova.0, last, bits) {
                    if let Ok(it) = Iotlb::lookup(tlb, iova, length, access) {
                        return Ok(it);
                    }
                }
                continue;
            }
            // Across windows, or ending at 2^64 (keyed one byte lower; `iova`
            // is at least 1 there, since `length` is below 2^64).
            let (shard, shift) = if last == u64::MAX {
                (&self.top, 1)
            } else {
                (&self.spill, 0)
            };
            let key = GuestAddress(iova.0 - shift);
            {
                let tlb = shard.read();
                if shard.generation.load(Ordering::Relaxed) == generation {
                    if let Ok(it) = Iotlb::lookup(tlb, key, length, access) {
                        return Ok(it);
                    }
                }
            }
            match self.fill_windows(shard, shift, generation, t, last, bits) {
                Ok(()) => {}
                Err(FillError::Refused(addr, r)) => return Err(refused(addr, r)),
                Err(FillError::Iotlb(e)) => return Err(cannot(iova, length, &e)),
            }
            let tlb = shard.read();
            if shard.generation.load(Ordering::Relaxed) == generation {
                if let Ok(it) = Iotlb::lookup(tlb, key, length, access) {
                    return Ok(it);
                }
            }
        }
        Err(cannot(
            iova,
            length,
            "the IOTLB kept changing while this access filled it",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AddrRange, IommuConfig};
    use crate::wire::{
        AttachReq, MapReq, Request, UnmapReq, VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_IOMMU_MAP_F_READ,
        VIRTIO_IOMMU_MAP_F_WRITE,
    };
    use vm_memory::iommu::IommuMemory;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const EP: u32 = 8;
    const RAM: u64 = 1 << 20;
    const TOP_PAGE: u64 = u64::MAX - 0xfff;

    /// A vIOMMU over the whole 64-bit input range with endpoint 8 in
    /// domain 1, and 1 MiB of RAM whose every byte holds its address's
    /// low byte.
    fn rig() -> (Arc<Viommu>, GuestMemoryMmap) {
        let cfg = IommuConfig {
            input_range: AddrRange {
                start: 0,
                end: u64::MAX,
            },
            ..IommuConfig::default()
        };
        let v = Arc::new(Viommu::new(&cfg, &[EP], &[(0, RAM - 1)]).unwrap());
        v.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
        v.apply(&Request::Attach(AttachReq {
            domain: 1,
            endpoint: EP,
            ..Default::default()
        }))
        .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let bytes: Vec<u8> = (0..RAM).map(|a| a as u8).collect();
        mem.write_slice(&bytes, GuestAddress(0)).unwrap();
        (v, mem)
    }

    fn map(v: &Viommu, iova: u64, len: u64, phys: u64) {
        v.apply(&Request::Map(MapReq {
            domain: 1,
            virt_start: iova,
            virt_end: iova + (len - 1),
            phys_start: phys,
            flags: VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
        }))
        .unwrap();
    }

    fn unmap(v: &Viommu, iova: u64, len: u64) {
        v.apply(&Request::Unmap(UnmapReq {
            domain: 1,
            virt_start: iova,
            virt_end: iova + (len - 1),
            reserved: [0; 4],
        }))
        .unwrap();
    }

    /// What `EndpointIommu` translates `[iova, iova + len)` to, or `None`.
    fn ranges(ep: &EndpointIommu, iova: u64, len: usize) -> Option<Vec<(u64, usize)>> {
        let it = Iommu::translate(ep, GuestAddress(iova), len, Permissions::Read).ok()?;
        Some(it.map(|r| (r.base.0, r.length)).collect())
    }

    /// The `DmaMemory` an `EndpointIommu` hands out serves the same
    /// endpoint: it reads what the vm-memory view reads, and an UNMAP
    /// revokes both.
    #[test]
    fn endpoint_dma_memory_translates_as_the_iommu_view() {
        let (v, mem) = rig();
        map(&v, 0x10_0000, 0x1000, 0x3000);
        let ep = v.endpoint_iommu(EP);
        let dma = ep.dma_memory(mem.clone());
        assert_eq!(dma.endpoint(), EP);
        let view = IommuMemory::new(mem, v.endpoint_iommu(EP), true, ());
        let a = GuestAddress(0x10_0010);
        let fast: u64 = dma.read_obj(a).unwrap();
        let slow: u64 = view.read_obj(a).unwrap();
        assert_eq!(
            (fast, slow),
            (
                u64::from_le_bytes([0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]),
                fast
            )
        );
        unmap(&v, 0x10_0000, 0x1000);
        assert!(dma.read_obj::<u64>(a).is_err());
        assert!(view.read_obj::<u64>(a).is_err());
    }

    /// An UNMAP drops from a translator's IOTLB the pages it removed and
    /// nothing else (the index's UNMAP log); more UNMAPs than the log
    /// holds since the translator's last look drop everything. Either
    /// way, no page is translated after its UNMAP returned.
    #[test]
    fn unmap_drops_only_its_pages_from_the_translator() {
        use crate::state::ACCESS_READ;
        let (v, _) = rig();
        // Pages 0x100 and 0x201: IOTLB slots 0 and 1.
        map(&v, 0x10_0000, 0x1000, 0x3000);
        map(&v, 0x20_1000, 0x1000, 0x4000);
        let mut t = v.translator(EP);
        assert!(t.is_lock_free());
        t.translate(0x10_0000, ACCESS_READ).unwrap();
        t.translate(0x20_1000, ACCESS_READ).unwrap();
        assert_eq!(t.hit_miss(), (0, 2));
        unmap(&v, 0x20_1000, 0x1000);
        // The other page is still a hit; the unmapped one is refused.
        assert_eq!(t.translate(0x10_0008, ACCESS_READ).unwrap().0, 0x3008);
        assert_eq!(t.hit_miss(), (1, 2));
        assert!(t.translate(0x20_1000, ACCESS_READ).is_err());
        // Remapped elsewhere: the new address, not the old one.
        map(&v, 0x20_1000, 0x1000, 0x5000);
        assert_eq!(t.translate(0x20_1010, ACCESS_READ).unwrap().0, 0x5010);
        // A large UNMAP (more pages than the IOTLB has entries) drops
        // what lies in it.
        map(&v, 0x100_0000, 0x40_0000, 0x1_0000);
        t.translate(0x120_0000, ACCESS_READ).unwrap();
        unmap(&v, 0x100_0000, 0x40_0000);
        assert!(t.translate(0x120_0000, ACCESS_READ).is_err());
        assert_eq!(t.translate(0x10_0000, ACCESS_READ).unwrap().0, 0x3000);
        // Past the log: everything goes, and still nothing stale.
        let (hits, misses) = t.hit_miss();
        for i in 0..(index::UNMAP_LOG as u64 + 1) {
            map(&v, 0x4000_0000 + i * 0x1000, 0x1000, 0x6000);
            unmap(&v, 0x4000_0000 + i * 0x1000, 0x1000);
        }
        assert_eq!(t.translate(0x10_0000, ACCESS_READ).unwrap().0, 0x3000);
        assert_eq!(t.hit_miss(), (hits, misses + 1), "a full flush: a miss");
        assert!(t.translate(0x4000_0000, ACCESS_READ).is_err());
    }

    #[test]
    fn last_byte_of_the_space_translates_as_through_the_translator() {
        let (v, mem) = rig();
        map(&v, TOP_PAGE, 0x1000, 0x5000);
        let mut t = v.translator(EP);
        assert_eq!(t.translate(u64::MAX, ACCESS_READ), Ok((0x5fff, 1)));
        let ep = v.endpoint_iommu(EP);
        assert_eq!(ranges(&ep, u64::MAX, 1), Some(vec![(0x5fff, 1)]));
        assert_eq!(ranges(&ep, u64::MAX - 15, 16), Some(vec![(0x5ff0, 16)]));
        // Twice: the second is answered from the IOTLB.
        assert_eq!(ranges(&ep, u64::MAX, 1), Some(vec![(0x5fff, 1)]));
        let dma = IommuMemory::new(mem.clone(), ep, true, ());
        assert_eq!(dma.read_obj::<u8>(GuestAddress(u64::MAX)).unwrap(), 0xff);
        let mut page = vec![0u8; 0x1000];
        dma.read_slice(&mut page, GuestAddress(TOP_PAGE)).unwrap();
        assert!(page.iter().enumerate().all(|(i, &b)| b == i as u8));
        dma.write_obj(0xa5u8, GuestAddress(u64::MAX)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x5fff)).unwrap(), 0xa5);
        assert!(v.faults().is_empty());
    }

    #[test]
    fn last_byte_of_the_space_in_bypass_translates_as_through_the_translator() {
        // Endpoint 9: never attached, so config-space bypass decides.
        const OTHER: u32 = 9;
        let cfg = IommuConfig {
            input_range: AddrRange {
                start: 0,
                end: u64::MAX,
            },
            ..IommuConfig::default()
        };
        let v = Arc::new(Viommu::new(&cfg, &[OTHER], &[(0, RAM - 1)]).unwrap());
        v.set_unattached_bypass(true);
        let mut t = v.translator(OTHER);
        assert_eq!(t.translate(u64::MAX, ACCESS_READ), Ok((u64::MAX, 1)));
        let ep = v.endpoint_iommu(OTHER);
        assert_eq!(ranges(&ep, u64::MAX, 1), Some(vec![(u64::MAX, 1)]));
        assert_eq!(ranges(&ep, 0x1234, 8), Some(vec![(0x1234, 8)]));
        // Bypass off: both refuse.
        v.set_unattached_bypass(false);
        assert!(t.translate(u64::MAX, ACCESS_READ).is_err());
        assert_eq!(ranges(&ep, u64::MAX, 1), None);
        assert_eq!(ranges(&ep, 0x1234, 8), None);
    }

    #[test]
    fn faults_past_a_full_queue_are_counted_and_queued_again_once_there_is_room() {
        let (v, _) = rig();
        let mut t = v.translator(EP);
        let cap = v.faults().capacity();
        for i in 0..cap as u64 {
            assert!(t.translate(0x10_0000 + i * 0x1000, ACCESS_READ).is_err());
        }
        assert!(v.faults().is_full());
        // Full: counted, whoever the endpoint, nothing queued.
        assert!(t.translate(0x10_0000, ACCESS_READ).is_err());
        v.report_fault(EP, 0x1234_0000, ACCESS_WRITE, FaultReason::Mapping);
        v.report_fault(EP + 1, 0, ACCESS_READ, FaultReason::Mapping);
        assert_eq!((v.faults().len(), v.faults().dropped()), (cap, 3));
        // The driver takes one: room for one again, and an endpoint the
        // vIOMMU does not manage still gets none of it (5.13.6.8.2).
        assert!(v.faults().pop().is_some());
        v.report_fault(EP + 1, 0, ACCESS_READ, FaultReason::Mapping);
        assert_eq!(v.faults().len(), cap - 1);
        v.report_fault(EP, 0x1234_0000, ACCESS_WRITE, FaultReason::Mapping);
        assert_eq!((v.faults().len(), v.faults().dropped()), (cap, 3));
        let last = v.faults().records().pop().unwrap();
        assert_eq!((last.endpoint, last.address), (EP, 0x1234_0000));
    }

    #[test]
    fn translators_count_drops_apart_and_every_drop_is_counted() {
        let (v, _) = rig();
        let cap = v.faults().capacity();
        for i in 0..cap as u64 {
            v.report_fault(
                EP,
                0x10_0000 + i * 0x1000,
                ACCESS_READ,
                FaultReason::Mapping,
            );
        }
        let mut ts: Vec<Translator> = (0..3).map(|_| v.translator(EP)).collect();
        assert_ne!(ts[0].drop_shard, ts[1].drop_shard, "two threads, two lines");
        let before = v.faults().dropped();
        std::thread::scope(|sc| {
            for t in &mut ts {
                sc.spawn(move || {
                    for i in 0..1000u64 {
                        assert!(t.translate(0x900_0000 + i * 0x1000, ACCESS_READ).is_err());
                    }
                });
            }
        });
        assert_eq!(v.faults().dropped(), before + 3000);
        assert_eq!(v.faults().len(), cap);
    }

    #[test]
    fn endpoint_misses_in_one_index_entry_are_answered_while_the_state_is_locked() {
        let (v, _) = rig();
        map(&v, 0x10_0000, 0x2000, 0x3000);
        map(&v, 0x40_0000, 0x1000, 0x8000);
        let ep = v.endpoint_iommu(EP);
        // The first miss finds the domain's index (under the read lock).
        assert_eq!(ranges(&ep, 0x10_0010, 8), Some(vec![(0x3010, 8)]));
        // The request path holds the write lock (a batch being applied):
        // misses that one index entry holds are still answered.
        let held = v.state_mut();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|sc| {
            sc.spawn(|| {
                let r = (ranges(&ep, 0x10_1ff8, 8), ranges(&ep, 0x40_0100, 16));
                let _ = tx.send(r);
            });
            // Not a time limit on the answer: a miss that waited for the
            // lock would wait for ever, and this releases it after a minute.
            let got = rx.recv_timeout(std::time::Duration::from_secs(60));
            drop(held);
            assert_eq!(
                got.expect("answered without the state's lock"),
                (Some(vec![(0x4ff8, 8)]), Some(vec![(0x8100, 16)]))
            );
        });
        // An access across two pages of a mapping, and a refusal, go to
        // the state; an UNMAP ends what the index gave.
        assert_eq!(ranges(&ep, 0x10_0ff8, 16), Some(vec![(0x3ff8, 16)]));
        assert_eq!(ranges(&ep, 0x10_2000, 8), None);
        unmap(&v, 0x40_0000, 0x1000);
        assert_eq!(ranges(&ep, 0x40_0100, 16), None);
        assert_eq!(v.faults().len(), 2);
    }

    #[test]
    fn unmapped_last_byte_is_refused_with_a_fault() {
        let (v, _) = rig();
        map(&v, TOP_PAGE - 0x1000, 0x1000, 0x5000);
        let ep = v.endpoint_iommu(EP);
        assert_eq!(ranges(&ep, u64::MAX, 1), None);
        // Across the mapped page into the unmapped last one.
        assert_eq!(ranges(&ep, TOP_PAGE - 8, 0x1008), None);
        assert_eq!(v.faults().len(), 2);
    }

    #[test]
    fn access_across_two_mappings_reads_both_and_unmap_ends_it() {
        let (v, mem) = rig();
        map(&v, 0x10_0000, 0x1000, 0x3000);
        map(&v, 0x10_1000, 0x1000, 0x8000);
        let ep = v.endpoint_iommu(EP);
        let want = vec![(0x3ff8, 8), (0x8000, 8)];
        assert_eq!(ranges(&ep, 0x10_0ff8, 16), Some(want.clone()));
        assert_eq!(ranges(&ep, 0x10_0ff8, 16), Some(want));
        let dma = IommuMemory::new(mem, ep, true, ());
        let mut b = [0u8; 4];
        dma.read_slice(&mut b, GuestAddress(0x10_0ffe)).unwrap();
        assert_eq!(b, [0xfe, 0xff, 0x00, 0x01]);
        unmap(&v, 0x10_1000, 0x1000);
        // The status of that UNMAP is written: no access that starts now
        // may use the second mapping.
        assert!(dma.read_slice(&mut b, GuestAddress(0x10_0ffe)).is_err());
        assert!(dma.read_obj::<u8>(GuestAddress(0x10_1000)).is_err());
        assert_eq!(dma.read_obj::<u8>(GuestAddress(0x10_0ffe)).unwrap(), 0xfe);
    }

    #[test]
    fn unmap_takes_effect_before_its_ok_on_every_path() {
        let (v, mem) = rig();
        map(&v, 0x10_0000, 0x2000, 0x3000);
        map(&v, TOP_PAGE, 0x1000, 0x6000);
        let dma = IommuMemory::new(mem, v.endpoint_iommu(EP), true, ());
        // Warm every path: a window shard, the top shard.
        for _ in 0..2 {
            dma.read_obj::<u64>(GuestAddress(0x10_1000)).unwrap();
            dma.read_obj::<u8>(GuestAddress(u64::MAX)).unwrap();
        }
        unmap(&v, 0x10_0000, 0x2000);
        unmap(&v, TOP_PAGE, 0x1000);
        assert!(dma.read_obj::<u64>(GuestAddress(0x10_1000)).is_err());
        assert!(dma.read_obj::<u8>(GuestAddress(u64::MAX)).is_err());
    }

    #[test]
    fn windows_sharing_a_shard_take_turns() {
        let (v, _) = rig();
        // More pages than shards, each its own mapping: every shard is
        // refilled many times, and every answer is still its own page's.
        let pages = 4 * ENDPOINT_IOTLB_SHARDS as u64;
        for i in 0..pages {
            map(&v, 0x100_0000 + 2 * i * 0x1000, 0x1000, (i % 200) * 0x1000);
        }
        let ep = v.endpoint_iommu(EP);
        for round in 0..3 {
            for i in 0..pages {
                let iova = 0x100_0000 + 2 * i * 0x1000 + 8 * round;
                let want = (i % 200) * 0x1000 + 8 * round;
                assert_eq!(ranges(&ep, iova, 8), Some(vec![(want, 8)]));
            }
        }
    }

    #[test]
    fn threads_translating_while_pairs_are_applied_never_see_an_unmapped_page() {
        let (v, _) = rig();
        map(&v, 0x10_0000, 0x1000, 0x3000);
        let ep = Arc::new(v.endpoint_iommu(EP));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let ep = Arc::clone(&ep);
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    // At least some translations, however the threads are
                    // scheduled on a busy machine.
                    while n < 1000 || !stop.load(Ordering::Relaxed) {
                        assert_eq!(ranges(&ep, 0x10_0010, 8), Some(vec![(0x3010, 8)]));
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        for _ in 0..500 {
            map(&v, 0x20_0000, 0x1000, 0x4000);
            assert_eq!(ranges(&ep, 0x20_0000, 8), Some(vec![(0x4000, 8)]));
            unmap(&v, 0x20_0000, 0x1000);
            // After the UNMAP's OK: refused, whatever the readers filled.
            assert_eq!(ranges(&ep, 0x20_0000, 8), None);
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    }
}
