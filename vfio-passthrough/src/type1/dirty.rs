//! Dirty tracking of [`Type1Backend`]'s assigned devices through
//! `VFIO_IOMMU_DIRTY_PAGES`, where the host offers it (type1's migration
//! capability in `VFIO_IOMMU_GET_INFO`). A child module of `type1`: it
//! reads what each container maps; the argument builders are
//! `crate::dirty`'s.
//!
//! A container's bitmap is of IOVA pages; each is turned into the guest
//! pages behind it through the container mapping that holds it (IOVA to
//! host address to guest-physical address). The kernel reads bitmaps of
//! whole mappings only, so each writable mapping is read on its own;
//! read-only ones cannot be dirtied. A mapping the guest unmaps while
//! tracking runs takes its dirty bits with it in the kernel, so all its
//! pages are reported dirty at the next call (a superset, never a loss).
//! Endpoints whose container has no migration capability are reported
//! untracked, and, for one round, endpoints plugged since tracking
//! started.

use std::collections::BTreeMap;

use log::error;
use vmm_iommu::backend::{BackendError, EndpointId};

use super::{host_err, State, Type1Backend};
use crate::caps::{type1_info_request, TYPE1_INFO_BUF};
use crate::dirty::{
    bitmap_pages, bitmap_words, parse_type1_migration, piece_gpa_pages, type1_dirty_get,
    type1_dirty_toggle, DirtyPages, Type1Migration, DIRTY_PAGE,
};
use crate::dma::DmaPiece;
use crate::host::{Handle, Ioctl};
use crate::ram::RamRegion;

/// What tracking holds while it runs.
#[derive(Debug, Default)]
pub(super) struct Type1Dirty {
    /// Tracked endpoints, with the page size their bitmaps are read in.
    tracked: BTreeMap<EndpointId, u64>,
    /// Endpoints without the migration capability.
    unsupported: Vec<EndpointId>,
    /// Writable pieces unmapped since the last call.
    unmapped: Vec<DmaPiece>,
}

/// Notes a piece the kernel unmapped while tracking runs (its dirty bits
/// went with it).
pub(super) fn note_unmapped(d: &mut Option<Type1Dirty>, p: &DmaPiece) {
    if let Some(d) = d {
        if p.write {
            d.unmapped.push(*p);
        }
    }
}

impl Type1Backend {
    /// The migration capability of `container`, if the host offers it.
    fn migration_of(&self, container: Handle) -> Result<Option<Type1Migration>, BackendError> {
        let mut len = TYPE1_INFO_BUF + 32;
        for _ in 0..2 {
            let mut buf = type1_info_request(len);
            self.host
                .ioctl(container, Ioctl::Type1GetInfo { buf: &mut buf })
                .map_err(host_err("VFIO_IOMMU_GET_INFO"))?;
            let argsz = crate::host::le32(&buf, 0).unwrap_or(0) as usize;
            if argsz <= buf.len() {
                return Ok(parse_type1_migration(&buf));
            }
            len = argsz;
        }
        Ok(None)
    }

    fn toggle(&self, container: Handle, start: bool) -> Result<(), BackendError> {
        let arg = type1_dirty_toggle(start);
        self.host
            .ioctl(
                container,
                Ioctl::Type1DirtyPages {
                    arg: &arg,
                    bitmap: &mut [],
                },
            )
            .map_err(host_err("VFIO_IOMMU_DIRTY_PAGES"))
    }

    /// Starts tracking on `ep`'s container if the host offers it; whether
    /// it did.
    fn start_one(&self, st: &State, ep: EndpointId) -> Result<Option<u64>, BackendError> {
        let Some(e) = st.endpoints.get(&ep) else {
            return Ok(None);
        };
        let Some(m) = self.migration_of(e.container)? else {
            return Ok(None);
        };
        self.toggle(e.container, true)?;
        Ok(Some(m.pgsize()))
    }

    /// Starts dirty tracking (`VFIO_IOMMU_DIRTY_PAGES` START) on every
    /// container whose host offers the migration capability; endpoints
    /// plugged later are started by [`Type1Backend::take_dirty_pages`].
    /// Returns the endpoints that are untracked. All or nothing.
    pub fn start_dirty_tracking(&self) -> Result<DirtyPages, BackendError> {
        let mut st = self.lock();
        if st.dirty.is_some() {
            return Err(BackendError::Invalid("dirty tracking is already on".into()));
        }
        let mut d = Type1Dirty::default();
        let eps: Vec<EndpointId> = st.endpoints.keys().copied().collect();
        for ep in eps {
            match self.start_one(&st, ep) {
                Ok(Some(pgsize)) => {
                    d.tracked.insert(ep, pgsize);
                }
                Ok(None) => d.unsupported.push(ep),
                Err(e) => {
                    self.stop_all(&st, &d);
                    return Err(e);
                }
            }
        }
        let mut out = DirtyPages {
            pages: Vec::new(),
            untracked: d.unsupported.clone(),
        };
        out.normalize();
        st.dirty = Some(d);
        Ok(out)
    }

    /// The guest pages the assigned devices wrote since the last call (or
    /// since tracking started), read and cleared from each tracked
    /// container's writable mappings, plus every page of writable
    /// mappings unmapped meanwhile, with the endpoints that are untracked
    /// (see the module).
    pub fn take_dirty_pages(&self) -> Result<DirtyPages, BackendError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(mut d) = st.dirty.take() else {
            return Err(BackendError::Invalid("dirty tracking is off".into()));
        };
        let mut out = DirtyPages::default();
        let ram = self.ram.get();
        for p in std::mem::take(&mut d.unmapped) {
            out.pages.extend(all_pages(ram.regions(), &p));
        }
        // Endpoints gone are forgotten; new ones start now.
        d.tracked.retain(|ep, _| st.endpoints.contains_key(ep));
        d.unsupported.retain(|ep| st.endpoints.contains_key(ep));
        let eps: Vec<EndpointId> = st.endpoints.keys().copied().collect();
        for ep in eps {
            if d.tracked.contains_key(&ep) || d.unsupported.contains(&ep) {
                continue;
            }
            match self.start_one(st, ep) {
                Ok(Some(pgsize)) => {
                    d.tracked.insert(ep, pgsize);
                }
                Ok(None) => d.unsupported.push(ep),
                Err(e) => {
                    st.dirty = Some(d);
                    return Err(e);
                }
            }
            out.untracked.push(ep);
        }
        out.untracked.extend(d.unsupported.iter().copied());
        let result = self.read_all(st, &d, &mut out.pages);
        st.dirty = Some(d);
        result?;
        out.normalize();
        Ok(out)
    }

    fn read_all(
        &self,
        st: &State,
        d: &Type1Dirty,
        pages: &mut Vec<u64>,
    ) -> Result<(), BackendError> {
        let ram = self.ram.get();
        let regions = ram.regions();
        for (ep, &pgsize) in &d.tracked {
            let Some(e) = st.endpoints.get(ep) else {
                continue;
            };
            for p in e.mapped.values().filter(|p| p.write) {
                let mut bitmap = vec![0u64; bitmap_words(p.len, pgsize)];
                let arg = type1_dirty_get(p.iova, p.len, pgsize);
                self.host
                    .ioctl(
                        e.container,
                        Ioctl::Type1DirtyPages {
                            arg: &arg,
                            bitmap: &mut bitmap,
                        },
                    )
                    .map_err(host_err("VFIO_IOMMU_DIRTY_PAGES"))?;
                for iova in bitmap_pages(&bitmap, p.iova, p.len, pgsize) {
                    pages.extend(piece_gpa_pages(regions, p, iova, pgsize));
                }
            }
        }
        Ok(())
    }

    fn stop_all(&self, st: &State, d: &Type1Dirty) {
        for ep in d.tracked.keys() {
            if let Some(e) = st.endpoints.get(ep) {
                if let Err(err) = self.toggle(e.container, false) {
                    error!("type1: cannot stop dirty tracking of endpoint {ep}: {err}");
                }
            }
        }
    }

    /// Stops dirty tracking (`VFIO_IOMMU_DIRTY_PAGES` STOP) on every
    /// container it runs on. A container that refuses is logged.
    pub fn stop_dirty_tracking(&self) {
        let mut st = self.lock();
        if let Some(d) = st.dirty.take() {
            self.stop_all(&st, &d);
        }
    }
}

/// Every guest page behind a piece.
fn all_pages(regions: &[RamRegion], p: &DmaPiece) -> Vec<u64> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < p.len {
        out.extend(piece_gpa_pages(regions, p, p.iova + off, DIRTY_PAGE));
        off += DIRTY_PAGE;
    }
    out
}
