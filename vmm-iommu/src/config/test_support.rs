//! What the config's tests share: parsing an `iommu` section that must fail or must pass, and
//! the check of an error's path and rule.

use super::{ConfigError, IommuConfig};

/// Parses an `iommu` section that must fail, returning (path, rule).
pub(super) fn iommu_err(json: &str) -> (String, String) {
    match IommuConfig::from_json_str(json) {
        Err(ConfigError::Invalid { path, rule }) => (path, rule),
        other => panic!("expected an Invalid error for {json}, got {other:?}"),
    }
}

/// Parses an `iommu` section that must pass.
pub(super) fn iommu_ok(json: &str) -> IommuConfig {
    IommuConfig::from_json_str(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

/// The error of `got` is at `path` and its rule contains `rule_part`.
pub(super) fn assert_err(got: (String, String), path: &str, rule_part: &str) {
    assert_eq!(got.0, path, "path of error with rule {:?}", got.1);
    assert!(
        got.1.contains(rule_part),
        "rule {:?} at {} does not contain {rule_part:?}",
        got.1,
        got.0
    );
}

/// The (path, rule) of an error that must be [`ConfigError::Invalid`].
pub(super) fn path_and_rule(e: ConfigError) -> (String, String) {
    match e {
        ConfigError::Invalid { path, rule } => (path, rule),
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

/// `n` disjoint `"reserved"` regions of one page each, from 0 up, as a JSON array.
pub(super) fn regions_json(n: usize) -> String {
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
