//! [`Type1Backend`]: MAP mode for assigned devices through a VFIO type1
//! container per endpoint. A guest MAP becomes `VFIO_IOMMU_MAP_DMA` of the
//! host virtual addresses behind the guest pages, an UNMAP
//! `VFIO_IOMMU_UNMAP_DMA`; attaching replays the domain's mappings,
//! detaching removes them. A `MAP_F_MMIO` mapping into an MMIO window the
//! VMM registered with host memory (a BAR's mmap) becomes
//! `VFIO_IOMMU_MAP_DMA` of that memory: peer-to-peer DMA. RAM plugged or
//! unplugged, and windows registered or withdrawn, change every container
//! to match (`type1/memory.rs`).
//!
//! Every call checks all guest input first, then issues its ioctls while
//! keeping a journal; if one fails, the journal is undone in reverse, so
//! the containers hold what they held before the call. The per-endpoint
//! record of what is mapped follows every successful ioctl, so it matches
//! the kernel even if an undo step fails.
//!
//! Limits: one device per IOMMU group (as `vfio-ioctls` assumes), no
//! nested mode (`bind_table` is UNSUPP).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{error, warn};
use vmm_iommu::backend::{
    BackendCaps, BackendError, BackendFault, DomainId, DomainView, EndpointId, IommuBackend,
    MmioWindow, PageResponse, RamChange, TableBinding,
};
use vmm_iommu::invalidation::Invalidation;
use vmm_iommu::Mapping;

use crate::caps::{parse_type1_info, type1_info_request, Type1Info, TYPE1_INFO_BUF};
use crate::dma::{
    check_alignment, identity_pieces, mapping_pieces, mmio_pieces, type1_map, type1_unmap, DmaPiece,
};
use crate::host::{Handle, HostIommu, Ioctl, Open};
use crate::ram::{GuestRam, RamRegion, SharedRam};

// Dirty tracking through VFIO_IOMMU_DIRTY_PAGES (issue 13).
mod dirty;
// RAM hot-plug and MMIO windows (issue 12).
mod memory;

/// Turns a host error into the backend error the guest sees as DEVERR.
pub(crate) fn host_err(op: &'static str) -> impl FnOnce(std::io::Error) -> BackendError {
    move |source| BackendError::Host { op, source }
}

#[derive(Debug)]
struct Endpoint {
    container: Handle,
    info: Type1Info,
    domain: Option<DomainId>,
    /// Unattached and bypassing: all guest RAM one to one.
    unattached_bypass: bool,
    /// What the container maps now, by IOVA.
    mapped: BTreeMap<u64, DmaPiece>,
}

#[derive(Debug, Default)]
struct Domain {
    endpoints: BTreeSet<EndpointId>,
    bypass: bool,
    mappings: BTreeMap<u64, Mapping>,
}

#[derive(Debug, Default)]
struct State {
    endpoints: BTreeMap<EndpointId, Endpoint>,
    domains: HashMap<DomainId, Domain>,
    /// The registered MMIO windows that have host memory behind them
    /// (BAR mmaps), sorted: where `MAP_F_MMIO` mappings reach.
    mmio: Vec<RamRegion>,
    /// Dirty tracking, while it runs.
    dirty: Option<dirty::Type1Dirty>,
}

/// One ioctl done by the current call, to undo on failure.
#[derive(Clone, Copy, Debug)]
enum Step {
    Mapped(EndpointId, DmaPiece),
    Unmapped(EndpointId, DmaPiece),
}

/// MAP-mode backend on VFIO type1 containers.
pub struct Type1Backend {
    host: Arc<dyn HostIommu>,
    ram: SharedRam,
    state: Mutex<State>,
}

impl std::fmt::Debug for Type1Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Type1Backend")
            .field("state", &*self.lock())
            .finish()
    }
}

impl Type1Backend {
    /// A backend over `ram` that reaches the kernel through `host`.
    pub fn new(host: Arc<dyn HostIommu>, ram: GuestRam) -> Self {
        Type1Backend {
            host,
            ram: SharedRam::new(ram),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between ioctls, so a panic elsewhere does
        // not make it unusable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the device at `device` (sysfs path) in a container of its own
    /// and reads the container's page sizes and IOVA ranges. Its DMA is
    /// blocked (nothing mapped) until the guest attaches it.
    pub fn add_endpoint(&self, ep: EndpointId, device: &Path) -> Result<(), BackendError> {
        let mut st = self.lock();
        if st.endpoints.contains_key(&ep) {
            return Err(BackendError::Invalid(format!(
                "endpoint {ep} is already assigned"
            )));
        }
        let container = self
            .host
            .open(Open::Type1 { device })
            .map_err(crate::kvm_vfio::open_err("open(VFIO group/container)"))?
            .handle;
        let info = match self.get_info(container) {
            Ok(i) => i,
            Err(e) => {
                self.host.close(container);
                return Err(e);
            }
        };
        st.endpoints.insert(
            ep,
            Endpoint {
                container,
                info,
                domain: None,
                unattached_bypass: false,
                mapped: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// `VFIO_IOMMU_GET_INFO`, again with the size the kernel asks for if
    /// the capability chain did not fit.
    fn get_info(&self, container: Handle) -> Result<Type1Info, BackendError> {
        let mut len = TYPE1_INFO_BUF;
        for _ in 0..2 {
            let mut buf = type1_info_request(len);
            self.host
                .ioctl(container, Ioctl::Type1GetInfo { buf: &mut buf })
                .map_err(host_err("VFIO_IOMMU_GET_INFO"))?;
            let info = parse_type1_info(&buf)?;
            match info.needs {
                // Bounded by the kernel's own argsz, a u32.
                Some(n) => len = n as usize,
                None => return Ok(info),
            }
        }
        Err(BackendError::Host {
            op: "VFIO_IOMMU_GET_INFO",
            source: std::io::Error::other("capability chain keeps growing"),
        })
    }

    /// Removes the endpoint: its mappings go and its container closes.
    pub fn remove_endpoint(&self, ep: EndpointId) -> Result<(), BackendError> {
        let mut st = self.lock();
        let Some(dom) = st.endpoints.get(&ep).map(|e| e.domain) else {
            return Err(BackendError::NotFound(format!("endpoint {ep}")));
        };
        if let Some(d) = dom {
            self.detach_locked(&mut st, ep, d)?;
        }
        if let Some(e) = st.endpoints.remove(&ep) {
            self.host.close(e.container);
        }
        Ok(())
    }

    /// The container of an endpoint (for tests and diagnostics).
    pub fn container_of(&self, ep: EndpointId) -> Option<Handle> {
        self.lock().endpoints.get(&ep).map(|e| e.container)
    }

    /// The pieces an endpoint's container maps now (for tests and diagnostics).
    pub fn mapped(&self, ep: EndpointId) -> Vec<DmaPiece> {
        self.lock()
            .endpoints
            .get(&ep)
            .map(|e| e.mapped.values().copied().collect())
            .unwrap_or_default()
    }

    fn map_piece(&self, st: &mut State, ep: EndpointId, p: &DmaPiece) -> Result<(), BackendError> {
        let e = st
            .endpoints
            .get_mut(&ep)
            .ok_or_else(|| BackendError::NotFound(format!("endpoint {ep}")))?;
        self.host
            .ioctl(e.container, Ioctl::Type1MapDma(&type1_map(p)))
            .map_err(host_err("VFIO_IOMMU_MAP_DMA"))?;
        e.mapped.insert(p.iova, *p);
        Ok(())
    }

    fn unmap_piece(
        &self,
        st: &mut State,
        ep: EndpointId,
        p: &DmaPiece,
    ) -> Result<(), BackendError> {
        let e = st
            .endpoints
            .get_mut(&ep)
            .ok_or_else(|| BackendError::NotFound(format!("endpoint {ep}")))?;
        let mut arg = type1_unmap(p);
        self.host
            .ioctl(e.container, Ioctl::Type1UnmapDma(&mut arg))
            .map_err(host_err("VFIO_IOMMU_UNMAP_DMA"))?;
        // The kernel removes whole mappings and says how many bytes: the
        // piece is gone if it says so, and was not there if it says 0.
        if arg.size == p.len || arg.size == 0 {
            e.mapped.remove(&p.iova);
        }
        if arg.size == p.len {
            dirty::note_unmapped(&mut st.dirty, p);
        }
        if arg.size != p.len {
            return Err(BackendError::Host {
                op: "VFIO_IOMMU_UNMAP_DMA",
                source: std::io::Error::other(format!(
                    "unmapped {:#x} of {:#x} bytes at IOVA {:#x}",
                    arg.size, p.len, p.iova
                )),
            });
        }
        Ok(())
    }

    fn step(&self, st: &mut State, s: Step, journal: &mut Vec<Step>) -> Result<(), BackendError> {
        match s {
            Step::Mapped(ep, p) => self.map_piece(st, ep, &p)?,
            Step::Unmapped(ep, p) => self.unmap_piece(st, ep, &p)?,
        }
        journal.push(s);
        Ok(())
    }

    /// Undoes a journal, newest first. A failing undo step is logged: the
    /// per-endpoint record still matches the kernel.
    fn rollback(&self, st: &mut State, journal: Vec<Step>) {
        for s in journal.into_iter().rev() {
            let r = match s {
                Step::Mapped(ep, p) => self.unmap_piece(st, ep, &p),
                Step::Unmapped(ep, p) => self.map_piece(st, ep, &p),
            };
            if let Err(e) = r {
                error!("type1 rollback of {s:?} failed: {e}");
            }
        }
    }

    /// Runs `steps`, undoing those done if one fails.
    fn apply(&self, st: &mut State, steps: Vec<Step>) -> Result<(), BackendError> {
        let mut journal = Vec::with_capacity(steps.len());
        for s in steps {
            if let Err(e) = self.step(st, s, &mut journal) {
                self.rollback(st, journal);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The pieces of `mappings` over guest RAM (memory mappings) or the
    /// MMIO windows with host memory (`MAP_F_MMIO`), each checked against
    /// the container's page size, before any ioctl.
    fn pieces_of(
        &self,
        ram: &GuestRam,
        mmio: &[RamRegion],
        mappings: &[Mapping],
        min_page: u64,
    ) -> Result<Vec<DmaPiece>, BackendError> {
        let mut out = Vec::new();
        for m in mappings {
            for p in host_pieces(ram, mmio, m)? {
                check_alignment(&p, min_page)?;
                out.push(p);
            }
        }
        Ok(out)
    }

    fn detach_locked(
        &self,
        st: &mut State,
        ep: EndpointId,
        dom: DomainId,
    ) -> Result<(), BackendError> {
        let Some(e) = st.endpoints.get(&ep) else {
            return Err(BackendError::NotFound(format!("endpoint {ep}")));
        };
        if e.domain != Some(dom) {
            warn!("type1: detach of endpoint {ep} from domain {dom} it is not in");
        }
        let steps = e.mapped.values().map(|p| Step::Unmapped(ep, *p)).collect();
        self.apply(st, steps)?;
        if let Some(old) = st.endpoints.get_mut(&ep).and_then(|e| e.domain.take()) {
            leave_domain(st, ep, old);
        }
        Ok(())
    }
}

/// The host pieces of mapping `m`: over guest RAM for a memory mapping,
/// over the MMIO windows with host memory for `MAP_F_MMIO`.
fn host_pieces(
    ram: &GuestRam,
    mmio: &[RamRegion],
    m: &Mapping,
) -> Result<Vec<DmaPiece>, BackendError> {
    if m.flags & vmm_iommu::wire::VIRTIO_IOMMU_MAP_F_MMIO != 0 {
        mmio_pieces(mmio, m)
    } else {
        mapping_pieces(ram.regions(), m)
    }
}

/// Drops `ep` from `dom`'s record, and the record when it empties.
fn leave_domain(st: &mut State, ep: EndpointId, dom: DomainId) {
    if let Some(d) = st.domains.get_mut(&dom) {
        d.endpoints.remove(&ep);
        if d.endpoints.is_empty() {
            st.domains.remove(&dom);
        }
    }
}

impl Drop for Type1Backend {
    fn drop(&mut self) {
        let st = self.lock();
        for e in st.endpoints.values() {
            // Closing the container releases every mapping in it.
            self.host.close(e.container);
        }
    }
}

impl IommuBackend for Type1Backend {
    fn name(&self) -> &str {
        "vfio-type1"
    }

    /// The vIOMMU unplugged the endpoint (after detaching it): its
    /// container closes, as [`Type1Backend::remove_endpoint`] does. An
    /// endpoint this backend does not know is nothing to do.
    fn remove_endpoint(&self, ep: EndpointId) {
        match Type1Backend::remove_endpoint(self, ep) {
            Ok(()) | Err(BackendError::NotFound(_)) => {}
            Err(e) => error!("vfio-type1: unplugged endpoint {ep} not released: {e}"),
        }
    }

    fn caps(&self, ep: EndpointId) -> BackendCaps {
        match self.lock().endpoints.get(&ep) {
            Some(e) => e.info.caps(),
            None => BackendCaps::map_only(1 << 12, (0, u64::MAX)),
        }
    }

    fn attach(&self, ep: EndpointId, dom: &DomainView<'_>) -> Result<(), BackendError> {
        if dom.table.is_some() {
            return Err(BackendError::Unsupported(
                "nested tables need the iommufd backend".into(),
            ));
        }
        let mut st = self.lock();
        let Some(e) = st.endpoints.get(&ep) else {
            return Err(BackendError::NotFound(format!(
                "endpoint {ep} is not assigned"
            )));
        };
        let ram = self.ram.get();
        let new = if dom.bypass {
            let p = identity_pieces(ram.regions());
            for x in &p {
                check_alignment(x, e.info.min_page())?;
            }
            p
        } else {
            self.pieces_of(&ram, &st.mmio, dom.mappings, e.info.min_page())?
        };
        let mut steps: Vec<Step> = e.mapped.values().map(|p| Step::Unmapped(ep, *p)).collect();
        steps.extend(new.into_iter().map(|p| Step::Mapped(ep, p)));
        self.apply(&mut st, steps)?;
        if let Some(e) = st.endpoints.get_mut(&ep) {
            e.unattached_bypass = false;
        }
        if let Some(old) = st
            .endpoints
            .get_mut(&ep)
            .and_then(|e| e.domain.replace(dom.id))
        {
            leave_domain(&mut st, ep, old);
        }
        let d = st.domains.entry(dom.id).or_default();
        d.endpoints.insert(ep);
        d.bypass = dom.bypass;
        // The vIOMMU state is the authority on what the domain maps.
        d.mappings = dom.mappings.iter().map(|m| (m.start, *m)).collect();
        Ok(())
    }

    fn detach(&self, ep: EndpointId, dom: DomainId) -> Result<(), BackendError> {
        let mut st = self.lock();
        self.detach_locked(&mut st, ep, dom)
    }

    /// Bypass of an unattached endpoint is all guest RAM mapped one to one
    /// in its container (as a bypass domain); blocked is nothing mapped.
    fn set_unattached_bypass(&self, ep: EndpointId, bypass: bool) -> Result<(), BackendError> {
        let mut st = self.lock();
        let Some(e) = st.endpoints.get(&ep) else {
            return Err(BackendError::NotFound(format!(
                "endpoint {ep} is not assigned"
            )));
        };
        if let Some(dom) = e.domain {
            if bypass {
                return Err(BackendError::Invalid(format!(
                    "endpoint {ep} is attached to domain {dom}, not unattached"
                )));
            }
            // Blocking an endpoint whose detach failed: forget the domain.
            leave_domain(&mut st, ep, dom);
        }
        let Some(e) = st.endpoints.get_mut(&ep) else {
            return Ok(());
        };
        e.domain = None;
        let min_page = e.info.min_page();
        let mut steps: Vec<Step> = e.mapped.values().map(|p| Step::Unmapped(ep, *p)).collect();
        if bypass {
            let p = identity_pieces(self.ram.get().regions());
            for x in &p {
                check_alignment(x, min_page)?;
            }
            steps.extend(p.into_iter().map(|p| Step::Mapped(ep, p)));
        }
        self.apply(&mut st, steps)?;
        if let Some(e) = st.endpoints.get_mut(&ep) {
            e.unattached_bypass = bypass;
        }
        Ok(())
    }

    fn map(&self, dom: DomainId, m: &Mapping) -> Result<(), BackendError> {
        let mut st = self.lock();
        let Some(d) = st.domains.get(&dom) else {
            // No endpoint of this backend is in the domain: nothing to map
            // now; an attach replays the domain's mappings.
            return Ok(());
        };
        if d.bypass {
            return Err(BackendError::Invalid(format!("MAP on bypass domain {dom}")));
        }
        let mut steps = Vec::new();
        let ram = self.ram.get();
        for ep in &d.endpoints {
            let min_page = st.endpoints.get(ep).map_or(1 << 12, |e| e.info.min_page());
            for p in self.pieces_of(&ram, &st.mmio, std::slice::from_ref(m), min_page)? {
                steps.push(Step::Mapped(*ep, p));
            }
        }
        self.apply(&mut st, steps)?;
        if let Some(d) = st.domains.get_mut(&dom) {
            d.mappings.insert(m.start, *m);
        }
        Ok(())
    }

    fn unmap(&self, dom: DomainId, removed: &[Mapping]) -> Result<(), BackendError> {
        let mut st = self.lock();
        let Some(d) = st.domains.get(&dom) else {
            return Ok(());
        };
        let mut steps = Vec::new();
        for ep in &d.endpoints {
            let Some(e) = st.endpoints.get(ep) else {
                continue;
            };
            for m in removed {
                // What this container really maps in the mapping's IOVA
                // range (its pieces, as RAM and windows made them): a
                // mapping without access was never mapped.
                for p in e.mapped.range(m.start..=m.end).map(|(_, p)| *p) {
                    steps.push(Step::Unmapped(*ep, p));
                }
            }
        }
        self.apply(&mut st, steps)?;
        if let Some(d) = st.domains.get_mut(&dom) {
            for m in removed {
                d.mappings.remove(&m.start);
            }
        }
        Ok(())
    }

    fn bind_table(&self, _ep: EndpointId, _binding: &TableBinding) -> Result<(), BackendError> {
        Err(BackendError::Unsupported(
            "VFIO type1 has no nested translation; use the iommufd backend".into(),
        ))
    }

    fn unbind_table(&self, _ep: EndpointId, _dom: DomainId) -> Result<(), BackendError> {
        Err(BackendError::Unsupported(
            "VFIO type1 has no nested translation".into(),
        ))
    }

    fn invalidate(&self, _dom: DomainId, _batch: &[Invalidation]) -> Result<(), BackendError> {
        // MAP mode: the host kernel flushes its IOTLB on every UNMAP, and
        // there are no guest tables to cache.
        Ok(())
    }

    fn page_response(&self, resp: &PageResponse) -> Result<(), BackendError> {
        Err(BackendError::NotFound(format!(
            "no page request {} pending on endpoint {} (type1 reports none)",
            resp.grpid, resp.endpoint
        )))
    }

    fn drain_faults(&self, _out: &mut Vec<BackendFault>) {}

    fn add_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        self.plug_ram(change)
    }

    fn remove_ram(&self, change: &RamChange<'_>) -> Result<(), BackendError> {
        self.unplug_ram(change)
    }

    fn add_mmio_window(&self, window: &MmioWindow) -> Result<(), BackendError> {
        self.plug_window(window)
    }

    fn remove_mmio_window(&self, window: &MmioWindow) -> Result<(), BackendError> {
        self.unplug_window(window)
    }
}
