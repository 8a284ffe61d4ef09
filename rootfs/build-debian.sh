#!/usr/bin/env bash
# Optional: builds a Debian root filesystem for Airlock guests, as
# rootfs-NAME.ext4 in $AIRLOCK_HOME/images (not built by `make images`):
#   rootfs-debian.ext4  (the default): python3
#   rootfs-build.ext4   (`make rootfs-build`): the toolchain image, with
#                       build-essential, make, python3 and git, and the agent
#
#   rootfs/build-debian.sh [--name NAME] [--agent PATH] [--init PATH] [--out DIR]
#                          [--suite SUITE] [--mirror URL] [--include PKG,PKG...] [--force]
#
# debootstrap --variant=minbase (Debian's required packages only) plus python3,
# busybox-static and --include's packages, trimmed of documentation, man pages,
# locales and apt's caches, then made into ext4 with mke2fs -d, no loop mounts.
# /sbin/init is the same placeholder as the default image (or --init PATH);
# --agent PATH installs Airlock's guest agent as /sbin/airlock-init, which
# `airlock run --image NAME` boots. Needs root (debootstrap unpacks packages as
# root and runs their scripts in a chroot) and network access to the mirror.
#
# The image is rebuilt only when this script, the init, the agent, the suite,
# the mirror or the package list change, or with --force (the mirror's packages
# move on, so two builds of the same inputs can still differ in package versions).
# Progress goes to stderr; the image's path is the last line on stdout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${AIRLOCK_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/airlock}/images
init="$here/placeholder-init"
suite=bookworm
mirror=http://deb.debian.org/debian
include=python3-minimal,python3,busybox-static
name=debian
agent=""
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --name) name=${2:?--name needs a name}; shift 2 ;;
        --agent) agent=${2:?--agent needs a path}; shift 2 ;;
        --init) init=${2:?--init needs a path}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --suite) suite=${2:?--suite needs a name}; shift 2 ;;
        --mirror) mirror=${2:?--mirror needs a URL}; shift 2 ;;
        --include) include="$include,${2:?--include needs packages}"; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "rootfs/build-debian.sh: unknown option '$1'" >&2; exit 2 ;;
    esac
done
[ -f "$init" ] || { echo "rootfs/build-debian.sh: --init '$init' is not a file" >&2; exit 2; }
[ -z "$agent" ] || [ -f "$agent" ] || { echo "rootfs/build-debian.sh: --agent '$agent' is not a file: build it with 'make agent'" >&2; exit 2; }
case "$name" in *[!a-z0-9-]*|"") echo "rootfs/build-debian.sh: --name '$name' must be lower-case letters, digits and '-'" >&2; exit 2 ;; esac

log() { echo "rootfs-$name: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "must run as root (debootstrap installs packages into a chroot)"; exit 1; }
"$here/../scripts/ensure-packages.sh" debootstrap debian-archive-keyring e2fsprogs util-linux

image=rootfs-$name.ext4
# Two keys: the packages' (what debootstrap made: a rebuild takes minutes) and the
# agent's (a new agent is written into the existing image with debugfs, in a second).
key=$( { cat "$0" "$init"; echo "$suite $mirror $include"; } | sha256sum | cut -c1-16)
agent_key=$( { [ -z "$agent" ] || cat "$agent"; } | sha256sum | cut -c1-16)
stamp="$out/.rootfs-$name.stamp"
mkdir -p "$out"
exec 9>"$out/.rootfs-$name.lock"
flock 9
if [ $force -eq 0 ] && [ -f "$stamp" ] && [ -f "$out/$image" ] && [ "$(head -1 "$stamp")" = "$key" ]; then
    if [ "$(sed -n 2p "$stamp")" = "$agent_key" ]; then
        log "up to date ($key; --force rebuilds)"
        echo "$out/$image"
        exit 0
    fi
    if [ -n "$agent" ]; then
        # Same packages, new agent: replace /sbin/airlock-init in a copy, then rename it into place.
        # debugfs follows no symlinks in paths, and bookworm's /sbin is one (to usr/sbin).
        cp --sparse=always "$out/$image" "$out/.$image.tmp.$$"
        dir=/sbin
        debugfs -R "stat /usr/sbin/airlock-init" "$out/.$image.tmp.$$" 2>/dev/null | grep -q "Type: regular" && dir=/usr/sbin
        printf 'cd %s\nrm airlock-init\nwrite %s airlock-init\nsif airlock-init mode 0100755\nsif airlock-init uid 0\nsif airlock-init gid 0\n' "$dir" "$agent" |
            debugfs -w -f - "$out/.$image.tmp.$$" >/dev/null 2>"$out/.$image.debugfs.$$" || true
        if ! grep -q "not a directory\|not found\|Could not" "$out/.$image.debugfs.$$" &&
           debugfs -R "stat $dir/airlock-init" "$out/.$image.tmp.$$" 2>/dev/null | grep -q "Size: $(stat -c %s "$agent")\b"; then
            mv -f "$out/.$image.tmp.$$" "$out/$image"
            rm -f "$out/.$image.debugfs.$$"
            printf '%s\n%s\n' "$key" "$agent_key" > "$stamp"
            log "new agent written into $image"
            echo "$out/$image"
            exit 0
        fi
        rm -f "$out/.$image.tmp.$$" "$out/.$image.debugfs.$$"
        log "could not write the new agent into $image; rebuilding it"
    fi
fi

stage=$(mktemp -d "${TMPDIR:-/var/tmp}/airlock-$name.XXXXXX")
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
[ -z "$agent" ] || install -m 0755 "$agent" "$stage/sbin/airlock-init"

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
mke2fs -q -F -t ext4 -O ^has_journal -L "airlock-$name" -E root_owner=0:0 -d "$stage" \
    "$out/.$image.tmp.$$" "${size_mib}M" >&2
mv -f "$out/.$image.tmp.$$" "$out/$image"
printf '%s\n%s\n' "$key" "$agent_key" > "$stamp"
log "$image: $size_mib MiB ($used_kib KiB of files) in $(( $(date +%s) - start )) s"
echo "$out/$image"
