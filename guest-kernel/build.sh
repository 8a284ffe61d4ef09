#!/usr/bin/env bash
# Builds Airlock's guest kernel (vmlinux) from Debian's linux-source-6.1 with
# the config fragment and patches in this directory, caches it outside the
# clone, and installs it as $AIRLOCK_HOME/images/vmlinux.
#
# Cache: ${AIRLOCK_CACHE:-$XDG_CACHE_HOME/airlock}/kernel/<key>/ where key is a
# SHA-256 over this script, the fragment, every patch and the source package's
# version. A second run with the same inputs skips the build.
# Progress goes to stderr; the installed path is the last line on stdout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${AIRLOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/airlock}
images=${AIRLOCK_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/airlock}/images
source_tarball=/usr/src/linux-source-6.1.tar.xz
deps=(linux-source-6.1 bc bison flex libelf-dev libssl-dev gcc make xz-utils binutils util-linux)

log() { echo "guest-kernel: $*" >&2; }

"$here/../scripts/ensure-packages.sh" "${deps[@]}"

version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "linux-source-6.1 $version"; cat "$0" "$here/airlock.config" "$here"/patches/*.patch; } | sha256sum | cut -c1-16)
cached="$cache_root/kernel/$key"

# One build per key at a time: a second run waits, then finds the cache filled.
mkdir -p "$cache_root/kernel"
exec 9>"$cache_root/kernel/.lock-$key"
flock 9

install_image() {
    mkdir -p "$images"
    cp "$cached/vmlinux" "$images/.vmlinux.tmp.$$"
    mv -f "$images/.vmlinux.tmp.$$" "$images/vmlinux"
    cp "$cached/System.map" "$images/.System.map.tmp.$$"
    mv -f "$images/.System.map.tmp.$$" "$images/vmlinux.System.map"
    echo "$images/vmlinux"
}

if [ -f "$cached/vmlinux" ]; then
    log "cache hit ($cached)"
    install_image
    exit 0
fi

work="$cache_root/kernel/build-$key"
rm -rf "$work"
mkdir -p "$work"
# Object trees left behind by a background deletion that never finished.
for t in "$cache_root"/kernel/.trash-*; do
    [ -e "$t" ] && { rm -rf "$t" </dev/null >/dev/null 2>&1 9>&- & }
done
start=$(date +%s)
# Unpacking writes 1.5 GB, most of it never read by this configuration: leave
# out the documentation text, device trees, and the C and assembly sources of
# other architectures and of driver trees the fragment keeps off (graphics,
# network drivers, media, staging, USB, InfiniBand, sound). Kconfig files and
# Makefiles stay everywhere (crypto/Kconfig sources every architecture's), so
# configuring and descending into those directories still works. A fragment
# that enables a driver in one of these trees must drop it from this list.
# The tarball is xz in many blocks, so xz decompresses it on all cores.
skip=(
    --exclude='linux-source-6.1/Documentation/*/*'
    --exclude='linux-source-6.1/arch/*/boot/dts'
    --exclude='linux-source-6.1/arch/[!x]*/*.[chS]'
)
# (drivers/net itself keeps its top-level files: loopback.c is built with NET.)
for d in drivers/gpu 'drivers/net/*' drivers/media drivers/staging drivers/usb drivers/infiniband sound; do
    skip+=(--exclude="linux-source-6.1/$d/*.[chS]")
done
log "unpacking linux-source-6.1 $version into $work"
xz -T0 -dc "$source_tarball" | tar -x -C "$work" "${skip[@]}"
src="$work/linux-source-6.1"
for p in "$here"/patches/*.patch; do
    log "applying $(basename "$p")"
    patch -p1 -s -d "$src" < "$p"
done

log "configuring: tinyconfig + airlock.config"
make -s -C "$src" ARCH=x86_64 tinyconfig >"$work/build.log" 2>&1
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/airlock.config" >>"$work/build.log" 2>&1
make -s -C "$src" ARCH=x86_64 olddefconfig >>"$work/build.log" 2>&1

# Kconfig silently drops options whose dependencies are off: check that every
# option the fragment sets (or unsets) made it into the final .config.
bad=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            opt=${line%%=*}
            grep -qx "$line" "$src/.config" || { log "option $line did not survive (final: $(grep -E "^$opt=|^# $opt is not set" "$src/.config" || echo absent))"; bad=1; } ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }; opt=${opt%% *}
            if grep -q "^$opt=" "$src/.config"; then log "option $opt should be off but is $(grep "^$opt=" "$src/.config")"; bad=1; fi ;;
    esac
done < "$here/airlock.config"
[ $bad -eq 0 ] || { log "the config fragment does not apply cleanly: fix guest-kernel/airlock.config"; exit 1; }

log "building vmlinux with $(nproc) jobs (log: $work/build.log)"
# A fixed build user, host and date keep the banner (and so the image) the same
# from one build of the same inputs to the next.
export KBUILD_BUILD_USER=airlock KBUILD_BUILD_HOST=airlock \
       KBUILD_BUILD_TIMESTAMP="$(date -u -d "@$(stat -c %Y "$source_tarball")")"
if ! make -C "$src" ARCH=x86_64 -j"$(nproc)" vmlinux >>"$work/build.log" 2>&1; then
    tail -40 "$work/build.log" >&2
    log "kernel build failed; full log in $work/build.log"
    exit 1
fi

# The VMM loads vmlinux by its PT_LOAD segments at their physical addresses:
# check they are there and physical (below 4 GiB), then drop the symbol table
# (about 1 MB; System.map keeps the addresses).
loads=$(readelf -lW "$src/vmlinux" | awk '$1 == "LOAD" { print $4 }')
[ -n "$loads" ] || { log "vmlinux has no PT_LOAD segments"; exit 1; }
for paddr in $loads; do
    (( paddr >= 0 && paddr < 0x100000000 )) || { log "vmlinux PT_LOAD at physical address $paddr: not a physical load address"; exit 1; }
done
mkdir -p "$cached.tmp"
strip --strip-all -o "$cached.tmp/vmlinux" "$src/vmlinux"
cp "$src/System.map" "$src/.config" "$cached.tmp/"
rm -rf "$cached"
mv "$cached.tmp" "$cached"
# Deleting the object tree takes tens of seconds on a busy disk: do it in the
# background, detached from stdout and from the lock.
mv "$work" "$cache_root/kernel/.trash-$key-$$"
rm -rf "$cache_root/kernel/.trash-$key-$$" </dev/null >/dev/null 2>&1 9>&- &
log "built in $(( $(date +%s) - start )) s: vmlinux $(stat -c %s "$cached/vmlinux") bytes"
install_image
