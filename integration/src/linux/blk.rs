//! virtio-blk (virtio 1.3 5.2, device ID 2) over an in-memory disk, for
//! the Linux guest: one request queue; IN, OUT, FLUSH and GET_ID; every
//! access to the rings and the buffers through the device's [`DmaMemory`]
//! (translated by the vIOMMU when the driver accepted
//! `VIRTIO_F_ACCESS_PLATFORM`).
//!
//! Everything the driver provides is checked before the disk is touched:
//! the chain's shape, the header, the direction and length of the data, the
//! sector range. A bad request gets `VIRTIO_BLK_S_IOERR` (an unknown type
//! `VIRTIO_BLK_S_UNSUPP`) and the queue goes on; a chain with no writable
//! status byte goes back with length 0; a refused ring access ends the
//! notification's pass. None of these is an error for the VMM: they are
//! counted in [`BlkStats`] and logged.

use std::sync::Arc;

use log::{debug, warn};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_iommu::EndpointIommu;
use vmm_iommu::{DeviceError, VirtioInterrupt};

use super::dma::{
    available_chains, chain_buffers, total_len, ActiveQueue, ChainBuffers, DmaError, DmaMemory,
    DmaPath, Segment, F_ACCESS_PLATFORM, F_VERSION_1,
};
use crate::vm::virtio_mmio::VirtioDevice;

/// The virtio device ID of a block device.
pub const DEVICE_ID: u32 = 2;
/// The sector size of the virtio-blk protocol, and our block size.
pub const SECTOR_SIZE: u64 = 512;
/// The request queue's largest size.
pub const QUEUE_MAX: u16 = 256;
/// Most data bytes one request may move: a guest-built chain could
/// otherwise name up to 4 GiB, and the device copies it on the exit path.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Length of the GET_ID string (virtio 1.3 5.2.6: `VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;

/// The GET_ID string unless the VMM sets another.
pub const DEFAULT_ID: &str = "vmm-iommu-blk";

/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` in config space is valid.
const F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` in config space is valid.
const F_BLK_SIZE: u64 = 1 << 6;
/// `VIRTIO_BLK_F_FLUSH`: the FLUSH command is supported.
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// The request header: type le32, reserved le32, sector le64.
const HEADER_LEN: usize = 16;
/// Most data segments per request we tell the driver to use: the queue
/// minus the header and the status descriptors.
const SEG_MAX: u32 = QUEUE_MAX as u32 - 2;
/// Config space: capacity, size_max, seg_max, geometry, blk_size.
const CONFIG_LEN: usize = 24;

/// A block device that cannot be built.
#[derive(Debug, Error)]
pub enum BlkError {
    /// The disk size is zero or not a multiple of 512 bytes.
    #[error("disk size {0} bytes is not a non-zero multiple of 512")]
    BadSize(u64),
    /// The disk does not fit in this host's address space.
    #[error("disk size {0} bytes does not fit in memory")]
    TooLarge(u64),
}

/// What the device did, for the VMM's report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// IN requests completed with OK.
    pub reads: u64,
    /// OUT requests completed with OK.
    pub writes: u64,
    /// FLUSH requests completed with OK.
    pub flushes: u64,
    /// GET_ID requests completed with OK.
    pub get_id: u64,
    /// Bytes read from the disk for the driver.
    pub bytes_read: u64,
    /// Bytes written to the disk from the driver.
    pub bytes_written: u64,
    /// Requests answered IOERR or UNSUPP, or returned without a status
    /// (no writable status byte, unreadable chain).
    pub errors: u64,
    /// Requests and queue passes during which the vIOMMU refused an
    /// access (each also queued a fault record for the guest).
    pub dma_refused: u64,
}

/// Why a request got IOERR (for the log).
#[derive(Debug, Error)]
enum BadRequest {
    #[error("device-writable buffers before device-readable ones")]
    Unordered,
    #[error("header of {0} bytes, {HEADER_LEN} needed")]
    ShortHeader(u64),
    #[error("header unreadable: {0}")]
    HeaderRefused(DmaError),
    #[error("type {0} with {1} device-readable data bytes")]
    ReadableData(u32, u64),
    #[error("type {0} with {1} device-writable data bytes")]
    WritableData(u32, u64),
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    Unaligned(u64),
    #[error("data length {0} above {MAX_REQUEST_BYTES}")]
    TooLong(u64),
    #[error("sector {sector} + {len} bytes beyond the capacity of {capacity} bytes")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("data transfer refused: {0}")]
    Dma(DmaError),
}

/// The disk and the requests it serves, apart from the queue.
#[derive(Debug)]
struct Disk {
    data: Vec<u8>,
    id: [u8; ID_BYTES],
}

/// A decoded request, before it is checked against the buffers.
struct Header {
    kind: u32,
    sector: u64,
}

impl Disk {
    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }

    /// The byte offset of `len` bytes at `sector`, if the range is a whole
    /// number of sectors within the disk.
    fn range(&self, sector: u64, len: u64) -> Result<usize, BadRequest> {
        // virtio 1.3 5.2.6.1: "A driver MUST NOT submit a request which
        // would cause a read or write beyond capacity"; the device checks.
        if len % SECTOR_SIZE != 0 {
            return Err(BadRequest::Unaligned(len));
        }
        if len > MAX_REQUEST_BYTES {
            return Err(BadRequest::TooLong(len));
        }
        let capacity = self.capacity();
        let out = || BadRequest::OutOfRange {
            sector,
            len,
            capacity,
        };
        let start = sector.checked_mul(SECTOR_SIZE).ok_or_else(out)?;
        match start.checked_add(len) {
            // `start` is below the capacity, a usize.
            Some(end) if end <= capacity => Ok(start as usize),
            _ => Err(out()),
        }
    }
}

/// How a request ended: its status and the data bytes written to the
/// driver's buffers.
struct Outcome {
    status: u8,
    written: u64,
}

impl Outcome {
    fn status(status: u8) -> Self {
        Outcome { status, written: 0 }
    }
}

/// A virtio-blk device over an in-memory disk.
pub struct VirtioBlk {
    disk: Disk,
    dma: DmaPath,
    acked: u64,
    access_platform: bool,
    active: Option<ActiveQueue>,
    stats: BlkStats,
}

impl std::fmt::Debug for VirtioBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("capacity", &self.disk.capacity())
            .field("dma", &self.dma)
            .field("active", &self.active.is_some())
            .field("stats", &self.stats)
            .finish()
    }
}

impl VirtioBlk {
    /// A zeroed disk of `size` bytes (a non-zero multiple of 512); behind
    /// the vIOMMU when given its endpoint's IOMMU
    /// (`viommu.endpoint_iommu(endpoint_id)`), else on guest-physical
    /// memory.
    pub fn new(size: u64, iommu: Option<EndpointIommu>) -> Result<Self, BlkError> {
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(BlkError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| BlkError::TooLarge(size))?;
        Self::with_contents(vec![0; len], DmaPath::new(iommu))
    }

    /// A disk holding `data` (its length a non-zero multiple of 512) whose
    /// DMA goes through `dma`.
    pub fn with_contents(data: Vec<u8>, dma: DmaPath) -> Result<Self, BlkError> {
        let size = data.len() as u64;
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(BlkError::BadSize(size));
        }
        let mut blk = VirtioBlk {
            disk: Disk {
                data,
                id: [0; ID_BYTES],
            },
            dma,
            acked: 0,
            access_platform: false,
            active: None,
            stats: BlkStats::default(),
        };
        blk.set_id(DEFAULT_ID);
        Ok(blk)
    }

    /// Sets the GET_ID string (truncated to 20 bytes, NUL-padded: virtio
    /// 1.3 5.2.6 "the string is ... not NUL-terminated if it is 20 bytes").
    pub fn set_id(&mut self, id: &str) {
        self.disk.id = [0; ID_BYTES];
        let b = id.as_bytes();
        let n = b.len().min(ID_BYTES);
        self.disk.id[..n].copy_from_slice(&b[..n]);
    }

    /// The disk's contents.
    pub fn disk(&self) -> &[u8] {
        &self.disk.data
    }

    /// The counters.
    pub fn stats(&self) -> BlkStats {
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

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(self.disk.capacity() / SECTOR_SIZE).to_le_bytes());
        // size_max (8..12) is 0: VIRTIO_BLK_F_SIZE_MAX is not offered.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // geometry (16..20) is 0: VIRTIO_BLK_F_GEOMETRY is not offered.
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
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
                warn!("virtio-blk: available ring names descriptor {head} beyond the queue");
                self.stats.errors += 1;
                continue;
            }
            let before = mem.refusals();
            let len = match chain_buffers(chain, max_descs) {
                Ok(bufs) => serve(&mut self.disk, &mut self.stats, mem, &bufs),
                Err(e) => {
                    warn!("virtio-blk: {e}");
                    self.stats.errors += 1;
                    0
                }
            };
            if mem.refusals() > before {
                self.stats.dma_refused += 1;
            }
            let before_used = mem.refusals();
            if let Err(e) = active.queue.add_used(gm, head, len) {
                // The used ring is out of reach: the driver loses this
                // request; the device stays up for the next notification.
                warn!("virtio-blk: used ring refused, pass stopped: {e}");
                if mem.refusals() > before_used {
                    self.stats.dma_refused += 1;
                }
                break;
            }
            used += 1;
        }
        if avail.ring_refused {
            warn!("virtio-blk: available ring refused, pass stopped");
            if ring_refusals {
                self.stats.dma_refused += 1;
            } else {
                self.stats.errors += 1;
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

/// Serves one request on its buffers; returns the used length (the data
/// bytes written plus the status byte, or 0 if no status could be written).
fn serve(disk: &mut Disk, stats: &mut BlkStats, mem: &DmaMemory, bufs: &ChainBuffers) -> u32 {
    // virtio 1.3 5.2.6: the status is the last byte the device writes;
    // it sits at the end of the device-writable buffers.
    let writable = total_len(&bufs.writable);
    let Some(status_at) = writable.checked_sub(1) else {
        warn!("virtio-blk: request without a device-writable status byte");
        stats.errors += 1;
        return 0;
    };
    let outcome = match execute(disk, stats, mem, bufs, status_at) {
        Ok(o) => o,
        Err(BadRequest::Dma(e)) => {
            warn!("virtio-blk: data transfer refused: {e}");
            Outcome {
                status: S_IOERR,
                written: e.done() as u64,
            }
        }
        Err(e) => {
            warn!("virtio-blk: bad request: {e}");
            Outcome::status(S_IOERR)
        }
    };
    if outcome.status != S_OK {
        stats.errors += 1;
    }
    // `written` is at most `status_at`, itself below 2^32.
    let written = outcome.written as u32;
    match mem.write_to(&bufs.writable, status_at, &[outcome.status]) {
        Ok(()) => written + 1,
        Err(e) => {
            warn!("virtio-blk: status byte refused: {e}");
            if outcome.status == S_OK {
                stats.errors += 1;
            }
            written
        }
    }
}

/// Checks and runs one request whose status byte is at `status_at` of
/// the writable buffers (so the writable data is `[0, status_at)`).
fn execute(
    disk: &mut Disk,
    stats: &mut BlkStats,
    mem: &DmaMemory,
    bufs: &ChainBuffers,
    status_at: u64,
) -> Result<Outcome, BadRequest> {
    if !bufs.ordered {
        return Err(BadRequest::Unordered);
    }
    let readable = total_len(&bufs.readable);
    let h = header(mem, &bufs.readable, readable)?;
    let in_data = status_at;
    let out_data = readable - HEADER_LEN as u64;
    match h.kind {
        T_IN => {
            if out_data != 0 {
                return Err(BadRequest::ReadableData(h.kind, out_data));
            }
            let off = disk.range(h.sector, in_data)?;
            // `in_data` passed the range check, so it fits the disk.
            let src = &disk.data[off..off + in_data as usize];
            mem.write_to(&bufs.writable, 0, src)
                .map_err(BadRequest::Dma)?;
            stats.reads += 1;
            stats.bytes_read += in_data;
            Ok(Outcome {
                status: S_OK,
                written: in_data,
            })
        }
        T_OUT => {
            if in_data != 0 {
                return Err(BadRequest::WritableData(h.kind, in_data));
            }
            let off = disk.range(h.sector, out_data)?;
            // A refused segment leaves the sectors before it written, as
            // a torn write on real hardware would.
            let dst = &mut disk.data[off..off + out_data as usize];
            mem.read_from(&bufs.readable, HEADER_LEN as u64, dst)
                .map_err(BadRequest::Dma)?;
            stats.writes += 1;
            stats.bytes_written += out_data;
            Ok(Outcome::status(S_OK))
        }
        T_FLUSH => {
            // The disk is RAM: everything written is already durable for
            // as long as the disk lives. Stray data buffers are ignored
            // (spec 5.2.6.2 gives FLUSH none, and nothing is read).
            stats.flushes += 1;
            Ok(Outcome::status(S_OK))
        }
        T_GET_ID => {
            if out_data != 0 {
                return Err(BadRequest::ReadableData(h.kind, out_data));
            }
            // A buffer shorter than 20 bytes gets the string's head, as
            // QEMU does; a longer one gets the 20 bytes.
            let n = in_data.min(ID_BYTES as u64) as usize;
            mem.write_to(&bufs.writable, 0, &disk.id[..n])
                .map_err(BadRequest::Dma)?;
            stats.get_id += 1;
            Ok(Outcome {
                status: S_OK,
                written: n as u64,
            })
        }
        other => {
            // virtio 1.3 5.2.6.1: an unknown type gets VIRTIO_BLK_S_UNSUPP.
            debug!("virtio-blk: unsupported request type {other}");
            Ok(Outcome::status(S_UNSUPP))
        }
    }
}

/// Reads the 16-byte header, which may span descriptors.
fn header(mem: &DmaMemory, readable: &[Segment], len: u64) -> Result<Header, BadRequest> {
    if len < HEADER_LEN as u64 {
        return Err(BadRequest::ShortHeader(len));
    }
    let mut b = [0u8; HEADER_LEN];
    mem.read_from(readable, 0, &mut b)
        .map_err(BadRequest::HeaderRefused)?;
    let kind = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&b[8..16]);
    Ok(Header {
        kind,
        sector: u64::from_le_bytes(sector),
    })
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX]
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | self.dma.features() | F_SEG_MAX | F_BLK_SIZE | F_FLUSH
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
        self.access_platform = self.acked & F_ACCESS_PLATFORM != 0;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Bytes past the fields we fill (topology, writeback, ...) read as
        // 0: their features are not offered.
        let c = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, with VIRTIO_BLK_F_CONFIG_WCE, which
        // is not offered.
        debug!(
            "virtio-blk: config write of {} bytes at {offset:#x} ignored",
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
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_iommu::testing::CountingInterrupt;

    use crate::linux::dma::DmaGuestMemory;

    /// Disk size: 64 sectors.
    const DISK: u64 = 64 * SECTOR_SIZE;
    /// Window offsets of the request header, the status byte and data.
    const HDR: u64 = 0x1000;
    const STATUS: u64 = 0x2000;
    const DATA: u64 = 0x1_0000;

    type Vq<'a> = MockSplitQueue<'a, DmaGuestMemory>;

    /// A disk whose sector `i` is filled with byte `i`, activated on `vq`
    /// with every feature it offers accepted.
    fn start(rig: &Rig, vq: &Vq<'_>) -> (VirtioBlk, Arc<CountingInterrupt>) {
        let data = (0..DISK).map(|i| (i / SECTOR_SIZE) as u8).collect();
        let mut blk = VirtioBlk::with_contents(data, rig.device_path()).unwrap();
        blk.ack_features(blk.features());
        let irq = Arc::new(CountingInterrupt::default());
        blk.activate(&rig.mem, vec![device_queue(vq)], irq.clone())
            .unwrap();
        (blk, irq)
    }

    fn header(rig: &Rig, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        rig.write_gpa(HDR, &h);
    }

    /// Header, one data buffer of `len` bytes (writable for IN), status.
    fn data_request(rig: &Rig, vq: &Vq<'_>, kind: u32, sector: u64, len: u32) {
        header(rig, kind, sector);
        rig.write_gpa(STATUS, &[0xff]);
        let data_writable = kind != T_OUT;
        add_chain(
            vq,
            0,
            &[
                (rig.addr(HDR), 16, false),
                (rig.addr(DATA), len, data_writable),
                (rig.addr(STATUS), 1, true),
            ],
        );
    }

    fn status(rig: &Rig) -> u8 {
        rig.read_gpa(STATUS, 1)[0]
    }

    fn notify(blk: &mut VirtioBlk, rig: &Rig) {
        blk.queue_notify(&rig.mem, 0).unwrap();
    }

    #[test]
    fn features_offer_access_platform_only_behind_the_viommu() {
        for rig in Rig::both() {
            let blk = VirtioBlk::with_contents(vec![0; 512], rig.device_path()).unwrap();
            let f = blk.features();
            assert_ne!(f & F_VERSION_1, 0);
            assert_eq!(
                f & (F_SEG_MAX | F_BLK_SIZE | F_FLUSH),
                F_SEG_MAX | F_BLK_SIZE | F_FLUSH
            );
            assert_eq!(f & F_ACCESS_PLATFORM != 0, rig.viommu.is_some());
        }
    }

    #[test]
    fn config_space_holds_capacity_seg_max_and_blk_size() {
        let blk = VirtioBlk::new(DISK, None).unwrap();
        let mut c = [0xffu8; 28];
        blk.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 64);
        assert_eq!(u32::from_le_bytes(c[8..12].try_into().unwrap()), 0);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[24..28], [0; 4], "past the fields: zero");
        let mut hi = [0xffu8; 2];
        blk.read_config(u64::MAX, &mut hi);
        assert_eq!(hi, [0, 0]);
    }

    #[test]
    fn disk_size_that_is_not_whole_sectors_is_refused() {
        assert!(matches!(VirtioBlk::new(0, None), Err(BlkError::BadSize(0))));
        assert!(matches!(
            VirtioBlk::new(513, None),
            Err(BlkError::BadSize(513))
        ));
    }

    #[test]
    fn read_returns_the_sectors_and_counts_data_plus_status() {
        for rig in Rig::both() {
            let vq = rig.queue();
            let (mut blk, irq) = start(&rig, &vq);
            data_request(&rig, &vq, T_IN, 3, 1024);
            notify(&mut blk, &rig);
            assert_eq!(status(&rig), S_OK);
            let got = rig.read_gpa(DATA, 1024);
            assert!(got[..512].iter().all(|&b| b == 3) && got[512..].iter().all(|&b| b == 4));
            assert_eq!(used(&vq), [(0, 1025)]);
            assert_eq!(irq.count(0), 1);
            let s = blk.stats();
            assert_eq!(
                (s.reads, s.bytes_read, s.errors, s.dma_refused),
                (1, 1024, 0, 0)
            );
            assert_eq!(blk.dma_memory().unwrap().translated(), rig.viommu.is_some());
        }
    }

    #[test]
    fn write_then_read_round_trips_with_header_and_data_split_across_descriptors() {
        for rig in Rig::both() {
            let vq = rig.queue();
            let (mut blk, _) = start(&rig, &vq);
            let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
            rig.write_gpa(DATA, &pattern);
            header(&rig, T_OUT, 10);
            add_chain(
                &vq,
                0,
                &[
                    (rig.addr(HDR), 5, false),
                    (rig.addr(HDR + 5), 11, false),
                    (rig.addr(DATA), 700, false),
                    (rig.addr(DATA + 700), 324, false),
                    (rig.addr(STATUS), 1, true),
                ],
            );
            notify(&mut blk, &rig);
            assert_eq!(status(&rig), S_OK);
            assert_eq!(used(&vq), [(0, 1)]);
            assert_eq!(&blk.disk()[10 * 512..12 * 512], &pattern[..]);

            rig.write_gpa(DATA + 0x1000, &[0; 1024]);
            header(&rig, T_IN, 10);
            add_chain(
                &vq,
                5,
                &[
                    (rig.addr(HDR), 16, false),
                    (rig.addr(DATA + 0x1000), 100, true),
                    (rig.addr(DATA + 0x1000 + 100), 924, true),
                    (rig.addr(STATUS), 1, true),
                ],
            );
            notify(&mut blk, &rig);
            assert_eq!(rig.read_gpa(DATA + 0x1000, 1024), pattern);
            assert_eq!(used(&vq), [(0, 1), (5, 1025)]);
            let s = blk.stats();
            assert_eq!((s.writes, s.bytes_written, s.reads), (1, 1024, 1));
        }
    }

    #[test]
    fn flush_completes_ok() {
        for rig in Rig::both() {
            let vq = rig.queue();
            let (mut blk, _) = start(&rig, &vq);
            header(&rig, T_FLUSH, 0);
            add_chain(
                &vq,
                0,
                &[(rig.addr(HDR), 16, false), (rig.addr(STATUS), 1, true)],
            );
            notify(&mut blk, &rig);
            assert_eq!(status(&rig), S_OK);
            assert_eq!(used(&vq), [(0, 1)]);
            assert_eq!(blk.stats().flushes, 1);
        }
    }

    #[test]
    fn get_id_writes_the_twenty_byte_id() {
        for rig in Rig::both() {
            let vq = rig.queue();
            let (mut blk, _) = start(&rig, &vq);
            blk.set_id("disk-0");
            data_request(&rig, &vq, T_GET_ID, 0, ID_BYTES as u32);
            notify(&mut blk, &rig);
            assert_eq!(status(&rig), S_OK);
            let mut want = [0u8; ID_BYTES];
            want[..6].copy_from_slice(b"disk-0");
            assert_eq!(rig.read_gpa(DATA, ID_BYTES), want);
            assert_eq!(used(&vq), [(0, 21)]);
            assert_eq!(blk.stats().get_id, 1);
        }
    }

    #[test]
    fn sector_beyond_capacity_returns_ioerr() {
        for rig in Rig::both() {
            let vq = rig.queue();
            let (mut blk, _) = start(&rig, &vq);
            // The last sector plus one.
            data_request(&rig, &vq, T_IN, 63, 1024);
            notify(&mut blk, &rig);
            assert_eq!(status(&rig), S_IOERR);
            assert_eq!(used(&vq), [(0, 1)]);
            // sector * 512 overflows u64.
            header(&rig, T_OUT, u64::MAX / 256);
            add_chain(
                &vq,
                3,
                &[
                    (rig.addr(HDR), 16, false),
                    (rig.addr(DATA), 512, false),
                    (rig.addr(STATUS), 1, true),
                ],
            );
            notify(&mut blk, &rig);
            assert_eq!(status(&rig), S_IOERR);
            assert_eq!(blk.stats().errors, 2);
            assert_eq!(blk.stats().reads + blk.stats().writes, 0);
        }
    }

    #[test]
    fn data_length_not_a_multiple_of_512_returns_ioerr() {
        for rig in Rig::both() {
            let vq = rig.queue();
            let (mut blk, _) = start(&rig, &vq);
            data_request(&rig, &vq, T_OUT, 0, 511);
            notify(&mut blk, &rig);
            assert_eq!(status(&rig), S_IOERR);
            assert_eq!(blk.disk()[0], 0, "disk untouched");
        }
    }

    #[test]
    fn data_length_above_the_request_bound_returns_ioerr_without_touching_it() {
        let rig = Rig::direct();
        let vq = rig.queue();
        let (mut blk, _) = start(&rig, &vq);
        header(&rig, T_IN, 0);
        // The data buffer is never accessed: the length is refused first.
        add_chain(
            &vq,
            0,
            &[
                (rig.addr(HDR), 16, false),
                (UNMAPPED, (MAX_REQUEST_BYTES + 512) as u32, true),
                (rig.addr(STATUS), 1, true),
            ],
        );
        notify(&mut blk, &rig);
        assert_eq!(status(&rig), S_IOERR);
        assert_eq!(used(&vq), [(0, 1)]);
    }

    #[test]
    fn header_too_short_returns_ioerr() {
        for rig in Rig::both() {
            let vq = rig.queue();
            let (mut blk, _) = start(&rig, &vq);
            header(&rig, T_FLUSH, 0);
            rig.write_gpa(STATUS, &[0xff]);
            add_chain(
                &vq,
                0,
                &[(rig.addr(HDR), 15, false), (rig.addr(STATUS), 1, true)],
            );
            notify(&mut blk, &rig);
            assert_eq!(status(&rig), S_IOERR);
            assert_eq!(used(&vq), [(0, 1)]);
            assert_eq!(blk.stats().flushes, 0);
        }
    }

    #[test]
    fn data_direction_that_does_not_match_the_type_returns_ioerr() {
        for rig in Rig::both() {
            let vq = rig.queue();
            let (mut blk, _) = start(&rig, &vq);
            header(&rig, T_IN, 0);
            add_chain(
                &vq,
                0,
                &[
                    (rig.addr(HDR), 16, false),
                    (rig.addr(DATA), 512, false),
                    (rig.addr(STATUS), 1, true),
                ],
            );
            notify(&mut blk, &rig);
            assert_eq!(status(&rig), S_IOERR, "IN with readable data");
            header(&rig, T_OUT, 0);
            rig.write_gpa(STATUS, &[0xff]);
            add_chain(
                &vq,
                3,
                &[
                    (rig.addr(HDR), 16, false),
                    (rig.addr(DATA), 512, true),
                    (rig.addr(STATUS), 1, true),
                ],
            );
            notify(&mut blk, &rig);
            assert_eq!(status(&rig), S_IOERR, "OUT with writable data");
            assert_eq!(used(&vq), [(0, 1), (3, 1)]);
        }
    }

    #[test]
    fn writable_before_readable_returns_ioerr() {
        let rig = Rig::direct();
        let vq = rig.queue();
        let (mut blk, _) = start(&rig, &vq);
        header(&rig, T_OUT, 0);
        add_chain(
            &vq,
            0,
            &[
                (rig.addr(DATA + 0x1000), 8, true),
                (rig.addr(HDR), 16, false),
                (rig.addr(STATUS), 1, true),
            ],
        );
        notify(&mut blk, &rig);
        assert_eq!(status(&rig), S_IOERR);
    }

    #[test]
    fn request_without_a_writable_status_byte_is_returned_with_len_0() {
        for rig in Rig::both() {
            let vq = rig.queue();
            let (mut blk, irq) = start(&rig, &vq);
            header(&rig, T_FLUSH, 0);
            add_chain(
                &vq,
                0,
                &[(rig.addr(HDR), 16, false), (rig.addr(STATUS), 1, false)],
            );
            notify(&mut blk, &rig);
            assert_eq!(used(&vq), [(0, 0)]);
            assert_eq!(irq.count(0), 1, "the driver still gets its buffer back");
            assert_eq!((blk.stats().errors, blk.stats().flushes), (1, 0));
        }
    }

    #[test]
    fn status_in_a_read_only_iova_page_is_refused_and_len_is_0() {
        let rig = Rig::translated();
        let vq = rig.queue();
        let (mut blk, _) = start(&rig, &vq);
        header(&rig, T_FLUSH, 0);
        add_chain(
            &vq,
            0,
            &[(rig.addr(HDR), 16, false), (READ_ONLY_IOVA, 1, true)],
        );
        notify(&mut blk, &rig);
        assert_eq!(used(&vq), [(0, 0)]);
        let s = blk.stats();
        assert_eq!((s.errors, s.dma_refused), (1, 1));
        assert_eq!(rig.faults(), 1);
    }

    #[test]
    fn unsupported_type_returns_unsupp() {
        for rig in Rig::both() {
            let vq = rig.queue();
            let (mut blk, _) = start(&rig, &vq);
            header(&rig, 11, 0); // VIRTIO_BLK_T_DISCARD, not offered
            add_chain(
                &vq,
                0,
                &[(rig.addr(HDR), 16, false), (rig.addr(STATUS), 1, true)],
            );
            notify(&mut blk, &rig);
            assert_eq!(status(&rig), S_UNSUPP);
            assert_eq!(used(&vq), [(0, 1)]);
        }
    }

    #[test]
    fn unmapped_data_buffer_returns_ioerr_and_the_viommu_records_a_fault() {
        let rig = Rig::translated();
        let vq = rig.queue();
        let (mut blk, _) = start(&rig, &vq);
        header(&rig, T_IN, 0);
        add_chain(
            &vq,
            0,
            &[
                (rig.addr(HDR), 16, false),
                (UNMAPPED, 512, true),
                (rig.addr(STATUS), 1, true),
            ],
        );
        notify(&mut blk, &rig);
        assert_eq!(status(&rig), S_IOERR);
        assert_eq!(used(&vq), [(0, 1)]);
        let s = blk.stats();
        assert_eq!((s.reads, s.errors, s.dma_refused), (0, 1, 1));
        let rec = rig.viommu.as_ref().unwrap().faults().pop().unwrap();
        assert_eq!((rec.endpoint, rec.address), (EP, UNMAPPED));
    }

    #[test]
    fn unmapped_write_source_returns_ioerr_and_leaves_the_disk() {
        let rig = Rig::translated();
        let vq = rig.queue();
        let (mut blk, _) = start(&rig, &vq);
        header(&rig, T_OUT, 5);
        add_chain(
            &vq,
            0,
            &[
                (rig.addr(HDR), 16, false),
                (UNMAPPED, 512, false),
                (rig.addr(STATUS), 1, true),
            ],
        );
        notify(&mut blk, &rig);
        assert_eq!(status(&rig), S_IOERR);
        assert!(blk.disk()[5 * 512..6 * 512].iter().all(|&b| b == 5));
        assert_eq!(rig.faults(), 1);
    }

    #[test]
    fn rings_at_unmapped_iovas_stop_the_pass_and_keep_the_device() {
        let rig = Rig::translated();
        let vq = rig.queue();
        let data = vec![0; DISK as usize];
        let mut blk = VirtioBlk::with_contents(data, rig.device_path()).unwrap();
        blk.ack_features(blk.features());
        let mut q = device_queue(&vq);
        q.try_set_avail_ring_address(vm_memory::GuestAddress(UNMAPPED))
            .unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        blk.activate(&rig.mem, vec![q], irq.clone()).unwrap();
        data_request(&rig, &vq, T_IN, 0, 512);
        notify(&mut blk, &rig);
        notify(&mut blk, &rig);
        assert_eq!(used(&vq), []);
        assert_eq!(irq.count(0), 0);
        assert_eq!(blk.stats().dma_refused, 2);
        assert!(rig.faults() >= 1);
    }

    #[test]
    fn unreadable_descriptor_table_returns_the_chain_with_len_0() {
        let rig = Rig::translated();
        let vq = rig.queue();
        let data = vec![0; DISK as usize];
        let mut blk = VirtioBlk::with_contents(data, rig.device_path()).unwrap();
        blk.ack_features(blk.features());
        let mut q = device_queue(&vq);
        q.try_set_desc_table_address(vm_memory::GuestAddress(UNMAPPED))
            .unwrap();
        blk.activate(&rig.mem, vec![q], Arc::new(CountingInterrupt::default()))
            .unwrap();
        data_request(&rig, &vq, T_IN, 0, 512);
        notify(&mut blk, &rig);
        assert_eq!(used(&vq), [(0, 0)]);
        let s = blk.stats();
        assert_eq!((s.errors, s.dma_refused), (1, 1));
    }

    #[test]
    fn looping_chain_is_returned_with_len_0() {
        let rig = Rig::direct();
        let vq = rig.queue();
        let (mut blk, _) = start(&rig, &vq);
        header(&rig, T_FLUSH, 0);
        // Descriptor 0 names itself as next.
        let d = SplitDescriptor::new(rig.addr(HDR), 16, 1 /* NEXT */, 0);
        vq.add_desc_chains(&[RawDescriptor::from(d)], 0).unwrap();
        notify(&mut blk, &rig);
        assert_eq!(used(&vq), [(0, 0)]);
        assert_eq!(blk.stats().errors, 1);
    }

    #[test]
    fn avail_entry_beyond_the_queue_is_skipped_and_the_pass_goes_on() {
        let rig = Rig::direct();
        let vq = rig.queue();
        let (mut blk, _) = start(&rig, &vq);
        vq.avail().ring().ref_at(0).unwrap().store(99);
        vq.avail().idx().store(1);
        header(&rig, T_FLUSH, 0);
        add_chain(
            &vq,
            0,
            &[(rig.addr(HDR), 16, false), (rig.addr(STATUS), 1, true)],
        );
        notify(&mut blk, &rig);
        assert_eq!(used(&vq), [(0, 1)]);
        let s = blk.stats();
        assert_eq!((s.flushes, s.errors, s.dma_refused), (1, 1, 0));
    }

    #[test]
    fn driver_that_refuses_access_platform_gets_guest_physical_access() {
        let rig = Rig::translated();
        // The driver uses GPAs: its view is untranslated.
        let gpa_view = rig.device_path().memory(&rig.mem, F_VERSION_1);
        let vq = MockSplitQueue::create(gpa_view.memory(), vm_memory::GuestAddress(WINDOW_GPA), 16);
        let mut blk = VirtioBlk::with_contents(vec![7; DISK as usize], rig.device_path()).unwrap();
        blk.ack_features(F_VERSION_1);
        blk.activate(
            &rig.mem,
            vec![device_queue(&vq)],
            Arc::new(CountingInterrupt::default()),
        )
        .unwrap();
        header(&rig, T_IN, 0);
        add_chain(
            &vq,
            0,
            &[
                (WINDOW_GPA + HDR, 16, false),
                (WINDOW_GPA + DATA, 512, true),
                (WINDOW_GPA + STATUS, 1, true),
            ],
        );
        notify(&mut blk, &rig);
        assert_eq!(status(&rig), S_OK);
        assert_eq!(rig.read_gpa(DATA, 512), vec![7; 512]);
        assert!(!blk.access_platform());
        assert_eq!(rig.faults(), 0);
    }

    #[test]
    fn one_interrupt_per_notification_batch() {
        let rig = Rig::direct();
        let vq = rig.queue();
        let (mut blk, irq) = start(&rig, &vq);
        header(&rig, T_FLUSH, 0);
        for first in [0, 2, 4] {
            add_chain(
                &vq,
                first,
                &[(rig.addr(HDR), 16, false), (rig.addr(STATUS), 1, true)],
            );
        }
        notify(&mut blk, &rig);
        assert_eq!(used(&vq).len(), 3);
        assert_eq!(irq.count(0), 1);
        // Nothing new: no interrupt.
        notify(&mut blk, &rig);
        assert_eq!(irq.count(0), 1);
    }

    #[test]
    fn reset_stops_the_device_and_keeps_the_report() {
        let rig = Rig::translated();
        let vq = rig.queue();
        let (mut blk, _) = start(&rig, &vq);
        assert!(blk.access_platform());
        blk.reset();
        assert!(blk.dma_memory().is_none());
        assert!(matches!(blk.stray_read(0), Err(DmaError::NotActivated)));
        assert!(matches!(
            blk.queue_notify(&rig.mem, 0),
            Err(DeviceError::NotActivated)
        ));
        assert!(blk.access_platform());
    }

    #[test]
    fn stray_read_hook_faults_on_an_unmapped_iova() {
        let rig = Rig::translated();
        let vq = rig.queue();
        let (blk, _) = start(&rig, &vq);
        assert!(blk.stray_read(UNMAPPED).is_err());
        assert_eq!(rig.faults(), 1);
    }
}
