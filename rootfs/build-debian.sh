#!/usr/bin/env bash
# Optional: builds a Debian root filesystem with python3 for Airlock guests,
# as rootfs-debian.ext4 in $AIRLOCK_HOME/images (not built by `make images`).
#
#   rootfs/build-debian.sh [--init PATH] [--out DIR] [--suite SUITE] [--mirror URL]
#                          [--include PKG,PKG...] [--force]
#
# debootstrap --variant=minbase (Debian's required packages only) plus python3
# and busybox-static, trimmed of documentation, man pages, locales and apt's
# caches, then made into ext4 with mke2fs -d, no loop mounts. /sbin/init is the
# same placeholder as the default image (or --init PATH, the guest agent).
# Needs root (debootstrap unpacks packages as root and runs their scripts in a
# chroot) and network access to the Debian mirror.
#
# The image is rebuilt only when this script, the init, the suite, the mirror
# or the package list change, or with --force (the mirror's packages move on,
# so two builds of the same inputs can still differ in package versions).
# Progress goes to stderr; the image's path is the last line on stdout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${AIRLOCK_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/airlock}/images
init="$here/placeholder-init"
suite=bookworm
mirror=http://deb.debian.org/debian
include=python3-minimal,python3,busybox-static
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --init) init=${2:?--init needs a path}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --suite) suite=${2:?--suite needs a name}; shift 2 ;;
        --mirror) mirror=${2:?--mirror needs a URL}; shift 2 ;;
        --include) include="$include,${2:?--include needs packages}"; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "rootfs/build-debian.sh: unknown option '$1'" >&2; exit 2 ;;
    esac
done
[ -f "$init" ] || { echo "rootfs/build-debian.sh: --init '$init' is not a file" >&2; exit 2; }

log() { echo "rootfs-debian: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "must run as root (debootstrap installs packages into a chroot)"; exit 1; }
"$here/../scripts/ensure-packages.sh" debootstrap debian-archive-keyring e2fsprogs util-linux

image=rootfs-debian.ext4
key=$( { cat "$0" "$init"; echo "$suite $mirror $include"; } | sha256sum | cut -c1-16)
stamp="$out/.rootfs-debian.stamp"
mkdir -p "$out"
exec 9>"$out/.rootfs-debian.lock"
flock 9
if [ $force -eq 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ -f "$out/$image" ]; then
    log "up to date ($key; --force rebuilds)"
    echo "$out/$image"
    exit 0
fi

stage=$(mktemp -d "${TMPDIR:-/var/tmp}/airlock-debian.XXXXXX")
cleanup() {
    # debootstrap mounts proc and sys inside the target while it works; never
    # let rm cross into a mount left behind by a failed run.
    for m in proc sys dev/pts dev; do
        mountpoint -q "$stage/$m" 2>/dev/null && umount -l "$stage/$m" || true
    done
    rm -rf --one-file-system "$stage"
    rm -f "$out/.$image.tmp.$$"
}
trap cleanup EXIT

start=$(date +%s)
log "debootstrap $suite (minbase + $include) from $mirror into $stage"
if ! debootstrap --variant=minbase --include="$include" "$suite" "$stage" "$mirror" >"$stage.log" 2>&1; then
    tail -30 "$stage.log" >&2
    log "debootstrap failed; full log in $stage.log"
    exit 1
fi
rm -f "$stage.log"

# Users: Debian's base-passwd already has root and nobody; add airlock (1000).
chroot "$stage" /usr/sbin/groupadd -g 1000 airlock
chroot "$stage" /usr/sbin/useradd -u 1000 -g 1000 -m -d /home/airlock -s /bin/sh airlock
echo airlock > "$stage/etc/hostname"
printf '127.0.0.1 localhost airlock\n' > "$stage/etc/hosts"
cat > "$stage/etc/fstab" <<'FSTAB'
proc     /proc proc     defaults  0 0
devtmpfs /dev  devtmpfs mode=755  0 0
sysfs    /sys  sysfs    defaults  0 0
tmpfs    /tmp  tmpfs    mode=1777 0 0
tmpfs    /run  tmpfs    mode=755  0 0
FSTAB
mkdir -p "$stage/workspace"

# init, and the one command the placeholder needs that minbase lacks (minbase
# has no init system, so no reboot): busybox provides it.
rm -f "$stage/sbin/init"
install -m 0755 "$init" "$stage/sbin/init"
ln -sf /sbin/init "$stage/init"
[ -e "$stage/sbin/reboot" ] || ln -s /bin/busybox "$stage/sbin/reboot"

# Trim what a sandbox never reads; python's own files stay whole.
chroot "$stage" /usr/bin/apt-get clean
rm -rf "$stage"/var/lib/apt/lists/* "$stage"/var/cache/apt/*.bin \
       "$stage"/usr/share/doc/* "$stage"/usr/share/man/* "$stage"/usr/share/info/* \
       "$stage"/usr/share/locale/* "$stage"/var/log/*.log "$stage"/var/log/apt/* \
       "$stage"/var/cache/debconf/*-old "$stage"/var/lib/dpkg/*-old
# The root filesystem is attached read-only: python cannot write .pyc files, so
# it finds those Debian compiled at install time and otherwise works from source.

# ext4: the tree plus 20% and 32 MiB for metadata and scratch.
used_kib=$(du -sk --one-file-system "$stage" | cut -f1)
size_mib=$(( used_kib * 12 / 10 / 1024 + 32 ))
: > "$out/.$image.tmp.$$"
mke2fs -q -F -t ext4 -O ^has_journal -L airlock-debian -E root_owner=0:0 -d "$stage" \
    "$out/.$image.tmp.$$" "${size_mib}M" >&2
mv -f "$out/.$image.tmp.$$" "$out/$image"
echo "$key" > "$stamp"
log "$image: $size_mib MiB ($used_kib KiB of files) in $(( $(date +%s) - start )) s"
echo "$out/$image"
