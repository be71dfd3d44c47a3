//! Dirty tracking of [`IommufdBackend`]'s assigned devices: on the
//! stage-2 nest parent HWPTs (one per physical IOMMU, shared by its
//! endpoints: started, read and stopped once each), whose IOVA is the guest-physical
//! address (it is built on the IOAS holding all guest RAM at its
//! guest-physical addresses), so its bitmap is the guest's dirty pages as
//! they are. A child module of `iommufd`: it reads the backend's
//! endpoints; the argument builders are `crate::dirty`'s.
//!
//! What it tracks: DMA through nested translation (VT-d PASID tables,
//! SMMUv3 CD tables), whose stage 2 is the parent, where the parent could
//! be allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` (the IOMMU reports
//! `IOMMU_HW_CAP_DIRTY_TRACKING` and accepts it for a nest parent).
//! Endpoints in MAP mode or bypass translate through the kernel's own
//! HWPTs of their IOAS, which nothing tracks: they are reported
//! untracked, as are endpoints whose parent cannot track, and, for one
//! round, an endpoint whose parent tracking only now began. Stage 2 never
//! changes while the guest runs (guest RAM is fixed), so no dirty bit is
//! lost to an unmap.

use std::collections::BTreeSet;

use iommufd_bindings::iommufd::{
    iommu_hwpt_alloc, iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
};
use log::{error, warn};
use vmm_iommu::backend::BackendError;

use super::{IommufdBackend, Mode, State};
use crate::dirty::{
    bitmap_pages, bitmap_words, get_dirty_bitmap, set_dirty_tracking, DirtyPages, DIRTY_PAGE,
    MAX_BITMAP_RANGE,
};
use crate::host::Ioctl;

impl IommufdBackend {
    /// Allocates an endpoint's nest parent from `a`, with dirty tracking
    /// when `dirty_capable` and the kernel accepts it (some IOMMUs track
    /// only stage 1: then the parent is allocated again without). Returns
    /// the HWPT and whether it can track.
    pub(super) fn alloc_nest_parent(
        &self,
        mut a: iommu_hwpt_alloc,
        dirty_capable: bool,
    ) -> Result<(u32, bool), BackendError> {
        if dirty_capable {
            let mut d = a;
            d.flags |= iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
            match self.hwpt_alloc(&mut d, &[]) {
                Ok(id) => return Ok((id, true)),
                Err(e) => warn!("iommufd: nest parent without dirty tracking: {e}"),
            }
        }
        Ok((self.hwpt_alloc(&mut a, &[])?, false))
    }

    /// Starts dirty tracking (`IOMMU_HWPT_SET_DIRTY_TRACKING`) on every
    /// endpoint's nest parent that can track; endpoints plugged later are
    /// started by [`IommufdBackend::take_dirty_pages`]. Returns the
    /// endpoints that are untracked now. All or nothing: if one parent
    /// refuses, those started are stopped again.
    pub fn start_dirty_tracking(&self) -> Result<DirtyPages, BackendError> {
        let mut st = self.lock();
        if st.dirty_parents.is_some() {
            return Err(BackendError::Invalid("dirty tracking is already on".into()));
        }
        let mut started = BTreeSet::new();
        for p in tracking_parents(&st) {
            if let Err(e) = self.set_tracking(p, true) {
                for q in started {
                    if let Err(e) = self.set_tracking(q, false) {
                        error!("iommufd: cannot stop dirty tracking on HWPT {q}: {e}");
                    }
                }
                return Err(e);
            }
            started.insert(p);
        }
        st.dirty_parents = Some(started);
        let mut out = DirtyPages {
            pages: Vec::new(),
            untracked: untracked(&st),
        };
        out.normalize();
        Ok(out)
    }

    /// The guest pages the assigned devices wrote since the last call (or
    /// since tracking started), read and cleared from every tracking nest
    /// parent over all guest RAM, with the endpoints whose writes could
    /// not be tracked (see the module). Parents of endpoints plugged since
    /// the last call start tracking now, and those endpoints count as
    /// untracked this once.
    pub fn take_dirty_pages(&self) -> Result<DirtyPages, BackendError> {
        let mut st = self.lock();
        let Some(on) = st.dirty_parents.clone() else {
            return Err(BackendError::Invalid("dirty tracking is off".into()));
        };
        let mut out = DirtyPages {
            pages: Vec::new(),
            untracked: untracked(&st),
        };
        let live = tracking_parents(&st);
        let mut now = BTreeSet::new();
        for &p in &live {
            if !on.contains(&p) {
                self.set_tracking(p, true)?;
                now.insert(p);
                out.untracked.extend(
                    st.endpoints
                        .iter()
                        .filter(|(_, e)| e.nesting.is_some_and(|n| n.parent == p))
                        .map(|(ep, _)| *ep),
                );
                continue;
            }
            self.read_parent(p, &mut out.pages)?;
            now.insert(p);
        }
        // Parents destroyed with their endpoint are forgotten.
        st.dirty_parents = Some(now);
        out.normalize();
        Ok(out)
    }

    /// Stops dirty tracking on every parent it runs on; what they held is
    /// dropped. A parent that refuses is logged: it goes on tracking,
    /// which costs the host, not the guest.
    pub fn stop_dirty_tracking(&self) {
        let mut st = self.lock();
        let Some(on) = st.dirty_parents.take() else {
            return;
        };
        let live = tracking_parents(&st);
        for p in on.intersection(&live) {
            if let Err(e) = self.set_tracking(*p, false) {
                error!("iommufd: cannot stop dirty tracking on HWPT {p}: {e}");
            }
        }
    }

    fn set_tracking(&self, hwpt: u32, on: bool) -> Result<(), BackendError> {
        self.ioctl(
            "IOMMU_HWPT_SET_DIRTY_TRACKING",
            Ioctl::HwptSetDirtyTracking(&set_dirty_tracking(hwpt, on)),
        )
    }

    /// Reads and clears parent `hwpt`'s bitmap over every RAM region, in
    /// ranges of at most [`MAX_BITMAP_RANGE`].
    fn read_parent(&self, hwpt: u32, pages: &mut Vec<u64>) -> Result<(), BackendError> {
        let ram = self.ram.get();
        for r in ram.regions() {
            let mut at = r.gpa;
            let end = r.gpa + r.len;
            while at < end {
                let len = (end - at).min(MAX_BITMAP_RANGE);
                let mut bitmap = vec![0u64; bitmap_words(len, DIRTY_PAGE)];
                let arg = get_dirty_bitmap(hwpt, at, len);
                self.ioctl(
                    "IOMMU_HWPT_GET_DIRTY_BITMAP",
                    Ioctl::HwptGetDirtyBitmap {
                        arg: &arg,
                        bitmap: &mut bitmap,
                    },
                )?;
                pages.extend(bitmap_pages(&bitmap, at, len, DIRTY_PAGE));
                at += len;
            }
        }
        Ok(())
    }
}

/// The nest parents that can track (each shared by the endpoints behind
/// one physical IOMMU, so each is started and read once).
fn tracking_parents(st: &State) -> BTreeSet<u32> {
    st.shared.tracking_parents()
}

/// Endpoints that may write guest memory through a page table nothing
/// tracks: MAP mode and bypass, and nested modes over a parent that
/// cannot track. A blocked endpoint writes nothing.
fn untracked(st: &State) -> Vec<vmm_iommu::backend::EndpointId> {
    st.endpoints
        .iter()
        .filter(|(_, e)| match e.mode {
            Mode::Blocked => false,
            Mode::Map(_) | Mode::Bypass => true,
            Mode::Vtd(..) | Mode::Smmu { .. } => !e.nesting.is_some_and(|n| n.dirty),
        })
        .map(|(ep, _)| *ep)
        .collect()
}
