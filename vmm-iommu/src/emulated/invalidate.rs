//! INVALIDATE in the software IOMMU: which entries of the PASID cache,
//! the paging-structure cache and the IOTLB a generic [`Invalidation`]
//! names, and their removal, probing entry by entry where that is cheaper
//! than a scan of the cache.

use super::cache::{DirectMapped, Key};
use super::{key, Caches3, EmulatedIommu, NO_PASID};
use crate::backend::DomainId;
use crate::invalidation::{Caches, Invalidation, Scope, VaRange};

impl<M> EmulatedIommu<M> {
    /// Drops what `inv` names of domain `dom` from the caches `c`.
    pub(super) fn invalidate_one(&self, c: &mut Caches3, dom: DomainId, inv: &Invalidation) {
        let iotlb = inv.caches.contains(Caches::IOTLB);
        match inv.scope {
            Scope::Domain => {
                if inv.caches.contains(Caches::PASID) {
                    c.pasid.retain(|k| k.domain != dom);
                }
                if iotlb {
                    c.iotlb.retain(|k| k.domain != dom);
                    c.pwc.retain(|k| k.domain != dom);
                }
            }
            Scope::Pasid(p) => {
                let named = |k: &Key| k.domain == dom && pasid_named(k.pasid, Some(p));
                if inv.caches.contains(Caches::PASID) {
                    c.pasid.retain(|k| !named(k));
                }
                if iotlb {
                    c.iotlb.retain(|k| !named(k));
                    c.pwc.retain(|k| !named(k));
                }
            }
            Scope::Range(r) if iotlb && r.pasid.is_none() && inv.archid.is_some() => {
                // An ASID/DID-tagged range without a PASID (SMMUv3
                // TLBI_NH_VA): every context of the domain may use that tag,
                // so the range goes in all of them.
                let last = r.last();
                let overlaps = |k: &Key| {
                    let sh = u32::from(k.shift);
                    k.domain == dom && k.index >= r.addr >> sh && k.index <= last >> sh
                };
                c.iotlb.retain(|k| !overlaps(k));
                if !r.leaf_only {
                    c.pwc.retain(|k| !overlaps(k));
                }
            }
            Scope::Range(r) if iotlb => {
                for pk in range_pasid_keys(r.pasid).into_iter().flatten() {
                    drop_range(&mut c.iotlb, dom, pk, c.leaf_sizes, &r);
                    if !r.leaf_only {
                        drop_range(&mut c.pwc, dom, pk, c.table_shifts, &r);
                    }
                }
            }
            Scope::Range(_) => {}
        }
    }
}

/// Whether cache entries of PASID key `key` are named by an invalidation
/// of `pasid` (`None`: traffic without a PASID). PASID 0 also names the
/// untagged traffic that SMMUv3 S1DSS=SSID0 or VT-d RID_PASID sends
/// through it.
fn pasid_named(key: u32, pasid: Option<u32>) -> bool {
    match pasid {
        Some(0) | None => key == 0 || key == NO_PASID,
        Some(p) => key == p,
    }
}

/// The PASID keys a range invalidation of `pasid` must probe.
fn range_pasid_keys(pasid: Option<u32>) -> [Option<u32>; 2] {
    match pasid {
        Some(0) | None => [Some(0), Some(NO_PASID)],
        Some(p) => [Some(p), None],
    }
}

/// Removes the entries of (`dom`, `pasid`) of every size in `sizes` that
/// overlap `r`, probing page by page while that is cheaper than a scan.
fn drop_range<V: Copy>(
    m: &mut DirectMapped<V>,
    dom: DomainId,
    pasid: u32,
    sizes: u64,
    r: &VaRange,
) {
    let last = r.last();
    let mut probes: u64 = 0;
    let mut s = sizes;
    while s != 0 {
        let log2 = s.trailing_zeros();
        s &= s - 1;
        probes = probes.saturating_add((last >> log2) - (r.addr >> log2) + 1);
    }
    if probes > m.capacity() as u64 {
        m.retain(|k| {
            let sh = u32::from(k.shift);
            !(k.domain == dom
                && k.pasid == pasid
                && k.index >= r.addr >> sh
                && k.index <= last >> sh)
        });
        return;
    }
    let mut s = sizes;
    while s != 0 {
        let log2 = s.trailing_zeros();
        s &= s - 1;
        for idx in (r.addr >> log2)..=(last >> log2) {
            m.remove(&key(dom, pasid, log2 as u8, idx));
        }
    }
}
