#!/usr/bin/env bash
# Builds and runs the host probes behind docs/architecture.md's "Guest CPU fidelity" table.
# Run as root on the host in question: ./run.sh [PROBE ...] (default: all of them).
# Each prints what it observed; none changes the host. See README.md for what each settles.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${TMPDIR:-/tmp}/airlock-host-probes
mkdir -p "$out"
probes=("$@")
[ ${#probes[@]} -gt 0 ] || probes=(xcr0 ustate emu0 cpuid7 xfd amxleak)
for p in "${probes[@]}"; do
    gcc -O2 -o "$out/$p" "$here/$p.c"
    echo "== $p"
    case "$p" in
        xcr0) for m in 0 1 2; do "$out/xcr0" $m; done ;;
        ustate) for t in pkru fsgs rng avx512 amx xsave; do "$out/ustate" $t; done ;;
        cpuid7) "$out/cpuid7"; "$out/cpuid7" user; "$out/cpuid7" setpku; "$out/cpuid7" user setpku ;;
        amxleak) "$out/amxleak"; "$out/amxleak" perm ;;
        *) "$out/$p" ;;
    esac
done
