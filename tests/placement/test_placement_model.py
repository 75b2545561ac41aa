"""The model's arithmetic (docs/placement.md §2-3): costs, delays, deployment bytes, routing."""
from __future__ import annotations

import hashlib
import math
import stat

import numpy as np
import pytest
from placement_hand import two_nodes
from placement_instances import random_problem

from remora.placement.arrays import Compiled
from remora.placement.io import chunks_from_bootstrap
from remora.placement.model import (
    Application,
    Function,
    Image,
    Link,
    Network,
    Node,
    Placement,
    Problem,
    deployment_bytes,
    evaluate,
    request_delay,
)


def test_hand_instance_costs_and_delay():
    p = two_nodes()
    ev = evaluate(p, Placement({"f": "near", "g": "far"}, {"s": "far"}))
    # processing 50 (f near) + 100 (g far); f->g crosses the link: 10; g and s both on far: 0.
    assert ev.cost.processing == pytest.approx(150.0)
    assert ev.cost.transmission == pytest.approx(10.0)
    assert ev.cost.storage == pytest.approx(0.0)
    assert ev.cost.total == pytest.approx(160.0)
    # 0.1 (f) + 0.01 + 1e6/1e6 (transfer) + 0.1/2 (g) + 0.01 (answer back) = 1.17 s
    assert ev.delays["near"] == pytest.approx(1.17, abs=1e-9)
    assert ev.mean_delay == pytest.approx(1.17, abs=1e-9)
    # per-function delay contributions along the critical path + the answer add up to the delay
    assert ev.functions["f"].delay == pytest.approx(0.1)
    assert ev.functions["g"].delay == pytest.approx(1.06)
    assert ev.feasible


def test_state_on_other_node_costs_round_trip():
    p = two_nodes()
    pl = Placement({"f": "far", "g": "far"}, {"s": "near"})
    ev = evaluate(p, pl)
    # access: 2 * 10 ms + 1 MB / 1 MB/s = 1.02 s on top of 0.12 s
    assert request_delay(p, pl, "near") == pytest.approx(1.14, abs=1e-9)
    assert ev.cost.total == pytest.approx(200 + 10 + 1)


def test_capacity_violation_reported():
    p = two_nodes()
    ev = evaluate(p, Placement({"f": "near", "g": "near"}, {"s": "near"}))
    assert not ev.feasible
    assert any("node near: CPU 200.0m needed > 150.0m" in v for v in ev.violations)


def test_delay_bound_violation_reported():
    p = two_nodes(delay_bound=1.0)
    ev = evaluate(p, Placement({"f": "near", "g": "far"}, {"s": "far"}))
    assert ev.violations == ["requests entering at near: delay 1170.00 ms > bound 1000.00 ms"]


def test_unknown_node_and_missing_function():
    p = two_nodes()
    ev = evaluate(p, Placement({"f": "mars"}, {"s": "far"}))
    assert "function 'f' placed on unknown node 'mars'" in ev.violations
    assert "function 'g' is not placed" in ev.violations
    assert not ev.feasible and math.isinf(ev.objective)


def _chunk_problem() -> Problem:
    # n1 caches chunk a; i1 = {a: 1 GB, b: 2 GB}, i2 = {b: 2 GB, c: 3 GB}; deploy cost 1 per GB.
    nodes = (Node("n1", 1e6, 1e12, deploy_cost=1.0, cached=frozenset({"a"})), Node("n2", 1e6, 1e12, deploy_cost=1.0))
    images = {"i1": Image("i1", (("a", int(1e9)), ("b", int(2e9))), "remora"),
              "i2": Image("i2", (("b", int(2e9)), ("c", int(3e9))), "remora")}
    app = Application("c", (Function("x", 0.0, image="i1"), Function("y", 0.0, image="i2")), images=images)
    return Problem(Network(nodes, (Link("n1", "n2", 1e9, 0.001),)), app, {"n1": 1.0})


def test_deployment_counts_shared_and_cached_chunks_once():
    p = _chunk_problem()
    together = Placement({"x": "n1", "y": "n1"}, {})
    # n1 lacks b and c only (a is cached, b shared by both images is pulled once): 5 GB
    assert deployment_bytes(p, together) == {"n1": 5e9}
    assert evaluate(p, together).cost.deployment == pytest.approx(5.0)
    apart = Placement({"x": "n1", "y": "n2"}, {})
    # n1 needs b (2 GB); n2 needs b and c (5 GB)
    assert deployment_bytes(p, apart) == {"n1": 2e9, "n2": 5e9}
    assert evaluate(p, apart).cost.deployment == pytest.approx(7.0)


def test_routing_uses_least_delay_path_with_bottleneck_and_summed_cost():
    nodes = tuple(Node(n, 1000, 1e9) for n in "abc")
    links = (Link("a", "b", 1e6, 0.001, 1.0), Link("b", "c", 1e7, 0.002, 2.0), Link("a", "c", 1e9, 0.010, 0.5))
    p = Problem(Network(nodes, links), Application("r", (Function("f", 0.0),)), {"a": 1.0})
    pt = p.paths
    # a->c via b: 3 ms < 10 ms direct; bottleneck 1e6; cost 1 + 2
    assert pt.d("a", "c") == pytest.approx(0.003, abs=1e-9)
    assert pt.bw("a", "c") == 1e6
    assert pt.c("a", "c") == pytest.approx(3.0)
    assert pt.transfer("a", "c", 1e6) == pytest.approx(1.003, abs=1e-9)
    assert pt.transfer("b", "b", 1e9) == 0.0


def test_unreachable_user_is_infeasible():
    nodes = (Node("a", 1000, 1e9), Node("b", 1000, 1e9))
    p = Problem(Network(nodes, ()), Application("u", (Function("f", 0.0),)), {"a": 1.0})
    ev = evaluate(p, Placement({"f": "b"}, {}))
    assert "requests entering at a cannot reach the application (no path)" in ev.violations


def test_with_delays_replaces_link_delay():
    p = two_nodes()
    net = p.network.with_delays({("far", "near"): 0.5})
    assert net.links[0].delay == 0.5 and p.network.links[0].delay == 0.01


@pytest.mark.parametrize("seed", range(12))
def test_compiled_arrays_agree_with_evaluate(seed):
    p = random_problem(seed, N=4, F=4, S=2)
    comp = Compiled(p)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        pf, ps = rng.integers(0, 4, 4), rng.integers(0, 4, 2)
        ev = evaluate(p, comp.placement(pf, ps, "t"))
        assert comp.cost(pf, ps) == pytest.approx(ev.cost.total, rel=1e-9)
        d = comp.delays(pf, ps)
        for u, du in zip(comp.users, d):
            assert du == pytest.approx(ev.delays[u], rel=1e-9, abs=1e-12)


def test_chunks_from_a_real_bootstrap(tmp_path):
    from remora.format.bootstrap import write_bootstrap
    from remora.format.chunktable import ChunkTable
    from remora.format.tree import ChunkRef, Inode, Tree

    table = ChunkTable()
    b = table.blob_id("sha256:" + "ab" * 32, 100_000)
    fr = table.add_frame(b, 0, 9000, 12288)
    d1, d2 = hashlib.sha256(b"1").digest(), hashlib.sha256(b"2").digest()
    table.add_chunk(d1, 4096, fr, 0)
    table.add_chunk(d2, 8192, fr, 4096)
    tree = Tree()
    etc = Inode.directory()
    tree.root.children[b"etc"] = etc
    etc.children[b"x"] = Inode(mode=stat.S_IFREG | 0o644, size=12288, chunks=[ChunkRef(d1, 4096), ChunkRef(d2, 8192)])
    etc.children[b"y"] = Inode(mode=stat.S_IFREG | 0o644, size=4096, chunks=[ChunkRef(d1, 4096)])
    tree.number()
    path = tmp_path / "bootstrap.db"
    write_bootstrap(path, tree, table, [], {})
    parts = dict(chunks_from_bootstrap(path))
    assert parts["sha256:" + d1.hex()] == 4096
    assert parts["sha256:" + d2.hex()] == 8192
    boot = [k for k in parts if k.startswith("bootstrap:sha256:")]
    assert len(boot) == 1 and parts[boot[0]] == path.stat().st_size
    assert len(parts) == 3

    # The same bootstrap named by a spec: a node caching chunk d1 lacks d2 and the bootstrap only.
    from remora.placement.io import load_spec

    spec = {"version": 1, "users": {"n1": 1},
            "network": {"nodes": [{"name": "n1", "cpu": 1, "memory": "1Gi", "deploy_cost": 1e9,
                                   "cached": ["sha256:" + d1.hex()]}]},
            "application": {"images": [{"name": "app", "bootstrap": "bootstrap.db"}],
                            "functions": [{"name": "f", "cpu": "1ms", "image": "app"}]}}
    p = load_spec(spec, base=tmp_path)
    assert p.app.images["app"].kind == "remora"
    ev = evaluate(p, Placement({"f": "n1"}, {}))
    assert ev.cost.deployment == pytest.approx(8192 + path.stat().st_size)
