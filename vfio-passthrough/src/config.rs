//! From the VM config's `vfio` devices to what the backends open: the
//! sysfs directory of the device and the backend that serves it.
//!
//! `vfio-ioctls` finds a device's IOMMU group (type1) and its VFIO cdev
//! (iommufd) from the sysfs directory, so that is what a device must name:
//! a sysfs path, or a PCI address that stands for
//! `/sys/bus/pci/devices/<address>`.

use std::path::PathBuf;

use vmm_iommu::config::{DeviceConfig, DeviceKind, VfioBackend};

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

/// The sysfs directory a device spec names: a `/sys/...` path as is, a
/// PCI address under `/sys/bus/pci/devices` (domain 0000 if omitted).
pub fn sysfs_path(id: &str, spec: &str) -> Result<PathBuf, DevicePathError> {
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
    Err(DevicePathError::BadPath {
        id: id.to_string(),
        path: spec.to_string(),
    })
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
    Ok(Some(AssignedDevice {
        endpoint: d.endpoint,
        sysfs: sysfs_path(&d.id, path)?,
        backend,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_become_sysfs_paths() {
        assert_eq!(
            sysfs_path("n", "0000:65:00.0").unwrap(),
            PathBuf::from("/sys/bus/pci/devices/0000:65:00.0")
        );
        assert_eq!(
            sysfs_path("n", "3B:00.1").unwrap(),
            PathBuf::from("/sys/bus/pci/devices/0000:3b:00.1")
        );
        assert_eq!(
            sysfs_path("n", "/sys/bus/pci/devices/0000:65:00.0").unwrap(),
            PathBuf::from("/sys/bus/pci/devices/0000:65:00.0")
        );
    }

    #[test]
    fn other_specs_are_refused() {
        for bad in [
            "/dev/vfio/7",
            "65:00",
            "0000:65:00.8",
            "zz:00.0",
            "",
            "0000:065:00.0",
        ] {
            assert!(sysfs_path("n", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_entries_map_to_assigned_devices() {
        let d = DeviceConfig {
            id: "nic0".into(),
            kind: DeviceKind::Vfio,
            endpoint: 16,
            iommu: true,
            path: Some("0000:65:00.0".into()),
            backend: Some(VfioBackend::Iommufd),
            reserved_regions: Vec::new(),
        };
        let a = assigned_device(&d).unwrap().unwrap();
        assert_eq!(a.endpoint, 16);
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
}
