//! KVM-VFIO registration (issue 12) as the backends see it: a device
//! whose group or cdev the VM's KVM-VFIO device refuses is not opened,
//! and the VMM gets a typed error naming `KVM_DEV_VFIO_FILE_ADD`; and,
//! on a machine with /dev/kvm, a real host built with the VM's KVM-VFIO
//! device.

mod common;

use std::path::Path;

use common::*;
use vfio_passthrough::host::{HostIommu, Op, Open};
use vfio_passthrough::kvm_vfio::{KvmVfio, KvmVfioError};
use vfio_passthrough::recording::{FakeIommu, RecordingHost};
use vfio_passthrough::sys::VfioHost;
use vfio_passthrough::{IommufdBackend, Type1Backend};
use vmm_iommu::backend::{BackendError, IommuBackend};

const DEV: &str = "/sys/bus/pci/devices/0000:65:00.0";
const EP: u32 = 16;

fn refused_registration(e: &BackendError) -> bool {
    match e {
        BackendError::Host { op, source } => {
            *op == "KVM_DEV_VFIO_FILE_ADD"
                && matches!(KvmVfioError::in_io(source), Some(KvmVfioError::Add(io))
                    if io.raw_os_error() == Some(libc::EINVAL))
        }
        _ => false,
    }
}

#[test]
fn iommufd_device_whose_cdev_registration_fails_is_not_opened() {
    let host = RecordingHost::new(FakeIommu::vtd_nesting());
    host.refuse_registration_nth(Op::OpenCdev, 0, libc::EINVAL);
    let (rec, host, _mem, ram) = setup(host);
    let b = IommufdBackend::new(host, ram).unwrap();
    let (handles, calls) = (rec.open_handles(), rec.len());
    let e = b.add_endpoint(EP, Path::new(DEV)).unwrap_err();
    assert!(refused_registration(&e), "{e:?}");
    // Nothing opened, nothing asked of the kernel after the refused open.
    assert_eq!(rec.open_handles(), handles);
    assert_eq!(rec.ops()[calls..], [Op::OpenCdev]);
    assert_eq!(b.device_of(EP), None);
    // The next attempt (the VMM fixed its KVM side) opens it.
    b.add_endpoint(EP, Path::new(DEV)).unwrap();
    assert!(b.device_of(EP).is_some());
}

#[test]
fn type1_device_whose_group_registration_fails_is_not_opened() {
    let host = RecordingHost::default();
    host.refuse_registration_nth(Op::OpenType1, 0, libc::EINVAL);
    let (rec, host, _mem, ram) = setup(host);
    let b = Type1Backend::new(host, ram);
    let e = b.add_endpoint(EP, Path::new(DEV)).unwrap_err();
    assert!(refused_registration(&e), "{e:?}");
    assert_eq!(rec.open_handles(), 0);
    assert_eq!(rec.ops(), [Op::OpenType1]);
    assert_eq!(b.caps(EP).table_formats.len(), 0);
}

#[test]
fn a_host_with_the_vms_kvm_vfio_device_refuses_missing_devices_cleanly() {
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        eprintln!("SKIPPED: no /dev/kvm here");
        return;
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let k = KvmVfio::create(&vm).expect("KVM_CREATE_DEVICE(VFIO)");
    let host = VfioHost::with_kvm_vfio(&k);
    // No VFIO here (or no such device): an error before any
    // registration, never a panic.
    let p = Path::new("/sys/bus/pci/devices/0000:ff:1f.7");
    let e = host.open(Open::Type1 { device: p }).unwrap_err();
    assert!(KvmVfioError::in_io(&e).is_none(), "{e}");
}
