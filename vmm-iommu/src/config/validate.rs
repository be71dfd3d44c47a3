//! The rules of the `iommu` section: what a parsed [`IommuConfig`] must meet before a device is
//! built from it, each broken rule an error at the JSON path of the value that broke it.
//!
//! It reads no JSON (`json.rs` does) and keeps no state.

use super::{
    invalid, ConfigError, IommuConfig, Limits, NestedConfig, ReservedKind, ReservedRegion,
    MAX_MAX_DOMAINS, MAX_MAX_MAPPINGS, MAX_MAX_MAPPINGS_PER_DOMAIN, MAX_MAX_PENDING_FAULTS,
    MAX_PASID_BITS, MAX_PROBE_SIZE, MAX_RESERVED_REGIONS, MIN_GRANULE, MIN_PROBE_SIZE,
    RESV_MEM_PROPERTY_SIZE,
};

impl IommuConfig {
    /// Checks every rule of the section as it sits at `base` in a VMM's document (`"iommu"` in
    /// ours); every error path starts with `base`.
    ///
    /// [`IommuConfig::validate`] is this at `"iommu"`. Public for a VMM whose own config file
    /// keeps the section, so that its errors name the section where that file has it.
    pub fn validate_at(&self, base: &str) -> Result<(), ConfigError> {
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

    /// Checks one endpoint's own reserved regions, found at `regions_path`, beside the section
    /// at `base`: the rules of `reserved_regions` for the list alone, and for it beside the
    /// section's list, since the endpoint's PROBE reports both (no overlap between the two, at
    /// most one MSI region in both, and `probe_size` room for both).
    ///
    /// Errors are at `regions_path` and name the section's fields at `base`. Public for a VMM
    /// whose devices carry regions of their own in its config file (the test VMM's
    /// `devices[i].reserved_regions`); it hands them to the device with
    /// [`Viommu::set_endpoint_reserved_regions`](crate::Viommu::set_endpoint_reserved_regions).
    pub fn validate_endpoint_regions_at(
        &self,
        base: &str,
        regions: &[ReservedRegion],
        regions_path: &str,
    ) -> Result<(), ConfigError> {
        validate_reserved_regions(regions, regions_path)?;
        for (j, b) in regions.iter().enumerate() {
            for (i, a) in self.reserved_regions.iter().enumerate() {
                // Both ends inclusive.
                if a.start <= b.end && b.start <= a.end {
                    return Err(invalid(
                        format!("{regions_path}[{j}]"),
                        format!(
                            "{:#x}..={:#x} overlaps {base}.reserved_regions[{i}] {:#x}..={:#x}",
                            b.start, b.end, a.start, a.end
                        ),
                    ));
                }
            }
            // spec 5.13.6.7.2.2: "The device SHOULD NOT present more than one
            // VIRTIO_IOMMU_RESV_MEM_T_MSI property per endpoint."
            if b.kind == ReservedKind::Msi {
                if let Some(i) = self
                    .reserved_regions
                    .iter()
                    .position(|a| a.kind == ReservedKind::Msi)
                {
                    return Err(invalid(
                        format!("{regions_path}[{j}]"),
                        format!(
                            "a second \"msi\" region (also {base}.reserved_regions[{i}]): the \
                             device presents at most one MSI region per endpoint"
                        ),
                    ));
                }
            }
        }
        // Both lists hold at most 64 regions: the product fits in u64 easily.
        let count = self.reserved_regions.len() + regions.len();
        let needed = count as u64 * u64::from(RESV_MEM_PROPERTY_SIZE);
        if needed > u64::from(self.probe_size) {
            return Err(invalid(
                regions_path,
                format!(
                    "{base}.probe_size {} bytes cannot hold the endpoint's {count} reserved \
                     regions ({base}.reserved_regions and these): each RESV_MEM property takes \
                     {RESV_MEM_PROPERTY_SIZE} bytes, {needed} in all",
                    self.probe_size
                ),
            ));
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::super::test_support::{
        assert_err, iommu_err, iommu_ok, path_and_rule, regions_json,
    };
    use super::super::{AddrRange, DomainRange};
    use super::*;

    // ---- page_size_mask ----

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
            iommu_err(r#"{"domain_range": {"start": 10, "end": 9}}"#),
            "iommu.domain_range",
            "start 10 is above end 9",
        );
    }

    #[test]
    fn domain_range_of_one_domain_is_accepted() {
        let i = iommu_ok(r#"{"domain_range": {"start": 0, "end": 0}}"#);
        assert_eq!(i.domain_range, DomainRange { start: 0, end: 0 });
    }

    // ---- bypass ----

    #[test]
    fn bypass_without_a_bypass_feature_is_rejected() {
        assert_err(
            iommu_err(r#"{"offer_bypass": false, "bypass": true}"#),
            "iommu.bypass",
            "needs a bypass feature, which \"offer_bypass\": false turns off",
        );
        assert_err(
            iommu_err(r#"{"offer_bypass": false, "legacy_bypass": true}"#),
            "iommu.legacy_bypass",
            "needs a bypass feature",
        );
        assert!(!iommu_ok(r#"{"offer_bypass": false}"#).offer_bypass);
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

    /// spec 5.13.6.7.2.2: "The device SHOULD NOT present more than one
    /// VIRTIO_IOMMU_RESV_MEM_T_MSI property per endpoint": every endpoint has the section's
    /// regions, so the section holds at most one.
    #[test]
    fn second_msi_region_is_rejected_so_no_endpoint_presents_two() {
        assert_err(
            iommu_err(
                r#"{"reserved_regions": [{"start": "0x1000", "end": "0x1fff", "kind": "msi"},
                                         {"start": "0x8000", "end": "0x8fff", "kind": "msi"}]}"#,
            ),
            "iommu.reserved_regions[1]",
            "a second \"msi\" region (also reserved_regions[0]): the device presents at most \
             one MSI region per endpoint",
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

    // ---- a section elsewhere in a VMM's document ----

    #[test]
    fn validate_at_puts_every_error_under_the_given_path() {
        let bad = IommuConfig {
            domain_range: DomainRange { start: 9, end: 1 },
            ..IommuConfig::default()
        };
        assert_err(
            path_and_rule(bad.validate_at("vmm.iommu").unwrap_err()),
            "vmm.iommu.domain_range",
            "start 9 is above end 1",
        );
        assert_err(
            path_and_rule(bad.validate().unwrap_err()),
            "iommu.domain_range",
            "start 9 is above end 1",
        );
    }

    // ---- one endpoint's own regions ----

    fn region(start: u64, end: u64, kind: ReservedKind) -> ReservedRegion {
        ReservedRegion { start, end, kind }
    }

    /// A section with one MSI region at 0xfee00000..=0xfeefffff.
    fn with_msi() -> IommuConfig {
        iommu_ok(
            r#"{"reserved_regions": [{"start": "0xfee00000", "end": "0xfeefffff", "kind": "msi"}]}"#,
        )
    }

    fn endpoint_err(iommu: &IommuConfig, regions: &[ReservedRegion]) -> (String, String) {
        path_and_rule(
            iommu
                .validate_endpoint_regions_at("vm.iommu", regions, "vm.devices[2].regions")
                .unwrap_err(),
        )
    }

    #[test]
    fn endpoint_regions_apart_from_the_sections_are_accepted() {
        let regions = [
            region(0x8000, 0x8fff, ReservedKind::Reserved),
            region(0xfef0_0000, 0xfef0_0fff, ReservedKind::Reserved),
        ];
        assert!(with_msi()
            .validate_endpoint_regions_at("iommu", &regions, "regions")
            .is_ok());
        assert!(with_msi()
            .validate_endpoint_regions_at("iommu", &[], "regions")
            .is_ok());
    }

    #[test]
    fn endpoint_region_overlapping_the_sections_is_rejected_naming_both() {
        assert_err(
            endpoint_err(
                &with_msi(),
                &[
                    region(0x8000, 0x8fff, ReservedKind::Reserved),
                    region(0xfeef_f000, 0xfef0_0fff, ReservedKind::Reserved),
                ],
            ),
            "vm.devices[2].regions[1]",
            "0xfeeff000..=0xfef00fff overlaps vm.iommu.reserved_regions[0] 0xfee00000..=0xfeefffff",
        );
    }

    /// spec 5.13.6.7.2.2: "The device SHOULD NOT present more than one
    /// VIRTIO_IOMMU_RESV_MEM_T_MSI property per endpoint": the endpoint's PROBE reports the
    /// section's MSI region and its own.
    #[test]
    fn endpoint_msi_region_beside_the_sections_is_rejected_so_it_presents_one() {
        assert_err(
            endpoint_err(&with_msi(), &[region(0x8000, 0x8fff, ReservedKind::Msi)]),
            "vm.devices[2].regions[0]",
            "a second \"msi\" region (also vm.iommu.reserved_regions[0]): the device presents \
             at most one MSI region per endpoint",
        );
        // Without one in the section, the endpoint may have its own.
        assert!(IommuConfig::default()
            .validate_endpoint_regions_at(
                "iommu",
                &[region(0x8000, 0x8fff, ReservedKind::Msi)],
                "r"
            )
            .is_ok());
    }

    #[test]
    fn endpoint_regions_follow_the_list_rules() {
        assert_err(
            endpoint_err(
                &with_msi(),
                &[region(0x3000, 0x2fff, ReservedKind::Reserved)],
            ),
            "vm.devices[2].regions[0]",
            "start 0x3000 is above end 0x2fff",
        );
        assert_err(
            endpoint_err(
                &IommuConfig::default(),
                &[
                    region(0x1000, 0x2fff, ReservedKind::Reserved),
                    region(0x2000, 0x2fff, ReservedKind::Reserved),
                ],
            ),
            "vm.devices[2].regions[1]",
            "0x2000..=0x2fff overlaps reserved_regions[0] 0x1000..=0x2fff",
        );
    }

    #[test]
    fn probe_size_must_hold_the_sections_and_the_endpoints_regions() {
        let small = IommuConfig {
            probe_size: 64,
            ..with_msi()
        };
        let two = [
            region(0x1000, 0x1fff, ReservedKind::Reserved),
            region(0x2000, 0x2fff, ReservedKind::Reserved),
        ];
        assert_eq!(
            endpoint_err(&small, &two),
            (
                "vm.devices[2].regions".to_owned(),
                "vm.iommu.probe_size 64 bytes cannot hold the endpoint's 3 reserved regions \
                 (vm.iommu.reserved_regions and these): each RESV_MEM property takes 24 bytes, \
                 72 in all"
                    .to_owned()
            )
        );
        assert!(small
            .validate_endpoint_regions_at("iommu", &two[..1], "r")
            .is_ok());
    }
}
