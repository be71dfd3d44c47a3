//! Which scenarios a config can run: what each guest program needs from
//! the config, and the plan of a run (the scenarios the config names, or
//! every one it allows with the reasons the others are skipped).

use vmm_iommu::config::TableFormat;

use crate::abi;
use crate::config::{Scenario, VmConfig};
use crate::vm::{dma_slots, VmError};

/// The table format, the PASID width and the domain a nested scenario
/// needs; `None` for the others.
fn nested_needs(s: Scenario) -> Option<(TableFormat, u8, u32)> {
    match s {
        Scenario::NestedVtd => Some((
            TableFormat::IntelVtd,
            abi::NESTED_PASID_BITS,
            abi::NESTED_VTD_DOMAIN,
        )),
        Scenario::NestedSmmuV3 => Some((
            TableFormat::ArmSmmuV3,
            // s1cdmax ≤ PASID_SIZE; the value is at most 20.
            abi::NESTED_SMMUV3_S1CDMAX as u8,
            abi::NESTED_SMMUV3_DOMAIN,
        )),
        Scenario::PageRequest => Some((
            TableFormat::IntelVtd,
            abi::NESTED_PASID_BITS,
            abi::PAGE_REQUEST_DOMAIN,
        )),
        Scenario::Map | Scenario::Bypass | Scenario::Hostile => None,
    }
}

/// Why `cfg` cannot run scenario `s`, if it cannot: the guest programs
/// use 4 KiB pages, domains 1 to 4 and IOVAs in
/// `abi::IOVA_WINDOW_START..=abi::IOVA_WINDOW_END`, and drive a DMA engine
/// behind the vIOMMU; the nested ones also need `iommu.nested` with their
/// table format, a wide enough PASID and their own domain (5, 6 or 7).
pub fn unmet_requirement(cfg: &VmConfig, s: Scenario) -> Option<String> {
    let i = &cfg.iommu;
    let dma = match dma_slots(cfg) {
        Ok(slots) => slots,
        Err(e) => return Some(e.to_string()),
    };
    if !dma.iter().any(|d| d.behind_iommu) {
        return Some("needs an \"emulated-dma\" device with \"iommu\": true".into());
    }
    if i.page_size_mask & 0x1000 == 0 {
        return Some("needs 4 KiB pages in iommu.page_size_mask".into());
    }
    let domains = abi::MAP_DOMAIN..=abi::HOSTILE_DOMAIN + 1;
    if i.domain_range.start > *domains.start() || i.domain_range.end < *domains.end() {
        return Some(format!(
            "needs domains {}..={} inside iommu.domain_range",
            domains.start(),
            domains.end()
        ));
    }
    let (lo, hi) = (abi::IOVA_WINDOW_START, abi::IOVA_WINDOW_END);
    if i.input_range.start > lo || i.input_range.end < hi {
        return Some(format!(
            "needs IOVAs {lo:#x}..={hi:#x} inside iommu.input_range"
        ));
    }
    if let Some((n, r)) = i
        .reserved_regions
        .iter()
        .enumerate()
        .find(|(_, r)| r.start <= hi && lo <= r.end)
    {
        return Some(format!(
            "needs IOVAs {lo:#x}..={hi:#x} free of reserved regions, but \
             iommu.reserved_regions[{n}] ({:#x}..={:#x}) overlaps them: move the region",
            r.start, r.end
        ));
    }
    // A device's own regions bind every domain it joins, as the
    // device-wide ones do.
    for (d, dev) in cfg.devices.iter().enumerate() {
        if let Some((n, r)) = dev
            .reserved_regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.start <= hi && lo <= r.end)
        {
            return Some(format!(
                "needs IOVAs {lo:#x}..={hi:#x} free of reserved regions, but \
                 devices[{d}].reserved_regions[{n}] ({:#x}..={:#x}) overlaps them: move the region",
                r.start, r.end
            ));
        }
    }
    if s == Scenario::Bypass && i.legacy_bypass {
        return Some(
            "needs VIRTIO_IOMMU_F_BYPASS_CONFIG, which \"legacy_bypass\": true turns off".into(),
        );
    }
    if let Some((format, pasid_bits, domain)) = nested_needs(s) {
        let Some(n) = &i.nested else {
            return Some(format!(
                "needs the nested extension: add iommu.nested with \"{}\" in its formats",
                format.as_str()
            ));
        };
        if !n.formats.contains(&format) {
            return Some(format!(
                "needs \"{}\" in iommu.nested.formats",
                format.as_str()
            ));
        }
        if n.pasid_bits < pasid_bits {
            return Some(format!(
                "needs iommu.nested.pasid_bits of at least {pasid_bits}, got {}",
                n.pasid_bits
            ));
        }
        if !(i.domain_range.start..=i.domain_range.end).contains(&domain) {
            return Some(format!("needs domain {domain} inside iommu.domain_range"));
        }
    }
    None
}

/// The scenarios to run for a config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// To run, in order.
    pub run: Vec<Scenario>,
    /// Left out (the config named none and cannot run these), with why.
    pub skipped: Vec<(Scenario, String)>,
}

/// What to run for `cfg`: the scenarios it names (each must be
/// runnable; the error names `scenarios[i]`), or every runnable scenario,
/// with the reasons the others are skipped.
pub fn plan(cfg: &VmConfig) -> Result<Plan, VmError> {
    match &cfg.scenarios {
        Some(list) => {
            for (idx, &s) in list.iter().enumerate() {
                if let Some(why) = unmet_requirement(cfg, s) {
                    return Err(VmError::Config {
                        path: format!("scenarios[{idx}]"),
                        rule: format!("scenario \"{}\" {why}", s.as_str()),
                    });
                }
            }
            Ok(Plan {
                run: list.clone(),
                skipped: Vec::new(),
            })
        }
        None => {
            let mut run = Vec::new();
            let mut skipped = Vec::new();
            for s in Scenario::ALL {
                match unmet_requirement(cfg, s) {
                    None => run.push(s),
                    Some(why) => skipped.push((s, why)),
                }
            }
            Ok(Plan { run, skipped })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_configs::{cfg, DMA, NESTED};
    use super::*;

    #[test]
    fn every_scenario_runs_by_default_when_the_config_allows() {
        let p = plan(&cfg(&format!("{{\"iommu\": {{{NESTED}}}, {DMA}}}"))).unwrap();
        assert_eq!(p.run, Scenario::ALL);
        assert!(p.skipped.is_empty());
    }

    #[test]
    fn without_the_nested_extension_the_nested_scenarios_are_skipped() {
        let p = plan(&cfg(&format!("{{{DMA}}}"))).unwrap();
        assert_eq!(p.run, [Scenario::Map, Scenario::Bypass, Scenario::Hostile]);
        let skipped: Vec<Scenario> = p.skipped.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            skipped,
            [
                Scenario::NestedVtd,
                Scenario::NestedSmmuV3,
                Scenario::PageRequest
            ]
        );
        assert!(p.skipped[0].1.contains("iommu.nested"), "{:?}", p.skipped);
    }

    #[test]
    fn without_a_dma_engine_behind_the_iommu_nothing_runs() {
        let p = plan(&cfg("{}")).unwrap();
        assert!(p.run.is_empty());
        assert_eq!(p.skipped.len(), Scenario::ALL.len());
    }

    #[test]
    fn legacy_bypass_skips_the_bypass_scenario() {
        let c = cfg(&format!(
            r#"{{"iommu": {{"legacy_bypass": true, {NESTED}}}, {DMA}}}"#
        ));
        let p = plan(&c).unwrap();
        assert_eq!(
            p.run,
            [
                Scenario::Map,
                Scenario::NestedVtd,
                Scenario::NestedSmmuV3,
                Scenario::PageRequest,
                Scenario::Hostile
            ]
        );
        assert_eq!(p.skipped[0].0, Scenario::Bypass);
    }

    #[test]
    fn a_nested_scenario_needs_its_format_and_pasid_width() {
        let only_vtd = cfg(&format!(
            r#"{{"iommu": {{"nested": {{"formats": ["intel-vtd"], "pasid_bits": 8}}}}, {DMA}}}"#
        ));
        let why = unmet_requirement(&only_vtd, Scenario::NestedSmmuV3).unwrap();
        assert!(
            why.contains("\"arm-smmuv3\" in iommu.nested.formats"),
            "{why}"
        );
        let why = unmet_requirement(&only_vtd, Scenario::NestedVtd).unwrap();
        assert!(why.contains("pasid_bits of at least 13, got 8"), "{why}");
        let c = cfg(&format!(
            r#"{{"iommu": {{{NESTED}}}, {DMA}, "scenarios": ["map", "page-request"]}}"#
        ));
        assert_eq!(
            plan(&c).unwrap().run,
            [Scenario::Map, Scenario::PageRequest]
        );
    }

    #[test]
    fn a_named_scenario_the_config_cannot_run_is_an_error_naming_its_index() {
        let c = cfg(&format!(
            r#"{{"iommu": {{"legacy_bypass": true}}, {DMA}, "scenarios": ["map", "bypass"]}}"#
        ));
        let e = plan(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("scenarios[1]: scenario \"bypass\" needs"),
            "{e}"
        );
    }

    #[test]
    fn reserved_region_over_the_iova_window_is_reported() {
        let c = cfg(&format!(
            r#"{{"iommu": {{"reserved_regions": [{{"start": "0x10000000", "end": "0x10000fff", "kind": "reserved"}}]}}, {DMA}}}"#
        ));
        let why = unmet_requirement(&c, Scenario::Map).unwrap();
        assert!(
            why.contains("iommu.reserved_regions[0] (0x10000000..=0x10000fff) overlaps"),
            "{why}"
        );
    }

    #[test]
    fn device_reserved_region_over_the_iova_window_is_reported() {
        let c = cfg(
            r#"{"devices": [{"id": "dma0", "kind": "emulated-dma", "endpoint": 1, "iommu": true,
                "reserved_regions": [{"start": "0x1fff0000", "end": "0x1fffffff", "kind": "reserved"}]}]}"#,
        );
        let why = unmet_requirement(&c, Scenario::Map).unwrap();
        assert!(
            why.contains("devices[0].reserved_regions[0] (0x1fff0000..=0x1fffffff) overlaps"),
            "{why}"
        );
    }
}
