//! The virtio-iommu driver: request builders for ATTACH, DETACH, MAP, UNMAP
//! and PROBE, the config space, and one request in flight at a time on the
//! request queue, with fault records read from the event queue.

use crate::rt::{self, Bump};
use crate::virtio::{self, Seg, Transport, Virtqueue};

/// The virtio device ID of an IOMMU.
pub const DEVICE_ID: u32 = 23;

/// Feature bits (virtio 1.3 5.13.3).
pub mod features {
    /// `VIRTIO_IOMMU_F_INPUT_RANGE`.
    pub const INPUT_RANGE: u64 = 1 << 0;
    /// `VIRTIO_IOMMU_F_DOMAIN_RANGE`.
    pub const DOMAIN_RANGE: u64 = 1 << 1;
    /// `VIRTIO_IOMMU_F_MAP_UNMAP`.
    pub const MAP_UNMAP: u64 = 1 << 2;
    /// `VIRTIO_IOMMU_F_BYPASS` (legacy).
    pub const BYPASS: u64 = 1 << 3;
    /// `VIRTIO_IOMMU_F_PROBE`.
    pub const PROBE: u64 = 1 << 4;
    /// `VIRTIO_IOMMU_F_MMIO`.
    pub const MMIO: u64 = 1 << 5;
    /// `VIRTIO_IOMMU_F_BYPASS_CONFIG`.
    pub const BYPASS_CONFIG: u64 = 1 << 6;
    /// `VIRTIO_IOMMU_F_ATTACH_TABLE` (this project's nested extension):
    /// ATTACH_TABLE, INVALIDATE, probe properties 2-7, 40-byte fault records.
    pub const ATTACH_TABLE: u64 = 1 << 56;
    /// `VIRTIO_IOMMU_F_PAGE_REQUEST`: page-request events and PAGE_RESP.
    pub const PAGE_REQUEST: u64 = 1 << 57;
}

/// Request types.
pub mod types {
    /// ATTACH.
    pub const ATTACH: u8 = 1;
    /// DETACH.
    pub const DETACH: u8 = 2;
    /// MAP.
    pub const MAP: u8 = 3;
    /// UNMAP.
    pub const UNMAP: u8 = 4;
    /// PROBE.
    pub const PROBE: u8 = 5;
    /// ATTACH_TABLE (nested extension).
    pub const ATTACH_TABLE: u8 = 6;
    /// INVALIDATE (nested extension).
    pub const INVALIDATE: u8 = 7;
    /// PAGE_RESP (nested extension).
    pub const PAGE_RESP: u8 = 8;
}

/// The nested extension's constants (`docs/wire.md`, "Nested extension").
pub mod nested {
    /// `PGTF_ARM_LPAE`.
    pub const PGTF_ARM_LPAE: u16 = 1;
    /// `PSTF_ARM_SMMU_V3`.
    pub const PSTF_ARM_SMMU_V3: u16 = 2;
    /// `PSTF_INTEL_VTD`.
    pub const PSTF_INTEL_VTD: u16 = 3;
    /// `PGTF_X86_64`.
    pub const PGTF_X86_64: u16 = 4;
    /// INVALIDATE `inv_gran`: the whole domain.
    pub const INV_G_DOMAIN: u16 = 1;
    /// INVALIDATE `inv_gran`: one PASID.
    pub const INV_G_PASID: u16 = 2;
    /// INVALIDATE `inv_gran`: a range of addresses.
    pub const INV_G_VA: u16 = 4;
    /// INVALIDATE `inv_type`: the IOTLB (and paging-structure caches).
    pub const INV_T_IOTLB: u16 = 1;
    /// INVALIDATE `inv_type`: device IOTLBs.
    pub const INV_T_DEV_IOTLB: u16 = 2;
    /// INVALIDATE `inv_type`: the PASID cache (PASID entries / CDs).
    pub const INV_T_PASID: u16 = 4;
    /// INVALIDATE `flags`: `pasid` is valid.
    pub const INV_F_PASID: u16 = 1;
    /// INVALIDATE `flags`: `archid` is valid.
    pub const INV_F_ARCHID: u16 = 2;
    /// INVALIDATE `flags`: only leaf entries changed.
    pub const INV_F_LEAF: u16 = 4;
    /// PAGE_RESP `flags`: `pasid` is valid.
    pub const PAGE_RESP_F_PASID_VALID: u32 = 1;
    /// PAGE_RESP `code`: the page is there, retry the access.
    pub const PAGE_RESP_SUCCESS: u16 = 0;
    /// PAGE_RESP `code`: the request was invalid.
    pub const PAGE_RESP_INVALID: u16 = 1;
    /// PAGE_RESP `code`: abort the access.
    pub const PAGE_RESP_FAILURE: u16 = 2;
    /// Probe property `PAGE_SIZE_MASK`.
    pub const PROBE_T_PAGE_SIZE_MASK: u16 = 2;
    /// Probe property `INPUT_RANGE`.
    pub const PROBE_T_INPUT_RANGE: u16 = 3;
    /// Probe property `OUTPUT_SIZE`.
    pub const PROBE_T_OUTPUT_SIZE: u16 = 4;
    /// Probe property `PASID_SIZE`.
    pub const PROBE_T_PASID_SIZE: u16 = 5;
    /// Probe property `PAGE_TABLE_FMT`.
    pub const PROBE_T_PAGE_TABLE_FMT: u16 = 6;
    /// Probe property `PASID_TABLE_FMT`.
    pub const PROBE_T_PASID_TABLE_FMT: u16 = 7;
    /// Extended fault record `flt_type`: an unrecoverable fault.
    pub const FLT_DMA_UNRECOV: u16 = 1;
    /// Extended fault record `flt_type`: a page request.
    pub const FLT_PAGE_REQ: u16 = 2;
    /// Fault flag: `pasid` is valid.
    pub const FAULT_F_PASID: u32 = 1 << 9;
    /// Page-request flag: the last request of its group.
    pub const PR_F_LAST_PAGE: u32 = 1;
    /// Size of the extended fault record.
    pub const EXT_FAULT_SIZE: u32 = 40;
}

/// Request statuses (virtio 1.3 5.13.6).
pub mod status {
    /// OK.
    pub const OK: u8 = 0;
    /// IOERR.
    pub const IOERR: u8 = 1;
    /// UNSUPP.
    pub const UNSUPP: u8 = 2;
    /// DEVERR.
    pub const DEVERR: u8 = 3;
    /// INVAL.
    pub const INVAL: u8 = 4;
    /// RANGE.
    pub const RANGE: u8 = 5;
    /// NOENT.
    pub const NOENT: u8 = 6;
    /// FAULT.
    pub const FAULT: u8 = 7;
    /// NOMEM.
    pub const NOMEM: u8 = 8;
}

/// `VIRTIO_IOMMU_ATTACH_F_BYPASS`.
pub const ATTACH_F_BYPASS: u32 = 1;
/// `VIRTIO_IOMMU_MAP_F_READ`.
pub const MAP_F_READ: u32 = 1;
/// `VIRTIO_IOMMU_MAP_F_WRITE`.
pub const MAP_F_WRITE: u32 = 2;
/// Fault reason: the endpoint is unknown.
pub const FAULT_R_UNKNOWN: u8 = 0;
/// Fault reason: no domain (and no bypass).
pub const FAULT_R_DOMAIN: u8 = 1;
/// Fault reason: no mapping, or not with that permission.
pub const FAULT_R_MAPPING: u8 = 2;
/// Fault flag: a read.
pub const FAULT_F_READ: u32 = 1;
/// Fault flag: a write.
pub const FAULT_F_WRITE: u32 = 2;
/// Fault flag: `address` is valid.
pub const FAULT_F_ADDRESS: u32 = 1 << 8;
/// `VIRTIO_IOMMU_PROBE_T_RESV_MEM`.
pub const PROBE_T_RESV_MEM: u16 = 1;
/// `VIRTIO_IOMMU_RESV_MEM_T_MSI`.
pub const RESV_MEM_T_MSI: u8 = 1;
/// Size of a fault record.
pub const FAULT_SIZE: u32 = 24;
/// Size of the tail.
pub const TAIL_SIZE: u32 = 4;

/// Config-space offsets (`struct virtio_iommu_config`).
pub mod config {
    /// `page_size_mask`.
    pub const PAGE_SIZE_MASK: u64 = 0;
    /// `input_range.start`.
    pub const INPUT_START: u64 = 8;
    /// `input_range.end`.
    pub const INPUT_END: u64 = 16;
    /// `domain_range.start`.
    pub const DOMAIN_START: u64 = 24;
    /// `domain_range.end`.
    pub const DOMAIN_END: u64 = 28;
    /// `probe_size`.
    pub const PROBE_SIZE: u64 = 32;
    /// `bypass`.
    pub const BYPASS: u64 = 36;
}

/// Request builders: head + body, as the device reads them.
pub mod req {
    use super::types;

    fn head(t: u8, out: &mut [u8]) {
        out[0] = t;
    }

    fn put32(out: &mut [u8], off: usize, v: u32) {
        out[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put64(out: &mut [u8], off: usize, v: u64) {
        out[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// ATTACH `endpoint` to `domain`.
    pub fn attach(domain: u32, endpoint: u32, flags: u32) -> [u8; 20] {
        let mut b = [0u8; 20];
        head(types::ATTACH, &mut b);
        put32(&mut b, 4, domain);
        put32(&mut b, 8, endpoint);
        put32(&mut b, 12, flags);
        b
    }

    /// DETACH `endpoint` from `domain`.
    pub fn detach(domain: u32, endpoint: u32) -> [u8; 20] {
        let mut b = [0u8; 20];
        head(types::DETACH, &mut b);
        put32(&mut b, 4, domain);
        put32(&mut b, 8, endpoint);
        b
    }

    /// MAP `[virt_start, virt_end]` to `phys_start` in `domain`.
    pub fn map(
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    ) -> [u8; 36] {
        let mut b = [0u8; 36];
        head(types::MAP, &mut b);
        put32(&mut b, 4, domain);
        put64(&mut b, 8, virt_start);
        put64(&mut b, 16, virt_end);
        put64(&mut b, 24, phys_start);
        put32(&mut b, 32, flags);
        b
    }

    /// UNMAP `[virt_start, virt_end]` in `domain`.
    pub fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> [u8; 28] {
        let mut b = [0u8; 28];
        head(types::UNMAP, &mut b);
        put32(&mut b, 4, domain);
        put64(&mut b, 8, virt_start);
        put64(&mut b, 16, virt_end);
        b
    }

    /// PROBE `endpoint`.
    pub fn probe(endpoint: u32) -> [u8; 72] {
        let mut b = [0u8; 72];
        head(types::PROBE, &mut b);
        put32(&mut b, 4, endpoint);
        b
    }

    fn put16(out: &mut [u8], off: usize, v: u16) {
        out[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// ATTACH_TABLE `endpoint` to `domain` with a `PSTF_INTEL_VTD` PASID
    /// directory at `pasid_dir_ptr` for `pasid_bits`-wide PASIDs.
    pub fn attach_table_vtd(
        domain: u32,
        endpoint: u32,
        pasid_bits: u8,
        pasid_dir_ptr: u64,
    ) -> [u8; 76] {
        let mut b = [0u8; 76];
        head(types::ATTACH_TABLE, &mut b);
        put32(&mut b, 4, domain);
        put32(&mut b, 8, endpoint);
        put16(&mut b, 12, super::nested::PSTF_INTEL_VTD);
        b[14] = pasid_bits;
        // b[15]: flags, none defined.
        put64(&mut b, 16, pasid_dir_ptr);
        b
    }

    /// ATTACH_TABLE `endpoint` to `domain` with a `PSTF_ARM_SMMU_V3` CD
    /// table at `s1contextptr` (`s1fmt`, `s1dss`, `1 << s1cdmax` CDs).
    pub fn attach_table_smmuv3(
        domain: u32,
        endpoint: u32,
        s1fmt: u8,
        s1dss: u8,
        s1contextptr: u64,
        s1cdmax: u32,
    ) -> [u8; 76] {
        let mut b = [0u8; 76];
        head(types::ATTACH_TABLE, &mut b);
        put32(&mut b, 4, domain);
        put32(&mut b, 8, endpoint);
        put16(&mut b, 12, super::nested::PSTF_ARM_SMMU_V3);
        b[14] = s1fmt;
        b[15] = s1dss;
        put64(&mut b, 16, s1contextptr);
        put32(&mut b, 24, s1cdmax);
        b
    }

    /// ATTACH_TABLE `endpoint` to `domain` with a `PGTF_X86_64` table of
    /// `levels` levels at `root` (no PASIDs).
    pub fn attach_table_x86(domain: u32, endpoint: u32, levels: u8, root: u64) -> [u8; 76] {
        let mut b = [0u8; 76];
        head(types::ATTACH_TABLE, &mut b);
        put32(&mut b, 4, domain);
        put32(&mut b, 8, endpoint);
        put16(&mut b, 12, super::nested::PGTF_X86_64);
        b[14] = levels;
        // b[15]: flags, none defined.
        put64(&mut b, 16, root);
        b
    }

    /// ATTACH_TABLE `endpoint` to `domain` with a `PGTF_ARM_LPAE` regime:
    /// `asid`, `tcr` (TCR_EL1 layout), `ttbr0`, `ttbr1`, `mair`.
    pub fn attach_table_lpae(
        domain: u32,
        endpoint: u32,
        asid: u16,
        tcr: u64,
        ttbr: (u64, u64),
        mair: u64,
    ) -> [u8; 76] {
        let mut b = [0u8; 76];
        head(types::ATTACH_TABLE, &mut b);
        put32(&mut b, 4, domain);
        put32(&mut b, 8, endpoint);
        put16(&mut b, 12, super::nested::PGTF_ARM_LPAE);
        put16(&mut b, 14, asid);
        put64(&mut b, 16, tcr);
        put64(&mut b, 24, ttbr.0);
        put64(&mut b, 32, ttbr.1);
        put64(&mut b, 40, mair);
        b
    }

    /// One INVALIDATE request.
    #[derive(Clone, Copy, Default)]
    pub struct Invalidate {
        /// `inv_gran`.
        pub gran: u16,
        /// `inv_type`.
        pub types: u16,
        /// `flags`.
        pub flags: u16,
        /// `domain`.
        pub domain: u32,
        /// `pasid`.
        pub pasid: u32,
        /// `archid`.
        pub archid: u64,
        /// `virt_start`.
        pub virt_start: u64,
        /// `nr_pages`.
        pub nr_pages: u64,
        /// `granule` (log2).
        pub granule: u8,
    }

    /// Copies that change one thing, for tables of cases.
    impl Invalidate {
        /// With `inv_gran` `gran`.
        pub const fn gran(self, gran: u16) -> Self {
            Invalidate { gran, ..self }
        }

        /// With `inv_type` `types`.
        pub const fn types(self, types: u16) -> Self {
            Invalidate { types, ..self }
        }

        /// With `flags` `flags`.
        pub const fn flags(self, flags: u16) -> Self {
            Invalidate { flags, ..self }
        }

        /// Naming `domain`.
        pub const fn domain(self, domain: u32) -> Self {
            Invalidate { domain, ..self }
        }

        /// With `pasid` `pasid` (flags unchanged).
        pub const fn pasid(self, pasid: u32) -> Self {
            Invalidate { pasid, ..self }
        }

        /// With `archid` `archid` (flags unchanged).
        pub const fn archid(self, archid: u64) -> Self {
            Invalidate { archid, ..self }
        }

        /// With the range of `nr_pages` pages of `1 << granule` bytes from
        /// `virt_start`.
        pub const fn range(self, virt_start: u64, nr_pages: u64, granule: u8) -> Self {
            Invalidate {
                virt_start,
                nr_pages,
                granule,
                ..self
            }
        }
    }

    /// INVALIDATE, as `i` says.
    pub fn invalidate(i: &Invalidate) -> [u8; 60] {
        let mut b = [0u8; 60];
        head(types::INVALIDATE, &mut b);
        put16(&mut b, 4, i.gran);
        put16(&mut b, 6, i.types);
        put16(&mut b, 8, i.flags);
        put32(&mut b, 12, i.domain);
        put32(&mut b, 16, i.pasid);
        put64(&mut b, 24, i.archid);
        put64(&mut b, 32, i.virt_start);
        put64(&mut b, 40, i.nr_pages);
        b[48] = i.granule;
        b
    }

    /// PAGE_RESP for group `grpid` of `endpoint` (with `pasid` if any).
    pub fn page_resp(endpoint: u32, pasid: Option<u32>, grpid: u32, code: u16) -> [u8; 32] {
        let mut b = [0u8; 32];
        head(types::PAGE_RESP, &mut b);
        put32(&mut b, 4, endpoint);
        if let Some(p) = pasid {
            put32(&mut b, 8, super::nested::PAGE_RESP_F_PASID_VALID);
            put32(&mut b, 12, p);
        }
        put32(&mut b, 16, grpid);
        put16(&mut b, 20, code);
        b
    }
}

/// A decoded fault record: the spec's 24-byte record, or the nested
/// extension's 40-byte one (whose extra fields are zero in the former).
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    /// `FAULT_R_*`.
    pub reason: u8,
    /// `FAULT_F_*`.
    pub flags: u32,
    /// The endpoint.
    pub endpoint: u32,
    /// The address.
    pub address: u64,
    /// `nested::FLT_*` (extended record only).
    pub flt_type: u16,
    /// `nested::PR_F_*` (extended record only).
    pub pr_evt_flags: u32,
    /// The PASID, with `nested::FAULT_F_PASID` (extended record only).
    pub pasid: u32,
    /// The page-request group (extended record only).
    pub grpid: u32,
    /// The used length the device reported.
    pub len: u32,
}

/// What came back for one request.
#[derive(Clone, Copy, Debug)]
pub struct Reply {
    /// The used length the device reported.
    pub used_len: u32,
    /// The status byte of the tail, if the device wrote the tail (used
    /// length covering it).
    pub status: Option<u8>,
}

/// Request queue size the driver uses.
pub const REQUEST_QUEUE_SIZE: u16 = 64;
/// Event queue size the driver uses.
pub const EVENT_QUEUE_SIZE: u16 = 16;
/// Bytes of each event buffer (a fault record with room to spare).
pub const EVENT_BUFFER_SIZE: u32 = 64;
/// How long to wait for a used entry (or a status bit): the device
/// answers on the notify exit or, through an ioeventfd, on its worker
/// thread within microseconds, so anything near this means it dropped the
/// request.
pub const WAIT_CYCLES: u64 = 200_000_000;

/// The virtio-iommu device as the driver sees it.
pub struct Iommu {
    /// The transport.
    pub t: Transport,
    /// The request queue.
    pub req: Virtqueue,
    /// The event queue.
    pub evt: Virtqueue,
    /// The features negotiated.
    pub features: u64,
    /// Scratch for request bodies (one page).
    pub req_buf: u64,
    /// Scratch for device-writable parts (two pages).
    pub resp_buf: u64,
    /// The event buffers.
    pub evt_bufs: u64,
    /// `probe_size` from the config space.
    pub probe_size: u32,
    /// The features asked for (kept for [`Iommu::restart`]).
    pub wanted: u64,
    /// Bytes of each posted event buffer: exactly one extended fault
    /// record once the nested extension is negotiated, else
    /// [`EVENT_BUFFER_SIZE`].
    pub evt_buf_len: u32,
}

/// Most INVALIDATEs [`Iommu::invalidate_batch`] sends at once (two
/// descriptors and 64 request bytes each).
pub const MAX_BATCH: usize = 16;

/// Most requests [`Iommu::post_batch`] offers at once: two descriptors
/// each fill the request queue.
pub const MAX_POSTED: usize = REQUEST_QUEUE_SIZE as usize / 2;

/// Features a driver of this project asks for, when offered.
pub const WANTED: u64 = virtio::F_VERSION_1
    | features::INPUT_RANGE
    | features::DOMAIN_RANGE
    | features::MAP_UNMAP
    | features::PROBE
    | features::MMIO
    | features::BYPASS_CONFIG;

impl Iommu {
    /// Finds the device at `base`, negotiates [`WANTED`], sets up both
    /// queues, posts the event buffers and sets DRIVER_OK.
    pub fn init(base: u64, alloc: &mut Bump) -> Self {
        Self::init_with(base, alloc, WANTED)
    }

    /// Like [`Iommu::init`], asking for `wanted` (e.g. [`WANTED`] plus the
    /// nested extension's bits).
    pub fn init_with(base: u64, alloc: &mut Bump, wanted: u64) -> Self {
        let t = Transport::new(base);
        check_eq!(
            t.read(virtio::regs::DEVICE_ID),
            DEVICE_ID,
            "virtio device ID"
        );
        let features = match t.negotiate(wanted) {
            Ok(f) => f,
            Err(e) => {
                println!("FAIL: feature negotiation: {e}");
                rt::exit(line!());
            }
        };
        check!(features & virtio::F_VERSION_1 != 0, "VERSION_1 not offered");
        check!(features & features::MAP_UNMAP != 0, "MAP_UNMAP not offered");
        let req = Virtqueue::new(alloc, REQUEST_QUEUE_SIZE);
        let evt = Virtqueue::new(alloc, EVENT_QUEUE_SIZE);
        let req_buf = alloc.pages(1);
        // probe_size (at most 4096) plus the tail.
        let resp_buf = alloc.pages(2);
        let evt_bufs = alloc.alloc(
            u64::from(EVENT_BUFFER_SIZE) * u64::from(EVENT_QUEUE_SIZE),
            64,
        );
        let mut dev = Iommu {
            t,
            req,
            evt,
            features,
            req_buf,
            resp_buf,
            evt_bufs,
            probe_size: 0,
            wanted,
            evt_buf_len: EVENT_BUFFER_SIZE,
        };
        dev.start();
        dev
    }

    /// Whether the device writes the nested extension's 40-byte record.
    pub fn extended_faults(&self) -> bool {
        self.features & (features::ATTACH_TABLE | features::PAGE_REQUEST) != 0
    }

    /// Programs both queues, posts every event buffer, DRIVER_OK.
    pub fn start(&mut self) {
        self.evt_buf_len = if self.extended_faults() {
            nested::EXT_FAULT_SIZE
        } else {
            EVENT_BUFFER_SIZE
        };
        if let Err(e) = self.t.setup_queue(0, &self.req) {
            println!("FAIL: requestq set-up: {e}");
            rt::exit(line!());
        }
        if let Err(e) = self.t.setup_queue(1, &self.evt) {
            println!("FAIL: eventq set-up: {e}");
            rt::exit(line!());
        }
        for i in 0..EVENT_QUEUE_SIZE {
            self.post_event_buffer(i);
        }
        self.t.add_status(virtio::STATUS_DRIVER_OK);
        check!(
            self.t.status() & virtio::STATUS_DEVICE_NEEDS_RESET == 0,
            "device needs a reset right after DRIVER_OK"
        );
        self.t.notify(1);
        self.probe_size = self.t.config32(config::PROBE_SIZE);
    }

    /// Resets the device and brings it up again with the same queues
    /// (rewound) and features.
    pub fn restart(&mut self) {
        self.req.rewind();
        self.evt.rewind();
        match self.t.negotiate(self.wanted) {
            Ok(f) => self.features = f,
            Err(e) => {
                println!("FAIL: renegotiation: {e}");
                rt::exit(line!());
            }
        }
        self.start();
    }

    fn post_event_buffer(&mut self, i: u16) {
        let addr = self.evt_bufs + u64::from(i) * u64::from(EVENT_BUFFER_SIZE);
        rt::zero(addr, u64::from(EVENT_BUFFER_SIZE));
        self.evt
            .set_desc(i, addr, self.evt_buf_len, virtio::DESC_F_WRITE, 0);
        self.evt.push(i);
    }

    /// Sends `request` (copied to the scratch page) with `writable` bytes
    /// for the device (the tail last), and waits for the answer.
    pub fn send(&mut self, request: &[u8], writable: u32) -> Reply {
        rt::write_bytes(self.req_buf, request);
        // Poison the writable part so an unwritten tail is told apart.
        for i in 0..u64::from(writable) {
            rt::poke8(self.resp_buf + i, 0xa5);
        }
        self.send_segs(&[
            Seg {
                addr: self.req_buf,
                len: request.len() as u32,
                write: false,
            },
            Seg {
                addr: self.resp_buf,
                len: writable,
                write: true,
            },
        ])
    }

    /// Notifies the request queue of what was pushed, unless the device
    /// asked for no notification (its worker is polling the queue).
    fn notify_requests(&self) {
        if self.req.wants_notification() {
            self.t.notify(0);
        }
    }

    /// Sends one chain made of `segs` and waits for it; the status is read
    /// from the last four bytes of the last writable segment.
    pub fn send_segs(&mut self, segs: &[Seg]) -> Reply {
        let head = self.req.set_chain(segs);
        self.req.push(head);
        self.notify_requests();
        let Some((id, used_len)) = self.req.wait_used(WAIT_CYCLES) else {
            println!("FAIL: no used entry for a request");
            rt::exit(line!());
        };
        check_eq!(id, u32::from(head), "used id");
        let tail = segs.iter().rev().find(|s| s.write && s.len >= TAIL_SIZE);
        let total_writable: u64 = segs
            .iter()
            .filter(|s| s.write)
            .map(|s| u64::from(s.len))
            .sum();
        let status = match tail {
            Some(s) if u64::from(used_len) == total_writable => {
                Some(rt::peek8(s.addr + u64::from(s.len - TAIL_SIZE)))
            }
            _ => None,
        };
        Reply { used_len, status }
    }

    /// Sends a request with only a tail to write; returns its status (or
    /// ends the guest if the device did not write one).
    pub fn request(&mut self, request: &[u8]) -> u8 {
        let r = self.send(request, TAIL_SIZE);
        match r.status {
            Some(s) => s,
            None => {
                println!(
                    "FAIL: request type {} returned unwritten (used len {})",
                    request[0], r.used_len
                );
                rt::exit(line!());
            }
        }
    }

    /// ATTACH.
    pub fn attach(&mut self, domain: u32, endpoint: u32, flags: u32) -> u8 {
        self.request(&req::attach(domain, endpoint, flags))
    }

    /// DETACH.
    pub fn detach(&mut self, domain: u32, endpoint: u32) -> u8 {
        self.request(&req::detach(domain, endpoint))
    }

    /// MAP.
    pub fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys: u64,
        flags: u32,
    ) -> u8 {
        self.request(&req::map(domain, virt_start, virt_end, phys, flags))
    }

    /// UNMAP.
    pub fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> u8 {
        self.request(&req::unmap(domain, virt_start, virt_end))
    }

    /// PROBE; the properties are at `self.resp_buf`, `probe_size` bytes.
    pub fn probe(&mut self, endpoint: u32) -> u8 {
        let r = self.send(&req::probe(endpoint), self.probe_size + TAIL_SIZE);
        match r.status {
            Some(s) => s,
            None => {
                println!("FAIL: PROBE returned unwritten (used len {})", r.used_len);
                rt::exit(line!());
            }
        }
    }

    /// The next fault record on the event queue, if one is there; its
    /// buffer goes straight back to the device.
    pub fn next_fault(&mut self) -> Option<Fault> {
        loop {
            let (id, len) = self.evt.pop_used()?;
            let i = (id % u32::from(EVENT_QUEUE_SIZE)) as u16;
            let b = self.evt_bufs + u64::from(i) * u64::from(EVENT_BUFFER_SIZE);
            let extended = self.extended_faults();
            let f = if extended {
                // docs/wire.md "Extended fault record (40 bytes)".
                Fault {
                    reason: rt::peek8(b),
                    flt_type: rt::peek16(b + 4),
                    flags: rt::peek32(b + 8),
                    pr_evt_flags: rt::peek32(b + 12),
                    endpoint: rt::peek32(b + 16),
                    pasid: rt::peek32(b + 20),
                    grpid: rt::peek32(b + 24),
                    address: rt::peek64(b + 32),
                    len,
                }
            } else {
                Fault {
                    reason: rt::peek8(b),
                    flags: rt::peek32(b + 4),
                    endpoint: rt::peek32(b + 8),
                    address: rt::peek64(b + 16),
                    flt_type: 0,
                    pr_evt_flags: 0,
                    pasid: 0,
                    grpid: 0,
                    len,
                }
            };
            self.post_event_buffer(i);
            self.t.notify(1);
            // A buffer returned empty carries no record: look at the next.
            let want = if extended {
                nested::EXT_FAULT_SIZE
            } else {
                FAULT_SIZE
            };
            if len >= want {
                return Some(f);
            }
        }
    }

    /// ATTACH_TABLE (built by `req::attach_table_*`).
    pub fn attach_table(&mut self, request: &[u8; 76]) -> u8 {
        self.request(request)
    }

    /// INVALIDATE.
    pub fn invalidate(&mut self, i: &req::Invalidate) -> u8 {
        self.request(&req::invalidate(i))
    }

    /// PAGE_RESP.
    pub fn page_resp(&mut self, endpoint: u32, pasid: Option<u32>, grpid: u32, code: u16) -> u8 {
        self.request(&req::page_resp(endpoint, pasid, grpid, code))
    }

    /// Sends the INVALIDATEs of `batch` as one chain each, all with one
    /// notification (so the device coalesces them), and returns their
    /// statuses in order. At most [`MAX_BATCH`] requests.
    pub fn invalidate_batch(&mut self, batch: &[req::Invalidate], out: &mut [u8]) {
        check!(
            batch.len() <= MAX_BATCH && out.len() >= batch.len(),
            "INVALIDATE batch of {} requests",
            batch.len()
        );
        // Request i at req_buf + 64 i, its tail at resp_buf + 4 i; chain i
        // in descriptors 2i and 2i + 1.
        for (i, inv) in batch.iter().enumerate() {
            let rq = self.req_buf + 64 * i as u64;
            let tail = self.resp_buf + u64::from(TAIL_SIZE) * i as u64;
            rt::write_bytes(rq, &req::invalidate(inv));
            rt::poke32(tail, 0xa5a5_a5a5);
            let d = (2 * i) as u16;
            self.req.set_desc(d, rq, 60, virtio::DESC_F_NEXT, d + 1);
            self.req
                .set_desc(d + 1, tail, TAIL_SIZE, virtio::DESC_F_WRITE, 0);
            self.req.push(d);
        }
        self.notify_requests();
        for _ in 0..batch.len() {
            let Some((id, used_len)) = self.req.wait_used(WAIT_CYCLES) else {
                println!("FAIL: no used entry for a batched INVALIDATE");
                rt::exit(line!());
            };
            check!(
                id % 2 == 0 && (id / 2) < batch.len() as u32,
                "used id {id} of a batch"
            );
            check_eq!(used_len, TAIL_SIZE, "used length of a batched INVALIDATE");
            let i = (id / 2) as usize;
            out[i] = rt::peek8(self.resp_buf + u64::from(TAIL_SIZE) * i as u64);
        }
    }

    /// Offers `reqs` (each at most 64 bytes) as one chain each — request
    /// `i` in descriptors `2i` and `2i + 1`, its tail at `resp_buf + 4i` —
    /// all with one notification, and returns without waiting: collect
    /// the statuses with [`Iommu::wait_batch`] before sending anything
    /// else. At most [`MAX_POSTED`] requests.
    pub fn post_batch(&mut self, reqs: &[&[u8]]) {
        check!(reqs.len() <= MAX_POSTED, "batch of {} requests", reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            check!(r.len() <= 64, "batched request of {} bytes", r.len());
            let rq = self.req_buf + 64 * i as u64;
            let tail = self.resp_buf + u64::from(TAIL_SIZE) * i as u64;
            rt::write_bytes(rq, r);
            rt::poke32(tail, 0xa5a5_a5a5);
            let d = (2 * i) as u16;
            self.req
                .set_desc(d, rq, r.len() as u32, virtio::DESC_F_NEXT, d + 1);
            self.req
                .set_desc(d + 1, tail, TAIL_SIZE, virtio::DESC_F_WRITE, 0);
            self.req.push(d);
        }
        self.notify_requests();
    }

    /// Waits for the `n` requests [`Iommu::post_batch`] offered and writes
    /// their statuses, in offer order, to `out`.
    pub fn wait_batch(&mut self, n: usize, out: &mut [u8]) {
        check!(n <= out.len(), "{n} statuses into {}", out.len());
        for _ in 0..n {
            let Some((id, used_len)) = self.req.wait_used(WAIT_CYCLES) else {
                println!("FAIL: no used entry for a batched request");
                rt::exit(line!());
            };
            check!(
                id % 2 == 0 && (id / 2) < n as u32,
                "used id {id} of a batch of {n}"
            );
            check_eq!(used_len, TAIL_SIZE, "used length of a batched request");
            let i = (id / 2) as usize;
            out[i] = rt::peek8(self.resp_buf + u64::from(TAIL_SIZE) * i as u64);
        }
    }

    /// Config-space `bypass`.
    pub fn bypass(&self) -> u8 {
        self.t.config8(config::BYPASS)
    }

    /// Writes config-space `bypass`.
    pub fn set_bypass(&self, v: u8) {
        self.t.set_config8(config::BYPASS, v)
    }
}
