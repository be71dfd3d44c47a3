//! The virtio-iommu wire format: every request, response, probe property,
//! config-space field and event record of the device (virtio spec v1.3,
//! device ID 23), as little-endian plain data with bounds-checked
//! decode/encode.
//!
//! This module knows bytes only. It never applies a rule of the spec beyond
//! the layout: a decoded request may still carry a bad flag or a reserved
//! field the state model rejects. No input can make it panic: every decoder
//! takes a slice and returns `None` when the slice is too short.
//!
//! The layouts, with offsets and sizes, are in `docs/wire.md`.

pub mod ext;
pub use ext::*;

/// The virtio device ID of the IOMMU device.
pub const VIRTIO_ID_IOMMU: u32 = 23;

/// Index of the request virtqueue.
pub const REQUEST_QUEUE: u16 = 0;
/// Index of the event virtqueue.
pub const EVENT_QUEUE: u16 = 1;

/// Feature bit: `input_range` describes the translatable virtual range.
pub const VIRTIO_IOMMU_F_INPUT_RANGE: u32 = 0;
/// Feature bit: `domain_range` describes the valid domain IDs.
pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u32 = 1;
/// Feature bit: MAP and UNMAP requests are available.
pub const VIRTIO_IOMMU_F_MAP_UNMAP: u32 = 2;
/// Feature bit (legacy): unattached endpoints are in bypass mode.
pub const VIRTIO_IOMMU_F_BYPASS: u32 = 3;
/// Feature bit: the PROBE request is available.
pub const VIRTIO_IOMMU_F_PROBE: u32 = 4;
/// Feature bit: the `VIRTIO_IOMMU_MAP_F_MMIO` flag is available.
pub const VIRTIO_IOMMU_F_MMIO: u32 = 5;
/// Feature bit: config field `bypass` and `VIRTIO_IOMMU_ATTACH_F_BYPASS`.
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u32 = 6;
/// Transport feature bit: the device complies with virtio 1.x.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Transport feature bit: the device sits behind a platform IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

/// Request type ATTACH.
pub const VIRTIO_IOMMU_T_ATTACH: u8 = 1;
/// Request type DETACH.
pub const VIRTIO_IOMMU_T_DETACH: u8 = 2;
/// Request type MAP.
pub const VIRTIO_IOMMU_T_MAP: u8 = 3;
/// Request type UNMAP.
pub const VIRTIO_IOMMU_T_UNMAP: u8 = 4;
/// Request type PROBE.
pub const VIRTIO_IOMMU_T_PROBE: u8 = 5;

/// ATTACH flag: the domain is a bypass domain.
pub const VIRTIO_IOMMU_ATTACH_F_BYPASS: u32 = 1 << 0;

/// MAP flag: read access is allowed.
pub const VIRTIO_IOMMU_MAP_F_READ: u32 = 1 << 0;
/// MAP flag: write access is allowed.
pub const VIRTIO_IOMMU_MAP_F_WRITE: u32 = 1 << 1;
/// MAP flag: the mapping targets memory-mapped I/O.
pub const VIRTIO_IOMMU_MAP_F_MMIO: u32 = 1 << 2;

/// PROBE property type RESV_MEM.
pub const VIRTIO_IOMMU_PROBE_T_RESV_MEM: u16 = 1;
/// RESV_MEM subtype: addresses that cannot be mapped.
pub const VIRTIO_IOMMU_RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: an MSI doorbell region.
pub const VIRTIO_IOMMU_RESV_MEM_T_MSI: u8 = 1;

/// Fault reason: an internal error or one no other reason describes.
pub const VIRTIO_IOMMU_FAULT_R_UNKNOWN: u8 = 0;
/// Fault reason: the endpoint is not attached to a domain.
pub const VIRTIO_IOMMU_FAULT_R_DOMAIN: u8 = 1;
/// Fault reason: the address is not mapped or lacks the permission.
pub const VIRTIO_IOMMU_FAULT_R_MAPPING: u8 = 2;
/// Fault flag: the faulting access was a read.
pub const VIRTIO_IOMMU_FAULT_F_READ: u32 = 1 << 0;
/// Fault flag: the faulting access was a write.
pub const VIRTIO_IOMMU_FAULT_F_WRITE: u32 = 1 << 1;
/// Fault flag: `address` holds the faulting address.
pub const VIRTIO_IOMMU_FAULT_F_ADDRESS: u32 = 1 << 8;

/// Size of `struct virtio_iommu_req_head`.
pub const HEAD_SIZE: usize = 4;
/// Size of `struct virtio_iommu_req_tail`.
pub const TAIL_SIZE: usize = 4;
/// Size of the device-readable body of ATTACH after the head.
pub const ATTACH_BODY_SIZE: usize = 16;
/// Size of the device-readable body of DETACH after the head.
pub const DETACH_BODY_SIZE: usize = 16;
/// Size of the device-readable body of MAP after the head.
pub const MAP_BODY_SIZE: usize = 32;
/// Size of the device-readable body of UNMAP after the head.
pub const UNMAP_BODY_SIZE: usize = 24;
/// Size of the device-readable body of PROBE after the head.
pub const PROBE_BODY_SIZE: usize = 68;
/// Size of the largest device-readable part of any request this device
/// parses (head + body); bytes beyond it are ignored.
pub const MAX_READABLE_SIZE: usize = HEAD_SIZE + ext::ATTACH_TABLE_BODY_SIZE;
/// Size of a probe property header.
pub const PROPERTY_HEADER_SIZE: usize = 4;
/// Size of a RESV_MEM property including its header.
pub const RESV_MEM_PROPERTY_SIZE: usize = 24;
/// Size of `struct virtio_iommu_fault`.
pub const FAULT_SIZE: usize = 24;
/// Size of `struct virtio_iommu_config`.
pub const CONFIG_SIZE: usize = 40;

/// Status codes written into the request tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// The request succeeded.
    Ok = 0,
    /// Virtio communication error (malformed buffers).
    IoErr = 1,
    /// Unsupported request.
    Unsupp = 2,
    /// Internal device error.
    DevErr = 3,
    /// Invalid parameters.
    Inval = 4,
    /// Out-of-range parameters.
    Range = 5,
    /// Entry not found.
    NoEnt = 6,
    /// Bad address.
    Fault = 7,
    /// Insufficient resources.
    NoMem = 8,
}

impl Status {
    /// Decodes a status byte, `None` for an unknown value.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::IoErr,
            2 => Status::Unsupp,
            3 => Status::DevErr,
            4 => Status::Inval,
            5 => Status::Range,
            6 => Status::NoEnt,
            7 => Status::Fault,
            8 => Status::NoMem,
            _ => return None,
        })
    }

    /// Encodes the status as the four bytes of `struct virtio_iommu_req_tail`
    /// (reserved bytes zero, as the spec asks of the device).
    pub fn to_tail(self) -> [u8; TAIL_SIZE] {
        [self as u8, 0, 0, 0]
    }
}

pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// `struct virtio_iommu_req_attach` without head and tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AttachReq {
    /// Domain ID.
    pub domain: u32,
    /// Endpoint ID.
    pub endpoint: u32,
    /// `VIRTIO_IOMMU_ATTACH_F_*` flags.
    pub flags: u32,
    /// The four reserved bytes, kept so the state model can check them.
    pub reserved: [u8; 4],
}

impl AttachReq {
    /// Decodes the body that follows the head; `None` if `b` is too short.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..ATTACH_BODY_SIZE)?;
        Some(AttachReq {
            domain: le32(b, 0),
            endpoint: le32(b, 4),
            flags: le32(b, 8),
            reserved: [b[12], b[13], b[14], b[15]],
        })
    }

    /// Encodes the body (for drivers and tests).
    pub fn encode(&self) -> [u8; ATTACH_BODY_SIZE] {
        let mut b = [0u8; ATTACH_BODY_SIZE];
        b[0..4].copy_from_slice(&self.domain.to_le_bytes());
        b[4..8].copy_from_slice(&self.endpoint.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.reserved);
        b
    }
}

/// `struct virtio_iommu_req_detach` without head and tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DetachReq {
    /// Domain ID.
    pub domain: u32,
    /// Endpoint ID.
    pub endpoint: u32,
}

impl DetachReq {
    /// Decodes the body that follows the head; `None` if `b` is too short.
    /// The eight reserved bytes are not kept: the device MUST ignore them.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..DETACH_BODY_SIZE)?;
        Some(DetachReq {
            domain: le32(b, 0),
            endpoint: le32(b, 4),
        })
    }

    /// Encodes the body (for drivers and tests).
    pub fn encode(&self) -> [u8; DETACH_BODY_SIZE] {
        let mut b = [0u8; DETACH_BODY_SIZE];
        b[0..4].copy_from_slice(&self.domain.to_le_bytes());
        b[4..8].copy_from_slice(&self.endpoint.to_le_bytes());
        b
    }
}

/// `struct virtio_iommu_req_map` without head and tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MapReq {
    /// Domain ID.
    pub domain: u32,
    /// First IOVA of the mapping.
    pub virt_start: u64,
    /// Last IOVA of the mapping (inclusive).
    pub virt_end: u64,
    /// Guest-physical address `virt_start` maps to.
    pub phys_start: u64,
    /// `VIRTIO_IOMMU_MAP_F_*` flags.
    pub flags: u32,
}

impl MapReq {
    /// Decodes the body that follows the head; `None` if `b` is too short.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..MAP_BODY_SIZE)?;
        Some(MapReq {
            domain: le32(b, 0),
            virt_start: le64(b, 4),
            virt_end: le64(b, 12),
            phys_start: le64(b, 20),
            flags: le32(b, 28),
        })
    }

    /// Encodes the body (for drivers and tests).
    pub fn encode(&self) -> [u8; MAP_BODY_SIZE] {
        let mut b = [0u8; MAP_BODY_SIZE];
        b[0..4].copy_from_slice(&self.domain.to_le_bytes());
        b[4..12].copy_from_slice(&self.virt_start.to_le_bytes());
        b[12..20].copy_from_slice(&self.virt_end.to_le_bytes());
        b[20..28].copy_from_slice(&self.phys_start.to_le_bytes());
        b[28..32].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// `struct virtio_iommu_req_unmap` without head and tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UnmapReq {
    /// Domain ID.
    pub domain: u32,
    /// First IOVA of the range.
    pub virt_start: u64,
    /// Last IOVA of the range (inclusive).
    pub virt_end: u64,
    /// The four reserved bytes, kept so the state model can check them.
    pub reserved: [u8; 4],
}

impl UnmapReq {
    /// Decodes the body that follows the head; `None` if `b` is too short.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..UNMAP_BODY_SIZE)?;
        Some(UnmapReq {
            domain: le32(b, 0),
            virt_start: le64(b, 4),
            virt_end: le64(b, 12),
            reserved: [b[20], b[21], b[22], b[23]],
        })
    }

    /// Encodes the body (for drivers and tests).
    pub fn encode(&self) -> [u8; UNMAP_BODY_SIZE] {
        let mut b = [0u8; UNMAP_BODY_SIZE];
        b[0..4].copy_from_slice(&self.domain.to_le_bytes());
        b[4..12].copy_from_slice(&self.virt_start.to_le_bytes());
        b[12..20].copy_from_slice(&self.virt_end.to_le_bytes());
        b[20..24].copy_from_slice(&self.reserved);
        b
    }
}

/// The device-readable part of `struct virtio_iommu_req_probe` after the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProbeReq {
    /// Endpoint ID.
    pub endpoint: u32,
}

impl ProbeReq {
    /// Decodes the body that follows the head; `None` if `b` is too short.
    /// The 64 reserved bytes are not kept: the device MUST ignore them.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..PROBE_BODY_SIZE)?;
        Some(ProbeReq {
            endpoint: le32(b, 0),
        })
    }

    /// Encodes the body (for drivers and tests).
    pub fn encode(&self) -> [u8; PROBE_BODY_SIZE] {
        let mut b = [0u8; PROBE_BODY_SIZE];
        b[0..4].copy_from_slice(&self.endpoint.to_le_bytes());
        b
    }
}

/// A decoded request: the head's type and its body.
//
// `repr(C, u32)` puts every body at offset 8. With Rust's own layout the
// bodies of four-byte alignment start at 4 and MAP's at 8, and the code
// that builds a `Request` handled the overlapping fields as 64-bit pieces
// straddling both, going through the stack with a load that spans two
// stores (a store-forwarding stall on every MAP and UNMAP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, u32)]
pub enum Request {
    /// ATTACH.
    Attach(AttachReq),
    /// DETACH.
    Detach(DetachReq),
    /// MAP.
    Map(MapReq),
    /// UNMAP.
    Unmap(UnmapReq),
    /// PROBE.
    Probe(ProbeReq),
    /// ATTACH_TABLE (nested extension).
    AttachTable(AttachTableReq),
    /// INVALIDATE (nested extension).
    Invalidate(InvalidateReq),
    /// PAGE_RESP (nested extension).
    PageResp(PageRespReq),
}

/// Why a device-readable buffer did not decode into a [`Request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer than four bytes: no head to read a type from.
    NoHead,
    /// The type byte names no request this device knows.
    UnknownType(u8),
    /// The buffer ends before the body of a known type does.
    Truncated {
        /// The request type.
        req_type: u8,
        /// Bytes the type needs, head included.
        needed: usize,
        /// Bytes the driver supplied.
        got: usize,
    },
}

impl Request {
    /// Decodes a request from the device-readable bytes (head first).
    /// The reserved bytes of the head are ignored, as the spec requires.
    #[inline]
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < HEAD_SIZE {
            return Err(DecodeError::NoHead);
        }
        let req_type = b[0];
        let body = &b[HEAD_SIZE..];
        let needed = HEAD_SIZE
            + match req_type {
                VIRTIO_IOMMU_T_ATTACH => ATTACH_BODY_SIZE,
                VIRTIO_IOMMU_T_DETACH => DETACH_BODY_SIZE,
                VIRTIO_IOMMU_T_MAP => MAP_BODY_SIZE,
                VIRTIO_IOMMU_T_UNMAP => UNMAP_BODY_SIZE,
                VIRTIO_IOMMU_T_PROBE => PROBE_BODY_SIZE,
                VIRTIO_IOMMU_T_ATTACH_TABLE => ATTACH_TABLE_BODY_SIZE,
                VIRTIO_IOMMU_T_INVALIDATE => INVALIDATE_BODY_SIZE,
                VIRTIO_IOMMU_T_PAGE_RESP => PAGE_RESP_BODY_SIZE,
                t => return Err(DecodeError::UnknownType(t)),
            };
        let truncated = DecodeError::Truncated {
            req_type,
            needed,
            got: b.len(),
        };
        let req = match req_type {
            VIRTIO_IOMMU_T_ATTACH => AttachReq::decode(body).map(Request::Attach),
            VIRTIO_IOMMU_T_DETACH => DetachReq::decode(body).map(Request::Detach),
            VIRTIO_IOMMU_T_MAP => MapReq::decode(body).map(Request::Map),
            VIRTIO_IOMMU_T_UNMAP => UnmapReq::decode(body).map(Request::Unmap),
            VIRTIO_IOMMU_T_ATTACH_TABLE => AttachTableReq::decode(body).map(Request::AttachTable),
            VIRTIO_IOMMU_T_INVALIDATE => InvalidateReq::decode(body).map(Request::Invalidate),
            VIRTIO_IOMMU_T_PAGE_RESP => PageRespReq::decode(body).map(Request::PageResp),
            _ => ProbeReq::decode(body).map(Request::Probe),
        };
        req.ok_or(truncated)
    }

    /// The request type byte.
    pub fn req_type(&self) -> u8 {
        match self {
            Request::Attach(_) => VIRTIO_IOMMU_T_ATTACH,
            Request::Detach(_) => VIRTIO_IOMMU_T_DETACH,
            Request::Map(_) => VIRTIO_IOMMU_T_MAP,
            Request::Unmap(_) => VIRTIO_IOMMU_T_UNMAP,
            Request::Probe(_) => VIRTIO_IOMMU_T_PROBE,
            Request::AttachTable(_) => VIRTIO_IOMMU_T_ATTACH_TABLE,
            Request::Invalidate(_) => VIRTIO_IOMMU_T_INVALIDATE,
            Request::PageResp(_) => VIRTIO_IOMMU_T_PAGE_RESP,
        }
    }

    /// Encodes head and body (for drivers and tests); the head's reserved
    /// bytes are zero.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![self.req_type(), 0, 0, 0];
        match self {
            Request::Attach(r) => v.extend_from_slice(&r.encode()),
            Request::Detach(r) => v.extend_from_slice(&r.encode()),
            Request::Map(r) => v.extend_from_slice(&r.encode()),
            Request::Unmap(r) => v.extend_from_slice(&r.encode()),
            Request::Probe(r) => v.extend_from_slice(&r.encode()),
            Request::AttachTable(r) => v.extend_from_slice(&r.encode()),
            Request::Invalidate(r) => v.extend_from_slice(&r.encode()),
            Request::PageResp(r) => v.extend_from_slice(&r.encode()),
        }
        v
    }
}

/// `struct virtio_iommu_probe_resv_mem`, header included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResvMemProperty {
    /// `VIRTIO_IOMMU_RESV_MEM_T_*`.
    pub subtype: u8,
    /// First reserved IOVA.
    pub start: u64,
    /// Last reserved IOVA (inclusive).
    pub end: u64,
}

impl ResvMemProperty {
    /// Encodes the property with its header; `length` is the size without
    /// the header, as the spec requires.
    pub fn encode(&self) -> [u8; RESV_MEM_PROPERTY_SIZE] {
        let mut b = [0u8; RESV_MEM_PROPERTY_SIZE];
        b[0..2].copy_from_slice(&VIRTIO_IOMMU_PROBE_T_RESV_MEM.to_le_bytes());
        let len = (RESV_MEM_PROPERTY_SIZE - PROPERTY_HEADER_SIZE) as u16;
        b[2..4].copy_from_slice(&len.to_le_bytes());
        b[4] = self.subtype;
        b[8..16].copy_from_slice(&self.start.to_le_bytes());
        b[16..24].copy_from_slice(&self.end.to_le_bytes());
        b
    }

    /// Decodes one RESV_MEM property (header included); `None` if the
    /// bytes are short, the type is not RESV_MEM, or the length is wrong.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..RESV_MEM_PROPERTY_SIZE)?;
        if le16(b, 0) & 0x0fff != VIRTIO_IOMMU_PROBE_T_RESV_MEM || le16(b, 2) != 20 {
            return None;
        }
        Some(ResvMemProperty {
            subtype: b[4],
            start: le64(b, 8),
            end: le64(b, 16),
        })
    }
}

/// `struct virtio_iommu_fault`: one record on the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FaultRecord {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// `VIRTIO_IOMMU_FAULT_F_*`.
    pub flags: u32,
    /// The endpoint that faulted.
    pub endpoint: u32,
    /// The faulting address, meaningful with `VIRTIO_IOMMU_FAULT_F_ADDRESS`.
    pub address: u64,
}

impl FaultRecord {
    /// Encodes the record; reserved fields are zero, as the spec asks.
    pub fn encode(&self) -> [u8; FAULT_SIZE] {
        let mut b = [0u8; FAULT_SIZE];
        b[0] = self.reason;
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.endpoint.to_le_bytes());
        b[16..24].copy_from_slice(&self.address.to_le_bytes());
        b
    }

    /// Decodes a record (for drivers and tests).
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..FAULT_SIZE)?;
        Some(FaultRecord {
            reason: b[0],
            flags: le32(b, 4),
            endpoint: le32(b, 8),
            address: le64(b, 16),
        })
    }
}

/// `struct virtio_iommu_config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConfigSpace {
    /// Page sizes the device can map; the lowest set bit is the granule.
    pub page_size_mask: u64,
    /// First translatable IOVA.
    pub input_start: u64,
    /// Last translatable IOVA (inclusive).
    pub input_end: u64,
    /// First valid domain ID.
    pub domain_start: u32,
    /// Last valid domain ID (inclusive).
    pub domain_end: u32,
    /// Bytes of properties a PROBE request carries.
    pub probe_size: u32,
    /// Whether unattached endpoints bypass translation (0 or 1).
    pub bypass: u8,
}

/// Offset of the `bypass` byte in the config space.
pub const CONFIG_BYPASS_OFFSET: usize = 36;

impl ConfigSpace {
    /// Encodes the whole config space.
    pub fn encode(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..8].copy_from_slice(&self.page_size_mask.to_le_bytes());
        b[8..16].copy_from_slice(&self.input_start.to_le_bytes());
        b[16..24].copy_from_slice(&self.input_end.to_le_bytes());
        b[24..28].copy_from_slice(&self.domain_start.to_le_bytes());
        b[28..32].copy_from_slice(&self.domain_end.to_le_bytes());
        b[32..36].copy_from_slice(&self.probe_size.to_le_bytes());
        b[CONFIG_BYPASS_OFFSET] = self.bypass;
        b
    }

    /// Decodes a config space (for drivers and tests).
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..CONFIG_SIZE)?;
        Some(ConfigSpace {
            page_size_mask: le64(b, 0),
            input_start: le64(b, 8),
            input_end: le64(b, 16),
            domain_start: le32(b, 24),
            domain_end: le32(b, 28),
            probe_size: le32(b, 32),
            bypass: b[CONFIG_BYPASS_OFFSET],
        })
    }
}

// Compile-time size checks against the spec's struct layouts.
const _: () = assert!(HEAD_SIZE + ATTACH_BODY_SIZE + TAIL_SIZE == 24);
const _: () = assert!(HEAD_SIZE + DETACH_BODY_SIZE + TAIL_SIZE == 24);
const _: () = assert!(HEAD_SIZE + MAP_BODY_SIZE + TAIL_SIZE == 40);
const _: () = assert!(HEAD_SIZE + UNMAP_BODY_SIZE + TAIL_SIZE == 32);
const _: () = assert!(HEAD_SIZE + PROBE_BODY_SIZE == 72);
const _: () = assert!(RESV_MEM_PROPERTY_SIZE == PROPERTY_HEADER_SIZE + 1 + 3 + 8 + 8);
const _: () = assert!(FAULT_SIZE == 1 + 3 + 4 + 4 + 4 + 8);
const _: () = assert!(CONFIG_SIZE == 8 + 16 + 8 + 4 + 1 + 3);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_request_round_trips_at_spec_offsets() {
        let m = MapReq {
            domain: 0x0102_0304,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0xa000,
            flags: VIRTIO_IOMMU_MAP_F_READ,
        };
        let bytes = Request::Map(m).encode();
        assert_eq!(bytes.len(), 36);
        assert_eq!(bytes[0], VIRTIO_IOMMU_T_MAP);
        assert_eq!(&bytes[4..8], &[4, 3, 2, 1]);
        assert_eq!(&bytes[8..16], &0x1000u64.to_le_bytes());
        assert_eq!(&bytes[16..24], &0x1fffu64.to_le_bytes());
        assert_eq!(&bytes[24..32], &0xa000u64.to_le_bytes());
        assert_eq!(&bytes[32..36], &1u32.to_le_bytes());
        assert_eq!(Request::decode(&bytes), Ok(Request::Map(m)));
    }

    #[test]
    fn every_request_round_trips() {
        let reqs = [
            Request::Attach(AttachReq {
                domain: 1,
                endpoint: 2,
                flags: 3,
                reserved: [4, 5, 6, 7],
            }),
            Request::Detach(DetachReq {
                domain: 9,
                endpoint: 8,
            }),
            Request::Unmap(UnmapReq {
                domain: 1,
                virt_start: 2,
                virt_end: 3,
                reserved: [1, 0, 0, 0],
            }),
            Request::Probe(ProbeReq { endpoint: 77 }),
        ];
        for r in reqs {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn head_reserved_bytes_are_ignored() {
        let mut b = Request::Probe(ProbeReq { endpoint: 5 }).encode();
        b[1] = 0xff;
        b[3] = 0x7f;
        assert_eq!(
            Request::decode(&b),
            Ok(Request::Probe(ProbeReq { endpoint: 5 }))
        );
    }

    #[test]
    fn short_buffers_decode_to_errors_not_panics() {
        for t in 0..=255u8 {
            for len in 0..MAX_READABLE_SIZE {
                let mut b = vec![0u8; len];
                if len > 0 {
                    b[0] = t;
                }
                let _ = Request::decode(&b);
            }
        }
        assert_eq!(Request::decode(&[1, 0]), Err(DecodeError::NoHead));
        assert_eq!(
            Request::decode(&[3, 0, 0, 0, 1]),
            Err(DecodeError::Truncated {
                req_type: 3,
                needed: 36,
                got: 5
            })
        );
        assert_eq!(
            Request::decode(&[0x42, 0, 0, 0]),
            Err(DecodeError::UnknownType(0x42))
        );
    }

    #[test]
    fn resv_mem_property_has_length_without_header() {
        let p = ResvMemProperty {
            subtype: VIRTIO_IOMMU_RESV_MEM_T_MSI,
            start: 0xfee0_0000,
            end: 0xfeef_ffff,
        };
        let b = p.encode();
        assert_eq!(&b[0..4], &[1, 0, 20, 0]);
        assert_eq!(&b[5..8], &[0, 0, 0]);
        assert_eq!(ResvMemProperty::decode(&b), Some(p));
    }

    #[test]
    fn fault_record_reserved_fields_are_zero() {
        let f = FaultRecord {
            reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
            flags: VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS,
            endpoint: 8,
            address: 0xdead_b000,
        };
        let b = f.encode();
        assert_eq!(&b[1..4], &[0, 0, 0]);
        assert_eq!(&b[12..16], &[0, 0, 0, 0]);
        assert_eq!(FaultRecord::decode(&b), Some(f));
    }

    #[test]
    fn config_space_layout_matches_spec() {
        let c = ConfigSpace {
            page_size_mask: 0x4000_1000,
            input_start: 0,
            input_end: 0xffff_ffff_ffff,
            domain_start: 1,
            domain_end: 0xffff,
            probe_size: 512,
            bypass: 1,
        };
        let b = c.encode();
        assert_eq!(&b[24..28], &1u32.to_le_bytes());
        assert_eq!(&b[32..36], &512u32.to_le_bytes());
        assert_eq!(b[36], 1);
        assert_eq!(ConfigSpace::decode(&b), Some(c));
    }
}
