#!/bin/sh
# The case runner of scripts/linux-guest.sh, and the case table.
#
# As /init of the L1 initramfs (QEMU TCG, Debian's own kernel): mounts the
# pseudo file systems, loads kvm-amd and its dependencies (/etc/modules, in
# order), then boots the L2 Linux once per case with /opt/linux-vm on L1's
# /dev/kvm, and powers off. The cases come from `vmmtest.cases=a,b,...` on
# L1's command line (default: all), the per-boot timeout from
# `vmmtest.timeout=SECS`.
#   init-l1.sh --list          prints the case names, one a line
#   init-l1.sh --append CASE   prints the L2 command line of CASE
#   init-l1.sh --direct        runs the cases on this host's KVM, with
#                              VMMTEST_VM, VMMTEST_KERNEL, VMMTEST_INITRD,
#                              VMMTEST_CASES_DIR, VMMTEST_CASES, VMMTEST_TIMEOUT
# Each case's config is CASE.json beside the others. Output markers:
#   L1-CASE-START CASE / L1-CASE-END CASE rc=N wall_ms=N / L1-DONE
# with linux-vm's own output (the L2 serial console and its `linux-vm: `
# lines) in between.

ALL_CASES="off strict lazy identity identity-map fault range granule64k"

# The L2 command line of each case, added to the VMM's own
# `console=ttyS0 reboot=k panic=-1`: `quiet` keeps the serial console (one
# VM exit per byte) short; init-l2.sh prints the kernel lines that matter.
case_append() {
    base="quiet vmmtest.case=$1"
    case $1 in
    off) echo "$base" ;;
    strict) echo "$base iommu.strict=1" ;;
    lazy) echo "$base iommu.strict=0" ;;
    identity | identity-map) echo "$base iommu.passthrough=1" ;;
    fault) echo "$base iommu.strict=1" ;;
    range) echo "$base iommu.strict=1" ;;
    granule64k) echo "$base" ;;
    *) return 1 ;;
    esac
}

uptime_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }

run_cases() { # VM KERNEL INITRD CASES_DIR CASES(comma-separated) TIMEOUT
    vm=$1 kernel=$2 initrd=$3 dir=$4 cases=$5 timeout=$6
    for c in $(echo "$cases" | tr ',' ' '); do
        echo "L1-CASE-START $c"
        if ! append=$(case_append "$c"); then
            echo "L1-CASE-END $c rc=2 wall_ms=0 (unknown case)"
            continue
        fi
        t0=$(uptime_ms)
        "$vm" --kernel "$kernel" --initrd "$initrd" --append "$append" --timeout "$timeout" "$dir/$c.json"
        rc=$?
        echo "L1-CASE-END $c rc=$rc wall_ms=$(($(uptime_ms) - t0))"
    done
    echo "L1-DONE"
}

case ${1:-} in
--list)
    for c in $ALL_CASES; do echo "$c"; done
    exit 0
    ;;
--append)
    case_append "$2"
    exit $?
    ;;
--direct)
    run_cases "$VMMTEST_VM" "$VMMTEST_KERNEL" "$VMMTEST_INITRD" "$VMMTEST_CASES_DIR" \
        "${VMMTEST_CASES:-$(echo "$ALL_CASES" | tr ' ' ',')}" "${VMMTEST_TIMEOUT:-60}"
    exit 0
    ;;
esac

# /init of L1.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
echo "L1-INIT uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) svm=$(grep -m1 -ow svm /proc/cpuinfo) npt=$(grep -m1 -ow npt /proc/cpuinfo)"
while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "L1-ERROR insmod $m failed"
done </etc/modules
if [ -c /dev/kvm ]; then
    echo "L1-KVM ok: $(dmesg | grep -m1 -io 'nested virtualization enabled') / $(dmesg | grep -m1 -io 'nested paging enabled')"
else
    echo "L1-ERROR no /dev/kvm after loading $(tr '\n' ' ' </etc/modules)"
    dmesg | grep -iE 'kvm|svm' | tail -5
fi
cases=$(sed -n 's/.*vmmtest\.cases=\([^ ]*\).*/\1/p' /proc/cmdline)
timeout=$(sed -n 's/.*vmmtest\.timeout=\([0-9]*\).*/\1/p' /proc/cmdline)
run_cases /opt/linux-vm /opt/vmlinuz /opt/initrd.gz /opt/cases \
    "${cases:-$(echo "$ALL_CASES" | tr ' ' ',')}" "${timeout:-60}"
sync
poweroff -f
