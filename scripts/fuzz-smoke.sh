#!/usr/bin/env bash
# A short fuzzing pass over every cargo-fuzz target in fuzz/, then a replay
# of the saved corpus as plain test inputs.
#   scripts/fuzz-smoke.sh           30 s per target
#   scripts/fuzz-smoke.sh 120       120 s per target
# Installs what it needs: the nightly toolchain (minimal profile) and
# cargo-fuzz. New inputs found during the pass go to a scratch directory,
# never into fuzz/corpus/ (the saved corpus only changes by commit).
# Prints one line per target with runs and runs per second; exits non-zero
# if any target fails (a crash, a failed check, a timeout) or a saved input
# fails on replay. CARGO_TARGET_DIR is honoured (default fuzz/target).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-30}"
case "$secs" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS]  (a whole number of seconds per target)" >&2; exit 2 ;;
esac

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz-smoke: installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets=(requests walk config)
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

cd fuzz
echo "fuzz-smoke: building ${targets[*]}"
cargo +nightly fuzz build -O >/dev/null 2>"$scratch/build.log" || {
    cat "$scratch/build.log" >&2
    echo "fuzz-smoke: build failed" >&2
    exit 1
}

failed=0
passes=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "$scratch/$t"
    log="$scratch/$t.log"
    # Fuzz, starting from the saved corpus; new inputs go to scratch.
    if cargo +nightly fuzz run -O "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
        >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        runs=${runs:-0}
        echo "fuzz-smoke: $t: ok, $runs runs in ${secs} s ($((runs / (secs > 0 ? secs : 1))) runs/s)"
        passes=$((passes + 1))
    else
        failed=$((failed + 1))
        echo "fuzz-smoke: $t: FAILED (log follows; the crashing input is under fuzz/artifacts/$t/)"
        tail -40 "$log"
    fi
    # Replay every saved input once.
    n=$(find "corpus/$t" -type f | wc -l)
    if cargo +nightly fuzz run -O "$t" "corpus/$t" -- -runs=0 >"$log.replay" 2>&1; then
        echo "fuzz-smoke: $t: corpus replay ok ($n inputs)"
        passes=$((passes + 1))
    else
        failed=$((failed + 1))
        echo "fuzz-smoke: $t: corpus replay FAILED"
        tail -40 "$log.replay"
    fi
done
echo "fuzz-smoke: ${passes} passed, ${failed} failed"
[ "$failed" -eq 0 ]
