//! The host's fault queues under [`IommufdBackend`]: the iommufd fault
//! queue's page requests (answered through it, with the cookie of their
//! group) and the SMMUv3 vEVENTQs' events, read in bounded rounds and
//! turned into [`BackendFault`]s for the guest.

use log::warn;
use vmm_iommu::backend::{BackendError, BackendFault, PageResponse};

use super::IommufdBackend;
use crate::fault::{
    page_response, parse_pgfaults, parse_vevents, pgfault_to_backend, smmu_event_to_backend,
    VEvent, PGFAULT_SIZE, SMMU_EVENT_SIZE, VEVENT_HEADER_SIZE,
};
use crate::host::{bytes_of, Handle};

/// Reads per queue per
/// [`IommuBackend::drain_faults`](vmm_iommu::backend::IommuBackend::drain_faults)
/// call, so one call
/// returns even if the device keeps faulting.
const MAX_DRAIN_READS: usize = 16;
/// Records read per `read` of a queue.
const RECORDS_PER_READ: usize = 64;

impl IommufdBackend {
    /// Answers a page request group through the fault queue.
    pub(super) fn answer_page_request(&self, resp: &PageResponse) -> Result<(), BackendError> {
        let mut st = self.lock();
        let key = (resp.endpoint, resp.pasid, resp.grpid);
        let Some(cookie) = st.pending.remove(&key) else {
            return Err(BackendError::NotFound(format!(
                "no page request group {} pending on endpoint {}",
                resp.grpid, resp.endpoint
            )));
        };
        let Some((_, fd)) = st.fault_queue else {
            return Err(BackendError::NotFound("no fault queue".into()));
        };
        let r = page_response(cookie, resp.code);
        match self.host.write(fd, bytes_of(&r)) {
            Ok(n) if n == std::mem::size_of_val(&r) => Ok(()),
            Ok(_) => {
                st.pending.insert(key, cookie);
                Err(BackendError::Host {
                    op: "write(fault queue)",
                    source: std::io::Error::other("short write"),
                })
            }
            Err(e) => {
                // The group is still waiting; the guest may answer again.
                st.pending.insert(key, cookie);
                Err(BackendError::Host {
                    op: "write(fault queue)",
                    source: e,
                })
            }
        }
    }

    /// Reads what the fault queue and the vEVENTQs hold into `out`.
    pub(super) fn drain_host_faults(&self, out: &mut Vec<BackendFault>) {
        let mut st = self.lock();
        if let Some((_, fd)) = st.fault_queue {
            let mut bytes = Vec::new();
            self.drain_queue(fd, PGFAULT_SIZE, &mut bytes);
            for f in parse_pgfaults(&bytes) {
                let ep = st
                    .endpoints
                    .iter()
                    .find(|(_, e)| e.dev_id == f.dev_id)
                    .map(|(id, _)| *id);
                let Some(ep) = ep else {
                    warn!("iommufd: page request from unknown device {}", f.dev_id);
                    continue;
                };
                let bf = pgfault_to_backend(&f, ep);
                // The group is answered once, with the cookie of its
                // requests (iommufd.h: echo the cookie of the last page).
                st.pending.insert((ep, bf.pasid, f.grpid), f.cookie);
                out.push(bf);
            }
        }
        for fd in st.shared.veventqs() {
            let mut bytes = Vec::new();
            self.drain_queue(fd, VEVENT_HEADER_SIZE + SMMU_EVENT_SIZE, &mut bytes);
            for ev in parse_vevents(&bytes) {
                match ev {
                    VEvent::Smmu(evt) => {
                        let known = |vsid: u32| st.endpoints.contains_key(&vsid).then_some(vsid);
                        if let Some(f) = smmu_event_to_backend(&evt, known) {
                            out.push(f);
                        }
                    }
                    VEvent::Lost => warn!("iommufd: vEVENTQ {} lost events", fd.0),
                }
            }
        }
    }

    /// Appends what queue `fd` holds to `out`, in reads of
    /// [`RECORDS_PER_READ`] records of `record` bytes, at most
    /// [`MAX_DRAIN_READS`] of them.
    fn drain_queue(&self, fd: Handle, record: usize, out: &mut Vec<u8>) {
        let mut buf = vec![0u8; record * RECORDS_PER_READ];
        for _ in 0..MAX_DRAIN_READS {
            match self.host.read(fd, &mut buf) {
                Ok(0) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => {
                    warn!("iommufd: reading queue {} failed: {e}", fd.0);
                    return;
                }
            }
        }
    }
}
