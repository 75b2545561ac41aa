"""Smoke test of the end-to-end placement benchmark (benchmarks/bench_placement_e2e.py --smoke).

Real everything, in network namespaces: registry, a mutual-TLS scheduler, 4 nodes with a peer, a
``remora snapshotter`` (lazy reads through that peer), a containerd using it as a proxy plugin, and the
app's node agent each; the functions' images are ``remora convert``ed, pulled with ``remora pull`` and
started with ``ctr run --snapshotter remora`` (each container checks the SHA-256 of the file it reads at
start). ``remora place plan --from-scheduler`` plans both arms on the live cluster, the planned arm
preheats through the peers' task API. It checks the harness, not the speed target: both arms ran on the
same lab, every promised figure is in the JSON, the figures agree with each other, and — the property
preheating exists for — the planned arm's deploy read no blob byte (bootstrap, config, hot blob or
other chunk blob) from the registry: all came from the node's peer; while the cold arm read its hot
blobs from the registry. ~1-2 min.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_placement_e2e.py"
ARM_FIELDS = {"deploy_ready_s", "per_node_ready_s", "first_answer_s", "first_delay_s", "measured_delay_s",
              "measured_delays_s", "deploy_registry_bytes", "plan_s", "placement", "predicted_delay_s",
              "predicted_cost", "predicted_objective", "predicted_deployment_bytes", "plan_registry_bytes",
              "deploy_registry_bytes_by_role", "image_bytes_by_role"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_runs_both_arms_and_reports_consistent_figures(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--json-out", str(out)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=850,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'testing'}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    doc = json.loads(out.read_text())
    assert doc["errors"] == [] and len(doc["runs"]) == 1
    run = doc["runs"][0]
    # a passing smoke run leaves nothing behind (a real run keeps the logs and specs for a look)
    assert not (Path("/tmp") / run["lab"]).exists(), f"/tmp/{run['lab']} left behind"
    assert set(run["arms"]) == {"planned", "random"}
    hosts = {f"{run['lab']}-node{i}" for i in range(doc["config"]["nodes"])}
    for arm, m in run["arms"].items():
        assert ARM_FIELDS <= m.keys(), arm
        assert set(m["placement"]["functions"]) == {"f1", "f2", "f3"}
        assert set(m["placement"]["functions"].values()) | set(m["placement"]["states"].values()) <= hosts
        # the first request waits for the whole chain (the harness notes a node ready a moment after its agent is)
        assert 0 < m["deploy_ready_s"] < m["first_answer_s"] + 1.0, m
        assert len(m["measured_delays_s"]) == doc["config"]["requests"]
        assert all(d > 0 for d in m["measured_delays_s"]) and m["predicted_delay_s"] > 0
        # at least the one-way delays the lab imposes on the plan's critical path are really paid
        assert min(m["measured_delays_s"]) > 0.5 * m["predicted_delay_s"] - 0.01, m
        assert m["predicted_deployment_bytes"] > 0
    assert doc["config"]["image_format"] == "remora"
    planned, cold = run["arms"]["planned"], run["arms"]["random"]
    for m in (planned, cold):   # remora images: config, bootstrap, a hot blob and the other chunk blob(s)
        assert {"config", "bootstrap", "hot blob"} <= m["image_bytes_by_role"].keys(), m["image_bytes_by_role"]
    # preheat fetched the plan's bytes (all of them: the default is the hot blob first, then the rest) ...
    assert planned["plan_registry_bytes"] >= 0.9 * planned["predicted_deployment_bytes"]
    # ... so the deploy after it read no blob byte from the registry: the bootstrap, the config and every
    # byte the containers read came from the peer's verified store (the snapshotter and `remora pull` ask
    # their --mirror first); the registry still answers the manifest by tag and the access checks (HEAD)
    assert planned["deploy_registry_bytes_by_role"] == {}, planned["deploy_registry_bytes_by_role"]
    assert planned["deploy_registry_bytes"] == 0
    # the preheat's --pull (the default) left every planned image in its node's containerd: the deploy
    # found it there (imagePullPolicy IfNotPresent) and ran no pull; the cold arm pulled every image
    assert doc["config"]["preheat_pull"] is True
    assert planned["per_function_phases_s"] and all(ph["present"] for ph in planned["per_function_phases_s"].values())
    assert not any(ph["present"] for ph in cold["per_function_phases_s"].values())
    # the cold arm's deploy read its images' hot blobs from the registry (lazily, through its peers)
    assert cold["deploy_registry_bytes_by_role"].get("hot blob", 0) >= 0.9 * cold["image_bytes_by_role"]["hot blob"]
    # the planner's objective: its plan is no worse than the random one on the model
    assert planned["predicted_objective"] <= cold["predicted_objective"] + 1e-9
    s = doc["summary"]
    assert {r["arm"] for r in s["rows"]} == {"planned", "random"}
    assert s["first_answer_speedup"] == pytest.approx(cold["first_answer_s"] / planned["first_answer_s"])
