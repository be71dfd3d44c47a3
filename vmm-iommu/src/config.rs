//! The VM config JSON: parsing and validation.
//!
//! This module owns the shape of the VM config file (`memory`, `iommu`, `devices`,
//! `scenarios`), the JSON forms its values may take (sizes such as `"2M"`, addresses as
//! numbers or `"0x"` strings),
//! the defaults of every optional field, and every rule a config must meet before a device is
//! built from it. Every error names the JSON path of the offending value (`iommu.input_range`,
//! `devices[1].endpoint`, `(root)` for the top level) and the rule it broke. The reference for
//! users is `docs/config.md`; a change to a field, default, limit or rule changes that page too.
//!
//! It never opens device paths, never asks the host what its IOMMU supports (the backends check
//! capabilities when endpoints attach), never negotiates features and never keeps state: it
//! turns text into a validated [`VmConfig`] and nothing else.

use std::fmt::{self, Write as _};
use std::num::IntErrorKind;
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Memory size used when the config has no `memory` section.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Largest guest memory accepted, in MiB (64 GiB): the test VMM maps all of it up front.
pub const MAX_MEMORY_MIB: u64 = 65536;

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
/// Most devices accepted in `devices`: bounds the endpoint table the VMM builds from it.
pub const MAX_DEVICES: usize = 256;

/// Largest `limits.max_domains`: each domain costs host memory the guest can make us allocate.
pub const MAX_MAX_DOMAINS: u32 = 1 << 20;
/// Largest `limits.max_mappings_per_domain`: bounds what one guest domain can make us allocate.
pub const MAX_MAX_MAPPINGS_PER_DOMAIN: u64 = 1 << 26;
/// Largest `limits.max_mappings`: bounds the host memory all guest mappings can take together.
pub const MAX_MAX_MAPPINGS: u64 = 1 << 28;
/// Largest `limits.max_pending_faults`: faults queued while the guest posts no eventq buffer.
pub const MAX_MAX_PENDING_FAULTS: u32 = 65536;

/// The path used for errors about the top level of a document.
const ROOT_PATH: &str = "(root)";

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

/// A whole VM config: guest memory, the vIOMMU and the devices.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct VmConfig {
    /// Guest memory; defaults to 256 MiB.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// The virtio-iommu device; defaults to [`IommuConfig::default`].
    #[serde(default)]
    pub iommu: IommuConfig,
    /// The devices of the VM; defaults to none.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// Guest scenarios the KVM test VMM (`integration/`) runs, in order; `None` (the field left
    /// out) runs every scenario the config allows.
    #[serde(default)]
    pub scenarios: Option<Vec<Scenario>>,
}

/// A guest scenario of the KVM test VMM: a guest program that drives the vIOMMU and a DMA
/// engine behind it, checked by the guest and by the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(remote = "Self", rename_all = "kebab-case")]
pub enum Scenario {
    /// MAP/UNMAP mode end to end: PROBE, ATTACH, MAP, DMA through IOVAs, UNMAP, faults on the
    /// event queue (JSON `"map"`).
    Map,
    /// Bypass through config-space `bypass` and `ATTACH_F_BYPASS` (JSON `"bypass"`).
    Bypass,
    /// Nested translation through a VT-d scalable-mode PASID table and IA-32e first-stage
    /// tables the guest builds: ATTACH_TABLE, PASID-tagged DMA, stale IOTLB and PASID cache
    /// until INVALIDATE (JSON `"nested-vtd"`).
    NestedVtd,
    /// Nested translation through an SMMUv3 linear CD table and AArch64 stage-1 tables the
    /// guest builds: ATTACH_TABLE, SubstreamID-tagged DMA, stale IOTLB until INVALIDATE
    /// (JSON `"nested-smmuv3"`).
    #[serde(rename = "nested-smmuv3")]
    NestedSmmuV3,
    /// Page requests: a DMA to a not-present page waits for the guest's PAGE_RESP, then
    /// completes (SUCCESS) or faults (FAILURE) (JSON `"page-request"`).
    PageRequest,
    /// Malformed chains and requests from a hostile driver, then `"map"` in the same VM
    /// (JSON `"hostile"`).
    Hostile,
}

impl Scenario {
    /// Every scenario, in the order they run by default.
    pub const ALL: [Scenario; 6] = [
        Scenario::Map,
        Scenario::Bypass,
        Scenario::NestedVtd,
        Scenario::NestedSmmuV3,
        Scenario::PageRequest,
        Scenario::Hostile,
    ];

    /// The name of the scenario in the config JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Map => "map",
            Scenario::Bypass => "bypass",
            Scenario::NestedVtd => "nested-vtd",
            Scenario::NestedSmmuV3 => "nested-smmuv3",
            Scenario::PageRequest => "page-request",
            Scenario::Hostile => "hostile",
        }
    }
}

/// Guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Guest RAM in MiB, 1..=65536.
    pub size_mib: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size_mib: DEFAULT_MEMORY_MIB,
        }
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

/// One device of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct DeviceConfig {
    /// Unique, non-empty name of the device.
    pub id: String,
    /// What the device is.
    pub kind: DeviceKind,
    /// The virtio-iommu endpoint id of the device, unique among devices.
    pub endpoint: u32,
    /// Whether the device sits behind the vIOMMU; defaults to false.
    #[serde(default)]
    pub iommu: bool,
    /// The host device (sysfs path or VFIO cdev) of a `vfio` device.
    #[serde(default)]
    pub path: Option<String>,
    /// How a `vfio` device's DMA is programmed.
    #[serde(default)]
    pub backend: Option<VfioBackend>,
    /// Reserved regions of this device's endpoint alone, in addition to
    /// `iommu.reserved_regions` (which every endpoint has); its PROBE
    /// reports both. Only for a device behind the vIOMMU.
    #[serde(default)]
    pub reserved_regions: Vec<ReservedRegion>,
}

/// The kind of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(remote = "Self", rename_all = "kebab-case")]
pub enum DeviceKind {
    /// A DMA-capable device emulated by the VMM (JSON `"emulated-dma"`).
    EmulatedDma,
    /// A host device assigned through VFIO (JSON `"vfio"`).
    Vfio,
}

impl DeviceKind {
    /// The name of the kind in the config JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::EmulatedDma => "emulated-dma",
            DeviceKind::Vfio => "vfio",
        }
    }
}

/// The host interface a `vfio` device's DMA goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(remote = "Self", rename_all = "kebab-case")]
pub enum VfioBackend {
    /// A VFIO type1 container: MAP/UNMAP mode only (JSON `"type1"`).
    Type1,
    /// iommufd: MAP/UNMAP and nested mode (JSON `"iommufd"`).
    Iommufd,
}

// serde's derived struct deserializers also take a JSON array (fields by position) and its
// unit-enum deserializers also take `{"variant": null}`. The config has one form for each, so
// every type above derives with `remote = "Self"` (which makes the derived code an inherent
// `deserialize` function) and these impls admit only an object or only a string before handing
// over to it. Every type listed here MUST carry `remote = "Self"`, or its impl calls itself.

/// Implements `Deserialize` for structs that accept a JSON object only.
macro_rules! deserialize_from_object_only {
    ($($ty:ident),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct ObjectVisitor;
                impl<'de> Visitor<'de> for ObjectVisitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("a JSON object")
                    }
                    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<$ty, A::Error> {
                        // The inherent, derived function (remote = "Self"), not this trait method.
                        $ty::deserialize(de::value::MapAccessDeserializer::new(map))
                    }
                }
                d.deserialize_map(ObjectVisitor)
            }
        }
    )*};
}

/// Implements `Deserialize` for unit enums that accept a JSON string only.
macro_rules! deserialize_from_string_only {
    ($($ty:ident => $expecting:literal),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct NameVisitor;
                impl<'de> Visitor<'de> for NameVisitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        // The inherent, derived function (remote = "Self"), not this trait method.
                        $ty::deserialize(de::value::StrDeserializer::<E>::new(v))
                    }
                }
                d.deserialize_str(NameVisitor)
            }
        }
    )*};
}

deserialize_from_object_only!(
    VmConfig,
    MemoryConfig,
    IommuConfig,
    AddrRange,
    DomainRange,
    NestedConfig,
    ReservedRegion,
    Limits,
    DeviceConfig,
);

deserialize_from_string_only!(
    TableFormat => "a table format: \"intel-vtd\", \"arm-smmuv3\", \"arm-lpae\" or \"x86-64\"",
    ReservedKind => "a region kind: \"reserved\" or \"msi\"",
    DeviceKind => "a device kind: \"emulated-dma\" or \"vfio\"",
    VfioBackend => "a VFIO backend: \"type1\" or \"iommufd\"",
    Scenario => "a scenario: \"map\", \"bypass\", \"nested-vtd\", \"nested-smmuv3\", \"page-request\" or \"hostile\"",
);

impl VmConfig {
    /// Parses and validates a whole VM config.
    pub fn from_json_str(s: &str) -> Result<Self, ConfigError> {
        let config: VmConfig = parse_json(s, "")?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a VM config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Io {
            path: path.display().to_string(),
            reason,
        })?;
        Self::from_json_str(&text)
    }

    /// Checks every rule; [`VmConfig::from_json_str`] calls it, VMMs that build a config in code may too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let size = self.memory.size_mib;
        if !(1..=MAX_MEMORY_MIB).contains(&size) {
            return Err(invalid(
                "memory.size_mib",
                format!("must be between 1 and {MAX_MEMORY_MIB} (64 GiB), got {size}"),
            ));
        }
        self.iommu.validate_at("iommu")?;
        validate_devices(&self.devices, &self.iommu)?;
        if let Some(scenarios) = &self.scenarios {
            validate_scenarios(scenarios)?;
        }
        Ok(())
    }

    /// Endpoint ids of the devices behind the vIOMMU (`iommu: true`), sorted, each once.
    pub fn endpoints(&self) -> Vec<u32> {
        let mut eps: Vec<u32> = self
            .devices
            .iter()
            .filter(|d| d.iommu)
            .map(|d| d.endpoint)
            .collect();
        eps.sort_unstable();
        eps.dedup();
        eps
    }
}

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

    fn validate_at(&self, base: &str) -> Result<(), ConfigError> {
        let at = |field: &str| format!("{base}.{field}");

        // spec 5.13.4: page_size_mask "contains all page sizes the device supports".
        if self.page_size_mask == 0 {
            return Err(invalid(
                at("page_size_mask"),
                "must contain at least one page size",
            ));
        }
        let granule = self.granule();
        if granule < MIN_GRANULE {
            return Err(invalid(
                at("page_size_mask"),
                format!(
                    "smallest page size {granule:#x} is below {MIN_GRANULE:#x} (4 KiB), \
                     the smallest page of host IOMMUs"
                ),
            ));
        }

        let r = self.input_range;
        if r.start > r.end {
            return Err(invalid(
                at("input_range"),
                format!("start {:#x} is above end {:#x}", r.start, r.end),
            ));
        }
        if r.start % granule != 0 {
            return Err(invalid(
                at("input_range.start"),
                format!(
                    "start {:#x} is not aligned to the granule {granule:#x} \
                     (the smallest page size)",
                    r.start
                ),
            ));
        }
        // The end is inclusive: end + 1 must be granule-aligned, unless end is the last address.
        if let Some(after) = r.end.checked_add(1) {
            if after % granule != 0 {
                return Err(invalid(
                    at("input_range.end"),
                    format!(
                        "end {:#x} is not the last byte of a granule: end + 1 must be a \
                         multiple of the granule {granule:#x} (end is inclusive)",
                        r.end
                    ),
                ));
            }
        }

        if !self.offer_bypass && (self.bypass || self.legacy_bypass) {
            let field = if self.bypass {
                "bypass"
            } else {
                "legacy_bypass"
            };
            return Err(invalid(
                at(field),
                "needs a bypass feature, which \"offer_bypass\": false turns off",
            ));
        }

        let d = self.domain_range;
        if d.start > d.end {
            return Err(invalid(
                at("domain_range"),
                format!("start {} is above end {}", d.start, d.end),
            ));
        }

        if let Some(nested) = &self.nested {
            validate_nested(nested, &at("nested"))?;
        }

        validate_reserved_regions(&self.reserved_regions, &at("reserved_regions"))?;

        let p = self.probe_size;
        if !(MIN_PROBE_SIZE..=MAX_PROBE_SIZE).contains(&p) {
            return Err(invalid(
                at("probe_size"),
                format!("must be between {MIN_PROBE_SIZE} and {MAX_PROBE_SIZE} bytes, got {p}"),
            ));
        }
        if p % 4 != 0 {
            return Err(invalid(
                at("probe_size"),
                format!("must be a multiple of 4 (properties are 4-byte aligned), got {p}"),
            ));
        }
        // At most MAX_RESERVED_REGIONS (64) here, so the product fits in u64 easily.
        let needed = self.reserved_regions.len() as u64 * u64::from(RESV_MEM_PROPERTY_SIZE);
        if needed > u64::from(p) {
            return Err(invalid(
                at("probe_size"),
                format!(
                    "{p} bytes cannot hold {} reserved regions: each RESV_MEM property takes \
                     {RESV_MEM_PROPERTY_SIZE} bytes, {needed} in all",
                    self.reserved_regions.len()
                ),
            ));
        }

        validate_limits(&self.limits, &at("limits"))
    }
}

fn validate_nested(nested: &NestedConfig, base: &str) -> Result<(), ConfigError> {
    if nested.formats.is_empty() {
        return Err(invalid(
            format!("{base}.formats"),
            "must name at least one table format",
        ));
    }
    for (i, f) in nested.formats.iter().enumerate() {
        if let Some(first) = nested.formats[..i].iter().position(|g| g == f) {
            return Err(invalid(
                format!("{base}.formats[{i}]"),
                format!(
                    "duplicate format \"{}\" (also formats[{first}])",
                    f.as_str()
                ),
            ));
        }
    }
    let bits = nested.pasid_bits;
    if !(1..=MAX_PASID_BITS).contains(&bits) {
        return Err(invalid(
            format!("{base}.pasid_bits"),
            format!("must be between 1 and {MAX_PASID_BITS} (PCIe PASIDs are 20 bits), got {bits}"),
        ));
    }
    Ok(())
}

fn validate_reserved_regions(regions: &[ReservedRegion], base: &str) -> Result<(), ConfigError> {
    if regions.len() > MAX_RESERVED_REGIONS {
        return Err(invalid(
            base,
            format!(
                "at most {MAX_RESERVED_REGIONS} regions are allowed, got {}",
                regions.len()
            ),
        ));
    }
    for (i, r) in regions.iter().enumerate() {
        if r.start > r.end {
            return Err(invalid(
                format!("{base}[{i}]"),
                format!("start {:#x} is above end {:#x}", r.start, r.end),
            ));
        }
    }
    // spec 5.13.6.7.2.2: "The device SHOULD NOT present more than one
    // VIRTIO_IOMMU_RESV_MEM_T_MSI property per endpoint."
    let mut msi = regions
        .iter()
        .enumerate()
        .filter(|(_, r)| r.kind == ReservedKind::Msi);
    if let (Some((first, _)), Some((second, _))) = (msi.next(), msi.next()) {
        return Err(invalid(
            format!("{base}[{second}]"),
            format!(
                "a second \"msi\" region (also reserved_regions[{first}]): the device presents \
                 at most one MSI region per endpoint"
            ),
        ));
    }
    // At most 64 regions: the pairwise check is cheap and reports the first pair in file order.
    for (j, b) in regions.iter().enumerate() {
        for (i, a) in regions[..j].iter().enumerate() {
            // Both ends inclusive.
            if a.start <= b.end && b.start <= a.end {
                return Err(invalid(
                    format!("{base}[{j}]"),
                    format!(
                        "{:#x}..={:#x} overlaps reserved_regions[{i}] {:#x}..={:#x}",
                        b.start, b.end, a.start, a.end
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate_limits(l: &Limits, base: &str) -> Result<(), ConfigError> {
    fn check(base: &str, field: &str, v: u64, max: u64, why: &str) -> Result<(), ConfigError> {
        if (1..=max).contains(&v) {
            Ok(())
        } else {
            Err(invalid(
                format!("{base}.{field}"),
                format!("must be between 1 and {max} ({why}), got {v}"),
            ))
        }
    }
    check(
        base,
        "max_domains",
        u64::from(l.max_domains),
        u64::from(MAX_MAX_DOMAINS),
        "1 << 20",
    )?;
    check(
        base,
        "max_mappings_per_domain",
        l.max_mappings_per_domain,
        MAX_MAX_MAPPINGS_PER_DOMAIN,
        "1 << 26",
    )?;
    check(
        base,
        "max_mappings",
        l.max_mappings,
        MAX_MAX_MAPPINGS,
        "1 << 28",
    )?;
    check(
        base,
        "max_pending_faults",
        u64::from(l.max_pending_faults),
        u64::from(MAX_MAX_PENDING_FAULTS),
        "1 << 16",
    )
}

fn validate_scenarios(scenarios: &[Scenario]) -> Result<(), ConfigError> {
    if scenarios.is_empty() {
        return Err(invalid(
            "scenarios",
            "must name at least one scenario; leave the field out to run every scenario",
        ));
    }
    for (i, s) in scenarios.iter().enumerate() {
        if let Some(first) = scenarios[..i].iter().position(|t| t == s) {
            return Err(invalid(
                format!("scenarios[{i}]"),
                format!(
                    "duplicate scenario \"{}\" (also scenarios[{first}])",
                    s.as_str()
                ),
            ));
        }
    }
    Ok(())
}

fn validate_devices(devices: &[DeviceConfig], iommu: &IommuConfig) -> Result<(), ConfigError> {
    if devices.len() > MAX_DEVICES {
        return Err(invalid(
            "devices",
            format!(
                "at most {MAX_DEVICES} devices are allowed, got {}",
                devices.len()
            ),
        ));
    }
    for (i, d) in devices.iter().enumerate() {
        let at = |field: &str| format!("devices[{i}].{field}");
        if d.id.is_empty() {
            return Err(invalid(at("id"), "must not be empty"));
        }
        if let Some(first) = devices[..i].iter().position(|e| e.id == d.id) {
            return Err(invalid(
                at("id"),
                format!("duplicate id \"{}\" (also devices[{first}])", d.id),
            ));
        }
        if let Some(first) = devices[..i].iter().position(|e| e.endpoint == d.endpoint) {
            return Err(invalid(
                at("endpoint"),
                format!(
                    "endpoint {} is already used by devices[{first}] (\"{}\")",
                    d.endpoint, devices[first].id
                ),
            ));
        }
        let kind = d.kind.as_str();
        match d.kind {
            DeviceKind::Vfio => {
                match &d.path {
                    None => {
                        return Err(invalid(at("path"), format!("required for kind \"{kind}\"")))
                    }
                    Some(p) if p.is_empty() => {
                        return Err(invalid(at("path"), "must not be empty"))
                    }
                    Some(_) => {}
                }
                if d.backend.is_none() {
                    return Err(invalid(
                        at("backend"),
                        format!("required for kind \"{kind}\": \"type1\" or \"iommufd\""),
                    ));
                }
            }
            DeviceKind::EmulatedDma => {
                if d.path.is_some() {
                    return Err(invalid(
                        at("path"),
                        format!("not allowed for kind \"{kind}\" (only \"vfio\" devices have one)"),
                    ));
                }
                if d.backend.is_some() {
                    return Err(invalid(
                        at("backend"),
                        format!("not allowed for kind \"{kind}\" (only \"vfio\" devices have one)"),
                    ));
                }
            }
        }
        validate_device_regions(d, iommu, &at("reserved_regions"))?;
    }
    Ok(())
}

/// A device's own reserved regions: the rules of `iommu.reserved_regions`
/// for the list alone, and for it beside the device-wide list (the
/// endpoint's PROBE reports both).
fn validate_device_regions(
    d: &DeviceConfig,
    iommu: &IommuConfig,
    base: &str,
) -> Result<(), ConfigError> {
    if d.reserved_regions.is_empty() {
        return Ok(());
    }
    if !d.iommu {
        return Err(invalid(
            base,
            "only a device behind the vIOMMU (\"iommu\": true) has reserved regions",
        ));
    }
    validate_reserved_regions(&d.reserved_regions, base)?;
    for (j, b) in d.reserved_regions.iter().enumerate() {
        for (i, a) in iommu.reserved_regions.iter().enumerate() {
            // Both ends inclusive.
            if a.start <= b.end && b.start <= a.end {
                return Err(invalid(
                    format!("{base}[{j}]"),
                    format!(
                        "{:#x}..={:#x} overlaps iommu.reserved_regions[{i}] {:#x}..={:#x}",
                        b.start, b.end, a.start, a.end
                    ),
                ));
            }
        }
        // spec 5.13.6.7.2.2: "The device SHOULD NOT present more than one
        // VIRTIO_IOMMU_RESV_MEM_T_MSI property per endpoint."
        if b.kind == ReservedKind::Msi {
            if let Some(i) = iommu
                .reserved_regions
                .iter()
                .position(|a| a.kind == ReservedKind::Msi)
            {
                return Err(invalid(
                    format!("{base}[{j}]"),
                    format!(
                        "a second \"msi\" region (also iommu.reserved_regions[{i}]): the device \
                         presents at most one MSI region per endpoint"
                    ),
                ));
            }
        }
    }
    // Both lists hold at most 64 regions: the product fits in u64 easily.
    let count = iommu.reserved_regions.len() + d.reserved_regions.len();
    let needed = count as u64 * u64::from(RESV_MEM_PROPERTY_SIZE);
    if needed > u64::from(iommu.probe_size) {
        return Err(invalid(
            base,
            format!(
                "iommu.probe_size {} bytes cannot hold the endpoint's {count} reserved regions \
                 (iommu.reserved_regions and these): each RESV_MEM property takes \
                 {RESV_MEM_PROPERTY_SIZE} bytes, {needed} in all",
                iommu.probe_size
            ),
        ));
    }
    Ok(())
}

/// Deserializes `s` as `T`, turning serde errors into [`ConfigError::Invalid`] at a JSON path
/// that starts with `prefix`.
fn parse_json<T: serde::de::DeserializeOwned>(s: &str, prefix: &str) -> Result<T, ConfigError> {
    // Editors on some systems save JSON with a byte-order mark; it is not
    // JSON, but what the user meant is clear.
    let s = s.strip_prefix('\u{feff}').unwrap_or(s);
    if s.trim().is_empty() {
        return Err(invalid(
            root_or(prefix),
            "the config is empty: write a JSON object, at least {}",
        ));
    }
    let mut de = serde_json::Deserializer::from_str(s);
    let value: T =
        serde_path_to_error::deserialize(&mut de).map_err(|e| from_serde_error(&e, prefix))?;
    // Trailing characters after the value are a syntax error at the top level.
    de.end()
        .map_err(|e| invalid(root_or(prefix), e.to_string()))?;
    Ok(value)
}

fn root_or(prefix: &str) -> String {
    if prefix.is_empty() {
        ROOT_PATH.to_owned()
    } else {
        prefix.to_owned()
    }
}

fn from_serde_error(
    err: &serde_path_to_error::Error<serde_json::Error>,
    prefix: &str,
) -> ConfigError {
    let mut path = prefix.to_owned();
    for seg in err.path().iter() {
        use serde_path_to_error::Segment;
        match seg {
            Segment::Seq { index } => {
                let _ = write!(path, "[{index}]");
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            // A key that was not read as a string (a syntax error before it): the path up to
            // the enclosing object says more than a "?" would.
            Segment::Unknown => {}
        }
    }
    let inner = err.inner();
    let text = inner.to_string();
    // A data error already has its path; its line and column only repeat it. Syntax errors
    // keep theirs, since the path of a half-read document says little.
    let rule = if inner.classify() == serde_json::error::Category::Data {
        let position = format!(" at line {} column {}", inner.line(), inner.column());
        let rule = text.strip_suffix(&position).unwrap_or(&text);
        // serde names Rust types; the config's reader thinks in JSON.
        match rule.strip_prefix("invalid type: string ") {
            Some(rest) if rest.ends_with("expected u64") || rest.ends_with("expected u32") => {
                let value = rest.split(", expected").next().unwrap_or(rest);
                let digits = value.trim_matches('"');
                if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                    format!(
                        "expected a whole number, got the string {value}: write it without quotes"
                    )
                } else {
                    format!("expected a whole number, got the string {value}")
                }
            }
            _ => rule.to_owned(),
        }
    } else {
        text
    };
    invalid(root_or(&path), rule)
}

const ADDR_EXPECTED: &str = "expected an address: a number or a \"0x\" hex string";
const SIZE_EXPECTED: &str = "expected a size: a number or a string such as \"4K\", \"2M\", \"1G\"";

/// Parses `"0x..."` (hex) or a decimal string, digits only.
fn parse_u64_str(s: &str) -> Result<u64, ParseFail> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    // from_str_radix would accept a leading '+'; allow digits only.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(ParseFail::Syntax);
    }
    u64::from_str_radix(digits, radix).map_err(|e| match e.kind() {
        IntErrorKind::PosOverflow => ParseFail::Overflow,
        _ => ParseFail::Syntax,
    })
}

enum ParseFail {
    Syntax,
    Overflow,
}

fn parse_addr(s: &str) -> Result<u64, String> {
    parse_u64_str(s).map_err(|f| match f {
        ParseFail::Syntax => format!("{ADDR_EXPECTED}, got \"{s}\""),
        ParseFail::Overflow => format!("address \"{s}\" does not fit in 64 bits"),
    })
}

/// Parses a size: `"0x..."`, or decimal digits with an optional unit K, M, G or T (binary,
/// case-insensitive), optionally followed by "iB" or "B": "4K", "4KiB", "4kb", "512", "512B".
fn parse_size(s: &str) -> Result<u64, String> {
    let syntax = || format!("{SIZE_EXPECTED}, got \"{s}\"");
    let overflow = || format!("size \"{s}\" does not fit in 64 bits");
    if s.starts_with("0x") || s.starts_with("0X") {
        return parse_u64_str(s).map_err(|f| match f {
            ParseFail::Syntax => syntax(),
            ParseFail::Overflow => overflow(),
        });
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n = parse_u64_str(num).map_err(|f| match f {
        ParseFail::Syntax => syntax(),
        ParseFail::Overflow => overflow(),
    })?;
    let unit = unit.to_ascii_lowercase();
    let (scale, suffix) = match unit.as_bytes().first() {
        Some(b'k') => (1u64 << 10, &unit[1..]),
        Some(b'm') => (1 << 20, &unit[1..]),
        Some(b'g') => (1 << 30, &unit[1..]),
        Some(b't') => (1 << 40, &unit[1..]),
        _ => (1, unit.as_str()),
    };
    let suffix_ok = match suffix {
        "" | "b" => true,
        "ib" => scale > 1,
        _ => false,
    };
    if !suffix_ok {
        return Err(syntax());
    }
    n.checked_mul(scale).ok_or_else(overflow)
}

fn float_rule(expected: &str, v: f64) -> String {
    if v.fract() == 0.0 && v >= 0.0 {
        format!("{expected}, got {v}, which does not fit in 64 bits")
    } else {
        format!("{expected}, got {v}")
    }
}

struct AddrVisitor;

impl<'de> Visitor<'de> for AddrVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(ADDR_EXPECTED.trim_start_matches("expected "))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("{ADDR_EXPECTED}, got {v}")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        Err(E::custom(float_rule(ADDR_EXPECTED, v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        parse_addr(v).map_err(E::custom)
    }
}

fn de_addr<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(AddrVisitor)
}

struct SizeVisitor;

impl<'de> Visitor<'de> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(SIZE_EXPECTED.trim_start_matches("expected "))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("{SIZE_EXPECTED}, got {v}")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        Err(E::custom(float_rule(SIZE_EXPECTED, v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        parse_size(v).map_err(E::custom)
    }
}

/// One element of a `page_size_mask` array: a size that must be a power of two.
struct PageSize(u64);

impl<'de> Deserialize<'de> for PageSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let size = d.deserialize_any(SizeVisitor)?;
        if !size.is_power_of_two() {
            return Err(de::Error::custom(format!(
                "page size {size} ({size:#x}) is not a power of two"
            )));
        }
        Ok(PageSize(size))
    }
}

struct MaskVisitor;

impl<'de> Visitor<'de> for MaskVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(
            "a list of page sizes such as [\"4K\", \"2M\", \"1G\"], \
             or the mask itself as a number or a \"0x\" hex string",
        )
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("a mask cannot be negative, got {v}")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        Err(E::custom(float_rule("expected a mask: an integer", v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        parse_size(v).map_err(E::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut mask = 0u64;
        while let Some(PageSize(size)) = seq.next_element()? {
            mask |= size;
        }
        Ok(mask)
    }
}

fn de_page_size_mask<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(MaskVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DESIGN_EXAMPLE: &str = r#"{
      "memory": { "size_mib": 256 },
      "iommu": {
        "page_size_mask": ["4K", "2M", "1G"],
        "input_range": { "start": "0x0", "end": "0xffffffffffff" },
        "domain_range": { "start": 1, "end": 65535 },
        "bypass": false,
        "nested": { "formats": ["intel-vtd", "arm-smmuv3"], "pasid_bits": 20 },
        "reserved_regions": [ { "start": "0xfee00000", "end": "0xfeefffff", "kind": "msi" } ],
        "limits": { "max_domains": 65536, "max_mappings_per_domain": 1048576 }
      },
      "devices": [
        { "id": "dma0", "kind": "emulated-dma", "endpoint": 8, "iommu": true },
        { "id": "nic0", "kind": "vfio", "path": "/sys/bus/pci/devices/0000:65:00.0",
          "endpoint": 16, "iommu": true, "backend": "iommufd" }
      ]
    }"#;

    /// Parses a whole config that must fail, returning (path, rule).
    fn vm_err(json: &str) -> (String, String) {
        match VmConfig::from_json_str(json) {
            Err(ConfigError::Invalid { path, rule }) => (path, rule),
            other => panic!("expected an Invalid error for {json}, got {other:?}"),
        }
    }

    /// Parses an `iommu` section that must fail, returning (path, rule).
    fn iommu_err(json: &str) -> (String, String) {
        match IommuConfig::from_json_str(json) {
            Err(ConfigError::Invalid { path, rule }) => (path, rule),
            other => panic!("expected an Invalid error for {json}, got {other:?}"),
        }
    }

    fn iommu_ok(json: &str) -> IommuConfig {
        IommuConfig::from_json_str(json).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    fn assert_err(got: (String, String), path: &str, rule_part: &str) {
        assert_eq!(got.0, path, "path of error with rule {:?}", got.1);
        assert!(
            got.1.contains(rule_part),
            "rule {:?} at {} does not contain {rule_part:?}",
            got.1,
            got.0
        );
    }

    fn regions_json(n: usize) -> String {
        let items: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"start": {}, "end": {}, "kind": "reserved"}}"#,
                    i * 0x1000,
                    i * 0x1000 + 0xfff
                )
            })
            .collect();
        format!("[{}]", items.join(","))
    }

    fn devices_json(n: usize) -> String {
        let items: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"id": "d{i}", "kind": "emulated-dma", "endpoint": {i}}}"#))
            .collect();
        format!("[{}]", items.join(","))
    }

    // ---- whole documents and defaults ----

    #[test]
    fn design_example_parses_to_expected_values() {
        let c = VmConfig::from_json_str(DESIGN_EXAMPLE).unwrap();
        let expected = VmConfig {
            memory: MemoryConfig { size_mib: 256 },
            iommu: IommuConfig {
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
            },
            devices: vec![
                DeviceConfig {
                    id: "dma0".into(),
                    kind: DeviceKind::EmulatedDma,
                    endpoint: 8,
                    iommu: true,
                    path: None,
                    backend: None,
                    reserved_regions: Vec::new(),
                },
                DeviceConfig {
                    id: "nic0".into(),
                    kind: DeviceKind::Vfio,
                    endpoint: 16,
                    iommu: true,
                    path: Some("/sys/bus/pci/devices/0000:65:00.0".into()),
                    backend: Some(VfioBackend::Iommufd),
                    reserved_regions: Vec::new(),
                },
            ],
            scenarios: None,
        };
        assert_eq!(c, expected);
        assert_eq!(c.endpoints(), vec![8, 16]);
        assert_eq!(c.iommu.granule(), 4096);
    }

    #[test]
    fn resources_vm_json_parses_to_the_demo_config() {
        let c = VmConfig::from_json_str(include_str!("../../resources/vm.json")).unwrap();
        assert_eq!(c.memory.size_mib, 256);
        assert_eq!(c.iommu.page_size_mask, DEFAULT_PAGE_SIZE_MASK);
        assert_eq!(c.iommu.input_range, AddrRange::default());
        assert_eq!(c.iommu.domain_range, DomainRange::default());
        assert!(!c.iommu.bypass);
        assert_eq!(
            c.iommu.nested,
            Some(NestedConfig {
                formats: vec![
                    TableFormat::IntelVtd,
                    TableFormat::ArmSmmuV3,
                    TableFormat::ArmLpae,
                    TableFormat::X86_64
                ],
                pasid_bits: 16
            })
        );
        assert_eq!(
            c.iommu.reserved_regions,
            vec![ReservedRegion {
                start: 0xfee0_0000,
                end: 0xfeef_ffff,
                kind: ReservedKind::Msi
            }]
        );
        assert_eq!(c.endpoints(), vec![8, 9]);
        assert!(c.devices.iter().all(|d| d.kind == DeviceKind::EmulatedDma));
        assert_eq!(c.scenarios, Some(Scenario::ALL.to_vec()));
    }

    #[test]
    fn resources_vm_nested_json_names_the_nested_scenarios() {
        let c = VmConfig::from_json_str(include_str!("../../resources/vm-nested.json")).unwrap();
        let n = c
            .iommu
            .nested
            .as_ref()
            .expect("vm-nested.json enables the nested extension");
        assert_eq!(n.formats.len(), 4);
        assert_eq!(n.pasid_bits, 16);
        assert_eq!(c.endpoints(), vec![8]);
        assert_eq!(
            c.scenarios,
            Some(vec![
                Scenario::NestedVtd,
                Scenario::NestedSmmuV3,
                Scenario::PageRequest
            ])
        );
    }

    #[test]
    fn resources_vm_bypass_json_parses_with_bypass_on() {
        let c = VmConfig::from_json_str(include_str!("../../resources/vm-bypass.json")).unwrap();
        assert!(c.iommu.bypass);
        assert_eq!(c.iommu.nested, None);
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.endpoints(), vec![8]);
    }

    #[test]
    fn empty_object_gives_all_defaults() {
        let c = VmConfig::from_json_str("{}").unwrap();
        assert_eq!(c, VmConfig::default());
        assert_eq!(c.memory.size_mib, 256);
        assert_eq!(c.iommu, IommuConfig::default());
        assert!(c.devices.is_empty());
        assert!(c.endpoints().is_empty());
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
        assert!(VmConfig::default().validate().is_ok());
    }

    #[test]
    fn empty_sections_take_their_defaults() {
        let c = VmConfig::from_json_str(r#"{"memory": {}, "iommu": {"limits": {}}}"#).unwrap();
        assert_eq!(c, VmConfig::default());
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
    fn vfio_type1_device_parses() {
        let c = VmConfig::from_json_str(
            r#"{"devices": [{"id": "n", "kind": "vfio", "endpoint": 3, "path": "/dev/vfio/7", "backend": "type1"}]}"#,
        )
        .unwrap();
        assert_eq!(c.devices[0].backend, Some(VfioBackend::Type1));
        assert!(!c.devices[0].iommu, "iommu defaults to false");
    }

    #[test]
    fn endpoints_lists_only_iommu_devices_sorted() {
        let c = VmConfig::from_json_str(
            r#"{"devices": [
                {"id": "a", "kind": "emulated-dma", "endpoint": 30, "iommu": true},
                {"id": "b", "kind": "emulated-dma", "endpoint": 5, "iommu": false},
                {"id": "c", "kind": "emulated-dma", "endpoint": 2, "iommu": true}]}"#,
        )
        .unwrap();
        assert_eq!(c.endpoints(), vec![2, 30]);
    }

    // ---- files ----

    #[test]
    fn from_file_reads_and_validates_a_config() {
        let p = std::env::temp_dir().join(format!("vmm-iommu-config-{}.json", std::process::id()));
        std::fs::write(&p, include_str!("../../resources/vm.json")).unwrap();
        let c = VmConfig::from_file(&p);
        std::fs::remove_file(&p).unwrap();
        assert_eq!(c.unwrap().endpoints(), vec![8, 9]);
    }

    #[test]
    fn from_file_missing_file_is_an_io_error_naming_the_file() {
        let p = Path::new("/nonexistent/vmm-iommu/vm.json");
        let e = VmConfig::from_file(p).unwrap_err();
        assert!(
            matches!(e, ConfigError::Io { ref path, .. } if path == "/nonexistent/vmm-iommu/vm.json")
        );
        assert!(e
            .to_string()
            .starts_with("cannot read config file /nonexistent/vmm-iommu/vm.json: "));
    }

    // ---- syntax, types and unknown fields ----

    #[test]
    fn empty_file_and_byte_order_mark_get_plain_answers() {
        let e = VmConfig::from_json_str("  \n").unwrap_err().to_string();
        assert!(e.contains("the config is empty"), "{e}");
        let c = VmConfig::from_json_str("\u{feff}{\"memory\": {\"size_mib\": 64}}").unwrap();
        assert_eq!(c.memory.size_mib, 64);
    }

    #[test]
    fn a_quoted_number_says_to_drop_the_quotes() {
        let e = VmConfig::from_json_str(r#"{"memory": {"size_mib": "256"}}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "memory.size_mib: expected a whole number, got the string \"256\": write it without quotes"
        );
    }

    #[test]
    fn syntax_error_keeps_line_and_column() {
        let (path, rule) = vm_err("{\n  \"memory\": {\"size_mib\": 1,}\n}");
        assert_eq!(path, "memory");
        assert!(rule.contains("line 2"), "{rule}");
    }

    #[test]
    fn trailing_characters_are_rejected_at_root() {
        assert_err(vm_err("{} x"), "(root)", "trailing characters");
    }

    #[test]
    fn top_level_type_error_is_at_root() {
        assert_err(
            vm_err("[]"),
            "(root)",
            "invalid type: sequence, expected a JSON object",
        );
        assert_err(vm_err("5"), "(root)", "expected a JSON object");
    }

    #[test]
    fn objects_given_as_arrays_are_rejected() {
        assert_err(
            vm_err(r#"{"memory": [512]}"#),
            "memory",
            "invalid type: sequence, expected a JSON object",
        );
        assert_err(
            iommu_err(r#"{"input_range": [0, 4095]}"#),
            "iommu.input_range",
            "expected a JSON object",
        );
        assert_err(
            vm_err(r#"{"devices": [["a", "emulated-dma", 1, true, null, null]]}"#),
            "devices[0]",
            "expected a JSON object",
        );
    }

    #[test]
    fn enum_values_given_as_objects_are_rejected() {
        assert_err(
            vm_err(r#"{"devices": [{"id": "a", "kind": {"emulated-dma": null}, "endpoint": 1}]}"#),
            "devices[0].kind",
            "invalid type: map, expected a device kind: \"emulated-dma\" or \"vfio\"",
        );
        assert_err(
            iommu_err(r#"{"nested": {"formats": [3], "pasid_bits": 8}}"#),
            "iommu.nested.formats[0]",
            "expected a table format",
        );
    }

    #[test]
    fn iommu_section_alone_prefixes_paths_with_iommu() {
        assert_err(iommu_err("[]"), "iommu", "invalid type");
        assert_err(
            iommu_err(r#"{"limits": {"max_domains": "x"}}"#),
            "iommu.limits.max_domains",
            "expected a whole number, got the string \"x\"",
        );
        assert_err(
            iommu_err(r#"{"domain_range": {"start": 2, "end": 1}}"#),
            "iommu.domain_range",
            "start 2 is above end 1",
        );
    }

    #[test]
    fn type_error_in_array_element_names_the_index() {
        let json = r#"{"devices": [
            {"id": "a", "kind": "emulated-dma", "endpoint": 1},
            {"id": "b", "kind": "emulated-dma", "endpoint": "two"}]}"#;
        assert_err(
            vm_err(json),
            "devices[1].endpoint",
            "expected a whole number, got the string \"two\"",
        );
    }

    #[test]
    fn missing_required_field_names_the_object() {
        assert_err(
            vm_err(r#"{"devices": [{"id": "a", "kind": "emulated-dma"}]}"#),
            "devices[0]",
            "missing field `endpoint`",
        );
        assert_err(
            iommu_err(r#"{"input_range": {"start": 0}}"#),
            "iommu.input_range",
            "missing field `end`",
        );
    }

    #[test]
    fn unknown_enum_values_are_rejected_with_path() {
        assert_err(
            vm_err(r#"{"devices": [{"id": "a", "kind": "gpu", "endpoint": 1}]}"#),
            "devices[0].kind",
            "unknown variant `gpu`",
        );
        assert_err(
            iommu_err(r#"{"nested": {"formats": ["intel-vtd", "amd-v"], "pasid_bits": 8}}"#),
            "iommu.nested.formats[1]",
            "unknown variant `amd-v`",
        );
        assert_err(
            iommu_err(r#"{"reserved_regions": [{"start": 0, "end": 1, "kind": "io"}]}"#),
            "iommu.reserved_regions[0].kind",
            "unknown variant `io`",
        );
    }

    #[test]
    fn unknown_fields_are_rejected_at_every_level() {
        let cases = [
            (r#"{"memroy": {}}"#, "memroy"),
            (r#"{"memory": {"size_gib": 1}}"#, "memory.size_gib"),
            (r#"{"iommu": {"pagesize": 1}}"#, "iommu.pagesize"),
            (
                r#"{"iommu": {"input_range": {"start": 0, "end": 4095, "len": 1}}}"#,
                "iommu.input_range.len",
            ),
            (
                r#"{"iommu": {"domain_range": {"start": 0, "end": 1, "x": 1}}}"#,
                "iommu.domain_range.x",
            ),
            (
                r#"{"iommu": {"nested": {"formats": ["arm-lpae"], "pasid_bits": 1, "levels": 4}}}"#,
                "iommu.nested.levels",
            ),
            (
                r#"{"iommu": {"reserved_regions": [{"start": 0, "end": 1, "kind": "msi", "size": 2}]}}"#,
                "iommu.reserved_regions[0].size",
            ),
            (
                r#"{"iommu": {"limits": {"max_domainz": 1}}}"#,
                "iommu.limits.max_domainz",
            ),
            (
                r#"{"devices": [{"id": "a", "kind": "emulated-dma", "endpoint": 1, "irq": 5}]}"#,
                "devices[0].irq",
            ),
        ];
        for (json, path) in cases {
            assert_err(vm_err(json), path, "unknown field");
        }
    }

    // ---- value forms: sizes and page_size_mask ----

    #[test]
    fn page_sizes_accept_every_documented_form() {
        let cases: [(&str, u64); 12] = [
            (r#"["4K"]"#, 4096),
            (r#"["4k"]"#, 4096),
            (r#"["4KiB"]"#, 4096),
            (r#"["4kb"]"#, 4096),
            (r#"["4096"]"#, 4096),
            (r#"["4096B"]"#, 4096),
            (r#"[4096]"#, 4096),
            (r#"["0x1000"]"#, 4096),
            (r#"["64K"]"#, 0x1_0000),
            (r#"["2m", "1GiB"]"#, 0x4020_0000),
            (r#"["1T"]"#, 1 << 40),
            (r#"["4K", "4K", "2M"]"#, 0x20_1000),
        ];
        for (mask, want) in cases {
            let i = iommu_ok(&format!(
                r#"{{"page_size_mask": {mask}, "input_range": {{"start": 0, "end": "0xffffffffffffffff"}}}}"#
            ));
            assert_eq!(i.page_size_mask, want, "{mask}");
        }
    }

    #[test]
    fn page_size_mask_accepts_the_mask_as_number_or_hex_string() {
        assert_eq!(
            iommu_ok(r#"{"page_size_mask": 4096}"#).page_size_mask,
            0x1000
        );
        let i = iommu_ok(r#"{"page_size_mask": "0xfffffffffffff000"}"#);
        assert_eq!(i.page_size_mask, 0xffff_ffff_ffff_f000);
        assert_eq!(i.granule(), 0x1000);
        let i = iommu_ok(
            r#"{"page_size_mask": "0x40200000", "input_range": {"start": 0, "end": "0x3fffffffffff"}}"#,
        );
        assert_eq!(i.granule(), 0x20_0000);
    }

    #[test]
    fn page_size_not_power_of_two_is_rejected_with_index_path() {
        assert_err(
            iommu_err(r#"{"page_size_mask": ["4K", "3M"]}"#),
            "iommu.page_size_mask[1]",
            "page size 3145728 (0x300000) is not a power of two",
        );
        assert_err(
            iommu_err(r#"{"page_size_mask": [0]}"#),
            "iommu.page_size_mask[0]",
            "not a power of two",
        );
    }

    #[test]
    fn size_with_unknown_unit_is_rejected() {
        for bad in ["4Q", "4KK", "K", "4 K", "-4K", "4iB", "", "0x"] {
            assert_err(
                iommu_err(&format!(r#"{{"page_size_mask": ["{bad}"]}}"#)),
                "iommu.page_size_mask[0]",
                &format!("expected a size: a number or a string such as \"4K\", \"2M\", \"1G\", got \"{bad}\""),
            );
        }
    }

    #[test]
    fn size_that_overflows_u64_is_rejected() {
        assert_err(
            iommu_err(r#"{"page_size_mask": ["16777216T"]}"#),
            "iommu.page_size_mask[0]",
            "does not fit in 64 bits",
        );
        assert_err(
            iommu_err(r#"{"page_size_mask": ["99999999999999999999"]}"#),
            "iommu.page_size_mask[0]",
            "does not fit in 64 bits",
        );
    }

    #[test]
    fn page_size_mask_of_wrong_type_is_rejected() {
        assert_err(
            iommu_err(r#"{"page_size_mask": true}"#),
            "iommu.page_size_mask",
            "invalid type: boolean `true`, expected a list of page sizes",
        );
        assert_err(
            iommu_err(r#"{"page_size_mask": -4096}"#),
            "iommu.page_size_mask",
            "cannot be negative",
        );
    }

    #[test]
    fn page_size_mask_zero_is_rejected() {
        assert_err(
            iommu_err(r#"{"page_size_mask": 0}"#),
            "iommu.page_size_mask",
            "must contain at least one page size",
        );
        assert_err(
            iommu_err(r#"{"page_size_mask": []}"#),
            "iommu.page_size_mask",
            "must contain at least one page size",
        );
    }

    #[test]
    fn page_size_mask_granule_below_4k_is_rejected() {
        assert_err(
            iommu_err(r#"{"page_size_mask": ["2K", "4K"]}"#),
            "iommu.page_size_mask",
            "smallest page size 0x800 is below 0x1000 (4 KiB)",
        );
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

    // ---- value forms: addresses ----

    #[test]
    fn addresses_accept_number_hex_and_decimal_strings() {
        let i = iommu_ok(r#"{"input_range": {"start": "0X1000", "end": "8191"}}"#);
        assert_eq!(
            i.input_range,
            AddrRange {
                start: 0x1000,
                end: 8191
            }
        );
        let i = iommu_ok(r#"{"input_range": {"start": 4096, "end": "0xFFFFFFFFFFFFFFFF"}}"#);
        assert_eq!(
            i.input_range,
            AddrRange {
                start: 4096,
                end: u64::MAX
            }
        );
        let i = iommu_ok(r#"{"input_range": {"start": 0, "end": 18446744073709551615}}"#);
        assert_eq!(i.input_range.end, u64::MAX);
    }

    #[test]
    fn address_garbage_string_is_rejected_with_rule() {
        for bad in ["zz", "0x", "0xg", "+5", "0x+5", "1e3", " 5", "4K", ""] {
            assert_err(
                iommu_err(&format!(
                    r#"{{"input_range": {{"start": "{bad}", "end": 0}}}}"#
                )),
                "iommu.input_range.start",
                &format!("expected an address: a number or a \"0x\" hex string, got \"{bad}\""),
            );
        }
    }

    #[test]
    fn address_that_overflows_u64_is_rejected() {
        assert_err(
            iommu_err(r#"{"input_range": {"start": 0, "end": "0x10000000000000000"}}"#),
            "iommu.input_range.end",
            "address \"0x10000000000000000\" does not fit in 64 bits",
        );
        assert_err(
            iommu_err(r#"{"input_range": {"start": 0, "end": "18446744073709551616"}}"#),
            "iommu.input_range.end",
            "does not fit in 64 bits",
        );
        assert_err(
            iommu_err(r#"{"input_range": {"start": 0, "end": 18446744073709551616}}"#),
            "iommu.input_range.end",
            "does not fit in 64 bits",
        );
    }

    #[test]
    fn address_negative_fractional_or_non_scalar_is_rejected() {
        assert_err(
            iommu_err(r#"{"input_range": {"start": -1, "end": 0}}"#),
            "iommu.input_range.start",
            "expected an address: a number or a \"0x\" hex string, got -1",
        );
        assert_err(
            iommu_err(r#"{"input_range": {"start": 1.5, "end": 0}}"#),
            "iommu.input_range.start",
            "got 1.5",
        );
        assert_err(
            iommu_err(r#"{"reserved_regions": [{"start": [1], "end": 0, "kind": "msi"}]}"#),
            "iommu.reserved_regions[0].start",
            "expected an address",
        );
    }

    // ---- input_range ----

    #[test]
    fn input_range_start_above_end_is_rejected_with_path() {
        assert_err(
            iommu_err(r#"{"input_range": {"start": "0x2000", "end": "0x1000"}}"#),
            "iommu.input_range",
            "start 0x2000 is above end 0x1000",
        );
        // The display form is exactly `path: rule`.
        let e =
            IommuConfig::from_json_str(r#"{"input_range": {"start": "0x2000", "end": "0x1000"}}"#)
                .unwrap_err();
        assert_eq!(
            e.to_string(),
            "iommu.input_range: start 0x2000 is above end 0x1000"
        );
    }

    #[test]
    fn input_range_start_not_aligned_to_granule_is_rejected() {
        assert_err(
            iommu_err(r#"{"input_range": {"start": "0x1800", "end": "0xffffffffffff"}}"#),
            "iommu.input_range.start",
            "start 0x1800 is not aligned to the granule 0x1000",
        );
    }

    #[test]
    fn input_range_alignment_follows_the_granule_of_the_mask() {
        assert_err(
            iommu_err(
                r#"{"page_size_mask": ["2M"], "input_range": {"start": "0x1000", "end": "0xffffffffffff"}}"#,
            ),
            "iommu.input_range.start",
            "not aligned to the granule 0x200000",
        );
    }

    #[test]
    fn input_range_end_plus_one_not_aligned_is_rejected() {
        assert_err(
            iommu_err(r#"{"input_range": {"start": 0, "end": "0x1000"}}"#),
            "iommu.input_range.end",
            "end + 1 must be a multiple of the granule 0x1000",
        );
    }

    #[test]
    fn input_range_end_at_u64_max_is_accepted() {
        let i = iommu_ok(r#"{"input_range": {"start": 0, "end": "0xffffffffffffffff"}}"#);
        assert_eq!(i.input_range.end, u64::MAX);
        let i = iommu_ok(
            r#"{"input_range": {"start": "0xfffffffffffff000", "end": "0xffffffffffffffff"}}"#,
        );
        assert_eq!(i.input_range.start, 0xffff_ffff_ffff_f000);
    }

    #[test]
    fn input_range_of_one_granule_is_accepted() {
        let i = iommu_ok(r#"{"input_range": {"start": "0x1000", "end": "0x1fff"}}"#);
        assert_eq!(
            i.input_range,
            AddrRange {
                start: 0x1000,
                end: 0x1fff
            }
        );
    }

    // ---- domain_range ----

    #[test]
    fn domain_range_start_above_end_is_rejected_with_path() {
        assert_err(
            vm_err(r#"{"iommu": {"domain_range": {"start": 10, "end": 9}}}"#),
            "iommu.domain_range",
            "start 10 is above end 9",
        );
    }

    #[test]
    fn domain_range_of_one_domain_is_accepted() {
        let i = iommu_ok(r#"{"domain_range": {"start": 0, "end": 0}}"#);
        assert_eq!(i.domain_range, DomainRange { start: 0, end: 0 });
    }

    // ---- reserved_regions ----

    #[test]
    fn reserved_region_start_above_end_is_rejected_with_path() {
        assert_err(
            iommu_err(
                r#"{"reserved_regions": [{"start": 0, "end": 0, "kind": "msi"},
                                         {"start": "0x3000", "end": "0x2fff", "kind": "reserved"}]}"#,
            ),
            "iommu.reserved_regions[1]",
            "start 0x3000 is above end 0x2fff",
        );
    }

    #[test]
    fn reserved_regions_overlap_is_rejected_naming_both_indexes() {
        assert_err(
            iommu_err(
                r#"{"reserved_regions": [{"start": "0x1000", "end": "0x1fff", "kind": "reserved"},
                                         {"start": "0x8000", "end": "0x8fff", "kind": "reserved"},
                                         {"start": "0x1fff", "end": "0x2fff", "kind": "msi"}]}"#,
            ),
            "iommu.reserved_regions[2]",
            "0x1fff..=0x2fff overlaps reserved_regions[0] 0x1000..=0x1fff",
        );
    }

    #[test]
    fn reserved_region_containing_another_is_rejected() {
        assert_err(
            iommu_err(
                r#"{"reserved_regions": [{"start": "0x5000", "end": "0x5fff", "kind": "msi"},
                                         {"start": 0, "end": "0xffffffffffffffff", "kind": "reserved"}]}"#,
            ),
            "iommu.reserved_regions[1]",
            "overlaps reserved_regions[0]",
        );
    }

    #[test]
    fn reserved_regions_that_touch_are_accepted() {
        let i = iommu_ok(
            r#"{"reserved_regions": [{"start": "0x1000", "end": "0x1fff", "kind": "reserved"},
                                     {"start": "0x2000", "end": "0x2000", "kind": "msi"}]}"#,
        );
        assert_eq!(i.reserved_regions.len(), 2);
    }

    // ---- devices[i].reserved_regions ----

    #[test]
    fn device_reserved_regions_are_kept_per_device() {
        let c = VmConfig::from_json_str(
            r#"{"iommu": {"reserved_regions": [{"start": "0xfee00000", "end": "0xfeefffff", "kind": "msi"}]},
                "devices": [{"id": "a", "kind": "emulated-dma", "endpoint": 8, "iommu": true,
                             "reserved_regions": [{"start": "0x8000000", "end": "0x80fffff", "kind": "reserved"}]},
                            {"id": "b", "kind": "emulated-dma", "endpoint": 9, "iommu": true}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.devices[0].reserved_regions,
            vec![ReservedRegion {
                start: 0x800_0000,
                end: 0x80f_ffff,
                kind: ReservedKind::Reserved
            }]
        );
        assert!(c.devices[1].reserved_regions.is_empty());
    }

    #[test]
    fn device_reserved_region_overlapping_a_device_wide_one_is_rejected() {
        assert_err(
            vm_err(
                r#"{"iommu": {"reserved_regions": [{"start": "0x1000", "end": "0x1fff", "kind": "reserved"}]},
                    "devices": [{"id": "a", "kind": "emulated-dma", "endpoint": 8, "iommu": true,
                                 "reserved_regions": [{"start": "0x1800", "end": "0x2fff", "kind": "reserved"}]}]}"#,
            ),
            "devices[0].reserved_regions[0]",
            "0x1800..=0x2fff overlaps iommu.reserved_regions[0] 0x1000..=0x1fff",
        );
    }

    #[test]
    fn device_msi_region_beside_a_device_wide_msi_region_is_rejected() {
        assert_err(
            vm_err(
                r#"{"iommu": {"reserved_regions": [{"start": "0x1000", "end": "0x1fff", "kind": "msi"}]},
                    "devices": [{"id": "a", "kind": "emulated-dma", "endpoint": 8, "iommu": true,
                                 "reserved_regions": [{"start": "0x3000", "end": "0x3fff", "kind": "msi"}]}]}"#,
            ),
            "devices[0].reserved_regions[0]",
            "a second \"msi\" region (also iommu.reserved_regions[0])",
        );
    }

    #[test]
    fn device_reserved_regions_follow_the_list_rules() {
        assert_err(
            vm_err(
                r#"{"devices": [{"id": "a", "kind": "emulated-dma", "endpoint": 8, "iommu": true,
                                 "reserved_regions": [{"start": "0x3000", "end": "0x2fff", "kind": "reserved"}]}]}"#,
            ),
            "devices[0].reserved_regions[0]",
            "start 0x3000 is above end 0x2fff",
        );
        assert_err(
            vm_err(&format!(
                r#"{{"iommu": {{"probe_size": 64}}, "devices": [{{"id": "a", "kind": "emulated-dma",
                    "endpoint": 8, "iommu": true, "reserved_regions": {}}}]}}"#,
                regions_json(3)
            )),
            "devices[0].reserved_regions",
            "iommu.probe_size 64 bytes cannot hold the endpoint's 3 reserved regions",
        );
    }

    #[test]
    fn device_reserved_regions_need_the_iommu() {
        assert_err(
            vm_err(
                r#"{"devices": [{"id": "a", "kind": "emulated-dma", "endpoint": 8,
                                 "reserved_regions": [{"start": "0x3000", "end": "0x3fff", "kind": "reserved"}]}]}"#,
            ),
            "devices[0].reserved_regions",
            "only a device behind the vIOMMU",
        );
    }

    #[test]
    fn more_than_64_reserved_regions_are_rejected() {
        let ok = format!(
            r#"{{"probe_size": 4096, "reserved_regions": {}}}"#,
            regions_json(64)
        );
        assert_eq!(iommu_ok(&ok).reserved_regions.len(), 64);
        let json = format!(
            r#"{{"probe_size": 4096, "reserved_regions": {}}}"#,
            regions_json(65)
        );
        assert_err(
            iommu_err(&json),
            "iommu.reserved_regions",
            "at most 64 regions are allowed, got 65",
        );
    }

    // ---- probe_size ----

    #[test]
    fn probe_size_below_64_is_rejected() {
        assert_err(
            iommu_err(r#"{"probe_size": 60}"#),
            "iommu.probe_size",
            "must be between 64 and 4096 bytes, got 60",
        );
    }

    #[test]
    fn probe_size_above_4096_is_rejected() {
        assert_err(
            iommu_err(r#"{"probe_size": 4100}"#),
            "iommu.probe_size",
            "must be between 64 and 4096 bytes, got 4100",
        );
    }

    #[test]
    fn probe_size_not_multiple_of_4_is_rejected() {
        assert_err(
            iommu_err(r#"{"probe_size": 66}"#),
            "iommu.probe_size",
            "must be a multiple of 4",
        );
    }

    #[test]
    fn probe_size_too_small_for_reserved_regions_is_rejected() {
        let json = format!(
            r#"{{"probe_size": 64, "reserved_regions": {}}}"#,
            regions_json(3)
        );
        assert_err(
            iommu_err(&json),
            "iommu.probe_size",
            "64 bytes cannot hold 3 reserved regions: each RESV_MEM property takes 24 bytes, 72 in all",
        );
    }

    #[test]
    fn probe_size_exactly_holding_reserved_regions_is_accepted() {
        let json = format!(
            r#"{{"probe_size": 72, "reserved_regions": {}}}"#,
            regions_json(3)
        );
        assert_eq!(iommu_ok(&json).probe_size, 72);
    }

    // ---- nested ----

    #[test]
    fn nested_formats_empty_is_rejected() {
        assert_err(
            iommu_err(r#"{"nested": {"formats": [], "pasid_bits": 20}}"#),
            "iommu.nested.formats",
            "must name at least one table format",
        );
    }

    #[test]
    fn nested_duplicate_format_is_rejected_naming_both_indexes() {
        assert_err(
            iommu_err(
                r#"{"nested": {"formats": ["intel-vtd", "arm-lpae", "intel-vtd"], "pasid_bits": 20}}"#,
            ),
            "iommu.nested.formats[2]",
            "duplicate format \"intel-vtd\" (also formats[0])",
        );
    }

    #[test]
    fn nested_pasid_bits_zero_is_rejected() {
        assert_err(
            iommu_err(r#"{"nested": {"formats": ["arm-smmuv3"], "pasid_bits": 0}}"#),
            "iommu.nested.pasid_bits",
            "must be between 1 and 20",
        );
    }

    #[test]
    fn nested_pasid_bits_above_20_is_rejected() {
        assert_err(
            iommu_err(r#"{"nested": {"formats": ["arm-smmuv3"], "pasid_bits": 21}}"#),
            "iommu.nested.pasid_bits",
            "must be between 1 and 20 (PCIe PASIDs are 20 bits), got 21",
        );
    }

    #[test]
    fn nested_null_means_off() {
        assert_eq!(iommu_ok(r#"{"nested": null}"#).nested, None);
    }

    // ---- limits ----

    fn limit_err(field: &str, v: u64) -> (String, String) {
        iommu_err(&format!(r#"{{"limits": {{"{field}": {v}}}}}"#))
    }

    #[test]
    fn limits_max_domains_out_of_range_is_rejected() {
        assert_err(
            limit_err("max_domains", 0),
            "iommu.limits.max_domains",
            "must be between 1 and 1048576",
        );
        assert_err(
            limit_err("max_domains", (1 << 20) + 1),
            "iommu.limits.max_domains",
            "got 1048577",
        );
        assert_eq!(
            iommu_ok(r#"{"limits": {"max_domains": 1048576}}"#)
                .limits
                .max_domains,
            1 << 20
        );
    }

    #[test]
    fn limits_max_mappings_per_domain_out_of_range_is_rejected() {
        let f = "max_mappings_per_domain";
        assert_err(
            limit_err(f, 0),
            "iommu.limits.max_mappings_per_domain",
            "must be between 1 and 67108864",
        );
        assert_err(
            limit_err(f, (1 << 26) + 1),
            "iommu.limits.max_mappings_per_domain",
            "got 67108865",
        );
    }

    #[test]
    fn limits_max_mappings_out_of_range_is_rejected() {
        assert_err(
            limit_err("max_mappings", 0),
            "iommu.limits.max_mappings",
            "must be between 1 and 268435456",
        );
        assert_err(
            limit_err("max_mappings", (1 << 28) + 1),
            "iommu.limits.max_mappings",
            "got 268435457",
        );
    }

    #[test]
    fn limits_max_mappings_may_be_below_max_mappings_per_domain() {
        let i = iommu_ok(r#"{"limits": {"max_mappings": 1, "max_mappings_per_domain": 1000}}"#);
        assert_eq!(i.limits.max_mappings, 1);
    }

    #[test]
    fn limits_max_pending_faults_out_of_range_is_rejected() {
        assert_err(
            limit_err("max_pending_faults", 0),
            "iommu.limits.max_pending_faults",
            "must be between 1 and 65536",
        );
        assert_err(
            limit_err("max_pending_faults", 65537),
            "iommu.limits.max_pending_faults",
            "got 65537",
        );
    }

    // ---- memory ----

    #[test]
    fn memory_size_zero_is_rejected_with_path() {
        assert_err(
            vm_err(r#"{"memory": {"size_mib": 0}}"#),
            "memory.size_mib",
            "must be between 1 and 65536 (64 GiB), got 0",
        );
    }

    #[test]
    fn memory_size_above_64_gib_is_rejected_with_path() {
        assert_err(
            vm_err(r#"{"memory": {"size_mib": 65537}}"#),
            "memory.size_mib",
            "got 65537",
        );
        assert_eq!(
            VmConfig::from_json_str(r#"{"memory": {"size_mib": 65536}}"#)
                .unwrap()
                .memory
                .size_mib,
            65536
        );
    }

    // ---- devices ----

    #[test]
    fn device_empty_id_is_rejected() {
        assert_err(
            vm_err(r#"{"devices": [{"id": "", "kind": "emulated-dma", "endpoint": 1}]}"#),
            "devices[0].id",
            "must not be empty",
        );
    }

    #[test]
    fn device_duplicate_id_is_rejected_naming_both_indexes() {
        assert_err(
            vm_err(
                r#"{"devices": [{"id": "a", "kind": "emulated-dma", "endpoint": 1},
                                {"id": "b", "kind": "emulated-dma", "endpoint": 2},
                                {"id": "a", "kind": "emulated-dma", "endpoint": 3}]}"#,
            ),
            "devices[2].id",
            "duplicate id \"a\" (also devices[0])",
        );
    }

    #[test]
    fn device_duplicate_endpoint_is_rejected_naming_both_indexes() {
        assert_err(
            vm_err(
                r#"{"devices": [{"id": "a", "kind": "emulated-dma", "endpoint": 8},
                                {"id": "b", "kind": "emulated-dma", "endpoint": 8, "iommu": true}]}"#,
            ),
            "devices[1].endpoint",
            "endpoint 8 is already used by devices[0] (\"a\")",
        );
    }

    #[test]
    fn vfio_device_without_path_is_rejected() {
        assert_err(
            vm_err(
                r#"{"devices": [{"id": "n", "kind": "vfio", "endpoint": 1, "backend": "iommufd"}]}"#,
            ),
            "devices[0].path",
            "required for kind \"vfio\"",
        );
        assert_err(
            vm_err(
                r#"{"devices": [{"id": "n", "kind": "vfio", "endpoint": 1, "path": "", "backend": "iommufd"}]}"#,
            ),
            "devices[0].path",
            "must not be empty",
        );
    }

    #[test]
    fn vfio_device_without_backend_is_rejected() {
        assert_err(
            vm_err(
                r#"{"devices": [{"id": "n", "kind": "vfio", "endpoint": 1, "path": "/dev/vfio/1"}]}"#,
            ),
            "devices[0].backend",
            "required for kind \"vfio\"",
        );
    }

    #[test]
    fn emulated_device_with_path_is_rejected() {
        assert_err(
            vm_err(
                r#"{"devices": [{"id": "d", "kind": "emulated-dma", "endpoint": 1, "path": "/x"}]}"#,
            ),
            "devices[0].path",
            "not allowed for kind \"emulated-dma\"",
        );
    }

    #[test]
    fn emulated_device_with_backend_is_rejected() {
        assert_err(
            vm_err(
                r#"{"devices": [{"id": "d", "kind": "emulated-dma", "endpoint": 1, "backend": "type1"}]}"#,
            ),
            "devices[0].backend",
            "not allowed for kind \"emulated-dma\"",
        );
    }

    #[test]
    fn more_than_256_devices_are_rejected() {
        let ok = format!(r#"{{"devices": {}}}"#, devices_json(256));
        assert_eq!(VmConfig::from_json_str(&ok).unwrap().devices.len(), 256);
        assert_err(
            vm_err(&format!(r#"{{"devices": {}}}"#, devices_json(257))),
            "devices",
            "at most 256 devices are allowed, got 257",
        );
    }

    // ---- scenarios ----

    #[test]
    fn scenarios_left_out_means_every_scenario() {
        let c = VmConfig::from_json_str("{}").unwrap();
        assert_eq!(c.scenarios, None);
    }

    #[test]
    fn scenarios_parse_in_order() {
        let c = VmConfig::from_json_str(r#"{"scenarios": ["hostile", "map", "bypass"]}"#).unwrap();
        assert_eq!(
            c.scenarios,
            Some(vec![Scenario::Hostile, Scenario::Map, Scenario::Bypass])
        );
        let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "map",
                "bypass",
                "nested-vtd",
                "nested-smmuv3",
                "page-request",
                "hostile"
            ]
        );
    }

    #[test]
    fn nested_scenario_names_parse() {
        let c = VmConfig::from_json_str(
            r#"{"scenarios": ["nested-vtd", "nested-smmuv3", "page-request"]}"#,
        )
        .unwrap();
        assert_eq!(
            c.scenarios,
            Some(vec![
                Scenario::NestedVtd,
                Scenario::NestedSmmuV3,
                Scenario::PageRequest
            ])
        );
    }

    #[test]
    fn unknown_scenario_is_rejected_naming_its_index() {
        assert_err(
            vm_err(r#"{"scenarios": ["map", "bypass", "nested"]}"#),
            "scenarios[2]",
            "unknown variant `nested`, expected one of `map`, `bypass`, `nested-vtd`, \
             `nested-smmuv3`, `page-request`, `hostile`",
        );
    }

    #[test]
    fn scenario_of_the_wrong_type_is_rejected_naming_its_index() {
        assert_err(
            vm_err(r#"{"scenarios": ["map", 1]}"#),
            "scenarios[1]",
            "expected a scenario",
        );
        assert_err(
            vm_err(r#"{"scenarios": "map"}"#),
            "scenarios",
            "invalid type: string \"map\", expected a sequence",
        );
    }

    #[test]
    fn duplicate_scenario_is_rejected_naming_both_indexes() {
        assert_err(
            vm_err(r#"{"scenarios": ["map", "bypass", "map"]}"#),
            "scenarios[2]",
            "duplicate scenario \"map\" (also scenarios[0])",
        );
    }

    #[test]
    fn empty_scenario_list_is_rejected() {
        assert_err(
            vm_err(r#"{"scenarios": []}"#),
            "scenarios",
            "must name at least one scenario",
        );
    }

    // ---- properties ----

    proptest! {
        #[test]
        fn address_strings_round_trip(v in any::<u64>()) {
            prop_assert_eq!(parse_addr(&format!("{v:#x}")), Ok(v));
            prop_assert_eq!(parse_addr(&format!("{v:#X}").replacen("0X", "0x", 1)), Ok(v));
            prop_assert_eq!(parse_addr(&v.to_string()), Ok(v));
        }

        #[test]
        fn size_units_scale_by_powers_of_1024(n in 0u64..(1 << 20), unit in 0usize..4) {
            let (suffix, shift) = [("K", 10), ("M", 20), ("G", 30), ("T", 40)][unit];
            prop_assert_eq!(parse_size(&format!("{n}{suffix}")), Ok(n << shift));
            prop_assert_eq!(parse_size(&format!("{n}{}iB", suffix.to_lowercase())), Ok(n << shift));
        }

        #[test]
        fn arbitrary_strings_never_panic_the_value_parsers(s in ".{0,24}") {
            let _ = parse_addr(&s);
            let _ = parse_size(&s);
        }

        #[test]
        fn arbitrary_iommu_json_never_panics(s in r#"\{("[a-z_]{1,12}": ?(-?[0-9]{1,21}|"[0-9a-zx]{0,20}"|\[\]|true|null),? ?){0,4}\}"#) {
            let _ = IommuConfig::from_json_str(&s);
        }
    }
}
