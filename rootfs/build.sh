#!/usr/bin/env bash
# Builds Airlock's default root filesystem from Debian's busybox-static, with no
# loop mounts: a staging directory becomes
#   rootfs.ext4         (mke2fs -d; the VMM's default root, on virtio-blk)
#   initramfs.cpio      (newc cpio, uncompressed: what the VMM loads with --initrd,
#                        because gunzip in an emulated guest kernel took 83 s for 1 MB)
#   initramfs.cpio.gz   (the same archive gzip-compressed, for hosts with
#                        hardware virtualization and other boot loaders)
# and installs them into $AIRLOCK_HOME/images.
#
#   rootfs/build.sh [--agent PATH] [--init PATH] [--out DIR]
#
# --agent PATH installs PATH (airlock-init, Airlock's guest agent: a static
# binary) as /sbin/airlock-init, which `airlock run` boots with
# init=/sbin/airlock-init. --init PATH installs PATH as /sbin/init, what a
# plain boot (`airlock boot`) runs; without it a placeholder init mounts the
# basics, prints AIRLOCK-READY and reboots. The build is skipped when a stamp
# of its inputs matches.
# Progress goes to stderr; the images' paths are the last lines on stdout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${AIRLOCK_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/airlock}/images
init="$here/placeholder-init"
agent=""
while [ $# -gt 0 ]; do
    case "$1" in
        --agent) agent=${2:?--agent needs a path}; shift 2 ;;
        --init) init=${2:?--init needs a path}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "rootfs/build.sh: unknown option '$1' (use --agent PATH, --init PATH or --out DIR)" >&2; exit 2 ;;
    esac
done
[ -f "$init" ] || { echo "rootfs/build.sh: --init '$init' is not a file" >&2; exit 2; }
[ -z "$agent" ] || [ -f "$agent" ] || { echo "rootfs/build.sh: --agent '$agent' is not a file: build it with 'make agent'" >&2; exit 2; }

log() { echo "rootfs: $*" >&2; }
deps=(busybox-static e2fsprogs cpio gzip util-linux)
"$here/../scripts/ensure-packages.sh" "${deps[@]}"

images=(rootfs.ext4 initramfs.cpio initramfs.cpio.gz)
print_paths() { for f in "${images[@]}"; do echo "$out/$f"; done; }

# The key covers everything the images are made of: this script, the init and
# agent it installs and the busybox it copies.
key=$( { cat "$0" "$init" ${agent:+"$agent"}; dpkg-query -W -f='${Version}' busybox-static; } | sha256sum | cut -c1-64)
stamp="$out/.rootfs.stamp"
mkdir -p "$out"
exec 9>"$out/.rootfs.lock"
flock 9
up_to_date=1
[ -f "$stamp" ] && [ "$(cat "$stamp")" = "${key:0:16}" ] || up_to_date=0
for f in "${images[@]}"; do [ -f "$out/$f" ] || up_to_date=0; done
if [ $up_to_date -eq 1 ]; then
    log "up to date (${key:0:16})"
    print_paths
    exit 0
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/airlock-rootfs.XXXXXX")
trap 'rm -rf "$stage"; rm -f "$out"/.*.tmp.$$' EXIT

# Directory skeleton.
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,mnt,root,home/airlock,var/tmp,workspace}
chmod 755 "$stage"
chmod 1777 "$stage/tmp" "$stage/var/tmp"
chmod 700 "$stage/root"

# busybox and one symlink per applet, at the paths busybox itself lists.
install -m 0755 /bin/busybox "$stage/bin/busybox"
/bin/busybox --list-full | while read -r applet; do
    [ "$applet" = "bin/busybox" ] && continue
    [ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
done

# init: the agent or the placeholder.
rm -f "$stage/sbin/init"
install -m 0755 "$init" "$stage/sbin/init"
ln -s /sbin/init "$stage/init"   # rdinit=/init when booted as an initramfs
[ -z "$agent" ] || install -m 0755 "$agent" "$stage/sbin/airlock-init"

# /dev/console, so that init has stdin, stdout and stderr when booted as an
# initramfs (no devtmpfs is mounted on /dev before the first init then; on a
# disk root the kernel mounts devtmpfs over it). Needs root: without it the
# init script still writes to /dev/console after mounting devtmpfs.
mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || log "not root: no /dev/console node in the images"

# /etc basics.
cat > "$stage/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
airlock:x:1000:1000:airlock:/home/airlock:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > "$stage/etc/group" <<'GROUP'
root:x:0:
airlock:x:1000:
nogroup:x:65534:
GROUP
cat > "$stage/etc/fstab" <<'FSTAB'
proc     /proc proc     defaults  0 0
devtmpfs /dev  devtmpfs mode=755  0 0
sysfs    /sys  sysfs    defaults  0 0
tmpfs    /tmp  tmpfs    mode=1777 0 0
tmpfs    /run  tmpfs    mode=755  0 0
FSTAB
echo airlock > "$stage/etc/hostname"
printf '127.0.0.1 localhost airlock\n' > "$stage/etc/hosts"
cat > "$stage/etc/profile" <<'PROFILE'
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=${HOME:-/root}
export PS1='airlock:\w\$ '
umask 022
PROFILE
chmod 644 "$stage"/etc/*
# Ownership is copied from the staging directory into both images: root owns
# everything but the airlock user's home. As another user the files would carry
# that user's ids, so say so.
cpio_owner=()
if [ "$(id -u)" -eq 0 ]; then
    chown -R 0:0 "$stage"
    chown -R 1000:1000 "$stage/home/airlock"
else
    log "warning: not root: files in rootfs.ext4 will be owned by uid $(id -u), not root"
    cpio_owner=(-R 0:0)
fi

# Reproducible-ish: fixed timestamps, UUID and directory hash seed derived from
# the key, sorted cpio entries with inode numbers independent of the host.
epoch=${SOURCE_DATE_EPOCH:-1700000000}
find "$stage" -exec touch -h -d "@$epoch" {} +
uuid="${key:0:8}-${key:8:4}-4${key:13:3}-8${key:17:3}-${key:20:12}"

# ext4: the staging size plus room for metadata and a little scratch, in MiB.
used_kib=$(du -sk "$stage" | cut -f1)
size_mib=$(( (used_kib * 13 / 10) / 1024 + 4 ))
[ $size_mib -le 16 ] || log "warning: rootfs.ext4 is $size_mib MiB, over the 16 MiB target"
# No journal: the VMM attaches the image read-only and rebuilds rather than
# repairs it; a journal would cost 4 MiB and the guest's writes to it.
: > "$out/.rootfs.ext4.tmp.$$"
E2FSPROGS_FAKE_TIME=$epoch mke2fs -q -F -t ext4 -O ^has_journal -L airlock-root -U "$uuid" \
    -E root_owner=0:0,hash_seed="$uuid" -d "$stage" "$out/.rootfs.ext4.tmp.$$" "${size_mib}M" >&2
# mke2fs -d keeps each file's mtime but stamps atime and ctime with the build
# time: reset them so that the same inputs give the same image bytes.
{ (cd "$stage" && find . -mindepth 1 | sed 's|^\.||'); echo /lost+found; echo /; } |
    while IFS= read -r p; do printf 'sif "%s" atime @%s\nsif "%s" ctime @%s\n' "$p" "$epoch" "$p" "$epoch"; done |
    E2FSPROGS_FAKE_TIME=$epoch debugfs -w -f - "$out/.rootfs.ext4.tmp.$$" >/dev/null 2>&1 ||
    log "warning: debugfs could not reset inode times (the image is fine, only less reproducible)"
mv -f "$out/.rootfs.ext4.tmp.$$" "$out/rootfs.ext4"

# The agent stays out of the initramfs: `airlock run` boots from the disk, and
# unpacking 7 MB more in an emulated guest kernel would cost a minute.
(cd "$stage" && find . ! -path ./sbin/airlock-init -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc "${cpio_owner[@]}" --reproducible --quiet) > "$out/.initramfs.cpio.tmp.$$"
gzip -9 -n -c "$out/.initramfs.cpio.tmp.$$" > "$out/.initramfs.cpio.gz.tmp.$$"
mv -f "$out/.initramfs.cpio.tmp.$$" "$out/initramfs.cpio"
mv -f "$out/.initramfs.cpio.gz.tmp.$$" "$out/initramfs.cpio.gz"

echo "${key:0:16}" > "$out/.rootfs.stamp.tmp.$$"
mv -f "$out/.rootfs.stamp.tmp.$$" "$stamp"
for f in "${images[@]}"; do log "$f: $(stat -c %s "$out/$f") bytes"; done
print_paths
