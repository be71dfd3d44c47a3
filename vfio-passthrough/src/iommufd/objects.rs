//! The iommufd objects [`IommufdBackend`]'s endpoints share per physical
//! IOMMU instance, as QEMU's `iommufd_cdev_autodomains_get` shares its
//! HWPTs: one `NEST_PARENT` HWPT (stage 2 on the guest-physical IOAS) per
//! instance, on SMMUv3 one vIOMMU on it with its vEVENTQ (each endpoint a
//! vDEVICE there), and the nested VT-d HWPTs of equal PASID entries of
//! endpoints on one parent. So a domain invalidation is one
//! `IOMMU_HWPT_INVALIDATE` per physical IOMMU (per vIOMMU on SMMUv3, per
//! shared nested HWPT on VT-d), not one per endpoint. A child module of
//! `iommufd`: it owns the bookkeeping and the calls that make and free
//! these objects; it never changes an endpoint's attachments beyond the
//! probe below.
//!
//! Which instance a device sits behind is the kernel's to say. A new
//! endpoint is attached to each parent it could share (same IOMMU family,
//! same `IOMMU_HWPT_ALLOC_PASID` choice, and tracking dirty pages if its
//! own IOMMU could): the kernel refuses a parent of another (or an
//! incompatible) IOMMU instance with EINVAL and the next is tried; the
//! first it accepts is shared; when none fits a new parent is allocated.
//! The probe attachment is undone at once, so the endpoint stays blocked
//! until the guest attaches it; if it cannot be undone the endpoint is
//! refused, never left reaching guest RAM.
//!
//! Every shared object is counted: a parent by its endpoints, a nested
//! HWPT by the endpoints whose binding uses it; the last user's going
//! (hot-unplug, unbind, a failed call's rollback) destroys it, children
//! before parents (vDEVICE, vEVENTQ, vIOMMU, parent), which is the order
//! the kernel requires.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use iommufd_bindings::iommufd::{
    iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_PASID,
};
use log::warn;
use vmm_iommu::backend::{BackendCaps, BackendError, EndpointId};

use super::{IommufdBackend, Nesting, SmmuObjects, State, VEVENTQ_DEPTH};
use crate::args;
use crate::caps::HwKind;
use crate::host::{Handle, Ioctl};
use crate::vtd::{VtdS1, RID_PASID};

/// One nest parent and what hangs on it.
#[derive(Debug)]
struct Parent {
    /// Allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`.
    dirty: bool,
    /// Allocated with `IOMMU_HWPT_ALLOC_PASID`.
    pasid: bool,
    /// Made for an SMMUv3 (it has a vIOMMU).
    smmu: bool,
    /// The endpoints on it.
    users: BTreeSet<EndpointId>,
    /// SMMUv3: the vIOMMU on the parent and its vEVENTQ (id, fd).
    viommu: Option<(u32, Option<(u32, Handle)>)>,
}

/// What makes two VT-d nested HWPTs the same object: the parent they are
/// built on, the allocation flags and fault queue, and the first-stage data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct NestedKey {
    /// The nest parent.
    pub(super) parent: u32,
    /// `IOMMU_HWPT_ALLOC_*` flags.
    pub(super) flags: u32,
    /// `fault_id` (0 without `FAULT_ID_VALID`).
    pub(super) fault_id: u32,
    /// The PASID entry's first-stage data.
    pub(super) s1: VtdS1,
}

/// The shared objects of a backend.
#[derive(Debug, Default)]
pub(super) struct Shared {
    /// Nest parents by HWPT ID.
    parents: BTreeMap<u32, Parent>,
    /// Nested HWPTs in use: the number of endpoints whose mode owns each,
    /// with its sharing key where it may be shared (VT-d).
    nested: HashMap<u32, (usize, Option<NestedKey>)>,
    /// Shareable nested HWPTs by key.
    by_key: HashMap<NestedKey, u32>,
}

/// The outcome of probing the existing parents for a new endpoint.
pub(super) enum Probe {
    /// The kernel accepted the device on this parent.
    Shares(u32),
    /// No parent fits (none, or every candidate refused with EINVAL).
    NoneFits,
    /// A candidate failed otherwise; the endpoint does not nest.
    Refused(BackendError),
}

impl Shared {
    /// The parents that track dirty pages.
    pub(super) fn tracking_parents(&self) -> BTreeSet<u32> {
        self.parents
            .iter()
            .filter(|(_, p)| p.dirty)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The vEVENTQ fds of the vIOMMUs.
    pub(super) fn veventqs(&self) -> Vec<Handle> {
        self.parents
            .values()
            .filter_map(|p| p.viommu.and_then(|(_, q)| q).map(|(_, fd)| fd))
            .collect()
    }

    /// The endpoints on parent `id` (for tests and diagnostics).
    pub(super) fn users_of(&self, id: u32) -> Vec<EndpointId> {
        self.parents
            .get(&id)
            .map(|p| p.users.iter().copied().collect())
            .unwrap_or_default()
    }

    /// A VT-d nested HWPT another endpoint already made for `key`.
    pub(super) fn nested_for(&self, key: &NestedKey) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// One more endpoint uses nested HWPT `id`.
    pub(super) fn acquire_nested(&mut self, id: u32) {
        self.nested.entry(id).or_insert((0, None)).0 += 1;
    }

    /// Nested HWPT `id`, in use, may be shared by endpoints that would
    /// allocate one for `key`.
    pub(super) fn share_nested(&mut self, id: u32, key: NestedKey) {
        if let Some(slot) = self.nested.get_mut(&id) {
            if slot.1.is_none() && !self.by_key.contains_key(&key) {
                slot.1 = Some(key);
                self.by_key.insert(key, id);
            }
        }
    }

    /// One endpoint fewer uses nested HWPT `id`: true when it was the last
    /// (the caller destroys it).
    fn release_nested(&mut self, id: u32) -> bool {
        let Some(slot) = self.nested.get_mut(&id) else {
            // Not counted (never acquired): the caller's alone.
            return true;
        };
        slot.0 = slot.0.saturating_sub(1);
        if slot.0 > 0 {
            return false;
        }
        if let Some((_, Some(k))) = self.nested.remove(&id) {
            self.by_key.remove(&k);
        }
        true
    }
}

/// Whether a nest parent for this endpoint is allocated PASID-capable: on
/// VT-d with PASIDs (like the nested HWPTs on it that attach to PASIDs).
fn wants_pasid(hw: &HwKind, caps: &BackendCaps) -> bool {
    matches!(hw, HwKind::IntelVtd(_)) && caps.pasid_bits > 0
}

impl IommufdBackend {
    /// Finds an existing nest parent the kernel accepts device `dev` on:
    /// attaches it to each candidate in turn (EINVAL: another IOMMU
    /// instance, next) and detaches it again. An error only when the probe
    /// attachment cannot be undone: the device must not stay on stage 2.
    pub(super) fn probe_parents(
        &self,
        st: &State,
        dev: Handle,
        hw: &HwKind,
        caps: &BackendCaps,
        dirty_capable: bool,
    ) -> Result<Probe, BackendError> {
        let smmu = matches!(hw, HwKind::ArmSmmuV3(_));
        let pasid = wants_pasid(hw, caps);
        let candidates = st
            .shared
            .parents
            .iter()
            .filter(|(_, p)| p.smmu == smmu && p.pasid == pasid && (p.dirty || !dirty_capable));
        for (&id, _) in candidates {
            match self.attach_step(dev, RID_PASID, Some(id)) {
                Ok(()) => {
                    self.attach_step(dev, RID_PASID, None)?;
                    return Ok(Probe::Shares(id));
                }
                Err(BackendError::Host { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Ok(Probe::Refused(e)),
            }
        }
        Ok(Probe::NoneFits)
    }

    /// Sets up endpoint `ep`'s nesting on the parent `probe` found, or on
    /// a new one (with, on SMMUv3, its vIOMMU and vEVENTQ); on SMMUv3 its
    /// vDEVICE carries `ep` as virtual StreamID. VT-d with page requests
    /// gets the backend's one fault queue. On failure nothing it made is
    /// left.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn setup_nesting(
        &self,
        st: &mut State,
        ep: EndpointId,
        dev_id: u32,
        hw: &HwKind,
        caps: &BackendCaps,
        dirty_capable: bool,
        probe: Probe,
    ) -> Result<Nesting, BackendError> {
        let (parent, fresh) = match probe {
            Probe::Refused(e) => return Err(e),
            Probe::Shares(id) => (id, false),
            Probe::NoneFits => (self.new_parent(st, dev_id, hw, caps, dirty_capable)?, true),
        };
        let Some(p) = st.shared.parents.get(&parent) else {
            return Err(BackendError::NotFound(format!("nest parent {parent}")));
        };
        let mut nesting = Nesting {
            parent,
            dirty: p.dirty,
            smmu: None,
        };
        if let Some((viommu, _)) = p.viommu {
            let mut d = args::vdevice_alloc(viommu, dev_id, u64::from(ep));
            if let Err(e) = self.ioctl("IOMMU_VDEVICE_ALLOC", Ioctl::VdeviceAlloc(&mut d)) {
                if fresh {
                    self.free_parent(st, parent);
                }
                return Err(e);
            }
            nesting.smmu = Some(SmmuObjects {
                viommu,
                vdevice: d.out_vdevice_id,
            });
        }
        if let Some(p) = st.shared.parents.get_mut(&parent) {
            p.users.insert(ep);
        }
        if matches!(hw, HwKind::IntelVtd(_)) && caps.page_requests && st.fault_queue.is_none() {
            let mut f = args::fault_alloc();
            match self.ioctl("IOMMU_FAULT_QUEUE_ALLOC", Ioctl::FaultQueueAlloc(&mut f)) {
                Ok(()) => st.fault_queue = Some((f.out_fault_id, Handle(f.out_fault_fd as i32))),
                Err(e) => warn!("iommufd: no fault queue, page requests unsupported: {e}"),
            }
        }
        Ok(nesting)
    }

    /// Allocates a nest parent for device `dev_id` and, on SMMUv3, the
    /// vIOMMU on it and its vEVENTQ (a vIOMMU without one still nests;
    /// its faults go unreported), and records them with no user yet.
    fn new_parent(
        &self,
        st: &mut State,
        dev_id: u32,
        hw: &HwKind,
        caps: &BackendCaps,
        dirty_capable: bool,
    ) -> Result<u32, BackendError> {
        let pasid = wants_pasid(hw, caps);
        let mut flags = iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT;
        if pasid {
            flags |= iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_PASID;
        }
        let a = args::hwpt_alloc(
            flags,
            dev_id,
            self.gpa_ioas,
            iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE,
            0,
            0,
        );
        let (id, dirty) = self.alloc_nest_parent(a, dirty_capable)?;
        let mut viommu = None;
        if let HwKind::ArmSmmuV3(_) = hw {
            let mut v = args::viommu_alloc_smmuv3(dev_id, id);
            if let Err(e) = self.ioctl("IOMMU_VIOMMU_ALLOC", Ioctl::ViommuAlloc(&mut v)) {
                self.destroy_all([id]);
                return Err(e);
            }
            let vid = v.out_viommu_id;
            let mut q = args::veventq_alloc_smmuv3(vid, VEVENTQ_DEPTH);
            let queue = match self.ioctl("IOMMU_VEVENTQ_ALLOC", Ioctl::VeventqAlloc(&mut q)) {
                Ok(()) => Some((q.out_veventq_id, Handle(q.out_veventq_fd as i32))),
                Err(e) => {
                    warn!("iommufd: vIOMMU {vid} has no vEVENTQ, its faults go unreported: {e}");
                    None
                }
            };
            viommu = Some((vid, queue));
        }
        st.shared.parents.insert(
            id,
            Parent {
                dirty,
                pasid,
                smmu: viommu.is_some(),
                users: BTreeSet::new(),
                viommu,
            },
        );
        Ok(id)
    }

    /// Endpoint `ep` (already detached from everything) leaves its parent:
    /// its vDEVICE is destroyed, and if it was the parent's last user the
    /// parent goes with its vIOMMU and vEVENTQ.
    pub(super) fn release_nesting(&self, st: &mut State, ep: EndpointId, n: Nesting) {
        if let Some(o) = n.smmu {
            self.destroy_all([o.vdevice]);
        }
        let last = match st.shared.parents.get_mut(&n.parent) {
            Some(p) => {
                p.users.remove(&ep);
                p.users.is_empty()
            }
            None => false,
        };
        if last {
            self.free_parent(st, n.parent);
        }
    }

    /// Destroys parent `id` and what hangs on it, and forgets it (also as
    /// a dirty-tracking parent: a later parent may get its ID).
    fn free_parent(&self, st: &mut State, id: u32) {
        let Some(p) = st.shared.parents.remove(&id) else {
            return;
        };
        if let Some((viommu, queue)) = p.viommu {
            if let Some((qid, fd)) = queue {
                self.host.close(fd);
                self.destroy_all([qid]);
            }
            self.destroy_all([viommu]);
        }
        self.destroy_all([id]);
        if let Some(on) = st.dirty_parents.as_mut() {
            on.remove(&id);
        }
    }

    /// Nested HWPTs `ids` lose one user each (an endpoint's mode gave them
    /// up); those left without one are destroyed.
    pub(super) fn release_nested(&self, st: &mut State, ids: impl IntoIterator<Item = u32>) {
        let mut dead = Vec::new();
        for id in ids {
            if st.shared.release_nested(id) {
                dead.push(id);
            }
        }
        self.destroy_all(dead);
    }

    /// Closes every vEVENTQ fd (the backend is dropped; closing the
    /// iommufd frees the objects).
    pub(super) fn close_shared(&self, st: &State) {
        for fd in st.shared.veventqs() {
            self.host.close(fd);
        }
    }

    /// The nest parent endpoint `ep` nests on (for tests and
    /// diagnostics): `None` for an endpoint that cannot nest.
    pub fn nest_parent_of(&self, ep: EndpointId) -> Option<u32> {
        self.lock().endpoints.get(&ep)?.nesting.map(|n| n.parent)
    }

    /// The endpoints sharing nest parent `parent` (for tests and
    /// diagnostics): empty when no such parent is alive.
    pub fn parent_users(&self, parent: u32) -> Vec<EndpointId> {
        self.lock().shared.users_of(parent)
    }
}
