#!/usr/bin/env python3
"""Draws the boot timeline (SVG, no plotting library) from bench/results/latest.json.

    bench/chart.py [RESULTS] [OUT.svg]     (defaults: bench/results/latest.json, docs/boot-timeline.svg)

One row per measured way of starting a guest: `airlock boot` to the
placeholder init's ready line and on to the process's end, `airlock run --json
-- true` with its own phases, and QEMU where it booted (otherwise a line saying
how it failed). Each bar is the medians of the phases laid end to end; the
whisker under it spans the fastest and slowest whole run (dot: median).
"""
import json
import os
import sys
from html import escape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COLORS = {
    "vmm": "#1f4e79",
    "kernel": "#e07b39",
    "init": "#4c9a2a",
    "agent": "#9bc53d",
    "command": "#8e5ea2",
    "shutdown": "#9a9a9a",
}


def rows_from(results):
    rows = []
    boot = results.get("boot") or {}
    ph = boot.get("phases_ms")
    if ph:
        rows.append({
            "label": "airlock boot", "sub": "placeholder init to AIRLOCK-READY, exit",
            "n": ph["vmm_start"]["n"],
            "phases": [
                ("VMM start (exec to first KVM_RUN)", "vmm", ph["vmm_start"]["median"]),
                ("kernel boot to init", "kernel", ph["kernel_to_init"]["median"]),
                ("init to ready marker", "init", ph["init_to_ready"]["median"]),
                ("shutdown (ready to exit)", "shutdown", ph["shutdown"]["median"]),
            ],
            "total": boot.get("exit_ms"),
        })
    run = results.get("run") or {}
    t = run.get("timings_ms")
    if t and str(run.get("layout", "")).startswith("durations") and run.get("kernel_to_init_ms") and run.get("init_to_hello_ms"):
        rows.append({
            "label": "airlock run -- true", "sub": "probe, console and --json timings",
            "n": t["totalMs"]["n"],
            "phases": [
                ("VMM start (exec to first KVM_RUN)", "vmm", run["exec_to_first_run_ms"]["median"]),
                ("kernel boot to init", "kernel", run["kernel_to_init_ms"]["median"]),
                ("init to the agent's hello (agent start-up)", "init", run["init_to_hello_ms"]["median"]),
                ("agent ready (hello to command start)", "agent", t["agentReadyMs"]["median"]),
                ("command", "command", t["commandMs"]["median"]),
                ("shutdown", "shutdown", t["shutdownMs"]["median"]),
            ],
            "total": run.get("wall_ms"),
        })
    elif t and str(run.get("layout", "")).startswith("durations"):
        rows.append({
            "label": "airlock run -- true", "sub": "phases from its --json timings",
            "n": t["totalMs"]["n"],
            "phases": [
                ("VMM start (process start to first KVM_RUN)", "vmm", t["vmmStartMs"]["median"]),
                ("kernel boot to agent hello", "kernel", t["kernelBootMs"]["median"]),
                ("agent ready (hello to command start)", "init", t["agentReadyMs"]["median"]),
                ("command", "command", t["commandMs"]["median"]),
                ("shutdown", "shutdown", t["shutdownMs"]["median"]),
            ],
            "total": t["totalMs"],
        })
    elif run and not run.get("available", True):
        rows.append({"label": "airlock run -- true", "sub": "", "note": "not measured: " + run.get("reason", "")})
    q = results.get("qemu") or {}
    if q.get("booted") and q.get("boot_runs"):
        r = q["boot_runs"]
        import statistics
        def med(key):
            xs = [x[key] for x in r if x.get(key) is not None]
            return statistics.median(xs) if xs else None
        fr, init, ready, ex = med("first_run_ms"), med("init_started_ms"), med("ready_ms"), med("exit_ms")
        if None not in (fr, init, ready, ex):
            rows.append({"label": "QEMU microvm", "sub": "same kernel and rootfs", "n": len(r),
                         "phases": [("VMM start", "vmm", fr), ("kernel boot to init", "kernel", init - fr),
                                    ("init to ready marker", "init", ready - init), ("shutdown", "shutdown", ex - ready)],
                         "total": None})
    elif q.get("installed"):
        first = (q.get("attempts") or [{}])[0]
        why = (first.get("last_output") or ["?"])[-1]
        rows.append({"label": "QEMU microvm", "sub": "same kernel and rootfs",
                     "note": f"did not boot: {first.get('exit', '?')} after {first.get('seconds', 0):.2f} s: {why}"})
    elif q:
        rows.append({"label": "QEMU microvm", "sub": "", "note": "not measured: " + q.get("reason", "")})
    return rows


def nice_step(span):
    for step in (0.5, 1, 2, 5, 10, 20, 30, 60, 120):
        if span / step <= 12:
            return step
    return 300


def render(results):
    rows = rows_from(results)
    width, left, right = 980, 250, 30
    row_h, bar_h, top = 66, 26, 70
    plot_w = width - left - right
    spans = []
    for r in rows:
        if "phases" in r:
            spans.append(sum(p[2] for p in r["phases"]))
            if r.get("total"):
                spans.append(r["total"]["max"])
    span_s = max(spans) / 1000 if spans else 1
    step = nice_step(span_s)
    axis_max = step * (int(span_s / step) + 1)
    x = lambda ms: left + plot_w * (ms / 1000) / axis_max

    legend = []
    for r in rows:
        for name, kind, ms in r.get("phases", []):
            legend.append((r["label"], name, kind, ms))
    legend_h = 18 * len(legend) + 30
    height = top + row_h * len(rows) + 40 + legend_h
    host = results.get("host", {})
    title = "Boot timeline (medians of the measured phases)"
    subtitle = f"{host.get('date', '')}: {host.get('cpu_model', '')}, {host.get('cores', '')} cores; {host.get('backend', '')}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'font-family="Helvetica, Arial, sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="16" font-weight="bold">{escape(title)}</text>',
           f'<text x="{left}" y="40" fill="#555">{escape(subtitle)}</text>']
    axis_y = top + row_h * len(rows) + 6
    t = 0.0
    while t <= axis_max + 1e-9:
        xx = x(t * 1000)
        out.append(f'<line x1="{xx:.1f}" y1="{top - 6}" x2="{xx:.1f}" y2="{axis_y}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{xx:.1f}" y="{axis_y + 16}" text-anchor="middle" fill="#444">{t:g} s</text>')
        t += step
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#444"/>')
    for i, r in enumerate(rows):
        y = top + i * row_h
        n = f" (N={r['n']})" if r.get("n") else ""
        out.append(f'<text x="{left - 10}" y="{y + bar_h / 2 + 4:.1f}" text-anchor="end" font-weight="bold">{escape(r["label"] + n)}</text>')
        if r.get("sub"):
            out.append(f'<text x="{left - 10}" y="{y + bar_h / 2 + 20:.1f}" text-anchor="end" fill="#666" font-size="10">{escape(r["sub"])}</text>')
        if "note" in r:
            words, lines = r["note"].split(), [""]
            for w in words:
                if len(lines[-1]) + len(w) + 1 > 100 and len(lines) < 3:
                    lines.append("")
                lines[-1] = (lines[-1] + " " + w).strip()
            for k, text in enumerate(lines):
                out.append(f'<text x="{left + 4}" y="{y + bar_h / 2 + 4 + 15 * k:.1f}" fill="#a33">{escape(text)}</text>')
            continue
        at = 0.0
        for name, kind, ms in r["phases"]:
            x0, x1 = x(at), x(at + ms)
            out.append(f'<rect x="{x0:.2f}" y="{y}" width="{max(x1 - x0, 0.8):.2f}" height="{bar_h}" fill="{COLORS[kind]}">'
                       f'<title>{escape(name)}: {ms:.1f} ms</title></rect>')
            if x1 - x0 > 46:
                out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{y + bar_h / 2 + 4:.1f}" text-anchor="middle" fill="white">'
                           f'{ms / 1000:.2f} s</text>')
            at += ms
        tot = r.get("total")
        if tot:
            xa, xb, ym = x(tot["min"]), x(tot["max"]), y + bar_h + 6
            out.append(f'<line x1="{xa:.1f}" y1="{ym}" x2="{xb:.1f}" y2="{ym}" stroke="#222"/>')
            out.append(f'<line x1="{xa:.1f}" y1="{ym - 4}" x2="{xa:.1f}" y2="{ym + 4}" stroke="#222"/>')
            out.append(f'<line x1="{xb:.1f}" y1="{ym - 4}" x2="{xb:.1f}" y2="{ym + 4}" stroke="#222"/>')
            xm = x(tot["median"])
            out.append(f'<circle cx="{xm:.1f}" cy="{ym}" r="2.5" fill="#222"/>')
            out.append(f'<text x="{xb:.1f}" y="{y - 5:.1f}" text-anchor="end" fill="#222" font-size="10">'
                       f'whole run: median {tot["median"] / 1000:.2f} s, min {tot["min"] / 1000:.2f}, max {tot["max"] / 1000:.2f}</text>')
    ly = axis_y + 40
    out.append(f'<text x="{left}" y="{ly}" font-weight="bold">Phases (median)</text>')
    for j, (row, name, kind, ms) in enumerate(legend):
        yy = ly + 16 + 18 * j
        out.append(f'<rect x="{left}" y="{yy - 10}" width="12" height="12" fill="{COLORS[kind]}"/>')
        val = f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"
        out.append(f'<text x="{left + 18}" y="{yy}">{escape(row)}: {escape(name)}: {val}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "bench", "results", "latest.json")
    dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "docs", "boot-timeline.svg")
    with open(src) as f:
        results = json.load(f)
    with open(dst, "w") as f:
        f.write(render(results))
    print(dst)


if __name__ == "__main__":
    main()
