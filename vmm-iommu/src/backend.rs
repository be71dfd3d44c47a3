//! The seam between the vIOMMU and whatever really translates DMA: the
//! [`IommuBackend`] trait, implemented by the software nested IOMMU
//! ([`crate::emulated`]) for emulated devices and by the VFIO / iommufd
//! backends of `vfio-passthrough` for assigned ones.
//!
//! The vIOMMU state decides (every spec rule is checked before a backend
//! hears of a request); a backend only carries out. Both binding models fit
//! [`IommuBackend::bind_table`]: table passthrough (SMMUv3, the host STE
//! points at the guest's CD table) and per-PASID shadowing (VT-d, the
//! backend reads the guest PASID table and binds each valid entry; a
//! PASID-cache invalidation makes it re-read the entry).

use std::any::Any;

use crate::invalidation::Invalidation;
use crate::mapping::Mapping;
use crate::wire::{Status, TableDesc};

/// A virtio-iommu endpoint ID.
pub type EndpointId = u32;
/// A virtio-iommu domain ID.
pub type DomainId = u32;

/// What a backend can do for one endpoint; the device advertises the
/// intersection with the config in PROBE, so the guest never asks for
/// what the backend cannot do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendCaps {
    /// Page sizes the backend can map (MAP mode) or walk (nested).
    pub page_size_mask: u64,
    /// Inclusive IOVA range it translates.
    pub input_range: (u64, u64),
    /// Output (guest-physical) address bits.
    pub output_bits: u8,
    /// PASID width, 0 without PASID support.
    pub pasid_bits: u8,
    /// Table formats it can bind (`PGTF_*` / `PSTF_*`).
    pub table_formats: Vec<u16>,
    /// Whether it can report recoverable (page-request) faults.
    pub page_requests: bool,
    /// IOVA ranges (inclusive, sorted, disjoint) the host cannot map for
    /// this endpoint: the holes between a VFIO type1 container's usable
    /// IOVA ranges, an iommufd device's reserved regions (the MSI window,
    /// RMRRs). The vIOMMU reports each as a RESV_MEM property of type
    /// RESERVED in the endpoint's PROBE and refuses MAPs over it, as
    /// QEMU's virtio-iommu does, so the guest never asks the host for a
    /// mapping it would refuse.
    pub reserved_ranges: Vec<(u64, u64)>,
}

impl BackendCaps {
    /// Caps of a backend that only does MAP mode.
    pub fn map_only(page_size_mask: u64, input_range: (u64, u64)) -> Self {
        BackendCaps {
            page_size_mask,
            input_range,
            output_bits: 52,
            pasid_bits: 0,
            table_formats: Vec::new(),
            page_requests: false,
            reserved_ranges: Vec::new(),
        }
    }
}

/// The domain an endpoint joins, as a backend needs to see it.
#[derive(Clone, Copy, Debug)]
pub struct DomainView<'a> {
    /// Domain ID.
    pub id: DomainId,
    /// Whether the domain is a bypass (identity) domain.
    pub bypass: bool,
    /// The mappings a MAP-mode domain already holds, to replay.
    pub mappings: &'a [Mapping],
    /// The bound table of a nested domain.
    pub table: Option<&'a TableDesc>,
}

/// A table bound to a domain by ATTACH_TABLE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableBinding {
    /// Domain ID.
    pub domain: DomainId,
    /// The guest's table.
    pub table: TableDesc,
}

/// A guest-physical range and the host memory the VMM mapped behind it:
/// what a backend pins for an assigned device's DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes, at least one.
    pub len: u64,
    /// Host virtual address of `gpa`.
    pub hva: u64,
}

impl HostRange {
    /// The last guest-physical address of the range.
    pub fn last(&self) -> u64 {
        self.gpa.saturating_add(self.len.saturating_sub(1))
    }
}

/// Guest RAM plugged or unplugged while the guest runs, as a backend hears
/// of it ([`IommuBackend::add_ram`], [`IommuBackend::remove_ram`]).
#[derive(Clone, Copy, Debug)]
pub struct RamChange<'a> {
    /// First guest-physical address of the range.
    pub start: u64,
    /// Last guest-physical address of the range (inclusive).
    pub end: u64,
    /// The host memory behind the range, in address order, covering it
    /// exactly (one entry per guest memory region it crosses).
    pub host: &'a [HostRange],
    /// The guest memory to read guest tables from once the call succeeds:
    /// the VMM's memory object (`vm_memory::GuestMemoryMmap`, or whatever
    /// type the backend was built over), behind `Any` so that the trait
    /// stays usable as `dyn IommuBackend`. A backend that reads guest
    /// memory downcasts it to its own type and refuses (`Invalid`) any
    /// other before changing anything.
    pub memory: &'a dyn Any,
}

/// A guest-physical window of device MMIO that the VMM serves as a DMA
/// target: where a `VIRTIO_IOMMU_MAP_F_MMIO` mapping may point
/// ([`crate::Viommu::add_mmio_window`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioWindow {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes, at least one.
    pub len: u64,
    /// Host virtual address of `gpa` in the VMM's mmap of the device
    /// region (a VFIO BAR), if it has one: an assigned device then reaches
    /// it peer to peer. `None` for MMIO that only the VMM's bus serves (an
    /// emulated device's registers, the irqchip's MSI doorbell): emulated
    /// DMA reaches it through the VMM, an assigned device's faults in the
    /// host IOMMU.
    pub hva: Option<u64>,
}

impl MmioWindow {
    /// The last guest-physical address of the window.
    pub fn last(&self) -> u64 {
        self.gpa.saturating_add(self.len.saturating_sub(1))
    }
}

/// A fault or page request a backend saw, on its way to the eventq.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendFault {
    /// Endpoint.
    pub endpoint: EndpointId,
    /// PASID of the access, if it carried one.
    pub pasid: Option<u32>,
    /// Faulting address.
    pub address: u64,
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// `VIRTIO_IOMMU_FAULT_F_*` access flags (READ, WRITE, EXEC, PRIV).
    pub access_flags: u32,
    /// `Some(group)` for a page request the guest must answer with
    /// PAGE_RESP; `None` for an unrecoverable fault.
    pub page_request: Option<u32>,
    /// For a page request: the last request of its group (the guest
    /// answers the group once it has seen it).
    pub last_page: bool,
}

/// The guest's answer to a page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageResponse {
    /// Endpoint.
    pub endpoint: EndpointId,
    /// PASID, if the request carried one.
    pub pasid: Option<u32>,
    /// Group ID.
    pub grpid: u32,
    /// `VIRTIO_IOMMU_PAGE_RESP_*`.
    pub code: u16,
}

/// Where one page request stands, as a snapshot carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SavedPageRequestState {
    /// Sent to the guest, waiting for PAGE_RESP.
    Pending,
    /// Answered SUCCESS; the device model has not collected the answer.
    Success,
    /// Answered INVALID or FAILURE (or failed by a reset); not collected.
    Failed,
}

/// One page request a backend holds for the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedPageRequest {
    /// Endpoint that sent it.
    pub endpoint: EndpointId,
    /// PASID it carried, if any.
    pub pasid: Option<u32>,
    /// Page-request group the guest answers.
    pub grpid: u32,
    /// Where it stands.
    pub state: SavedPageRequestState,
}

/// The page requests of one backend, for a snapshot: what the guest
/// already saw in fault records (group IDs) and may still answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedPageRequests {
    /// Group ID the next page request gets (the guest sees the sequence).
    pub next_grpid: u32,
    /// Outstanding and answered-but-uncollected requests.
    pub groups: Vec<SavedPageRequest>,
}

/// A backend failure. Guest-caused ones map to the status the guest
/// would get from a real IOMMU; host failures become DEVERR.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend cannot do this for this endpoint (UNSUPP).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A guest-provided value the backend (or the host) refuses (INVAL).
    #[error("invalid: {0}")]
    Invalid(String),
    /// A guest address outside what the backend can reach (RANGE).
    #[error("out of range: {0}")]
    Range(String),
    /// Out of host resources (NOMEM).
    #[error("out of resources: {0}")]
    NoMemory(String),
    /// No such thing (NOENT), e.g. a PAGE_RESP for no pending request.
    #[error("not found: {0}")]
    NotFound(String),
    /// A host call failed (DEVERR).
    #[error("{op} failed: {source}")]
    Host {
        /// What was being done, e.g. `IOMMU_HWPT_INVALIDATE`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A batched host call handled only the first `index` entries.
    #[error("{op} failed at entry {index}: {source}")]
    Partial {
        /// The call.
        op: &'static str,
        /// Entries handled before the failure.
        index: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl BackendError {
    /// The status the guest gets.
    pub fn status(&self) -> Status {
        match self {
            BackendError::Unsupported(_) => Status::Unsupp,
            BackendError::Invalid(_) => Status::Inval,
            BackendError::Range(_) => Status::Range,
            BackendError::NoMemory(_) => Status::NoMem,
            BackendError::NotFound(_) => Status::NoEnt,
            BackendError::Host { .. } | BackendError::Partial { .. } => Status::DevErr,
        }
    }
}

/// One implementation of DMA translation for a set of endpoints.
///
/// Calls come from the request-queue thread with the vIOMMU state already
/// updated-to-be: a call that fails must leave the backend as before it,
/// and the router undoes what earlier backends did. Methods take `&self`
/// because backends are shared with device threads (interior mutability).
///
/// A backend serves the endpoints a [`crate::router::Router`] gives it;
/// the vIOMMU built with [`crate::Viommu::with_router`] calls it after the
/// state accepted a request. A minimal MAP-mode backend:
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use vmm_iommu::backend::{
///     BackendCaps, BackendError, BackendFault, DomainId, DomainView, EndpointId, IommuBackend,
///     PageResponse, TableBinding,
/// };
/// use vmm_iommu::config::IommuConfig;
/// use vmm_iommu::FaultQueue;
/// use vmm_iommu::invalidation::Invalidation;
/// use vmm_iommu::Mapping;
/// use vmm_iommu::Router;
/// use vmm_iommu::wire::{AttachReq, MapReq, Request, VIRTIO_IOMMU_F_MAP_UNMAP};
/// use vmm_iommu::Viommu;
///
/// /// Records the mappings it is asked to make, as a host IOMMU would hold them.
/// #[derive(Default)]
/// struct Recorder {
///     maps: Mutex<Vec<(DomainId, Mapping)>>,
/// }
///
/// impl IommuBackend for Recorder {
///     fn name(&self) -> &str {
///         "recorder"
///     }
///     fn caps(&self, _ep: EndpointId) -> BackendCaps {
///         // 4 KiB and 2 MiB pages over a 48-bit IOVA space.
///         BackendCaps::map_only(1 << 12 | 1 << 21, (0, (1 << 48) - 1))
///     }
///     fn attach(&self, _ep: EndpointId, _dom: &DomainView<'_>) -> Result<(), BackendError> {
///         Ok(())
///     }
///     fn detach(&self, _ep: EndpointId, _dom: DomainId) -> Result<(), BackendError> {
///         Ok(())
///     }
///     fn map(&self, dom: DomainId, m: &Mapping) -> Result<(), BackendError> {
///         self.maps.lock().unwrap().push((dom, *m));
///         Ok(())
///     }
///     fn unmap(&self, dom: DomainId, removed: &[Mapping]) -> Result<(), BackendError> {
///         self.maps.lock().unwrap().retain(|(d, m)| *d != dom || !removed.contains(m));
///         Ok(())
///     }
///     fn bind_table(&self, _ep: EndpointId, _b: &TableBinding) -> Result<(), BackendError> {
///         Err(BackendError::Unsupported("MAP mode only".into()))
///     }
///     fn unbind_table(&self, _ep: EndpointId, _dom: DomainId) -> Result<(), BackendError> {
///         Ok(())
///     }
///     fn invalidate(&self, _dom: DomainId, _batch: &[Invalidation]) -> Result<(), BackendError> {
///         Ok(())
///     }
///     fn page_response(&self, _resp: &PageResponse) -> Result<(), BackendError> {
///         Err(BackendError::NotFound("no page requests here".into()))
///     }
///     fn drain_faults(&self, _out: &mut Vec<BackendFault>) {}
/// }
///
/// // Endpoint 16 is served by the backend.
/// let backend = Arc::new(Recorder::default());
/// let mut router = Router::new();
/// router.add(backend.clone(), &[16]);
/// let cfg = IommuConfig::default();
/// let faults = Arc::new(FaultQueue::new(cfg.limits.max_pending_faults as usize)?);
/// let viommu = Viommu::with_router(&cfg, &[16], &[(0, 0xff_ffff)], faults, router);
/// // The device offers what every backend can map.
/// assert_eq!(viommu.page_size_mask(), cfg.page_size_mask & (1 << 12 | 1 << 21));
///
/// viommu.set_acked_features(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
/// viommu.apply(&Request::Attach(AttachReq { domain: 1, endpoint: 16, ..Default::default() }))?;
/// let map = MapReq { domain: 1, virt_start: 0x1000, virt_end: 0x1fff, phys_start: 0x8000, flags: 3 };
/// viommu.apply(&Request::Map(map))?;
/// let expect = Mapping { start: 0x1000, end: 0x1fff, phys: 0x8000, flags: 3 };
/// assert_eq!(*backend.maps.lock().unwrap(), [(1, expect)]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait IommuBackend: Send + Sync {
    /// A short name for logs and reports.
    fn name(&self) -> &str;
    /// What the backend offers endpoint `ep`.
    fn caps(&self, ep: EndpointId) -> BackendCaps;
    /// `ep` joins `dom` (leaving any previous domain): replay its mappings
    /// or bind its table.
    fn attach(&self, ep: EndpointId, dom: &DomainView<'_>) -> Result<(), BackendError>;
    /// `ep` leaves domain `dom`; afterwards its DMA is blocked.
    fn detach(&self, ep: EndpointId, dom: DomainId) -> Result<(), BackendError>;
    /// `ep`, attached to no domain, now bypasses translation (`true`:
    /// guest-physical DMA to all guest RAM) or is blocked (`false`): the
    /// spec's rule for unattached endpoints (config-space `bypass`, or the
    /// legacy `VIRTIO_IOMMU_F_BYPASS`). The vIOMMU calls it when the rule's
    /// outcome changes, for an endpoint that leaves its domain while it is
    /// on, and with `false` to block an endpoint whose detach failed. The
    /// default does nothing, for backends that read the vIOMMU state at
    /// translation time; a backend that programs host hardware must.
    fn set_unattached_bypass(&self, _ep: EndpointId, _bypass: bool) -> Result<(), BackendError> {
        Ok(())
    }
    /// A new mapping in MAP-mode domain `dom`.
    fn map(&self, dom: DomainId, m: &Mapping) -> Result<(), BackendError>;
    /// Mappings `removed` (whole, as UNMAP removed them) leave `dom`.
    fn unmap(&self, dom: DomainId, removed: &[Mapping]) -> Result<(), BackendError>;
    /// `ep` joins nested domain `binding.domain` with the guest's table.
    fn bind_table(&self, ep: EndpointId, binding: &TableBinding) -> Result<(), BackendError>;
    /// `ep` leaves its nested domain; its DMA is blocked.
    fn unbind_table(&self, ep: EndpointId, dom: DomainId) -> Result<(), BackendError>;
    /// Applies a batch of invalidations of domain `dom` (already
    /// coalesced); returns when the backend's caches no longer hold what
    /// the batch names.
    fn invalidate(&self, dom: DomainId, batch: &[Invalidation]) -> Result<(), BackendError>;
    /// Passes the guest's answer to a page request on.
    fn page_response(&self, resp: &PageResponse) -> Result<(), BackendError>;
    /// Moves the faults and page requests seen since the last call to `out`.
    fn drain_faults(&self, out: &mut Vec<BackendFault>);
    /// Whether the driver accepted page requests: without it, a fault
    /// that could have been a page request is reported as unrecoverable.
    fn set_page_requests(&self, _enabled: bool) {}

    /// The page requests this backend holds, for a snapshot; `None` for a
    /// backend that never holds any (the default).
    fn save_page_requests(&self) -> Option<SavedPageRequests> {
        None
    }

    /// Replaces the backend's page requests with `saved` (restore, or its
    /// undo with an empty set). The backend validates them (group IDs,
    /// endpoints that may send page requests, its own bounds): a snapshot
    /// is untrusted input. The default accepts only an empty set.
    fn restore_page_requests(&self, saved: &SavedPageRequests) -> Result<(), BackendError> {
        if saved.groups.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Unsupported(format!(
                "backend {} holds no page requests",
                self.name()
            )))
        }
    }

    /// `ep` was unplugged (after any detach): forget everything about it,
    /// its page requests and faults included. Default: nothing to forget.
    fn remove_endpoint(&self, _ep: EndpointId) {}

    /// Guest RAM `[change.start, change.end]` was plugged (memory hot-plug,
    /// a virtio-mem block): the range was no RAM before, `change.host` is
    /// the host memory behind it. The backend gives its endpoints what
    /// their current state asks for there: bypass (unattached or a bypass
    /// domain) and a stage-2 of all guest RAM gain the range at its GPA;
    /// MAP-mode mappings whose physical range reaches into it (a MAP past
    /// RAM is accepted, only its RAM parts reach the host) gain those
    /// parts. From then on guest tables are read from `change.memory`. On
    /// error the backend is as before the call, memory object included.
    /// The vIOMMU undoes a success with [`Self::remove_ram`] of the same
    /// range (its `memory` then the guest memory before the plug) if a
    /// later backend fails. The default does nothing, for backends that
    /// neither pin guest RAM nor read it.
    fn add_ram(&self, _change: &RamChange<'_>) -> Result<(), BackendError> {
        Ok(())
    }

    /// Guest RAM `[change.start, change.end]` (whole ranges as they were
    /// added) is about to be unplugged: the VMM calls this before it
    /// unmaps the memory, and `change.host` is still the memory behind it.
    /// The backend removes every host mapping into the range (bypass,
    /// stage 2, the parts of MAP-mode mappings) and from then on reads
    /// guest tables from `change.memory`, which no longer holds it. The
    /// guest's mappings stay as they are in its view: a DMA there faults
    /// in the host IOMMU, as one past RAM does. On error the backend is as
    /// before the call; the vIOMMU undoes a success with
    /// [`Self::add_ram`] (its `memory` the guest memory before) if a later
    /// backend fails. The default does nothing.
    fn remove_ram(&self, _change: &RamChange<'_>) -> Result<(), BackendError> {
        Ok(())
    }

    /// The VMM registered `window` as a DMA target: the parts of
    /// `VIRTIO_IOMMU_MAP_F_MMIO` mappings inside it can now reach the host
    /// memory at `window.hva`, where there is one; the backend maps them
    /// and keeps the window for mappings to come. No window overlaps
    /// another or RAM. On error, as before the call; undone with
    /// [`Self::remove_mmio_window`]. The default does nothing, for
    /// backends whose DMA to MMIO goes through the VMM's bus (the software
    /// IOMMU returns MMIO mappings' addresses as any others).
    fn add_mmio_window(&self, _window: &MmioWindow) -> Result<(), BackendError> {
        Ok(())
    }

    /// The VMM withdraws `window` (one registered before): every host
    /// mapping into it goes; the guest's MMIO mappings stay in its view
    /// and their DMA faults in the host IOMMU. Called before the VMM
    /// unmaps the region. On error, as before the call; undone with
    /// [`Self::add_mmio_window`]. The default does nothing.
    fn remove_mmio_window(&self, _window: &MmioWindow) -> Result<(), BackendError> {
        Ok(())
    }
}
