#!/usr/bin/env python3
"""What the jail adds to one `airlock run -- true`, side by side in one run.

    bench/jail_overhead.py AIRLOCK_BINARY [ROUNDS]     (make bench-jail)

Alternates jailed (the default) and `--no-jail` runs, ROUNDS of each, and
reports for both the wall time of the whole command, its own `vmmStartMs`
(the CLI's start to the first KVM_RUN: for a jailed run that includes making
the jail and cgroup, starting the VMM process and entering the jail), and the
peak memory of its process tree (the supervisor, the jail's waiting process
and the VMM: the sum of their Pss, so that libraries the processes share are
counted once, sampled every 50 ms) minus the guest RAM the guest touched (the
Pss of the VMM's guest-memory mapping, read from smaps at the same moment). Medians with min and max; the differences are taken between medians
of the same run.
"""
import json, os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (its smaps helpers)

MEMORY_MIB = 128


def tree(root):
    """root and its descendants, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def rss_kib(pid):
    """Pss of the whole process: its share of every page it maps."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def guest_rss_kib(pid):
    """Pss of this process's guest RAM, if it has any: the shared anonymous
    mapping of exactly the guest's size, or (with the kernel mapped into it
    copy-on-write) the run of adjacent mappings that spans it (bench.guest_run)."""
    size = MEMORY_MIB << 20
    try:
        with open(f"/proc/{pid}/smaps") as f:
            lines = f.read().split("\n")
    except OSError:
        return 0
    maps, current = [], None
    for line in lines:
        parts = line.split()
        if len(parts) >= 5 and "-" in parts[0] and ":" not in parts[0]:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            current = {"lo": lo, "hi": hi, "size": hi - lo, "perm": parts[1],
                       "name": " ".join(parts[5:]) if len(parts) > 5 else "", "pss": 0}
            maps.append(current)
        elif line.startswith("Pss:") and current is not None:
            current["pss"] = int(parts[1])
    exact = [m for m in maps if m["size"] == size and bench.is_anonymous(m["name"])]
    return sum(m["pss"] for m in (exact or bench.guest_run(maps, size)))


def one(binary, jailed):
    # Cold boots on both sides (the jail's cost, not a snapshot's), where the build has snapshots.
    cold = ["--no-snapshot"] if "--no-snapshot" in subprocess.run([binary, "help", "run"], capture_output=True, text=True).stdout else []
    args = [binary, "run", "--json", "--memory", str(MEMORY_MIB)] + cold + ([] if jailed else ["--no-jail"]) + ["--", "true"]
    start = time.monotonic()
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while p.poll() is None:
        pids = tree(p.pid)
        total = sum(rss_kib(x) for x in pids) - sum(guest_rss_kib(x) for x in pids)
        peak = max(peak, total)
        time.sleep(0.05)
    wall = time.monotonic() - start
    out = p.stdout.read().decode(errors="replace")
    err = p.stderr.read().decode(errors="replace")
    if p.returncode != 0:
        sys.exit(f"{' '.join(args)} exited {p.returncode}: {err}")
    return wall, peak / 1024, json.loads(out)["timings"]["vmmStartMs"]


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main():
    binary = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    results = {k: {"wall_s": [], "vmm_start_ms": [], "memory_mib": []} for k in ("jailed", "no_jail")}
    for i in range(rounds):
        for jailed in (True, False):
            wall, mem, start_ms = one(binary, jailed)
            key = "jailed" if jailed else "no_jail"
            results[key]["wall_s"].append(wall)
            results[key]["vmm_start_ms"].append(start_ms)
            results[key]["memory_mib"].append(mem)
            print(f"round {i + 1} {key}: {wall:.2f} s, start to first KVM_RUN {start_ms:.1f} ms, "
                  f"{mem:.1f} MiB beside the guest", file=sys.stderr)
    report = {k: {m: summary(v) for m, v in d.items()} for k, d in results.items()}
    report["extra_wall_s"] = report["jailed"]["wall_s"]["median"] - report["no_jail"]["wall_s"]["median"]
    report["extra_vmm_start_ms"] = report["jailed"]["vmm_start_ms"]["median"] - report["no_jail"]["vmm_start_ms"]["median"]
    report["extra_memory_mib"] = report["jailed"]["memory_mib"]["median"] - report["no_jail"]["memory_mib"]["median"]
    text = json.dumps(report, indent=1)
    print(text)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "jail-overhead.json")
    with open(out, "w") as f:
        f.write(text + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
