//! SMMUv3 nested translation through [`IommufdBackend`] (table
//! passthrough): the guest's CD table becomes a nested HWPT from the STE
//! words on the endpoint's vIOMMU, and invalidations become CMDQ commands,
//! one `IOMMU_HWPT_INVALIDATE` per vIOMMU (physical SMMU) and batch.

use std::collections::{BTreeMap, HashSet};

use iommufd_bindings::iommufd::{
    iommu_hwpt_data_type_IOMMU_HWPT_DATA_ARM_SMMUV3,
    iommu_hwpt_invalidate_data_type_IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
    iommu_viommu_arm_smmuv3_invalidate,
};
use vmm_iommu::backend::{BackendError, DomainId, EndpointId};
use vmm_iommu::invalidation::Invalidation;
use vmm_iommu::wire::TableDesc;

use super::{IommufdBackend, Mode, Nesting, SmmuObjects, State};
use crate::args;
use crate::caps::HwKind;
use crate::host::{bytes_of, slice_bytes};
use crate::ram::GuestRam;
use crate::smmuv3::{lower_smmuv3_with, ste_for_table, SmmuHw, SmmuInvTarget};
use crate::vtd::RID_PASID;

impl IommufdBackend {
    /// Binds `ep` to the CD table `t` of domain `dom`: a nested HWPT on the
    /// endpoint's vIOMMU from the STE words, attached to the device.
    pub(super) fn bind_smmu(
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

    /// One batch for the SMMUv3 endpoints `eps` of a domain: each
    /// endpoint's commands (CFGI with its own vSID) are lowered first, so
    /// a refused value sends nothing; then one `IOMMU_HWPT_INVALIDATE` per
    /// vIOMMU (physical SMMU) carries the commands of all its endpoints, a
    /// command another endpoint already put there (the domain's TLBIs)
    /// once.
    pub(super) fn invalidate_smmu(
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
            self.send_invalidate(
                viommu,
                iommu_hwpt_invalidate_data_type_IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
                std::mem::size_of::<Cmd>(),
                slice_bytes(&cmds),
                sent,
            )?;
            sent += cmds.len();
        }
        Ok(())
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
