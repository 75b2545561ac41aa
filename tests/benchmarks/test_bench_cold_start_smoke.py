"""Smoke test of the cold-start benchmark harness (benchmarks/bench_cold_start.py --smoke).

Real everything: the lab registry behind tbf + the delay forwarder, private containerds, the remora
snapshotter and the stargz snapshotter built from Debian's sources. One small image, one cold start
per side, one burst each way. It checks the harness, not remora's speed: every side's workload
really printed its marker, every figure the report promises is in the JSON, and the figures are
consistent with each other (a harness that lost a field, mixed up sides or timed nothing fails).
~1.5 min with the image cache filled; the first run on a machine also builds the image, its remora
conversion, its eStargz optimisation and the stargz snapshotter (several minutes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_cold_start.py"
SIDES = {"overlayfs", "remora", "estargz"}
RESULT_FIELDS = {"image", "workload", "mode", "side", "run", "pull_s", "run_s", "total_s", "daemon_ready_s", "bytes",
                 "bytes_at_output", "requests", "local_run_s", "output"}
ROW_FIELDS = {"image", "workload", "mode", "side", "runs", "pull_s", "run_s", "total_s", "daemon_ready_s", "bytes",
              "bytes_at_output", "requests", "local_run_s", "bound_s", "transfer_bound_s", "overlayfs_local_run_s",
              "vs_bound", "vs_overlayfs", "vs_estargz"}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # first run on a machine builds the images and the stargz daemon
def test_smoke_reports_every_side_and_field(tmp_path):
    out = tmp_path / "cold.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json-out", str(out)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=1700,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["errors"] == []

    results = doc["results"]
    assert {r["side"] for r in results} == SIDES
    for r in results:
        assert RESULT_FIELDS <= r.keys()
        assert "remora-bench:" in r["output"], r
        assert 0 < r["pull_s"] < r["total_s"] and r["run_s"] > 0
        assert abs(r["pull_s"] + r["run_s"] - r["total_s"]) < 1e-6
        assert 0 < r["bytes_at_output"] <= r["bytes"]
        assert r["daemon_ready_s"] > 0 and r["local_run_s"] > 0
    by_side = {r["side"]: r for r in results}
    image = doc["images"][0]
    # overlayfs downloads every layer; the lazy sides fetch a fraction of it by the workload's output
    # (stargz's background fetch may add more soon after, hence the margin)
    assert by_side["overlayfs"]["bytes_at_output"] >= image["oci_bytes"]
    for lazy in ("remora", "estargz"):
        assert by_side[lazy]["bytes_at_output"] < image["oci_bytes"] / 2

    rows = doc["summary"]["rows"]
    assert {r["side"] for r in rows} == SIDES
    for row in rows:
        assert ROW_FIELDS <= row.keys()
        assert row["bound_s"] >= row["transfer_bound_s"] > 0
        assert row["bound_s"] >= row["overlayfs_local_run_s"] > 0
        assert row["vs_bound"] == pytest.approx(row["total_s"] / row["bound_s"])
    est = next(r for r in rows if r["side"] == "estargz")
    assert est["vs_estargz"] == pytest.approx(1.0)

    bursts = doc["bursts"]
    assert {(b["kind"], b["side"]) for b in bursts} == {(k, s) for k in ("parallel", "serial") for s in SIDES}
    for b in bursts:
        assert b["total_s"] > 0 and set(b["per_image_s"]) == {image["name"]} and b["bytes"] > 0

    assert {t["label"].rsplit("/", 1)[1] for t in doc["timelines"]} == SIDES
    for t in doc["timelines"]:
        names = [e["event"] for e in t["events"] if e["src"] == "harness"]
        assert names[-1].startswith("output:") and "pull_start" in names and "pull_done" in names
        assert any(e["src"] == "snapshotter" for e in t["events"]) or t["label"].endswith("overlayfs")
    assert doc["link"]["mbit_s"] > 0 and len(doc["load_avg_before"]) == 3
