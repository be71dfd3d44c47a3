//! From the config's `vfio` devices to what a VFIO backend opens: the
//! sysfs directory of the device and the backend that serves it.
//!
//! `vfio-ioctls` finds a device's IOMMU group (type1) and its VFIO cdev
//! (iommufd) from the sysfs directory, so that is what a device must name:
//! a sysfs path, or a PCI address that stands for
//! `/sys/bus/pci/devices/<address>` ([`vfio_passthrough::host::sysfs_path`]).

use std::path::PathBuf;

use vfio_passthrough::host::{sysfs_path, NotADevicePath};

use super::{DeviceConfig, DeviceKind, VfioBackend};

/// Why a `vfio` device of the config cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevicePathError {
    /// The device has no `path`.
    #[error("device {0}: a vfio device needs a path (sysfs directory or PCI address)")]
    NoPath(String),
    /// The device has no `backend`.
    #[error("device {0}: a vfio device needs a backend (\"type1\" or \"iommufd\")")]
    NoBackend(String),
    /// The path is neither a sysfs path nor a PCI address.
    #[error("device {id}: {path:?} is neither a /sys path nor a PCI address like 0000:65:00.0")]
    BadPath {
        /// Device ID.
        id: String,
        /// What it said.
        path: String,
    },
}

/// A `vfio` device of the config, ready to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedDevice {
    /// Its virtio-iommu endpoint.
    pub endpoint: u32,
    /// Its sysfs directory.
    pub sysfs: PathBuf,
    /// Which backend serves it.
    pub backend: VfioBackend,
}

/// The assigned device a config entry describes; `None` for devices that
/// are not `vfio`.
pub fn assigned_device(d: &DeviceConfig) -> Result<Option<AssignedDevice>, DevicePathError> {
    if d.kind != DeviceKind::Vfio {
        return Ok(None);
    }
    let path = d
        .path
        .as_deref()
        .ok_or_else(|| DevicePathError::NoPath(d.id.clone()))?;
    let backend = d
        .backend
        .ok_or_else(|| DevicePathError::NoBackend(d.id.clone()))?;
    let sysfs = sysfs_path(path).map_err(|NotADevicePath(path)| DevicePathError::BadPath {
        id: d.id.clone(),
        path,
    })?;
    Ok(Some(AssignedDevice {
        endpoint: d.endpoint,
        sysfs,
        backend,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic() -> DeviceConfig {
        DeviceConfig {
            id: "nic0".into(),
            kind: DeviceKind::Vfio,
            endpoint: 16,
            iommu: true,
            path: Some("0000:65:00.0".into()),
            backend: Some(VfioBackend::Iommufd),
            reserved_regions: Vec::new(),
        }
    }

    #[test]
    fn config_entries_map_to_assigned_devices() {
        let d = nic();
        let a = assigned_device(&d).unwrap().unwrap();
        assert_eq!(a.endpoint, 16);
        assert_eq!(a.sysfs, PathBuf::from("/sys/bus/pci/devices/0000:65:00.0"));
        assert_eq!(a.backend, VfioBackend::Iommufd);
        let e = DeviceConfig {
            kind: DeviceKind::EmulatedDma,
            path: None,
            backend: None,
            ..d.clone()
        };
        assert_eq!(assigned_device(&e).unwrap(), None);
        let n = DeviceConfig { path: None, ..d };
        assert_eq!(
            assigned_device(&n),
            Err(DevicePathError::NoPath("nic0".into()))
        );
    }

    #[test]
    fn a_device_without_a_backend_or_with_a_bad_path_is_refused_naming_it() {
        let b = DeviceConfig {
            backend: None,
            ..nic()
        };
        assert_eq!(
            assigned_device(&b),
            Err(DevicePathError::NoBackend("nic0".into()))
        );
        let p = DeviceConfig {
            path: Some("/dev/vfio/7".into()),
            ..nic()
        };
        let e = assigned_device(&p).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device nic0: \"/dev/vfio/7\" is neither a /sys path nor a PCI address like 0000:65:00.0"
        );
    }
}
