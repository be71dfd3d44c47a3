//! The project's nested extension of virtio-iommu: ATTACH_TABLE,
//! INVALIDATE, PAGE_RESP, probe properties 2–7 and the extended fault
//! record. None of it is in the virtio spec; it follows J-P. Brucker's
//! proposal (2018–2021) with the feature bits moved to 56/57 so they do not
//! collide with `BYPASS_CONFIG`. `docs/wire.md` is the reference for every
//! layout here; the size asserts at the bottom keep the two in step.

use super::{le16, le32, le64};

/// Feature bit: ATTACH_TABLE, INVALIDATE and probe properties 2–7.
pub const VIRTIO_IOMMU_F_ATTACH_TABLE: u32 = 56;
/// Feature bit: page-request events and PAGE_RESP.
pub const VIRTIO_IOMMU_F_PAGE_REQUEST: u32 = 57;

/// Request type ATTACH_TABLE.
pub const VIRTIO_IOMMU_T_ATTACH_TABLE: u8 = 6;
/// Request type INVALIDATE.
pub const VIRTIO_IOMMU_T_INVALIDATE: u8 = 7;
/// Request type PAGE_RESP.
pub const VIRTIO_IOMMU_T_PAGE_RESP: u8 = 8;

/// Page-table format: Arm LPAE / AArch64 stage-1 (TCR, TTBR, MAIR).
pub const VIRTIO_IOMMU_PGTF_ARM_LPAE: u16 = 1;
/// PASID-table format: Arm SMMUv3 Context Descriptor table.
pub const VIRTIO_IOMMU_PSTF_ARM_SMMU_V3: u16 = 2;
/// PASID-table format: Intel VT-d scalable-mode PASID directory.
pub const VIRTIO_IOMMU_PSTF_INTEL_VTD: u16 = 3;
/// Page-table format: x86-64 (IA-32e) first-stage tables.
pub const VIRTIO_IOMMU_PGTF_X86_64: u16 = 4;

/// INVALIDATE granularity: the whole domain.
pub const VIRTIO_IOMMU_INV_G_DOMAIN: u16 = 1;
/// INVALIDATE granularity: one PASID.
pub const VIRTIO_IOMMU_INV_G_PASID: u16 = 2;
/// INVALIDATE granularity: a virtual-address range.
pub const VIRTIO_IOMMU_INV_G_VA: u16 = 4;
/// INVALIDATE cache type: IOTLB (and paging-structure caches).
pub const VIRTIO_IOMMU_INV_T_IOTLB: u16 = 1;
/// INVALIDATE cache type: device IOTLB (ATS).
pub const VIRTIO_IOMMU_INV_T_DEV_IOTLB: u16 = 2;
/// INVALIDATE cache type: PASID / context-descriptor cache.
pub const VIRTIO_IOMMU_INV_T_PASID: u16 = 4;
/// INVALIDATE flag: `pasid` is valid.
pub const VIRTIO_IOMMU_INV_F_PASID: u16 = 1;
/// INVALIDATE flag: `archid` is valid.
pub const VIRTIO_IOMMU_INV_F_ARCHID: u16 = 2;
/// INVALIDATE flag: only leaf entries changed.
pub const VIRTIO_IOMMU_INV_F_LEAF: u16 = 4;

/// PAGE_RESP flag: `pasid` is valid.
pub const VIRTIO_IOMMU_PAGE_RESP_F_PASID_VALID: u32 = 1;
/// PAGE_RESP code: the page is there, retry the access.
pub const VIRTIO_IOMMU_PAGE_RESP_SUCCESS: u16 = 0;
/// PAGE_RESP code: the request was invalid; abort the access.
pub const VIRTIO_IOMMU_PAGE_RESP_INVALID: u16 = 1;
/// PAGE_RESP code: the page cannot be made present; abort the access.
pub const VIRTIO_IOMMU_PAGE_RESP_FAILURE: u16 = 2;

/// Probe property: page sizes the table walker supports.
pub const VIRTIO_IOMMU_PROBE_T_PAGE_SIZE_MASK: u16 = 2;
/// Probe property: the input (IOVA) range of the endpoint.
pub const VIRTIO_IOMMU_PROBE_T_INPUT_RANGE: u16 = 3;
/// Probe property: output (guest-physical) address size in bits.
pub const VIRTIO_IOMMU_PROBE_T_OUTPUT_SIZE: u16 = 4;
/// Probe property: PASID size in bits.
pub const VIRTIO_IOMMU_PROBE_T_PASID_SIZE: u16 = 5;
/// Probe property: one supported page-table format.
pub const VIRTIO_IOMMU_PROBE_T_PAGE_TABLE_FMT: u16 = 6;
/// Probe property: one supported PASID-table format.
pub const VIRTIO_IOMMU_PROBE_T_PASID_TABLE_FMT: u16 = 7;

/// Extended fault record type: an unrecoverable DMA fault.
pub const VIRTIO_IOMMU_FLT_DMA_UNRECOV: u16 = 1;
/// Extended fault record type: a page request.
pub const VIRTIO_IOMMU_FLT_PAGE_REQ: u16 = 2;
/// Fault flag: the access was an instruction fetch.
pub const VIRTIO_IOMMU_FAULT_F_EXEC: u32 = 1 << 2;
/// Fault flag: the access was privileged.
pub const VIRTIO_IOMMU_FAULT_F_PRIV: u32 = 1 << 3;
/// Fault flag: `pasid` is valid.
pub const VIRTIO_IOMMU_FAULT_F_PASID: u32 = 1 << 9;
/// Page-request flag: the last request of its group.
pub const VIRTIO_IOMMU_PR_F_LAST_PAGE: u32 = 1 << 0;

/// Body of ATTACH_TABLE (without head and tail).
pub const ATTACH_TABLE_BODY_SIZE: usize = 72;
/// Body of INVALIDATE.
pub const INVALIDATE_BODY_SIZE: usize = 56;
/// Body of PAGE_RESP.
pub const PAGE_RESP_BODY_SIZE: usize = 28;
/// Size of the extended fault record.
pub const EXT_FAULT_SIZE: usize = 40;

/// The table an ATTACH_TABLE binds, decoded per format. Field names are
/// the Arm / Intel names so they can be checked against the manuals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableDesc {
    /// `PGTF_ARM_LPAE`: one AArch64 stage-1 regime, no PASID.
    ArmLpae {
        /// ASID the guest uses in invalidations.
        asid: u16,
        /// TCR_EL1 layout: T0SZ, TG0, EPD0, IPS...
        tcr: u64,
        /// TTBR0.
        ttbr0: u64,
        /// TTBR1.
        ttbr1: u64,
        /// MAIR.
        mair: u64,
    },
    /// `PSTF_ARM_SMMU_V3`: a Context Descriptor table.
    ArmSmmuV3 {
        /// 0 linear, 1 two-level with 4K leaf tables, 2 with 64K.
        s1fmt: u8,
        /// Traffic without SubstreamID: 0 terminate, 1 bypass, 2 SSID 0.
        s1dss: u8,
        /// Guest-physical address of the CD table (or its L1 table).
        s1contextptr: u64,
        /// log2 of the number of CDs.
        s1cdmax: u32,
    },
    /// `PSTF_INTEL_VTD`: a scalable-mode PASID directory.
    IntelVtd {
        /// PASID width the guest's table covers.
        pasid_bits: u8,
        /// Guest-physical address of the PASID directory.
        pasid_dir_ptr: u64,
    },
    /// `PGTF_X86_64`: one IA-32e first-stage table, no PASID.
    X86_64 {
        /// 4 or 5.
        levels: u8,
        /// Guest-physical address of the PML4 / PML5.
        root: u64,
    },
}

impl TableDesc {
    /// The wire format number.
    pub fn format(&self) -> u16 {
        match self {
            TableDesc::ArmLpae { .. } => VIRTIO_IOMMU_PGTF_ARM_LPAE,
            TableDesc::ArmSmmuV3 { .. } => VIRTIO_IOMMU_PSTF_ARM_SMMU_V3,
            TableDesc::IntelVtd { .. } => VIRTIO_IOMMU_PSTF_INTEL_VTD,
            TableDesc::X86_64 { .. } => VIRTIO_IOMMU_PGTF_X86_64,
        }
    }

    /// Whether the format is a PASID table (traffic carries PASIDs).
    pub fn has_pasid(&self) -> bool {
        matches!(
            self,
            TableDesc::ArmSmmuV3 { .. } | TableDesc::IntelVtd { .. }
        )
    }

    /// The guest-physical table pointer the format carries and the
    /// alignment its format requires of it.
    pub fn table_pointer(&self) -> (u64, u64) {
        match *self {
            // Arm ARM D8.2: TTBR.BADDR is aligned to the size of the start
            // table, at least 64 bytes; we ask for the 4K a Linux driver gives.
            TableDesc::ArmLpae { ttbr0, .. } => (ttbr0 & 0x0000_ffff_ffff_fffe, 64),
            // SMMUv3 5.4 CD: S1ContextPtr[51:6], 64-byte aligned.
            TableDesc::ArmSmmuV3 { s1contextptr, .. } => (s1contextptr, 64),
            // VT-d 9.4: the PASID directory pointer is 4K aligned.
            TableDesc::IntelVtd { pasid_dir_ptr, .. } => (pasid_dir_ptr, 4096),
            // IA-32e: CR3 bits 11:0 are flags; the root table is 4K aligned.
            TableDesc::X86_64 { root, .. } => (root, 4096),
        }
    }
}

/// Why an ATTACH_TABLE body did not decode; each maps to a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableDescError {
    /// The format number is not one this device knows (UNSUPP).
    UnknownFormat(u16),
    /// A reserved byte or flag is non-zero (INVAL).
    Reserved,
}

/// `struct virtio_iommu_req_attach_table` without head and tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachTableReq {
    /// Domain ID.
    pub domain: u32,
    /// Endpoint ID.
    pub endpoint: u32,
    /// The 64 format bytes: `le16 format` then the format's fields.
    pub format_bytes: [u8; 64],
}

impl AttachTableReq {
    /// Decodes the body that follows the head; `None` if `b` is too short.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..ATTACH_TABLE_BODY_SIZE)?;
        let mut format_bytes = [0u8; 64];
        format_bytes.copy_from_slice(&b[8..72]);
        Some(AttachTableReq {
            domain: le32(b, 0),
            endpoint: le32(b, 4),
            format_bytes,
        })
    }

    /// Builds a request for `table` (for drivers and tests).
    pub fn new(domain: u32, endpoint: u32, table: &TableDesc) -> Self {
        let mut f = [0u8; 64];
        f[0..2].copy_from_slice(&table.format().to_le_bytes());
        match *table {
            TableDesc::ArmLpae {
                asid,
                tcr,
                ttbr0,
                ttbr1,
                mair,
            } => {
                f[2..4].copy_from_slice(&asid.to_le_bytes());
                f[4..12].copy_from_slice(&tcr.to_le_bytes());
                f[12..20].copy_from_slice(&ttbr0.to_le_bytes());
                f[20..28].copy_from_slice(&ttbr1.to_le_bytes());
                f[28..36].copy_from_slice(&mair.to_le_bytes());
            }
            TableDesc::ArmSmmuV3 {
                s1fmt,
                s1dss,
                s1contextptr,
                s1cdmax,
            } => {
                f[2] = s1fmt;
                f[3] = s1dss;
                f[4..12].copy_from_slice(&s1contextptr.to_le_bytes());
                f[12..16].copy_from_slice(&s1cdmax.to_le_bytes());
            }
            TableDesc::IntelVtd {
                pasid_bits,
                pasid_dir_ptr,
            } => {
                f[2] = pasid_bits;
                f[4..12].copy_from_slice(&pasid_dir_ptr.to_le_bytes());
            }
            TableDesc::X86_64 { levels, root } => {
                f[2] = levels;
                f[4..12].copy_from_slice(&root.to_le_bytes());
            }
        }
        AttachTableReq {
            domain,
            endpoint,
            format_bytes: f,
        }
    }

    /// The format number.
    pub fn format(&self) -> u16 {
        le16(&self.format_bytes, 0)
    }

    /// Decodes the format bytes. Every byte the format does not define,
    /// and the `flags` byte of the Intel formats (no flag is defined yet),
    /// must be zero.
    pub fn table(&self) -> Result<TableDesc, TableDescError> {
        let f = &self.format_bytes;
        let zero_from = |at: usize| f[at..].iter().all(|&x| x == 0);
        let (desc, used) = match self.format() {
            VIRTIO_IOMMU_PGTF_ARM_LPAE => (
                TableDesc::ArmLpae {
                    asid: le16(f, 2),
                    tcr: le64(f, 4),
                    ttbr0: le64(f, 12),
                    ttbr1: le64(f, 20),
                    mair: le64(f, 28),
                },
                36,
            ),
            VIRTIO_IOMMU_PSTF_ARM_SMMU_V3 => (
                TableDesc::ArmSmmuV3 {
                    s1fmt: f[2],
                    s1dss: f[3],
                    s1contextptr: le64(f, 4),
                    s1cdmax: le32(f, 12),
                },
                16,
            ),
            VIRTIO_IOMMU_PSTF_INTEL_VTD | VIRTIO_IOMMU_PGTF_X86_64 => {
                if f[3] != 0 {
                    return Err(TableDescError::Reserved);
                }
                let desc = if self.format() == VIRTIO_IOMMU_PSTF_INTEL_VTD {
                    TableDesc::IntelVtd {
                        pasid_bits: f[2],
                        pasid_dir_ptr: le64(f, 4),
                    }
                } else {
                    TableDesc::X86_64 {
                        levels: f[2],
                        root: le64(f, 4),
                    }
                };
                (desc, 12)
            }
            other => return Err(TableDescError::UnknownFormat(other)),
        };
        if zero_from(used) {
            Ok(desc)
        } else {
            Err(TableDescError::Reserved)
        }
    }

    /// Encodes the body.
    pub fn encode(&self) -> [u8; ATTACH_TABLE_BODY_SIZE] {
        let mut b = [0u8; ATTACH_TABLE_BODY_SIZE];
        b[0..4].copy_from_slice(&self.domain.to_le_bytes());
        b[4..8].copy_from_slice(&self.endpoint.to_le_bytes());
        b[8..72].copy_from_slice(&self.format_bytes);
        b
    }
}

/// `struct virtio_iommu_req_invalidate` without head and tail, as the
/// driver wrote it; [`crate::invalidation`] checks and lowers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InvalidateReq {
    /// `VIRTIO_IOMMU_INV_G_*`.
    pub granularity: u16,
    /// `VIRTIO_IOMMU_INV_T_*` bit set.
    pub cache_types: u16,
    /// `VIRTIO_IOMMU_INV_F_*` bit set.
    pub flags: u16,
    /// Domain ID.
    pub domain: u32,
    /// PASID, with `INV_F_PASID`.
    pub pasid: u32,
    /// ASID / DID, with `INV_F_ARCHID`.
    pub archid: u64,
    /// First address, with `INV_G_VA`.
    pub virt_start: u64,
    /// Number of pages, with `INV_G_VA`.
    pub nr_pages: u64,
    /// log2 of the page size, with `INV_G_VA`.
    pub granule: u8,
    /// Whether any reserved byte is non-zero.
    pub reserved_set: bool,
}

impl InvalidateReq {
    /// Decodes the body; `None` if `b` is too short.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..INVALIDATE_BODY_SIZE)?;
        let reserved_set = b[6..8]
            .iter()
            .chain(&b[16..20])
            .chain(&b[45..56])
            .any(|&x| x != 0);
        Some(InvalidateReq {
            granularity: le16(b, 0),
            cache_types: le16(b, 2),
            flags: le16(b, 4),
            domain: le32(b, 8),
            pasid: le32(b, 12),
            archid: le64(b, 20),
            virt_start: le64(b, 28),
            nr_pages: le64(b, 36),
            granule: b[44],
            reserved_set,
        })
    }

    /// Encodes the body (reserved bytes: 0xff in one of them if
    /// `reserved_set`, so tests can send a bad request).
    pub fn encode(&self) -> [u8; INVALIDATE_BODY_SIZE] {
        let mut b = [0u8; INVALIDATE_BODY_SIZE];
        b[0..2].copy_from_slice(&self.granularity.to_le_bytes());
        b[2..4].copy_from_slice(&self.cache_types.to_le_bytes());
        b[4..6].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.domain.to_le_bytes());
        b[12..16].copy_from_slice(&self.pasid.to_le_bytes());
        b[20..28].copy_from_slice(&self.archid.to_le_bytes());
        b[28..36].copy_from_slice(&self.virt_start.to_le_bytes());
        b[36..44].copy_from_slice(&self.nr_pages.to_le_bytes());
        b[44] = self.granule;
        if self.reserved_set {
            b[50] = 0xff;
        }
        b
    }
}

/// `struct virtio_iommu_req_page_resp` without head and tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PageRespReq {
    /// Endpoint ID of the page request.
    pub endpoint: u32,
    /// `VIRTIO_IOMMU_PAGE_RESP_F_*`.
    pub flags: u32,
    /// PASID, with `PAGE_RESP_F_PASID_VALID`.
    pub pasid: u32,
    /// Page-request group ID.
    pub grpid: u32,
    /// `VIRTIO_IOMMU_PAGE_RESP_*` code.
    pub code: u16,
    /// Whether any reserved byte is non-zero.
    pub reserved_set: bool,
}

impl PageRespReq {
    /// Decodes the body; `None` if `b` is too short.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..PAGE_RESP_BODY_SIZE)?;
        Some(PageRespReq {
            endpoint: le32(b, 0),
            flags: le32(b, 4),
            pasid: le32(b, 8),
            grpid: le32(b, 12),
            code: le16(b, 16),
            reserved_set: b[18..28].iter().any(|&x| x != 0),
        })
    }

    /// Encodes the body.
    pub fn encode(&self) -> [u8; PAGE_RESP_BODY_SIZE] {
        let mut b = [0u8; PAGE_RESP_BODY_SIZE];
        b[0..4].copy_from_slice(&self.endpoint.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.pasid.to_le_bytes());
        b[12..16].copy_from_slice(&self.grpid.to_le_bytes());
        b[16..18].copy_from_slice(&self.code.to_le_bytes());
        if self.reserved_set {
            b[27] = 1;
        }
        b
    }
}

/// A probe property of the extension, header included when encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtProperty {
    /// `PAGE_SIZE_MASK`.
    PageSizeMask(u64),
    /// `INPUT_RANGE` (inclusive).
    InputRange {
        /// First IOVA.
        start: u64,
        /// Last IOVA.
        end: u64,
    },
    /// `OUTPUT_SIZE` in bits.
    OutputSize(u8),
    /// `PASID_SIZE` in bits.
    PasidSize(u8),
    /// `PAGE_TABLE_FMT`: a page-table format and its page sizes.
    PageTableFmt {
        /// `PGTF_*`.
        format: u16,
        /// Page sizes the walker supports in that format.
        page_size_mask: u64,
    },
    /// `PASID_TABLE_FMT`: a PASID-table format, the page-table format
    /// its entries point to, and that format's page sizes.
    PasidTableFmt {
        /// `PSTF_*`.
        format: u16,
        /// `PGTF_*` of the tables below.
        page_table_format: u16,
        /// Page sizes.
        page_size_mask: u64,
    },
}

impl ExtProperty {
    /// Encoded length including the 4-byte header.
    pub fn encoded_len(&self) -> usize {
        4 + match self {
            ExtProperty::PageSizeMask(_) => 12,
            ExtProperty::InputRange { .. } => 20,
            ExtProperty::OutputSize(_) | ExtProperty::PasidSize(_) => 4,
            ExtProperty::PageTableFmt { .. } | ExtProperty::PasidTableFmt { .. } => 12,
        }
    }

    /// Appends the property, header first, reserved bytes zero.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let len = self.encoded_len();
        let at = out.len();
        out.resize(at + len, 0);
        let b = &mut out[at..];
        let ty = match self {
            ExtProperty::PageSizeMask(_) => VIRTIO_IOMMU_PROBE_T_PAGE_SIZE_MASK,
            ExtProperty::InputRange { .. } => VIRTIO_IOMMU_PROBE_T_INPUT_RANGE,
            ExtProperty::OutputSize(_) => VIRTIO_IOMMU_PROBE_T_OUTPUT_SIZE,
            ExtProperty::PasidSize(_) => VIRTIO_IOMMU_PROBE_T_PASID_SIZE,
            ExtProperty::PageTableFmt { .. } => VIRTIO_IOMMU_PROBE_T_PAGE_TABLE_FMT,
            ExtProperty::PasidTableFmt { .. } => VIRTIO_IOMMU_PROBE_T_PASID_TABLE_FMT,
        };
        b[0..2].copy_from_slice(&ty.to_le_bytes());
        b[2..4].copy_from_slice(&((len - 4) as u16).to_le_bytes());
        match *self {
            ExtProperty::PageSizeMask(m) => b[8..16].copy_from_slice(&m.to_le_bytes()),
            ExtProperty::InputRange { start, end } => {
                b[8..16].copy_from_slice(&start.to_le_bytes());
                b[16..24].copy_from_slice(&end.to_le_bytes());
            }
            ExtProperty::OutputSize(bits) | ExtProperty::PasidSize(bits) => b[4] = bits,
            ExtProperty::PageTableFmt {
                format,
                page_size_mask,
            } => {
                b[4..6].copy_from_slice(&format.to_le_bytes());
                b[8..16].copy_from_slice(&page_size_mask.to_le_bytes());
            }
            ExtProperty::PasidTableFmt {
                format,
                page_table_format,
                page_size_mask,
            } => {
                b[4..6].copy_from_slice(&format.to_le_bytes());
                b[6..8].copy_from_slice(&page_table_format.to_le_bytes());
                b[8..16].copy_from_slice(&page_size_mask.to_le_bytes());
            }
        }
    }

    /// Decodes one property (header included); `None` for a short buffer,
    /// an unknown type or a wrong length. Returns the bytes consumed.
    pub fn decode(b: &[u8]) -> Option<(Self, usize)> {
        let ty = le16(b.get(..4)?, 0) & 0x0fff;
        let len = le16(b, 2) as usize + 4;
        let b = b.get(..len)?;
        let p = match ty {
            VIRTIO_IOMMU_PROBE_T_PAGE_SIZE_MASK if len == 16 => {
                ExtProperty::PageSizeMask(le64(b, 8))
            }
            VIRTIO_IOMMU_PROBE_T_INPUT_RANGE if len == 24 => ExtProperty::InputRange {
                start: le64(b, 8),
                end: le64(b, 16),
            },
            VIRTIO_IOMMU_PROBE_T_OUTPUT_SIZE if len == 8 => ExtProperty::OutputSize(b[4]),
            VIRTIO_IOMMU_PROBE_T_PASID_SIZE if len == 8 => ExtProperty::PasidSize(b[4]),
            VIRTIO_IOMMU_PROBE_T_PAGE_TABLE_FMT if len == 16 => ExtProperty::PageTableFmt {
                format: le16(b, 4),
                page_size_mask: le64(b, 8),
            },
            VIRTIO_IOMMU_PROBE_T_PASID_TABLE_FMT if len == 16 => ExtProperty::PasidTableFmt {
                format: le16(b, 4),
                page_table_format: le16(b, 6),
                page_size_mask: le64(b, 8),
            },
            _ => return None,
        };
        Some((p, len))
    }
}

/// The extended fault record, used instead of `struct virtio_iommu_fault`
/// once the driver acked `F_ATTACH_TABLE` or `F_PAGE_REQUEST`: it carries
/// the PASID a nested fault needs and the page-request group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ExtFaultRecord {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// `VIRTIO_IOMMU_FLT_*`.
    pub flt_type: u16,
    /// `VIRTIO_IOMMU_FAULT_F_*`.
    pub flags: u32,
    /// `VIRTIO_IOMMU_PR_F_*` (page requests).
    pub pr_evt_flags: u32,
    /// Endpoint.
    pub endpoint: u32,
    /// PASID, with `FAULT_F_PASID`.
    pub pasid: u32,
    /// Page-request group (page requests).
    pub grpid: u32,
    /// Faulting address, with `FAULT_F_ADDRESS`.
    pub address: u64,
}

impl ExtFaultRecord {
    /// Encodes the record; reserved fields zero.
    pub fn encode(&self) -> [u8; EXT_FAULT_SIZE] {
        let mut b = [0u8; EXT_FAULT_SIZE];
        b[0] = self.reason;
        b[4..6].copy_from_slice(&self.flt_type.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.pr_evt_flags.to_le_bytes());
        b[16..20].copy_from_slice(&self.endpoint.to_le_bytes());
        b[20..24].copy_from_slice(&self.pasid.to_le_bytes());
        b[24..28].copy_from_slice(&self.grpid.to_le_bytes());
        b[32..40].copy_from_slice(&self.address.to_le_bytes());
        b
    }

    /// Decodes a record (for drivers and tests).
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..EXT_FAULT_SIZE)?;
        Some(ExtFaultRecord {
            reason: b[0],
            flt_type: le16(b, 4),
            flags: le32(b, 8),
            pr_evt_flags: le32(b, 12),
            endpoint: le32(b, 16),
            pasid: le32(b, 20),
            grpid: le32(b, 24),
            address: le64(b, 32),
        })
    }

    /// The classic 24-byte record for a driver without the extension
    /// (PASID and group are lost; page requests are never sent to it).
    pub fn to_classic(&self) -> super::FaultRecord {
        super::FaultRecord {
            reason: self.reason,
            flags: self.flags
                & !(VIRTIO_IOMMU_FAULT_F_PASID
                    | VIRTIO_IOMMU_FAULT_F_PRIV
                    | VIRTIO_IOMMU_FAULT_F_EXEC),
            endpoint: self.endpoint,
            address: self.address,
        }
    }
}

// The sizes docs/wire.md gives, field by field (head and tail included
// where the docs count them).
const _: () = assert!(super::HEAD_SIZE + ATTACH_TABLE_BODY_SIZE + super::TAIL_SIZE == 80);
const _: () = assert!(ATTACH_TABLE_BODY_SIZE == 4 + 4 + 2 + 62);
const _: () = assert!(super::HEAD_SIZE + INVALIDATE_BODY_SIZE + super::TAIL_SIZE == 64);
const _: () = assert!(INVALIDATE_BODY_SIZE == 2 + 2 + 2 + 2 + 4 + 4 + 4 + 8 + 8 + 8 + 1 + 11);
const _: () = assert!(super::HEAD_SIZE + PAGE_RESP_BODY_SIZE + super::TAIL_SIZE == 36);
const _: () = assert!(PAGE_RESP_BODY_SIZE == 4 + 4 + 4 + 4 + 2 + 10);
const _: () = assert!(EXT_FAULT_SIZE == 1 + 3 + 2 + 2 + 4 + 4 + 4 + 4 + 4 + 4 + 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_table_roundtrips_every_format() {
        let tables = [
            TableDesc::ArmLpae {
                asid: 7,
                tcr: 0x1234,
                ttbr0: 0x10_0000,
                ttbr1: 0,
                mair: 0xff44,
            },
            TableDesc::ArmSmmuV3 {
                s1fmt: 1,
                s1dss: 2,
                s1contextptr: 0x20_0000,
                s1cdmax: 8,
            },
            TableDesc::IntelVtd {
                pasid_bits: 20,
                pasid_dir_ptr: 0x30_0000,
            },
            TableDesc::X86_64 {
                levels: 5,
                root: 0x40_0000,
            },
        ];
        for t in tables {
            let r = AttachTableReq::new(3, 9, &t);
            let back = AttachTableReq::decode(&r.encode()).unwrap();
            assert_eq!(back, r);
            assert_eq!(back.table(), Ok(t));
        }
    }

    #[test]
    fn attach_table_offsets_are_the_documented_ones() {
        let r = AttachTableReq::new(
            0x0102_0304,
            0x0506_0708,
            &TableDesc::ArmSmmuV3 {
                s1fmt: 0xaa,
                s1dss: 0xbb,
                s1contextptr: 0x1122_3344_5566_7788,
                s1cdmax: 0x99,
            },
        );
        let b = r.encode();
        assert_eq!(&b[0..4], &[4, 3, 2, 1]);
        assert_eq!(&b[4..8], &[8, 7, 6, 5]);
        assert_eq!(&b[8..10], &[2, 0]);
        assert_eq!(b[10], 0xaa);
        assert_eq!(b[11], 0xbb);
        assert_eq!(&b[12..20], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[20..24], &[0x99, 0, 0, 0]);
        assert!(b[24..].iter().all(|&x| x == 0));
    }

    #[test]
    fn attach_table_rejects_reserved_and_unknown() {
        let mut r = AttachTableReq::new(
            1,
            1,
            &TableDesc::X86_64 {
                levels: 4,
                root: 0x1000,
            },
        );
        r.format_bytes[63] = 1;
        assert_eq!(r.table(), Err(TableDescError::Reserved));
        let mut r = AttachTableReq::new(
            1,
            1,
            &TableDesc::X86_64 {
                levels: 4,
                root: 0x1000,
            },
        );
        r.format_bytes[3] = 1; // flags
        assert_eq!(r.table(), Err(TableDescError::Reserved));
        r.format_bytes[0] = 9;
        assert_eq!(r.table(), Err(TableDescError::UnknownFormat(9)));
    }

    #[test]
    fn invalidate_layout() {
        let r = InvalidateReq {
            granularity: VIRTIO_IOMMU_INV_G_VA,
            cache_types: VIRTIO_IOMMU_INV_T_IOTLB,
            flags: VIRTIO_IOMMU_INV_F_PASID | VIRTIO_IOMMU_INV_F_LEAF,
            domain: 5,
            pasid: 0x42,
            archid: 0x77,
            virt_start: 0xabc000,
            nr_pages: 3,
            granule: 12,
            reserved_set: false,
        };
        let b = r.encode();
        assert_eq!(b[0], 4);
        assert_eq!(b[2], 1);
        assert_eq!(b[4], 5);
        assert_eq!(b[8], 5);
        assert_eq!(b[12], 0x42);
        assert_eq!(b[20], 0x77);
        assert_eq!(&b[28..36], &0xabc000u64.to_le_bytes());
        assert_eq!(b[36], 3);
        assert_eq!(b[44], 12);
        assert_eq!(InvalidateReq::decode(&b), Some(r));
        for at in [6usize, 7, 16, 19, 45, 55] {
            let mut bad = b;
            bad[at] = 1;
            assert!(
                InvalidateReq::decode(&bad).unwrap().reserved_set,
                "byte {at}"
            );
        }
        assert_eq!(InvalidateReq::decode(&b[..55]), None);
    }

    #[test]
    fn page_resp_layout() {
        let r = PageRespReq {
            endpoint: 8,
            flags: 1,
            pasid: 3,
            grpid: 0x55,
            code: 2,
            reserved_set: false,
        };
        let b = r.encode();
        assert_eq!((b[0], b[4], b[8], b[12], b[16]), (8, 1, 3, 0x55, 2));
        assert_eq!(PageRespReq::decode(&b), Some(r));
        let mut bad = b;
        bad[18] = 1;
        assert!(PageRespReq::decode(&bad).unwrap().reserved_set);
    }

    #[test]
    fn properties_roundtrip_with_their_lengths() {
        let props = [
            ExtProperty::PageSizeMask(0x4020_1000),
            ExtProperty::InputRange {
                start: 0,
                end: (1 << 48) - 1,
            },
            ExtProperty::OutputSize(48),
            ExtProperty::PasidSize(20),
            ExtProperty::PageTableFmt {
                format: VIRTIO_IOMMU_PGTF_X86_64,
                page_size_mask: 0x4020_1000,
            },
            ExtProperty::PasidTableFmt {
                format: VIRTIO_IOMMU_PSTF_INTEL_VTD,
                page_table_format: VIRTIO_IOMMU_PGTF_X86_64,
                page_size_mask: 0x4020_1000,
            },
        ];
        let mut out = Vec::new();
        for p in &props {
            p.encode_into(&mut out);
        }
        let mut at = 0;
        for p in &props {
            let (q, n) = ExtProperty::decode(&out[at..]).unwrap();
            assert_eq!(&q, p);
            assert_eq!(n, p.encoded_len());
            at += n;
        }
        assert_eq!(at, out.len());
    }

    #[test]
    fn ext_fault_layout() {
        let r = ExtFaultRecord {
            reason: 2,
            flt_type: VIRTIO_IOMMU_FLT_PAGE_REQ,
            flags: 0x201,
            pr_evt_flags: 1,
            endpoint: 8,
            pasid: 5,
            grpid: 9,
            address: 0x1000,
        };
        let b = r.encode();
        assert_eq!(
            (b[0], b[4], b[8], b[9], b[12], b[16], b[20], b[24]),
            (2, 2, 1, 2, 1, 8, 5, 9)
        );
        assert_eq!(&b[32..40], &0x1000u64.to_le_bytes());
        assert_eq!(ExtFaultRecord::decode(&b), Some(r));
    }
}
