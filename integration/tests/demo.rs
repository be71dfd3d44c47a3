//! End to end: the README's main job on every shipped config, and a bad
//! config rejected with the JSON path of the mistake.

use std::path::Path;
use std::process::Command;

use integration::demo::run_demo;
use vmm_iommu::config::VmConfig;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn demo_passes_every_check_on_every_shipped_config() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("resources")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let cfg = VmConfig::from_file(&path).unwrap();
        let mut out = Vec::new();
        let report = run_demo(&cfg, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            report.checks > 10,
            "{}: too few checks\n{text}",
            path.display()
        );
        assert_eq!(report.failed, 0, "{}:\n{text}", path.display());
        seen += 1;
    }
    assert!(seen >= 2, "expected the shipped configs in resources/");
}

#[test]
fn demo_binary_prints_the_session_and_succeeds() {
    let out = Command::new(env!("CARGO_BIN_EXE_viommu-vm"))
        .arg(repo().join("resources/vm.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ATTACH endpoint=8 domain=1"), "{stdout}");
    assert!(stdout.contains("eventq: fault reason=MAPPING"), "{stdout}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

#[test]
fn demo_binary_rejects_a_bad_config_naming_the_json_path() {
    let dir = std::env::temp_dir().join(format!("viommu-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{ "iommu": { "input_range": { "start": "0x2000", "end": "0x1000" } } }"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_viommu-vm"))
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("iommu.input_range"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
