#!/usr/bin/env bash
# Runs the peer-stream benchmark (docs/BENCH.md): the figures of the
# cloud-hypervisor and crosvm peers beside ours, medians of 7 runs of 1 s.
# Arguments go to the benchmark: --quick (3 runs of 0.2 s), --runs N,
# --secs S, and section names (memory, device, state, translate).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo bench -p vmm-iommu --bench peer_stream -- "$@"
