"""Generators: the instances every placement benchmark is measured on must have the shape they claim."""
from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from remora.errors import InvalidInput
from remora.placement import model as m
from remora.placement.generators import (
    DelayProcess,
    image_pool,
    random_application,
    random_problem,
    request_trace,
    to_problem,
    transit_stub_topology,
    waxman_topology,
)


@pytest.mark.parametrize("n", [1, 2, 10, 57, 300])
def test_waxman_connected_sized_and_sparse(n):
    g = waxman_topology(n, seed=n, mean_degree=4.0)
    assert g.number_of_nodes() == n
    assert nx.is_connected(g)
    if n >= 57:  # the degree stays near the target whatever n is (fixed-beta Waxman would be dense)
        assert 2.5 <= 2 * g.number_of_edges() / n <= 6.5
    for _, _, d in g.edges(data=True):
        assert d["bandwidth"] > 0 and d["delay"] > 0 and d["cost_per_gb"] > 0


@pytest.mark.parametrize("n", [5, 10, 31, 100, 1000])
def test_transit_stub_exact_size_hierarchy_and_users(n):
    g = transit_stub_topology(n, seed=7, total_rate=80.0)
    assert g.number_of_nodes() == n
    assert nx.is_connected(g)
    tiers = nx.get_node_attributes(g, "tier")
    transit = [v for v, t in tiers.items() if t == "regional"]
    assert transit and all(v.startswith("t") for v in transit)
    # regional nodes are bigger and cheaper than every edge node: the trade-off placement must weigh
    edge = [v for v, t in tiers.items() if t == "edge"]
    if edge:
        assert min(g.nodes[v]["cpu"] for v in transit) > max(g.nodes[v]["cpu"] for v in edge)
        assert max(g.nodes[v]["cpu_cost"] for v in transit) < min(g.nodes[v]["cpu_cost"] for v in edge)
        assert all(tiers[u] == "edge" for u in g.graph["users"])
    assert math.isclose(sum(g.nodes[u]["user_rate"] for u in g.graph["users"]), 80.0)


def test_topologies_reproducible_by_seed():
    a, b, c = (transit_stub_topology(60, seed=s) for s in (3, 3, 4))
    assert nx.to_dict_of_dicts(a) == nx.to_dict_of_dicts(b)
    assert nx.to_dict_of_dicts(a) != nx.to_dict_of_dicts(c)
    w1, w2 = waxman_topology(80, seed=5), waxman_topology(80, seed=5)
    assert list(w1.edges(data=True)) == list(w2.edges(data=True))


@pytest.mark.parametrize("nf", [1, 5, 15, 100])
def test_application_is_a_dag_rooted_at_the_entry(nf):
    app = random_application(nf, seed=nf)
    d = app.dag()
    assert nx.is_directed_acyclic_graph(d)
    assert [v for v in d if d.in_degree(v) == 0] == [app.entry]
    assert nx.descendants(d, app.entry) | {app.entry} == set(d)
    names = {f.name for f in app.functions}
    for st in app.states:
        assert 1 <= len(set(st.reads) | set(st.writes)) <= 3 and set(st.reads) | set(st.writes) <= names
        assert st.size > 0
    assert {f.image for f in app.functions} <= {im.name for im in app.images}


def test_images_share_base_chunks():
    pool = image_pool(6, seed=1)
    shared = [len(set(a.chunks) & set(b.chunks)) for i, a in enumerate(pool) for b in pool[i + 1:]]
    assert max(shared) > 0  # chunk-level deployment cost has something to deduplicate


def test_request_trace_rates_and_errors():
    tr = request_trace({"a": 10.0, "b": 30.0, "c": 0.0}, seed=2, duration=500.0)
    times = [t for t, _ in tr]
    assert times == sorted(times) and times[-1] <= 500.0
    assert 0.9 * 20000 < len(tr) < 1.1 * 20000
    share_b = sum(1 for _, u in tr if u == "b") / len(tr)
    assert 0.72 < share_b < 0.78 and not any(u == "c" for _, u in tr)
    assert len(request_trace({"a": 1.0}, seed=0, count=37)) == 37
    with pytest.raises(InvalidInput):
        request_trace({"a": 1.0}, seed=0)
    with pytest.raises(InvalidInput):
        request_trace({"a": 0.0}, seed=0, count=3)


def test_delay_process_means_shape_and_drift():
    declared = np.array([0.01, 0.02, 0.05, 0.001])
    dp = DelayProcess(declared, seed=1, mismatch=0.5, shape=4.0)
    x = dp.sample(40_000)
    assert (x > 0).all()
    assert np.allclose(x.mean(axis=0), dp.base, rtol=0.03)
    assert np.allclose(x.std(axis=0) / x.mean(axis=0), 0.5, rtol=0.05)   # CV = 1/sqrt(shape)
    assert not np.allclose(dp.base, declared)                              # the truth is not what was declared
    assert np.array_equal(dp.sample(10, start=5), DelayProcess(declared, seed=1).sample(10, start=5))

    ab = DelayProcess(declared, seed=2, drift="abrupt", horizon=900, changes=2, drift_frac=1.0)
    assert ab.change_points == [300, 600]
    assert np.array_equal(ab.means(0), ab.means(299)) and not np.allclose(ab.means(299), ab.means(300))
    sine = DelayProcess(declared, seed=3, drift="sine", horizon=1000, drift_scale=4.0)
    ratios = np.stack([sine.means(t) / sine.base for t in range(1000)])
    assert ratios.max() <= 2.0 + 1e-9 and ratios.min() >= 0.5 - 1e-9 and ratios.max() > 1.9

    sched = DelayProcess(declared, seed=0, drift="abrupt", schedule=[(10, np.array([2.0, 1, 1, 1]))],
                         true_means=declared)
    assert sched.means(9)[0] == 0.01 and sched.means(10)[0] == 0.02
    for bad in ({"drift": "wobble"}, {"true_means": np.array([1.0])}, {"shape": 0}):
        with pytest.raises(InvalidInput):
            DelayProcess(declared, **bad)
    with pytest.raises(InvalidInput):
        DelayProcess(np.array([0.01, -1.0]))


def test_to_problem_builds_a_model_problem_with_chunk_level_caches():
    imgs = image_pool(4, seed=0)
    g = waxman_topology(12, seed=1, images=imgs, cache_prob=0.0)
    app = random_application(4, seed=1, images=imgs)
    p = to_problem(g, app)
    assert isinstance(p, m.Problem) and len(p.network.nodes) == 12 and len(p.app.functions) == 4
    node = p.network.nodes[0].name
    pl = m.Placement({f.name: node for f in p.app.functions}, {s.name: node for s in p.app.states})
    ev = m.evaluate(p, pl)
    assert math.isfinite(ev.cost.total) and ev.cost.deployment > 0 and ev.mean_delay > 0
    # give that node every chunk of one used image: its deployment bytes shrink by at least that image
    img = imgs[[im.name for im in imgs].index(app.functions[0].image)]
    g.nodes[node]["cached_images"] = (img.name,)
    p2 = to_problem(g, app)
    before = m.deployment_bytes(p, pl)[node]
    after = m.deployment_bytes(p2, pl)[node]
    assert before - after == img.size


@pytest.mark.parametrize("kind", ["waxman", "transit-stub"])
def test_random_problem_has_feasible_spread_placement(kind):
    p = random_problem(30, 10, seed=4, topology=kind)
    # each function on its own regional or large node: capacities leave room for a spread placement
    nodes = sorted(p.network.nodes, key=lambda n: -n.cpu)
    pl = m.Placement({f.name: nodes[i % len(nodes)].name for i, f in enumerate(p.app.functions)},
                     {s.name: nodes[0].name for s in p.app.states})
    assert m.evaluate(p, pl).feasible
    with pytest.raises(InvalidInput):
        random_problem(10, 3, topology="ring")
