#!/usr/bin/env python3
"""Load generator and benchmark for `airlock serve` (loopback only, bounded).

    bench/serve_load.py --airlock PATH [--out serve.json] [options]

Starts its own services on 127.0.0.1 (port 0, with a bearer token), and:

  latency  requests/s and latency p50/p99 at concurrency 1, 2 and 4 for `true`
           and for `cat` reading 1 KiB of stdin, with the warm pool (`--pool`)
           and without it (each request boots its VM), side by side: the cells
           of the two services alternate. For each request, the service's own
           share is the client's latency minus the receipt's queueMs (waiting
           for a sandbox, boot included when there was none ready) and
           sandboxMs (the sandbox's run, from the command handed over to the
           VM's end): the latency the service adds over the sandbox itself.
  scripted the same cells against `--test-provider scripted` (no VM): the
           service's cost alone, over many more requests.
  soak     N requests of a mix (succeeding, failing, timing out, cancelled by
           the client, and on the scripted service failing inside the
           sandbox), each with its own stdin tag: every answer must be there
           once and carry its own request's tag (no lost, crossed or duplicated
           response), the service's run counter must have grown by N, and
           afterwards no VM, descriptor, thread, cgroup or mount may be left
           beyond what the pool holds; then SIGTERM must drain it to exit 0.

A warm (pool) cell runs in rounds of `concurrency` requests at once; between
rounds the pool refills, and that wait is not counted: its requests/s is the
warm path's, which a sustained load gets only while boots keep up with it.
A cold cell runs its requests back to back, `concurrency` at a time.
"""
import argparse
import http.client
import json
import math
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

LOOPBACK = "127.0.0.1"
STDIN_KIB = 1024


def log(msg):
    print(f"serve-bench: {msg}", file=sys.stderr, flush=True)


def percentile(xs, p):
    """Nearest-rank percentile of a non-empty list."""
    s = sorted(xs)
    rank = math.ceil(p / 100.0 * len(s))
    return s[max(0, min(len(s) - 1, rank - 1))]


def summary(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"n": len(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99), "min": min(xs), "max": max(xs),
            "mean": statistics.fmean(xs)}


# ------------------------------------------------------------------ the service

class Service:
    """One `airlock serve` process on 127.0.0.1:0 with a token; stderr kept in a file."""

    def __init__(self, airlock, name, args, workdir, env=None):
        self.name = name
        self.token = secrets.token_hex(24)
        self.token_file = os.path.join(workdir, f"{name}.token")
        with open(self.token_file, "w") as f:
            f.write(self.token + "\n")
        os.chmod(self.token_file, 0o600)
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.log_file = open(self.log_path, "w")
        argv = [airlock, "serve", "--listen", f"{LOOPBACK}:0", "--token-file", self.token_file, *args]
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log_file, text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on http://([0-9.]+):(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"{name}: airlock serve did not start: {line!r}; log {self.log_path}: {self.tail()}")
        host, port = m.group(1), int(m.group(2))
        if host != LOOPBACK:
            raise RuntimeError(f"{name}: listens on {host}, not loopback")
        self.port = port
        log(f"{name}: pid {self.proc.pid} on {host}:{port} ({' '.join(args)})")

    def tail(self, n=5):
        try:
            with open(self.log_path) as f:
                return f.read().splitlines()[-n:]
        except OSError:
            return []

    def connection(self, timeout=900):
        return http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)

    def get(self, path):
        c = self.connection(timeout=30)
        try:
            c.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
            r = c.getresponse()
            return r.status, r.read().decode()
        finally:
            c.close()

    def health(self):
        _, body = self.get("/v1/health")
        return json.loads(body)

    def metrics(self):
        _, body = self.get("/metrics")
        out = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    def runs_total(self):
        return sum(v for k, v in self.metrics().items() if k.startswith("airlock_serve_runs_total{"))

    def wait_ready(self, want, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pool = self.health()["pool"]
            if pool["ready"] >= want and pool["booting"] == 0:
                return True
            time.sleep(0.5)
        return False

    def stop(self, timeout=120):
        """SIGTERM: the drain. Returns the exit status and how long it took."""
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = "killed after SIGTERM did not end it"
        self.log_file.close()
        return rc, round(time.monotonic() - t, 2)


def request(conn, token, body, timeout=None):
    """One POST /v1/runs on a keep-alive connection: (status, receipt or error, latency ms)."""
    data = json.dumps(body)
    t = time.monotonic_ns()
    conn.request("POST", "/v1/runs", body=data, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    r = conn.getresponse()
    text = r.read()
    ms = (time.monotonic_ns() - t) / 1e6
    try:
        doc = json.loads(text)
    except ValueError:
        doc = {"error": text[:200].decode("utf-8", "replace")}
    return r.status, doc, ms


# ------------------------------------------------------------------ latency cells

COMMANDS = {
    "true": lambda tag: {"argv": ["true"]},
    "stdin": lambda tag: {"argv": ["cat"], "stdin": (tag + "-" * STDIN_KIB)[:STDIN_KIB]},
}


def run_cell(svc, command, concurrency, requests, warm, refill_timeout):
    """`requests` requests of `command`, `concurrency` at a time, each on its own keep-alive connection."""
    results = []
    lock = threading.Lock()
    conns = [svc.connection() for _ in range(concurrency)]
    wall_ns = 0
    sent = 0
    while sent < requests:
        batch = min(concurrency, requests - sent)
        if warm and not svc.wait_ready(batch, refill_timeout):
            log(f"{svc.name}: the pool did not refill within {refill_timeout} s; {svc.health()['pool']}")
        tags = [f"r{sent + i}" for i in range(batch)]

        def one(i):
            body = COMMANDS[command](tags[i])
            try:
                status, doc, ms = request(conns[i], svc.token, body)
            except (OSError, http.client.HTTPException) as e:
                status, doc, ms = None, {"error": str(e)}, None
                conns[i] = svc.connection()
            ok = status == 200 and doc.get("exitCode") == 0
            if ok and command == "stdin":
                ok = doc.get("stdout") == body["stdin"]
            r = {"status": status, "ok": ok, "latency_ms": ms, "queue_ms": doc.get("queueMs"),
                 "sandbox_ms": doc.get("sandboxMs"), "from_pool": doc.get("fromPool"), "id": doc.get("id"),
                 "error": None if ok else (doc.get("error") or doc.get("failure") or f"exit {doc.get('exitCode')}")}
            if ms is not None and r["queue_ms"] is not None and r["sandbox_ms"] is not None:
                r["overhead_ms"] = ms - r["queue_ms"] - r["sandbox_ms"]
            with lock:
                results.append(r)

        t = time.monotonic_ns()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(batch)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall_ns += time.monotonic_ns() - t
        sent += batch
    for c in conns:
        c.close()
    good = [r for r in results if r["ok"]]
    cell = {
        "command": command, "concurrency": concurrency, "requests": len(results), "ok": len(good),
        "rps": len(good) / (wall_ns / 1e9) if wall_ns else None,
        "latency_ms": summary([r["latency_ms"] for r in good]),
        "overhead_ms": summary([r.get("overhead_ms") for r in good]),
        "queue_ms": summary([r["queue_ms"] for r in good]),
        "sandbox_ms": summary([r["sandbox_ms"] for r in good]),
        "from_pool": sum(1 for r in good if r["from_pool"]),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
    }
    return cell


def cold_cell(svc, command, concurrency, requests):
    """Requests back to back, `concurrency` in flight at once (no pool: each boots its own VM)."""
    results = []
    lock = threading.Lock()
    counter = iter(range(requests))
    counter_lock = threading.Lock()

    def worker():
        conn = svc.connection()
        while True:
            with counter_lock:
                n = next(counter, None)
            if n is None:
                break
            body = COMMANDS[command](f"r{n}")
            try:
                status, doc, ms = request(conn, svc.token, body)
            except (OSError, http.client.HTTPException) as e:
                status, doc, ms = None, {"error": str(e)}, None
                conn = svc.connection()
            ok = status == 200 and doc.get("exitCode") == 0 and (command != "stdin" or doc.get("stdout") == body["stdin"])
            r = {"ok": ok, "latency_ms": ms, "queue_ms": doc.get("queueMs"), "sandbox_ms": doc.get("sandboxMs"),
                 "from_pool": doc.get("fromPool"),
                 "error": None if ok else (doc.get("error") or doc.get("failure") or f"exit {doc.get('exitCode')}")}
            if ms is not None and r["queue_ms"] is not None and r["sandbox_ms"] is not None:
                r["overhead_ms"] = ms - r["queue_ms"] - r["sandbox_ms"]
            with lock:
                results.append(r)
        conn.close()

    t = time.monotonic_ns()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = (time.monotonic_ns() - t) / 1e9
    good = [r for r in results if r["ok"]]
    return {
        "command": command, "concurrency": concurrency, "requests": len(results), "ok": len(good),
        "rps": len(good) / wall if wall else None,
        "latency_ms": summary([r["latency_ms"] for r in good]),
        "overhead_ms": summary([r.get("overhead_ms") for r in good]),
        "queue_ms": summary([r["queue_ms"] for r in good]),
        "sandbox_ms": summary([r["sandbox_ms"] for r in good]),
        "from_pool": sum(1 for r in good if r["from_pool"]),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
    }


# ------------------------------------------------------------------ soak

def soak_kinds(scripted):
    """(name, body for a tag, what the answer must be) for each kind of request in the mix."""
    kinds = [
        ("succeeds", lambda tag: {"argv": ["cat"], "stdin": tag},
         lambda st, d, tag: st == 200 and d.get("exitCode") == 0 and d.get("stdout") == tag),
        ("fails", lambda tag: {"argv": ["exit", "3"]} if scripted else {"argv": ["sh", "-c", "exit 3"]},
         lambda st, d, tag: st == 200 and d.get("exitCode") == 3),
        ("times out", lambda tag: {"argv": ["sleep", "30"], "timeoutSeconds": 0.2 if scripted else 1},
         lambda st, d, tag: st == 200 and d.get("timedOut") is True and d.get("exitCode") == 124),
        ("cancelled by the client", lambda tag: {"argv": ["sleep", "30"]}, None),
    ]
    if scripted:
        kinds.append(("fails inside the sandbox", lambda tag: {"argv": ["crash"]},
                      lambda st, d, tag: st == 500 and "failed inside Airlock" in d.get("error", "")))
    return kinds


def cancelled_request(svc, body, after):
    """Sends a run and closes the connection `after` seconds later, before its answer."""
    s = socket.create_connection((LOOPBACK, svc.port), timeout=30)
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/runs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {svc.token}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    time.sleep(after)
    s.settimeout(0)
    try:
        early = s.recv(1)
    except (BlockingIOError, OSError):
        early = b""
    s.close()
    return early == b""


def process_census(pid):
    """What a service process holds: descriptors (and KVM ones), threads, children."""
    fds = os.listdir(f"/proc/{pid}/fd")
    kvm = 0
    for fd in fds:
        try:
            if "kvm" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                kvm += 1
        except OSError:
            pass
    threads = len(os.listdir(f"/proc/{pid}/task"))
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return {"fds": len(fds), "kvm_fds": kvm, "threads": threads, "children": len(children)}


def host_census(pid):
    """The service's footprint on the host: jail directories, cgroups and mounts named
    after its process id (Airlock names its jails `run-PID-...`; other users' runs on a
    shared machine are not counted)."""
    mark = f"-{pid}-"
    jails = [d for d in (os.listdir("/run/airlock/jail") if os.path.isdir("/run/airlock/jail") else []) if mark in d]
    cgroups = 0
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        if root.count("/") > 8:
            dirs[:] = []
            continue
        cgroups += sum(1 for d in dirs if mark in d)
    with open("/proc/self/mountinfo") as f:
        mounts = sum(1 for line in f if mark in line and "airlock" in line)
    return {"jails": len(jails), "cgroups": cgroups, "mounts": mounts}


def run_soak(svc, requests, concurrency, scripted, cancel_after):
    kinds = soak_kinds(scripted)
    before_runs = svc.runs_total()
    seen_ids, problems, answers = set(), [], {k[0]: 0 for k in kinds}
    lock = threading.Lock()
    counter = iter(range(requests))
    counter_lock = threading.Lock()
    t = time.monotonic()

    def worker():
        conn = svc.connection()
        while True:
            with counter_lock:
                n = next(counter, None)
            if n is None:
                break
            name, body_for, check = kinds[n % len(kinds)]
            tag = f"soak-{n}-{secrets.token_hex(4)}"
            body = body_for(tag)
            if check is None:
                ok = cancelled_request(svc, body, cancel_after)
                with lock:
                    answers[name] += 1
                    if not ok:
                        problems.append(f"request {n} ({name}) was answered before its client went away")
                continue
            try:
                status, doc, _ = request(conn, svc.token, body)
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    problems.append(f"request {n} ({name}) lost: {e}")
                conn = svc.connection()
                continue
            with lock:
                answers[name] += 1
                rid = doc.get("id")
                if rid in seen_ids:
                    problems.append(f"request {n} ({name}): id {rid} answered twice")
                seen_ids.add(rid)
                if not check(status, doc, tag):
                    problems.append(f"request {n} ({name}): unexpected answer {status} {str(doc)[:160]}")
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.monotonic() - t
    # Each request is counted once by its outcome; a cancelled one when its VM has been stopped.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and svc.runs_total() - before_runs < requests:
        time.sleep(0.5)
    counted = svc.runs_total() - before_runs
    if counted != requests:
        problems.append(f"the service counted {counted:.0f} runs for {requests} requests")
    m = svc.metrics()
    return {"requests": requests, "concurrency": concurrency, "seconds": round(seconds, 1), "answers": answers,
            "counted_runs": counted, "problems": problems[:20], "problem_count": len(problems),
            "outcomes": {k.split('"')[1]: v for k, v in m.items() if k.startswith("airlock_serve_runs_total{")}}


def soak_and_drain(svc, requests, concurrency, scripted, cancel_after, pool, settle):
    pid = svc.proc.pid
    svc.wait_ready(pool, settle)
    # One round of each kind first: what the service opens once, on its first need (the
    # timer descriptor behind its first timeout), is not a leak; the census starts after it.
    run_soak(svc, 2 * len(soak_kinds(scripted)), concurrency, scripted, cancel_after)
    svc.wait_ready(pool, settle)
    time.sleep(1)
    host_before = host_census(pid)
    census_before = process_census(pid)
    res = run_soak(svc, requests, concurrency, scripted, cancel_after)
    # Afterwards: the pool refilled, nothing else held.
    svc.wait_ready(pool, settle)
    # A connection the client just closed, or a VMM being reaped, holds a descriptor for a
    # moment: a leak is what is still there after 10 s.
    deadline = time.monotonic() + 10
    while True:
        time.sleep(1)
        census_after = process_census(pid)
        if all(census_after[k] <= census_before[k] for k in ("fds", "kvm_fds", "threads", "children")) \
                or time.monotonic() > deadline:
            break
    health = svc.health()
    res["census_before"], res["census_after"], res["pool_after"] = census_before, census_after, health["pool"]
    leaks = []
    for k in ("fds", "kvm_fds", "threads", "children"):
        if census_after[k] > census_before[k]:
            leaks.append(f"{k}: {census_before[k]} before, {census_after[k]} after")
    if health["pool"]["busy"] != 0 or health["inFlight"] != 0:
        leaks.append(f"still busy after the soak: {health}")
    rc, drain_s = svc.stop()
    host_after = host_census(pid)
    for k, v in host_after.items():
        if v > host_before[k]:
            leaks.append(f"host {k}: {host_before[k]} before, {v} after the service stopped")
    res.update({"leaks": leaks, "exit_status": rc, "drain_seconds": drain_s, "host_before": host_before,
                "host_after": host_after,
                "passed": not res["problems"] and not leaks and rc == 0})
    log(f"{svc.name} soak: {requests} requests in {res['seconds']} s, {res['problem_count']} problems, "
        f"leaks {leaks or 'none'}, exit {rc} after a {drain_s} s drain")
    return res


# ------------------------------------------------------------------ main

def run_all(a):
    workdir = tempfile.mkdtemp(prefix="airlock-serve-bench-")
    out = {"params": {k: v for k, v in vars(a).items() if k not in ("airlock", "out")}, "cells": []}
    concurrencies = [int(c) for c in a.concurrency.split(",")]
    pool = max(concurrencies)
    vm_args = ["--memory", str(a.memory_mib), "--max-concurrent", str(pool), "--queue", "64",
               "--boot-timeout", str(a.boot_timeout), "--queue-timeout", str(a.boot_timeout * 4), "--log-level", "warning"]

    # The service's own cost: no VM behind it.
    if a.scripted_requests > 0:
        sc = Service(a.airlock, "scripted", ["--test-provider", "scripted", "--pool", str(pool), "--max-concurrent",
                                             str(pool * 2), "--queue", "64", "--log-level", "warning"], workdir)
        try:
            sc.wait_ready(pool, 30)
            for command in COMMANDS:
                for c in concurrencies:
                    cell = cold_cell(sc, command, c, a.scripted_requests)
                    cell.update({"provider": "scripted", "mode": "pool"})
                    out["cells"].append(cell)
                    log(f"scripted {command} c={c}: {cell['rps']:.0f} req/s, p50 {cell['latency_ms']['p50']:.2f} ms, "
                        f"p99 {cell['latency_ms']['p99']:.2f} ms, service share p50 {cell['overhead_ms']['p50']:.3f} ms")
            if a.soak_scripted:
                out["soak_scripted"] = soak_and_drain(sc, a.soak_scripted, 8, True, 0.3, pool, 30)
            else:
                sc.stop()
        except Exception:
            sc.stop()
            raise

    if a.vm_rounds > 0 or a.soak_vm > 0:
        warm = Service(a.airlock, "pool", ["--pool", str(pool), *vm_args], workdir)
        cold = Service(a.airlock, "no-pool", ["--pool", "0", *vm_args], workdir)
        try:
            if not warm.wait_ready(pool, a.boot_timeout * 4):
                raise RuntimeError(f"the pool did not fill: {warm.health()}; log: {warm.tail()}")
            for command in COMMANDS:
                for c in concurrencies:
                    if a.vm_rounds <= 0:
                        break
                    n = c * a.vm_rounds
                    cell = run_cell(warm, command, c, n, True, a.boot_timeout * 4)
                    cell.update({"provider": "vm", "mode": "pool"})
                    out["cells"].append(cell)
                    log(f"vm pool {command} c={c}: {cell['ok']}/{cell['requests']} ok, "
                        f"p50 {(cell['latency_ms'] or {}).get('p50', 0):.0f} ms, service share p50 "
                        f"{(cell['overhead_ms'] or {}).get('p50', 0):.2f} ms {cell['errors']}")
                    # The cold cell runs once the warm pool has refilled, so that no boot of the
                    # other service's competes with its boots for the CPUs.
                    warm.wait_ready(pool, a.boot_timeout * 4)
                    cell = cold_cell(cold, command, c, n)
                    cell.update({"provider": "vm", "mode": "no pool"})
                    out["cells"].append(cell)
                    log(f"vm no-pool {command} c={c}: {cell['ok']}/{cell['requests']} ok, "
                        f"p50 {(cell['latency_ms'] or {}).get('p50', 0):.0f} ms, service share p50 "
                        f"{(cell['overhead_ms'] or {}).get('p50', 0):.2f} ms {cell['errors']}")
            cold_rc = cold.stop()
            out["vm_no_pool_exit"] = cold_rc
            if a.soak_vm:
                out["soak_vm"] = soak_and_drain(warm, a.soak_vm, pool, False, a.vm_cancel_after, pool, a.boot_timeout * 4)
            else:
                out["vm_pool_exit"] = warm.stop()
        finally:
            for s in (warm, cold):
                if s.proc.poll() is None:
                    s.stop()
    warm_overheads = [c["overhead_ms"]["p50"] for c in out["cells"]
                      if c["provider"] == "vm" and c["overhead_ms"]]
    out["vm_overhead_p50_ms"] = statistics.median(warm_overheads) if warm_overheads else None
    sc_overheads = [c["overhead_ms"]["p50"] for c in out["cells"] if c["provider"] == "scripted" and c["overhead_ms"]]
    out["scripted_overhead_p50_ms"] = statistics.median(sc_overheads) if sc_overheads else None
    out["workdir"] = workdir
    return out


def add_arguments(ap, prefix=""):
    ap.add_argument(f"--{prefix}concurrency", default="1,2,4", help="comma-separated concurrencies (default 1,2,4)")
    ap.add_argument(f"--{prefix}vm-rounds", type=int, default=1,
                    help="rounds of CONCURRENCY requests per VM cell (each cold request boots a VM; 0 skips VMs)")
    ap.add_argument(f"--{prefix}scripted-requests", type=int, default=500, help="requests per scripted cell (0 skips)")
    ap.add_argument(f"--{prefix}soak-scripted", type=int, default=1000, help="soak requests against the scripted service")
    ap.add_argument(f"--{prefix}soak-vm", type=int, default=0, help="soak requests against real VMs (each boots one)")
    ap.add_argument(f"--{prefix}vm-cancel-after", type=float, default=5, help="seconds before a soak client goes away (VMs)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--airlock", required=True, help="the airlock executable (release build)")
    ap.add_argument("--out", help="write the results here (JSON)")
    ap.add_argument("--memory-mib", type=int, default=128)
    ap.add_argument("--boot-timeout", type=float, default=300)
    add_arguments(ap)
    a = ap.parse_args()
    res = run_all(a)
    text = json.dumps(res, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
