"""Tests of the benchmark scripts that need no VM: `make bench-selftest`.

The `run` section is driven end to end against bench/testdata/fake-airlock,
which answers like `airlock run --json` (its contract: stdout, stderr,
exitCode, signal, timedOut, outputTruncated, systemEvent, timings with
vmmStartMs, kernelBootMs, agentReadyMs, commandMs, shutdownMs, totalMs).
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
import chart  # noqa: E402
import report  # noqa: E402
import serve_load  # noqa: E402

FAKE = os.path.join(HERE, "testdata", "fake-airlock")
TOOLS = os.environ.get("BENCH_OUT", os.path.join(os.path.dirname(HERE), ".build", "bench"))


class Parsing(unittest.TestCase):
    def doc(self, **timings):
        t = {"vmmStartMs": 10.0, "kernelBootMs": 100.0, "agentReadyMs": 5.0, "commandMs": 2.0, "shutdownMs": 3.0}
        t.update(timings)
        t.setdefault("totalMs", sum(v for k, v in t.items() if k != "totalMs"))
        return {"stdout": "", "stderr": "", "exitCode": 0, "signal": None, "timedOut": False,
                "outputTruncated": False, "systemEvent": "reset", "timings": t}

    def test_contract_document_parses(self):
        doc, problems = bench.parse_run_json(json.dumps(self.doc()))
        self.assertEqual(problems, [])
        self.assertEqual(bench.phase_layout(doc["timings"]), "durations")

    def test_missing_keys_and_bad_types_are_named(self):
        d = self.doc()
        del d["outputTruncated"]
        del d["timings"]["commandMs"]
        d["signal"] = "9"
        _, problems = bench.parse_run_json(json.dumps(d))
        self.assertIn("missing key outputTruncated", problems)
        self.assertIn("missing timings.commandMs", problems)
        self.assertIn("signal is neither null nor a number", problems)

    def test_not_json(self):
        doc, problems = bench.parse_run_json("airlock: something failed\n")
        self.assertIsNone(doc)
        self.assertTrue(problems[0].startswith("stdout is not one JSON document"))

    def test_cumulative_layout_is_recognised(self):
        t = {"vmmStartMs": 10.0, "kernelBootMs": 110.0, "agentReadyMs": 115.0, "commandMs": 117.0,
             "shutdownMs": 120.0, "totalMs": 120.0}
        self.assertEqual(bench.phase_layout(t), "cumulative")

    def test_stats(self):
        s = bench.stats([3, 1, None, 2])
        self.assertEqual((s["n"], s["median"], s["min"], s["max"]), (3, 2, 1, 3))
        self.assertIsNone(bench.stats([None]))


class Memory(unittest.TestCase):
    def test_guest_mapping_is_taken_out(self):
        guest = 128 << 20
        maps = [
            {"size": guest, "perm": "rw-s", "name": "/dev/zero (deleted)", "rss": 12000, "pd": 12000},
            {"size": 8 << 20, "perm": "r-xp", "name": "/usr/lib/libswiftCore.so", "rss": 5000},
            {"size": 1 << 20, "perm": "rw-p", "name": "[heap]", "rss": 400, "pd": 400},
            {"size": 64 << 20, "perm": "rw-p", "name": "", "rss": 100, "pd": 100},
        ]
        m = bench.memory_split(maps, guest)
        self.assertEqual(m["guest_kib"], 12000)
        self.assertEqual(m["vmm_kib"], 5500)
        self.assertEqual(m["vmm_file_kib"], 5000)
        self.assertEqual(m["vmm_dirty_kib"], 500)
        self.assertTrue(m["exact_size_match"])

    def test_guest_ram_split_by_the_mapped_kernel_is_found_by_adjacency(self):
        mib = 1 << 20
        def m(lo, hi, perm, name, rss):
            return {"lo": lo * mib, "hi": hi * mib, "size": (hi - lo) * mib, "perm": perm, "name": name, "rss": rss}
        maps = [
            m(0, 8, "rw-p", "", 100),                          # a thread stack: not the guest's
            m(8, 24, "rw-s", "/dev/zero (deleted)", 1000),     # RAM below the kernel
            m(24, 30, "rw-p", "/images/vmlinux", 2000),         # kernel text, copy-on-write
            m(30, 31, "rw-s", "/dev/zero (deleted)", 10),
            m(31, 32, "rw-p", "/images/vmlinux", 20),           # kernel data
            m(32, 136, "rw-s", "/dev/zero (deleted)", 300),     # the rest of 128 MiB
            m(200, 210, "r-xp", "/usr/bin/airlock", 4000),
        ]
        s = bench.memory_split(maps, 128 * mib)
        self.assertEqual(s["guest_kib"], 3330)
        self.assertEqual(s["vmm_kib"], 4100)
        self.assertEqual(s["vmm_file_kib"], 4000)
        self.assertEqual(len(s["guest_mapping"]), 5)

    def test_no_guest_mapping_gives_nothing(self):
        self.assertIsNone(bench.memory_split([{"size": 4096, "perm": "r--p", "name": "/bin/x", "rss": 4}], 128 << 20))


@unittest.skipUnless(os.path.exists(os.path.join(TOOLS, "exec-timed")), "make bench-c first")
class SnapshotMemory(unittest.TestCase):
    def test_written_guest_pages_are_taken_out_of_the_private_figure(self):
        maps = [
            {"size": 128 << 20, "name": "/snapshot.snap", "rss": 11 * 1024, "pss": 3 * 1024, "pc": 0, "pd": 3 * 1024},
            {"size": 8 << 20, "name": "/proc/self/exe", "rss": 8 * 1024, "pss": 1024, "pc": 0, "pd": 512},
            {"size": 1 << 20, "name": "", "rss": 512, "pss": 512, "pc": 0, "pd": 512},
        ]
        m = bench.restored_vm_memory(maps)
        self.assertEqual(m["guest_written_mib"], 3)
        self.assertEqual(m["private_mib"], 4)
        self.assertEqual(m["private_beyond_written_mib"], 1)
        self.assertTrue(m["guest_mapped"])
        self.assertAlmostEqual(m["pss_mib"], 4.5)

    def test_the_snapshot_section_renders(self):
        s = {"memory_mib": 128, "creates": [{"memory_mib": 128, "allocated_mib": 12.0, "file_mib": 130, "data_pages": 3000,
                                              "write_ms": 30.0, "save_ms": 70.0, "create_wall_ms": 24000.0}],
             "rounds": [{}], "all_restored": True, "failures": [],
             "restored": {k: bench.stats([v]) for k, v in {"wall_ms": 3000, "restore_ms": 2, "check_ms": 5, "vmmStartMs": 20,
                                                             "agentReadyMs": 1000, "commandMs": 1500, "totalMs": 2900}.items()},
             "cold": {k: bench.stats([v]) for k, v in {"wall_ms": 24000, "vmmStartMs": 30, "kernelBootMs": 21000,
                                                         "agentReadyMs": 1000, "commandMs": 1500, "totalMs": 23900}.items()},
             "ratio_of_median_walls": 0.125, "ratio_wall_per_round": bench.stats([0.125])}
        text = report.snapshot_md(s)
        self.assertIn("| 128 MiB | 130 MiB | 12.0 MiB | 3000 |", text)
        self.assertIn("**0.125**", text)
        self.assertIn("restore's own cost", report.summary({"snapshot": s, "host": {}}))


class RunSectionAgainstTheFake(unittest.TestCase):
    def run_bench(self, env=None):
        out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
        try:
            subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--only", "run", "--run-runs", "2",
                            "--bin", "/nonexistent", "--tools", TOOLS, "--airlock-for-run", FAKE, "--out", out],
                           check=True, capture_output=True, env=dict(os.environ, **(env or {})))
            with open(out) as f:
                return json.load(f)
        finally:
            os.unlink(out)

    def test_phases_are_collected(self):
        r = self.run_bench()["run"]
        self.assertTrue(r["available"])
        self.assertEqual(len(r["runs"]), 2)
        self.assertEqual(r["timings_ms"]["totalMs"]["median"], 42.5)
        self.assertEqual(r["layout"], "durations")
        self.assertIn("--memory 128", r["command"])

    def test_a_broken_document_is_a_failure(self):
        r = self.run_bench({"FAKE_AIRLOCK_BROKEN": "1"})["run"]
        self.assertEqual(r["runs"], [])
        self.assertIn("missing key timedOut", r["failures"][0]["problems"])

    def test_report_and_chart_render(self):
        res = self.run_bench()
        res["host"]["vmlinux_bytes"] = None
        page = report.render(res)
        self.assertIn("`airlock run -- true`, end to end", page)
        self.assertIn("42", page)
        svg = chart.render(res)
        self.assertTrue(svg.startswith("<svg") and "airlock run -- true" in svg)


class ServeLoad(unittest.TestCase):
    def test_percentiles_are_nearest_rank(self):
        xs = list(range(1, 101))
        self.assertEqual(serve_load.percentile(xs, 50), 50)
        self.assertEqual(serve_load.percentile(xs, 99), 99)
        self.assertEqual(serve_load.percentile([7], 99), 7)
        s = serve_load.summary([3.0, None, 1.0, 2.0])
        self.assertEqual((s["n"], s["p50"], s["min"], s["max"]), (3, 2.0, 1.0, 3.0))
        self.assertIsNone(serve_load.summary([None]))

    def test_only_loopback_is_driven(self):
        self.assertEqual(serve_load.LOOPBACK, "127.0.0.1")

    def test_the_serve_section_renders(self):
        cell = {"provider": "vm", "mode": "pool", "command": "true", "concurrency": 2, "requests": 2, "ok": 2, "rps": 0.5,
                "latency_ms": serve_load.summary([900.0, 1100.0]), "overhead_ms": serve_load.summary([0.4, 0.6]),
                "queue_ms": serve_load.summary([0.1, 0.1]), "sandbox_ms": serve_load.summary([899.0, 1099.0]),
                "from_pool": 2, "errors": []}
        census = {"fds": 20, "kvm_fds": 8, "threads": 30, "children": 0}
        soak = {"requests": 10, "concurrency": 2, "seconds": 1.0, "answers": {"succeeds": 10}, "counted_runs": 10,
                "problems": [], "problem_count": 0, "census_before": census, "census_after": census, "leaks": [],
                "exit_status": 0, "drain_seconds": 0.1, "host_before": {}, "host_after": {}, "passed": True}
        res = {"serve": {"cells": [cell, dict(cell, provider="scripted")], "vm_overhead_p50_ms": 0.5,
                         "scripted_overhead_p50_ms": 0.3, "soak_scripted": soak}}
        md = report.serve_md(res["serve"])
        self.assertIn("| VMs, pool | true | 2 | 2 (2) |", md)
        self.assertIn("Leaks: none", md)
        self.assertIn("at most 2 ms | met", report.summary(res))


if __name__ == "__main__":
    unittest.main()
