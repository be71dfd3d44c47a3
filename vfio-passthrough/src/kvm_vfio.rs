//! Registration of assigned devices with KVM's VFIO pseudo-device
//! (`KVM_DEV_TYPE_VFIO`), which a VM needs for every VFIO group (type1)
//! and every device cdev (iommufd; `KVM_DEV_VFIO_FILE_ADD` takes a cdev
//! fd from Linux 6.6): KVM then knows the VM does DMA through an assigned
//! device, so it can handle non-coherent DMA (WBINVD, memory types),
//! KVMGT and s390/PPC specifics. QEMU and cloud-hypervisor do the same.
//!
//! [`KvmVfio`] is the VM's one KVM-VFIO device, made from its `VmFd`
//! (`KVM_CREATE_DEVICE`) or handed in as a `DeviceFd` the VMM already
//! created. [`crate::sys::VfioHost::with_kvm_vfio`] gives it to the
//! containers and iommufd the host opens itself: `vfio-ioctls` then adds
//! each group when a device of it is opened (after the container's IOMMU
//! is set) and each cdev before it is bound to the iommufd, and removes
//! them when they close. A device whose registration fails is not
//! opened: the backend's `add_endpoint` fails with
//! `BackendError::Host { op: "KVM_DEV_VFIO_FILE_ADD", .. }` whose source
//! holds a [`KvmVfioError`] ([`KvmVfioError::in_io`] finds it).
//!
//! Objects the VMM opened itself and hands over with `VfioHost::adopt_*`
//! are the VMM's to register: it built them, so it gives
//! [`KvmVfio::handle`] to its own `VfioContainer::new` /
//! `VfioIommufd::new` (or calls [`KvmVfio::add_file`] on what it opened
//! otherwise).
//!
//! This module changes no VFIO or iommufd state; its two ioctls
//! (`KVM_HAS_DEVICE_ATTR`, `KVM_SET_DEVICE_ATTR`) go through
//! `kvm-ioctls`' safe wrappers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_VFIO, KVM_DEV_VFIO_FILE,
    KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL,
};
use kvm_ioctls::{DeviceFd, VmFd};
use vfio_ioctls::VfioDeviceFd;
use vmm_iommu::backend::BackendError;

/// What can go wrong with the KVM-VFIO device.
#[derive(Debug, thiserror::Error)]
pub enum KvmVfioError {
    /// `KVM_CREATE_DEVICE` of `KVM_DEV_TYPE_VFIO` failed (a kernel
    /// without `CONFIG_KVM_VFIO`, or a VM fd that is not one).
    #[error("KVM_CREATE_DEVICE(KVM_DEV_TYPE_VFIO) failed: {0}")]
    Create(#[source] io::Error),
    /// The device handed in does not take `KVM_DEV_VFIO_FILE` attributes:
    /// it is another kind of KVM device.
    #[error(
        "the KVM device is not a KVM-VFIO device (KVM_HAS_DEVICE_ATTR KVM_DEV_VFIO_FILE): {0}"
    )]
    NotVfio(#[source] io::Error),
    /// The device fd could not be duplicated for `vfio-ioctls`.
    #[error("cannot duplicate the KVM-VFIO device fd: {0}")]
    Dup(#[source] vfio_ioctls::VfioError),
    /// `KVM_DEV_VFIO_FILE_ADD` refused a file: EINVAL for a file that is
    /// neither a VFIO group nor (Linux ≥ 6.6) a VFIO device cdev, EEXIST
    /// for one already registered, EBADF for a closed fd.
    #[error("KVM_DEV_VFIO_FILE_ADD refused the file: {0}")]
    Add(#[source] io::Error),
    /// `KVM_DEV_VFIO_FILE_DEL` refused a file (ENOENT: not registered).
    #[error("KVM_DEV_VFIO_FILE_DEL refused the file: {0}")]
    Del(#[source] io::Error),
}

impl KvmVfioError {
    /// The registration error an `io::Error` from
    /// [`crate::host::HostIommu::open`] carries, if that is why it
    /// failed (e.g. the source of a backend's `BackendError::Host`).
    pub fn in_io(e: &io::Error) -> Option<&KvmVfioError> {
        e.get_ref()?.downcast_ref::<KvmVfioError>()
    }

    /// The `io::Error` that carries this error through the host seam,
    /// with the errno's kind.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            KvmVfioError::Create(e)
            | KvmVfioError::NotVfio(e)
            | KvmVfioError::Add(e)
            | KvmVfioError::Del(e) => e.kind(),
            KvmVfioError::Dup(_) => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

/// The error a host open failed with, named for the backend's caller:
/// `KVM_DEV_VFIO_FILE_ADD` when the device's registration was refused,
/// `op` otherwise.
pub(crate) fn open_err(op: &'static str) -> impl FnOnce(io::Error) -> BackendError {
    move |source| {
        let op = if KvmVfioError::in_io(&source).is_some() {
            "KVM_DEV_VFIO_FILE_ADD"
        } else {
            op
        };
        BackendError::Host { op, source }
    }
}

/// The errno of a `kvm-ioctls` error, as an `io::Error`.
fn os(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// A VM's KVM-VFIO device.
pub struct KvmVfio {
    /// Ours, for [`KvmVfio::add_file`] / [`KvmVfio::remove_file`].
    device: DeviceFd,
    /// The same device (a duplicate fd) in the form `vfio-ioctls` takes.
    handle: Arc<VfioDeviceFd>,
}

impl std::fmt::Debug for KvmVfio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVfio")
            .field("fd", &self.device.as_raw_fd())
            .finish()
    }
}

impl KvmVfio {
    /// Creates the VM's KVM-VFIO device (`KVM_CREATE_DEVICE` of
    /// `KVM_DEV_TYPE_VFIO`). A VM needs one; create it once and share it.
    pub fn create(vm: &VmFd) -> Result<Self, KvmVfioError> {
        let mut d = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let device = vm
            .create_device(&mut d)
            .map_err(|e| KvmVfioError::Create(os(e)))?;
        Self::from_device(device)
    }

    /// Takes the VM's KVM-VFIO device the VMM already created, after
    /// checking that it takes `KVM_DEV_VFIO_FILE` attributes.
    pub fn from_device(device: DeviceFd) -> Result<Self, KvmVfioError> {
        let probe = kvm_device_attr {
            flags: 0,
            group: KVM_DEV_VFIO_FILE,
            attr: u64::from(KVM_DEV_VFIO_FILE_ADD),
            addr: 0,
        };
        device
            .has_device_attr(&probe)
            .map_err(|e| KvmVfioError::NotVfio(os(e)))?;
        let handle = VfioDeviceFd::new_from_kvm(device);
        let ours = handle
            .try_clone()
            .and_then(|d| d.to_kvm())
            .map_err(KvmVfioError::Dup)?;
        Ok(KvmVfio {
            device: ours,
            handle: Arc::new(handle),
        })
    }

    /// The device as `vfio-ioctls` takes it (`VfioContainer::new`,
    /// `VfioIommufd::new`), which then registers every group or cdev it
    /// opens and unregisters it when it closes.
    pub fn handle(&self) -> Arc<VfioDeviceFd> {
        self.handle.clone()
    }

    /// Registers a VFIO group or device cdev (`KVM_DEV_VFIO_FILE_ADD`).
    pub fn add_file(&self, file: BorrowedFd<'_>) -> Result<(), KvmVfioError> {
        self.file_attr(file, KVM_DEV_VFIO_FILE_ADD)
            .map_err(KvmVfioError::Add)
    }

    /// Unregisters a file [`KvmVfio::add_file`] registered
    /// (`KVM_DEV_VFIO_FILE_DEL`).
    pub fn remove_file(&self, file: BorrowedFd<'_>) -> Result<(), KvmVfioError> {
        self.file_attr(file, KVM_DEV_VFIO_FILE_DEL)
            .map_err(KvmVfioError::Del)
    }

    fn file_attr(&self, file: BorrowedFd<'_>, attr: u32) -> io::Result<()> {
        // The kernel reads an `int` fd at `addr` (virt/kvm/vfio.c); it
        // lives on this stack frame for the whole call.
        let fd: i32 = file.as_raw_fd();
        let a = kvm_device_attr {
            flags: 0,
            group: KVM_DEV_VFIO_FILE,
            attr: u64::from(attr),
            addr: std::ptr::addr_of!(fd) as u64,
        };
        self.device.set_device_attr(&a).map_err(os)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A VM on this machine's /dev/kvm, or `None` (with a loud line) where
    /// there is none.
    fn vm() -> Option<VmFd> {
        match kvm_ioctls::Kvm::new() {
            Ok(kvm) => Some(kvm.create_vm().expect("KVM_CREATE_VM")),
            Err(e) => {
                eprintln!("SKIPPED: no /dev/kvm here ({e}); the KVM-VFIO tests need one");
                None
            }
        }
    }

    #[test]
    fn the_vms_vfio_device_is_created_and_recognised() {
        let Some(vm) = vm() else { return };
        let k = KvmVfio::create(&vm).expect("KVM_CREATE_DEVICE(VFIO)");
        // The duplicate for vfio-ioctls is a second fd of the same device.
        let again = k
            .handle()
            .try_clone()
            .and_then(|d| d.to_kvm())
            .expect("dup");
        assert!(KvmVfio::from_device(again).is_ok());
    }

    #[test]
    fn adding_a_file_that_is_not_vfio_is_refused_with_a_typed_error() {
        let Some(vm) = vm() else { return };
        let k = KvmVfio::create(&vm).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        // virt/kvm/vfio.c kvm_vfio_file_add: not a VFIO file -> EINVAL.
        match k.add_file(null.as_fd()) {
            Err(KvmVfioError::Add(e)) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL)),
            other => panic!("{other:?}"),
        }
        // Nothing was registered, so nothing can be removed: ENOENT.
        match k.remove_file(null.as_fd()) {
            Err(KvmVfioError::Del(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn registration_errors_survive_the_host_seam_and_name_the_backend_op() {
        let io = KvmVfioError::Add(io::Error::from_raw_os_error(libc::EINVAL)).into_io();
        assert_eq!(io.kind(), io::ErrorKind::InvalidInput);
        assert!(matches!(
            KvmVfioError::in_io(&io),
            Some(KvmVfioError::Add(_))
        ));
        match open_err("VFIO_DEVICE_BIND_IOMMUFD")(io) {
            BackendError::Host { op, source } => {
                assert_eq!(op, "KVM_DEV_VFIO_FILE_ADD");
                assert!(KvmVfioError::in_io(&source).is_some());
            }
            other => panic!("{other:?}"),
        }
        let plain = io::Error::from_raw_os_error(libc::ENODEV);
        assert!(matches!(
            open_err("VFIO_DEVICE_BIND_IOMMUFD")(plain),
            BackendError::Host {
                op: "VFIO_DEVICE_BIND_IOMMUFD",
                ..
            }
        ));
    }
}
