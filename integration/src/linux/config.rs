//! The Linux guest's VM config: RAM, the vIOMMU (the library's `iommu`
//! section, with all its rules) and the virtio devices, each an endpoint
//! of the vIOMMU or not.
//!
//! ```json
//! { "memory": { "size_mib": 512 },
//!   "iommu": { "page_size_mask": ["4K"], "reserved_regions": [ ... ] },
//!   "devices": [
//!     { "id": "blk0", "kind": "virtio-blk", "endpoint": 8, "disk_mib": 64 },
//!     { "id": "rng0", "kind": "virtio-rng", "endpoint": 9, "iommu": true } ] }
//! ```

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;
use vmm_iommu::config::{IommuConfig, ReservedRegion};
use vmm_iommu::Viommu;

use super::layout;

/// Default RAM of the Linux guest, in MiB.
pub const DEFAULT_RAM_MIB: u64 = 512;
/// Default virtio-blk disk size, in MiB.
pub const DEFAULT_DISK_MIB: u64 = 64;
/// Largest RAM-backed disk, in MiB.
pub const MAX_DISK_MIB: u64 = 1024;

/// A config that cannot be used, with the JSON path and the rule.
#[derive(Debug, thiserror::Error)]
pub enum LinuxConfigError {
    /// The file cannot be read (the reason is in the message only, so an
    /// error chain names it once).
    #[error("cannot read {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        reason: std::io::Error,
    },
    /// Not JSON of the right shape.
    #[error("{0}")]
    Parse(#[from] serde_json::Error),
    /// A rule of the `iommu` section broken (the path starts with `iommu`).
    #[error(transparent)]
    Iommu(#[from] vmm_iommu::config::ConfigError),
    /// A rule broken.
    #[error("{path}: {rule}")]
    Invalid {
        /// JSON path.
        path: String,
        /// The rule.
        rule: String,
    },
}

fn invalid(path: impl Into<String>, rule: impl Into<String>) -> LinuxConfigError {
    LinuxConfigError::Invalid {
        path: path.into(),
        rule: rule.into(),
    }
}

/// The whole VM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinuxVmConfig {
    /// Guest RAM.
    #[serde(default)]
    pub memory: LinuxMemory,
    /// The virtio-iommu.
    #[serde(default)]
    pub iommu: IommuConfig,
    /// The virtio devices, in window order after the vIOMMU's.
    #[serde(default)]
    pub devices: Vec<LinuxDevice>,
}

/// Guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinuxMemory {
    /// RAM in MiB, from 0 up, below the MMIO gap.
    pub size_mib: u64,
}

impl Default for LinuxMemory {
    fn default() -> Self {
        LinuxMemory {
            size_mib: DEFAULT_RAM_MIB,
        }
    }
}

/// The kind of a virtio device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinuxDeviceKind {
    /// A RAM-backed virtio-blk disk.
    VirtioBlk,
    /// A virtio-rng entropy source.
    VirtioRng,
}

impl LinuxDeviceKind {
    /// The name in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            LinuxDeviceKind::VirtioBlk => "virtio-blk",
            LinuxDeviceKind::VirtioRng => "virtio-rng",
        }
    }
}

fn yes() -> bool {
    true
}

/// One virtio device on virtio-mmio.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinuxDevice {
    /// A name for reports.
    pub id: String,
    /// What it is.
    pub kind: LinuxDeviceKind,
    /// Its endpoint ID at the vIOMMU (and in the VIOT).
    pub endpoint: u32,
    /// Behind the vIOMMU (offers `VIRTIO_F_ACCESS_PLATFORM`); default true.
    #[serde(default = "yes")]
    pub iommu: bool,
    /// virtio-blk only: the disk size in MiB (default 64).
    #[serde(default)]
    pub disk_mib: Option<u64>,
    /// Reserved regions of this device's endpoint alone, beside
    /// `iommu.reserved_regions`: PROBE reports both to the guest (Linux
    /// lists them in the group's `reserved_regions`). Only for a device
    /// behind the vIOMMU.
    #[serde(default)]
    pub reserved_regions: Vec<ReservedRegion>,
}

impl LinuxDevice {
    /// The disk size in bytes (virtio-blk).
    pub fn disk_bytes(&self) -> u64 {
        self.disk_mib.unwrap_or(DEFAULT_DISK_MIB) << 20
    }
}

impl LinuxVmConfig {
    /// Parses and checks a config.
    pub fn from_json_str(s: &str) -> Result<Self, LinuxConfigError> {
        let c: LinuxVmConfig = serde_json::from_str(s)?;
        c.validate()?;
        Ok(c)
    }

    /// Reads, parses and checks a config file.
    pub fn from_file(path: &Path) -> Result<Self, LinuxConfigError> {
        let s = std::fs::read_to_string(path).map_err(|reason| LinuxConfigError::Io {
            path: path.display().to_string(),
            reason,
        })?;
        Self::from_json_str(&s)
    }

    /// Checks every rule.
    pub fn validate(&self) -> Result<(), LinuxConfigError> {
        let m = self.memory.size_mib;
        if !(layout::MIN_RAM_MIB..=layout::MAX_RAM_MIB).contains(&m) {
            return Err(invalid(
                "memory.size_mib",
                format!(
                    "must be between {} and {} (RAM lies below the MMIO gap), got {m}",
                    layout::MIN_RAM_MIB,
                    layout::MAX_RAM_MIB
                ),
            ));
        }
        self.iommu.validate()?;
        if self.devices.len() >= layout::MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "devices",
                format!(
                    "at most {} devices (one virtio-mmio window and IOAPIC pin each, the vIOMMU's included)",
                    layout::MAX_VIRTIO_DEVICES - 1
                ),
            ));
        }
        let mut ids = HashSet::new();
        let mut eps = HashSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            if !ids.insert(d.id.as_str()) {
                return Err(invalid(
                    format!("devices[{i}].id"),
                    format!("\"{}\" is used twice", d.id),
                ));
            }
            if !eps.insert(d.endpoint) {
                return Err(invalid(
                    format!("devices[{i}].endpoint"),
                    format!("endpoint {} is used twice", d.endpoint),
                ));
            }
            match (d.kind, d.disk_mib) {
                (LinuxDeviceKind::VirtioBlk, Some(n)) if !(1..=MAX_DISK_MIB).contains(&n) => {
                    return Err(invalid(
                        format!("devices[{i}].disk_mib"),
                        format!("must be between 1 and {MAX_DISK_MIB}, got {n}"),
                    ));
                }
                (LinuxDeviceKind::VirtioRng, Some(_)) => {
                    return Err(invalid(
                        format!("devices[{i}].disk_mib"),
                        "only a virtio-blk device has a disk",
                    ));
                }
                _ => {}
            }
            if !d.iommu && !d.reserved_regions.is_empty() {
                return Err(invalid(
                    format!("devices[{i}].reserved_regions"),
                    "only a device behind the vIOMMU (\"iommu\": true) has reserved regions",
                ));
            }
        }
        self.check_endpoint_regions(&self.viommu_for_checks()?)
    }

    /// A vIOMMU with this config's endpoints, to check per-endpoint
    /// reserved regions by the very rules the VM applies.
    fn viommu_for_checks(&self) -> Result<Viommu, LinuxConfigError> {
        let ram = (0, (self.memory.size_mib << 20) - 1);
        Viommu::new(&self.iommu, &self.endpoints(), &[ram]).map_err(|e| {
            invalid(
                "iommu",
                format!("cannot build the vIOMMU to check the regions: {e}"),
            )
        })
    }

    /// Gives each device behind `viommu` its own reserved regions, as
    /// the VM does before the guest probes; a refusal names the device.
    pub fn check_endpoint_regions(&self, viommu: &Viommu) -> Result<(), LinuxConfigError> {
        for (i, d) in self.devices.iter().enumerate() {
            if d.iommu && !d.reserved_regions.is_empty() {
                viommu
                    .set_endpoint_reserved_regions(d.endpoint, &d.reserved_regions)
                    .map_err(|e| {
                        invalid(format!("devices[{i}].reserved_regions"), e.to_string())
                    })?;
            }
        }
        Ok(())
    }

    /// The endpoints behind the vIOMMU, sorted.
    pub fn endpoints(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .devices
            .iter()
            .filter(|d| d.iommu)
            .map(|d| d.endpoint)
            .collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        LinuxVmConfig::from_json_str(s).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_devices_parse() {
        let c = LinuxVmConfig::from_json_str(
            r#"{"devices": [{"id": "blk0", "kind": "virtio-blk", "endpoint": 8, "disk_mib": 16},
                            {"id": "rng0", "kind": "virtio-rng", "endpoint": 9, "iommu": false}]}"#,
        )
        .unwrap();
        assert_eq!(c.memory.size_mib, DEFAULT_RAM_MIB);
        assert_eq!(c.devices[0].disk_bytes(), 16 << 20);
        assert!(c.devices[0].iommu && !c.devices[1].iommu);
        assert_eq!(c.endpoints(), vec![8]);
    }

    #[test]
    fn a_device_region_is_reported_to_that_endpoint_alone() {
        let c = LinuxVmConfig::from_json_str(
            r#"{"iommu": {"reserved_regions": [{"start": "0xfee00000", "end": "0xfeefffff", "kind": "msi"}]},
                "devices": [{"id": "blk0", "kind": "virtio-blk", "endpoint": 8,
                             "reserved_regions": [{"start": "0xd0000000", "end": "0xd00fffff", "kind": "reserved"}]},
                            {"id": "rng0", "kind": "virtio-rng", "endpoint": 9}]}"#,
        )
        .unwrap();
        let v = c.viommu_for_checks().unwrap();
        c.check_endpoint_regions(&v).unwrap();
        let starts = |ep| -> Vec<u64> {
            v.endpoint_reserved_regions(ep)
                .iter()
                .map(|r| r.start)
                .collect()
        };
        assert_eq!(starts(8), vec![0xd000_0000, 0xfee0_0000]);
        assert_eq!(starts(9), vec![0xfee0_0000]);
    }

    #[test]
    fn every_rule_names_its_path() {
        assert!(err(r#"{"memory": {"size_mib": 64}}"#).starts_with("memory.size_mib:"));
        assert!(err(r#"{"memory": {"size_mib": 4096}}"#).starts_with("memory.size_mib:"));
        let twice = r#"{"devices": [{"id": "a", "kind": "virtio-rng", "endpoint": 8},
                                     {"id": "b", "kind": "virtio-rng", "endpoint": 8}]}"#;
        assert!(err(twice).starts_with("devices[1].endpoint:"));
        let rng_disk =
            r#"{"devices": [{"id": "a", "kind": "virtio-rng", "endpoint": 8, "disk_mib": 1}]}"#;
        assert!(err(rng_disk).starts_with("devices[0].disk_mib:"));
        let big =
            r#"{"devices": [{"id": "a", "kind": "virtio-blk", "endpoint": 8, "disk_mib": 4096}]}"#;
        assert!(err(big).starts_with("devices[0].disk_mib:"));
        let off_iommu = r#"{"devices": [{"id": "a", "kind": "virtio-rng", "endpoint": 8, "iommu": false,
            "reserved_regions": [{"start": "0x1000", "end": "0x1fff", "kind": "reserved"}]}]}"#;
        assert!(err(off_iommu).starts_with("devices[0].reserved_regions:"));
        let inverted = r#"{"devices": [{"id": "a", "kind": "virtio-rng", "endpoint": 8,
            "reserved_regions": [{"start": "0x2000", "end": "0x1fff", "kind": "reserved"}]}]}"#;
        assert!(
            err(inverted).starts_with("devices[0].reserved_regions:"),
            "{}",
            err(inverted)
        );
        let range = r#"{"iommu": {"input_range": {"start": "0x2000", "end": "0x1000"}}}"#;
        assert!(
            err(range).starts_with("iommu.input_range:"),
            "{}",
            err(range)
        );
        assert!(err(r#"{"bogus": 1}"#).contains("unknown field"));
    }

    #[test]
    fn resources_linux_configs_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../resources/linux");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                LinuxVmConfig::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
    }
}
