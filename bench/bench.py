#!/usr/bin/env python3
"""Airlock's benchmark suite: measures everything `make bench` reports, in one run.

    bench/bench.py [--only SECTION,...] [--out results.json] [options]

Sections (all by default):
  exits   one port-I/O exit through Airlock's run loop against the C floor
          (../shared/kvm-probes/micro.c), alternating rounds, ratio per round
  start   `airlock` exec to its first KVM_RUN, wall and CPU (bench/kvm-probe.c,
          an LD_PRELOAD probe on ioctl, ends the process there)
  boot    `airlock boot` to the placeholder init's AIRLOCK-READY line, with the
          phases seen on the console, and the VMM's memory beside the guest's
  run     `airlock run --json -- true` end to end with its own phase timings
  pv      a PVM host's two guest modes side by side, native (the default where the
          paravirtual interface answers) and emulated (AIRLOCK_PV=off): boot phases,
          `airlock run -- true`, the pipeline seq|awk|sort|uniq, `wc -c` of stdin, a
          getppid loop, each against the host's own time for the same command
  blk     virtio-blk sequential read in the guest against the host's read of
          the same file
  qemu    QEMU (qemu-system-x86_64 -M microvm -enable-kvm) on the same kernel
          and root filesystem: how far it gets, and the same measurements
          where it gets there
  fuzz    the seeded virtio fuzzer (make fuzz-virtio), for its rate
  workspace  a workspace image built from a 10 MB tree of 1,000 files, and 10 MB
          of artifacts extracted from one, each against `cp -a` of the same tree,
          alternating rounds (airlock-bench-workspace)
  build   a C project (made up here: sources, a header, a Makefile with a test)
          built and tested with the toolchain image (`airlock run --image build
          --workspace --output`), against the same build on the host
  serve   `airlock serve` under load (bench/serve_load.py): requests/s and
          latency at concurrency 1, 2 and 4 with the warm pool and without,
          the service's own share of the latency, and a soak
  snapshot  snapshots: size and write time of `airlock snapshot create` for two
          guest sizes; `airlock run -- true` restored against `--no-snapshot`
          (cold), alternating; 10 restored VMs idle at once, their memory

Each figure is the median of N runs with min and max; ratios come from one run.
Every time is CLOCK_MONOTONIC (Python's time.monotonic_ns, the probe's and the
VMM's MachineTimings use the same clock). The binaries must be built first
(`make bench` does it); paths come from --bin and --tools.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ["exits", "start", "boot", "run", "pv", "ctxswitch", "blk", "qemu", "fuzz", "workspace", "build", "serve", "snapshot"]
MIB = 1 << 20


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def stats(samples):
    """Median, min and max of a list of numbers (None entries dropped)."""
    xs = [x for x in samples if x is not None]
    if not xs:
        return None
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def read_file(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


# --------------------------------------------------------------------------- host

def host_info():
    cpuinfo = read_file("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    flags = flags.group(1).split() if flags else []
    mem = re.search(r"^MemTotal:\s*(\d+) kB", read_file("/proc/meminfo"), re.M)
    pvm = os.path.exists("/sys/module/kvm_pvm")
    if pvm:
        backend = "PVM (kvm_pvm: guest kernel native in PV mode where its paravirtual interface answers, else emulated)"
    elif "vmx" in flags or "svm" in flags:
        backend = "hardware virtualization (" + ("VT-x" if "vmx" in flags else "AMD-V") + ")"
    else:
        backend = "unknown (no kvm_pvm module and no vmx/svm flag)"
    def git(*args):
        try:
            return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem.group(1)) / (1 << 20), 1) if mem else None,
        "host_kernel": platform.release(),
        "backend": backend,
        "pvm": pvm,
        "vmx_or_svm": "vmx" in flags or "svm" in flags,
        "loadavg_at_start": read_file("/proc/loadavg").split()[:3],
        "commit": git("rev-parse", "--short", "HEAD"),
        # Uncommitted changes other than this benchmark's own outputs.
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                          ":!docs/benchmarks.md", ":!docs/boot-timeline.svg", ":!bench/results")),
        "vmlinux_bytes": file_size(os.path.join(image_dir(), "vmlinux")),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ------------------------------------------------------------------------ memory

def smaps(pid):
    """The process's mappings from /proc/PID/smaps: size (bytes), Rss (KiB), name."""
    maps, cur = [], None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    parts = line.split(None, 5)
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    cur = {"lo": lo, "hi": hi, "size": hi - lo, "perm": parts[1],
                           "name": parts[5].strip() if len(parts) > 5 else "", "rss": 0}
                    maps.append(cur)
                elif cur is not None and line.startswith(("Rss:", "Private_Dirty:", "Shared_Dirty:")):
                    key = {"Rss:": "rss", "Private_Dirty:": "pd", "Shared_Dirty:": "sd"}[line.split()[0]]
                    cur[key] = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return maps


def is_anonymous(name):
    return name == "" or name.startswith("[anon") or name.startswith("/dev/zero") or name.startswith("/memfd:") \
        or name.startswith("/SYSV")


def guest_run(maps, guest_bytes):
    """Adjacent mappings, starting and ending with shared anonymous memory, that span guest_bytes."""
    ordered = sorted((m for m in maps if "lo" in m), key=lambda m: m["lo"])
    for i, first in enumerate(ordered):
        if not (is_anonymous(first["name"]) and first["perm"].endswith("s")):
            continue
        run = [first]
        for m in ordered[i + 1:]:
            if m["lo"] != run[-1]["hi"] or run[-1]["hi"] - first["lo"] >= guest_bytes:
                break
            run.append(m)
        if run[-1]["hi"] - first["lo"] == guest_bytes and len(run) > 1 and is_anonymous(run[-1]["name"]):
            return run
    return []


def memory_split(maps, guest_bytes):
    """Total Rss, the guest RAM's Rss (the anonymous mapping of exactly the guest
    size, or failing that the largest anonymous mapping at least that big) and
    what is left, split into file-backed (binaries, libraries) and the rest."""
    if not maps:
        return None
    anon = [m for m in maps if is_anonymous(m["name"])]
    exact = [m for m in anon if m["size"] == guest_bytes]
    # The VMM maps the kernel's segments into guest RAM copy-on-write, which
    # splits the RAM mapping: a run of adjacent mappings, shared anonymous memory
    # with file pieces between, spanning exactly the guest's size, is the RAM.
    if not exact:
        exact = guest_run(maps, guest_bytes)
    guest = exact or sorted((m for m in anon if m["size"] >= guest_bytes), key=lambda m: m["size"])[:1]
    if not guest:
        return None  # the guest RAM is not mapped (yet, or any more)
    guest_ids = {id(m) for m in guest}
    total = sum(m["rss"] for m in maps)
    guest_rss = sum(m["rss"] for m in guest)
    rest = [m for m in maps if id(m) not in guest_ids]
    files = [m for m in rest if m["name"].startswith("/") and not is_anonymous(m["name"])]
    file_rss = sum(m["rss"] for m in files)
    by_file = {}
    for m in files:
        by_file[m["name"]] = by_file.get(m["name"], 0) + m["rss"]
    top = sorted(by_file.items(), key=lambda kv: -kv[1])[:6]
    return {
        "total_kib": total, "guest_kib": guest_rss, "vmm_kib": total - guest_rss,
        "vmm_file_kib": file_rss, "vmm_anon_kib": total - guest_rss - file_rss,
        "vmm_dirty_kib": sum(m.get("pd", 0) + m.get("sd", 0) for m in rest),
        "top_files_kib": [[os.path.basename(n), k] for n, k in top],
        "guest_mapping": [{"size": m["size"], "name": m["name"] or "(anonymous)"} for m in guest],
        "exact_size_match": bool(exact),
    }


# --------------------------------------------------------------- running a VMM

class Watched:
    """Runs one VMM process, stamping each stdout line with CLOCK_MONOTONIC,
    sampling its memory from /proc/PID/smaps, collecting its rusage and the
    kvm-probe record. Times are ns; relative ones are from the probe's exec
    stamp when there is one (else from just before the spawn)."""

    def __init__(self, argv, env, timeout, guest_bytes=None, markers=None, sample_every=0.2,
                 stop_when=None, keep_stdout=False, stderr_markers=None):
        self.argv, self.env, self.timeout = argv, env, timeout
        self.guest_bytes, self.markers = guest_bytes, markers or {}
        self.sample_every, self.stop_when, self.keep_stdout = sample_every, stop_when, keep_stdout
        self.lines, self.tail, self.stdout_chunks, self.stderr_tail = [], [], [], []
        self.marks, self.mem_samples = {}, []
        self.stderr_markers = stderr_markers or {}

    def run(self):
        probe_out = tempfile.NamedTemporaryFile(prefix="airlock-probe.", delete=False)
        probe_out.close()
        os.unlink(probe_out.name)
        env = dict(os.environ, **self.env, AIRLOCK_BENCH_PROBE_OUT=probe_out.name)
        self.spawned_ns = time.monotonic_ns()
        p = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
        self.pid = p.pid
        done = threading.Event()
        t_out = threading.Thread(target=self._read_stdout, args=(p.stdout, done), daemon=True)
        t_err = threading.Thread(target=self._read_stderr, args=(p.stderr,), daemon=True)
        t_out.start()
        t_err.start()
        if self.guest_bytes:
            threading.Thread(target=self._sample, args=(done,), daemon=True).start()
        deadline = self.spawned_ns + int(self.timeout * 1e9)
        killed = None
        status = ru = None
        while True:
            pid, st, r = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                status, ru = st, r
                break
            now = time.monotonic_ns()
            stop = self.stop_when is not None and self.stop_when(self)
            if (now > deadline or stop) and killed is None:
                killed = "timeout" if now > deadline else "stopped by the benchmark"
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        self.exited_ns = time.monotonic_ns()
        p.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        t_out.join(5)
        t_err.join(5)
        probe = None
        text = read_file(probe_out.name)
        if text.strip():
            try:
                probe = json.loads(text.strip().splitlines()[0])
            except json.JSONDecodeError:
                probe = None
        try:
            os.unlink(probe_out.name)
        except OSError:
            pass
        self.probe = probe
        self.t0 = probe["t0_ns"] if probe and probe.get("t0_ns") else self.spawned_ns
        self.returncode, self.killed = p.returncode, killed
        self.cpu_user_ms = ru.ru_utime * 1e3
        self.cpu_sys_ms = ru.ru_stime * 1e3
        self.maxrss_kib = ru.ru_maxrss
        return self

    def _read_stdout(self, f, done):
        for raw in iter(f.readline, b""):
            now = time.monotonic_ns()
            if self.keep_stdout:
                self.stdout_chunks.append(raw)
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.tail = (self.tail + [line])[-20:]
            for key, pattern in self.markers.items():
                if key not in self.marks and re.search(pattern, line):
                    self.marks[key] = now
        f.close()

    def _read_stderr(self, f):
        for raw in iter(f.readline, b""):
            now = time.monotonic_ns()
            line = raw.decode("utf-8", "replace").rstrip()
            self.stderr_tail = (self.stderr_tail + [line])[-20:]
            for key, pattern in self.stderr_markers.items():
                if key not in self.marks and re.search(pattern, line):
                    self.marks[key] = now
        f.close()

    def _sample(self, done):
        while not done.is_set():
            m = smaps(self.pid)
            split = memory_split(m, self.guest_bytes) if m else None
            if split:
                split["at_ns"] = time.monotonic_ns()
                self.mem_samples.append(split)
            done.wait(self.sample_every)

    def ms(self, ns):
        return None if not ns else (ns - self.t0) / 1e6

    def start_figures(self):
        """exec to first KVM_RUN from the probe: wall (ms), CPU (ms) and the phases."""
        p = self.probe
        if not p or not p.get("first_run_ns"):
            return None
        cpu_us = p["utime_us"] + p["stime_us"] - int(p.get("launcher_cpu_us") or 0)
        return {
            "wall_ms": (p["first_run_ns"] - self.t0) / 1e6,
            "cpu_ms": cpu_us / 1e3,
            "user_ms": p["utime_us"] / 1e3,
            "sys_ms": p["stime_us"] / 1e3,
            "exec_to_main_ms": (p["loaded_ns"] - self.t0) / 1e6,
            "main_to_first_kvm_ioctl_ms": (p["first_kvm_ioctl_ns"] - p["loaded_ns"]) / 1e6 if p["first_kvm_ioctl_ns"] else None,
            "first_kvm_ioctl_to_first_run_ms": (p["first_run_ns"] - p["first_kvm_ioctl_ns"]) / 1e6 if p["first_kvm_ioctl_ns"] else None,
            "create_vm_to_first_run_ms": (p["first_run_ns"] - p["create_vm_ns"]) / 1e6 if p["create_vm_ns"] else None,
            "rss_at_first_run_kib": p["rss_kib"],
        } | self._setup_phases(p)

    @staticmethod
    def _setup_phases(p):
        """Airlock's order: KVM_CREATE_VM, machine set-up ending with the vCPU's
        KVM_SET_LAPIC, devices and the kernel load ending with KVM_SET_REGS (the
        entry), then the vCPU thread's first KVM_RUN. Wall and CPU per phase."""
        cv, la, rg, fr = p.get("create_vm_ns"), p.get("last_set_lapic_ns"), p.get("last_set_regs_ns"), p.get("first_run_ns")
        if not (cv and la and rg and fr and cv <= la <= rg <= fr):
            return {}
        cpu_fr = p["utime_us"] + p["stime_us"]
        return {
            "machine_setup_ms": (la - cv) / 1e6,
            "machine_setup_cpu_ms": (p["last_set_lapic_cpu_us"] - p["create_vm_cpu_us"]) / 1e3,
            "kernel_load_ms": (rg - la) / 1e6,
            "kernel_load_cpu_ms": (p["last_set_regs_cpu_us"] - p["last_set_lapic_cpu_us"]) / 1e3,
            "vcpu_thread_start_ms": (fr - rg) / 1e6,
            "before_create_vm_cpu_ms": (p["create_vm_cpu_us"] - int(p.get("launcher_cpu_us") or 0)) / 1e3,
        }

    def memory_figures(self, at_ns=None):
        """The VMM's memory: the sample with the most VMM Rss, and the last one at or before at_ns."""
        if not self.mem_samples:
            return None
        peak = max(self.mem_samples, key=lambda s: s["vmm_kib"])
        at = None
        if at_ns:
            before = [s for s in self.mem_samples if s["at_ns"] <= at_ns]
            at = before[-1] if before else None
        last = self.mem_samples[-1]
        def strip(s):
            return None if s is None else {k: v for k, v in s.items() if k != "at_ns"} | {"at_ms": self.ms(s["at_ns"])}
        return {"samples": len(self.mem_samples), "peak_vmm": strip(peak), "at_marker": strip(at), "last": strip(last)}


def probe_env(tools, exit_at_first_run):
    env = {"LD_PRELOAD": os.path.join(tools, "kvm-probe.so")}
    if exit_at_first_run:
        env["AIRLOCK_BENCH_PROBE_EXIT"] = "1"
    return env


# ------------------------------------------------------------------------ exits

def bench_exits(a):
    floor = os.path.join(a.tools, "exit-floor")
    airlock = os.path.join(a.bin, "airlock-bench-exits")
    c, s, setup, ratios = [], [], [], []
    for i in range(a.exit_rounds):
        out = subprocess.run([floor, "1"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"100k out.*?([0-9.]+)s exits=(\d+)", out)
        if not m:
            raise RuntimeError(f"exit-floor printed no timing: {out!r}")
        cs = float(m.group(1))
        out = subprocess.run([airlock, "100000", "1"], capture_output=True, text=True, check=True).stdout
        m1 = re.search(r"median ([0-9.]+) s", out)
        m2 = re.search(r"first KVM_RUN.*median ([0-9.]+) ms", out)
        if not m1:
            raise RuntimeError(f"airlock-bench-exits printed no timing: {out!r}")
        s_ = float(m1.group(1))
        c.append(cs)
        s.append(s_)
        ratios.append(s_ / cs)
        if m2:
            setup.append(float(m2.group(1)))
        log(f"exits round {i + 1}/{a.exit_rounds}: C floor {cs:.4f} s, Airlock {s_:.4f} s, ratio {s_ / cs:.3f}")
    res = {
        "exits_per_round": 100000,
        "c_floor_s": stats(c), "airlock_s": stats(s),
        "ratio_of_medians": statistics.median(s) / statistics.median(c),
        "ratio_per_round": stats(ratios),
        "c_floor_us_per_exit": statistics.median(c) / 100000 * 1e6,
        "airlock_us_per_exit": statistics.median(s) / 100000 * 1e6,
        "machine_setup_ms": stats(setup),
    }
    log(f"exits: ratio of medians {res['ratio_of_medians']:.3f} (target <= 1.2)")
    return res


# ------------------------------------------------------------------------ start

def airlock_boot_argv(a, extra=()):
    return [os.path.join(a.tools, "exec-timed"), os.path.join(a.bin, "airlock"), "boot",
            "--memory", str(a.memory_mib), *extra]


def bench_start(a):
    """exec to first KVM_RUN of `airlock boot` (installed kernel, rootfs on /dev/vda):
    one warm-up run not counted, then N; the probe ends each at its first KVM_RUN."""
    runs = []
    for i in range(a.start_runs + 1):
        w = Watched(airlock_boot_argv(a, ["--timeout", "30"]), probe_env(a.tools, True), timeout=60).run()
        f = w.start_figures()
        if f is None:
            raise RuntimeError(f"airlock boot never reached KVM_RUN (exit {w.returncode}): {w.stderr_tail[-3:]}")
        if i > 0:
            runs.append(f)
    res = figures_from(runs)
    res["command"] = " ".join(["airlock", "boot", "--memory", str(a.memory_mib)])
    res["warmup_runs"] = 1
    log(f"start: exec to first KVM_RUN median {res['wall_ms']['median']:.2f} ms wall, "
        f"{res['cpu_ms']['median']:.2f} ms CPU (target < 10 ms)")
    return res


def figures_from(runs):
    keys = [k for k in runs[0].keys()] if runs else []
    return {k: stats([r.get(k) for r in runs]) for k in keys}


# ------------------------------------------------------------------------- boot

BOOT_MARKERS = {
    "kernel_banner": r"Linux version ",
    "init_started": r"Run \S+ as init process|Freeing unused kernel",
    "ready": r"AIRLOCK-READY",
}


def bench_boot(a):
    guest = a.memory_mib * MIB
    runs, failures = [], []
    for i in range(a.boot_runs):
        w = Watched(airlock_boot_argv(a, ["--timeout", str(a.boot_timeout)]), probe_env(a.tools, False),
                    timeout=a.boot_timeout + 30, guest_bytes=guest, markers=BOOT_MARKERS).run()
        first_run = w.probe["first_run_ns"] if w.probe else None
        r = {
            "exit_status": w.returncode, "killed": w.killed,
            "first_run_ms": w.ms(first_run),
            "kernel_banner_ms": w.ms(w.marks.get("kernel_banner")),
            "init_started_ms": w.ms(w.marks.get("init_started")),
            "ready_ms": w.ms(w.marks.get("ready")),
            "exit_ms": w.ms(w.exited_ns),
            "cpu_user_ms": w.cpu_user_ms, "cpu_sys_ms": w.cpu_sys_ms, "maxrss_kib": w.maxrss_kib,
            "memory": w.memory_figures(w.marks.get("ready")),
            "system_event": next((l for l in reversed(w.stderr_tail) if "guest ended" in l), None),
        }
        if r["ready_ms"] is None or w.returncode != 0:
            r["console_tail"] = w.tail[-8:]
            r["stderr_tail"] = w.stderr_tail[-5:]
            failures.append(r)
            log(f"boot {i + 1}/{a.boot_runs}: FAILED (exit {w.returncode}, {w.killed or 'no marker'}); console: {w.tail[-3:]}")
            continue
        runs.append(r)
        log(f"boot {i + 1}/{a.boot_runs}: first KVM_RUN {r['first_run_ms']:.1f} ms, init {fmt_s(r['init_started_ms'])}, "
            f"ready {fmt_s(r['ready_ms'])}, exit {fmt_s(r['exit_ms'])}; VMM memory {vmm_mib(r['memory'])}")
    res = {"command": f"airlock boot --memory {a.memory_mib}", "runs": runs, "failures": failures}
    if runs:
        res["phases_ms"] = {
            "vmm_start": stats([r["first_run_ms"] for r in runs]),
            "kernel_to_init": stats([sub(r["init_started_ms"], r["first_run_ms"]) for r in runs]),
            "init_to_ready": stats([sub(r["ready_ms"], r["init_started_ms"]) for r in runs]),
            "shutdown": stats([sub(r["exit_ms"], r["ready_ms"]) for r in runs]),
        }
        res["ready_ms"] = stats([r["ready_ms"] for r in runs])
        res["exit_ms"] = stats([r["exit_ms"] for r in runs])
        res["cpu_ms"] = stats([r["cpu_user_ms"] + r["cpu_sys_ms"] for r in runs])
        res["cpu_sys_ms"] = stats([r["cpu_sys_ms"] for r in runs])
    return res


def sub(b, a_):
    return None if a_ is None or b is None else b - a_


def fmt_s(ms):
    return "-" if ms is None else f"{ms / 1000:.2f} s"


def vmm_mib(mem):
    if not mem or not mem.get("peak_vmm"):
        return "-"
    return f"{mem['peak_vmm']['vmm_kib'] / 1024:.2f} MiB (guest touched {mem['peak_vmm']['guest_kib'] / 1024:.1f} MiB)"


def memory_summary(runs):
    """Median/min/max over runs of the VMM's peak Rss beside the guest's, with the split."""
    peaks = [r["memory"]["peak_vmm"] for r in runs if r.get("memory") and r["memory"].get("peak_vmm")]
    if not peaks:
        return None
    return {
        "vmm_mib": stats([p["vmm_kib"] / 1024 for p in peaks]),
        "vmm_file_mib": stats([p["vmm_file_kib"] / 1024 for p in peaks]),
        "vmm_anon_mib": stats([p["vmm_anon_kib"] / 1024 for p in peaks]),
        "vmm_dirty_mib": stats([p["vmm_dirty_kib"] / 1024 for p in peaks]),
        "top_files_kib": peaks[0]["top_files_kib"],
        "maxrss_mib": stats([r["maxrss_kib"] / 1024 for r in runs if r.get("maxrss_kib")]),
        "guest_touched_mib": stats([p["guest_kib"] / 1024 for p in peaks]),
        "total_mib": stats([p["total_kib"] / 1024 for p in peaks]),
        "guest_mapping": peaks[0]["guest_mapping"],
        "exact_size_match": all(p["exact_size_match"] for p in peaks),
        "samples_per_run": [r["memory"]["samples"] for r in runs if r.get("memory")],
    }


def memory_floor(a):
    """The Rss of bench/floor.swift (a Swift program that only waits, linked like
    `airlock`), split like the VMM's: what any Swift VMM on this host starts from."""
    swiftc = shutil.which("swiftc")
    if not swiftc:
        return {"error": "swiftc is not on PATH"}
    binary = os.path.join(a.tools, "swift-floor")
    try:
        subprocess.run([swiftc, "-O", "-static-stdlib", os.path.join(ROOT, "bench", "floor.swift"), "-o", binary],
                       check=True, capture_output=True, text=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return {"error": f"cannot build bench/floor.swift: {getattr(e, 'stderr', '') or e}"}
    p = subprocess.Popen([binary], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        p.stdout.readline()  # "floor ready": the runtime is up
        maps = smaps(p.pid) or []
    finally:
        p.kill()
        p.wait()
    total = sum(m["rss"] for m in maps)
    files = [m for m in maps if m["name"].startswith("/") and not is_anonymous(m["name"])]
    by_file = {}
    for m in files:
        by_file[os.path.basename(m["name"])] = by_file.get(os.path.basename(m["name"]), 0) + m["rss"]
    res = {"rss_mib": total / 1024, "file_mib": sum(m["rss"] for m in files) / 1024,
           "dirty_mib": sum(m.get("pd", 0) + m.get("sd", 0) for m in maps) / 1024,
           "top_files_kib": sorted(by_file.items(), key=lambda kv: -kv[1])[:6]}
    log(f"memory floor: a Swift program that only waits, linked like airlock: Rss {res['rss_mib']:.2f} MiB "
        f"(file-backed {res['file_mib']:.2f})")
    return res


# -------------------------------------------------------------------------- run

RUN_KEYS = ["stdout", "stderr", "exitCode", "signal", "timedOut", "outputTruncated", "systemEvent", "timings"]
RUN_PHASES = ["vmmStartMs", "kernelBootMs", "agentReadyMs", "commandMs", "shutdownMs"]


def parse_run_json(text):
    """Checks `airlock run --json` output against the contract; returns (doc, problems)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [f"stdout is not one JSON document: {e}"]
    if not isinstance(doc, dict):
        return None, ["the JSON document is not an object"]
    problems = [f"missing key {k}" for k in RUN_KEYS if k not in doc]
    t = doc.get("timings") or {}
    problems += [f"missing timings.{k}" for k in RUN_PHASES + ["totalMs"] if not isinstance(t.get(k), (int, float))]
    if not isinstance(doc.get("exitCode"), int):
        problems.append("exitCode is not an integer")
    if doc.get("signal") is not None and not isinstance(doc.get("signal"), int):
        problems.append("signal is neither null nor a number")
    return doc, problems


def phase_layout(t):
    """The timings are phase durations when they add up to totalMs (the
    contract as written); cumulative stamps when they rise to totalMs."""
    vals = [float(t[k]) for k in RUN_PHASES]
    total = float(t["totalMs"])
    if total > 0 and abs(sum(vals) - total) <= max(0.05 * total, 5):
        return "durations"
    if all(b >= a_ for a_, b in zip(vals, vals[1:])) and total > 0 and abs(vals[-1] - total) <= 0.05 * total:
        return "cumulative"
    return "durations (sum {:.0f} ms of {:.0f} ms total)".format(sum(vals), total)


def run_available(airlock):
    """(`airlock help run` shows the subcommand's usage, its options included;
    `airlock run --help` would run --help in a guest.)"""
    p = subprocess.run([airlock, "help", "run"], capture_output=True, text=True)
    text = p.stdout + p.stderr
    return p.returncode == 0 and "USAGE: airlock run" in text, text


def bench_run(a):
    airlock = a.airlock_for_run or os.path.join(a.bin, "airlock")
    ok, help_text = run_available(airlock)
    if not ok:
        return {"available": False, "reason": "`airlock run` is not in this build (`airlock help run` shows no usage for it)"}
    extra = ["--memory", str(a.memory_mib)] if "--memory" in help_text else []
    # --console copies the guest's console to stderr (the guest writes it either
    # way): the kernel's "Run /sbin/airlock-init as init process" line splits
    # kernelBootMs into the kernel's boot and the agent's start.
    console = ["--console"] if "--console" in help_text else []
    # This section is the cold boot's timeline; restores are the snapshot section's.
    cold = ["--no-snapshot"] if "--no-snapshot" in help_text else []
    argv = [os.path.join(a.tools, "exec-timed"), airlock, "run", "--json", *extra, *console, *cold, "--", "true"]
    guest = a.memory_mib * MIB if extra else None
    runs, failures = [], []
    for i in range(a.run_runs):
        w = Watched(argv, probe_env(a.tools, False), timeout=a.boot_timeout + 60, guest_bytes=guest,
                    keep_stdout=True, stderr_markers={"init_started": BOOT_MARKERS["init_started"]}).run()
        text = b"".join(w.stdout_chunks).decode("utf-8", "replace")
        doc, problems = parse_run_json(text)
        wall = w.ms(w.exited_ns)
        if doc is None or problems or w.killed:
            failures.append({"exit_status": w.returncode, "killed": w.killed, "problems": problems,
                             "stdout_head": text[:400], "stderr_tail": w.stderr_tail[-5:]})
            log(f"run {i + 1}/{a.run_runs}: FAILED ({w.killed or problems}); stderr: {w.stderr_tail[-2:]}")
            continue
        t = doc["timings"]
        r = {
            "exit_status": w.returncode, "exitCode": doc["exitCode"], "signal": doc["signal"],
            "timedOut": doc["timedOut"], "systemEvent": doc["systemEvent"],
            "timings": {k: float(t[k]) for k in RUN_PHASES + ["totalMs"]},
            "layout": phase_layout(t),
            "wall_ms": wall, "first_run_ms": w.ms(w.probe["first_run_ns"]) if w.probe else None,
            "init_started_ms": w.ms(w.marks.get("init_started")),
            "cpu_user_ms": w.cpu_user_ms, "cpu_sys_ms": w.cpu_sys_ms, "maxrss_kib": w.maxrss_kib,
            "memory": w.memory_figures(),
        }
        if r["first_run_ms"] is not None and r["init_started_ms"] is not None:
            hello = r["first_run_ms"] + r["timings"]["kernelBootMs"]  # exec-relative, like the others
            r["kernel_to_init_ms"] = r["init_started_ms"] - r["first_run_ms"]
            r["init_to_hello_ms"] = hello - r["init_started_ms"]
        runs.append(r)
        log(f"run {i + 1}/{a.run_runs}: exit {doc['exitCode']}, total {t['totalMs']:.0f} ms, wall {wall:.0f} ms; "
            + ", ".join(f"{k} {float(t[k]):.0f}" for k in RUN_PHASES) + f"; VMM memory {vmm_mib(r['memory'])}")
    res = {"available": True, "command": " ".join(["airlock run --json", *extra, *console, "-- true"]),
           "memory_mib": a.memory_mib if extra else None, "runs": runs, "failures": failures}
    if runs:
        res["layout"] = runs[0]["layout"]
        res["timings_ms"] = {k: stats([r["timings"][k] for r in runs]) for k in RUN_PHASES + ["totalMs"]}
        res["wall_ms"] = stats([r["wall_ms"] for r in runs])
        res["exec_to_first_run_ms"] = stats([r["first_run_ms"] for r in runs])
        res["kernel_to_init_ms"] = stats([r.get("kernel_to_init_ms") for r in runs])
        res["init_to_hello_ms"] = stats([r.get("init_to_hello_ms") for r in runs])
        res["cpu_ms"] = stats([r["cpu_user_ms"] + r["cpu_sys_ms"] for r in runs])
        res["all_exit_zero"] = all(r["exitCode"] == 0 for r in runs)
    return res


# -------------------------------------------------------------------------- pv

PIPELINE = "seq 1 20000 | awk '{print $1 % 97}' | sort -n | uniq -c"
PV_MODES = [("native", {}), ("emulated", {"AIRLOCK_PV": "off"})]


def host_seconds(argv, stdin_bytes=None, repeats=5):
    """The host's own time for a command (median of `repeats`), and its output."""
    times, out = [], None
    for _ in range(repeats):
        t = time.monotonic()
        p = subprocess.run(argv, input=stdin_bytes, capture_output=True)
        times.append(time.monotonic() - t)
        out = p.stdout
    return stats([x * 1e3 for x in times]), out


def airlock_run_json(a, env, command, stdin_bytes=None, timeout=None):
    """One `airlock run --json` in the mode `env` selects, booted cold (`--no-snapshot`:
    these sections time the boot and the guest kernel's work; restores are the snapshot
    section's): its JSON document and wall ms."""
    argv = [os.path.join(a.bin, "airlock"), "run", "--json", "--no-snapshot", "--memory", str(a.memory_mib), "--", *command]
    t = time.monotonic()
    p = subprocess.run(argv, input=stdin_bytes, capture_output=True, env=dict(os.environ, **env),
                       timeout=timeout or a.boot_timeout + 1800)
    wall = (time.monotonic() - t) * 1e3
    doc, problems = parse_run_json(p.stdout.decode("utf-8", "replace"))
    if doc is None or problems:
        raise RuntimeError(f"airlock run {command[:2]} failed: {problems} {p.stderr.decode()[-300:]}")
    return doc, wall


# Appended to a workload: the guest's CPU time line (on stderr), for its steal time.
STAT_TAIL = "; head -1 /proc/stat >&2"


def guest_steal(doc):
    """The guest kernel's accounting since its boot (USER_HZ ticks from /proc/stat's cpu
    line): the share of its time its vCPU was runnable on the host but not running
    ("steal", from kvm-clock's steal time), which is the host's CPU contention."""
    m = re.search(r"^cpu +([0-9 ]+)$", doc.get("stderr") or "", re.M)
    if not m:
        return None
    v = [int(x) for x in m.group(1).split()]
    total = sum(v[:8])
    return {"steal_s": v[7] / 100, "total_s": total / 100, "fraction": v[7] / total if total else None}


def pv_boots(a, env, n):
    guest = a.memory_mib * MIB
    runs = []
    for i in range(n):
        w = Watched(airlock_boot_argv(a, ["--timeout", str(a.boot_timeout)]), dict(probe_env(a.tools, False), **env),
                    timeout=a.boot_timeout + 30, guest_bytes=guest, markers=BOOT_MARKERS).run()
        first = w.probe["first_run_ns"] if w.probe else None
        r = {"first_run_ms": w.ms(first), "kernel_banner_ms": w.ms(w.marks.get("kernel_banner")),
             "init_started_ms": w.ms(w.marks.get("init_started")), "ready_ms": w.ms(w.marks.get("ready")),
             "exit_ms": w.ms(w.exited_ns), "cpu_ms": w.cpu_user_ms + w.cpu_sys_ms}
        if r["ready_ms"] is None or w.returncode != 0:
            log(f"pv boot {i + 1}: FAILED (exit {w.returncode}); console {w.tail[-3:]}")
            continue
        runs.append(r)
    return {
        "n": len(runs),
        "vmm_start_ms": stats([r["first_run_ms"] for r in runs]),
        "first_run_to_banner_ms": stats([sub(r["kernel_banner_ms"], r["first_run_ms"]) for r in runs]),
        "banner_to_init_ms": stats([sub(r["init_started_ms"], r["kernel_banner_ms"]) for r in runs]),
        "first_run_to_init_ms": stats([sub(r["init_started_ms"], r["first_run_ms"]) for r in runs]),
        "init_to_ready_ms": stats([sub(r["ready_ms"], r["init_started_ms"]) for r in runs]),
        "ready_ms": stats([r["ready_ms"] for r in runs]),
        "exit_ms": stats([r["exit_ms"] for r in runs]),
        "cpu_ms": stats([r["cpu_ms"] for r in runs]),
    }


def bench_pv(a):
    """Native against emulated on one PVM host, alternating the modes within each step.
    Emulated runs are few and the byte and system-call counts smaller there (each emulated
    megabyte or thousand system calls costs tens of seconds), and each figure says which."""
    if not os.path.exists("/sys/module/kvm_pvm"):
        return {"applicable": False, "reason": "not a PVM host: the guest kernel runs as on any KVM host"}
    doctor = subprocess.run([os.path.join(a.bin, "airlock"), "doctor"], capture_output=True, text=True).stdout
    mode_line = next((l.strip() for l in doctor.splitlines() if "guest mode:" in l), "")
    if "pvm-native" not in mode_line:
        return {"applicable": False, "reason": f"no native mode here ({mode_line or 'airlock doctor says nothing'})"}
    prog = os.path.join(a.tools, "pvmode")
    with open(prog, "rb") as f:
        pvmode = f.read()
    n = {"native": a.pv_runs, "emulated": a.pv_emulated_runs}
    res = {"doctor": mode_line, "modes": {}, "pipeline": PIPELINE}
    for mode, env in PV_MODES:
        res["modes"][mode] = {"boot": pv_boots(a, env, n[mode])}
        log(f"pv {mode}: boot ready {mmm_log(res['modes'][mode]['boot']['ready_ms'])}")
    for mode, env in PV_MODES:
        runs = []
        for _ in range(n[mode]):
            doc, wall = airlock_run_json(a, env, ["true"])
            runs.append({"wall_ms": wall, "guestMode": doc.get("guestMode"), **{k: float(doc["timings"][k]) for k in RUN_PHASES + ["totalMs"]}})
        m = res["modes"][mode]
        m["guest_mode"] = runs[0]["guestMode"] if runs else None
        m["run_true"] = {k: stats([r[k] for r in runs]) for k in RUN_PHASES + ["totalMs", "wall_ms"]}
        log(f"pv {mode}: run -- true total {mmm_log(m['run_true']['totalMs'])} (mode {m['guest_mode']})")

    # The workloads, and the host's own time for each with the same busybox the guest has.
    busybox = shutil.which("busybox") or "/bin/busybox"
    res["host"] = {}
    res["host"]["pipeline_ms"], host_pipe = host_seconds([busybox, "sh", "-c", PIPELINE])
    res["host"]["pipeline_gnu_ms"], _ = host_seconds(["sh", "-c", PIPELINE])
    size = {"native": a.pv_wc_bytes, "emulated": a.pv_wc_bytes_emulated}
    calls = {"native": a.pv_syscalls, "emulated": a.pv_syscalls_emulated}
    for mode, env in PV_MODES:
        m = res["modes"][mode]
        doc, wall = airlock_run_json(a, env, ["sh", "-c", PIPELINE + STAT_TAIL])
        m["pipeline"] = {"command_ms": doc["timings"]["commandMs"], "total_ms": doc["timings"]["totalMs"], "wall_ms": wall,
                         "same_output_as_host": doc["stdout"].encode() == host_pipe, "steal": guest_steal(doc)}
        zeros = bytes(size[mode])
        doc, wall = airlock_run_json(a, env, ["sh", "-c", "wc -c" + STAT_TAIL], stdin_bytes=zeros)
        m["wc"] = {"bytes": size[mode], "command_ms": doc["timings"]["commandMs"], "total_ms": doc["timings"]["totalMs"],
                   "wall_ms": wall, "output_ok": doc["stdout"].strip() == str(size[mode]), "steal": guest_steal(doc)}
        doc, wall = airlock_run_json(a, env, ["sh", "-c", f"cat > /tmp/p && chmod +x /tmp/p && /tmp/p --syscalls {calls[mode]}"],
                              stdin_bytes=pvmode)
        f = dict(kv.split("=", 1) for kv in doc["stdout"].split() if "=" in kv)
        m["getppid"] = {"calls": calls[mode], "ns": float(f.get("ns_per_getppid", "nan")), "native_flag": f.get("native")}
        log(f"pv {mode}: pipeline {m['pipeline']['command_ms']:.0f} ms, wc -c of {size[mode]} bytes "
            f"{m['wc']['command_ms']:.0f} ms, getppid {m['getppid']['ns']:.0f} ns")
    wc_host = {}
    for mode in ("native", "emulated"):
        wc_host[mode], _ = host_seconds(["sh", "-c", f"head -c {size[mode]} /dev/zero | {busybox} wc -c"])
    res["host"]["wc_ms"] = wc_host
    hp = subprocess.run([prog, "--syscalls", str(a.pv_syscalls)], capture_output=True, text=True).stdout
    res["host"]["getppid_ns"] = float(re.search(r"ns_per_getppid=([0-9.]+)", hp).group(1))

    nat, emu, host = res["modes"]["native"], res["modes"]["emulated"], res["host"]
    res["ratios"] = {
        "pipeline_native_over_host": nat["pipeline"]["command_ms"] / host["pipeline_ms"]["median"],
        "wc_native_over_host": nat["wc"]["command_ms"] / host["wc_ms"]["native"]["median"],
        "getppid_native_over_host": nat["getppid"]["ns"] / host["getppid_ns"],
        "getppid_emulated_over_native": emu["getppid"]["ns"] / nat["getppid"]["ns"],
        "ready_emulated_over_native": emu["boot"]["ready_ms"]["median"] / nat["boot"]["ready_ms"]["median"]
        if emu["boot"]["ready_ms"] and nat["boot"]["ready_ms"] else None,
    }
    return res


def mmm_log(s):
    return f"{s['median']:.0f} ms (N={s['n']})" if s else "-"


# -------------------------------------------------------------------------- ctxswitch

CTX_MODES = [
    # What the guest kernel saves on a context switch, how Airlock boots it for that, and the
    # AIRLOCK_PV setting: the first two are the emulated kernel (issue 11), the last PV mode.
    ("fxsave", "legacy x87/SSE state only (noxsave: the old emulated profile; wrong, AVX leaks)", ["--cmdline", "noxsave"], "off"),
    ("xsave", "all enabled state (emulated kernel, XSAVE completed by the VMM)", [], "off"),
    ("native", "all enabled state (kernel in PV mode: XSAVE runs natively)", [], None),
]


def bench_ctxswitch(a):
    """One guest context switch (a sched_yield ping-pong between two processes, vecstress
    --pingpong) with the guest kernel saving the legacy state only against XSAVE completed by
    the VMM: what the fidelity fix costs per switch. Both in one run, alternating."""
    airlock = os.path.join(a.bin, "airlock")
    prog = os.path.join(a.tools, "vecstress")
    if not os.path.exists(prog):
        return {"error": f"{prog} is missing: make bench-c builds it"}
    with open(prog, "rb") as f:
        binary = f.read()
    script = ("cat > /tmp/v && chmod +x /tmp/v && for i in $(seq 1 %d); do /tmp/v --pingpong %d; done"
              % (a.ctx_repeats, a.ctx_yields))
    samples = {m: [] for m, _, _, _ in CTX_MODES}
    failures = []
    for rnd in range(a.ctx_rounds):
        for mode, _, extra, pv in CTX_MODES:
            argv = [airlock, "run", "--json", "--no-snapshot", "--timeout", "1200", *extra, "--", "sh", "-c", script]
            env = dict(os.environ)
            if pv:
                env["AIRLOCK_PV"] = pv
            else:
                env.pop("AIRLOCK_PV", None)
            p = subprocess.run(argv, input=binary, capture_output=True, timeout=a.boot_timeout + 1500, env=env)
            doc, problems = parse_run_json(p.stdout.decode("utf-8", "replace"))
            values = [int(m) for m in re.findall(r"ns_per_switch=(\d+)", (doc or {}).get("stdout") or "")]
            if problems or not values or doc.get("exitCode") != 0:
                failures.append({"mode": mode, "round": rnd, "problems": problems, "stderr": p.stderr.decode()[-400:]})
                log(f"ctxswitch {mode} round {rnd + 1}: FAILED {problems} {p.stderr.decode()[-200:]}")
                continue
            samples[mode] += [v / 1000 for v in values]
            log(f"ctxswitch {mode} round {rnd + 1}: {', '.join(f'{v / 1000:.1f}' for v in values)} us per switch")
    res = {"yields": a.ctx_yields, "repeats": a.ctx_repeats, "rounds": a.ctx_rounds, "failures": failures,
           "modes": {m: {"what": what, "us_per_switch": stats(samples[m])} for m, what, _, _ in CTX_MODES}}
    fx, xs = res["modes"]["fxsave"]["us_per_switch"], res["modes"]["xsave"]["us_per_switch"]
    if fx and xs:
        res["ratio_of_medians"] = xs["median"] / fx["median"]
        res["added_us_per_switch"] = xs["median"] - fx["median"]
        # Other work on the machine only ever adds time: the fastest round of each is the
        # figure least disturbed by it.
        res["ratio_of_minima"] = xs["min"] / fx["min"]
        res["added_us_per_switch_at_minima"] = xs["min"] - fx["min"]
    return res


# -------------------------------------------------------------------------- blk

BLK_INIT = """#!/bin/sh
mount -t proc proc /proc
i=1
while [ $i -le {passes} ]; do
    read a _ < /proc/uptime
    dd if=/dev/vdb of=/dev/null bs=1M count=1 iflag=direct 2>/dev/null
    read b _ < /proc/uptime
    dd if=/dev/vdb of=/dev/null bs=1M iflag=direct 2>/dev/null
    read c _ < /proc/uptime
    echo "GUEST-DD $i $a $b $c" > /dev/console
    i=$((i + 1))
done
reboot -f
"""


def host_dd(path):
    out = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct"],
                         capture_output=True, text=True, check=True).stderr.strip().splitlines()[-1]
    m = re.match(r"^(\d+) bytes.* copied, ([0-9.e-]+) s", out)
    return int(m.group(1)) / float(m.group(2)) / 1e6


def bench_blk(a):
    """The guest reads /dev/vdb (a file of random bytes) with
    `dd bs=1M iflag=direct`, timed with /proc/uptime, PASSES times in one boot,
    each minus a 1-block dd that measures the fork and exec; the host reads the
    same file with GNU dd iflag=direct PASSES times before and after."""
    work = tempfile.mkdtemp(prefix="airlock-bench-blk.")
    try:
        with open(os.path.join(work, "init"), "w") as f:
            f.write(BLK_INIT.format(passes=a.blk_passes))
        os.chmod(os.path.join(work, "init"), 0o755)
        subprocess.run([os.path.join(ROOT, "rootfs", "build.sh"), "--init", os.path.join(work, "init"), "--out", work],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        disk = os.path.join(work, "disk.img")
        subprocess.run(["dd", "if=/dev/urandom", f"of={disk}", "bs=1M", f"count={a.blk_mib}", "status=none"], check=True)
        os.sync()
        host = [host_dd(disk) for _ in range(a.blk_passes)]
        images = image_dir()
        argv = [os.path.join(a.tools, "exec-timed"), os.path.join(a.bin, "airlock"), "boot",
                "--kernel", os.path.join(images, "vmlinux"), "--rootfs", os.path.join(work, "rootfs.ext4"),
                "--disk", disk, "--memory", str(a.memory_mib), "--timeout", "900"]
        w = Watched(argv, probe_env(a.tools, False), timeout=960, keep_stdout=True).run()
        host += [host_dd(disk) for _ in range(a.blk_passes)]
    finally:
        subprocess.run(["rm", "-rf", work])
    text = b"".join(w.stdout_chunks).decode("utf-8", "replace")
    passes = []
    for m in re.finditer(r"GUEST-DD (\d+) ([0-9.]+) ([0-9.]+) ([0-9.]+)", text):
        ua, ub, uc = float(m.group(2)), float(m.group(3)), float(m.group(4))
        start = ub - ua
        whole = uc - ub
        t = whole - start if whole - start > 0 else whole
        passes.append({"one_block_s": start, "whole_s": whole, "read_s": t,
                       "mbps": a.blk_mib * MIB / t / 1e6})
    if not passes:
        return {"size_mib": a.blk_mib, "error": f"the guest printed no timing (exit {w.returncode}, {w.killed})",
                "console_tail": w.tail[-8:]}
    guest_mbps = stats([p["mbps"] for p in passes])
    host_mbps = stats(host)
    res = {
        "size_mib": a.blk_mib, "passes": passes, "host_mbps": host_mbps, "guest_mbps": guest_mbps,
        "ratio": guest_mbps["median"] / host_mbps["median"],
        "vmm_cpu_user_s": w.cpu_user_ms / 1e3, "vmm_cpu_sys_s": w.cpu_sys_ms / 1e3,
        "vmm_wall_s": (w.exited_ns - w.t0) / 1e9,
    }
    log(f"blk: host {host_mbps['median']:.0f} MB/s, guest {guest_mbps['median']:.1f} MB/s, ratio {res['ratio']:.3f} (target >= 0.8)")
    return res


def image_dir():
    base = os.environ.get("AIRLOCK_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "airlock")
    return os.path.join(base, "images")


# ------------------------------------------------------------------------- qemu

def profile_cmdline():
    """Airlock's command line for a disk root, as Machine.baseCommandLine and
    HostProfile build it (read from the sources so the two cannot drift)."""
    src = read_file(os.path.join(ROOT, "Sources", "VMM", "Machine.swift"))
    base = re.search(r'baseCommandLine = "([^"]*)"', src).group(1)
    params = []
    if os.path.exists("/sys/module/kvm_pvm"):
        prof = read_file(os.path.join(ROOT, "Sources", "VMM", "HostProfile.swift"))
        m = re.search(r"case \.pvm:.*?return \[([^\]]*)\]", prof, re.S)
        params = re.findall(r'"([^"]*)"', m.group(1)) if m else []
    return " ".join([base, *params, "root=/dev/vda ro rootfstype=ext4"])


def qemu_argv(qemu, a, cpu=None, kernel=True):
    images = image_dir()
    argv = [qemu, "-M", "microvm,acpi=off", "-enable-kvm"]
    if cpu:
        argv += ["-cpu", cpu]
    argv += ["-m", str(a.memory_mib), "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
             "-serial", "stdio", "-no-reboot",
             "-drive", f"id=root,file={os.path.join(images, 'rootfs.ext4')},format=raw,if=none,readonly=on",
             "-device", "virtio-blk-device,drive=root"]
    if kernel:
        argv += ["-kernel", os.path.join(images, "vmlinux"), "-append", profile_cmdline()]
    return argv


def bench_qemu(a):
    qemu = subprocess.run(["sh", "-c", "command -v qemu-system-x86_64"], capture_output=True, text=True).stdout.strip()
    if not qemu:
        return {"installed": False, "reason": "qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)"}
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    et = os.path.join(a.tools, "exec-timed")
    guest = a.memory_mib * MIB
    res = {"installed": True, "version": version, "cmdline": profile_cmdline(), "attempts": []}
    attempts = [
        ("vmlinux, default CPU", qemu_argv(qemu, a), True),
        ("vmlinux, -cpu host", qemu_argv(qemu, a, cpu="host"), True),
        ("no kernel (QEMU's microvm firmware only), -cpu host", qemu_argv(qemu, a, cpu="host", kernel=False), False),
        ("no kernel (QEMU's microvm firmware only), default CPU", qemu_argv(qemu, a, kernel=False), False),
    ]
    booted = None
    for label, argv, boots_linux in attempts:
        timeout = a.qemu_timeout if boots_linux else a.qemu_firmware_seconds
        w = Watched([et, *argv], probe_env(a.tools, False), timeout=timeout, guest_bytes=guest,
                    markers=BOOT_MARKERS).run()
        wall = (w.exited_ns - w.t0) / 1e9
        ended = "killed after the benchmark's timeout" if w.killed == "timeout" else describe_status(w.returncode)
        at = {
            "label": label, "argv": ["qemu-system-x86_64", *argv[1:]],
            "exit": ended, "exit_status": w.returncode, "seconds": wall,
            "reached_kvm_run": bool(w.probe and w.probe.get("first_run_ns")),
            "first_run_ms": w.ms(w.probe["first_run_ns"]) if w.probe and w.probe.get("first_run_ns") else None,
            "ready_ms": w.ms(w.marks.get("ready")), "kernel_banner_ms": w.ms(w.marks.get("kernel_banner")),
            "last_output": [l for l in (w.tail + w.stderr_tail) if l.strip()][-6:],
            "memory": w.memory_figures(),
        }
        res["attempts"].append(at)
        log(f"qemu {label}: {ended} after {wall:.2f} s; KVM_RUN {'reached' if at['reached_kvm_run'] else 'not reached'}; "
            f"last output: {at['last_output'][-2:]}")
        if boots_linux and at["ready_ms"] is not None and booted is None:
            booted = (label, argv)
    res["booted"] = booted is not None
    # exec to first KVM_RUN, the same probe as Airlock's: on the configuration
    # that boots, else on the firmware-only one (it reaches KVM_RUN too).
    label, argv = booted if booted else (attempts[3][0], attempts[3][1])
    starts = []
    for i in range(a.start_runs + 1):
        w = Watched([et, *argv], probe_env(a.tools, True), timeout=30).run()
        f = w.start_figures()
        if f and i > 0:
            starts.append(f)
    if starts:
        res["start"] = figures_from(starts) | {"configuration": label, "warmup_runs": 1}
        log(f"qemu start ({label}): exec to first KVM_RUN median {res['start']['wall_ms']['median']:.2f} ms wall, "
            f"{res['start']['cpu_ms']['median']:.2f} ms CPU")
    if booted:
        runs = []
        for i in range(a.boot_runs):
            w = Watched([et, *booted[1]], probe_env(a.tools, False), timeout=a.qemu_timeout, guest_bytes=guest,
                        markers=BOOT_MARKERS).run()
            runs.append({"first_run_ms": w.ms(w.probe["first_run_ns"]) if w.probe else None,
                         "init_started_ms": w.ms(w.marks.get("init_started")), "ready_ms": w.ms(w.marks.get("ready")),
                         "exit_ms": w.ms(w.exited_ns), "memory": w.memory_figures(w.marks.get("ready"))})
        res["boot_runs"] = runs
        res["ready_ms"] = stats([r["ready_ms"] for r in runs])
        res["memory"] = memory_summary(runs)
    else:
        fw = [at for at in res["attempts"] if at["reached_kvm_run"] and at.get("memory")]
        if fw:
            res["firmware_memory"] = {"configuration": fw[-1]["label"], "seconds": a.qemu_firmware_seconds,
                                      "peak_vmm": fw[-1]["memory"]["peak_vmm"]}
    return res


def describe_status(rc):
    if rc is None:
        return "unknown"
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


# ------------------------------------------------------------------------- fuzz

def bench_fuzz(a):
    p = subprocess.run([os.path.join(a.bin, "airlock-fuzz-virtio"), str(a.fuzz_iterations), "1"],
                       capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    m = re.search(r"(\d+) iterations, seed (\d+), ([0-9.]+) s \((\d+) per s\)", p.stdout)
    res = {"exit_status": p.returncode, "lines": lines, "passed": p.returncode == 0 and "PASS" in lines[-1:]}
    if m:
        res.update(iterations=int(m.group(1)), seed=int(m.group(2)), seconds=float(m.group(3)), per_second=int(m.group(4)))
    log(f"fuzz: {lines[0] if lines else p.stderr[-200:]} {'PASS' if res['passed'] else 'FAIL'}")
    return res


# -------------------------------------------------------------------- workspace

def make_tree(root, files, total_bytes, seed=1):
    """`files` files of equal size (deterministic bytes) in 20 directories."""
    import random
    rnd = random.Random(seed)
    size = total_bytes // files
    for i in range(files):
        d = os.path.join(root, f"dir{i % 20:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"file{i:04d}.bin"), "wb") as f:
            f.write(rnd.randbytes(size))


def timed(argv):
    t = time.monotonic_ns()
    p = subprocess.run(argv, capture_output=True, text=True)
    ms = (time.monotonic_ns() - t) / 1e6
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed (exit {p.returncode}): {p.stderr.strip()[-300:]}")
    return ms, p.stdout


def bench_workspace(a):
    """Alternating rounds of (cp -a of the tree, Airlock's step on the same tree), for
    the workspace image (prepare) and the artifact extraction (extract)."""
    tool = os.path.join(a.bin, "airlock-bench-workspace")
    files, total = a.workspace_files, a.workspace_mib * MIB
    res = {"files": files, "bytes": total, "rounds": a.workspace_rounds}
    with tempfile.TemporaryDirectory(prefix="airlock-bench-workspace-") as d:
        ws = os.path.join(d, "ws")
        make_tree(os.path.join(ws, "out"), files, total)
        image = os.path.join(d, "extract.ext4")
        timed([tool, "build", ws, image])  # the image extractions read from
        steps = {"prepare": ([], [], [], []), "extract": ([], [], [], [])}
        for i in range(a.workspace_rounds + 1):
            for step in ("prepare", "extract"):
                src = ws if step == "prepare" else os.path.join(ws, "out")
                copy, out = os.path.join(d, "copy"), os.path.join(d, "out")
                # Both sides write into the page cache; a sync before each keeps one's
                # writeback from being charged to the other.
                os.sync()
                cp_ms, _ = timed(["cp", "-a", src, copy])
                os.sync()
                if step == "prepare":
                    wall, text = timed([tool, "build", ws, os.path.join(d, "ws.ext4")])
                else:
                    wall, text = timed([tool, "extract", image, "/out", out])
                own = json.loads(text)["ms"]
                shutil.rmtree(copy, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
                if os.path.exists(os.path.join(d, "ws.ext4")):
                    os.unlink(os.path.join(d, "ws.ext4"))
                if i == 0:
                    continue  # warm-up: the tree into the page cache
                cps, owns, walls, ratios = steps[step]
                cps.append(cp_ms)
                owns.append(own)
                walls.append(wall)
                ratios.append(own / cp_ms)
    for step, (cps, owns, walls, ratios) in steps.items():
        res[step] = {"cp_ms": stats(cps), "airlock_ms": stats(owns), "airlock_process_ms": stats(walls),
                     "ratio_of_medians": statistics.median(owns) / statistics.median(cps), "ratio_per_round": stats(ratios)}
        log(f"workspace {step}: Airlock {statistics.median(owns):.1f} ms, cp -a {statistics.median(cps):.1f} ms, "
            f"ratio {res[step]['ratio_of_medians']:.2f} (target <= 3)")
    return res


# ------------------------------------------------------------------------ build

BUILD_PROJECT = {
    "calc.h": "int add(int a, int b);\nint mul(int a, int b);\nint fib(int n);\n",
    "add.c": '#include "calc.h"\nint add(int a, int b) { return a + b; }\n',
    "mul.c": '#include "calc.h"\nint mul(int a, int b) { int r = 0; for (int i = 0; i < b; i++) r = add(r, a); return r; }\n',
    "fib.c": '#include "calc.h"\nint fib(int n) { return n < 2 ? n : add(fib(n - 1), fib(n - 2)); }\n',
    "main.c": '#include <stdio.h>\n#include <stdlib.h>\n#include "calc.h"\n'
              'int main(int argc, char **argv) {\n'
              '    int a = argc > 2 ? atoi(argv[1]) : 6, b = argc > 2 ? atoi(argv[2]) : 7;\n'
              '    printf("%d %d %d\\n", add(a, b), mul(a, b), fib(b));\n    return 0;\n}\n',
    "Makefile": "CFLAGS = -O2 -Wall\nOBJS = main.o add.o mul.o fib.o\n"
                "calc: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n"
                "%.o: %.c calc.h\n\t$(CC) $(CFLAGS) -c $<\n"
                "test: calc\n\ttest \"$$(./calc 3 4)\" = \"7 12 3\"\n\ttest \"$$(./calc 10 20)\" = \"30 200 6765\"\n"
                ".PHONY: test\n",
}
BUILD_SCRIPT = "make && make test && mkdir -p out && cp calc out/"


def bench_build(a):
    image = os.path.join(image_dir(), "rootfs-build.ext4")
    if not os.path.exists(image):
        return {"available": False, "reason": f"the toolchain image {image} is not installed (make rootfs-build)"}
    airlock = os.path.join(a.bin, "airlock")
    res = {"available": True, "script": BUILD_SCRIPT, "files": sorted(BUILD_PROJECT), "host": [], "vm": [], "failures": []}
    with tempfile.TemporaryDirectory(prefix="airlock-bench-build-") as d:
        project = os.path.join(d, "calc")
        os.makedirs(project)
        for name, text in BUILD_PROJECT.items():
            with open(os.path.join(project, name), "w") as f:
                f.write(text)
        for i in range(a.build_host_runs):
            copy = os.path.join(d, f"host{i}")
            shutil.copytree(project, copy, symlinks=True)
            ms, _ = timed(["sh", "-c", f"cd {copy} && {BUILD_SCRIPT}"])
            res["host"].append(ms)
        for i in range(a.build_runs):
            out = os.path.join(d, f"built{i}")
            t = time.monotonic_ns()
            p = subprocess.run([airlock, "run", "--image", "build", "--json", "--workspace", project, "--output", out,
                                "--", "sh", "-c", BUILD_SCRIPT], capture_output=True, text=True, timeout=a.build_timeout)
            wall = (time.monotonic_ns() - t) / 1e6
            try:
                doc = json.loads(p.stdout)
            except ValueError:
                doc = None
            binary = os.path.join(out, "calc")
            check = subprocess.run([binary, "10", "20"], capture_output=True, text=True) if os.path.exists(binary) else None
            if p.returncode != 0 or doc is None or check is None or check.stdout != "30 200 6765\n":
                res["failures"].append({"exit_status": p.returncode, "stderr_tail": p.stderr[-600:],
                                        "stdout_head": p.stdout[:600]})
                log(f"build {i + 1}/{a.build_runs}: FAILED (exit {p.returncode}): {p.stderr.strip()[-200:]}")
                continue
            t_ = doc["timings"]
            res["vm"].append({"wall_ms": wall, "timings": {k: float(v) for k, v in t_.items()},
                              "artifacts": doc["artifacts"]["files"], "binary_runs_on_host": True})
            log(f"build {i + 1}/{a.build_runs}: wall {wall / 1000:.1f} s (kernel boot {t_['kernelBootMs'] / 1000:.1f} s, "
                f"command {t_['commandMs'] / 1000:.1f} s); host {statistics.median(res['host']):.0f} ms")
    res["host_ms"] = stats(res["host"])
    if res["vm"]:
        res["vm_wall_ms"] = stats([r["wall_ms"] for r in res["vm"]])
        res["vm_command_ms"] = stats([r["timings"]["commandMs"] for r in res["vm"]])
        res["vm_boot_ms"] = stats([r["timings"]["kernelBootMs"] for r in res["vm"]])
        res["vm_workspace_ms"] = stats([r["timings"]["workspaceMs"] for r in res["vm"]])
        res["vm_artifacts_ms"] = stats([r["timings"]["artifactsMs"] for r in res["vm"]])
        res["command_ratio"] = res["vm_command_ms"]["median"] / res["host_ms"]["median"]
        res["wall_ratio"] = res["vm_wall_ms"]["median"] / res["host_ms"]["median"]
    return res
# ------------------------------------------------------------------------ serve

def bench_serve(a):
    import serve_load  # bench/serve_load.py, beside this file
    opts = argparse.Namespace(airlock=os.path.join(a.bin, "airlock"), memory_mib=a.memory_mib,
                              boot_timeout=a.boot_timeout, concurrency=a.serve_concurrency,
                              vm_rounds=a.serve_vm_rounds, scripted_requests=a.serve_scripted_requests,
                              soak_scripted=a.serve_soak_scripted, soak_vm=a.serve_soak_vm,
                              vm_cancel_after=a.serve_vm_cancel_after)
    return serve_load.run_all(opts)


# ------------------------------------------------------------------------- main

# --------------------------------------------------------------------- snapshot

def smaps_detail(pid):
    """Per mapping: name, size, Rss, Pss, private clean and dirty (KiB), from /proc/PID/smaps."""
    maps, cur = [], None
    keys = {"Rss:": "rss", "Pss:": "pss", "Private_Clean:": "pc", "Private_Dirty:": "pd"}
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    parts = line.split(None, 5)
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    cur = {"size": hi - lo, "name": parts[5].strip() if len(parts) > 5 else "",
                           "rss": 0, "pss": 0, "pc": 0, "pd": 0}
                    maps.append(cur)
                elif cur is not None and line.split()[0] in keys:
                    cur[keys[line.split()[0]]] = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return maps


def restored_vm_memory(maps):
    """A restored VMM's memory: the guest RAM (the snapshot file mapped
    copy-on-write: its private dirty pages are the ones the guest wrote) and the rest."""
    guest = [m for m in maps if m["name"].endswith(".snap")]
    tot = {k: sum(m[k] for m in maps) for k in ("rss", "pss", "pc", "pd")}
    g = {k: sum(m[k] for m in guest) for k in ("rss", "pss", "pc", "pd")}
    return {
        "rss_mib": tot["rss"] / 1024, "pss_mib": tot["pss"] / 1024,
        "private_mib": (tot["pc"] + tot["pd"]) / 1024,
        "guest_rss_mib": g["rss"] / 1024, "guest_pss_mib": g["pss"] / 1024,
        "guest_written_mib": g["pd"] / 1024,
        # What the target counts: private memory beyond the pages the guest wrote.
        "private_beyond_written_mib": (tot["pc"] + tot["pd"] - g["pd"]) / 1024,
        "guest_mapped": bool(guest),
    }


def vmm_pids_of(supervisor):
    """The jailed VMM (the `airlock-vmm` process, PID 1 of its namespace) under a supervisor."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        cmd = read_file(f"/proc/{entry}/cmdline")
        if not cmd.split("\0")[0].endswith("airlock-vmm"):
            continue
        pid, hops = int(entry), 0
        while pid > 1 and hops < 8:
            st = read_file(f"/proc/{pid}/status")
            m = re.search(r"^PPid:\s*(\d+)", st, re.M)
            if not m:
                break
            pid, hops = int(m.group(1)), hops + 1
            if pid == supervisor:
                nspid = re.search(r"^NSpid:\s*(.*)$", read_file(f"/proc/{entry}/status"), re.M)
                if nspid and nspid.group(1).split()[-1] == "1":
                    found.append(int(entry))
                break
    return found


def cpu_ticks(pid):
    try:
        fields = read_file(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (IndexError, ValueError):
        return 0


def bench_snapshot(a):
    airlock = os.path.join(a.bin, "airlock")
    ok, help_text = run_available(airlock)
    if not ok or "--no-snapshot" not in help_text:
        return {"available": False, "reason": "this build's `airlock run` has no snapshots (no --no-snapshot option)"}
    if os.geteuid() != 0:
        return {"available": False, "reason": "the jailed runs need root"}
    images = image_dir()
    base = ["--kernel", os.path.join(images, "vmlinux"), "--rootfs", os.path.join(images, "rootfs.ext4")]
    home = tempfile.mkdtemp(prefix="airlock-bench-snapshot-")
    env = dict(os.environ, AIRLOCK_HOME=home)
    res = {"memory_mib": a.memory_mib, "creates": [], "rounds": [], "failures": [],
           "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        # Size and write time, one fresh snapshot per guest size (the restores use the first).
        for mib in sorted({a.memory_mib, *a.snapshot_sizes}):
            t0 = time.monotonic_ns()
            p = subprocess.run([airlock, "snapshot", "create", "--json", "--memory", str(mib), *base],
                               env=env, capture_output=True, text=True, timeout=a.boot_timeout + 120)
            wall = (time.monotonic_ns() - t0) / 1e6
            try:
                doc = json.loads(p.stdout)
            except ValueError:
                res["failures"].append({"create_mib": mib, "exit": p.returncode, "stderr": p.stderr[-400:]})
                log(f"snapshot create --memory {mib}: FAILED {p.stderr[-200:]}")
                continue
            listing = json.loads(subprocess.run([airlock, "snapshot", "list", "--json"], env=env, capture_output=True,
                                                text=True).stdout or "{}").get("snapshots", [])
            entry = next((e for e in listing if e["path"] == doc["path"]), {})
            c = {"memory_mib": mib, "allocated_mib": doc["allocatedBytes"] / MIB, "file_mib": mib + 2,
                 "data_pages": entry.get("dataPages"), "write_ms": doc["writeMs"], "save_ms": doc["saveMs"],
                 "create_wall_ms": wall}
            res["creates"].append(c)
            log(f"snapshot of a {mib} MiB guest: {c['allocated_mib']:.1f} MiB on disk, written in {c['write_ms']:.0f} ms "
                f"(with its check {c['save_ms']:.0f} ms); create took {wall / 1e3:.1f} s")

        # `airlock run -- true` restored and cold, alternating.
        run = [airlock, "run", "--json", "--memory", str(a.memory_mib), *base]
        for i in range(a.snapshot_rounds):
            pair = {}
            for kind, extra in (("restored", []), ("cold", ["--no-snapshot"])):
                t0 = time.monotonic_ns()
                p = subprocess.run(run[:3] + extra + run[3:] + ["--", "true"], env=env, capture_output=True, text=True,
                                   timeout=a.boot_timeout + 120)
                wall = (time.monotonic_ns() - t0) / 1e6
                doc, problems = parse_run_json(p.stdout)
                if doc is None or problems or doc["exitCode"] != 0:
                    res["failures"].append({"round": i, "kind": kind, "exit": p.returncode, "stderr": p.stderr[-400:]})
                    log(f"round {i + 1} {kind}: FAILED {p.stderr[-200:]}")
                    continue
                t = doc["timings"]
                snap = doc.get("snapshot") or {}
                res.setdefault("guest_mode", doc.get("guestMode"))
                pair[kind] = {"wall_ms": wall, "restored": bool(snap.get("restored")),
                              "restore_ms": float(snap.get("restoreMs") or 0), "check_ms": float(snap.get("checkMs") or 0),
                              **{k: float(t[k]) for k in RUN_PHASES + ["totalMs"]}}
            if "restored" in pair and "cold" in pair:
                pair["ratio_wall"] = pair["restored"]["wall_ms"] / pair["cold"]["wall_ms"]
                res["rounds"].append(pair)
                log(f"round {i + 1}: restored {pair['restored']['wall_ms'] / 1e3:.2f} s (restore {pair['restored']['restore_ms']:.1f} ms, "
                    f"check {pair['restored']['check_ms']:.1f} ms, to first KVM_RUN {pair['restored']['vmmStartMs']:.1f} ms), "
                    f"cold {pair['cold']['wall_ms'] / 1e3:.2f} s")

        # N restored VMs at once, each idle in `sleep`, their memory.
        # Each guest says when its command runs (the output streams to the benchmark), then sleeps.
        procs = [subprocess.Popen(run[:2] + run[3:] + ["--", "sh", "-c", "echo idle; exec sleep 900"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for _ in range(a.snapshot_vms)]
        try:
            deadline = time.monotonic() + 600
            ready = set()

            def wait_ready(p):
                if p.stdout.readline().strip() == b"idle":
                    ready.add(p.pid)
            waiters = [threading.Thread(target=wait_ready, args=(p,), daemon=True) for p in procs]
            for w in waiters:
                w.start()
            for w in waiters:
                w.join(max(0.0, deadline - time.monotonic()))
            vmms = {p.pid: found[0] for p in procs if p.pid in ready and (found := vmm_pids_of(p.pid))}
            time.sleep(3)  # the agents report the command's start, then wait for it: let them settle
            quiet = 3 if len(ready) == len(procs) else 0
            samples = [restored_vm_memory(m) for m in (smaps_detail(v) for v in vmms.values()) if m]
            res["idle_vms"] = {"count": len(samples), "asked": a.snapshot_vms, "idle": quiet >= 3,
                               **{k: stats([s[k] for s in samples]) for k in (
                                   "rss_mib", "pss_mib", "private_mib", "guest_rss_mib", "guest_pss_mib", "guest_written_mib",
                                   "private_beyond_written_mib")}}
            if samples:
                iv = res["idle_vms"]
                log(f"{len(samples)} restored VMs idle: per VM Rss {iv['rss_mib']['median']:.1f} MiB, PSS {iv['pss_mib']['median']:.1f} MiB, "
                    f"private {iv['private_mib']['median']:.1f} MiB of which the guest wrote {iv['guest_written_mib']['median']:.1f} MiB")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
    finally:
        shutil.rmtree(home, ignore_errors=True)

    rounds = res["rounds"]
    if rounds:
        r, c = [x["restored"] for x in rounds], [x["cold"] for x in rounds]
        res["restored"] = {k: stats([x[k] for x in r]) for k in ("wall_ms", "restore_ms", "check_ms", "vmmStartMs", "agentReadyMs", "commandMs", "totalMs")}
        res["cold"] = {k: stats([x[k] for x in c]) for k in ("wall_ms", "vmmStartMs", "kernelBootMs", "agentReadyMs", "commandMs", "totalMs")}
        res["all_restored"] = all(x["restored"] for x in r) and not any(x["restored"] for x in c)
        res["ratio_wall_per_round"] = stats([x["ratio_wall"] for x in rounds])
        res["ratio_of_median_walls"] = res["restored"]["wall_ms"]["median"] / res["cold"]["wall_ms"]["median"]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections (default: all)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "latest.json"))
    ap.add_argument("--bin", required=True, help="swift build -c release --show-bin-path")
    ap.add_argument("--tools", required=True, help="where exit-floor, exec-timed and kvm-probe.so are")
    ap.add_argument("--memory-mib", type=int, default=128)
    ap.add_argument("--exit-rounds", type=int, default=7)
    ap.add_argument("--start-runs", type=int, default=10)
    ap.add_argument("--boot-runs", type=int, default=3)
    ap.add_argument("--run-runs", type=int, default=3)
    ap.add_argument("--boot-timeout", type=float, default=300)
    ap.add_argument("--pv-runs", type=int, default=3, help="native boots and runs in the pv section")
    ap.add_argument("--pv-emulated-runs", type=int, default=1, help="emulated boots and runs in the pv section")
    ap.add_argument("--pv-wc-bytes", type=int, default=100_000_000, help="wc -c of this many bytes of stdin, native")
    ap.add_argument("--pv-wc-bytes-emulated", type=int, default=1_000_000, help="the same, emulated")
    ap.add_argument("--pv-syscalls", type=int, default=200_000, help="getppid calls, native and on the host")
    ap.add_argument("--pv-syscalls-emulated", type=int, default=2_000, help="getppid calls, emulated")
    ap.add_argument("--ctx-rounds", type=int, default=2, help="alternations of the two context-switch modes")
    ap.add_argument("--ctx-repeats", type=int, default=3, help="ping-pongs per VM")
    ap.add_argument("--ctx-yields", type=int, default=2000, help="sched_yield calls per process per ping-pong")
    ap.add_argument("--blk-mib", type=int, default=16)
    ap.add_argument("--blk-passes", type=int, default=3)
    ap.add_argument("--qemu-timeout", type=float, default=120, help="seconds QEMU may take to the ready marker")
    ap.add_argument("--qemu-firmware-seconds", type=float, default=3)
    ap.add_argument("--fuzz-iterations", type=int, default=1000000)
    ap.add_argument("--workspace-files", type=int, default=1000)
    ap.add_argument("--workspace-mib", type=int, default=10)
    ap.add_argument("--workspace-rounds", type=int, default=7)
    ap.add_argument("--build-runs", type=int, default=1, help="C builds in the VM (each boots the toolchain image)")
    ap.add_argument("--build-host-runs", type=int, default=5)
    ap.add_argument("--build-timeout", type=float, default=1800)
    ap.add_argument("--snapshot-rounds", type=int, default=3, help="restored and cold `airlock run`s, alternating")
    ap.add_argument("--snapshot-vms", type=int, default=10, help="restored VMs idle at once for the memory figures")
    ap.add_argument("--snapshot-sizes", type=lambda t: [int(x) for x in t.split(",") if x], default=[128, 512],
                    help="guest sizes (MiB) whose snapshot size and write time are measured")
    ap.add_argument("--airlock-for-run", help="another airlock binary for the run section (testing the harness)")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import serve_load
    serve_load.add_arguments(ap, prefix="serve-")
    a = ap.parse_args()
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}: use {SECTIONS}")

    started = time.monotonic()
    results = {"schema": 1, "host": host_info(), "params": {k: v for k, v in vars(a).items() if k not in ("bin", "tools", "out")}}
    log(f"{results['host']['cpu_model']}, {results['host']['cores']} cores, {results['host']['memory_gib']} GiB; "
        f"{results['host']['backend']}")
    funcs = {"exits": bench_exits, "start": bench_start, "boot": bench_boot, "run": bench_run, "pv": bench_pv, "ctxswitch": bench_ctxswitch,
             "blk": bench_blk, "qemu": bench_qemu, "fuzz": bench_fuzz, "workspace": bench_workspace, "build": bench_build, "serve": bench_serve,
             "snapshot": bench_snapshot}
    for s in SECTIONS:
        if s not in only:
            continue
        t = time.monotonic()
        try:
            results[s] = funcs[s](a)
        except Exception as e:  # one broken section must not lose the others
            log(f"{s}: FAILED: {e}")
            results[s] = {"error": str(e)}
        results[s]["section_seconds"] = round(time.monotonic() - t, 1)
    if "boot" in results and results["boot"].get("runs"):
        results["memory"] = {"boot": memory_summary(results["boot"]["runs"])}
        results["memory"]["floor"] = memory_floor(a)
    if "run" in results and results["run"].get("runs"):
        results.setdefault("memory", {})["run"] = memory_summary(results["run"]["runs"])
    results["host"]["loadavg_at_end"] = read_file("/proc/loadavg").split()[:3]
    results["seconds"] = round(time.monotonic() - started, 1)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    os.replace(a.out + ".tmp", a.out)
    log(f"wrote {a.out} after {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
