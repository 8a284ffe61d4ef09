#!/usr/bin/env python3
"""Writes docs/benchmarks.md (and, through chart.py, docs/boot-timeline.svg)
from bench/results/latest.json. Every number in the page comes from that file;
the references and targets are quoted, and marked as such.

    bench/report.py [RESULTS] [--doc docs/benchmarks.md] [--svg docs/boot-timeline.svg]
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chart  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def num(x, digits=1):
    if x is None:
        return "-"
    if abs(x) >= 100 and digits <= 1:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def mmm(s, digits=1, unit="", scale=1.0):
    """'median (min to max, N=n)' of a stats dict."""
    if not s:
        return "-"
    u = f" {unit}" if unit else ""
    return (f"{num(s['median'] * scale, digits)}{u} ({num(s['min'] * scale, digits)} to "
            f"{num(s['max'] * scale, digits)}, N={s['n']})")


def cells(s, digits=1, scale=1.0):
    """Median, min, max cells of a table row."""
    if not s:
        return "- | - | -"
    return f"{num(s['median'] * scale, digits)} | {num(s['min'] * scale, digits)} | {num(s['max'] * scale, digits)}"


def bold_cells(s, digits=1, scale=1.0):
    """Like cells, with the median in bold."""
    if not s:
        return "- | - | -"
    return f"**{num(s['median'] * scale, digits)}** | {num(s['min'] * scale, digits)} | {num(s['max'] * scale, digits)}"


def verdict(ok):
    return "met" if ok else "**not met**"


def section_error(r, name):
    if r is None:
        return f"Not measured in this run (`--only` left out `{name}`).\n"
    if "error" in r:
        return f"This section failed in this run: `{r['error']}`.\n"
    return None


def summary(res):
    L = ["| figure | measured: median (min to max, N) | target / reference (quoted) | |", "| --- | --- | --- | --- |"]
    ex = res.get("exits") or {}
    if ex.get("ratio_of_medians"):
        r = ex["ratio_of_medians"]
        L.append(f"| port-I/O exit round trip, Airlock / C floor "
                 f"| **{r:.2f}x** (ratio of the medians, {num(ex['airlock_us_per_exit'], 2)} us vs {num(ex['c_floor_us_per_exit'], 2)} us "
                 f"per exit; per round {mmm(ex['ratio_per_round'], 2)}) "
                 f"| at most 1.2x | {verdict(r <= 1.2)} |")
    st = res.get("start") or {}
    if st.get("wall_ms"):
        L.append(f"| VMM start: `airlock boot` exec to first KVM_RUN, wall | **{mmm(st['wall_ms'], 1, 'ms')}** "
                 f"| under 10 ms; Firecracker: about 12 ms wall to its API socket | {verdict(st['wall_ms']['median'] < 10)} |")
        L.append(f"| the same, CPU (user + system, all threads) | **{mmm(st['cpu_ms'], 1, 'ms')}** | Firecracker: 8 CPU ms | |")
    mem = (res.get("memory") or {}).get("boot")
    if mem:
        L.append(f"| VMM memory beside the guest's (Rss minus the guest RAM's Rss), 128 MiB, 1 vCPU, during `airlock boot` "
                 f"| **{mmm(mem['vmm_mib'], 1, 'MiB')}**; of it file-backed (binary, shared libraries) {num(mem['vmm_file_mib']['median'], 1)} MiB, "
                 f"dirty {num(mem['vmm_dirty_mib']['median'], 1)} MiB"
                 + (f"; a Swift program that only waits, linked the same way: {num(fl['rss_mib'], 1)} MiB"
                    if (fl := (res.get('memory') or {}).get('floor')) and not fl.get('error') else "")
                 + f" | under 5 MiB; Firecracker: at most 5 MiB | {verdict(mem['vmm_mib']['median'] < 5)} |")
    blk = res.get("blk") or {}
    if blk.get("ratio") is not None:
        L.append(f"| virtio-blk sequential read, guest / host ({blk['size_mib']} MiB) | **{blk['ratio']:.3f}** "
                 f"({num(blk['guest_mbps']['median'], 1)} vs {num(blk['host_mbps']['median'], 0)} MB/s) | at least 0.8 | {verdict(blk['ratio'] >= 0.8)} |")
    bt = res.get("boot") or {}
    if bt.get("ready_ms"):
        L.append(f"| `airlock boot` exec to the placeholder init's AIRLOCK-READY | **{mmm(bt['ready_ms'], 2, 's', 1e-3)}** | no target on a PVM host | |")
    rn = res.get("run") or {}
    if rn.get("timings_ms"):
        t = rn["timings_ms"]
        L.append(f"| `airlock run -- true`, totalMs (its own JSON) | **{mmm(t['totalMs'], 2, 's', 1e-3)}** | no target on a PVM host | |")
        L.append(f"| `airlock run -- true`, first KVM_RUN to the agent's hello (`kernelBootMs`) | {mmm(t['kernelBootMs'], 2, 's', 1e-3)} | | |")
    elif rn and not rn.get("available", True):
        L.append(f"| `airlock run -- true` | not measured: {rn.get('reason')} | | |")
    ws = res.get("workspace") or {}
    for step, what in (("prepare", "workspace image of a {mib} MB tree of {files} files (mke2fs -d)"),
                       ("extract", "artifact extraction of the same {mib} MB, {files} files")):
        w = ws.get(step)
        if w:
            L.append(f"| {what.format(mib=ws['bytes'] >> 20, files=ws['files'])}, Airlock / `cp -a` "
                     f"| **{w['ratio_of_medians']:.2f}x** ({num(w['airlock_ms']['median'], 1)} ms vs {num(w['cp_ms']['median'], 1)} ms; "
                     f"per round {mmm(w['ratio_per_round'], 2)}) | at most 3x | {verdict(w['ratio_of_medians'] <= 3)} |")
    bd = res.get("build") or {}
    if bd.get("vm_wall_ms"):
        L.append(f"| C build and test with the toolchain image, `airlock run` wall / the same on the host "
                 f"| **{bd['wall_ratio']:,.0f}x** ({num(bd['vm_wall_ms']['median'] / 1000, 1)} s vs {num(bd['host_ms']['median'], 0)} ms; "
                 f"the command alone {bd['command_ratio']:,.0f}x) | no target on a PVM host | |")
    elif bd and not bd.get("available", True):
        L.append(f"| C build with the toolchain image | not measured: {bd.get('reason')} | | |")
    pv = res.get("pv") or {}
    if pv.get("modes"):
        nat, host, r = pv["modes"]["native"], pv["host"], pv["ratios"]
        kb = nat["run_true"]["kernelBootMs"]["median"]
        tot = nat["run_true"]["totalMs"]["median"]
        L.append(f"| native (PV mode): first KVM_RUN to the agent's hello (`kernelBootMs`) | **{mmm(nat['run_true']['kernelBootMs'], 0, 'ms')}** "
                 f"| at most 500 ms | {verdict(kb <= 500)} |")
        L.append(f"| native: `airlock run -- true` end to end (`totalMs`) | **{mmm(nat['run_true']['totalMs'], 0, 'ms')}** "
                 f"| at most 1 s | {verdict(tot <= 1000)} |")
        boot = nat["run_true"]["totalMs"]["median"] - nat["run_true"]["commandMs"]["median"]
        for key, what in [("pipeline", f"the pipeline `{pv['pipeline']}`"), ("wc", f"`head -c {nat['wc']['bytes']:,} /dev/zero | airlock run -- wc -c`")]:
            ratio = r[f"{key}_native_over_host"]
            hm = host["pipeline_ms"] if key == "pipeline" else host["wc_ms"]["native"]
            L.append(f"| native: {what}, the command in the guest / the host's own time | **{ratio:.1f}x** "
                     f"({num(nat[key]['command_ms'], 1)} vs {num(hm['median'], 1)} ms; plus the boot, {num(boot, 0)} ms) | at most 3x plus the boot | {verdict(ratio <= 3)} |")
        L.append(f"| native: one `getppid` round trip, guest / host | **{r['getppid_native_over_host']:.0f}x** "
                 f"({num(nat['getppid']['ns'] / 1e3, 2)} vs {num(host['getppid_ns'] / 1e3, 3)} us) | report (no target) | |")
    cx = res.get("ctxswitch") or {}
    if cx.get("ratio_of_medians"):
        L.append(f"| guest context switch with XSAVE completed by the VMM / legacy-state switch | **{cx['ratio_of_medians']:.2f}x** "
                 f"(+{cx['added_us_per_switch']:.1f} us) | correctness first: no target | |")
    sn = res.get("snapshot") or {}
    own = " (the snapshot section's own run)" if sn.get("separate_run") else ""
    emulated = res.get("snapshot_pv_off") or {}
    if emulated.get("restored"):
        r, c = emulated["restored"], emulated["cold"]
        L.append(f"| restored / cold, guest kernel emulated (`AIRLOCK_PV=off`, its own run): restore (`restoreMs`) / wall ratio "
                 f"| {mmm(r['restore_ms'], 1, 'ms')} / **{emulated['ratio_of_median_walls']:.3f}** "
                 f"({mmm(r['wall_ms'], 2, 's', 1e-3)} vs {mmm(c['wall_ms'], 2, 's', 1e-3)}) | restore instead of boot | |")
    if sn.get("restored"):
        r, c = sn["restored"], sn["cold"]
        hw = (res.get("host") or {}).get("vmx_or_svm")
        L.append(f"| restore's own cost: VMM building the VM from the snapshot (`restoreMs`), {sn['memory_mib']} MiB{own} "
                 f"| **{mmm(r['restore_ms'], 1, 'ms')}**; checks before it (`checkMs`) {mmm(r['check_ms'], 1, 'ms')}; "
                 f"request to first KVM_RUN {mmm(r['vmmStartMs'], 1, 'ms')} | at most 10 ms of VMM work on hardware KVM"
                 + (f" | {verdict(r['restore_ms']['median'] <= 10)} |" if hw else " (this host: reported, not a target) | |"))
        L.append(f"| `airlock run -- true` restored / cold (`--no-snapshot`), wall, alternating{own} "
                 f"| **{sn['ratio_of_median_walls']:.3f}** ({mmm(r['wall_ms'], 2, 's', 1e-3)} vs {mmm(c['wall_ms'], 2, 's', 1e-3)}; "
                 f"per round {mmm(sn['ratio_wall_per_round'], 3)}) | restore instead of boot | |")
    iv = sn.get("idle_vms") or {}
    if iv.get("count"):
        L.append(f"| {iv['count']} VMs restored from one snapshot, idle: private memory per VM beyond the pages its guest wrote{own} "
                 f"| **{mmm(iv['private_beyond_written_mib'], 2, 'MiB')}**; PSS {num(iv['pss_mib']['median'], 1)} MiB, "
                 f"Rss {num(iv['rss_mib']['median'], 1)} MiB, guest wrote {num(iv['guest_written_mib']['median'], 1)} MiB "
                 f"| under 5 MiB | {verdict(iv['private_beyond_written_mib']['median'] < 5)} |")
    for cr in sn.get("creates") or []:
        L.append(f"| snapshot of a {cr['memory_mib']} MiB guest: on disk / write time{own} | **{num(cr['allocated_mib'], 1)} MiB / "
                 f"{num(cr['write_ms'], 0)} ms** (file {cr['file_mib']} MiB with its holes; {cr['data_pages']} data pages) "
                 f"| only pages the guest touched | |")
    q = res.get("qemu") or {}
    if q.get("installed"):
        if q.get("booted"):
            L.append(f"| QEMU microvm, same kernel and rootfs, to AIRLOCK-READY | {mmm(q['ready_ms'], 2, 's', 1e-3)} | measured beside Airlock | |")
        else:
            a0 = q["attempts"][0]
            L.append(f"| QEMU microvm, same vmlinux and rootfs.ext4 | did not boot: {a0['exit']} after {a0['seconds']:.2f} s "
                     f"(`{(a0['last_output'] or ['?'])[-1]}`) | measured beside Airlock where it boots | |")
        if q.get("start"):
            qs = q["start"]
            L.append(f"| QEMU exec to first KVM_RUN ({qs['configuration']}), wall / CPU | {mmm(qs['wall_ms'], 1, 'ms')} / "
                     f"{mmm(qs['cpu_ms'], 1, 'ms')} | | |")
    elif q:
        L.append(f"| QEMU | not measured: {q.get('reason')} | | |")
    sv = res.get("serve") or {}
    if sv.get("vm_overhead_p50_ms") is not None:
        o = sv["vm_overhead_p50_ms"]
        L.append(f"| `airlock serve`: latency the service adds over the sandbox, p50 (median over the VM cells) "
                 f"| **{o:.2f} ms** (no VM behind it: {num(sv.get('scripted_overhead_p50_ms'), 2)} ms) | at most 2 ms | {verdict(o <= 2)} |")
    for key, what in (("soak_scripted", "scripted service"), ("soak_vm", "real VMs")):
        sk = sv.get(key)
        if sk:
            L.append(f"| `airlock serve` soak, {sk['requests']} requests ({what}): lost, crossed or duplicated answers; leaks "
                     f"| {sk['problem_count']} problems; leaks: {', '.join(sk['leaks']) or 'none'}; exit {sk['exit_status']} "
                     f"after SIGTERM | none, exit 0 | {verdict(sk.get('passed'))} |")
    return "\n".join(L) + "\n"


def exits_md(ex):
    err = section_error(ex, "exits")
    if err:
        return err
    return f"""The guest loop is `../shared/kvm-probes/micro.c`'s "100k out" case
(`mov rcx, 100000; L: out 0x80, al; dec rcx; jnz L`). The C floor is micro.c's
own set-up and run loop (`bench/exit-floor.c` includes micro.c and runs only
that case); Airlock runs the same loop (`airlock-bench-exits`) on a machine
built the way every Airlock machine is built (in-kernel irqchip, PIT, devices on
the bus) and through its real run loop (`VCPURunner` and `ExitHandler`; port
0x80 has no device, so each exit is a bus miss). The two alternate, one round
each in turn, {ex['c_floor_s']['n']} rounds, so that both see the same
neighbours; the ratio is taken between the medians, and per round.

| 100,000 exits | median (s) | min | max | per exit (median) |
| --- | --- | --- | --- | --- |
| C floor (micro.c) | {cells(ex['c_floor_s'], 4)} | {num(ex['c_floor_us_per_exit'], 2)} us |
| Airlock | {cells(ex['airlock_s'], 4)} | {num(ex['airlock_us_per_exit'], 2)} us |
| ratio Airlock / C, per round | {cells(ex['ratio_per_round'], 3)} | |
| **ratio of the medians** | **{ex['ratio_of_medians']:.3f}** | | | target at most 1.2 |

The exit cost on these shared hosts varies from run to run and day to day with
what runs beside it (see the min and max), which is why the ratio is taken
within one run.
"""


def start_md(res):
    st = res.get("start")
    err = section_error(st, "start")
    if err:
        return err
    host = res.get("host", {})
    kernel_mb = host.get("vmlinux_bytes")
    q = (res.get("qemu") or {}).get("start")
    ex = res.get("exits") or {}
    rn = res.get("run") or {}
    rows = [
        ("exec to first KVM_RUN (the figure)", "wall_ms", "cpu_ms"),
        ("exec to `main` (loading the binary, which has the Swift runtime linked in, and its C libraries)", "exec_to_main_ms", None),
        ("`main` to the first KVM ioctl (argument parsing, image paths, logging)", "main_to_first_kvm_ioctl_ms", None),
        ("KVM_CREATE_VM to the vCPU's KVM_SET_LAPIC (machine set-up: VM, irqchip, PIT, RAM slots, vCPU)", "machine_setup_ms", "machine_setup_cpu_ms"),
        ("then to KVM_SET_REGS (block device, kernel read and loaded, boot parameters)", "kernel_load_ms", "kernel_load_cpu_ms"),
        ("then to the first KVM_RUN (the vCPU thread starts)", "vcpu_thread_start_ms", None),
    ]
    L = [f"""`airlock boot --memory 128` with the installed kernel ({num(kernel_mb / 1e6, 1) + ' MB ' if kernel_mb else ''}vmlinux) and
root filesystem, started through `bench/exec-timed` (which stamps
CLOCK_MONOTONIC and execs it in the same process) with `bench/kvm-probe.so`
preloaded: the probe wraps ioctl(2), stamps the first KVM ioctl, KVM_CREATE_VM,
the last KVM_SET_LAPIC and KVM_SET_REGS, and at the first KVM_RUN records the
process's CPU time (getrusage, every thread) and ends the process. No hook in
the VMM; the binary measured is the `airlock` that ships (plus the probe, one
small preloaded library). One warm-up run is not
counted (the binary and images are then in the page cache, as on a host that
runs many sandboxes). Firecracker's figure (8 CPU ms, about 12 ms wall) is to
its API socket, before any guest is configured; this one goes further, to the
guest's first instruction with the kernel loaded.

| phase | wall median (ms) | min | max | CPU median (ms) | min | max |
| --- | --- | --- | --- | --- | --- | --- |"""]
    for label, wk, ck in rows:
        L.append(f"| {label} | {cells(st.get(wk), 2)} | {cells(st.get(ck), 2) if ck else ' | | '} |")
    L.append(f"\nN={st['wall_ms']['n']}. CPU before KVM_CREATE_VM (loading, runtime start-up, argument parsing): "
             f"{mmm(st.get('before_create_vm_cpu_ms'), 2, 'ms')}. Resident memory at the first KVM_RUN: "
             f"{mmm(st.get('rss_at_first_run_kib'), 1, 'MiB', 1 / 1024)}.")
    extra = []
    if ex.get("machine_setup_ms"):
        extra.append(f"- In-process, `airlock-bench-exits` (a 64 MiB payload machine, no kernel, no disk): `Machine` "
                     f"creation to the first KVM_RUN {mmm(ex['machine_setup_ms'], 2, 'ms')}.")
    if rn.get("timings_ms"):
        extra.append(f"- `airlock run --json -- true` reports `vmmStartMs` (from the start of its `run()`, after the "
                     f"process's loading, to the first KVM_RUN) {mmm(rn['timings_ms']['vmmStartMs'], 1, 'ms')}; the probe "
                     f"on the same runs, from exec: {mmm(rn.get('exec_to_first_run_ms'), 1, 'ms')}.")
    if q:
        extra.append(f"- QEMU, measured the same way ({q['configuration']}: it loads no kernel): exec to first KVM_RUN "
                     f"{mmm(q['wall_ms'], 1, 'ms')} wall, {mmm(q['cpu_ms'], 1, 'ms')} CPU; exec to `main` "
                     f"{mmm(q['exec_to_main_ms'], 1, 'ms')}; KVM_CREATE_VM to the first KVM_RUN {mmm(q['create_vm_to_first_run_ms'], 1, 'ms')}.")
    if extra:
        L.append("\n" + "\n".join(extra))
    if st.get("kernel_load_cpu_ms") and st.get("cpu_ms"):
        share = st["kernel_load_cpu_ms"]["median"] / st["cpu_ms"]["median"]
        L.append(f"\nThe kernel load is {share:.0%} of the CPU time to the first KVM_RUN: the VMM maps the vmlinux "
                 "and maps its segments into guest RAM copy-on-write instead of copying them (copying faulted in "
                 "every page, about 18 ms on this host). Most of the rest comes before the first KVM ioctl: "
                 "loading the binary and parsing the command line.")
    return "\n".join(L) + "\n"


def boot_md(bt):
    err = section_error(bt, "boot")
    if err:
        return err
    if not bt.get("runs"):
        f = (bt.get("failures") or [{}])[0]
        return f"No boot reached the ready marker. First failure: exit {f.get('exit_status')}, console: `{f.get('console_tail')}`.\n"
    ph = bt["phases_ms"]
    L = [f"""`{bt['command']}` with the installed kernel and the default root
filesystem on virtio-blk; its placeholder `/sbin/init` mounts the basics,
prints `AIRLOCK-READY` and reboots. The benchmark reads the console on the
process's stdout and stamps each line as it arrives; exec and the first KVM_RUN
come from the probe (above), the end from wait4. The kernel has no early
console, so its first lines reach the host only when the serial console
registers ({mmm(stats_of(bt['runs'], 'kernel_banner_ms'), 2, 's', 1e-3)} after exec).
Boot repetitions are few because each boot takes tens of seconds here.

| phase | median (s) | min | max |
| --- | --- | --- | --- |
| exec to first KVM_RUN | {cells(ph['vmm_start'], 3, 1e-3)} |
| first KVM_RUN to `Run /sbin/init` on the console (guest kernel boot) | {cells(ph['kernel_to_init'], 2, 1e-3)} |
| init to `AIRLOCK-READY` (a shell, one `mount -a`) | {cells(ph['init_to_ready'], 2, 1e-3)} |
| ready to process exit (`reboot -f`, VMM teardown) | {cells(ph['shutdown'], 2, 1e-3)} |
| **exec to `AIRLOCK-READY`** | {bold_cells(bt['ready_ms'], 2, 1e-3)} |
| exec to process exit | {cells(bt['exit_ms'], 2, 1e-3)} |

VMM CPU time over a whole boot: {mmm(bt['cpu_ms'], 1, 's', 1e-3)}, of which system
time {mmm(bt['cpu_sys_ms'], 1, 's', 1e-3)}: on a PVM host the guest kernel runs in
KVM's instruction emulator, which the host accounts to the VMM as system time.
"""]
    if bt.get("failures"):
        L.append(f"{len(bt['failures'])} boot(s) failed and are not in the figures: "
                 + "; ".join(f"exit {f['exit_status']} ({f.get('killed') or 'no marker'})" for f in bt["failures"]) + ".\n")
    return "\n".join(L)


def stats_of(runs, key):
    import statistics
    xs = [r[key] for r in runs if r.get(key) is not None]
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None


def run_md(rn):
    err = section_error(rn, "run")
    if err:
        return err
    if not rn.get("available"):
        return f"Not measured: {rn.get('reason')}.\n"
    if not rn.get("runs"):
        f = (rn.get("failures") or [{}])[0]
        return f"No run produced a valid JSON document. First failure: {f}.\n"
    t = rn["timings_ms"]
    L = [f"""`{rn['command']}` (the default kernel and root filesystem, the
agent as init), through the probe as above. The phases are the ones the VMM
reports in its JSON (`timings`, {rn['layout']}); the wall time and CPU time are
the benchmark's own (exec to wait4), and `--console` lets it stamp the kernel's
`Run /sbin/airlock-init as init process` line, which splits `kernelBootMs`
(the split is in exec-relative host time: probe's first KVM_RUN plus `kernelBootMs`
is the hello). Exit codes: {'all 0' if rn.get('all_exit_zero') else [r['exitCode'] for r in rn['runs']]}.

| phase (`timings` key) | median (ms) | min | max |
| --- | --- | --- | --- |
| VMM start: `run()` to first KVM_RUN (`vmmStartMs`) | {cells(t['vmmStartMs'], 1)} |
| kernel boot to the agent's hello (`kernelBootMs`) | {cells(t['kernelBootMs'], 0)} |
| of which first KVM_RUN to `Run /sbin/airlock-init` on the console (kernel) | {cells(rn.get('kernel_to_init_ms'), 0)} |
| of which init's start to the agent's hello (the agent's start-up) | {cells(rn.get('init_to_hello_ms'), 0)} |
| hello to the command's start (`agentReadyMs`) | {cells(t['agentReadyMs'], 0)} |
| the command, `true` (`commandMs`) | {cells(t['commandMs'], 0)} |
| exit report to the VM's end (`shutdownMs`) | {cells(t['shutdownMs'], 0)} |
| **total (`totalMs`)** | {bold_cells(t['totalMs'], 0)} |
| exec to process exit (benchmark, wall) | {cells(rn['wall_ms'], 0)} |
| exec to first KVM_RUN (probe) | {cells(rn['exec_to_first_run_ms'], 1)} |
| VMM CPU time, user + system | {cells(rn['cpu_ms'], 0)} |
"""]
    if rn.get("failures"):
        L.append(f"{len(rn['failures'])} run(s) failed and are not in the figures: {[f.get('problems') or f.get('killed') for f in rn['failures']]}.\n")
    L.append("`commandMs` for `true` is the agent's fork and exec of busybox's `true` in the guest and the reports "
             "around it: kernel work, emulated on this host.\n")
    return "\n".join(L)


def memory_md(res):
    m = res.get("memory") or {}
    if not m:
        return "Not measured in this run (no boot reached its marker).\n"
    L = ["""While the VM runs, the benchmark reads `/proc/PID/smaps` of the VMM every
0.2 s. The guest RAM is the shared anonymous mapping of the guest's size
(it shows as `/dev/zero (deleted)`), which the kernel's segments, mapped into it
copy-on-write from the vmlinux, split into a run of adjacent mappings; the Rss
of that run is what the guest touched. The VMM's own memory is the process's Rss minus that, taken
at the sample where it is largest in each run. It splits into file-backed
pages (the binary and its shared libraries, which several VMMs on a host share)
and the rest (heap, stacks, kvm_run pages); dirty pages are those no other
process can share. Kernel memory that KVM keeps for the VM (page tables,
shadow pages) is not in any Rss and not counted.

| MiB, median (min to max) | during `airlock boot` | during `airlock run -- true` |
| --- | --- | --- |"""]
    b, r = m.get("boot"), m.get("run")
    rows = [("**VMM Rss beside the guest's**", "vmm_mib"), ("file-backed (binary, libraries)", "vmm_file_mib"),
            ("anonymous (heap, stacks)", "vmm_anon_mib"), ("dirty (not shareable)", "vmm_dirty_mib"),
            ("guest RAM touched", "guest_touched_mib"), ("whole process Rss", "total_mib"),
            ("peak Rss over the process's life (ru_maxrss)", "maxrss_mib")]
    for label, k in rows:
        def c(x):
            return mmm(x.get(k), 2) if x and x.get(k) else "-"
        L.append(f"| {label} | {c(b)} | {c(r)} |")
    src = b or r
    if src and src.get("top_files_kib"):
        L.append("\nLargest file-backed parts (first run): " + ", ".join(
            f"{n} {num(k / 1024, 2)} MiB" for n, k in src["top_files_kib"]) + ".")
    if src and not src.get("exact_size_match"):
        L.append("\nNo mapping of exactly the guest size was found; the smallest anonymous mapping at least that big stood in.")
    fl = m.get("floor")
    if fl and not fl.get("error"):
        L.append(f"\nFor scale, in the same run: a Swift program that only waits (`bench/floor.swift`), linked the way "
                 f"`airlock` is (the Swift runtime static, glibc and libstdc++ shared), has an Rss of "
                 f"{num(fl['rss_mib'], 2)} MiB, {num(fl['file_mib'], 2)} MiB of it file-backed ("
                 + ", ".join(f"{n} {num(k / 1024, 2)} MiB" for n, k in fl["top_files_kib"])
                 + "). That is the floor under any VMM written in Swift and linked this way on this host; "
                 "the rest of the VMM's figure is its own code and data.")
    elif fl:
        L.append(f"\nThe memory floor (`bench/floor.swift`) was not measured: {fl['error']}")
    qf = (res.get("qemu") or {}).get("firmware_memory")
    if qf:
        p = qf["peak_vmm"]
        L.append(f"\nQEMU, {qf['configuration']}, for {qf['seconds']:g} s with a 128 MiB guest (it did not boot the kernel, "
                 f"so this is QEMU with its firmware running, not a booted guest): Rss beside the guest's "
                 f"{num(p['vmm_kib'] / 1024, 2)} MiB (file-backed {num(p['vmm_file_kib'] / 1024, 2)}, anonymous "
                 f"{num(p['vmm_anon_kib'] / 1024, 2)}, dirty {num(p['vmm_dirty_kib'] / 1024, 2)}); guest RAM touched "
                 f"{num(p['guest_kib'] / 1024, 2)} MiB. Largest file-backed parts: "
                 + ", ".join(f"{n} {num(k / 1024, 2)} MiB" for n, k in p["top_files_kib"][:4]) + ".")
    q = res.get("qemu") or {}
    if q.get("memory"):
        L.append(f"\nQEMU booting the same guest: VMM Rss beside the guest's {mmm(q['memory']['vmm_mib'], 2, 'MiB')}.")
    return "\n".join(L) + "\n"


def blk_md(blk):
    err = section_error(blk, "blk")
    if err:
        return err
    if blk.get("error"):
        return f"Failed: {blk['error']}; console: `{blk.get('console_tail')}`.\n"
    p = blk["passes"]
    import statistics
    read_s = statistics.median(x["read_s"] for x in p)
    one = statistics.median(x["one_block_s"] for x in p)
    ms_per_mib = read_s / blk["size_mib"] * 1000
    return f"""A {blk['size_mib']} MiB file of random bytes is attached read-write as /dev/vdb
(`make bench` uses a small file because the guest reads slowly here:
`BENCH_BLK_MIB`; `make bench-blk` defaults to 256 MiB). In one boot the guest's
init runs `dd if=/dev/vdb of=/dev/null bs=1M iflag=direct` {len(p)} times and
times each with /proc/uptime (Debian's busybox dd prints no timing), minus a
1-block dd before it that measures the fork and exec ({num(one, 2)} s, median);
the host reads the same file with GNU dd `iflag=direct`, so the page cache
flatters neither side, {blk['host_mbps']['n'] // 2} times before the guest and as many after.

| | median | min | max | N |
| --- | --- | --- | --- | --- |
| host read (MB/s) | {cells(blk['host_mbps'], 0)} | {blk['host_mbps']['n']} |
| guest read (MB/s) | {cells(blk['guest_mbps'], 2)} | {blk['guest_mbps']['n']} |
| **ratio guest / host (medians)** | **{blk['ratio']:.4f}** | | | target at least 0.8 |

The target is far off on this host, and not because of the device model: over
the whole boot the VMM process spent {num(blk['vmm_cpu_user_s'], 2)} s of user time (the
device models, the run loop and the VMM's own start) and {num(blk['vmm_cpu_sys_s'], 1)} s of system
time, i.e. in KVM's instruction emulator running the guest's kernel, in
{num(blk['vmm_wall_s'], 1)} s of wall time (it had a core for {(blk['vmm_cpu_user_s'] + blk['vmm_cpu_sys_s']) / blk['vmm_wall_s']:.0%} of it; the rest it
waited beside the host's other work). Each 1 MiB request took about
{num(ms_per_mib, 0)} ms of guest time, nearly all of it the guest's block layer run by the
emulator. On a hardware-virtualization host the guest kernel runs natively;
this is the benchmark to run there.
"""


def qemu_md(res):
    q = res.get("qemu")
    err = section_error(q, "qemu")
    if err:
        return err
    if not q.get("installed"):
        return f"Not measured: {q.get('reason')}.\n"
    pvh = "not set" if re.search(r"^# CONFIG_PVH is not set", read(os.path.join(ROOT, "guest-kernel", "airlock.config")), re.M) else None
    L = [f"""{q['version']}, tried on the installed vmlinux and rootfs.ext4 with the
kernel command line Airlock gives a disk root on this host
(`Machine.baseCommandLine`, the host profile's parameters, `root=/dev/vda`):
`{q['cmdline']}`, as `qemu-system-x86_64 -M microvm,acpi=off -enable-kvm -m 128 -smp 1
-nodefaults -no-user-config -display none -serial stdio -no-reboot -drive
id=root,file=rootfs.ext4,format=raw,if=none,readonly=on -device
virtio-blk-device,drive=root -kernel vmlinux -append CMDLINE`. The two runs
without a kernel show how far QEMU's own vCPU set-up gets on this host.

| configuration | result | after (s) | reached KVM_RUN | last output |
| --- | --- | --- | --- | --- |"""]
    for a in q["attempts"]:
        last = " / ".join(a["last_output"][-2:]).replace("|", "\\|").replace("`", "'") or "(none)"
        L.append(f"| {a['label']} | {a['exit']} | {a['seconds']:.2f} | {'yes' if a['reached_kvm_run'] else 'no'} | `{last}` |")
    if not q.get("booted"):
        L.append(f"""
QEMU did not boot the guest. It loads an uncompressed ELF kernel only through
the kernel's PVH entry note, and Airlock's kernel is built for the Linux 64-bit
boot protocol (CONFIG_PVH {pvh or 'see guest-kernel/airlock.config'} in
guest-kernel/airlock.config); a bzImage would go through the kernel's real-mode
set-up code, all of it emulated on a PVM host. `-cpu host` aborts in QEMU's own
vCPU set-up (the MSR write above). So there are no QEMU boot, run or
block-throughput figures for this host; the start-up and memory figures above
are from QEMU running its firmware on the same 128 MiB, 1 vCPU machine with
the same disk.""")
    else:
        L.append(f"\nQEMU booted: exec to AIRLOCK-READY {mmm(q['ready_ms'], 2, 's', 1e-3)}.")
    return "\n".join(L) + "\n"


def pv_md(pv):
    err = section_error(pv, "pv")
    if err:
        return err
    if not pv.get("applicable", True):
        return f"Not applicable here: {pv['reason']}.\n"
    nat, emu, host, r = pv["modes"]["native"], pv["modes"]["emulated"], pv["host"], pv["ratios"]
    nb, eb = nat["boot"], emu["boot"]
    L = [f"The guest kernel on this PVM host in its two modes, measured in one run: native (the default, "
         f"`{pv['doctor']}`) and emulated (`AIRLOCK_PV=off`: KVM's instruction emulator runs the guest kernel). "
         f"Native N={nb['n']}, emulated N={eb['n']} (each emulated boot takes tens of seconds); the receipts said "
         f"`{nat.get('guest_mode')}` and `{emu.get('guest_mode')}`.", "",
         "| `airlock boot` phase (ms) | native: median | min | max | emulated: median | min | max |",
         "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, what in [("vmm_start_ms", "exec to first KVM_RUN (VMM start)"),
                      ("first_run_to_banner_ms", "first KVM_RUN to the kernel banner on the console (the console registers late: the kernel's early boot)"),
                      ("banner_to_init_ms", "banner to `Run /sbin/init` (the rest of the kernel's boot)"),
                      ("first_run_to_init_ms", "first KVM_RUN to init, together"),
                      ("init_to_ready_ms", "init to AIRLOCK-READY (the placeholder init: a shell, `mount -a`)"),
                      ("ready_ms", "**exec to AIRLOCK-READY**"), ("exit_ms", "exec to process exit")]:
        L.append(f"| {what} | {cells(nb.get(key), 1)} | {cells(eb.get(key), 0)} |")
    L += ["", "| `airlock run --json -- true` (ms, its own timings) | native: median | min | max | emulated: median | min | max |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, what in [("vmmStartMs", "`vmmStartMs`: run() to first KVM_RUN"), ("kernelBootMs", "`kernelBootMs`: first KVM_RUN to the agent's hello"),
                      ("agentReadyMs", "`agentReadyMs`: hello to the command's start"), ("commandMs", "`commandMs`: `true`"),
                      ("shutdownMs", "`shutdownMs`"), ("totalMs", "**`totalMs`**"), ("wall_ms", "exec to exit, wall (the benchmark's)")]:
        L.append(f"| {what} | {cells(nat['run_true'].get(key), 1)} | {cells(emu['run_true'].get(key), 0)} |")
    L += ["", "| workload | native | emulated | the host's own time (same busybox) | native / host |", "| --- | --- | --- | --- | --- |"]
    L.append(f"| `{pv['pipeline']}` (`commandMs`; output {'identical to' if nat['pipeline']['same_output_as_host'] else '**different from**'} the host's) "
             f"| {num(nat['pipeline']['command_ms'], 1)} ms | {num(emu['pipeline']['command_ms'], 0)} ms | {mmm(host['pipeline_ms'], 1, 'ms')} "
             f"(GNU tools: {num(host['pipeline_gnu_ms']['median'], 1)} ms) | **{r['pipeline_native_over_host']:.1f}x** |")
    L.append(f"| `head -c N /dev/zero \\| airlock run -- wc -c` (`commandMs`; N = {nat['wc']['bytes']:,} native, {emu['wc']['bytes']:,} emulated) "
             f"| {num(nat['wc']['command_ms'], 1)} ms | {num(emu['wc']['command_ms'], 0)} ms | {mmm(host['wc_ms']['native'], 1, 'ms')} "
             f"(N = {emu['wc']['bytes']:,}: {num(host['wc_ms']['emulated']['median'], 1)} ms) | **{r['wc_native_over_host']:.1f}x** |")
    L.append(f"| one `getppid` system call (a loop of {nat['getppid']['calls']:,} native, {emu['getppid']['calls']:,} emulated) "
             f"| {num(nat['getppid']['ns'] / 1e3, 2)} us | {num(emu['getppid']['ns'] / 1e3, 0)} us | {num(host['getppid_ns'] / 1e3, 3)} us "
             f"| **{r['getppid_native_over_host']:.0f}x** |")
    if r.get("ready_emulated_over_native"):
        L += ["", f"Emulated / native: boot to AIRLOCK-READY {r['ready_emulated_over_native']:.0f}x, one system call "
                  f"{r['getppid_emulated_over_native']:.0f}x."]
    steals = [(what, nat[k].get("steal")) for k, what in (("pipeline", "the pipeline's"), ("wc", "the `wc -c`"))]
    steals = [(w, s) for w, s in steals if s and s.get("fraction") is not None]
    if steals:
        L += ["", "Host contention: the native guest's vCPU was runnable but waiting for a host CPU (the guest "
                  "kernel's steal time, `/proc/stat`, from boot to the end of the command) for "
              + " and ".join(f"{s['fraction'] * 100:.0f}% of {w} VM's time ({s['steal_s']:.2f} of {s['total_s']:.2f} s)" for w, s in steals)
              + ". That share is the machine's load (the load average above), not guest work."]
    L += ["", "Where the native time goes: the VMM's own start (exec to the first KVM_RUN) is the same in both modes; "
          "the kernel's boot runs natively from its first instruction (the VMM registers the VIF page before it), "
          "so what remains is the kernel's own work plus one trap to the host for every privileged operation "
          "(about a microsecond each on a quiet host, several on a busy one: a system call costs four, a page "
          "fault about as many plus the host's shadow-MMU work), the console (the kernel's messages replayed "
          "through the UART, two port exits per character, before init; `airlock run` passes `quiet`), and in "
          "`airlock run` the agent's start and the virtio-console round trips. System-call-heavy work is "
          "the furthest from the host's speed (the `getppid` row).", ""]
    return "\n".join(L) + "\n"


def rerun_md(res):
    """Sections measured again after the run, each in a run of its own (`reruns` in the
    results: section, when, why), so that the page never claims one run for them."""
    reruns = res.get("reruns") or []
    if not reruns:
        return ""
    items = "".join(f"\n- `{r['section']}`: {r['why']} ({r['date']})" for r in reruns)
    return ("\nMeasured again, each section in a `make bench` run of its own (`BENCH_ONLY`), and "
            "replaced here; every ratio in them is still from one run:" + items + "\n")


def ctxswitch_md(cx):
    err = section_error(cx, "ctxswitch")
    if err:
        return err
    L = [f"Two guest processes yielding to each other ({cx['yields']} `sched_yield` each, `vecstress --pingpong`, "
         f"{cx['repeats']} times per VM, {cx['rounds']} VMs per mode, alternating), so every yield is a context switch:",
         "", "| guest kernel saves | per context switch |", "| --- | --- |"]
    for m, v in cx["modes"].items():
        L.append(f"| {v['what']} | {mmm(v['us_per_switch'], 1, 'us')} |")
    if cx.get("ratio_of_medians"):
        L += ["", f"The VMM's XSAVE completion adds **{cx['added_us_per_switch']:.1f} us** per switch at the medians "
                  f"({cx['ratio_of_medians']:.2f}x the legacy-state switch)"
                  + (f", {cx['added_us_per_switch_at_minima']:.1f} us at the fastest rounds ({cx['ratio_of_minima']:.2f}x)"
                     if cx.get("ratio_of_minima") else "")
                  + "; the switch itself is emulated guest kernel work, and other load on the machine only adds to it."]
    nat, emu = (cx["modes"].get("native") or {}).get("us_per_switch"), (cx["modes"].get("xsave") or {}).get("us_per_switch")
    if nat and emu and nat["median"] > 0:
        L += ["", f"With the guest kernel in PV mode (issue 12) the same switch, XSAVE and all, runs natively: "
                  f"**{emu['median'] / nat['median']:.0f}x** faster than the emulated kernel's."]
    for f_ in cx.get("failures", []):
        L.append(f"\nFailed: {f_['mode']} round {f_['round']}: {f_['problems']} {f_['stderr'][-200:]}")
    return "\n".join(L) + "\n"


def fuzz_md(fz):
    err = section_error(fz, "fuzz")
    if err:
        return err
    lines = "\n".join(fz.get("lines", []))
    return f"""A seeded random driver (SplitMix64, seed {fz.get('seed', 1)}) against `MMIOTransport`,
`SplitQueue` and a read-only `BlockDevice` in 2 MiB of guest RAM with a hole:
random register writes at random widths in every state, random chains of up
to 5 descriptors with addresses past RAM, in the hole, near 2^64, lengths 0
and 4 GiB, random flags and `next`, random heads, available indices that jump.
Its output in this run ({'PASS' if fz.get('passed') else 'FAIL'}):

```
{lines}
```
"""


def workspace_md(ws):
    err = section_error(ws, "workspace")
    if err:
        return err
    rows = []
    for step, label in (("prepare", "workspace image from the tree (`--workspace`)"), ("extract", "artifacts out of an image (`--output`)")):
        w = ws[step]
        rows.append(f"| {label}: Airlock (ms, in process) | {bold_cells(w['airlock_ms'])} | {w['airlock_ms']['n']} |")
        rows.append(f"| the same, `airlock-bench-workspace` process wall (ms) | {cells(w['airlock_process_ms'])} | {w['airlock_process_ms']['n']} |")
        rows.append(f"| `cp -a` of the same tree, process wall (ms) | {cells(w['cp_ms'])} | {w['cp_ms']['n']} |")
        rows.append(f"| **ratio Airlock / `cp -a`** (per round) | {cells(w['ratio_per_round'], 2)} | target at most 3x; of the medians **{w['ratio_of_medians']:.2f}x** |")
    table = "\n".join(rows)
    return f"""A tree of {ws['files']} files of {ws['bytes'] // ws['files']:,} random bytes each ({ws['bytes'] >> 20} MB) in 20
directories. Preparing a workspace is `WorkspaceImage.build`, what `airlock run
--workspace` does before the boot: a walk of the tree for its size, then
`mke2fs -d` into a sparse image with 1 GiB of free room (`timings.workspaceMs`
in `--json`). Extraction is `ArtifactExtractor.extract` of the same tree from
an image's /out into a new directory, every file checked, copied and hashed
with SHA-256 (`timings.artifactsMs`). Each is compared with `cp -a` of the same
tree into the same file system, in alternating rounds after a warm-up, with a
`sync` before each side so that neither pays for the other's writeback.

| | median | min | max | N |
| --- | --- | --- | --- | --- |
{table}
"""


def build_md(bd):
    err = section_error(bd, "build")
    if err:
        return err
    if not bd.get("available", True):
        return f"Not measured: {bd['reason']}.\n"
    if not bd.get("vm"):
        return f"Every build in the VM failed in this run: `{(bd.get('failures') or [{}])[0]}`.\n"
    files = ", ".join(f"`{f}`" for f in bd["files"])
    v = bd["vm"][0]
    phases = ", ".join(f"{k} {num(v['timings'][k] / 1000, 1)} s" for k in ("vmmStartMs", "kernelBootMs", "agentReadyMs", "commandMs", "shutdownMs"))
    return f"""A small C project made up by the benchmark ({files}: four objects, a
link, and a `make test` that runs the binary twice) built with

```sh
airlock run --image build --json --workspace calc --output built -- sh -c '{bd['script']}'
```

on the toolchain image (`make rootfs-build`), against `sh -c '{bd['script']}'`
in a copy of the project on the host. The binary that comes out is run on the
host and must print the right answer.

| | median | min | max | N |
| --- | --- | --- | --- | --- |
| host: the build and its test (ms) | {cells(bd['host_ms'], 0)} | {bd['host_ms']['n']} |
| VM: `airlock run` wall (s) | {bold_cells(bd['vm_wall_ms'], 1, 1e-3)} | {bd['vm_wall_ms']['n']} |
| VM: the command alone, `commandMs` (s) | {cells(bd['vm_command_ms'], 1, 1e-3)} | {bd['vm_command_ms']['n']} |
| VM: boot to the agent, `kernelBootMs` (s) | {cells(bd['vm_boot_ms'], 1, 1e-3)} | {bd['vm_boot_ms']['n']} |
| workspace image / artifacts (ms) | {num(bd['vm_workspace_ms']['median'], 1)} / {num(bd['vm_artifacts_ms']['median'], 1)} | | | |
| **ratio VM wall / host** | **{bd['wall_ratio']:,.0f}x** | | | the command alone {bd['command_ratio']:,.0f}x |

Phases of the first run: {phases}. On this host the guest kernel is emulated,
and a build is mostly kernel work for it (a fork and an exec for every compiler
pass, page faults for every binary the compiler maps), so the compiler's own
user-mode work, which runs natively, is a small part of the time. On a host
with hardware virtualization the guest kernel runs natively; this benchmark
measures the ratio there too.
"""
def serve_md(sv):
    err = section_error(sv, "serve")
    if err:
        return err
    p = sv.get("params", {})
    L = ["`bench/serve_load.py` starts `airlock serve` on 127.0.0.1 with a bearer token and sends `POST /v1/runs` "
         "over keep-alive connections, one per concurrent client. `true` is `{\"argv\": [\"true\"]}`; `stdin` is "
         f"`cat` fed {serve_stdin_kib()} KiB of stdin, checked byte for byte in the answer. *pool*: `--pool 4`, each round of "
         "`concurrency` requests finds warm sandboxes, and the refill between rounds is not counted (the warm path's "
         "rate, which a sustained load keeps only while restores keep up); *no pool*: `--pool 0`, every request waits for "
         "its own sandbox, requests back to back. Both restore their sandboxes from one snapshot (the default; the "
         "service saved it at its start). The service's share is, per request, the client's latency minus the receipt's "
         "`queueMs` (waiting for a sandbox, its restore included when none was ready) and `sandboxMs` (the command handed "
         "to the sandbox until its VM ended). *scripted*: the same against `--test-provider scripted` (no VM): the "
         "service's cost alone.",
         "",
         "| service | command | concurrency | requests (ok) | requests/s | latency p50 | p99 | sandbox p50 | queue p50 | service's share p50 | p99 | warm |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ms(s, k):
        return "-" if not s else (f"{s[k]:,.2f} ms" if s[k] < 100 else f"{s[k] / 1000:,.2f} s")

    order = {"pool": 0, "no pool": 1}
    for c in sorted(sv.get("cells", []), key=lambda c: (c["provider"] != "scripted", c["command"], c["concurrency"],
                                                       order.get(c["mode"], 2))):
        name = "scripted (no VM)" if c["provider"] == "scripted" else f"VMs, {c['mode']}"
        L.append(f"| {name} | {c['command']} | {c['concurrency']} | {c['requests']} ({c['ok']}) | {num(c['rps'], 2)} "
                 f"| {ms(c['latency_ms'], 'p50')} | {ms(c['latency_ms'], 'p99')} | {ms(c['sandbox_ms'], 'p50')} "
                 f"| {ms(c['queue_ms'], 'p50')} | {ms(c['overhead_ms'], 'p50')} | {ms(c['overhead_ms'], 'p99')} "
                 f"| {c['from_pool']}/{c['ok']} |")
    L.append("")
    for key, what in (("soak_scripted", "the scripted service"), ("soak_vm", "real VMs")):
        sk = sv.get(key)
        if not sk:
            continue
        answers = ", ".join(f"{v} {k}" for k, v in sk["answers"].items())
        L.append(f"Soak against {what}: {sk['requests']} requests, {sk['concurrency']} at a time, in {sk['seconds']} s "
                 f"({answers}); each answer checked against its own request's stdin tag and id. Problems: "
                 f"{sk['problem_count']}{(' (' + '; '.join(sk['problems'][:3]) + ')') if sk['problems'] else ''}. "
                 f"The service counted {sk['counted_runs']:.0f} runs. Afterwards, beside the refilled pool: descriptors "
                 f"{sk['census_before']['fds']} before and {sk['census_after']['fds']} after, KVM descriptors "
                 f"{sk['census_before']['kvm_fds']} and {sk['census_after']['kvm_fds']}, threads "
                 f"{sk['census_before']['threads']} and {sk['census_after']['threads']}; SIGTERM drained it in "
                 f"{sk['drain_seconds']} s to exit status {sk['exit_status']}; jail directories, cgroups and mounts on the "
                 f"host {sk['host_before']} before and {sk['host_after']} after. Leaks: {', '.join(sk['leaks']) or 'none'}.")
        L.append("")
    return "\n".join(L)


def serve_stdin_kib():
    return 1


def snapshot_pv_off_md(sn):
    """The snapshot section again with the guest kernel emulated (`AIRLOCK_PV=off make bench-snapshot`), when measured."""
    if not sn:
        return ""
    return "\n### The same with the guest kernel emulated (`AIRLOCK_PV=off`)\n\n" + snapshot_md(sn)


def snapshot_md(sn):
    err = section_error(sn, "snapshot")
    if err:
        return err
    if not sn.get("available", True):
        return f"Not measured: {sn.get('reason')}.\n"
    L = []
    if sn.get("separate_run"):
        L += [f"This section was measured on its own (`make bench-snapshot`, {sn['measured_at']}), its figures side by side in that run.", ""]
    L += ["`airlock snapshot create --json --memory M` with the installed kernel and root filesystem, in a data",
         "directory of the benchmark's own (jailed, as a user runs it): the VM boots to the agent's hello, is paused,",
         "and its state and every page it touched that is not all zeros go to the file (the rest are holes);",
         "the supervisor then checks the file whole (each part's SHA-256) before it enters the store.", "",
         "| guest | file (with holes) | on disk | data pages | write (VM paused) | write and check | create, boot included |",
         "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in sn.get("creates") or []:
        L.append(f"| {c['memory_mib']} MiB | {c['file_mib']} MiB | {num(c['allocated_mib'], 1)} MiB | {c['data_pages']} "
                 f"| {num(c['write_ms'], 0)} ms | {num(c['save_ms'], 0)} ms | {num(c['create_wall_ms'] / 1e3, 1)} s |")
    if sn.get("restored"):
        r, c = sn["restored"], sn["cold"]
        n = len(sn.get("rounds") or [])
        L += ["", f"`airlock run --json --memory {sn['memory_mib']} -- true`, restored from that snapshot and cold",
              f"(`--no-snapshot`), one of each in turn, {n} rounds (wall: the benchmark's, spawn to exit; the rest: the",
              "run's own JSON). " + ("Every restored run restored and no cold one did." if sn.get("all_restored") else
                                     "**Not every run did what its kind says** (see the results file)."), "",
              "| ms, median (min to max) | restored | cold |", "| --- | --- | --- |",
              f"| wall | {mmm(r['wall_ms'], 0)} | {mmm(c['wall_ms'], 0)} |",
              f"| checks before any VM (`snapshot.checkMs`: image digests from the cache, header, manifest, state) | {mmm(r['check_ms'], 1)} | |",
              f"| the VMM's restore (`restoreMs`: KVM objects, RAM mapped from the file, every state set) | {mmm(r['restore_ms'], 1)} | |",
              f"| request to the first KVM_RUN (`vmmStartMs`) | {mmm(r['vmmStartMs'], 1)} | {mmm(c['vmmStartMs'], 1)} |",
              f"| guest kernel boot to the agent's hello (`kernelBootMs`) | 0 | {mmm(c['kernelBootMs'], 0)} |",
              f"| hello (or restore) to the command's start (`agentReadyMs`) | {mmm(r['agentReadyMs'], 0)} | {mmm(c['agentReadyMs'], 0)} |",
              f"| the command, `true` (`commandMs`) | {mmm(r['commandMs'], 0)} | {mmm(c['commandMs'], 0)} |",
              f"| `totalMs` | {mmm(r['totalMs'], 0)} | {mmm(c['totalMs'], 0)} |",
              f"| **restored / cold, wall** | **{sn['ratio_of_median_walls']:.3f}** (per round {mmm(sn['ratio_wall_per_round'], 3)}) | |",
              "", f"The guests ran in mode `{sn.get('guest_mode') or 'unknown'}`. " + (
                  "On a PVM host in emulated mode the guest kernel's work is KVM's instruction emulator's, so the restored run's"
                  " time is the guest's own work after the restore (receiving the request, fork and exec of `true`, reporting,"
                  " rebooting): the restore itself is the `restoreMs` line." if sn.get("guest_mode") == "pvm-emulated" else
                  "The restore itself is the `restoreMs` line; the rest of a restored run is the jailed VMM's start and the"
                  " guest's own work (receiving the request, fork and exec of `true`, reporting, rebooting).")]
    iv = sn.get("idle_vms") or {}
    if iv.get("count"):
        L += ["", f"{iv['count']} `airlock run --memory {sn['memory_mib']} -- sh -c 'echo idle; exec sleep 900'` at once, all restored from the one snapshot, sampled",
              "from each jailed VMM's `/proc/PID/smaps` once every guest had started its command (it prints a line,",
              "then sleeps) and 3 s more" + ("" if iv.get("idle") else " (**not every guest got there within the wait; sampled anyway**)") + ".",
              "The guest's RAM is the snapshot file mapped copy-on-write: pages it only reads are the page cache's,",
              "shared by every VM; the pages it wrote are its private dirty pages in that mapping.", "",
              "| MiB per VM, median (min to max) | |", "| --- | --- |",
              f"| Rss | {mmm(iv['rss_mib'], 2)} |", f"| PSS (shared pages divided among their users) | {mmm(iv['pss_mib'], 2)} |",
              f"| private (clean and dirty) | {mmm(iv['private_mib'], 2)} |",
              f"| of the guest RAM: resident / PSS | {mmm(iv['guest_rss_mib'], 2)} / {mmm(iv['guest_pss_mib'], 2)} |",
              f"| pages the guest wrote | {mmm(iv['guest_written_mib'], 2)} |",
              f"| **private beyond the pages the guest wrote** | **{mmm(iv['private_beyond_written_mib'], 2)}** (target under 5) |"]
    if sn.get("failures"):
        L += ["", f"Failures: {len(sn['failures'])} (in the results file)."]
    return "\n".join(L) + "\n"


def not_measured(res):
    L = []
    host = res.get("host", {})
    if not host.get("vmx_or_svm"):
        L.append(f"- A host with hardware virtualization: this run's host has {host.get('backend')}. Boot times, "
                 "`airlock run` times and block throughput are dominated there by emulated guest kernel code; "
                 "`make bench` on a VT-x/AMD-V host measures the same figures natively.")
    q = res.get("qemu") or {}
    if q.get("installed") and not q.get("booted"):
        L.append("- QEMU's boot, `run`-equivalent and block figures: QEMU did not boot the same kernel (see above); "
                 "QEMU has no agent, so `airlock run` has no QEMU counterpart in any case.")
    rn = res.get("run") or {}
    if rn and not rn.get("available", True):
        L.append(f"- `airlock run -- true`: {rn.get('reason')}.")
    L.append("- KVM's kernel-side memory for the VM (shadow page tables and the like): not visible in the process's Rss.")
    return "\n".join(L) + "\n"


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def render(res):
    h = res["host"]
    dirty = " (with uncommitted changes)" if h.get("dirty") else ""
    pvm_note = (" PVM emulates guest kernel code (see `../shared/docs/kvm-on-this-host.md`) unless the guest uses its "
                "paravirtual interface: Airlock's guest kernel does (PV mode, measured against the emulated path below), "
                "so the sections other than that one measure the native mode." if h.get("pvm") else "")
    p = res.get("params", {})
    return f"""# Benchmarks

<!-- Generated by `make bench` (bench/report.py) from bench/results/latest.json. Do not edit by hand. -->

`make bench` builds what it needs, runs every benchmark below in one go and
regenerates this page and the chart from the results
(`bench/results/latest.json`). Every figure here was measured in that run;
the targets and Firecracker's figures are quoted references, not measurements.
Each figure is the median of N runs with its min and max, and every ratio is
taken between figures of the same run, because other builds and VMs share the
machine.

Run of {h['date']}, commit {h.get('commit', '?')}{dirty}. Machine: {h['cpu_model']}, {h['cores']} cores,
{h['memory_gib']} GiB, Linux {h['host_kernel']}; `/dev/kvm` backend: {h['backend']}.{pvm_note}
Load average {' '.join(h.get('loadavg_at_start', []))} at the start and {' '.join(h.get('loadavg_at_end', []))} at the end;
the measurements took {res.get('seconds', 0):.0f} s. Parameters: guest memory {p.get('memory_mib')} MiB,
{p.get('exit_rounds')} exit rounds, {p.get('start_runs')} start runs, {p.get('boot_runs')} boots, {p.get('run_runs')} `airlock run`s,
{p.get('blk_mib')} MiB read {p.get('blk_passes')} times (the Makefile's `BENCH_*` variables change them).
{rerun_md(res)}
## Against the targets

{summary(res)}
## Boot timeline

![Boot timeline: the measured phases of `airlock boot` and `airlock run -- true`](boot-timeline.svg)

## Port-I/O exit cost

{exits_md(res.get('exits'))}
## VMM start to the first KVM_RUN

{start_md(res)}
## Boot to the ready marker (`airlock boot`)

{boot_md(res.get('boot'))}
## `airlock run -- true`, end to end

{run_md(res.get('run'))}
## The VMM's own memory (128 MiB, 1 vCPU)

{memory_md(res)}
## PV mode: the guest kernel native against emulated

{pv_md(res.get('pv'))}
## Guest context switch: the cost of keeping every process's vector registers

{ctxswitch_md(res.get('ctxswitch'))}
## virtio-blk sequential read

{blk_md(res.get('blk'))}
## QEMU on the same kernel and root filesystem

{qemu_md(res)}
## Snapshots

{snapshot_md(res.get('snapshot'))}{snapshot_pv_off_md(res.get('snapshot_pv_off'))}
## virtio fuzzing

{fuzz_md(res.get('fuzz'))}
## Workspace in, artifacts out

{workspace_md(res.get('workspace'))}
## A C build step with the toolchain image

{build_md(res.get('build'))}
## `airlock serve` under load

{serve_md(res.get('serve'))}
## Not measured in this run

{not_measured(res)}"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="?", default=os.path.join(ROOT, "bench", "results", "latest.json"))
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--svg", default=os.path.join(ROOT, "docs", "boot-timeline.svg"))
    a = ap.parse_args()
    with open(a.results) as f:
        res = json.load(f)
    with open(a.doc, "w") as f:
        f.write(render(res))
    with open(a.svg, "w") as f:
        f.write(chart.render(res))
    print(f"wrote {a.doc} and {a.svg}")


if __name__ == "__main__":
    main()
