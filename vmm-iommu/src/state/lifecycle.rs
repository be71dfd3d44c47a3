//! The state's side of the VM lifecycle: what a snapshot holds of it, the
//! replay that rebuilds it from a snapshot, and endpoints plugged and
//! unplugged while the device runs.
//!
//! The replay goes through the same `attach` / `map` / `attach_table`
//! rules a guest request meets: a snapshot (untrusted input) can only
//! rebuild a state the guest could have built, and every refusal names the
//! rule. It never touches backends; the vIOMMU replays them afterwards.

use std::collections::HashMap;

use super::{DomainKind, IommuState};
use crate::snapshot::{
    DomainKindSnapshot, DomainSnapshot, MappingSnapshot, SnapshotError, TableSnapshot,
};
use crate::wire::{AttachReq, AttachTableReq, MapReq, TableDesc, VIRTIO_IOMMU_ATTACH_F_BYPASS};

impl IommuState {
    /// The features the driver accepted, as the rules see them.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Whether no domain exists (so no endpoint is attached): the state of
    /// a device just built or reset.
    pub fn is_pristine(&self) -> bool {
        self.domains.is_empty() && self.endpoints.values().all(Option::is_none)
    }

    /// Endpoints (ascending) and domains (ascending, mappings by IOVA) for
    /// a snapshot.
    pub fn save(&self) -> (Vec<u32>, Vec<DomainSnapshot>) {
        let mut endpoints: Vec<u32> = self.endpoints.keys().copied().collect();
        endpoints.sort_unstable();
        let mut ids: Vec<u32> = self.domains.keys().copied().collect();
        ids.sort_unstable();
        let domains = ids
            .into_iter()
            .filter_map(|id| {
                let d = self.domains.get(&id)?;
                let kind = match &d.kind {
                    DomainKind::Mapped(t) => DomainKindSnapshot::Mapped(
                        t.iter()
                            .map(|m| MappingSnapshot(m.start, m.end, m.phys, m.flags))
                            .collect(),
                    ),
                    DomainKind::Bypass => DomainKindSnapshot::Bypass,
                    DomainKind::Table(t) => DomainKindSnapshot::Table(TableSnapshot::from(*t)),
                };
                Some(DomainSnapshot {
                    id,
                    endpoints: d.endpoints.clone(),
                    kind,
                })
            })
            .collect();
        (endpoints, domains)
    }

    /// Drops every domain and attachment, keeping endpoints and features:
    /// the undo of a replay that failed half way.
    pub(crate) fn clear_domains(&mut self) {
        for d in self.endpoints.values_mut() {
            *d = None;
        }
        self.domains.clear();
        self.total_mappings = 0;
    }

    /// Rebuilds endpoints' attachments, domains and mappings from a
    /// snapshot into a pristine state whose features are already set. With
    /// `map_compared` (the caller checked the snapshot's RAM and MMIO
    /// windows are this state's), table pointers and MMIO mappings are not
    /// checked against them: they held when the guest made them, and RAM
    /// or a window may have gone since. On error the state may hold part
    /// of it: the caller clears it.
    pub(crate) fn replay(
        &mut self,
        endpoints: &[u32],
        domains: &[DomainSnapshot],
        map_compared: bool,
    ) -> Result<(), SnapshotError> {
        self.replaying = map_compared;
        let res = self.replay_all(endpoints, domains);
        self.replaying = false;
        res
    }

    fn replay_all(
        &mut self,
        endpoints: &[u32],
        domains: &[DomainSnapshot],
    ) -> Result<(), SnapshotError> {
        // The endpoint set is what PROBE and ATTACH answer NOENT for: it
        // must be exactly this device's.
        let mut listed: HashMap<u32, Option<u32>> = HashMap::with_capacity(endpoints.len());
        for &ep in endpoints {
            if !self.endpoints.contains_key(&ep) {
                return Err(SnapshotError::UnknownEndpoint(ep));
            }
            if listed.insert(ep, None).is_some() {
                return Err(SnapshotError::DuplicateEndpoint(ep));
            }
        }
        let mut missing: Vec<u32> = self
            .endpoints
            .keys()
            .copied()
            .filter(|ep| !listed.contains_key(ep))
            .collect();
        missing.sort_unstable();
        if let Some(&ep) = missing.first() {
            return Err(SnapshotError::MissingEndpoint(ep));
        }
        for d in domains {
            if self.domains.contains_key(&d.id) {
                return Err(SnapshotError::DuplicateDomain(d.id));
            }
            if d.endpoints.is_empty() {
                return Err(SnapshotError::EmptyDomain(d.id));
            }
            for &ep in &d.endpoints {
                match listed.get_mut(&ep) {
                    None => {
                        return Err(SnapshotError::DomainEndpoint {
                            domain: d.id,
                            endpoint: ep,
                        })
                    }
                    Some(Some(first)) => {
                        return Err(SnapshotError::TwoDomains {
                            endpoint: ep,
                            first: *first,
                            second: d.id,
                        })
                    }
                    Some(slot) => *slot = Some(d.id),
                }
            }
            self.replay_domain(d)?;
        }
        Ok(())
    }

    /// Rebuilds one domain through the request rules.
    fn replay_domain(&mut self, d: &DomainSnapshot) -> Result<(), SnapshotError> {
        let refused = |what: String| {
            move |source| SnapshotError::Refused {
                what: format!("domain {}: {what}", d.id),
                source,
            }
        };
        let attach = |st: &mut Self, ep: u32, flags: u32| {
            st.attach(&AttachReq {
                domain: d.id,
                endpoint: ep,
                flags,
                reserved: [0; 4],
            })
            .map(|_| ())
            .map_err(refused(format!("ATTACH of endpoint {ep}")))
        };
        match &d.kind {
            DomainKindSnapshot::Bypass => {
                for &ep in &d.endpoints {
                    attach(self, ep, VIRTIO_IOMMU_ATTACH_F_BYPASS)?;
                }
            }
            DomainKindSnapshot::Mapped(mappings) => {
                // The first endpoint creates the domain, the mappings fill
                // it (every MAP rule applies), the others join it.
                attach(self, d.endpoints[0], 0)?;
                for m in mappings {
                    self.map(&MapReq {
                        domain: d.id,
                        virt_start: m.0,
                        virt_end: m.1,
                        phys_start: m.2,
                        flags: m.3,
                    })
                    .map_err(refused(format!(
                        "mapping [{:#x}, {:#x}] -> {:#x}",
                        m.0, m.1, m.2
                    )))?;
                }
                for &ep in &d.endpoints[1..] {
                    attach(self, ep, 0)?;
                }
            }
            DomainKindSnapshot::Table(t) => {
                let table = TableDesc::from(*t);
                for &ep in &d.endpoints {
                    self.attach_table(&AttachTableReq::new(d.id, ep, &table))
                        .map_err(refused(format!("ATTACH_TABLE of endpoint {ep}")))?;
                }
            }
        }
        Ok(())
    }

    /// Adds a hot-plugged endpoint, unattached, advertising `formats`.
    /// Returns `false` (and changes nothing) if it already exists.
    pub(crate) fn add_endpoint(&mut self, ep: u32, formats: Vec<u16>) -> bool {
        if self.endpoints.contains_key(&ep) {
            return false;
        }
        self.endpoints.insert(ep, None);
        self.endpoint_formats.insert(ep, formats);
        true
    }

    /// Removes an unplugged endpoint, detaching it first (its domain ends
    /// if it was the last endpoint). Returns the domain it was attached
    /// to, or `None` if the endpoint does not exist.
    pub(crate) fn remove_endpoint(&mut self, ep: u32) -> Option<Option<u32>> {
        let attached = *self.endpoints.get(&ep)?;
        if let Some(dom) = attached {
            self.detach_endpoint(ep, dom);
        }
        self.endpoints.remove(&ep);
        self.endpoint_formats.remove(&ep);
        self.endpoint_reserved.remove(&ep);
        Some(attached)
    }
}
