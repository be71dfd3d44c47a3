//! The VM-level rules of the test VMM's config: memory, devices and scenarios. The `iommu`
//! section's own rules are the library's ([`IommuConfig::validate_at`]); a device's reserved
//! regions are checked beside that section with
//! [`IommuConfig::validate_endpoint_regions_at`].

use vmm_iommu::config::{ConfigError, IommuConfig};

use super::{DeviceConfig, DeviceKind, Scenario, MAX_DEVICES};

pub(super) fn invalid(path: impl Into<String>, rule: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.into(),
        rule: rule.into(),
    }
}

pub(super) fn validate_scenarios(scenarios: &[Scenario]) -> Result<(), ConfigError> {
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

pub(super) fn validate_devices(
    devices: &[DeviceConfig],
    iommu: &IommuConfig,
) -> Result<(), ConfigError> {
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

/// A device's own reserved regions: only behind the vIOMMU, and then the
/// library's rules for one endpoint's regions beside the `iommu` section's
/// (the endpoint's PROBE reports both).
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
    iommu.validate_endpoint_regions_at("iommu", &d.reserved_regions, base)
}

#[cfg(test)]
mod tests {
    use vmm_iommu::config::{ReservedKind, ReservedRegion};

    use super::super::test_support::{assert_err, vm_err};
    use super::super::VmConfig;
    use super::*;

    /// `n` disjoint `"reserved"` regions of one page each, from 0 up, as a JSON array.
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

    /// `n` emulated devices with distinct ids and endpoints, as a JSON array.
    fn devices_json(n: usize) -> String {
        let items: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"id": "d{i}", "kind": "emulated-dma", "endpoint": {i}}}"#))
            .collect();
        format!("[{}]", items.join(","))
    }

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
}
