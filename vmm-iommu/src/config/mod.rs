//! The `iommu` section of a VM config: its types, their defaults, their JSON forms and their
//! rules.
//!
//! This module owns what the virtio-iommu device is built from ([`IommuConfig`]): the fields a
//! VMM's config file gives it, the JSON forms their values may take (sizes such as `"2M"`,
//! addresses as numbers or `"0x"` strings), the default of every optional field, and every rule
//! the section must meet before a device is built from it. Every error names the JSON path of
//! the offending value (`iommu.input_range`, `iommu.limits.max_domains`) and the rule it broke.
//! The reference for users is `docs/config.md`; a change to a field, default, limit or rule
//! changes that page too.
//!
//! The rest of a VM config (guest memory, the devices, what a test VMM runs) belongs to the
//! VMM, not to this crate: the KVM test VMM's lives in the `integration` crate. A VMM whose own
//! config file embeds this section gets the same errors, at the same paths, from four items
//! made public for that purpose:
//!
//! - [`parse_json`]: deserializes the VMM's whole document and turns serde's errors into
//!   [`ConfigError::Invalid`] at their JSON path, as [`IommuConfig::from_json_str`] does.
//! - [`IommuConfig::validate_at`]: every rule of the section, at the path where the VMM's
//!   document keeps it.
//! - [`IommuConfig::validate_endpoint_regions_at`]: one endpoint's own reserved regions beside
//!   the section's (its PROBE reports both), for a VMM whose devices carry regions of their own.
//! - [`deserialize_from_object_only!`] and [`deserialize_from_string_only!`]: the VMM's own
//!   structs and names take one JSON form each, as this section's do, with the same messages.
//!
//! It never opens device paths, never asks the host what its IOMMU supports (the backends check
//! capabilities when endpoints attach), never negotiates features and never keeps state: it
//! turns text into a validated [`IommuConfig`] and nothing else.
//!
//! # A VMM's own config file
//!
//! ```
//! use vmm_iommu::config::{self, ConfigError, IommuConfig};
//!
//! /// The VMM's config file: its own `vcpus`, and this crate's `iommu` section.
//! #[derive(Debug, serde::Deserialize)]
//! #[serde(remote = "Self", deny_unknown_fields)]
//! struct MyVmConfig {
//!     vcpus: u8,
//!     #[serde(default)]
//!     iommu: IommuConfig,
//! }
//! // An object only, as every struct of the section: never an array of the fields.
//! config::deserialize_from_object_only!(MyVmConfig);
//!
//! fn load(text: &str) -> Result<MyVmConfig, ConfigError> {
//!     let vm: MyVmConfig = config::parse_json(text, "")?;
//!     vm.iommu.validate_at("iommu")?;
//!     Ok(vm)
//! }
//!
//! assert_eq!(load(r#"{ "vcpus": 2 }"#)?.iommu, IommuConfig::default());
//! // Errors name the path in the VMM's file, inside the section and out.
//! let err = |text| load(text).unwrap_err().to_string();
//! assert_eq!(
//!     err(r#"{ "vcpus": 2, "iommu": { "domain_range": { "start": 9, "end": 1 } } }"#),
//!     "iommu.domain_range: start 9 is above end 1"
//! );
//! assert_eq!(
//!     err(r#"{ "vcpus": 2, "iommu": { "limits": { "max_domains": "x" } } }"#),
//!     "iommu.limits.max_domains: expected a whole number, got the string \"x\""
//! );
//! assert_eq!(err("[2]"), "(root): invalid type: sequence, expected a JSON object");
//! # Ok::<(), ConfigError>(())
//! ```

mod json;
#[cfg(test)]
mod test_support;
mod validate;

use serde::Deserialize;

#[doc(inline)]
pub use crate::__deserialize_from_object_only as deserialize_from_object_only;
#[doc(inline)]
pub use crate::__deserialize_from_string_only as deserialize_from_string_only;
pub use json::parse_json;
use json::{de_addr, de_page_size_mask};

/// The macros' way to serde, so that a crate expanding them names no serde path of its own.
#[doc(hidden)]
pub use serde as __serde;

/// Smallest granule (smallest page size) accepted for `page_size_mask`.
///
/// The mapping table packs its flags into the low bits of page-aligned physical addresses, and
/// the smallest page of every host IOMMU we pass mappings to (VT-d, SMMUv3, AMD-Vi) is 4 KiB.
pub const MIN_GRANULE: u64 = 4096;

/// Default page sizes: 4 KiB | 2 MiB | 1 GiB.
pub const DEFAULT_PAGE_SIZE_MASK: u64 = (1 << 12) | (1 << 21) | (1 << 30);
/// Default last address of `input_range`: a 48-bit input address space.
pub const DEFAULT_INPUT_END: u64 = 0xffff_ffff_ffff;

/// Default `probe_size`, in bytes.
pub const DEFAULT_PROBE_SIZE: u32 = 512;
/// Smallest `probe_size`: room for a few properties, so a driver's probe buffer is never tiny.
pub const MIN_PROBE_SIZE: u32 = 64;
/// Largest `probe_size`: the driver allocates this much per endpoint probe, so it stays one page.
pub const MAX_PROBE_SIZE: u32 = 4096;
/// Bytes one RESV_MEM probe property takes: 4 (property header) + 20 (subtype, reserved, start, end).
pub const RESV_MEM_PROPERTY_SIZE: u32 = 24;

/// Most reserved regions accepted: each one is a probe property written for every endpoint.
pub const MAX_RESERVED_REGIONS: usize = 64;
/// Largest `nested.pasid_bits`: PCIe PASIDs are 20 bits.
pub const MAX_PASID_BITS: u8 = 20;

/// Largest `limits.max_domains`: each domain costs host memory the guest can make us allocate.
pub const MAX_MAX_DOMAINS: u32 = 1 << 20;
/// Largest `limits.max_mappings_per_domain`: bounds what one guest domain can make us allocate.
pub const MAX_MAX_MAPPINGS_PER_DOMAIN: u64 = 1 << 26;
/// Largest `limits.max_mappings`: bounds the host memory all guest mappings can take together.
pub const MAX_MAX_MAPPINGS: u64 = 1 << 28;
/// Largest `limits.max_pending_faults`: faults queued while the guest posts no eventq buffer.
pub const MAX_MAX_PENDING_FAULTS: u32 = 65536;

/// An error from reading, parsing or validating a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A type error, an unknown field, a syntax error or a broken rule, at a JSON path.
    #[error("{path}: {rule}")]
    Invalid {
        /// JSON path of the offending value, e.g. `devices[1].endpoint`; `(root)` for the top level.
        path: String,
        /// The rule that was broken, in words.
        rule: String,
    },
    /// The config file could not be read. The reason is in the message,
    /// not also a `source()`, so an error chain names it once.
    #[error("cannot read config file {path}: {reason}")]
    Io {
        /// The file that could not be read.
        path: String,
        /// Why it could not be read.
        reason: std::io::Error,
    },
}

fn invalid(path: impl Into<String>, rule: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.into(),
        rule: rule.into(),
    }
}

/// The virtio-iommu device: what it offers the guest and the bounds it keeps.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields, default)]
pub struct IommuConfig {
    /// Page sizes the device supports, one bit per size (config-space `page_size_mask`).
    #[serde(deserialize_with = "de_page_size_mask")]
    pub page_size_mask: u64,
    /// Virtual (IOVA) addresses the device can translate (config-space `input_range`).
    pub input_range: AddrRange,
    /// Domain ids the driver may use (config-space `domain_range`).
    pub domain_range: DomainRange,
    /// Initial value of config-space `bypass` (with `VIRTIO_IOMMU_F_BYPASS_CONFIG`).
    pub bypass: bool,
    /// Offer the legacy `VIRTIO_IOMMU_F_BYPASS` instead of `VIRTIO_IOMMU_F_BYPASS_CONFIG`.
    pub legacy_bypass: bool,
    /// Offer a bypass feature at all (`VIRTIO_IOMMU_F_BYPASS_CONFIG`, or `VIRTIO_IOMMU_F_BYPASS`
    /// with `legacy_bypass`); `false` offers neither, so endpoints attached to no domain never
    /// bypass and a driver that wants identity must build it with MAP.
    pub offer_bypass: bool,
    /// Offer `VIRTIO_F_ACCESS_PLATFORM`.
    pub access_platform: bool,
    /// Size in bytes of the probe buffer the driver supplies (config-space `probe_size`).
    pub probe_size: u32,
    /// The nested extension (`VIRTIO_IOMMU_F_ATTACH_TABLE`); `None` leaves it off.
    pub nested: Option<NestedConfig>,
    /// Regions reported to every endpoint as RESV_MEM probe properties.
    pub reserved_regions: Vec<ReservedRegion>,
    /// Bounds on what the guest can make the device allocate.
    pub limits: Limits,
}

impl Default for IommuConfig {
    fn default() -> Self {
        Self {
            page_size_mask: DEFAULT_PAGE_SIZE_MASK,
            input_range: AddrRange::default(),
            domain_range: DomainRange::default(),
            bypass: false,
            legacy_bypass: false,
            offer_bypass: true,
            access_platform: false,
            probe_size: DEFAULT_PROBE_SIZE,
            nested: None,
            reserved_regions: Vec::new(),
            limits: Limits::default(),
        }
    }
}

/// An address range with an inclusive end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct AddrRange {
    /// First address of the range.
    #[serde(deserialize_with = "de_addr")]
    pub start: u64,
    /// Last address of the range (inclusive).
    #[serde(deserialize_with = "de_addr")]
    pub end: u64,
}

impl Default for AddrRange {
    /// The 48-bit input address space, `0..=0xffff_ffff_ffff`.
    fn default() -> Self {
        Self {
            start: 0,
            end: DEFAULT_INPUT_END,
        }
    }
}

/// A range of domain ids with an inclusive end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct DomainRange {
    /// First domain id.
    pub start: u32,
    /// Last domain id (inclusive).
    pub end: u32,
}

impl Default for DomainRange {
    /// Domain ids `1..=65535`.
    fn default() -> Self {
        Self {
            start: 1,
            end: 65535,
        }
    }
}

/// The nested extension: table formats offered to the guest and PASID width.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct NestedConfig {
    /// Table formats the device advertises, non-empty, each at most once.
    pub formats: Vec<TableFormat>,
    /// PASID width in bits, 1..=20.
    pub pasid_bits: u8,
}

/// A guest table format of the nested extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(remote = "Self", rename_all = "kebab-case")]
pub enum TableFormat {
    /// `PSTF_INTEL_VTD`: a scalable-mode VT-d PASID directory (JSON `"intel-vtd"`).
    IntelVtd,
    /// `PSTF_ARM_SMMU_V3`: an SMMUv3 context descriptor table (JSON `"arm-smmuv3"`).
    #[serde(rename = "arm-smmuv3")]
    ArmSmmuV3,
    /// `PGTF_ARM_LPAE`: one Arm LPAE page table (JSON `"arm-lpae"`).
    ArmLpae,
    /// `PGTF_X86_64`: one x86-64 first-stage page table (JSON `"x86-64"`).
    #[serde(rename = "x86-64")]
    X86_64,
}

impl TableFormat {
    /// The format number on the wire (`PGTF_*` / `PSTF_*`).
    pub fn wire(self) -> u16 {
        match self {
            TableFormat::ArmLpae => crate::wire::VIRTIO_IOMMU_PGTF_ARM_LPAE,
            TableFormat::ArmSmmuV3 => crate::wire::VIRTIO_IOMMU_PSTF_ARM_SMMU_V3,
            TableFormat::IntelVtd => crate::wire::VIRTIO_IOMMU_PSTF_INTEL_VTD,
            TableFormat::X86_64 => crate::wire::VIRTIO_IOMMU_PGTF_X86_64,
        }
    }

    /// The name of the format in the config JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            TableFormat::IntelVtd => "intel-vtd",
            TableFormat::ArmSmmuV3 => "arm-smmuv3",
            TableFormat::ArmLpae => "arm-lpae",
            TableFormat::X86_64 => "x86-64",
        }
    }
}

/// A reserved region reported to the guest, with an inclusive end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct ReservedRegion {
    /// First address of the region.
    #[serde(deserialize_with = "de_addr")]
    pub start: u64,
    /// Last address of the region (inclusive).
    #[serde(deserialize_with = "de_addr")]
    pub end: u64,
    /// What the region is.
    pub kind: ReservedKind,
}

/// The subtype of a RESV_MEM probe property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(remote = "Self", rename_all = "kebab-case")]
pub enum ReservedKind {
    /// `RESV_MEM_T_RESERVED`: the driver must not map it (JSON `"reserved"`).
    Reserved,
    /// `RESV_MEM_T_MSI`: an MSI doorbell region, translated by the platform (JSON `"msi"`).
    Msi,
}

/// Bounds on what the guest can make the device allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields, default)]
pub struct Limits {
    /// Most domains alive at once, 1..=1<<20.
    pub max_domains: u32,
    /// Most mappings in one domain, 1..=1<<26.
    pub max_mappings_per_domain: u64,
    /// Most mappings over all domains together, 1..=1<<28.
    pub max_mappings: u64,
    /// Most faults queued while the driver supplies no eventq buffer, 1..=65536.
    pub max_pending_faults: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_domains: 65536,
            max_mappings_per_domain: 1 << 20,
            max_mappings: 1 << 22,
            max_pending_faults: 128,
        }
    }
}

// serde's derived struct deserializers also take a JSON array (fields by position) and its
// unit-enum deserializers also take `{"variant": null}`. The config has one form for each, so
// every type above derives with `remote = "Self"` (which makes the derived code an inherent
// `deserialize` function) and these impls admit only an object or only a string before handing
// over to it.
deserialize_from_object_only!(
    IommuConfig,
    AddrRange,
    DomainRange,
    NestedConfig,
    ReservedRegion,
    Limits,
);

deserialize_from_string_only!(
    TableFormat => "a table format: \"intel-vtd\", \"arm-smmuv3\", \"arm-lpae\" or \"x86-64\"",
    ReservedKind => "a region kind: \"reserved\" or \"msi\"",
);

impl IommuConfig {
    /// Parses and validates the `iommu` section alone; error paths start with `iommu`.
    pub fn from_json_str(s: &str) -> Result<Self, ConfigError> {
        let config: IommuConfig = parse_json(s, "iommu")?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule of the `iommu` section; error paths start with `iommu`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_at("iommu")
    }

    /// The smallest page size in `page_size_mask`; 0 if the mask is empty (which `validate` rejects).
    pub fn granule(&self) -> u64 {
        // Lowest set bit; no shift, so no overflow for an empty mask.
        self.page_size_mask & self.page_size_mask.wrapping_neg()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::iommu_ok;
    use super::*;

    /// The `iommu` section of `docs/config.md`'s design example.
    const DESIGN_EXAMPLE: &str = r#"{
        "page_size_mask": ["4K", "2M", "1G"],
        "input_range": { "start": "0x0", "end": "0xffffffffffff" },
        "domain_range": { "start": 1, "end": 65535 },
        "bypass": false,
        "nested": { "formats": ["intel-vtd", "arm-smmuv3"], "pasid_bits": 20 },
        "reserved_regions": [ { "start": "0xfee00000", "end": "0xfeefffff", "kind": "msi" } ],
        "limits": { "max_domains": 65536, "max_mappings_per_domain": 1048576 }
    }"#;

    #[test]
    fn design_example_parses_to_expected_values() {
        let i = iommu_ok(DESIGN_EXAMPLE);
        let expected = IommuConfig {
            page_size_mask: 0x1000 | 0x20_0000 | 0x4000_0000,
            input_range: AddrRange {
                start: 0,
                end: 0xffff_ffff_ffff,
            },
            domain_range: DomainRange {
                start: 1,
                end: 65535,
            },
            bypass: false,
            legacy_bypass: false,
            offer_bypass: true,
            access_platform: false,
            probe_size: 512,
            nested: Some(NestedConfig {
                formats: vec![TableFormat::IntelVtd, TableFormat::ArmSmmuV3],
                pasid_bits: 20,
            }),
            reserved_regions: vec![ReservedRegion {
                start: 0xfee0_0000,
                end: 0xfeef_ffff,
                kind: ReservedKind::Msi,
            }],
            limits: Limits {
                max_domains: 65536,
                max_mappings_per_domain: 1 << 20,
                max_mappings: 1 << 22,
                max_pending_faults: 128,
            },
        };
        assert_eq!(i, expected);
        assert_eq!(i.granule(), 4096);
    }

    #[test]
    fn empty_object_gives_all_defaults() {
        assert_eq!(iommu_ok("{}"), IommuConfig::default());
    }

    #[test]
    fn defaults_are_the_documented_values() {
        let i = IommuConfig::default();
        assert_eq!(i.page_size_mask, 0x4020_1000);
        assert_eq!(i.granule(), 4096);
        assert_eq!(
            i.input_range,
            AddrRange {
                start: 0,
                end: 0xffff_ffff_ffff
            }
        );
        assert_eq!(
            i.domain_range,
            DomainRange {
                start: 1,
                end: 65535
            }
        );
        assert!(!i.bypass && !i.legacy_bypass && !i.access_platform);
        assert!(i.offer_bypass);
        assert_eq!(i.probe_size, 512);
        assert_eq!(i.nested, None);
        assert!(i.reserved_regions.is_empty());
        assert_eq!(
            Limits::default(),
            Limits {
                max_domains: 65536,
                max_mappings_per_domain: 1 << 20,
                max_mappings: 1 << 22,
                max_pending_faults: 128
            }
        );
        assert!(i.validate().is_ok());
    }

    #[test]
    fn empty_sections_take_their_defaults() {
        assert_eq!(iommu_ok(r#"{"limits": {}}"#), IommuConfig::default());
    }

    #[test]
    fn partial_limits_keep_defaults_for_the_rest() {
        let i = iommu_ok(r#"{"limits": {"max_pending_faults": 7}}"#);
        assert_eq!(
            i.limits,
            Limits {
                max_pending_faults: 7,
                ..Limits::default()
            }
        );
    }

    #[test]
    fn all_flags_and_formats_parse() {
        let i = iommu_ok(
            r#"{"bypass": true, "legacy_bypass": true, "access_platform": true, "probe_size": 1024,
                "nested": {"formats": ["intel-vtd", "arm-smmuv3", "arm-lpae", "x86-64"], "pasid_bits": 1}}"#,
        );
        assert!(i.bypass && i.legacy_bypass && i.access_platform);
        assert_eq!(i.probe_size, 1024);
        assert_eq!(
            i.nested.unwrap().formats,
            vec![
                TableFormat::IntelVtd,
                TableFormat::ArmSmmuV3,
                TableFormat::ArmLpae,
                TableFormat::X86_64
            ]
        );
    }

    #[test]
    fn table_format_names_are_the_json_names() {
        for f in [
            TableFormat::IntelVtd,
            TableFormat::ArmSmmuV3,
            TableFormat::ArmLpae,
            TableFormat::X86_64,
        ] {
            let i = iommu_ok(&format!(
                r#"{{"nested": {{"formats": ["{}"], "pasid_bits": 1}}}}"#,
                f.as_str()
            ));
            assert_eq!(i.nested.unwrap().formats, [f]);
        }
    }

    #[test]
    fn granule_is_the_lowest_bit_and_zero_for_an_empty_mask() {
        let with_mask = |page_size_mask| IommuConfig {
            page_size_mask,
            ..IommuConfig::default()
        };
        assert_eq!(with_mask(0x20_0000 | 0x4000_0000).granule(), 0x20_0000);
        assert_eq!(with_mask(0).granule(), 0);
        assert_eq!(with_mask(1 << 63).granule(), 1 << 63);
    }
}
