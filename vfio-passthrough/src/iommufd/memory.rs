//! Guest RAM plugged and unplugged under [`IommufdBackend`]. A child module
//! of `iommufd`: it changes the stage-2 IOAS and the MAP-mode IOASes.
//!
//! The stage-2 IOAS (`gpa_ioas`) holds all guest RAM at its GPA: bypass
//! endpoints are attached to it and every nest parent is a page table on
//! it, so mapping plugged RAM into it (or out of it) is all nested
//! bindings and bypass need; the kernel fills the IOAS's page tables. A
//! MAP-mode domain's IOAS gains (or loses) the parts of its mappings that
//! reach into the range. Every ioctl is journaled; on a failure the done
//! ones are undone in reverse and the backend keeps its old RAM. RAM goes
//! by whole regions, so an IOAS area is never split. MMIO windows need
//! nothing here: this backend refuses `MAP_F_MMIO` mappings (see
//! `crate::dma::mapping_pieces`), so none of its IOASes maps MMIO.

use vmm_iommu::backend::{BackendError, DomainId, RamChange};

use super::{host_err, IommufdBackend, HOST_PAGE};
use crate::dma::{
    check_alignment, identity_pieces, ioas_map, ioas_unmap, mapping_pieces, DmaPiece,
};
use crate::host::Ioctl;
use crate::ram::{memory_of, GuestRam};

/// One IOAS area to map or unmap: IOAS ID and piece.
type Area = (u32, DmaPiece);

/// A mapping whose pieces change: domain, IOVA, its pieces afterwards.
type Repieced = (DomainId, u64, Vec<DmaPiece>);

/// What a RAM change does to the MAP-mode IOASes.
#[derive(Default)]
struct Repiece {
    /// Areas to map (pieces now, not held).
    coming: Vec<Area>,
    /// Areas to unmap (pieces held, gone now).
    going: Vec<Area>,
    /// The mappings whose pieces change.
    changed: Vec<Repieced>,
}

impl IommufdBackend {
    fn map_area(&self, (ioas, p): &Area) -> Result<(), BackendError> {
        self.host
            .ioctl(self.iommufd, Ioctl::IoasMap(&ioas_map(*ioas, p)))
            .map_err(host_err("IOMMU_IOAS_MAP"))
    }

    fn unmap_area(&self, (ioas, p): &Area) -> Result<(), BackendError> {
        let mut a = ioas_unmap(*ioas, p);
        self.host
            .ioctl(self.iommufd, Ioctl::IoasUnmap(&mut a))
            .map_err(host_err("IOMMU_IOAS_UNMAP"))?;
        if a.length != p.len {
            return Err(BackendError::Host {
                op: "IOMMU_IOAS_UNMAP",
                source: std::io::Error::other(format!(
                    "unmapped {:#x} of {:#x} bytes at IOVA {:#x}",
                    a.length, p.len, p.iova
                )),
            });
        }
        Ok(())
    }

    /// Runs `step` over `areas`; if one fails, `undo` takes back those
    /// done, last first (a failing undo is logged).
    fn journaled(
        &self,
        areas: &[Area],
        step: impl Fn(&Self, &Area) -> Result<(), BackendError>,
        undo: impl Fn(&Self, &Area) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        for (i, a) in areas.iter().enumerate() {
            if let Err(e) = step(self, a) {
                for d in areas[..i].iter().rev() {
                    if let Err(x) = undo(self, d) {
                        log::error!(
                            "iommufd: undo at IOVA {:#x} of IOAS {} failed: {x}",
                            d.1.iova,
                            d.0
                        );
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// How the MAP-mode mappings' pieces differ under `ram`.
    fn repiece(&self, st: &super::State, ram: &GuestRam) -> Result<Repiece, BackendError> {
        let mut r = Repiece::default();
        for (&id, d) in &st.domains {
            for (&start, m) in &d.guest {
                let now = mapping_pieces(ram.regions(), m)?;
                let held = d.mappings.get(&start).map(Vec::as_slice).unwrap_or(&[]);
                let before = r.coming.len() + r.going.len();
                r.coming.extend(
                    now.iter()
                        .filter(|p| !held.contains(p))
                        .map(|p| (d.ioas, *p)),
                );
                r.going.extend(
                    held.iter()
                        .filter(|p| !now.contains(p))
                        .map(|p| (d.ioas, *p)),
                );
                if r.coming.len() + r.going.len() != before {
                    r.changed.push((id, start, now));
                }
            }
        }
        Ok(r)
    }

    /// The stage-2 areas of the changed range in `ram`: none when the
    /// stage-2 IOAS is the VMM's, which maps its RAM there itself.
    fn stage2_areas(
        &self,
        ram: &GuestRam,
        change: &RamChange<'_>,
    ) -> Result<Vec<Area>, BackendError> {
        if !self.owns_stage2 {
            return Ok(Vec::new());
        }
        Ok(identity_pieces(ram.regions_in(change.start, change.end)?)
            .into_iter()
            .map(|p| (self.gpa_ioas, p))
            .collect())
    }

    /// Plugged RAM: stage 2 gains it at its GPA, MAP-mode IOASes the
    /// parts of their mappings in it.
    pub(super) fn plug_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        let mem = memory_of(change)?;
        let mut st = self.lock();
        let ram = self.ram.get().with_added(change.host, mem)?;
        let mut areas: Vec<Area> = self.stage2_areas(&ram, change)?;
        let Repiece {
            coming, changed, ..
        } = self.repiece(&st, &ram)?;
        areas.extend(coming);
        for (_, p) in &areas {
            check_alignment(p, HOST_PAGE)?;
        }
        self.journaled(&areas, Self::map_area, Self::unmap_area)?;
        commit(&mut st, changed);
        self.ram.set(ram);
        Ok(())
    }

    /// RAM about to be unplugged: stage 2 and the MAP-mode IOASes lose
    /// every area in it; the guest's mappings stay recorded, so a later
    /// plug there maps them again.
    pub(super) fn unplug_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        let mem = memory_of(change)?;
        let mut st = self.lock();
        let old = self.ram.get();
        let mut areas: Vec<Area> = self.stage2_areas(&old, change)?;
        let ram = old.with_removed(change.start, change.end, mem)?;
        let Repiece { going, changed, .. } = self.repiece(&st, &ram)?;
        areas.extend(going);
        self.journaled(&areas, Self::unmap_area, Self::map_area)?;
        commit(&mut st, changed);
        self.ram.set(ram);
        Ok(())
    }
}

/// Records the new pieces of the mappings a RAM change touched.
fn commit(st: &mut super::State, changed: Vec<Repieced>) {
    for (id, start, now) in changed {
        if let Some(d) = st.domains.get_mut(&id) {
            d.mappings.insert(start, now);
        }
    }
}
