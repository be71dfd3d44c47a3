#!/usr/bin/env bash
# vfio-passthrough against a real kernel (issue 15): our Type1Backend and
# IommufdBackend drive Linux's VFIO and a VT-d IOMMU inside a QEMU-TCG
# "L1", and QEMU's `edu` PCI device really DMAs through them.
#
# L1 is `-machine q35,kernel-irqchip=split -device intel-iommu,intremap=on,
# caching-mode=on -device edu` with `intel_iommu=on iommu=nopt`; edu sits
# alone in its IOMMU group and is bound to vfio-pci. Two boots:
#   type1    Debian's own bookworm-backports 6.12 kernel with its vfio
#            modules (irqbypass vfio vfio_iommu_type1 vfio-pci-core vfio-pci;
#            kvm kvm-amd for the KVM-VFIO check)
#   iommufd  a small 6.12 built here from Debian's linux-source-6.12
#            (tinyconfig + resources/vfio-l1/kconfig.frag: IOMMUFD, VFIO
#            cdev, vfio-pci, Intel IOMMU; no Debian kernel has IOMMUFD),
#            cached after the first build (about 3 minutes on 2 cores)
# In each, the project's own test program (vfio-passthrough/examples/
# vfio_l1.rs, linked statically) opens the VFIO objects itself, builds the
# vIOMMU with the backend serving edu's endpoint, drives it through its
# request queue and programs edu's DMA through the BAR0 mmap; each check is
# a line (resources/vfio-l1/README.md lists them).
#
# Everything from a fresh machine: apt packages, both kernel packages
# through a private apt directory over the machine's own Debian mirror
# (<codename>-backports; nothing under /etc is changed), cached in
# ${VMM_IOMMU_CACHE:-$HOME/.cache/vmm-iommu}/vfio-l1/; the build, the
# initramfs, the runs and the verdict. Packages that cannot be fetched end
# the run with an error.
#
# Usage: scripts/vfio-l1.sh [--prepare] [RUN...]
#   --prepare   fetch, build and pack everything, run nothing
#   RUN...      type1 and/or iommufd (default: both)
# Environment: VMM_IOMMU_CACHE, VFIO_L1_REFRESH=1 (look for newer kernel
# packages even when some are cached), VFIO_L1_TIMEOUT (seconds per L1
# boot, default 180), CARGO_TARGET_DIR (the test program's build; the
# initramfs go in its vfio-l1/ directory).
#
# Closing line: `vfio-l1: N passed, M failed`; exit status 0 only when every
# check passed (and at least one ran).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RES=$ROOT/resources/vfio-l1
CACHE=${VMM_IOMMU_CACHE:-$HOME/.cache/vmm-iommu}/vfio-l1
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/vfio-l1
TRIPLE=x86_64-unknown-linux-gnu
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2034 # read by scripts/lib/suite.sh
SUITE=vfio-l1
# shellcheck source=scripts/lib/suite.sh
. scripts/lib/suite.sh

# ---------------------------------------------------------------- options
PREPARE_ONLY=0
RUNS=()
while [ $# -gt 0 ]; do
    case $1 in
    --prepare) PREPARE_ONLY=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        SUMMARY_DONE=1
        exit 0
        ;;
    type1 | iommufd) RUNS+=("$1") ;;
    *) die "unknown argument $1 (runs: type1, iommufd)" ;;
    esac
    shift
done
[ ${#RUNS[@]} -gt 0 ] || RUNS=(type1 iommufd)
want() { [[ " ${RUNS[*]} " == *" $1 "* ]]; }
say "runs: ${RUNS[*]}; cache ${CACHE}"

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
# busybox-static: the initramfs holds no libraries. kmod: depmod (kernel
# packages ship no modules.dep). flex bison libelf-dev bc gcc make: the
# iommufd kernel. binutils: readelf, to prove the test program is static.
HOST_PKGS=(qemu-system-x86 busybox-static cpio xz-utils kmod binutils)
want iommufd && HOST_PKGS+=(flex bison libelf-dev bc gcc make libc6-dev)
ensure_packages "${HOST_PKGS[@]}"
BUSYBOX=$(command -v busybox) || die "busybox not found"
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked (busybox-static should provide a static one)"; fi
command -v cargo >/dev/null || die "cargo not found (install Rust with rustup)"

# ---------------------------------------------------------------- kernels
mkdir -p "$CACHE/debs" "$OUT"
APT_AS_ROOT=(-o APT::Sandbox::User=root)
. scripts/lib/kernel-pkg.sh
deb_field() { dpkg-deb -f "$1" "$2"; }

# A private apt directory whose only source is <codename>-backports of the
# machine's own mirror; PAPT holds the apt options that select it.
PAPT=()
PAPT_UPDATED=0
private_apt() {
    local codename mirror uri key a
    [ "$PAPT_UPDATED" = 0 ] || return 0
    # shellcheck disable=SC1091
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [ -n "$codename" ] || die "cannot tell the Debian release from /etc/os-release"
    mirror=$(debian_mirror "$codename" | head -1)
    [ -n "$mirror" ] || die "no Debian mirror for ${codename} in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
    uri=${mirror%% *}
    key=${mirror#* }
    [ "$key" != "$mirror" ] || key=
    [ -n "$key" ] || key=/usr/share/keyrings/debian-archive-keyring.gpg
    a=$CACHE/apt
    mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
    echo "deb [signed-by=${key}] ${uri} ${codename}-backports main" >"$a/sources.list"
    PAPT=(-o "Dir::Etc::SourceList=$a/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache" "${APT_AS_ROOT[@]}")
    say "apt-get update in a private apt directory: $(cat "$a/sources.list")"
    apt-get "${PAPT[@]}" update -qq || die "apt-get update of ${codename}-backports failed"
    # apt-get update only warns when it cannot fetch: no list, no run.
    compgen -G "$a/lists/*${codename}-backports*Packages*" >/dev/null ||
        die "apt-get update of ${codename}-backports fetched no package list (see apt's warnings above)"
    PAPT_UPDATED=1
}
# fetch_backports KEY REGEX: the newest package of <codename>-backports whose
# name matches REGEX, downloaded once into $CACHE/debs ($CACHE/KEY.pkg
# remembers its name); sets DEB.
fetch_backports() {
    local key=$1 regex=$2 name
    name=$(cat "$CACHE/$key.pkg" 2>/dev/null || true)
    if [ -n "$name" ] && [ "${VFIO_L1_REFRESH:-0}" != 1 ] && compgen -G "$CACHE/debs/${name}_*.deb" >/dev/null; then
        DEB=$(compgen -G "$CACHE/debs/${name}_*.deb" | sort -V | tail -1)
        return
    fi
    private_apt
    name=$(apt-cache "${PAPT[@]}" search --names-only "$regex" | awk '{ print $1 }' | sort -V | tail -1)
    [ -n "$name" ] || die "no package matching ${regex} in backports"
    say "downloading ${name} (backports)"
    (cd "$CACHE/debs" && apt-get "${PAPT[@]}" download -qq "$name") || die "cannot download ${name}"
    DEB=$(compgen -G "$CACHE/debs/${name}_*.deb" | sort -V | tail -1) || die "no .deb for ${name} after download"
    echo "$name" >"$CACHE/$key.pkg"
}


# shellcheck disable=SC1091
VERID=$(. /etc/os-release && echo "${VERSION_ID:-}")
[ -n "$VERID" ] || die "cannot tell the Debian version from /etc/os-release"
if want type1; then
    fetch_backports debian-kernel "^linux-image-6\.12\.[0-9]+\+deb${VERID}-amd64\$"
    DEBIAN_DEB=$DEB
    extract "$DEBIAN_DEB" "$CACHE/debian-kernel"
    kernel_tree "$CACHE/debian-kernel"
    DEBIAN_KVER=$KVER DEBIAN_VMLINUZ=$VMLINUZ DEBIAN_MODDIR=$MODDIR
    say "type1 kernel: $(deb_field "$DEBIAN_DEB" Package) $(deb_field "$DEBIAN_DEB" Version)"
    cfg=$CACHE/debian-kernel/boot/config-$DEBIAN_KVER
    for opt in VFIO VFIO_IOMMU_TYPE1 VFIO_PCI INTEL_IOMMU IRQ_REMAP; do
        grep -qE "^CONFIG_${opt}=[ym]" "$cfg" || die "Debian's ${DEBIAN_KVER} lacks CONFIG_${opt}"
    done
fi

# The iommufd kernel: built once per (source package, config fragment).
build_iommufd_kernel() {
    local key src work log t0
    fetch_backports linux-source '^linux-source-6\.12$'
    SRC_DEB=$DEB
    key="$(basename "$SRC_DEB") $(sha256sum "$RES/kconfig.frag" | cut -c1-16)"
    IOMMUFD_BZIMAGE=$CACHE/iommufd-kernel/bzImage
    if [ -s "$IOMMUFD_BZIMAGE" ] && [ "$(cat "$CACHE/iommufd-kernel/key" 2>/dev/null || true)" = "$key" ]; then
        return
    fi
    say "building the iommufd kernel from $(basename "$SRC_DEB") (a few minutes; cached afterwards)"
    t0=$(date +%s)
    work=$CACHE/kbuild-work
    rm -rf "$work"
    mkdir -p "$work/src" "$work/out"
    dpkg-deb --fsys-tarfile "$SRC_DEB" | tar -x -C "$work/src" --wildcards '*.tar.xz' ||
        die "cannot unpack $(basename "$SRC_DEB")"
    tar -xJf "$work"/src/usr/src/linux-source-6.12.tar.xz -C "$work/src" || die "cannot unpack the kernel source"
    src=$work/src/linux-source-6.12
    [ -d "$src" ] || die "no linux-source-6.12 directory in $(basename "$SRC_DEB")"
    log=$CACHE/kbuild.log
    {
        make -C "$src" -s O="$work/out" tinyconfig &&
            "$src/scripts/kconfig/merge_config.sh" -m -O "$work/out" "$work/out/.config" "$RES/kconfig.frag" &&
            make -C "$src" -s O="$work/out" olddefconfig &&
            make -C "$src" -s O="$work/out" -j"$(($(nproc) + 1))" bzImage
    } >"$log" 2>&1 || die "the kernel build failed: see ${log} ($(tail -3 "$log" | tr '\n' '|'))"
    local opt
    for opt in IOMMUFD VFIO_DEVICE_CDEV VFIO_PCI INTEL_IOMMU IRQ_REMAP; do
        grep -q "^CONFIG_${opt}=y" "$work/out/.config" || die "the built kernel lacks CONFIG_${opt} (kconfig.frag no longer applies?)"
    done
    mkdir -p "$CACHE/iommufd-kernel"
    cp "$work/out/arch/x86/boot/bzImage" "$IOMMUFD_BZIMAGE"
    cp "$work/out/.config" "$CACHE/iommufd-kernel/config"
    echo "$key" >"$CACHE/iommufd-kernel/key"
    rm -rf "$work"
    say "iommufd kernel built in $(($(date +%s) - t0)) s: $(du -k "$IOMMUFD_BZIMAGE" | cut -f1) KiB"
}
if want iommufd; then
    build_iommufd_kernel
    say "iommufd kernel: $(cat "$CACHE/iommufd-kernel/key") ($(grep -E '^CONFIG_(IOMMUFD|VFIO_DEVICE_CDEV|VFIO_CONTAINER)=' "$CACHE/iommufd-kernel/config" | tr '\n' ' '))"
fi
say "qemu: $(qemu-system-x86_64 --version | head -1)"

# ---------------------------------------------------------------- test program
say "cargo build --release -p vfio-passthrough --example vfio_l1 --target ${TRIPLE} (static)"
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$TARGET_DIR \
    cargo build -q --release -p vfio-passthrough --example vfio_l1 --target "$TRIPLE" 2>&1 | tail -20
[ "${PIPESTATUS[0]}" = 0 ] || die "cannot build the test program"
PROG=$TARGET_DIR/$TRIPLE/release/examples/vfio_l1
[ -x "$PROG" ] || die "no $PROG after the build"
if readelf -lW "$PROG" | grep -q 'program interpreter' || readelf -dW "$PROG" | grep -q '(NEEDED)'; then
    die "$PROG is not statically linked: $(readelf -dW "$PROG" | grep NEEDED | tr '\n' ' ')"
fi
say "test program: ${PROG} ($(du -k "$PROG" | cut -f1) KiB, static: no interpreter, no NEEDED)"

# ---------------------------------------------------------------- initramfs
pack() { (cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1 >"$2"); }
# make_initrd NAME MODDIR|- MODULES...: busybox, the init script, the test
# program and (from MODDIR) the modules with their dependencies.
make_initrd() {
    local name=$1 moddir=$2 r a
    shift 2
    r=$OUT/$name-root
    rm -rf "$r"
    mkdir -p "$r"/{bin,sbin,proc,sys,dev,tmp,etc,lib/modules}
    cp "$BUSYBOX" "$r/bin/busybox"
    for a in $("$BUSYBOX" --list | grep -vx busybox); do ln -sf busybox "$r/bin/$a"; done
    cp "$RES/init.sh" "$r/init"
    chmod +x "$r/init"
    cp "$PROG" "$r/bin/vfio-l1"
    : >"$r/etc/modules"
    if [ "$moddir" != - ]; then
        install_modules "$moddir" "$r/lib/modules" "$@" >"$r/etc/modules"
    fi
    pack "$r" "$OUT/$name-initrd.gz"
    say "$name initramfs: $(du -k "$OUT/$name-initrd.gz" | cut -f1) KiB (modules: $(tr '\n' ' ' <"$r/etc/modules"))"
}
# kvm kvm_amd: TCG's `-cpu max` is an AuthenticAMD CPU with SVM, so L1 can
# have /dev/kvm and the type1 run checks the group's KVM-VFIO registration
# (reported SKIP, not counted, when KVM does not come up there).
want type1 && make_initrd type1 "$DEBIAN_MODDIR" irqbypass vfio vfio_iommu_type1 vfio_pci_core vfio_pci kvm kvm_amd
want iommufd && make_initrd iommufd -
say "prepared in $(elapsed) s"
if [ "$PREPARE_ONLY" = 1 ]; then
    SUMMARY_DONE=1
    exit 0
fi

# ---------------------------------------------------------------- runs
L1_TIMEOUT=${VFIO_L1_TIMEOUT:-180}
clean() { sed -u 's/\r//g; s/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g'; }
progress() { grep --line-buffered -E '^(L1-|VFIO-L1-CHECK|vfio-l1 \[)' || true; }
declare -A RUN_RC RUN_WALL
for run in "${RUNS[@]}"; do
    case $run in
    type1) kernel=$DEBIAN_VMLINUZ ;;
    iommufd) kernel=$IOMMUFD_BZIMAGE ;;
    esac
    log=$OUT/$run.log
    say "L1 boot for ${run}: $(basename "$kernel"); full log: ${log}"
    t0=$(date +%s%N)
    set +e
    timeout --foreground -k 10 "$L1_TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp 1 \
        -machine q35,kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on -device edu -device edu \
        -nographic -nodefaults -no-reboot -serial mon:stdio \
        -kernel "$kernel" -initrd "$OUT/$run-initrd.gz" \
        -append "console=ttyS0 panic=-1 loglevel=4 intel_iommu=on iommu=nopt vfiol1.backend=${run}" \
        </dev/null 2>&1 | clean | tee "$log" | progress
    RUN_RC[$run]=${PIPESTATUS[0]}
    set -e
    RUN_WALL[$run]=$((($(date +%s%N) - t0) / 1000000))
    say "${run}: L1 ended with status ${RUN_RC[$run]} after ${RUN_WALL[$run]} ms"
done

# ---------------------------------------------------------------- verdict
record() { # NAME PASS|FAIL|SKIP DETAIL (SKIP is shown, not counted)
    case $2 in
    PASS) PASSED=$((PASSED + 1)) ;;
    FAIL) FAILED=$((FAILED + 1)) ;;
    esac
    printf '  %-40s %s %s\n' "$1" "$2" "${3:-}"
}
echo
for run in "${RUNS[@]}"; do
    log=$OUT/$run.log
    say "${run}: L1's DMAR lines"
    grep -aE '^(L1-DMAR )?(\[ *[0-9]+\.[0-9]+\] )?DMAR' "$log" | sed 's/^L1-DMAR //; s/^/  /' | awk '!seen[$0]++' || true
done
echo
say "checks:"
for run in "${RUNS[@]}"; do
    log=$OUT/$run.log
    n=0
    while IFS= read -r line; do
        rest=${line#VFIO-L1-CHECK }
        name=${rest%% *}
        rest=${rest#* }
        verdict=${rest%% *}
        detail=${rest#"$verdict"}
        record "$name" "$verdict" "${detail# }"
        n=$((n + 1))
    done < <(grep -aE '^VFIO-L1-CHECK [^ ]+ (PASS|FAIL|SKIP)' "$log" || true)
    [ "$n" -gt 0 ] || record "${run}.checks_ran" FAIL "(no check line: see ${log}; last lines: $(tail -5 "$log" | tr '\n' '|'))"
    end=$(grep -aE '^L1-PROGRAM-END ' "$log" | tail -1 || true)
    if [ -n "$end" ]; then
        record "${run}.program_exit" "$([ "${end##*rc=}" = 0 ] && echo PASS || echo FAIL)" "(${end#L1-PROGRAM-END })"
    else
        record "${run}.program_exit" FAIL "(the test program did not finish: see ${log})"
    fi
    if grep -aq '^L1-DONE' "$log" && [ "${RUN_RC[$run]}" = 0 ]; then
        record "${run}.l1_poweroff" PASS "(qemu status 0, ${RUN_WALL[$run]} ms)"
    else
        record "${run}.l1_poweroff" FAIL "(qemu status ${RUN_RC[$run]}; 124 is the ${L1_TIMEOUT} s timeout)"
    fi
done
echo
say "figures (not asserted; TCG: the absolute times mean little):"
for run in "${RUNS[@]}"; do
    grep -aE '^VFIO-L1-FIG ' "$OUT/$run.log" | sed "s/^VFIO-L1-FIG /  /" || true
done
echo
say "total $(elapsed) s"
[ $((PASSED + FAILED)) -gt 0 ] || record "checks.ran" FAIL "(no check ran)"
summary
[ "$FAILED" = 0 ]
