//! Dirty tracking of emulated DMA for live migration: the guest pages a
//! device behind the vIOMMU writes are marked in vm-memory's dirty bitmap
//! of guest memory (`GuestMemoryMmap<AtomicBitmap>`) at the guest-physical
//! address the IOVA translated to, which is what a migration copies.
//!
//! - [`crate::dma_memory::DmaMemory`] does it by construction: its slices
//!   are the guest memory's own, so a write marks the guest memory's
//!   bitmap when it happens.
//! - vm-memory's `IommuMemory` marks a bitmap of IOVA pages instead (its
//!   vhost-user model), so its device models wrap their `Iommu` (our
//!   [`crate::translate::EndpointIommu`], or the software nested IOMMU's
//!   `NestedIommu`) in a [`DirtyIommu`], which marks the guest-physical
//!   pages of every write translation: once when it hands the translation
//!   out, and again when the access that used it is over (when
//!   `IommuMemory` drops its translation, after `Bytes` wrote the slices).
//!   The second mark is what keeps a write that raced with
//!   [`take_dirty_pages`] from being lost.
//!
//! [`take_dirty_pages`] is the migration loop's call: the pages written
//! since the previous call. Reads never mark anything. This module never
//! decides what is mapped; it only follows the translations it is given.

use std::fmt;
use std::ops::Deref;

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::iommu::{Error as IommuError, Iommu, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, Permissions,
};

/// The guest pages written since the last call (or since the bitmaps were
/// made), as the guest-physical addresses of their first bytes, ascending,
/// in the bitmaps' page size (the host's). Clears what it returns: each
/// bitmap word is read and cleared in one atomic step, so a write that
/// lands meanwhile is returned now or next time, never lost.
pub fn take_dirty_pages(mem: &GuestMemoryMmap<AtomicBitmap>) -> Vec<u64> {
    let mut out = Vec::new();
    for r in mem.iter() {
        // The region's whole bitmap (the mmap's), not a slice of it.
        let bitmap: &AtomicBitmap = Deref::deref(r).bitmap();
        let pages = bitmap.len();
        if pages == 0 {
            continue;
        }
        // One bit per page: the page size is the byte size over the bits,
        // rounded up to the power of two it was made with.
        let page = (bitmap.byte_size() / pages).next_power_of_two() as u64;
        let base = r.start_addr().0;
        for (w, word) in bitmap.get_and_reset().into_iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let index = w as u64 * 64 + b;
                if index < pages as u64 {
                    out.push(base + index * page);
                }
            }
        }
    }
    out
}

/// Marks `[gpa, gpa + len)` dirty in the bitmaps of the regions it falls
/// in; bytes outside guest RAM are not tracked (the access fails there).
fn mark<M: GuestMemoryBackend>(mem: &M, mut gpa: u64, mut len: u64) {
    while len > 0 {
        let Some(r) = mem.find_region(GuestAddress(gpa)) else {
            return;
        };
        let offset = gpa - r.start_addr().0;
        let n = (r.len() - offset).min(len);
        r.bitmap().mark_dirty(offset as usize, n as usize);
        len -= n;
        gpa = match gpa.checked_add(n) {
            Some(g) => g,
            None => return,
        };
    }
}

/// An `Iommu` that marks the guest-physical pages of every write it
/// translates in `mem`'s dirty bitmaps, around an `Iommu` that translates.
/// Wrap the endpoint's `Iommu` in it before handing it to `IommuMemory`.
pub struct DirtyIommu<I, M> {
    inner: I,
    mem: M,
}

impl<I: fmt::Debug, M> fmt::Debug for DirtyIommu<I, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyIommu")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<I, M> DirtyIommu<I, M> {
    /// Marks writes translated by `inner` in `mem` (the guest memory whose
    /// bitmaps the migration loop reads; a clone shares them).
    pub fn new(inner: I, mem: M) -> Self {
        DirtyIommu { inner, mem }
    }

    /// The wrapped `Iommu`.
    pub fn inner(&self) -> &I {
        &self.inner
    }
}

/// One translation handed out: the IOTLB `IommuMemory` reads it from, and
/// for a write the guest-physical ranges to mark again once it is dropped.
pub struct DirtyGuard<'a, M: GuestMemoryBackend> {
    tlb: Iotlb,
    written: Vec<(u64, u64)>,
    mem: &'a M,
}

impl<M: GuestMemoryBackend> Deref for DirtyGuard<'_, M> {
    type Target = Iotlb;

    fn deref(&self) -> &Iotlb {
        &self.tlb
    }
}

impl<M: GuestMemoryBackend> Drop for DirtyGuard<'_, M> {
    fn drop(&mut self) {
        // The access is over: mark after the bytes landed.
        for &(gpa, len) in &self.written {
            mark(self.mem, gpa, len);
        }
    }
}

impl<I, M> Iommu for DirtyIommu<I, M>
where
    I: Iommu,
    M: GuestMemoryBackend + fmt::Debug + Send + Sync,
{
    type IotlbGuard<'a>
        = DirtyGuard<'a, M>
    where
        Self: 'a;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let refuse = |reason: &str| IommuError::CannotResolve {
            iova_range: IovaRange { base: iova, length },
            reason: reason.to_string(),
        };
        // The IOTLB below keys by `[iova, iova + length)`, which must not
        // wrap.
        if iova.0.checked_add(length as u64).is_none() {
            return Err(refuse("access wraps past 2^64"));
        }
        let mut tlb = Iotlb::new();
        let mut written = Vec::new();
        let mut at = iova.0;
        for m in self.inner.translate(iova, length, access)? {
            tlb.set_mapping(GuestAddress(at), m.base, m.length, access)?;
            if access.has_write() {
                mark(&self.mem, m.base.0, m.length as u64);
                written.push((m.base.0, m.length as u64));
            }
            at += m.length as u64;
        }
        let guard = DirtyGuard {
            tlb,
            written,
            mem: &self.mem,
        };
        Iotlb::lookup(guard, iova, length, access)
            .map_err(|_| refuse("translation changed while it was copied"))
    }
}
