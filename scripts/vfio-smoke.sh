#!/usr/bin/env bash
# Runs the real VFIO backends of vfio-passthrough against one device bound
# to vfio-pci: MAP/UNMAP through a type1 container, MAP/UNMAP through
# iommufd, and nested bind/invalidate/unbind where the host IOMMU nests.
#
#   scripts/vfio-smoke.sh 0000:65:00.0        (or a /sys/bus/pci/devices/... path)
#
# It runs the gated test vfio-passthrough/tests/hardware.rs with
# VMM_IOMMU_VFIO_DEVICE set, as root (VFIO needs it, or a user owning the
# group and /dev/iommu). Each part the host cannot do is skipped with a
# line saying why; anything that runs must pass. The device's DMA is
# pointed at scratch memory only.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 1 ]; then
    echo "usage: $0 <PCI address | sysfs path of a device bound to vfio-pci>" >&2
    exit 2
fi
dev=$1
case "$dev" in
    /sys/*) sysfs=$dev ;;
    *:*:*.*) sysfs=/sys/bus/pci/devices/$dev ;;
    *:*.*) sysfs=/sys/bus/pci/devices/0000:$dev ;;
    *) echo "not a PCI address or sysfs path: $dev" >&2; exit 2 ;;
esac

echo "== host"
scripts/check-host.sh | sed -n '/== VFIO/,$p'

echo "== device $sysfs"
if [ ! -e "$sysfs" ]; then
    echo "SKIPPED: $sysfs does not exist" >&2
    exit 1
fi
drv=$(basename "$(readlink "$sysfs/driver" 2>/dev/null)" 2>/dev/null || true)
if [ "$drv" != "vfio-pci" ]; then
    echo "SKIPPED: $sysfs is bound to '${drv:-nothing}', not vfio-pci." >&2
    echo "  bind it: echo vfio-pci > $sysfs/driver_override; echo $(basename "$sysfs") > /sys/bus/pci/drivers_probe" >&2
    exit 1
fi
[ -e /dev/vfio/vfio ] || echo "note: /dev/vfio/vfio missing: the type1 part will be SKIPPED"
[ -e /dev/iommu ] || echo "note: /dev/iommu missing: the iommufd and nested parts will be SKIPPED"
[ -d "$sysfs/vfio-dev" ] || echo "note: no VFIO cdev for the device: the iommufd and nested parts will be SKIPPED"

echo "== cargo test (hardware)"
VMM_IOMMU_VFIO_DEVICE=$sysfs cargo test -p vfio-passthrough --test hardware -- --nocapture
