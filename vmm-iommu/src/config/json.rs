//! How the config's JSON is read: the path-aware parse that puts every serde error at its JSON
//! path, the one JSON form each struct (an object) and each name (a string) takes, and the
//! value forms of addresses, sizes and `page_size_mask`.
//!
//! It knows nothing of the rules a parsed value must meet (`validate.rs` does).

use std::fmt::{self, Write as _};
use std::num::IntErrorKind;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::{invalid, ConfigError};

/// The path used for errors about the top level of a document.
const ROOT_PATH: &str = "(root)";

/// Implements `Deserialize` for structs that take a JSON object only, with serde's own messages
/// for everything inside it.
///
/// serde's derived struct deserializers also take a JSON array (fields by position); a config
/// has one form for each value, so its structs derive with `#[serde(remote = "Self")]`, which
/// makes the derived code an inherent `deserialize` function, and this impl admits an object
/// before handing over to it. Anything else is `invalid type: ..., expected a JSON object`.
///
/// Every type named MUST derive `Deserialize` with `#[serde(remote = "Self")]`: without it the
/// impl's call to `Type::deserialize` is the impl itself. Public so that a VMM's own config,
/// which embeds the `iommu` section, takes the same forms with the same messages; the
/// [module documentation](crate::config) has an example.
#[doc(hidden)]
#[macro_export]
macro_rules! __deserialize_from_object_only {
    ($($ty:ident),* $(,)?) => {$(
        impl<'de> $crate::config::__serde::Deserialize<'de> for $ty {
            fn deserialize<D: $crate::config::__serde::Deserializer<'de>>(
                d: D,
            ) -> ::core::result::Result<Self, D::Error> {
                struct ObjectVisitor;
                impl<'de> $crate::config::__serde::de::Visitor<'de> for ObjectVisitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut ::core::fmt::Formatter) -> ::core::fmt::Result {
                        f.write_str("a JSON object")
                    }
                    fn visit_map<A: $crate::config::__serde::de::MapAccess<'de>>(
                        self,
                        map: A,
                    ) -> ::core::result::Result<$ty, A::Error> {
                        // The inherent, derived function (remote = "Self"), not this trait method.
                        $ty::deserialize(
                            $crate::config::__serde::de::value::MapAccessDeserializer::new(map),
                        )
                    }
                }
                d.deserialize_map(ObjectVisitor)
            }
        }
    )*};
}

/// Implements `Deserialize` for unit enums that take a JSON string only, with `expecting` as
/// the description in type errors (`invalid type: map, expected a region kind: ...`).
///
/// serde's derived unit-enum deserializers also take `{"variant": null}`; a config has one
/// form for each value, so its names derive with `#[serde(remote = "Self")]` and this impl
/// admits a string before handing over to the derived function, whose message names the
/// variants (`` unknown variant `io`, expected `reserved` or `msi` ``).
///
/// Every type named MUST derive `Deserialize` with `#[serde(remote = "Self")]`: without it the
/// impl's call to `Type::deserialize` is the impl itself. Public for a VMM's own config, as
/// [`deserialize_from_object_only!`](crate::config::deserialize_from_object_only) is.
#[doc(hidden)]
#[macro_export]
macro_rules! __deserialize_from_string_only {
    ($($ty:ident => $expecting:literal),* $(,)?) => {$(
        impl<'de> $crate::config::__serde::Deserialize<'de> for $ty {
            fn deserialize<D: $crate::config::__serde::Deserializer<'de>>(
                d: D,
            ) -> ::core::result::Result<Self, D::Error> {
                struct NameVisitor;
                impl<'de> $crate::config::__serde::de::Visitor<'de> for NameVisitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut ::core::fmt::Formatter) -> ::core::fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: $crate::config::__serde::de::Error>(
                        self,
                        v: &str,
                    ) -> ::core::result::Result<$ty, E> {
                        // The inherent, derived function (remote = "Self"), not this trait method.
                        $ty::deserialize($crate::config::__serde::de::value::StrDeserializer::<E>::new(v))
                    }
                }
                d.deserialize_str(NameVisitor)
            }
        }
    )*};
}

/// Deserializes `s` as `T`, turning serde errors into [`ConfigError::Invalid`] at a JSON path
/// that starts with `prefix`: `prefix` is where `T` sits in the document, `""` for a whole
/// document (whose top level is then `(root)`).
///
/// An empty text and trailing characters after the value are errors at `prefix` (or `(root)`);
/// a leading byte-order mark is skipped. Type errors name the JSON path and drop serde's line
/// and column, which only repeat it; syntax errors keep them.
///
/// Public so that a VMM whose own config file embeds the `iommu` section reads the whole file
/// with the errors, and error paths, that [`IommuConfig::from_json_str`](super::IommuConfig::from_json_str)
/// gives for the section alone.
pub fn parse_json<T: serde::de::DeserializeOwned>(s: &str, prefix: &str) -> Result<T, ConfigError> {
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

pub(super) fn de_addr<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
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

pub(super) fn de_page_size_mask<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(MaskVisitor)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::test_support::{assert_err, iommu_err, iommu_ok, path_and_rule};
    use super::super::{AddrRange, IommuConfig};
    use super::*;

    /// Parses `json` as a whole document (prefix `""`) that must fail, returning (path, rule).
    fn root_err(json: &str) -> (String, String) {
        path_and_rule(parse_json::<IommuConfig>(json, "").unwrap_err())
    }

    // ---- syntax, types and unknown fields ----

    #[test]
    fn empty_file_and_byte_order_mark_get_plain_answers() {
        assert_err(root_err("  \n"), "(root)", "the config is empty");
        assert_err(iommu_err(""), "iommu", "the config is empty");
        let i = iommu_ok("\u{feff}{\"probe_size\": 64}");
        assert_eq!(i.probe_size, 64);
    }

    #[test]
    fn a_quoted_number_says_to_drop_the_quotes() {
        let e = IommuConfig::from_json_str(r#"{"probe_size": "256"}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "iommu.probe_size: expected a whole number, got the string \"256\": write it without quotes"
        );
    }

    #[test]
    fn syntax_error_keeps_line_and_column() {
        let (path, rule) = iommu_err("{\n  \"limits\": {\"max_domains\": 1,}\n}");
        assert_eq!(path, "iommu.limits");
        assert!(rule.contains("line 2"), "{rule}");
    }

    #[test]
    fn trailing_characters_are_rejected_at_root() {
        assert_err(root_err("{} x"), "(root)", "trailing characters");
        assert_err(iommu_err("{} x"), "iommu", "trailing characters");
    }

    #[test]
    fn top_level_type_error_is_at_root() {
        assert_err(
            root_err("[]"),
            "(root)",
            "invalid type: sequence, expected a JSON object",
        );
        assert_err(root_err("5"), "(root)", "expected a JSON object");
    }

    #[test]
    fn objects_given_as_arrays_are_rejected() {
        assert_err(
            iommu_err(r#"{"input_range": [0, 4095]}"#),
            "iommu.input_range",
            "invalid type: sequence, expected a JSON object",
        );
        assert_err(
            iommu_err(r#"{"limits": [1, 2, 3, 4]}"#),
            "iommu.limits",
            "expected a JSON object",
        );
        assert_err(
            iommu_err(r#"{"reserved_regions": [[0, 1, "msi"]]}"#),
            "iommu.reserved_regions[0]",
            "expected a JSON object",
        );
    }

    #[test]
    fn enum_values_given_as_objects_are_rejected() {
        assert_err(
            iommu_err(r#"{"nested": {"formats": [3], "pasid_bits": 8}}"#),
            "iommu.nested.formats[0]",
            "expected a table format",
        );
        assert_err(
            iommu_err(r#"{"reserved_regions": [{"start": 0, "end": 1, "kind": {"msi": null}}]}"#),
            "iommu.reserved_regions[0].kind",
            "invalid type: map, expected a region kind: \"reserved\" or \"msi\"",
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
    fn any_prefix_leads_every_path() {
        let e = parse_json::<IommuConfig>(r#"{"limits": {"max_domainz": 1}}"#, "vmm.iommu");
        assert_err(
            path_and_rule(e.unwrap_err()),
            "vmm.iommu.limits.max_domainz",
            "unknown field",
        );
        let e = parse_json::<IommuConfig>("[]", "vmm.iommu");
        assert_err(
            path_and_rule(e.unwrap_err()),
            "vmm.iommu",
            "expected a JSON object",
        );
    }

    #[test]
    fn type_error_in_array_element_names_the_index() {
        let json = r#"{"reserved_regions": [
            {"start": 0, "end": 1, "kind": "reserved"},
            {"start": true, "end": 1, "kind": "msi"}]}"#;
        assert_err(
            iommu_err(json),
            "iommu.reserved_regions[1].start",
            "invalid type: boolean `true`, expected an address",
        );
    }

    #[test]
    fn missing_required_field_names_the_object() {
        assert_err(
            iommu_err(r#"{"input_range": {"start": 0}}"#),
            "iommu.input_range",
            "missing field `end`",
        );
        assert_err(
            iommu_err(r#"{"nested": {"formats": ["x86-64"]}}"#),
            "iommu.nested",
            "missing field `pasid_bits`",
        );
    }

    #[test]
    fn unknown_enum_values_are_rejected_with_path() {
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
            (r#"{"pagesize": 1}"#, "iommu.pagesize"),
            (
                r#"{"input_range": {"start": 0, "end": 4095, "len": 1}}"#,
                "iommu.input_range.len",
            ),
            (
                r#"{"domain_range": {"start": 0, "end": 1, "x": 1}}"#,
                "iommu.domain_range.x",
            ),
            (
                r#"{"nested": {"formats": ["arm-lpae"], "pasid_bits": 1, "levels": 4}}"#,
                "iommu.nested.levels",
            ),
            (
                r#"{"reserved_regions": [{"start": 0, "end": 1, "kind": "msi", "size": 2}]}"#,
                "iommu.reserved_regions[0].size",
            ),
            (
                r#"{"limits": {"max_domainz": 1}}"#,
                "iommu.limits.max_domainz",
            ),
        ];
        for (json, path) in cases {
            assert_err(iommu_err(json), path, "unknown field");
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
