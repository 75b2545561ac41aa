"""Loading and validating placement inputs: the remora spec and Kubernetes scheduler-plugins objects."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from remora.errors import InvalidInput, NotFound
from remora.placement import io
from remora.placement.model import evaluate
from remora.placement.solve import solve

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "placement"


def _spec() -> dict:
    return yaml.safe_load((EXAMPLES / "app.yaml").read_text())


def _load(doc) -> object:
    return io.load_spec(doc, base=EXAMPLES, where="spec")


def test_example_spec_loads_with_units():
    p = io.load([EXAMPLES / "app.yaml"])
    edge1 = p.network.node("edge-1")
    assert edge1.cpu == 4000 and edge1.memory == 2**30 and edge1.storage == 50 * 2**30
    # edge-1 caches the base image: its layer digests are on the node
    assert {"sha256:base-os", "sha256:python"} <= edge1.cached
    link = p.network.links[0]
    assert link.bandwidth == 1e9 / 8 and link.delay == pytest.approx(0.002)
    ingest = p.app.function("ingest")
    assert ingest.cpu == pytest.approx(0.002) and ingest.memory == 128 * 2**20
    assert p.app.delay_bound == pytest.approx(0.15) and p.app.horizon == 3600
    assert p.users == {"edge-1": 20.0, "edge-3": 10.0}
    assert [(e.src, e.dst) for e in p.app.edges] == [("ingest", "resize"), ("resize", "classify")]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["application"]["functions"][0].pop("cpu"),
     "application.functions[ingest]: missing required field 'cpu'"),
    (lambda d: d["network"]["nodes"][0].update(cpus=3), "network.nodes[edge-1]: unknown field(s) 'cpus'"),
    (lambda d: d["application"]["functions"][2].update(calls={"ingest": 10}),
     "the function graph has a cycle: ingest -> resize -> classify -> ingest"),
    (lambda d: d["network"]["links"][0].update(b="edge-9"), "network.links[0]: unknown node 'edge-9'"),
    (lambda d: d["application"]["states"][0].update(size=-5),
     "application.states[sessions].size: must be a non-negative"),
    (lambda d: d["application"]["states"][0]["access"].update(nobody={"read": 1}),
     "application.states[sessions].access: unknown function 'nobody'"),
    (lambda d: d["application"]["functions"][0].update(calls={"ghost": 1}),
     "application.functions[ingest].calls: unknown function 'ghost'"),
    (lambda d: d["network"]["nodes"].append(dict(d["network"]["nodes"][0])), "network.nodes: duplicate name 'edge-1'"),
    (lambda d: d.update(version=2), "spec version 2, this remora reads version 1"),
    (lambda d: d["users"].update({"edge-7": 3}), "users: unknown node 'edge-7'"),
    (lambda d: d["network"]["links"][0].update(bandwidth="fast"), "cannot read bandwidth 'fast'"),
    (lambda d: d["network"]["links"][0].update(delay="soon"), "cannot read duration 'soon'"),
    (lambda d: d["network"]["nodes"][0].update(memory="8 gigs"), "cannot read quantity '8 gigs'"),
    (lambda d: d["network"]["nodes"][1].update(cached=["nonsense"]),
     "is neither an image of the application nor a digest"),
    (lambda d: d.pop("network"), "spec: missing required field 'network'"),
])
def test_validation_errors_are_clear(mutate, message):
    doc = _spec()
    mutate(doc)
    with pytest.raises(InvalidInput) as exc:
        _load(doc)
    assert message in str(exc.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nnetwork: [unclosed\n")
    with pytest.raises(InvalidInput, match="not valid YAML"):
        io.load([bad])
    with pytest.raises(NotFound):
        io.load([tmp_path / "missing.yaml"])


def test_json_spec(tmp_path):
    import json

    f = tmp_path / "app.json"
    f.write_text(json.dumps(_spec()))
    assert len(io.load([f]).app.functions) == 3


def test_users_override():
    p = io.load([EXAMPLES / "app.yaml"], users=io.parse_users("edge-2=4,metro=1.5"))
    assert p.users == {"edge-2": 4.0, "metro": 1.5}
    with pytest.raises(InvalidInput, match="unknown node 'nowhere'"):
        io.load([EXAMPLES / "app.yaml"], users={"nowhere": 1.0})
    with pytest.raises(InvalidInput, match="expected NODE=RATE"):
        io.parse_users("edge-1")


def test_kubernetes_appgroup_and_networktopology():
    files = [EXAMPLES / "appgroup.yaml", EXAMPLES / "networktopology.yaml", EXAMPLES / "nodes.yaml"]
    p = io.load(files)
    assert len(p.app.functions) == 11 and len(p.network.nodes) == 6
    # bidirectional dependencies become one edge each, oriented away from the first workload
    pairs = {(e.src, e.dst) for e in p.app.edges}
    assert ("frontend-deployment", "cartservice-deployment") in pairs
    assert ("cartservice-deployment", "frontend-deployment") not in pairs
    assert ("cartservice-deployment", "redis-cart-deployment") in pairs
    assert p.app.entries == ["frontend-deployment"]
    # zone costs: z1-z2 networkCost 5 -> 5 ms (+ intra-zone 0.2 ms); region us-west-1 - us-east-1: 20
    link = {(lk.a, lk.b): lk for lk in p.network.links}
    assert link[("edge-1", "edge-3")].delay == pytest.approx(0.0052)
    assert link[("edge-1", "edge-4")].delay == pytest.approx(0.0202)
    assert link[("edge-1", "edge-2")].delay == pytest.approx(0.0002)  # same zone
    assert link[("edge-1", "edge-3")].bandwidth == 2**30
    assert p.network.node("edge-2").cpu == 8000 and p.network.node("edge-3").memory == 4 * 2**30
    plan = solve(p, "heuristic")
    assert evaluate(p, plan).feasible


def test_kubernetes_input_errors():
    ag = yaml.safe_load((EXAMPLES / "appgroup.yaml").read_text())
    nt = yaml.safe_load((EXAMPLES / "networktopology.yaml").read_text())
    nodes = yaml.safe_load((EXAMPLES / "nodes.yaml").read_text())["items"]
    with pytest.raises(InvalidInput, match="no NetworkTopology"):
        io.load_kubernetes([ag, *nodes])
    bad = copy.deepcopy(ag)
    bad["spec"]["workloads"][0]["dependencies"][0]["workload"]["name"] = "ghost"
    with pytest.raises(InvalidInput, match="depends on unknown workload 'ghost'"):
        io.load_kubernetes([bad, nt, *nodes])
    n0 = copy.deepcopy(nodes[0])
    del n0["status"]["allocatable"]["memory"]
    with pytest.raises(InvalidInput, match="Node edge-1: status.allocatable needs cpu and memory"):
        io.load_kubernetes([ag, nt, n0])
    with pytest.raises(InvalidInput, match="not a Kubernetes object"):
        io.load_kubernetes([ag, nt, "just a string"])


def test_quantities():
    assert io.bandwidth("x", "100Mbps") == 12.5e6
    assert io.bandwidth("x", "10MiB/s") == 10 * 2**20
    assert io.bandwidth("x", "10Gi") == 10 * 2**30
    assert io.duration("x", "250us") == pytest.approx(250e-6)
    assert io.cpu_millicores("x", "250m") == 250 and io.cpu_millicores("x", 2) == 2000
    with pytest.raises(InvalidInput, match="must be positive"):
        io.bandwidth("x", 0)
    with pytest.raises(InvalidInput, match="expected a number"):
        io.quantity("x", True)


def test_kubernetes_bytes_per_request_follow_the_users_rate():
    files = [EXAMPLES / "appgroup.yaml", EXAMPLES / "networktopology.yaml", EXAMPLES / "nodes.yaml"]
    slow = io.load(files, users={"edge-1": 1.0})
    fast = io.load(files, users={"edge-1": 100.0})
    e_slow = {(e.src, e.dst): e.bytes for e in slow.app.edges}
    e_fast = {(e.src, e.dst): e.bytes for e in fast.app.edges}
    key = ("frontend-deployment", "cartservice-deployment")
    # minBandwidth 100Mi: at 1 request/s each request carries 100 MiB, at 100 requests/s 1 MiB
    assert e_slow[key] == pytest.approx(100 * 2**20) and e_fast[key] == pytest.approx(2**20)
    with pytest.raises(InvalidInput, match="unknown node 'edge-9'"):
        io.load(files, users={"edge-9": 1.0})
