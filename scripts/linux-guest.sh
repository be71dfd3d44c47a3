#!/usr/bin/env bash
# A stock Debian Linux kernel ("L2") drives our virtio-iommu: the test VMM
# `linux-vm` boots Debian's bookworm-backports 6.12 kernel with virtio-blk
# and virtio-rng behind the vIOMMU, and Linux's own virtio-iommu driver
# translates their DMA. Issue 9; docs/DESIGN.md "Linux guests on nested KVM".
#
# This machine's KVM cannot run Linux kernel code, so by default the VMM
# runs inside "L1": QEMU TCG (q35, -cpu max: emulated SVM with nested
# paging) booting Debian's own 6.1 kernel with a busybox initramfs that
# loads kvm-amd and runs `linux-vm` once per case on L1's /dev/kvm. On a
# host whose CPU shows vmx/svm, `linux-vm` runs directly instead.
#
# Everything from a fresh machine: apt packages, both kernels (downloaded
# once into ${VMM_IOMMU_CACHE:-$HOME/.cache/vmm-iommu}/linux/, nothing under
# /etc changed), the VMM build, both initramfs, the run and the verdict.
# The cases, their configs and the guest-side checks are in
# resources/linux/ (README.md there).
#
# Usage: scripts/linux-guest.sh [--prepare] [--mode l1|direct|standin] [CASE...]
#   --prepare   fetch, build and pack everything, run nothing
#   --mode      l1 (default here), direct (default where the CPU has
#               vmx/svm and /dev/kvm exists), or standin: no VMM at all,
#               each case's L2 boots in QEMU TCG with QEMU's own
#               virtio-iommu-pci as a stand-in (for developing the guest
#               checks; the VMM-side checks and the test hook are skipped)
#   CASE...     run only these cases (default: all; standin: those QEMU
#               can emulate)
# Environment: VMM_IOMMU_CACHE, LINUX_GUEST_REFRESH=1 (look for newer
# kernel packages even when some are cached), LINUX_GUEST_TIMEOUT (seconds
# for the whole run, default 540), LINUX_GUEST_CASE_TIMEOUT (seconds per
# L2 boot, default 60), LINUX_GUEST_L1_SMP (default 1), LINUX_GUEST_VM (a
# linux-vm binary to use instead of building target/release/linux-vm).
#
# Closing line: `linux-guest: N passed, M failed`; exit status 0 only when
# every check passed (and at least one ran).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RES=$ROOT/resources/linux
CACHE=${VMM_IOMMU_CACHE:-$HOME/.cache/vmm-iommu}/linux
OUT=$ROOT/target/linux-guest
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2034 # read by scripts/lib/suite.sh
SUITE=linux-guest
# shellcheck source=scripts/lib/suite.sh
. scripts/lib/suite.sh

# ---------------------------------------------------------------- options
PREPARE_ONLY=0
MODE=
WANT_CASES=()
while [ $# -gt 0 ]; do
    case $1 in
    --prepare) PREPARE_ONLY=1 ;;
    --mode)
        [ $# -ge 2 ] || die "--mode needs l1, direct or standin"
        MODE=$2
        shift
        ;;
    --mode=*) MODE=${1#--mode=} ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        SUMMARY_DONE=1
        exit 0
        ;;
    -*) die "unknown option $1" ;;
    *) WANT_CASES+=("$1") ;;
    esac
    shift
done
if [ -z "$MODE" ]; then
    if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -e /dev/kvm ]; then MODE=direct; else MODE=l1; fi
fi
case $MODE in l1 | direct | standin) ;; *) die "unknown mode $MODE (l1, direct or standin)" ;; esac
say "mode ${MODE}; cache ${CACHE}"

# ---------------------------------------------------------------- packages
APT_UPDATED=0
sys_apt_update() {
    if [ "$APT_UPDATED" = 0 ]; then
        say "apt-get update"
        apt-get update -qq || die "apt-get update failed"
        APT_UPDATED=1
    fi
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
ensure_packages() {
    local p missing=()
    for p in "$@"; do installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -gt 0 ] || return 0
    [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]} and not root: install them first"
    say "apt-get install ${missing[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        sys_apt_update
        apt-get install -y -qq --no-install-recommends "${missing[@]}" || die "cannot install ${missing[*]}"
    fi
}
# busybox-static: the initramfs holds no libraries for busybox.
# kmod: depmod (kernel packages ship no modules.dep; it is made at install).
HOST_PKGS=(busybox-static cpio xz-utils kmod)
[ "$MODE" = direct ] || HOST_PKGS+=(qemu-system-x86)
ensure_packages "${HOST_PKGS[@]}"
BUSYBOX=$(command -v busybox) || die "busybox not found"
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked (busybox-static should provide a static one)"; fi

# ---------------------------------------------------------------- kernels
mkdir -p "$CACHE/debs" "$OUT"
APT_AS_ROOT=(-o APT::Sandbox::User=root)
. scripts/lib/kernel-pkg.sh
deb_field() { dpkg-deb -f "$1" "$2"; }

# L1 kernel: the system's own default kernel (linux-image-amd64's dependency).
fetch_l1_kernel() {
    local name deb
    name=$(cat "$CACHE/l1.pkg" 2>/dev/null || true)
    if [ -n "$name" ] && [ "${LINUX_GUEST_REFRESH:-0}" != 1 ] && compgen -G "$CACHE/debs/${name}_*.deb" >/dev/null; then
        L1_DEB=$(compgen -G "$CACHE/debs/${name}_*.deb" | sort -V | tail -1)
        return
    fi
    sys_l1_name() { apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'; }
    name=$(sys_l1_name)
    if [ -z "$name" ]; then
        sys_apt_update
        name=$(sys_l1_name)
    fi
    [ -n "$name" ] || die "cannot find the system's kernel package (apt-cache depends linux-image-amd64)"
    say "downloading ${name} (system apt sources)"
    if ! (cd "$CACHE/debs" && apt-get "${APT_AS_ROOT[@]}" download -qq "$name"); then
        sys_apt_update
        (cd "$CACHE/debs" && apt-get "${APT_AS_ROOT[@]}" download -qq "$name") || die "cannot download ${name}"
    fi
    deb=$(compgen -G "$CACHE/debs/${name}_*.deb" | sort -V | tail -1) || die "no .deb for ${name} after download"
    echo "$name" >"$CACHE/l1.pkg"
    L1_DEB=$deb
}

# L2 kernel: linux-image-6.12.*+debNN-amd64 from <codename>-backports, through
# a private apt directory whose source list reuses the system's mirror.
fetch_l2_kernel() {
    local name deb codename verid mirror uri key a
    name=$(cat "$CACHE/l2.pkg" 2>/dev/null || true)
    if [ -n "$name" ] && [ "${LINUX_GUEST_REFRESH:-0}" != 1 ] && compgen -G "$CACHE/debs/${name}_*.deb" >/dev/null; then
        L2_DEB=$(compgen -G "$CACHE/debs/${name}_*.deb" | sort -V | tail -1)
        return
    fi
    # shellcheck disable=SC1091
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    # shellcheck disable=SC1091
    verid=$(. /etc/os-release && echo "${VERSION_ID:-}")
    if [ -z "$codename" ] || [ -z "$verid" ]; then die "cannot tell the Debian release from /etc/os-release"; fi
    mirror=$(debian_mirror "$codename" | head -1)
    [ -n "$mirror" ] || die "no Debian mirror for ${codename} in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
    uri=${mirror%% *}
    key=${mirror#* }
    [ "$key" != "$mirror" ] || key=
    [ -n "$key" ] || key=/usr/share/keyrings/debian-archive-keyring.gpg
    a=$CACHE/apt
    mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
    echo "deb [signed-by=${key}] ${uri} ${codename}-backports main" >"$a/sources.list"
    local papt=(-o "Dir::Etc::SourceList=$a/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache" "${APT_AS_ROOT[@]}")
    say "apt-get update in a private apt directory: $(cat "$a/sources.list")"
    apt-get "${papt[@]}" update -qq || die "apt-get update of ${codename}-backports failed"
    name=$(apt-cache "${papt[@]}" search --names-only "^linux-image-6\.12\.[0-9]+\+deb${verid}-amd64\$" |
        awk '{ print $1 }' | sort -V | tail -1)
    [ -n "$name" ] || die "no linux-image-6.12.*+deb${verid}-amd64 in ${codename}-backports"
    say "downloading ${name} (${codename}-backports)"
    (cd "$CACHE/debs" && apt-get "${papt[@]}" download -qq "$name") || die "cannot download ${name}"
    deb=$(compgen -G "$CACHE/debs/${name}_*.deb" | sort -V | tail -1) || die "no .deb for ${name} after download"
    echo "$name" >"$CACHE/l2.pkg"
    L2_DEB=$deb
}


fetch_l2_kernel
extract "$L2_DEB" "$CACHE/l2-kernel"
kernel_tree "$CACHE/l2-kernel"
L2_KVER=$KVER L2_VMLINUZ=$VMLINUZ L2_MODDIR=$MODDIR
if [ "$MODE" = l1 ]; then
    fetch_l1_kernel
    extract "$L1_DEB" "$CACHE/l1-kernel"
    kernel_tree "$CACHE/l1-kernel"
    L1_KVER=$KVER L1_VMLINUZ=$VMLINUZ L1_MODDIR=$MODDIR
    say "L1 kernel: $(deb_field "$L1_DEB" Package) $(deb_field "$L1_DEB" Version) (${L1_KVER})"
fi
say "L2 kernel: $(deb_field "$L2_DEB" Package) $(deb_field "$L2_DEB" Version) (${L2_KVER})"
say "qemu: $(qemu-system-x86_64 --version 2>/dev/null | head -1 || echo none); busybox: $("$BUSYBOX" 2>&1 | head -1 | cut -d' ' -f2)"

# What L2 needs from its kernel's config.
L2_CONFIG=$CACHE/l2-kernel/boot/config-$L2_KVER
[ -f "$L2_CONFIG" ] || die "no boot/config-${L2_KVER} in the L2 kernel package"
say "L2 config: $(grep -E '^CONFIG_(VIRTIO_IOMMU|ACPI_VIOT|VIRTIO_MMIO|VIRTIO_BLK|HW_RANDOM_VIRTIO|DEVPORT|IOMMU_DEFAULT_DMA_(LAZY|STRICT)|IOMMU_DEFAULT_PASSTHROUGH)=' "$L2_CONFIG" | sed 's/^CONFIG_//' | tr '\n' ' ')"
for opt in VIRTIO_IOMMU ACPI_VIOT VIRTIO_MMIO VIRTIO_BLK HW_RANDOM_VIRTIO; do
    grep -qE "^CONFIG_${opt}=[ym]" "$L2_CONFIG" || die "the L2 kernel lacks CONFIG_${opt}"
done
grep -q '^CONFIG_DEVPORT=y' "$L2_CONFIG" || say "warning: CONFIG_DEVPORT is not y: no /dev/port for the fault test hook"

# ---------------------------------------------------------------- cases
# resources/linux/init-l1.sh is also the case table (its --list).
mapfile -t ALL_CASES < <(sh "$RES/init-l1.sh" --list)
STANDIN_CASES=(off strict lazy identity fault)
CASES=()
if [ ${#WANT_CASES[@]} -gt 0 ]; then
    for c in "${WANT_CASES[@]}"; do
        printf '%s\n' "${ALL_CASES[@]}" | grep -qx "$c" || die "unknown case $c (cases: ${ALL_CASES[*]})"
        CASES+=("$c")
    done
elif [ "$MODE" = standin ]; then
    CASES=("${STANDIN_CASES[@]}")
else
    CASES=("${ALL_CASES[@]}")
fi
for c in "${CASES[@]}"; do [ -f "$RES/$c.json" ] || die "no config $RES/$c.json"; done

# ---------------------------------------------------------------- the VMM
LINUX_VM=${LINUX_GUEST_VM:-$ROOT/target/release/linux-vm}
if [ -n "${LINUX_GUEST_VM:-}" ]; then
    say "using LINUX_GUEST_VM=${LINUX_GUEST_VM} (not built here)"
    [ -x "$LINUX_VM" ] || die "LINUX_GUEST_VM=${LINUX_VM} is not an executable"
elif [ "$MODE" != standin ]; then
    say "cargo build --release -p integration --bin linux-vm"
    cargo build --release -p integration --bin linux-vm 2>&1 | tail -3
    [ "${PIPESTATUS[0]}" = 0 ] || die "cannot build linux-vm"
    [ -x "$LINUX_VM" ] || die "no $LINUX_VM after the build"
fi

# ---------------------------------------------------------------- initramfs
# new_root DIR: a busybox root (every applet a link to busybox, except
# `busybox` itself, which would be a link to itself: ELOOP).
new_root() {
    local r=$1 a
    rm -rf "$r"
    mkdir -p "$r"/{bin,sbin,proc,sys,dev,tmp,etc,lib/modules}
    cp "$BUSYBOX" "$r/bin/busybox"
    for a in $("$BUSYBOX" --list | grep -vx busybox); do ln -sf busybox "$r/bin/$a"; done
}
pack() { (cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1 >"$2"); }

L2_ROOT=$OUT/l2-root
new_root "$L2_ROOT"
cp "$RES/init-l2.sh" "$L2_ROOT/init"
chmod +x "$L2_ROOT/init"
mkdir -p "$L2_ROOT/etc/vmmtest"
cp "$RES"/*.json "$L2_ROOT/etc/vmmtest/"
{
    for group in "mmio virtio_mmio" "pci virtio_pci" "iommu virtio_iommu" "blk virtio_blk" "rng virtio_rng"; do
        g=${group%% *}
        for m in $(install_modules "$L2_MODDIR" "$L2_ROOT/lib/modules" "${group#* }"); do echo "$g $m"; done
    done
} >"$L2_ROOT/etc/vmmtest/modules"
pack "$L2_ROOT" "$OUT/l2-initrd.gz"
say "L2 initramfs: $OUT/l2-initrd.gz ($(du -k "$OUT/l2-initrd.gz" | cut -f1) KiB; modules: $(awk '{ print $2 }' "$L2_ROOT/etc/vmmtest/modules" | tr '\n' ' '))"

if [ "$MODE" = l1 ]; then
    L1_ROOT=$OUT/l1-root
    new_root "$L1_ROOT"
    cp "$RES/init-l1.sh" "$L1_ROOT/init"
    chmod +x "$L1_ROOT/init"
    install_modules "$L1_MODDIR" "$L1_ROOT/lib/modules" kvm_amd >"$L1_ROOT/etc/modules"
    mkdir -p "$L1_ROOT/opt/cases"
    cp "$LINUX_VM" "$L1_ROOT/opt/linux-vm"
    for lib in $(ldd "$LINUX_VM" 2>/dev/null | grep -oE '/[^ ]+'); do
        mkdir -p "$L1_ROOT$(dirname "$lib")"
        cp -L "$lib" "$L1_ROOT$lib"
    done
    cp "$L2_VMLINUZ" "$L1_ROOT/opt/vmlinuz"
    cp "$OUT/l2-initrd.gz" "$L1_ROOT/opt/initrd.gz"
    cp "$RES"/*.json "$L1_ROOT/opt/cases/"
    pack "$L1_ROOT" "$OUT/l1-initrd.gz"
    say "L1 initramfs: $OUT/l1-initrd.gz ($(du -k "$OUT/l1-initrd.gz" | cut -f1) KiB; modules: $(tr '\n' ' ' <"$L1_ROOT/etc/modules"))"
fi
say "prepared in $(elapsed) s"
if [ "$PREPARE_ONLY" = 1 ]; then
    SUMMARY_DONE=1
    exit 0
fi

# ---------------------------------------------------------------- run
LOG=$OUT/run.log
RUN_TIMEOUT=${LINUX_GUEST_TIMEOUT:-540}
CASE_TIMEOUT=${LINUX_GUEST_CASE_TIMEOUT:-60}
CASE_LIST=$(
    IFS=,
    echo "${CASES[*]}"
)
# The log without carriage returns and terminal escapes.
clean() { sed -u 's/\r//g; s/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g'; }
# Live progress: markers, checks and the VMM's summary lines.
progress() { grep --line-buffered -E '^(L1-|L2-CHECK|L2-INIT|linux-vm: end|STANDIN-)' || true; }
t_run=$(date +%s)
say "running cases ${CASE_LIST} (${MODE}); full log: ${LOG}"
set +e
case $MODE in
l1)
    # Once in several runs the whole L1 stops making progress: no line,
    # not even linux-vm's own watchdog (60 s) ending the case, so a vCPU
    # of KVM inside TCG never comes back. Such a run (the overall timeout,
    # status 124) is said and its log kept, and the run is made once more;
    # the checks count the last run only, and a second timeout fails.
    for attempt in 1 2; do
        timeout --foreground -k 10 "$RUN_TIMEOUT" qemu-system-x86_64 -accel tcg -machine q35 -cpu max \
            -m 2048 -smp "${LINUX_GUEST_L1_SMP:-1}" -nographic -nodefaults -no-reboot -serial mon:stdio \
            -kernel "$L1_VMLINUZ" -initrd "$OUT/l1-initrd.gz" \
            -append "console=ttyS0 panic=-1 quiet loglevel=4 vmmtest.cases=${CASE_LIST} vmmtest.timeout=${CASE_TIMEOUT}" \
            </dev/null 2>&1 | clean | tee "$LOG" | progress
        run_rc=${PIPESTATUS[0]}
        if [ "$run_rc" != 124 ] || [ "$attempt" != 1 ]; then
            break
        fi
        cp "$LOG" "$LOG.wedged"
        say "the L1 run stopped making progress and hit the ${RUN_TIMEOUT} s timeout (log kept: ${LOG}.wedged); running it once more"
    done
    ;;
direct)
    VMMTEST_VM=$LINUX_VM VMMTEST_KERNEL=$L2_VMLINUZ VMMTEST_INITRD=$OUT/l2-initrd.gz VMMTEST_CASES_DIR=$RES \
        VMMTEST_CASES=$CASE_LIST VMMTEST_TIMEOUT=$CASE_TIMEOUT \
        timeout -k 10 "$RUN_TIMEOUT" sh "$RES/init-l1.sh" --direct </dev/null 2>&1 | clean | tee "$LOG" | progress
    run_rc=${PIPESTATUS[0]}
    ;;
standin)
    # QEMU's virtio-iommu-pci in front of virtio-pci blk and rng, TCG, no L1.
    run_rc=0
    : >"$LOG"
    for c in "${CASES[@]}"; do
        append=$(sh "$RES/init-l1.sh" --append "$c")
        iommu_on=on
        [ "$c" != off ] || iommu_on=off
        truncate -s 64M "$OUT/standin-disk.img"
        {
            echo "L1-CASE-START $c"
            t0=$(date +%s%N)
            timeout -k 5 "$CASE_TIMEOUT" qemu-system-x86_64 -accel tcg -machine q35 -cpu max -m 512 -smp 1 \
                -nographic -nodefaults -no-reboot -serial stdio \
                -kernel "$L2_VMLINUZ" -initrd "$OUT/l2-initrd.gz" \
                -append "console=ttyS0 reboot=k panic=-1 quiet vmmtest.standin=1 ${append}" \
                -device virtio-iommu-pci \
                -drive "if=none,id=d0,file=$OUT/standin-disk.img,format=raw" \
                -device "virtio-blk-pci,drive=d0,iommu_platform=${iommu_on},disable-legacy=on" \
                -device "virtio-rng-pci,iommu_platform=${iommu_on},disable-legacy=on" </dev/null 2>&1
            rc=$?
            echo "L1-CASE-END $c rc=${rc} wall_ms=$((($(date +%s%N) - t0) / 1000000))"
        } | clean | tee -a "$LOG" | progress
    done
    ;;
esac
set -e
say "run: $(($(date +%s) - t_run)) s, exit status ${run_rc}"

# ---------------------------------------------------------------- verdict
record() { # NAME PASS|FAIL|SKIP DETAIL
    case $2 in
    PASS) PASSED=$((PASSED + 1)) ;;
    FAIL) FAILED=$((FAILED + 1)) ;;
    esac
    printf '  %-34s %s %s\n' "$1" "$2" "${3:-}"
}
vmm_check() { # NAME AWK-CONDITION VAR=VALUE...: a check on the VMM's counters
    local name=$1 cond=$2 kv args=()
    shift 2
    for kv in "$@"; do args+=(-v "$kv"); done
    if [ "$MODE" = standin ]; then
        record "$name" SKIP "(stand-in: no VMM counters)"
    elif awk "${args[@]}" "BEGIN { exit !(${cond}) }"; then
        record "$name" PASS "($cond: $*)"
    else
        record "$name" FAIL "($cond: $*)"
    fi
}
# section CASE: the log lines of one case.
section() { awk -v c="$1" '$0 == "L1-CASE-START " c { on = 1; next } on && $1 == "L1-CASE-END" { print; exit } on' "$LOG"; }
# field LINE KEY: the value of KEY=VALUE in LINE.
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1; }
hex2dec() { if [ -n "$1" ]; then printf '%d' "$1" 2>/dev/null || echo ""; fi; }

echo
say "L2 kernel log lines about the IOMMU, per case:"
for c in "${CASES[@]}"; do
    section "$c" | grep -E '^L2-LOG ' | sed "s/^L2-LOG /  [$c] /" || true
done

echo
say "checks:"
declare -A TIME VIOMMU BLK FIG VMEND
for c in "${CASES[@]}"; do
    sec=$(section "$c")
    if [ -z "$sec" ] && ! grep -qx "L1-CASE-START $c" "$LOG"; then
        record "$c.ran" FAIL "(the case never started: see $LOG)"
        continue
    fi
    end=$(echo "$sec" | grep -E '^L1-CASE-END ' | tail -1 || true)
    vmend=$(echo "$sec" | grep -E '^linux-vm: end=' | tail -1 || true)
    VMEND[$c]=$vmend
    VIOMMU[$c]=$(echo "$sec" | grep -E '^linux-vm: viommu ' | tail -1 || true)
    BLK[$c]=$(echo "$sec" | grep -E '^linux-vm: device blk0 ' | tail -1 || true)
    TIME[$c]=$(echo "$sec" | grep -E '^linux-vm: time ' | tail -1 || true)
    FIG[$c]=$(echo "$sec" | grep -E '^L2-FIG ' | tail -1 || true)
    # The guest's own checks.
    while IFS= read -r line; do
        name=${line#L2-CHECK }
        name=${name%%:*}
        rest=${line#*: }
        record "$name" "${rest%% *}" "${rest#* }"
    done < <(echo "$sec" | grep -E '^L2-CHECK [^:]+: (PASS|FAIL|SKIP)' || true)
    if echo "$sec" | grep -q "^L2-DONE $c"; then
        record "$c.guest_done" PASS "($(echo "$sec" | grep "^L2-DONE $c" | head -1))"
    else
        record "$c.guest_done" FAIL "(no L2-DONE: the guest did not finish its checks; last lines: $(echo "$sec" | tail -3 | tr '\n' '|'))"
    fi
    rc=$(field "$end" rc)
    if [ "$MODE" = standin ]; then
        if [ "$rc" = 0 ]; then record "$c.vm_exit" PASS "(qemu rc=0)"; else record "$c.vm_exit" FAIL "(qemu rc=${rc:-none})"; fi
    else
        if [ "$rc" = 0 ] && [ "$(field "$vmend" end)" = poweroff ]; then
            record "$c.vm_poweroff" PASS "(${vmend#linux-vm: })"
        else
            record "$c.vm_poweroff" FAIL "(rc=${rc:-none} ${vmend:-no end line})"
        fi
    fi
    v=${VIOMMU[$c]}
    map=$(field "$v" map) unmap=$(field "$v" unmap) err=$(field "$v" err) ok=$(field "$v" ok)
    faults=$(field "$v" faults_delivered) battach=$(field "$v" bypass_attach) attach=$(field "$v" attach)
    b=${BLK[$c]}
    case $c in
    strict | lazy | range)
        vmm_check "$c.vmm_map" "map > 0" "map=$map"
        vmm_check "$c.vmm_unmap" "unmap > 0" "unmap=$unmap"
        vmm_check "$c.vmm_all_ok" "ok > 0 && err == 0" "ok=$ok" "err=$err"
        vmm_check "$c.vmm_no_fault" "faults_delivered == 0" "faults_delivered=$faults"
        ;;
    identity)
        vmm_check "$c.vmm_bypass_attach" "bypass_attach > 0" "bypass_attach=$battach"
        vmm_check "$c.vmm_no_map" "map == 0" "map=$map"
        vmm_check "$c.vmm_no_err" "err == 0" "err=$err"
        ;;
    identity-map)
        vmm_check "$c.vmm_identity_map" "map > 0 && bypass_attach == 0" "map=$map" "bypass_attach=$battach"
        vmm_check "$c.vmm_no_err" "err == 0" "err=$err"
        ;;
    fault)
        vmm_check "$c.vmm_fault_delivered" "faults_delivered >= 1" "faults_delivered=$faults"
        ;;
    off)
        vmm_check "$c.vmm_no_attach_no_map" "attach == 0 && map == 0" "attach=$attach" "map=$map"
        ;;
    granule64k)
        vmm_check "$c.vmm_no_map" "map == 0" "map=$map"
        ;;
    esac
    case $c in
    strict | lazy | range | identity | identity-map | off | granule64k)
        vmm_check "$c.vmm_blk_clean" "errors == 0 && dma_refused == 0" "errors=$(field "$b" errors)" "dma_refused=$(field "$b" dma_refused)"
        ;;
    esac
    if [ "$c" = range ]; then
        lo=$(field "$v" iova_lo) hi=$(field "$v" iova_hi)
        rstart=$(sed -n 's/.*"input_range".*"start": *"\(0x[0-9a-fA-F]*\)".*/\1/p' "$RES/range.json")
        rend=$(sed -n 's/.*"input_range".*"end": *"\(0x[0-9a-fA-F]*\)".*/\1/p' "$RES/range.json")
        vmm_check "$c.vmm_iova_in_input_range" "iova_lo != \"\" && iova_lo + 0 >= $(hex2dec "$rstart") && iova_hi + 0 <= $(hex2dec "$rend")" \
            "iova_lo=$(hex2dec "$lo")" "iova_hi=$(hex2dec "$hi")"
    fi
done
# Lazy against strict. Linux queues one UNMAP request per unmapped range in
# both modes (iommu_unmap_fast adds it to the request queue at once); what
# lazy mode (DMA-FQ) defers is the IOTLB sync, which for virtio-iommu is the
# request-queue notification and the wait for it. So lazy has about as many
# UNMAPs per MiB as strict, and about half the notifications (measured with
# QEMU's virtio-iommu: 13.2k UNMAPs in both modes, 26.4k notifications
# strict, 13.3k lazy). The check is on the notifications (`kicks=`).
per_mib() { # VIOMMU-LINE BLK-LINE KEY
    awk -v n="$(field "$1" "$3")" -v r="$(field "$2" bytes_read)" -v w="$(field "$2" bytes_written)" \
        'BEGIN { m = (r + w) / 1048576; if (n == "" || m <= 0) print ""; else printf "%.1f", n / m }'
}
LAZY_NOTE=
if [ "$MODE" != standin ] && [[ " ${CASES[*]} " == *" strict "* ]] && [[ " ${CASES[*]} " == *" lazy "* ]]; then
    LAZY_NOTE="per MiB of disk I/O: UNMAP strict $(per_mib "${VIOMMU[strict]}" "${BLK[strict]}" unmap) lazy $(per_mib "${VIOMMU[lazy]}" "${BLK[lazy]}" unmap); request-queue kicks strict $(per_mib "${VIOMMU[strict]}" "${BLK[strict]}" kicks) lazy $(per_mib "${VIOMMU[lazy]}" "${BLK[lazy]}" kicks); VM exits in the whole boot strict $(field "${VMEND[strict]}" exits) lazy $(field "${VMEND[lazy]}" exits)"
    if [ -z "$(field "${VIOMMU[lazy]}" kicks)" ]; then
        record "lazy.fewer_kicks_than_strict" FAIL "(the linux-vm viommu line has no kicks=N, the request-queue notifications; ${LAZY_NOTE})"
    else
        vmm_check "lazy.fewer_kicks_than_strict" "lazy != \"\" && strict != \"\" && lazy < 0.75 * strict" \
            "lazy=$(per_mib "${VIOMMU[lazy]}" "${BLK[lazy]}" kicks)" "strict=$(per_mib "${VIOMMU[strict]}" "${BLK[strict]}" kicks)"
    fi
fi

# ---------------------------------------------------------------- figures
echo
if [ "$MODE" = direct ]; then
    say "figures (not asserted; ratios to \"off\"):"
else
    say "figures (not asserted; ratios to \"off\"; under TCG the absolute numbers mean little, and 16 MiB timed by /proc/uptime is noisy):"
fi
printf '  %-13s %8s %9s %9s %9s %7s %7s %7s %8s %8s %9s\n' case boot_s write_MBs read_MBs qd1_4k_iops w/off r/off iops/off map unmap map+unmap/io
fig() { field "${FIG[$1]:-}" "$2"; }
for c in "${CASES[@]}"; do
    v=${VIOMMU[$c]:-} b=${BLK[$c]:-}
    awk -v c="$c" -v boot="$(fig "$c" boot_s)" -v w="$(fig "$c" write_MBps)" -v r="$(fig "$c" read_MBps)" \
        -v i="$(fig "$c" qd1_4k_iops)" -v w0="$(fig off write_MBps)" -v r0="$(fig off read_MBps)" \
        -v i0="$(fig off qd1_4k_iops)" -v map="$(field "$v" map)" -v unmap="$(field "$v" unmap)" \
        -v ios="$(($(field "$b" reads || true) + 0 + $(field "$b" writes || true) + 0))" '
        function ratio(x, y) { return (x != "" && y != "" && y > 0) ? sprintf("%.2f", x / y) : "-" }
        function d(x) { return x == "" ? "-" : x }
        BEGIN {
            per = (map != "" && ios > 0) ? sprintf("%.1f", (map + unmap) / ios) : "-"
            printf "  %-13s %8s %9s %9s %9s %7s %7s %7s %8s %8s %9s\n", c, d(boot), d(w), d(r), d(i),
                ratio(w, w0), ratio(r, r0), ratio(i, i0), d(map), d(unmap), per
        }'
done
[ -z "$LAZY_NOTE" ] || say "lazy against strict, ${LAZY_NOTE}"
# Where a block request's time goes in the VMM (whole boot, per request):
# serving blk notifications (the request, its DMA translated through the
# vIOMMU and copied) and serving the virtio-iommu's MAP/UNMAP requests.
for c in off strict lazy identity; do
    b=${BLK[$c]:-} t=${TIME[$c]:-}
    [ -n "$b" ] || continue
    ios=$(($(field "$b" reads || true) + 0 + $(field "$b" writes || true) + 0 + $(field "$b" flushes || true) + 0))
    [ "$ios" -gt 0 ] || continue
    say "breakdown ${c}: per block request the VMM spent $(awk -v u="$(field "$b" notify_us)" -v n="$ios" 'BEGIN { printf "%.1f", u / n }') us serving blk (its DMA through the vIOMMU included) and $(awk -v u="$(field "$t" iommu_us)" -v n="$ios" 'BEGIN { printf "%.1f", u / n }') us serving virtio-iommu requests ($(field "$t" iommu_ns_per_request) ns per request; ${ios} block requests)"
done
echo
say "total $(elapsed) s (run $(($(date +%s) - t_run)) s)"
[ "$run_rc" = 0 ] || record "run.exit_status" FAIL "(the run ended with status ${run_rc}; 124 is the ${RUN_TIMEOUT} s timeout)"
[ $((PASSED + FAILED)) -gt 0 ] || record "checks.ran" FAIL "(no check ran)"
summary
[ "$FAILED" = 0 ]
