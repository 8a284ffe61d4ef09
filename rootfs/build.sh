#!/usr/bin/env bash
# Builds Airlock's default root filesystem from Debian's busybox-static, with no
# loop mounts: a staging directory becomes rootfs.ext4 (mke2fs -d) and
# initramfs.cpio (cpio, uncompressed: gunzip in an emulated guest kernel took 83 s for 1 MB). Installs both into $AIRLOCK_HOME/images.
#
#   rootfs/build.sh [--init PATH] [--out DIR]
#
# --init PATH installs PATH (the guest agent, a static binary) as /sbin/init;
# without it a placeholder init mounts the basics, prints AIRLOCK-READY and
# reboots. The build is skipped when a stamp of its inputs matches.
# Progress goes to stderr; the images' paths are the last lines on stdout.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${AIRLOCK_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/airlock}/images
init="$here/placeholder-init"
while [ $# -gt 0 ]; do
    case "$1" in
        --init) init=${2:?--init needs a path}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "rootfs/build.sh: unknown option '$1' (use --init PATH or --out DIR)" >&2; exit 2 ;;
    esac
done
[ -f "$init" ] || { echo "rootfs/build.sh: --init '$init' is not a file" >&2; exit 2; }

log() { echo "rootfs: $*" >&2; }
deps=(busybox-static e2fsprogs cpio)
"$here/../scripts/ensure-packages.sh" "${deps[@]}"

key=$( { cat "$0" "$init"; dpkg-query -W -f='${Version}' busybox-static; } | sha256sum | cut -c1-16)
stamp="$out/.rootfs.stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ -f "$out/rootfs.ext4" ] && [ -f "$out/initramfs.cpio" ]; then
    log "up to date ($key)"
    echo "$out/rootfs.ext4"
    echo "$out/initramfs.cpio"
    exit 0
fi

mkdir -p "$out"
stage=$(mktemp -d "${TMPDIR:-/tmp}/airlock-rootfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# Directory skeleton.
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,mnt,root,home/airlock,var/tmp,workspace}
chmod 1777 "$stage/tmp" "$stage/var/tmp"
chmod 700 "$stage/root"

# busybox and one symlink per applet, at the paths busybox itself lists.
cp /bin/busybox "$stage/bin/busybox"
/bin/busybox --list-full | while read -r applet; do
    [ "$applet" = "bin/busybox" ] && continue
    [ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
done

# init: the agent or the placeholder.
rm -f "$stage/sbin/init"
install -m 0755 "$init" "$stage/sbin/init"
ln -s /sbin/init "$stage/init"   # rdinit=/init when booted as an initramfs

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
proc   /proc proc  defaults       0 0
sysfs  /sys  sysfs defaults       0 0
tmpfs  /tmp  tmpfs mode=1777      0 0
tmpfs  /run  tmpfs mode=755       0 0
FSTAB
echo airlock > "$stage/etc/hostname"
printf '127.0.0.1 localhost airlock\n' > "$stage/etc/hosts"
cat > "$stage/etc/profile" <<'PROFILE'
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=${HOME:-/root}
PROFILE
chown -R 1000:1000 "$stage/home/airlock"

# ext4: the staging size plus room for metadata and a little scratch, in MiB.
used_kib=$(du -sk "$stage" | cut -f1)
size_mib=$(( (used_kib * 13 / 10) / 1024 + 4 ))
[ $size_mib -le 16 ] || log "warning: rootfs.ext4 is $size_mib MiB, over the 16 MiB target"
# No journal: the image is rebuilt, never repaired, and a journal costs space and writes.
mke2fs -q -F -t ext4 -O ^has_journal -L airlock-root -E root_owner=0:0 -d "$stage" \
    "$out/.rootfs.ext4.tmp" "${size_mib}M" >&2
mv -f "$out/.rootfs.ext4.tmp" "$out/rootfs.ext4"

# Uncompressed: on a PVM host the guest kernel's gunzip is emulated and took
# 83 s for this 1 MB archive, against 19 s to unpack the 2 MB plain one.
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) > "$out/.initramfs.tmp"
mv -f "$out/.initramfs.tmp" "$out/initramfs.cpio"

echo "$key" > "$stamp"
log "rootfs.ext4 $(stat -c %s "$out/rootfs.ext4") bytes, initramfs.cpio $(stat -c %s "$out/initramfs.cpio") bytes"
echo "$out/rootfs.ext4"
echo "$out/initramfs.cpio"
