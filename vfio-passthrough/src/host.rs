//! The one narrow seam between the backends and the kernel: [`HostIommu`].
//!
//! Every call a backend makes into VFIO or iommufd is one [`Ioctl`] value
//! carrying the exact uAPI struct from `vfio-bindings` / `iommufd-bindings`
//! (and, where the struct points at a user buffer, that buffer as a slice),
//! or one of four fd operations (open, read, write, close). Nothing else
//! crosses. The real implementation ([`crate::sys::VfioHost`]) hands the
//! structs to `vfio-ioctls` / `iommufd-ioctls`; the recording one
//! ([`crate::recording::RecordingHost`]) keeps their bytes, so tests see
//! what the kernel would see, byte for byte.
//!
//! Pointer fields (`data_uptr`) are left zero by the builders: a pointer is
//! the one thing that differs from run to run, so the implementation fills
//! it in from the slice right before the syscall and the recorded bytes stay
//! deterministic. Host virtual addresses of guest RAM (`vaddr`, `user_va`)
//! are real inputs and are recorded as they are.
//!
//! This module never calls the kernel.

use std::io;
use std::path::{Path, PathBuf};

use iommufd_bindings::iommufd::{
    iommu_destroy, iommu_fault_alloc, iommu_hw_info, iommu_hw_info_arm_smmuv3, iommu_hw_info_vtd,
    iommu_hwpt_alloc, iommu_hwpt_arm_smmuv3, iommu_hwpt_get_dirty_bitmap, iommu_hwpt_invalidate,
    iommu_hwpt_page_response, iommu_hwpt_pgfault, iommu_hwpt_set_dirty_tracking, iommu_hwpt_vtd_s1,
    iommu_hwpt_vtd_s1_invalidate, iommu_ioas_alloc, iommu_ioas_map, iommu_ioas_unmap,
    iommu_vdevice_alloc, iommu_vevent_arm_smmuv3, iommu_veventq_alloc, iommu_viommu_alloc,
    iommu_viommu_arm_smmuv3_invalidate, iommufd_vevent_header,
};
use iommufd_bindings::iommufd::{iommu_ioas_iova_ranges, iommu_iova_range};
use vfio_bindings::bindings::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_detach_iommufd_pt, vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap, vfio_iommu_type1_info,
};

/// An open host object (VFIO container, VFIO device cdev, iommufd, fault
/// or event queue fd), named by the [`HostIommu`] implementation that
/// opened it. The real implementation uses the fd number; the recording
/// one counts from 100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(pub i32);

/// What to open.
#[derive(Clone, Copy, Debug)]
pub enum Open<'a> {
    /// A VFIO type1 container holding the group of the device at `device`
    /// (a sysfs device directory), with the device opened in it. The
    /// handle names the container: the type1 ioctls go there.
    Type1 {
        /// sysfs path of the device, e.g. `/sys/bus/pci/devices/0000:65:00.0`.
        device: &'a Path,
    },
    /// `/dev/iommu`.
    Iommufd,
    /// The VFIO cdev of the device at `device`, bound to `iommufd`
    /// (`VFIO_DEVICE_BIND_IOMMUFD`); the handle names the device and
    /// [`Opened::dev_id`] is the iommufd device ID.
    Cdev {
        /// sysfs path of the device.
        device: &'a Path,
        /// The iommufd to bind to.
        iommufd: Handle,
    },
}

/// The result of [`HostIommu::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The new object.
    pub handle: Handle,
    /// For [`Open::Cdev`]: the `out_devid` of `VFIO_DEVICE_BIND_IOMMUFD`.
    pub dev_id: Option<u32>,
}

/// A device name that is neither a sysfs path nor a PCI address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither a /sys path nor a PCI address like 0000:65:00.0")]
pub struct NotADevicePath(pub String);

/// The sysfs directory [`Open`] takes for the device `spec` names: a
/// `/sys/...` path as it is, or a PCI address `DDDD:BB:DD.F` or `BB:DD.F`
/// (hex; domain 0000 when left out) under `/sys/bus/pci/devices`.
///
/// `vfio-ioctls` finds a device's IOMMU group (type1) and its VFIO cdev
/// (iommufd) from that directory, so it is what every open names; a VMM's
/// users name devices either way.
pub fn sysfs_path(spec: &str) -> Result<PathBuf, NotADevicePath> {
    if spec.starts_with("/sys/") {
        return Ok(PathBuf::from(spec));
    }
    if is_bdf(spec) {
        let full = if spec.matches(':').count() == 1 {
            format!("0000:{spec}")
        } else {
            spec.to_string()
        };
        return Ok(PathBuf::from("/sys/bus/pci/devices").join(full.to_ascii_lowercase()));
    }
    Err(NotADevicePath(spec.to_string()))
}

/// Whether `s` is a PCI address `DDDD:BB:DD.F` or `BB:DD.F` (hex).
fn is_bdf(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    let (dom, bus, devfn) = match parts.as_slice() {
        [d, b, df] => (Some(*d), *b, *df),
        [b, df] => (None, *b, *df),
        _ => return false,
    };
    let hex = |x: &str, n: usize| x.len() == n && x.chars().all(|c| c.is_ascii_hexdigit());
    let Some((dev, func)) = devfn.split_once('.') else {
        return false;
    };
    dom.is_none_or(|d| hex(d, 4))
        && hex(bus, 2)
        && hex(dev, 2)
        && func.len() == 1
        && func.chars().all(|c| ('0'..='7').contains(&c))
}

/// One ioctl, with its uAPI argument. Output fields are written back into
/// the argument, as the kernel does.
#[derive(Debug)]
pub enum Ioctl<'a> {
    /// `VFIO_IOMMU_GET_INFO` on a container: `buf` starts with a
    /// `vfio_iommu_type1_info` whose `argsz` is `buf.len()`; the kernel
    /// fills the capability chain after it.
    Type1GetInfo {
        /// The whole argument buffer.
        buf: &'a mut [u8],
    },
    /// `VFIO_IOMMU_MAP_DMA` on a container.
    Type1MapDma(&'a vfio_iommu_type1_dma_map),
    /// `VFIO_IOMMU_UNMAP_DMA` on a container; `size` is written back with
    /// the bytes unmapped.
    Type1UnmapDma(&'a mut vfio_iommu_type1_dma_unmap),
    /// `IOMMU_IOAS_ALLOC` on the iommufd.
    IoasAlloc(&'a mut iommu_ioas_alloc),
    /// `IOMMU_IOAS_MAP` on the iommufd.
    IoasMap(&'a iommu_ioas_map),
    /// `IOMMU_IOAS_UNMAP` on the iommufd.
    IoasUnmap(&'a mut iommu_ioas_unmap),
    /// `IOMMU_IOAS_IOVA_RANGES` on the iommufd: the IOAS's allowed IOVA
    /// ranges (what the reserved regions of the devices attached to it
    /// leave) into `ranges`, which `allowed_iovas` points at; `num_iovas`
    /// is written back with the number of ranges (EMSGSIZE when more than
    /// `ranges` holds).
    IoasIovaRanges {
        /// The argument.
        arg: &'a mut iommu_ioas_iova_ranges,
        /// The range buffer (`num_iovas` entries).
        ranges: &'a mut [iommu_iova_range],
    },
    /// `IOMMU_HWPT_ALLOC` on the iommufd; `data` is what `data_uptr`
    /// points at (`data_len` bytes of `iommu_hwpt_vtd_s1` /
    /// `iommu_hwpt_arm_smmuv3`, or empty).
    HwptAlloc {
        /// The argument.
        arg: &'a mut iommu_hwpt_alloc,
        /// The vendor data.
        data: &'a [u8],
    },
    /// `IOMMU_GET_HW_INFO` on the iommufd; the kernel fills `data`.
    GetHwInfo {
        /// The argument.
        arg: &'a mut iommu_hw_info,
        /// The vendor buffer (`data_len` bytes).
        data: &'a mut [u8],
    },
    /// `IOMMU_HWPT_INVALIDATE` on the iommufd; `entries` is the array of
    /// `entry_num` vendor entries. `entry_num` is written back with the
    /// number the kernel handled, also on failure.
    HwptInvalidate {
        /// The argument.
        arg: &'a mut iommu_hwpt_invalidate,
        /// The entries, `entry_len` bytes each.
        entries: &'a [u8],
    },
    /// `IOMMU_VIOMMU_ALLOC` on the iommufd.
    ViommuAlloc(&'a mut iommu_viommu_alloc),
    /// `IOMMU_VDEVICE_ALLOC` on the iommufd.
    VdeviceAlloc(&'a mut iommu_vdevice_alloc),
    /// `IOMMU_FAULT_QUEUE_ALLOC` on the iommufd; `out_fault_fd` is the
    /// [`Handle`] of the new queue.
    FaultQueueAlloc(&'a mut iommu_fault_alloc),
    /// `IOMMU_VEVENTQ_ALLOC` on the iommufd; `out_veventq_fd` is the
    /// [`Handle`] of the new queue.
    VeventqAlloc(&'a mut iommu_veventq_alloc),
    /// `IOMMU_DESTROY` on the iommufd.
    Destroy(&'a iommu_destroy),
    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` on a device cdev (with
    /// `VFIO_DEVICE_ATTACH_PASID` in `flags` for a PASID).
    AttachPt(&'a mut vfio_device_attach_iommufd_pt),
    /// `VFIO_DEVICE_DETACH_IOMMUFD_PT` on a device cdev.
    DetachPt(&'a vfio_device_detach_iommufd_pt),
    /// `IOMMU_HWPT_SET_DIRTY_TRACKING` on the iommufd.
    HwptSetDirtyTracking(&'a iommu_hwpt_set_dirty_tracking),
    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` on the iommufd; `bitmap` is what
    /// `data` points at, one bit per `page_size` page of the range, and
    /// the kernel sets the bits of dirty pages in it.
    HwptGetDirtyBitmap {
        /// The argument.
        arg: &'a iommu_hwpt_get_dirty_bitmap,
        /// The bitmap.
        bitmap: &'a mut [u64],
    },
    /// `VFIO_IOMMU_DIRTY_PAGES` on a container: `arg` is the
    /// `vfio_iommu_type1_dirty_bitmap` header (START, STOP) or the header
    /// and a `vfio_iommu_type1_dirty_bitmap_get` (GET_BITMAP), built by
    /// `crate::dirty`; for GET_BITMAP `bitmap` is what its `data` points
    /// at, and the kernel sets the bits of dirty pages in it.
    Type1DirtyPages {
        /// The argument bytes.
        arg: &'a [u8],
        /// The bitmap (empty for START and STOP).
        bitmap: &'a mut [u64],
    },
}

/// The kind of a host call, for recording, scripting and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Open::Type1`].
    OpenType1,
    /// [`Open::Iommufd`].
    OpenIommufd,
    /// [`Open::Cdev`].
    OpenCdev,
    /// [`Ioctl::Type1GetInfo`].
    Type1GetInfo,
    /// [`Ioctl::Type1MapDma`].
    Type1MapDma,
    /// [`Ioctl::Type1UnmapDma`].
    Type1UnmapDma,
    /// [`Ioctl::IoasAlloc`].
    IoasAlloc,
    /// [`Ioctl::IoasMap`].
    IoasMap,
    /// [`Ioctl::IoasUnmap`].
    IoasUnmap,
    /// [`Ioctl::IoasIovaRanges`].
    IoasIovaRanges,
    /// [`Ioctl::HwptAlloc`].
    HwptAlloc,
    /// [`Ioctl::GetHwInfo`].
    GetHwInfo,
    /// [`Ioctl::HwptInvalidate`].
    HwptInvalidate,
    /// [`Ioctl::ViommuAlloc`].
    ViommuAlloc,
    /// [`Ioctl::VdeviceAlloc`].
    VdeviceAlloc,
    /// [`Ioctl::FaultQueueAlloc`].
    FaultQueueAlloc,
    /// [`Ioctl::VeventqAlloc`].
    VeventqAlloc,
    /// [`Ioctl::Destroy`].
    Destroy,
    /// [`Ioctl::AttachPt`].
    AttachPt,
    /// [`Ioctl::DetachPt`].
    DetachPt,
    /// [`Ioctl::HwptSetDirtyTracking`].
    HwptSetDirtyTracking,
    /// [`Ioctl::HwptGetDirtyBitmap`].
    HwptGetDirtyBitmap,
    /// [`Ioctl::Type1DirtyPages`].
    Type1DirtyPages,
    /// [`HostIommu::read`].
    Read,
    /// [`HostIommu::write`].
    Write,
    /// [`HostIommu::close`].
    Close,
}

impl Op {
    /// The uAPI name of the call (the ioctl's name, or the syscall's).
    pub fn name(self) -> &'static str {
        match self {
            Op::OpenType1 => "open(VFIO group/container)",
            Op::OpenIommufd => "open(/dev/iommu)",
            Op::OpenCdev => "VFIO_DEVICE_BIND_IOMMUFD",
            Op::Type1GetInfo => "VFIO_IOMMU_GET_INFO",
            Op::Type1MapDma => "VFIO_IOMMU_MAP_DMA",
            Op::Type1UnmapDma => "VFIO_IOMMU_UNMAP_DMA",
            Op::IoasAlloc => "IOMMU_IOAS_ALLOC",
            Op::IoasMap => "IOMMU_IOAS_MAP",
            Op::IoasUnmap => "IOMMU_IOAS_UNMAP",
            Op::IoasIovaRanges => "IOMMU_IOAS_IOVA_RANGES",
            Op::HwptAlloc => "IOMMU_HWPT_ALLOC",
            Op::GetHwInfo => "IOMMU_GET_HW_INFO",
            Op::HwptInvalidate => "IOMMU_HWPT_INVALIDATE",
            Op::ViommuAlloc => "IOMMU_VIOMMU_ALLOC",
            Op::VdeviceAlloc => "IOMMU_VDEVICE_ALLOC",
            Op::FaultQueueAlloc => "IOMMU_FAULT_QUEUE_ALLOC",
            Op::VeventqAlloc => "IOMMU_VEVENTQ_ALLOC",
            Op::Destroy => "IOMMU_DESTROY",
            Op::AttachPt => "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
            Op::DetachPt => "VFIO_DEVICE_DETACH_IOMMUFD_PT",
            Op::HwptSetDirtyTracking => "IOMMU_HWPT_SET_DIRTY_TRACKING",
            Op::HwptGetDirtyBitmap => "IOMMU_HWPT_GET_DIRTY_BITMAP",
            Op::Type1DirtyPages => "VFIO_IOMMU_DIRTY_PAGES",
            Op::Read => "read",
            Op::Write => "write",
            Op::Close => "close",
        }
    }
}

impl Ioctl<'_> {
    /// The kind of the call.
    pub fn op(&self) -> Op {
        match self {
            Ioctl::Type1GetInfo { .. } => Op::Type1GetInfo,
            Ioctl::Type1MapDma(_) => Op::Type1MapDma,
            Ioctl::Type1UnmapDma(_) => Op::Type1UnmapDma,
            Ioctl::IoasAlloc(_) => Op::IoasAlloc,
            Ioctl::IoasMap(_) => Op::IoasMap,
            Ioctl::IoasUnmap(_) => Op::IoasUnmap,
            Ioctl::IoasIovaRanges { .. } => Op::IoasIovaRanges,
            Ioctl::HwptAlloc { .. } => Op::HwptAlloc,
            Ioctl::GetHwInfo { .. } => Op::GetHwInfo,
            Ioctl::HwptInvalidate { .. } => Op::HwptInvalidate,
            Ioctl::ViommuAlloc(_) => Op::ViommuAlloc,
            Ioctl::VdeviceAlloc(_) => Op::VdeviceAlloc,
            Ioctl::FaultQueueAlloc(_) => Op::FaultQueueAlloc,
            Ioctl::VeventqAlloc(_) => Op::VeventqAlloc,
            Ioctl::Destroy(_) => Op::Destroy,
            Ioctl::AttachPt(_) => Op::AttachPt,
            Ioctl::DetachPt(_) => Op::DetachPt,
            Ioctl::HwptSetDirtyTracking(_) => Op::HwptSetDirtyTracking,
            Ioctl::HwptGetDirtyBitmap { .. } => Op::HwptGetDirtyBitmap,
            Ioctl::Type1DirtyPages { .. } => Op::Type1DirtyPages,
        }
    }

    /// The argument's bytes as they are now and the bytes of the buffer it
    /// points at (empty when it points at none).
    pub fn bytes(&self) -> (Vec<u8>, Vec<u8>) {
        match self {
            Ioctl::Type1GetInfo { buf } => (buf.to_vec(), Vec::new()),
            Ioctl::Type1MapDma(a) => (bytes_of(*a).to_vec(), Vec::new()),
            Ioctl::Type1UnmapDma(a) => (bytes_of(&**a).to_vec(), Vec::new()),
            Ioctl::IoasAlloc(a) => (bytes_of(&**a).to_vec(), Vec::new()),
            Ioctl::IoasMap(a) => (bytes_of(*a).to_vec(), Vec::new()),
            Ioctl::IoasUnmap(a) => (bytes_of(&**a).to_vec(), Vec::new()),
            Ioctl::IoasIovaRanges { arg, ranges } => {
                (bytes_of(&**arg).to_vec(), slice_bytes(ranges).to_vec())
            }
            Ioctl::HwptAlloc { arg, data } => (bytes_of(&**arg).to_vec(), data.to_vec()),
            Ioctl::GetHwInfo { arg, .. } => (bytes_of(&**arg).to_vec(), Vec::new()),
            Ioctl::HwptInvalidate { arg, entries } => (bytes_of(&**arg).to_vec(), entries.to_vec()),
            Ioctl::ViommuAlloc(a) => (bytes_of(&**a).to_vec(), Vec::new()),
            Ioctl::VdeviceAlloc(a) => (bytes_of(&**a).to_vec(), Vec::new()),
            Ioctl::FaultQueueAlloc(a) => (bytes_of(&**a).to_vec(), Vec::new()),
            Ioctl::VeventqAlloc(a) => (bytes_of(&**a).to_vec(), Vec::new()),
            Ioctl::Destroy(a) => (bytes_of(*a).to_vec(), Vec::new()),
            Ioctl::AttachPt(a) => (bytes_of(&**a).to_vec(), Vec::new()),
            Ioctl::DetachPt(a) => (bytes_of(*a).to_vec(), Vec::new()),
            Ioctl::HwptSetDirtyTracking(a) => (bytes_of(*a).to_vec(), Vec::new()),
            Ioctl::HwptGetDirtyBitmap { arg, bitmap } => {
                (bytes_of(*arg).to_vec(), slice_bytes(bitmap).to_vec())
            }
            Ioctl::Type1DirtyPages { arg, bitmap } => (arg.to_vec(), slice_bytes(bitmap).to_vec()),
        }
    }
}

/// The kernel, as the backends see it. Implementations must be usable
/// from several threads; each call is one syscall (or, for [`open`], the
/// short fixed sequence that `vfio-ioctls` performs to open a device).
///
/// [`open`]: HostIommu::open
pub trait HostIommu: Send + Sync {
    /// Opens a host object.
    fn open(&self, what: Open<'_>) -> io::Result<Opened>;
    /// Issues one ioctl on `target`.
    fn ioctl(&self, target: Handle, call: Ioctl<'_>) -> io::Result<()>;
    /// Reads from a queue fd (fault queue or vEVENTQ); `Ok(0)` when it is
    /// empty (the fds are non-blocking).
    fn read(&self, target: Handle, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes to a queue fd (page responses to the fault queue).
    fn write(&self, target: Handle, buf: &[u8]) -> io::Result<usize>;
    /// Closes a host object. Closing a device detaches it.
    fn close(&self, target: Handle);
}

/// Plain uAPI structs whose every byte is a field: `repr(C)`, no padding,
/// no pointers that Rust would track (pointers are `u64` fields).
///
/// # Safety
///
/// Implementors must be `repr(C)` with no padding bytes, so that viewing
/// a value as `size_of::<Self>()` initialised bytes is sound.
pub unsafe trait Pod {}

/// Implements [`Pod`] for bindings structs, each with a compile-time check
/// that its size is the sum of its fields' sizes (no padding).
macro_rules! pod {
    ($($ty:ty = $($field:ty),+ ;)*) => {$(
        // SAFETY: bindgen emits these uAPI structs `repr(C)`; the assertion
        // below proves the fields fill the struct, so there is no padding
        // and every byte of a value is an initialised field byte.
        unsafe impl Pod for $ty {}
        const _: () = assert!(std::mem::size_of::<$ty>() == 0 $(+ std::mem::size_of::<$field>())+);
    )*};
}

pod! {
    vfio_iommu_type1_dma_map = u32, u32, u64, u64, u64;
    vfio_iommu_type1_dma_unmap = u32, u32, u64, u64;
    vfio_iommu_type1_info = u32, u32, u64, u32, u32;
    vfio_device_attach_iommufd_pt = u32, u32, u32, u32;
    vfio_device_detach_iommufd_pt = u32, u32, u32;
    iommu_destroy = u32, u32;
    iommu_ioas_alloc = u32, u32, u32;
    iommu_ioas_map = u32, u32, u32, u32, u64, u64, u64;
    iommu_ioas_unmap = u32, u32, u64, u64;
    iommu_hwpt_alloc = u32, u32, u32, u32, u32, u32, u32, u32, u64, u32, u32;
    iommu_hw_info = u32, u32, u32, u32, u64, u32, u8, [u8; 3], u64;
    iommu_hw_info_vtd = u32, u32, u64, u64;
    iommu_hw_info_arm_smmuv3 = u32, u32, [u32; 6], u32, u32;
    iommu_hwpt_invalidate = u32, u32, u64, u32, u32, u32, u32;
    iommu_hwpt_vtd_s1 = u64, u64, u32, u32;
    iommu_hwpt_arm_smmuv3 = [u64; 2];
    iommu_hwpt_vtd_s1_invalidate = u64, u64, u32, u32;
    iommu_viommu_arm_smmuv3_invalidate = [u64; 2];
    iommu_viommu_alloc = u32, u32, u32, u32, u32, u32, u32, u32, u64;
    iommu_vdevice_alloc = u32, u32, u32, u32, u64;
    iommu_fault_alloc = u32, u32, u32, u32;
    iommu_veventq_alloc = u32, u32, u32, u32, u32, u32, u32, u32;
    iommu_hwpt_pgfault = u32, u32, u32, u32, u32, u32, u64, u32, u32;
    iommu_hwpt_page_response = u32, u32;
    iommufd_vevent_header = u32, u32;
    iommu_vevent_arm_smmuv3 = [u64; 4];
    iommu_hwpt_set_dirty_tracking = u32, u32, u32, u32;
    iommu_ioas_iova_ranges = u32, u32, u32, u32, u64, u64;
    iommu_iova_range = u64, u64;
    iommu_hwpt_get_dirty_bitmap = u32, u32, u32, u32, u64, u64, u64, u64;
}

// SAFETY: `u64` is plain data: every byte is initialised, there is no
// padding, and any byte pattern is a valid value (a dirty bitmap word).
unsafe impl Pod for u64 {}

/// The bytes of a uAPI struct, as the kernel reads them.
pub fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` guarantees `size_of::<T>()` initialised bytes with
    // no padding at `v`; the slice borrows `v`, so it cannot outlive it or
    // alias a mutable borrow; `u8` has no alignment requirement.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// The bytes of an array of uAPI structs (an `IOMMU_HWPT_INVALIDATE`
/// entry array), without copying.
pub fn slice_bytes<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: as in `bytes_of`, for `v.len()` consecutive values: a slice
    // of `T` is contiguous, without gaps between elements, and its byte
    // length cannot overflow `isize` because the slice itself exists.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Reads a little-endian `u32` at `at`, `None` past the end.
pub(crate) fn le32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Reads a little-endian `u64` at `at`, `None` past the end.
pub(crate) fn le64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// Reads a little-endian `u16` at `at`, `None` past the end.
pub(crate) fn le16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_become_sysfs_paths() {
        assert_eq!(
            sysfs_path("0000:65:00.0").unwrap(),
            PathBuf::from("/sys/bus/pci/devices/0000:65:00.0")
        );
        assert_eq!(
            sysfs_path("3B:00.1").unwrap(),
            PathBuf::from("/sys/bus/pci/devices/0000:3b:00.1")
        );
        assert_eq!(
            sysfs_path("/sys/bus/pci/devices/0000:65:00.0").unwrap(),
            PathBuf::from("/sys/bus/pci/devices/0000:65:00.0")
        );
    }

    #[test]
    fn other_device_names_are_refused() {
        for bad in [
            "/dev/vfio/7",
            "65:00",
            "0000:65:00.8",
            "zz:00.0",
            "",
            "0000:065:00.0",
        ] {
            assert_eq!(sysfs_path(bad), Err(NotADevicePath(bad.into())), "{bad}");
        }
    }

    #[test]
    fn bytes_of_is_the_struct_in_memory_order() {
        let d = iommu_destroy {
            size: 8,
            id: 0x0102_0304,
        };
        assert_eq!(bytes_of(&d), &[8, 0, 0, 0, 4, 3, 2, 1]);
    }

    #[test]
    fn slice_bytes_concatenates_entries() {
        let e = [
            iommu_viommu_arm_smmuv3_invalidate { cmd: [1, 2] },
            iommu_viommu_arm_smmuv3_invalidate { cmd: [3, 4] },
        ];
        let b = slice_bytes(&e);
        assert_eq!(b.len(), 32);
        assert_eq!(le64(b, 16), Some(3));
    }

    #[test]
    fn le_readers_refuse_short_input() {
        assert_eq!(le32(&[1, 2, 3], 0), None);
        assert_eq!(le64(&[0; 8], 1), None);
        assert_eq!(le16(&[1, 2], usize::MAX), None);
        assert_eq!(le16(&[1, 2], 0), Some(0x0201));
    }
}
