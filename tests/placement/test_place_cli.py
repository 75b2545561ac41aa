"""``remora place`` end to end, through the installed console script (subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "placement"
APP = str(EXAMPLES / "app.yaml")
K8S = [str(EXAMPLES / f) for f in ("appgroup.yaml", "networktopology.yaml", "nodes.yaml")]


def remora(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["remora", *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "COLUMNS": "120", **(env or {})})


def test_help_teaches_with_examples():
    r = remora("place", "--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout
    assert "remora place plan examples/placement/app.yaml --algorithm mip --json" in r.stdout
    assert "AppGroup" in r.stdout and "NetworkTopology" in r.stdout
    r = remora("place", "plan", "--help")
    assert r.returncode == 0 and "--picture" in r.stdout and "--manifests" in r.stdout


def test_plan_json_heuristic():
    r = remora("place", "plan", APP, "--algorithm", "heuristic", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model_version"] == 1 and doc["algorithm"] == "heuristic"
    assert set(doc["placement"]["functions"]) == {"ingest", "resize", "classify"}
    assert set(doc["placement"]["states"]) == {"sessions", "model-weights"}
    ev = doc["evaluation"]
    assert ev["feasible"] is True and ev["max_delay"] <= 0.15
    c = ev["cost"]
    assert abs(c["total"] - (c["processing"] + c["transmission"] + c["storage"] + c["deployment"])) < 1e-9
    assert all({"node", "image", "missing_bytes"} <= set(d) for d in doc["deploy"])


def test_plan_json_mip_matches_heuristic_or_better():
    out = {}
    for alg in ("mip", "heuristic", "approx"):
        r = remora("place", "plan", APP, "-a", alg, "--json")
        assert r.returncode == 0, r.stderr
        out[alg] = json.loads(r.stdout)["evaluation"]["objective"]
    assert out["mip"] <= out["heuristic"] + 1e-9 and out["mip"] <= out["approx"] + 1e-9


def test_plan_table():
    r = remora("place", "plan", APP)
    assert r.returncode == 0, r.stderr
    for word in ("ingest", "resize", "classify", "[sessions]", "[model-weights]", "total cost", "mean delay"):
        assert word in r.stdout


def test_picture_png_and_svg(tmp_path):
    png, svg = tmp_path / "plan.png", tmp_path / "plan.svg"
    r = remora("place", "plan", APP, "--picture", str(png))
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    r = remora("place", "plan", *K8S, "--users", "edge-1=20,edge-4=5", "--picture", str(svg))
    assert r.returncode == 0, r.stderr
    assert "<svg" in svg.read_text()[:1000]
    r = remora("place", "plan", APP, "--picture", str(tmp_path / "plan.gif"))
    assert r.returncode == 2 and "use a .png or .svg" in r.stderr


def test_manifests_pin_functions_to_their_nodes(tmp_path):
    out = tmp_path / "k8s"
    r = remora("place", "plan", APP, "--json", "--manifests", str(out), "--namespace", "edge")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["placement"]["functions"]
    for fn, node in plan.items():
        doc = yaml.safe_load((out / f"{fn}.deployment.yaml").read_text())
        assert doc["kind"] == "Deployment" and doc["metadata"]["namespace"] == "edge"
        terms = doc["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms == [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]
        assert doc["spec"]["template"]["spec"]["containers"][0]["image"].startswith("registry.local/")
    cm = yaml.safe_load((out / "placement.yaml").read_text())
    assert json.loads(cm["data"]["placement.json"])["functions"] == plan
    # AppGroup workloads name existing Deployments: patches, not new Deployments
    out2 = tmp_path / "k8s2"
    r = remora("place", "plan", *K8S, "--manifests", str(out2))
    assert r.returncode == 0, r.stderr
    assert (out2 / "frontend-deployment.patch.yaml").is_file()


def test_kubernetes_inputs_plan_with_every_algorithm():
    r = remora("place", "compare", *K8S, "--users", "edge-1=20,edge-4=5", "--delay-weight", "100", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["algorithm"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"heuristic", "approx", "mip", "nearest", "stateless", "random"}
    assert rows["mip"]["objective"] <= min(row["objective"] for row in rows.values()) + 1e-9


def test_errors_have_clear_messages_and_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load(Path(APP).read_text())
    doc["application"]["functions"][2]["calls"] = {"ingest": 10}
    bad.write_text(yaml.safe_dump(doc))
    r = remora("place", "plan", str(bad))
    assert r.returncode == 3 and "cycle: ingest -> resize -> classify -> ingest" in r.stderr
    r = remora("place", "plan", str(tmp_path / "nope.yaml"))
    assert r.returncode == 5 and "no such file" in r.stderr
    r = remora("place", "plan", APP, "--algorithm", "magic")
    assert r.returncode == 2 and "unknown algorithm 'magic'" in r.stderr
    r = remora("place", "plan", APP, "--delay-bound", "1ms", "-a", "mip")
    assert r.returncode == 8 and "no feasible placement" in r.stderr
    r = remora("place", "plan", APP, "--delay-bound", "1ms", "--json")
    assert r.returncode == 8 and json.loads(r.stdout)["evaluation"]["feasible"] is False


def test_missing_extra_is_a_clear_error(tmp_path):
    # A directory first on the path whose 'scipy' cannot be imported stands for "extra not installed".
    shadow = tmp_path / "shadow" / "scipy"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named scipy (test shadow)')\n")
    r = remora("place", "plan", APP, env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert r.returncode == 2
    assert "remora place needs the 'place' extra (missing: scipy)" in r.stderr


def test_validate_and_algorithms():
    r = remora("place", "validate", APP)
    assert r.returncode == 0 and "3 functions" in r.stdout and "30 requests/s" in r.stdout
    r = remora("place", "algorithms")
    assert r.returncode == 0 and "approx" in r.stdout and "mip" in r.stdout
