#!/bin/sh
# /init of the L1 initramfs of scripts/vfio-l1.sh (QEMU TCG, q35 with
# intel-iommu and edu): mounts the pseudo file systems, loads the VFIO
# modules named in /etc/modules (in order; none for the built-in kernel),
# binds edu (1234:11e8) to vfio-pci, runs /bin/vfio-l1 for the backend named
# by `vfiol1.backend=` on the command line, prints the kernel's DMAR lines
# and powers off. Markers: L1-INIT, L1-DMAR, L1-EDU, L1-PROGRAM-START,
# L1-PROGRAM-END backend rc=N, L1-DONE.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
echo "L1-INIT uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m.ko" || echo "L1-ERROR insmod $m failed"
done </etc/modules
dmesg | grep -E 'DMAR' | sed 's/^/L1-DMAR /'
echo "L1-DMAR-END"
backend=$(sed -n 's/.*vfiol1\.backend=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
# The first edu DMAs; a second one, if QEMU has it, is the peer whose BAR
# the first reaches peer to peer.
edu=
peer=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1234:0x11e8" ]; then
        if [ -z "$edu" ]; then edu=$d; elif [ -z "$peer" ]; then peer=$d; fi
    fi
done
if [ -z "$edu" ]; then
    echo "L1-ERROR no edu device (1234:11e8) on the PCI bus"
else
    group=$(basename "$(readlink "$edu/iommu_group")")
    echo "L1-EDU $(basename "$edu") group=${group} group_type=$(cat "/sys/kernel/iommu_groups/$group/type") group_devices=$(cd "/sys/kernel/iommu_groups/$group/devices" && echo *)"
    echo 1234 11e8 >/sys/bus/pci/drivers/vfio-pci/new_id
    i=0
    while [ ! -e "$edu/driver" ] && [ $i -lt 50 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    echo "L1-EDU driver=$(basename "$(readlink "$edu/driver")") /dev/vfio: $(cd /dev/vfio && echo *) cdev: $(cd "$edu/vfio-dev" 2>/dev/null && echo *) /dev/iommu: $([ -c /dev/iommu ] && echo yes || echo no)"
    echo "L1-EDU reserved_regions: $(tr '\n' ';' <"/sys/kernel/iommu_groups/$group/reserved_regions")"
    echo "L1-PROGRAM-START ${backend}"
    if [ -n "$peer" ]; then
        /bin/vfio-l1 --backend "$backend" --device "$edu" --peer "$peer"
    else
        /bin/vfio-l1 --backend "$backend" --device "$edu"
    fi
    echo "L1-PROGRAM-END ${backend} rc=$?"
fi
echo "L1-DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
