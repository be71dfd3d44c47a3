#!/usr/bin/env bash
# Runs every check and test of the workspace: formatting, clippy (warnings
# are errors), the whole test suite, then the stock Linux guest driving the
# vIOMMU (scripts/linux-guest.sh; VMM_IOMMU_SKIP_LINUX=1 skips it, and the
# summary counts it as skipped). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (rustup) first" >&2
    exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
mkdir -p target
echo "== cargo test"
cargo test --workspace --locked 2>&1 | tee target/test-output.txt
passed=$(grep -Eo '[0-9]+ passed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
# A test that could not run (no /dev/kvm) returns early, which the harness
# counts as passed; it says so on a `SKIPPED:` line: count it as skipped.
skipped=$(grep -c '^SKIPPED:' target/test-output.txt || true)
passed=$((passed - skipped))

echo "== Linux guest (scripts/linux-guest.sh)"
if [ "${VMM_IOMMU_SKIP_LINUX:-0}" = 1 ]; then
    echo "linux-guest: SKIPPED (VMM_IOMMU_SKIP_LINUX=1)"
    skipped=$((skipped + 1))
else
    rc=0
    scripts/linux-guest.sh 2>&1 | tee target/linux-guest-output.txt || rc=$?
    line=$(grep -E '^linux-guest: [0-9]+ passed, [0-9]+ failed' target/linux-guest-output.txt | tail -1 || true)
    if [ -z "$line" ]; then
        echo "linux-guest: no closing line (exit status $rc)"
        failed=$((failed + 1))
    else
        passed=$((passed + $(echo "$line" | grep -Eo '[0-9]+ passed' | grep -Eo '[0-9]+')))
        failed=$((failed + $(echo "$line" | grep -Eo '[0-9]+ failed' | grep -Eo '[0-9]+')))
    fi
    [ "$rc" -eq 0 ] || failed=$((failed > 0 ? failed : 1))
fi

# Print one summary line in the plain form CI reads.
echo "total: ${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$failed" -eq 0 ]
