# Sourced by the suite scripts (linux-guest.sh, vfio-l1.sh) after they set
# SUITE to their name: the pass/fail counters, the closing summary line
# that scripts/test.sh reads ("SUITE: N passed, M failed"), a summary that
# counts an abort as a failure, and the say/die/elapsed helpers.
# shellcheck shell=bash
T_START=$(date +%s)

PASSED=0
FAILED=0
SUMMARY_DONE=0
summary() {
    SUMMARY_DONE=1
    echo "${SUITE}: ${PASSED} passed, ${FAILED} failed"
}
on_exit() {
    local rc=$?
    if [ "$SUMMARY_DONE" = 0 ]; then
        echo "${SUITE}: aborted (exit status ${rc}) before the checks could finish" >&2
        [ "$FAILED" -gt 0 ] || FAILED=1
        summary
        [ "$rc" -ne 0 ] || rc=1
    fi
    exit "$rc"
}
trap on_exit EXIT
say() { echo "${SUITE}: $*"; }
die() {
    echo "${SUITE}: FATAL: $*" >&2
    exit 1
}
elapsed() { echo $(($(date +%s) - T_START)); }
