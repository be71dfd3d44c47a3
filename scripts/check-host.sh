#!/usr/bin/env bash
# Prints what this host offers for assigned devices behind vmm-iommu: KVM
# and nested virtualisation, the VFIO modules and device nodes, iommufd,
# the IOMMU model (Intel VT-d with its nesting bits, or Arm SMMUv3), and
# the devices bound to vfio-pci. Reads /proc, /sys and /dev only; changes
# nothing; always exits 0. Ends with what is missing and what
# scripts/vfio-smoke.sh could run here.
set -uo pipefail

missing=()
have() { printf '  %-34s %s\n' "$1" "$2"; }
miss() { printf '  %-34s MISSING: %s\n' "$1" "$2"; missing+=("$1: $2"); }
bit() { echo $(( ($1 >> $2) & 1 )); }

echo "== kernel"
have "release" "$(uname -r)"
have "cmdline iommu options" "$(tr ' ' '\n' </proc/cmdline 2>/dev/null | grep -E '^(intel_iommu|amd_iommu|iommu|iommu\.passthrough)=' | tr '\n' ' ')"

echo "== KVM"
if [ -e /dev/kvm ]; then have "/dev/kvm" "present"; else miss "/dev/kvm" "no KVM (modprobe kvm_intel / kvm_amd)"; fi
if grep -qwE 'vmx|svm' /proc/cpuinfo 2>/dev/null; then
    have "CPU virtualisation" "$(grep -owE 'vmx|svm' /proc/cpuinfo | sort -u | tr '\n' ' ')"
else
    miss "CPU virtualisation" "no vmx/svm flag (this machine may itself be a VM without nested virt)"
fi
for m in kvm_intel kvm_amd; do
    f=/sys/module/$m/parameters/nested
    [ -r "$f" ] && have "$m nested" "$(cat "$f")"
done

echo "== VFIO"
for m in vfio vfio_pci vfio_iommu_type1 iommufd; do
    if [ -d /sys/module/$m ]; then have "module $m" "loaded (or built in)"; else miss "module $m" "not loaded (modprobe $m)"; fi
done
if [ -e /dev/vfio/vfio ]; then have "/dev/vfio/vfio" "present (type1 container)"; else miss "/dev/vfio/vfio" "no VFIO container device"; fi
if [ -d /dev/vfio/devices ]; then have "/dev/vfio/devices" "$(ls /dev/vfio/devices 2>/dev/null | tr '\n' ' ')"; else miss "/dev/vfio/devices" "no VFIO cdevs (CONFIG_VFIO_DEVICE_CDEV)"; fi
if [ -e /dev/iommu ]; then have "/dev/iommu" "present (iommufd)"; else miss "/dev/iommu" "no iommufd (CONFIG_IOMMUFD, modprobe iommufd)"; fi

echo "== IOMMU"
nesting=no
units=$(ls /sys/class/iommu 2>/dev/null)
if [ -z "$units" ]; then
    miss "/sys/class/iommu" "no IOMMU registered (firmware DMAR/IORT, intel_iommu=on)"
fi
for u in $units; do
    d=/sys/class/iommu/$u
    if [ -r "$d/intel-iommu/ecap" ]; then
        cap=$((16#$(cat "$d/intel-iommu/cap")))
        ecap=$((16#$(cat "$d/intel-iommu/ecap")))
        # drivers/iommu/intel/iommu.h: ecap_nest 26, ecap_prs 29, ecap_srs 31,
        # ecap_pasid 40, ecap_pss 39:35, ecap_smts 43, ecap_flts 47;
        # cap_fl1gp 56, cap_fl5lp 60.
        pss=$(( ((ecap >> 35) & 31) + 1 ))
        have "$u" "Intel VT-d: nest=$(bit $ecap 26) smts=$(bit $ecap 43) flts=$(bit $ecap 47) pasid=$(bit $ecap 40) (${pss} bits) prs=$(bit $ecap 29) srs=$(bit $ecap 31) fl1gp=$(bit $cap 56) fl5lp=$(bit $cap 60)"
        if [ "$(bit $ecap 26)" = 1 ] && [ "$(bit $ecap 47)" = 1 ]; then nesting=yes; fi
    elif [[ "$u" == smmu3* ]] || grep -qs arm-smmu-v3 "$d/device/driver/module/drivers" 2>/dev/null \
        || readlink "$d/device/driver" 2>/dev/null | grep -q arm-smmu-v3; then
        have "$u" "Arm SMMUv3 (nesting needs S1P+S2P, COHACC, and iommufd vIOMMU support)"
        nesting=maybe
    else
        have "$u" "$(readlink "$d/device/driver" 2>/dev/null | xargs -r basename) (no nesting support known to vmm-iommu)"
    fi
done

echo "== devices bound to vfio-pci"
bound=()
if [ -d /sys/bus/pci/drivers/vfio-pci ]; then
    for l in /sys/bus/pci/drivers/vfio-pci/????:??:??.?; do
        [ -e "$l" ] || continue
        bdf=$(basename "$l")
        grp=$(basename "$(readlink "$l/iommu_group" 2>/dev/null)" 2>/dev/null)
        cdev=$(ls "$l/vfio-dev" 2>/dev/null | tr '\n' ' ')
        have "$bdf" "iommu_group ${grp:-none}, cdev ${cdev:-none}, $(cat "$l/vendor" 2>/dev/null):$(cat "$l/device" 2>/dev/null)"
        bound+=("$bdf")
    done
fi
[ ${#bound[@]} -gt 0 ] || miss "vfio-pci devices" "none bound (echo BDF > /sys/bus/pci/drivers/vfio-pci/bind after driver_override)"

echo "== summary"
if [ ${#missing[@]} -eq 0 ]; then
    echo "  nothing missing"
else
    echo "  missing (${#missing[@]}):"
    for m in "${missing[@]}"; do echo "    - $m"; done
fi
runs=()
[ -e /dev/vfio/vfio ] && [ ${#bound[@]} -gt 0 ] && runs+=("type1 MAP/UNMAP")
[ -e /dev/iommu ] && [ ${#bound[@]} -gt 0 ] && runs+=("iommufd MAP/UNMAP")
[ -e /dev/iommu ] && [ ${#bound[@]} -gt 0 ] && [ "$nesting" != no ] && runs+=("iommufd nested ($nesting)")
if [ ${#runs[@]} -gt 0 ]; then
    echo "  scripts/vfio-smoke.sh ${bound[0]} would run: ${runs[*]}"
else
    echo "  scripts/vfio-smoke.sh can run nothing on this host"
fi
exit 0
