//! The vIOMMU state model: endpoints, domains and their mappings, and every
//! normative rule of the virtio-iommu spec about them.
//!
//! Requests arrive here decoded (see [`crate::wire`]) and leave as either a
//! success or a [`RequestError`] that names what the guest did and carries
//! the status the guest gets. This module never touches queues, guest
//! memory or backends: it is the single place where the spec's rules live,
//! so that they can be tested without a transport.
//!
//! Costs: every request is O(log n + k) for a domain of n mappings of which
//! k are affected; no request scans a whole domain.

use std::collections::HashMap;

mod domains;
mod lifecycle;
mod memory_map;
mod nested;
pub(crate) use memory_map::inclusive;
pub use memory_map::MemoryMapError;
pub use nested::AttachOutcome;
pub(crate) use nested::StateSnapshot;

use crate::backend::MmioWindow;
use crate::config::{IommuConfig, Limits, ReservedKind, ReservedRegion};
use crate::idhash::IdMap;
use crate::invalidation::InvalidateError;
use crate::mapping::{Mapping, MappingTable, WARM_MIN_MAPPINGS};
use crate::wire::{
    AttachReq, DetachReq, MapReq, ProbeReq, Status, TableDesc, UnmapReq,
    VIRTIO_IOMMU_ATTACH_F_BYPASS, VIRTIO_IOMMU_F_BYPASS_CONFIG, VIRTIO_IOMMU_F_MAP_UNMAP,
    VIRTIO_IOMMU_F_MMIO, VIRTIO_IOMMU_MAP_F_MMIO, VIRTIO_IOMMU_MAP_F_READ,
    VIRTIO_IOMMU_MAP_F_WRITE,
};
use domains::DomainMap;

/// Read access, as in `VIRTIO_IOMMU_MAP_F_READ`.
pub const ACCESS_READ: u32 = VIRTIO_IOMMU_MAP_F_READ;
/// Write access, as in `VIRTIO_IOMMU_MAP_F_WRITE`.
pub const ACCESS_WRITE: u32 = VIRTIO_IOMMU_MAP_F_WRITE;

/// A request the state model refused: what the guest did, and through
/// [`RequestError::status`] the status it gets back.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request needs a feature the driver did not negotiate.
    #[error("{request} needs feature bit {feature}, which the driver did not accept")]
    FeatureNotNegotiated {
        /// The request name.
        request: &'static str,
        /// The feature bit.
        feature: u32,
    },
    /// The endpoint is not one this vIOMMU manages.
    #[error("endpoint {0} does not exist")]
    UnknownEndpoint(u32),
    /// The domain does not exist.
    #[error("domain {0} does not exist")]
    UnknownDomain(u32),
    /// The domain ID lies outside `domain_range`.
    #[error("domain {domain} is outside domain_range [{start}, {end}]")]
    DomainOutOfRange {
        /// The domain ID.
        domain: u32,
        /// First valid ID.
        start: u32,
        /// Last valid ID.
        end: u32,
    },
    /// A reserved field the device must check is not zero.
    #[error("{request} reserved field is not zero")]
    ReservedNotZero {
        /// The request name.
        request: &'static str,
    },
    /// A flag bit the device does not recognize (or that needs a feature
    /// the driver did not negotiate).
    #[error("{request} flags {flags:#x} contain unknown bits {unknown:#x}")]
    UnknownFlags {
        /// The request name.
        request: &'static str,
        /// The flags given.
        flags: u32,
        /// The bits not recognized.
        unknown: u32,
    },
    /// ATTACH's bypass flag disagrees with the existing domain.
    #[error("ATTACH bypass flag {flag} is inconsistent with domain {domain}")]
    BypassMismatch {
        /// The domain ID.
        domain: u32,
        /// The flag given.
        flag: bool,
    },
    /// DETACH names a domain the endpoint is not attached to.
    #[error("endpoint {endpoint} is not attached to domain {domain}")]
    NotAttached {
        /// The endpoint ID.
        endpoint: u32,
        /// The domain ID.
        domain: u32,
    },
    /// MAP or UNMAP on a bypass domain.
    #[error("{request} on bypass domain {domain}")]
    BypassDomain {
        /// The request name.
        request: &'static str,
        /// The domain ID.
        domain: u32,
    },
    /// `virt_end` below `virt_start`.
    #[error("{request} virt_end {end:#x} below virt_start {start:#x}")]
    EndBelowStart {
        /// The request name.
        request: &'static str,
        /// virt_start.
        start: u64,
        /// virt_end.
        end: u64,
    },
    /// An address not aligned on the page granule.
    #[error("MAP {field} {value:#x} is not aligned on the granule {granule:#x}")]
    Misaligned {
        /// Which field (`virt_start`, `phys_start`, `virt_end + 1`).
        field: &'static str,
        /// Its value.
        value: u64,
        /// The granule.
        granule: u64,
    },
    /// The IOVA range is outside `input_range`.
    #[error("MAP [{start:#x}, {end:#x}] is outside input_range [{min:#x}, {max:#x}]")]
    OutsideInputRange {
        /// virt_start.
        start: u64,
        /// virt_end.
        end: u64,
        /// input_range.start.
        min: u64,
        /// input_range.end.
        max: u64,
    },
    /// The physical range wraps past 2^64.
    #[error("MAP physical range at {phys:#x} of {size:#x} bytes wraps past 2^64")]
    PhysWraps {
        /// phys_start.
        phys: u64,
        /// Size of the mapping in bytes (0 for 2^64).
        size: u64,
    },
    /// A `VIRTIO_IOMMU_MAP_F_MMIO` mapping whose physical range is not
    /// all inside MMIO windows the VMM registered.
    #[error(
        "MAP_F_MMIO physical range [{start:#x}, {end:#x}] is not inside the MMIO windows \
         the VMM serves as DMA targets"
    )]
    MmioOutsideWindows {
        /// phys_start.
        start: u64,
        /// phys_start + virt_end - virt_start.
        end: u64,
    },
    /// The IOVA range overlaps a reserved region.
    #[error(
        "MAP [{start:#x}, {end:#x}] overlaps reserved region [{resv_start:#x}, {resv_end:#x}]"
    )]
    OverlapsReserved {
        /// virt_start.
        start: u64,
        /// virt_end.
        end: u64,
        /// The region's start.
        resv_start: u64,
        /// The region's end.
        resv_end: u64,
    },
    /// ATTACH of an endpoint to a domain that already maps IOVAs the
    /// endpoint has reserved: the domain could not honour the region.
    #[error(
        "ATTACH of endpoint {endpoint} to domain {domain}: a mapping overlaps the endpoint's \
         reserved region [{resv_start:#x}, {resv_end:#x}]"
    )]
    AttachOverlapsReserved {
        /// The endpoint.
        endpoint: u32,
        /// The domain.
        domain: u32,
        /// The region's start.
        resv_start: u64,
        /// The region's end.
        resv_end: u64,
    },
    /// The IOVA range overlaps an existing mapping.
    #[error("MAP [{start:#x}, {end:#x}] overlaps an existing mapping")]
    OverlapsMapping {
        /// virt_start.
        start: u64,
        /// virt_end.
        end: u64,
    },
    /// UNMAP would split a mapping.
    #[error("UNMAP [{start:#x}, {end:#x}] would split mapping [{map_start:#x}, {map_end:#x}]")]
    WouldSplit {
        /// virt_start.
        start: u64,
        /// virt_end.
        end: u64,
        /// The mapping's start.
        map_start: u64,
        /// The mapping's end.
        map_end: u64,
    },
    /// A configured limit is reached.
    #[error("limit reached: {0}")]
    Limit(&'static str),
    /// ATTACH, MAP or UNMAP on a table domain (nested extension).
    #[error("{request} on table domain {domain}")]
    TableDomain {
        /// The request name.
        request: &'static str,
        /// The domain ID.
        domain: u32,
    },
    /// INVALIDATE on a domain without a table.
    #[error("INVALIDATE on domain {0}, which has no table")]
    NotTableDomain(u32),
    /// ATTACH_TABLE with a format the endpoint's PROBE did not advertise.
    #[error("endpoint {endpoint} does not support table format {format}")]
    UnsupportedFormat {
        /// The endpoint ID.
        endpoint: u32,
        /// The format.
        format: u16,
    },
    /// A table parameter outside what the format allows.
    #[error("ATTACH_TABLE parameter refused: {0}")]
    TableParam(&'static str),
    /// A table pointer outside guest RAM or misaligned.
    #[error(
        "ATTACH_TABLE table pointer {ptr:#x} is misaligned (needs {align:#x}) or outside guest RAM"
    )]
    TablePointer {
        /// The pointer.
        ptr: u64,
        /// Its required alignment.
        align: u64,
    },
    /// A translation table base at or above the output size its regime
    /// selects (Arm TTBR0 beyond IPS): no walk could read it.
    #[error("ATTACH_TABLE table pointer {ptr:#x} is beyond the {oa_bits}-bit output size")]
    TablePointerBeyondOutput {
        /// The table base the walker would use.
        ptr: u64,
        /// The output size.
        oa_bits: u8,
    },
    /// A second endpoint's table differs from the domain's.
    #[error("ATTACH_TABLE table differs from the one bound to domain {0}")]
    IncompatibleTable(u32),
    /// An INVALIDATE request refused.
    #[error(transparent)]
    Invalidate(#[from] InvalidateError),
    /// A PAGE_RESP code that is not SUCCESS, INVALID or FAILURE.
    #[error("PAGE_RESP code {0} is unknown")]
    PageRespCode(u16),
    /// A backend refused or failed; the vIOMMU state is as before.
    #[error("backend {backend}: {message}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// What it said.
        message: String,
        /// The status the guest gets.
        status: Status,
    },
}

impl RequestError {
    /// The status the guest gets for this error.
    pub fn status(&self) -> Status {
        use RequestError::*;
        match self {
            FeatureNotNegotiated { .. } => Status::Unsupp,
            UnknownEndpoint(_) | UnknownDomain(_) => Status::NoEnt,
            DomainOutOfRange { .. } => Status::Range,
            ReservedNotZero { .. }
            | UnknownFlags { .. }
            | BypassMismatch { .. }
            | NotAttached { .. }
            | BypassDomain { .. }
            | EndBelowStart { .. }
            | OverlapsMapping { .. } => Status::Inval,
            Misaligned { .. }
            | OutsideInputRange { .. }
            | PhysWraps { .. }
            // RANGE, not UNSUPP or INVAL: the flag is known and MMIO
            // mappings are supported; this physical range is outside what
            // the device can map as MMIO, as a range past 2^64 is outside
            // what it can map at all (spec 5.13.6.5: the physical range
            // "should be within the guest-physical address space ...
            // including any carving of guest-physical addresses for use by
            // the host").
            | MmioOutsideWindows { .. }
            | OverlapsReserved { .. }
            | AttachOverlapsReserved { .. }
            | WouldSplit { .. } => Status::Range,
            Limit(_) => Status::NoMem,
            TableDomain { .. }
            | NotTableDomain(_)
            | TableParam(_)
            | IncompatibleTable(_)
            | PageRespCode(_) => Status::Inval,
            UnsupportedFormat { .. } => Status::Unsupp,
            TablePointer { .. } | TablePointerBeyondOutput { .. } => Status::Range,
            Invalidate(InvalidateError::PasidOutOfRange { .. }) => Status::Range,
            Invalidate(_) => Status::Inval,
            Backend { status, .. } => *status,
        }
    }
}

/// Why a translation failed, as the eventq fault reasons name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultReason {
    /// The endpoint is unknown to the vIOMMU (`VIRTIO_IOMMU_FAULT_R_UNKNOWN`).
    Unknown,
    /// The endpoint is not attached and not in bypass (`..._R_DOMAIN`).
    Domain,
    /// Not mapped, or mapped without the permission (`..._R_MAPPING`).
    Mapping,
}

/// A successful translation: the IOVA window `[iova_start, iova_last]` that
/// contains the address maps linearly onto guest-physical memory from
/// `phys_start`, with `perm` (`ACCESS_READ | ACCESS_WRITE` bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// First IOVA of the window.
    pub iova_start: u64,
    /// Last IOVA of the window (inclusive).
    pub iova_last: u64,
    /// Guest-physical address of `iova_start`.
    pub phys_start: u64,
    /// Permitted accesses.
    pub perm: u32,
}

impl Translation {
    /// The identity window used for endpoints in bypass mode.
    pub const IDENTITY: Translation = Translation {
        iova_start: 0,
        iova_last: u64::MAX,
        phys_start: 0,
        perm: ACCESS_READ | ACCESS_WRITE,
    };

    /// Guest-physical address of `iova`, which must lie in the window.
    pub fn gpa(&self, iova: u64) -> u64 {
        self.phys_start
            .wrapping_add(iova.wrapping_sub(self.iova_start))
    }
}

/// What a domain translates with.
#[derive(Clone, Debug)]
enum DomainKind {
    /// MAP/UNMAP domain.
    Mapped(Box<MappingTable>),
    /// ATTACH_F_BYPASS domain: identity.
    Bypass,
    /// ATTACH_TABLE domain: the guest's own tables (nested extension).
    Table(TableDesc),
}

#[derive(Clone, Debug)]
struct Domain {
    kind: DomainKind,
    endpoints: Vec<u32>,
}

/// One endpoint's view, returned by [`IommuState::endpoint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The domain it is attached to.
    pub domain: Option<u32>,
}

/// The state of one vIOMMU: endpoints, domains, mappings.
#[derive(Debug)]
pub struct IommuState {
    granule: u64,
    input_start: u64,
    input_end: u64,
    domain_start: u32,
    domain_end: u32,
    limits: Limits,
    /// The device-wide regions every endpoint has. Sorted,
    /// non-overlapping (validated by the config).
    reserved: Vec<ReservedRegion>,
    /// Per-endpoint reserved regions: what the VMM adds for one endpoint
    /// (`extra`) and what its host IOMMU cannot map (`host`), with the
    /// list PROBE reports and MAP checks (`merged`). An endpoint without
    /// an entry has the device-wide list alone.
    endpoint_reserved: HashMap<u32, EndpointReserved>,
    /// Sorted, merged `[start, end]` guest RAM ranges.
    ram: Vec<(u64, u64)>,
    /// The RAM ranges as the VMM declared them (at construction and by
    /// hot-plug), sorted and disjoint: an unplug takes whole ones.
    ram_units: Vec<(u64, u64)>,
    /// The VMM's MMIO windows a `MAP_F_MMIO` mapping may point into,
    /// sorted and disjoint.
    mmio_windows: Vec<MmioWindow>,
    /// Set while a snapshot whose memory map the restore compared with
    /// this state's is replayed: the rules that depend on the VMM's memory
    /// map at request time (table pointers in RAM, MMIO mappings in
    /// windows) are not checked then, since RAM and windows may have
    /// changed since the request.
    replaying: bool,
    // Looked up on every translation miss: a fast seeded hasher.
    endpoints: IdMap<u32, Option<u32>>,
    /// Looked up on every MAP and UNMAP: remembers the last one.
    domains: DomainMap<Domain>,
    total_mappings: u64,
    acked: u64,
    unattached_bypass: bool,
    scratch: Vec<Mapping>,
    /// Table formats each endpoint's PROBE advertises (config ∩ backend).
    endpoint_formats: HashMap<u32, Vec<u16>>,
    /// PASID width of the nested extension, 0 when it is off.
    pasid_bits: u8,
}

/// One endpoint's own reserved regions (see `IommuState::endpoint_reserved`).
#[derive(Clone, Debug, Default)]
struct EndpointReserved {
    /// Added by the VMM (the VM config's `devices[i].reserved_regions`).
    extra: Vec<ReservedRegion>,
    /// Host IOVA holes, inclusive.
    host: Vec<(u64, u64)>,
    /// Device-wide + `extra` + the parts of `host` they leave free, sorted
    /// and disjoint.
    merged: Vec<ReservedRegion>,
}

/// Why the VMM's reserved regions for an endpoint are refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReservedRegionError {
    /// The endpoint is not one this vIOMMU manages.
    #[error("endpoint {0} does not exist")]
    UnknownEndpoint(u32),
    /// A region ends before it starts.
    #[error("endpoint {endpoint}: region {start:#x}..={end:#x} ends before it starts")]
    Inverted {
        /// The endpoint.
        endpoint: u32,
        /// The region's start.
        start: u64,
        /// The region's end.
        end: u64,
    },
    /// Two regions of the endpoint overlap (its own, or one of its own
    /// and a device-wide one).
    #[error("endpoint {endpoint}: region {start:#x}..={end:#x} overlaps {other_start:#x}..={other_end:#x}")]
    Overlap {
        /// The endpoint.
        endpoint: u32,
        /// The region's start.
        start: u64,
        /// The region's end.
        end: u64,
        /// The other region's start.
        other_start: u64,
        /// The other region's end.
        other_end: u64,
    },
    /// A second MSI region for the endpoint.
    #[error("endpoint {0}: a second MSI region; the device presents at most one per endpoint")]
    SecondMsi(u32),
    /// The endpoint's regions do not fit in the probe buffer.
    #[error(
        "endpoint {endpoint}: {regions} reserved regions do not fit in probe_size {probe_size} \
         (24 bytes each)"
    )]
    ProbeSize {
        /// The endpoint.
        endpoint: u32,
        /// How many regions it would have.
        regions: usize,
        /// Config-space `probe_size`.
        probe_size: u32,
    },
    /// The endpoint's domain already maps IOVAs in the region.
    #[error("endpoint {endpoint}: domain {domain} already maps IOVAs in {start:#x}..={end:#x}")]
    Mapped {
        /// The endpoint.
        endpoint: u32,
        /// Its domain.
        domain: u32,
        /// The region's start.
        start: u64,
        /// The region's end.
        end: u64,
    },
}

/// The first region of the sorted, disjoint `regions` that overlaps
/// `[start, end]`.
#[inline]
fn first_overlap(regions: &[ReservedRegion], start: u64, end: u64) -> Option<&ReservedRegion> {
    let idx = regions.partition_point(|x| x.end < start);
    regions.get(idx).filter(|r| r.start <= end)
}

/// `base` (sorted, disjoint) with the parts of the `host` holes it leaves
/// free inside `[lo, hi]` added as RESERVED, sorted. The VMM's regions win
/// where they overlap a hole: an MSI region the config names stays MSI, as
/// in QEMU, and "The device SHOULD NOT present multiple RESV_MEM
/// properties that overlap each other for the same endpoint" (virtio
/// 1.3, PROBE properties / RESV_MEM, device requirements).
fn merge_host_holes(
    base: &[ReservedRegion],
    host: &[(u64, u64)],
    lo: u64,
    hi: u64,
) -> Vec<ReservedRegion> {
    let mut out = base.to_vec();
    for &(s, e) in host {
        let (mut s, e) = (s.max(lo), e.min(hi));
        if s > e {
            continue;
        }
        // Walk the base regions that overlap [s, e], keeping the gaps.
        let mut idx = base.partition_point(|x| x.end < s);
        loop {
            match base.get(idx).filter(|b| b.start <= e) {
                Some(b) => {
                    if b.start > s {
                        out.push(ReservedRegion {
                            start: s,
                            end: b.start - 1,
                            kind: ReservedKind::Reserved,
                        });
                    }
                    match b.end.checked_add(1) {
                        Some(n) if n <= e => s = n,
                        _ => break,
                    }
                    idx += 1;
                }
                None => {
                    out.push(ReservedRegion {
                        start: s,
                        end: e,
                        kind: ReservedKind::Reserved,
                    });
                    break;
                }
            }
        }
    }
    out.sort_by_key(|r| r.start);
    out
}

/// Whether `[phys, last]` lies in one of the sorted, merged RAM ranges.
fn phys_in_ram(ram: &[(u64, u64)], phys: u64, last: u64) -> bool {
    let idx = ram.partition_point(|r| r.0 <= phys);
    idx > 0 && ram[idx - 1].1 >= last
}

/// The refusal of a MAP whose `virt_start`, `phys_start` or
/// `virt_end + 1` is not aligned on `granule`, naming the first such field.
#[cold]
fn misaligned(r: &MapReq, granule: u64) -> RequestError {
    let mask = granule - 1;
    let (field, value) = [
        ("virt_start", r.virt_start),
        ("phys_start", r.phys_start),
        ("virt_end + 1", r.virt_end.wrapping_add(1)),
    ]
    .into_iter()
    .find(|&(_, v)| v & mask != 0)
    .unwrap_or(("virt_start", r.virt_start));
    RequestError::Misaligned {
        field,
        value,
        granule,
    }
}

fn feature(acked: u64, bit: u32) -> bool {
    acked & (1u64 << bit) != 0
}

impl IommuState {
    /// Builds the state for `endpoints` (the IDs the VM config puts behind
    /// this vIOMMU) over guest RAM made of the inclusive ranges `ram`.
    pub fn new(cfg: &IommuConfig, endpoints: &[u32], ram: &[(u64, u64)]) -> Self {
        let mut reserved = cfg.reserved_regions.clone();
        reserved.sort_by_key(|r| r.start);
        let mut sorted: Vec<(u64, u64)> = ram.iter().copied().filter(|r| r.0 <= r.1).collect();
        sorted.sort_unstable();
        // Overlapping ranges are one unit; adjacent ones stay apart.
        let mut units: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
        for (s, e) in sorted {
            match units.last_mut() {
                Some(last) if last.1 >= s => last.1 = last.1.max(e),
                _ => units.push((s, e)),
            }
        }
        let merged = memory_map::merge_adjacent(&units);
        IommuState {
            granule: cfg.granule(),
            input_start: cfg.input_range.start,
            input_end: cfg.input_range.end,
            domain_start: cfg.domain_range.start,
            domain_end: cfg.domain_range.end,
            limits: cfg.limits,
            reserved,
            endpoint_reserved: HashMap::new(),
            ram: merged,
            ram_units: units,
            mmio_windows: Vec::new(),
            replaying: false,
            endpoints: endpoints.iter().map(|&e| (e, None)).collect(),
            domains: DomainMap::default(),
            total_mappings: 0,
            acked: 0,
            unattached_bypass: false,
            scratch: Vec::new(),
            endpoint_formats: HashMap::new(),
            pasid_bits: cfg.nested.as_ref().map_or(0, |n| n.pasid_bits),
        }
    }

    /// Records the features the driver accepted; requests and flags that
    /// need a feature are refused without it.
    pub fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked;
    }

    /// Sets whether endpoints attached to no domain bypass translation (the
    /// device derives this from `bypass` / BYPASS_CONFIG or legacy BYPASS).
    pub fn set_unattached_bypass(&mut self, bypass: bool) {
        self.unattached_bypass = bypass;
    }

    /// Whether unattached endpoints are in bypass mode.
    pub fn unattached_bypass(&self) -> bool {
        self.unattached_bypass
    }

    /// Device reset: "When the device is reset, endpoints are not attached
    /// to any domain" (spec 5.13.5); every domain and mapping is gone.
    pub fn reset(&mut self) {
        for d in self.endpoints.values_mut() {
            *d = None;
        }
        self.domains.clear();
        self.total_mappings = 0;
        self.acked = 0;
    }

    /// The endpoint's attachment, `None` if the endpoint is unknown.
    pub fn endpoint(&self, ep: u32) -> Option<EndpointInfo> {
        self.endpoints
            .get(&ep)
            .map(|&domain| EndpointInfo { domain })
    }

    /// Number of live domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Number of mappings in `domain` (0 for bypass or unknown domains).
    pub fn mapping_count(&self, domain: u32) -> usize {
        match self.domains.get(&domain).map(|d| &d.kind) {
            Some(DomainKind::Mapped(t)) => t.len(),
            _ => 0,
        }
    }

    /// Total mappings over all domains.
    pub fn total_mappings(&self) -> u64 {
        self.total_mappings
    }

    /// Whether `domain` exists and is a bypass domain.
    pub fn is_bypass_domain(&self, domain: u32) -> Option<bool> {
        self.domains
            .get(&domain)
            .map(|d| matches!(d.kind, DomainKind::Bypass))
    }

    /// The endpoints attached to `domain`.
    pub fn domain_endpoints(&self, domain: u32) -> &[u32] {
        self.domains
            .get(&domain)
            .map(|d| d.endpoints.as_slice())
            .unwrap_or(&[])
    }

    /// The mappings of `domain` in IOVA order.
    pub fn mappings(&self, domain: u32) -> Vec<Mapping> {
        match self.domains.get(&domain).map(|d| &d.kind) {
            Some(DomainKind::Mapped(t)) => t.iter().collect(),
            _ => Vec::new(),
        }
    }

    /// Whether some domain may hold enough mappings that warming their
    /// lookups ahead of a pass ([`IommuState::warm_mappings`]) pays.
    pub(crate) fn warming_pays(&self) -> bool {
        self.total_mappings >= WARM_MIN_MAPPINGS as u64
    }

    /// Warms the mapping-table lookups that MAPs and UNMAPs at `hints`
    /// (domain, IOVA) will make, in two rounds over each group of them
    /// (see [`MappingTable::warm_directory`]). Hints are only hints: a
    /// domain that does not exist or has no mapping table is skipped, and
    /// nothing changes.
    ///
    /// Each hint's slot goes into `slots` (same length), for
    /// [`IommuState::hint_slot`] just before its request.
    pub(crate) fn warm_mappings(&self, hints: &[(u32, u64)], slots: &mut [Option<u32>]) {
        const GROUP: usize = 64;
        // Requests of one pass mostly name one domain.
        let mut last: Option<(u32, Option<&MappingTable>)> = None;
        let mut table = |d: u32| match last {
            Some((id, t)) if id == d => t,
            _ => {
                let t = match self.domains.get(&d).map(|d| &d.kind) {
                    Some(DomainKind::Mapped(t)) => Some(&**t),
                    _ => None,
                };
                last = Some((d, t));
                t
            }
        };
        for (group, slots) in hints.chunks(GROUP).zip(slots.chunks_mut(GROUP)) {
            let mut leaves = [None; GROUP];
            for (leaf, &(d, addr)) in leaves.iter_mut().zip(group) {
                *leaf = table(d).and_then(|t| t.warm_directory(addr));
            }
            for ((leaf, &(d, addr)), slot) in leaves.iter().zip(group).zip(slots) {
                *slot = match (*leaf, table(d)) {
                    (Some(leaf), Some(t)) => t.warm_chunk(addr, leaf),
                    _ => None,
                };
            }
        }
    }

    /// Tells `domain`'s mapping table that its next MAP or UNMAP is at
    /// `slot` (found by [`IommuState::warm_mappings`]): the change then
    /// checks that slot before it searches the directory. Only a hint.
    pub(crate) fn hint_slot(&mut self, domain: u32, slot: u32) {
        if let Some(DomainKind::Mapped(t)) = self.domains.get_mut(&domain).map(|d| &mut d.kind) {
            t.hint_slot(slot);
        }
    }

    /// The mappings the last successful UNMAP removed (for backends).
    pub fn last_removed(&self) -> &[Mapping] {
        &self.scratch
    }

    /// Heap bytes held by mapping arrays (memory accounting).
    pub fn mapping_bytes(&self) -> usize {
        self.domains
            .values()
            .map(|d| match &d.kind {
                DomainKind::Mapped(t) => t.chunk_bytes(),
                DomainKind::Bypass | DomainKind::Table(_) => 0,
            })
            .sum()
    }

    fn check_domain_range(&self, domain: u32) -> Result<(), RequestError> {
        if domain < self.domain_start || domain > self.domain_end {
            return Err(RequestError::DomainOutOfRange {
                domain,
                start: self.domain_start,
                end: self.domain_end,
            });
        }
        Ok(())
    }

    /// ATTACH. Returns `true` if the endpoint's translation changed (it was
    /// attached elsewhere, or newly attached), so cached translations of it
    /// must be dropped.
    pub fn attach(&mut self, r: &AttachReq) -> Result<bool, RequestError> {
        // spec 5.13.6.3.2: "If the reserved field of an ATTACH request is not
        // zero, the device MUST reject the request and set status to
        // VIRTIO_IOMMU_S_INVAL."
        if r.reserved != [0; 4] {
            return Err(RequestError::ReservedNotZero { request: "ATTACH" });
        }
        // spec 5.13.6.3.2: "If the device does not recognize a flags bit, it
        // MUST reject the request" — F_BYPASS is known only with BYPASS_CONFIG.
        let known = if feature(self.acked, VIRTIO_IOMMU_F_BYPASS_CONFIG) {
            VIRTIO_IOMMU_ATTACH_F_BYPASS
        } else {
            0
        };
        if r.flags & !known != 0 {
            return Err(RequestError::UnknownFlags {
                request: "ATTACH",
                flags: r.flags,
                unknown: r.flags & !known,
            });
        }
        // spec 5.13.6.3.2: "If the endpoint identified by endpoint doesn't
        // exist, the device MUST reject the request and set status to NOENT."
        let current = *self
            .endpoints
            .get(&r.endpoint)
            .ok_or(RequestError::UnknownEndpoint(r.endpoint))?;
        self.check_domain_range(r.domain)?;
        let bypass = r.flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0;
        match self.domains.get(&r.domain) {
            Some(Domain {
                kind: DomainKind::Table(_),
                ..
            }) => {
                // Nested extension: a table domain is joined with
                // ATTACH_TABLE only, so that the joining endpoint's format
                // is checked.
                return Err(RequestError::TableDomain {
                    request: "ATTACH",
                    domain: r.domain,
                });
            }
            Some(d) => {
                // spec 5.13.6.3.2: "If the domain already exists and the
                // ATTACH_F_BYPASS flag is not consistent with that domain, the
                // device SHOULD reject the request and set status to INVAL."
                if matches!(d.kind, DomainKind::Bypass) != bypass {
                    return Err(RequestError::BypassMismatch {
                        domain: r.domain,
                        flag: bypass,
                    });
                }
                if current == Some(r.domain) {
                    return Ok(false);
                }
                // The MAP rule for reserved regions (spec, PROBE
                // properties / RESV_MEM: "The device SHOULD reject a MAP
                // request that overlaps a RESV_MEM region") holds for every
                // endpoint of a domain; a domain that already maps over the
                // joining endpoint's own regions could not honour them, so
                // the ATTACH is refused with RANGE, as such a MAP would be.
                // Every endpoint has the device-wide regions, which the
                // domain's mappings already avoid.
                if let (DomainKind::Mapped(t), Some(own)) =
                    (&d.kind, self.endpoint_reserved.get(&r.endpoint))
                {
                    if let Some(resv) = own.merged.iter().find(|x| t.overlaps(x.start, x.end)) {
                        return Err(RequestError::AttachOverlapsReserved {
                            endpoint: r.endpoint,
                            domain: r.domain,
                            resv_start: resv.start,
                            resv_end: resv.end,
                        });
                    }
                }
            }
            None => self.check_new_domain(current)?,
        }
        self.join(r.endpoint, current, r.domain, || {
            if bypass {
                DomainKind::Bypass
            } else {
                DomainKind::Mapped(Box::new(MappingTable::new()))
            }
        });
        Ok(true)
    }

    /// Whether a new domain fits `max_domains` once the endpoint has left
    /// `current` (which ends that domain if it was its last endpoint).
    fn check_new_domain(&self, current: Option<u32>) -> Result<(), RequestError> {
        let frees_one = current
            .and_then(|old| self.domains.get(&old))
            .is_some_and(|d| d.endpoints.len() == 1);
        let after = self.domains.len() + 1 - usize::from(frees_one);
        if after > self.limits.max_domains as usize {
            return Err(RequestError::Limit("max_domains"));
        }
        Ok(())
    }

    /// Moves `ep` from `current` into `domain`, creating it with `kind` if
    /// it does not exist. spec 5.13.6.3.2: "If the endpoint is already
    /// attached to another domain, then the device SHOULD first detach it
    /// from that domain and attach it to the one identified by domain."
    fn join(
        &mut self,
        ep: u32,
        current: Option<u32>,
        domain: u32,
        kind: impl FnOnce() -> DomainKind,
    ) {
        if let Some(old) = current {
            self.detach_endpoint(ep, old);
        }
        let dom = self.domains.get_or_insert_with(domain, || Domain {
            kind: kind(),
            endpoints: Vec::new(),
        });
        dom.endpoints.push(ep);
        self.endpoints.insert(ep, Some(domain));
    }

    /// Removes `ep` from `domain`, ending the domain at its last endpoint.
    fn detach_endpoint(&mut self, ep: u32, domain: u32) {
        self.endpoints.insert(ep, None);
        let Some(d) = self.domains.get_mut(&domain) else {
            return;
        };
        d.endpoints.retain(|&e| e != ep);
        if d.endpoints.is_empty() {
            // spec 5.13.6.4: "After all endpoints have been successfully
            // detached from a domain, it ceases to exist".
            if let Some(Domain {
                kind: DomainKind::Mapped(t),
                ..
            }) = self.domains.remove(&domain)
            {
                self.total_mappings -= t.len() as u64;
            }
        }
    }

    /// DETACH. The reserved bytes are not looked at: "The device MUST
    /// ignore reserved" (spec 5.13.6.4.2).
    pub fn detach(&mut self, r: &DetachReq) -> Result<(), RequestError> {
        // spec 5.13.6.4.2: "If the endpoint identified by endpoint doesn't
        // exist, then the device MUST reject the request and set status to
        // VIRTIO_IOMMU_S_NOENT."
        let current = *self
            .endpoints
            .get(&r.endpoint)
            .ok_or(RequestError::UnknownEndpoint(r.endpoint))?;
        // spec 5.13.6.4.2: "If the domain doesn't exist, or if the endpoint
        // isn't attached to this domain, then the device MAY set INVAL."
        if current != Some(r.domain) {
            return Err(RequestError::NotAttached {
                endpoint: r.endpoint,
                domain: r.domain,
            });
        }
        self.detach_endpoint(r.endpoint, r.domain);
        Ok(())
    }

    fn map_unmap_negotiated(&self, request: &'static str) -> Result<(), RequestError> {
        // spec 5.13.6.5: "This request is only available when
        // VIRTIO_IOMMU_F_MAP_UNMAP has been negotiated."
        if !feature(self.acked, VIRTIO_IOMMU_F_MAP_UNMAP) {
            return Err(RequestError::FeatureNotNegotiated {
                request,
                feature: VIRTIO_IOMMU_F_MAP_UNMAP,
            });
        }
        Ok(())
    }

    /// MAP.
    pub fn map(&mut self, r: &MapReq) -> Result<(), RequestError> {
        self.map_unmap_negotiated("MAP")?;
        // spec 5.13.6.5.2: "If the device doesn't recognize a flags bit, it
        // MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL."
        // MMIO is recognized only once VIRTIO_IOMMU_F_MMIO is negotiated.
        let mut known = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
        if feature(self.acked, VIRTIO_IOMMU_F_MMIO) {
            known |= VIRTIO_IOMMU_MAP_F_MMIO;
        }
        if r.flags & !known != 0 {
            return Err(RequestError::UnknownFlags {
                request: "MAP",
                flags: r.flags,
                unknown: r.flags & !known,
            });
        }
        self.check_domain_range(r.domain)?;
        // spec 5.13.6.5.2: "If domain does not exist, the device SHOULD reject
        // the request and set status to VIRTIO_IOMMU_S_NOENT."
        // One lookup of the domain, with disjoint borrows of the fields the
        // address checks read.
        let IommuState {
            domains,
            reserved,
            endpoint_reserved,
            granule,
            input_start,
            input_end,
            limits,
            total_mappings,
            mmio_windows,
            replaying,
            ..
        } = self;
        let dom = domains
            .get_mut(&r.domain)
            .ok_or(RequestError::UnknownDomain(r.domain))?;
        // spec 5.13.6.5.2: "If the domain is a bypass domain, the device
        // SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
        let table = match &mut dom.kind {
            DomainKind::Mapped(t) => t,
            DomainKind::Bypass => {
                return Err(RequestError::BypassDomain {
                    request: "MAP",
                    domain: r.domain,
                })
            }
            // Nested extension: the guest's tables translate a table
            // domain; MAP/UNMAP on it is INVAL.
            DomainKind::Table(_) => {
                return Err(RequestError::TableDomain {
                    request: "MAP",
                    domain: r.domain,
                })
            }
        };
        // spec 5.13.6.5.1: "virt_end MUST be strictly greater than virt_start."
        if r.virt_end <= r.virt_start {
            return Err(RequestError::EndBelowStart {
                request: "MAP",
                start: r.virt_start,
                end: r.virt_end,
            });
        }
        // spec 5.13.6.5.2: "If virt_start, phys_start or (virt_end + 1) is not
        // aligned on the page granularity, the device SHOULD reject the
        // request and set status to VIRTIO_IOMMU_S_RANGE."
        let mask = *granule - 1;
        // `virt_end + 1` wraps to 0 at u64::MAX, which is aligned.
        let end_plus_one = r.virt_end.wrapping_add(1);
        // One test for the three; which one failed is worked out only on
        // the way to the refusal.
        if (r.virt_start | r.phys_start | end_plus_one) & mask != 0 {
            return Err(misaligned(r, *granule));
        }
        // spec 5.13.6.5: "Any mapping request to virtual addresses outside of
        // this range fails."
        if r.virt_start < *input_start || r.virt_end > *input_end {
            return Err(RequestError::OutsideInputRange {
                start: r.virt_start,
                end: r.virt_end,
                min: *input_start,
                max: *input_end,
            });
        }
        // phys_end = phys_start + virt_end - virt_start must not wrap. It may
        // leave guest RAM: spec 5.13.6.5 asks the *driver* to keep it "within
        // the guest-physical address space", and Linux's identity domains
        // (no bypass feature) map the whole input range one to one, MMIO
        // gap and all. Nothing but RAM answers there, so a DMA that reaches
        // such an address fails when it happens, as on a bus.
        let span = r.virt_end - r.virt_start;
        let Some(phys_end) = r.phys_start.checked_add(span) else {
            return Err(RequestError::PhysWraps {
                phys: r.phys_start,
                size: span.wrapping_add(1),
            });
        };
        // MAP_F_MMIO "is a memory type rather than a protection flag"
        // (spec 5.13.6.5): the endpoint's accesses go to another device's
        // registers. Only MMIO the VMM registered as a DMA target can be
        // reached (a VFIO BAR it mmapped, an irqchip doorbell it serves);
        // anything else would be DMA into nothing, so the MAP is refused
        // rather than left to fault later.
        if r.flags & VIRTIO_IOMMU_MAP_F_MMIO != 0
            && !*replaying
            && !memory_map::windows_cover(mmio_windows, r.phys_start, phys_end)
        {
            return Err(RequestError::MmioOutsideWindows {
                start: r.phys_start,
                end: phys_end,
            });
        }
        // spec 5.13.6.6.2.2: "The device SHOULD reject a MAP request that
        // overlaps a RESV_MEM region." Regions are per endpoint: the
        // domain maps for all its endpoints, so it honours each one's
        // (the device-wide list once, as every endpoint has it).
        // No endpoint with a list of its own (the usual case): the
        // device-wide list is every endpoint's, checked once, with no
        // lookup per endpoint.
        let resv = if endpoint_reserved.is_empty() {
            first_overlap(reserved, r.virt_start, r.virt_end)
        } else {
            let mut default_checked = false;
            dom.endpoints.iter().find_map(|ep| {
                let list = match endpoint_reserved.get(ep) {
                    Some(own) => &own.merged,
                    None if default_checked => return None,
                    None => {
                        default_checked = true;
                        &*reserved
                    }
                };
                first_overlap(list, r.virt_start, r.virt_end)
            })
        };
        if let Some(resv) = resv {
            return Err(RequestError::OverlapsReserved {
                start: r.virt_start,
                end: r.virt_end,
                resv_start: resv.start,
                resv_end: resv.end,
            });
        }
        let (max_per_domain, max_total) = (limits.max_mappings_per_domain, limits.max_mappings);
        let total = *total_mappings;
        // spec 5.13.6.5.2: "If a mapping already exists in the requested
        // range, the device SHOULD reject the request and set status to
        // VIRTIO_IOMMU_S_INVAL." Overlap is reported before a full table.
        // Built only when refused: a value built up front is dropped on
        // every successful MAP, an out-of-line `drop_in_place` call.
        let overlap = || RequestError::OverlapsMapping {
            start: r.virt_start,
            end: r.virt_end,
        };
        let full = if table.len() as u64 >= max_per_domain {
            Some("max_mappings_per_domain")
        } else if total >= max_total {
            Some("max_mappings")
        } else {
            None
        };
        if let Some(limit) = full {
            if table.overlaps(r.virt_start, r.virt_end) {
                return Err(overlap());
            }
            return Err(RequestError::Limit(limit));
        }
        if !table.try_insert(Mapping {
            start: r.virt_start,
            end: r.virt_end,
            phys: r.phys_start,
            flags: r.flags,
        }) {
            return Err(overlap());
        }
        *total_mappings += 1;
        Ok(())
    }

    /// UNMAP. Returns the number of mappings removed.
    pub fn unmap(&mut self, r: &UnmapReq) -> Result<usize, RequestError> {
        self.map_unmap_negotiated("UNMAP")?;
        // spec 5.13.6.6.2: "If the reserved field of an UNMAP request is not
        // zero, the device MAY set the request status to INVAL" — we do, and
        // leave the mappings alone.
        if r.reserved != [0; 4] {
            return Err(RequestError::ReservedNotZero { request: "UNMAP" });
        }
        self.check_domain_range(r.domain)?;
        // Disjoint borrows: the removed mappings go straight into the
        // scratch list while the domain is borrowed.
        let IommuState {
            domains,
            scratch,
            total_mappings,
            ..
        } = self;
        // spec 5.13.6.6.2: "If domain does not exist, the device SHOULD set
        // the request status to VIRTIO_IOMMU_S_NOENT."
        let dom = domains
            .get_mut(&r.domain)
            .ok_or(RequestError::UnknownDomain(r.domain))?;
        let table = match &mut dom.kind {
            // spec 5.13.6.6.2: "If the domain is a bypass domain, the device
            // SHOULD reject the request and set status to INVAL."
            DomainKind::Bypass => {
                return Err(RequestError::BypassDomain {
                    request: "UNMAP",
                    domain: r.domain,
                })
            }
            DomainKind::Table(_) => {
                return Err(RequestError::TableDomain {
                    request: "UNMAP",
                    domain: r.domain,
                })
            }
            DomainKind::Mapped(t) => t,
        };
        if r.virt_end < r.virt_start {
            return Err(RequestError::EndBelowStart {
                request: "UNMAP",
                start: r.virt_start,
                end: r.virt_end,
            });
        }
        // spec 5.13.6.6.2: "If a mapping affected by the range is not covered
        // in its entirety by the range (the UNMAP request would split the
        // mapping), then the device SHOULD set the request status to
        // VIRTIO_IOMMU_S_RANGE, and SHOULD NOT remove any mapping."
        scratch.clear();
        let res = table.remove_range(r.virt_start, r.virt_end, scratch);
        let n = scratch.len();
        match res {
            Ok(()) => {
                *total_mappings -= n as u64;
                Ok(n)
            }
            Err(e) => Err(RequestError::WouldSplit {
                start: r.virt_start,
                end: r.virt_end,
                map_start: e.mapping.start,
                map_end: e.mapping.end,
            }),
        }
    }

    /// PROBE: the reserved regions to report for the endpoint.
    pub fn probe(&self, r: &ProbeReq) -> Result<&[ReservedRegion], RequestError> {
        // spec 5.13.6.7.2: "If the endpoint identified by endpoint doesn't
        // exist, then the device SHOULD reject the request and set status to
        // VIRTIO_IOMMU_S_NOENT."
        if !self.endpoints.contains_key(&r.endpoint) {
            return Err(RequestError::UnknownEndpoint(r.endpoint));
        }
        Ok(self.endpoint_reserved_regions(r.endpoint))
    }

    /// Translates `iova` for an access by `ep` with `access` bits
    /// (`ACCESS_READ` / `ACCESS_WRITE`).
    pub fn translate(&self, ep: u32, iova: u64, access: u32) -> Result<Translation, FaultReason> {
        let Some(&attached) = self.endpoints.get(&ep) else {
            return Err(FaultReason::Unknown);
        };
        let Some(domain) = attached else {
            // spec 5.13.6: "The device SHOULD NOT let unattached endpoints
            // that are not in bypass mode access the guest-physical address
            // space."
            return if self.unattached_bypass {
                Ok(Translation::IDENTITY)
            } else {
                Err(FaultReason::Domain)
            };
        };
        let table = match self.domains.get(&domain).map(|d| &d.kind) {
            Some(DomainKind::Mapped(t)) => t,
            Some(DomainKind::Bypass) => return Ok(Translation::IDENTITY),
            // The software nested IOMMU translates table domains; this
            // MAP-mode path has nothing to offer them.
            Some(DomainKind::Table(_)) | None => return Err(FaultReason::Domain),
        };
        let m = table.find(iova).ok_or(FaultReason::Mapping)?;
        let perm = m.flags & (ACCESS_READ | ACCESS_WRITE);
        // spec 5.13.6.5.2: "The device MUST NOT allow writes to a range mapped
        // without the VIRTIO_IOMMU_MAP_F_WRITE flag." Reads need READ too.
        if access & !perm != 0 {
            return Err(FaultReason::Mapping);
        }
        Ok(Translation {
            iova_start: m.start,
            iova_last: m.end,
            phys_start: m.phys,
            perm,
        })
    }

    /// The device-wide reserved regions (the config's), which every
    /// endpoint has.
    pub fn reserved_regions(&self) -> &[ReservedRegion] {
        &self.reserved
    }

    /// The reserved regions of endpoint `ep`, as its PROBE reports them
    /// and MAP honours them: the device-wide ones, the VMM's for it
    /// ([`Self::set_endpoint_reserved`]) and its host's IOVA holes
    /// ([`Self::set_host_reserved`]); sorted and disjoint. An unknown
    /// endpoint has the device-wide ones.
    pub fn endpoint_reserved_regions(&self, ep: u32) -> &[ReservedRegion] {
        self.endpoint_reserved
            .get(&ep)
            .map_or(&self.reserved, |own| &own.merged)
    }

    /// The VMM's own reserved regions of endpoint `ep`
    /// ([`Self::set_endpoint_reserved`]), without the device-wide ones
    /// and the host's holes.
    pub fn endpoint_extra_reserved(&self, ep: u32) -> &[ReservedRegion] {
        self.endpoint_reserved
            .get(&ep)
            .map_or(&[], |own| own.extra.as_slice())
    }

    /// Sets the VMM's own reserved regions of endpoint `ep` (in addition
    /// to the device-wide ones; an empty list drops them). Refused, with
    /// nothing changed, if a region is inverted, two of the endpoint's
    /// regions overlap or name two MSI regions, or the endpoint's domain
    /// already maps IOVAs in one (the domain could not honour it).
    pub fn set_endpoint_reserved(
        &mut self,
        ep: u32,
        regions: &[ReservedRegion],
    ) -> Result<(), ReservedRegionError> {
        if !self.endpoints.contains_key(&ep) {
            return Err(ReservedRegionError::UnknownEndpoint(ep));
        }
        let mut extra = regions.to_vec();
        extra.sort_by_key(|r| r.start);
        if let Some(r) = extra.iter().find(|r| r.start > r.end) {
            return Err(ReservedRegionError::Inverted {
                endpoint: ep,
                start: r.start,
                end: r.end,
            });
        }
        let mut all: Vec<ReservedRegion> = self.reserved.iter().chain(&extra).copied().collect();
        all.sort_by_key(|r| r.start);
        // spec, PROBE properties / RESV_MEM: "The device SHOULD NOT
        // present more than one VIRTIO_IOMMU_RESV_MEM_T_MSI property per
        // endpoint." and "SHOULD NOT present multiple RESV_MEM properties
        // that overlap each other for the same endpoint."
        if all.iter().filter(|r| r.kind == ReservedKind::Msi).count() > 1 {
            return Err(ReservedRegionError::SecondMsi(ep));
        }
        if let Some(w) = all.windows(2).find(|w| w[1].start <= w[0].end) {
            return Err(ReservedRegionError::Overlap {
                endpoint: ep,
                start: w[1].start,
                end: w[1].end,
                other_start: w[0].start,
                other_end: w[0].end,
            });
        }
        let host = self
            .endpoint_reserved
            .get(&ep)
            .map(|own| own.host.clone())
            .unwrap_or_default();
        self.replace_endpoint_reserved(ep, extra, host)
    }

    /// Sets the IOVA holes the host IOMMU leaves endpoint `ep` (inclusive
    /// ranges, from its backend's [`crate::backend::BackendCaps`]): the
    /// parts inside the input range that the VMM's regions leave free
    /// become RESV_MEM regions of type RESERVED. Refused, with nothing
    /// changed, if the endpoint's domain already maps IOVAs in one.
    pub fn set_host_reserved(
        &mut self,
        ep: u32,
        holes: &[(u64, u64)],
    ) -> Result<(), ReservedRegionError> {
        if !self.endpoints.contains_key(&ep) {
            return Err(ReservedRegionError::UnknownEndpoint(ep));
        }
        let extra = self
            .endpoint_reserved
            .get(&ep)
            .map(|own| own.extra.clone())
            .unwrap_or_default();
        self.replace_endpoint_reserved(ep, extra, holes.to_vec())
    }

    /// Installs an endpoint's own regions after checking that its domain
    /// (if any) maps nothing in them.
    fn replace_endpoint_reserved(
        &mut self,
        ep: u32,
        extra: Vec<ReservedRegion>,
        host: Vec<(u64, u64)>,
    ) -> Result<(), ReservedRegionError> {
        if extra.is_empty() && host.is_empty() {
            self.endpoint_reserved.remove(&ep);
            return Ok(());
        }
        let mut base: Vec<ReservedRegion> = self.reserved.iter().chain(&extra).copied().collect();
        base.sort_by_key(|r| r.start);
        let merged = merge_host_holes(&base, &host, self.input_start, self.input_end);
        if let Some(dom) = self.endpoints.get(&ep).copied().flatten() {
            if let Some(DomainKind::Mapped(t)) = self.domains.get(&dom).map(|d| &d.kind) {
                if let Some(r) = merged.iter().find(|r| t.overlaps(r.start, r.end)) {
                    return Err(ReservedRegionError::Mapped {
                        endpoint: ep,
                        domain: dom,
                        start: r.start,
                        end: r.end,
                    });
                }
            }
        }
        self.endpoint_reserved.insert(
            ep,
            EndpointReserved {
                extra,
                host,
                merged,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod warm_tests {
    use super::*;

    #[test]
    fn warming_pays_past_its_bound_and_any_hint_is_harmless() {
        let mut st = IommuState::new(&IommuConfig::default(), &[1, 2], &[(0, 1 << 40)]);
        st.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP | 1 << VIRTIO_IOMMU_F_BYPASS_CONFIG);
        let attach = |domain, endpoint, flags| AttachReq {
            domain,
            endpoint,
            flags,
            reserved: [0; 4],
        };
        st.attach(&attach(1, 1, 0)).unwrap();
        st.attach(&attach(2, 2, VIRTIO_IOMMU_ATTACH_F_BYPASS))
            .unwrap();
        let map = |i: u64| MapReq {
            domain: 1,
            virt_start: 0x1_0000_0000 + 2 * i * 0x1000,
            virt_end: 0x1_0000_0000 + 2 * i * 0x1000 + 0xfff,
            phys_start: i * 0x1000,
            flags: VIRTIO_IOMMU_MAP_F_READ,
        };
        let n = WARM_MIN_MAPPINGS as u64;
        for i in 0..n - 1 {
            st.map(&map(i)).unwrap();
        }
        assert!(!st.warming_pays());
        st.map(&map(n - 1)).unwrap();
        assert!(st.warming_pays());
        let before = st.mappings(1);
        // Mapped, bypass and unknown domains; addresses anywhere; more
        // hints than one group.
        let hints: Vec<(u32, u64)> = (0..200u64)
            .map(|i| match i % 4 {
                0 => (1, 0x1_0000_0000 + i * 0x3000),
                1 => (2, i),
                2 => (7, u64::MAX - i),
                _ => (1, u64::MAX - i),
            })
            .collect();
        let mut slots = vec![None; hints.len()];
        st.warm_mappings(&hints, &mut slots);
        for (&(d, _), &slot) in hints.iter().zip(&slots) {
            st.hint_slot(d, slot.unwrap_or(u32::MAX));
        }
        assert_eq!(st.mappings(1), before, "warming changes no mapping");
    }
}

#[cfg(test)]
mod request_path_tests {
    use super::*;

    fn state() -> IommuState {
        let mut st = IommuState::new(&IommuConfig::default(), &[1, 2], &[(0, 1 << 40)]);
        st.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
        st
    }

    fn attach(domain: u32, endpoint: u32) -> AttachReq {
        AttachReq {
            domain,
            endpoint,
            flags: 0,
            reserved: [0; 4],
        }
    }

    fn map(domain: u32, virt_start: u64, virt_end: u64, phys_start: u64) -> MapReq {
        MapReq {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags: VIRTIO_IOMMU_MAP_F_READ,
        }
    }

    #[test]
    fn a_misaligned_map_names_the_first_misaligned_address() {
        // spec 5.13.6.5.2: "If virt_start, phys_start or (virt_end + 1) is
        // not aligned on the page granularity, the device SHOULD reject the
        // request and set status to VIRTIO_IOMMU_S_RANGE."
        let mut st = state();
        st.attach(&attach(1, 1)).unwrap();
        let mut field = |r: MapReq| match st.map(&r) {
            Err(e @ RequestError::Misaligned { field, .. }) => {
                assert_eq!(e.status(), Status::Range);
                Some(field)
            }
            _ => None,
        };
        assert_eq!(field(map(1, 0x1800, 0x2fff, 0x5000)), Some("virt_start"));
        assert_eq!(field(map(1, 0x1800, 0x27ff, 0x5800)), Some("virt_start"));
        assert_eq!(field(map(1, 0x1000, 0x1fff, 0x5008)), Some("phys_start"));
        assert_eq!(field(map(1, 0x1000, 0x1ffe, 0x5000)), Some("virt_end + 1"));
        // virt_end + 1 wraps to 0 at the top of the address space, which
        // is aligned: that MAP is refused for its range, not its alignment.
        assert_eq!(field(map(1, u64::MAX - 0xfff, u64::MAX, 0x5000)), None);
        assert!(matches!(
            st.map(&map(1, u64::MAX - 0xfff, u64::MAX, 0x5000)),
            Err(RequestError::OutsideInputRange { .. })
        ));
        assert_eq!(st.mapping_count(1), 0);
    }

    #[test]
    fn map_and_unmap_reach_the_domain_they_name_after_domains_come_and_go() {
        // The request path remembers the last domain it used: a freed
        // domain must not answer for its ID, nor its slot for another ID.
        let mut st = state();
        st.attach(&attach(1, 1)).unwrap();
        st.map(&map(1, 0x1000, 0x1fff, 0x5000)).unwrap();
        st.attach(&attach(2, 2)).unwrap();
        st.map(&map(2, 0x1000, 0x1fff, 0x6000)).unwrap();
        // Endpoint 1 leaves domain 1, which goes with its mapping.
        st.attach(&attach(3, 1)).unwrap();
        let unmap = |domain| UnmapReq {
            domain,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            reserved: [0; 4],
        };
        assert_eq!(st.unmap(&unmap(1)), Err(RequestError::UnknownDomain(1)));
        assert_eq!(
            st.map(&map(1, 0x1000, 0x1fff, 0x5000)),
            Err(RequestError::UnknownDomain(1))
        );
        // Domain 3 took the freed slot; it starts empty.
        assert_eq!(st.mapping_count(3), 0);
        assert_eq!(st.unmap(&unmap(3)), Ok(0));
        st.map(&map(3, 0x1000, 0x1fff, 0x7000)).unwrap();
        assert_eq!(st.unmap(&unmap(2)), Ok(1));
        assert_eq!(st.last_removed()[0].phys, 0x6000);
        assert_eq!(st.unmap(&unmap(3)), Ok(1));
        assert_eq!(st.last_removed()[0].phys, 0x7000);
        assert_eq!(st.total_mappings(), 0);
    }
}
