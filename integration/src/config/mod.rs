//! The KVM test VMM's config file: guest memory, the vIOMMU, the devices and the scenarios to
//! run.
//!
//! This module owns the VM-level shape of the file (`memory`, `devices`, `scenarios`), their
//! defaults and their rules; the `iommu` section inside it is the library's
//! ([`vmm_iommu::config::IommuConfig`], with its value forms and rules), read and checked at the
//! path `iommu` with the library's path-aware parse, so every error, inside the section or out,
//! names the JSON path of the offending value (`devices[1].endpoint`, `iommu.input_range`,
//! `(root)` for the top level) and the rule it broke. The reference for users is
//! `docs/config.md`; a change to a field, default, limit or rule changes that page too.
//!
//! It never opens device paths and never asks the host anything: it turns text into a
//! validated [`VmConfig`], and a `vfio` device into what its backend opens ([`assigned`]).

pub mod assigned;
mod validate;

use std::path::Path;

use serde::Deserialize;
use vmm_iommu::config::{
    deserialize_from_object_only, deserialize_from_string_only, parse_json, ConfigError,
    IommuConfig, ReservedRegion,
};

use validate::{invalid, validate_devices, validate_scenarios};

/// Memory size used when the config has no `memory` section.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Largest guest memory accepted, in MiB (64 GiB): the test VMM maps all of it up front.
pub const MAX_MEMORY_MIB: u64 = 65536;
/// Most devices accepted in `devices`: bounds the endpoint table the VMM builds from it.
pub const MAX_DEVICES: usize = 256;

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
// unit-enum deserializers also take `{"variant": null}`. The config has one form for each, as
// the library's `iommu` section does: every type above derives with `remote = "Self"` and these
// impls admit only an object or only a string before handing over to it.
deserialize_from_object_only!(VmConfig, MemoryConfig, DeviceConfig);

deserialize_from_string_only!(
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
        // The section's rules, its errors at `iommu` as in the library's own reading of it.
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

#[cfg(test)]
pub(crate) mod test_support {
    //! What the config's tests share.

    use vmm_iommu::config::ConfigError;

    use super::VmConfig;

    /// Parses a whole config that must fail, returning (path, rule).
    pub(crate) fn vm_err(json: &str) -> (String, String) {
        match VmConfig::from_json_str(json) {
            Err(ConfigError::Invalid { path, rule }) => (path, rule),
            other => panic!("expected an Invalid error for {json}, got {other:?}"),
        }
    }

    /// The error of `got` is at `path` and its rule contains `rule_part`.
    pub(crate) fn assert_err(got: (String, String), path: &str, rule_part: &str) {
        assert_eq!(got.0, path, "path of error with rule {:?}", got.1);
        assert!(
            got.1.contains(rule_part),
            "rule {:?} at {} does not contain {rule_part:?}",
            got.1,
            got.0
        );
    }
}

#[cfg(test)]
mod tests {
    use vmm_iommu::config::{
        AddrRange, DomainRange, NestedConfig, ReservedKind, TableFormat, DEFAULT_PAGE_SIZE_MASK,
    };

    use super::test_support::{assert_err, vm_err};
    use super::*;

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

    #[test]
    fn design_example_parses_to_expected_values() {
        let c = VmConfig::from_json_str(DESIGN_EXAMPLE).unwrap();
        // The `iommu` section is the library's, parsed as the library parses
        // it alone (whose own test checks every field of this example).
        let doc: serde_json::Value = serde_json::from_str(DESIGN_EXAMPLE).unwrap();
        let iommu = IommuConfig::from_json_str(&doc["iommu"].to_string()).unwrap();
        assert!(iommu.nested.is_some() && iommu.reserved_regions.len() == 1);
        let expected = VmConfig {
            memory: MemoryConfig { size_mib: 256 },
            iommu,
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
        let c = VmConfig::from_json_str(include_str!("../../../resources/vm.json")).unwrap();
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
        let c = VmConfig::from_json_str(include_str!("../../../resources/vm-nested.json")).unwrap();
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
        let c = VmConfig::from_json_str(include_str!("../../../resources/vm-bypass.json")).unwrap();
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
    fn empty_sections_take_their_defaults() {
        let c = VmConfig::from_json_str(r#"{"memory": {}, "iommu": {"limits": {}}}"#).unwrap();
        assert_eq!(c, VmConfig::default());
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

    #[test]
    fn from_file_reads_and_validates_a_config() {
        let p = std::env::temp_dir().join(format!("vmm-iommu-config-{}.json", std::process::id()));
        std::fs::write(&p, include_str!("../../../resources/vm.json")).unwrap();
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
    }

    #[test]
    fn unknown_enum_values_are_rejected_with_path() {
        assert_err(
            vm_err(r#"{"devices": [{"id": "a", "kind": "gpu", "endpoint": 1}]}"#),
            "devices[0].kind",
            "unknown variant `gpu`",
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

    #[test]
    fn iommu_section_errors_are_at_iommu_in_a_whole_config() {
        assert_err(
            vm_err(r#"{"iommu": {"domain_range": {"start": 10, "end": 9}}}"#),
            "iommu.domain_range",
            "start 10 is above end 9",
        );
        assert_eq!(
            VmConfig::from_json_str(r#"{"iommu": {"limits": {"max_domains": "x"}}}"#)
                .unwrap_err()
                .to_string(),
            "iommu.limits.max_domains: expected a whole number, got the string \"x\""
        );
    }

    #[test]
    fn every_vm_config_under_resources_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                VmConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 3, "the shipped configs in {}", dir.display());
    }
}
