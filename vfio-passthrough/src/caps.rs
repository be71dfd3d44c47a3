//! What the host IOMMU offers, decoded from `VFIO_IOMMU_GET_INFO` (type1)
//! and `IOMMU_GET_HW_INFO` (iommufd), and turned into the
//! [`BackendCaps`] the device advertises in PROBE.
//!
//! Pure functions over the bytes the kernel wrote; every offset is
//! bounds-checked, so a short or looping capability chain is an error, not
//! a panic.

use iommufd_bindings::iommufd::{
    iommu_hw_info, iommu_hw_info_type_IOMMU_HW_INFO_TYPE_ARM_SMMUV3,
    iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD,
};
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_info, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
};
use vmm_iommu::backend::{BackendCaps, BackendError};
use vmm_iommu::wire::{VIRTIO_IOMMU_PSTF_ARM_SMMU_V3, VIRTIO_IOMMU_PSTF_INTEL_VTD};

use crate::host::{le16, le32, le64};
use crate::smmuv3::SmmuHw;
use crate::vtd::VtdHw;

/// Room for the info struct and an IOVA-range capability of 16 ranges;
/// the kernel says in `argsz` when it needs more.
pub const TYPE1_INFO_BUF: usize = 24 + 16 + 16 * 16;
/// At most this many capabilities are followed: the chain comes from the
/// kernel, but a loop in it must still end.
const MAX_CAPS: usize = 64;
/// At most this many IOVA ranges are believed (x86 reports 2 or 3).
const MAX_IOVA_RANGES: u32 = 1024;

/// The decoded `VFIO_IOMMU_GET_INFO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Type1Info {
    /// `iova_pgsizes`, 0 if the kernel did not report it.
    pub pgsizes: u64,
    /// Usable IOVA ranges, inclusive, from the IOVA-range capability.
    pub ranges: Vec<(u64, u64)>,
    /// `argsz` the kernel asked for, when larger than the buffer.
    pub needs: Option<u32>,
}

impl Type1Info {
    /// MAP-mode caps: the container's page sizes, the span from the first
    /// usable IOVA to the last, and the holes between ranges (the MSI
    /// window on x86, RMRRs) as the endpoint's reserved ranges: the guest
    /// sees them as RESV_MEM RESERVED in PROBE and a MAP into one is RANGE,
    /// instead of a kernel refusal (DEVERR).
    pub fn caps(&self) -> BackendCaps {
        let mask = if self.pgsizes == 0 {
            1 << 12
        } else {
            self.pgsizes
        };
        let range = match (self.ranges.first(), self.ranges.last()) {
            (Some(f), Some(l)) => (f.0, l.1),
            _ => (0, u64::MAX),
        };
        let mut caps = BackendCaps::map_only(mask, range);
        caps.reserved_ranges = iova_holes(&self.ranges);
        caps
    }

    /// The smallest page the container maps.
    pub fn min_page(&self) -> u64 {
        if self.pgsizes == 0 {
            1 << 12
        } else {
            1 << self.pgsizes.trailing_zeros()
        }
    }
}

/// The gaps between sorted usable IOVA ranges (inclusive): what the host
/// cannot map between the first usable IOVA and the last. Overlapping or
/// touching ranges leave no gap.
pub fn iova_holes(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let mut holes = Vec::new();
    let mut covered_to: Option<u64> = None;
    for (s, e) in sorted {
        if let Some(c) = covered_to {
            // `c < s - 1` without overflow: s > c + 1.
            if s > c && s - c > 1 {
                holes.push((c + 1, s - 1));
            }
        }
        covered_to = Some(covered_to.map_or(e, |c| c.max(e)));
    }
    holes
}

/// The `VFIO_IOMMU_GET_INFO` argument buffer of `len` bytes: a zeroed
/// `vfio_iommu_type1_info` with `argsz = len` (include/uapi/linux/vfio.h).
pub fn type1_info_request(len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len.max(std::mem::size_of::<vfio_iommu_type1_info>())];
    let argsz = b.len() as u32;
    b[0..4].copy_from_slice(&argsz.to_le_bytes());
    b
}

/// Decodes what the kernel wrote: `struct vfio_iommu_type1_info { argsz@0,
/// flags@4, iova_pgsizes@8, cap_offset@16, pad@20 }` and the chain of
/// `vfio_info_cap_header { id@0 u16, version@2 u16, next@4 u32 }` whose
/// offsets count from the start of the buffer; the IOVA-range capability
/// is `{ header, nr_iovas@8, reserved@12, iova_ranges[]@16 of {start, end} }`.
pub fn parse_type1_info(buf: &[u8]) -> Result<Type1Info, BackendError> {
    let bad = |what: &str| BackendError::Host {
        op: "VFIO_IOMMU_GET_INFO",
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()),
    };
    let argsz = le32(buf, 0).ok_or_else(|| bad("short info"))?;
    let flags = le32(buf, 4).ok_or_else(|| bad("short info"))?;
    let pgsizes = if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
        le64(buf, 8).ok_or_else(|| bad("short info"))?
    } else {
        0
    };
    let mut info = Type1Info {
        pgsizes,
        ranges: Vec::new(),
        needs: (argsz as usize > buf.len()).then_some(argsz),
    };
    if flags & VFIO_IOMMU_INFO_CAPS == 0 || info.needs.is_some() {
        return Ok(info);
    }
    let mut off = le32(buf, 16).ok_or_else(|| bad("short info"))? as usize;
    let mut seen = 0;
    while off != 0 {
        seen += 1;
        if seen > MAX_CAPS {
            return Err(bad("capability chain does not end"));
        }
        let id = le16(buf, off).ok_or_else(|| bad("capability past the buffer"))?;
        let next = le32(buf, off + 4).ok_or_else(|| bad("capability past the buffer"))? as usize;
        if u32::from(id) == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let n = le32(buf, off + 8).ok_or_else(|| bad("short IOVA range capability"))?;
            if n > MAX_IOVA_RANGES {
                return Err(bad("too many IOVA ranges"));
            }
            for i in 0..n as usize {
                let at = off + 16 + i * 16;
                let start = le64(buf, at).ok_or_else(|| bad("IOVA range past the buffer"))?;
                let end = le64(buf, at + 8).ok_or_else(|| bad("IOVA range past the buffer"))?;
                if start > end {
                    return Err(bad("IOVA range ends before it starts"));
                }
                info.ranges.push((start, end));
            }
            info.ranges.sort_unstable();
        }
        off = next;
    }
    Ok(info)
}

/// The host IOMMU behind an iommufd device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwKind {
    /// Intel VT-d.
    IntelVtd(VtdHw),
    /// Arm SMMUv3.
    ArmSmmuV3(SmmuHw),
    /// Anything else (`out_data_type`), MAP mode only.
    Other(u32),
}

/// Bytes of the vendor buffer handed to `IOMMU_GET_HW_INFO`: the larger of
/// `iommu_hw_info_vtd` (24) and `iommu_hw_info_arm_smmuv3` (40).
pub const HW_INFO_DATA_LEN: usize = 40;

/// The `IOMMU_GET_HW_INFO` argument for `dev_id` (data_uptr is filled by
/// the host implementation from the data slice).
pub fn hw_info_request(dev_id: u32) -> iommu_hw_info {
    iommu_hw_info {
        size: std::mem::size_of::<iommu_hw_info>() as u32,
        dev_id,
        data_len: HW_INFO_DATA_LEN as u32,
        ..Default::default()
    }
}

/// Decodes the vendor data by `out_data_type` (iommufd.h
/// `struct iommu_hw_info_vtd { flags, __reserved, cap_reg, ecap_reg }`,
/// `struct iommu_hw_info_arm_smmuv3 { flags, __reserved, idr[6], iidr, aidr }`).
pub fn parse_hw_info(info: &iommu_hw_info, data: &[u8]) -> HwKind {
    // SAFETY: both union members are one `__u32` at the same offset, so
    // reading either name reads the initialised value the kernel wrote.
    let ty = unsafe { info.__bindgen_anon_1.out_data_type };
    let len = (info.data_len as usize).min(data.len());
    let d = &data[..len];
    match ty {
        t if t == iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD => HwKind::IntelVtd(VtdHw {
            flags: le32(d, 0).unwrap_or(0),
            cap: le64(d, 8).unwrap_or(0),
            ecap: le64(d, 16).unwrap_or(0),
        }),
        t if t == iommu_hw_info_type_IOMMU_HW_INFO_TYPE_ARM_SMMUV3 => {
            let mut idr = [0u32; 6];
            for (i, v) in idr.iter_mut().enumerate() {
                *v = le32(d, 8 + 4 * i).unwrap_or(0);
            }
            HwKind::ArmSmmuV3(SmmuHw { idr })
        }
        t => HwKind::Other(t),
    }
}

/// PROBE caps of an iommufd endpoint. Nested formats only where the host
/// can nest them; PASID width is the smaller of the IOMMU's and the
/// device's (`out_max_pasid_log2`).
pub fn caps_from_hw(kind: &HwKind, device_pasid_bits: u8) -> BackendCaps {
    match kind {
        HwKind::IntelVtd(h) => {
            let mut psm = 1u64 << 12 | 1 << 21;
            if h.fl1gp() {
                psm |= 1 << 30;
            }
            let va_bits = if h.fl5lp() { 57 } else { 48 };
            let nests = h.nest() && h.flts();
            let pasid_bits = h.pasid_bits().min(device_pasid_bits);
            BackendCaps {
                page_size_mask: psm,
                input_range: (0, (1u64 << va_bits) - 1),
                output_bits: h.mgaw(),
                pasid_bits,
                table_formats: if nests {
                    vec![VIRTIO_IOMMU_PSTF_INTEL_VTD]
                } else {
                    Vec::new()
                },
                page_requests: nests && h.prs() && pasid_bits > 0,
                // Filled in from the kernel by the backend
                // (`IOMMU_IOAS_IOVA_RANGES`).
                reserved_ranges: Vec::new(),
            }
        }
        HwKind::ArmSmmuV3(h) => BackendCaps {
            page_size_mask: h.page_size_mask(),
            input_range: (0, (1u64 << h.ias_bits()) - 1),
            output_bits: h.oas_bits(),
            pasid_bits: h.ssid_bits().min(device_pasid_bits),
            // The kernel accepts nesting only from SMMUs with stage 1 and 2
            // (it refuses the vIOMMU otherwise); that shows at bind time.
            table_formats: vec![VIRTIO_IOMMU_PSTF_ARM_SMMU_V3],
            // Stalls and PRI are not offered to nested guests by iommufd.
            page_requests: false,
            reserved_ranges: Vec::new(),
        },
        HwKind::Other(_) => BackendCaps::map_only(1 << 12, (0, (1u64 << 48) - 1)),
    }
}

/// Why `kind` offers no nested table format, for the log line a VMM
/// operator reads when the guest sees no ATTACH_TABLE format.
pub fn no_nesting_reason(kind: &HwKind) -> String {
    match kind {
        HwKind::IntelVtd(h) => format!(
            "VT-d ecap {:#x}: nested translation (bit 26) {}, first-stage translation (bit 47) {}",
            h.ecap,
            u8::from(h.nest()),
            u8::from(h.flts())
        ),
        HwKind::ArmSmmuV3(_) => "SMMUv3 nesting was refused by the host".into(),
        HwKind::Other(t) => format!("IOMMU hardware type {t} has no nested table format here"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iommufd_bindings::iommufd::iommu_hw_info__bindgen_ty_1;

    fn info_with_ranges(ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut b = type1_info_request(TYPE1_INFO_BUF);
        b[4..8].copy_from_slice(&(VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS).to_le_bytes());
        b[8..16].copy_from_slice(&(0x4020_1000u64).to_le_bytes());
        b[16..20].copy_from_slice(&24u32.to_le_bytes());
        // Capability at 24: id 1, version 1, next 0, nr_iovas.
        b[24..26].copy_from_slice(&1u16.to_le_bytes());
        b[26..28].copy_from_slice(&1u16.to_le_bytes());
        b[32..36].copy_from_slice(&(ranges.len() as u32).to_le_bytes());
        for (i, (s, e)) in ranges.iter().enumerate() {
            let at = 40 + 16 * i;
            b[at..at + 8].copy_from_slice(&s.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&e.to_le_bytes());
        }
        b
    }

    #[test]
    fn request_buffer_carries_argsz() {
        let b = type1_info_request(100);
        assert_eq!(le32(&b, 0), Some(100));
        assert!(b[4..].iter().all(|&x| x == 0));
        assert_eq!(type1_info_request(3).len(), 24);
    }

    #[test]
    fn iova_ranges_and_pgsizes_become_caps() {
        let b = info_with_ranges(&[(0xfef0_0000, 0xffff_ffff_ffff), (0, 0xfedf_ffff)]);
        let i = parse_type1_info(&b).unwrap();
        assert_eq!(i.pgsizes, 0x4020_1000);
        assert_eq!(
            i.ranges,
            vec![(0, 0xfedf_ffff), (0xfef0_0000, 0xffff_ffff_ffff)]
        );
        let c = i.caps();
        assert_eq!(c.page_size_mask, 0x4020_1000);
        assert_eq!(c.input_range, (0, 0xffff_ffff_ffff));
        // The MSI window between the two ranges is the endpoint's hole.
        assert_eq!(c.reserved_ranges, vec![(0xfee0_0000, 0xfeef_ffff)]);
        assert_eq!(c.pasid_bits, 0);
        assert!(c.table_formats.is_empty());
        assert_eq!(i.min_page(), 0x1000);
    }

    #[test]
    fn iova_holes_are_the_gaps_between_ranges() {
        assert_eq!(iova_holes(&[]), vec![]);
        assert_eq!(iova_holes(&[(0, u64::MAX)]), vec![]);
        // Unsorted, touching (no gap), overlapping (no gap), and a gap at
        // the very top of the space.
        assert_eq!(
            iova_holes(&[
                (0x3000, 0x3fff),
                (0, 0xfff),
                (0x1000, 0x1fff),
                (0x1800, 0x27ff),
                (u64::MAX, u64::MAX)
            ]),
            vec![(0x2800, 0x2fff), (0x4000, u64::MAX - 1)]
        );
    }

    #[test]
    fn larger_argsz_asks_for_a_retry() {
        let mut b = info_with_ranges(&[]);
        b[0..4].copy_from_slice(&4096u32.to_le_bytes());
        assert_eq!(parse_type1_info(&b).unwrap().needs, Some(4096));
    }

    #[test]
    fn broken_chains_are_errors_not_panics() {
        let mut b = info_with_ranges(&[(0, 1)]);
        b[28..32].copy_from_slice(&24u32.to_le_bytes()); // next points at itself
        assert!(parse_type1_info(&b).is_err());
        let mut b = info_with_ranges(&[(0, 1)]);
        b[16..20].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert!(parse_type1_info(&b).is_err());
        let mut b = info_with_ranges(&[(0, 1)]);
        b[32..36].copy_from_slice(&1000u32.to_le_bytes());
        assert!(parse_type1_info(&b).is_err());
        let mut b = info_with_ranges(&[(5, 1)]);
        assert!(parse_type1_info(&b).is_err());
        b.truncate(6);
        assert!(parse_type1_info(&b).is_err());
    }

    fn hw_info(ty: u32, pasid_log2: u8) -> iommu_hw_info {
        iommu_hw_info {
            data_len: HW_INFO_DATA_LEN as u32,
            __bindgen_anon_1: iommu_hw_info__bindgen_ty_1 { out_data_type: ty },
            out_max_pasid_log2: pasid_log2,
            ..Default::default()
        }
    }

    #[test]
    fn vtd_hw_info_becomes_caps() {
        let mut d = [0u8; HW_INFO_DATA_LEN];
        let cap: u64 = 1 << 56 | 56 << 16;
        let ecap: u64 = 1 << 40 | 19 << 35 | 1 << 26 | 1 << 47 | 1 << 29;
        d[8..16].copy_from_slice(&cap.to_le_bytes());
        d[16..24].copy_from_slice(&ecap.to_le_bytes());
        let info = hw_info(iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD, 16);
        let kind = parse_hw_info(&info, &d);
        assert!(matches!(kind, HwKind::IntelVtd(h) if h.cap == cap && h.ecap == ecap));
        let c = caps_from_hw(&kind, info.out_max_pasid_log2);
        assert_eq!(c.page_size_mask, 1 << 12 | 1 << 21 | 1 << 30);
        assert_eq!(c.input_range, (0, (1 << 48) - 1));
        assert_eq!(c.output_bits, 57);
        assert_eq!(c.pasid_bits, 16);
        assert_eq!(c.table_formats, vec![VIRTIO_IOMMU_PSTF_INTEL_VTD]);
        assert!(c.page_requests);
    }

    #[test]
    fn smmuv3_hw_info_becomes_caps() {
        let mut d = [0u8; HW_INFO_DATA_LEN];
        let idr = [0u32, 8 << 6, 0, 0, 0, 1 << 4 | 4];
        for (i, v) in idr.iter().enumerate() {
            d[8 + 4 * i..12 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        let info = hw_info(iommu_hw_info_type_IOMMU_HW_INFO_TYPE_ARM_SMMUV3, 20);
        let kind = parse_hw_info(&info, &d);
        let c = caps_from_hw(&kind, 20);
        assert_eq!(c.pasid_bits, 8);
        assert_eq!(c.output_bits, 44);
        assert_eq!(c.page_size_mask, 1 << 12 | 1 << 21 | 1 << 30);
        assert_eq!(c.table_formats, vec![VIRTIO_IOMMU_PSTF_ARM_SMMU_V3]);
        assert!(!c.page_requests);
    }

    #[test]
    fn unknown_hw_is_map_only_and_short_data_is_zero() {
        let kind = parse_hw_info(&hw_info(9, 0), &[]);
        assert_eq!(kind, HwKind::Other(9));
        assert!(caps_from_hw(&kind, 0).table_formats.is_empty());
        let kind = parse_hw_info(
            &hw_info(iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD, 0),
            &[1, 2],
        );
        assert_eq!(kind, HwKind::IntelVtd(VtdHw::default()));
    }

    #[test]
    fn no_nesting_reason_names_the_vtd_bits() {
        // QEMU 7.2's intel-iommu: ecap 0xf00f4a, no NEST, no FLTS.
        let kind = HwKind::IntelVtd(VtdHw {
            flags: 0,
            cap: 0xd2_008c_2226_0286,
            ecap: 0xf0_0f4a,
        });
        assert!(caps_from_hw(&kind, 0).table_formats.is_empty());
        let why = no_nesting_reason(&kind);
        assert!(
            why.contains("0xf00f4a") && why.contains("(bit 26) 0"),
            "{why}"
        );
    }

    #[test]
    fn hw_info_request_layout() {
        let r = hw_info_request(3);
        let b = crate::host::bytes_of(&r);
        assert_eq!(b.len(), 40);
        assert_eq!(le32(b, 0), Some(40));
        assert_eq!(le32(b, 8), Some(3));
        assert_eq!(le32(b, 12), Some(HW_INFO_DATA_LEN as u32));
    }
}
