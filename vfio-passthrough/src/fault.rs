//! Faults and page requests from the host, as the guest's eventq wants
//! them: `iommu_hwpt_pgfault` records from an iommufd fault queue (page
//! requests, answered with `iommu_hwpt_page_response`) and SMMUv3 event
//! records from a vEVENTQ (unrecoverable faults).
//!
//! Pure decoding of the bytes read from the queue fds; records that are
//! cut short are dropped, never read past.

use iommufd_bindings::iommufd::{
    iommu_hwpt_page_response, iommu_hwpt_pgfault,
    iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_LAST_PAGE,
    iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_PASID_VALID,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_EXEC,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_PRIV,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_READ,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_WRITE,
    iommu_veventq_flag_IOMMU_VEVENTQ_FLAG_LOST_EVENTS,
    iommufd_page_response_code_IOMMUFD_PAGE_RESP_INVALID,
    iommufd_page_response_code_IOMMUFD_PAGE_RESP_SUCCESS,
};
use vmm_iommu::backend::BackendFault;
use vmm_iommu::wire::{
    VIRTIO_IOMMU_FAULT_F_EXEC, VIRTIO_IOMMU_FAULT_F_PRIV, VIRTIO_IOMMU_FAULT_F_READ,
    VIRTIO_IOMMU_FAULT_F_WRITE, VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_R_MAPPING,
    VIRTIO_IOMMU_FAULT_R_UNKNOWN, VIRTIO_IOMMU_PAGE_RESP_SUCCESS,
};

use crate::host::{le32, le64};

/// Bytes of one `struct iommu_hwpt_pgfault`.
pub const PGFAULT_SIZE: usize = std::mem::size_of::<iommu_hwpt_pgfault>();
/// Bytes of a vEVENTQ header (`struct iommufd_vevent_header`).
pub const VEVENT_HEADER_SIZE: usize = 8;
/// Bytes of an SMMUv3 event (`struct iommu_vevent_arm_smmuv3`: 4 × le64).
pub const SMMU_EVENT_SIZE: usize = 32;

/// Decodes the page-fault records in `bytes` (iommufd.h `struct
/// iommu_hwpt_pgfault { flags@0, dev_id@4, pasid@8, grpid@12, perm@16,
/// __reserved@20, addr@24, length@32, cookie@36 }`).
pub fn parse_pgfaults(bytes: &[u8]) -> Vec<iommu_hwpt_pgfault> {
    bytes
        .chunks_exact(PGFAULT_SIZE)
        .map(|r| iommu_hwpt_pgfault {
            flags: le32(r, 0).unwrap_or(0),
            dev_id: le32(r, 4).unwrap_or(0),
            pasid: le32(r, 8).unwrap_or(0),
            grpid: le32(r, 12).unwrap_or(0),
            perm: le32(r, 16).unwrap_or(0),
            __reserved: 0,
            addr: le64(r, 24).unwrap_or(0),
            length: le32(r, 32).unwrap_or(0),
            cookie: le32(r, 36).unwrap_or(0),
        })
        .collect()
}

/// Whether a page-fault record is the last of its group.
pub fn is_last_page(f: &iommu_hwpt_pgfault) -> bool {
    f.flags & iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_LAST_PAGE != 0
}

/// A page request of `endpoint` for the eventq.
pub fn pgfault_to_backend(f: &iommu_hwpt_pgfault, endpoint: u32) -> BackendFault {
    let mut access = 0;
    for (perm, flag) in [
        (
            iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_READ,
            VIRTIO_IOMMU_FAULT_F_READ,
        ),
        (
            iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_WRITE,
            VIRTIO_IOMMU_FAULT_F_WRITE,
        ),
        (
            iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_EXEC,
            VIRTIO_IOMMU_FAULT_F_EXEC,
        ),
        (
            iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_PRIV,
            VIRTIO_IOMMU_FAULT_F_PRIV,
        ),
    ] {
        if f.perm & perm != 0 {
            access |= flag;
        }
    }
    BackendFault {
        endpoint,
        pasid: (f.flags & iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_PASID_VALID != 0)
            .then_some(f.pasid),
        address: f.addr,
        reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
        access_flags: access,
        page_request: Some(f.grpid),
        last_page: is_last_page(f),
    }
}

/// The response to a page-request group: SUCCESS stays SUCCESS; the
/// guest's INVALID and FAILURE both become `IOMMUFD_PAGE_RESP_INVALID`
/// (iommufd has no third code: "Could not handle this fault, don't retry").
pub fn page_response(cookie: u32, virtio_code: u16) -> iommu_hwpt_page_response {
    iommu_hwpt_page_response {
        cookie,
        code: if virtio_code == VIRTIO_IOMMU_PAGE_RESP_SUCCESS {
            iommufd_page_response_code_IOMMUFD_PAGE_RESP_SUCCESS
        } else {
            iommufd_page_response_code_IOMMUFD_PAGE_RESP_INVALID
        },
    }
}

/// One SMMUv3 event read from a vEVENTQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VEvent {
    /// An event record (the four little-endian words).
    Smmu([u64; 4]),
    /// The queue overflowed and events were lost.
    Lost,
}

/// Decodes `header, data, header, data...` (iommufd.h `struct
/// iommufd_vevent_header { flags, sequence }`, then for the SMMUv3 type
/// `struct iommu_vevent_arm_smmuv3 { __le64 evt[4] }`; a LOST_EVENTS
/// header carries no data).
pub fn parse_vevents(bytes: &[u8]) -> Vec<VEvent> {
    let mut out = Vec::new();
    let mut off = 0;
    while let Some(flags) = le32(bytes, off) {
        off += VEVENT_HEADER_SIZE;
        if off > bytes.len() {
            break;
        }
        if flags & iommu_veventq_flag_IOMMU_VEVENTQ_FLAG_LOST_EVENTS != 0 {
            out.push(VEvent::Lost);
            continue;
        }
        let Some(rec) = bytes.get(off..off + SMMU_EVENT_SIZE) else {
            break;
        };
        let mut evt = [0u64; 4];
        for (i, w) in evt.iter_mut().enumerate() {
            *w = le64(rec, i * 8).unwrap_or(0);
        }
        out.push(VEvent::Smmu(evt));
        off += SMMU_EVENT_SIZE;
    }
    out
}

/// `EVT_ID_TRANSLATION_FAULT` .. `EVT_ID_PERMISSION_FAULT` (arm-smmu-v3.h).
const EVT_ID_TRANSLATION_FAULT: u64 = 0x10;
const EVT_ID_PERMISSION_FAULT: u64 = 0x13;
/// `C_BAD_STE`, `F_STREAM_DISABLED`, `C_BAD_SUBSTREAMID`, `C_BAD_CD`
/// (SMMUv3 7.3): the guest's configuration, not a missing mapping.
const EVT_ID_BAD_STE: u64 = 0x04;
const EVT_ID_BAD_CD: u64 = 0x0a;

/// An SMMUv3 event (`EVTQ_0_ID` 7:0, `EVTQ_0_SSV` 11, `EVTQ_0_SSID` 31:12,
/// `EVTQ_0_SID` 63:32 — the kernel puts the vSID there; `EVTQ_1_PnU` 33,
/// `EVTQ_1_InD` 34, `EVTQ_1_RnW` 35; `EVTQ_2_ADDR`) as a fault of the
/// endpoint whose vSID it names. `vsid_to_endpoint` maps back.
pub fn smmu_event_to_backend(
    evt: &[u64; 4],
    vsid_to_endpoint: impl Fn(u32) -> Option<u32>,
) -> Option<BackendFault> {
    let id = evt[0] & 0xff;
    let endpoint = vsid_to_endpoint((evt[0] >> 32) as u32)?;
    let ssv = evt[0] & 1 << 11 != 0;
    let reason = match id {
        EVT_ID_TRANSLATION_FAULT..=EVT_ID_PERMISSION_FAULT => VIRTIO_IOMMU_FAULT_R_MAPPING,
        EVT_ID_BAD_STE..=EVT_ID_BAD_CD => VIRTIO_IOMMU_FAULT_R_DOMAIN,
        _ => VIRTIO_IOMMU_FAULT_R_UNKNOWN,
    };
    let mut access = if evt[1] & 1 << 35 != 0 {
        VIRTIO_IOMMU_FAULT_F_READ
    } else {
        VIRTIO_IOMMU_FAULT_F_WRITE
    };
    if evt[1] & 1 << 34 != 0 {
        access |= VIRTIO_IOMMU_FAULT_F_EXEC;
    }
    if evt[1] & 1 << 33 != 0 {
        access |= VIRTIO_IOMMU_FAULT_F_PRIV;
    }
    Some(BackendFault {
        endpoint,
        pasid: ssv.then_some((evt[0] >> 12 & 0xf_ffff) as u32),
        address: evt[2],
        reason,
        access_flags: access,
        page_request: None,
        last_page: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::bytes_of;

    fn pgfault_bytes(
        flags: u32,
        dev: u32,
        pasid: u32,
        grp: u32,
        perm: u32,
        addr: u64,
        cookie: u32,
    ) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [flags, dev, pasid, grp, perm, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&cookie.to_le_bytes());
        b
    }

    #[test]
    fn pgfault_records_decode_and_partial_tails_drop() {
        let mut b = pgfault_bytes(3, 7, 5, 9, 3, 0xdead_0000, 42);
        b.extend_from_slice(&[1, 2, 3]);
        let f = parse_pgfaults(&b);
        assert_eq!(f.len(), 1);
        assert_eq!(
            (f[0].dev_id, f[0].pasid, f[0].grpid, f[0].cookie),
            (7, 5, 9, 42)
        );
        assert!(is_last_page(&f[0]));
        let bf = pgfault_to_backend(&f[0], 16);
        assert_eq!(bf.endpoint, 16);
        assert_eq!(bf.pasid, Some(5));
        assert_eq!(bf.page_request, Some(9));
        assert_eq!(
            bf.access_flags,
            VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_WRITE
        );
        assert_eq!(bf.address, 0xdead_0000);
    }

    #[test]
    fn pasid_is_reported_only_when_valid() {
        let f = parse_pgfaults(&pgfault_bytes(0, 7, 5, 9, 4, 0, 1));
        let bf = pgfault_to_backend(&f[0], 1);
        assert_eq!(bf.pasid, None);
        assert_eq!(bf.access_flags, VIRTIO_IOMMU_FAULT_F_EXEC);
    }

    #[test]
    fn page_response_bytes_and_codes() {
        let r = page_response(42, VIRTIO_IOMMU_PAGE_RESP_SUCCESS);
        assert_eq!(bytes_of(&r), &[42, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(page_response(1, 1).code, 1);
        assert_eq!(page_response(1, 2).code, 1);
    }

    #[test]
    fn vevents_decode_with_lost_marker() {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        let evt0: u64 = 0x10 | 1 << 11 | 3 << 12 | 0x10 << 32;
        for w in [evt0, 1 << 35 | 1 << 33, 0xabc000, 0] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&[0; 5]);
        let v = parse_vevents(&b);
        assert_eq!(v.len(), 2);
        assert_eq!(v[1], VEvent::Lost);
        let VEvent::Smmu(e) = v[0] else { panic!() };
        let f = smmu_event_to_backend(&e, |s| (s == 0x10).then_some(16)).unwrap();
        assert_eq!(f.endpoint, 16);
        assert_eq!(f.pasid, Some(3));
        assert_eq!(f.address, 0xabc000);
        assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
        assert_eq!(
            f.access_flags,
            VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_PRIV
        );
        assert!(smmu_event_to_backend(&e, |_| None).is_none());
    }

    #[test]
    fn truncated_vevent_is_dropped() {
        let b = [0u8; 20];
        assert!(parse_vevents(&b).is_empty());
        assert!(parse_vevents(&[0u8; 3]).is_empty());
    }
}
