#!/usr/bin/env bash
# Sequential read throughput of virtio-blk inside the guest against the host's
# own read of the same file, in one run.
#
#   bench/blk-throughput.sh [SIZE_MIB]     (default 256; `make bench-blk`)
#
# The guest runs `dd if=/dev/vdb of=/dev/null bs=1M iflag=direct` from its
# init, timed with /proc/uptime; Debian's busybox dd prints no timing, and a
# fork and exec costs seconds of emulated kernel work on a PVM host, so the
# guest also times a 1-block dd and that start-up cost is subtracted. The host
# runs GNU dd on the backing file (iflag=direct, so the page cache flatters
# neither side) before and after the guest.
set -euo pipefail
size_mib=${1:-256}
here=$(cd "$(dirname "$0")/.." && pwd)
images=${AIRLOCK_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/airlock}/images
work=$(mktemp -d "${TMPDIR:-/tmp}/airlock-bench-blk.XXXXXX")
trap 'rm -rf "$work"' EXIT

airlock="$(cd "$here" && swift build -c release --product airlock >&2 && swift build -c release --show-bin-path)/airlock"
[ -f "$images/vmlinux" ] || { echo "no guest kernel in $images: run 'make images'" >&2; exit 1; }

cat > "$work/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
read a _ < /proc/uptime
dd if=/dev/vdb of=/dev/null bs=1M count=1 iflag=direct 2>/dev/null
read b _ < /proc/uptime
dd if=/dev/vdb of=/dev/null bs=1M iflag=direct 2>/dev/null
read c _ < /proc/uptime
echo "GUEST-DD $a $b $c" > /dev/console
reboot -f
INIT
chmod +x "$work/init"
"$here/rootfs/build.sh" --init "$work/init" --out "$work" >/dev/null 2>&1

dd if=/dev/urandom of="$work/disk.img" bs=1M count="$size_mib" status=none
sync

host=$(dd if="$work/disk.img" of=/dev/null bs=1M iflag=direct 2>&1 | tail -1)
guest=$("$airlock" boot --kernel "$images/vmlinux" --rootfs "$work/rootfs.ext4" --disk "$work/disk.img" \
        --memory 128 --timeout 600 2>/dev/null | grep "GUEST-DD" | tail -1 | sed 's/.*GUEST-DD //')
host2=$(dd if="$work/disk.img" of=/dev/null bs=1M iflag=direct 2>&1 | tail -1)

[ -n "$guest" ] || { echo "the guest printed no timing: boot it by hand to see why" >&2; exit 1; }
rate() {  # bytes and seconds from a GNU dd summary line -> MB/s
    echo "$1" | sed -E 's/^([0-9]+) bytes.* copied, ([0-9.]+) s.*/\1 \2/' | awk '{ if ($2 > 0) printf "%.1f", $1 / $2 / 1e6; else print "0" }'
}
h=$(rate "$host"); h2=$(rate "$host2")
read -r a b c <<<"$guest"
g=$(awk -v a="$a" -v b="$b" -v c="$c" -v n="$size_mib" 'BEGIN { t = (c - b) - (b - a); if (t <= 0) t = c - b; printf "%.1f", n * 1048576 / t / 1e6 }')
echo "file: $size_mib MiB"
echo "host  (before): $host"
echo "host  (after) : $host2"
echo "guest: 1-block dd $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", b - a }') s, whole-disk dd $(awk -v b="$b" -v c="$c" 'BEGIN { printf "%.2f", c - b }') s (guest clock)"
hm=$(echo "$h $h2" | awk '{ printf "%.1f", ($1 + $2) / 2 }')
echo "host ${hm} MB/s (mean of before/after), guest ${g} MB/s, ratio guest/host: $(echo "$g $hm" | awk '{ if ($2 > 0) printf "%.3f", $1 / $2 }')"
