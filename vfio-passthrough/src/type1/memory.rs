//! Guest memory that changes under [`Type1Backend`]'s containers: RAM
//! plugged and unplugged, and the MMIO windows (BAR mmaps) that
//! `MAP_F_MMIO` mappings reach peer to peer. A child module of `type1`: it
//! reads and changes what each container maps.
//!
//! Every change is one reconcile: what each endpoint's container must map
//! under the new RAM and windows (bypass: all RAM one to one; a MAP-mode
//! domain: its mappings' pieces) is compared with what it maps, the
//! difference is unmapped then mapped through the journal, and only once
//! every ioctl succeeded does the backend take the new RAM or windows. A
//! failure undoes the journal: the containers, the RAM and the windows are
//! as before the call. RAM changes go by whole regions, so a piece is
//! never split (type1 cannot unmap part of a mapping).

use std::collections::BTreeMap;

use vmm_iommu::backend::{BackendError, MmioWindow, RamChange};

use super::{host_pieces, State, Step, Type1Backend};
use crate::dma::{check_alignment, identity_pieces, DmaPiece};
use crate::ram::{memory_of, GuestRam, RamRegion};

impl Type1Backend {
    /// What `e`'s container must map under `ram` and `mmio`, by IOVA.
    fn desired(
        st: &State,
        ep: u32,
        ram: &GuestRam,
        mmio: &[RamRegion],
    ) -> Result<BTreeMap<u64, DmaPiece>, BackendError> {
        let Some(e) = st.endpoints.get(&ep) else {
            return Ok(BTreeMap::new());
        };
        let pieces = match e.domain.and_then(|d| st.domains.get(&d)) {
            Some(d) if d.bypass => identity_pieces(ram.regions()),
            Some(d) => {
                let mut out = Vec::new();
                for m in d.mappings.values() {
                    out.extend(host_pieces(ram, mmio, m)?);
                }
                out
            }
            None if e.unattached_bypass => identity_pieces(ram.regions()),
            None => Vec::new(),
        };
        Ok(pieces.into_iter().map(|p| (p.iova, p)).collect())
    }

    /// Brings every container to what `ram` and `mmio` ask: unmaps what
    /// goes, then maps what comes (checked against the container's page
    /// size first), all journaled.
    fn reconcile_all(
        &self,
        st: &mut State,
        ram: &GuestRam,
        mmio: &[RamRegion],
    ) -> Result<(), BackendError> {
        let mut unmaps = Vec::new();
        let mut maps = Vec::new();
        let eps: Vec<u32> = st.endpoints.keys().copied().collect();
        for ep in eps {
            let want = Self::desired(st, ep, ram, mmio)?;
            let Some(e) = st.endpoints.get(&ep) else {
                continue;
            };
            for (iova, p) in &e.mapped {
                if want.get(iova) != Some(p) {
                    unmaps.push(Step::Unmapped(ep, *p));
                }
            }
            for (iova, p) in &want {
                if e.mapped.get(iova) != Some(p) {
                    check_alignment(p, e.info.min_page())?;
                    maps.push(Step::Mapped(ep, *p));
                }
            }
        }
        unmaps.extend(maps);
        self.apply(st, unmaps)
    }

    /// RAM plugged: bypass containers gain it at its GPA, MAP-mode
    /// mappings whose physical range reaches into it gain those parts.
    pub(super) fn plug_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        let mem = memory_of(change)?;
        let mut st = self.lock();
        let ram = self.ram.get().with_added(change.host, mem)?;
        let mmio = st.mmio.clone();
        self.reconcile_all(&mut st, &ram, &mmio)?;
        self.ram.set(ram);
        Ok(())
    }

    /// RAM about to be unplugged: every container's pieces in it go
    /// (bypass identity, the RAM parts of mappings); the mappings stay in
    /// the domains' records, so a later plug there maps them again.
    pub(super) fn unplug_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        let mem = memory_of(change)?;
        let mut st = self.lock();
        let ram = self.ram.get().with_removed(change.start, change.end, mem)?;
        let mmio = st.mmio.clone();
        self.reconcile_all(&mut st, &ram, &mmio)?;
        self.ram.set(ram);
        Ok(())
    }

    /// A window with host memory: MMIO mappings into it are mapped. One
    /// without is nothing this backend can map.
    pub(super) fn plug_window(&self, w: &MmioWindow) -> Result<(), BackendError> {
        let Some(hva) = w.hva else {
            return Ok(());
        };
        let r = RamRegion {
            gpa: w.gpa,
            len: w.len,
            hva,
        };
        let mut st = self.lock();
        let mut mmio = st.mmio.clone();
        mmio.push(r);
        let mmio = crate::ram::check_regions(mmio)?;
        let ram = self.ram.get();
        self.reconcile_all(&mut st, &ram, &mmio)?;
        st.mmio = mmio;
        Ok(())
    }

    /// The window goes: every piece of an MMIO mapping in it is unmapped.
    pub(super) fn unplug_window(&self, w: &MmioWindow) -> Result<(), BackendError> {
        let mut st = self.lock();
        let mut mmio = st.mmio.clone();
        mmio.retain(|r| (r.gpa, r.len) != (w.gpa, w.len));
        if mmio.len() == st.mmio.len() {
            // Registered without host memory: nothing was mapped.
            return Ok(());
        }
        let ram = self.ram.get();
        self.reconcile_all(&mut st, &ram, &mmio)?;
        st.mmio = mmio;
        Ok(())
    }
}
