//! Builds the guest test program from `guest/` with the compiler that builds
//! this crate: a `no_std`, `no_main` static ELF for the host target, linked
//! at the address the VMM loads it (see `guest/guest.ld`), written to
//! `$OUT_DIR/guest.elf` for `include_bytes!`.
//!
//! Only the host target is needed: the guest runs in 64-bit mode with no OS
//! below it, so it uses nothing of the target but the instruction set and
//! the calling convention, and brings its own `memcpy` & co.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest.join("guest");
    // A directory is scanned recursively for changes.
    println!("cargo:rerun-if-changed={}", guest.display());
    println!("cargo:rerun-if-env-changed=RUSTC");

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let elf = out.join("guest.elf");
    let script = guest.join("guest.ld");
    let result = Command::new(&rustc)
        .arg("--edition=2021")
        .args(["--crate-type", "bin", "--crate-name", "viommu_guest"])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args(["-C", "panic=abort"])
        .args(["-C", "opt-level=2"])
        .args(["-C", "debuginfo=0"])
        .args(["-C", "relocation-model=static"])
        .args(["-C", "target-feature=+crt-static"])
        .args(["-C", "link-arg=-nostartfiles"])
        .args(["-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static"])
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .args(["-C", "link-arg=-Wl,--gc-sections"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", script.display()))
        .arg("-o")
        .arg(&elf)
        .arg(guest.join("main.rs"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {rustc:?} to build the guest: {e}"));
    if !result.status.success() {
        panic!(
            "building the guest program failed ({}):\n{}{}",
            result.status,
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    // Warnings of the guest build would otherwise be lost.
    for line in String::from_utf8_lossy(&result.stderr).lines() {
        if !line.trim().is_empty() {
            println!("cargo:warning=guest: {line}");
        }
    }
}
