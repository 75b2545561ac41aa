"""Smoke test of the parent-scorer benchmark in namespaces (benchmarks/bench_parent_netns.py --smoke).

Real processes in a netlab: a registry behind a tbf uplink, a mutual-TLS scheduler restarted once per
arm (``--scorer weighted|bandit|random|learned``), 4 peers on 5/20/80 Mbit/s uplinks restarted with
empty stores, every node downloading 2 blobs of 1 MiB on a staggered schedule; a weighted warm-up run
writes history, ``remora trainer`` fits a model on it, the learned arm loads it with ``--model-dir``
(and ``learned-open`` with its gates opened).
It checks the harness, not the speed targets: every arm ran and is in the table, every fetch was verified
against its digest, the trainer produced a model (or said why not), and the learned arm's decisions are
accounted for (ranked by the model, or counted as a named fallback). ~30-45 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_parent_netns.py"
ARMS = {"weighted", "bandit", "random", "learned", "learned-open"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_runs_every_arm_on_verified_blobs(tmp_path):
    out = tmp_path / "parents.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json", str(out)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'testing'}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    doc = json.loads(out.read_text())
    assert list(doc["settings"]) == ["het"]
    het = doc["settings"]["het"]
    assert len(set(het["uplinks"])) == 3, het["uplinks"]          # the links really differ
    fetches = doc["config"]["nodes"] * doc["config"]["blobs"]
    assert {r["arm"] for r in het["runs"]} == ARMS
    assert set(het["summary"]) == ARMS
    for arm, s in het["summary"].items():
        assert s["verified"] == s["fetches"] == fetches, (arm, s)
        assert s["mean_s_median"] > 0 and s["p95_s_median"] >= s["mean_s_median"] * 0.5
    assert het["summary"]["weighted"]["p95_ratio_median"] == 1.0
    for run in het["runs"]:
        assert run["verified"] == run["fetches"] == fetches
        assert len(run["load_before"]) == 3 and run["parents_returned"] > 0, run
    # the warm-up wrote history and the trainer turned it into a model file (or said why it could not)
    training = het["training"]
    assert training["history_rows"] > 0
    assert "model" in training or training.get("trainer_error"), training
    learned = next(r for r in het["runs"] if r["arm"] == "learned")
    decided = learned["parents_ranked_by_model"] + sum(learned["fallbacks"].values())
    assert decided > 0, learned                     # every decision is accounted for: model or a named fallback
    assert learned["model_version"] == (1 if "model" in training else 0)
    # with its gates opened, a model ranks the parents itself (predicted costs in the scheduler's metrics)
    opened = next(r for r in het["runs"] if r["arm"] == "learned-open")
    # (the scheduler takes no negative --model-min-advantage: a model worse than the naive predictor on
    # held-out history, as a few dozen rows can give, still falls back, and must say so)
    advantage = training["model"]["advantage"] if "model" in training else None
    if advantage is not None and advantage >= 0:
        assert opened["parents_ranked_by_model"] > 0 and sum(opened["fallbacks"].values()) == 0, opened
    elif "model" in training:
        assert opened["parents_ranked_by_model"] == 0 and opened["fallbacks"]["no_advantage"] > 0, opened
    status = het["summary"]["learned"]["status"]
    assert status.startswith("model ranked") or status.startswith("FELL BACK"), status
    # the printed table names every arm, with the learned arm's gate outcome
    table = proc.stdout
    for arm in ARMS:
        assert f"| {arm} |" in table, table
    assert status in table
