//! MAP-mode domains of [`IommufdBackend`]: one IOAS per domain holding
//! the guest's mappings at their IOVAs (`IOMMU_IOAS_MAP` of the host
//! addresses of guest pages), its endpoints attached to it; MAP and UNMAP
//! journaled and undone in reverse on a failure; the IOAS destroyed with
//! its last endpoint.

use std::collections::{BTreeMap, BTreeSet};

use log::error;
use vmm_iommu::backend::{BackendError, DomainId, DomainView, EndpointId};
use vmm_iommu::Mapping;

use super::{IommufdBackend, MapDomain, Mode, State, HOST_PAGE};
use crate::args;
use crate::dma::{check_alignment, ioas_map, ioas_unmap, mapping_pieces, DmaPiece};
use crate::host::Ioctl;
use crate::vtd::RID_PASID;

impl IommufdBackend {
    /// Attaches `ep` to MAP-mode domain `dom`, creating the domain's IOAS
    /// with its mappings if `ep` is its first endpoint here (and
    /// destroying it again if the attachment fails).
    pub(super) fn attach_map(
        &self,
        st: &mut State,
        ep: EndpointId,
        dom: &DomainView<'_>,
    ) -> Result<(), BackendError> {
        let created = match st.domains.entry(dom.id) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(self.create_map_domain(dom.mappings)?);
                true
            }
        };
        let ioas = st.domains.get(&dom.id).map(|d| d.ioas).unwrap_or(0);
        let desired = BTreeMap::from([(RID_PASID, ioas)]);
        match self.switch(st, ep, desired, Mode::Map(dom.id), &[]) {
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

    /// Maps `m` into the IOAS of domain `dom`, if any endpoint here is in it.
    pub(super) fn map_in_domain(&self, dom: DomainId, m: &Mapping) -> Result<(), BackendError> {
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

    /// Unmaps `removed` from the IOAS of domain `dom`, if any endpoint here
    /// is in it.
    pub(super) fn unmap_in_domain(
        &self,
        dom: DomainId,
        removed: &[Mapping],
    ) -> Result<(), BackendError> {
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

    /// Takes `ep` out of MAP-mode domain `dom`; the domain's IOAS goes
    /// with its last endpoint.
    pub(super) fn leave_map_domain(&self, st: &mut State, ep: EndpointId, dom: DomainId) {
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
}
