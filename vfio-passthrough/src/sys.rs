//! The real [`HostIommu`]: VFIO containers and devices through
//! `vfio-ioctls` 0.10, iommufd through `iommufd-ioctls` 0.4, and raw
//! ioctls only where those crates have no wrapper:
//!
//! - `VFIO_IOMMU_MAP_DMA` — `VfioContainer::vfio_dma_map` always maps
//!   read+write; a read-only guest mapping must stay read-only.
//! - `VFIO_IOMMU_UNMAP_DMA` — `VfioContainer::vfio_dma_unmap` fails when
//!   the kernel unmaps another size than asked and does not say how much
//!   it unmapped; the uAPI writes `size` back (0 where nothing was mapped),
//!   which is what the backends read.
//! - `VFIO_IOMMU_GET_INFO` — not wrapped.
//! - `IOMMU_FAULT_QUEUE_ALLOC` — not wrapped.
//!
//! This is the crate's one `sys` module: nothing else calls `ioctl`.
//! Opening a cdev goes through `VfioIommufd`, whose constructor wants an
//! IOAS; the host allocates one per iommufd for it and never maps it (the
//! backends allocate their own through [`Ioctl::IoasAlloc`]).
//!
//! A VMM that already owns the VFIO objects (its PCI passthrough code needs
//! the same device for BARs and interrupts, and a cdev binds to one iommufd
//! only) hands them over with [`VfioHost::adopt_type1`],
//! [`VfioHost::adopt_iommufd`] and [`VfioHost::adopt_cdev`]: the next
//! [`HostIommu::open`] of that device (or of `/dev/iommu`) returns the
//! adopted object instead of opening a new one, and closing it drops only
//! the host's reference.
//!
//! [`VfioHost::with_kvm_vfio`] registers what the host opens itself with
//! the VM's KVM-VFIO device (`crate::kvm_vfio`); adopted objects are the
//! VMM's to register.
//!
//! - `IOMMU_IOAS_IOVA_RANGES` — not wrapped; [`Ioctl::IoasIovaRanges`]
//!   (the iommufd backend reads a device's reserved regions with it) and
//!   [`ioas_iova_ranges`] (diagnostics and tests) read the kernel's
//!   allowed IOVA ranges of an IOAS.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use iommufd_bindings::iommufd::{iommu_ioas_iova_ranges, iommu_iova_range};
use iommufd_ioctls::{IommuFd, IommufdError, IommufdIoas};
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_unmap, vfio_iommu_type1_info, VFIO_DEVICE_ATTACH_PASID,
    VFIO_DEVICE_DETACH_PASID,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioError, VfioIommufd, VfioOps};
use vmm_sys_util::ioctl::{ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ref};

use crate::host::{Handle, HostIommu, Ioctl, Open, Opened};
use crate::kvm_vfio::{KvmVfio, KvmVfioError};

/// The ioctl numbers `vfio-ioctls` / `iommufd-ioctls` do not export.
mod nr {
    use iommufd_bindings::iommufd::{
        IOMMUFD_CMD_FAULT_QUEUE_ALLOC, IOMMUFD_CMD_IOAS_IOVA_RANGES, IOMMUFD_TYPE,
    };
    use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
    // include/uapi/linux/vfio.h: _IO(VFIO_TYPE, VFIO_BASE + 12..14).
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);
    // include/uapi/linux/iommufd.h: _IO(IOMMUFD_TYPE, IOMMUFD_CMD_FAULT_QUEUE_ALLOC).
    vmm_sys_util::ioctl_io_nr!(
        IOMMU_FAULT_QUEUE_ALLOC,
        IOMMUFD_TYPE as u32,
        IOMMUFD_CMD_FAULT_QUEUE_ALLOC
    );
    // include/uapi/linux/iommufd.h: _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES).
    vmm_sys_util::ioctl_io_nr!(
        IOMMU_IOAS_IOVA_RANGES,
        IOMMUFD_TYPE as u32,
        IOMMUFD_CMD_IOAS_IOVA_RANGES
    );
    // include/uapi/linux/iommufd.h: _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING).
    vmm_sys_util::ioctl_io_nr!(
        IOMMU_HWPT_SET_DIRTY_TRACKING,
        IOMMUFD_TYPE as u32,
        iommufd_bindings::iommufd::IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING
    );
    // include/uapi/linux/iommufd.h: _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP).
    vmm_sys_util::ioctl_io_nr!(
        IOMMU_HWPT_GET_DIRTY_BITMAP,
        IOMMUFD_TYPE as u32,
        iommufd_bindings::iommufd::IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP
    );
    // include/uapi/linux/vfio.h: _IO(VFIO_TYPE, VFIO_BASE + 17).
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_DIRTY_PAGES, VFIO_TYPE as u32, VFIO_BASE + 17);
}
use nr::{
    IOMMU_FAULT_QUEUE_ALLOC, IOMMU_HWPT_GET_DIRTY_BITMAP, IOMMU_HWPT_SET_DIRTY_TRACKING,
    IOMMU_IOAS_IOVA_RANGES, VFIO_IOMMU_DIRTY_PAGES, VFIO_IOMMU_GET_INFO, VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA,
};

/// At most this many allowed ranges are read from `IOMMU_IOAS_IOVA_RANGES`
/// (x86 reports two or three; the kernel says how many it has).
const MAX_IOAS_RANGES: u32 = 1024;

enum Object {
    Type1 {
        container: Arc<VfioContainer>,
        // Kept open: closing the device releases the group from the container.
        _device: Arc<VfioDevice>,
    },
    Iommufd {
        fd: Arc<IommuFd>,
        vfio: Arc<VfioIommufd>,
    },
    Cdev(Arc<VfioDevice>),
    Queue(Arc<Mutex<File>>),
}

/// Objects the VMM opened itself and handed over, waiting for the
/// [`HostIommu::open`] that asks for them.
#[derive(Default)]
struct Adopted {
    type1: HashMap<PathBuf, (Arc<VfioContainer>, Arc<VfioDevice>)>,
    iommufd: Option<(Arc<IommuFd>, Arc<VfioIommufd>)>,
    cdev: HashMap<PathBuf, Arc<VfioDevice>>,
}

/// The kernel's VFIO and iommufd, through `vfio-ioctls` and `iommufd-ioctls`.
#[derive(Default)]
pub struct VfioHost {
    objects: Mutex<HashMap<i32, Object>>,
    adopted: Mutex<Adopted>,
    /// The VM's KVM-VFIO device, given to the containers and iommufd the
    /// host opens.
    kvm: Option<Arc<VfioDeviceFd>>,
}

impl std::fmt::Debug for VfioHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioHost")
            .field("objects", &self.lock().len())
            .finish()
    }
}

/// The errno inside a `vfio-ioctls` error, EIO when it has none.
fn vfio_err(e: VfioError) -> io::Error {
    use VfioError as E;
    match e {
        E::OpenContainer(io) | E::OpenGroup(io, _) | E::OpenDeviceCdev(io) => io,
        // vfio-ioctls' KVM_DEV_VFIO_FILE_ADD of the group or cdev it opens
        // (the DEL on close is not seen here).
        E::SetDeviceAttr(s) => KvmVfioError::Add(io::Error::from_raw_os_error(s.errno())).into_io(),
        E::IommuDmaMap(s)
        | E::IommuDmaUnmap(s)
        | E::VfioDeviceBindIommufd(s)
        | E::VfioDeviceAttachIommufdPt(s)
        | E::VfioDeviceDetachIommufdPt(s)
        | E::GroupGetDeviceFD(s)
        | E::ContainerSetIOMMU(s)
        | E::VfioDeviceGetInfo(s)
        | E::VfioDeviceGetRegionInfo(s) => io::Error::from_raw_os_error(s.errno()),
        E::IommufdIoctlError(i) | E::NewVfioIommufd(i) => iommufd_err(i),
        other => io::Error::other(other.to_string()),
    }
}

/// The errno inside an `iommufd-ioctls` error, EIO when it has none.
fn iommufd_err(e: IommufdError) -> io::Error {
    use IommufdError as E;
    match e {
        E::OpenIommufd(io) | E::AttachHwpt(io) => io,
        E::IommuDestroy(s)
        | E::IommuIoasAlloc(s)
        | E::IommuIoasMap(s)
        | E::IommuIoasMapFile(s)
        | E::IommuIoasUnmap(s)
        | E::IommuHwptAlloc(s)
        | E::IommuViommuAlloc(s)
        | E::IommuVdeviceAlloc(s)
        | E::IommuGetHwInfo(s)
        | E::IommuHwptInvalidate(s)
        | E::IommuVeventqAlloc(s)
        | E::VeventqNonBlocking(s)
        | E::IommuHwQueueAlloc(s) => io::Error::from_raw_os_error(s.errno()),
        other => io::Error::other(other.to_string()),
    }
}

fn not_found(h: Handle) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no host object {}", h.0))
}

/// Makes a queue fd non-blocking, so a drain never waits.
fn set_nonblocking(f: &File) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFL/F_SETFL) on an fd that `f` owns and keeps open
    // for the duration of both calls; no memory is passed; results checked.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl VfioHost {
    /// A host with nothing open.
    pub fn new() -> Self {
        Self::default()
    }

    /// A host whose own containers (type1) and iommufd register every
    /// group or device cdev they open with the VM's KVM-VFIO device, and
    /// unregister it on close; a device whose registration fails is not
    /// opened (the open fails with a [`KvmVfioError`] inside). Adopted
    /// objects ([`Self::adopt_type1`], [`Self::adopt_iommufd`],
    /// [`Self::adopt_cdev`]) are the VMM's to register: build them with
    /// [`KvmVfio::handle`].
    pub fn with_kvm_vfio(kvm: &KvmVfio) -> Self {
        VfioHost {
            kvm: Some(kvm.handle()),
            ..Self::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Object>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn adopted(&self) -> MutexGuard<'_, Adopted> {
        self.adopted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands over a type1 container the VMM opened and the device at
    /// `device` (its sysfs path) that it opened in it: the next
    /// `open(Open::Type1 { device })` returns this container. The VMM keeps
    /// its own references; the backend's close drops only the host's.
    pub fn adopt_type1(&self, device: &Path, container: Arc<VfioContainer>, dev: Arc<VfioDevice>) {
        self.adopted()
            .type1
            .insert(device.to_path_buf(), (container, dev));
    }

    /// Hands over the VMM's iommufd and the `VfioIommufd` it opens its
    /// cdevs through: the next `open(Open::Iommufd)` returns it.
    pub fn adopt_iommufd(&self, fd: Arc<IommuFd>, vfio: Arc<VfioIommufd>) {
        self.adopted().iommufd = Some((fd, vfio));
    }

    /// Hands over a device cdev the VMM opened and bound to the iommufd it
    /// adopted with [`Self::adopt_iommufd`]: the next
    /// `open(Open::Cdev { device, .. })` returns it with its device ID.
    pub fn adopt_cdev(&self, device: &Path, dev: Arc<VfioDevice>) {
        self.adopted().cdev.insert(device.to_path_buf(), dev);
    }

    fn container(&self, h: Handle) -> io::Result<Arc<VfioContainer>> {
        match self.lock().get(&h.0) {
            Some(Object::Type1 { container, .. }) => Ok(container.clone()),
            _ => Err(not_found(h)),
        }
    }

    fn iommufd(&self, h: Handle) -> io::Result<(Arc<IommuFd>, Arc<VfioIommufd>)> {
        match self.lock().get(&h.0) {
            Some(Object::Iommufd { fd, vfio }) => Ok((fd.clone(), vfio.clone())),
            _ => Err(not_found(h)),
        }
    }

    fn cdev(&self, h: Handle) -> io::Result<Arc<VfioDevice>> {
        match self.lock().get(&h.0) {
            Some(Object::Cdev(d)) => Ok(d.clone()),
            _ => Err(not_found(h)),
        }
    }

    fn queue(&self, h: Handle) -> io::Result<Arc<Mutex<File>>> {
        match self.lock().get(&h.0) {
            Some(Object::Queue(f)) => Ok(f.clone()),
            _ => Err(not_found(h)),
        }
    }

    /// Takes ownership of a queue fd the kernel just returned.
    fn adopt_queue(&self, fd: u32) -> io::Result<()> {
        let raw = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel returned `raw` as a new fd in this ioctl's
        // output; nothing else in the process knows it, so the File is its
        // only owner and closes it exactly once.
        let file = unsafe { File::from_raw_fd(raw) };
        set_nonblocking(&file)?;
        self.lock()
            .insert(raw, Object::Queue(Arc::new(Mutex::new(file))));
        Ok(())
    }

    fn iommufd_ioctl(&self, target: Handle, call: Ioctl<'_>) -> io::Result<()> {
        let (fd, _) = self.iommufd(target)?;
        match call {
            Ioctl::IoasAlloc(a) => fd.alloc_iommu_ioas(a).map_err(iommufd_err),
            Ioctl::IoasMap(a) => fd.map_iommu_ioas(a).map_err(iommufd_err),
            Ioctl::IoasUnmap(a) => fd.unmap_iommu_ioas(a).map_err(iommufd_err),
            Ioctl::IoasIovaRanges { arg, ranges } => {
                if arg.size as usize != std::mem::size_of_val(arg)
                    || arg.num_iovas as usize > ranges.len()
                {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                let mut k = *arg;
                k.allowed_iovas = ranges.as_mut_ptr() as u64;
                // SAFETY: `fd` is an open iommufd; `k` is the caller's
                // argument, whose `size` (checked above) is its own, with
                // `allowed_iovas` pointing at `ranges`, exclusively borrowed
                // for the call and at least `num_iovas` entries long
                // (checked above), which is all the kernel writes there;
                // the result is checked.
                let r = unsafe { ioctl_with_mut_ref(&*fd, IOMMU_IOAS_IOVA_RANGES(), &mut k) };
                // The kernel writes the count back also on EMSGSIZE.
                arg.num_iovas = k.num_iovas;
                arg.out_iova_alignment = k.out_iova_alignment;
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            Ioctl::HwptAlloc { arg, data } => {
                if arg.data_len as usize != data.len() {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                let mut k = *arg;
                k.data_uptr = if data.is_empty() {
                    0
                } else {
                    data.as_ptr() as u64
                };
                let r = fd.alloc_iommu_hwpt(&mut k).map_err(iommufd_err);
                arg.out_hwpt_id = k.out_hwpt_id;
                r
            }
            Ioctl::GetHwInfo { arg, data } => {
                if arg.data_len as usize > data.len() {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                let mut k = *arg;
                k.data_uptr = data.as_mut_ptr() as u64;
                let r = fd.get_hw_info(&mut k).map_err(iommufd_err);
                k.data_uptr = 0;
                *arg = k;
                r
            }
            Ioctl::HwptInvalidate { arg, entries } => {
                let want = (arg.entry_len as usize).saturating_mul(arg.entry_num as usize);
                if entries.len() != want {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                let mut k = *arg;
                k.data_uptr = entries.as_ptr() as u64;
                let r = fd.invalidate_hwpt(&mut k).map_err(iommufd_err);
                // The kernel writes entry_num back on failure too.
                arg.entry_num = k.entry_num;
                r
            }
            Ioctl::ViommuAlloc(a) => fd.alloc_iommu_viommu(a).map_err(iommufd_err),
            Ioctl::VdeviceAlloc(a) => fd.alloc_iommu_vdevice(a).map_err(iommufd_err),
            Ioctl::FaultQueueAlloc(a) => {
                // SAFETY: `fd` is an open iommufd kept alive by the Arc for
                // the call; `a` is an exclusively borrowed, initialised
                // `iommu_fault_alloc` whose `size` field tells the kernel how
                // many bytes it may read and write; the result is checked.
                let r = unsafe { ioctl_with_mut_ref(&*fd, IOMMU_FAULT_QUEUE_ALLOC(), a) };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                self.adopt_queue(a.out_fault_fd)
            }
            Ioctl::VeventqAlloc(a) => {
                let (_, file) = fd.alloc_veventq(a).map_err(iommufd_err)?;
                let raw = file.as_raw_fd();
                self.lock()
                    .insert(raw, Object::Queue(Arc::new(Mutex::new(file))));
                Ok(())
            }
            Ioctl::Destroy(a) => fd.destroy_iommu_object(a.id).map_err(iommufd_err),
            Ioctl::HwptSetDirtyTracking(a) => {
                if a.size as usize != std::mem::size_of_val(a) {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                // SAFETY: `fd` is an open iommufd kept alive by the Arc for
                // the call; `a` is an initialised
                // `iommu_hwpt_set_dirty_tracking` whose `size` (checked
                // above) is its own, so the kernel reads only it; it holds
                // no pointer. The result is checked.
                let r = unsafe { ioctl_with_ref(&*fd, IOMMU_HWPT_SET_DIRTY_TRACKING(), a) };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            Ioctl::HwptGetDirtyBitmap { arg, bitmap } => {
                let bits = dirty_bits(arg.length, arg.page_size, arg.iova)?;
                if arg.size as usize != std::mem::size_of_val(arg)
                    || (bitmap.len() as u64).saturating_mul(64) < bits
                {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                let mut k = *arg;
                k.data = bitmap.as_mut_ptr() as u64;
                // SAFETY: `fd` is an open iommufd; `k` is the caller's
                // argument with `data` pointing at `bitmap`, which is
                // exclusively borrowed for the call, 8-byte aligned (a
                // `[u64]`) and at least `length / page_size` bits long
                // (checked above), which is all the kernel writes
                // (iova_bitmap covers exactly the range); the kernel
                // writes nothing else we own. The result is checked.
                let r = unsafe { ioctl_with_mut_ref(&*fd, IOMMU_HWPT_GET_DIRTY_BITMAP(), &mut k) };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(libc::ENOTTY)),
        }
    }
}

impl HostIommu for VfioHost {
    fn open(&self, what: Open<'_>) -> io::Result<Opened> {
        match what {
            Open::Type1 { device } => {
                let adopted = self.adopted().type1.remove(device);
                let (container, dev) = match adopted {
                    Some(pair) => pair,
                    None => {
                        let container =
                            Arc::new(VfioContainer::new(self.kvm.clone()).map_err(vfio_err)?);
                        let ops: Arc<dyn VfioOps> = container.clone();
                        let dev = VfioDevice::new(device, ops, false).map_err(vfio_err)?;
                        (container, Arc::new(dev))
                    }
                };
                let raw = container.as_raw_fd();
                self.lock().insert(
                    raw,
                    Object::Type1 {
                        container,
                        _device: dev,
                    },
                );
                Ok(Opened {
                    handle: Handle(raw),
                    dev_id: None,
                })
            }
            Open::Iommufd => {
                let adopted = self.adopted().iommufd.take();
                let (fd, vfio) = match adopted {
                    Some(pair) => pair,
                    None => {
                        let fd = Arc::new(IommuFd::new().map_err(iommufd_err)?);
                        let ioas = Arc::new(IommufdIoas::new(fd.clone()).map_err(iommufd_err)?);
                        let vfio = VfioIommufd::new(fd.clone(), Some(ioas), self.kvm.clone());
                        (fd, Arc::new(vfio.map_err(vfio_err)?))
                    }
                };
                let raw = fd.as_raw_fd();
                self.lock().insert(raw, Object::Iommufd { fd, vfio });
                Ok(Opened {
                    handle: Handle(raw),
                    dev_id: None,
                })
            }
            Open::Cdev { device, iommufd } => {
                let (_, vfio) = self.iommufd(iommufd)?;
                let adopted = self.adopted().cdev.remove(device);
                let dev = match adopted {
                    Some(dev) => dev,
                    None => {
                        let ops: Arc<dyn VfioOps> = vfio;
                        Arc::new(VfioDevice::new(device, ops, false).map_err(vfio_err)?)
                    }
                };
                let dev_id = dev.iommufd_dev_id();
                let raw = dev.as_raw_fd();
                self.lock().insert(raw, Object::Cdev(dev));
                Ok(Opened {
                    handle: Handle(raw),
                    dev_id,
                })
            }
        }
    }

    fn ioctl(&self, target: Handle, call: Ioctl<'_>) -> io::Result<()> {
        match call {
            Ioctl::Type1GetInfo { buf } => {
                let c = self.container(target)?;
                let argsz = crate::host::le32(buf, 0).unwrap_or(0) as usize;
                if buf.len() < std::mem::size_of::<vfio_iommu_type1_info>() || argsz > buf.len() {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                // SAFETY: `c` is an open container kept alive by the Arc;
                // `buf` is exclusively borrowed, at least one info struct
                // long, and its `argsz` (checked above to be at most
                // `buf.len()`) bounds what the kernel writes; the result is
                // checked.
                let r = unsafe { ioctl_with_mut_ptr(&*c, VFIO_IOMMU_GET_INFO(), buf.as_mut_ptr()) };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            Ioctl::Type1MapDma(a) => {
                let c = self.container(target)?;
                // SAFETY: `c` is an open container; `a` is an initialised
                // `vfio_iommu_type1_dma_map` that the kernel only reads. The
                // kernel pins [vaddr, vaddr + size): the backends build it
                // only from guest RAM regions of the VMM's GuestMemoryMmap,
                // which outlive the mapping (they are unmapped before the
                // backend drops) and which Rust code reaches only through
                // volatile accesses, so device DMA into them aliases no Rust
                // reference. The result is checked.
                let r = unsafe { ioctl_with_ref(&*c, VFIO_IOMMU_MAP_DMA(), a) };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            Ioctl::Type1UnmapDma(a) => {
                let c = self.container(target)?;
                // No dirty-bitmap or unmap-all flags: the kernel must read
                // the fixed struct only.
                if a.argsz as usize != std::mem::size_of::<vfio_iommu_type1_dma_unmap>()
                    || a.flags != 0
                {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                // SAFETY: `c` is an open container; `a` is an exclusively
                // borrowed, initialised `vfio_iommu_type1_dma_unmap` whose
                // `argsz` is the fixed struct and whose flags are 0 (checked
                // above), so the kernel follows no pointer; the kernel writes
                // back `size`, the bytes it unmapped. Unmapping pins nothing
                // and frees no memory Rust can reach. The result is checked.
                let r = unsafe { ioctl_with_mut_ref(&*c, VFIO_IOMMU_UNMAP_DMA(), a) };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            Ioctl::Type1DirtyPages { arg, bitmap } => {
                let c = self.container(target)?;
                type1_dirty_pages(&c, arg, bitmap)
            }
            Ioctl::AttachPt(a) => {
                let d = self.cdev(target)?;
                let r = if a.flags & VFIO_DEVICE_ATTACH_PASID != 0 {
                    d.attach_iommufd_pt_pasid(a.pt_id, a.pasid)
                } else {
                    d.attach_hwpt(a.pt_id)
                };
                r.map_err(vfio_err)
            }
            Ioctl::DetachPt(a) => {
                let d = self.cdev(target)?;
                let r = if a.flags & VFIO_DEVICE_DETACH_PASID != 0 {
                    d.detach_iommufd_pt_pasid(a.pasid)
                } else {
                    d.detach_hwpt()
                };
                r.map_err(vfio_err)
            }
            other => self.iommufd_ioctl(target, other),
        }
    }

    fn read(&self, target: Handle, buf: &mut [u8]) -> io::Result<usize> {
        let q = self.queue(target)?;
        let mut f = q.lock().unwrap_or_else(|p| p.into_inner());
        match f.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            r => r,
        }
    }

    fn write(&self, target: Handle, buf: &[u8]) -> io::Result<usize> {
        let q = self.queue(target)?;
        let mut f = q.lock().unwrap_or_else(|p| p.into_inner());
        f.write(buf)
    }

    fn close(&self, target: Handle) {
        self.lock().remove(&target.0);
    }
}

/// The kernel's allowed IOVA ranges of IOAS `ioas` on `fd`
/// (`IOMMU_IOAS_IOVA_RANGES`), inclusive, and the IOVA alignment it wants:
/// the reserved regions of the devices attached to it are the holes. Asks
/// again with the number of ranges the kernel reports (EMSGSIZE).
pub fn ioas_iova_ranges(fd: &IommuFd, ioas: u32) -> io::Result<(Vec<(u64, u64)>, u64)> {
    let mut ranges = vec![iommu_iova_range::default(); 4];
    loop {
        let mut arg = iommu_ioas_iova_ranges {
            size: std::mem::size_of::<iommu_ioas_iova_ranges>() as u32,
            ioas_id: ioas,
            num_iovas: ranges.len() as u32,
            allowed_iovas: ranges.as_mut_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: `fd` is an open iommufd; `arg` is an exclusively borrowed,
        // initialised argument whose `size` bounds what the kernel reads and
        // writes of it, and whose `allowed_iovas` points at `ranges`, a live
        // exclusively borrowed array of `num_iovas` entries (the kernel
        // writes at most that many); the result is checked.
        let r = unsafe { ioctl_with_mut_ref(fd, IOMMU_IOAS_IOVA_RANGES(), &mut arg) };
        if r < 0 {
            let e = io::Error::last_os_error();
            let want = arg.num_iovas;
            if e.raw_os_error() == Some(libc::EMSGSIZE)
                && want as usize > ranges.len()
                && want <= MAX_IOAS_RANGES
            {
                ranges.resize(want as usize, iommu_iova_range::default());
                continue;
            }
            return Err(e);
        }
        let n = (arg.num_iovas as usize).min(ranges.len());
        let out = ranges[..n].iter().map(|r| (r.start, r.last)).collect();
        return Ok((out, arg.out_iova_alignment));
    }
}

/// The bits of a dirty bitmap of `length` bytes in `page` pages from
/// `iova`: EINVAL for a page size that is not a power of two, or a range
/// that is empty, unaligned or wraps.
fn dirty_bits(length: u64, page: u64, iova: u64) -> io::Result<u64> {
    if !page.is_power_of_two()
        || length == 0
        || length % page != 0
        || iova % page != 0
        || iova.checked_add(length - 1).is_none()
    {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(length / page)
}

/// `VFIO_IOMMU_DIRTY_PAGES` on container `c`: START or STOP (the header
/// alone), or GET_BITMAP into `bitmap`.
fn type1_dirty_pages(c: &VfioContainer, arg: &[u8], bitmap: &mut [u64]) -> io::Result<()> {
    use crate::dirty::{TYPE1_DIRTY_DATA_AT, TYPE1_DIRTY_GET, TYPE1_DIRTY_HDR};
    use crate::host::{le32, le64};
    use vfio_bindings::bindings::vfio::{
        VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
        VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
    };
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let argsz = le32(arg, 0).ok_or_else(einval)? as usize;
    let flags = le32(arg, 4).ok_or_else(einval)?;
    let mut k = [0u64; TYPE1_DIRTY_GET / 8];
    match flags {
        VFIO_IOMMU_DIRTY_PAGES_FLAG_START | VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
            if argsz == TYPE1_DIRTY_HDR && arg.len() == TYPE1_DIRTY_HDR => {}
        VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP
            if argsz == TYPE1_DIRTY_GET && arg.len() == TYPE1_DIRTY_GET =>
        {
            let (iova, size) = (
                le64(arg, 8).ok_or_else(einval)?,
                le64(arg, 16).ok_or_else(einval)?,
            );
            let (pgsize, bytes) = (
                le64(arg, 24).ok_or_else(einval)?,
                le64(arg, 32).ok_or_else(einval)?,
            );
            let bits = dirty_bits(size, pgsize, iova)?;
            if bytes < bits.div_ceil(64) * 8 || (bitmap.len() as u64).saturating_mul(8) < bytes {
                return Err(einval());
            }
        }
        _ => return Err(einval()),
    }
    // An 8-byte-aligned copy of the argument, with the bitmap pointer.
    for (i, w) in k.iter_mut().enumerate().take(argsz / 8) {
        *w = le64(arg, 8 * i).ok_or_else(einval)?;
    }
    if argsz == TYPE1_DIRTY_GET {
        k[TYPE1_DIRTY_DATA_AT / 8] = bitmap.as_mut_ptr() as u64;
    }
    // SAFETY: `c` is an open container; `k` holds `argsz` bytes of an
    // initialised argument (`argsz`, its first field, says how many the
    // kernel reads: the header alone for START and STOP, which follow no
    // pointer, or the header and a `vfio_iommu_type1_dirty_bitmap_get`
    // for GET_BITMAP), checked above. For GET_BITMAP its `data` points at
    // `bitmap`, exclusively borrowed for the call, 8-byte aligned, and at
    // least `bitmap.size` bytes, which is at least one bit per page of
    // the range (checked above): the kernel writes at most `bitmap.size`
    // bytes there and nothing else we own. The result is checked.
    let r = unsafe { ioctl_with_mut_ptr(c, VFIO_IOMMU_DIRTY_PAGES(), k.as_mut_ptr().cast::<u8>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        // _IO(';', 100 + 12..14) and _IO(';', 0x80 + 14).
        assert_eq!(VFIO_IOMMU_GET_INFO(), 0x3b70);
        assert_eq!(VFIO_IOMMU_MAP_DMA(), 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA(), 0x3b72);
        assert_eq!(IOMMU_FAULT_QUEUE_ALLOC(), 0x3b8e);
        assert_eq!(IOMMU_IOAS_IOVA_RANGES(), 0x3b84);
        // _IO(';', 0x80 + 11..12) and _IO(';', 100 + 17).
        assert_eq!(IOMMU_HWPT_SET_DIRTY_TRACKING(), 0x3b8b);
        assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP(), 0x3b8c);
        assert_eq!(VFIO_IOMMU_DIRTY_PAGES(), 0x3b75);
    }

    #[test]
    fn dirty_bitmap_ranges_must_be_whole_aligned_pages() {
        assert_eq!(dirty_bits(0x2000, 0x1000, 0x1000).unwrap(), 2);
        for (len, page, iova) in [
            (0, 4096, 0),
            (4096, 3000, 0),
            (4097, 4096, 0),
            (4096, 4096, 1),
        ] {
            assert!(dirty_bits(len, page, iova).is_err());
        }
        assert!(dirty_bits(0x2000, 0x1000, u64::MAX - 0xfff).is_err());
    }

    #[test]
    fn unknown_handles_are_not_found() {
        let h = VfioHost::new();
        let mut b = [0u8; 8];
        assert_eq!(
            h.read(Handle(12345), &mut b).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        h.close(Handle(12345));
    }

    #[test]
    fn vfio_ioctls_registration_errors_become_typed_kvm_vfio_errors() {
        let e = vfio_err(VfioError::SetDeviceAttr(vmm_sys_util::errno::Error::new(
            libc::EINVAL,
        )));
        match KvmVfioError::in_io(&e) {
            Some(KvmVfioError::Add(io)) => assert_eq!(io.raw_os_error(), Some(libc::EINVAL)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn opening_without_vfio_fails_cleanly() {
        // No /dev/vfio or /dev/iommu here (or no such device): an error,
        // never a panic.
        let h = VfioHost::new();
        let p = std::path::Path::new("/sys/bus/pci/devices/0000:ff:1f.7");
        assert!(h.open(Open::Type1 { device: p }).is_err());
    }
}
