//! The vIOMMU's side of the VM lifecycle: snapshot and restore of the
//! state, the fault queue and the backends' page requests, with the
//! backends replayed; and endpoints plugged and unplugged while the device
//! runs.
//!
//! Both take the state's write lock, like a request: a hot-plug happens
//! between two requests, never inside one, and a restore is all or
//! nothing. What a backend did during a restore that then fails is undone.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Viommu;
use crate::backend::{DomainView, IommuBackend, SavedPageRequests, TableBinding};
use crate::snapshot::{BackendPageRequests, DomainKindSnapshot, SnapshotError, ViommuSnapshot};
use crate::state::IommuState;
use crate::wire::{TableDesc, VIRTIO_IOMMU_F_PAGE_REQUEST};

/// Why an endpoint could not be plugged or unplugged. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HotplugError {
    /// Plugging an endpoint ID already in use.
    #[error("endpoint {0} already exists")]
    Exists(u32),
    /// Unplugging an endpoint that does not exist.
    #[error("endpoint {0} does not exist")]
    NoEndpoint(u32),
    /// The backend cannot map the granule the device advertises.
    #[error("endpoint {endpoint}: backend {backend} maps pages {mask:#x}, not the granule {granule:#x} the guest uses")]
    PageSize {
        /// The endpoint.
        endpoint: u32,
        /// The backend's name.
        backend: String,
        /// Page sizes the backend maps.
        mask: u64,
        /// The device's granule.
        granule: u64,
    },
    /// The backend cannot translate the whole input range the device
    /// advertises (config space cannot shrink under a running guest).
    #[error("endpoint {endpoint}: backend {backend} translates [{start:#x}, {end:#x}], short of the input range")]
    InputRange {
        /// The endpoint.
        endpoint: u32,
        /// The backend's name.
        backend: String,
        /// First IOVA it translates.
        start: u64,
        /// Last IOVA it translates.
        end: u64,
    },
    /// A backend new to this vIOMMU refused the MMIO windows registered
    /// before it came ([`Viommu::add_mmio_window`]).
    #[error("endpoint {endpoint}: backend {backend} refused the MMIO windows: {message}")]
    Windows {
        /// The endpoint.
        endpoint: u32,
        /// The backend's name.
        backend: String,
        /// What it said.
        message: String,
    },
}

/// The snapshot's guest RAM and MMIO windows (when it has them) must be
/// this device's: replay does not check table pointers and MMIO mappings
/// against them (they held when the guest made them, and RAM or windows
/// may have gone since), so the memory map itself is compared.
fn check_memory_map(st: &IommuState, s: &ViommuSnapshot) -> Result<(), SnapshotError> {
    if let Some(ram) = &s.ram {
        if ram.as_slice() != st.ram() {
            return Err(SnapshotError::MemoryMap {
                what: "guest RAM",
                snapshot: ram.clone(),
                device: st.ram().to_vec(),
            });
        }
    }
    if let Some(windows) = &s.mmio_windows {
        let device: Vec<(u64, u64)> = st
            .mmio_windows()
            .iter()
            .map(|w| (w.gpa, w.last()))
            .collect();
        if *windows != device {
            return Err(SnapshotError::MemoryMap {
                what: "MMIO windows",
                snapshot: windows.clone(),
                device,
            });
        }
    }
    Ok(())
}

/// A backend and the page requests a snapshot holds for it.
type PageRequestsFor<'a> = (Arc<dyn IommuBackend>, &'a BackendPageRequests);

/// One backend call a restore made, to undo if a later one fails.
struct Joined {
    backend: Arc<dyn IommuBackend>,
    endpoint: u32,
    domain: u32,
    table: Option<TableDesc>,
}

impl Viommu {
    /// What the guest can observe of the vIOMMU: endpoints, domains with
    /// their mappings or tables, waiting fault records, the backends'
    /// page requests, the generation. Take it with the VMM's device
    /// threads paused: faults and page requests come from them.
    pub fn snapshot(&self) -> ViommuSnapshot {
        // The read lock orders the snapshot with requests: it sees each
        // request whole or not at all.
        let st = self.state();
        let (endpoints, domains) = st.save();
        let page_requests = self
            .router
            .all_with_endpoints()
            .into_iter()
            .filter(|(_, eps)| !eps.is_empty())
            .filter_map(|(b, endpoints)| {
                Some(BackendPageRequests {
                    backend: b.name().to_string(),
                    endpoints,
                    state: b.save_page_requests()?,
                })
            })
            .collect();
        ViommuSnapshot {
            generation: self.generation(),
            endpoints,
            domains,
            faults: self.faults.records().into_iter().map(Into::into).collect(),
            faults_dropped: self.faults.dropped(),
            page_requests,
            ram: Some(st.ram().to_vec()),
            mmio_windows: Some(
                st.mmio_windows()
                    .iter()
                    .map(|w| (w.gpa, w.last()))
                    .collect(),
            ),
        }
    }

    /// Rebuilds a snapshot into this vIOMMU, which must hold nothing yet,
    /// with `acked` the features the driver accepted. The state is
    /// replayed through the request rules, then every endpoint with a
    /// backend is attached or bound again (a backend re-creates its maps,
    /// or re-reads the guest's tables with empty caches), then the
    /// backends' page requests and the fault records are put back. The
    /// generation is the caller's to restore last
    /// ([`Self::restore_generation`]). On error nothing is left behind.
    pub(crate) fn restore_state(
        &self,
        s: &ViommuSnapshot,
        acked: u64,
    ) -> Result<(), SnapshotError> {
        let mut st = self.state_mut();
        if !st.is_pristine() {
            return Err(SnapshotError::NotFresh("the vIOMMU holds domains"));
        }
        if !self.faults.is_empty() {
            return Err(SnapshotError::NotFresh("fault records are waiting"));
        }
        if s.faults.len() > self.faults.capacity() {
            return Err(SnapshotError::TooManyFaults {
                count: s.faults.len(),
                capacity: self.faults.capacity(),
            });
        }
        check_memory_map(&st, s)?;
        let pr_on = acked & (1u64 << VIRTIO_IOMMU_F_PAGE_REQUEST) != 0;
        let prs = self.page_request_backends(s, pr_on)?;
        let old_acked = st.acked_features();
        let undo_state = |st: &mut IommuState| {
            st.clear_domains();
            st.set_acked_features(old_acked);
        };
        st.set_acked_features(acked);
        // A version-2 snapshot's memory map was compared above; a
        // version-1 one has none, so its replay checks it request by
        // request, as that version always did.
        let map_compared = s.ram.is_some() && s.mmio_windows.is_some();
        if let Err(e) = st.replay(&s.endpoints, &s.domains, map_compared) {
            undo_state(&mut st);
            return Err(e);
        }
        let mut joined: Vec<Joined> = Vec::new();
        if let Err(e) = self.replay_backends(&st, s, &mut joined) {
            self.undo_joined(&joined);
            undo_state(&mut st);
            return Err(e);
        }
        for b in self.router.all() {
            b.set_page_requests(pr_on);
        }
        for (i, (b, saved)) in prs.iter().enumerate() {
            if let Err(source) = b.restore_page_requests(&saved.state) {
                for (b, _) in &prs[..i] {
                    // Replacing with nothing cannot fail.
                    let _ = b.restore_page_requests(&SavedPageRequests::default());
                }
                let old_pr = old_acked & (1u64 << VIRTIO_IOMMU_F_PAGE_REQUEST) != 0;
                for b in self.router.all() {
                    b.set_page_requests(old_pr);
                }
                self.undo_joined(&joined);
                undo_state(&mut st);
                return Err(SnapshotError::Backend {
                    backend: b.name().to_string(),
                    what: "restore of its page requests".into(),
                    source,
                });
            }
        }
        for f in &s.faults {
            self.faults.push((*f).into());
        }
        self.faults.set_dropped(s.faults_dropped);
        self.bump();
        Ok(())
    }

    /// The backend each saved set of page requests belongs to, checked
    /// before anything changes.
    fn page_request_backends<'a>(
        &self,
        s: &'a ViommuSnapshot,
        pr_on: bool,
    ) -> Result<Vec<PageRequestsFor<'a>>, SnapshotError> {
        let mut out: Vec<PageRequestsFor<'a>> = Vec::new();
        for saved in &s.page_requests {
            let first = *saved.endpoints.first().ok_or_else(|| {
                SnapshotError::PageRequests(format!("backend {} serves no endpoint", saved.backend))
            })?;
            let b = self.router.backend(first).ok_or_else(|| {
                SnapshotError::PageRequests(format!("endpoint {first} has no backend here"))
            })?;
            if b.name() != saved.backend {
                return Err(SnapshotError::PageRequests(format!(
                    "endpoint {first} is served by {}, the snapshot's by {}",
                    b.name(),
                    saved.backend
                )));
            }
            for &ep in &saved.endpoints {
                if !self.router.backend(ep).is_some_and(|x| Arc::ptr_eq(&x, &b)) {
                    return Err(SnapshotError::PageRequests(format!(
                        "endpoints {first} and {ep} share a backend in the snapshot, not here"
                    )));
                }
            }
            if out.iter().any(|(x, _)| Arc::ptr_eq(x, &b)) {
                return Err(SnapshotError::PageRequests(format!(
                    "backend {} is listed twice",
                    saved.backend
                )));
            }
            for g in &saved.state.groups {
                if !saved.endpoints.contains(&g.endpoint) {
                    return Err(SnapshotError::PageRequests(format!(
                        "group {} of endpoint {}, which backend {} does not serve",
                        g.grpid, g.endpoint, saved.backend
                    )));
                }
                if g.state == crate::backend::SavedPageRequestState::Pending && !pr_on {
                    return Err(SnapshotError::PageRequests(format!(
                        "group {} of endpoint {} pending without page requests negotiated",
                        g.grpid, g.endpoint
                    )));
                }
            }
            out.push((b, saved));
        }
        Ok(out)
    }

    /// Attaches or binds every endpoint that has a backend, domain by
    /// domain, as the replayed state holds it.
    fn replay_backends(
        &self,
        st: &IommuState,
        s: &ViommuSnapshot,
        joined: &mut Vec<Joined>,
    ) -> Result<(), SnapshotError> {
        for d in &s.domains {
            let table = match &d.kind {
                DomainKindSnapshot::Table(t) => Some(TableDesc::from(*t)),
                _ => None,
            };
            let mut mappings = None;
            for &ep in &d.endpoints {
                let Some(b) = self.router.backend(ep) else {
                    continue;
                };
                self.router.count_call();
                let res = match table {
                    Some(table) => b.bind_table(
                        ep,
                        &TableBinding {
                            domain: d.id,
                            table,
                        },
                    ),
                    None => {
                        let mappings = mappings.get_or_insert_with(|| st.mappings(d.id));
                        b.attach(
                            ep,
                            &DomainView {
                                id: d.id,
                                bypass: st.is_bypass_domain(d.id) == Some(true),
                                mappings,
                                table: None,
                            },
                        )
                    }
                };
                if let Err(source) = res {
                    return Err(SnapshotError::Backend {
                        backend: b.name().to_string(),
                        what: format!("endpoint {ep} joining domain {}", d.id),
                        source,
                    });
                }
                joined.push(Joined {
                    backend: b,
                    endpoint: ep,
                    domain: d.id,
                    table,
                });
            }
        }
        Ok(())
    }

    /// Takes back what a failed restore made backends do, last first.
    fn undo_joined(&self, joined: &[Joined]) {
        for j in joined.iter().rev() {
            if let Err(e) = self.leave(j.backend.as_ref(), j.endpoint, Some(j.domain), j.table) {
                log::error!(
                    "virtio-iommu: backend {} cannot undo the restore of endpoint {}: {e}",
                    j.backend.name(),
                    j.endpoint
                );
            }
        }
    }

    /// Sets the generation after a restore: the snapshot's, unless that
    /// would not move it (translators made before the restore compare
    /// generations for inequality, so it must change, and it never goes
    /// back).
    pub(crate) fn restore_generation(&self, snapshot: u64) {
        let _st = self.state_mut();
        let now = self.generation();
        let next = if snapshot > now {
            snapshot
        } else {
            now.wrapping_add(1)
        };
        self.generation.store(next, Ordering::Release);
    }

    /// Plugs endpoint `ep` in while the device runs, served by `backend`
    /// (`None`: translated in MAP mode by the vIOMMU itself, as an
    /// emulated device). It starts unattached; PROBE advertises the
    /// config's table formats its backend supports. The backend must
    /// cover the device's granule and input range, which cannot change
    /// under a running guest. A backend new to this vIOMMU hears of the
    /// MMIO windows registered so far ([`Self::add_mmio_window`]); build
    /// it over guest memory as it is now (RAM plugged since the start
    /// included). Nothing else in the device changes.
    pub fn add_endpoint(
        &self,
        ep: u32,
        backend: Option<Arc<dyn IommuBackend>>,
    ) -> Result<(), HotplugError> {
        let mut st = self.state_mut();
        if st.endpoint(ep).is_some() {
            return Err(HotplugError::Exists(ep));
        }
        let mut formats = Vec::new();
        if let Some(b) = &backend {
            let caps = b.caps(ep);
            // The lowest page size is the granule every MAP is made of.
            let granule = self.page_size_mask & self.page_size_mask.wrapping_neg();
            if caps.page_size_mask & granule == 0 {
                return Err(HotplugError::PageSize {
                    endpoint: ep,
                    backend: b.name().to_string(),
                    mask: caps.page_size_mask,
                    granule,
                });
            }
            if caps.input_range.0 > self.input_range.0 || caps.input_range.1 < self.input_range.1 {
                return Err(HotplugError::InputRange {
                    endpoint: ep,
                    backend: b.name().to_string(),
                    start: caps.input_range.0,
                    end: caps.input_range.1,
                });
            }
            formats = self
                .nested_formats
                .iter()
                .copied()
                .filter(|f| caps.table_formats.contains(f))
                .collect();
            if !self.router.has(b) {
                self.tell_windows(b.as_ref(), ep, st.mmio_windows())?;
            }
        }
        st.add_endpoint(ep, formats);
        if let Some(b) = &backend {
            let holes = b.caps(ep).reserved_ranges;
            super::set_host_holes(&mut st, ep, &holes, self.probe_size);
        }
        if let Some(b) = backend {
            b.set_page_requests(st.acked_features() & (1u64 << VIRTIO_IOMMU_F_PAGE_REQUEST) != 0);
            // It arrives unattached: where unattached endpoints bypass,
            // its host side must too.
            if st.unattached_bypass() {
                self.tell_unattached(b.as_ref(), ep, true);
            }
            self.router.plug(ep, b);
        }
        Ok(())
    }

    /// Gives a backend new to this vIOMMU the MMIO windows registered
    /// before it came, all or none. (Guest RAM it learns from the memory
    /// it is built over: the VMM builds it over guest memory as it is now.)
    fn tell_windows(
        &self,
        b: &dyn IommuBackend,
        ep: u32,
        windows: &[crate::backend::MmioWindow],
    ) -> Result<(), HotplugError> {
        for (i, w) in windows.iter().enumerate() {
            self.router.count_call();
            if let Err(e) = b.add_mmio_window(w) {
                for done in windows[..i].iter().rev() {
                    self.router.count_call();
                    if let Err(u) = b.remove_mmio_window(done) {
                        log::error!(
                            "virtio-iommu: backend {} cannot undo an MMIO window: {u}",
                            b.name()
                        );
                    }
                }
                return Err(HotplugError::Windows {
                    endpoint: ep,
                    backend: b.name().to_string(),
                    message: e.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Unplugs endpoint `ep` while the device runs. An attached endpoint
    /// is detached first (its backend hears DETACH or unbind; the domain
    /// ends if it was its last endpoint); its waiting fault records and
    /// its backend's page requests are dropped, and the backend is told
    /// ([`IommuBackend::remove_endpoint`]). Afterwards every request
    /// naming it is NOENT and its DMA is refused as from an unknown
    /// endpoint. A backend that fails to detach is logged: the device is
    /// gone either way.
    pub fn remove_endpoint(&self, ep: u32) -> Result<(), HotplugError> {
        let mut st = self.state_mut();
        let Some(info) = st.endpoint(ep) else {
            return Err(HotplugError::NoEndpoint(ep));
        };
        let backend = self.router.backend(ep);
        if let (Some(b), Some(dom)) = (&backend, info.domain) {
            let table = st.domain_table(dom).copied();
            if let Err(e) = self.leave(b.as_ref(), ep, Some(dom), table) {
                log::error!(
                    "virtio-iommu: backend {} cannot detach unplugged endpoint {ep}: {e}",
                    b.name()
                );
            }
        }
        st.remove_endpoint(ep);
        self.router.unplug(ep);
        // Translators drop what they cached of it before the next access.
        self.bump();
        self.faults.retain(|r| r.endpoint != ep);
        drop(st);
        if let Some(b) = backend {
            b.remove_endpoint(ep);
        }
        Ok(())
    }
}
