//! Page requests of the software IOMMU: the table of groups sent to the
//! guest and their answers, the waits of device models that retry after
//! PAGE_RESP, and the table's part in a snapshot.
//!
//! A group is opened by a fault a page request can resolve (`fault.rs`),
//! answered by the guest's PAGE_RESP, and forgotten once the device model
//! reads the answer, when its endpoint goes, or when answers nobody
//! collected pile up. The table is bounded, so a guest that never answers
//! cannot make the IOMMU hold state without bound.

use std::collections::HashMap;
use std::time::Duration;

use vm_memory::GuestMemory;

use super::{lock, EmulatedIommu, NestedError, NestedTranslation, NO_PASID};
use crate::backend::{
    BackendError, EndpointId, PageResponse, SavedPageRequest, SavedPageRequestState,
    SavedPageRequests,
};
use crate::nested::Access;
use crate::wire::VIRTIO_IOMMU_PAGE_RESP_SUCCESS;

/// Page requests outstanding at once over the whole IOMMU; past it a
/// not-present fault is unrecoverable, so a guest that never answers
/// cannot make us hold state without bound.
pub const MAX_PENDING_PAGE_REQUESTS: usize = 64;
/// Page-request group IDs are 9 bits (PCIe PRG index).
const GRPID_MASK: u32 = 0x1ff;

/// The state of a page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRequestState {
    /// Waiting for PAGE_RESP.
    Pending,
    /// The guest answered SUCCESS: retry the access.
    Success,
    /// The guest answered INVALID or FAILURE: abort the access.
    Failed,
    /// No such group (answered long ago, or never sent).
    Unknown,
}

/// The groups sent and not forgotten yet, and the next group ID.
#[derive(Default)]
pub(super) struct PageRequests {
    next_grpid: u32,
    /// (endpoint, pasid key, group) → answered?
    groups: HashMap<(EndpointId, u32, u32), PageRequestState>,
}

impl<M: GuestMemory + Send + Sync> EmulatedIommu<M> {
    /// Where page request `grpid` of (`ep`, `pasid`) stands. Answered
    /// groups are forgotten once read.
    pub fn page_request_state(
        &self,
        ep: EndpointId,
        pasid: Option<u32>,
        grpid: u32,
    ) -> PageRequestState {
        let mut q = lock(&self.prq);
        let k = (ep, pasid.unwrap_or(NO_PASID), grpid);
        match q.groups.get(&k).copied() {
            None => PageRequestState::Unknown,
            Some(PageRequestState::Pending) => PageRequestState::Pending,
            Some(s) => {
                q.groups.remove(&k);
                s
            }
        }
    }

    /// Blocks until page request `grpid` is answered or `timeout` passes
    /// (for device models that run on their own thread).
    pub fn wait_page_response(
        &self,
        ep: EndpointId,
        pasid: Option<u32>,
        grpid: u32,
        timeout: Duration,
    ) -> PageRequestState {
        let k = (ep, pasid.unwrap_or(NO_PASID), grpid);
        let q = lock(&self.prq);
        let (q, _) = self
            .prq_answered
            .wait_timeout_while(q, timeout, |q| {
                q.groups.get(&k) == Some(&PageRequestState::Pending)
            })
            .unwrap_or_else(|p| p.into_inner());
        drop(q);
        self.page_request_state(ep, pasid, grpid)
    }

    /// Translates and, on a page request, waits for the answer and retries
    /// once: the access "waits for PAGE_RESP" of a device with its own
    /// thread.
    pub fn translate_waiting(
        &self,
        ep: EndpointId,
        pasid: Option<u32>,
        va: u64,
        access: Access,
        timeout: Duration,
    ) -> Result<NestedTranslation, NestedError> {
        match self.translate(ep, pasid, va, access) {
            Err(NestedError::PageRequest { grpid }) => {
                match self.wait_page_response(ep, pasid, grpid, timeout) {
                    PageRequestState::Success => self.translate(ep, pasid, va, access),
                    _ => Err(NestedError::PageRequest { grpid }),
                }
            }
            r => r,
        }
    }
}

impl<M> EmulatedIommu<M> {
    /// Opens a page-request group for a fault of (`ep`, `pasid`): its ID,
    /// or `None` when [`MAX_PENDING_PAGE_REQUESTS`] are pending already
    /// (the fault is then unrecoverable).
    pub(super) fn open_page_request(&self, ep: EndpointId, pasid: Option<u32>) -> Option<u32> {
        let mut q = lock(&self.prq);
        let key = pasid.unwrap_or(NO_PASID);
        let pending = q
            .groups
            .values()
            .filter(|s| **s == PageRequestState::Pending)
            .count();
        // Answers a device model never collected are dropped once they
        // pile up, so the table stays bounded (a dropped answer reads
        // as Unknown: the access is aborted).
        if q.groups.len() >= 4 * MAX_PENDING_PAGE_REQUESTS {
            q.groups.retain(|_, s| *s == PageRequestState::Pending);
        }
        if pending < MAX_PENDING_PAGE_REQUESTS {
            let grpid = q.next_grpid;
            q.next_grpid = q.next_grpid.wrapping_add(1) & GRPID_MASK;
            if let std::collections::hash_map::Entry::Vacant(e) = q.groups.entry((ep, key, grpid)) {
                e.insert(PageRequestState::Pending);
                return Some(grpid);
            }
        }
        None
    }

    /// Records the guest's answer to a pending group and wakes the device
    /// threads waiting for it.
    pub(super) fn answer_page_request(&self, resp: &PageResponse) -> Result<(), BackendError> {
        let mut q = lock(&self.prq);
        let k = (resp.endpoint, resp.pasid.unwrap_or(NO_PASID), resp.grpid);
        match q.groups.get_mut(&k) {
            Some(s @ PageRequestState::Pending) => {
                *s = if resp.code == VIRTIO_IOMMU_PAGE_RESP_SUCCESS {
                    PageRequestState::Success
                } else {
                    PageRequestState::Failed
                };
                drop(q);
                self.prq_answered.notify_all();
                Ok(())
            }
            _ => Err(BackendError::NotFound(format!(
                "no pending page request {} of endpoint {}",
                resp.grpid, resp.endpoint
            ))),
        }
    }

    /// The groups held now, answers not collected yet included, in a
    /// stable order (for a snapshot).
    pub(super) fn page_request_table(&self) -> SavedPageRequests {
        let q = lock(&self.prq);
        let mut groups: Vec<SavedPageRequest> = q
            .groups
            .iter()
            .filter_map(|(&(endpoint, key, grpid), &s)| {
                let state = match s {
                    PageRequestState::Pending => SavedPageRequestState::Pending,
                    PageRequestState::Success => SavedPageRequestState::Success,
                    PageRequestState::Failed => SavedPageRequestState::Failed,
                    PageRequestState::Unknown => return None,
                };
                Some(SavedPageRequest {
                    endpoint,
                    pasid: (key != NO_PASID).then_some(key),
                    grpid,
                    state,
                })
            })
            .collect();
        groups.sort_unstable_by_key(|g| (g.endpoint, g.pasid, g.grpid));
        SavedPageRequests {
            next_grpid: q.next_grpid,
            groups,
        }
    }

    /// Replaces the table with a saved one, once every value in it is one
    /// this IOMMU could have produced.
    pub(super) fn restore_page_request_table(
        &self,
        saved: &SavedPageRequests,
    ) -> Result<(), BackendError> {
        // A snapshot is untrusted: every value must be one this backend
        // could have produced, and the table stays within its bounds.
        let bad = |what: String| Err(BackendError::Invalid(format!("page requests: {what}")));
        if saved.next_grpid > GRPID_MASK {
            return bad(format!("next group {} beyond 9 bits", saved.next_grpid));
        }
        if saved.groups.len() > 4 * MAX_PENDING_PAGE_REQUESTS {
            return bad(format!("{} groups held", saved.groups.len()));
        }
        let mut groups = HashMap::with_capacity(saved.groups.len());
        let mut pending = 0;
        for g in &saved.groups {
            if !self.page_request_endpoints.contains(&g.endpoint) {
                return bad(format!("endpoint {} sends no page requests", g.endpoint));
            }
            if g.grpid > GRPID_MASK {
                return bad(format!("group {} beyond 9 bits", g.grpid));
            }
            let key = match g.pasid {
                None => NO_PASID,
                Some(p) if u64::from(p) >> self.caps.pasid_bits == 0 => p,
                Some(p) => return bad(format!("PASID {p:#x} beyond the PASID width")),
            };
            let state = match g.state {
                SavedPageRequestState::Pending => {
                    pending += 1;
                    PageRequestState::Pending
                }
                SavedPageRequestState::Success => PageRequestState::Success,
                SavedPageRequestState::Failed => PageRequestState::Failed,
            };
            if groups.insert((g.endpoint, key, g.grpid), state).is_some() {
                return bad(format!(
                    "group {} of endpoint {} listed twice",
                    g.grpid, g.endpoint
                ));
            }
        }
        if pending > MAX_PENDING_PAGE_REQUESTS {
            return bad(format!("{pending} pending"));
        }
        let mut q = lock(&self.prq);
        q.next_grpid = saved.next_grpid;
        q.groups = groups;
        drop(q);
        self.prq_answered.notify_all();
        Ok(())
    }

    /// Forgets every group of `ep`, which is gone.
    pub(super) fn forget_page_requests(&self, ep: EndpointId) {
        let mut q = lock(&self.prq);
        q.groups.retain(|k, _| k.0 != ep);
        drop(q);
        // A device thread waiting for an answer to the gone endpoint's
        // request wakes up and sees it unknown: the access is aborted.
        self.prq_answered.notify_all();
    }

    /// Fails every pending group: the driver turned page requests off and
    /// can no longer answer them.
    pub(super) fn fail_pending_page_requests(&self) {
        let mut q = lock(&self.prq);
        for s in q.groups.values_mut() {
            if *s == PageRequestState::Pending {
                *s = PageRequestState::Failed;
            }
        }
        drop(q);
        self.prq_answered.notify_all();
    }
}
