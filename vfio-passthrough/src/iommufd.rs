//! [`IommufdBackend`]: assigned devices through iommufd and VFIO cdevs.
//!
//! At construction the backend opens `/dev/iommu`, allocates one IOAS and
//! maps all guest RAM into it at its guest-physical addresses: that IOAS is
//! stage 2 for every nested binding (through a `NEST_PARENT` HWPT per
//! physical IOMMU, shared by its endpoints: `iommufd/objects.rs`) and the
//! page table of bypass domains. RAM plugged or unplugged later is mapped
//! into or out of it, and out of the MAP-mode IOASes (`iommufd/memory.rs`).
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
//!
//! This module holds the backend's state and its [`IommuBackend`] face;
//! every other job is a child module of its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use log::error;
use vmm_iommu::backend::{
    BackendCaps, BackendError, BackendFault, DomainId, DomainView, EndpointId, IommuBackend,
    PageResponse, RamChange, TableBinding,
};
use vmm_iommu::invalidation::Invalidation;
use vmm_iommu::wire::TableDesc;
use vmm_iommu::Mapping;

use crate::args;
use crate::caps::HwKind;
use crate::dma::{identity_pieces, ioas_map, DmaPiece};
use crate::host::{Handle, HostIommu, Ioctl, Open};
use crate::ram::{GuestRam, SharedRam};
use crate::type1::host_err;
use crate::vtd::{check_directory, scan_pasid_table, VtdS1, RID_PASID};

// Dirty tracking on the nest parents (issue 13).
mod dirty;
// Assigning and removing devices.
mod endpoint;
// The page-request queue and the vEVENTQs.
mod fault_queues;
// Sending invalidations to nested HWPTs and vIOMMUs.
mod invalidate;
// MAP-mode domains, one IOAS each.
mod map_domain;
// RAM hot-plug (issue 12).
mod memory;
// SMMUv3 nested translation (table passthrough).
mod nested_smmuv3;
// VT-d nested translation (per-PASID shadowing).
mod nested_vtd;
// Nest parents, vIOMMUs and nested HWPTs shared per physical IOMMU (issue 12).
mod objects;
// The attachment journal every mode switch goes through.
mod reconcile;

pub use nested_vtd::MAX_BOUND_PASIDS;

/// Depth of each SMMUv3 vEVENTQ.
pub const VEVENTQ_DEPTH: u32 = 64;
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
    /// Whether the backend made `gpa_ioas` and keeps its contents (RAM
    /// plugged and unplugged); `false` when the VMM handed over its own
    /// ([`IommufdBackend::with_stage2_ioas`]) and keeps it itself.
    owns_stage2: bool,
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
            owns_stage2: true,
            state: Mutex::new(State::default()),
        })
    }

    /// As [`Self::new`], over the VMM's own stage-2 IOAS `ioas` in the
    /// iommufd `host` opens (the VMM's, handed over with
    /// [`crate::sys::VfioHost::adopt_iommufd`]): an IOAS that already maps
    /// all guest RAM at its guest-physical addresses, as a VMM's VFIO code
    /// keeps for its assigned devices. Nothing is allocated or mapped, so
    /// guest RAM is pinned once, not twice. The IOAS stays the VMM's: it
    /// maps RAM it plugs and unmaps RAM it unplugs there itself (this
    /// backend's `add_ram` / `remove_ram` then change only its MAP-mode
    /// IOASes), and the backend never destroys it. Refused when `ioas` is
    /// not an IOAS of that iommufd.
    pub fn with_stage2_ioas(
        host: Arc<dyn HostIommu>,
        ram: GuestRam,
        ioas: u32,
    ) -> Result<Self, BackendError> {
        let iommufd = host
            .open(Open::Iommufd)
            .map_err(host_err("open(/dev/iommu)"))?
            .handle;
        let b = IommufdBackend {
            host,
            ram: SharedRam::new(ram),
            iommufd,
            gpa_ioas: ioas,
            owns_stage2: false,
            state: Mutex::new(State::default()),
        };
        // Any answer but "no such object" shows an IOAS is there.
        if let Err(e) = b.allowed_ranges(ioas) {
            return Err(BackendError::Invalid(format!(
                "stage-2 IOAS {ioas} is not an IOAS of the VMM's iommufd: {e}"
            )));
        }
        Ok(b)
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

    /// Binds `ep` to table `t` of domain `dom` in the nested mode of the
    /// endpoint's IOMMU.
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

    /// The vIOMMU unplugged the endpoint (after detaching it): its objects
    /// are released and its cdev closed, as
    /// [`IommufdBackend::remove_endpoint`] does. An endpoint this backend
    /// does not know is nothing to do.
    fn remove_endpoint(&self, ep: EndpointId) {
        match IommufdBackend::remove_endpoint(self, ep) {
            Ok(()) | Err(BackendError::NotFound(_)) => {}
            Err(e) => error!("iommufd: unplugged endpoint {ep} not released: {e}"),
        }
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
        self.attach_map(&mut st, ep, dom)
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
        self.map_in_domain(dom, m)
    }

    fn unmap(&self, dom: DomainId, removed: &[Mapping]) -> Result<(), BackendError> {
        self.unmap_in_domain(dom, removed)
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
        self.invalidate_domain(dom, batch)
    }

    fn page_response(&self, resp: &PageResponse) -> Result<(), BackendError> {
        self.answer_page_request(resp)
    }

    fn drain_faults(&self, out: &mut Vec<BackendFault>) {
        self.drain_host_faults(out)
    }

    fn add_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        self.plug_ram(change)
    }

    fn remove_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        self.unplug_ram(change)
    }
}
