//! DMA behind the vIOMMU: an engine whose every access goes through
//! vm-memory's `IommuMemory`, as an emulated virtio device in a real VMM
//! would. A refused access is an error for the caller and a fault record
//! for the guest (queued by the vIOMMU).
//!
//! Device models reach memory through a [`DmaSpace`] that a [`DmaRouter`]
//! picks per (endpoint, PASID): today untagged traffic goes through the
//! endpoint's domain ([`EndpointRouter`]); a nested translator for
//! PASID-tagged traffic plugs in as another router.

use std::sync::Arc;

use thiserror::Error;
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_iommu::translate::EndpointIommu;
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
    fn route(&self, endpoint: u32, pasid: Option<u32>) -> Option<&dyn DmaSpace>;
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
    fn route(&self, endpoint: u32, pasid: Option<u32>) -> Option<&dyn DmaSpace> {
        (endpoint == self.endpoint && pasid.is_none()).then_some(&*self.space)
    }
}
