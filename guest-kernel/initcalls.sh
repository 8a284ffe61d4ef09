#!/usr/bin/env bash
# Lists the slowest initcalls of a guest boot, by name.
#
#   guest-kernel/initcalls.sh CONSOLE_LOG [SYSTEM_MAP] [COUNT]
#
# CONSOLE_LOG is the guest's console output from a boot with
# `initcall_debug loglevel=8` on the kernel command line. The kernel has no
# kallsyms, so it prints each initcall as an address; SYSTEM_MAP (default: the
# installed $AIRLOCK_HOME/images/vmlinux.System.map) turns them into names.
# Prints "usecs name" for the COUNT (default 20) slowest ones.
set -euo pipefail
log=${1:?usage: initcalls.sh CONSOLE_LOG [SYSTEM_MAP] [COUNT]}
map=${2:-${AIRLOCK_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/airlock}/images/vmlinux.System.map}
count=${3:-20}
[ -f "$map" ] || { echo "initcalls.sh: no System.map at $map" >&2; exit 1; }
# "initcall 0xffffffff81c1f0a3 returned 0 after 1234 usecs"
grep -ao 'initcall 0x[0-9a-f]* returned -\?[0-9]* after [0-9]* usecs' "$log" |
    awk '{ print $6, substr($2, 3) }' |
    sort -k1,1nr | head -n "$count" |
    while read -r usecs addr; do
        name=$(awk -v a="$addr" '$1 == a { print $3; exit }' "$map")
        printf '%9s %s\n' "$usecs" "${name:-0x$addr}"
    done
