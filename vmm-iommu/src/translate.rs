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

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use vm_memory::iommu::{Error as IommuError, Iommu, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Permissions};

use crate::state::{FaultReason, Translation, ACCESS_READ, ACCESS_WRITE};
use crate::viommu::Viommu;

/// Entries in a [`Translator`]'s IOTLB (a power of two).
pub const TLB_ENTRIES: usize = 256;
const PAGE_SHIFT: u32 = 12;
const PAGE_MASK: u64 = (1 << PAGE_SHIFT) - 1;
const INVALID_TAG: u64 = u64::MAX;

#[derive(Clone, Copy, Debug)]
struct TlbEntry {
    /// IOVA page number, `INVALID_TAG` when empty.
    tag: u64,
    /// Guest-physical address of the page.
    phys: u64,
    perm: u32,
}

const EMPTY: TlbEntry = TlbEntry {
    tag: INVALID_TAG,
    phys: 0,
    perm: 0,
};

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
/// a generation load and one entry compare; a miss takes the vIOMMU's read
/// lock. A refusal queues a fault record for the driver.
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
/// use vmm_iommu::state::{FaultReason, ACCESS_READ};
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
    generation: u64,
    tlb: Box<[TlbEntry; TLB_ENTRIES]>,
    hits: u64,
    misses: u64,
}

impl Translator {
    pub(crate) fn new(viommu: Arc<Viommu>, endpoint: u32) -> Self {
        let generation = viommu.generation();
        Translator {
            viommu,
            endpoint,
            generation,
            tlb: Box::new([EMPTY; TLB_ENTRIES]),
            hits: 0,
            misses: 0,
        }
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
        let generation = self.viommu.generation();
        if generation != self.generation {
            self.flush(generation);
        }
        let page = iova >> PAGE_SHIFT;
        let e = &self.tlb[(page as usize) & (TLB_ENTRIES - 1)];
        if e.tag == page && access & !e.perm == 0 {
            self.hits += 1;
            let off = iova & PAGE_MASK;
            return Ok((e.phys | off, (PAGE_MASK + 1) - off));
        }
        self.miss(iova, access)
    }

    #[cold]
    fn flush(&mut self, generation: u64) {
        self.tlb.fill(EMPTY);
        self.generation = generation;
    }

    #[inline(never)]
    fn miss(&mut self, iova: u64, access: u32) -> Result<(u64, u64), TranslateError> {
        self.misses += 1;
        match self.viommu.translate(self.endpoint, iova, access) {
            Ok(t) => {
                let page = iova >> PAGE_SHIFT;
                let phys = t.gpa(iova & !PAGE_MASK);
                self.tlb[(page as usize) & (TLB_ENTRIES - 1)] = TlbEntry {
                    tag: page,
                    phys,
                    perm: t.perm,
                };
                let off = iova & PAGE_MASK;
                Ok((phys | off, (PAGE_MASK + 1) - off))
            }
            Err(reason) => {
                self.viommu
                    .report_fault(self.endpoint, iova, access, reason);
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

/// Most ranges an [`EndpointIommu`]'s IOTLB holds before it starts over, so
/// that a guest touching many mappings cannot grow it without bound.
pub const ENDPOINT_IOTLB_MAX_RANGES: usize = 4096;
/// Identity (bypass) translations are cached in 2 MiB windows.
const IDENTITY_CHUNK_MASK: u64 = (2 << 20) - 1;

/// vm-memory's [`Iommu`] for one endpoint: wrap guest memory as
/// `IommuMemory::new(mem, endpoint_iommu, true, ())` and every access of the
/// device model is translated and checked.
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
    generation: AtomicU64,
    ranges: AtomicUsize,
    iotlb: RwLock<Iotlb>,
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

impl EndpointIommu {
    pub(crate) fn new(viommu: Arc<Viommu>, endpoint: u32) -> Self {
        let generation = viommu.generation();
        EndpointIommu {
            viommu,
            endpoint,
            generation: AtomicU64::new(generation),
            ranges: AtomicUsize::new(0),
            iotlb: RwLock::new(Iotlb::new()),
        }
    }

    /// The endpoint this IOMMU view serves.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    fn read_tlb(&self) -> RwLockReadGuard<'_, Iotlb> {
        self.iotlb.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Fills the IOTLB for `[iova, last]` from the state model, or reports
    /// the first refused address.
    fn fill(&self, iova: u64, last: u64, access: u32) -> Result<(), (u64, FaultReason)> {
        let mut tlb = self.iotlb.write().unwrap_or_else(|p| p.into_inner());
        // Start over before a fill rather than during one, so the ranges
        // this fill inserts are all there for the lookup that follows.
        if self.ranges.load(Ordering::Relaxed) >= ENDPOINT_IOTLB_MAX_RANGES {
            tlb.invalidate_all();
            self.ranges.store(0, Ordering::Relaxed);
        }
        let mut cur = iova;
        loop {
            let t = self
                .viommu
                .translate(self.endpoint, cur, access)
                .map_err(|r| (cur, r))?;
            // Cache the whole window (the mapping, or for identity the 2 MiB
            // around the access), so neighbouring accesses hit. Windows end
            // below u64::MAX because the IOTLB's ranges are end-exclusive.
            let (lo, hi) = if t == Translation::IDENTITY {
                (cur & !IDENTITY_CHUNK_MASK, last | IDENTITY_CHUNK_MASK)
            } else {
                (t.iova_start, t.iova_last)
            };
            let hi = hi.min(u64::MAX - 1);
            let len = usize::try_from(hi - lo + 1).map_err(|_| (cur, FaultReason::Unknown))?;
            let end = hi;
            self.ranges.fetch_add(1, Ordering::Relaxed);
            tlb.set_mapping(
                GuestAddress(lo),
                GuestAddress(t.gpa(lo)),
                len,
                permissions(t.perm),
            )
            .map_err(|_| (cur, FaultReason::Unknown))?;
            if end >= last {
                return Ok(());
            }
            cur = end + 1;
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
        let cannot = |reason: &str| IommuError::CannotResolve {
            iova_range: IovaRange { base: iova, length },
            reason: reason.to_string(),
        };
        // vm-memory's IOTLB computes the exclusive end `iova + length`:
        // refuse empty ranges and ranges whose end does not fit in 64 bits.
        let end = iova.0.checked_add(length as u64);
        let Some(last) = end.filter(|_| length > 0).map(|e| e - 1) else {
            return Err(cannot(
                "empty range or range past the end of the address space",
            ));
        };
        let generation = self.viommu.generation();
        if self.generation.load(Ordering::Acquire) != generation {
            let mut tlb = self.iotlb.write().unwrap_or_else(|p| p.into_inner());
            tlb.invalidate_all();
            self.ranges.store(0, Ordering::Relaxed);
            self.generation.store(generation, Ordering::Release);
        }
        if let Ok(it) = Iotlb::lookup(self.read_tlb(), iova, length, access) {
            return Ok(it);
        }
        let bits = access_bits(access);
        if let Err((addr, reason)) = self.fill(iova.0, last, bits) {
            self.viommu.report_fault(self.endpoint, addr, bits, reason);
            return Err(cannot(&format!("{reason:?} fault at {addr:#x}")));
        }
        Iotlb::lookup(self.read_tlb(), iova, length, access)
            .map_err(|_| cannot("translation changed while filling the IOTLB"))
    }
}
