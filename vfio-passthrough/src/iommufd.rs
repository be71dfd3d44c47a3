//! [`IommufdBackend`]: assigned devices through iommufd and VFIO cdevs.
//!
//! At construction the backend opens `/dev/iommu`, allocates one IOAS and
//! maps all guest RAM into it at its guest-physical addresses: that IOAS is
//! stage 2 for every nested binding (through a `NEST_PARENT` HWPT per
//! physical IOMMU, shared by its endpoints: `iommufd_objects.rs`) and the
//! page table of bypass domains. RAM plugged or unplugged later is mapped
//! into or out of it, and out of the MAP-mode IOASes (`iommufd_memory.rs`).
//!
//! - MAP mode: one IOAS per domain; MAP/UNMAP are `IOMMU_IOAS_MAP` /
//!   `IOMMU_IOAS_UNMAP` of the host addresses of guest pages; endpoints are
//!   attached to their domain's IOAS.
//! - VT-d nested (per-PASID shadowing): the guest PASID table is read; each
//!   present first-stage entry gets a nested HWPT (`IOMMU_HWPT_DATA_VTD_S1`,
//!   shared by PASIDs with equal entries, also of other endpoints on the
//!   same nest parent) attached to that PASID (PASID 0 is
//!   the device itself); entries are decoded by the software IOMMU's
//!   decoder, so a table the software IOMMU refuses is refused here too. A
//!   PASID-cache invalidation re-reads the entry and replaces, or detaches,
//!   the HWPT; IOTLB invalidations become one `IOMMU_HWPT_INVALIDATE` per
//!   HWPT and batch for all the domain's endpoints.
//! - SMMUv3 nested (table passthrough): a vIOMMU on the nest parent
//!   (one per physical SMMU), a vDEVICE carrying the endpoint ID as
//!   virtual StreamID, a nested HWPT from the STE words; invalidations
//!   become CMDQ commands sent in one `IOMMU_HWPT_INVALIDATE` per vIOMMU
//!   and batch, with the commands of all the domain's endpoints on it.
//!
//! Every attachment change goes through [`IommufdBackend`]'s reconcile
//! step: detach PASIDs that go, switch the device itself, attach PASIDs
//! that come, each step journaled and undone in reverse if a later one
//! fails; objects are allocated before and destroyed after, so a failed
//! call leaves the device attached as before and frees what it made.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use iommufd_bindings::iommufd::iommu_iova_range;
use iommufd_bindings::iommufd::{
    iommu_hwpt_data_type_IOMMU_HWPT_DATA_ARM_SMMUV3, iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1,
    iommu_hwpt_invalidate_data_type_IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
    iommu_hwpt_invalidate_data_type_IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
    iommu_hwpt_vtd_s1_invalidate, iommu_viommu_arm_smmuv3_invalidate,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_PASID,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID,
};
use log::{error, info, warn};
use vmm_iommu::backend::{
    BackendCaps, BackendError, BackendFault, DomainId, DomainView, EndpointId, IommuBackend,
    PageResponse, RamChange, TableBinding,
};
use vmm_iommu::invalidation::Invalidation;
use vmm_iommu::wire::TableDesc;
use vmm_iommu::Mapping;

use crate::args;
use crate::caps::{
    caps_from_hw, hw_info_request, no_nesting_reason, parse_hw_info, HwKind, HW_INFO_DATA_LEN,
};
use crate::dma::{
    check_alignment, identity_pieces, ioas_map, ioas_unmap, mapping_pieces, DmaPiece,
};
use crate::fault::{
    page_response, parse_pgfaults, parse_vevents, pgfault_to_backend, smmu_event_to_backend,
    VEvent, PGFAULT_SIZE, SMMU_EVENT_SIZE, VEVENT_HEADER_SIZE,
};
use crate::host::{bytes_of, slice_bytes, Handle, HostIommu, Ioctl, Open};
use crate::ram::{GuestRam, SharedRam};
use crate::smmuv3::{lower_smmuv3_with, ste_for_table, SmmuHw, SmmuInvTarget};
use crate::type1::host_err;
use crate::vtd::{
    check_directory, lower_vtd, read_pasid_entry, scan_pasid_table, PasidBinding, PasidRefresh,
    VtdS1, VtdTarget, RID_PASID,
};

// Dirty tracking on the nest parents (issue 13).
#[path = "iommufd_dirty.rs"]
mod dirty;
// Nest parents, vIOMMUs and nested HWPTs shared per physical IOMMU (issue 12).
#[path = "iommufd_objects.rs"]
mod objects;
// RAM hot-plug (issue 12).
#[path = "iommufd_memory.rs"]
mod memory;

/// At most this many allowed IOVA ranges of a device are believed: the
/// count comes from the kernel, and x86 reports two or three.
const MAX_RESERVED_QUERY: u32 = 1024;

/// At most this many PASIDs of one endpoint are bound at once: each costs
/// a HWPT and an attachment in the host, and the guest writes the table.
pub const MAX_BOUND_PASIDS: usize = 1024;
/// Depth of each SMMUv3 vEVENTQ.
pub const VEVENTQ_DEPTH: u32 = 64;
/// Reads per queue per [`IommuBackend::drain_faults`] call, so one call
/// returns even if the device keeps faulting.
const MAX_DRAIN_READS: usize = 16;
/// Records read per `read` of a queue.
const RECORDS_PER_READ: usize = 64;
/// The host page size the IOAS maps with (iommufd's `out_iova_alignment`
/// is at most `PAGE_SIZE`).
const HOST_PAGE: u64 = 4096;

/// A nested-capable endpoint's fixed objects.
#[derive(Debug, Clone, Copy)]
struct Nesting {
    /// The `NEST_PARENT` HWPT on the stage-2 IOAS, shared by the endpoints
    /// behind the same physical IOMMU (`objects`).
    parent: u32,
    /// Whether it was allocated with dirty tracking.
    dirty: bool,
    /// SMMUv3 only.
    smmu: Option<SmmuObjects>,
}

/// The SMMUv3 objects of an endpoint.
#[derive(Debug, Clone, Copy)]
struct SmmuObjects {
    /// The vIOMMU on the parent (shared with the parent).
    viommu: u32,
    /// The endpoint's own vDEVICE on it.
    vdevice: u32,
}

#[derive(Debug, Clone, Default)]
struct VtdBinding {
    dir: u64,
    pasid_bits: u8,
    /// The first-stage data of each bound PASID.
    slots: BTreeMap<u32, VtdS1>,
    /// Nested HWPTs by their data, with the number of PASIDs using each.
    hwpts: HashMap<VtdS1, (u32, usize)>,
}

#[derive(Debug, Clone)]
enum Mode {
    Blocked,
    Map(DomainId),
    Bypass,
    Vtd(DomainId, VtdBinding),
    Smmu {
        domain: DomainId,
        hwpt: u32,
        ssid_bits: u8,
        /// The bound CD table, read for the granule of a range's CD.
        table: TableDesc,
    },
}

impl Mode {
    /// The nested HWPTs the mode owns.
    fn owned(&self) -> Vec<u32> {
        match self {
            Mode::Vtd(_, b) => b.hwpts.values().map(|(id, _)| *id).collect(),
            Mode::Smmu { hwpt, .. } => vec![*hwpt],
            _ => Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Endpoint {
    dev: Handle,
    dev_id: u32,
    hw: HwKind,
    caps: BackendCaps,
    nesting: Option<Nesting>,
    mode: Mode,
    /// What the kernel has attached now: PASID (0 = the device) -> page table.
    attached: BTreeMap<u32, u32>,
}

#[derive(Debug)]
struct MapDomain {
    ioas: u32,
    endpoints: BTreeSet<EndpointId>,
    mappings: BTreeMap<u64, Vec<DmaPiece>>,
    /// The guest's mappings the pieces come from, by IOVA (RAM plugged
    /// later gives them more pieces).
    guest: BTreeMap<u64, Mapping>,
}

#[derive(Debug, Default)]
struct State {
    endpoints: BTreeMap<EndpointId, Endpoint>,
    domains: HashMap<DomainId, MapDomain>,
    /// The fault queue (id, fd) for page requests.
    fault_queue: Option<(u32, Handle)>,
    /// Page requests awaiting the guest's answer: cookie by
    /// (endpoint, PASID, group).
    pending: HashMap<(EndpointId, Option<u32>, u32), u32>,
    /// The nest parents dirty tracking runs on (`None`: tracking is off).
    dirty_parents: Option<BTreeSet<u32>>,
    /// The objects endpoints share per physical IOMMU.
    shared: objects::Shared,
}

/// Assigned devices through iommufd: MAP mode and nested translation.
pub struct IommufdBackend {
    host: Arc<dyn HostIommu>,
    ram: SharedRam,
    iommufd: Handle,
    gpa_ioas: u32,
    state: Mutex<State>,
}

impl std::fmt::Debug for IommufdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommufdBackend")
            .field("iommufd", &self.iommufd)
            .field("gpa_ioas", &self.gpa_ioas)
            .field("state", &*self.lock())
            .finish()
    }
}

/// One attachment change, with what to restore.
#[derive(Debug, Clone, Copy)]
struct Change {
    pasid: u32,
    before: Option<u32>,
    after: Option<u32>,
}

impl IommufdBackend {
    /// Opens `/dev/iommu` through `host` and maps all of `ram` at its
    /// guest-physical addresses into a new IOAS (stage 2 and bypass).
    pub fn new(host: Arc<dyn HostIommu>, ram: GuestRam) -> Result<Self, BackendError> {
        let iommufd = host
            .open(Open::Iommufd)
            .map_err(host_err("open(/dev/iommu)"))?
            .handle;
        let fail = |e: BackendError| {
            host.close(iommufd);
            e
        };
        let mut a = args::ioas_alloc();
        host.ioctl(iommufd, Ioctl::IoasAlloc(&mut a))
            .map_err(host_err("IOMMU_IOAS_ALLOC"))
            .map_err(fail)?;
        let gpa_ioas = a.out_ioas_id;
        for p in identity_pieces(ram.regions()) {
            if let Err(e) = host.ioctl(iommufd, Ioctl::IoasMap(&ioas_map(gpa_ioas, &p))) {
                // Destroying the IOAS drops what was mapped into it.
                let _ = host.ioctl(iommufd, Ioctl::Destroy(&args::destroy(gpa_ioas)));
                return Err(fail(host_err("IOMMU_IOAS_MAP")(e)));
            }
        }
        Ok(IommufdBackend {
            host,
            ram: SharedRam::new(ram),
            iommufd,
            gpa_ioas,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The IOAS holding all guest RAM at its guest-physical addresses.
    pub fn gpa_ioas(&self) -> u32 {
        self.gpa_ioas
    }

    /// The device handle of an endpoint (for tests and diagnostics).
    pub fn device_of(&self, ep: EndpointId) -> Option<Handle> {
        self.lock().endpoints.get(&ep).map(|e| e.dev)
    }

    /// What the kernel has attached for an endpoint: PASID (0 = the device
    /// itself) to page-table ID (for tests and diagnostics).
    pub fn attachments(&self, ep: EndpointId) -> BTreeMap<u32, u32> {
        self.lock()
            .endpoints
            .get(&ep)
            .map(|e| e.attached.clone())
            .unwrap_or_default()
    }

    fn ioctl(&self, op: &'static str, call: Ioctl<'_>) -> Result<(), BackendError> {
        self.host.ioctl(self.iommufd, call).map_err(host_err(op))
    }

    fn destroy(&self, id: u32) -> Result<(), BackendError> {
        self.ioctl("IOMMU_DESTROY", Ioctl::Destroy(&args::destroy(id)))
    }

    /// Destroys objects nothing uses any more; a failure only leaks an
    /// object until the iommufd closes, so it is logged.
    fn destroy_all(&self, ids: impl IntoIterator<Item = u32>) {
        for id in ids {
            if let Err(e) = self.destroy(id) {
                error!("iommufd: destroying object {id} failed: {e}");
            }
        }
    }

    fn hwpt_alloc(
        &self,
        a: &mut iommufd_bindings::iommufd::iommu_hwpt_alloc,
        data: &[u8],
    ) -> Result<u32, BackendError> {
        self.ioctl("IOMMU_HWPT_ALLOC", Ioctl::HwptAlloc { arg: a, data })?;
        Ok(a.out_hwpt_id)
    }

    /// Binds the VFIO cdev of the device at `device` (sysfs path) to the
    /// iommufd as endpoint `ep`, reads what its IOMMU offers, and, where the
    /// host can nest, allocates its nest parent (and, on SMMUv3, vIOMMU,
    /// vDEVICE with `ep` as virtual StreamID, and vEVENTQ). If nesting
    /// cannot be set up the endpoint is MAP-only and its caps say so. Its DMA
    /// is blocked until the guest attaches it.
    pub fn add_endpoint(&self, ep: EndpointId, device: &Path) -> Result<(), BackendError> {
        let mut st = self.lock();
        if st.endpoints.contains_key(&ep) {
            return Err(BackendError::Invalid(format!(
                "endpoint {ep} is already assigned"
            )));
        }
        let opened = self
            .host
            .open(Open::Cdev {
                device,
                iommufd: self.iommufd,
            })
            .map_err(crate::kvm_vfio::open_err("VFIO_DEVICE_BIND_IOMMUFD"))?;
        let dev = opened.handle;
        let Some(dev_id) = opened.dev_id else {
            self.host.close(dev);
            return Err(BackendError::Host {
                op: "VFIO_DEVICE_BIND_IOMMUFD",
                source: std::io::Error::other("no iommufd device ID"),
            });
        };
        let mut info = hw_info_request(dev_id);
        let mut data = [0u8; HW_INFO_DATA_LEN];
        if let Err(e) = self.ioctl(
            "IOMMU_GET_HW_INFO",
            Ioctl::GetHwInfo {
                arg: &mut info,
                data: &mut data,
            },
        ) {
            self.host.close(dev);
            return Err(e);
        }
        let hw = parse_hw_info(&info, &data);
        let mut caps = caps_from_hw(&hw, info.out_max_pasid_log2);
        let mut nesting = None;
        if caps.table_formats.is_empty() {
            info!(
                "iommufd: endpoint {ep}: no nested translation ({}); MAP and bypass only",
                no_nesting_reason(&hw)
            );
        } else {
            let dirty = crate::dirty::hw_dirty_capable(info.out_capabilities);
            let probe = match self.probe_parents(&st, dev, &hw, &caps, dirty) {
                Ok(p) => p,
                Err(e) => {
                    // The probe attachment to a parent could not be undone.
                    self.host.close(dev);
                    return Err(e);
                }
            };
            match self.setup_nesting(&mut st, ep, dev_id, &hw, &caps, dirty, probe) {
                Ok(n) => nesting = Some(n),
                Err(e) => {
                    warn!("iommufd: endpoint {ep} cannot nest, MAP mode only: {e}");
                    caps.table_formats.clear();
                    caps.page_requests = false;
                }
            }
        }
        // The device's reserved regions (the MSI window, RMRRs) become
        // the endpoint's RESV_MEM regions, so the guest never maps there.
        caps.reserved_ranges = self.device_reserved(ep, dev);
        st.endpoints.insert(
            ep,
            Endpoint {
                dev,
                dev_id,
                hw,
                caps,
                nesting,
                mode: Mode::Blocked,
                attached: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// The IOVA holes the kernel leaves device `dev`: it is attached to a
    /// new empty IOAS (it can reach nothing there), the IOAS's allowed
    /// ranges are read (`IOMMU_IOAS_IOVA_RANGES`: the kernel leaves out
    /// the reserved regions of the devices attached), and it is detached
    /// again (blocked, as it came) and the IOAS destroyed. The holes are
    /// the gaps between allowed ranges. A failure is logged and leaves
    /// no holes: a MAP into one then fails in the kernel (DEVERR), as
    /// before the guest could be told.
    fn device_reserved(&self, ep: EndpointId, dev: Handle) -> Vec<(u64, u64)> {
        let mut a = args::ioas_alloc();
        if let Err(e) = self.ioctl("IOMMU_IOAS_ALLOC", Ioctl::IoasAlloc(&mut a)) {
            warn!("iommufd: endpoint {ep}: no scratch IOAS for its reserved regions: {e}");
            return Vec::new();
        }
        let ioas = a.out_ioas_id;
        let res = self.attach_step(dev, RID_PASID, Some(ioas)).and_then(|()| {
            let res = self.allowed_ranges(ioas);
            let detached = self.attach_step(dev, RID_PASID, None);
            res.and_then(|r| detached.map(|()| r))
        });
        self.destroy_all([ioas]);
        match res {
            Ok(allowed) => crate::caps::iova_holes(&allowed),
            Err(e) => {
                warn!("iommufd: endpoint {ep}: reserved regions unknown: {e}");
                Vec::new()
            }
        }
    }

    /// `IOMMU_IOAS_IOVA_RANGES` of `ioas`, inclusive, asking again with
    /// the count the kernel reports when the buffer is short (EMSGSIZE).
    fn allowed_ranges(&self, ioas: u32) -> Result<Vec<(u64, u64)>, BackendError> {
        let mut ranges = vec![iommu_iova_range::default(); 8];
        loop {
            let mut arg = args::ioas_iova_ranges(ioas, ranges.len() as u32);
            match self.host.ioctl(
                self.iommufd,
                Ioctl::IoasIovaRanges {
                    arg: &mut arg,
                    ranges: &mut ranges,
                },
            ) {
                Ok(()) => {
                    let n = (arg.num_iovas as usize).min(ranges.len());
                    return Ok(ranges[..n].iter().map(|r| (r.start, r.last)).collect());
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::EMSGSIZE)
                        && arg.num_iovas as usize > ranges.len()
                        && arg.num_iovas <= MAX_RESERVED_QUERY =>
                {
                    ranges.resize(arg.num_iovas as usize, iommu_iova_range::default());
                }
                Err(e) => return Err(host_err("IOMMU_IOAS_IOVA_RANGES")(e)),
            }
        }
    }

    /// Unbinds an endpoint: detached from everything, its objects
    /// destroyed, its cdev closed.
    pub fn remove_endpoint(&self, ep: EndpointId) -> Result<(), BackendError> {
        let mut st = self.lock();
        if !st.endpoints.contains_key(&ep) {
            return Err(BackendError::NotFound(format!("endpoint {ep}")));
        }
        self.switch(&mut st, ep, BTreeMap::new(), Mode::Blocked, &[])?;
        if let Some(e) = st.endpoints.remove(&ep) {
            if let Some(n) = e.nesting {
                self.release_nesting(&mut st, ep, n);
            }
            self.host.close(e.dev);
        }
        st.pending.retain(|(e, _, _), _| *e != ep);
        Ok(())
    }

    fn attach_step(&self, dev: Handle, pasid: u32, to: Option<u32>) -> Result<(), BackendError> {
        match to {
            Some(pt) => self
                .host
                .ioctl(dev, Ioctl::AttachPt(&mut args::attach_pt(pasid, pt)))
                .map_err(host_err("VFIO_DEVICE_ATTACH_IOMMUFD_PT")),
            None => self
                .host
                .ioctl(dev, Ioctl::DetachPt(&args::detach_pt(pasid)))
                .map_err(host_err("VFIO_DEVICE_DETACH_IOMMUFD_PT")),
        }
    }

    /// Moves the endpoint's attachments to `desired`: PASIDs that go are
    /// detached first, then the device itself (PASID 0) is switched, then
    /// new PASIDs attached (the kernel wants the device's own domain
    /// PASID-capable before PASIDs join). Each step is journaled; on a
    /// failure the done steps are undone in reverse.
    fn reconcile(
        &self,
        e: &mut Endpoint,
        desired: &BTreeMap<u32, u32>,
    ) -> Result<(), BackendError> {
        let mut plan = Vec::new();
        for (&p, &pt) in &e.attached {
            if p != RID_PASID && !desired.contains_key(&p) {
                plan.push(Change {
                    pasid: p,
                    before: Some(pt),
                    after: None,
                });
            }
        }
        let rid_now = e.attached.get(&RID_PASID).copied();
        let rid_next = desired.get(&RID_PASID).copied();
        if rid_now != rid_next {
            plan.push(Change {
                pasid: RID_PASID,
                before: rid_now,
                after: rid_next,
            });
        }
        for (&p, &pt) in desired {
            let now = e.attached.get(&p).copied();
            if p != RID_PASID && now != Some(pt) {
                plan.push(Change {
                    pasid: p,
                    before: now,
                    after: Some(pt),
                });
            }
        }
        let mut done: Vec<Change> = Vec::with_capacity(plan.len());
        for c in plan {
            if let Err(err) = self.attach_step(e.dev, c.pasid, c.after) {
                for u in done.into_iter().rev() {
                    match self.attach_step(e.dev, u.pasid, u.before) {
                        Ok(()) => set_attached(e, u.pasid, u.before),
                        Err(x) => {
                            error!("iommufd: undo of PASID {} attachment failed: {x}", u.pasid)
                        }
                    }
                }
                return Err(err);
            }
            set_attached(e, c.pasid, c.after);
            done.push(c);
        }
        Ok(())
    }

    /// Switches endpoint `ep` to `mode` with `desired` attachments. Objects
    /// in `fresh` were allocated for the new mode: destroyed if the switch
    /// fails. On success, what the old mode owned and the new one does not
    /// is destroyed, and a MAP domain left empty goes with its IOAS.
    fn switch(
        &self,
        st: &mut State,
        ep: EndpointId,
        desired: BTreeMap<u32, u32>,
        mode: Mode,
        fresh: &[u32],
    ) -> Result<(), BackendError> {
        let Some(e) = st.endpoints.get_mut(&ep) else {
            self.destroy_all(fresh.iter().copied());
            return Err(BackendError::NotFound(format!(
                "endpoint {ep} is not assigned"
            )));
        };
        if let Err(err) = self.reconcile(e, &desired) {
            self.destroy_all(fresh.iter().copied());
            return Err(err);
        }
        let keep: BTreeSet<u32> = mode.owned().into_iter().collect();
        let old = std::mem::replace(&mut e.mode, mode);
        let stays_in = match (&old, &e.mode) {
            (Mode::Map(a), Mode::Map(b)) => a == b,
            _ => false,
        };
        // Nested HWPTs are counted per endpoint using them (VT-d ones may
        // be shared): the old mode's that go are destroyed with their
        // last user.
        let had: BTreeSet<u32> = old.owned().into_iter().collect();
        for id in keep.difference(&had) {
            st.shared.acquire_nested(*id);
        }
        let gone: Vec<u32> = had.difference(&keep).copied().collect();
        self.release_nested(st, gone);
        if let (Mode::Map(d), false) = (old, stays_in) {
            self.leave_map_domain(st, ep, d);
        }
        Ok(())
    }

    fn leave_map_domain(&self, st: &mut State, ep: EndpointId, dom: DomainId) {
        let Some(d) = st.domains.get_mut(&dom) else {
            return;
        };
        d.endpoints.remove(&ep);
        if d.endpoints.is_empty() {
            if let Some(d) = st.domains.remove(&dom) {
                self.destroy_all([d.ioas]);
            }
        }
    }

    /// Creates the IOAS of a MAP domain with its mappings; nothing is left
    /// behind if a map fails.
    fn create_map_domain(&self, mappings: &[Mapping]) -> Result<MapDomain, BackendError> {
        let mut all = BTreeMap::new();
        let ram = self.ram.get();
        for m in mappings {
            let pieces = mapping_pieces(ram.regions(), m)?;
            for p in &pieces {
                check_alignment(p, HOST_PAGE)?;
            }
            all.insert(m.start, pieces);
        }
        let mut a = args::ioas_alloc();
        self.ioctl("IOMMU_IOAS_ALLOC", Ioctl::IoasAlloc(&mut a))?;
        let ioas = a.out_ioas_id;
        for p in all.values().flatten() {
            if let Err(e) = self.ioctl("IOMMU_IOAS_MAP", Ioctl::IoasMap(&ioas_map(ioas, p))) {
                self.destroy_all([ioas]);
                return Err(e);
            }
        }
        Ok(MapDomain {
            ioas,
            endpoints: BTreeSet::new(),
            mappings: all,
            guest: mappings.iter().map(|m| (m.start, *m)).collect(),
        })
    }

    fn bind_locked(
        &self,
        st: &mut State,
        ep: EndpointId,
        dom: DomainId,
        t: &TableDesc,
    ) -> Result<(), BackendError> {
        let Some(e) = st.endpoints.get(&ep) else {
            return Err(BackendError::NotFound(format!(
                "endpoint {ep} is not assigned"
            )));
        };
        if !e.caps.table_formats.contains(&t.format()) {
            return Err(BackendError::Unsupported(format!(
                "table format {} is not offered for endpoint {ep}",
                t.format()
            )));
        }
        match (e.hw, t) {
            (
                HwKind::IntelVtd(hw),
                TableDesc::IntelVtd {
                    pasid_bits,
                    pasid_dir_ptr,
                },
            ) => {
                let ram = self.ram.get();
                check_directory(*pasid_dir_ptr, *pasid_bits, e.caps.pasid_bits, &ram)?;
                let entries =
                    scan_pasid_table(&ram, *pasid_dir_ptr, *pasid_bits, &hw, MAX_BOUND_PASIDS)?;
                self.apply_vtd(st, ep, dom, *pasid_dir_ptr, *pasid_bits, entries)
            }
            (HwKind::ArmSmmuV3(hw), TableDesc::ArmSmmuV3 { s1cdmax, .. }) => {
                self.bind_smmu(st, ep, dom, t, &hw, *s1cdmax)
            }
            _ => Err(BackendError::Unsupported(format!(
                "table format {} does not match endpoint {ep}'s IOMMU",
                t.format()
            ))),
        }
    }

    /// Makes `entries` (every present entry of the guest table) the VT-d
    /// binding of `ep`: HWPTs with equal data are shared and reused from
    /// the current binding; new ones are allocated, attached, and on any
    /// failure destroyed again.
    fn apply_vtd(
        &self,
        st: &mut State,
        ep: EndpointId,
        dom: DomainId,
        dir: u64,
        pasid_bits: u8,
        entries: Vec<(u32, PasidBinding)>,
    ) -> Result<(), BackendError> {
        let fault_id = st.fault_queue.map(|(id, _)| id);
        let Some(e) = st.endpoints.get(&ep) else {
            return Err(BackendError::NotFound(format!("endpoint {ep}")));
        };
        let Some(n) = e.nesting else {
            return Err(BackendError::Unsupported(format!(
                "endpoint {ep} cannot nest"
            )));
        };
        let old: HashMap<VtdS1, (u32, usize)> = match &e.mode {
            Mode::Vtd(_, b) => b.hwpts.clone(),
            _ => HashMap::new(),
        };
        let mut flags = 0;
        if e.caps.pasid_bits > 0 {
            flags |= iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_PASID;
        }
        let fault_id = match fault_id {
            Some(id) if e.caps.page_requests => {
                flags |= iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID;
                id
            }
            _ => 0,
        };
        let dev_id = e.dev_id;
        let mut b = VtdBinding {
            dir,
            pasid_bits,
            ..Default::default()
        };
        let mut desired = BTreeMap::new();
        let mut fresh = Vec::new();
        let mut shareable = Vec::new();
        for (pasid, binding) in entries {
            let pt = match binding {
                PasidBinding::Absent => continue,
                PasidBinding::FirstStage(s1) => {
                    b.slots.insert(pasid, s1);
                    // Equal entries share a HWPT: this binding's, the
                    // current one's, then another endpoint's on the same
                    // parent.
                    let key = objects::NestedKey {
                        parent: n.parent,
                        flags,
                        fault_id,
                        s1,
                    };
                    let known = b.hwpts.get(&s1).or_else(|| old.get(&s1)).map(|(id, _)| *id);
                    let id = match known.or_else(|| st.shared.nested_for(&key)) {
                        Some(id) => id,
                        None => {
                            let data = s1.to_uapi();
                            let mut a = args::hwpt_alloc(
                                flags,
                                dev_id,
                                n.parent,
                                iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1,
                                std::mem::size_of_val(&data) as u32,
                                fault_id,
                            );
                            match self.hwpt_alloc(&mut a, bytes_of(&data)) {
                                Ok(id) => {
                                    fresh.push(id);
                                    shareable.push((id, key));
                                    id
                                }
                                Err(err) => {
                                    self.destroy_all(fresh);
                                    return Err(err);
                                }
                            }
                        }
                    };
                    b.hwpts.entry(s1).or_insert((id, 0)).1 += 1;
                    id
                }
            };
            desired.insert(pasid, pt);
        }
        self.switch(st, ep, desired, Mode::Vtd(dom, b), &fresh)?;
        for (id, key) in shareable {
            st.shared.share_nested(id, key);
        }
        Ok(())
    }

    fn bind_smmu(
        &self,
        st: &mut State,
        ep: EndpointId,
        dom: DomainId,
        t: &TableDesc,
        hw: &SmmuHw,
        s1cdmax: u32,
    ) -> Result<(), BackendError> {
        let Some(e) = st.endpoints.get(&ep) else {
            return Err(BackendError::NotFound(format!("endpoint {ep}")));
        };
        let Some(Nesting {
            smmu: Some(SmmuObjects { viommu, .. }),
            ..
        }) = e.nesting
        else {
            return Err(BackendError::Unsupported(format!(
                "endpoint {ep} has no vIOMMU"
            )));
        };
        let ste = ste_for_table(t, hw, &self.ram.get())?;
        let mut a = args::hwpt_alloc(
            0,
            e.dev_id,
            viommu,
            iommu_hwpt_data_type_IOMMU_HWPT_DATA_ARM_SMMUV3,
            std::mem::size_of_val(&ste) as u32,
            0,
        );
        let hwpt = self.hwpt_alloc(&mut a, bytes_of(&ste))?;
        let ssid_bits = e
            .caps
            .pasid_bits
            .min(u8::try_from(s1cdmax).unwrap_or(u8::MAX));
        let desired = BTreeMap::from([(RID_PASID, hwpt)]);
        self.switch(
            st,
            ep,
            desired,
            Mode::Smmu {
                domain: dom,
                hwpt,
                ssid_bits,
                table: *t,
            },
            &[hwpt],
        )
    }

    /// One `IOMMU_HWPT_INVALIDATE` of `entries` on `id`. If the kernel
    /// handles fewer than sent (`entry_num` written back), the rest is sent
    /// once more; if that also falls short, PARTIAL with the index of the
    /// first entry not handled.
    fn send_invalidate(
        &self,
        id: u32,
        data_type: u32,
        entry_len: usize,
        entries: &[u8],
    ) -> Result<(), BackendError> {
        let total = entries.len() / entry_len;
        let mut done = 0usize;
        let mut last = None;
        for _ in 0..2 {
            let left = total - done;
            if left == 0 {
                return Ok(());
            }
            let num = u32::try_from(left)
                .map_err(|_| BackendError::NoMemory(format!("{left} invalidation entries")))?;
            let mut a = args::hwpt_invalidate(id, data_type, entry_len as u32, num);
            let r = self.host.ioctl(
                self.iommufd,
                Ioctl::HwptInvalidate {
                    arg: &mut a,
                    entries: &entries[done * entry_len..],
                },
            );
            let handled = (a.entry_num as usize).min(left);
            match r {
                Ok(()) if handled == left => return Ok(()),
                Ok(()) => last = Some(std::io::Error::from_raw_os_error(libc::EIO)),
                Err(e) => last = Some(e),
            }
            done += handled;
        }
        if done == total {
            return Ok(());
        }
        Err(BackendError::Partial {
            op: "IOMMU_HWPT_INVALIDATE",
            index: done,
            source: last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EIO)),
        })
    }

    /// One batch for the VT-d endpoints `eps` of domain `dom`: PASID-cache
    /// entries re-read each endpoint's table first; then the IOTLB entries
    /// go to the nested HWPTs they reach, one `IOMMU_HWPT_INVALIDATE` per
    /// HWPT, each entry once per HWPT however many endpoints share it.
    fn invalidate_vtd(
        &self,
        st: &mut State,
        eps: &[EndpointId],
        dom: DomainId,
        batch: &[Invalidation],
    ) -> Result<(), BackendError> {
        let mut entries = Vec::new();
        let mut refresh = Vec::new();
        lower_vtd(batch, &mut entries, &mut refresh);
        if !refresh.is_empty() {
            for &ep in eps {
                self.refresh_pasids(st, ep, dom, &refresh)?;
            }
        }
        // The entries (by their place in the batch) each nested HWPT
        // gets; absent PASIDs have no stage-1 caches to forget.
        let mut per_hwpt: BTreeMap<u32, BTreeSet<usize>> = BTreeMap::new();
        for ep in eps {
            let Some(Endpoint {
                mode: Mode::Vtd(_, b),
                ..
            }) = st.endpoints.get(ep)
            else {
                continue;
            };
            for (i, (target, _)) in entries.iter().enumerate() {
                match target {
                    VtdTarget::AllPasids => {
                        for (id, _) in b.hwpts.values() {
                            per_hwpt.entry(*id).or_default().insert(i);
                        }
                    }
                    VtdTarget::Pasid(p) => {
                        if let Some((id, _)) = b.slots.get(p).and_then(|s1| b.hwpts.get(s1)) {
                            per_hwpt.entry(*id).or_default().insert(i);
                        }
                    }
                }
            }
        }
        let mut sent = 0;
        for (id, which) in per_hwpt {
            let list: Vec<iommu_hwpt_vtd_s1_invalidate> =
                which.into_iter().map(|i| entries[i].1).collect();
            let r = self.send_invalidate(
                id,
                iommu_hwpt_invalidate_data_type_IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
                std::mem::size_of::<iommu_hwpt_vtd_s1_invalidate>(),
                slice_bytes(&list),
            );
            if let Err(BackendError::Partial { op, index, source }) = r {
                return Err(BackendError::Partial {
                    op,
                    index: sent + index,
                    source,
                });
            }
            r?;
            sent += list.len();
        }
        Ok(())
    }

    /// Re-reads the PASID entries a PASID-cache invalidation names and
    /// replaces, adds or detaches their HWPTs.
    fn refresh_pasids(
        &self,
        st: &mut State,
        ep: EndpointId,
        dom: DomainId,
        what: &[PasidRefresh],
    ) -> Result<(), BackendError> {
        let Some(Endpoint {
            mode: Mode::Vtd(_, b),
            hw: HwKind::IntelVtd(hw),
            ..
        }) = st.endpoints.get(&ep)
        else {
            return Ok(());
        };
        let (dir, bits, hw) = (b.dir, b.pasid_bits, *hw);
        let entries = if what.contains(&PasidRefresh::All) {
            scan_pasid_table(&self.ram.get(), dir, bits, &hw, MAX_BOUND_PASIDS)?
        } else {
            let mut now: BTreeMap<u32, PasidBinding> = b
                .slots
                .iter()
                .map(|(p, s1)| (*p, PasidBinding::FirstStage(*s1)))
                .collect();
            for r in what {
                if let PasidRefresh::Pasid(p) = r {
                    let binding = read_pasid_entry(&self.ram.get(), dir, bits, *p, &hw)?;
                    now.insert(*p, binding);
                }
            }
            let present = now.values().filter(|b| **b != PasidBinding::Absent).count();
            if present > MAX_BOUND_PASIDS {
                return Err(BackendError::NoMemory(format!(
                    "more than {MAX_BOUND_PASIDS} bound PASIDs"
                )));
            }
            now.into_iter().collect()
        };
        self.apply_vtd(st, ep, dom, dir, bits, entries)
    }

    /// One batch for the SMMUv3 endpoints `eps` of a domain: each
    /// endpoint's commands (CFGI with its own vSID) are lowered first, so
    /// a refused value sends nothing; then one `IOMMU_HWPT_INVALIDATE` per
    /// vIOMMU (physical SMMU) carries the commands of all its endpoints, a
    /// command another endpoint already put there (the domain's TLBIs)
    /// once.
    fn invalidate_smmu(
        &self,
        st: &State,
        eps: &[EndpointId],
        batch: &[Invalidation],
    ) -> Result<(), BackendError> {
        type Cmd = iommu_viommu_arm_smmuv3_invalidate;
        let mut per_viommu: BTreeMap<u32, (Vec<Cmd>, HashSet<[u64; 2]>)> = BTreeMap::new();
        let ram = self.ram.get();
        for ep in eps {
            let Some(e) = st.endpoints.get(ep) else {
                continue;
            };
            let (
                Mode::Smmu {
                    ssid_bits, table, ..
                },
                HwKind::ArmSmmuV3(hw),
                Some(Nesting {
                    smmu: Some(SmmuObjects { viommu, .. }),
                    ..
                }),
            ) = (&e.mode, &e.hw, e.nesting)
            else {
                continue;
            };
            let t = SmmuInvTarget {
                vsid: *ep,
                asid_bits: hw.asid_bits(),
                ssid_bits: *ssid_bits,
                range_inv: hw.ril(),
                // The nested STE keeps EATS at 0: no ATS, no ATC to invalidate.
                ats: false,
            };
            let mut cmds: Vec<Cmd> = Vec::new();
            let granule = |pasid| cd_granule_log2(&ram, table, pasid);
            lower_smmuv3_with(batch, &t, &granule, &mut cmds)?;
            let (list, earlier) = per_viommu.entry(viommu).or_default();
            let from_others: Vec<Cmd> = cmds
                .into_iter()
                .filter(|c| !earlier.contains(&c.cmd))
                .collect();
            list.extend_from_slice(&from_others);
            earlier.extend(from_others.iter().map(|c| c.cmd));
        }
        let mut sent = 0;
        for (viommu, (cmds, _)) in per_viommu {
            if cmds.is_empty() {
                continue;
            }
            let r = self.send_invalidate(
                viommu,
                iommu_hwpt_invalidate_data_type_IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
                std::mem::size_of::<Cmd>(),
                slice_bytes(&cmds),
            );
            if let Err(BackendError::Partial { op, index, source }) = r {
                return Err(BackendError::Partial {
                    op,
                    index: sent + index,
                    source,
                });
            }
            r?;
            sent += cmds.len();
        }
        Ok(())
    }

    fn drain_queue(&self, fd: Handle, record: usize, out: &mut Vec<u8>) {
        let mut buf = vec![0u8; record * RECORDS_PER_READ];
        for _ in 0..MAX_DRAIN_READS {
            match self.host.read(fd, &mut buf) {
                Ok(0) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => {
                    warn!("iommufd: reading queue {} failed: {e}", fd.0);
                    return;
                }
            }
        }
    }
}

/// Log2 of the translation granule (TG0) of the CD that traffic with
/// `pasid` uses under the bound CD `table`, read from guest RAM now, with
/// the software IOMMU's decoder. `None` when no single CD is known: traffic
/// without a PASID while substreams are enabled (an ASID-tagged range may
/// reach several CDs), a bypassed or terminated substream, or a CD that is
/// invalid or unreadable. The lowering then uses TG = 0 commands, which are
/// right for every granule.
fn cd_granule_log2(ram: &GuestRam, table: &TableDesc, pasid: Option<u32>) -> Option<u8> {
    use vmm_iommu::nested::smmuv3::{CdTable, Substream};
    use vmm_iommu::nested::Stage1;
    let TableDesc::ArmSmmuV3 {
        s1fmt,
        s1dss,
        s1contextptr,
        s1cdmax,
    } = *table
    else {
        return None;
    };
    let t = CdTable::new(s1contextptr, s1fmt, s1cdmax, s1dss).ok()?;
    if pasid.is_none() && t.s1cdmax() != 0 {
        return None;
    }
    let Ok(Substream::Ssid(ssid)) = t.resolve_ssid(pasid) else {
        return None;
    };
    match t.stage1(ram.memory(), ssid).ok()? {
        Stage1::Arm(c) => u8::try_from(c.granule().shift()).ok(),
        Stage1::X86(_) => None,
    }
}

fn set_attached(e: &mut Endpoint, pasid: u32, to: Option<u32>) {
    match to {
        Some(pt) => e.attached.insert(pasid, pt),
        None => e.attached.remove(&pasid),
    };
}

impl Drop for IommufdBackend {
    fn drop(&mut self) {
        let st = self.lock();
        // Closing a cdev detaches it; closing the iommufd frees every object.
        self.close_shared(&st);
        for e in st.endpoints.values() {
            self.host.close(e.dev);
        }
        if let Some((_, fd)) = st.fault_queue {
            self.host.close(fd);
        }
        self.host.close(self.iommufd);
    }
}

impl IommuBackend for IommufdBackend {
    fn name(&self) -> &str {
        "iommufd"
    }

    fn caps(&self, ep: EndpointId) -> BackendCaps {
        match self.lock().endpoints.get(&ep) {
            Some(e) => e.caps.clone(),
            None => BackendCaps::map_only(HOST_PAGE, (0, u64::MAX)),
        }
    }

    fn attach(&self, ep: EndpointId, dom: &DomainView<'_>) -> Result<(), BackendError> {
        let mut st = self.lock();
        if !st.endpoints.contains_key(&ep) {
            return Err(BackendError::NotFound(format!(
                "endpoint {ep} is not assigned"
            )));
        }
        if let Some(t) = dom.table {
            return self.bind_locked(&mut st, ep, dom.id, t);
        }
        if dom.bypass {
            let desired = BTreeMap::from([(RID_PASID, self.gpa_ioas)]);
            return self.switch(&mut st, ep, desired, Mode::Bypass, &[]);
        }
        let created = match st.domains.entry(dom.id) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(self.create_map_domain(dom.mappings)?);
                true
            }
        };
        let ioas = st.domains.get(&dom.id).map(|d| d.ioas).unwrap_or(0);
        let desired = BTreeMap::from([(RID_PASID, ioas)]);
        match self.switch(&mut st, ep, desired, Mode::Map(dom.id), &[]) {
            Ok(()) => {
                if let Some(d) = st.domains.get_mut(&dom.id) {
                    d.endpoints.insert(ep);
                }
                Ok(())
            }
            Err(e) => {
                if created {
                    if let Some(d) = st.domains.remove(&dom.id) {
                        self.destroy_all([d.ioas]);
                    }
                }
                Err(e)
            }
        }
    }

    fn detach(&self, ep: EndpointId, _dom: DomainId) -> Result<(), BackendError> {
        let mut st = self.lock();
        self.switch(&mut st, ep, BTreeMap::new(), Mode::Blocked, &[])
    }

    /// Bypass of an unattached endpoint is the guest-physical IOAS (all
    /// guest RAM one to one, as a bypass domain); blocked is no page table.
    fn set_unattached_bypass(&self, ep: EndpointId, bypass: bool) -> Result<(), BackendError> {
        let mut st = self.lock();
        if !st.endpoints.contains_key(&ep) {
            return Err(BackendError::NotFound(format!(
                "endpoint {ep} is not assigned"
            )));
        }
        if bypass {
            let desired = BTreeMap::from([(RID_PASID, self.gpa_ioas)]);
            self.switch(&mut st, ep, desired, Mode::Bypass, &[])
        } else {
            self.switch(&mut st, ep, BTreeMap::new(), Mode::Blocked, &[])
        }
    }

    fn map(&self, dom: DomainId, m: &Mapping) -> Result<(), BackendError> {
        let st = &mut *self.lock();
        let Some(d) = st.domains.get_mut(&dom) else {
            // No endpoint of this backend is in the domain.
            return Ok(());
        };
        let pieces = mapping_pieces(self.ram.get().regions(), m)?;
        for p in &pieces {
            check_alignment(p, HOST_PAGE)?;
        }
        for (i, p) in pieces.iter().enumerate() {
            if let Err(e) = self.ioctl("IOMMU_IOAS_MAP", Ioctl::IoasMap(&ioas_map(d.ioas, p))) {
                for q in pieces[..i].iter().rev() {
                    if let Err(x) = self.ioctl(
                        "IOMMU_IOAS_UNMAP",
                        Ioctl::IoasUnmap(&mut ioas_unmap(d.ioas, q)),
                    ) {
                        error!("iommufd: undo of IOAS map at {:#x} failed: {x}", q.iova);
                    }
                }
                return Err(e);
            }
        }
        d.mappings.insert(m.start, pieces);
        d.guest.insert(m.start, *m);
        Ok(())
    }

    fn unmap(&self, dom: DomainId, removed: &[Mapping]) -> Result<(), BackendError> {
        let st = &mut *self.lock();
        let Some(d) = st.domains.get_mut(&dom) else {
            return Ok(());
        };
        let mut done: Vec<DmaPiece> = Vec::new();
        for m in removed {
            let Some(pieces) = d.mappings.get(&m.start) else {
                continue;
            };
            for p in pieces {
                let mut a = ioas_unmap(d.ioas, p);
                let r = self.ioctl("IOMMU_IOAS_UNMAP", Ioctl::IoasUnmap(&mut a));
                let r = r.and_then(|()| {
                    if a.length == p.len {
                        Ok(())
                    } else {
                        Err(BackendError::Host {
                            op: "IOMMU_IOAS_UNMAP",
                            source: std::io::Error::other(format!(
                                "unmapped {:#x} of {:#x} bytes",
                                a.length, p.len
                            )),
                        })
                    }
                });
                if let Err(e) = r {
                    for q in done.iter().rev() {
                        if let Err(x) =
                            self.ioctl("IOMMU_IOAS_MAP", Ioctl::IoasMap(&ioas_map(d.ioas, q)))
                        {
                            error!("iommufd: undo of IOAS unmap at {:#x} failed: {x}", q.iova);
                        }
                    }
                    return Err(e);
                }
                done.push(*p);
            }
        }
        for m in removed {
            d.mappings.remove(&m.start);
            d.guest.remove(&m.start);
        }
        Ok(())
    }

    fn bind_table(&self, ep: EndpointId, binding: &TableBinding) -> Result<(), BackendError> {
        let mut st = self.lock();
        self.bind_locked(&mut st, ep, binding.domain, &binding.table)
    }

    fn unbind_table(&self, ep: EndpointId, _dom: DomainId) -> Result<(), BackendError> {
        let mut st = self.lock();
        self.switch(&mut st, ep, BTreeMap::new(), Mode::Blocked, &[])
    }

    fn invalidate(&self, dom: DomainId, batch: &[Invalidation]) -> Result<(), BackendError> {
        let mut st = self.lock();
        let (mut vtd, mut smmu) = (Vec::new(), Vec::new());
        for (id, e) in &st.endpoints {
            match &e.mode {
                Mode::Vtd(d, _) if *d == dom => vtd.push(*id),
                Mode::Smmu { domain, .. } if *domain == dom => smmu.push(*id),
                _ => {}
            }
        }
        if !vtd.is_empty() {
            self.invalidate_vtd(&mut st, &vtd, dom, batch)?;
        }
        if !smmu.is_empty() {
            self.invalidate_smmu(&st, &smmu, batch)?;
        }
        Ok(())
    }

    fn page_response(&self, resp: &PageResponse) -> Result<(), BackendError> {
        let mut st = self.lock();
        let key = (resp.endpoint, resp.pasid, resp.grpid);
        let Some(cookie) = st.pending.remove(&key) else {
            return Err(BackendError::NotFound(format!(
                "no page request group {} pending on endpoint {}",
                resp.grpid, resp.endpoint
            )));
        };
        let Some((_, fd)) = st.fault_queue else {
            return Err(BackendError::NotFound("no fault queue".into()));
        };
        let r = page_response(cookie, resp.code);
        match self.host.write(fd, bytes_of(&r)) {
            Ok(n) if n == std::mem::size_of_val(&r) => Ok(()),
            Ok(_) => {
                st.pending.insert(key, cookie);
                Err(BackendError::Host {
                    op: "write(fault queue)",
                    source: std::io::Error::other("short write"),
                })
            }
            Err(e) => {
                // The group is still waiting; the guest may answer again.
                st.pending.insert(key, cookie);
                Err(BackendError::Host {
                    op: "write(fault queue)",
                    source: e,
                })
            }
        }
    }

    fn drain_faults(&self, out: &mut Vec<BackendFault>) {
        let mut st = self.lock();
        if let Some((_, fd)) = st.fault_queue {
            let mut bytes = Vec::new();
            self.drain_queue(fd, PGFAULT_SIZE, &mut bytes);
            for f in parse_pgfaults(&bytes) {
                let ep = st
                    .endpoints
                    .iter()
                    .find(|(_, e)| e.dev_id == f.dev_id)
                    .map(|(id, _)| *id);
                let Some(ep) = ep else {
                    warn!("iommufd: page request from unknown device {}", f.dev_id);
                    continue;
                };
                let bf = pgfault_to_backend(&f, ep);
                // The group is answered once, with the cookie of its
                // requests (iommufd.h: echo the cookie of the last page).
                st.pending.insert((ep, bf.pasid, f.grpid), f.cookie);
                out.push(bf);
            }
        }
        for fd in st.shared.veventqs() {
            let mut bytes = Vec::new();
            self.drain_queue(fd, VEVENT_HEADER_SIZE + SMMU_EVENT_SIZE, &mut bytes);
            for ev in parse_vevents(&bytes) {
                match ev {
                    VEvent::Smmu(evt) => {
                        let known = |vsid: u32| st.endpoints.contains_key(&vsid).then_some(vsid);
                        if let Some(f) = smmu_event_to_backend(&evt, known) {
                            out.push(f);
                        }
                    }
                    VEvent::Lost => warn!("iommufd: vEVENTQ {} lost events", fd.0),
                }
            }
        }
    }

    fn add_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        self.plug_ram(change)
    }

    fn remove_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        self.unplug_ram(change)
    }
}
