//! The generic invalidation: what the guest asks to forget, in the
//! vendor-neutral form the 2017 upstream review settled on (caches ×
//! scope × optional ARCHID), checked once from the INVALIDATE request and
//! then lowered by each backend. [`coalesce`] turns one notification's
//! worth of invalidations into as few as hardware needs.

use crate::wire::{
    InvalidateReq, VIRTIO_IOMMU_INV_F_ARCHID, VIRTIO_IOMMU_INV_F_LEAF, VIRTIO_IOMMU_INV_F_PASID,
    VIRTIO_IOMMU_INV_G_DOMAIN, VIRTIO_IOMMU_INV_G_PASID, VIRTIO_IOMMU_INV_G_VA,
    VIRTIO_IOMMU_INV_T_DEV_IOTLB, VIRTIO_IOMMU_INV_T_IOTLB, VIRTIO_IOMMU_INV_T_PASID,
};

/// A set of caches to invalidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Caches(u8);

impl Caches {
    /// The IOTLB and, with it, the paging-structure caches (unless a range
    /// invalidation says leaf-only).
    pub const IOTLB: Caches = Caches(1);
    /// The device's own IOTLB (ATS).
    pub const DEV_IOTLB: Caches = Caches(2);
    /// The PASID-table / context-descriptor cache.
    pub const PASID: Caches = Caches(4);
    /// Every cache.
    pub const ALL: Caches = Caches(7);

    /// Whether every cache of `other` is in `self`.
    pub fn contains(self, other: Caches) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union.
    pub fn union(self, other: Caches) -> Caches {
        Caches(self.0 | other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The wire bits (`VIRTIO_IOMMU_INV_T_*`).
    pub fn bits(self) -> u16 {
        u16::from(self.0)
    }
}

/// A page-selective range: `pages` pages of `1 << granule_log2` bytes from
/// `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VaRange {
    /// The PASID whose tables changed; `None` for non-PASID traffic.
    pub pasid: Option<u32>,
    /// First address, aligned on the granule.
    pub addr: u64,
    /// log2 of the page size.
    pub granule_log2: u8,
    /// Number of pages, at least one.
    pub pages: u64,
    /// Only leaf entries changed: paging-structure caches may be kept.
    pub leaf_only: bool,
}

impl VaRange {
    /// The last byte covered (the range never wraps: checked at decode).
    pub fn last(&self) -> u64 {
        // u128: a range may end exactly at 2^64 - 1 (nr_pages << granule
        // is then 2^64, which u64 cannot hold).
        let end = u128::from(self.addr) + (u128::from(self.pages) << self.granule_log2);
        (end - 1) as u64
    }

    /// Whether `va` is in the range.
    pub fn contains(&self, va: u64) -> bool {
        va >= self.addr && va <= self.last()
    }
}

/// What an invalidation covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Everything cached for the domain.
    Domain,
    /// Everything cached for one PASID of the domain.
    Pasid(u32),
    /// A range of addresses.
    Range(VaRange),
}

/// One generic invalidation of one domain's caches.
///
/// The device decodes each INVALIDATE into one
/// ([`Invalidation::from_request`]), [`coalesce`]s a notification's batch,
/// and hands it to every backend of the domain, which lowers it to its
/// hardware's commands.
///
/// ```
/// use vmm_iommu::invalidation::{coalesce, Caches, Invalidation, Scope, VaRange};
///
/// // One 4 KiB page of PASID 5's address space, leaf entries only.
/// let page = |addr| Invalidation {
///     caches: Caches::IOTLB,
///     scope: Scope::Range(VaRange { pasid: Some(5), addr, granule_log2: 12, pages: 1, leaf_only: true }),
///     archid: None,
/// };
/// let mut batch = vec![page(0x1000), page(0x2000), page(0x1000)];
/// coalesce(&mut batch, 512);
/// // A duplicate dropped, neighbours merged.
/// assert_eq!(batch.len(), 1);
/// let Scope::Range(r) = batch[0].scope else { panic!("still a range") };
/// assert_eq!((r.addr, r.pages, r.last()), (0x1000, 2, 0x2fff));
///
/// // More pages than the threshold: widened to all of PASID 5.
/// let mut burst: Vec<_> = (0..600).map(|i| page(0x10_0000 + i * 0x2000)).collect();
/// coalesce(&mut burst, 512);
/// assert_eq!(burst.len(), 1);
/// assert_eq!(burst[0].scope, Scope::Pasid(5));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Invalidation {
    /// Which caches.
    pub caches: Caches,
    /// What they forget.
    pub scope: Scope,
    /// The ASID (Arm) or domain ID (VT-d) the guest named, if it named one.
    pub archid: Option<u64>,
}

/// Why an INVALIDATE request is refused; every case is INVAL except
/// [`InvalidateError::PasidOutOfRange`] (RANGE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidateError {
    /// A reserved byte is non-zero.
    #[error("INVALIDATE reserved field is not zero")]
    Reserved,
    /// `inv_gran` is not exactly one known granularity.
    #[error("INVALIDATE granularity {0:#x} is not one of DOMAIN, PASID, VA")]
    Granularity(u16),
    /// `inv_type` is empty or has unknown bits.
    #[error("INVALIDATE cache types {0:#x} are empty or unknown")]
    CacheTypes(u16),
    /// `flags` has unknown bits.
    #[error("INVALIDATE flags {0:#x} contain unknown bits")]
    Flags(u16),
    /// The combination makes no sense (the string says which).
    #[error("INVALIDATE combination refused: {0}")]
    Combination(&'static str),
    /// The VA range is malformed.
    #[error("INVALIDATE range refused: {0}")]
    Range(&'static str),
    /// The PASID is beyond the domain's PASID width.
    #[error("INVALIDATE PASID {pasid:#x} is beyond {bits} bits")]
    PasidOutOfRange {
        /// The PASID.
        pasid: u32,
        /// The width.
        bits: u8,
    },
}

/// Largest page size an INVALIDATE may name (1 GiB... up to 512 GiB blocks
/// of 64K-granule Arm tables are 4 TiB; 2^42 covers every format here).
pub const MAX_GRANULE_LOG2: u8 = 42;

impl Invalidation {
    /// Checks an INVALIDATE request and returns its generic form.
    /// `pasid_bits` is the PASID width of the domain's table (0 when its
    /// format has no PASIDs).
    pub fn from_request(r: &InvalidateReq, pasid_bits: u8) -> Result<Self, InvalidateError> {
        use InvalidateError as E;
        if r.reserved_set {
            return Err(E::Reserved);
        }
        let known_types =
            VIRTIO_IOMMU_INV_T_IOTLB | VIRTIO_IOMMU_INV_T_DEV_IOTLB | VIRTIO_IOMMU_INV_T_PASID;
        if r.cache_types == 0 || r.cache_types & !known_types != 0 {
            return Err(E::CacheTypes(r.cache_types));
        }
        let known_flags =
            VIRTIO_IOMMU_INV_F_PASID | VIRTIO_IOMMU_INV_F_ARCHID | VIRTIO_IOMMU_INV_F_LEAF;
        if r.flags & !known_flags != 0 {
            return Err(E::Flags(r.flags));
        }
        let caches = Caches(r.cache_types as u8);
        let has_pasid = r.flags & VIRTIO_IOMMU_INV_F_PASID != 0;
        let leaf = r.flags & VIRTIO_IOMMU_INV_F_LEAF != 0;
        let archid = if r.flags & VIRTIO_IOMMU_INV_F_ARCHID != 0 {
            Some(r.archid)
        } else if r.archid != 0 {
            return Err(E::Combination("archid set without the ARCHID flag"));
        } else {
            None
        };
        if !has_pasid && r.pasid != 0 {
            return Err(E::Combination("pasid set without the PASID flag"));
        }
        if has_pasid {
            if pasid_bits == 0 {
                return Err(E::Combination("PASID flag on a domain without PASIDs"));
            }
            if pasid_bits < 32 && r.pasid >> pasid_bits != 0 {
                return Err(E::PasidOutOfRange {
                    pasid: r.pasid,
                    bits: pasid_bits,
                });
            }
        }
        let pasid = has_pasid.then_some(r.pasid);
        let no_range = r.virt_start == 0 && r.nr_pages == 0 && r.granule == 0;
        let scope = match r.granularity {
            VIRTIO_IOMMU_INV_G_DOMAIN => {
                if has_pasid || leaf || !no_range {
                    return Err(E::Combination(
                        "DOMAIN granularity takes no PASID, LEAF or range",
                    ));
                }
                Scope::Domain
            }
            VIRTIO_IOMMU_INV_G_PASID => {
                let Some(p) = pasid else {
                    return Err(E::Combination("PASID granularity without the PASID flag"));
                };
                if leaf || !no_range {
                    return Err(E::Combination("PASID granularity takes no LEAF or range"));
                }
                Scope::Pasid(p)
            }
            VIRTIO_IOMMU_INV_G_VA => {
                if caches.contains(Caches::PASID) {
                    // A PASID entry is not selected by address.
                    return Err(E::Combination("VA granularity on the PASID cache"));
                }
                if !(12..=MAX_GRANULE_LOG2).contains(&r.granule) {
                    return Err(E::Range("granule outside 4 KiB..=4 TiB"));
                }
                if r.nr_pages == 0 {
                    return Err(E::Range("nr_pages is zero"));
                }
                if r.virt_start & ((1u64 << r.granule) - 1) != 0 {
                    return Err(E::Range("virt_start not aligned on the granule"));
                }
                // In u128, so that a range ending exactly at 2^64 - 1 is
                // accepted and anything past it is not.
                let end = u128::from(r.virt_start) + (u128::from(r.nr_pages) << r.granule);
                if end > 1u128 << 64 {
                    return Err(E::Range("range wraps past 2^64"));
                }
                Scope::Range(VaRange {
                    pasid,
                    addr: r.virt_start,
                    granule_log2: r.granule,
                    pages: r.nr_pages,
                    leaf_only: leaf,
                })
            }
            g => return Err(E::Granularity(g)),
        };
        Ok(Invalidation {
            caches,
            scope,
            archid,
        })
    }

    /// The INVALIDATE request that expresses this invalidation for
    /// `domain` (drivers and tests).
    pub fn to_request(&self, domain: u32) -> InvalidateReq {
        let mut r = InvalidateReq {
            cache_types: self.caches.bits(),
            domain,
            ..Default::default()
        };
        if let Some(a) = self.archid {
            r.flags |= VIRTIO_IOMMU_INV_F_ARCHID;
            r.archid = a;
        }
        match self.scope {
            Scope::Domain => r.granularity = VIRTIO_IOMMU_INV_G_DOMAIN,
            Scope::Pasid(p) => {
                r.granularity = VIRTIO_IOMMU_INV_G_PASID;
                r.flags |= VIRTIO_IOMMU_INV_F_PASID;
                r.pasid = p;
            }
            Scope::Range(v) => {
                r.granularity = VIRTIO_IOMMU_INV_G_VA;
                if let Some(p) = v.pasid {
                    r.flags |= VIRTIO_IOMMU_INV_F_PASID;
                    r.pasid = p;
                }
                if v.leaf_only {
                    r.flags |= VIRTIO_IOMMU_INV_F_LEAF;
                }
                r.virt_start = v.addr;
                r.nr_pages = v.pages;
                r.granule = v.granule_log2;
            }
        }
        r
    }
}

/// Past this many pages in one PASID (or non-PASID) context, a batch of
/// ranges becomes one PASID- or domain-wide invalidation: walking the
/// caches page by page then costs more than refilling them. 512 pages is
/// the point where Linux's intel-iommu switches to a domain-selective
/// flush (`cache_tag_flush_range`: MAX_AGAW_PFN_WIDTH heuristics) and
/// where arm-smmu-v3 gives up range commands (`CMDQ_MAX_TLBI_OPS`).
pub const WIDEN_THRESHOLD_PAGES: u64 = 512;

/// Reduces one domain's batch, in place, to an equivalent shorter one:
/// drops duplicates and invalidations a domain-wide one already covers,
/// merges adjacent and overlapping ranges of the same PASID, granule,
/// caches and ARCHID, and widens a context whose ranges total more than
/// `widen_pages` pages to a PASID-wide (or domain-wide, without a PASID)
/// invalidation. The result invalidates at least everything the input
/// did, never less. Leaf-only survives a merge only if both were leaf-only.
pub fn coalesce(batch: &mut Vec<Invalidation>, widen_pages: u64) {
    if batch.len() <= 1 {
        return;
    }
    // One domain-wide invalidation of some caches subsumes every other
    // invalidation of those caches.
    let domain_caches = batch
        .iter()
        .filter(|i| i.scope == Scope::Domain && i.archid.is_none())
        .fold(Caches::default(), |c, i| c.union(i.caches));
    let mut ranges: Vec<Invalidation> = Vec::new();
    let mut others: Vec<Invalidation> = Vec::new();
    for inv in batch.drain(..) {
        if inv.scope != Scope::Domain && domain_caches.contains(inv.caches) {
            continue;
        }
        match inv.scope {
            Scope::Range(_) => ranges.push(inv),
            _ => {
                if !others.contains(&inv) {
                    others.push(inv);
                }
            }
        }
    }
    // A PASID-wide invalidation of some caches covers that PASID's ranges.
    ranges.retain(|r| {
        let Scope::Range(v) = r.scope else {
            return true;
        };
        !others.iter().any(|o| {
            v.pasid.is_some_and(|p| o.scope == Scope::Pasid(p))
                && o.caches.contains(r.caches)
                && (o.archid.is_none() || o.archid == r.archid)
        })
    });
    ranges.sort_by_key(|r| match r.scope {
        Scope::Range(v) => (v.pasid, r.archid, r.caches.0, v.granule_log2, v.addr),
        // Only ranges are in `ranges`.
        _ => (None, None, 0, 0, 0),
    });
    let mut merged: Vec<Invalidation> = Vec::with_capacity(ranges.len());
    for r in ranges {
        let Scope::Range(v) = r.scope else { continue };
        if let Some(last) = merged.last_mut() {
            if let Scope::Range(ref mut lv) = last.scope {
                let same_ctx = lv.pasid == v.pasid
                    && last.archid == r.archid
                    && last.caches == r.caches
                    && lv.granule_log2 == v.granule_log2;
                // Adjacent or overlapping: the next starts at most one byte
                // past the current end.
                if same_ctx && v.addr <= lv.last().saturating_add(1) {
                    let end = lv.last().max(v.last());
                    lv.pages = ((end - lv.addr) >> lv.granule_log2) + 1;
                    lv.leaf_only &= v.leaf_only;
                    continue;
                }
            }
        }
        merged.push(r);
    }
    // Widen a context with too many pages to one wide invalidation.
    let mut out: Vec<Invalidation> = Vec::with_capacity(merged.len() + others.len());
    let mut i = 0;
    while i < merged.len() {
        let Scope::Range(v) = merged[i].scope else {
            i += 1;
            continue;
        };
        let mut j = i;
        let mut pages: u64 = 0;
        let mut caches = Caches::default();
        while j < merged.len() {
            let Scope::Range(w) = merged[j].scope else {
                break;
            };
            if w.pasid != v.pasid || merged[j].archid != merged[i].archid {
                break;
            }
            pages = pages.saturating_add(w.pages);
            caches = caches.union(merged[j].caches);
            j += 1;
        }
        if pages > widen_pages {
            out.push(Invalidation {
                caches,
                scope: match v.pasid {
                    Some(p) => Scope::Pasid(p),
                    None => Scope::Domain,
                },
                archid: merged[i].archid,
            });
        } else {
            out.extend_from_slice(&merged[i..j]);
        }
        i = j;
    }
    batch.extend(others);
    batch.extend(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::*;

    fn va(pasid: Option<u32>, addr: u64, pages: u64) -> Invalidation {
        Invalidation {
            caches: Caches::IOTLB,
            scope: Scope::Range(VaRange {
                pasid,
                addr,
                granule_log2: 12,
                pages,
                leaf_only: true,
            }),
            archid: None,
        }
    }

    fn req(gran: u16, types: u16, flags: u16) -> InvalidateReq {
        InvalidateReq {
            granularity: gran,
            cache_types: types,
            flags,
            domain: 1,
            ..Default::default()
        }
    }

    #[test]
    fn va_granularity_on_the_pasid_cache_is_refused() {
        let mut r = req(VIRTIO_IOMMU_INV_G_VA, VIRTIO_IOMMU_INV_T_PASID, 0);
        r.nr_pages = 1;
        r.granule = 12;
        assert_eq!(
            Invalidation::from_request(&r, 20),
            Err(InvalidateError::Combination(
                "VA granularity on the PASID cache"
            ))
        );
    }

    #[test]
    fn bad_granularity_types_flags_and_reserved_are_refused() {
        for g in [0u16, 3, 5, 8, 0xffff] {
            let r = req(g, VIRTIO_IOMMU_INV_T_IOTLB, 0);
            assert_eq!(
                Invalidation::from_request(&r, 20),
                Err(InvalidateError::Granularity(g))
            );
        }
        for t in [0u16, 8, 0x10] {
            let r = req(VIRTIO_IOMMU_INV_G_DOMAIN, t, 0);
            assert_eq!(
                Invalidation::from_request(&r, 20),
                Err(InvalidateError::CacheTypes(t))
            );
        }
        let r = req(VIRTIO_IOMMU_INV_G_DOMAIN, 1, 8);
        assert_eq!(
            Invalidation::from_request(&r, 20),
            Err(InvalidateError::Flags(8))
        );
        let mut r = req(VIRTIO_IOMMU_INV_G_DOMAIN, 1, 0);
        r.reserved_set = true;
        assert_eq!(
            Invalidation::from_request(&r, 20),
            Err(InvalidateError::Reserved)
        );
    }

    #[test]
    fn context_mismatches_are_refused() {
        // LEAF needs a range.
        let r = req(VIRTIO_IOMMU_INV_G_DOMAIN, 1, VIRTIO_IOMMU_INV_F_LEAF);
        assert!(matches!(
            Invalidation::from_request(&r, 20),
            Err(InvalidateError::Combination(_))
        ));
        // PASID granularity needs the PASID flag.
        let r = req(VIRTIO_IOMMU_INV_G_PASID, 1, 0);
        assert!(matches!(
            Invalidation::from_request(&r, 20),
            Err(InvalidateError::Combination(_))
        ));
        // PASID beyond the width.
        let mut r = req(VIRTIO_IOMMU_INV_G_PASID, 4, VIRTIO_IOMMU_INV_F_PASID);
        r.pasid = 1 << 8;
        assert_eq!(
            Invalidation::from_request(&r, 8),
            Err(InvalidateError::PasidOutOfRange {
                pasid: 256,
                bits: 8
            })
        );
        // PASID flag on a domain without PASIDs.
        r.pasid = 1;
        assert!(matches!(
            Invalidation::from_request(&r, 0),
            Err(InvalidateError::Combination(_))
        ));
        // archid without its flag.
        let mut r = req(VIRTIO_IOMMU_INV_G_DOMAIN, 1, 0);
        r.archid = 5;
        assert!(matches!(
            Invalidation::from_request(&r, 20),
            Err(InvalidateError::Combination(_))
        ));
    }

    #[test]
    fn malformed_ranges_are_refused() {
        let base = {
            let mut r = req(VIRTIO_IOMMU_INV_G_VA, 1, 0);
            r.granule = 12;
            r.nr_pages = 1;
            r.virt_start = 0x1000;
            r
        };
        assert!(Invalidation::from_request(&base, 0).is_ok());
        let mut r = base;
        r.nr_pages = 0;
        assert!(matches!(
            Invalidation::from_request(&r, 0),
            Err(InvalidateError::Range(_))
        ));
        let mut r = base;
        r.virt_start = 0x1800;
        assert!(matches!(
            Invalidation::from_request(&r, 0),
            Err(InvalidateError::Range(_))
        ));
        let mut r = base;
        r.granule = 11;
        assert!(matches!(
            Invalidation::from_request(&r, 0),
            Err(InvalidateError::Range(_))
        ));
        let mut r = base;
        r.nr_pages = u64::MAX;
        assert!(matches!(
            Invalidation::from_request(&r, 0),
            Err(InvalidateError::Range(_))
        ));
        let mut r = base;
        r.virt_start = !0xfff;
        r.nr_pages = 2;
        assert!(matches!(
            Invalidation::from_request(&r, 0),
            Err(InvalidateError::Range(_))
        ));
    }

    #[test]
    fn a_range_may_end_exactly_at_the_top_of_the_address_space() {
        let mut r = req(VIRTIO_IOMMU_INV_G_VA, VIRTIO_IOMMU_INV_T_IOTLB, 0);
        r.granule = 12;
        r.nr_pages = 1 << 52;
        let inv = Invalidation::from_request(&r, 0).unwrap();
        let Scope::Range(v) = inv.scope else {
            panic!("{inv:?}")
        };
        assert_eq!(v.last(), u64::MAX);
        r.virt_start = 0x1000;
        assert!(matches!(
            Invalidation::from_request(&r, 0),
            Err(InvalidateError::Range(_))
        ));
        r.virt_start = 0;
        r.nr_pages = (1 << 52) + 1;
        assert!(matches!(
            Invalidation::from_request(&r, 0),
            Err(InvalidateError::Range(_))
        ));
    }

    #[test]
    fn request_roundtrip() {
        let invs = [
            Invalidation {
                caches: Caches::ALL,
                scope: Scope::Domain,
                archid: Some(9),
            },
            Invalidation {
                caches: Caches::PASID.union(Caches::IOTLB),
                scope: Scope::Pasid(3),
                archid: None,
            },
            va(Some(7), 0x20_0000, 16),
            va(None, 0x1000, 1),
        ];
        for inv in invs {
            assert_eq!(Invalidation::from_request(&inv.to_request(1), 20), Ok(inv));
        }
    }

    #[test]
    fn contiguous_pages_merge_into_one_range() {
        let mut b: Vec<_> = (0..512u64).rev().map(|i| va(Some(1), i << 12, 1)).collect();
        coalesce(&mut b, WIDEN_THRESHOLD_PAGES);
        assert_eq!(b, vec![va(Some(1), 0, 512)]);
    }

    #[test]
    fn overlapping_ranges_merge_and_leaf_only_needs_both() {
        let mut a = va(None, 0x1000, 4);
        let mut b = va(None, 0x3000, 4);
        if let Scope::Range(ref mut v) = b.scope {
            v.leaf_only = false;
        }
        let mut batch = vec![b, a];
        coalesce(&mut batch, WIDEN_THRESHOLD_PAGES);
        if let Scope::Range(ref mut v) = a.scope {
            v.pages = 6;
            v.leaf_only = false;
        }
        assert_eq!(batch, vec![a]);
    }

    #[test]
    fn separate_contexts_stay_separate() {
        let mut b = vec![
            va(Some(1), 0, 1),
            va(Some(2), 0x1000, 1),
            va(Some(1), 0x5000, 1),
        ];
        coalesce(&mut b, WIDEN_THRESHOLD_PAGES);
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn too_many_pages_widen_to_the_pasid_or_domain() {
        let mut b: Vec<_> = (0..600u64).map(|i| va(Some(4), i << 13, 1)).collect();
        coalesce(&mut b, WIDEN_THRESHOLD_PAGES);
        assert_eq!(
            b,
            vec![Invalidation {
                caches: Caches::IOTLB,
                scope: Scope::Pasid(4),
                archid: None
            }]
        );
        let mut b: Vec<_> = (0..600u64).map(|i| va(None, i << 13, 1)).collect();
        coalesce(&mut b, WIDEN_THRESHOLD_PAGES);
        assert_eq!(b[0].scope, Scope::Domain);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn domain_wide_subsumes_the_rest() {
        let dom = Invalidation {
            caches: Caches::ALL,
            scope: Scope::Domain,
            archid: None,
        };
        let mut b = vec![va(Some(1), 0, 1), dom, va(None, 0x1000, 3), dom];
        coalesce(&mut b, WIDEN_THRESHOLD_PAGES);
        assert_eq!(b, vec![dom]);
    }
}
