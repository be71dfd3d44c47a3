//! Builders of the iommufd and VFIO-cdev ioctl arguments the nested
//! backend sends, one pure function per struct of
//! include/uapi/linux/iommufd.h and include/uapi/linux/vfio.h. Pointer
//! fields stay zero (the host implementation fills them from the slices
//! it is given); `size`/`argsz` is always the struct's own size.

use std::mem::size_of;

use iommufd_bindings::iommufd::{
    iommu_destroy, iommu_fault_alloc, iommu_hwpt_alloc, iommu_hwpt_invalidate, iommu_ioas_alloc,
    iommu_ioas_iova_ranges, iommu_vdevice_alloc, iommu_veventq_alloc,
    iommu_veventq_type_IOMMU_VEVENTQ_TYPE_ARM_SMMUV3, iommu_viommu_alloc,
    iommu_viommu_type_IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
};
use vfio_bindings::bindings::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_detach_iommufd_pt, VFIO_DEVICE_ATTACH_PASID,
    VFIO_DEVICE_DETACH_PASID,
};

/// `IOMMU_IOAS_ALLOC`.
pub fn ioas_alloc() -> iommu_ioas_alloc {
    iommu_ioas_alloc {
        size: size_of::<iommu_ioas_alloc>() as u32,
        flags: 0,
        out_ioas_id: 0,
    }
}

/// `IOMMU_IOAS_IOVA_RANGES` of IOAS `ioas_id` into a buffer of
/// `num_iovas` ranges (`allowed_iovas` is filled by the host
/// implementation from the buffer).
pub fn ioas_iova_ranges(ioas_id: u32, num_iovas: u32) -> iommu_ioas_iova_ranges {
    iommu_ioas_iova_ranges {
        size: size_of::<iommu_ioas_iova_ranges>() as u32,
        ioas_id,
        num_iovas,
        ..Default::default()
    }
}

/// `IOMMU_DESTROY` of object `id`.
pub fn destroy(id: u32) -> iommu_destroy {
    iommu_destroy {
        size: size_of::<iommu_destroy>() as u32,
        id,
    }
}

/// `IOMMU_HWPT_ALLOC`: a HWPT for `dev_id` on `pt_id` (an IOAS for a
/// parent, a parent HWPT or vIOMMU for a nested one), with `data_len`
/// bytes of `data_type` vendor data and, with `IOMMU_HWPT_FAULT_ID_VALID`
/// in `flags`, page faults delivered to `fault_id`.
pub fn hwpt_alloc(
    flags: u32,
    dev_id: u32,
    pt_id: u32,
    data_type: u32,
    data_len: u32,
    fault_id: u32,
) -> iommu_hwpt_alloc {
    iommu_hwpt_alloc {
        size: size_of::<iommu_hwpt_alloc>() as u32,
        flags,
        dev_id,
        pt_id,
        out_hwpt_id: 0,
        __reserved: 0,
        data_type,
        data_len,
        data_uptr: 0,
        fault_id,
        __reserved2: 0,
    }
}

/// `IOMMU_HWPT_INVALIDATE` of `entry_num` entries of `entry_len` bytes on
/// `hwpt_id` (a nested HWPT for VT-d, the vIOMMU for SMMUv3).
pub fn hwpt_invalidate(
    hwpt_id: u32,
    data_type: u32,
    entry_len: u32,
    entry_num: u32,
) -> iommu_hwpt_invalidate {
    iommu_hwpt_invalidate {
        size: size_of::<iommu_hwpt_invalidate>() as u32,
        hwpt_id,
        data_uptr: 0,
        data_type,
        entry_len,
        entry_num,
        __reserved: 0,
    }
}

/// `IOMMU_VIOMMU_ALLOC` of an Arm SMMUv3 vIOMMU on nest parent `hwpt_id`.
pub fn viommu_alloc_smmuv3(dev_id: u32, hwpt_id: u32) -> iommu_viommu_alloc {
    iommu_viommu_alloc {
        size: size_of::<iommu_viommu_alloc>() as u32,
        flags: 0,
        type_: iommu_viommu_type_IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
        dev_id,
        hwpt_id,
        out_viommu_id: 0,
        data_len: 0,
        __reserved: 0,
        data_uptr: 0,
    }
}

/// `IOMMU_VDEVICE_ALLOC`: `dev_id` as virtual ID `virt_id` (the vSID) of
/// `viommu_id`.
pub fn vdevice_alloc(viommu_id: u32, dev_id: u32, virt_id: u64) -> iommu_vdevice_alloc {
    iommu_vdevice_alloc {
        size: size_of::<iommu_vdevice_alloc>() as u32,
        viommu_id,
        dev_id,
        out_vdevice_id: 0,
        virt_id,
    }
}

/// `IOMMU_VEVENTQ_ALLOC` of an SMMUv3 event queue of `depth` events.
pub fn veventq_alloc_smmuv3(viommu_id: u32, depth: u32) -> iommu_veventq_alloc {
    iommu_veventq_alloc {
        size: size_of::<iommu_veventq_alloc>() as u32,
        flags: 0,
        viommu_id,
        type_: iommu_veventq_type_IOMMU_VEVENTQ_TYPE_ARM_SMMUV3,
        veventq_depth: depth,
        out_veventq_id: 0,
        out_veventq_fd: 0,
        __reserved: 0,
    }
}

/// `IOMMU_FAULT_QUEUE_ALLOC`.
pub fn fault_alloc() -> iommu_fault_alloc {
    iommu_fault_alloc {
        size: size_of::<iommu_fault_alloc>() as u32,
        flags: 0,
        out_fault_id: 0,
        out_fault_fd: 0,
    }
}

/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` of `pasid` (0: the device's requests
/// without PASID, no `VFIO_DEVICE_ATTACH_PASID` flag) to `pt_id`.
pub fn attach_pt(pasid: u32, pt_id: u32) -> vfio_device_attach_iommufd_pt {
    vfio_device_attach_iommufd_pt {
        argsz: size_of::<vfio_device_attach_iommufd_pt>() as u32,
        flags: if pasid == 0 {
            0
        } else {
            VFIO_DEVICE_ATTACH_PASID
        },
        pt_id,
        pasid,
    }
}

/// `VFIO_DEVICE_DETACH_IOMMUFD_PT` of `pasid` (0: the device itself).
pub fn detach_pt(pasid: u32) -> vfio_device_detach_iommufd_pt {
    vfio_device_detach_iommufd_pt {
        argsz: size_of::<vfio_device_detach_iommufd_pt>() as u32,
        flags: if pasid == 0 {
            0
        } else {
            VFIO_DEVICE_DETACH_PASID
        },
        pasid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::bytes_of;
    use std::mem::offset_of;

    fn words32(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn hwpt_alloc_layout() {
        // size@0 flags@4 dev_id@8 pt_id@12 out_hwpt_id@16 __reserved@20
        // data_type@24 data_len@28 data_uptr@32 fault_id@40 __reserved2@44.
        assert_eq!(size_of::<iommu_hwpt_alloc>(), 48);
        assert_eq!(offset_of!(iommu_hwpt_alloc, data_uptr), 32);
        assert_eq!(offset_of!(iommu_hwpt_alloc, fault_id), 40);
        let a = hwpt_alloc(1 | 8, 3, 2, 1, 24, 9);
        let mut want = words32(&[48, 9, 3, 2, 0, 0, 1, 24]);
        want.extend_from_slice(&0u64.to_le_bytes());
        want.extend(words32(&[9, 0]));
        assert_eq!(bytes_of(&a), &want[..]);
    }

    #[test]
    fn hwpt_invalidate_layout() {
        // size@0 hwpt_id@4 data_uptr@8 data_type@16 entry_len@20
        // entry_num@24 __reserved@28.
        assert_eq!(size_of::<iommu_hwpt_invalidate>(), 32);
        assert_eq!(offset_of!(iommu_hwpt_invalidate, entry_num), 24);
        let a = hwpt_invalidate(7, 1, 16, 3);
        let mut want = words32(&[32, 7]);
        want.extend_from_slice(&0u64.to_le_bytes());
        want.extend(words32(&[1, 16, 3, 0]));
        assert_eq!(bytes_of(&a), &want[..]);
    }

    #[test]
    fn viommu_vdevice_veventq_layouts() {
        assert_eq!(size_of::<iommu_viommu_alloc>(), 40);
        let v = viommu_alloc_smmuv3(3, 4);
        let mut want = words32(&[40, 0, 1, 3, 4, 0, 0, 0]);
        want.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(bytes_of(&v), &want[..]);

        // size@0 viommu_id@4 dev_id@8 out_vdevice_id@12 virt_id@16.
        assert_eq!(size_of::<iommu_vdevice_alloc>(), 24);
        let d = vdevice_alloc(5, 3, 0x10);
        let mut want = words32(&[24, 5, 3, 0]);
        want.extend_from_slice(&0x10u64.to_le_bytes());
        assert_eq!(bytes_of(&d), &want[..]);

        assert_eq!(size_of::<iommu_veventq_alloc>(), 32);
        let q = veventq_alloc_smmuv3(5, 64);
        assert_eq!(bytes_of(&q), &words32(&[32, 0, 5, 1, 64, 0, 0, 0])[..]);
    }

    #[test]
    fn small_layouts() {
        assert_eq!(bytes_of(&ioas_alloc()), &words32(&[12, 0, 0])[..]);
        assert_eq!(bytes_of(&destroy(6)), &words32(&[8, 6])[..]);
        assert_eq!(bytes_of(&fault_alloc()), &words32(&[16, 0, 0, 0])[..]);
    }

    #[test]
    fn attach_and_detach_use_the_pasid_flag_except_for_pasid_0() {
        // argsz@0 flags@4 pt_id@8 pasid@12 / argsz@0 flags@4 pasid@8.
        assert_eq!(bytes_of(&attach_pt(0, 9)), &words32(&[16, 0, 9, 0])[..]);
        assert_eq!(bytes_of(&attach_pt(5, 9)), &words32(&[16, 1, 9, 5])[..]);
        assert_eq!(bytes_of(&detach_pt(0)), &words32(&[12, 0, 0])[..]);
        assert_eq!(bytes_of(&detach_pt(5)), &words32(&[12, 1, 5])[..]);
    }
}
