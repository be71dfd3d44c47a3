//! The rules of the project's nested extension (ATTACH_TABLE, INVALIDATE,
//! PAGE_RESP; `docs/wire.md`), and the snapshots the router restores
//! when a backend refuses what the state already accepted.

use super::{feature, phys_in_ram, Domain, DomainKind, IommuState, RequestError};
use crate::invalidation::Invalidation;
use crate::nested::arm;
use crate::nested::smmuv3::{S1Dss, S1Fmt};
use crate::wire::{
    AttachTableReq, InvalidateReq, PageRespReq, TableDesc, TableDescError,
    VIRTIO_IOMMU_F_ATTACH_TABLE, VIRTIO_IOMMU_F_PAGE_REQUEST, VIRTIO_IOMMU_PAGE_RESP_FAILURE,
    VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID,
};

/// What an ATTACH or ATTACH_TABLE changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachOutcome {
    /// The endpoint's translation changed (it was elsewhere or nowhere).
    pub changed: bool,
    /// The domain it left, if any.
    pub left: Option<u32>,
}

/// A copy of some domains and one endpoint's attachment, taken before a
/// request that a backend may still refuse.
#[derive(Clone, Debug)]
pub(crate) struct StateSnapshot {
    domains: Vec<(u32, Option<Domain>)>,
    endpoint: (u32, Option<u32>),
}

/// Smallest number of bytes each format's first table occupies; the
/// pointer's whole first table must be guest RAM.
fn first_table_bytes(t: &TableDesc) -> u64 {
    match *t {
        // One directory entry per 64 PASIDs (VT-d 9.4), 8 bytes each.
        TableDesc::IntelVtd { pasid_bits, .. } => (1u64 << pasid_bits.saturating_sub(6)) * 8,
        // Linear: one 64-byte CD per SSID; 2-level: one 8-byte L1
        // descriptor per leaf table (SMMUv3 5.4.1). The format as the
        // shared decoder reads it (0b11 is linear).
        TableDesc::ArmSmmuV3 { s1fmt, s1cdmax, .. } => {
            match S1Fmt::from_raw(s1fmt).and_then(S1Fmt::split) {
                None => 64u64 << s1cdmax.min(20),
                Some(leaf_bits) => 8u64 << s1cdmax.min(20).saturating_sub(leaf_bits),
            }
        }
        TableDesc::ArmLpae { .. } => 64,
        TableDesc::X86_64 { .. } => 4096,
    }
}

impl IommuState {
    /// Sets the table formats `ep`'s PROBE advertises (the config's
    /// formats its backend supports). Without a call, none.
    pub fn set_endpoint_formats(&mut self, ep: u32, formats: Vec<u16>) {
        self.endpoint_formats.insert(ep, formats);
    }

    /// The table formats `ep` advertises.
    pub fn endpoint_formats(&self, ep: u32) -> &[u16] {
        self.endpoint_formats
            .get(&ep)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The configured PASID width of the nested extension (0 when off).
    pub fn pasid_bits(&self) -> u8 {
        self.pasid_bits
    }

    /// Every endpoint this vIOMMU manages.
    pub fn endpoint_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.endpoints.keys().copied()
    }

    /// Every attached endpoint and its domain.
    pub fn attachments(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.endpoints
            .iter()
            .filter_map(|(&ep, &d)| d.map(|d| (ep, d)))
    }

    /// The table bound to `domain`, if it is a table domain.
    pub fn domain_table(&self, domain: u32) -> Option<&TableDesc> {
        match self.domains.get(&domain).map(|d| &d.kind) {
            Some(DomainKind::Table(t)) => Some(t),
            _ => None,
        }
    }

    fn nested_negotiated(&self, request: &'static str, bit: u32) -> Result<(), RequestError> {
        if feature(self.acked, bit) {
            Ok(())
        } else {
            Err(RequestError::FeatureNotNegotiated {
                request,
                feature: bit,
            })
        }
    }

    /// Checks a table's own parameters against the format and the config.
    fn check_table(&self, t: &TableDesc) -> Result<(), RequestError> {
        let bits = u32::from(self.pasid_bits);
        match *t {
            TableDesc::IntelVtd { pasid_bits, .. } => {
                if pasid_bits == 0 || u32::from(pasid_bits) > bits {
                    return Err(RequestError::TableParam(
                        "pasid_bits outside 1..=PASID_SIZE",
                    ));
                }
            }
            TableDesc::ArmSmmuV3 {
                s1fmt,
                s1dss,
                s1cdmax,
                ..
            } => {
                // SMMUv3 §5.2: the reserved 0b11 of both fields "behaves
                // as 0b00", and is accepted as such (the shared decoder
                // says how); only values beyond the 2-bit fields are
                // refused.
                let Some(fmt) = S1Fmt::from_raw(s1fmt) else {
                    return Err(RequestError::TableParam("s1fmt is not a 2-bit value"));
                };
                if S1Dss::from_raw(s1dss).is_none() {
                    return Err(RequestError::TableParam("s1dss is not a 2-bit value"));
                }
                if s1cdmax > bits {
                    return Err(RequestError::TableParam("s1cdmax beyond PASID_SIZE"));
                }
                if fmt.split().is_some_and(|leaf_bits| s1cdmax <= leaf_bits) {
                    // SMMUv3 5.4: a 2-level table needs more SSIDs than
                    // one leaf table holds.
                    return Err(RequestError::TableParam(
                        "2-level CD table with too few SSIDs",
                    ));
                }
            }
            TableDesc::X86_64 { levels, .. } => {
                if levels != 4 && levels != 5 {
                    return Err(RequestError::TableParam("levels is not 4 or 5"));
                }
            }
            TableDesc::ArmLpae {
                tcr, ttbr0, ttbr1, ..
            } => {
                // Only the TTBR0 half is walked (no kernel half for DMA).
                if ttbr1 != 0 {
                    return Err(RequestError::TableParam("ttbr1 must be zero"));
                }
                // The start table exactly as the walker will read it (Arm
                // ARM D8.2.3: aligned to its own size, BADDR[51:48] in
                // bits 5:2 with a 52-bit 64 KiB regime): one decoder, one
                // verdict. A TCR the walker refuses is left to fault at
                // translation time, as hardware would; then only the
                // format's generic pointer check below applies.
                if let Ok(c) = arm::Config::from_tcr(tcr, ttbr0, 0, 0, 0) {
                    if c.epd0() {
                        // EPD0 = 1: TTBR0 is never walked, any value goes.
                        return Ok(());
                    }
                    let ptr = c.ttb0();
                    if ptr >> c.oa_bits() != 0 {
                        return Err(RequestError::TablePointerBeyondOutput {
                            ptr,
                            oa_bits: c.oa_bits(),
                        });
                    }
                    let size = c.start_table_bytes();
                    let in_ram = ptr
                        .checked_add(size - 1)
                        .is_some_and(|last| phys_in_ram(&self.ram, ptr, last));
                    if !in_ram && !self.replaying {
                        return Err(RequestError::TablePointer { ptr, align: size });
                    }
                    return Ok(());
                }
            }
        }
        let (ptr, align) = t.table_pointer();
        let size = first_table_bytes(t);
        let in_ram = ptr
            .checked_add(size - 1)
            .is_some_and(|last| phys_in_ram(&self.ram, ptr, last));
        // A replayed binding may point at RAM unplugged since its
        // ATTACH_TABLE (see `IommuState::replaying`).
        if ptr % align != 0 || (!in_ram && !self.replaying) {
            return Err(RequestError::TablePointer { ptr, align });
        }
        Ok(())
    }

    /// ATTACH_TABLE: attaches the endpoint to the domain (creating it) and
    /// makes the table the domain's. A second endpoint joins only with the
    /// same table. Returns the table and what changed.
    pub fn attach_table(
        &mut self,
        r: &AttachTableReq,
    ) -> Result<(TableDesc, AttachOutcome), RequestError> {
        self.nested_negotiated("ATTACH_TABLE", VIRTIO_IOMMU_F_ATTACH_TABLE)?;
        let current = *self
            .endpoints
            .get(&r.endpoint)
            .ok_or(RequestError::UnknownEndpoint(r.endpoint))?;
        self.check_domain_range(r.domain)?;
        let table = match r.table() {
            Ok(t) => t,
            Err(TableDescError::UnknownFormat(format)) => {
                return Err(RequestError::UnsupportedFormat {
                    endpoint: r.endpoint,
                    format,
                })
            }
            Err(TableDescError::Reserved) => {
                return Err(RequestError::ReservedNotZero {
                    request: "ATTACH_TABLE",
                })
            }
        };
        if !self.endpoint_formats(r.endpoint).contains(&table.format()) {
            return Err(RequestError::UnsupportedFormat {
                endpoint: r.endpoint,
                format: table.format(),
            });
        }
        self.check_table(&table)?;
        match self.domains.get(&r.domain).map(|d| &d.kind) {
            Some(DomainKind::Table(bound)) => {
                if *bound != table {
                    return Err(RequestError::IncompatibleTable(r.domain));
                }
                if current == Some(r.domain) {
                    return Ok((
                        table,
                        AttachOutcome {
                            changed: false,
                            left: None,
                        },
                    ));
                }
            }
            Some(_) => {
                return Err(RequestError::TableDomain {
                    request: "ATTACH_TABLE onto a MAP or bypass",
                    domain: r.domain,
                })
            }
            None => self.check_new_domain(current)?,
        }
        self.join(r.endpoint, current, r.domain, || DomainKind::Table(table));
        Ok((
            table,
            AttachOutcome {
                changed: true,
                left: current,
            },
        ))
    }

    /// INVALIDATE: checks the request against the domain and returns the
    /// generic invalidation.
    pub fn invalidation(&self, r: &InvalidateReq) -> Result<Invalidation, RequestError> {
        self.nested_negotiated("INVALIDATE", VIRTIO_IOMMU_F_ATTACH_TABLE)?;
        self.check_domain_range(r.domain)?;
        let dom = self
            .domains
            .get(&r.domain)
            .ok_or(RequestError::UnknownDomain(r.domain))?;
        let DomainKind::Table(t) = &dom.kind else {
            return Err(RequestError::NotTableDomain(r.domain));
        };
        let pasid_bits = match *t {
            TableDesc::IntelVtd { pasid_bits, .. } => pasid_bits,
            TableDesc::ArmSmmuV3 { s1cdmax, .. } => s1cdmax.min(32) as u8,
            TableDesc::ArmLpae { .. } | TableDesc::X86_64 { .. } => 0,
        };
        Ok(Invalidation::from_request(r, pasid_bits)?)
    }

    /// PAGE_RESP: checks the request; the backend that sent the page
    /// request matches it to a pending group.
    pub fn check_page_resp(&self, r: &PageRespReq) -> Result<(), RequestError> {
        self.nested_negotiated("PAGE_RESP", VIRTIO_IOMMU_F_PAGE_REQUEST)?;
        if r.reserved_set {
            return Err(RequestError::ReservedNotZero {
                request: "PAGE_RESP",
            });
        }
        if r.flags & !VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID != 0 {
            return Err(RequestError::UnknownFlags {
                request: "PAGE_RESP",
                flags: r.flags,
                unknown: r.flags & !VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID,
            });
        }
        if r.flags & VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID == 0 && r.pasid != 0 {
            return Err(RequestError::ReservedNotZero {
                request: "PAGE_RESP pasid without PASID_VALID",
            });
        }
        if r.code > VIRTIO_IOMMU_PAGE_RESP_FAILURE {
            return Err(RequestError::PageRespCode(r.code));
        }
        if !self.endpoints.contains_key(&r.endpoint) {
            return Err(RequestError::UnknownEndpoint(r.endpoint));
        }
        Ok(())
    }

    /// Copies the domains `ids` (those that exist) and `ep`'s attachment.
    pub(crate) fn snapshot(&self, ids: &[u32], ep: u32) -> StateSnapshot {
        let mut domains: Vec<(u32, Option<Domain>)> = Vec::with_capacity(ids.len());
        for &id in ids {
            if !domains.iter().any(|(d, _)| *d == id) {
                domains.push((id, self.domains.get(&id).cloned()));
            }
        }
        StateSnapshot {
            domains,
            endpoint: (ep, self.endpoints.get(&ep).copied().flatten()),
        }
    }

    /// Puts back what [`Self::snapshot`] copied: the request that came in
    /// between never happened.
    pub(crate) fn restore(&mut self, snap: StateSnapshot) {
        let count = |d: &Option<Domain>| match d {
            Some(Domain {
                kind: DomainKind::Mapped(t),
                ..
            }) => t.len() as u64,
            _ => 0,
        };
        for (id, old) in snap.domains {
            let now = self.domains.remove(&id);
            self.total_mappings = self.total_mappings - count(&now) + count(&old);
            if let Some(d) = old {
                self.domains.insert(id, d);
            }
        }
        let (ep, dom) = snap.endpoint;
        if self.endpoints.contains_key(&ep) {
            self.endpoints.insert(ep, dom);
        }
    }
}
