//! The front translators over [`EmulatedIommu::translate`], one per
//! (endpoint, PASID): [`NestedTranslator`], a small direct-mapped TLB for
//! a device thread that translates address by address, and
//! [`NestedIommu`], vm-memory's [`Iommu`] with its own [`Iotlb`]. Both
//! start over whenever the IOMMU's generation moves, so neither is ever
//! staler than the IOMMU's own caches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use vm_memory::iommu::{Error as IommuError, Iommu, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::{lock, EmulatedIommu, NestedError, NestedTranslation};
use crate::backend::EndpointId;
use crate::nested::Access;

impl<M: GuestMemory + Send + Sync> EmulatedIommu<M> {
    /// A front translator for one device thread (its own small TLB).
    pub fn translator(self: &Arc<Self>, ep: EndpointId, pasid: Option<u32>) -> NestedTranslator<M> {
        NestedTranslator {
            emu: Arc::clone(self),
            ep,
            pasid,
            generation: self.generation(),
            tlb: vec![None; FRONT_TLB_ENTRIES].into_boxed_slice(),
        }
    }

    /// A vm-memory [`Iommu`] for (`ep`, `pasid`): wrap guest memory in an
    /// `IommuMemory` and every access of the device model goes through the
    /// guest's tables.
    pub fn endpoint_iommu(self: &Arc<Self>, ep: EndpointId, pasid: Option<u32>) -> NestedIommu<M> {
        NestedIommu {
            emu: Arc::clone(self),
            ep,
            pasid,
            generation: AtomicU64::new(self.generation()),
            last_page_request: Mutex::new(None),
            iotlb: RwLock::new(Iotlb::new()),
            top: RwLock::new(Iotlb::new()),
        }
    }
}

/// Entries of a [`NestedTranslator`]'s front TLB.
pub const FRONT_TLB_ENTRIES: usize = 64;

#[derive(Clone, Copy, Debug)]
struct FrontEntry {
    page: u64,
    t: NestedTranslation,
}

/// A per-thread front cache over [`EmulatedIommu::translate`] for one
/// (endpoint, PASID): a direct-mapped TLB of 4 KiB pages, dropped whenever
/// the IOMMU's generation moves (any invalidation, bind or unbind), so it
/// is never staler than the IOMMU's own IOTLB.
pub struct NestedTranslator<M> {
    emu: Arc<EmulatedIommu<M>>,
    ep: EndpointId,
    pasid: Option<u32>,
    generation: u64,
    tlb: Box<[Option<FrontEntry>]>,
}

impl<M: GuestMemory + Send + Sync> NestedTranslator<M> {
    /// Translates `va` for a read (`write == false`) or a write.
    #[inline]
    pub fn translate(&mut self, va: u64, write: bool) -> Result<u64, NestedError> {
        let gen = self.emu.generation();
        if gen != self.generation {
            self.tlb.fill(None);
            self.generation = gen;
        }
        let page = va >> 12;
        let slot = (page as usize) & (FRONT_TLB_ENTRIES - 1);
        if let Some(e) = &self.tlb[slot] {
            if e.page == page && (!write || e.t.writable) {
                return Ok(e
                    .t
                    .gpa
                    .wrapping_add(va & 0xfff)
                    .wrapping_sub(e.t.gpa & 0xfff));
            }
        }
        let access = if write { Access::WRITE } else { Access::READ };
        let t = self.emu.translate(self.ep, self.pasid, va, access)?;
        self.tlb[slot] = Some(FrontEntry { page, t });
        Ok(t.gpa)
    }
}

/// vm-memory's [`Iommu`] over the software nested IOMMU for one
/// (endpoint, PASID).
///
/// vm-memory's [`Iotlb`] keys ranges by their exclusive end, which cannot
/// express 2^64: a range that ends at the last byte of the address space
/// overflows it. So the adaptor keeps two: `iotlb` holds every translated
/// page (the last page of the space without its last byte), and `top`
/// holds the pieces of accesses that end exactly at 2^64, each keyed one
/// byte lower, so that their exclusive end is 2^64 - 1. Both map to the
/// same guest-physical addresses, which is all the returned iterator
/// yields.
pub struct NestedIommu<M> {
    emu: Arc<EmulatedIommu<M>>,
    ep: EndpointId,
    pasid: Option<u32>,
    generation: AtomicU64,
    last_page_request: Mutex<Option<u32>>,
    iotlb: RwLock<Iotlb>,
    top: RwLock<Iotlb>,
}

impl<M> std::fmt::Debug for NestedIommu<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedIommu")
            .field("endpoint", &self.ep)
            .field("pasid", &self.pasid)
            .finish()
    }
}

impl<M: GuestMemory + Send + Sync> NestedIommu<M> {
    /// The page request the last refused access sent, if it sent one
    /// (taken: a second call returns `None`).
    pub fn take_page_request(&self) -> Option<u32> {
        lock(&self.last_page_request).take()
    }

    /// The IOMMU behind this view.
    pub fn emulated(&self) -> &Arc<EmulatedIommu<M>> {
        &self.emu
    }
}

fn write_tlb(l: &RwLock<Iotlb>) -> std::sync::RwLockWriteGuard<'_, Iotlb> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn read_tlb(l: &RwLock<Iotlb>) -> RwLockReadGuard<'_, Iotlb> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

impl<M: GuestMemory + Send + Sync> Iommu for NestedIommu<M> {
    type IotlbGuard<'a>
        = RwLockReadGuard<'a, Iotlb>
    where
        M: 'a;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let cannot = |reason: String| IommuError::CannotResolve {
            iova_range: IovaRange { base: iova, length },
            reason,
        };
        let len = u64::try_from(length).map_err(|_| cannot("length above 2^64".into()))?;
        // `last` may be u64::MAX: an access may end exactly at 2^64.
        let Some(last) = len.checked_sub(1).and_then(|l| iova.0.checked_add(l)) else {
            return Err(cannot("empty range or range past 2^64".into()));
        };
        // Ends at 2^64: answered from `top`, keyed one byte lower. `iova`
        // is at least 1 here, since `length` is below 2^64.
        let at_top = iova.0.checked_add(len).is_none();
        let lookup = || {
            if at_top {
                Iotlb::lookup(
                    read_tlb(&self.top),
                    GuestAddress(iova.0 - 1),
                    length,
                    access,
                )
            } else {
                Iotlb::lookup(read_tlb(&self.iotlb), iova, length, access)
            }
        };
        let gen = self.emu.generation();
        if self.generation.swap(gen, Ordering::AcqRel) != gen {
            write_tlb(&self.iotlb).invalidate_all();
            write_tlb(&self.top).invalidate_all();
        }
        if let Ok(it) = lookup() {
            return Ok(it);
        }
        let write = matches!(access, Permissions::Write | Permissions::ReadWrite);
        let acc = if write { Access::WRITE } else { Access::READ };
        let mut cur = iova.0;
        loop {
            let t = match self.emu.translate(self.ep, self.pasid, cur, acc) {
                Ok(t) => t,
                Err(e) => {
                    if let NestedError::PageRequest { grpid } = e {
                        *lock(&self.last_page_request) = Some(grpid);
                    }
                    return Err(cannot(format!("{e} at {cur:#x}")));
                }
            };
            // The translation covers `cur`; anything else is a bug that
            // must not become a panic or an endless loop.
            if !(t.page_start <= cur && cur <= t.page_last) {
                return Err(cannot(format!("translation of {cur:#x} does not cover it")));
            }
            let perm = if t.writable {
                Permissions::ReadWrite
            } else {
                Permissions::Read
            };
            let Some(page_gpa) = t.gpa.checked_sub(cur - t.page_start) else {
                return Err(cannot(format!("page of {cur:#x} starts below address 0")));
            };
            // The whole page, up to (not including) the last byte of the
            // space, which no exclusive end can reach.
            let tlb_last = t.page_last.min(u64::MAX - 1);
            if tlb_last >= t.page_start {
                let n = usize::try_from(tlb_last - t.page_start + 1)
                    .map_err(|_| cannot("page too large".into()))?;
                write_tlb(&self.iotlb)
                    .set_mapping(GuestAddress(t.page_start), GuestAddress(page_gpa), n, perm)
                    .map_err(|e| cannot(e.to_string()))?;
            }
            let piece_last = t.page_last.min(last);
            if at_top {
                // The part of this page the access touches, one byte lower.
                let n = usize::try_from(piece_last - cur + 1)
                    .map_err(|_| cannot("page too large".into()))?;
                write_tlb(&self.top)
                    .set_mapping(GuestAddress(cur - 1), GuestAddress(t.gpa), n, perm)
                    .map_err(|e| cannot(e.to_string()))?;
            }
            if piece_last == last {
                break;
            }
            cur = piece_last + 1;
        }
        lookup().map_err(|_| cannot("translation changed while filling".into()))
    }
}
