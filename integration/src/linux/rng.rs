//! virtio-rng (virtio 1.3 5.4, device ID 4), for the Linux guest: one
//! request queue whose device-writable buffers the device fills with
//! bytes from the host's `/dev/urandom`, every access through the device's
//! [`DmaMemory`] (translated by the vIOMMU when the driver accepted
//! `VIRTIO_F_ACCESS_PLATFORM`).
//!
//! A refused buffer ends its chain with the bytes written so far; a
//! refused ring ends the notification's pass; an entropy source that fails
//! ends the chain the same way. None of these is an error for the VMM:
//! they are counted in [`RngStats`] and logged.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use log::{debug, warn};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_iommu::EndpointIommu;
use vmm_iommu::{DeviceError, VirtioInterrupt};

use super::dma::{
    available_chains, chain_buffers, ActiveQueue, DmaError, DmaMemory, DmaPath, F_ACCESS_PLATFORM,
    F_VERSION_1,
};
use crate::vm::virtio_mmio::VirtioDevice;

/// The virtio device ID of an entropy device.
pub const DEVICE_ID: u32 = 4;
/// The request queue's largest size.
pub const QUEUE_MAX: u16 = 256;
/// Most bytes one chain gets, regardless of how the descriptor chain is
/// constructed: the device fills buffers on the exit path, and a chain
/// may name up to 4 GiB.
pub const MAX_ENTROPY_BYTES: usize = 64 << 10;
/// Where the bytes come from.
const ENTROPY_SOURCE: &str = "/dev/urandom";

/// An entropy device that cannot be built.
#[derive(Debug, Error)]
pub enum RngError {
    /// The host's entropy source cannot be opened.
    #[error("cannot open {ENTROPY_SOURCE}: {0}")]
    Source(#[source] std::io::Error),
}

/// What the device did, for the VMM's report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RngStats {
    /// Chains served (returned to the used ring).
    pub requests: u64,
    /// Random bytes written to the driver's buffers.
    pub bytes: u64,
    /// Chains and queue passes during which the vIOMMU refused an access
    /// (each also queued a fault record for the guest).
    pub dma_refused: u64,
}

/// A virtio-rng device.
pub struct VirtioRng {
    source: Box<dyn Read + Send>,
    dma: DmaPath,
    acked: u64,
    access_platform: bool,
    active: Option<ActiveQueue>,
    stats: RngStats,
    /// Reused for every chain, so serving a request allocates nothing.
    buf: Vec<u8>,
}

impl std::fmt::Debug for VirtioRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioRng")
            .field("dma", &self.dma)
            .field("active", &self.active.is_some())
            .field("stats", &self.stats)
            .finish()
    }
}

impl VirtioRng {
    /// An entropy device reading `/dev/urandom`; behind the vIOMMU when
    /// given its endpoint's IOMMU (`viommu.endpoint_iommu(endpoint_id)`),
    /// else on guest-physical memory.
    pub fn new(iommu: Option<EndpointIommu>) -> Result<Self, RngError> {
        let f = File::open(ENTROPY_SOURCE).map_err(RngError::Source)?;
        Ok(Self::with_source(Box::new(f), DmaPath::new(iommu)))
    }

    /// An entropy device reading `source` (tests give a known pattern),
    /// whose DMA goes through `dma`.
    pub fn with_source(source: Box<dyn Read + Send>, dma: DmaPath) -> Self {
        VirtioRng {
            source,
            dma,
            acked: 0,
            access_platform: false,
            active: None,
            stats: RngStats::default(),
            buf: Vec::new(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> RngStats {
        self.stats.clone()
    }

    /// Whether the driver accepted `VIRTIO_F_ACCESS_PLATFORM` when it last
    /// negotiated features (kept across a reset, for the VMM's report).
    pub fn access_platform(&self) -> bool {
        self.access_platform
    }

    /// The memory view of the current activation, if the driver started
    /// the device.
    pub fn dma_memory(&self) -> Option<&DmaMemory> {
        self.active.as_ref().map(|a| &a.mem)
    }

    /// Test hook: reads 4 bytes at `iova` through the device's endpoint
    /// (see [`DmaMemory::stray_read`]); needs an active device.
    pub fn stray_read(&self, iova: u64) -> Result<(), DmaError> {
        self.dma_memory()
            .ok_or(DmaError::NotActivated)?
            .stray_read(iova)
    }

    /// Serves every chain published when the pass begins.
    fn process_queue(&mut self) -> Result<(), DeviceError> {
        let Some(active) = self.active.as_mut() else {
            return Err(DeviceError::NotActivated);
        };
        let qerr = |source| DeviceError::Queue { queue: 0, source };
        let mem = &active.mem;
        let gm = mem.memory();
        let max_descs = usize::from(active.queue.size());
        let refusals_before = mem.refusals();
        let avail = available_chains(&mut active.queue, gm).map_err(qerr)?;
        let ring_refusals = mem.refusals() > refusals_before;
        let mut used = 0usize;
        for chain in avail.chains {
            let head = chain.head_index();
            if head >= active.queue.size() {
                // No such descriptor: there is nothing to return to the
                // used ring, and the rest of the pass is still served.
                warn!("virtio-rng: available ring names descriptor {head} beyond the queue");
                continue;
            }
            let before = mem.refusals();
            let len = match chain_buffers(chain, max_descs) {
                Ok(bufs) => fill(
                    &mut *self.source,
                    &mut self.buf,
                    mem,
                    &bufs.writable,
                    &mut self.stats,
                ),
                Err(e) => {
                    warn!("virtio-rng: {e}");
                    0
                }
            };
            if mem.refusals() > before {
                self.stats.dma_refused += 1;
            }
            let before_used = mem.refusals();
            if let Err(e) = active.queue.add_used(gm, head, len) {
                // The used ring is out of reach: the driver loses this
                // buffer; the device stays up for the next notification.
                warn!("virtio-rng: used ring refused, pass stopped: {e}");
                if mem.refusals() > before_used {
                    self.stats.dma_refused += 1;
                }
                break;
            }
            self.stats.requests += 1;
            used += 1;
        }
        if avail.ring_refused {
            warn!("virtio-rng: available ring refused, pass stopped");
            if ring_refusals {
                self.stats.dma_refused += 1;
            }
        }
        // Without VIRTIO_RING_F_EVENT_IDX this is true whenever anything
        // was used; it reads no memory.
        if used > 0 && active.queue.needs_notification(gm).map_err(qerr)? {
            active
                .interrupt
                .trigger(0)
                .map_err(|source| DeviceError::Interrupt { queue: 0, source })?;
        }
        Ok(())
    }
}

/// Fills the device-writable buffers `writable` with up to
/// [`MAX_ENTROPY_BYTES`] from `source`; returns the bytes written.
/// Device-readable buffers carry nothing for this device and are ignored.
fn fill(
    source: &mut dyn Read,
    buf: &mut Vec<u8>,
    mem: &DmaMemory,
    writable: &[super::dma::Segment],
    stats: &mut RngStats,
) -> u32 {
    let mut written = 0usize;
    for seg in writable {
        let room = MAX_ENTROPY_BYTES - written;
        if room == 0 {
            break;
        }
        // `seg.len` fits in usize on every host this VMM runs on (64-bit).
        let n = (seg.len as usize).min(room);
        if n == 0 {
            continue;
        }
        buf.resize(n, 0);
        if let Err(e) = source.read_exact(&mut buf[..n]) {
            warn!("virtio-rng: entropy source failed: {e}");
            break;
        }
        if let Err(e) = mem.write_to(std::slice::from_ref(seg), 0, &buf[..n]) {
            warn!("virtio-rng: buffer refused: {e}");
            break;
        }
        written += n;
    }
    stats.bytes += written as u64;
    // At most MAX_ENTROPY_BYTES.
    written as u32
}

impl VirtioDevice for VirtioRng {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX]
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | self.dma.features()
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
        self.access_platform = self.acked & F_ACCESS_PLATFORM != 0;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio 1.3 5.4.4: "None currently defined".
        debug!("virtio-rng: config read at {offset:#x}");
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-rng: config write of {} bytes at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), DeviceError> {
        self.active = Some(ActiveQueue::activate(
            &self.dma, mem, self.acked, queues, interrupt,
        )?);
        Ok(())
    }

    fn queue_notify(&mut self, _mem: &GuestMemoryMmap, queue: u16) -> Result<(), DeviceError> {
        if queue != 0 {
            return Ok(());
        }
        self.process_queue()
    }

    fn process_pending(&mut self, _mem: &GuestMemoryMmap) -> Result<(), DeviceError> {
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::dma::testing::*;
    use crate::linux::dma::DmaGuestMemory;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_iommu::testing::CountingInterrupt;

    /// Window offset of the buffers.
    const BUF: u64 = 0x1_0000;

    type Vq<'a> = MockSplitQueue<'a, DmaGuestMemory>;

    /// A device whose source yields `byte` forever, activated on `vq`
    /// with every feature it offers accepted.
    fn start(rig: &Rig, vq: &Vq<'_>, byte: u8) -> (VirtioRng, Arc<CountingInterrupt>) {
        let src = Box::new(std::io::repeat(byte));
        let mut rng = VirtioRng::with_source(src, rig.device_path());
        rng.ack_features(rng.features());
        let irq = Arc::new(CountingInterrupt::default());
        rng.activate(&rig.mem, vec![device_queue(vq)], irq.clone())
            .unwrap();
        (rng, irq)
    }

    #[test]
    fn features_offer_access_platform_only_behind_the_viommu() {
        for rig in Rig::both() {
            let rng = VirtioRng::with_source(Box::new(std::io::empty()), rig.device_path());
            assert_eq!(
                rng.features(),
                F_VERSION_1
                    | if rig.viommu.is_some() {
                        F_ACCESS_PLATFORM
                    } else {
                        0
                    }
            );
            assert_eq!(rng.device_type(), DEVICE_ID);
        }
    }

    #[test]
    fn fills_every_writable_descriptor_and_skips_readable_ones() {
        for rig in Rig::both() {
            let vq = rig.queue();
            let (mut rng, irq) = start(&rig, &vq, 0xab);
            add_chain(
                &vq,
                0,
                &[
                    (rig.addr(BUF), 8, false),
                    (rig.addr(BUF + 0x100), 100, true),
                    (rig.addr(BUF + 0x1000), 200, true),
                ],
            );
            rng.queue_notify(&rig.mem, 0).unwrap();
            assert_eq!(used(&vq), [(0, 300)]);
            assert_eq!(rig.read_gpa(BUF, 8), [0; 8], "readable: untouched");
            assert_eq!(rig.read_gpa(BUF + 0x100, 100), vec![0xab; 100]);
            assert_eq!(rig.read_gpa(BUF + 0x1000, 200), vec![0xab; 200]);
            assert_eq!(irq.count(0), 1);
            assert_eq!(
                rng.stats(),
                RngStats {
                    requests: 1,
                    bytes: 300,
                    dma_refused: 0
                }
            );
        }
    }

    #[test]
    fn a_chain_gets_at_most_max_entropy_bytes() {
        for rig in Rig::both() {
            let vq = rig.queue();
            let (mut rng, _) = start(&rig, &vq, 0x5a);
            let len = 2 * MAX_ENTROPY_BYTES as u32;
            add_chain(
                &vq,
                0,
                &[
                    (rig.addr(BUF), len / 2 - 16, true),
                    (rig.addr(BUF + u64::from(len)), len, true),
                ],
            );
            rng.queue_notify(&rig.mem, 0).unwrap();
            assert_eq!(used(&vq), [(0, MAX_ENTROPY_BYTES as u32)]);
            let second = u64::from(len);
            assert_eq!(rig.read_gpa(BUF + second, 16), vec![0x5a; 16]);
            assert_eq!(rig.read_gpa(BUF + second + 16, 16), vec![0; 16]);
        }
    }

    #[test]
    fn unmapped_buffer_ends_the_chain_and_the_viommu_records_a_fault() {
        let rig = Rig::translated();
        let vq = rig.queue();
        let (mut rng, _) = start(&rig, &vq, 1);
        add_chain(&vq, 0, &[(rig.addr(BUF), 16, true), (UNMAPPED, 16, true)]);
        add_chain(&vq, 2, &[(rig.addr(BUF + 0x100), 4, true)]);
        rng.queue_notify(&rig.mem, 0).unwrap();
        assert_eq!(used(&vq), [(0, 16), (2, 4)], "the next chain is served");
        let s = rng.stats();
        assert_eq!((s.requests, s.bytes, s.dma_refused), (2, 20, 1));
        let rec = rig.viommu.as_ref().unwrap().faults().pop().unwrap();
        assert_eq!((rec.endpoint, rec.address), (EP, UNMAPPED));
    }

    #[test]
    fn failing_source_returns_the_chain_empty_and_keeps_the_device() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("no entropy"))
            }
        }
        let rig = Rig::direct();
        let vq = rig.queue();
        let mut rng = VirtioRng::with_source(Box::new(Broken), rig.device_path());
        rng.ack_features(F_VERSION_1);
        rng.activate(
            &rig.mem,
            vec![device_queue(&vq)],
            Arc::new(CountingInterrupt::default()),
        )
        .unwrap();
        add_chain(&vq, 0, &[(rig.addr(BUF), 16, true)]);
        rng.queue_notify(&rig.mem, 0).unwrap();
        assert_eq!(used(&vq), [(0, 0)]);
    }

    #[test]
    fn urandom_source_fills_with_varied_bytes() {
        let rig = Rig::direct();
        let vq = rig.queue();
        let mut rng = VirtioRng::new(None).unwrap();
        rng.ack_features(rng.features());
        rng.activate(
            &rig.mem,
            vec![device_queue(&vq)],
            Arc::new(CountingInterrupt::default()),
        )
        .unwrap();
        add_chain(&vq, 0, &[(rig.addr(BUF), 64, true)]);
        rng.queue_notify(&rig.mem, 0).unwrap();
        let got = rig.read_gpa(BUF, 64);
        // 64 equal bytes from /dev/urandom: probability 2^-504.
        assert!(got.iter().any(|&b| b != got[0]));
    }

    #[test]
    fn stray_read_hook_needs_an_activation_and_faults_on_an_unmapped_iova() {
        let rig = Rig::translated();
        let vq = rig.queue();
        let rng = VirtioRng::with_source(Box::new(std::io::empty()), rig.device_path());
        assert!(matches!(
            rng.stray_read(UNMAPPED),
            Err(DmaError::NotActivated)
        ));
        let (rng, _) = start(&rig, &vq, 0);
        assert!(rng.stray_read(UNMAPPED).is_err());
        assert_eq!(rig.faults(), 1);
    }
}
