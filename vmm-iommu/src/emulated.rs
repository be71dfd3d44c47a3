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
//!
//! This module holds the walk and its caches; each other job is a child
//! module: `invalidate.rs` (what an INVALIDATE drops), `fault.rs` and
//! `page_request.rs` (what a failed walk becomes), `front.rs` (the front
//! translators of device threads and vm-memory), `backend.rs` (the
//! [`IommuBackend`](crate::backend::IommuBackend) the vIOMMU calls),
//! `stats.rs` (counters) and `cache.rs` (the direct-mapped cache).

use std::collections::HashSet;

mod backend;
mod cache;
mod fault;
mod front;
mod invalidate;
mod page_request;
mod stats;

use cache::{DirectMapped, Key};
pub use front::{NestedIommu, NestedTranslator, FRONT_TLB_ENTRIES};
use page_request::PageRequests;
pub use page_request::{PageRequestState, MAX_PENDING_PAGE_REQUESTS};
pub use stats::{EmulatedCounts, EmulatedStats};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use vm_memory::GuestMemory;

use crate::backend::{BackendCaps, DomainId, EndpointId, TableBinding};
use crate::fault::FaultQueue;
use crate::nested::{self, Access, Leaf, Stage1, TableMemory, WalkFault, WalkStart};
use crate::wire::{
    TableDesc, VIRTIO_IOMMU_PGTF_ARM_LPAE, VIRTIO_IOMMU_PGTF_X86_64, VIRTIO_IOMMU_PSTF_ARM_SMMU_V3,
    VIRTIO_IOMMU_PSTF_INTEL_VTD,
};

/// IOTLB capacity (leaf entries).
pub const IOTLB_ENTRIES: usize = 4096;
/// Paging-structure cache capacity.
pub const PWC_ENTRIES: usize = 1024;
/// PASID-cache capacity.
pub const PASID_CACHE_ENTRIES: usize = 256;

/// The PASID key of traffic without a PASID in a format without PASIDs.
const NO_PASID: u32 = u32::MAX;

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
    /// unplugged ([`crate::backend::IommuBackend::add_ram`]). Taken after
    /// `caches` when both are held.
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

/// The PASID-cache key of traffic with `pasid` under `table`.
fn pasid_key(table: &TableDesc, pasid: Option<u32>) -> u32 {
    match table {
        // VT-d: requests without PASID use RID_PASID, 0 here.
        TableDesc::IntelVtd { .. } => pasid.unwrap_or(0),
        TableDesc::ArmSmmuV3 { .. } => pasid.unwrap_or(NO_PASID),
        TableDesc::ArmLpae { .. } | TableDesc::X86_64 { .. } => NO_PASID,
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
