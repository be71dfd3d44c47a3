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
}

/// A decoded fault record.
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
/// How long to wait for a used entry: the device answers during the
/// notify exit, so anything near this means it dropped the request.
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
}

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
        let t = Transport::new(base);
        check_eq!(
            t.read(virtio::regs::DEVICE_ID),
            DEVICE_ID,
            "virtio device ID"
        );
        let features = match t.negotiate(WANTED) {
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
        };
        dev.start();
        dev
    }

    /// Programs both queues, posts every event buffer, DRIVER_OK.
    pub fn start(&mut self) {
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
        match self.t.negotiate(WANTED) {
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
            .set_desc(i, addr, EVENT_BUFFER_SIZE, virtio::DESC_F_WRITE, 0);
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

    /// Sends one chain made of `segs` and waits for it; the status is read
    /// from the last four bytes of the last writable segment.
    pub fn send_segs(&mut self, segs: &[Seg]) -> Reply {
        let head = self.req.set_chain(segs);
        self.req.push(head);
        self.t.notify(0);
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
            let f = Fault {
                reason: rt::peek8(b),
                flags: rt::peek32(b + 4),
                endpoint: rt::peek32(b + 8),
                address: rt::peek64(b + 16),
            };
            self.post_event_buffer(i);
            self.t.notify(1);
            // A buffer returned empty carries no record: look at the next.
            if len >= FAULT_SIZE {
                return Some(f);
            }
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
