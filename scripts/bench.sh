#!/usr/bin/env bash
# Prints the figures the issues ask for.
#   scripts/bench.sh            everything (about 3 minutes)
#   scripts/bench.sh --quick    a fast pass of everything
#   scripts/bench.sh peer       one part: peer | device | state | threads | dma | index
#                               | walk | nested | lowering
# peer:     the peer request stream (docs/BENCH.md) beside the cloud-hypervisor
#           and crosvm figures, labelled with where and when they were
#           measured: pairs/s, heap per mapping, translations (peer includes
#           device, state, threads, dma and index)
# device:   MAP+UNMAP pairs through a 256-entry request queue, each
#           notification an eventfd kick served by a device thread, at
#           N = 0, 10,000, 100,000 and 1,000,000 resident mappings, and the
#           flatness N = 1,000,000 / N = 0 (issue 14 part 3)
# state:    the same pairs applied to the state model, beside a plain
#           BTreeMap mapper in the same run
# threads:  two Translator threads against one while a third thread applies
#           MAP+UNMAP pairs, beside the machine's own two-thread scaling;
#           every translation checked, and none may succeed after its
#           UNMAP returned
# dma:      an emulated device's memory access through the vIOMMU (issue 14
#           part 1): read_obj hot and random over 10,000 mappings, 4 KiB
#           copies (also with each next page prefetched, as a device that has
#           read its descriptor chain can); DmaMemory and IommuMemory beside
#           plain GuestMemoryMmap and the Translator alone, as same-run ratios
# index:    random translation over 1,000,000 mappings beside a plain
#           BTreeMap<u64, _> lookup over the same mappings (issue 14 part 2)
# walk:     stage-1 walk latency per format, from the root and from the
#           paging-structure cache
# nested:   the software nested IOMMU (front-TLB hit, IOTLB hit, warm and cold
#           walk) and invalidation bursts of 1 / 64 / 4,096 pages with the
#           number of backend calls each took
# lowering: a 4,096-entry invalidation burst lowered to VT-d and SMMUv3 entries
#           (ns per entry) and the kernel calls it takes
set -euo pipefail
cd "$(dirname "$0")/.."

quick=()
parts=()
for a in "$@"; do
    case "$a" in
        --quick) quick=(--quick) ;;
        *) parts+=("$a") ;;
    esac
done
[ ${#parts[@]} -eq 0 ] && parts=(peer walk nested lowering)

for p in "${parts[@]}"; do
    echo "=== $p ==="
    case "$p" in
        peer) cargo bench -q -p vmm-iommu --bench peer_stream -- "${quick[@]}" ;;
        device|state|threads|dma|index) cargo bench -q -p vmm-iommu --bench peer_stream -- "${quick[@]}" "$p" ;;
        walk) cargo bench -q -p vmm-iommu --bench walk -- "${quick[@]}" ;;
        nested) cargo bench -q -p vmm-iommu --bench nested -- "${quick[@]}" 2>&1 | grep -vE '^(Benchmarking|Warming|Collecting|Analyzing)|^\s*$|change:|No change|Change within|Performance has' ;;
        lowering) cargo bench -q -p vfio-passthrough --bench lowering -- "${quick[@]}" 2>&1 | grep -vE '^(Benchmarking|Warming|Collecting|Analyzing)|^\s*$|change:|No change|Change within|Performance has' ;;
        *) echo "unknown part $p (peer | device | state | threads | dma | index | walk | nested | lowering)" >&2; exit 2 ;;
    esac
done
