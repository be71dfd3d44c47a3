//! The memory view of the Linux guest's virtio devices (virtio-blk,
//! virtio-rng): where their DMA goes. A device behind the vIOMMU reaches
//! guest memory through vm-memory's `IommuMemory` over its endpoint's
//! [`EndpointIommu`]; whether translation is on is decided once per
//! activation from the features the driver accepted (virtio 1.3 6:
//! `VIRTIO_F_ACCESS_PLATFORM`), and then holds for every access — the
//! descriptor table, both rings and the buffers.
//!
//! The buffers' bytes (a block request's data, the entropy) are copied
//! through the endpoint's `vmm_iommu::DmaMemory` instead, when translated:
//! the same translation and faults with an IOTLB of its own and no lock,
//! so vm-memory's interface carries the rings and the fast path the bulk.
//!
//! This module owns that choice, the walk from a queue's available ring to
//! each chain's buffers ([`available_chains`], [`chain_buffers`]) and the
//! byte-stream view of those buffers ([`Segment`]); it never decides what a
//! refused access means for a request (the device models do) and never
//! queues fault records (the vIOMMU does, inside `EndpointIommu`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLockReadGuard};

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::iommu::{Error as IommuError, IotlbIterator, IovaRange};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Iommu, IommuMemory, Iotlb, Permissions};
use vmm_iommu::wire::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use vmm_iommu::{DmaMemory as FastDma, EndpointIommu};

/// `VIRTIO_F_VERSION_1` as a feature mask.
pub const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
/// `VIRTIO_F_ACCESS_PLATFORM` as a feature mask.
pub const F_ACCESS_PLATFORM: u64 = 1 << VIRTIO_F_ACCESS_PLATFORM;

/// Bytes the stray-read test hook reads.
const STRAY_READ_LEN: usize = 4;

/// The guest memory type device models hand to virtio-queue: translated or
/// not, it is the same type, so queue code is written once.
pub type DmaGuestMemory = IommuMemory<GuestMemoryMmap, DeviceIommu>;

/// A refused device access.
#[derive(Debug, Error)]
pub enum DmaError {
    /// The device is not behind the vIOMMU, so there is no IOVA space to
    /// read from.
    #[error("the device is not behind the vIOMMU")]
    NoIommu,
    /// The device has not been activated by its driver yet.
    #[error("the device is not activated")]
    NotActivated,
    /// A transfer would leave the chain's buffers (a device-model bug or
    /// a length the caller did not check).
    #[error("{op} of {len} bytes at offset {offset} leaves the {total}-byte buffers")]
    OutOfBuffers {
        /// "read" or "write".
        op: &'static str,
        /// Offset in the buffers' byte stream.
        offset: u64,
        /// Length of the transfer.
        len: usize,
        /// Total length of the buffers.
        total: u64,
    },
    /// The vIOMMU refused the access, or it left guest memory.
    #[error("DMA {op} of {len} bytes at {addr:#x} refused after {done} bytes: {source}")]
    Access {
        /// "read" or "write".
        op: &'static str,
        /// The address (an IOVA when translated) of the refused segment.
        addr: u64,
        /// The length of the refused segment part.
        len: usize,
        /// Bytes of the transfer completed before the refused segment.
        done: usize,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

impl DmaError {
    /// Bytes of the transfer that completed before it failed.
    pub fn done(&self) -> usize {
        match self {
            DmaError::Access { done, .. } => *done,
            _ => 0,
        }
    }
}

/// vm-memory's [`Iommu`] for one device: its endpoint's [`EndpointIommu`]
/// (if it is behind the vIOMMU) with a count of refused translations, so
/// that a refusal virtio-queue swallows (a descriptor it cannot read ends
/// the chain silently) is still seen by the device model.
#[derive(Clone, Debug)]
pub struct DeviceIommu {
    endpoint: Option<Arc<EndpointIommu>>,
    refused: Arc<AtomicU64>,
}

impl Iommu for DeviceIommu {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let Some(ep) = &self.endpoint else {
            // Only reached if translation were on without an endpoint,
            // which `DmaPath::memory` never builds.
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(IommuError::CannotResolve {
                iova_range: IovaRange { base: iova, length },
                reason: "device is not behind the vIOMMU".to_string(),
            });
        };
        ep.translate(iova, length, access).inspect_err(|_| {
            self.refused.fetch_add(1, Ordering::Relaxed);
        })
    }
}

/// Where a device's DMA goes: straight to guest-physical memory, or
/// through one vIOMMU endpoint. The VMM builds one per device.
#[derive(Clone, Debug)]
pub struct DmaPath {
    iommu: DeviceIommu,
}

impl DmaPath {
    /// Behind the vIOMMU with `iommu`, or direct without.
    pub fn new(iommu: Option<EndpointIommu>) -> Self {
        match iommu {
            Some(ep) => Self::behind_iommu(ep),
            None => Self::direct(),
        }
    }

    /// A device not behind the vIOMMU: it offers no
    /// `VIRTIO_F_ACCESS_PLATFORM` and addresses guest-physical memory.
    pub fn direct() -> Self {
        DmaPath {
            iommu: DeviceIommu {
                endpoint: None,
                refused: Arc::new(AtomicU64::new(0)),
            },
        }
    }

    /// A device behind the vIOMMU as `endpoint` (from
    /// `viommu.endpoint_iommu(endpoint_id)`): it offers
    /// `VIRTIO_F_ACCESS_PLATFORM`.
    pub fn behind_iommu(endpoint: EndpointIommu) -> Self {
        DmaPath {
            iommu: DeviceIommu {
                endpoint: Some(Arc::new(endpoint)),
                refused: Arc::new(AtomicU64::new(0)),
            },
        }
    }

    /// The vIOMMU endpoint ID, if the device is behind the vIOMMU.
    pub fn endpoint(&self) -> Option<u32> {
        self.iommu.endpoint.as_ref().map(|e| e.endpoint())
    }

    /// The transport features this path adds to the device's offer:
    /// `VIRTIO_F_ACCESS_PLATFORM` when behind the vIOMMU.
    pub fn features(&self) -> u64 {
        if self.iommu.endpoint.is_some() {
            F_ACCESS_PLATFORM
        } else {
            0
        }
    }

    /// The memory view for an activation with the driver's accepted
    /// features `acked`: translated if and only if the device is behind
    /// the vIOMMU and the driver accepted `VIRTIO_F_ACCESS_PLATFORM`.
    pub fn memory(&self, mem: &GuestMemoryMmap, acked: u64) -> DmaMemory {
        // virtio 1.3 6: without ACCESS_PLATFORM "the device has same
        // access to memory addresses supplied to it as the driver has",
        // i.e. the addresses are guest-physical.
        let translate = self.iommu.endpoint.is_some() && acked & F_ACCESS_PLATFORM != 0;
        let fast = match &self.iommu.endpoint {
            Some(ep) if translate => Some(ep.dma_memory(mem.clone())),
            _ => None,
        };
        DmaMemory {
            mem: IommuMemory::new(mem.clone(), self.iommu.clone(), translate, ()),
            fast,
        }
    }

    /// Translations the vIOMMU refused for this device so far.
    pub fn refusals(&self) -> u64 {
        self.iommu.refused.load(Ordering::Relaxed)
    }
}

/// One guest buffer of a descriptor chain: its address (an IOVA when
/// translated) and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Total length of `segs`; cannot overflow (each is below 2^32 and a
/// device never holds 2^32 of them).
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// A device's memory for one activation.
#[derive(Clone, Debug)]
pub struct DmaMemory {
    mem: DmaGuestMemory,
    /// The buffers' path when translated (see the module documentation).
    /// Its IOTLB is built once per activation: a clone starts empty, so
    /// device models borrow this memory rather than clone it per pass.
    fast: Option<FastDma<GuestMemoryMmap>>,
}

impl DmaMemory {
    /// The memory to hand to virtio-queue (rings and descriptors).
    pub fn memory(&self) -> &DmaGuestMemory {
        &self.mem
    }

    /// Whether accesses are translated by the vIOMMU.
    pub fn translated(&self) -> bool {
        self.mem.get_iommu_enabled()
    }

    /// Translations the vIOMMU refused for this device so far (shared by
    /// every activation of the device).
    pub fn refusals(&self) -> u64 {
        self.mem.iommu().refused.load(Ordering::Relaxed)
    }

    /// Counts a refusal on the buffers' path, as `DeviceIommu` counts
    /// those of the rings' (an address that translates but is not RAM is
    /// no refusal).
    fn count_refusal(&self, e: &vm_memory::GuestMemoryError) {
        if matches!(e, vm_memory::GuestMemoryError::IommuError(_)) {
            self.mem.iommu().refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Test hook: reads 4 bytes at `iova` through the endpoint's
    /// translation, whatever the driver negotiated, so the VMM can provoke
    /// a fault record. Fails with [`DmaError::NoIommu`] for a device not
    /// behind the vIOMMU.
    pub fn stray_read(&self, iova: u64) -> Result<(), DmaError> {
        if self.mem.iommu().endpoint.is_none() {
            return Err(DmaError::NoIommu);
        }
        let view = IommuMemory::new(
            self.mem.get_backend().clone(),
            self.mem.iommu().as_ref().clone(),
            true,
            (),
        );
        let mut b = [0u8; STRAY_READ_LEN];
        view.read_slice(&mut b, GuestAddress(iova))
            .map_err(|source| DmaError::Access {
                op: "read",
                addr: iova,
                len: STRAY_READ_LEN,
                done: 0,
                source,
            })
    }

    /// Reads `buf.len()` bytes at `offset` of the byte stream `segs` (a
    /// chain's buffers, concatenated): a header may span descriptors.
    pub fn read_from(&self, segs: &[Segment], offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let mut done = 0;
        let pieces = Self::pieces(segs, offset, buf.len(), "read")?;
        self.prefetch(&pieces);
        for (addr, range) in pieces {
            let part = &mut buf[range];
            let res = match &self.fast {
                Some(f) => f
                    .read_slice(part, GuestAddress(addr))
                    .inspect_err(|e| self.count_refusal(e)),
                None => self.mem.read_slice(part, GuestAddress(addr)),
            };
            res.map_err(|source| DmaError::Access {
                op: "read",
                addr,
                len: part.len(),
                done,
                source,
            })?;
            done += part.len();
        }
        Ok(())
    }

    /// Writes `data` at `offset` of the byte stream `segs`. On failure the
    /// error says how many bytes were written before it ([`DmaError::done`]).
    pub fn write_to(&self, segs: &[Segment], offset: u64, data: &[u8]) -> Result<(), DmaError> {
        let mut done = 0;
        let pieces = Self::pieces(segs, offset, data.len(), "write")?;
        self.prefetch(&pieces);
        for (addr, range) in pieces {
            let part = &data[range];
            let res = match &self.fast {
                Some(f) => f
                    .write_slice(part, GuestAddress(addr))
                    .inspect_err(|e| self.count_refusal(e)),
                None => self.mem.write_slice(part, GuestAddress(addr)),
            };
            res.map_err(|source| DmaError::Access {
                op: "write",
                addr,
                len: part.len(),
                done,
                source,
            })?;
            done += part.len();
        }
        Ok(())
    }

    /// Tells the buffers' path every address a copy is about to reach, so
    /// that their translations load while the first piece is copied
    /// ([`FastDma::prefetch`]: a hint, it checks and changes nothing).
    fn prefetch(&self, pieces: &[(u64, std::ops::Range<usize>)]) {
        if let Some(f) = &self.fast {
            for (addr, _) in pieces {
                f.prefetch(GuestAddress(*addr));
            }
        }
    }

    /// Splits `[offset, offset + len)` of the stream into (address, range
    /// of the caller's buffer) per segment.
    fn pieces(
        segs: &[Segment],
        offset: u64,
        len: usize,
        op: &'static str,
    ) -> Result<Vec<(u64, std::ops::Range<usize>)>, DmaError> {
        let total = total_len(segs);
        let out_of_buffers = DmaError::OutOfBuffers {
            op,
            offset,
            len,
            total,
        };
        // Inclusive-end-free form: `offset + len` may not fit in u64.
        if offset > total || (len as u64) > total - offset {
            return Err(out_of_buffers);
        }
        let mut out = Vec::new();
        let mut skip = offset;
        let mut pos = 0usize;
        for s in segs {
            if pos == len {
                break;
            }
            let seg_len = u64::from(s.len);
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            // Both fit: `seg_len - skip` is below 2^32 and `len - pos`
            // is a buffer length.
            let n = (seg_len - skip).min((len - pos) as u64) as usize;
            // A segment that wraps the address space is refused here
            // rather than handed to vm-memory.
            let Some(addr) = s.addr.checked_add(skip) else {
                return Err(DmaError::Access {
                    op,
                    addr: s.addr,
                    len: n,
                    done: pos,
                    source: vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(s.addr)),
                });
            };
            out.push((addr, pos..pos + n));
            pos += n;
            skip = 0;
        }
        Ok(out)
    }
}

/// What a pass over the available ring found.
#[derive(Debug)]
pub struct Available<'a> {
    /// The chains published when the pass began, in ring order.
    pub chains: Vec<DescriptorChain<&'a DmaGuestMemory>>,
    /// Whether reading the available ring was refused part-way (or at the
    /// index): the pass stops there.
    pub ring_refused: bool,
}

/// The chains the driver published up to now (one snapshot of the avail
/// index, so a pass is bounded by the queue size however fast the driver
/// adds more; those come with their own notification). A refused ring
/// access ends the snapshot early and is reported, not an error; an avail
/// index the queue refuses (more than the queue size ahead) is an error.
pub fn available_chains<'a>(
    queue: &mut Queue,
    mem: &'a DmaGuestMemory,
) -> Result<Available<'a>, virtio_queue::Error> {
    let avail = match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(i) => i,
        Err(virtio_queue::Error::GuestMemory(_)) => {
            return Ok(Available {
                chains: Vec::new(),
                ring_refused: true,
            })
        }
        Err(e) => return Err(e),
    };
    let pending = usize::from(avail.0.wrapping_sub(queue.next_avail()));
    let chains: Vec<_> = match queue.iter(mem) {
        Ok(it) => it.collect(),
        Err(virtio_queue::Error::GuestMemory(_)) => Vec::new(),
        Err(e) => return Err(e),
    };
    // virtio-queue ends the iteration silently when a ring entry cannot be
    // read; fewer chains than the index promised means exactly that.
    let ring_refused = chains.len() < pending;
    Ok(Available {
        chains,
        ring_refused,
    })
}

/// A chain's buffers, split by direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainBuffers {
    /// Device-readable buffers, in chain order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in chain order.
    pub writable: Vec<Segment>,
    /// Whether every device-readable buffer came before every
    /// device-writable one (virtio 1.3 2.7.4.2: "The driver MUST place
    /// any device-writable descriptor elements after any device-readable
    /// descriptor elements").
    pub ordered: bool,
}

/// Why a chain's descriptors cannot be used at all.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// Not even the head descriptor could be read (refused, outside
    /// memory, or a head index beyond the queue).
    #[error("chain head {0}: descriptor unreadable")]
    Unreadable(u16),
    /// The chain ended on a descriptor that still has NEXT: the next one
    /// could not be read, its index is beyond the queue, the chain loops
    /// past the queue size, or it is longer than 2^32 bytes.
    #[error("chain head {0}: truncated (unreadable, looping or oversized descriptors)")]
    Truncated(u16),
    /// More descriptors than the device accepts per chain.
    #[error("chain head {head}: more than {max} descriptors")]
    TooManyDescriptors {
        /// The head index.
        head: u16,
        /// The bound.
        max: usize,
    },
}

/// Walks `chain` into its buffers, refusing chains of more than
/// `max_descs` descriptors: an indirect table (which virtio-queue follows
/// even though these devices do not offer it) could otherwise hold 2^28
/// of them.
pub fn chain_buffers(
    chain: DescriptorChain<&DmaGuestMemory>,
    max_descs: usize,
) -> Result<ChainBuffers, ChainError> {
    let head = chain.head_index();
    let mut out = ChainBuffers {
        ordered: true,
        ..Default::default()
    };
    let mut last_has_next = false;
    let mut n = 0usize;
    for desc in chain {
        n += 1;
        if n > max_descs {
            return Err(ChainError::TooManyDescriptors {
                head,
                max: max_descs,
            });
        }
        last_has_next = desc.has_next();
        let seg = Segment {
            addr: desc.addr().0,
            len: desc.len(),
        };
        if desc.is_write_only() {
            out.writable.push(seg);
        } else {
            if !out.writable.is_empty() {
                out.ordered = false;
            }
            out.readable.push(seg);
        }
    }
    if n == 0 {
        return Err(ChainError::Unreadable(head));
    }
    if last_has_next {
        return Err(ChainError::Truncated(head));
    }
    Ok(out)
}

/// Shared test set-up: guest RAM, a vIOMMU with the device's endpoint
/// attached to a domain whose one mapping puts IOVAs far from their GPAs,
/// and the driver's view of memory.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vmm_iommu::config::IommuConfig;
    use vmm_iommu::wire::{
        AttachReq, MapReq, Request, VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_IOMMU_MAP_F_READ,
        VIRTIO_IOMMU_MAP_F_WRITE,
    };
    use vmm_iommu::Viommu;

    /// The device's endpoint ID.
    pub const EP: u32 = 3;
    /// Guest RAM size.
    const RAM: u64 = 4 << 20;
    /// GPA of the test window (rings and buffers).
    pub const WINDOW_GPA: u64 = 0x10_0000;
    /// IOVA of the test window when translated: above RAM, so an
    /// untranslated access to it would fail.
    pub const WINDOW_IOVA: u64 = 0x8000_0000;
    /// Length of the window (mapped read-write).
    pub const WINDOW_LEN: u64 = 2 << 20;
    /// An address no access may reach: unmapped as an IOVA, outside RAM
    /// as a GPA.
    pub const UNMAPPED: u64 = 0x9000_0000;
    /// An IOVA page mapped read-only (onto the window's last page).
    pub const READ_ONLY_IOVA: u64 = 0xa000_0000;

    /// One test's memory and (when translated) vIOMMU.
    pub struct Rig {
        pub mem: GuestMemoryMmap,
        pub viommu: Option<Arc<Viommu>>,
        /// The driver's view: addresses as the driver gives them.
        pub driver: DmaMemory,
    }

    impl Rig {
        /// No vIOMMU: addresses are GPAs.
        pub fn direct() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
            let driver = DmaPath::direct().memory(&mem, F_VERSION_1);
            Rig {
                mem,
                viommu: None,
                driver,
            }
        }

        /// The endpoint in domain 1: the window at `WINDOW_IOVA` (RW) and
        /// one page at `READ_ONLY_IOVA` (read-only, onto the window's
        /// last page).
        pub fn translated() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
            let viommu =
                Arc::new(Viommu::new(&IommuConfig::default(), &[EP], &[(0, RAM - 1)]).unwrap());
            viommu.set_acked_features(F_VERSION_1 | 1 << VIRTIO_IOMMU_F_MAP_UNMAP);
            viommu
                .apply(&Request::Attach(AttachReq {
                    domain: 1,
                    endpoint: EP,
                    flags: 0,
                    reserved: [0; 4],
                }))
                .unwrap();
            let map = |virt_start: u64, len: u64, phys_start: u64, flags: u32| {
                viommu
                    .apply(&Request::Map(MapReq {
                        domain: 1,
                        virt_start,
                        virt_end: virt_start + len - 1,
                        phys_start,
                        flags,
                    }))
                    .unwrap();
            };
            let rw = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
            map(WINDOW_IOVA, WINDOW_LEN, WINDOW_GPA, rw);
            map(
                READ_ONLY_IOVA,
                0x1000,
                WINDOW_GPA + WINDOW_LEN - 0x1000,
                VIRTIO_IOMMU_MAP_F_READ,
            );
            // The driver's view is a second endpoint IOMMU, so that its
            // accesses do not count as the device's.
            let driver = DmaPath::behind_iommu(viommu.endpoint_iommu(EP))
                .memory(&mem, F_VERSION_1 | F_ACCESS_PLATFORM);
            Rig {
                mem,
                viommu: Some(viommu),
                driver,
            }
        }

        /// Both set-ups, for tests that must hold with translation off
        /// and on.
        pub fn both() -> [Rig; 2] {
            [Rig::direct(), Rig::translated()]
        }

        /// The device's DMA path.
        pub fn device_path(&self) -> DmaPath {
            match &self.viommu {
                Some(v) => DmaPath::behind_iommu(v.endpoint_iommu(EP)),
                None => DmaPath::direct(),
            }
        }

        /// The driver address of window offset `off`.
        pub fn addr(&self, off: u64) -> u64 {
            if self.viommu.is_some() {
                WINDOW_IOVA + off
            } else {
                WINDOW_GPA + off
            }
        }

        /// Reads guest-physical memory at window offset `off`.
        pub fn read_gpa(&self, off: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0u8; len];
            self.mem
                .read_slice(&mut b, GuestAddress(WINDOW_GPA + off))
                .unwrap();
            b
        }

        /// Writes guest-physical memory at window offset `off`.
        pub fn write_gpa(&self, off: u64, data: &[u8]) {
            self.mem
                .write_slice(data, GuestAddress(WINDOW_GPA + off))
                .unwrap();
        }

        /// Fault records the vIOMMU queued (0 without one).
        pub fn faults(&self) -> usize {
            self.viommu.as_ref().map_or(0, |v| v.faults().len())
        }

        /// A 16-entry split queue with its rings at window offset 0.
        pub fn queue(&self) -> MockSplitQueue<'_, DmaGuestMemory> {
            MockSplitQueue::create(self.driver.memory(), GuestAddress(self.addr(0)), 16)
        }
    }

    /// The device-side queue for `vq`.
    pub fn device_queue(vq: &MockSplitQueue<'_, DmaGuestMemory>) -> Queue {
        vq.create_queue().unwrap()
    }

    /// Publishes one chain at descriptor `first`: (address, length,
    /// device-writable) per descriptor, linked in order.
    pub fn add_chain(
        vq: &MockSplitQueue<'_, DmaGuestMemory>,
        first: u16,
        descs: &[(u64, u32, bool)],
    ) {
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        let n = descs.len();
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < n {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, first + i as u16 + 1))
            })
            .collect();
        vq.add_desc_chains(&raw, first).unwrap();
    }

    /// The used-ring entries so far: (head, length).
    pub fn used(vq: &MockSplitQueue<'_, DmaGuestMemory>) -> Vec<(u16, u32)> {
        let n = vq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = vq.used().ring().ref_at(usize::from(i)).unwrap().load();
                (e.id() as u16, e.len())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn direct_path_offers_nothing_and_never_translates() {
        let rig = Rig::direct();
        let p = DmaPath::direct();
        assert_eq!(p.features(), 0);
        assert!(!p
            .memory(&rig.mem, F_VERSION_1 | F_ACCESS_PLATFORM)
            .translated());
        assert!(matches!(
            p.memory(&rig.mem, 0).stray_read(0),
            Err(DmaError::NoIommu)
        ));
    }

    #[test]
    fn iommu_path_translates_only_when_access_platform_was_accepted() {
        let rig = Rig::translated();
        let p = rig.device_path();
        assert_eq!(p.features(), F_ACCESS_PLATFORM);
        assert_eq!(p.endpoint(), Some(EP));
        assert!(p
            .memory(&rig.mem, F_VERSION_1 | F_ACCESS_PLATFORM)
            .translated());
        assert!(!p.memory(&rig.mem, F_VERSION_1).translated());
    }

    #[test]
    fn stream_read_spans_segments_through_the_iommu() {
        let rig = Rig::translated();
        let m = rig.device_path().memory(&rig.mem, F_ACCESS_PLATFORM);
        rig.write_gpa(0x1000, &[1, 2, 3]);
        rig.write_gpa(0x2000, &[4, 5, 6]);
        let segs = [
            Segment {
                addr: rig.addr(0x1000),
                len: 3,
            },
            Segment {
                addr: rig.addr(0x2000),
                len: 3,
            },
        ];
        let mut b = [0u8; 4];
        m.read_from(&segs, 1, &mut b).unwrap();
        assert_eq!(b, [2, 3, 4, 5]);
        assert!(matches!(
            m.read_from(&segs, 3, &mut b),
            Err(DmaError::OutOfBuffers { .. })
        ));
    }

    #[test]
    fn stream_write_reports_bytes_done_before_a_refused_segment() {
        let rig = Rig::translated();
        let m = rig.device_path().memory(&rig.mem, F_ACCESS_PLATFORM);
        let segs = [
            Segment {
                addr: rig.addr(0x1000),
                len: 2,
            },
            Segment {
                addr: UNMAPPED,
                len: 2,
            },
        ];
        let e = m.write_to(&segs, 0, &[9; 4]).unwrap_err();
        assert_eq!(e.done(), 2);
        assert_eq!(rig.read_gpa(0x1000, 2), [9, 9]);
        assert_eq!(m.refusals(), 1);
        assert_eq!(rig.faults(), 1);
    }

    #[test]
    fn stray_read_of_an_unmapped_iova_queues_a_fault_record() {
        let rig = Rig::translated();
        // Translation off for the device's queues: the hook still
        // translates.
        let m = rig.device_path().memory(&rig.mem, F_VERSION_1);
        m.stray_read(rig.addr(0)).unwrap();
        assert_eq!(rig.faults(), 0);
        assert!(matches!(
            m.stray_read(UNMAPPED),
            Err(DmaError::Access { addr: UNMAPPED, .. })
        ));
        let rec = rig.viommu.as_ref().unwrap().faults().pop().unwrap();
        assert_eq!((rec.endpoint, rec.address), (EP, UNMAPPED));
    }

    #[test]
    fn segment_wrapping_the_address_space_is_refused() {
        let rig = Rig::direct();
        let m = DmaPath::direct().memory(&rig.mem, 0);
        let segs = [Segment {
            addr: u64::MAX,
            len: 4,
        }];
        let mut b = [0u8; 2];
        assert!(m.read_from(&segs, 2, &mut b).is_err());
    }
}

/// A single-queue device's running state: its memory view, its queue and
/// its interrupt, from the driver's DRIVER_OK on.
pub struct ActiveQueue {
    /// The memory view the driver's features chose.
    pub mem: DmaMemory,
    /// The one queue.
    pub queue: Queue,
    /// The interrupt to raise after a batch.
    pub interrupt: Arc<dyn vmm_iommu::VirtioInterrupt>,
}

impl ActiveQueue {
    /// Starts a single-queue device on the queues the driver set up:
    /// its memory view from `acked`, queue 0 checked where it can be.
    pub fn activate(
        dma: &DmaPath,
        mem: &GuestMemoryMmap,
        acked: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn vmm_iommu::VirtioInterrupt>,
    ) -> Result<Self, vmm_iommu::DeviceError> {
        let Some(queue) = queues.into_iter().next() else {
            return Err(vmm_iommu::DeviceError::InvalidQueue(0));
        };
        let mem = dma.memory(mem, acked);
        // Untranslated rings can be checked now. Translated ones are not:
        // a check would translate (and fault) on the driver's behalf, and
        // a ring the vIOMMU refuses later is handled per notification.
        if !queue.ready() || (!mem.translated() && !queue.is_valid(mem.memory())) {
            return Err(vmm_iommu::DeviceError::InvalidQueue(0));
        }
        Ok(ActiveQueue {
            mem,
            queue,
            interrupt,
        })
    }
}
