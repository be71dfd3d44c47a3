#!/usr/bin/env bash
# What an embedder meets: every example of the workspace builds and runs
# (vmm-iommu's emulated_device, vfio-passthrough's assigned_device over the
# recording host), and tests/embedder, a crate outside the workspace (its
# own workspace and lockfile) written from the README and the rustdoc,
# builds, passes rustfmt and clippy, and runs against vmm-iommu by path.
# Each program exits non-zero if anything did not behave; so does this.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-$PWD/target}
embedder=tests/embedder/Cargo.toml

echo "== cargo build --examples"
cargo build --workspace --examples --locked
echo "== example emulated_device"
cargo run -q -p vmm-iommu --example emulated_device --locked
echo "== example assigned_device (recording host)"
cargo run -q -p vfio-passthrough --example assigned_device --locked

echo "== tests/embedder"
# Its own lockfile: cargo updates it if vmm-iommu's dependencies moved, as
# it would for a crate outside this repository; commit the change.
cargo fmt --manifest-path "$embedder" -- --check
CARGO_TARGET_DIR="$target/embedder" cargo clippy --manifest-path "$embedder" -- -D warnings
CARGO_TARGET_DIR="$target/embedder" cargo run -q --manifest-path "$embedder"
if ! git diff --quiet -- tests/embedder/Cargo.lock 2>/dev/null; then
    echo "note: tests/embedder/Cargo.lock changed; commit it"
fi
echo "embedder-check: passed"
