//! DMA behind the vIOMMU: an engine whose every access goes through
//! vm-memory's `IommuMemory`, as an emulated virtio device in a real VMM
//! would. A refused access is an error for the caller and a fault record
//! for the guest (queued by the vIOMMU).
//!
//! Device models reach memory through a [`DmaSpace`] that a [`DmaRouter`]
//! picks per (endpoint, PASID): untagged traffic of an endpoint in a MAP or
//! bypass domain goes through the vIOMMU state ([`EndpointRouter`]); with
//! the nested extension, traffic of an endpoint bound to a table domain —
//! with or without a PASID — goes through the guest's own stage-1 tables
//! in the software IOMMU ([`NestedRouter`], [`NestedSpace`]).

use std::sync::{Arc, Mutex};

use thiserror::Error;
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::emulated::{EmulatedIommu, NestedError, PageRequestState};
use vmm_iommu::nested::Access;
use vmm_iommu::EndpointIommu;
use vmm_iommu::Viommu;

/// Largest single DMA transfer, so a guest-programmed length cannot make
/// the engine allocate without bound.
pub const MAX_TRANSFER: usize = 1 << 20;

/// A failed DMA operation.
#[derive(Debug, Error)]
pub enum DmaError {
    /// The transfer length is zero or above [`MAX_TRANSFER`].
    #[error("transfer length {0} is outside 1..={MAX_TRANSFER}")]
    BadLength(usize),
    /// The vIOMMU refused the access (or it left guest memory).
    #[error("DMA {op} at IOVA {iova:#x} of {len} bytes refused: {source}")]
    Refused {
        /// "read" or "write".
        op: &'static str,
        /// The IOVA.
        iova: u64,
        /// The length.
        len: usize,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The guest's stage-1 tables refused the access (a fault record was
    /// queued for the guest by the software IOMMU).
    #[error("DMA {op} at IOVA {iova:#x} refused by the nested translation: {source}")]
    Nested {
        /// "read" or "write".
        op: &'static str,
        /// The first IOVA that did not translate.
        iova: u64,
        /// Why.
        #[source]
        source: NestedError,
    },
    /// The page at `iova` is not present and a page request (group
    /// `grpid`) went to the guest: the access may be retried once the
    /// guest answers it.
    #[error("DMA at IOVA {iova:#x} waits for page request {grpid}")]
    PageRequest {
        /// The IOVA of the missing page.
        iova: u64,
        /// The page-request group.
        grpid: u32,
    },
}

/// One emulated DMA-capable endpoint.
#[derive(Debug)]
pub struct DmaEngine {
    endpoint: u32,
    mem: IommuMemory<GuestMemoryMmap, EndpointIommu>,
}

impl DmaEngine {
    /// A DMA engine for `endpoint` over guest memory `mem`, translated by
    /// `viommu`.
    pub fn new(viommu: &Arc<Viommu>, endpoint: u32, mem: GuestMemoryMmap) -> Self {
        let iommu = viommu.endpoint_iommu(endpoint);
        DmaEngine {
            endpoint,
            mem: IommuMemory::new(mem, iommu, true, ()),
        }
    }

    /// The endpoint ID.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    fn check_len(len: usize) -> Result<(), DmaError> {
        if len == 0 || len > MAX_TRANSFER {
            return Err(DmaError::BadLength(len));
        }
        Ok(())
    }

    /// Reads `len` bytes at `iova`.
    pub fn read(&self, iova: u64, len: usize) -> Result<Vec<u8>, DmaError> {
        // Checked before the buffer is allocated.
        Self::check_len(len)?;
        let mut buf = vec![0u8; len];
        self.dma_read(iova, &mut buf)?;
        Ok(buf)
    }

    /// Writes `data` at `iova`.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        Self::check_len(data.len())?;
        self.mem
            .write_slice(data, GuestAddress(iova))
            .map_err(|source| DmaError::Refused {
                op: "write",
                iova,
                len: data.len(),
                source,
            })
    }

    /// Copies `len` bytes from `src` to `dst` (both IOVAs).
    pub fn copy(&self, src: u64, dst: u64, len: usize) -> Result<(), DmaError> {
        let data = self.read(src, len)?;
        self.write(dst, &data)
    }

    /// Fills `len` bytes at `dst` with `byte`.
    pub fn fill(&self, dst: u64, byte: u8, len: usize) -> Result<(), DmaError> {
        Self::check_len(len)?;
        self.write(dst, &vec![byte; len])
    }
}

/// An address space a DMA-capable device reaches memory through.
pub trait DmaSpace: Send + Sync {
    /// Reads `buf.len()` bytes at `addr`.
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    /// Writes `data` at `addr`.
    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError>;
}

impl DmaSpace for DmaEngine {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        Self::check_len(buf.len())?;
        let len = buf.len();
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|source| DmaError::Refused {
                op: "read",
                iova: addr,
                len,
                source,
            })
    }

    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.write(addr, data)
    }
}

/// Guest-physical memory without translation: a device that is not behind
/// the vIOMMU (`"iommu": false` in the config).
#[derive(Debug)]
pub struct PhysicalDma {
    mem: GuestMemoryMmap,
}

impl PhysicalDma {
    /// Direct access to `mem`.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        PhysicalDma { mem }
    }
}

impl DmaSpace for PhysicalDma {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        DmaEngine::check_len(buf.len())?;
        let len = buf.len();
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|source| DmaError::Refused {
                op: "read",
                iova: addr,
                len,
                source,
            })
    }

    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        DmaEngine::check_len(data.len())?;
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|source| DmaError::Refused {
                op: "write",
                iova: addr,
                len: data.len(),
                source,
            })
    }
}

/// Picks the address space of a transfer: one translator per (endpoint,
/// PASID). `None` means no translator serves that pair, and the device
/// refuses the transfer as malformed.
pub trait DmaRouter: Send {
    /// The space for traffic of `endpoint`, tagged with `pasid` if any.
    /// Called once per operation; the router may set the space up for the
    /// pair (hence `&mut`).
    fn route(&mut self, endpoint: u32, pasid: Option<u32>) -> Option<&dyn DmaSpace>;

    /// Where page request `grpid` of (`endpoint`, `pasid`) stands, for an
    /// operation waiting on it. Routers whose spaces send no page
    /// requests know none.
    fn page_request_state(
        &self,
        _endpoint: u32,
        _pasid: Option<u32>,
        _grpid: u32,
    ) -> PageRequestState {
        PageRequestState::Unknown
    }
}

/// MAP/UNMAP mode: untagged traffic of the endpoint goes through `space`;
/// PASID-tagged traffic has no translator (until nested translation
/// routes it to the guest's stage-1 tables).
pub struct EndpointRouter {
    endpoint: u32,
    space: Box<dyn DmaSpace>,
}

impl std::fmt::Debug for EndpointRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointRouter")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl EndpointRouter {
    /// Routes untagged traffic of `endpoint` to `space`.
    pub fn new(endpoint: u32, space: Box<dyn DmaSpace>) -> Self {
        EndpointRouter { endpoint, space }
    }
}

impl DmaRouter for EndpointRouter {
    fn route(&mut self, endpoint: u32, pasid: Option<u32>) -> Option<&dyn DmaSpace> {
        (endpoint == self.endpoint && pasid.is_none()).then_some(&*self.space)
    }
}

/// The software nested IOMMU of the VM, over its guest memory.
pub type Emulated = EmulatedIommu<GuestMemoryMmap>;

/// The address space of one (endpoint, PASID) of an endpoint bound to a
/// table domain: every page of a transfer is translated through the
/// guest's stage-1 tables (and the software IOMMU's caches) before any
/// byte moves, so a transfer that faults or waits for a page changes no
/// memory and can be retried whole.
pub struct NestedSpace {
    emu: Arc<Emulated>,
    mem: GuestMemoryMmap,
    endpoint: u32,
    pasid: Option<u32>,
    /// (guest-physical address, length) of each piece of the transfer in
    /// progress, reused across transfers so that a doorbell does not
    /// allocate once warm.
    pieces: Mutex<Vec<(u64, usize)>>,
}

impl std::fmt::Debug for NestedSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedSpace")
            .field("endpoint", &self.endpoint)
            .field("pasid", &self.pasid)
            .finish()
    }
}

impl NestedSpace {
    /// The space of `endpoint`'s traffic tagged with `pasid`, translated by
    /// `emu` over guest memory `mem`.
    pub fn new(
        emu: Arc<Emulated>,
        mem: GuestMemoryMmap,
        endpoint: u32,
        pasid: Option<u32>,
    ) -> Self {
        NestedSpace {
            emu,
            mem,
            endpoint,
            pasid,
            pieces: Mutex::new(Vec::new()),
        }
    }

    /// The PASID this space's traffic carries.
    pub fn pasid(&self) -> Option<u32> {
        self.pasid
    }

    /// Makes the space carry `pasid` from now on.
    pub fn set_pasid(&mut self, pasid: Option<u32>) {
        self.pasid = pasid;
    }

    /// Translates `[iova, iova + len)` for a read or a `write`, page by
    /// page, into `out`, merging physically contiguous pages.
    fn translate(
        &self,
        write: bool,
        iova: u64,
        len: usize,
        out: &mut Vec<(u64, usize)>,
    ) -> Result<(), DmaError> {
        DmaEngine::check_len(len)?;
        out.clear();
        let (access, op) = if write {
            (Access::WRITE, "write")
        } else {
            (Access::READ, "read")
        };
        let mut done = 0usize;
        while done < len {
            // The device checked that the range does not wrap; a bad caller
            // gets an error, not an overflow.
            let cur = iova
                .checked_add(done as u64)
                .ok_or(DmaError::BadLength(len))?;
            let t = self
                .emu
                .translate(self.endpoint, self.pasid, cur, access)
                .map_err(|e| match e {
                    NestedError::PageRequest { grpid } => {
                        DmaError::PageRequest { iova: cur, grpid }
                    }
                    source => DmaError::Nested {
                        op,
                        iova: cur,
                        source,
                    },
                })?;
            // Bytes left in this page: page_last - cur + 1, at least 1.
            let in_page = t.page_last.saturating_sub(cur).saturating_add(1);
            let n = usize::try_from(in_page).map_or(len - done, |p| p.min(len - done));
            match out.last_mut() {
                Some((gpa, l)) if gpa.checked_add(*l as u64) == Some(t.gpa) => *l += n,
                _ => out.push((t.gpa, n)),
            }
            done += n;
        }
        Ok(())
    }

    fn lock_pieces(&self) -> std::sync::MutexGuard<'_, Vec<(u64, usize)>> {
        // A panic cannot leave the scratch list invalid: it is cleared
        // before every use.
        self.pieces.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DmaSpace for NestedSpace {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let mut pieces = self.lock_pieces();
        self.translate(false, addr, buf.len(), &mut pieces)?;
        let mut at = 0usize;
        for &(gpa, n) in pieces.iter() {
            self.mem
                .read_slice(&mut buf[at..at + n], GuestAddress(gpa))
                .map_err(|source| DmaError::Refused {
                    op: "read",
                    iova: addr + at as u64,
                    len: n,
                    source,
                })?;
            at += n;
        }
        Ok(())
    }

    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        let mut pieces = self.lock_pieces();
        self.translate(true, addr, data.len(), &mut pieces)?;
        let mut at = 0usize;
        for &(gpa, n) in pieces.iter() {
            self.mem
                .write_slice(&data[at..at + n], GuestAddress(gpa))
                .map_err(|source| DmaError::Refused {
                    op: "write",
                    iova: addr + at as u64,
                    len: n,
                    source,
                })?;
            at += n;
        }
        Ok(())
    }
}

/// The router of an endpoint behind a vIOMMU with the nested extension:
/// while the endpoint is bound to a table domain, all its traffic (with or
/// without a PASID; without one it is VT-d's RID_PASID or SMMUv3's S1DSS
/// choice) goes through the guest's tables; otherwise untagged traffic
/// goes through `map_mode` (MAP or bypass domain, or no domain), and
/// PASID-tagged traffic has no translator.
pub struct NestedRouter {
    endpoint: u32,
    map_mode: Box<dyn DmaSpace>,
    nested: NestedSpace,
}

impl std::fmt::Debug for NestedRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedRouter")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl NestedRouter {
    /// Routes `endpoint`'s traffic through `emu` while it is bound to a
    /// table domain, through `map_mode` otherwise.
    pub fn new(
        endpoint: u32,
        map_mode: Box<dyn DmaSpace>,
        emu: Arc<Emulated>,
        mem: GuestMemoryMmap,
    ) -> Self {
        NestedRouter {
            endpoint,
            map_mode,
            nested: NestedSpace::new(emu, mem, endpoint, None),
        }
    }
}

impl DmaRouter for NestedRouter {
    fn route(&mut self, endpoint: u32, pasid: Option<u32>) -> Option<&dyn DmaSpace> {
        if endpoint != self.endpoint {
            return None;
        }
        if self.nested.emu.binding(endpoint).is_some() {
            self.nested.set_pasid(pasid);
            return Some(&self.nested);
        }
        pasid.is_none().then_some(&*self.map_mode)
    }

    fn page_request_state(
        &self,
        endpoint: u32,
        pasid: Option<u32>,
        grpid: u32,
    ) -> PageRequestState {
        self.nested.emu.page_request_state(endpoint, pasid, grpid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_iommu::backend::{IommuBackend, TableBinding};
    use vmm_iommu::nested::build::{TableAlloc, X86TableBuilder};
    use vmm_iommu::nested::Perm;
    use vmm_iommu::wire::TableDesc;
    use vmm_iommu::FaultQueue;

    const EP: u32 = 8;

    /// 4 MiB of RAM, an emulated IOMMU with `EP` bound to an x86-64 table
    /// mapping IOVA 0x10_0000 → 0x20_0000 (one page), and a router whose
    /// MAP-mode space refuses everything.
    fn setup() -> (NestedRouter, GuestMemoryMmap, Arc<Emulated>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut a = TableAlloc::new(&mem, 0x30_0000, 4 << 20);
        let t = X86TableBuilder::new(&mut a, 4).unwrap();
        t.map(&mut a, 0x10_0000, 0x20_0000, 12, Perm::RW_USER)
            .unwrap();
        let faults = Arc::new(FaultQueue::new(16).unwrap());
        let emu = Arc::new(Emulated::new(mem.clone(), faults, 8, &[]));
        emu.bind_table(
            EP,
            &TableBinding {
                domain: 1,
                table: TableDesc::X86_64 {
                    levels: 4,
                    root: t.root(),
                },
            },
        )
        .unwrap();
        let refuse = Box::new(PhysicalDma::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000_0000), 0x1000)]).unwrap(),
        ));
        let r = NestedRouter::new(EP, refuse, emu.clone(), mem.clone());
        (r, mem, emu)
    }

    #[test]
    fn bound_endpoint_translates_through_the_guest_tables() {
        let (mut r, mem, _) = setup();
        let space = r.route(EP, None).expect("bound: nested space");
        space.dma_write(0x10_0ffc, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(0x20_0ffc)).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(r.route(EP + 1, None).is_none(), "another endpoint");
    }

    #[test]
    fn a_transfer_that_faults_on_a_later_page_writes_nothing() {
        let (mut r, mem, emu) = setup();
        let space = r.route(EP, None).unwrap();
        // The second page (0x10_1000) is not mapped.
        let e = space.dma_write(0x10_0ff0, &[0xaa; 32]).unwrap_err();
        assert!(
            matches!(
                e,
                DmaError::Nested {
                    iova: 0x10_1000,
                    ..
                }
            ),
            "{e}"
        );
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, GuestAddress(0x20_0ff0)).unwrap();
        assert_eq!(b, [0; 16], "nothing written before the fault");
        assert_eq!(
            emu.stats.faults.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn unbound_endpoint_has_no_pasid_translator() {
        let (mut r, _, emu) = setup();
        emu.unbind_table(EP, 1).unwrap();
        assert!(r.route(EP, Some(3)).is_none());
        assert!(r.route(EP, None).is_some(), "MAP-mode space");
    }
}
