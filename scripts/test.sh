#!/usr/bin/env bash
# Runs every check and test of the workspace: formatting, clippy and rustdoc (warnings
# are errors), the whole test suite, then the suites that need more than
# cargo: the examples and an outside crate (scripts/embedder-check.sh), the
# stock Linux guest driving the vIOMMU (scripts/linux-guest.sh) and the VFIO
# backends against a real kernel (scripts/vfio-l1.sh) and a short fuzzing
# pass (scripts/fuzz-smoke.sh). Each can be skipped (VMM_IOMMU_SKIP_EMBEDDER
# / _LINUX / _VFIO_L1 / _FUZZ=1), which the summary counts as skipped.
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (rustup) first" >&2
    exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# A full run builds three cargo targets (workspace, fuzz, embedder) and
# two L1 images: say how much room there is, so a "No space left on
# device" from the linker reads as what it is.
echo "== disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free under $(pwd)"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The libraries as an embedder builds them: without the features the
# workspace's tests switch on (test-utils), where dead code would hide.
cargo clippy -p vmm-iommu -p vfio-passthrough --lib --locked -- -D warnings
echo "== cargo doc (every intra-doc link resolves)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items --locked -q
mkdir -p target
echo "== cargo test"
cargo test --workspace --locked 2>&1 | tee target/test-output.txt
passed=$(grep -Eo '[0-9]+ passed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
# A test that could not run (no /dev/kvm) returns early, which the harness
# counts as passed; it says so on a `SKIPPED:` line: count it as skipped.
skipped=$(grep -c '^SKIPPED:' target/test-output.txt || true)
passed=$((passed - skipped))

# The suites beyond cargo test, each a script with its own closing line
# `NAME: N passed, M failed` (or, for one that checks a single thing,
# `NAME: passed`). VMM_IOMMU_SKIP_<NAME>=1 skips one, counted as skipped.
run_suite() {
    local name=$1 skip_var=$2
    shift 2
    echo "== ${name} ($*)"
    if [ "${!skip_var:-0}" = 1 ]; then
        echo "${name}: SKIPPED (${skip_var}=1)"
        skipped=$((skipped + 1))
        return
    fi
    local rc=0 out="target/${name}-output.txt"
    "$@" 2>&1 | tee "$out" || rc=$?
    local line
    line=$(grep -E "^${name}: [0-9]+ passed, [0-9]+ failed" "$out" | tail -1 || true)
    if [ -n "$line" ]; then
        passed=$((passed + $(echo "$line" | grep -Eo '[0-9]+ passed' | grep -Eo '[0-9]+')))
        failed=$((failed + $(echo "$line" | grep -Eo '[0-9]+ failed' | grep -Eo '[0-9]+')))
    elif [ "$rc" -eq 0 ] && grep -qx "${name}: passed" "$out"; then
        passed=$((passed + 1))
    else
        echo "${name}: no closing line (exit status $rc)"
        failed=$((failed + 1))
    fi
    if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
        failed=1
    fi
}

# Examples and an outside crate built from the README and rustdoc.
run_suite embedder-check VMM_IOMMU_SKIP_EMBEDDER scripts/embedder-check.sh
# A stock Linux guest's own virtio-iommu driver against the device.
run_suite linux-guest VMM_IOMMU_SKIP_LINUX scripts/linux-guest.sh
# The VFIO backends against Linux's real VFIO and VT-d, with real DMA.
run_suite vfio-l1 VMM_IOMMU_SKIP_VFIO_L1 scripts/vfio-l1.sh
# Every fuzz target for a short pass (checking invariants, not only "no
# panic"), and its saved corpus replayed.
run_suite fuzz-smoke VMM_IOMMU_SKIP_FUZZ scripts/fuzz-smoke.sh "${VMM_IOMMU_FUZZ_SECS:-20}"

# Print one summary line in the plain form CI reads.
echo "total: ${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ]
