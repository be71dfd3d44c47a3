//! VT-d nested translation through [`IommufdBackend`] (per-PASID
//! shadowing): each present first-stage entry of the guest's PASID table
//! gets a nested HWPT on the endpoint's nest parent (`IOMMU_HWPT_DATA_VTD_S1`,
//! shared by equal entries), attached to its PASID; a PASID-cache
//! invalidation re-reads the entries it names, and IOTLB invalidations
//! reach the nested HWPTs, one `IOMMU_HWPT_INVALIDATE` per HWPT.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use iommufd_bindings::iommufd::{
    iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1,
    iommu_hwpt_invalidate_data_type_IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
    iommu_hwpt_vtd_s1_invalidate, iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_PASID,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID,
};
use vmm_iommu::backend::{BackendError, DomainId, EndpointId};
use vmm_iommu::invalidation::Invalidation;

use super::{objects, Endpoint, IommufdBackend, Mode, State, VtdBinding};
use crate::args;
use crate::caps::HwKind;
use crate::host::{bytes_of, slice_bytes};
use crate::vtd::{
    lower_vtd, read_pasid_entry, scan_pasid_table, PasidBinding, PasidRefresh, VtdS1, VtdTarget,
};

/// At most this many PASIDs of one endpoint are bound at once: each costs
/// a HWPT and an attachment in the host, and the guest writes the table.
pub const MAX_BOUND_PASIDS: usize = 1024;

impl IommufdBackend {
    /// Makes `entries` (every present entry of the guest table) the VT-d
    /// binding of `ep`: HWPTs with equal data are shared and reused from
    /// the current binding; new ones are allocated, attached, and on any
    /// failure destroyed again.
    pub(super) fn apply_vtd(
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

    /// One batch for the VT-d endpoints `eps` of domain `dom`: PASID-cache
    /// entries re-read each endpoint's table first; then the IOTLB entries
    /// go to the nested HWPTs they reach, one `IOMMU_HWPT_INVALIDATE` per
    /// HWPT, each entry once per HWPT however many endpoints share it.
    pub(super) fn invalidate_vtd(
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
            self.send_invalidate(
                id,
                iommu_hwpt_invalidate_data_type_IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
                std::mem::size_of::<iommu_hwpt_vtd_s1_invalidate>(),
                slice_bytes(&list),
                sent,
            )?;
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
}
