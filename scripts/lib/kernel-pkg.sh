# Shared by scripts/linux-guest.sh and scripts/vfio-l1.sh (sourced, after
# they define `die`): finding the machine's Debian mirror, unpacking kernel
# packages and picking the modules an initramfs needs, dependencies first.
# shellcheck shell=bash

# Prints "URI KEYRING" of the machine's Debian mirror for suite $1.
debian_mirror() {
    local code=$1 f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        awk -v code="$code" 'BEGIN { RS = "" }
            {
                uri = ""; suites = ""; key = ""; types = ""
                n = split($0, L, "\n")
                for (i = 1; i <= n; i++) {
                    l = L[i]
                    if (l ~ /^#/) continue
                    if (l ~ /^Types:/)     { sub(/^Types:[ \t]*/, "", l); types = l }
                    if (l ~ /^URIs:/)      { sub(/^URIs:[ \t]*/, "", l); uri = l }
                    if (l ~ /^Suites:/)    { sub(/^Suites:[ \t]*/, "", l); suites = l }
                    if (l ~ /^Signed-By:/) { sub(/^Signed-By:[ \t]*/, "", l); key = l }
                }
                if ((" " types " ") ~ / deb / && (" " suites " ") ~ (" " code " ") && uri != "") {
                    split(uri, u, /[ \t]+/); print u[1], key; exit
                }
            }' "$f"
    done
    if [ -r /etc/apt/sources.list ]; then
        awk -v code="$code" '$1 == "deb" {
                i = 2; key = ""
                if ($2 ~ /^\[/) {
                    while (i <= NF) {
                        if ($i ~ /signed-by=/) { key = $i; sub(/.*signed-by=/, "", key); sub(/\]$/, "", key) }
                        if ($i ~ /\]$/) { i++; break }
                        i++
                    }
                }
                if ($(i + 1) == code) { print $i, key; exit }
            }' /etc/apt/sources.list
    fi
}

# extract DEB DIR: unpacks once (DIR/.deb names the package file).
extract() {
    local deb=$1 dir=$2
    if [ "$(cat "$dir/.deb" 2>/dev/null || true)" != "$(basename "$deb")" ]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        dpkg-deb -x "$deb" "$dir"
        basename "$deb" >"$dir/.deb"
    fi
}
# kernel_tree DIR: sets KVER, VMLINUZ, MODDIR of an unpacked kernel package.
kernel_tree() {
    local dir=$1
    VMLINUZ=$(compgen -G "$dir/boot/vmlinuz-*" | head -1) || die "no boot/vmlinuz-* in $dir"
    KVER=${VMLINUZ##*/vmlinuz-}
    MODDIR=
    for MODDIR in "$dir/lib/modules/$KVER" "$dir/usr/lib/modules/$KVER"; do [ -d "$MODDIR" ] && break; done
    [ -d "$MODDIR" ] || die "no lib/modules/${KVER} in $dir"
    if [ ! -s "$MODDIR/modules.dep" ]; then
        depmod -b "$dir" "$KVER" 2>/dev/null || depmod -b "$dir/usr" "$KVER" || die "depmod of ${KVER} failed"
    fi
    [ -s "$MODDIR/modules.dep" ] || die "no modules.dep for ${KVER} in $dir after depmod"
}

# mod_order MODDIR NAME...: the modules NAME need, dependencies first, as
# paths relative to MODDIR; built-in modules are left out.
mod_order() {
    local moddir=$1
    shift
    awk -v want="$*" '
        function norm(p,  b) { b = p; sub(/.*\//, "", b); sub(/\.ko(\.(xz|zst|gz))?$/, "", b); gsub(/-/, "_", b); return b }
        function visit(p,  n, d, i) {
            if (p in done) return
            done[p] = 1
            n = split(deps[p], d, " ")
            for (i = n; i >= 1; i--) visit(d[i])
            print p
        }
        FILENAME ~ /modules\.builtin$/ { builtin[norm($1)] = 1; next }
        {
            p = $1; sub(/:$/, "", p)
            deps[p] = ""
            for (i = 2; i <= NF; i++) deps[p] = deps[p] " " $i
            path[norm(p)] = p
        }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) {
                m = w[i]; gsub(/-/, "_", m)
                if (m in path) visit(path[m])
                else if (!(m in builtin)) { print "MISSING " m; bad = 1 }
            }
            exit bad
        }' "$moddir/modules.builtin" "$moddir/modules.dep"
}
# install_modules MODDIR DEST NAME...: decompressed DEST/<name>.ko files, and
# the load order (normalised names) on stdout.
install_modules() {
    local moddir=$1 dest=$2 list p b
    shift 2
    list=$(mod_order "$moddir" "$@") || die "modules missing in ${moddir}: $(echo "$list" | grep MISSING | tr '\n' ' ')"
    mkdir -p "$dest"
    for p in $list; do
        b=${p##*/}
        b=${b%%.ko*}
        b=${b//-/_}
        case $p in
        *.ko.xz) xz -dc "$moddir/$p" >"$dest/$b.ko" ;;
        *.ko.zst) zstd -qdc "$moddir/$p" >"$dest/$b.ko" ;;
        *.ko.gz) gzip -dc "$moddir/$p" >"$dest/$b.ko" ;;
        *) cp "$moddir/$p" "$dest/$b.ko" ;;
        esac
        echo "$b"
    done
}
