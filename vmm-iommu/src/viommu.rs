//! The shared handle of one vIOMMU: the state model behind a lock, the
//! translation generation that invalidates every cached translation, and
//! the fault queue.
//!
//! The request queue applies requests here; emulated devices translate
//! here (through [`crate::translate`]) from their own threads. The handle
//! owns no thread: the VMM owns them all.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

mod lifecycle;
mod memory_map;
pub use crate::state::MemoryMapError;
pub use lifecycle::HotplugError;
pub use memory_map::{host_ranges, RamUpdate};

use crate::backend::{
    BackendError, BackendFault, DomainView, IommuBackend, PageResponse, TableBinding,
};
use crate::config::{IommuConfig, ReservedRegion};
use crate::dma_memory::DmaMemory;
use crate::fault::FaultQueue;
use crate::idhash::IdMap;
use crate::invalidation::{coalesce, Invalidation, WIDEN_THRESHOLD_PAGES};
use crate::mapping::Mapping;
use crate::padded::Padded;
use crate::router::{backend_error, Router};
use crate::state::{
    FaultReason, IommuState, RequestError, ReservedRegionError, StateSnapshot, Translation,
    ACCESS_READ, ACCESS_WRITE,
};
use crate::translate::index::{IndexWriter, PageIndex};
use crate::translate::{EndpointIommu, Translator};
use crate::wire::{
    AttachReq, AttachTableReq, DetachReq, ExtFaultRecord, MapReq, PageRespReq, Request, TableDesc,
    UnmapReq, VIRTIO_IOMMU_FAULT_F_ADDRESS, VIRTIO_IOMMU_FAULT_F_PASID, VIRTIO_IOMMU_FAULT_F_READ,
    VIRTIO_IOMMU_FAULT_F_WRITE, VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_R_MAPPING,
    VIRTIO_IOMMU_FAULT_R_UNKNOWN, VIRTIO_IOMMU_FLT_DMA_UNRECOV, VIRTIO_IOMMU_FLT_PAGE_REQ,
    VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID, VIRTIO_IOMMU_PR_F_LAST_PAGE,
};

/// One vIOMMU, shared between the device (request processing) and the
/// translators of the emulated devices behind it.
///
/// The device applies the guest's requests here; translators and DMA
/// views of emulated devices ([`Viommu::translator`],
/// [`Viommu::endpoint_iommu`], [`Viommu::dma_memory`]) hold an `Arc` of
/// it on their own threads.
///
/// ```
/// use vmm_iommu::config::IommuConfig;
/// use vmm_iommu::{FaultReason, ACCESS_READ, ACCESS_WRITE};
/// use vmm_iommu::Applied;
/// use vmm_iommu::wire::{AttachReq, MapReq, Request, UnmapReq, VIRTIO_IOMMU_F_MAP_UNMAP};
/// use vmm_iommu::Viommu;
///
/// // Endpoint 8, 16 MiB of guest RAM at 0.
/// let viommu = Viommu::new(&IommuConfig::default(), &[8], &[(0, 0xff_ffff)])?;
/// viommu.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
/// viommu.apply(&Request::Attach(AttachReq { domain: 1, endpoint: 8, ..Default::default() }))?;
/// viommu.apply(&Request::Map(MapReq {
///     domain: 1,
///     virt_start: 0x1000_0000,
///     virt_end: 0x1000_ffff,
///     phys_start: 0x20_0000,
///     flags: ACCESS_READ, // read-only
/// }))?;
///
/// let t = viommu.translate(8, 0x1000_0010, ACCESS_READ).unwrap();
/// assert_eq!(t.gpa(0x1000_0010), 0x20_0010);
/// assert_eq!(viommu.translate(8, 0x1000_0010, ACCESS_WRITE), Err(FaultReason::Mapping));
///
/// // An UNMAP that removes something moves the generation: every cached
/// // translation is dropped before the request's status is written.
/// let before = viommu.generation();
/// let unmap = UnmapReq { domain: 1, virt_start: 0, virt_end: u64::MAX, ..Default::default() };
/// assert_eq!(viommu.apply(&Request::Unmap(unmap))?, Applied::Unmapped(1));
/// assert!(viommu.generation() > before);
/// assert_eq!(viommu.translate(8, 0x1000_0010, ACCESS_READ), Err(FaultReason::Mapping));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Viommu {
    state: RwLock<IommuState>,
    /// Bumped (under the state's write lock) whenever an access that was
    /// allowed may no longer be: UNMAP that removed something, DETACH,
    /// ATTACH, reset, bypass turned off. Translators compare it with the
    /// generation their cache was filled under.
    generation: Padded<AtomicU64>,
    /// Bumped with `generation` on everything but an UNMAP: what
    /// endpoints are attached where, bypass, and the domains themselves.
    /// A [`Translator`] resolves its endpoint's domain once per value and
    /// follows that domain's UNMAPs through its index.
    topology: Padded<AtomicU64>,
    /// The lock-free indexes of MAP-mode domains that translators use
    /// (`None`: refused, too big), built on a translator's first need,
    /// kept by MAP and UNMAP, dropped by any other change.
    indexes: Mutex<IdMap<u32, Option<DomainIndex>>>,
    /// Whether `indexes` holds anything: MAP and UNMAP skip its lock when
    /// no translator needs one.
    has_indexes: AtomicBool,
    faults: Arc<FaultQueue>,
    router: Router,
    page_size_mask: u64,
    input_range: (u64, u64),
    /// The config's nested table formats (wire numbers), for endpoints
    /// plugged later.
    nested_formats: Vec<u16>,
    /// Config-space `probe_size`: how many RESV_MEM properties a PROBE
    /// can carry.
    probe_size: u32,
    /// The `iommu` config the vIOMMU was built from, narrowed to what its
    /// backends can map: the one source the device reads its offer from.
    config: IommuConfig,
}

/// The config with `page_size_mask` and `input_range` narrowed to what
/// the backends of `endpoints` can do. A backend that leaves nothing (no
/// common page size, disjoint ranges) is logged and ignored for that
/// field: the device still works, and that backend's MAPs fail instead.
fn narrow_to_backends(cfg: &IommuConfig, endpoints: &[u32], router: &Router) -> IommuConfig {
    let mut out = cfg.clone();
    for &ep in endpoints {
        let Some(caps) = router.caps(ep) else {
            continue;
        };
        let mask = out.page_size_mask & caps.page_size_mask;
        // The granule must stay at least 4 KiB (the mapping table packs
        // flags into the low bits).
        if mask & !0xfff != 0 {
            out.page_size_mask = mask;
        } else {
            log::error!(
                "virtio-iommu: endpoint {ep}: backend page sizes {:#x} share none with {:#x}",
                caps.page_size_mask,
                out.page_size_mask
            );
        }
        let start = out.input_range.start.max(caps.input_range.0);
        let end = out.input_range.end.min(caps.input_range.1);
        if start < end {
            out.input_range.start = start;
            out.input_range.end = end;
        } else {
            log::error!(
                "virtio-iommu: endpoint {ep}: backend input range is disjoint from the config's"
            );
        }
    }
    out
}

/// Gives endpoint `ep` the IOVA holes of its host IOMMU as reserved
/// regions. A list too long for `probe_size` is still enforced (a MAP
/// there would fail in the host anyway) but PROBE cannot report all of
/// it: that is the VMM operator's to fix, so it is logged.
pub(crate) fn set_host_holes(st: &mut IommuState, ep: u32, holes: &[(u64, u64)], probe_size: u32) {
    if holes.is_empty() {
        return;
    }
    if let Err(e) = st.set_host_reserved(ep, holes) {
        // Only an attached endpoint can refuse, and endpoints get their
        // holes before they can attach.
        log::error!("virtio-iommu: host reserved regions of endpoint {ep}: {e}");
        return;
    }
    let n = st.endpoint_reserved_regions(ep).len();
    if n * crate::wire::RESV_MEM_PROPERTY_SIZE > probe_size as usize {
        log::error!(
            "virtio-iommu: endpoint {ep} has {n} reserved regions (the host's IOVA holes \
             included); probe_size {probe_size} reports only the first {}: raise probe_size",
            probe_size as usize / crate::wire::RESV_MEM_PROPERTY_SIZE
        );
    }
}

/// A domain's lock-free index and its writer's bookkeeping.
#[derive(Debug)]
struct DomainIndex {
    index: Arc<PageIndex>,
    writer: IndexWriter,
}

/// What applying a request did, beyond succeeding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// ATTACH, DETACH or MAP applied.
    Done,
    /// UNMAP applied; this many mappings were removed.
    Unmapped(usize),
}

impl Viommu {
    /// A vIOMMU for `endpoints` over guest RAM made of the inclusive ranges
    /// `ram`. Fails only if the fault eventfd cannot be created.
    pub fn new(cfg: &IommuConfig, endpoints: &[u32], ram: &[(u64, u64)]) -> std::io::Result<Self> {
        let faults = Arc::new(FaultQueue::new(cfg.limits.max_pending_faults as usize)?);
        Ok(Self::with_router(
            cfg,
            endpoints,
            ram,
            faults,
            Router::new(),
        ))
    }

    /// A vIOMMU whose endpoints are served by the backends of `router`
    /// (endpoints it does not name are translated in MAP mode by the
    /// state). `faults` is the queue backends that push faults themselves
    /// (the software IOMMU) share. Each endpoint advertises the config's
    /// table formats that its backend supports.
    pub fn with_router(
        cfg: &IommuConfig,
        endpoints: &[u32],
        ram: &[(u64, u64)],
        faults: Arc<FaultQueue>,
        router: Router,
    ) -> Self {
        let cfg = &narrow_to_backends(cfg, endpoints, &router);
        let mut state = IommuState::new(cfg, endpoints, ram);
        if let Some(nested) = &cfg.nested {
            for &ep in endpoints {
                let Some(caps) = router.caps(ep) else {
                    continue;
                };
                let formats = nested
                    .formats
                    .iter()
                    .map(|f| f.wire())
                    .filter(|f| caps.table_formats.contains(f))
                    .collect();
                state.set_endpoint_formats(ep, formats);
            }
        }
        for &ep in endpoints {
            if let Some(caps) = router.caps(ep) {
                set_host_holes(&mut state, ep, &caps.reserved_ranges, cfg.probe_size);
            }
        }
        Viommu {
            state: RwLock::new(state),
            generation: Padded(AtomicU64::new(0)),
            topology: Padded(AtomicU64::new(0)),
            indexes: Mutex::new(IdMap::default()),
            has_indexes: AtomicBool::new(false),
            faults,
            router,
            page_size_mask: cfg.page_size_mask,
            input_range: (cfg.input_range.start, cfg.input_range.end),
            nested_formats: cfg
                .nested
                .as_ref()
                .map(|n| n.formats.iter().map(|f| f.wire()).collect())
                .unwrap_or_default(),
            probe_size: cfg.probe_size,
            config: cfg.clone(),
        }
    }

    /// The `iommu` config this vIOMMU was built from, with `page_size_mask`
    /// and `input_range` narrowed to what its backends can map.
    pub fn config(&self) -> &IommuConfig {
        &self.config
    }

    /// Adds the VMM's own reserved regions for endpoint `ep` (the VM
    /// config's `devices[i].reserved_regions`) to the device-wide ones;
    /// an empty list drops them. PROBE reports them for `ep` alone, and a
    /// MAP over one is refused (RANGE) in every domain `ep` is in.
    /// Refused, with nothing changed, when a region is inverted, two of
    /// the endpoint's regions overlap or are both MSI, the endpoint's
    /// domain already maps IOVAs in one, or they do not fit in
    /// `probe_size` beside the others. Call it before the driver probes
    /// the endpoint: a driver learns reserved regions once.
    pub fn set_endpoint_reserved_regions(
        &self,
        ep: u32,
        regions: &[ReservedRegion],
    ) -> Result<(), ReservedRegionError> {
        let mut st = self.state_mut();
        let before = st.endpoint_extra_reserved(ep).to_vec();
        st.set_endpoint_reserved(ep, regions)?;
        let n = st.endpoint_reserved_regions(ep).len();
        if n * crate::wire::RESV_MEM_PROPERTY_SIZE > self.probe_size as usize {
            // Undo: the list before was accepted with the same holes and
            // mappings (the state lock is held), so this cannot fail.
            let _ = st.set_endpoint_reserved(ep, &before);
            return Err(ReservedRegionError::ProbeSize {
                endpoint: ep,
                regions: n,
                probe_size: self.probe_size,
            });
        }
        Ok(())
    }

    /// The reserved regions PROBE reports for endpoint `ep`: the
    /// device-wide ones, the VMM's for it and its host's IOVA holes.
    pub fn endpoint_reserved_regions(&self, ep: u32) -> Vec<ReservedRegion> {
        self.state().endpoint_reserved_regions(ep).to_vec()
    }

    /// The page sizes the device offers: the config's, narrowed to what
    /// every backend can map, so the guest never asks for what the host
    /// cannot do.
    pub fn page_size_mask(&self) -> u64 {
        self.page_size_mask
    }

    /// The input range the device offers, narrowed like
    /// [`Self::page_size_mask`].
    pub fn input_range(&self) -> (u64, u64) {
        self.input_range
    }

    /// Read access to the state model.
    pub fn state(&self) -> RwLockReadGuard<'_, IommuState> {
        // The state is only mutated through methods that keep it valid even
        // if a panic unwinds mid-way, so a poisoned lock is still usable.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn state_mut(&self) -> RwLockWriteGuard<'_, IommuState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The current translation generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current topology generation (see the field).
    pub(crate) fn topology(&self) -> u64 {
        self.topology.load(Ordering::Acquire)
    }

    /// Something other than an UNMAP may have revoked access: every
    /// translator drops its cache and resolves its endpoint again, and
    /// every index is dropped (they are rebuilt from the state on need).
    fn bump(&self) {
        self.drop_indexes();
        // Topology first: a reader that loads the new generation then sees
        // the new topology too, so a `DmaMemory` that filled an entry
        // through a stale index notices before it caches it.
        self.topology.fetch_add(1, Ordering::Release);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn drop_indexes(&self) {
        if self.has_indexes.load(Ordering::Acquire) {
            let mut ix = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
            ix.clear();
            self.has_indexes.store(false, Ordering::Release);
        }
    }

    /// Runs `f` on `domain`'s index if it has one; an index `f` fails on
    /// is dropped, and translators resolve again (to the locked path).
    fn with_index(&self, domain: u32, f: impl FnOnce(&PageIndex, &mut IndexWriter) -> bool) {
        if !self.has_indexes.load(Ordering::Acquire) {
            return;
        }
        let mut ix = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(d)) = ix.get_mut(&domain) {
            if !f(&d.index, &mut d.writer) {
                ix.insert(domain, None);
                self.topology.fetch_add(1, Ordering::Release);
            }
        }
    }

    /// The lock-free index of the MAP-mode domain `ep` is attached to,
    /// built now if no translator asked before; `None` when `ep` is not
    /// in such a domain (unattached, bypass, nested) or its index would
    /// be too big: its translations then take the state's read lock.
    /// Call with the topology loaded before: a change after it makes the
    /// caller ask again.
    pub(crate) fn translation_index(&self, ep: u32) -> Option<Arc<PageIndex>> {
        // The read lock keeps MAP and UNMAP out while the index is built,
        // so that it starts equal to the state and follows it after.
        let st = self.state();
        let dom = st.endpoint(ep)?.domain?;
        if st.is_bypass_domain(dom) != Some(false) || st.domain_table(dom).is_some() {
            return None;
        }
        let mut ix = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = ix.get(&dom) {
            return d.as_ref().map(|d| Arc::clone(&d.index));
        }
        let built = PageIndex::build(self.input_range.1, st.mappings(dom).into_iter())
            .ok()
            .map(|(index, writer)| DomainIndex {
                index: Arc::new(index),
                writer,
            });
        let out = built.as_ref().map(|d| Arc::clone(&d.index));
        ix.insert(dom, built);
        self.has_indexes.store(true, Ordering::Release);
        out
    }

    /// Applies ATTACH, DETACH, MAP, UNMAP or ATTACH_TABLE, first to the
    /// state, then to the backends serving the endpoints involved. A backend
    /// failure undoes what earlier backends did and restores the state, so
    /// the request never happened. PROBE, INVALIDATE and PAGE_RESP have
    /// their own entry points. On return, every access the request revoked
    /// is refused by every translator.
    pub fn apply(&self, req: &Request) -> Result<Applied, RequestError> {
        // The match of `RequestRun::apply_held`, with the guard a local:
        // through a run, one request at a time measured 6 ns slower.
        let mut st = self.state_mut();
        let res = match req {
            Request::Attach(r) => self.attach(&mut st, r),
            Request::Detach(r) => self.detach(&mut st, r),
            Request::Map(r) => self.map(&mut st, r),
            Request::Unmap(r) => self.unmap(&mut st, r),
            Request::AttachTable(r) => self.attach_table(&mut st, r),
            Request::Probe(r) => st.probe(r).map(|_| Applied::Done),
            Request::Invalidate(r) => {
                let inv = st.invalidation(r)?;
                drop(st);
                self.invalidate(r.domain, &mut vec![inv])?;
                Ok(Applied::Done)
            }
            Request::PageResp(r) => {
                drop(st);
                self.page_response(r)?;
                Ok(Applied::Done)
            }
        };
        res
    }

    /// A run of requests applied under one hold of the state's write lock
    /// (see [`RequestRun`]).
    pub fn run(&self) -> RequestRun<'_> {
        RequestRun {
            viommu: self,
            st: None,
            hold: true,
        }
    }

    fn attach(&self, st: &mut IommuState, r: &AttachReq) -> Result<Applied, RequestError> {
        let Some(b) = self.router.backend(r.endpoint) else {
            if st.attach(r)? {
                self.bump();
            }
            return Ok(Applied::Done);
        };
        let old = st.endpoint(r.endpoint).and_then(|e| e.domain);
        let snap = st.snapshot(&[r.domain, old.unwrap_or(r.domain)], r.endpoint);
        let old_table = old.and_then(|d| st.domain_table(d).copied());
        if !st.attach(r)? {
            return Ok(Applied::Done);
        }
        self.bump();
        let res = self
            .leave(b.as_ref(), r.endpoint, old, old_table)
            .and_then(|()| {
                let mappings = st.mappings(r.domain);
                let view = DomainView {
                    id: r.domain,
                    bypass: st.is_bypass_domain(r.domain) == Some(true),
                    mappings: &mappings,
                    table: None,
                };
                self.router.count_call();
                b.attach(r.endpoint, &view).inspect_err(|_| {
                    // The endpoint left its old domain: take it back there.
                    self.rejoin(b.as_ref(), st, r.endpoint, old, old_table, snap.clone());
                })
            });
        self.fail_with(st, b.as_ref(), res, snap)
    }

    fn attach_table(
        &self,
        st: &mut IommuState,
        r: &AttachTableReq,
    ) -> Result<Applied, RequestError> {
        // The state refuses a format the endpoint does not advertise, and an
        // endpoint without a backend advertises none.
        let old = st.endpoint(r.endpoint).and_then(|e| e.domain);
        let snap = st.snapshot(&[r.domain, old.unwrap_or(r.domain)], r.endpoint);
        let old_table = old.and_then(|d| st.domain_table(d).copied());
        let (table, outcome) = st.attach_table(r)?;
        if !outcome.changed {
            return Ok(Applied::Done);
        }
        self.bump();
        let Some(b) = self.router.backend(r.endpoint) else {
            return Ok(Applied::Done);
        };
        let res = self
            .leave(b.as_ref(), r.endpoint, old, old_table)
            .and_then(|()| {
                self.router.count_call();
                b.bind_table(
                    r.endpoint,
                    &TableBinding {
                        domain: r.domain,
                        table,
                    },
                )
                .inspect_err(|_| {
                    self.rejoin(b.as_ref(), st, r.endpoint, old, old_table, snap.clone());
                })
            });
        self.fail_with(st, b.as_ref(), res, snap)
    }

    fn detach(&self, st: &mut IommuState, r: &DetachReq) -> Result<Applied, RequestError> {
        let table = st.domain_table(r.domain).copied();
        let snap = self
            .router
            .backend(r.endpoint)
            .map(|_| st.snapshot(&[r.domain], r.endpoint));
        st.detach(r)?;
        self.bump();
        if let (Some(b), Some(snap)) = (self.router.backend(r.endpoint), snap) {
            let res = self.leave(b.as_ref(), r.endpoint, Some(r.domain), table);
            self.fail_with(st, b.as_ref(), res, snap)?;
            // Unattached now: where the guest asked for bypass, the
            // backend must open guest-physical DMA (spec 5.13.6, "An
            // endpoint is in bypass mode if").
            if st.unattached_bypass() {
                self.tell_unattached(b.as_ref(), r.endpoint, true);
            }
        }
        Ok(Applied::Done)
    }

    /// Tells `b` whether unattached `ep` bypasses; a failure is logged and
    /// counted (when opening bypass fails the endpoint stays blocked, the
    /// safe side; when blocking fails it is the backend's broken host).
    fn tell_unattached(&self, b: &dyn IommuBackend, ep: u32, bypass: bool) -> bool {
        self.router.count_call();
        match b.set_unattached_bypass(ep, bypass) {
            Ok(()) => true,
            Err(e) => {
                self.router
                    .stats
                    .backend_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                log::error!(
                    "virtio-iommu: backend {} could not {} unattached endpoint {ep}: {e}",
                    b.name(),
                    if bypass { "open bypass for" } else { "block" }
                );
                false
            }
        }
    }

    /// Tells every backend about its endpoints attached to no domain.
    fn tell_all_unattached(&self, st: &IommuState, bypass: bool) {
        if self.router.is_empty() {
            return;
        }
        let eps: Vec<u32> = st
            .endpoint_ids()
            .filter(|&ep| st.endpoint(ep).is_some_and(|e| e.domain.is_none()))
            .collect();
        for ep in eps {
            if let Some(b) = self.router.backend(ep) {
                self.tell_unattached(b.as_ref(), ep, bypass);
            }
        }
    }

    /// Tells `b` that `ep` leaves `dom` (nothing if it was in none).
    fn leave(
        &self,
        b: &dyn IommuBackend,
        ep: u32,
        dom: Option<u32>,
        table: Option<TableDesc>,
    ) -> Result<(), BackendError> {
        let Some(dom) = dom else { return Ok(()) };
        self.router.count_call();
        if table.is_some() {
            b.unbind_table(ep, dom)
        } else {
            b.detach(ep, dom)
        }
    }

    /// Undo of a failed join: restores the state and puts `ep` back into
    /// the domain it left. Best effort: a backend that cannot even go back
    /// is logged; the state is restored regardless.
    fn rejoin(
        &self,
        b: &dyn IommuBackend,
        st: &mut IommuState,
        ep: u32,
        old: Option<u32>,
        old_table: Option<TableDesc>,
        snap: StateSnapshot,
    ) {
        st.restore(snap);
        let Some(old) = old else { return };
        self.router.count_call();
        let res = match old_table {
            Some(table) => b.bind_table(ep, &TableBinding { domain: old, table }),
            None => {
                let mappings = st.mappings(old);
                b.attach(
                    ep,
                    &DomainView {
                        id: old,
                        bypass: st.is_bypass_domain(old) == Some(true),
                        mappings: &mappings,
                        table: None,
                    },
                )
            }
        };
        if let Err(e) = res {
            log::error!(
                "virtio-iommu: backend {} cannot restore endpoint {ep}: {e}",
                b.name()
            );
        }
    }

    /// Turns a backend result into the request's result, restoring the
    /// state on failure.
    fn fail_with(
        &self,
        st: &mut IommuState,
        b: &dyn IommuBackend,
        res: Result<(), BackendError>,
        snap: StateSnapshot,
    ) -> Result<Applied, RequestError> {
        match res {
            Ok(()) => Ok(Applied::Done),
            Err(e) => {
                st.restore(snap);
                self.bump();
                self.router.stats.rollbacks.fetch_add(1, Ordering::Relaxed);
                Err(backend_error(b, &e))
            }
        }
    }

    fn map(&self, st: &mut IommuState, r: &MapReq) -> Result<Applied, RequestError> {
        st.map(r)?;
        let m = Mapping {
            start: r.virt_start,
            end: r.virt_end,
            phys: r.phys_start,
            flags: r.flags,
        };
        if self.router.is_empty() {
            self.with_index(r.domain, |ix, w| ix.map(w, &m).is_ok());
            return Ok(Applied::Done);
        }
        let backends = self.router.backends_of(st.domain_endpoints(r.domain));
        for (i, b) in backends.iter().enumerate() {
            self.router.count_call();
            if let Err(e) = b.map(r.domain, &m) {
                for done in &backends[..i] {
                    if let Err(e) = done.unmap(r.domain, &[m]) {
                        log::error!("virtio-iommu: backend {} cannot undo MAP: {e}", done.name());
                    }
                }
                // The range was free before the MAP, so this removes exactly it.
                let undo = UnmapReq {
                    domain: r.domain,
                    virt_start: r.virt_start,
                    virt_end: r.virt_end,
                    reserved: [0; 4],
                };
                let _ = st.unmap(&undo);
                self.router.stats.rollbacks.fetch_add(1, Ordering::Relaxed);
                return Err(backend_error(b.as_ref(), &e));
            }
        }
        self.with_index(r.domain, |ix, w| ix.map(w, &m).is_ok());
        Ok(Applied::Done)
    }

    fn unmap(&self, st: &mut IommuState, r: &UnmapReq) -> Result<Applied, RequestError> {
        let n = st.unmap(r)?;
        if n == 0 {
            return Ok(Applied::Unmapped(0));
        }
        if self.router.is_empty() {
            self.unindex(r.domain, st.last_removed());
            self.revoked();
            return Ok(Applied::Unmapped(n));
        }
        let removed = st.last_removed().to_vec();
        let backends = self.router.backends_of(st.domain_endpoints(r.domain));
        for (i, b) in backends.iter().enumerate() {
            self.router.count_call();
            if let Err(e) = b.unmap(r.domain, &removed) {
                for done in &backends[..i] {
                    for m in &removed {
                        if let Err(e) = done.map(r.domain, m) {
                            log::error!(
                                "virtio-iommu: backend {} cannot undo UNMAP: {e}",
                                done.name()
                            );
                        }
                    }
                }
                for m in &removed {
                    // The ranges were just freed; putting them back succeeds.
                    let _ = st.map(&MapReq {
                        domain: r.domain,
                        virt_start: m.start,
                        virt_end: m.end,
                        phys_start: m.phys,
                        flags: m.flags,
                    });
                }
                self.router.stats.rollbacks.fetch_add(1, Ordering::Relaxed);
                return Err(backend_error(b.as_ref(), &e));
            }
        }
        self.unindex(r.domain, &removed);
        self.revoked();
        Ok(Applied::Unmapped(n))
    }

    /// Only this domain's mappings went: translators through an index
    /// follow the index's own generation, others this one. Moved after the
    /// index lost them (and still under the state's write lock, before the
    /// status is written), so that a cache filled from the index under the
    /// old generation dies and one filled under the new one saw them gone.
    fn revoked(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Takes the mappings an UNMAP removed out of the domain's index
    /// before the request's status is written.
    fn unindex(&self, domain: u32, removed: &[Mapping]) {
        self.with_index(domain, |ix, w| {
            removed.iter().all(|m| ix.unmap(w, m).is_ok())
        });
    }

    /// Applies one notification's invalidations of `domain`: coalesces
    /// them and makes one `invalidate()` call per backend serving the
    /// domain. Returns once every backend has applied them.
    pub fn invalidate(
        &self,
        domain: u32,
        batch: &mut Vec<Invalidation>,
    ) -> Result<(), RequestError> {
        self.router
            .stats
            .invalidations
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        coalesce(batch, WIDEN_THRESHOLD_PAGES);
        // The read lock keeps the domain's endpoint set stable while the
        // backends work; translations go on meanwhile.
        let st = self.state();
        let backends = self.router.backends_of(st.domain_endpoints(domain));
        let mut first_err = None;
        for b in backends {
            self.router
                .stats
                .invalidate_calls
                .fetch_add(1, Ordering::Relaxed);
            self.router
                .stats
                .invalidations_sent
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            // Every backend gets the batch even if one fails: forgetting too
            // much is harmless, forgetting too little is not.
            if let Err(e) = b.invalidate(domain, batch) {
                first_err.get_or_insert_with(|| backend_error(b.as_ref(), &e));
            }
        }
        self.bump();
        first_err.map_or(Ok(()), Err)
    }

    /// Passes a PAGE_RESP to the backend of its endpoint.
    pub fn page_response(&self, r: &PageRespReq) -> Result<(), RequestError> {
        self.state().check_page_resp(r)?;
        let Some(b) = self.router.backend(r.endpoint) else {
            return Err(RequestError::Backend {
                backend: "none".into(),
                message: format!("endpoint {} sent no page request", r.endpoint),
                status: crate::wire::Status::NoEnt,
            });
        };
        let resp = PageResponse {
            endpoint: r.endpoint,
            pasid: (r.flags & VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID != 0).then_some(r.pasid),
            grpid: r.grpid,
            code: r.code,
        };
        self.router.count_call();
        b.page_response(&resp)
            .map_err(|e| backend_error(b.as_ref(), &e))
    }

    /// The router (backends and their counters).
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Moves the faults the backends saw into the fault queue.
    pub fn collect_backend_faults(&self) {
        if self.router.is_empty() {
            return;
        }
        let mut out = Vec::new();
        for b in self.router.all() {
            b.drain_faults(&mut out);
        }
        for f in out {
            self.push_fault(f);
        }
    }

    /// Sets whether unattached endpoints bypass translation.
    pub fn set_unattached_bypass(&self, bypass: bool) {
        let mut st = self.state_mut();
        if st.unattached_bypass() != bypass {
            st.set_unattached_bypass(bypass);
            self.bump();
            self.tell_all_unattached(&st, bypass);
        }
    }

    /// Records the features the driver accepted.
    pub fn set_acked_features(&self, acked: u64) {
        self.state_mut().set_acked_features(acked);
    }

    /// Device reset: every endpoint detached, every domain gone, pending
    /// faults dropped.
    pub fn reset(&self) {
        let mut st = self.state_mut();
        if !self.router.is_empty() {
            let mut attached: Vec<(u32, u32)> = st.attachments().collect();
            attached.sort_unstable();
            for (ep, dom) in attached {
                if let Some(b) = self.router.backend(ep) {
                    let table = st.domain_table(dom).copied();
                    if let Err(e) = self.leave(b.as_ref(), ep, Some(dom), table) {
                        // Fail safe: the state is about to say the endpoint
                        // has no mappings, so its host DMA must stop too.
                        self.router
                            .stats
                            .backend_failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        log::error!(
                            "virtio-iommu: backend {} reset of endpoint {ep}: {e}; blocking it",
                            b.name()
                        );
                        self.tell_unattached(b.as_ref(), ep, false);
                    }
                }
            }
        }
        st.reset();
        self.bump();
        // Every endpoint is unattached now: where bypass stays on, the
        // backends open it again for those that were attached.
        if st.unattached_bypass() {
            self.tell_all_unattached(&st, true);
        }
        drop(st);
        self.faults.clear();
    }

    /// Translates one address (slow path: takes the state's read lock).
    pub fn translate(&self, ep: u32, iova: u64, access: u32) -> Result<Translation, FaultReason> {
        self.state().translate(ep, iova, access)
    }

    /// Queues a fault record for the driver. Faults of an endpoint this
    /// vIOMMU does not manage are not queued: spec 5.13.6.8.2 "The device
    /// SHOULD write a valid endpoint ID in endpoint". While the queue is
    /// full every fault is counted as dropped ([`FaultQueue::dropped`]),
    /// without a look at its endpoint.
    pub fn report_fault(&self, ep: u32, iova: u64, access: u32, reason: FaultReason) {
        self.report_fault_in(0, ep, iova, access, reason);
    }

    /// [`Self::report_fault`] for a reporter that counts its drops on
    /// `shard` (from [`FaultQueue::drop_shard`]).
    pub(crate) fn report_fault_in(
        &self,
        shard: usize,
        ep: u32,
        iova: u64,
        access: u32,
        reason: FaultReason,
    ) {
        // A full queue drops the record whatever it says: counted without
        // the state's lock, which the request path and the locked
        // translations wait on, so that a storm of faults does not slow
        // them, and on the reporter's own counter, so that two threads'
        // storms do not slow each other.
        if self.faults.is_full() {
            self.faults.count_drop(shard);
            return;
        }
        if self.state().endpoint(ep).is_none() {
            log::debug!("virtio-iommu: fault of unmanaged endpoint {ep} at {iova:#x} not reported");
            return;
        }
        let mut flags = VIRTIO_IOMMU_FAULT_F_ADDRESS;
        if access & ACCESS_READ != 0 {
            flags |= VIRTIO_IOMMU_FAULT_F_READ;
        }
        if access & ACCESS_WRITE != 0 {
            flags |= VIRTIO_IOMMU_FAULT_F_WRITE;
        }
        let reason = match reason {
            FaultReason::Unknown => VIRTIO_IOMMU_FAULT_R_UNKNOWN,
            FaultReason::Domain => VIRTIO_IOMMU_FAULT_R_DOMAIN,
            FaultReason::Mapping => VIRTIO_IOMMU_FAULT_R_MAPPING,
        };
        self.faults.push_in(
            shard,
            ExtFaultRecord {
                reason,
                flt_type: VIRTIO_IOMMU_FLT_DMA_UNRECOV,
                flags,
                endpoint: ep,
                address: iova,
                ..Default::default()
            },
        );
    }

    /// Queues a fault or page request a backend reported.
    pub fn push_fault(&self, f: BackendFault) {
        let mut flags = f.access_flags | VIRTIO_IOMMU_FAULT_F_ADDRESS;
        if f.pasid.is_some() {
            flags |= VIRTIO_IOMMU_FAULT_F_PASID;
        }
        let (flt_type, pr_evt_flags, grpid) = match f.page_request {
            Some(g) if f.last_page => (VIRTIO_IOMMU_FLT_PAGE_REQ, VIRTIO_IOMMU_PR_F_LAST_PAGE, g),
            Some(g) => (VIRTIO_IOMMU_FLT_PAGE_REQ, 0, g),
            None => (VIRTIO_IOMMU_FLT_DMA_UNRECOV, 0, 0),
        };
        self.faults.push(ExtFaultRecord {
            reason: f.reason,
            flt_type,
            flags,
            pr_evt_flags,
            endpoint: f.endpoint,
            pasid: f.pasid.unwrap_or(0),
            grpid,
            address: f.address,
        });
    }

    /// The fault queue.
    pub fn faults(&self) -> &FaultQueue {
        &self.faults
    }

    /// The fault queue, shared (for backends that push faults directly).
    pub fn fault_queue(&self) -> Arc<FaultQueue> {
        Arc::clone(&self.faults)
    }

    /// A fast translator with its own IOTLB for endpoint `ep`, for one
    /// emulated device thread.
    pub fn translator(self: &Arc<Self>, ep: u32) -> Translator {
        Translator::new(Arc::clone(self), ep)
    }

    /// Guest memory `mem` as endpoint `ep` sees it through this vIOMMU, with
    /// an IOTLB of its own: the fast path for one emulated device thread,
    /// usable wherever vm-memory and virtio-queue take a
    /// [`vm_memory::GuestMemory`].
    pub fn dma_memory<M: vm_memory::GuestMemoryBackend>(
        self: &Arc<Self>,
        ep: u32,
        mem: M,
    ) -> DmaMemory<M> {
        DmaMemory::new(Arc::clone(self), ep, mem)
    }

    /// A vm-memory [`vm_memory::Iommu`] for endpoint `ep`, to wrap guest
    /// memory in an `IommuMemory` for an emulated device.
    pub fn endpoint_iommu(self: &Arc<Self>, ep: u32) -> EndpointIommu {
        EndpointIommu::new(Arc::clone(self), ep)
    }
}

/// Requests applied one after another under one hold of the state's write
/// lock, as a request-queue pass applies them: taking and releasing the
/// lock (two locked instructions) cost a tenth of a MAP+UNMAP pair.
///
/// The lock is taken by the first request that needs it and held until
/// [`RequestRun::pause`] or the run is dropped. INVALIDATE and PAGE_RESP,
/// which take the lock their own way, release it first. Every request's
/// effects are complete when [`RequestRun::apply`] returns, exactly as with
/// [`Viommu::apply`]: an UNMAP's mappings are out of every index and the
/// translation generation has moved. Pause before anything else on this
/// thread takes the lock (the state read guard of [`Viommu::state`], the
/// invalidation path): the lock is not reentrant.
pub struct RequestRun<'a> {
    viommu: &'a Viommu,
    st: Option<RwLockWriteGuard<'a, IommuState>>,
    /// Whether the lock stays held from one request to the next.
    hold: bool,
}

impl<'a> RequestRun<'a> {
    /// The same run, releasing the lock at the end of every request, for a
    /// caller that may take it between requests (a request queue read
    /// through a translating memory of this vIOMMU: its misses take the
    /// read lock).
    pub fn one_at_a_time(self) -> Self {
        RequestRun {
            hold: false,
            ..self
        }
    }

    /// Applies `req` as [`Viommu::apply`] does.
    pub fn apply(&mut self, req: &Request) -> Result<Applied, RequestError> {
        let res = self.apply_held(req);
        if !self.hold {
            self.pause();
        }
        res
    }

    fn apply_held(&mut self, req: &Request) -> Result<Applied, RequestError> {
        let v = self.viommu;
        match req {
            Request::Attach(r) => v.attach(self.lock(), r),
            Request::Detach(r) => v.detach(self.lock(), r),
            Request::Map(r) => v.map(self.lock(), r),
            Request::Unmap(r) => v.unmap(self.lock(), r),
            Request::AttachTable(r) => v.attach_table(self.lock(), r),
            Request::Probe(r) => self.lock().probe(r).map(|_| Applied::Done),
            Request::Invalidate(r) => {
                self.pause();
                let inv = v.state().invalidation(r)?;
                v.invalidate(r.domain, &mut vec![inv])?;
                Ok(Applied::Done)
            }
            Request::PageResp(r) => {
                self.pause();
                v.page_response(r)?;
                Ok(Applied::Done)
            }
        }
    }

    /// Releases the state's write lock until the next request that needs it.
    pub fn pause(&mut self) {
        self.st = None;
    }

    /// The state, for hints ahead of the next request (the lock is the
    /// run's, taken here if it is not held yet).
    pub(crate) fn state_mut(&mut self) -> &mut IommuState {
        self.lock()
    }

    fn lock(&mut self) -> &mut IommuState {
        let v = self.viommu;
        self.st.get_or_insert_with(|| v.state_mut())
    }
}

#[cfg(test)]
mod run_tests {
    use super::*;
    use crate::wire::{
        AttachReq, InvalidateReq, MapReq, PageRespReq, UnmapReq, VIRTIO_IOMMU_F_MAP_UNMAP,
    };

    fn viommu() -> Viommu {
        let v = Viommu::new(&IommuConfig::default(), &[8], &[(0, 0xff_ffff)]).unwrap();
        v.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
        v
    }

    fn map(iova: u64) -> Request {
        Request::Map(MapReq {
            domain: 1,
            virt_start: iova,
            virt_end: iova + 0xfff,
            phys_start: 0x20_0000,
            flags: ACCESS_READ,
        })
    }

    /// A run holds the state's lock from its first request to its pause,
    /// and each request's effects are complete when its `apply` returns:
    /// an UNMAP moved the generation before the next request of the run.
    #[test]
    fn a_run_holds_the_lock_across_requests_and_completes_each_one() {
        let v = viommu();
        let mut run = v.run();
        assert!(v.state.try_read().is_ok(), "no request yet, no lock");
        let attach = Request::Attach(AttachReq {
            domain: 1,
            endpoint: 8,
            ..Default::default()
        });
        assert_eq!(run.apply(&attach), Ok(Applied::Done));
        assert_eq!(run.apply(&map(0x1000_0000)), Ok(Applied::Done));
        assert!(v.state.try_read().is_err(), "held between requests");
        let before = v.generation();
        let unmap = Request::Unmap(UnmapReq {
            domain: 1,
            virt_start: 0x1000_0000,
            virt_end: 0x1000_0fff,
            ..Default::default()
        });
        assert_eq!(run.apply(&unmap), Ok(Applied::Unmapped(1)));
        assert!(v.generation() > before, "revoked before the next request");
        // A refused request inside a run is refused as by `apply`.
        assert_eq!(
            run.apply(&map(0x1000_0001)).map_err(|e| e.status()),
            Err(crate::wire::Status::Range)
        );
        run.pause();
        assert!(v.state.try_read().is_ok(), "pause releases");
        assert_eq!(
            v.translate(8, 0x1000_0000, ACCESS_READ),
            Err(FaultReason::Mapping)
        );
        assert_eq!(run.apply(&map(0x2000_0000)), Ok(Applied::Done));
        drop(run);
        assert!(v.state.try_write().is_ok(), "dropping releases");
        assert!(v.translate(8, 0x2000_0000, ACCESS_READ).is_ok());
    }

    /// A run for a caller that takes the lock between requests holds it
    /// only inside each `apply`.
    #[test]
    fn a_one_at_a_time_run_releases_the_lock_after_every_request() {
        let v = viommu();
        let mut run = v.run().one_at_a_time();
        let attach = Request::Attach(AttachReq {
            domain: 1,
            endpoint: 8,
            ..Default::default()
        });
        assert_eq!(run.apply(&attach), Ok(Applied::Done));
        assert!(v.state.try_write().is_ok());
        assert_eq!(run.apply(&map(0x1000_0000)), Ok(Applied::Done));
        assert!(v.translate(8, 0x1000_0000, ACCESS_READ).is_ok());
        assert!(run.apply(&map(0x1000_0001)).is_err());
        assert!(v.state.try_write().is_ok(), "released after a refusal too");
    }

    /// INVALIDATE and PAGE_RESP take the lock their own way: inside a run
    /// that holds it they release it first (the lock is not reentrant, so
    /// without that this test would never return).
    #[test]
    fn invalidate_and_page_resp_in_a_run_release_the_lock_first() {
        let v = viommu();
        let mut run = v.run();
        let attach = Request::Attach(AttachReq {
            domain: 1,
            endpoint: 8,
            ..Default::default()
        });
        assert_eq!(run.apply(&attach), Ok(Applied::Done));
        let inv = Request::Invalidate(InvalidateReq {
            domain: 1,
            ..Default::default()
        });
        assert!(run.apply(&inv).is_err(), "no table domain: refused");
        assert!(v.state.try_write().is_ok());
        assert_eq!(run.apply(&map(0x1000_0000)), Ok(Applied::Done));
        let resp = Request::PageResp(PageRespReq {
            endpoint: 8,
            ..Default::default()
        });
        assert!(run.apply(&resp).is_err(), "no page request: refused");
        assert!(v.state.try_write().is_ok());
    }
}
