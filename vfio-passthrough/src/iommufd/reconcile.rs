//! The attachment journal of [`IommufdBackend`]: every change of what the
//! kernel has attached for an endpoint (the device itself and each PASID)
//! is planned, done step by step and journaled, and undone in reverse if a
//! later step fails; a mode switch then frees what the old mode owned, so
//! a failed call leaves the device attached as before.

use std::collections::{BTreeMap, BTreeSet};

use log::error;
use vmm_iommu::backend::{BackendError, EndpointId};

use super::{host_err, Endpoint, IommufdBackend, Mode, State};
use crate::args;
use crate::host::{Handle, Ioctl};
use crate::vtd::RID_PASID;

/// One attachment change, with what to restore.
#[derive(Debug, Clone, Copy)]
struct Change {
    pasid: u32,
    before: Option<u32>,
    after: Option<u32>,
}

impl IommufdBackend {
    /// Attaches PASID `pasid` of `dev` (0: the device itself) to page
    /// table `to`, or detaches it (`None`).
    pub(super) fn attach_step(
        &self,
        dev: Handle,
        pasid: u32,
        to: Option<u32>,
    ) -> Result<(), BackendError> {
        match to {
            Some(pt) => self
                .host
                .ioctl(dev, Ioctl::AttachPt(&mut args::attach_pt(pasid, pt)))
                .map_err(host_err("VFIO_DEVICE_ATTACH_IOMMUFD_PT")),
            None => self
                .host
                .ioctl(dev, Ioctl::DetachPt(&args::detach_pt(pasid)))
                .map_err(host_err("VFIO_DEVICE_DETACH_IOMMUFD_PT")),
        }
    }

    /// Moves the endpoint's attachments to `desired`: PASIDs that go are
    /// detached first, then the device itself (PASID 0) is switched, then
    /// new PASIDs attached (the kernel wants the device's own domain
    /// PASID-capable before PASIDs join). Each step is journaled; on a
    /// failure the done steps are undone in reverse.
    fn reconcile(
        &self,
        e: &mut Endpoint,
        desired: &BTreeMap<u32, u32>,
    ) -> Result<(), BackendError> {
        let mut plan = Vec::new();
        for (&p, &pt) in &e.attached {
            if p != RID_PASID && !desired.contains_key(&p) {
                plan.push(Change {
                    pasid: p,
                    before: Some(pt),
                    after: None,
                });
            }
        }
        let rid_now = e.attached.get(&RID_PASID).copied();
        let rid_next = desired.get(&RID_PASID).copied();
        if rid_now != rid_next {
            plan.push(Change {
                pasid: RID_PASID,
                before: rid_now,
                after: rid_next,
            });
        }
        for (&p, &pt) in desired {
            let now = e.attached.get(&p).copied();
            if p != RID_PASID && now != Some(pt) {
                plan.push(Change {
                    pasid: p,
                    before: now,
                    after: Some(pt),
                });
            }
        }
        let mut done: Vec<Change> = Vec::with_capacity(plan.len());
        for c in plan {
            if let Err(err) = self.attach_step(e.dev, c.pasid, c.after) {
                for u in done.into_iter().rev() {
                    match self.attach_step(e.dev, u.pasid, u.before) {
                        Ok(()) => set_attached(e, u.pasid, u.before),
                        Err(x) => {
                            error!("iommufd: undo of PASID {} attachment failed: {x}", u.pasid)
                        }
                    }
                }
                return Err(err);
            }
            set_attached(e, c.pasid, c.after);
            done.push(c);
        }
        Ok(())
    }

    /// Switches endpoint `ep` to `mode` with `desired` attachments. Objects
    /// in `fresh` were allocated for the new mode: destroyed if the switch
    /// fails. On success, what the old mode owned and the new one does not
    /// is destroyed, and a MAP domain left empty goes with its IOAS.
    pub(super) fn switch(
        &self,
        st: &mut State,
        ep: EndpointId,
        desired: BTreeMap<u32, u32>,
        mode: Mode,
        fresh: &[u32],
    ) -> Result<(), BackendError> {
        let Some(e) = st.endpoints.get_mut(&ep) else {
            self.destroy_all(fresh.iter().copied());
            return Err(BackendError::NotFound(format!(
                "endpoint {ep} is not assigned"
            )));
        };
        if let Err(err) = self.reconcile(e, &desired) {
            self.destroy_all(fresh.iter().copied());
            return Err(err);
        }
        let keep: BTreeSet<u32> = mode.owned().into_iter().collect();
        let old = std::mem::replace(&mut e.mode, mode);
        let stays_in = match (&old, &e.mode) {
            (Mode::Map(a), Mode::Map(b)) => a == b,
            _ => false,
        };
        // Nested HWPTs are counted per endpoint using them (VT-d ones may
        // be shared): the old mode's that go are destroyed with their
        // last user.
        let had: BTreeSet<u32> = old.owned().into_iter().collect();
        for id in keep.difference(&had) {
            st.shared.acquire_nested(*id);
        }
        let gone: Vec<u32> = had.difference(&keep).copied().collect();
        self.release_nested(st, gone);
        if let (Mode::Map(d), false) = (old, stays_in) {
            self.leave_map_domain(st, ep, d);
        }
        Ok(())
    }
}

fn set_attached(e: &mut Endpoint, pasid: u32, to: Option<u32>) {
    match to {
        Some(pt) => e.attached.insert(pasid, pt),
        None => e.attached.remove(&pasid),
    };
}
