//! The software nested IOMMU: emulated devices translate (endpoint, PASID,
//! IOVA) through the guest's own stage-1 tables, cached the way hardware
//! caches them.
//!
//! Three caches, each tagged by (domain, PASID) like VT-d's DID/PASID and
//! SMMUv3's ASID tags:
//! - the **PASID cache** holds the decoded PASID entry / CD (the regime);
//! - the **paging-structure cache** holds where a walk resumes for a VA
//!   prefix (non-leaf entries);
//! - the **IOTLB** holds leaf translations.
//!
//! A cached entry stays in use after the guest edits its tables, until the
//! matching INVALIDATE arrives — exactly the behaviour a guest driver must
//! be written for on real hardware (and what the tests show both ways). A
//! leaf-only range invalidation keeps the paging-structure cache; a
//! PASID-cache invalidation makes the next access re-read the entry.
//! Eviction (the caches are bounded) only ever makes an entry fresher.
//!
//! Faults go straight into the vIOMMU's fault queue; with page requests
//! negotiated, a not-present fault of a page-request-capable endpoint
//! becomes a page request and the access waits (or the caller retries)
//! until PAGE_RESP.

use std::collections::{HashMap, HashSet};

mod cache;
use cache::{DirectMapped, Key};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::Duration;

use vm_memory::iommu::{Error as IommuError, Iommu, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::backend::{
    BackendCaps, BackendError, BackendFault, DomainId, DomainView, EndpointId, IommuBackend,
    PageResponse, RamChange, SavedPageRequest, SavedPageRequestState, SavedPageRequests,
    TableBinding,
};
use crate::fault::FaultQueue;
use crate::invalidation::{Caches, Invalidation, Scope, VaRange};
use crate::mapping::Mapping;
use crate::nested::{self, Access, Leaf, Stage1, TableMemory, WalkFault, WalkStart};
use crate::wire::{
    ExtFaultRecord, TableDesc, VIRTIO_IOMMU_FAULT_F_ADDRESS, VIRTIO_IOMMU_FAULT_F_EXEC,
    VIRTIO_IOMMU_FAULT_F_PASID, VIRTIO_IOMMU_FAULT_F_PRIV, VIRTIO_IOMMU_FAULT_F_READ,
    VIRTIO_IOMMU_FAULT_F_WRITE, VIRTIO_IOMMU_FLT_DMA_UNRECOV, VIRTIO_IOMMU_FLT_PAGE_REQ,
    VIRTIO_IOMMU_PAGE_RESP_SUCCESS, VIRTIO_IOMMU_PGTF_ARM_LPAE, VIRTIO_IOMMU_PGTF_X86_64,
    VIRTIO_IOMMU_PR_F_LAST_PAGE, VIRTIO_IOMMU_PSTF_ARM_SMMU_V3, VIRTIO_IOMMU_PSTF_INTEL_VTD,
};

/// IOTLB capacity (leaf entries).
pub const IOTLB_ENTRIES: usize = 4096;
/// Paging-structure cache capacity.
pub const PWC_ENTRIES: usize = 1024;
/// PASID-cache capacity.
pub const PASID_CACHE_ENTRIES: usize = 256;
/// Page requests outstanding at once over the whole IOMMU; past it a
/// not-present fault is unrecoverable, so a guest that never answers
/// cannot make us hold state without bound.
pub const MAX_PENDING_PAGE_REQUESTS: usize = 64;

/// The PASID key of traffic without a PASID in a format without PASIDs.
const NO_PASID: u32 = u32::MAX;
/// Page-request group IDs are 9 bits (PCIe PRG index).
const GRPID_MASK: u32 = 0x1ff;

/// What one (domain, PASID) resolves to.
#[derive(Clone, Copy, Debug)]
enum Regime {
    /// Walk these tables.
    Tables(Stage1),
    /// SMMUv3 S1DSS=bypass for traffic without a SubstreamID.
    Bypass,
}

/// A PASID-cache entry: the decoded PASID entry or CD.
#[derive(Clone, Copy, Debug)]
struct Context {
    regime: Regime,
}

type CtxKey = (DomainId, u32);

fn ctx_key(k: CtxKey) -> Key {
    Key {
        domain: k.0,
        pasid: k.1,
        shift: 0,
        index: 0,
    }
}

fn key(dom: DomainId, pasid: u32, shift: u8, index: u64) -> Key {
    Key {
        domain: dom,
        pasid,
        shift,
        index,
    }
}

struct Caches3 {
    pasid: DirectMapped<Context>,
    /// (domain, pasid, shift, va >> shift) → resume point.
    pwc: DirectMapped<WalkStart>,
    /// (domain, pasid, page_log2, va >> page_log2) → leaf.
    iotlb: DirectMapped<Leaf>,
    /// Bit n set: some IOTLB entry covers 2^n bytes (the sizes a lookup
    /// or a range invalidation probes).
    leaf_sizes: u64,
    /// Bit n set: some paging-structure entry covers 2^n bytes.
    table_shifts: u64,
    /// The table domain each bound endpoint is in: a handful of entries,
    /// kept under the same lock as the caches so a translation takes one.
    bindings: Vec<(EndpointId, TableBinding)>,
}

impl Caches3 {
    fn binding(&self, ep: EndpointId) -> Option<TableBinding> {
        self.bindings
            .iter()
            .find(|(e, _)| *e == ep)
            .map(|(_, b)| *b)
    }
}

impl Default for Caches3 {
    fn default() -> Self {
        Caches3 {
            pasid: DirectMapped::new(PASID_CACHE_ENTRIES),
            pwc: DirectMapped::new(PWC_ENTRIES),
            iotlb: DirectMapped::new(IOTLB_ENTRIES),
            leaf_sizes: 0,
            table_shifts: 0,
            bindings: Vec::new(),
        }
    }
}

/// The state of a page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRequestState {
    /// Waiting for PAGE_RESP.
    Pending,
    /// The guest answered SUCCESS: retry the access.
    Success,
    /// The guest answered INVALID or FAILURE: abort the access.
    Failed,
    /// No such group (answered long ago, or never sent).
    Unknown,
}

#[derive(Default)]
struct PageRequests {
    next_grpid: u32,
    /// (endpoint, pasid key, group) → answered?
    groups: HashMap<(EndpointId, u32, u32), PageRequestState>,
}

/// A plain copy of [`EmulatedStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmulatedCounts {
    /// Translations answered from the IOTLB.
    pub iotlb_hits: u64,
    /// Walks done (IOTLB misses).
    pub walks: u64,
    /// Walks that resumed from the paging-structure cache.
    pub pwc_hits: u64,
    /// PASID entries / CDs read from guest memory.
    pub context_reads: u64,
    /// `invalidate` calls received.
    pub invalidate_calls: u64,
    /// Generic invalidations received in them.
    pub invalidations: u64,
    /// Faults reported.
    pub faults: u64,
    /// Page requests sent.
    pub page_requests: u64,
}

impl EmulatedStats {
    /// A plain copy of the counters.
    pub fn snapshot(&self) -> EmulatedCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EmulatedCounts {
            iotlb_hits: l(&self.iotlb_hits),
            walks: l(&self.walks),
            pwc_hits: l(&self.pwc_hits),
            context_reads: l(&self.context_reads),
            invalidate_calls: l(&self.invalidate_calls),
            invalidations: l(&self.invalidations),
            faults: l(&self.faults),
            page_requests: l(&self.page_requests),
        }
    }
}

/// Counters, for reports and benchmarks.
#[derive(Debug, Default)]
pub struct EmulatedStats {
    /// Translations answered from the IOTLB.
    pub iotlb_hits: AtomicU64,
    /// Walks done (IOTLB misses).
    pub walks: AtomicU64,
    /// Walks that resumed from the paging-structure cache.
    pub pwc_hits: AtomicU64,
    /// PASID entries / CDs read from guest memory.
    pub context_reads: AtomicU64,
    /// `invalidate` calls received.
    pub invalidate_calls: AtomicU64,
    /// Generic invalidations received in them.
    pub invalidations: AtomicU64,
    /// Faults reported.
    pub faults: AtomicU64,
    /// Page requests sent.
    pub page_requests: AtomicU64,
}

/// A successful nested translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NestedTranslation {
    /// Guest-physical address of the IOVA.
    pub gpa: u64,
    /// First IOVA of the page (or block) that contains it, in the caller's
    /// address space: an Arm top-byte tag of the IOVA is kept, so
    /// `iova - page_start` is the offset into the page.
    pub page_start: u64,
    /// Last IOVA of that page (same address space; `u64::MAX` for the last
    /// page of the space).
    pub page_last: u64,
    /// Whether the page is writable for this kind of access.
    pub writable: bool,
}

/// Why a nested translation did not produce an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NestedError {
    /// The endpoint is not in a table domain: translate it in MAP mode.
    #[error("endpoint {0} is not attached to a table domain")]
    NotNested(EndpointId),
    /// The access faulted; a fault record was queued.
    #[error("translation fault: {0}")]
    Fault(WalkFault),
    /// A page request was sent; retry after the group is answered.
    #[error("page request {grpid} pending")]
    PageRequest {
        /// The group to wait for.
        grpid: u32,
    },
}

/// The software nested IOMMU over guest memory `M`.
pub struct EmulatedIommu<M> {
    /// Where guest tables are read: replaced when guest RAM is plugged or
    /// unplugged ([`IommuBackend::add_ram`]). Taken after `caches` when
    /// both are held.
    mem: RwLock<M>,
    faults: Arc<FaultQueue>,
    caps: BackendCaps,
    page_request_endpoints: HashSet<EndpointId>,
    page_requests_on: AtomicBool,
    /// Bumped whenever any cache entry may have been dropped, so per-thread
    /// front caches ([`NestedTranslator`]) start over.
    generation: AtomicU64,
    caches: Mutex<Caches3>,
    prq: Mutex<PageRequests>,
    prq_answered: Condvar,
    /// Counters.
    pub stats: EmulatedStats,
}

impl<M> std::fmt::Debug for EmulatedIommu<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedIommu")
            .field("caps", &self.caps)
            .field("stats", &self.stats)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the caches consistent even if a panic
    // unwinds through it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Access flags of a fault record for `a`.
fn access_flags(a: Access) -> u32 {
    let mut f = if a.write {
        VIRTIO_IOMMU_FAULT_F_WRITE
    } else {
        VIRTIO_IOMMU_FAULT_F_READ
    };
    if a.exec {
        f |= VIRTIO_IOMMU_FAULT_F_EXEC;
    }
    if a.privileged {
        f |= VIRTIO_IOMMU_FAULT_F_PRIV;
    }
    f
}

impl<M: GuestMemory + Send + Sync> EmulatedIommu<M> {
    /// A software IOMMU walking tables in `mem`, reporting into `faults`
    /// (the vIOMMU's queue, [`crate::Viommu::fault_queue`]).
    /// `page_request_endpoints` may send page requests (PRI-capable).
    /// `pasid_bits` is the PASID width it supports.
    pub fn new(
        mem: M,
        faults: Arc<FaultQueue>,
        pasid_bits: u8,
        page_request_endpoints: &[EndpointId],
    ) -> Self {
        EmulatedIommu {
            mem: RwLock::new(mem),
            faults,
            caps: BackendCaps {
                page_size_mask: !0xfff,
                input_range: (0, u64::MAX),
                // What PROBE advertises is what the walkers accept.
                output_bits: nested::OUTPUT_BITS,
                pasid_bits,
                table_formats: vec![
                    VIRTIO_IOMMU_PGTF_ARM_LPAE,
                    VIRTIO_IOMMU_PSTF_ARM_SMMU_V3,
                    VIRTIO_IOMMU_PSTF_INTEL_VTD,
                    VIRTIO_IOMMU_PGTF_X86_64,
                ],
                page_requests: !page_request_endpoints.is_empty(),
                // Emulated DMA reaches guest memory through the walkers;
                // no host IOVA is off limits.
                reserved_ranges: Vec::new(),
            },
            page_request_endpoints: page_request_endpoints.iter().copied().collect(),
            page_requests_on: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            caches: Mutex::new(Caches3::default()),
            prq: Mutex::new(PageRequests::default()),
            prq_answered: Condvar::new(),
            stats: EmulatedStats::default(),
        }
    }

    /// The generation front caches compare against.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The guest memory tables are read from now.
    fn memory(&self) -> RwLockReadGuard<'_, M> {
        // Replacing the memory is one assignment: a poisoned lock still
        // holds a whole memory object.
        self.mem.read().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The table domain `ep` is bound to.
    pub fn binding(&self, ep: EndpointId) -> Option<TableBinding> {
        lock(&self.caches).binding(ep)
    }

    /// Translates one access of `ep` (with `pasid` if the access carries
    /// one). Faults are queued for the guest before this returns.
    pub fn translate(
        &self,
        ep: EndpointId,
        pasid: Option<u32>,
        va: u64,
        access: Access,
    ) -> Result<NestedTranslation, NestedError> {
        let mut c = lock(&self.caches);
        let binding = c.binding(ep).ok_or(NestedError::NotNested(ep))?;
        let res = self.lookup(&mut c, &binding, pasid, va, access);
        drop(c);
        res.map_err(|f| self.fault(ep, pasid, va, access, f))
    }

    fn lookup(
        &self,
        c: &mut Caches3,
        b: &TableBinding,
        pasid: Option<u32>,
        va: u64,
        access: Access,
    ) -> Result<NestedTranslation, WalkFault> {
        let dom = b.domain;
        if pasid.is_some() && !b.table.has_pasid() {
            return Err(WalkFault::new(nested::WalkFaultKind::UnsupportedConfig(
                nested::Unsupported::PasidOnDirectTable,
            )));
        }
        let key = pasid_key(&b.table, pasid);
        let ctx = match c.pasid.get(&ctx_key((dom, key))) {
            Some(ctx) => *ctx,
            None => {
                self.stats.context_reads.fetch_add(1, Ordering::Relaxed);
                let regime = resolve_regime(&*self.memory(), &b.table, pasid)?;
                let ctx = Context { regime };
                c.pasid.insert(ctx_key((dom, key)), ctx);
                ctx
            }
        };
        let s1 = match ctx.regime {
            Regime::Bypass => {
                return Ok(NestedTranslation {
                    gpa: va,
                    page_start: va & !0xfff,
                    page_last: va | 0xfff,
                    writable: true,
                })
            }
            Regime::Tables(s1) => s1,
        };
        // The caller's address, tag included: the page bounds handed back
        // are in its address space, so that offsets computed from them
        // (NestedIommu) stay consistent with the address it asked for.
        let asked = va;
        let va = s1.untag(va);
        // IOTLB: one probe per leaf size cached under this context.
        let mut sizes = c.leaf_sizes;
        while sizes != 0 {
            let log2 = sizes.trailing_zeros() as u8;
            sizes &= sizes - 1;
            if let Some(leaf) = c.iotlb.get(&self::key(dom, key, log2, va >> log2)) {
                let leaf = *leaf;
                self.stats.iotlb_hits.fetch_add(1, Ordering::Relaxed);
                s1.check(&leaf, access)?;
                return Ok(self.done(&s1, &leaf, asked, va, access));
            }
        }
        // Paging-structure cache: resume from the deepest cached level.
        self.stats.walks.fetch_add(1, Ordering::Relaxed);
        let mut start = s1.root();
        let mut shifts = c.table_shifts;
        while shifts != 0 {
            let shift = shifts.trailing_zeros() as u8;
            shifts &= shifts - 1;
            if let Some(ws) = c.pwc.get(&self::key(dom, key, shift, va >> shift)) {
                start = *ws;
                self.stats.pwc_hits.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        let mut new_steps: [Option<(u8, u64, WalkStart)>; nested::MAX_WALK_READS] =
            [None; nested::MAX_WALK_READS];
        let mut n = 0;
        let res = s1.walk(&*self.memory(), va, start, &mut |step| {
            if n < new_steps.len() {
                new_steps[n] = Some((step.va_shift, step.va_prefix, step.next));
                n += 1;
            }
        });
        let mut table_shifts = 0u64;
        for (shift, prefix, next) in new_steps.iter().flatten().copied() {
            if shift < 64 {
                c.pwc.insert(self::key(dom, key, shift, prefix), next);
                table_shifts |= 1 << shift;
            }
        }
        let leaf = res?;
        // Only complete, permitted translations are cached, as hardware
        // does not cache faults.
        s1.check(&leaf, access)?;
        let log2 = leaf.page_log2.min(63);
        c.iotlb.insert(self::key(dom, key, log2, va >> log2), leaf);
        c.leaf_sizes |= 1 << log2;
        c.table_shifts |= table_shifts;
        Ok(self.done(&s1, &leaf, asked, va, access))
    }

    /// The translation of `asked` (the caller's address) whose untagged
    /// form `va` the walk (or IOTLB entry) `leaf` maps.
    fn done(
        &self,
        s1: &Stage1,
        leaf: &Leaf,
        asked: u64,
        va: u64,
        access: Access,
    ) -> NestedTranslation {
        // Offset into the page, from the untagged address the leaf is
        // expressed in; the tag only changes bits above any page (TBI
        // clears VA[63:56], pages are at most 2^42 bytes), so the page
        // bounds in the caller's space are `asked` minus that offset.
        let offset = va.wrapping_sub(leaf.va_base);
        let page_start = asked.wrapping_sub(offset);
        let page_last = page_start.saturating_add(leaf.page_size().wrapping_sub(1));
        // A write access was just checked; a read needs the write check.
        let writable = access.write
            || s1
                .check(
                    leaf,
                    Access {
                        write: true,
                        ..access
                    },
                )
                .is_ok();
        NestedTranslation {
            gpa: leaf.pa_base.wrapping_add(offset),
            page_start,
            page_last,
            writable,
        }
    }

    /// Queues the fault (or page request) for `f` and returns the error.
    fn fault(
        &self,
        ep: EndpointId,
        pasid: Option<u32>,
        va: u64,
        access: Access,
        f: WalkFault,
    ) -> NestedError {
        let pr = f.page_request_eligible()
            && self.page_requests_on.load(Ordering::Acquire)
            && self.page_request_endpoints.contains(&ep);
        if pr {
            let mut q = lock(&self.prq);
            let key = pasid.unwrap_or(NO_PASID);
            let pending = q
                .groups
                .values()
                .filter(|s| **s == PageRequestState::Pending)
                .count();
            // Answers a device model never collected are dropped once they
            // pile up, so the table stays bounded (a dropped answer reads
            // as Unknown: the access is aborted).
            if q.groups.len() >= 4 * MAX_PENDING_PAGE_REQUESTS {
                q.groups.retain(|_, s| *s == PageRequestState::Pending);
            }
            if pending < MAX_PENDING_PAGE_REQUESTS {
                let grpid = q.next_grpid;
                q.next_grpid = q.next_grpid.wrapping_add(1) & GRPID_MASK;
                if let std::collections::hash_map::Entry::Vacant(e) =
                    q.groups.entry((ep, key, grpid))
                {
                    e.insert(PageRequestState::Pending);
                    drop(q);
                    self.stats.page_requests.fetch_add(1, Ordering::Relaxed);
                    self.push(ep, pasid, va, access, f.virtio_reason(), Some(grpid));
                    return NestedError::PageRequest { grpid };
                }
            }
        }
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        self.push(ep, pasid, va, access, f.virtio_reason(), None);
        NestedError::Fault(f)
    }

    fn push(
        &self,
        ep: EndpointId,
        pasid: Option<u32>,
        va: u64,
        access: Access,
        reason: u8,
        page_request: Option<u32>,
    ) {
        let mut flags = access_flags(access) | VIRTIO_IOMMU_FAULT_F_ADDRESS;
        if pasid.is_some() {
            flags |= VIRTIO_IOMMU_FAULT_F_PASID;
        }
        let (flt_type, pr_evt_flags, grpid) = match page_request {
            Some(g) => (VIRTIO_IOMMU_FLT_PAGE_REQ, VIRTIO_IOMMU_PR_F_LAST_PAGE, g),
            None => (VIRTIO_IOMMU_FLT_DMA_UNRECOV, 0, 0),
        };
        self.faults.push(ExtFaultRecord {
            reason,
            flt_type,
            flags,
            pr_evt_flags,
            endpoint: ep,
            pasid: pasid.unwrap_or(0),
            grpid,
            address: va,
        });
    }

    /// Where page request `grpid` of (`ep`, `pasid`) stands. Answered
    /// groups are forgotten once read.
    pub fn page_request_state(
        &self,
        ep: EndpointId,
        pasid: Option<u32>,
        grpid: u32,
    ) -> PageRequestState {
        let mut q = lock(&self.prq);
        let k = (ep, pasid.unwrap_or(NO_PASID), grpid);
        match q.groups.get(&k).copied() {
            None => PageRequestState::Unknown,
            Some(PageRequestState::Pending) => PageRequestState::Pending,
            Some(s) => {
                q.groups.remove(&k);
                s
            }
        }
    }

    /// Blocks until page request `grpid` is answered or `timeout` passes
    /// (for device models that run on their own thread).
    pub fn wait_page_response(
        &self,
        ep: EndpointId,
        pasid: Option<u32>,
        grpid: u32,
        timeout: Duration,
    ) -> PageRequestState {
        let k = (ep, pasid.unwrap_or(NO_PASID), grpid);
        let q = lock(&self.prq);
        let (q, _) = self
            .prq_answered
            .wait_timeout_while(q, timeout, |q| {
                q.groups.get(&k) == Some(&PageRequestState::Pending)
            })
            .unwrap_or_else(|p| p.into_inner());
        drop(q);
        self.page_request_state(ep, pasid, grpid)
    }

    /// Translates and, on a page request, waits for the answer and retries
    /// once: the access "waits for PAGE_RESP" of a device with its own
    /// thread.
    pub fn translate_waiting(
        &self,
        ep: EndpointId,
        pasid: Option<u32>,
        va: u64,
        access: Access,
        timeout: Duration,
    ) -> Result<NestedTranslation, NestedError> {
        match self.translate(ep, pasid, va, access) {
            Err(NestedError::PageRequest { grpid }) => {
                match self.wait_page_response(ep, pasid, grpid, timeout) {
                    PageRequestState::Success => self.translate(ep, pasid, va, access),
                    _ => Err(NestedError::PageRequest { grpid }),
                }
            }
            r => r,
        }
    }

    /// A front translator for one device thread (its own small TLB).
    pub fn translator(self: &Arc<Self>, ep: EndpointId, pasid: Option<u32>) -> NestedTranslator<M> {
        NestedTranslator {
            emu: Arc::clone(self),
            ep,
            pasid,
            generation: self.generation(),
            tlb: vec![None; FRONT_TLB_ENTRIES].into_boxed_slice(),
        }
    }

    /// A vm-memory [`Iommu`] for (`ep`, `pasid`): wrap guest memory in an
    /// `IommuMemory` and every access of the device model goes through the
    /// guest's tables.
    pub fn endpoint_iommu(self: &Arc<Self>, ep: EndpointId, pasid: Option<u32>) -> NestedIommu<M> {
        NestedIommu {
            emu: Arc::clone(self),
            ep,
            pasid,
            generation: AtomicU64::new(self.generation()),
            last_page_request: Mutex::new(None),
            iotlb: RwLock::new(Iotlb::new()),
            top: RwLock::new(Iotlb::new()),
        }
    }

    fn invalidate_one(&self, c: &mut Caches3, dom: DomainId, inv: &Invalidation) {
        let iotlb = inv.caches.contains(Caches::IOTLB);
        match inv.scope {
            Scope::Domain => {
                if inv.caches.contains(Caches::PASID) {
                    c.pasid.retain(|k| k.domain != dom);
                }
                if iotlb {
                    c.iotlb.retain(|k| k.domain != dom);
                    c.pwc.retain(|k| k.domain != dom);
                }
            }
            Scope::Pasid(p) => {
                let named = |k: &Key| k.domain == dom && pasid_named(k.pasid, Some(p));
                if inv.caches.contains(Caches::PASID) {
                    c.pasid.retain(|k| !named(k));
                }
                if iotlb {
                    c.iotlb.retain(|k| !named(k));
                    c.pwc.retain(|k| !named(k));
                }
            }
            Scope::Range(r) if iotlb && r.pasid.is_none() && inv.archid.is_some() => {
                // An ASID/DID-tagged range without a PASID (SMMUv3
                // TLBI_NH_VA): every context of the domain may use that tag,
                // so the range goes in all of them.
                let last = r.last();
                let overlaps = |k: &Key| {
                    let sh = u32::from(k.shift);
                    k.domain == dom && k.index >= r.addr >> sh && k.index <= last >> sh
                };
                c.iotlb.retain(|k| !overlaps(k));
                if !r.leaf_only {
                    c.pwc.retain(|k| !overlaps(k));
                }
            }
            Scope::Range(r) if iotlb => {
                for pk in range_pasid_keys(r.pasid).into_iter().flatten() {
                    drop_range(&mut c.iotlb, dom, pk, c.leaf_sizes, &r);
                    if !r.leaf_only {
                        drop_range(&mut c.pwc, dom, pk, c.table_shifts, &r);
                    }
                }
            }
            Scope::Range(_) => {}
        }
    }
}

/// Whether cache entries of PASID key `key` are named by an invalidation
/// of `pasid` (`None`: traffic without a PASID). PASID 0 also names the
/// untagged traffic that SMMUv3 S1DSS=SSID0 or VT-d RID_PASID sends
/// through it.
fn pasid_named(key: u32, pasid: Option<u32>) -> bool {
    match pasid {
        Some(0) | None => key == 0 || key == NO_PASID,
        Some(p) => key == p,
    }
}

/// The PASID keys a range invalidation of `pasid` must probe.
fn range_pasid_keys(pasid: Option<u32>) -> [Option<u32>; 2] {
    match pasid {
        Some(0) | None => [Some(0), Some(NO_PASID)],
        Some(p) => [Some(p), None],
    }
}

/// Removes the entries of (`dom`, `pasid`) of every size in `sizes` that
/// overlap `r`, probing page by page while that is cheaper than a scan.
fn drop_range<V: Copy>(
    m: &mut DirectMapped<V>,
    dom: DomainId,
    pasid: u32,
    sizes: u64,
    r: &VaRange,
) {
    let last = r.last();
    let mut probes: u64 = 0;
    let mut s = sizes;
    while s != 0 {
        let log2 = s.trailing_zeros();
        s &= s - 1;
        probes = probes.saturating_add((last >> log2) - (r.addr >> log2) + 1);
    }
    if probes > m.capacity() as u64 {
        m.retain(|k| {
            let sh = u32::from(k.shift);
            !(k.domain == dom
                && k.pasid == pasid
                && k.index >= r.addr >> sh
                && k.index <= last >> sh)
        });
        return;
    }
    let mut s = sizes;
    while s != 0 {
        let log2 = s.trailing_zeros();
        s &= s - 1;
        for idx in (r.addr >> log2)..=(last >> log2) {
            m.remove(&key(dom, pasid, log2 as u8, idx));
        }
    }
}

/// The PASID-cache key of traffic with `pasid` under `table`.
fn pasid_key(table: &TableDesc, pasid: Option<u32>) -> u32 {
    match table {
        // VT-d: requests without PASID use RID_PASID, 0 here.
        TableDesc::IntelVtd { .. } => pasid.unwrap_or(0),
        TableDesc::ArmSmmuV3 { .. } => pasid.unwrap_or(NO_PASID),
        TableDesc::ArmLpae { .. } | TableDesc::X86_64 { .. } => NO_PASID,
    }
}

impl<M: GuestMemory + Clone + Send + Sync + 'static> IommuBackend for EmulatedIommu<M> {
    fn name(&self) -> &str {
        "emulated"
    }

    fn caps(&self, ep: EndpointId) -> BackendCaps {
        let mut c = self.caps.clone();
        c.page_requests = self.page_request_endpoints.contains(&ep);
        c
    }

    fn attach(&self, ep: EndpointId, _dom: &DomainView<'_>) -> Result<(), BackendError> {
        // MAP-mode and bypass domains are translated by the vIOMMU state
        // (crate::translate); here the endpoint only stops using tables.
        self.unbind(ep);
        Ok(())
    }

    fn detach(&self, ep: EndpointId, _dom: DomainId) -> Result<(), BackendError> {
        self.unbind(ep);
        Ok(())
    }

    fn map(&self, _dom: DomainId, _m: &Mapping) -> Result<(), BackendError> {
        Ok(())
    }

    fn unmap(&self, _dom: DomainId, _removed: &[Mapping]) -> Result<(), BackendError> {
        Ok(())
    }

    fn bind_table(&self, ep: EndpointId, binding: &TableBinding) -> Result<(), BackendError> {
        let mut c = lock(&self.caches);
        let first = !c.bindings.iter().any(|(_, x)| x.domain == binding.domain);
        c.bindings.retain(|(e, _)| *e != ep);
        c.bindings.push((ep, *binding));
        if first {
            // A new binding starts with empty caches for its domain: a
            // domain ID reused by the guest must not see the old tables.
            c.pasid.retain(|k| k.domain != binding.domain);
            c.iotlb.retain(|k| k.domain != binding.domain);
            c.pwc.retain(|k| k.domain != binding.domain);
        }
        drop(c);
        self.bump();
        Ok(())
    }

    fn unbind_table(&self, ep: EndpointId, _dom: DomainId) -> Result<(), BackendError> {
        self.unbind(ep);
        Ok(())
    }

    fn invalidate(&self, dom: DomainId, batch: &[Invalidation]) -> Result<(), BackendError> {
        self.stats.invalidate_calls.fetch_add(1, Ordering::Relaxed);
        self.stats
            .invalidations
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut c = lock(&self.caches);
        for inv in batch {
            self.invalidate_one(&mut c, dom, inv);
        }
        drop(c);
        self.bump();
        Ok(())
    }

    fn page_response(&self, resp: &PageResponse) -> Result<(), BackendError> {
        let mut q = lock(&self.prq);
        let k = (resp.endpoint, resp.pasid.unwrap_or(NO_PASID), resp.grpid);
        match q.groups.get_mut(&k) {
            Some(s @ PageRequestState::Pending) => {
                *s = if resp.code == VIRTIO_IOMMU_PAGE_RESP_SUCCESS {
                    PageRequestState::Success
                } else {
                    PageRequestState::Failed
                };
                drop(q);
                self.prq_answered.notify_all();
                Ok(())
            }
            _ => Err(BackendError::NotFound(format!(
                "no pending page request {} of endpoint {}",
                resp.grpid, resp.endpoint
            ))),
        }
    }

    fn drain_faults(&self, _out: &mut Vec<BackendFault>) {
        // Faults go straight into the vIOMMU's queue.
    }

    fn save_page_requests(&self) -> Option<SavedPageRequests> {
        let q = lock(&self.prq);
        let mut groups: Vec<SavedPageRequest> = q
            .groups
            .iter()
            .filter_map(|(&(endpoint, key, grpid), &s)| {
                let state = match s {
                    PageRequestState::Pending => SavedPageRequestState::Pending,
                    PageRequestState::Success => SavedPageRequestState::Success,
                    PageRequestState::Failed => SavedPageRequestState::Failed,
                    PageRequestState::Unknown => return None,
                };
                Some(SavedPageRequest {
                    endpoint,
                    pasid: (key != NO_PASID).then_some(key),
                    grpid,
                    state,
                })
            })
            .collect();
        groups.sort_unstable_by_key(|g| (g.endpoint, g.pasid, g.grpid));
        Some(SavedPageRequests {
            next_grpid: q.next_grpid,
            groups,
        })
    }

    fn restore_page_requests(&self, saved: &SavedPageRequests) -> Result<(), BackendError> {
        // A snapshot is untrusted: every value must be one this backend
        // could have produced, and the table stays within its bounds.
        let bad = |what: String| Err(BackendError::Invalid(format!("page requests: {what}")));
        if saved.next_grpid > GRPID_MASK {
            return bad(format!("next group {} beyond 9 bits", saved.next_grpid));
        }
        if saved.groups.len() > 4 * MAX_PENDING_PAGE_REQUESTS {
            return bad(format!("{} groups held", saved.groups.len()));
        }
        let mut groups = HashMap::with_capacity(saved.groups.len());
        let mut pending = 0;
        for g in &saved.groups {
            if !self.page_request_endpoints.contains(&g.endpoint) {
                return bad(format!("endpoint {} sends no page requests", g.endpoint));
            }
            if g.grpid > GRPID_MASK {
                return bad(format!("group {} beyond 9 bits", g.grpid));
            }
            let key = match g.pasid {
                None => NO_PASID,
                Some(p) if u64::from(p) >> self.caps.pasid_bits == 0 => p,
                Some(p) => return bad(format!("PASID {p:#x} beyond the PASID width")),
            };
            let state = match g.state {
                SavedPageRequestState::Pending => {
                    pending += 1;
                    PageRequestState::Pending
                }
                SavedPageRequestState::Success => PageRequestState::Success,
                SavedPageRequestState::Failed => PageRequestState::Failed,
            };
            if groups.insert((g.endpoint, key, g.grpid), state).is_some() {
                return bad(format!(
                    "group {} of endpoint {} listed twice",
                    g.grpid, g.endpoint
                ));
            }
        }
        if pending > MAX_PENDING_PAGE_REQUESTS {
            return bad(format!("{pending} pending"));
        }
        let mut q = lock(&self.prq);
        q.next_grpid = saved.next_grpid;
        q.groups = groups;
        drop(q);
        self.prq_answered.notify_all();
        Ok(())
    }

    fn remove_endpoint(&self, ep: EndpointId) {
        self.unbind(ep);
        let mut q = lock(&self.prq);
        q.groups.retain(|k, _| k.0 != ep);
        drop(q);
        // A device thread waiting for an answer to the gone endpoint's
        // request wakes up and sees it unknown: the access is aborted.
        self.prq_answered.notify_all();
    }

    /// Guest tables in the plugged RAM are read from `change.memory` from
    /// now on. Nothing cached can be wrong: faults are never cached.
    fn add_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        let mem = memory_of::<M>(change)?;
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = mem;
        Ok(())
    }

    /// Tables are read from `change.memory`, without the range, from now
    /// on, and every cache is dropped: an entry read from (or pointing
    /// into) the unplugged RAM would outlive it, and no guest INVALIDATE
    /// will come for a change the guest did not make. Walks into the range
    /// then fault, as past RAM.
    fn remove_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        let mem = memory_of::<M>(change)?;
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = mem;
        let mut c = lock(&self.caches);
        c.pasid.retain(|_| false);
        c.pwc.retain(|_| false);
        c.iotlb.retain(|_| false);
        drop(c);
        self.bump();
        Ok(())
    }

    fn set_page_requests(&self, enabled: bool) {
        self.page_requests_on.store(enabled, Ordering::Release);
        if !enabled {
            // Requests the driver can no longer answer are failed.
            let mut q = lock(&self.prq);
            for s in q.groups.values_mut() {
                if *s == PageRequestState::Pending {
                    *s = PageRequestState::Failed;
                }
            }
            drop(q);
            self.prq_answered.notify_all();
        }
    }
}

/// The guest memory a RAM change hands over, as the software IOMMU's own
/// memory type.
fn memory_of<M: Clone + 'static>(change: &RamChange<'_>) -> Result<M, BackendError> {
    change.memory.downcast_ref::<M>().cloned().ok_or_else(|| {
        BackendError::Invalid(format!(
            "guest memory of RAM [{:#x}, {:#x}] is not a {}, the software IOMMU's memory type",
            change.start,
            change.end,
            std::any::type_name::<M>()
        ))
    })
}

impl<M> EmulatedIommu<M> {
    fn unbind(&self, ep: EndpointId) {
        let mut c = lock(&self.caches);
        let before = c.bindings.len();
        c.bindings.retain(|(e, _)| *e != ep);
        if c.bindings.len() != before {
            drop(c);
            self.generation.fetch_add(1, Ordering::Release);
        }
    }
}

/// Entries of a [`NestedTranslator`]'s front TLB.
pub const FRONT_TLB_ENTRIES: usize = 64;

#[derive(Clone, Copy, Debug)]
struct FrontEntry {
    page: u64,
    t: NestedTranslation,
}

/// A per-thread front cache over [`EmulatedIommu::translate`] for one
/// (endpoint, PASID): a direct-mapped TLB of 4 KiB pages, dropped whenever
/// the IOMMU's generation moves (any invalidation, bind or unbind), so it
/// is never staler than the IOMMU's own IOTLB.
pub struct NestedTranslator<M> {
    emu: Arc<EmulatedIommu<M>>,
    ep: EndpointId,
    pasid: Option<u32>,
    generation: u64,
    tlb: Box<[Option<FrontEntry>]>,
}

impl<M: GuestMemory + Send + Sync> NestedTranslator<M> {
    /// Translates `va` for a read (`write == false`) or a write.
    #[inline]
    pub fn translate(&mut self, va: u64, write: bool) -> Result<u64, NestedError> {
        let gen = self.emu.generation();
        if gen != self.generation {
            self.tlb.fill(None);
            self.generation = gen;
        }
        let page = va >> 12;
        let slot = (page as usize) & (FRONT_TLB_ENTRIES - 1);
        if let Some(e) = &self.tlb[slot] {
            if e.page == page && (!write || e.t.writable) {
                return Ok(e
                    .t
                    .gpa
                    .wrapping_add(va & 0xfff)
                    .wrapping_sub(e.t.gpa & 0xfff));
            }
        }
        let access = if write { Access::WRITE } else { Access::READ };
        let t = self.emu.translate(self.ep, self.pasid, va, access)?;
        self.tlb[slot] = Some(FrontEntry { page, t });
        Ok(t.gpa)
    }
}

/// vm-memory's [`Iommu`] over the software nested IOMMU for one
/// (endpoint, PASID).
///
/// vm-memory's [`Iotlb`] keys ranges by their exclusive end, which cannot
/// express 2^64: a range that ends at the last byte of the address space
/// overflows it. So the adaptor keeps two: `iotlb` holds every translated
/// page (the last page of the space without its last byte), and `top`
/// holds the pieces of accesses that end exactly at 2^64, each keyed one
/// byte lower, so that their exclusive end is 2^64 - 1. Both map to the
/// same guest-physical addresses, which is all the returned iterator
/// yields.
pub struct NestedIommu<M> {
    emu: Arc<EmulatedIommu<M>>,
    ep: EndpointId,
    pasid: Option<u32>,
    generation: AtomicU64,
    last_page_request: Mutex<Option<u32>>,
    iotlb: RwLock<Iotlb>,
    top: RwLock<Iotlb>,
}

impl<M> std::fmt::Debug for NestedIommu<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedIommu")
            .field("endpoint", &self.ep)
            .field("pasid", &self.pasid)
            .finish()
    }
}

impl<M: GuestMemory + Send + Sync> NestedIommu<M> {
    /// The page request the last refused access sent, if it sent one
    /// (taken: a second call returns `None`).
    pub fn take_page_request(&self) -> Option<u32> {
        lock(&self.last_page_request).take()
    }

    /// The IOMMU behind this view.
    pub fn emulated(&self) -> &Arc<EmulatedIommu<M>> {
        &self.emu
    }
}

fn write_tlb(l: &RwLock<Iotlb>) -> std::sync::RwLockWriteGuard<'_, Iotlb> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn read_tlb(l: &RwLock<Iotlb>) -> RwLockReadGuard<'_, Iotlb> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

impl<M: GuestMemory + Send + Sync> Iommu for NestedIommu<M> {
    type IotlbGuard<'a>
        = RwLockReadGuard<'a, Iotlb>
    where
        M: 'a;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let cannot = |reason: String| IommuError::CannotResolve {
            iova_range: IovaRange { base: iova, length },
            reason,
        };
        let len = u64::try_from(length).map_err(|_| cannot("length above 2^64".into()))?;
        // `last` may be u64::MAX: an access may end exactly at 2^64.
        let Some(last) = len.checked_sub(1).and_then(|l| iova.0.checked_add(l)) else {
            return Err(cannot("empty range or range past 2^64".into()));
        };
        // Ends at 2^64: answered from `top`, keyed one byte lower. `iova`
        // is at least 1 here, since `length` is below 2^64.
        let at_top = iova.0.checked_add(len).is_none();
        let lookup = || {
            if at_top {
                Iotlb::lookup(
                    read_tlb(&self.top),
                    GuestAddress(iova.0 - 1),
                    length,
                    access,
                )
            } else {
                Iotlb::lookup(read_tlb(&self.iotlb), iova, length, access)
            }
        };
        let gen = self.emu.generation();
        if self.generation.swap(gen, Ordering::AcqRel) != gen {
            write_tlb(&self.iotlb).invalidate_all();
            write_tlb(&self.top).invalidate_all();
        }
        if let Ok(it) = lookup() {
            return Ok(it);
        }
        let write = matches!(access, Permissions::Write | Permissions::ReadWrite);
        let acc = if write { Access::WRITE } else { Access::READ };
        let mut cur = iova.0;
        loop {
            let t = match self.emu.translate(self.ep, self.pasid, cur, acc) {
                Ok(t) => t,
                Err(e) => {
                    if let NestedError::PageRequest { grpid } = e {
                        *lock(&self.last_page_request) = Some(grpid);
                    }
                    return Err(cannot(format!("{e} at {cur:#x}")));
                }
            };
            // The translation covers `cur`; anything else is a bug that
            // must not become a panic or an endless loop.
            if !(t.page_start <= cur && cur <= t.page_last) {
                return Err(cannot(format!("translation of {cur:#x} does not cover it")));
            }
            let perm = if t.writable {
                Permissions::ReadWrite
            } else {
                Permissions::Read
            };
            let Some(page_gpa) = t.gpa.checked_sub(cur - t.page_start) else {
                return Err(cannot(format!("page of {cur:#x} starts below address 0")));
            };
            // The whole page, up to (not including) the last byte of the
            // space, which no exclusive end can reach.
            let tlb_last = t.page_last.min(u64::MAX - 1);
            if tlb_last >= t.page_start {
                let n = usize::try_from(tlb_last - t.page_start + 1)
                    .map_err(|_| cannot("page too large".into()))?;
                write_tlb(&self.iotlb)
                    .set_mapping(GuestAddress(t.page_start), GuestAddress(page_gpa), n, perm)
                    .map_err(|e| cannot(e.to_string()))?;
            }
            let piece_last = t.page_last.min(last);
            if at_top {
                // The part of this page the access touches, one byte lower.
                let n = usize::try_from(piece_last - cur + 1)
                    .map_err(|_| cannot("page too large".into()))?;
                write_tlb(&self.top)
                    .set_mapping(GuestAddress(cur - 1), GuestAddress(t.gpa), n, perm)
                    .map_err(|e| cannot(e.to_string()))?;
            }
            if piece_last == last {
                break;
            }
            cur = piece_last + 1;
        }
        lookup().map_err(|_| cannot("translation changed while filling".into()))
    }
}

/// What (table, PASID) translates with, read from guest memory: the PASID
/// entry or CD for PASID formats (traffic without a PASID uses VT-d's
/// RID_PASID 0, or SMMUv3's S1DSS choice), the table itself for the
/// direct formats (the caller refuses PASID traffic to those).
fn resolve_regime<M: TableMemory + ?Sized>(
    mem: &M,
    table: &TableDesc,
    pasid: Option<u32>,
) -> Result<Regime, WalkFault> {
    use crate::nested::{arm, smmuv3, vtd, x86};
    match *table {
        TableDesc::IntelVtd {
            pasid_bits,
            pasid_dir_ptr,
        } => {
            let t = vtd::PasidTable::new(pasid_dir_ptr, pasid_bits)?;
            Ok(Regime::Tables(t.stage1(mem, pasid.unwrap_or(0))?))
        }
        TableDesc::ArmSmmuV3 {
            s1fmt,
            s1dss,
            s1contextptr,
            s1cdmax,
        } => {
            let t = smmuv3::CdTable::new(s1contextptr, s1fmt, s1cdmax, s1dss)?;
            match t.resolve_ssid(pasid)? {
                smmuv3::Substream::Bypass => Ok(Regime::Bypass),
                smmuv3::Substream::Ssid(ssid) => Ok(Regime::Tables(t.stage1(mem, ssid)?)),
            }
        }
        TableDesc::ArmLpae {
            asid,
            tcr,
            ttbr0,
            ttbr1,
            mair,
        } => Ok(Regime::Tables(Stage1::Arm(arm::Config::from_tcr(
            tcr, ttbr0, ttbr1, mair, asid,
        )?))),
        TableDesc::X86_64 { levels, root } => {
            Ok(Regime::Tables(Stage1::X86(x86::Config::new(root, levels)?)))
        }
    }
}
