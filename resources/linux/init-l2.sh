#!/bin/sh
# /init of the L2 Linux guest of scripts/linux-guest.sh (busybox only).
#
# Loads the virtio transport, then virtio_iommu, then virtio_blk and
# virtio_rng (modules decompressed into /lib/modules, load order in
# /etc/vmmtest/modules as "GROUP MODULE" lines), runs the checks of the
# case named by `vmmtest.case=` on the command line against that case's
# config (/etc/vmmtest/CASE.json), and powers off. Prints:
#   L2-INIT CASE uptime=S kernel=VERSION
#   L2-CHECK CASE.NAME: PASS|FAIL|SKIP DETAIL     one line per check
#   L2-LOG LINE                                   kernel lines about the IOMMU
#   L2-FIG CASE boot_s=S write_MBps=N read_MBps=N qd1_4k_iops=N
#   L2-DONE CASE passed=N failed=N
# `vmmtest.standin=1`: the devices are QEMU's own (virtio-pci, QEMU's
# virtio-iommu-pci) instead of linux-vm's; the test hook is skipped and the
# reserved regions expected are QEMU's.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
BOOT_S=$(cut -d' ' -f1 /proc/uptime)

arg() {
    # shellcheck disable=SC2013 # words, not lines
    for w in $(cat /proc/cmdline); do
        case $w in "$1="*)
            echo "${w#*=}"
            return
            ;;
        esac
    done
}
CASE=$(arg vmmtest.case)
CASE=${CASE:-none}
STANDIN=$(arg vmmtest.standin)
CONF=/etc/vmmtest/$CASE.json
echo "L2-INIT $CASE uptime=$BOOT_S kernel=$(uname -r)"

NPASS=0
NFAIL=0
pass() {
    NPASS=$((NPASS + 1))
    echo "L2-CHECK $CASE.$1: PASS $2"
}
fail() {
    NFAIL=$((NFAIL + 1))
    echo "L2-CHECK $CASE.$1: FAIL $2"
}
skip() { echo "L2-CHECK $CASE.$1: SKIP $2"; }
ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
# wait_for SECONDS COMMAND...: polls COMMAND every 100 ms.
wait_for() {
    n=$(($1 * 10))
    shift
    while [ "$n" -gt 0 ]; do
        "$@" && return 0
        sleep 0.1
        n=$((n - 1))
    done
    "$@"
}
load() {
    awk -v g="$1" '$1 == g { print $2 }' /etc/vmmtest/modules | while read -r m; do
        [ -d "/sys/module/$m" ] || insmod "/lib/modules/$m.ko" || echo "L2-WARN insmod $m failed"
    done
}
finish() {
    echo "L2-DONE $CASE passed=$NPASS failed=$NFAIL"
    sync
    poweroff -f
    sleep 10
}
[ -f "$CONF" ] || {
    fail config "no $CONF (vmmtest.case=$CASE)"
    finish
}

# ---- modules: transport, IOMMU, endpoints
load mmio
if grep -qs 0x1af4 /sys/bus/pci/devices/*/vendor; then load pci; fi
load iommu
has_iommu() { [ -n "$(ls /sys/class/iommu 2>/dev/null)" ]; }
wait_for 5 has_iommu
load blk
load rng

# ---- the driver probed our device
if [ "$CASE" != off ]; then
    if has_iommu; then
        pass viommu_probed "($(find /sys/class/iommu -mindepth 1 -maxdepth 1 -printf '%f ')$(dmesg | grep -m1 -o 'page mask: .*'))"
    else
        fail viommu_probed "(nothing in /sys/class/iommu)"
    fi
fi
have_vda() { [ -b /dev/vda ]; }
wait_for 10 have_vda
rng_ready() { grep -q virtio /sys/class/misc/hw_random/rng_current 2>/dev/null; }
wait_for 5 rng_ready

# ep_group DRIVER: the IOMMU group directory of the device DRIVER drives
# (the virtio device's parent, the transport device, is the endpoint).
ep_group() {
    for v in /sys/bus/virtio/drivers/"$1"/virtio*; do
        [ -e "$v" ] || continue
        p=$(readlink -f "$v/..")
        [ -e "$p/iommu_group" ] && readlink -f "$p/iommu_group"
        return 0
    done
}
# expected_resv ID: the reserved regions of device ID's group: the
# device-wide ones (region lines of the config outside a device entry)
# and the device's own (its entry is one line in the case configs, which
# may continue onto the next line with its "reserved_regions").
expected_resv() {
    if [ "$STANDIN" = 1 ]; then
        # QEMU's virtio-iommu on x86 reports the APIC MSI window.
        echo "0x00000000fee00000 0x00000000feefffff msi"
        return
    fi
    region='"start": *"0x[0-9a-fA-F]*", *"end": *"0x[0-9a-fA-F]*", *"kind": *"[a-z]*"'
    {
        grep -v -e '"id":' -e '^ *"reserved_regions": *\[ *{' "$CONF" | grep -o "$region"
        grep -A1 "\"id\": *\"$1\"" "$CONF" | grep -o "$region"
    } | sed 's/"start": *"\(0x[0-9a-fA-F]*\)", *"end": *"\(0x[0-9a-fA-F]*\)", *"kind": *"\([a-z]*\)"/\1 \2 \3/' |
        while read -r s e k; do printf '0x%016x 0x%016x %s\n' "$s" "$e" "$k"; done
    # Without an MSI region from the device, the driver adds its own
    # software-mapped one (MSI_IOVA_BASE, MSI_IOVA_LENGTH).
    grep -q '"kind": *"msi"' "$CONF" || echo "0x0000000008000000 0x00000000080fffff msi"
}

# ---- groups, their type and reserved regions
case $CASE in
strict | fault | range) want_type=DMA ;;
lazy) want_type=DMA-FQ ;;
identity | identity-map) want_type=identity ;;
*) want_type= ;;
esac
for ep in blk:virtio_blk rng:virtio_rng; do
    name=${ep%%:*}
    drv=${ep#*:}
    expected_resv "${name}0" | sort >/tmp/resv.want
    g=$(ep_group "$drv")
    if [ ! -d "/sys/bus/virtio/drivers/$drv" ] || [ -z "$(ls -d /sys/bus/virtio/drivers/"$drv"/virtio* 2>/dev/null)" ]; then
        fail "${name}_bound" "(no device bound to $drv)"
        continue
    fi
    if [ "$CASE" = off ] && [ "$STANDIN" = 1 ]; then
        skip "${name}_no_iommu_group" "(stand-in: QEMU's virtio-iommu-pci groups every PCI device)"
        continue
    elif [ "$CASE" = off ]; then
        if [ -z "$g" ]; then pass "${name}_no_iommu_group" "(not behind the vIOMMU)"; else fail "${name}_no_iommu_group" "(in $g)"; fi
        continue
    fi
    [ -n "$want_type" ] || {
        echo "L2-INFO $name group: ${g:-none} type=$(cat "$g/type" 2>/dev/null)"
        continue
    }
    if [ -z "$g" ]; then
        fail "${name}_group" "(no IOMMU group)"
        continue
    fi
    t=$(cat "$g/type" 2>/dev/null)
    if [ "$t" = "$want_type" ]; then pass "${name}_group_type" "(${g##*/} $t)"; else fail "${name}_group_type" "(${g##*/} type=$t, want $want_type)"; fi
    sort "$g/reserved_regions" >/tmp/resv.got
    if cmp -s /tmp/resv.want /tmp/resv.got; then
        pass "${name}_reserved_regions" "($(tr '\n' ';' </tmp/resv.got))"
    else
        fail "${name}_reserved_regions" "(got $(tr '\n' ';' </tmp/resv.got) want $(tr '\n' ';' </tmp/resv.want))"
    fi
done

# ---- I/O: 16 MiB O_DIRECT write + read back, 4 KiB from /dev/hwrng
W_MS=
R_MS=
IOPS=
disk_io() {
    if ! have_vda; then
        fail disk_rw_16MiB "(no /dev/vda)"
        return
    fi
    dd if=/dev/urandom of=/tmp/pattern bs=1M count=16 2>/dev/null
    t0=$(ms)
    timeout 60 dd if=/tmp/pattern of=/dev/vda bs=1M count=16 oflag=direct conv=fsync 2>/tmp/dd.err
    rw=$?
    t1=$(ms)
    timeout 60 dd if=/dev/vda of=/tmp/readback bs=1M count=16 iflag=direct 2>>/tmp/dd.err
    rr=$?
    t2=$(ms)
    if [ $rw = 0 ] && [ $rr = 0 ] && cmp -s /tmp/pattern /tmp/readback; then
        W_MS=$((t1 - t0))
        R_MS=$((t2 - t1))
        pass disk_rw_16MiB "(O_DIRECT write ${W_MS} ms, read ${R_MS} ms, $(md5sum </tmp/readback | cut -c1-12))"
    else
        fail disk_rw_16MiB "(write rc=$rw read rc=$rr, $(cmp /tmp/pattern /tmp/readback 2>&1 | head -1); $(tr '\n' ' ' </tmp/dd.err | tail -c 200))"
        return
    fi
    # QD1 4 KiB O_DIRECT reads in one process (the RAM-backed disk has no
    # seek cost, so the offsets need not be random).
    t0=$(ms)
    if timeout 60 dd if=/dev/vda of=/dev/null bs=4k count=2048 iflag=direct 2>/dev/null; then
        t1=$(ms)
        [ $((t1 - t0)) -gt 0 ] && IOPS=$((2048 * 1000 / (t1 - t0)))
    fi
    rm -f /tmp/pattern /tmp/readback
}
hwrng_io() {
    if timeout 30 dd if=/dev/hwrng of=/tmp/rng bs=4096 count=1 iflag=fullblock 2>/dev/null &&
        [ "$(wc -c </tmp/rng)" -eq 4096 ] && od -An -tx1 /tmp/rng | grep -q '[1-9a-f]'; then
        pass hwrng_4KiB "($(cat /sys/class/misc/hw_random/rng_current): $(od -An -tx1 -N8 /tmp/rng | tr -d ' '))"
    else
        fail hwrng_4KiB "(rng_current=$(cat /sys/class/misc/hw_random/rng_current 2>&1), got $(wc -c </tmp/rng 2>/dev/null || echo 0) bytes)"
    fi
}

case $CASE in
off | strict | lazy | identity | identity-map | range | granule64k)
    disk_io
    hwrng_io
    ;;
esac

# ---- per-case checks
dmesg_has() { dmesg | grep -q "$1"; }
case $CASE in
fault)
    if [ "$STANDIN" = 1 ]; then
        skip fault_reported "(stand-in: no test hook)"
    elif [ ! -c /dev/port ]; then
        fail fault_reported "(no /dev/port)"
    else
        # Endpoint 8 as 4 little-endian bytes to ports 0x610..0x613 (/dev/port
        # writes byte by byte).
        printf '\010\000\000\000' | dd of=/dev/port bs=1 seek=1552 count=4 conv=notrunc 2>/dev/null
        if wait_for 5 dmesg_has 'fault from EP 8 at 0xdeadb000'; then
            pass fault_reported "($(dmesg | grep -m1 'fault from EP 8 at 0xdeadb000' | sed 's/^\[[^]]*\] //'))"
        else
            fail fault_reported "(no 'fault from EP 8 at 0xdeadb000' in dmesg; $(dmesg | grep ' fault' | tail -2 | tr '\n' ' '))"
        fi
    fi
    # The endpoint still works after its stray access.
    if have_vda && timeout 30 dd if=/dev/vda of=/dev/null bs=64k count=16 iflag=direct 2>/dev/null; then
        pass disk_read_after_fault "(1 MiB O_DIRECT)"
    else
        fail disk_read_after_fault "(reading /dev/vda failed)"
    fi
    ;;
granule64k)
    if dmesg_has 'granule 0x10000 larger than system page size 0x1000'; then
        pass granule_refused "($(dmesg | grep -m1 'granule 0x10000' | sed 's/^\[[^]]*\] //'))"
    else
        fail granule_refused "(no 'granule 0x10000 larger than system page size 0x1000' in dmesg)"
    fi
    ;;
esac

# ---- what Linux said about the IOMMU
dmesg | grep -iE 'virtio_iommu|iommu group|iommu:|viot| fault|granule|WARNING:.*iommu' | grep -v 'Command line' | head -40 |
    sed 's/^\[[^]]*\] //; s/^/L2-LOG /'
awk -v c="$CASE" -v b="$BOOT_S" -v w="$W_MS" -v r="$R_MS" -v i="$IOPS" 'BEGIN {
    printf "L2-FIG %s boot_s=%s", c, b
    if (w != "" && w > 0) printf " write_MBps=%.1f", 16 * 1048576 / 1000 / w
    if (r != "" && r > 0) printf " read_MBps=%.1f", 16 * 1048576 / 1000 / r
    if (i != "") printf " qd1_4k_iops=%s", i
    printf "\n"
}'
finish
